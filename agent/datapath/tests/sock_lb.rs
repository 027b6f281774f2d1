//! Socket-level load balancing from the node's own processes: the cgroup
//! programs attached to a private cgroup v2 dir, a "node" network namespace
//! with a veth to a "pod" namespace running the backends, and clients that are
//! real processes placed in that cgroup (this test binary re-executed, see
//! `sock_client_child`). Processes outside the cgroup stay untouched.

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use catena_datapath::{BackendAddr, Datapath, Frontend, LbDesired, LbService, Proto};
use common::{BpffsDir, Netns};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const VIP_EMPTY: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);
const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 210, 0, 1);
const POD_IP: Ipv4Addr = Ipv4Addr::new(10, 210, 0, 2);
const CHILD_ENV: &str = "CATENA_SOCK_CLIENT";

fn fe(address: Ipv4Addr, port: u16, proto: Proto) -> Frontend {
    Frontend {
        address,
        port,
        proto,
    }
}

fn svc(name: &str, ports: &[u16]) -> LbService {
    LbService {
        name: name.into(),
        backends: ports
            .iter()
            .map(|p| BackendAddr {
                address: POD_IP,
                port: *p,
            })
            .collect(),
        affinity_timeout: None,
        external_backends: None,
    }
}

fn desired() -> LbDesired {
    let mut d = LbDesired::default();
    d.services
        .insert(fe(VIP, 80, Proto::Tcp), svc("default/web", &[8080, 8081]));
    d.services
        .insert(fe(VIP, 53, Proto::Udp), svc("default/dns", &[5353]));
    d.services
        .insert(fe(VIP_EMPTY, 80, Proto::Tcp), svc("default/empty", &[]));
    d.services
        .insert(fe(VIP_EMPTY, 53, Proto::Udp), svc("default/empty", &[]));
    d
}

/// A child cgroup v2 dir, removed on drop (with the cgroup2 mount this test
/// made, if the host had none).
struct TestCgroup {
    path: PathBuf,
    own_mount: Option<PathBuf>,
}

impl TestCgroup {
    fn new() -> TestCgroup {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let tag = format!(
            "catena-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let (root, own_mount) = match catena_datapath::cgroup2_root() {
            Some(root) => (root, None),
            None => {
                let dir = std::env::temp_dir().join(format!("{tag}-mnt"));
                std::fs::create_dir_all(&dir).unwrap();
                common::run("mount", &["-t", "cgroup2", "none", dir.to_str().unwrap()]);
                (dir.clone(), Some(dir))
            }
        };
        let path = root.join(&tag);
        let cg = TestCgroup { path, own_mount };
        std::fs::create_dir(&cg.path).unwrap();
        cg
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // Exited children may take a moment to leave the cgroup.
        for _ in 0..50 {
            match std::fs::remove_dir(&self.path) {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        if let Some(mnt) = &self.own_mount {
            let _ = Command::new("umount").arg(mnt).status();
            let _ = std::fs::remove_dir(mnt);
        }
    }
}

/// Backends in the pod namespace: TCP on 8080/8081 answering `tcp-<port>`,
/// UDP on 5353 answering `udp-5353`. Stopped and joined on drop.
struct Backends {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Backends {
    fn start(pod: &Netns) -> Backends {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        let (tx, rx) = std::sync::mpsc::channel();
        for port in [8080u16, 8081] {
            let (stop, tx) = (stop.clone(), tx.clone());
            threads.push(pod.spawn(move || {
                let l = TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).unwrap();
                l.set_nonblocking(true).unwrap();
                tx.send(()).unwrap();
                while !stop.load(Ordering::SeqCst) {
                    match l.accept() {
                        Ok((mut s, _)) => {
                            let _ = s.set_nonblocking(false);
                            let _ = s.write_all(format!("tcp-{port}\n").as_bytes());
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            }));
        }
        {
            let (stop, tx) = (stop.clone(), tx.clone());
            threads.push(pod.spawn(move || {
                let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 5353)).unwrap();
                s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
                tx.send(()).unwrap();
                let mut buf = [0u8; 512];
                while !stop.load(Ordering::SeqCst) {
                    if let Ok((_, from)) = s.recv_from(&mut buf) {
                        let _ = s.send_to(b"udp-5353\n", from);
                    }
                }
            }));
        }
        for _ in 0..3 {
            rx.recv_timeout(Duration::from_secs(5))
                .expect("backend bound");
        }
        Backends { stop, threads }
    }
}

impl Drop for Backends {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Runs `mode` of `sock_client_child` as a new process inside `cgroup` and
/// the node namespace; returns its `RESULT` lines.
fn client_in_cgroup(cgroup: &Path, node: &Netns, mode: &str) -> Vec<String> {
    let procs = std::fs::OpenOptions::new()
        .write(true)
        .open(cgroup.join("cgroup.procs"))
        .unwrap();
    let netns = std::fs::File::open(format!("/run/netns/{}", node.name)).unwrap();
    let (procs_fd, netns_fd) = (procs.as_raw_fd(), netns.as_raw_fd());
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", "sock_client_child", "--ignored", "--nocapture"])
        .env(CHILD_ENV, mode);
    // SAFETY: only async-signal-safe syscalls on fds kept open until spawn
    // returns. "0" moves the writing process itself into the cgroup.
    unsafe {
        cmd.pre_exec(move || {
            if libc::write(procs_fd, b"0".as_ptr().cast(), 1) != 1 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::setns(netns_fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd.output().expect("spawning the client");
    drop((procs, netns));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "client {mode} failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .filter_map(|l| l.strip_prefix("RESULT ").map(str::to_owned))
        .collect()
}

/// The client side, run only as a child process by `client_in_cgroup`.
#[test]
#[ignore = "client half of sock_lb tests: run in a child process"]
fn sock_client_child() {
    let Ok(mode) = std::env::var(CHILD_ENV) else {
        return;
    };
    let t = Duration::from_secs(2);
    let vip_tcp = SocketAddr::from((VIP, 80));
    match mode.as_str() {
        "tcp" => {
            for _ in 0..20 {
                let mut s = TcpStream::connect_timeout(&vip_tcp, t).unwrap();
                s.set_read_timeout(Some(t)).unwrap();
                let mut text = String::new();
                s.read_to_string(&mut text).unwrap();
                println!("RESULT {} {}", s.peer_addr().unwrap(), text.trim());
            }
        }
        "udp" => {
            // Unconnected: sendmsg4 translates, recvmsg4 restores the source.
            let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
            s.set_read_timeout(Some(t)).unwrap();
            s.send_to(b"ping", (VIP, 53)).unwrap();
            let mut buf = [0u8; 64];
            let (n, from) = s.recv_from(&mut buf).unwrap();
            let text = String::from_utf8_lossy(&buf[..n]);
            println!("RESULT {from} {}", text.trim());
            // Connected: connect4 translates, getpeername4 restores the peer.
            let c = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
            c.set_read_timeout(Some(t)).unwrap();
            c.connect((VIP, 53)).unwrap();
            c.send(b"ping").unwrap();
            let n = c.recv(&mut buf).unwrap();
            let text = String::from_utf8_lossy(&buf[..n]);
            println!("RESULT {} {}", c.peer_addr().unwrap(), text.trim());
        }
        "refused" => {
            let start = Instant::now();
            let e = TcpStream::connect_timeout(&SocketAddr::from((VIP_EMPTY, 80)), t).unwrap_err();
            println!("RESULT tcp {:?} {}", e.kind(), start.elapsed().as_millis());
            let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
            let e = s.send_to(b"ping", (VIP_EMPTY, 53)).unwrap_err();
            println!("RESULT udp {:?}", e.kind());
        }
        "probe" => match TcpStream::connect_timeout(&vip_tcp, t) {
            Ok(s) => println!("RESULT connected {}", s.peer_addr().unwrap()),
            Err(e) => println!("RESULT {:?}", e.kind()),
        },
        other => panic!("unknown client mode {other}"),
    }
}

fn node_with_pod() -> (Netns, Netns) {
    let node = Netns::new();
    let pod = Netns::new();
    node.ip(&["link", "add", "h0", "type", "veth", "peer", "name", "p0"]);
    node.ip(&["link", "set", "p0", "netns", &pod.name]);
    node.ip(&["addr", "add", &format!("{NODE_IP}/24"), "dev", "h0"]);
    node.ip(&["link", "set", "h0", "up"]);
    pod.ip(&["addr", "add", &format!("{POD_IP}/24"), "dev", "p0"]);
    pod.ip(&["link", "set", "p0", "up"]);
    pod.ip(&["route", "add", "default", "via", &NODE_IP.to_string()]);
    (node, pod)
}

fn link_pins(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir.join("links"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("cgroup-"))
        .collect();
    v.sort();
    v
}

#[test]
fn node_processes_reach_cluster_ips_through_the_cgroup_programs() {
    let (node, pod) = node_with_pod();
    let _backends = Backends::start(&pod);
    let bpffs = BpffsDir::new();
    let cgroup = TestCgroup::new();
    let mut dp = Datapath::open(bpffs.path()).unwrap();
    dp.apply_services(&desired()).unwrap();

    assert!(!dp.cgroup_attached(&cgroup.path).unwrap());
    dp.attach_cgroup(&cgroup.path).unwrap();
    assert!(dp.cgroup_attached(&cgroup.path).unwrap());
    let pins = link_pins(bpffs.path());
    // connect, sendmsg, recvmsg, getpeername for IPv4 and IPv6 sockets.
    assert_eq!(pins.len(), 8, "{pins:?}");
    // Idempotent, also from a restarted agent (new program ids).
    dp.attach_cgroup(&cgroup.path).unwrap();
    drop(dp);
    let mut dp = Datapath::open(bpffs.path()).unwrap();
    dp.attach_cgroup(&cgroup.path).unwrap();
    assert_eq!(link_pins(bpffs.path()), pins);

    // TCP: a backend answers, getpeername() shows the VIP, both backends serve.
    let lines = client_in_cgroup(&cgroup.path, &node, "tcp");
    assert_eq!(lines.len(), 20, "{lines:?}");
    let mut seen = std::collections::BTreeSet::new();
    for l in &lines {
        let (peer, text) = l.split_once(' ').unwrap();
        assert_eq!(peer, "10.96.0.10:80", "getpeername must show the VIP: {l}");
        seen.insert(text.to_owned());
    }
    // 20 random picks over 2 backends landing on one: p = 2^-19.
    assert_eq!(
        seen,
        ["tcp-8080", "tcp-8081"]
            .map(str::to_owned)
            .into_iter()
            .collect()
    );

    // UDP, unconnected and connected: the reply comes "from" the VIP.
    let lines = client_in_cgroup(&cgroup.path, &node, "udp");
    assert_eq!(
        lines,
        vec!["10.96.0.10:53 udp-5353", "10.96.0.10:53 udp-5353"],
    );

    // No endpoints: refused at once, not a timeout.
    let lines = client_in_cgroup(&cgroup.path, &node, "refused");
    assert_eq!(lines.len(), 2, "{lines:?}");
    let tcp: Vec<&str> = lines[0].split(' ').collect();
    assert_eq!(tcp[..2], ["tcp", "ConnectionRefused"], "{lines:?}");
    assert!(tcp[2].parse::<u64>().unwrap() < 100, "{lines:?}");
    assert_eq!(lines[1], "udp ConnectionRefused");

    let c = dp.counters().unwrap();
    // 20 TCP connects, one UDP sendto, one UDP connect (a connected socket's
    // send() carries no address: sendmsg4 has nothing to translate).
    assert_eq!(c["sock_translated"], 22, "{c:?}");
    // Nothing went through the tc programs (none is attached here anyway).
    assert_eq!(c["service_dnat"], 0, "{c:?}");
    assert_eq!(c["sock_rejected"], 2, "{c:?}");

    // A process outside the cgroup is untouched: the node has no route to the
    // service range, so its connect fails as it would without catena.
    let outside = node
        .run(|| TcpStream::connect_timeout(&SocketAddr::from((VIP, 80)), Duration::from_secs(1)));
    assert_eq!(
        outside.unwrap_err().kind(),
        std::io::ErrorKind::NetworkUnreachable
    );

    // Detach: links and pins gone, the cgroup's processes are untouched too.
    dp.detach_cgroup(&cgroup.path).unwrap();
    dp.detach_cgroup(&cgroup.path).unwrap();
    assert!(link_pins(bpffs.path()).is_empty());
    assert!(!dp.cgroup_attached(&cgroup.path).unwrap());
    assert_eq!(
        client_in_cgroup(&cgroup.path, &node, "probe"),
        vec!["NetworkUnreachable"]
    );
}

#[test]
fn attach_to_a_non_cgroup_dir_is_a_clear_error() {
    let bpffs = BpffsDir::new();
    let mut dp = Datapath::open(bpffs.path()).unwrap();
    let err = dp.attach_cgroup(Path::new("/tmp")).unwrap_err();
    assert!(
        format!("{err:#}").contains("not a cgroup v2 directory"),
        "{err:#}"
    );
    assert!(link_pins(bpffs.path()).is_empty());
}
