//! Maglev for IPv6 frontends through the real programs (BPF_PROG_TEST_RUN):
//! a pod's new flow to an IPv6 Maglev frontend goes to exactly the backend
//! the agent's `LB6_MAGLEV` table names for the flow's 5-tuple hash
//! (recomputed here independently), the same one every time, and removing a
//! backend moves only that backend's flows. IPv4 and IPv6 tables live in
//! separate maps although their rev-NAT indices coincide.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, Ipv6Addr};

use aya::maps::{HashMap, Map, MapData};
use aya::programs::SchedClassifier;
use catena_common::endpoint::EP_FLAG_ANTI_SPOOF;
use catena_common::lb6::{addr6_from_octets, Backend6};
use catena_common::maglev::{MaglevTable, MAGLEV_TABLE_SIZE};
use catena_datapath::{
    BackendAddr, BackendAddr6, Datapath, Frontend, Frontend6, LbDesired, LbService, LbService6,
    Proto,
};
use common::*;

const PASS: u32 = -1i32 as u32;

const CLIENT4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const CLIENT: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0, 0, 0, 0, 0, 1);
const VIP_MAGLEV: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 1, 0x10);
const VIP_RANDOM: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 1, 0x11);
const VIP4_MAGLEV: Ipv4Addr = Ipv4Addr::new(10, 96, 1, 10);

fn backends(n: u16) -> Vec<BackendAddr6> {
    (0..n)
        .map(|i| BackendAddr6 {
            address: Ipv6Addr::new(0xfd00, 0x10, 0, 1, 0, 0, 0, 5 + i),
            port: 8080,
        })
        .collect()
}

fn fe(address: Ipv6Addr) -> Frontend6 {
    Frontend6 {
        address,
        port: 80,
        proto: Proto::Tcp,
    }
}

fn fe4() -> Frontend {
    Frontend {
        address: VIP4_MAGLEV,
        port: 80,
        proto: Proto::Tcp,
    }
}

/// An IPv6 Maglev frontend, a random one, and an IPv4 Maglev frontend
/// (whose rev-NAT index, from the IPv4 number space, equals the IPv6 one's).
fn desired(maglev_backends: Vec<BackendAddr6>) -> LbDesired {
    let mut d = LbDesired::default();
    for (vip, backends) in [(VIP_MAGLEV, maglev_backends), (VIP_RANDOM, backends(4))] {
        d.services6.insert(
            fe(vip),
            LbService6 {
                name: "default/web".into(),
                backends,
                ..Default::default()
            },
        );
    }
    d.maglev6.insert(fe(VIP_MAGLEV));
    d.services.insert(
        fe4(),
        LbService {
            name: "default/web".into(),
            backends: (0..3)
                .map(|i| BackendAddr {
                    address: Ipv4Addr::new(10, 0, 1, 5 + i),
                    port: 8080,
                })
                .collect(),
            ..Default::default()
        },
    );
    d.maglev.insert(fe4());
    d
}

fn setup(maglev_backends: Vec<BackendAddr6>) -> (BpffsDir, Datapath, SchedClassifier) {
    let dir = BpffsDir::new();
    let mut dp = Datapath::open(dir.path()).expect("open");
    test_endpoint_dual(&mut dp, CLIENT4, CLIENT, 1, 256, EP_FLAG_ANTI_SPOOF);
    dp.apply_services(&desired(maglev_backends)).expect("apply");
    let from = SchedClassifier::from_pin(dp.program_pin("from_container")).unwrap();
    (dir, dp, from)
}

/// A TCP SYN from CLIENT:sport to vip:80 (the programs translate it without
/// checking the L4 checksum, so none is computed).
fn syn(sport: u16, vip: Ipv6Addr) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&MAC_B);
    p.extend_from_slice(&MAC_A);
    p.extend_from_slice(&0x86ddu16.to_be_bytes());
    p.extend_from_slice(&[0x60, 0, 0, 0]);
    p.extend_from_slice(&20u16.to_be_bytes());
    p.push(6);
    p.push(64);
    p.extend_from_slice(&CLIENT.octets());
    p.extend_from_slice(&vip.octets());
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&80u16.to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 5 << 4, 0x02, 0xfa, 0xf0, 0, 0, 0, 0]);
    p
}

/// The backend a new flow from CLIENT:sport to vip:80 gets. Conntrack is
/// flushed first so the choice is made afresh, not remembered.
fn pick(dp: &mut Datapath, from: &SchedClassifier, vip: Ipv6Addr, sport: u16) -> Ipv6Addr {
    dp.ct6_flush().unwrap();
    let (rc, out) = run_prog(from, &syn(sport, vip));
    assert_eq!(rc, PASS);
    assert_eq!(&out[22..38], &CLIENT.octets(), "source kept");
    assert_eq!(u16::from_be_bytes([out[56], out[57]]), 8080, "backend port");
    Ipv6Addr::from(<[u8; 16]>::try_from(&out[38..54]).unwrap())
}

fn pinned<V: aya::Pod>(dir: &BpffsDir, name: &str) -> HashMap<MapData, u32, V> {
    let data = MapData::from_pin(dir.path().join("maps").join(name)).unwrap();
    HashMap::try_from(Map::HashMap(data)).unwrap()
}

fn table_keys(dir: &BpffsDir, name: &str) -> BTreeSet<u32> {
    pinned::<MaglevTable>(dir, name)
        .keys()
        .map(|k| k.unwrap())
        .collect()
}

// Linux's jhash2 (include/linux/jhash.h), written out here independently of
// the program's copy: the test asserts the program indexes the table with it.
fn mix(a: &mut u32, b: &mut u32, c: &mut u32) {
    *a = a.wrapping_sub(*c);
    *a ^= c.rotate_left(4);
    *c = c.wrapping_add(*b);
    *b = b.wrapping_sub(*a);
    *b ^= a.rotate_left(6);
    *a = a.wrapping_add(*c);
    *c = c.wrapping_sub(*b);
    *c ^= b.rotate_left(8);
    *b = b.wrapping_add(*a);
    *a = a.wrapping_sub(*c);
    *a ^= c.rotate_left(16);
    *c = c.wrapping_add(*b);
    *b = b.wrapping_sub(*a);
    *b ^= a.rotate_left(19);
    *a = a.wrapping_add(*c);
    *c = c.wrapping_sub(*b);
    *c ^= b.rotate_left(4);
    *b = b.wrapping_add(*a);
}

fn jhash2(k: &[u32], initval: u32) -> u32 {
    let init = 0xdead_beefu32
        .wrapping_add((k.len() as u32) << 2)
        .wrapping_add(initval);
    let (mut a, mut b, mut c) = (init, init, init);
    let mut k = k;
    while k.len() > 3 {
        a = a.wrapping_add(k[0]);
        b = b.wrapping_add(k[1]);
        c = c.wrapping_add(k[2]);
        mix(&mut a, &mut b, &mut c);
        k = &k[3..];
    }
    // k.len() == 3 here (the tuple is 9 words): add all, then __jhash_final.
    a = a.wrapping_add(k[0]);
    b = b.wrapping_add(k[1]);
    c = c.wrapping_add(k[2]);
    c ^= b;
    c = c.wrapping_sub(b.rotate_left(14));
    a ^= c;
    a = a.wrapping_sub(c.rotate_left(11));
    b ^= a;
    b = b.wrapping_sub(a.rotate_left(25));
    c ^= b;
    c = c.wrapping_sub(b.rotate_left(16));
    a ^= c;
    a = a.wrapping_sub(c.rotate_left(4));
    b ^= a;
    b = b.wrapping_sub(a.rotate_left(14));
    c ^= b;
    c = c.wrapping_sub(b.rotate_left(24));
    c
}

/// The documented IPv6 tuple hash: jhash2 over source address, destination
/// address and the ports word (each as the u32 the packet's bytes load as),
/// seeded with the protocol.
fn tuple_hash6(src: Ipv6Addr, sport: u16, dst: Ipv6Addr, dport: u16) -> u32 {
    let mut words = Vec::with_capacity(9);
    words.extend(addr6_from_octets(&src.octets()));
    words.extend(addr6_from_octets(&dst.octets()));
    let (sport, dport) = (
        u16::from_ne_bytes(sport.to_be_bytes()),
        u16::from_ne_bytes(dport.to_be_bytes()),
    );
    words.push(((sport as u32) << 16) | dport as u32);
    jhash2(&words, 6)
}

fn rev_nat6(dp: &Datapath, vip: Ipv6Addr) -> u32 {
    dp.services6()
        .into_iter()
        .find(|s| s.frontend == fe(vip))
        .expect("programmed")
        .rev_nat_index
}

const FLOWS: u16 = 4000;

#[test]
fn maglev6_picks_the_tables_backend_for_the_flows_hash() {
    let (dir, mut dp, from) = setup(backends(4));
    let rev_nat = rev_nat6(&dp, VIP_MAGLEV);
    let table = pinned::<MaglevTable>(&dir, "LB6_MAGLEV")
        .get(&rev_nat, 0)
        .expect("the Maglev frontend's table");
    let ids: BTreeMap<u32, Ipv6Addr> = pinned::<Backend6>(&dir, "LB6_BACKENDS")
        .iter()
        .map(|e| {
            let (id, b) = e.unwrap();
            let octets: Vec<u8> = b.address.iter().flat_map(|w| w.to_ne_bytes()).collect();
            (id, Ipv6Addr::from(<[u8; 16]>::try_from(octets).unwrap()))
        })
        .collect();

    let mut first = Vec::new();
    let mut tally: BTreeMap<Ipv6Addr, usize> = BTreeMap::new();
    for sport in 20000..20000 + FLOWS {
        let got = pick(&mut dp, &from, VIP_MAGLEV, sport);
        let slot = tuple_hash6(CLIENT, sport, VIP_MAGLEV, 80) as usize % MAGLEV_TABLE_SIZE;
        assert_eq!(
            ids.get(&table.backend_ids[slot]),
            Some(&got),
            "sport {sport}: the table's slot {slot}"
        );
        *tally.entry(got).or_default() += 1;
        first.push(got);
    }
    // Deterministic (conntrack was flushed before every pick).
    for (i, sport) in (20000..20000 + FLOWS).enumerate().step_by(7) {
        assert_eq!(
            pick(&mut dp, &from, VIP_MAGLEV, sport),
            first[i],
            "sport {sport}"
        );
    }
    eprintln!("maglev6 spread of {FLOWS} flows over 4 backends: {tally:?}");
    assert_eq!(tally.len(), 4, "{tally:?}");
    for (b, n) in &tally {
        assert!((800..=1200).contains(n), "{b}: {n} of {FLOWS}: {tally:?}");
    }

    // The random frontend, by contrast, varies for the same tuple.
    let picks: BTreeSet<Ipv6Addr> = (0..40)
        .map(|_| pick(&mut dp, &from, VIP_RANDOM, 30000))
        .collect();
    assert!(picks.len() > 1, "random selection was constant: {picks:?}");
}

#[test]
fn maglev6_removing_a_backend_moves_only_its_flows() {
    let (_dir, mut dp, from) = setup(backends(4));
    let before: Vec<Ipv6Addr> = (20000..20000 + FLOWS)
        .map(|s| pick(&mut dp, &from, VIP_MAGLEV, s))
        .collect();
    let removed = backends(4)[1].address;
    let mut rest = backends(4);
    rest.retain(|b| b.address != removed);
    dp.apply_services(&desired(rest)).unwrap();
    let after: Vec<Ipv6Addr> = (20000..20000 + FLOWS)
        .map(|s| pick(&mut dp, &from, VIP_MAGLEV, s))
        .collect();
    let (mut kept, mut survivors, mut moved) = (0, 0, 0);
    for (b, a) in before.iter().zip(&after) {
        assert_ne!(*a, removed);
        if *b == removed {
            moved += 1;
        } else {
            survivors += 1;
            kept += (a == b) as usize;
        }
    }
    // Random selection would keep ~1/3 of them; Maglev keeps nearly all.
    eprintln!(
        "maglev6: {kept} of {survivors} flows on surviving backends kept their backend \
         ({moved} moved off the removed one)"
    );
    assert!(moved > 0);
    assert!(
        kept as f64 >= 0.95 * survivors as f64,
        "{kept} of {survivors} kept"
    );
}

#[test]
fn maglev6_tables_follow_the_desired_state_apart_from_ipv4() {
    let (dir, mut dp, from) = setup(backends(3));
    // One table per family, under the same index: the IPv4 and IPv6 number
    // spaces overlap, which is why the maps are separate.
    let v6 = table_keys(&dir, "LB6_MAGLEV");
    let v4 = table_keys(&dir, "LB4_MAGLEV");
    assert_eq!(v6, BTreeSet::from([rev_nat6(&dp, VIP_MAGLEV)]));
    assert_eq!(v4.len(), 1);
    assert_eq!(v4, v6, "the indices coincide here");
    let v4_table = pinned::<MaglevTable>(&dir, "LB4_MAGLEV")
        .get(v4.first().unwrap(), 0)
        .unwrap();
    assert!(v4_table.backend_ids.iter().all(|id| *id != 0));

    let writes = dp.maglev_table_writes();
    dp.apply_services(&desired(backends(3))).unwrap();
    assert_eq!(dp.maglev_table_writes(), writes, "unchanged: no write");

    // No backends: no table.
    dp.apply_services(&desired(vec![])).unwrap();
    assert!(table_keys(&dir, "LB6_MAGLEV").is_empty());
    assert_eq!(table_keys(&dir, "LB4_MAGLEV").len(), 1, "IPv4 untouched");

    // Back, then off Maglev: the IPv6 table goes, selection turns random,
    // and the IPv4 table stays.
    dp.apply_services(&desired(backends(3))).unwrap();
    assert_eq!(table_keys(&dir, "LB6_MAGLEV").len(), 1);
    let mut d = desired(backends(3));
    d.maglev6.clear();
    dp.apply_services(&d).unwrap();
    assert!(table_keys(&dir, "LB6_MAGLEV").is_empty());
    assert_eq!(table_keys(&dir, "LB4_MAGLEV").len(), 1);
    let picks: BTreeSet<Ipv6Addr> = (0..40)
        .map(|_| pick(&mut dp, &from, VIP_MAGLEV, 30001))
        .collect();
    assert!(
        picks.len() > 1,
        "still deterministic without a table: {picks:?}"
    );

    // A restarted agent reads the tables back and rewrites nothing.
    dp.apply_services(&desired(backends(3))).unwrap();
    drop(from);
    drop(dp);
    let mut dp = Datapath::open(dir.path()).unwrap();
    dp.apply_services(&desired(backends(3))).unwrap();
    assert_eq!(dp.maglev_table_writes(), 0);
    assert_eq!(table_keys(&dir, "LB6_MAGLEV").len(), 1);
}
