//! `apply_policy`: diffs, idempotency, read-back, restart, and endpoint
//! removal cleaning the removed endpoint's policy.

mod common;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use catena_datapath::policy::{
    Direction, EndpointPolicy, PolicyDesired, PolicyRule, PolicyStats, PortRange,
};
use catena_datapath::Datapath;
use common::*;

fn rule(direction: Direction, remote: u32, proto: u8, start: u16, end: u16, r: u32) -> PolicyRule {
    PolicyRule {
        direction,
        remote_identity: remote,
        proto,
        ports: PortRange { start, end },
        deny: false,
        rule_ref: r,
    }
}

fn desired() -> PolicyDesired {
    use Direction::{Egress as E, Ingress as I};
    let mut deny = rule(E, 0, 6, 22, 22, 4);
    deny.deny = true;
    let mut rules1 = vec![
        rule(I, 300, 6, 80, 80, 1),
        // 8000..=8100: several prefixes, read back as one range.
        rule(I, 300, 6, 8000, 8100, 2),
        rule(E, 0, 17, 53, 53, 3),
        deny,
        rule(E, 400, 0, 0, 0, 5),
        rule(E, 400, 1, 8, 8, 6),
    ];
    rules1.sort();
    let ep1 = EndpointPolicy {
        ingress_enforced: true,
        egress_enforced: true,
        rules: rules1,
    };
    let ep2 = EndpointPolicy {
        ingress_enforced: true,
        egress_enforced: false,
        rules: vec![],
    };
    PolicyDesired {
        ipcache: [
            ((Ipv4Addr::new(10, 0, 0, 0).into(), 24), 300),
            ((Ipv4Addr::new(10, 0, 0, 7).into(), 32), 400),
            ((Ipv4Addr::new(0, 0, 0, 0).into(), 0), 2),
        ]
        .into_iter()
        .collect(),
        endpoints: [(1, ep1), (2, ep2)].into_iter().collect(),
    }
}

#[test]
fn apply_is_diff_based_idempotent_and_survives_reopen() {
    let dir = BpffsDir::new();
    let mut dp = Datapath::open(dir.path()).unwrap();
    let d = desired();
    let s = dp.apply_policy(&d).unwrap();
    // ep1: 1 + 4 (8000..=8100) + 1 + 1 + 1 + 1 entries, plus two flag words.
    assert_eq!(
        s,
        PolicyStats {
            entries_written: 9 + 2,
            entries_removed: 0,
            ipcache_written: 3,
            ipcache_removed: 0,
        }
    );
    assert_eq!(dp.apply_policy(&d).unwrap(), PolicyStats::default());
    assert_eq!(dp.endpoint_policy(1).unwrap().as_ref(), d.endpoints.get(&1));
    assert_eq!(dp.endpoint_policy(2).unwrap().as_ref(), d.endpoints.get(&2));
    assert_eq!(dp.endpoint_policy(3).unwrap(), None);
    assert_eq!(dp.ipcache().unwrap(), d.ipcache);

    // A restarted agent diffs against the pinned maps: nothing to write.
    drop(dp);
    let mut dp = Datapath::open(dir.path()).unwrap();
    assert_eq!(dp.apply_policy(&d).unwrap(), PolicyStats::default());
    assert_eq!(dp.endpoint_policy(1).unwrap().as_ref(), d.endpoints.get(&1));

    // One port changed: one entry written, one removed.
    let mut d2 = d.clone();
    let ep1 = d2.endpoints.get_mut(&1).unwrap();
    let r = ep1.rules.iter_mut().find(|r| r.rule_ref == 1).unwrap();
    r.ports = PortRange::single(81);
    ep1.rules.sort();
    let s = dp.apply_policy(&d2).unwrap();
    assert_eq!((s.entries_written, s.entries_removed), (1, 1));
    assert_eq!(
        dp.endpoint_policy(1).unwrap().as_ref(),
        d2.endpoints.get(&1)
    );

    // Endpoint 1 gone, an ipcache prefix changed: its entries and flags go.
    let mut d3 = d2.clone();
    d3.endpoints.remove(&1);
    d3.ipcache
        .insert((Ipv4Addr::new(10, 0, 0, 7).into(), 32), 401);
    let s = dp.apply_policy(&d3).unwrap();
    assert_eq!(
        s,
        PolicyStats {
            entries_written: 1,
            entries_removed: 9,
            ipcache_written: 1,
            ipcache_removed: 0,
        }
    );
    assert_eq!(dp.endpoint_policy(1).unwrap(), None);
    assert_eq!(dp.ipcache().unwrap(), d3.ipcache);

    // Everything gone.
    let s = dp.apply_policy(&PolicyDesired::default()).unwrap();
    assert_eq!((s.entries_written, s.ipcache_removed), (1, 3));
    assert_eq!(dp.endpoint_policy(2).unwrap(), None);
    assert!(dp.ipcache().unwrap().is_empty());
}

#[test]
fn ipcache_prefixes_are_normalised_and_conflicts_refused() {
    let dir = BpffsDir::new();
    let mut dp = Datapath::open(dir.path()).unwrap();
    let mut d = PolicyDesired::default();
    d.ipcache
        .insert((Ipv4Addr::new(10, 1, 2, 3).into(), 16), 500);
    dp.apply_policy(&d).unwrap();
    let want: BTreeMap<_, _> = [((Ipv4Addr::new(10, 1, 0, 0).into(), 16), 500)].into();
    assert_eq!(dp.ipcache().unwrap(), want);
    assert_eq!(dp.apply_policy(&d).unwrap(), PolicyStats::default());
    d.ipcache
        .insert((Ipv4Addr::new(10, 1, 9, 9).into(), 16), 501);
    assert!(dp.apply_policy(&d).is_err());
    d.ipcache.clear();
    d.ipcache
        .insert((Ipv4Addr::new(10, 1, 9, 9).into(), 33), 501);
    assert!(dp.apply_policy(&d).is_err());
    // A refused desired state changes nothing.
    assert_eq!(dp.ipcache().unwrap(), want);
}

/// IPv6 prefixes go to `IPCACHE6`, normalised, and read back (a restarted
/// agent's mirror) next to the IPv4 ones; ::/0 is a prefix like any other.
#[test]
fn ipv6_prefixes_share_the_ipcache_contract() {
    let dir = BpffsDir::new();
    let mut dp = Datapath::open(dir.path()).unwrap();
    let v6 = |s: &str| -> IpAddr { s.parse().unwrap() };
    let mut d = PolicyDesired::default();
    d.ipcache
        .insert((v6("fd00:10:244:6::1234"), 64), 16_777_216);
    d.ipcache.insert((v6("fd00:10:244:6::7"), 128), 300);
    d.ipcache.insert((v6("::"), 0), 16_777_217);
    d.ipcache
        .insert((Ipv4Addr::new(10, 0, 0, 7).into(), 32), 300);
    let s = dp.apply_policy(&d).unwrap();
    assert_eq!((s.ipcache_written, s.ipcache_removed), (4, 0));
    let want: BTreeMap<_, _> = [
        ((Ipv4Addr::new(10, 0, 0, 7).into(), 32), 300),
        ((v6("fd00:10:244:6::"), 64), 16_777_216),
        ((v6("fd00:10:244:6::7"), 128), 300),
        ((v6("::"), 0), 16_777_217),
    ]
    .into();
    assert_eq!(dp.ipcache().unwrap(), want);
    drop(dp);
    // Reopened: the mirror is rebuilt from both pinned maps, nothing to write.
    let mut dp = Datapath::open(dir.path()).unwrap();
    assert_eq!(dp.ipcache().unwrap(), want);
    assert_eq!(dp.apply_policy(&d).unwrap(), PolicyStats::default());
    d.ipcache.insert((v6("fd00::1"), 129), 1);
    assert!(
        dp.apply_policy(&d).is_err(),
        "an IPv6 prefix above 128 bits"
    );
    d.ipcache.clear();
    let s = dp.apply_policy(&d).unwrap();
    assert_eq!(s.ipcache_removed, 4);
    assert!(dp.ipcache().unwrap().is_empty());
}

#[test]
fn removing_an_endpoint_clears_its_policy_for_the_next_user_of_its_id() {
    let dir = BpffsDir::new();
    let mut dp = Datapath::open(dir.path()).unwrap();
    test_endpoint(&mut dp, Ipv4Addr::new(10, 0, 0, 1), 1, 300, 0);
    let d = desired();
    dp.apply_policy(&d).unwrap();
    dp.remove_endpoint(TEST_IFINDEX).unwrap();
    assert_eq!(dp.endpoint_policy(1).unwrap(), None);
    assert!(
        dp.endpoint_policy(2).unwrap().is_some(),
        "other endpoints keep theirs"
    );
    // The next apply writes endpoint 1's policy again (the mirror knows it
    // was cleared).
    let s = dp.apply_policy(&d).unwrap();
    assert_eq!(s.entries_written, 9 + 1);
    assert_eq!(dp.endpoint_policy(1).unwrap().as_ref(), d.endpoints.get(&1));
}

#[test]
fn invalid_policy_is_refused() {
    let dir = BpffsDir::new();
    let mut dp = Datapath::open(dir.path()).unwrap();
    let mut d = PolicyDesired::default();
    d.endpoints.insert(
        1,
        EndpointPolicy {
            ingress_enforced: true,
            egress_enforced: false,
            rules: vec![rule(Direction::Ingress, 0, 0, 80, 80, 0)],
        },
    );
    assert!(dp.apply_policy(&d).is_err(), "ports without a protocol");
    d.endpoints.clear();
    d.endpoints.insert(70_000, EndpointPolicy::default());
    assert!(dp.apply_policy(&d).is_err(), "endpoint id out of range");
}
