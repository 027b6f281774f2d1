//! A minimal synchronous `NETLINK_SOCK_DIAG` client for IPv4/IPv6 TCP and
//! UDP sockets: dump the sockets of the calling thread's network namespace
//! that talk to one destination (the kernel filters with inet_diag bytecode,
//! so only matching sockets cross to user space), and destroy one socket by
//! its full id (`SOCK_DESTROY`, needs `CONFIG_INET_DIAG_DESTROY`). The
//! netlink socket is opened per call, so it queries the namespace of the
//! thread that calls (see `sock_terminate`, which enters pods' namespaces).

use std::io;
use std::net::IpAddr;

use crate::netlink_socket::{finish, header, Socket, NLMSG_HDRLEN};

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const INET_DIAG_REQ_BYTECODE: u16 = 1;
/// `enum { NOP, JMP, S_GE, S_LE, D_GE, D_LE, AUTO, S_COND, D_COND, ... }`.
const INET_DIAG_BC_D_COND: u8 = 8;
/// `struct inet_diag_sockid`.
const SOCKID_LEN: usize = 48;
/// `struct inet_diag_req_v2`: family, protocol, ext, pad, states, sockid.
const REQ_V2_LEN: usize = 8 + SOCKID_LEN;
/// `struct inet_diag_msg`: family, state, timer, retrans, sockid, then five u32.
const DIAG_MSG_LEN: usize = 4 + SOCKID_LEN + 20;

/// TCP states (`include/net/tcp_states.h`), as bits of `idiag_states`.
pub(crate) const TCP_ESTABLISHED: u32 = 1;
const TCP_TIME_WAIT: u32 = 6;
const TCP_CLOSE: u32 = 7;
const TCP_LISTEN: u32 = 10;
const TCP_NEW_SYN_RECV: u32 = 12;

/// States worth destroying for a TCP client socket: anything that still
/// talks or tries to talk to the peer (SYN_SENT included: a connect() to a
/// removed backend would otherwise wait out its SYN retries). TIME_WAIT
/// and request sockets are not full sockets and hold no application;
/// listeners and closed sockets have no peer.
pub(crate) fn tcp_live_states() -> u32 {
    let all = (1u32 << 13) - 1;
    all & !(1 << TCP_TIME_WAIT | 1 << TCP_CLOSE | 1 << TCP_LISTEN | 1 << TCP_NEW_SYN_RECV)
}

/// A connected UDP socket is `TCP_ESTABLISHED` in diag terms; an unconnected
/// one (`TCP_CLOSE`) has no peer to be wrong about.
pub(crate) fn udp_connected_states() -> u32 {
    1 << TCP_ESTABLISHED
}

/// One socket as the kernel reported it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct DiagSocket {
    /// AF_INET or AF_INET6 (an IPv6 socket may talk to an IPv4-mapped peer).
    pub family: u8,
    pub protocol: u8,
    /// `struct inet_diag_sockid` exactly as reported: sent back verbatim to
    /// destroy, so the kernel finds the same socket and checks its cookie.
    pub id: [u8; SOCKID_LEN],
}

impl DiagSocket {
    /// The socket cookie (`bpf_get_socket_cookie()` of the same socket).
    pub fn cookie(&self) -> u64 {
        let lo = u32::from_ne_bytes(self.id[40..44].try_into().unwrap());
        let hi = u32::from_ne_bytes(self.id[44..48].try_into().unwrap());
        u64::from(lo) | u64::from(hi) << 32
    }

    /// The peer: address and port (host order). An IPv4-mapped IPv6 peer is
    /// reported as the IPv4 address.
    pub fn peer(&self) -> (IpAddr, u16) {
        let port = u16::from_be_bytes([self.id[2], self.id[3]]);
        let dst: [u8; 16] = self.id[20..36].try_into().unwrap();
        let addr = if self.family == libc::AF_INET as u8 {
            IpAddr::from([dst[0], dst[1], dst[2], dst[3]])
        } else {
            let v6 = std::net::Ipv6Addr::from(dst);
            match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => IpAddr::V6(v6),
            }
        };
        (addr, port)
    }
}

fn req_v2(buf: &mut Vec<u8>, family: u8, protocol: u8, states: u32, id: &[u8; SOCKID_LEN]) {
    buf.extend_from_slice(&[family, protocol, 0, 0]);
    buf.extend_from_slice(&states.to_ne_bytes());
    buf.extend_from_slice(id);
}

/// inet_diag bytecode accepting exactly the sockets whose peer is
/// `addr:port`: one `INET_DIAG_BC_D_COND` (`yes` steps to the end = accept,
/// `no` jumps 4 bytes past it = reject). An IPv4 condition also matches
/// IPv6 sockets whose peer is the IPv4-mapped address (the kernel's rule).
fn peer_filter(addr: IpAddr, port: u16) -> Vec<u8> {
    let (family, prefix_len, octets): (u8, u8, Vec<u8>) = match addr {
        IpAddr::V4(a) => (libc::AF_INET as u8, 32, a.octets().to_vec()),
        IpAddr::V6(a) => (libc::AF_INET6 as u8, 128, a.octets().to_vec()),
    };
    // struct inet_diag_bc_op (4) + struct inet_diag_hostcond (8) + address.
    let len = 4 + 8 + octets.len();
    let mut bc = Vec::with_capacity(len);
    bc.push(INET_DIAG_BC_D_COND);
    bc.push(len as u8); // yes
    bc.extend_from_slice(&(len as u16 + 4).to_ne_bytes()); // no
    bc.extend_from_slice(&[family, prefix_len, 0, 0]);
    // hostcond.port is a host-order int compared with the host-order port.
    bc.extend_from_slice(&i32::from(port).to_ne_bytes());
    bc.extend_from_slice(&octets);
    bc
}

/// The `family`/`protocol` sockets of the calling thread's namespace in one
/// of `states` whose peer is `peer`.
pub(crate) fn dump_peer(
    family: u8,
    protocol: u8,
    states: u32,
    peer: (IpAddr, u16),
) -> io::Result<Vec<DiagSocket>> {
    let sock = Socket::open(libc::NETLINK_SOCK_DIAG)?;
    let bc = peer_filter(peer.0, peer.1);
    let mut msg = Vec::with_capacity(NLMSG_HDRLEN + REQ_V2_LEN + 4 + bc.len());
    header(
        &mut msg,
        SOCK_DIAG_BY_FAMILY,
        (libc::NLM_F_ROOT | libc::NLM_F_MATCH) as u16,
    );
    req_v2(&mut msg, family, protocol, states, &[0; SOCKID_LEN]);
    msg.extend_from_slice(&((4 + bc.len()) as u16).to_ne_bytes());
    msg.extend_from_slice(&INET_DIAG_REQ_BYTECODE.to_ne_bytes());
    msg.extend_from_slice(&bc);
    finish(&mut msg);
    sock.send(&msg)?;
    let mut out = Vec::new();
    sock.receive(true, |payload| {
        if payload.len() >= DIAG_MSG_LEN {
            out.push(DiagSocket {
                family: payload[0],
                protocol,
                id: payload[4..4 + SOCKID_LEN].try_into().unwrap(),
            });
        }
    })?;
    Ok(out)
}

/// Destroys one socket (TCP: reset to the peer, ECONNABORTED to the owner;
/// UDP: ECONNABORTED to the owner, the socket disconnected). `NotFound`
/// when it is gone already (closed, or its cookie no longer matches).
pub(crate) fn destroy(s: &DiagSocket) -> io::Result<()> {
    let sock = Socket::open(libc::NETLINK_SOCK_DIAG)?;
    let mut msg = Vec::with_capacity(NLMSG_HDRLEN + REQ_V2_LEN);
    header(&mut msg, SOCK_DESTROY, libc::NLM_F_ACK as u16);
    req_v2(&mut msg, s.family, s.protocol, u32::MAX, &s.id);
    finish(&mut msg);
    sock.send(&msg)?;
    sock.receive(false, |_| {})
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, TcpListener, TcpStream, UdpSocket};
    use std::os::fd::AsRawFd;

    /// The cookie a socket's own SO_COOKIE reports.
    fn so_cookie(fd: i32) -> u64 {
        let mut v = 0u64;
        let mut len = 8u32;
        // SAFETY: getsockopt into a u64 of the size given.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_COOKIE,
                (&mut v as *mut u64).cast(),
                &mut len,
            )
        };
        assert_eq!(rc, 0);
        v
    }

    #[test]
    fn filter_is_one_condition_that_ends_the_program() {
        let bc = peer_filter(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)), 8080);
        assert_eq!(bc.len(), 16);
        assert_eq!((bc[0], bc[1]), (INET_DIAG_BC_D_COND, 16));
        assert_eq!(u16::from_ne_bytes([bc[2], bc[3]]), 20);
        assert_eq!(&bc[12..], &[10, 0, 0, 1]);
        let bc6 = peer_filter("fd00::1".parse().unwrap(), 1);
        assert_eq!(bc6.len(), 28);
        assert_eq!(bc6[5], 128);
    }

    /// Needs root (sock_diag destroy) — like every datapath test. Loopback
    /// of the test's own namespace only.
    #[test]
    fn finds_and_destroys_exactly_the_socket_with_the_cookie() {
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root");
            return;
        }
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let peer = l.local_addr().unwrap();
        let a = TcpStream::connect(peer).unwrap();
        let b = TcpStream::connect(peer).unwrap();
        let found = dump_peer(
            libc::AF_INET as u8,
            libc::IPPROTO_TCP as u8,
            tcp_live_states(),
            (peer.ip(), peer.port()),
        )
        .unwrap();
        let (ca, cb) = (so_cookie(a.as_raw_fd()), so_cookie(b.as_raw_fd()));
        let cookies: Vec<u64> = found.iter().map(DiagSocket::cookie).collect();
        assert!(
            cookies.contains(&ca) && cookies.contains(&cb),
            "{cookies:?}"
        );
        // The listener's accepted ends have the client's port as peer: not matched.
        assert_eq!(found.len(), 2, "{found:?}");
        let victim = found.iter().find(|s| s.cookie() == ca).unwrap();
        assert_eq!(victim.peer(), (peer.ip(), peer.port()));
        destroy(victim).unwrap();
        let mut buf = [0u8; 1];
        use std::io::Read;
        let err = (&a).read(&mut buf).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ECONNABORTED), "{err}");
        b.set_nonblocking(true).unwrap();
        let still = (&b).read(&mut buf).unwrap_err();
        assert_eq!(still.kind(), io::ErrorKind::WouldBlock, "{still}");
        // Gone now: destroying again says so.
        assert_eq!(destroy(victim).unwrap_err().kind(), io::ErrorKind::NotFound);

        // An IPv6 socket talking to the IPv4-mapped peer: an IPv6 dump with
        // the IPv4 condition finds it, and its peer reads as IPv4.
        let mapped = TcpStream::connect(("::ffff:127.0.0.1", peer.port())).unwrap();
        let found6 = dump_peer(
            libc::AF_INET6 as u8,
            libc::IPPROTO_TCP as u8,
            tcp_live_states(),
            (peer.ip(), peer.port()),
        )
        .unwrap();
        assert_eq!(found6.len(), 1, "{found6:?}");
        assert_eq!(found6[0].cookie(), so_cookie(mapped.as_raw_fd()));
        assert_eq!(found6[0].peer(), (peer.ip(), peer.port()));

        // A connected UDP socket: the owner's next receive fails.
        let server = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let speer = server.local_addr().unwrap();
        let u = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        u.connect(speer).unwrap();
        let udp = dump_peer(
            libc::AF_INET as u8,
            libc::IPPROTO_UDP as u8,
            udp_connected_states(),
            (speer.ip(), speer.port()),
        )
        .unwrap();
        assert_eq!(udp.len(), 1, "{udp:?}");
        assert_eq!(udp[0].cookie(), so_cookie(u.as_raw_fd()));
        destroy(&udp[0]).unwrap();
        u.set_nonblocking(true).unwrap();
        let err = u.recv(&mut buf).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ECONNABORTED), "{err}");
    }
}
