//! sessionAffinity: ClientIP through BPF_PROG_TEST_RUN: new flows of one
//! client stick to one backend while the affinity entry is fresh, and are
//! balanced again once it is older than the service's timeout.

mod common;

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use aya::maps::{HashMap, Map, MapData};
use aya::programs::{SchedClassifier, TestRun, TestRunOptions};
use catena_common::lb::{Affinity4Key, Affinity4Value, Backend4};
use catena_datapath::{BackendAddr, Datapath, Frontend, LbDesired, LbService, Proto};
use common::*;

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 1, 10);
const VIP_OTHER: Ipv4Addr = Ipv4Addr::new(10, 96, 1, 11);
const OTHER_BACKEND: Ipv4Addr = Ipv4Addr::new(10, 0, 9, 9);
const CLIENT_A: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const CLIENT_B: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);

fn fe(address: Ipv4Addr) -> Frontend {
    Frontend {
        address,
        port: 80,
        proto: Proto::Tcp,
    }
}

fn desired(timeout: Option<u32>) -> LbDesired {
    let mut d = LbDesired::default();
    d.services.insert(
        fe(VIP),
        LbService {
            name: "default/sticky".into(),
            backends: (0..4)
                .map(|i| BackendAddr {
                    address: Ipv4Addr::new(10, 0, 1, 5 + i),
                    port: 8080,
                })
                .collect(),
            affinity_timeout: timeout,
            external_backends: None,
        },
    );
    // A backend that exists but is not one of the sticky service's.
    d.services.insert(
        fe(VIP_OTHER),
        LbService {
            name: "default/other".into(),
            backends: vec![BackendAddr {
                address: OTHER_BACKEND,
                port: 8080,
            }],
            affinity_timeout: None,
            external_backends: None,
        },
    );
    d
}

fn pinned_hash<K: aya::Pod, V: aya::Pod>(dp: &Datapath, name: &str) -> HashMap<MapData, K, V> {
    let data = MapData::from_pin(dp.bpffs_dir().join("maps").join(name)).unwrap();
    let map = match name {
        "LB4_AFFINITY" => Map::LruHashMap(data),
        _ => Map::HashMap(data),
    };
    HashMap::try_from(map).unwrap()
}

/// The backend a new flow `client:sport -> VIP:80` is sent to.
fn new_flow(prog: &SchedClassifier, client: Ipv4Addr, sport: u16) -> Ipv4Addr {
    let pkt = Ipv4Packet::tcp(client, sport, VIP, 80).build();
    let mut out = vec![0u8; pkt.len() + 64];
    let res = prog
        .test_run(TestRunOptions {
            data_in: Some(&pkt),
            data_out: Some(&mut out),
            ..TestRunOptions::default()
        })
        .expect("BPF_PROG_TEST_RUN");
    out.truncate(res.data_size_out as usize);
    parse_and_verify(&out, false).dst
}

fn affinity_key(dp: &Datapath, client: Ipv4Addr) -> Affinity4Key {
    let rev = dp
        .services()
        .into_iter()
        .find(|s| s.frontend == fe(VIP))
        .unwrap()
        .rev_nat_index;
    Affinity4Key {
        client: u32::from_ne_bytes(client.octets()),
        rev_nat_index: rev,
    }
}

#[test]
fn client_ip_affinity_sticks_until_the_timeout() {
    let dir = BpffsDir::new();
    let mut dp = Datapath::open(dir.path()).unwrap();
    // Several clients through one interface: no anti-spoofing.
    test_endpoint(&mut dp, CLIENT_A, 1, 256, 0);
    dp.apply_services(&desired(Some(1))).unwrap();
    let svc = dp
        .services()
        .into_iter()
        .find(|s| s.frontend == fe(VIP))
        .unwrap();
    assert_eq!(svc.affinity_timeout, Some(1));
    let prog = SchedClassifier::from_pin(dp.program_pin("from_container")).unwrap();

    // Many flows (distinct source ports: distinct conntrack entries) of one
    // client: one backend. Without affinity 40 picks over 4 backends all
    // landing on one has p = 4^-39.
    for client in [CLIENT_A, CLIENT_B] {
        let seen: BTreeSet<Ipv4Addr> = (30000..30040).map(|p| new_flow(&prog, client, p)).collect();
        assert_eq!(seen.len(), 1, "{client}'s flows were spread: {seen:?}");
    }

    // The entry decides: point client A's entry at a backend outside the
    // service (only the affinity lookup can produce it) and it is honoured.
    let mut aff: HashMap<MapData, Affinity4Key, Affinity4Value> = pinned_hash(&dp, "LB4_AFFINITY");
    let backends: HashMap<MapData, u32, Backend4> = pinned_hash(&dp, "LB4_BACKENDS");
    let other_id = backends
        .iter()
        .map(Result::unwrap)
        .find(|(_, b)| b.address == u32::from_ne_bytes(OTHER_BACKEND.octets()))
        .unwrap()
        .0;
    let key = affinity_key(&dp, CLIENT_A);
    let mut entry = aff.get(&key, 0).unwrap();
    entry.backend_id = other_id;
    aff.insert(key, entry, 0).unwrap();
    assert_eq!(new_flow(&prog, CLIENT_A, 31000), OTHER_BACKEND);

    // Past the 1 s timeout (bpf_ktime_get_ns is the monotonic clock): the
    // stale entry is ignored, the new flow goes to one of the service's own
    // backends, and that becomes the client's new affinity.
    std::thread::sleep(std::time::Duration::from_millis(1200));
    let fresh = new_flow(&prog, CLIENT_A, 31001);
    assert_ne!(fresh, OTHER_BACKEND, "an expired affinity entry was used");
    assert!(svc.backends.iter().any(|b| b.address == fresh));
    assert_ne!(aff.get(&key, 0).unwrap().backend_id, other_id);
    for p in 31002..31010 {
        assert_eq!(new_flow(&prog, CLIENT_A, p), fresh);
    }

    // Turning affinity off stops consulting the map: flows spread again.
    let mut entry = aff.get(&key, 0).unwrap();
    entry.backend_id = other_id;
    aff.insert(key, entry, 0).unwrap();
    dp.apply_services(&desired(None)).unwrap();
    let seen: BTreeSet<Ipv4Addr> = (32000..32040)
        .map(|p| new_flow(&prog, CLIENT_A, p))
        .collect();
    assert!(!seen.contains(&OTHER_BACKEND), "{seen:?}");
    assert!(
        seen.len() > 1,
        "flows still stick without affinity: {seen:?}"
    );
}

#[test]
fn affinity_survives_a_restart_without_rewrites() {
    let dir = BpffsDir::new();
    let mut dp = Datapath::open(dir.path()).unwrap();
    dp.apply_services(&desired(Some(10_800))).unwrap();
    drop(dp);
    let mut dp = Datapath::open(dir.path()).unwrap();
    let svc = dp
        .services()
        .into_iter()
        .find(|s| s.frontend == fe(VIP))
        .unwrap();
    assert_eq!(svc.affinity_timeout, Some(10_800));
    let before = dp.service_map_writes();
    let stats = dp.apply_services(&desired(Some(10_800))).unwrap();
    assert_eq!(dp.service_map_writes(), before, "{stats:?}");
    // A changed timeout rewrites just the master entry.
    dp.apply_services(&desired(Some(60))).unwrap();
    assert_eq!(dp.service_map_writes(), before + 1);
}
