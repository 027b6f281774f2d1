//! Small TCP/UDP servers and clients running on threads inside pod namespaces.
//!
//! Compiled Rust rather than python/socat: it is fast enough to show the
//! datapath rather than the load generator, and does no reverse DNS. Every
//! loop is bounded and every socket has a timeout, so nothing hangs a test.

use crate::netns::Netns;
use crate::node::Pod;
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

/// How often server loops look at their stop flag.
const POLL: Duration = Duration::from_millis(20);
/// How long a server waits for a client to close after the reply.
const SERVER_LINGER: Duration = Duration::from_millis(500);
/// Replies are one line; anything longer is cut here.
const MAX_REPLY: usize = 64 * 1024;

/// A server thread in a pod's namespace. Stops (and joins) on Drop.
pub struct Server {
    local_addr: SocketAddr,
    stop: Arc<AtomicBool>,
    served: Arc<AtomicUsize>,
    /// Outer Result: entering the namespace; inner: the serve loop.
    handle: Option<JoinHandle<Result<Result<()>>>>,
}

impl Server {
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// TCP connections accepted / UDP datagrams answered so far.
    pub fn count(&self) -> usize {
        self.served.load(Ordering::SeqCst)
    }

    pub fn stop(mut self) -> Result<()> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<()> {
        self.stop.store(true, Ordering::SeqCst);
        match self.handle.take() {
            Some(h) => h
                .join()
                .map_err(|_| anyhow::anyhow!("server thread panicked"))??,
            None => Ok(()),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            eprintln!("catena-lab: server on {}: {e:#}", self.local_addr);
        }
    }
}

/// A reply as the client saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// The reply line without the newline.
    pub text: String,
    /// Who the client's socket says it talked to (for TCP the connected
    /// address; for UDP the source of the reply datagram). Through a
    /// service VIP this must be the VIP:port, not the backend.
    pub peer: SocketAddr,
    pub local: SocketAddr,
}

/// Binds on a thread in `ns`, reports the bind result, then runs `serve`
/// until the stop flag is set.
fn start_server<T, F, S>(ns: &Netns, bind: F, serve: S) -> Result<Server>
where
    T: Send + 'static,
    F: FnOnce() -> std::io::Result<(SocketAddr, T)> + Send + 'static,
    S: FnOnce(T, Arc<AtomicBool>, Arc<AtomicUsize>) -> Result<()> + Send + 'static,
{
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicUsize::new(0));
    let (tx, rx) = mpsc::channel();
    let (stop2, served2) = (stop.clone(), served.clone());
    let handle = ns.spawn_thread(move || -> Result<()> {
        let (addr, sock) = match bind() {
            Ok(x) => x,
            Err(e) => {
                let msg = e.to_string();
                let _ = tx.send(Err(e));
                bail!("bind failed: {msg}");
            }
        };
        let _ = tx.send(Ok(addr));
        serve(sock, stop2, served2)
    })?;
    let local_addr = match rx.recv_timeout(Duration::from_secs(5)) {
        Ok(r) => r.with_context(|| format!("binding in netns {}", ns.name()))?,
        // The thread ended without a word: entering the namespace failed.
        Err(_) => {
            return match handle.join() {
                Ok(Err(e)) => Err(e),
                _ => bail!("server thread in netns {} did not start", ns.name()),
            }
        }
    };
    Ok(Server {
        local_addr,
        stop,
        served,
        handle: Some(handle),
    })
}

/// Serves TCP on `0.0.0.0:port` in `ns`: each connection gets `reply\n`.
pub fn serve_tcp(ns: &Netns, port: u16, reply: &str) -> Result<Server> {
    let reply = format!("{reply}\n").into_bytes();
    start_server(
        ns,
        move || {
            let l = TcpListener::bind((Ipv4Addr::UNSPECIFIED, port))?;
            l.set_nonblocking(true)?;
            Ok((l.local_addr()?, l))
        },
        move |l: TcpListener, stop, served| {
            while !stop.load(Ordering::SeqCst) {
                if !poll_readable(l.as_raw_fd(), POLL) {
                    continue;
                }
                let (mut s, _) = match l.accept() {
                    Ok(x) => x,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(e).context("accept"),
                };
                served.fetch_add(1, Ordering::SeqCst);
                let _ = s.set_nonblocking(false);
                let _ = s.set_write_timeout(Some(SERVER_LINGER));
                if s.write_all(&reply).is_ok() {
                    // Let the client close first (it resets with SO_LINGER 0),
                    // so no TIME_WAIT piles up on the server side.
                    let _ = s.set_read_timeout(Some(SERVER_LINGER));
                    let mut sink = [0u8; 512];
                    let _ = s.read(&mut sink);
                }
            }
            Ok(())
        },
    )
}

/// Serves UDP on `0.0.0.0:port` in `ns`: each datagram is answered with `reply\n`.
pub fn serve_udp(ns: &Netns, port: u16, reply: &str) -> Result<Server> {
    serve_udp_on(ns, Ipv4Addr::UNSPECIFIED.into(), port, reply)
}

/// Serves UDP on `bind:port` in `ns` (`[::]` takes IPv4 too): each datagram
/// is answered with `reply\n` from the one receiving socket. (socat's
/// `UDP-RECVFROM,fork` with `SYSTEM:echo` is no substitute: its child dies
/// on EPIPE without answering when `echo` exits before the datagram is
/// copied to it.)
pub fn serve_udp_on(ns: &Netns, bind: IpAddr, port: u16, reply: &str) -> Result<Server> {
    let reply = format!("{reply}\n").into_bytes();
    start_server(
        ns,
        move || {
            let s = UdpSocket::bind((bind, port))?;
            s.set_read_timeout(Some(POLL))?;
            Ok((s.local_addr()?, s))
        },
        move |s: UdpSocket, stop, served| {
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::SeqCst) {
                match s.recv_from(&mut buf) {
                    Ok((_, from)) => {
                        served.fetch_add(1, Ordering::SeqCst);
                        let _ = s.send_to(&reply, from);
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) => {}
                    Err(e) => return Err(e).context("recv_from"),
                }
            }
            Ok(())
        },
    )
}

fn poll_readable(fd: i32, timeout: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let r = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as i32) };
    r > 0 && pfd.revents & libc::POLLIN != 0
}

/// One TCP request from the calling thread's namespace.
fn tcp_once(addr: SocketAddr, timeout: Duration) -> std::io::Result<Reply> {
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    // RST on close: no TIME_WAIT, so thousands of requests fit conntrack.
    set_linger_zero(&s);
    s.set_read_timeout(Some(timeout))?;
    let peer = s.peer_addr()?;
    let local = s.local_addr()?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    while !buf.contains(&b'\n') && buf.len() < MAX_REPLY {
        let n = s.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let text = String::from_utf8_lossy(&buf);
    Ok(Reply {
        text: text.split('\n').next().unwrap_or_default().to_string(),
        peer,
        local,
    })
}

fn udp_once(addr: SocketAddr, timeout: Duration) -> std::io::Result<Reply> {
    // Unconnected, so a reply from the wrong source is seen (and reported)
    // instead of filtered by the kernel.
    let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
    s.set_read_timeout(Some(timeout))?;
    s.send_to(b"ping\n", addr)?;
    let mut buf = [0u8; 2048];
    let (n, peer) = s.recv_from(&mut buf)?;
    let text = String::from_utf8_lossy(&buf[..n]);
    Ok(Reply {
        text: text.split('\n').next().unwrap_or_default().to_string(),
        peer,
        local: s.local_addr()?,
    })
}

fn set_linger_zero(s: &TcpStream) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

/// A key for tallies: the reply text, or `ERR(<kind>)` for a failed request.
fn tally_key(r: &std::io::Result<Reply>) -> String {
    match r {
        Ok(r) => r.text.clone(),
        Err(e) => format!("ERR({:?})", e.kind()),
    }
}

impl Pod {
    pub fn serve_tcp(&self, port: u16, reply: &str) -> Result<Server> {
        serve_tcp(self.netns(), port, reply)
    }

    pub fn serve_udp(&self, port: u16, reply: &str) -> Result<Server> {
        serve_udp(self.netns(), port, reply)
    }

    /// Connects from inside the pod and reads one reply line.
    pub fn tcp_request(&self, addr: SocketAddr, timeout: Duration) -> Result<Reply> {
        self.netns()
            .enter_thread(move || tcp_once(addr, timeout))?
            .with_context(|| format!("TCP request to {addr} from pod {}", self.name))
    }

    /// Sends one datagram from inside the pod and reads the answer.
    pub fn udp_request(&self, addr: SocketAddr, timeout: Duration) -> Result<Reply> {
        self.netns()
            .enter_thread(move || udp_once(addr, timeout))?
            .with_context(|| format!("UDP request to {addr} from pod {}", self.name))
    }
}

/// `n` sequential TCP requests from `pod` to `addr`, tallied by reply text
/// (failures as `ERR(<io error kind>)`), all on one thread in the pod.
pub fn count_backends(pod: &Pod, addr: SocketAddr, n: usize) -> Result<BTreeMap<String, usize>> {
    count_with(pod, addr, n, tcp_once)
}

/// Like [`count_backends`] over UDP.
pub fn count_backends_udp(
    pod: &Pod,
    addr: SocketAddr,
    n: usize,
) -> Result<BTreeMap<String, usize>> {
    count_with(pod, addr, n, udp_once)
}

fn count_with(
    pod: &Pod,
    addr: SocketAddr,
    n: usize,
    f: fn(SocketAddr, Duration) -> std::io::Result<Reply>,
) -> Result<BTreeMap<String, usize>> {
    pod.netns().enter_thread(move || {
        let mut tally = BTreeMap::new();
        for _ in 0..n {
            *tally
                .entry(tally_key(&f(addr, Duration::from_secs(2))))
                .or_insert(0) += 1;
        }
        tally
    })
}

/// Serves TCP on `0.0.0.0:port` in `ns` with an identity: each connection
/// first gets `name\n`, then everything it sends echoed back, until the
/// client closes or the server stops. One thread per connection, so many
/// long-lived streams run side by side.
pub fn serve_echo(ns: &Netns, port: u16, name: &str) -> Result<Server> {
    let hello = format!("{name}\n").into_bytes();
    start_server(
        ns,
        move || {
            let l = TcpListener::bind((Ipv4Addr::UNSPECIFIED, port))?;
            l.set_nonblocking(true)?;
            Ok((l.local_addr()?, l))
        },
        move |l: TcpListener, stop, served| {
            let mut workers: Vec<JoinHandle<()>> = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                workers.retain(|w| !w.is_finished());
                if !poll_readable(l.as_raw_fd(), POLL) {
                    continue;
                }
                let (conn, _) = match l.accept() {
                    Ok(x) => x,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(e).context("accept"),
                };
                served.fetch_add(1, Ordering::SeqCst);
                let (stop, hello) = (stop.clone(), hello.clone());
                workers.push(std::thread::spawn(move || echo_conn(conn, &hello, &stop)));
            }
            for w in workers {
                let _ = w.join();
            }
            Ok(())
        },
    )
}

fn echo_conn(mut conn: TcpStream, hello: &[u8], stop: &AtomicBool) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(POLL * 5));
    if conn.write_all(hello).is_err() {
        return;
    }
    let mut buf = [0u8; 4096];
    while !stop.load(Ordering::SeqCst) {
        match conn.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if conn.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
}

/// A long-lived connection to a [`serve_echo`] server (through a service
/// address): knows which backend it reached, and round-trips blocks.
/// Opened and used from a thread inside the client pod's namespace.
pub struct EchoStream {
    stream: TcpStream,
    /// The backend's name, as its greeting said.
    pub backend: String,
    seq: u64,
}

impl EchoStream {
    pub fn connect(addr: SocketAddr, timeout: Duration) -> std::io::Result<EchoStream> {
        let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while !line.ends_with(b"\n") {
            if stream.read(&mut byte)? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            line.push(byte[0]);
            if line.len() > 256 {
                return Err(std::io::Error::other("greeting too long"));
            }
        }
        let backend = String::from_utf8_lossy(&line).trim().to_string();
        Ok(EchoStream {
            stream,
            backend,
            seq: 0,
        })
    }

    /// Writes a block that differs every call and reads it back; a wrong
    /// echo is an error (`InvalidData`), as is anything the socket reports.
    pub fn round_trip(&mut self, len: usize) -> std::io::Result<()> {
        let seq = self.seq;
        self.seq += 1;
        let block: Vec<u8> = (0..len).map(|j| (seq as usize * 31 + j) as u8).collect();
        self.stream.write_all(&block)?;
        let mut back = vec![0u8; len];
        self.stream.read_exact(&mut back)?;
        if back != block {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("corrupted echo at block {seq}"),
            ));
        }
        Ok(())
    }

    /// Closes with a RST (SO_LINGER 0): no TIME_WAIT left behind.
    pub fn abort(self) {
        set_linger_zero(&self.stream);
    }
}

/// One request over a *connected* UDP socket from the calling thread's
/// namespace, as resolvers send DNS: the kernel then reports an ICMP error
/// for the flow (port unreachable -> `ConnectionRefused`) on the next call
/// instead of the client waiting for its timeout.
pub fn udp_connected_request(addr: SocketAddr, timeout: Duration) -> std::io::Result<Reply> {
    let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
    s.connect(addr)?;
    s.set_read_timeout(Some(timeout))?;
    s.send(b"query\n")?;
    let mut buf = [0u8; 2048];
    let n = s.recv(&mut buf)?;
    let text = String::from_utf8_lossy(&buf[..n]);
    Ok(Reply {
        text: text.split('\n').next().unwrap_or_default().to_string(),
        peer: s.peer_addr()?,
        local: s.local_addr()?,
    })
}
