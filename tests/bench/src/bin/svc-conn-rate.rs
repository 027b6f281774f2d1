//! New-connection rate and connect latency through a ClusterIP: catena
//! against kube-proxy's rules, side by side in one run, at 1, 1k and 10k
//! services.
//!
//! Every variant is its own lab node (network namespace) with a client pod
//! and three backend pods wired by the real ptp + host-local primary:
//! - `no LB`: ptp alone, no rules; the client connects straight to the
//!   backend pod IPs, each in turn (the floor: what a connection costs
//!   without any service translation, the servers sharing the work as
//!   behind a VIP);
//! - `catena`: ptp + catena-cni, the real catena-agent on a manifest dir
//!   with the N Services and their EndpointSlices (the measured one plus
//!   N-1 fillers); translation in the eBPF programs on the host veths;
//! - `catena, socket LB`: the same catena node, from a third client pod
//!   whose process is in the cgroup the agent attached its socket-level load
//!   balancer to. This is how a pod's connection to a ClusterIP is served by
//!   default: the agent attaches at the node's cgroup2 root, so pods (its
//!   descendants) are translated in connect() and their packets already go
//!   to the backend; the tc DNAT serves clients outside that cgroup. The lab
//!   uses a private cgroup that the benchmark joins only while it measures
//!   this variant;
//! - `catena, pod IP`: the same catena node, from a second client pod
//!   straight to the backend pod IPs in turn (the programs' cost without a
//!   service translation);
//! - `iptables-nft`, `iptables-legacy`: ptp alone, kube-proxy's iptables-mode
//!   rules for the same N services loaded with `iptables-restore` (one file)
//!   into the node netns, where pod traffic is DNATed in PREROUTING;
//! - `nftables`: ptp alone, kube-proxy's nftables-mode rule set (`nft -f`).
//!
//! The measured service is the LAST rule of `KUBE-SERVICES`: iptables
//! matches that chain linearly per new connection, so this is its worst case
//! (and how kube-proxy's iptables mode scales); the nftables verdict map and
//! catena's hash map do not depend on the position.
//!
//! The client (one thread in the client pod) loops connect / send / recv /
//! close (RST, so no TIME_WAIT piles up) against a server in each backend
//! pod for a fixed slice per variant; variants are interleaved in rounds,
//! the order rotating, because the machine is small and noisy.
//! Targets (issue #4): catena >= 3x iptables-nft's rate at 10k services, and
//! catena at 1 service >= 0.95x the no-LB path; judged for both catena
//! paths (socket LB, the default for pods; tc DNAT).
//!
//! Run through `tests/bench.sh` (release binaries, `CATENA_BIN_DIR`).

use anyhow::{bail, Context, Result};
use catena_bench::cgroup::PrivateCgroup;
use catena_bench::service_set::{fillers, Service, ServiceSet};
use catena_bench::{percentile, verdict};
use catena_lab::{count_backends, Agent, CallArgs, CniRunner, Node, Pod, Server};
use socket2::{Domain, SockAddr, Socket, Type};
use std::collections::btree_map::Entry;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Service counts measured (the measured service plus fillers).
const SCALES: [usize; 3] = [1, 1_000, 10_000];
/// Endpoints of each filler service (they never see traffic; they size the rules).
const FILLER_ENDPOINTS: usize = 2;
const BACKENDS: usize = 3;
const ROUNDS: usize = 15;
/// Measured time per variant per round.
const SLICE: Duration = Duration::from_millis(1000);
/// Unmeasured run per variant before each scale's rounds.
const WARMUP: Duration = Duration::from_millis(300);
/// Bounds connect() and recv(): a lost SYN shows as an error, not a stall.
const IO_TIMEOUT: Duration = Duration::from_secs(1);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const PORT: u16 = 80;
const TARGET_PORT: u16 = 8080;
/// Each node is its own namespace, so they all use the same pod subnet.
const POD_SUBNET: &str = "10.244.1.0/24";
const TARGET_VS_IPTABLES_NFT: f64 = 3.0;
const TARGET_VS_NO_LB: f64 = 0.95;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Variant {
    NoLb,
    Catena,
    CatenaSock,
    CatenaPodIp,
    IptablesNft,
    IptablesLegacy,
    Nftables,
}

impl Variant {
    const ALL: [Variant; 7] = [
        Variant::NoLb,
        Variant::Catena,
        Variant::CatenaSock,
        Variant::CatenaPodIp,
        Variant::IptablesNft,
        Variant::IptablesLegacy,
        Variant::Nftables,
    ];

    fn label(self) -> &'static str {
        match self {
            Variant::NoLb => "no LB (ptp, pod IP)",
            Variant::Catena => "catena (tc DNAT)",
            Variant::CatenaSock => "catena (socket LB)",
            Variant::CatenaPodIp => "catena node, pod IP",
            Variant::IptablesNft => "iptables-nft",
            Variant::IptablesLegacy => "iptables-legacy",
            Variant::Nftables => "nftables (vmap)",
        }
    }
}

/// A node's pods: clients and backends serving TCP on `TARGET_PORT`.
/// Field order is drop order: servers stop before their pods go away.
struct Site<'n> {
    _servers: Vec<Server>,
    /// One per variant measured on this node: variants never share a
    /// client address, so no connection of one can meet a 5-tuple the other
    /// left in a connection table.
    clients: Vec<Pod>,
    backends: Vec<Pod>,
    _runner: CniRunner<'n>,
}

impl<'n> Site<'n> {
    /// Wires `clients` client pods and `BACKENDS` backend pods through `runner`.
    fn wire(node: &'n Node, runner: CniRunner<'n>, clients: usize) -> Result<Site<'n>> {
        runner.validate()?;
        let clients = (0..clients)
            .map(|c| {
                let pod = node.pod(&format!("client-{c}"))?;
                runner
                    .add(&pod, "eth0", &CallArgs::default())
                    .with_context(|| format!("ADD client-{c}"))?;
                Ok(pod)
            })
            .collect::<Result<Vec<_>>>()?;
        let mut backends = Vec::new();
        let mut servers = Vec::new();
        for b in 0..BACKENDS {
            let pod = node.pod(&format!("backend-{b}"))?;
            runner
                .add(&pod, "eth0", &CallArgs::default())
                .with_context(|| format!("ADD backend-{b}"))?;
            servers.push(pod.serve_tcp(TARGET_PORT, &format!("backend-{b}"))?);
            backends.push(pod);
        }
        Ok(Site {
            _servers: servers,
            clients,
            backends,
            _runner: runner,
        })
    }

    fn backend_ips(&self) -> Result<Vec<Ipv4Addr>> {
        self.backends.iter().map(Pod::ipv4).collect()
    }

    /// `scale` services: fillers first, the measured one (VIP -> this
    /// site's backends) last.
    fn service_set(&self, scale: usize) -> Result<ServiceSet> {
        let mut services = fillers(scale - 1, FILLER_ENDPOINTS);
        services.push(Service {
            namespace: "default".into(),
            name: "measured".into(),
            vip: VIP,
            port: PORT,
            target_port: TARGET_PORT,
            backends: self.backend_ips()?,
        });
        Ok(ServiceSet::new(services))
    }
}

/// User + system CPU time a process has used (`/proc/<pid>/stat`).
fn cpu_time(pid: u32) -> Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised command name; utime and stime are the
    // 14th and 15th fields overall, in clock ticks.
    let rest = stat.rsplit_once(')').context("malformed stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    // The kernel reports these in USER_HZ, which is 100 on Linux.
    Ok(Duration::from_millis(ticks * 10))
}

/// ptp + host-local alone: the primary without catena.
fn plain_runner(node: &Node) -> Result<CniRunner<'_>> {
    Ok(CniRunner::new(
        node,
        node.ptp_conflist("plain", POD_SUBNET, "1.0.0", vec![])?,
    ))
}

/// Runs `tool args < file` in the node's netns; returns its wall time.
fn load_rules(node: &Node, tool: &str, args: &[&str], file: &Path) -> Result<Duration> {
    let mut cmd = Command::new(tool);
    cmd.args(args)
        .stdin(File::open(file).with_context(|| format!("opening {}", file.display()))?)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    node.netns().prepare(&mut cmd);
    let t = Instant::now();
    let out = cmd
        .output()
        .with_context(|| format!("running {tool} in {}", node.netns().name()))?;
    let elapsed = t.elapsed();
    if !out.status.success() {
        bail!(
            "{tool} {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .take(5)
                .collect::<Vec<_>>()
                .join(" | ")
        );
    }
    Ok(elapsed)
}

/// Writes the manifest file atomically (the agent must never parse half of it).
fn write_manifests(dir: &Path, yaml: &str) -> Result<()> {
    let tmp = dir.join(".services.yaml.tmp");
    std::fs::write(&tmp, yaml).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, dir.join("services.yaml")).context("renaming services.yaml")?;
    Ok(())
}

/// Waits until the agent has `scale` services programmed and the measured
/// frontend has all its backends; returns how long that took.
fn wait_programmed(agent: &Agent<'_>, scale: usize) -> Result<Duration> {
    let client = agent.client().with_timeout(Duration::from_secs(30));
    let t = Instant::now();
    let frontend = format!("{VIP}:{PORT}/TCP");
    loop {
        let status: catena_api::Status = client.get("/v1/status")?;
        if status.services == scale {
            let services: Vec<catena_api::ServiceStatus> = client.get("/v1/services")?;
            if services
                .iter()
                .any(|s| s.frontend == frontend && s.backends.len() == BACKENDS)
            {
                return Ok(t.elapsed());
            }
        }
        if t.elapsed() > Duration::from_secs(120) {
            bail!(
                "agent: {} services programmed, expected {scale}; errors {:?}",
                status.services,
                status.source.errors
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One variant's measurements at one scale.
#[derive(Default)]
struct Tally {
    conns: u64,
    errors: u64,
    elapsed: Duration,
    /// Connections per second of each round.
    round_rates: Vec<f64>,
    /// connect() latency in microseconds, every connection.
    connect_us: Vec<f64>,
    first_error: Option<String>,
}

impl Tally {
    /// The median round's rate: a round stalled by the machine (other
    /// work on 2 cores) does not drag it down the way a total would.
    fn rate(&self) -> f64 {
        percentile(&self.round_rates, 50.0)
    }

    /// This variant's rate against `base`'s, paired by round (both ran in
    /// the same round, a few seconds apart): the median of the per-round
    /// ratios. The machine's speed drifts between rounds by more than the
    /// differences measured here; within a round it mostly does not, so
    /// pairing cancels the drift that a ratio of two medians keeps.
    fn paired_ratio(&self, base: &Tally) -> f64 {
        let ratios: Vec<f64> = self
            .round_rates
            .iter()
            .zip(&base.round_rates)
            .map(|(r, b)| r / b)
            .collect();
        percentile(&ratios, 50.0)
    }
}

struct RunResult {
    conns: u64,
    errors: u64,
    elapsed: Duration,
    connect_us: Vec<f64>,
    first_error: Option<String>,
}

/// One connection: connect (timed), send a line, read the reply line, close
/// with RST. Returns the connect latency.
fn one_connection(addr: &SockAddr) -> std::io::Result<Duration> {
    let s = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    // SO_SNDTIMEO also bounds a blocking connect() on Linux.
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    let t = Instant::now();
    s.connect(addr)?;
    let connect = t.elapsed();
    // RST on close: no TIME_WAIT, so ports and conntrack entries recycle.
    s.set_linger(Some(Duration::ZERO))?;
    let mut stream: TcpStream = s.into();
    stream.write_all(b"ping\n")?;
    let mut buf = [0u8; 64];
    let mut got = 0;
    while !buf[..got].contains(&b'\n') {
        let n = stream.read(&mut buf[got..])?;
        if n == 0 || got + n == buf.len() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "no reply line",
            ));
        }
        got += n;
    }
    Ok(connect)
}

/// Connects in a loop for `duration` from the calling thread, to each of
/// `addrs` in turn.
fn hammer(addrs: Vec<SocketAddr>, duration: Duration) -> RunResult {
    let addrs: Vec<SockAddr> = addrs.into_iter().map(SockAddr::from).collect();
    let mut r = RunResult {
        conns: 0,
        errors: 0,
        elapsed: Duration::ZERO,
        connect_us: Vec::with_capacity(32_768),
        first_error: None,
    };
    let start = Instant::now();
    let mut next = 0;
    while start.elapsed() < duration {
        let addr = &addrs[next % addrs.len()];
        next += 1;
        match one_connection(addr) {
            Ok(c) => {
                r.conns += 1;
                r.connect_us.push(c.as_secs_f64() * 1e6);
            }
            Err(e) => {
                r.errors += 1;
                r.first_error.get_or_insert_with(|| e.to_string());
            }
        }
    }
    r.elapsed = start.elapsed();
    r
}

/// Where a variant's client connects.
struct Target<'s> {
    client: &'s Pod,
    /// Joined while this variant runs (the socket-LB variant).
    cgroup: Option<&'s PrivateCgroup>,
    /// The VIP, or every backend's pod IP (used in turn, so the servers share
    /// the work as they do behind a VIP and only the translation differs).
    addrs: Vec<SocketAddr>,
}

impl Target<'_> {
    fn run(&self, duration: Duration) -> Result<RunResult> {
        let addrs = self.addrs.clone();
        let _joined = self.cgroup.map(PrivateCgroup::join).transpose()?;
        self.client
            .netns()
            .enter_thread(move || hammer(addrs, duration))
    }

    /// Checks the path works before it is measured: every request answered,
    /// every backend answering, each reply from the address connected to
    /// (through a VIP: from the VIP, not the backend).
    fn check(&self, what: &str) -> Result<()> {
        let _joined = self.cgroup.map(PrivateCgroup::join).transpose()?;
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for addr in &self.addrs {
            for (reply, n) in count_backends(self.client, *addr, 60 / self.addrs.len())? {
                *counts.entry(reply).or_default() += n;
            }
            let reply = self.client.tcp_request(*addr, Duration::from_secs(2))?;
            if reply.peer != *addr {
                bail!("{what}: reply came from {}, not {addr}", reply.peer);
            }
        }
        if counts.keys().any(|k| k.starts_with("ERR")) || counts.len() != BACKENDS {
            bail!(
                "{what}: expected all {BACKENDS} backends answering through {:?}, got {counts:?}",
                self.addrs
            );
        }
        Ok(())
    }
}

fn main() -> Result<()> {
    let bin_dir = catena_lab::bin_dir()?;
    let files = tempfile::Builder::new()
        .prefix("catena-bench-svc-conn-rate-")
        .tempdir()?;

    // Declared first: everything below borrows from the nodes.
    let no_lb_node = Node::new("conn-nolb")?;
    let catena_node = Node::new("conn-catena")?;
    let ipt_nft_node = Node::new("conn-ipt-nft")?;
    let ipt_legacy_node = Node::new("conn-ipt-legacy")?;
    let nftables_node = Node::new("conn-nftables")?;

    let manifests = catena_node.dir().join("manifests");
    std::fs::create_dir_all(&manifests)?;
    let sock_cgroup = PrivateCgroup::new("conn-rate")?;
    let cgroup_arg = format!("--cgroup-root={}", sock_cgroup.path().display());
    let agent = catena_node.start_agent(&manifests, &[cgroup_arg.as_str()])?;

    let no_lb = Site::wire(&no_lb_node, plain_runner(&no_lb_node)?, 1)?;
    let catena = Site::wire(
        &catena_node,
        CniRunner::new(
            &catena_node,
            catena_node.ptp_conflist(
                "chained",
                POD_SUBNET,
                "1.0.0",
                vec![catena_node.catena_plugin()],
            )?,
        ),
        3,
    )?;
    let ipt_nft = Site::wire(&ipt_nft_node, plain_runner(&ipt_nft_node)?, 1)?;
    let ipt_legacy = Site::wire(&ipt_legacy_node, plain_runner(&ipt_legacy_node)?, 1)?;
    let nftables = Site::wire(&nftables_node, plain_runner(&nftables_node)?, 1)?;

    let vip = SocketAddr::from((VIP, PORT));
    let pod_ips = |site: &Site<'_>| -> Result<Vec<SocketAddr>> {
        Ok(site
            .backend_ips()?
            .into_iter()
            .map(|ip| SocketAddr::from((ip, TARGET_PORT)))
            .collect())
    };
    let targets: BTreeMap<Variant, Target<'_>> = [
        (Variant::NoLb, &no_lb.clients[0], pod_ips(&no_lb)?, None),
        (Variant::Catena, &catena.clients[0], vec![vip], None),
        (
            Variant::CatenaSock,
            &catena.clients[2],
            vec![vip],
            Some(&sock_cgroup),
        ),
        (
            Variant::CatenaPodIp,
            &catena.clients[1],
            pod_ips(&catena)?,
            None,
        ),
        (Variant::IptablesNft, &ipt_nft.clients[0], vec![vip], None),
        (
            Variant::IptablesLegacy,
            &ipt_legacy.clients[0],
            vec![vip],
            None,
        ),
        (Variant::Nftables, &nftables.clients[0], vec![vip], None),
    ]
    .into_iter()
    .map(|(v, client, addrs, cgroup)| {
        (
            v,
            Target {
                client,
                cgroup,
                addrs,
            },
        )
    })
    .collect();

    let mut unavailable: BTreeMap<Variant, String> = BTreeMap::new();
    let mut results: BTreeMap<(usize, Variant), Tally> = BTreeMap::new();
    let mut load_times: BTreeMap<(usize, Variant), Duration> = BTreeMap::new();
    let agent_pid = agent.pid().context("agent pid")?;
    let mut agent_cpu = Duration::ZERO;
    let mut measured_wall = Duration::ZERO;
    for scale in SCALES {
        // Program every variant for this scale.
        let rules_file = |site: &Site<'_>, name: &str, render: fn(&ServiceSet) -> String| {
            let path: PathBuf = files.path().join(format!("{name}-{scale}"));
            std::fs::write(&path, render(&site.service_set(scale)?))?;
            Ok::<_, anyhow::Error>(path)
        };
        let f = rules_file(&ipt_nft, "iptables-nft", ServiceSet::iptables_restore)?;
        load_times.insert(
            (scale, Variant::IptablesNft),
            load_rules(&ipt_nft_node, "iptables-nft-restore", &[], &f)?,
        );
        if let Entry::Vacant(slot) = unavailable.entry(Variant::IptablesLegacy) {
            let f = rules_file(&ipt_legacy, "iptables-legacy", ServiceSet::iptables_restore)?;
            match load_rules(&ipt_legacy_node, "iptables-legacy-restore", &[], &f) {
                Ok(d) => {
                    load_times.insert((scale, Variant::IptablesLegacy), d);
                }
                // The legacy backend needs the kernel's ip_tables: without it
                // this variant is reported unavailable, the rest still runs.
                Err(e) => {
                    slot.insert(format!("{e:#}"));
                }
            }
        }
        let f = rules_file(&nftables, "nftables", ServiceSet::nft_script)?;
        load_times.insert(
            (scale, Variant::Nftables),
            load_rules(&nftables_node, "nft", &["-f", "-"], &f)?,
        );
        write_manifests(&manifests, &catena.service_set(scale)?.manifests_yaml())?;
        load_times.insert((scale, Variant::Catena), wait_programmed(&agent, scale)?);

        let active: Vec<Variant> = Variant::ALL
            .into_iter()
            .filter(|v| !unavailable.contains_key(v))
            .collect();
        for v in &active {
            let t = &targets[v];
            t.check(&format!("{} at {scale} services", v.label()))?;
            t.run(WARMUP)?;
        }
        let (cpu0, wall0) = (cpu_time(agent_pid)?, Instant::now());
        for round in 0..ROUNDS {
            for k in 0..active.len() {
                let v = active[(round + k) % active.len()];
                let r = targets[&v].run(SLICE)?;
                let tally = results.entry((scale, v)).or_default();
                tally.conns += r.conns;
                tally.errors += r.errors;
                tally.elapsed += r.elapsed;
                tally
                    .round_rates
                    .push(r.conns as f64 / r.elapsed.as_secs_f64());
                tally.connect_us.extend(r.connect_us);
                if tally.first_error.is_none() {
                    tally.first_error = r.first_error;
                }
            }
        }
        agent_cpu += cpu_time(agent_pid)? - cpu0;
        measured_wall += wall0.elapsed();
        eprintln!("svc-conn-rate: {scale} services done");
    }

    // ----- report -----
    println!("catena-bench svc-conn-rate");
    println!(
        "binaries: {} | machine: {} cores | {ROUNDS} rounds x {:.1} s per variant and scale, variants interleaved (order rotates per round), {:.1} s warm-up each",
        bin_dir.display(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        SLICE.as_secs_f64(),
        WARMUP.as_secs_f64(),
    );
    println!(
        "one client thread in a client pod: connect / send / recv / close (RST) in a loop, to {BACKENDS} backend pods (ptp veths) behind {VIP}:{PORT} (pod-IP variants: the {BACKENDS} pod IPs in turn); fillers have {FILLER_ENDPOINTS} endpoints each"
    );
    println!("conn/s = the median round's rate (min..max over rounds); vs = the median over rounds of this variant's rate / the other's in the same round; connect latency = connect() returning, all connections of all rounds");
    println!(
        "the measured service is the LAST rule of KUBE-SERVICES (worst case for iptables' linear match; kube-proxy's iptables mode scales this way); position does not matter to the nftables vmap or catena"
    );
    println!();
    println!("| services | variant              |  conn/s | round min..max  | vs no LB | vs iptables-nft | connect p50 us | p99 us | errors |");
    println!("|---------:|----------------------|--------:|-----------------|---------:|----------------:|---------------:|-------:|-------:|");
    for scale in SCALES {
        let base = results.get(&(scale, Variant::NoLb));
        let nft = results.get(&(scale, Variant::IptablesNft));
        for v in Variant::ALL {
            let Some(t) = results.get(&(scale, v)) else {
                if let Some(reason) = unavailable.get(&v) {
                    println!(
                        "| {scale:>8} | {:<20} | unavailable: {} |",
                        v.label(),
                        reason.lines().next().unwrap_or_default()
                    );
                }
                continue;
            };
            let rate = t.rate();
            let ratio =
                |b: Option<&Tally>| b.map_or("-".into(), |b| format!("{:.2}x", t.paired_ratio(b)));
            let (p50, p99) = if t.connect_us.is_empty() {
                (f64::NAN, f64::NAN)
            } else {
                (
                    percentile(&t.connect_us, 50.0),
                    percentile(&t.connect_us, 99.0),
                )
            };
            println!(
                "| {scale:>8} | {:<20} | {rate:>7.0} | {:>6.0}..{:<7.0} | {:>8} | {:>15} | {p50:>14.1} | {p99:>6.1} | {:>6} |",
                v.label(),
                percentile(&t.round_rates, 0.0),
                percentile(&t.round_rates, 100.0),
                ratio(base),
                ratio(nft),
                t.errors,
            );
        }
    }
    for ((scale, v), t) in &results {
        if let Some(e) = &t.first_error {
            println!(
                "  {} at {scale}: {} errors, first: {e}",
                v.label(),
                t.errors
            );
        }
    }
    println!();
    println!(
        "catena-agent CPU while the rounds ran (all variants): {:.1}% of one core",
        100.0 * agent_cpu.as_secs_f64() / measured_wall.as_secs_f64()
    );
    println!("programming time per scale (rule load = the restore/nft process; catena = manifest write -> /v1/status shows the count):");
    for scale in SCALES {
        let line: Vec<String> = [
            Variant::Catena,
            Variant::IptablesNft,
            Variant::IptablesLegacy,
            Variant::Nftables,
        ]
        .into_iter()
        .filter_map(|v| {
            load_times
                .get(&(scale, v))
                .map(|d| format!("{} {:.3} s", v.label(), d.as_secs_f64()))
        })
        .collect();
        println!("  {scale:>6} services: {}", line.join(", "));
    }

    let ratio = |scale: usize, v: Variant, base: Variant| {
        results
            .get(&(scale, v))
            .zip(results.get(&(scale, base)))
            .map(|(t, b)| t.paired_ratio(b))
    };
    println!();
    println!("| target                                                     | measured | verdict |");
    println!("|------------------------------------------------------------|----------|---------|");
    for v in [Variant::CatenaSock, Variant::Catena] {
        let vs_nft = ratio(10_000, v, Variant::IptablesNft);
        let vs_base = ratio(1, v, Variant::NoLb);
        println!(
            "| {:<18} >= {TARGET_VS_IPTABLES_NFT:.0}x iptables-nft at 10k services   | {:>7.2}x | {}    |",
            v.label(),
            vs_nft.unwrap_or(f64::NAN),
            verdict(vs_nft.is_some_and(|r| r >= TARGET_VS_IPTABLES_NFT))
        );
        println!(
            "| {:<18} at 1 service >= {TARGET_VS_NO_LB:.2}x the no-LB rate   | {:>7.2}x | {}    |",
            v.label(),
            vs_base.unwrap_or(f64::NAN),
            verdict(vs_base.is_some_and(|r| r >= TARGET_VS_NO_LB))
        );
    }

    drop(targets);
    drop(agent);
    Ok(())
}
