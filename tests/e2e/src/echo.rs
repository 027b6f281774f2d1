//! A TCP server that answers each connection with "<name> <peer ip>\n"
//! (who served it and which client address it saw), and its client: the
//! NodePort scenarios check both the backend and the preserved or SNATed
//! client address with it, over IPv4 and IPv6.

use anyhow::{Context, Result};
use catena_lab::Netns;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Bounds a request's connect and read.
const TIMEOUT: Duration = Duration::from_secs(3);

/// The server, stopped on drop.
pub struct EchoPeer {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<Result<Result<()>>>>,
}

impl EchoPeer {
    /// Listens on `bind:port` in `ns` (`bind` picks the socket family).
    pub fn start(ns: &Netns, bind: IpAddr, port: u16, name: &str) -> Result<EchoPeer> {
        let stop = Arc::new(AtomicBool::new(false));
        let (stop2, name) = (stop.clone(), name.to_string());
        let (tx, rx) = std::sync::mpsc::channel();
        let handle = ns.spawn_thread(move || -> Result<()> {
            let l = TcpListener::bind((bind, port))?;
            l.set_nonblocking(true)?;
            let _ = tx.send(());
            while !stop2.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((mut s, peer)) => {
                        let _ = s.write_all(format!("{name} {}\n", peer.ip()).as_bytes());
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(2))
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            Ok(())
        })?;
        rx.recv_timeout(Duration::from_secs(5))
            .map_err(|_| anyhow::anyhow!("echo server in {} did not start", ns.name()))?;
        Ok(EchoPeer {
            stop,
            handle: Some(handle),
        })
    }
}

impl Drop for EchoPeer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// One request from `ns`: (served by, client address seen, peer the client saw).
pub fn echo_request(ns: &Netns, addr: SocketAddr) -> Result<(String, String, SocketAddr)> {
    ns.enter_thread(move || -> Result<(String, String, SocketAddr)> {
        let mut s = TcpStream::connect_timeout(&addr, TIMEOUT)?;
        s.set_read_timeout(Some(TIMEOUT))?;
        let peer = s.peer_addr()?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        let mut words = text.split_whitespace();
        let served = words.next().unwrap_or_default().to_string();
        let seen = words.next().unwrap_or_default().to_string();
        Ok((served, seen, peer))
    })?
}

/// Requests to each of `frontends` in turn, three rounds, all from the one
/// client port `port` (the client netns's ephemeral range narrowed to it,
/// restored after): each must be served by `by`, seeing the client as `seen`,
/// and answered from the frontend its own flow was sent to. Two frontends of
/// one backend then share a translated tuple; the reply must still name its
/// own frontend, or the client's socket never accepts it.
pub fn one_port_to_each(
    client: &Netns,
    port: u16,
    frontends: &[SocketAddr],
    by: &str,
    seen: &str,
) -> Result<()> {
    let range = |r: &str| {
        client
            .run(
                "sysctl",
                &["-qw", &format!("net.ipv4.ip_local_port_range={r}")],
            )
            .map(|_| ())
    };
    range(&format!("{port} {port}"))?;
    let result = (|| -> Result<()> {
        for round in 0..3 {
            for &frontend in frontends {
                let (served_by, saw, peer) = echo_request(client, frontend)
                    .with_context(|| format!("round {round}: to {frontend} from port {port}"))?;
                anyhow::ensure!(
                    (served_by.as_str(), saw.as_str(), peer) == (by, seen, frontend),
                    "round {round}: to {frontend}: served by {served_by} seeing {saw}, answered from {peer}"
                );
            }
        }
        Ok(())
    })();
    range("32768 60999")?;
    result
}
