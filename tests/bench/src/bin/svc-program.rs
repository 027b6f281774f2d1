//! Time to program 10k ClusterIP services x 10 endpoints: catena against
//! kube-proxy's rules, side by side in one run.
//!
//! - catena, datapath alone: `Datapath::apply_services` with the whole
//!   `LbDesired` into fresh pinned maps (a new bpffs dir per round; loading
//!   the programs is timed apart and not counted);
//! - catena, end to end: the real `catena-agent` started on a manifest dir
//!   holding the 10k Services and their EndpointSlices, until the agent API
//!   reports all 10k frontends programmed (`/v1/status`, polled every 10 ms
//!   from a second thread) and until it reports ready;
//! - kube-proxy iptables mode: `iptables-nft-restore` and
//!   `iptables-legacy-restore` of the same services as one file, into an
//!   empty fresh network namespace (what kube-proxy's first full sync does);
//! - kube-proxy nftables mode: `nft -f` of the equivalent rule set.
//!
//! Variants are interleaved over rounds (the order rotates) because the
//! machine is small and noisy. Target (issue #4): catena <= 1 s.
//!
//! Run through `tests/bench.sh` (release binaries, `CATENA_BIN_DIR`).

use anyhow::{bail, Context, Result};
use catena_bench::service_set::{fillers, ServiceSet};
use catena_bench::{percentile, verdict, BpffsDir};
use catena_datapath::{BackendAddr, Datapath, Frontend, LbDesired, LbService, Proto};
use catena_lab::{Netns, Node};
use std::fs::File;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const SERVICES: usize = 10_000;
const ENDPOINTS_PER_SERVICE: usize = 10;
const ROUNDS: usize = 3;
const TARGET: Duration = Duration::from_secs(1);
/// How long the agent gets to become ready with 10k services.
const AGENT_TIMEOUT: Duration = Duration::from_secs(120);

fn lb_desired(set: &ServiceSet) -> LbDesired {
    let services = set
        .services
        .iter()
        .map(|s| {
            (
                Frontend {
                    address: s.vip,
                    port: s.port,
                    proto: Proto::Tcp,
                },
                LbService {
                    name: format!("{}/{}", s.namespace, s.name),
                    backends: s
                        .backends
                        .iter()
                        .map(|b| BackendAddr {
                            address: *b,
                            port: s.target_port,
                        })
                        .collect(),
                    affinity_timeout: None,
                    external_backends: None,
                },
            )
        })
        .collect();
    // Everything else default: random backend selection, as kube-proxy.
    LbDesired {
        services,
        ..LbDesired::default()
    }
}

/// `Datapath::apply_services` of the whole set into fresh maps under `dir`.
/// Returns (load time, apply time).
fn datapath_apply(dir: &Path, desired: &LbDesired) -> Result<(Duration, Duration)> {
    let t = Instant::now();
    let mut dp = Datapath::open(dir).context("opening a fresh datapath")?;
    let load = t.elapsed();
    let t = Instant::now();
    let stats = dp.apply_services(desired)?;
    let apply = t.elapsed();
    let programmed = dp.services();
    if stats.services_added != SERVICES
        || programmed.len() != SERVICES
        || programmed
            .iter()
            .any(|s| s.backends.len() != ENDPOINTS_PER_SERVICE)
    {
        bail!(
            "apply_services programmed {} services ({stats:?}), expected {SERVICES} x {ENDPOINTS_PER_SERVICE}",
            programmed.len()
        );
    }
    drop(dp);
    std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    Ok((load, apply))
}

struct AgentTimes {
    /// Spawn -> `/v1/status` reports every service programmed.
    programmed: Duration,
    /// Spawn -> `/v1/healthz` ready (the lab polls every 50 ms).
    ready: Duration,
}

/// Starts the real agent on a fresh node with the manifest dir and times it.
fn agent_start(manifests: &Path) -> Result<AgentTimes> {
    let node = Node::new("svc-program")?;
    let bin = catena_lab::bin_path("catena-agent")?;
    let socket = node.agent_socket();
    let stop = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    // The socket appears when the agent serves its API; status then blocks
    // or answers a lower count until the first sync is applied.
    let poller = {
        let stop = stop.clone();
        std::thread::spawn(move || -> Result<Duration> {
            let client = catena_api::Client::new(&socket).with_timeout(Duration::from_secs(30));
            loop {
                if stop.load(Ordering::Relaxed) {
                    bail!("the agent stopped before all services were programmed");
                }
                if let Ok(s) = client.get::<catena_api::Status>("/v1/status") {
                    if s.services >= SERVICES {
                        return Ok(t0.elapsed());
                    }
                }
                if t0.elapsed() > AGENT_TIMEOUT {
                    bail!("not all services programmed within {AGENT_TIMEOUT:?}");
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    let agent = node.start_agent_with(&bin, manifests, &[], AGENT_TIMEOUT);
    let ready = t0.elapsed();
    if agent.is_err() {
        stop.store(true, Ordering::Relaxed);
    }
    let agent = agent?;
    let programmed = poller
        .join()
        .map_err(|_| anyhow::anyhow!("status poller panicked"))??;
    let services: Vec<catena_api::ServiceStatus> = agent.client().get("/v1/services")?;
    let full = services
        .iter()
        .filter(|s| s.backends.len() == ENDPOINTS_PER_SERVICE)
        .count();
    if full != SERVICES {
        bail!("the agent programmed {full} services with {ENDPOINTS_PER_SERVICE} backends, expected {SERVICES}");
    }
    drop(agent);
    Ok(AgentTimes { programmed, ready })
}

/// Checks what a restore loaded into its namespace.
type LoadCheck = dyn Fn(&Netns) -> Result<()>;

/// Runs `tool args < file` in a fresh empty network namespace and times it.
/// With `check`, also checks what got loaded.
fn restore(tool: &str, args: &[&str], file: &Path, check: Option<&LoadCheck>) -> Result<Duration> {
    let ns = Netns::new("svc-restore")?;
    let mut cmd = Command::new(tool);
    cmd.args(args)
        .stdin(File::open(file).with_context(|| format!("opening {}", file.display()))?)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    ns.prepare(&mut cmd);
    let t = Instant::now();
    let out = cmd
        .output()
        .with_context(|| format!("running {tool} in {}", ns.name()))?;
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
    if let Some(check) = check {
        check(&ns)?;
    }
    Ok(elapsed)
}

/// Checks `save -t nat` lists exactly the `-A` lines of the file's nat table.
fn check_iptables(save: &'static str, expected_nat_rules: usize) -> impl Fn(&Netns) -> Result<()> {
    move |ns: &Netns| {
        let out = ns.run(save, &["-t", "nat"])?;
        let n = out.lines().filter(|l| l.starts_with("-A ")).count();
        if n != expected_nat_rules {
            bail!("{save} shows {n} nat rules, the file has {expected_nat_rules}");
        }
        Ok(())
    }
}

fn check_nft(ns: &Netns) -> Result<()> {
    let out = ns.run(
        "nft",
        &["-j", "list", "map", "ip", "kube-proxy", "service-ips"],
    )?;
    let v: serde_json::Value = serde_json::from_str(&out).context("parsing nft -j output")?;
    let elems = v["nftables"]
        .as_array()
        .and_then(|a| a.iter().find_map(|o| o["map"]["elem"].as_array()))
        .map_or(0, |e| e.len());
    if elems != SERVICES {
        bail!("nft shows {elems} service-ips elements, expected {SERVICES}");
    }
    Ok(())
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn main() -> Result<()> {
    let set = ServiceSet::new(fillers(SERVICES, ENDPOINTS_PER_SERVICE));
    let desired = lb_desired(&set);
    let files = tempfile::Builder::new()
        .prefix("catena-bench-svc-program-")
        .tempdir()?;
    let iptables_file = files.path().join("kube-proxy.iptables");
    let nft_file = files.path().join("kube-proxy.nft");
    let manifests = files.path().join("manifests");
    std::fs::create_dir(&manifests)?;
    let rules = set.iptables_restore();
    let nat_rules = rules
        .split("*nat")
        .nth(1)
        .context("no nat table in the rules")?
        .lines()
        .filter(|l| l.starts_with("-A "))
        .count();
    std::fs::write(&iptables_file, &rules)?;
    std::fs::write(&nft_file, set.nft_script())?;
    std::fs::write(manifests.join("services.yaml"), set.manifests_yaml())?;
    let rule_lines = rules.lines().filter(|l| l.starts_with("-A ")).count();
    let chains = rules.lines().filter(|l| l.starts_with(':')).count();
    let bpffs = BpffsDir::new("svc-program")?;

    let mut load = Vec::new();
    let mut apply = Vec::new();
    let mut agent_programmed = Vec::new();
    let mut agent_ready = Vec::new();
    let mut ipt_nft = Vec::new();
    let mut ipt_legacy = Vec::new();
    let mut nft = Vec::new();
    let mut legacy_error = None;
    let check_nft_rules = check_iptables("iptables-nft-save", nat_rules);
    let check_legacy_rules = check_iptables("iptables-legacy-save", nat_rules);
    const VARIANTS: usize = 5;
    for round in 0..ROUNDS {
        // The first round also checks what each variant loaded.
        let first = round == 0;
        for k in 0..VARIANTS {
            match (round + k) % VARIANTS {
                0 => {
                    let (l, a) = datapath_apply(&bpffs.path().join(format!("r{round}")), &desired)?;
                    load.push(l);
                    apply.push(a);
                }
                1 => {
                    let t = agent_start(&manifests)?;
                    agent_programmed.push(t.programmed);
                    agent_ready.push(t.ready);
                }
                2 => ipt_nft.push(restore(
                    "iptables-nft-restore",
                    &[],
                    &iptables_file,
                    first.then_some(&check_nft_rules as &LoadCheck),
                )?),
                3 => {
                    if legacy_error.is_none() {
                        match restore(
                            "iptables-legacy-restore",
                            &[],
                            &iptables_file,
                            first.then_some(&check_legacy_rules as &LoadCheck),
                        ) {
                            Ok(d) => ipt_legacy.push(d),
                            // The legacy backend needs the kernel's ip_tables;
                            // without it the variant is reported, not fatal.
                            Err(e) => legacy_error = Some(format!("{e:#}")),
                        }
                    }
                }
                _ => nft.push(restore(
                    "nft",
                    &["-f", "-"],
                    &nft_file,
                    first.then_some(&check_nft as &LoadCheck),
                )?),
            }
            eprintln!(
                "svc-program: round {round} variant {} done",
                (round + k) % VARIANTS
            );
        }
    }

    // ----- report -----
    let med = |s: &[Duration]| percentile(s, 50.0);
    let apply_med = med(&apply);
    let agent_med = med(&agent_programmed);
    println!("catena-bench svc-program");
    println!(
        "{SERVICES} ClusterIP services x {ENDPOINTS_PER_SERVICE} endpoints ({} endpoints); kube-proxy rule file: {rule_lines} rules in {chains} chains ({} MB), nft script {} MB, manifests {} MB",
        set.endpoints(),
        rules.len() / 1_000_000,
        std::fs::metadata(&nft_file)?.len() / 1_000_000,
        std::fs::metadata(manifests.join("services.yaml"))?.len() / 1_000_000,
    );
    println!(
        "machine: {} cores | {ROUNDS} rounds, variants interleaved (order rotates per round); each restore into an empty fresh netns; first round checks the loaded rule/element counts",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    );
    println!();
    println!("| variant                                              | median s |   min s |   max s | vs catena agent |");
    println!("|------------------------------------------------------|---------:|--------:|--------:|----------------:|");
    let row = |name: &str, s: &[Duration]| {
        if s.is_empty() {
            return;
        }
        println!(
            "| {name:<52} | {:>8.3} | {:>7.3} | {:>7.3} | {:>14.1}x |",
            secs(med(s)),
            secs(percentile(s, 0.0)),
            secs(percentile(s, 100.0)),
            secs(med(s)) / secs(agent_med),
        )
    };
    row("catena datapath apply_services (maps only)", &apply);
    row(
        "catena agent start -> all programmed (/v1/status)",
        &agent_programmed,
    );
    row("catena agent start -> ready", &agent_ready);
    row("iptables-nft-restore (kube-proxy iptables mode)", &ipt_nft);
    row(
        "iptables-legacy-restore (kube-proxy iptables mode)",
        &ipt_legacy,
    );
    row("nft -f (kube-proxy nftables mode)", &nft);
    if let Some(e) = &legacy_error {
        println!("| iptables-legacy-restore                              | unavailable: {e} |");
    }
    println!();
    println!(
        "catena datapath load (programs + map creation, not counted above): median {:.3} s",
        secs(med(&load))
    );
    println!(
        "ratios (median): iptables-nft / catena agent {:.1}x, iptables-legacy / catena agent {}, nft / catena agent {:.1}x, agent / datapath apply {:.1}x",
        secs(med(&ipt_nft)) / secs(agent_med),
        if ipt_legacy.is_empty() {
            "n/a".to_string()
        } else {
            format!("{:.1}x", secs(med(&ipt_legacy)) / secs(agent_med))
        },
        secs(med(&nft)) / secs(agent_med),
        secs(agent_med) / secs(apply_med),
    );
    println!();
    println!("| target                                      | measured  | verdict |");
    println!("|---------------------------------------------|-----------|---------|");
    println!(
        "| catena datapath apply (10k x 10) <= {} s      | {:>7.3} s | {}    |",
        TARGET.as_secs(),
        secs(apply_med),
        verdict(apply_med <= TARGET)
    );
    println!(
        "| catena agent start -> programmed <= {} s      | {:>7.3} s | {}    |",
        TARGET.as_secs(),
        secs(agent_med),
        verdict(agent_med <= TARGET)
    );
    Ok(())
}
