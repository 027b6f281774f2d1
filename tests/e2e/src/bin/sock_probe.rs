//! One request as an ordinary node process makes it, for tests that need
//! the client in a cgroup (the socket-level load balancer's programs are
//! attached to one, and a cgroup holds processes, not threads): prints the
//! server's first reply line, then the peer address the socket API reports
//! (`getpeername()` for TCP and connected UDP, `recvfrom()`'s source for
//! unconnected UDP).
//!
//! Usage: `sock_probe tcp|udp|udp-connected <ip:port>`; exit status 1 with
//! the error on stderr when the request fails.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(2);

fn unspecified_like(addr: &SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V4(_) => "0.0.0.0:0".parse().expect("literal"),
        SocketAddr::V6(_) => "[::]:0".parse().expect("literal"),
    }
}

fn request(mode: &str, addr: SocketAddr) -> std::io::Result<(String, SocketAddr)> {
    match mode {
        "tcp" => {
            let s = TcpStream::connect_timeout(&addr, TIMEOUT)?;
            s.set_read_timeout(Some(TIMEOUT))?;
            let peer = s.peer_addr()?;
            let mut line = String::new();
            BufReader::new(s).read_line(&mut line)?;
            Ok((line.trim().to_string(), peer))
        }
        "udp" | "udp-connected" => {
            let s = UdpSocket::bind(unspecified_like(&addr))?;
            s.set_read_timeout(Some(TIMEOUT))?;
            let mut buf = [0u8; 512];
            if mode == "udp" {
                s.send_to(b"q\n", addr)?;
                let (n, from) = s.recv_from(&mut buf)?;
                Ok((String::from_utf8_lossy(&buf[..n]).trim().to_string(), from))
            } else {
                s.connect(addr)?;
                s.send(b"q\n")?;
                let n = s.recv(&mut buf)?;
                let peer = s.peer_addr()?;
                Ok((String::from_utf8_lossy(&buf[..n]).trim().to_string(), peer))
            }
        }
        other => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("unknown mode {other:?} (tcp, udp, udp-connected)"),
        )),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [mode, addr] = args.as_slice() else {
        eprintln!("usage: sock_probe tcp|udp|udp-connected <ip:port>");
        std::process::exit(2);
    };
    let addr: SocketAddr = match addr.parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("bad address {addr:?}: {e}");
            std::process::exit(2);
        }
    };
    match request(mode, addr) {
        Ok((reply, peer)) => println!("{reply}\n{peer}"),
        Err(e) => {
            eprintln!("{mode} {addr}: {e}");
            std::process::exit(1);
        }
    }
}
