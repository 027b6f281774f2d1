//! Shared pieces of the benchmark binaries: statistics and report helpers,
//! a throwaway bpffs directory, minimal frame builders and BPF_PROG_TEST_RUN
//! timing of the datapath's pinned programs (the per-packet benchmarks).

pub mod cgroup;
pub mod service_set;

use anyhow::{bail, Context, Result};
use aya::programs::{SchedClassifier, TestRun, TestRunOptions};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// tc verdicts the programs return.
pub const TC_PASS: u32 = -1i32 as u32; // TC_ACT_UNSPEC: continue
pub const TC_SHOT: u32 = 2;

/// BPF_PROG_TEST_RUN runs a tc program as if on the loopback device, so the
/// programs see `skb->ifindex` 1: the endpoint under test is `ENDPOINTS[1]`.
pub const TEST_IFINDEX: u32 = 1;

pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;

pub fn verdict(ok: bool) -> &'static str {
    if ok {
        "PASS"
    } else {
        "MISS"
    }
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Nearest-rank percentile (`p` in 0..=100) of an unsorted sample.
pub fn percentile<T: Copy + PartialOrd>(samples: &[T], p: f64) -> T {
    assert!(!samples.is_empty(), "percentile of an empty sample");
    let mut s = samples.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).expect("no NaN in samples"));
    let rank = ((p / 100.0) * s.len() as f64).ceil().max(1.0) as usize;
    s[rank.min(s.len()) - 1]
}

pub fn median(samples: &[f64]) -> f64 {
    percentile(samples, 50.0)
}

/// A bpffs directory of its own (`/sys/fs/bpf/catena-bench-<tag>-<pid>`),
/// removed recursively on drop, also when the benchmark fails half-way:
/// unlinking map and program pins releases them.
pub struct BpffsDir(PathBuf);

impl BpffsDir {
    pub fn new(tag: &str) -> Result<BpffsDir> {
        let path =
            Path::new("/sys/fs/bpf").join(format!("catena-bench-{tag}-{}", std::process::id()));
        if path.exists() {
            bail!("{} exists already", path.display());
        }
        Ok(BpffsDir(path))
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

fn sum16(data: &[u8], mut acc: u32) -> u32 {
    for chunk in data.chunks(2) {
        acc += u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]) as u32;
    }
    acc
}

fn fold(mut acc: u32) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

/// An Ethernet + IPv4 + TCP frame (no options, no payload) with valid IPv4
/// and TCP checksums, as a pod's stack sends it.
pub fn tcp_frame(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, flags: u8) -> Vec<u8> {
    let mut tcp = Vec::with_capacity(20);
    tcp.extend_from_slice(&sport.to_be_bytes());
    tcp.extend_from_slice(&dport.to_be_bytes());
    tcp.extend_from_slice(&1000u32.to_be_bytes()); // seq
    tcp.extend_from_slice(&(if flags & TCP_ACK != 0 { 1u32 } else { 0 }).to_be_bytes());
    tcp.extend_from_slice(&[5 << 4, flags]);
    tcp.extend_from_slice(&65535u16.to_be_bytes()); // window
    tcp.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
    let mut pseudo = Vec::with_capacity(12);
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, 6]);
    pseudo.extend_from_slice(&(tcp.len() as u16).to_be_bytes());
    let c = fold(sum16(&tcp, sum16(&pseudo, 0)));
    tcp[16..18].copy_from_slice(&c.to_be_bytes());

    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&((20 + tcp.len()) as u16).to_be_bytes());
    ip.extend_from_slice(&[0x12, 0x34, 0x40, 0x00, 64, 6, 0, 0]); // id, DF, TTL, proto
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let c = fold(sum16(&ip, 0));
    ip[10..12].copy_from_slice(&c.to_be_bytes());

    let mut frame = Vec::with_capacity(14 + ip.len() + tcp.len());
    frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 0xbb]); // dst MAC
    frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 0xaa]); // src MAC
    frame.extend_from_slice(&0x0800u16.to_be_bytes());
    frame.extend_from_slice(&ip);
    frame.extend_from_slice(&tcp);
    frame
}

/// A pinned tc program of a datapath, opened for test runs.
pub struct Program {
    pub name: String,
    prog: SchedClassifier,
}

impl Program {
    pub fn from_pin(dp: &catena_datapath::Datapath, name: &str) -> Result<Program> {
        let pin = dp.program_pin(name);
        Ok(Program {
            name: name.to_string(),
            prog: SchedClassifier::from_pin(&pin)
                .with_context(|| format!("opening program pin {}", pin.display()))?,
        })
    }

    /// Runs the program `repeat` times on `frame` (the kernel keeps the one
    /// skb across the repeats, so what the program rewrites in the first run
    /// is what later runs see) and returns the verdict and the kernel's own
    /// per-run time in ns (its total / repeat).
    pub fn run(&self, frame: &[u8], repeat: u32) -> Result<(u32, f64)> {
        let res = self
            .prog
            .test_run(TestRunOptions {
                data_in: Some(frame),
                repeat,
                ..TestRunOptions::default()
            })
            .with_context(|| format!("BPF_PROG_TEST_RUN of {}", self.name))?;
        Ok((res.return_value, res.duration.as_nanos() as f64))
    }

    /// `run` that fails unless the verdict is `want` (a benchmark that
    /// measures the wrong path is worse than none).
    pub fn timed(&self, frame: &[u8], repeat: u32, want: u32) -> Result<f64> {
        let (rc, ns) = self.run(frame, repeat)?;
        if rc != want {
            bail!(
                "{}: verdict {} where {} was expected: not the path under test",
                self.name,
                rc as i32,
                want as i32
            );
        }
        Ok(ns)
    }
}

/// Runs every case once per round, `rounds` times, rotating which case goes
/// first so slow drift of the machine hits all of them alike; returns each
/// case's samples (one per round) in the order of `cases`.
pub fn interleaved<'a>(
    rounds: usize,
    cases: &mut [&mut (dyn FnMut() -> Result<f64> + 'a)],
) -> Result<Vec<Vec<f64>>> {
    let n = cases.len();
    let mut samples = vec![Vec::with_capacity(rounds); n];
    for round in 0..rounds {
        for k in 0..n {
            let i = (round + k) % n;
            samples[i].push((cases[i])()?);
        }
    }
    Ok(samples)
}
