//! Backend selection and refusal through the real programs
//! (BPF_PROG_TEST_RUN): Maglev services pick the backend the agent's table
//! names for the flow's 5-tuple (the same one every time, spread evenly,
//! moving only the removed backend's flows), and a UDP datagram to a
//! service without backends is answered with ICMP port unreachable.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use aya::maps::{HashMap, Map, MapData};
use aya::programs::SchedClassifier;
use catena_common::endpoint::EP_FLAG_ANTI_SPOOF;
use catena_common::maglev::MaglevTable;
use catena_datapath::{BackendAddr, Datapath, Frontend, LbDesired, LbService, Proto};
use common::*;

const PASS: u32 = -1i32 as u32;
const SHOT: u32 = 2;
const REDIRECT: u32 = 7;

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const VIP_MAGLEV: Ipv4Addr = Ipv4Addr::new(10, 96, 1, 10);
const VIP_RANDOM: Ipv4Addr = Ipv4Addr::new(10, 96, 1, 11);
const VIP_EMPTY: Ipv4Addr = Ipv4Addr::new(10, 96, 1, 12);

fn backends(n: u8) -> Vec<BackendAddr> {
    (0..n)
        .map(|i| BackendAddr {
            address: Ipv4Addr::new(10, 0, 1, 5 + i),
            port: 8080,
        })
        .collect()
}

fn fe(address: Ipv4Addr, port: u16, proto: Proto) -> Frontend {
    Frontend {
        address,
        port,
        proto,
    }
}

fn desired(maglev_backends: Vec<BackendAddr>) -> LbDesired {
    let mut d = LbDesired::default();
    for (vip, backends) in [(VIP_MAGLEV, maglev_backends), (VIP_RANDOM, backends(4))] {
        d.services.insert(
            fe(vip, 80, Proto::Tcp),
            LbService {
                name: "default/web".into(),
                backends,
                affinity_timeout: None,
                external_backends: None,
            },
        );
    }
    d.services.insert(
        fe(VIP_EMPTY, 53, Proto::Udp),
        LbService {
            name: "kube-system/dns".into(),
            backends: vec![],
            affinity_timeout: None,
            external_backends: None,
        },
    );
    d.maglev.insert(fe(VIP_MAGLEV, 80, Proto::Tcp));
    d
}

fn setup(maglev_backends: Vec<BackendAddr>) -> (BpffsDir, Datapath, SchedClassifier) {
    let dir = BpffsDir::new();
    let mut dp = Datapath::open(dir.path()).expect("open");
    test_endpoint(&mut dp, CLIENT, 1, 256, EP_FLAG_ANTI_SPOOF);
    dp.apply_services(&desired(maglev_backends)).expect("apply");
    let from = SchedClassifier::from_pin(dp.program_pin("from_container")).unwrap();
    (dir, dp, from)
}

/// The backend a new flow from CLIENT:sport to vip:80 gets. Conntrack is
/// flushed first so the choice is made afresh, not remembered.
fn pick(dp: &mut Datapath, from: &SchedClassifier, vip: Ipv4Addr, sport: u16) -> Ipv4Addr {
    dp.ct_flush().unwrap();
    let (rc, out) = run_prog(from, &Ipv4Packet::tcp(CLIENT, sport, vip, 80).build());
    assert_eq!(rc, PASS);
    parse_and_verify(&out, false).dst
}

fn tables(dir: &BpffsDir) -> Vec<u32> {
    let data = MapData::from_pin(dir.path().join("maps/LB4_MAGLEV")).unwrap();
    let map: HashMap<MapData, u32, MaglevTable> = HashMap::try_from(Map::HashMap(data)).unwrap();
    map.keys().map(|k| k.unwrap()).collect()
}

const FLOWS: u16 = 4000;

#[test]
fn maglev_same_tuple_same_backend_and_even_spread() {
    let (_dir, mut dp, from) = setup(backends(4));
    let mut first = Vec::new();
    let mut tally: BTreeMap<Ipv4Addr, usize> = BTreeMap::new();
    for sport in 20000..20000 + FLOWS {
        let b = pick(&mut dp, &from, VIP_MAGLEV, sport);
        *tally.entry(b).or_default() += 1;
        first.push(b);
    }
    // Deterministic: the table decides, not a random draw (conntrack was
    // flushed before every pick).
    for (i, sport) in (20000..20000 + FLOWS).enumerate().step_by(7) {
        assert_eq!(
            pick(&mut dp, &from, VIP_MAGLEV, sport),
            first[i],
            "sport {sport}"
        );
    }
    // Roughly even: 4000 flows over 4 backends, each within 20% of 1000
    // (the table is exactly even; the tuple hash's spread is what varies).
    eprintln!("maglev spread of {FLOWS} flows over 4 backends: {tally:?}");
    assert_eq!(tally.len(), 4, "{tally:?}");
    for (b, n) in &tally {
        assert!((800..=1200).contains(n), "{b}: {n} of {FLOWS}: {tally:?}");
    }

    // The random service, by contrast, varies for the same tuple.
    let picks: BTreeSet<Ipv4Addr> = (0..40)
        .map(|_| pick(&mut dp, &from, VIP_RANDOM, 30000))
        .collect();
    assert!(picks.len() > 1, "random selection was constant: {picks:?}");
}

#[test]
fn maglev_removing_a_backend_moves_only_its_flows() {
    let (_dir, mut dp, from) = setup(backends(4));
    let before: Vec<Ipv4Addr> = (20000..20000 + FLOWS)
        .map(|s| pick(&mut dp, &from, VIP_MAGLEV, s))
        .collect();
    let removed = Ipv4Addr::new(10, 0, 1, 6);
    let mut rest = backends(4);
    rest.retain(|b| b.address != removed);
    dp.apply_services(&desired(rest)).unwrap();
    let after: Vec<Ipv4Addr> = (20000..20000 + FLOWS)
        .map(|s| pick(&mut dp, &from, VIP_MAGLEV, s))
        .collect();
    let mut kept = 0;
    let mut survivors = 0;
    for (b, a) in before.iter().zip(&after) {
        assert_ne!(*a, removed);
        if *b != removed {
            survivors += 1;
            kept += (a == b) as usize;
        }
    }
    // Random selection would keep ~1/3 of them; Maglev keeps nearly all.
    eprintln!("maglev: {kept} of {survivors} flows on surviving backends kept their backend");
    assert!(
        kept as f64 >= 0.95 * survivors as f64,
        "{kept} of {survivors} kept"
    );
}

#[test]
fn maglev_tables_follow_the_desired_state() {
    let (dir, mut dp, from) = setup(backends(3));
    assert_eq!(tables(&dir).len(), 1, "one table, for the Maglev frontend");
    let writes = dp.maglev_table_writes();
    // An unchanged apply writes no table.
    dp.apply_services(&desired(backends(3))).unwrap();
    assert_eq!(dp.maglev_table_writes(), writes);
    // No backends: no table (the frontend refuses anyway).
    dp.apply_services(&desired(vec![])).unwrap();
    assert!(tables(&dir).is_empty());
    // Back, then off Maglev: the table goes, selection turns random.
    dp.apply_services(&desired(backends(3))).unwrap();
    assert_eq!(tables(&dir).len(), 1);
    let mut d = desired(backends(3));
    d.maglev.clear();
    dp.apply_services(&d).unwrap();
    assert!(tables(&dir).is_empty());
    let picks: BTreeSet<Ipv4Addr> = (0..40)
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
    assert_eq!(tables(&dir).len(), 1);
}

fn folds_to_zero(bytes: &[u8]) -> bool {
    let mut acc: u32 = bytes
        .chunks(2)
        .map(|c| u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32)
        .sum();
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc == 0xffff
}

#[test]
fn udp_to_service_without_backends_gets_icmp_port_unreachable() {
    let (_dir, dp, from) = setup(backends(2));
    let pkt = Ipv4Packet::udp(CLIENT, 50000, VIP_EMPTY, 53).build();
    let (rc, out) = run_prog(&from, &pkt);
    assert_eq!(
        rc, REDIRECT,
        "the ICMP error goes back out of the host veth"
    );
    assert_eq!(out.len(), 14 + 20 + 8 + 28, "Ethernet, IPv4, ICMP, quote");
    assert_eq!(&out[0..6], &pkt[6..12], "to the pod's MAC");
    assert_eq!(&out[6..12], &pkt[0..6]);
    let ip = &out[14..34];
    assert_eq!(ip[0], 0x45);
    assert_eq!(u16::from_be_bytes([ip[2], ip[3]]), 56);
    assert_eq!(ip[9], 1, "ICMP");
    assert!(folds_to_zero(ip), "IPv4 header checksum");
    assert_eq!(&ip[12..16], &VIP_EMPTY.octets(), "from the frontend");
    assert_eq!(&ip[16..20], &CLIENT.octets());
    let icmp = &out[34..];
    assert_eq!((icmp[0], icmp[1]), (3, 3), "destination / port unreachable");
    assert!(folds_to_zero(icmp), "ICMP checksum");
    // The quote is the datagram's own IPv4 header and UDP header, byte for
    // byte: the client's stack matches it to the socket.
    assert_eq!(&icmp[8..36], &pkt[14..42]);

    let c = dp.counters().unwrap();
    assert_eq!(c["reject_no_backend"], 1);
    assert_eq!(c["drop_no_backend"], 0);
    assert_eq!(dp.ct_entries().unwrap(), 0);

    // With IP options the datagram is dropped (the quote would be cut).
    let mut opts = Ipv4Packet::udp(CLIENT, 50001, VIP_EMPTY, 53);
    opts.options = vec![1, 1, 1, 0];
    let (rc, _) = run_prog(&from, &opts.build());
    assert_eq!(rc, SHOT);
}
