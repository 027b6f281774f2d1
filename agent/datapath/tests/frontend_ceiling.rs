//! Reverse-NAT indexes past the old u16 ceiling (65,535 frontends), end to
//! end through the real programs (BPF_PROG_TEST_RUN), and the pinned-map
//! layout revision that keeps an upgraded agent from misreading maps an
//! older layout left pinned.

mod common;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use aya::maps::{Array, Map, MapData};
use aya::programs::SchedClassifier;
use catena_common::ct::CT_EGRESS;
use catena_common::endpoint::EP_FLAG_ANTI_SPOOF;
use catena_common::{map_names, MAP_LAYOUT_REVISION};
use catena_datapath::{BackendAddr, Datapath, Frontend, LbDesired, LbService, Proto};
use common::*;

const PASS: u32 = -1i32 as u32;
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
/// More frontends than a u16 index can number (65,535).
const FRONTENDS: u32 = 70_000;

fn vip(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + i)
}

/// Each frontend's own backend, so a translation shows which frontend's
/// slots it used.
fn backend_of(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 0)) + i)
}

fn desired(count: u32) -> LbDesired {
    let mut d = LbDesired::default();
    for i in 0..count {
        d.services.insert(
            Frontend {
                address: vip(i),
                port: 80,
                proto: Proto::Tcp,
            },
            LbService {
                name: format!("ns/svc-{i}"),
                backends: vec![BackendAddr {
                    address: backend_of(i),
                    port: 8080,
                }],
                affinity_timeout: None,
                external_backends: None,
            },
        );
    }
    d
}

#[test]
fn frontend_with_index_past_65535_is_translated_and_reverse_translated() {
    let dir = BpffsDir::new();
    let mut dp = Datapath::open(dir.path()).expect("open");
    test_endpoint(&mut dp, CLIENT, 1, 256, EP_FLAG_ANTI_SPOOF);
    dp.apply_services(&desired(FRONTENDS))
        .expect("70,000 frontends are under the ceiling");

    let by_index: BTreeMap<u32, Ipv4Addr> = dp
        .services()
        .iter()
        .map(|s| (s.rev_nat_index, s.frontend.address))
        .collect();
    assert_eq!(by_index.len(), FRONTENDS as usize, "indexes are distinct");
    let (&rev, &target) = by_index.last_key_value().unwrap();
    assert!(rev > 65_535, "highest index {rev}");
    // A u16 anywhere on the path would turn `rev` into this index, which is
    // another live frontend: the reply would carry the wrong source.
    let truncated = by_index[&(rev & 0xffff)];
    assert_ne!(truncated, target);
    let i = u32::from(target) - u32::from(vip(0));

    let from = SchedClassifier::from_pin(dp.program_pin("from_container")).unwrap();
    let to = SchedClassifier::from_pin(dp.program_pin("to_container")).unwrap();
    let syn = Ipv4Packet::tcp(CLIENT, 40000, target, 80).build();
    let (rc, out) = run_prog(&from, &syn);
    assert_eq!(rc, PASS);
    let got = parse_and_verify(&out, false);
    assert_eq!((got.dst, got.dport), (backend_of(i), 8080));

    let ct = dp.ct_dump().unwrap();
    let egress = ct
        .iter()
        .find(|(k, _)| k.kind == CT_EGRESS && k.daddr == u32::from_ne_bytes(got.dst.octets()))
        .expect("CT_EGRESS entry");
    assert_eq!(egress.1.rev_nat_index, rev);

    let reply = Ipv4Packet::tcp(got.dst, 8080, CLIENT, 40000).build();
    let (rc, out) = run_prog(&to, &reply);
    assert_eq!(rc, PASS);
    let r = parse_and_verify(&out, false);
    assert_eq!(
        (r.src, r.sport, r.dst, r.dport),
        (target, 80, CLIENT, 40000)
    );
    assert_eq!(dp.counters().unwrap()["reverse_nat"], 1);
}

fn stamp(dir: &BpffsDir) -> Array<MapData, u32> {
    let path = dir.path().join("maps").join(map_names::MAP_LAYOUT);
    Array::try_from(Map::Array(MapData::from_pin(path).unwrap())).unwrap()
}

fn small() -> LbDesired {
    desired(3)
}

#[test]
fn pins_of_an_older_layout_are_replaced_not_misread() {
    let dir = BpffsDir::new();
    {
        let mut dp = Datapath::open(dir.path()).unwrap();
        test_endpoint(&mut dp, CLIENT, 1, 256, EP_FLAG_ANTI_SPOOF);
        dp.apply_services(&small()).unwrap();
    }
    assert_eq!(stamp(&dir).get(&0, 0).unwrap(), MAP_LAYOUT_REVISION);

    // Same revision: a restart keeps the services (and everything else).
    {
        let dp = Datapath::open(dir.path()).unwrap();
        assert_eq!(dp.services().len(), 3);
        assert!(dp.endpoint(TEST_IFINDEX).unwrap().is_some());
    }

    // Pins of a version before the stamp (no MAP_LAYOUT): the maps whose
    // layout changed since (services: same value size, other fields) are
    // replaced, the others (endpoints) kept.
    std::fs::remove_file(dir.path().join("maps").join(map_names::MAP_LAYOUT)).unwrap();
    {
        let dp = Datapath::open(dir.path()).unwrap();
        assert!(dp.services().is_empty(), "{:?}", dp.services());
        assert!(dp.endpoint(TEST_IFINDEX).unwrap().is_some());
    }
    assert_eq!(stamp(&dir).get(&0, 0).unwrap(), MAP_LAYOUT_REVISION);

    // Pins of a newer version (a downgrade): nothing is trusted.
    {
        let mut dp = Datapath::open(dir.path()).unwrap();
        dp.apply_services(&small()).unwrap();
    }
    stamp(&dir).set(0, MAP_LAYOUT_REVISION + 1, 0).unwrap();
    let dp = Datapath::open(dir.path()).unwrap();
    assert!(dp.services().is_empty());
    assert!(dp.endpoint(TEST_IFINDEX).unwrap().is_none());
    assert_eq!(stamp(&dir).get(&0, 0).unwrap(), MAP_LAYOUT_REVISION);
}
