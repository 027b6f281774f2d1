//! `apply_services` diffing against the real (pinned) maps.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::Path;

use aya::maps::{HashMap, Map, MapData};
use catena_common::lb::{Backend4, RevNat4, Service4Key, Service4Value, SVC_FLAG_NO_BACKENDS};
use catena_datapath::{ApplyStats, BackendAddr, Datapath, Frontend, LbDesired, LbService, Proto};
use common::BpffsDir;

fn fe(last: u8, port: u16, proto: Proto) -> Frontend {
    Frontend {
        address: Ipv4Addr::new(10, 96, 0, last),
        port,
        proto,
    }
}

fn be(last: u8, port: u16) -> BackendAddr {
    BackendAddr {
        address: Ipv4Addr::new(10, 0, 1, last),
        port,
    }
}

fn svc(name: &str, backends: Vec<BackendAddr>) -> LbService {
    LbService {
        name: name.into(),
        backends,
        affinity_timeout: None,
        external_backends: None,
    }
}

struct Dump {
    services: BTreeMap<(u32, u16, u16, u8), Service4Value>,
    backends: BTreeMap<u32, Backend4>,
    revnat: BTreeMap<u32, RevNat4>,
}

fn open_map<K: aya::Pod, V: aya::Pod>(dir: &Path, name: &str) -> HashMap<MapData, K, V> {
    let data = MapData::from_pin(dir.join("maps").join(name)).unwrap();
    HashMap::try_from(Map::from_map_data(data).unwrap()).unwrap()
}

fn dump(dir: &Path) -> Dump {
    let s: HashMap<_, Service4Key, Service4Value> = open_map(dir, "LB4_SERVICES");
    let b: HashMap<_, u32, Backend4> = open_map(dir, "LB4_BACKENDS");
    let r: HashMap<_, u32, RevNat4> = open_map(dir, "LB4_REVNAT");
    Dump {
        services: s
            .iter()
            .map(|e| {
                let (k, v) = e.unwrap();
                ((k.address, k.dport, k.backend_slot, k.proto), v)
            })
            .collect(),
        backends: b.iter().map(|e| e.unwrap()).collect(),
        revnat: r.iter().map(|e| e.unwrap()).collect(),
    }
}

/// Checks that the maps hold exactly `desired`: every frontend's master and
/// slots, backends resolving to the desired addresses, rev-NAT entries, and
/// nothing else.
fn assert_maps_match(dir: &Path, dp: &Datapath, desired: &LbDesired) {
    let d = dump(dir);
    let mut expected_keys = BTreeSet::new();
    let mut used_backends = BTreeSet::new();
    let mut used_revnat = BTreeSet::new();
    let programmed: BTreeMap<Frontend, _> =
        dp.services().into_iter().map(|p| (p.frontend, p)).collect();
    assert_eq!(programmed.len(), desired.services.len());
    for (f, s) in &desired.services {
        let addr = u32::from_ne_bytes(f.address.octets());
        let port = f.port.to_be();
        let proto = f.proto.number();
        let master = d
            .services
            .get(&(addr, port, 0, proto))
            .expect("master entry");
        assert_eq!(master.count as usize, s.backends.len());
        assert_eq!(
            master.flags & SVC_FLAG_NO_BACKENDS != 0,
            s.backends.is_empty()
        );
        assert_ne!(master.rev_nat_index, 0);
        assert_eq!(programmed[f].rev_nat_index, master.rev_nat_index);
        assert_eq!(programmed[f].backends, s.backends);
        assert_eq!(programmed[f].name, s.name);
        let rn = d.revnat[&master.rev_nat_index];
        assert_eq!((rn.address, rn.port), (addr, port));
        used_revnat.insert(master.rev_nat_index);
        expected_keys.insert((addr, port, 0, proto));
        for (i, b) in s.backends.iter().enumerate() {
            let slot = d
                .services
                .get(&(addr, port, i as u16 + 1, proto))
                .expect("slot");
            let backend = d
                .backends
                .get(&slot.backend_id)
                .expect("slot names a live backend");
            assert_eq!(backend.address, u32::from_ne_bytes(b.address.octets()));
            assert_eq!(backend.port, b.port.to_be());
            assert_eq!(backend.proto, proto);
            used_backends.insert(slot.backend_id);
            expected_keys.insert((addr, port, i as u16 + 1, proto));
        }
    }
    assert_eq!(
        d.services.keys().copied().collect::<BTreeSet<_>>(),
        expected_keys,
        "LB4_SERVICES"
    );
    assert_eq!(
        d.backends.keys().copied().collect::<BTreeSet<_>>(),
        used_backends,
        "LB4_BACKENDS"
    );
    assert_eq!(
        d.revnat.keys().copied().collect::<BTreeSet<_>>(),
        used_revnat,
        "LB4_REVNAT"
    );
}

fn backend_ids(dir: &Path) -> BTreeMap<(u32, u16), u32> {
    dump(dir)
        .backends
        .iter()
        .map(|(id, b)| ((b.address, b.port), *id))
        .collect()
}

#[test]
fn add_update_remove_keep_ids_and_reopen() {
    let dir = BpffsDir::new();
    let mut dp = Datapath::open(dir.path()).unwrap();

    let mut d = LbDesired::default();
    d.services.insert(
        fe(10, 80, Proto::Tcp),
        svc("a/web", vec![be(1, 8080), be(2, 8080), be(3, 8080)]),
    );
    d.services
        .insert(fe(11, 53, Proto::Udp), svc("a/dns", vec![be(4, 53)]));
    d.services
        .insert(fe(12, 443, Proto::Tcp), svc("a/empty", vec![]));
    let st = dp.apply_services(&d).unwrap();
    assert_eq!(
        st,
        ApplyStats {
            services_added: 3,
            backends_added: 4,
            ..Default::default()
        }
    );
    assert_maps_match(dir.path(), &dp, &d);
    let ids1 = backend_ids(dir.path());
    let revs1: BTreeMap<_, _> = dp
        .services()
        .iter()
        .map(|s| (s.frontend, s.rev_nat_index))
        .collect();

    // Same state again: nothing written.
    let writes = dp.service_map_writes();
    assert_eq!(dp.apply_services(&d).unwrap(), ApplyStats::default());
    assert_eq!(dp.service_map_writes(), writes);

    // Update: web loses be1 and gains be5; dns removed; new svc shares be2.
    d.services.insert(
        fe(10, 80, Proto::Tcp),
        svc("a/web", vec![be(2, 8080), be(3, 8080), be(5, 8080)]),
    );
    d.services.remove(&fe(11, 53, Proto::Udp));
    d.services
        .insert(fe(13, 8080, Proto::Tcp), svc("a/other", vec![be(2, 8080)]));
    let st = dp.apply_services(&d).unwrap();
    assert_eq!(
        st,
        ApplyStats {
            services_added: 1,
            services_updated: 1,
            services_removed: 1,
            backends_added: 1,
            backends_removed: 2,
        }
    );
    assert_maps_match(dir.path(), &dp, &d);
    let ids2 = backend_ids(dir.path());
    for (k, id) in &ids2 {
        if let Some(old) = ids1.get(k) {
            assert_eq!(old, id, "backend id changed for a kept backend");
        }
    }
    let revs2: BTreeMap<_, _> = dp
        .services()
        .iter()
        .map(|s| (s.frontend, s.rev_nat_index))
        .collect();
    assert_eq!(
        revs1[&fe(10, 80, Proto::Tcp)],
        revs2[&fe(10, 80, Proto::Tcp)]
    );
    assert_eq!(
        revs1[&fe(12, 443, Proto::Tcp)],
        revs2[&fe(12, 443, Proto::Tcp)]
    );
    // The new backend did not reuse a freed id.
    let new_id = ids2[&(u32::from_ne_bytes([10, 0, 1, 5]), 8080u16.to_be())];
    assert!(!ids1.values().any(|id| *id == new_id));

    // Shrink to zero backends.
    d.services
        .insert(fe(10, 80, Proto::Tcp), svc("a/web", vec![]));
    dp.apply_services(&d).unwrap();
    assert_maps_match(dir.path(), &dp, &d);

    // Restart: a new Datapath on the same dir rebuilds its tables from the maps.
    let before: BTreeMap<_, _> = dp
        .services()
        .into_iter()
        .map(|s| (s.frontend, (s.backends, s.rev_nat_index)))
        .collect();
    drop(dp);
    let mut dp = Datapath::open(dir.path()).unwrap();
    let after: BTreeMap<_, _> = dp
        .services()
        .into_iter()
        .map(|s| (s.frontend, (s.backends, s.rev_nat_index)))
        .collect();
    assert_eq!(before, after);
    let writes = dp.service_map_writes();
    assert_eq!(dp.apply_services(&d).unwrap(), ApplyStats::default());
    assert_eq!(
        dp.service_map_writes(),
        writes,
        "a restarted agent rewrote unchanged state"
    );
    assert_maps_match(dir.path(), &dp, &d);

    // Everything removed: maps empty.
    let st = dp.apply_services(&LbDesired::default()).unwrap();
    assert_eq!(st.services_removed, 3);
    let left = dump(dir.path());
    assert!(left.services.is_empty() && left.backends.is_empty() && left.revnat.is_empty());
}

#[test]
fn reopen_cleans_stray_entries() {
    let dir = BpffsDir::new();
    let mut dp = Datapath::open(dir.path()).unwrap();
    let mut d = LbDesired::default();
    d.services.insert(
        fe(20, 80, Proto::Tcp),
        svc("b/web", vec![be(1, 80), be(2, 80)]),
    );
    dp.apply_services(&d).unwrap();
    drop(dp);

    // Something else left junk: a slot beyond the count, an orphan backend and
    // an orphan rev-NAT entry.
    let mut s: HashMap<_, Service4Key, Service4Value> = open_map(dir.path(), "LB4_SERVICES");
    let key = Service4Key {
        address: u32::from_ne_bytes([10, 96, 0, 20]),
        dport: 80u16.to_be(),
        backend_slot: 7,
        proto: 6,
        ..Default::default()
    };
    s.insert(
        key,
        Service4Value {
            backend_id: 999,
            ..Default::default()
        },
        0,
    )
    .unwrap();
    let mut b: HashMap<_, u32, Backend4> = open_map(dir.path(), "LB4_BACKENDS");
    b.insert(
        999,
        Backend4 {
            address: 1,
            port: 1,
            proto: 6,
            flags: 0,
        },
        0,
    )
    .unwrap();
    let mut r: HashMap<_, u32, RevNat4> = open_map(dir.path(), "LB4_REVNAT");
    r.insert(
        4242,
        RevNat4 {
            address: 1,
            port: 1,
            pad: 0,
        },
        0,
    )
    .unwrap();

    let mut dp = Datapath::open(dir.path()).unwrap();
    dp.apply_services(&d).unwrap();
    assert_maps_match(dir.path(), &dp, &d);
}

/// Frontends whose entry differs between two desired states.
fn changed_between(a: &LbDesired, b: &LbDesired) -> BTreeSet<Frontend> {
    a.services
        .keys()
        .chain(b.services.keys())
        .filter(|f| a.services.get(f) != b.services.get(f))
        .copied()
        .collect()
}

/// One edit of a desired state.
type Step = Box<dyn Fn(&mut LbDesired)>;

/// Partial applies (only the changed frontends) leave the maps exactly as a
/// full apply would: shared backends live while any frontend names them and
/// go with the last one; untouched frontends are not rewritten.
#[test]
fn partial_applies_match_full_applies() {
    let dir = BpffsDir::new();
    let mut dp = Datapath::open(dir.path()).unwrap();
    let mut d = LbDesired::default();
    for i in 0..20u8 {
        d.services.insert(
            fe(i, 80, Proto::Tcp),
            svc(&format!("a/s{i}"), vec![be(i, 80), be(i + 1, 80)]),
        );
    }
    // The first apply after open is full whatever the changed set says.
    dp.apply_services_changed(&d, &BTreeSet::new()).unwrap();
    assert_maps_match(dir.path(), &dp, &d);
    let ids1 = backend_ids(dir.path());

    let steps: Vec<Step> = vec![
        // One frontend loses a backend that its neighbour still names.
        Box::new(|d| {
            d.services
                .insert(fe(5, 80, Proto::Tcp), svc("a/s5", vec![be(5, 80)]));
        }),
        // The neighbour drops it too: now nothing names be(6).
        Box::new(|d| {
            d.services
                .insert(fe(6, 80, Proto::Tcp), svc("a/s6", vec![be(7, 80)]));
        }),
        // Remove one, add one sharing a live backend, add one with a new one.
        Box::new(|d| {
            d.services.remove(&fe(10, 80, Proto::Tcp));
            d.services
                .insert(fe(30, 80, Proto::Tcp), svc("a/s30", vec![be(3, 80)]));
            d.services
                .insert(fe(31, 53, Proto::Udp), svc("a/s31", vec![be(99, 53)]));
        }),
        // Emptied, then given backends again.
        Box::new(|d| {
            d.services
                .insert(fe(12, 80, Proto::Tcp), svc("a/s12", vec![]));
        }),
        Box::new(|d| {
            d.services.insert(
                fe(12, 80, Proto::Tcp),
                svc("a/s12", vec![be(12, 80), be(200, 80)]),
            );
        }),
    ];
    for step in steps {
        let before = d.clone();
        step(&mut d);
        let changed = changed_between(&before, &d);
        let writes = dp.service_map_writes();
        let st = dp.apply_services_changed(&d, &changed).unwrap();
        assert_ne!(st, ApplyStats::default());
        assert_maps_match(dir.path(), &dp, &d);
        // A full apply right after finds nothing left to do.
        let partial_writes = dp.service_map_writes() - writes;
        assert!(
            partial_writes < 12,
            "{partial_writes} writes for {changed:?}"
        );
        assert_eq!(dp.apply_services(&d).unwrap(), ApplyStats::default());
    }
    // Kept backends kept their ids throughout.
    for (k, id) in backend_ids(dir.path()) {
        if let Some(old) = ids1.get(&k) {
            assert_eq!(*old, id);
        }
    }
    // An empty changed set changes nothing.
    let writes = dp.service_map_writes();
    dp.apply_services_changed(&d, &BTreeSet::new()).unwrap();
    assert_eq!(dp.service_map_writes(), writes);
}

/// An apply that fails while planning (here a Service with more backends
/// than a frontend can have slots) writes nothing and reserves nothing: the
/// next apply writes the backends it needs instead of pointing slots at
/// backend ids that were reserved but never written.
#[test]
fn a_failed_plan_leaves_no_unwritten_backend_ids() {
    let dir = BpffsDir::new();
    let mut dp = Datapath::open(dir.path()).unwrap();
    let mut d = LbDesired::default();
    // Planned first (frontends are planned in order): its backends get ids.
    d.services.insert(
        fe(1, 80, Proto::Tcp),
        svc("a/web", vec![be(1, 80), be(2, 80)]),
    );
    let huge: Vec<BackendAddr> = (0..=u16::MAX as u32)
        .map(|i| BackendAddr {
            address: Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 2, 0, 0)) + i),
            port: 80,
        })
        .collect();
    d.services
        .insert(fe(2, 80, Proto::Tcp), svc("a/huge", huge));
    let err = dp.apply_services(&d).unwrap_err();
    assert!(format!("{err:#}").contains("a/huge"), "{err:#}");
    assert!(dump(dir.path()).backends.is_empty(), "nothing written");

    d.services.remove(&fe(2, 80, Proto::Tcp));
    dp.apply_services(&d).unwrap();
    assert_maps_match(dir.path(), &dp, &d);
    assert_eq!(dump(dir.path()).backends.len(), 2);
}
