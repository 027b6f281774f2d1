//! IPv6 `apply_services` diffing against the real (pinned) `LB6_*` maps: the
//! shared load-balancer state over the IPv6 family (`lb_apply.rs` covers
//! IPv4).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv6Addr;
use std::path::Path;

use aya::maps::{HashMap, Map, MapData};
use catena_common::lb::{
    Service4Value, SVC_FLAG_AFFINITY, SVC_FLAG_NO_BACKENDS, SVC_FLAG_TWO_SCOPES,
};
use catena_common::lb6::{addr6_from_octets, Addr6, Backend6, RevNat6, Service6Key};
use catena_datapath::{
    ApplyStats, BackendAddr6, Datapath, Frontend6, LbDesired, LbService6, Proto,
};
use common::BpffsDir;

fn fe(last: u16, port: u16) -> Frontend6 {
    Frontend6 {
        address: Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, last),
        port,
        proto: Proto::Tcp,
    }
}

fn be(last: u16, port: u16) -> BackendAddr6 {
    BackendAddr6 {
        address: Ipv6Addr::new(0xfd00, 0x10, 0, 0, 0, 0, 0, last),
        port,
    }
}

fn svc(name: &str, backends: Vec<BackendAddr6>) -> LbService6 {
    LbService6 {
        name: name.into(),
        backends,
        ..Default::default()
    }
}

fn addr(a: Ipv6Addr) -> Addr6 {
    addr6_from_octets(&a.octets())
}

fn open_map<K: aya::Pod, V: aya::Pod>(dir: &Path, name: &str) -> HashMap<MapData, K, V> {
    let data = MapData::from_pin(dir.join("maps").join(name)).unwrap();
    HashMap::try_from(Map::from_map_data(data).unwrap()).unwrap()
}

type ServiceEntries = BTreeMap<(Addr6, u16, u16, u8, u8), Service4Value>;

struct Dump {
    /// (address, port, slot, proto, scope) -> entry.
    services: ServiceEntries,
    backends: BTreeMap<u32, Backend6>,
    revnat: BTreeMap<u32, RevNat6>,
}

fn dump(dir: &Path) -> Dump {
    let s: HashMap<_, Service6Key, Service4Value> = open_map(dir, "LB6_SERVICES");
    let b: HashMap<_, u32, Backend6> = open_map(dir, "LB6_BACKENDS");
    let r: HashMap<_, u32, RevNat6> = open_map(dir, "LB6_REVNAT");
    Dump {
        services: s
            .iter()
            .map(|e| {
                let (k, v) = e.unwrap();
                ((k.address, k.dport, k.backend_slot, k.proto, k.scope), v)
            })
            .collect(),
        backends: b.iter().map(|e| e.unwrap()).collect(),
        revnat: r.iter().map(|e| e.unwrap()).collect(),
    }
}

/// Checks that the IPv6 maps hold exactly `desired.services6` (masters,
/// slots naming backends of the desired addresses, rev-NAT entries) and
/// nothing else, and that the listing agrees.
fn assert_maps_match(dir: &Path, dp: &Datapath, desired: &LbDesired) {
    let d = dump(dir);
    let programmed: BTreeMap<Frontend6, _> = dp
        .services6()
        .into_iter()
        .map(|p| (p.frontend, p))
        .collect();
    assert_eq!(programmed.len(), desired.services6.len());
    let (mut keys, mut backends, mut revnat) = (BTreeSet::new(), BTreeSet::new(), BTreeSet::new());
    for (f, s) in &desired.services6 {
        let (a, port, proto) = (addr(f.address), f.port.to_be(), f.proto.number());
        let master = d.services[&(a, port, 0, proto, 0)];
        assert_eq!(master.count as usize, s.backends.len());
        assert_eq!(
            master.flags & SVC_FLAG_NO_BACKENDS != 0,
            s.backends.is_empty()
        );
        assert_eq!(
            master.flags & SVC_FLAG_AFFINITY != 0,
            s.affinity_timeout.is_some()
        );
        assert_eq!(programmed[f].rev_nat_index, master.rev_nat_index);
        assert_eq!(programmed[f].backends, s.backends);
        assert_eq!(programmed[f].name, s.name);
        let rn = d.revnat[&master.rev_nat_index];
        assert_eq!((rn.address, rn.port), (a, port));
        revnat.insert(master.rev_nat_index);
        keys.insert((a, port, 0, proto, 0));
        for (i, b) in s.backends.iter().enumerate() {
            let slot = d.services[&(a, port, i as u16 + 1, proto, 0)];
            let backend = d.backends[&slot.backend_id];
            assert_eq!(
                (backend.address, backend.port, backend.proto),
                (addr(b.address), b.port.to_be(), proto)
            );
            backends.insert(slot.backend_id);
            keys.insert((a, port, i as u16 + 1, proto, 0));
        }
    }
    assert_eq!(d.services.keys().copied().collect::<BTreeSet<_>>(), keys);
    assert_eq!(
        d.backends.keys().copied().collect::<BTreeSet<_>>(),
        backends
    );
    assert_eq!(d.revnat.keys().copied().collect::<BTreeSet<_>>(), revnat);
}

fn backend_ids(dir: &Path) -> BTreeMap<(Addr6, u16), u32> {
    dump(dir)
        .backends
        .iter()
        .map(|(id, b)| ((b.address, b.port), *id))
        .collect()
}

/// One edit of a desired state.
type Step = Box<dyn Fn(&mut LbDesired)>;

/// IPv6 frontends are diffed by the datapath itself on a partial apply (the
/// caller names IPv4 frontends only): every edit leaves the maps as a full
/// apply would, with few writes, kept backend ids, and a full apply after it
/// finds nothing to do; a restarted datapath rewrites nothing.
#[test]
fn partial_applies_match_full_applies_and_survive_reopen() {
    let dir = BpffsDir::new();
    let mut dp = Datapath::open(dir.path()).unwrap();
    let mut d = LbDesired::default();
    for i in 0..10u16 {
        d.services6.insert(
            fe(i, 80),
            svc(&format!("a/s{i}"), vec![be(i, 80), be(i + 1, 80)]),
        );
    }
    dp.apply_services_changed(&d, &BTreeSet::new()).unwrap();
    assert_maps_match(dir.path(), &dp, &d);
    let ids1 = backend_ids(dir.path());

    let steps: Vec<Step> = vec![
        // A backend its neighbour still names is dropped, then by both.
        Box::new(|d| {
            d.services6.insert(fe(5, 80), svc("a/s5", vec![be(5, 80)]));
        }),
        Box::new(|d| {
            d.services6.insert(fe(6, 80), svc("a/s6", vec![be(7, 80)]));
        }),
        // Remove one, add one sharing a live backend, one with a new one.
        Box::new(|d| {
            d.services6.remove(&fe(3, 80));
            d.services6
                .insert(fe(30, 80), svc("a/s30", vec![be(2, 80)]));
            d.services6
                .insert(fe(31, 443), svc("a/s31", vec![be(99, 443)]));
        }),
        // Emptied; affinity on; renamed only.
        Box::new(|d| {
            d.services6.insert(fe(8, 80), svc("a/s8", vec![]));
        }),
        Box::new(|d| {
            d.services6.get_mut(&fe(9, 80)).unwrap().affinity_timeout = Some(60);
        }),
        Box::new(|d| {
            d.services6.get_mut(&fe(1, 80)).unwrap().name = "a/renamed".into();
        }),
    ];
    for step in steps {
        step(&mut d);
        let writes = dp.service_map_writes();
        let st = dp.apply_services_changed(&d, &BTreeSet::new()).unwrap();
        assert_maps_match(dir.path(), &dp, &d);
        let partial_writes = dp.service_map_writes() - writes;
        assert!(partial_writes < 12, "{partial_writes} writes for {st:?}");
        assert_eq!(dp.apply_services(&d).unwrap(), ApplyStats::default());
    }
    let master = dump(dir.path()).services[&(addr(fe(9, 80).address), 80u16.to_be(), 0, 6, 0)];
    assert_eq!(master.backend_id, 60, "affinity timeout in the master");
    for (k, id) in backend_ids(dir.path()) {
        if let Some(old) = ids1.get(&k) {
            assert_eq!(*old, id, "a kept backend changed id");
        }
    }

    let before = dp.services6();
    drop(dp);
    let mut dp = Datapath::open(dir.path()).unwrap();
    let after = dp.services6();
    let strip = |v: Vec<catena_datapath::ProgrammedService6>| {
        v.into_iter()
            .map(|p| (p.frontend, p.backends, p.rev_nat_index, p.affinity_timeout))
            .collect::<Vec<_>>()
    };
    assert_eq!(strip(before), strip(after));
    let writes = dp.service_map_writes();
    dp.apply_services(&d).unwrap();
    assert_eq!(
        dp.service_map_writes(),
        writes,
        "reopen rewrote unchanged state"
    );

    dp.apply_services(&LbDesired::default()).unwrap();
    let left = dump(dir.path());
    assert!(left.services.is_empty() && left.backends.is_empty() && left.revnat.is_empty());
}

/// Entries another writer left (a slot beyond the count, a master claiming
/// two scopes over a malformed external master, an external slot beyond its
/// count, orphan backends and rev-NAT entries) are repaired or deleted after
/// a reopen.
#[test]
fn reopen_repairs_and_cleans_stray_entries() {
    let dir = BpffsDir::new();
    let mut dp = Datapath::open(dir.path()).unwrap();
    let mut d = LbDesired::default();
    d.services6
        .insert(fe(20, 80), svc("b/web", vec![be(1, 80), be(2, 80)]));
    dp.apply_services(&d).unwrap();
    drop(dp);

    let mut s: HashMap<_, Service6Key, Service4Value> = open_map(dir.path(), "LB6_SERVICES");
    let key = |slot, scope| Service6Key {
        address: addr(fe(20, 80).address),
        dport: 80u16.to_be(),
        backend_slot: slot,
        proto: 6,
        scope,
        pad: [0; 2],
    };
    let mut master = s.get(&key(0, 0), 0).unwrap();
    master.flags |= SVC_FLAG_TWO_SCOPES;
    s.insert(key(0, 0), master, 0).unwrap();
    for k in [key(7, 0), key(0, 1), key(1, 1)] {
        let v = Service4Value {
            backend_id: 999,
            ..Default::default()
        };
        s.insert(k, v, 0).unwrap();
    }
    let mut b: HashMap<_, u32, Backend6> = open_map(dir.path(), "LB6_BACKENDS");
    let orphan = Backend6 {
        address: addr(Ipv6Addr::LOCALHOST),
        port: 1,
        proto: 6,
        flags: 0,
    };
    b.insert(999, orphan, 0).unwrap();
    let mut r: HashMap<_, u32, RevNat6> = open_map(dir.path(), "LB6_REVNAT");
    r.insert(4242, RevNat6::default(), 0).unwrap();

    let mut dp = Datapath::open(dir.path()).unwrap();
    let st = dp.apply_services(&d).unwrap();
    assert_eq!(st.services_updated, 1, "the two-scope master is rewritten");
    assert_maps_match(dir.path(), &dp, &d);
}

/// An apply that fails while planning (a Service with more backends than a
/// frontend has slots) writes nothing and keeps no reserved id: the next
/// apply writes the backends it needs instead of pointing slots at backend
/// ids that were reserved but never written.
#[test]
fn a_failed_plan_leaves_no_unwritten_backend_ids() {
    let dir = BpffsDir::new();
    let mut dp = Datapath::open(dir.path()).unwrap();
    let mut d = LbDesired::default();
    // Planned first (frontends are planned in order): its backends get ids.
    d.services6
        .insert(fe(1, 80), svc("a/web", vec![be(1, 80), be(2, 80)]));
    let huge = (0..=u16::MAX as u128)
        .map(|i| BackendAddr6 {
            address: Ipv6Addr::from(0xfd00_0002_u128 << 96 | i),
            port: 80,
        })
        .collect();
    d.services6.insert(fe(2, 80), svc("a/huge", huge));
    let err = dp.apply_services(&d).unwrap_err();
    assert!(format!("{err:#}").contains("a/huge"), "{err:#}");
    assert!(dump(dir.path()).backends.is_empty(), "nothing written");

    d.services6.remove(&fe(2, 80));
    dp.apply_services(&d).unwrap();
    assert_maps_match(dir.path(), &dp, &d);
    assert_eq!(dump(dir.path()).backends.len(), 2);
}
