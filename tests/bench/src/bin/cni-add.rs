//! CNI ADD latency: the primary chain alone (ptp + host-local) against the
//! same chain with catena-cni chained after it, measured side by side in one
//! run on one lab node with the real agent. The two chains alternate pod by
//! pod (and which goes first alternates too), so machine noise hits both
//! equally. Then 100 ADDs through the catena chain at once.
//!
//! A third chain runs the same catena on a second node whose agent has
//! `--expedite-attach=false`, interleaved with the other two: it shows what
//! the kernel's normal RCU grace period per TCX link costs an ADD (see
//! agent/datapath/src/rcu.rs).
//!
//! Run through `tests/bench.sh` (release binaries, `CATENA_BIN_DIR`).

use anyhow::{Context, Result};
use catena_lab::{CallArgs, CniRunner, Node};
use std::sync::{Barrier, Mutex};
use std::time::{Duration, Instant};

/// Pods per chain in the sequential comparison.
const PODS: usize = 200;
/// Unmeasured ADD/DEL rounds per chain first (page cache, iptables, agent warm-up).
const WARMUP: usize = 5;
/// ADDs started at once in the parallel run.
const PARALLEL: usize = 100;
/// Targets from issue #3.
const TARGET_ADDED_P99: Duration = Duration::from_millis(20);
const TARGET_PARALLEL_WALL: Duration = Duration::from_secs(5);

/// Nearest-rank percentile of an unsorted sample.
fn percentile(samples: &[Duration], p: f64) -> Duration {
    let mut s = samples.to_vec();
    s.sort();
    let rank = ((p / 100.0) * s.len() as f64).ceil().max(1.0) as usize;
    s[rank.min(s.len()) - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Signed difference in ms.
fn diff_ms(a: Duration, b: Duration) -> f64 {
    ms(a) - ms(b)
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "PASS"
    } else {
        "MISS"
    }
}

fn main() -> Result<()> {
    let node = Node::new("bench-add")?;
    let manifests = node.dir().join("manifests");
    std::fs::create_dir_all(&manifests)?;
    let agent = node.start_agent(&manifests, &[])?;
    let bin_dir = catena_lab::bin_dir()?;
    let slow_node = Node::new("bench-add-rcu")?;
    let slow_manifests = slow_node.dir().join("manifests");
    std::fs::create_dir_all(&slow_manifests)?;
    let _slow_agent = slow_node.start_agent(&slow_manifests, &["--expedite-attach=false"])?;

    // Separate networks and subnets: each chain has its own host-local range.
    let plain = CniRunner::new(
        &node,
        node.ptp_conflist("plain", "10.244.0.0/24", "1.0.0", vec![])?,
    );
    let chained = CniRunner::new(
        &node,
        node.ptp_conflist(
            "chained",
            "10.245.0.0/22",
            "1.0.0",
            vec![node.catena_plugin()],
        )?,
    );
    let normal_rcu = CniRunner::new(
        &slow_node,
        slow_node.ptp_conflist(
            "chained",
            "10.246.0.0/22",
            "1.0.0",
            vec![slow_node.catena_plugin()],
        )?,
    );
    // VERSION probes once per runner, outside the measurements.
    plain.validate()?;
    chained.validate()?;
    normal_rcu.validate()?;

    let round = |runner: &CniRunner<'_>, tag: &str| -> Result<Duration> {
        let pod = if std::ptr::eq(runner, &normal_rcu) {
            slow_node.pod(tag)?
        } else {
            node.pod(tag)?
        };
        let r = runner
            .add(&pod, "eth0", &CallArgs::default())
            .with_context(|| format!("ADD {tag}"))?;
        runner
            .del(&pod, "eth0", &CallArgs::default())
            .with_context(|| format!("DEL {tag}"))?;
        Ok(r.elapsed)
    };
    for i in 0..WARMUP {
        round(&plain, &format!("wp{i}"))?;
        round(&chained, &format!("wc{i}"))?;
        round(&normal_rcu, &format!("wn{i}"))?;
    }
    chained.clear_timings();

    let mut without = Vec::with_capacity(PODS);
    let mut with = Vec::with_capacity(PODS);
    let mut with_normal_rcu = Vec::with_capacity(PODS);
    for i in 0..PODS {
        // Rotate which chain goes first.
        for k in 0..3 {
            match (i + k) % 3 {
                0 => without.push(round(&plain, &format!("p{i}"))?),
                1 => with.push(round(&chained, &format!("c{i}"))?),
                _ => with_normal_rcu.push(round(&normal_rcu, &format!("n{i}"))?),
            }
        }
    }
    let catena_own: Vec<Duration> = chained
        .timings()
        .iter()
        .filter(|t| t.plugin == "catena-cni" && t.command == "ADD")
        .map(|t| t.elapsed)
        .collect();
    let catena_del: Vec<Duration> = chained
        .timings()
        .iter()
        .filter(|t| t.plugin == "catena-cni" && t.command == "DEL")
        .map(|t| t.elapsed)
        .collect();
    let paired: Vec<f64> = with
        .iter()
        .zip(&without)
        .map(|(w, o)| diff_ms(*w, *o))
        .collect();
    let paired_pct = |p: f64| {
        let mut s = paired.clone();
        s.sort_by(f64::total_cmp);
        let rank = ((p / 100.0) * s.len() as f64).ceil().max(1.0) as usize;
        s[rank.min(s.len()) - 1]
    };

    // 100 ADDs through the catena chain at once.
    let pods = (0..PARALLEL)
        .map(|i| node.pod(&format!("par{i}")))
        .collect::<Result<Vec<_>>>()?;
    let barrier = Barrier::new(PARALLEL + 1);
    let failures = Mutex::new(Vec::new());
    let finished = Mutex::new(Vec::new());
    let start = Mutex::new(Instant::now());
    std::thread::scope(|s| {
        for pod in &pods {
            let (barrier, failures, finished, chained) = (&barrier, &failures, &finished, &chained);
            s.spawn(move || {
                barrier.wait();
                let r = chained.add(pod, "eth0", &CallArgs::default());
                finished.lock().unwrap().push(Instant::now());
                if let Err(e) = r {
                    failures.lock().unwrap().push(format!("{}: {e}", pod.name));
                }
            });
        }
        *start.lock().unwrap() = Instant::now();
        barrier.wait();
    });
    let start = start.into_inner().unwrap();
    let parallel_wall = finished
        .into_inner()
        .unwrap()
        .iter()
        .max()
        .map_or(Duration::ZERO, |t| t.duration_since(start));
    let failures = failures.into_inner().unwrap();
    let endpoints: Vec<serde_json::Value> = agent.client().get("/v1/endpoints")?;
    let registered = endpoints.len();
    let del_start = Instant::now();
    std::thread::scope(|s| {
        for pod in &pods {
            let chained = &chained;
            s.spawn(move || {
                if let Err(e) = chained.del(pod, "eth0", &CallArgs::default()) {
                    eprintln!("DEL {}: {e}", pod.name);
                }
            });
        }
    });
    let parallel_del = del_start.elapsed();
    let left: Vec<serde_json::Value> = agent.client().get("/v1/endpoints")?;

    // ----- report -----
    let (p50_o, p99_o) = (percentile(&without, 50.0), percentile(&without, 99.0));
    let (p50_w, p99_w) = (percentile(&with, 50.0), percentile(&with, 99.0));
    let added_p50 = diff_ms(p50_w, p50_o);
    let added_p99 = diff_ms(p99_w, p99_o);
    println!("catena-bench cni-add");
    println!(
        "binaries: {} | machine: {} cores | {PODS} pods per chain, interleaved, each ADD followed by an unmeasured DEL ({WARMUP} warm-up rounds per chain)",
        bin_dir.display(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    );
    println!("ADD = wall time of the whole conflist ADD as a runtime sees it (every plugin exec, VERSION probes excluded)");
    println!();
    println!("| chain                         |  p50 ms |  p99 ms |  max ms |");
    println!("|-------------------------------|--------:|--------:|--------:|");
    let row = |name: &str, s: &[Duration]| {
        println!(
            "| {name:<29} | {:>7.2} | {:>7.2} | {:>7.2} |",
            ms(percentile(s, 50.0)),
            ms(percentile(s, 99.0)),
            ms(percentile(s, 100.0))
        )
    };
    row("ptp + host-local", &without);
    row("ptp + host-local + catena-cni", &with);
    row("same, --expedite-attach=false", &with_normal_rcu);
    row("catena-cni exec alone (ADD)", &catena_own);
    row("catena-cni exec alone (DEL)", &catena_del);
    println!();
    println!(
        "ratio with/without: p50 {:.2}x, p99 {:.2}x",
        ms(p50_w) / ms(p50_o),
        ms(p99_w) / ms(p99_o)
    );
    println!(
        "added latency (p(with) - p(without)): p50 {added_p50:+.2} ms, p99 {added_p99:+.2} ms"
    );
    println!(
        "added latency with --expedite-attach=false (normal RCU grace period per TCX link): p50 {:+.2} ms, p99 {:+.2} ms",
        diff_ms(percentile(&with_normal_rcu, 50.0), p50_o),
        diff_ms(percentile(&with_normal_rcu, 99.0), p99_o)
    );
    println!(
        "added latency, paired per pod (with_i - without_i): p50 {:+.2} ms, p99 {:+.2} ms",
        paired_pct(50.0),
        paired_pct(99.0)
    );
    println!();
    println!(
        "{PARALLEL} parallel ADDs through ptp + catena-cni (all started together): wall {:.2} s, {} failed, {registered} endpoints registered; then {PARALLEL} parallel DELs: {:.2} s, {} endpoints left",
        parallel_wall.as_secs_f64(),
        failures.len(),
        parallel_del.as_secs_f64(),
        left.len()
    );
    for f in failures.iter().take(3) {
        println!("  failure: {}", f.lines().next().unwrap_or_default());
    }
    if failures.len() > 3 {
        println!("  ... {} more", failures.len() - 3);
    }
    println!();
    println!("| target                              | measured            | verdict |");
    println!("|-------------------------------------|---------------------|---------|");
    println!(
        "| added ADD latency p99 <= {:>3} ms     | {added_p99:>+8.2} ms         | {}    |",
        TARGET_ADDED_P99.as_millis(),
        verdict(added_p99 <= ms(TARGET_ADDED_P99))
    );
    let par_ok = failures.is_empty() && parallel_wall <= TARGET_PARALLEL_WALL;
    println!(
        "| {PARALLEL} parallel ADDs <= {} s, all succeed | {:>6.2} s, {:>3} failed | {}    |",
        TARGET_PARALLEL_WALL.as_secs(),
        parallel_wall.as_secs_f64(),
        failures.len(),
        verdict(par_ok)
    );
    drop(pods);
    Ok(())
}
