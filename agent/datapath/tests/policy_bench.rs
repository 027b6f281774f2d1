//! Per-packet cost of the programs, measured with BPF_PROG_TEST_RUN (the
//! kernel's own timing of `repeat` runs): an empty classifier as the
//! baseline, from_container without policy, and from_container under a
//! policy of 1k entries with a 10k-entry ipcache, for established and new
//! connections. Prints one `bench:` line per case (the numbers feed the
//! benchmark suite); asserts only the verdicts, timings vary by machine.

mod common;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use aya::programs::{SchedClassifier, TestRun, TestRunOptions};
use catena_common::endpoint::EP_FLAG_ANTI_SPOOF;
use catena_datapath::policy::{Direction, EndpointPolicy, PolicyDesired, PolicyRule, PortRange};
use catena_datapath::Datapath;
use common::*;

const PASS: u32 = -1i32 as u32;
const SHOT: u32 = 2;
const POD: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const REPEAT: u32 = 1_000_000;

fn timed(prog: &SchedClassifier, pkt: &[u8], repeat: u32) -> (u32, Duration) {
    let res = prog
        .test_run(TestRunOptions {
            data_in: Some(pkt),
            repeat,
            ..TestRunOptions::default()
        })
        .expect("BPF_PROG_TEST_RUN");
    (res.return_value, res.duration)
}

fn bench(name: &str, prog: &SchedClassifier, pkt: &[u8], want: u32) -> f64 {
    let (rc, d) = timed(prog, pkt, REPEAT);
    assert_eq!(rc, want, "{name}");
    let ns = d.as_nanos() as f64;
    println!("bench: {name}: {ns:.1} ns/packet (repeat {REPEAT})");
    ns
}

/// Median kernel-measured time of single runs, one packet each.
fn median_single(prog: &SchedClassifier, pkts: &[Vec<u8>], want: u32) -> f64 {
    let mut ns: Vec<u128> = pkts
        .iter()
        .map(|p| {
            let (rc, d) = timed(prog, p, 1);
            assert_eq!(rc, want);
            d.as_nanos()
        })
        .collect();
    ns.sort_unstable();
    ns[ns.len() / 2] as f64
}

/// Host `i` of the 10k ipcache /32s (10.1.0.0 + i).
fn host(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 1, 0, 0)) + i)
}

#[test]
fn per_packet_cost() {
    let dir = BpffsDir::new();
    let mut dp = Datapath::open(dir.path()).unwrap();
    test_endpoint(&mut dp, POD, 1, 300, EP_FLAG_ANTI_SPOOF);
    let noop = SchedClassifier::from_pin(dp.program_pin("noop")).unwrap();
    let from = SchedClassifier::from_pin(dp.program_pin("from_container")).unwrap();

    let mut pkt = Ipv4Packet::tcp(POD, 40000, host(5), 5000);
    pkt.tcp_flags = 0x10;
    let ack = pkt.build();
    let base = bench("noop", &noop, &ack, PASS);
    let unenforced = bench(
        "from_container unenforced non-service TCP",
        &from,
        &ack,
        PASS,
    );

    // 10k /32s over 1k identities, 1k allow entries (one per identity, port
    // 5000 + i % 7) plus one deny.
    let ipcache: BTreeMap<(std::net::IpAddr, u8), u32> = (0..10_000)
        .map(|i| ((host(i).into(), 32), 1000 + i % 1000))
        .collect();
    let mut rules: Vec<PolicyRule> = (0..1000)
        .map(|i| PolicyRule {
            direction: Direction::Egress,
            remote_identity: 1000 + i,
            proto: 6,
            ports: PortRange::single(5000 + (i % 7) as u16),
            deny: false,
            rule_ref: i + 1,
        })
        .collect();
    rules.push(PolicyRule {
        direction: Direction::Egress,
        remote_identity: 0,
        proto: 6,
        ports: PortRange::single(22),
        deny: true,
        rule_ref: 5000,
    });
    let desired = PolicyDesired {
        ipcache,
        endpoints: [(
            1,
            EndpointPolicy {
                ingress_enforced: true,
                egress_enforced: true,
                rules,
            },
        )]
        .into_iter()
        .collect(),
    };
    let t = Instant::now();
    let s = dp.apply_policy(&desired).unwrap();
    println!(
        "bench: apply_policy (1001 entries, 10k ipcache): {:?}",
        t.elapsed()
    );
    assert_eq!((s.entries_written, s.ipcache_written), (1001 + 1, 10_000));

    // host(5) has identity 1005, allowed on port 5000 + 5 % 7 = 5005.
    let established = Ipv4Packet::tcp(POD, 40001, host(5), 5005).build();
    let (rc, _) = timed(&from, &established, 1);
    assert_eq!(rc, PASS, "allowed: the first run creates the connection");
    let est = bench(
        "from_container policy, established flow",
        &from,
        &established,
        PASS,
    );
    // A denied new connection is decided on every run: all four lookups
    // (deny x2 with the deny entry present, allow x2) plus the ipcache, and
    // the verdict/drop events (rate-limited after the burst).
    let denied = Ipv4Packet::tcp(POD, 40002, host(5), 5006).build();
    let new_denied = bench(
        "from_container policy, new flow (denied)",
        &from,
        &denied,
        SHOT,
    );
    // Allowed new connections: distinct flows, one run each; the baseline is
    // the empty program run the same way.
    let flows: Vec<Vec<u8>> = (0..5000u32)
        .map(|i| {
            Ipv4Packet::tcp(
                POD,
                10_000 + i as u16,
                host(i),
                5000 + (i % 1000 % 7) as u16,
            )
            .build()
        })
        .collect();
    let new_allowed = median_single(&from, &flows, PASS);
    let noop_single = median_single(&noop, &flows, PASS);
    println!(
        "bench: from_container policy, new flow (allowed, single runs): {new_allowed:.0} ns median (noop the same way: {noop_single:.0} ns)"
    );
    println!(
        "bench: summary ns/packet: noop {base:.1}, unenforced {unenforced:.1}, established {est:.1}, new denied {new_denied:.1}, new allowed (single-run median) {new_allowed:.0} vs noop {noop_single:.0}"
    );

    // Reopening with the policy in place (the mirror is rebuilt from the maps).
    drop(from);
    drop(noop);
    drop(dp);
    let t = Instant::now();
    let mut dp = Datapath::open(dir.path()).unwrap();
    println!(
        "bench: Datapath::open with that policy pinned: {:?}",
        t.elapsed()
    );
    assert_eq!(
        dp.apply_policy(&desired).unwrap(),
        Default::default(),
        "nothing to rewrite after reopen"
    );
}
