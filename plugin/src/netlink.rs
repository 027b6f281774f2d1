//! A minimal blocking rtnetlink client: one request, one answer. Discovery
//! needs two or three such lookups, so an async runtime would only add
//! start-up time. The socket belongs to the network namespace of the thread
//! that opened it, for its whole life.

use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_REQUEST};
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkExtentMask, LinkInfo, LinkMessage};
use netlink_packet_route::nsid::{NsidAttribute, NsidMessage};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::Duration;

/// What discovery needs to know about one link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkFacts {
    pub index: u32,
    pub name: String,
    /// `IFLA_INFO_KIND` (`veth`, `bridge`, ...), when the driver reports one.
    pub kind: Option<String>,
    /// `IFLA_LINK`: for a veth, the peer's ifindex in the peer's namespace.
    pub peer_index: Option<u32>,
    /// `IFLA_LINK_NETNSID`: present when the peer is in another namespace;
    /// the id that namespace has in ours.
    pub link_netnsid: Option<i32>,
}

pub struct RouteSocket {
    socket: Socket,
    seq: u32,
}

impl RouteSocket {
    /// Opens a socket in the calling thread's current network namespace.
    pub fn open() -> io::Result<Self> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        // The kernel answers at once; the bound only guards against a hang.
        set_recv_timeout(&socket, Duration::from_secs(1))?;
        Ok(RouteSocket { socket, seq: 0 })
    }

    pub fn link_by_name(&mut self, name: &str) -> io::Result<Option<LinkFacts>> {
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_string()));
        msg.attributes
            .push(LinkAttribute::ExtMask(vec![LinkExtentMask::SkipStats]));
        self.get_link(msg)
    }

    pub fn link_by_index(&mut self, index: u32) -> io::Result<Option<LinkFacts>> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        msg.attributes
            .push(LinkAttribute::ExtMask(vec![LinkExtentMask::SkipStats]));
        self.get_link(msg)
    }

    fn get_link(&mut self, msg: LinkMessage) -> io::Result<Option<LinkFacts>> {
        match self.request(RouteNetlinkMessage::GetLink(msg)) {
            Ok(RouteNetlinkMessage::NewLink(link)) => Ok(Some(facts(link))),
            Ok(other) => Err(unexpected(&other)),
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The id the namespace behind `ns` has in this socket's namespace, if
    /// one is assigned (the kernel assigns one when it reports a link whose
    /// peer lives there).
    pub fn nsid_of(&mut self, ns: BorrowedFd<'_>) -> io::Result<Option<i32>> {
        let mut msg = NsidMessage::default();
        msg.attributes
            .push(NsidAttribute::Fd(ns.as_raw_fd() as u32));
        match self.request(RouteNetlinkMessage::GetNsId(msg))? {
            RouteNetlinkMessage::NewNsId(answer) => {
                Ok(answer.attributes.iter().find_map(|a| match a {
                    NsidAttribute::Id(id) if *id >= 0 => Some(*id),
                    _ => None,
                }))
            }
            other => Err(unexpected(&other)),
        }
    }

    fn request(&mut self, inner: RouteNetlinkMessage) -> io::Result<RouteNetlinkMessage> {
        self.seq += 1;
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST;
        header.sequence_number = self.seq;
        let mut msg = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(inner));
        msg.finalize();
        let mut out = vec![0u8; msg.buffer_len()];
        msg.serialize(&mut out);
        self.socket.send(&out, 0)?;

        let mut buf = Vec::with_capacity(64 * 1024);
        loop {
            buf.clear();
            let n = self.socket.recv(&mut buf, 0)?.min(buf.len());
            let mut off = 0;
            while off < n {
                let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf[off..n])
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                let len = reply.header.length as usize;
                if len == 0 {
                    break;
                }
                off += (len + 3) & !3;
                if reply.header.sequence_number != self.seq {
                    continue; // a late answer to an earlier request
                }
                match reply.payload {
                    NetlinkPayload::InnerMessage(m) => return Ok(m),
                    NetlinkPayload::Error(e) if e.code.is_some() => return Err(e.to_io()),
                    NetlinkPayload::Error(_) | NetlinkPayload::Done(_) => {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "netlink: empty answer",
                        ))
                    }
                    _ => {}
                }
            }
        }
    }
}

fn facts(link: LinkMessage) -> LinkFacts {
    let mut f = LinkFacts {
        index: link.header.index,
        name: String::new(),
        kind: None,
        peer_index: None,
        link_netnsid: None,
    };
    for attr in link.attributes {
        match attr {
            LinkAttribute::IfName(n) => f.name = n,
            LinkAttribute::Link(i) => f.peer_index = Some(i),
            LinkAttribute::LinkNetNsId(id) => f.link_netnsid = Some(id),
            LinkAttribute::LinkInfo(infos) => {
                f.kind = infos.into_iter().find_map(|i| match i {
                    LinkInfo::Kind(k) => Some(kind_name(&k)),
                    _ => None,
                })
            }
            _ => {}
        }
    }
    f
}

fn kind_name(k: &InfoKind) -> String {
    match k {
        InfoKind::Veth => "veth".into(),
        InfoKind::Bridge => "bridge".into(),
        InfoKind::Other(s) => s.clone(),
        other => format!("{other:?}").to_ascii_lowercase(),
    }
}

fn unexpected(m: &RouteNetlinkMessage) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("netlink: unexpected answer {m:?}"),
    )
}

fn set_recv_timeout(socket: &Socket, t: Duration) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: t.as_secs() as libc::time_t,
        tv_usec: t.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: setsockopt reads exactly size_of::<timeval>() bytes from &tv.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_index_1_and_has_no_peer() {
        let mut nl = RouteSocket::open().unwrap();
        let lo = nl.link_by_name("lo").unwrap().unwrap();
        assert_eq!(lo.index, 1);
        assert_eq!(lo.peer_index, None);
        let same = nl.link_by_index(1).unwrap().unwrap();
        assert_eq!(same.name, "lo");
        assert_eq!(nl.link_by_name("catena-nope0").unwrap(), None);
        assert_eq!(nl.link_by_index(0x7fff_fff0).unwrap(), None);
    }
}
