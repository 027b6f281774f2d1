//! Shared test helpers: a unique bpffs dir and network namespace per test,
//! both removed on drop (also when the test panics), plus packet builders and
//! checksum checks.
#![allow(dead_code)]

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

static NEXT: AtomicU32 = AtomicU32::new(0);

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// `/sys/fs/bpf/catena-test-<pid>-<n>`, removed recursively on drop (unlinking
/// a link pin detaches the link, unlinking a map/program pin releases it).
pub struct BpffsDir(pub PathBuf);

impl BpffsDir {
    pub fn new() -> BpffsDir {
        BpffsDir(Path::new("/sys/fs/bpf").join(unique("catena-test")))
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for BpffsDir {
    fn drop(&mut self) {
        if self.0.exists() {
            if let Err(e) = std::fs::remove_dir_all(&self.0) {
                eprintln!("cleanup of {}: {e}", self.0.display());
            }
        }
    }
}

pub fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A named netns (`ip netns add`) deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new() -> Netns {
        let name = unique("catena-dp");
        run("ip", &["netns", "add", &name]);
        Netns { name }
    }

    /// Runs `f` on a thread that entered this netns with setns(2) (only that
    /// thread moves; the mount namespace, hence bpffs, is unchanged).
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.name);
        let handle = std::thread::spawn(move || {
            let file = std::fs::File::open(&path).expect("open netns");
            use std::os::fd::AsRawFd;
            // SAFETY: setns on a valid netns fd, affecting only this thread.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        });
        match handle.join() {
            Ok(v) => v,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    /// Like `run` without waiting: the thread keeps running in the netns.
    pub fn spawn(&self, f: impl FnOnce() + Send + 'static) -> std::thread::JoinHandle<()> {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path).expect("open netns");
            use std::os::fd::AsRawFd;
            // SAFETY: setns on a valid netns fd, affecting only this thread.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
    }

    pub fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        run("ip", &all);
    }

    pub fn tc(&self, args: &[&str]) {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        run("tc", &all);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

// ---- endpoints ----

/// BPF_PROG_TEST_RUN runs a tc program on the loopback device, so the
/// programs see `skb->ifindex` 1: the endpoint under test is `ENDPOINTS[1]`.
pub const TEST_IFINDEX: u32 = 1;

/// Writes the endpoint the test runs are judged as (the programs drop packets
/// of interfaces without one).
pub fn test_endpoint(
    dp: &mut catena_datapath::Datapath,
    ipv4: Ipv4Addr,
    endpoint_id: u32,
    identity: u32,
    flags: u32,
) {
    test_endpoint_dual(
        dp,
        ipv4,
        std::net::Ipv6Addr::UNSPECIFIED,
        endpoint_id,
        identity,
        flags,
    );
}

/// `test_endpoint` for a pod with an IPv6 address too (what IPv6
/// anti-spoofing allows as the source).
pub fn test_endpoint_dual(
    dp: &mut catena_datapath::Datapath,
    ipv4: Ipv4Addr,
    ipv6: std::net::Ipv6Addr,
    endpoint_id: u32,
    identity: u32,
    flags: u32,
) {
    dp.upsert_endpoint(
        TEST_IFINDEX,
        catena_common::endpoint::EndpointInfo {
            ipv4: u32::from_ne_bytes(ipv4.octets()),
            endpoint_id,
            identity,
            flags,
            ipv6: catena_common::lb6::addr6_from_octets(&ipv6.octets()),
        },
    )
    .expect("upsert_endpoint");
}

// ---- packets ----

pub const MAC_A: [u8; 6] = [0x02, 0, 0, 0, 0, 0xaa];
pub const MAC_B: [u8; 6] = [0x02, 0, 0, 0, 0, 0xbb];

fn sum16(data: &[u8], mut acc: u32) -> u32 {
    for chunk in data.chunks(2) {
        let word = if chunk.len() == 2 {
            u16::from_be_bytes([chunk[0], chunk[1]])
        } else {
            u16::from_be_bytes([chunk[0], 0])
        };
        acc += word as u32;
    }
    acc
}

fn fold(mut acc: u32) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

pub struct Ipv4Packet {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
    /// Extra IPv4 option bytes (multiple of 4).
    pub options: Vec<u8>,
    /// TCP flags (TCP only).
    pub tcp_flags: u8,
    /// UDP: send checksum 0 ("none").
    pub udp_no_csum: bool,
    /// frag_off field (host order), e.g. 0x2000 for MF, 0x0010 for offset 128.
    pub frag_off: u16,
    pub payload: Vec<u8>,
}

impl Ipv4Packet {
    pub fn tcp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Self {
        Ipv4Packet {
            src,
            dst,
            proto: 6,
            sport,
            dport,
            options: Vec::new(),
            tcp_flags: 0x02,
            udp_no_csum: false,
            frag_off: 0,
            payload: b"hello catena".to_vec(),
        }
    }

    pub fn udp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Self {
        Ipv4Packet {
            proto: 17,
            ..Self::tcp(src, sport, dst, dport)
        }
    }

    pub fn build(&self) -> Vec<u8> {
        let mut l4 = Vec::new();
        l4.extend_from_slice(&self.sport.to_be_bytes());
        l4.extend_from_slice(&self.dport.to_be_bytes());
        if self.proto == 6 {
            l4.extend_from_slice(&1000u32.to_be_bytes()); // seq
            l4.extend_from_slice(&0u32.to_be_bytes()); // ack
            l4.push(5 << 4);
            l4.push(self.tcp_flags);
            l4.extend_from_slice(&65535u16.to_be_bytes());
            l4.extend_from_slice(&[0, 0]); // csum
            l4.extend_from_slice(&[0, 0]); // urg
        } else {
            l4.extend_from_slice(&((8 + self.payload.len()) as u16).to_be_bytes());
            l4.extend_from_slice(&[0, 0]);
        }
        l4.extend_from_slice(&self.payload);
        let csum_off = if self.proto == 6 { 16 } else { 6 };
        if !(self.proto == 17 && self.udp_no_csum) {
            let mut c = l4_csum(self.src, self.dst, self.proto, &l4);
            if c == 0 && self.proto == 17 {
                c = 0xffff;
            }
            l4[csum_off..csum_off + 2].copy_from_slice(&c.to_be_bytes());
        }
        let ihl = 5 + self.options.len() / 4;
        let mut ip = vec![(4 << 4) | ihl as u8, 0];
        ip.extend_from_slice(&((ihl * 4 + l4.len()) as u16).to_be_bytes());
        ip.extend_from_slice(&0x1234u16.to_be_bytes());
        ip.extend_from_slice(&self.frag_off.to_be_bytes());
        ip.push(64);
        ip.push(self.proto);
        ip.extend_from_slice(&[0, 0]);
        ip.extend_from_slice(&self.src.octets());
        ip.extend_from_slice(&self.dst.octets());
        ip.extend_from_slice(&self.options);
        let c = fold(sum16(&ip, 0));
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        let mut pkt = Vec::new();
        pkt.extend_from_slice(&MAC_B);
        pkt.extend_from_slice(&MAC_A);
        pkt.extend_from_slice(&0x0800u16.to_be_bytes());
        pkt.extend_from_slice(&ip);
        pkt.extend_from_slice(&l4);
        pkt
    }
}

pub fn l4_csum(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, l4: &[u8]) -> u16 {
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.push(0);
    pseudo.push(proto);
    pseudo.extend_from_slice(&(l4.len() as u16).to_be_bytes());
    fold(sum16(l4, sum16(&pseudo, 0)))
}

/// A parsed view of an Ethernet/IPv4/TCP|UDP frame.
#[derive(Debug)]
pub struct Parsed {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
    pub l4_csum: u16,
}

/// Parses `pkt` and asserts that the IPv4 header checksum and the TCP/UDP
/// checksum are valid (UDP checksum 0 is accepted only if `udp_zero_ok`).
pub fn parse_and_verify(pkt: &[u8], udp_zero_ok: bool) -> Parsed {
    assert_eq!(&pkt[12..14], &[0x08, 0x00], "not IPv4");
    let ip = &pkt[14..];
    let ihl = (ip[0] & 0x0f) as usize * 4;
    assert_eq!(fold(sum16(&ip[..ihl], 0)), 0, "bad IPv4 header checksum");
    let total = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    let proto = ip[9];
    let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    let l4 = &ip[ihl..total];
    let csum_off = if proto == 6 { 16 } else { 6 };
    let l4_csum = u16::from_be_bytes([l4[csum_off], l4[csum_off + 1]]);
    if proto == 17 && l4_csum == 0 {
        assert!(udp_zero_ok, "UDP checksum unexpectedly 0");
    } else {
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&src.octets());
        pseudo.extend_from_slice(&dst.octets());
        pseudo.push(0);
        pseudo.push(proto);
        pseudo.extend_from_slice(&(l4.len() as u16).to_be_bytes());
        assert_eq!(
            fold(sum16(l4, sum16(&pseudo, 0))),
            0,
            "bad L4 checksum (proto {proto})"
        );
    }
    Parsed {
        src,
        dst,
        sport: u16::from_be_bytes([l4[0], l4[1]]),
        dport: u16::from_be_bytes([l4[2], l4[3]]),
        l4_csum,
    }
}

pub fn arp_request() -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&[0xff; 6]);
    p.extend_from_slice(&MAC_A);
    p.extend_from_slice(&0x0806u16.to_be_bytes());
    p.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    p.extend_from_slice(&MAC_A);
    p.extend_from_slice(&[10, 0, 0, 1]);
    p.extend_from_slice(&[0; 6]);
    p.extend_from_slice(&[10, 96, 0, 10]);
    p.resize(60, 0);
    p
}

/// Runs `prog` once on `pkt` (BPF_PROG_TEST_RUN): its verdict and the packet
/// as it left (room for the growth a reply or ICMP error needs).
pub fn run_prog(prog: &aya::programs::SchedClassifier, pkt: &[u8]) -> (u32, Vec<u8>) {
    use aya::programs::TestRun;
    let mut out = vec![0u8; pkt.len() + 128];
    let res = prog
        .test_run(aya::programs::TestRunOptions {
            data_in: Some(pkt),
            data_out: Some(&mut out),
            ..Default::default()
        })
        .expect("BPF_PROG_TEST_RUN");
    out.truncate(res.data_size_out as usize);
    (res.return_value, out)
}
