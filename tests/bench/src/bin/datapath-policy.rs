//! Per-packet cost of network policy in `from_container` (egress of a pod),
//! measured with BPF_PROG_TEST_RUN against the empty tc program, with 1k
//! CiliumNetworkPolicies over 10k pods (10k identities in the ipcache)
//! compiled by the agent's own policy compiler and written through the real
//! `Datapath::apply_policy`.
//!
//! The cluster: 50 namespaces, 10k pods (each its own label set, so its own
//! identity), one pod per namespace local to this node (50 endpoints). Policy
//! `c` lives in namespace `c % 50`, selects that namespace's local pod and
//! allows egress to the team `(c / 50) % 20` on TCP `5000 + c / 50` and
//! ingress from the next team on `8000 + c / 50`; two of each namespace's 20
//! also deny egress to TCP 22 in their namespace. The endpoint under test is the local
//! pod of `ns-0` (20 policies select it).
//!
//! Cases, all a TCP packet from the pod to another pod:
//! - established: an allowed connection's packet (CT hit), 1M repeats;
//! - denied: a SYN no allow entry matches (all policy lookups, a verdict and
//!   a drop event, rate-limited after a burst), 1M repeats;
//! - allowed new flow: CT miss, ipcache + policy lookups, CT entry created.
//!   Every run must be new, so these are single runs (repeat 1) of SYNs from
//!   distinct source ports to allowed peers, CT flushed before each batch,
//!   the empty program run on the same frames packet by packet alternating;
//! - the same established packet from a pod without policy (a second
//!   datapath with no policy applied), to show what policy adds.

use anyhow::{bail, Context, Result};
use catena_agent::compile::policy::{compile_policy, PolicyInput, PolicyPod};
use catena_agent::model::identity::{pod_identity_labels, IdentityAllocator};
use catena_agent::sources::{CiliumPolicy, ClusterState, ObjectKey};
use catena_bench::{
    interleaved, median, tcp_frame, verdict, BpffsDir, Program, TCP_ACK, TCP_SYN, TC_PASS, TC_SHOT,
    TEST_IFINDEX,
};
use catena_common::endpoint::{EndpointInfo, EP_FLAG_ANTI_SPOOF};
use catena_datapath::Datapath;
use serde_json::json;
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Instant;

const NAMESPACES: usize = 50;
const PODS: usize = 10_000;
const POLICIES: usize = 1_000;
const TEAMS: usize = 20;
const REPEAT: u32 = 1_000_000;
const NEW_FLOWS: usize = 1_000;
const ROUNDS: usize = 9;
/// Issue #4's per-packet target, shown for reference: issue #5 benchmark 2
/// asks for the side-by-side ratios, no bound of its own.
const REFERENCE_RATIO: f64 = 1.5;

fn pod_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 1, 0, 0)) + i as u32)
}

fn ns_of(i: usize) -> usize {
    i % NAMESPACES
}

fn team_of(i: usize) -> usize {
    (i / NAMESPACES) % TEAMS
}

/// Pod `i` of namespace `ns-0` whose team is `team`, the `r`-th such.
fn ns0_pod_of_team(team: usize, r: usize) -> usize {
    NAMESPACES * (team + TEAMS * r)
}

fn cluster() -> ClusterState {
    let mut cluster = ClusterState::default();
    for c in 0..POLICIES {
        let ns = format!("ns-{}", c % NAMESPACES);
        let m = c / NAMESPACES;
        let mut spec = json!({
            "endpointSelector": {"matchLabels": {"role": "local"}},
            "egress": [{"toEndpoints": [{"matchLabels": {"team": format!("t{}", m % TEAMS)}}],
                        "toPorts": [{"ports": [{"port": (5000 + m).to_string(), "protocol": "TCP"}]}]}],
            "ingress": [{"fromEndpoints": [{"matchLabels": {"team": format!("t{}", (m + 1) % TEAMS)}}],
                         "toPorts": [{"ports": [{"port": (8000 + m).to_string(), "protocol": "TCP"}]}]}],
        });
        if m.is_multiple_of(10) {
            spec["egressDeny"] = json!([{"toEndpoints": [{}],
                                         "toPorts": [{"ports": [{"port": "22", "protocol": "TCP"}]}]}]);
        }
        let object = json!({"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
                            "metadata": {"name": format!("cnp-{c}"), "namespace": ns},
                            "spec": spec});
        cluster.cilium_policies.insert(
            (
                "CiliumNetworkPolicy".into(),
                ObjectKey::new(ns, format!("cnp-{c}")),
            ),
            Arc::new(CiliumPolicy {
                kind: "CiliumNetworkPolicy".into(),
                object,
            }),
        );
    }
    cluster
}

fn pods() -> Vec<PolicyPod> {
    let mut identities = IdentityAllocator::default();
    (0..PODS)
        .map(|i| {
            let ns = format!("ns-{}", ns_of(i));
            let local = i < NAMESPACES;
            let mut labels: BTreeMap<String, String> = [
                ("app".to_string(), format!("a{i}")),
                ("team".to_string(), format!("t{}", team_of(i))),
            ]
            .into_iter()
            .collect();
            if local {
                labels.insert("role".into(), "local".into());
            }
            let labels = pod_identity_labels(&ns, &labels, None, Some("default"));
            PolicyPod {
                key: ObjectKey::new(ns, format!("pod-{i}")),
                ips: vec![pod_ip(i).into()],
                identity: identities.allocate(labels.clone()),
                labels,
                named_ports: vec![],
                endpoint_id: local.then_some(i as u32 + 1),
            }
        })
        .collect()
}

fn endpoint(dp: &mut Datapath, identity: u32) -> Result<()> {
    dp.upsert_endpoint(
        TEST_IFINDEX,
        EndpointInfo {
            ipv4: u32::from_ne_bytes(pod_ip(0).octets()),
            endpoint_id: 1,
            identity,
            flags: EP_FLAG_ANTI_SPOOF,
            ipv6: [0; 4],
        },
    )
}

fn main() -> Result<()> {
    let cluster = cluster();
    let pods = pods();
    let started = Instant::now();
    let out = compile_policy(&PolicyInput {
        cluster: &cluster,
        pods: &pods,
        host_addrs: &[],
        remote_node_addrs: &[],
        apiserver_addrs: &[],
        prev_cidr_ids: &BTreeMap::new(),
        prev_rule_refs: &BTreeMap::new(),
    });
    let compile_secs = started.elapsed().as_secs_f64();
    let not_ok: Vec<_> = out
        .reports
        .iter()
        .filter(|r| r.state != catena_agent::model::policy::PolicyState::Ok)
        .collect();
    if !not_ok.is_empty() {
        bail!("policies not compiled as written: {not_ok:?}");
    }
    let desired = out.desired;
    let total_rules: usize = desired.endpoints.values().map(|e| e.rules.len()).sum();
    let ep_rules = desired
        .endpoints
        .get(&1)
        .context("the endpoint under test got no policy")?
        .rules
        .len();

    let dir = BpffsDir::new("policy")?;
    let mut dp = Datapath::open(dir.path())?;
    endpoint(&mut dp, pods[0].identity)?;
    let started = Instant::now();
    let stats = dp.apply_policy(&desired)?;
    let apply_secs = started.elapsed().as_secs_f64();
    let from = Program::from_pin(&dp, "from_container")?;
    let noop = Program::from_pin(&dp, "noop")?;

    // The same pod without policy, for what policy adds.
    let bare_dir = BpffsDir::new("policy-none")?;
    let mut bare_dp = Datapath::open(bare_dir.path())?;
    endpoint(&mut bare_dp, pods[0].identity)?;
    let bare = Program::from_pin(&bare_dp, "from_container")?;

    // Allowed: team 3's port (5003), denied: team 4 on that port.
    let peer = pod_ip(ns0_pod_of_team(3, 2));
    let syn = tcp_frame(pod_ip(0), 40_000, peer, 5003, TCP_SYN);
    from.timed(&syn, 1, TC_PASS)
        .context("the allowed connection's SYN")?;
    if dp.ct_entries()? != 1 {
        bail!("the allowed SYN created no CT entry");
    }
    let established = tcp_frame(pod_ip(0), 40_000, peer, 5003, TCP_ACK);
    bare.timed(&established, 1, TC_PASS)?;
    let denied = tcp_frame(
        pod_ip(0),
        40_001,
        pod_ip(ns0_pod_of_team(4, 1)),
        5003,
        TCP_SYN,
    );
    from.timed(&denied, 1, TC_SHOT).context("the denied SYN")?;

    let mut cases: Vec<Box<dyn FnMut() -> Result<f64> + '_>> = vec![
        Box::new(|| noop.timed(&established, REPEAT, TC_PASS)),
        Box::new(|| from.timed(&established, REPEAT, TC_PASS)),
        Box::new(|| from.timed(&denied, REPEAT, TC_SHOT)),
        Box::new(|| bare.timed(&established, REPEAT, TC_PASS)),
    ];
    for c in cases.iter_mut() {
        c()?; // warm-up
    }
    let mut refs: Vec<&mut (dyn FnMut() -> Result<f64> + '_)> =
        cases.iter_mut().map(|c| c.as_mut()).collect();
    let repeated = interleaved(ROUNDS, &mut refs)?;
    drop(refs);
    drop(cases);

    // Allowed new flows: single runs, alternating with the empty program.
    let mut new_noop = Vec::new();
    let mut new_from = Vec::new();
    for round in 0..=ROUNDS {
        dp.ct_flush()?;
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for k in 0..NEW_FLOWS {
            let team = k % TEAMS;
            let peer = pod_ip(ns0_pod_of_team(team, (k / TEAMS) % 10));
            let syn = tcp_frame(
                pod_ip(0),
                10_000 + k as u16,
                peer,
                5000 + team as u16,
                TCP_SYN,
            );
            if k % 2 == 0 {
                a.push(noop.timed(&syn, 1, TC_PASS)?);
                b.push(from.timed(&syn, 1, TC_PASS)?);
            } else {
                b.push(from.timed(&syn, 1, TC_PASS)?);
                a.push(noop.timed(&syn, 1, TC_PASS)?);
            }
        }
        if dp.ct_entries()? != NEW_FLOWS {
            bail!("{NEW_FLOWS} allowed SYNs did not create {NEW_FLOWS} CT entries");
        }
        if round > 0 {
            // Round 0 is the warm-up.
            new_noop.push(median(&a));
            new_from.push(median(&b));
        }
    }
    let counters = dp.counters()?;

    // ----- report -----
    println!("catena-bench datapath-policy");
    println!(
        "{POLICIES} CiliumNetworkPolicies over {PODS} pods in {NAMESPACES} namespaces, compiled by the agent's compile_policy in {compile_secs:.2} s, written by apply_policy in {apply_secs:.2} s"
    );
    println!(
        "maps: {} ipcache entries, {} policy rules over {} endpoints ({} for the endpoint under test, selected by {} policies); written: {} policy, {} ipcache",
        desired.ipcache.len(),
        total_rules,
        desired.endpoints.len(),
        ep_rules,
        POLICIES / NAMESPACES,
        stats.entries_written,
        stats.ipcache_written
    );
    println!(
        "BPF_PROG_TEST_RUN of from_container (egress of the pod) vs the empty tc program (noop) from the same object; machine: {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "repeated cases: 1 packet x {REPEAT} repeats, kernel time / repeat; {ROUNDS} interleaved rounds (order rotated), medians"
    );
    println!(
        "allowed new flow: {NEW_FLOWS} single runs per program per round (distinct source ports, 20 peers x 10 pods, CT flushed per batch), median per round, median over {ROUNDS} rounds"
    );
    println!();
    println!("| case                                   | noop ns | from_container ns | ratio | added ns |");
    println!("|----------------------------------------|--------:|------------------:|------:|---------:|");
    let ratio_of = |num: &[f64], den: &[f64]| {
        let r: Vec<f64> = num.iter().zip(den).map(|(a, b)| a / b).collect();
        median(&r)
    };
    let noop_ns = median(&repeated[0]);
    let mut rows = vec![];
    for (name, idx) in [
        ("no policy, same packet (reference)", 3),
        ("(b) established flow", 1),
        ("(c) denied new flow", 2),
    ] {
        let v = median(&repeated[idx]);
        let r = ratio_of(&repeated[idx], &repeated[0]);
        println!(
            "| {name:<38} | {noop_ns:>7.1} | {v:>17.1} | {r:>5.2} | {:>8.1} |",
            v - noop_ns
        );
        rows.push((name, r));
    }
    let (n1, f1) = (median(&new_noop), median(&new_from));
    let r1 = ratio_of(&new_from, &new_noop);
    println!(
        "| {:<38} | {n1:>7.0} | {f1:>17.0} | {r1:>5.2} | {:>8.0} |",
        "(a) allowed new flow (single runs)",
        f1 - n1
    );
    rows.push(("(a) allowed new flow (single runs)", r1));
    println!();
    println!(
        "counters after the run: policy_allowed {}, drop_policy_denied {}, events_lost {}",
        counters.get("policy_allowed").copied().unwrap_or(0),
        counters.get("drop_policy_denied").copied().unwrap_or(0),
        counters.get("events_lost").copied().unwrap_or(0)
    );
    println!();
    println!("no bound of its own for this benchmark (issue #5 asks for the ratios); issue #4's <= {REFERENCE_RATIO}x per-packet target for reference:");
    println!("| case                                   | ratio | vs {REFERENCE_RATIO}x |");
    println!("|----------------------------------------|------:|--------|");
    for (name, r) in rows.iter().skip(1) {
        println!(
            "| {name:<38} | {r:>5.2} | {}   |",
            verdict(*r <= REFERENCE_RATIO)
        );
    }
    Ok(())
}
