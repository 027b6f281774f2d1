//! Runs the real programs on hand-built packets with BPF_PROG_TEST_RUN, with
//! services programmed through `apply_services`.

mod common;

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use aya::programs::SchedClassifier;
use catena_common::ct::{CT_EGRESS, CT_FLAG_CLOSING, CT_FLAG_SEEN_REPLY, CT_SERVICE};
use catena_common::endpoint::EP_FLAG_ANTI_SPOOF;
use catena_datapath::{BackendAddr, Datapath, Frontend, LbDesired, LbService, Proto};
use common::*;

const PASS: u32 = -1i32 as u32; // TC_ACT_UNSPEC: continue / pass
const SHOT: u32 = 2;

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const VIP_TCP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const VIP_UDP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);
const VIP_EMPTY: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 12);
/// A service whose only backend is CLIENT itself (hairpin).
const VIP_SELF: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 13);
const HAIRPIN: Ipv4Addr = Ipv4Addr::new(169, 254, 42, 1);

fn backends(n: u8, port: u16) -> Vec<BackendAddr> {
    (0..n)
        .map(|i| BackendAddr {
            address: Ipv4Addr::new(10, 0, 1, 5 + i),
            port,
        })
        .collect()
}

fn desired() -> LbDesired {
    let mut d = LbDesired::default();
    d.services.insert(
        Frontend {
            address: VIP_TCP,
            port: 80,
            proto: Proto::Tcp,
        },
        LbService {
            name: "default/web".into(),
            backends: backends(2, 8080),
            affinity_timeout: None,
            external_backends: None,
        },
    );
    d.services.insert(
        Frontend {
            address: VIP_UDP,
            port: 53,
            proto: Proto::Udp,
        },
        LbService {
            name: "kube-system/dns".into(),
            backends: backends(1, 5353),
            affinity_timeout: None,
            external_backends: None,
        },
    );
    d.services.insert(
        Frontend {
            address: VIP_SELF,
            port: 80,
            proto: Proto::Tcp,
        },
        LbService {
            name: "default/self".into(),
            backends: vec![BackendAddr {
                address: CLIENT,
                port: 8080,
            }],
            affinity_timeout: None,
            external_backends: None,
        },
    );
    d.services.insert(
        Frontend {
            address: VIP_EMPTY,
            port: 53,
            proto: Proto::Udp,
        },
        LbService {
            name: "default/empty".into(),
            backends: vec![],
            affinity_timeout: None,
            external_backends: None,
        },
    );
    d.services.insert(
        Frontend {
            address: VIP_EMPTY,
            port: 80,
            proto: Proto::Tcp,
        },
        LbService {
            name: "default/empty".into(),
            backends: vec![],
            affinity_timeout: None,
            external_backends: None,
        },
    );
    d
}

struct Progs {
    from: SchedClassifier,
    to: SchedClassifier,
}

fn progs(dp: &Datapath) -> Progs {
    Progs {
        from: SchedClassifier::from_pin(dp.program_pin("from_container")).unwrap(),
        to: SchedClassifier::from_pin(dp.program_pin("to_container")).unwrap(),
    }
}

fn setup() -> (BpffsDir, Datapath, Progs) {
    let dir = BpffsDir::new();
    let mut dp = Datapath::open(dir.path()).expect("open");
    test_endpoint(&mut dp, CLIENT, 1, 256, EP_FLAG_ANTI_SPOOF);
    dp.apply_services(&desired()).expect("apply");
    let p = progs(&dp);
    (dir, dp, p)
}

#[test]
fn tcp_dnat_ct_and_reverse_nat() {
    let (_dir, dp, p) = setup();
    let syn = Ipv4Packet::tcp(CLIENT, 40000, VIP_TCP, 80).build();
    let (rc, out) = run_prog(&p.from, &syn);
    assert_eq!(rc, PASS);
    let got = parse_and_verify(&out, false);
    let allowed: BTreeSet<Ipv4Addr> = backends(2, 8080).iter().map(|b| b.address).collect();
    assert!(
        allowed.contains(&got.dst),
        "dst {} is not a backend",
        got.dst
    );
    assert_eq!(got.dport, 8080);
    assert_eq!((got.src, got.sport), (CLIENT, 40000));
    assert_eq!(out.len(), syn.len());

    // Both CT entries exist.
    let ct = dp.ct_dump().unwrap();
    let svc = ct
        .iter()
        .find(|(k, _)| k.kind == CT_SERVICE && k.daddr == u32::from_ne_bytes(VIP_TCP.octets()))
        .expect("CT_SERVICE entry");
    assert_eq!(svc.0.sport, 40000u16.to_be());
    assert_ne!(svc.1.backend_id, 0);
    let egress = ct
        .iter()
        .find(|(k, _)| k.kind == CT_EGRESS && k.daddr == u32::from_ne_bytes(got.dst.octets()))
        .expect("CT_EGRESS entry");
    assert_eq!(egress.0.dport, 8080u16.to_be());
    let rev = dp
        .services()
        .iter()
        .find(|s| s.frontend.address == VIP_TCP)
        .unwrap()
        .rev_nat_index;
    assert_eq!(egress.1.rev_nat_index, rev);
    assert_eq!(egress.1.packets, 1);

    // Same flow: same backend, every time.
    for _ in 0..8 {
        let (rc, out) = run_prog(&p.from, &syn);
        assert_eq!(rc, PASS);
        assert_eq!(parse_and_verify(&out, false).dst, got.dst);
    }
    // FIN marks the entry closing.
    let mut fin = Ipv4Packet::tcp(CLIENT, 40000, VIP_TCP, 80);
    fin.tcp_flags = 0x11;
    let (_, out) = run_prog(&p.from, &fin.build());
    assert_eq!(parse_and_verify(&out, false).dst, got.dst);

    // Reply through to_container: source back to the VIP:80.
    let reply = Ipv4Packet::tcp(got.dst, 8080, CLIENT, 40000).build();
    let (rc, out) = run_prog(&p.to, &reply);
    assert_eq!(rc, PASS);
    let r = parse_and_verify(&out, false);
    assert_eq!(
        (r.src, r.sport, r.dst, r.dport),
        (VIP_TCP, 80, CLIENT, 40000)
    );

    let ct = dp.ct_dump().unwrap();
    let egress = ct
        .iter()
        .find(|(k, _)| k.kind == CT_EGRESS && k.daddr == u32::from_ne_bytes(got.dst.octets()))
        .unwrap();
    assert_ne!(egress.1.flags & CT_FLAG_SEEN_REPLY, 0);
    assert_ne!(egress.1.flags & CT_FLAG_CLOSING, 0);
    assert_eq!(egress.1.packets, 1 + 8 + 1 + 1);

    let c = dp.counters().unwrap();
    assert_eq!(c["service_dnat"], 10);
    assert_eq!(c["reverse_nat"], 1);
    assert_eq!(c["from_container"], 10);
    assert_eq!(c["to_container"], 1);
}

/// Port reuse: after a Service flow from port P ended, the client opens a
/// connection from the same port straight to the backend. The SYN clears the
/// old flow's reverse translation, so the backend's replies keep their own
/// source (with it, the client would drop the SYN-ACK and time out).
#[test]
fn direct_connection_reusing_a_service_flows_tuple_is_not_reverse_natted() {
    let (_dir, dp, p) = setup();
    let syn = Ipv4Packet::tcp(CLIENT, 40001, VIP_TCP, 80).build();
    let (_, out) = run_prog(&p.from, &syn);
    let backend = parse_and_verify(&out, false).dst;

    let direct = Ipv4Packet::tcp(CLIENT, 40001, backend, 8080).build();
    let (rc, out) = run_prog(&p.from, &direct);
    assert_eq!(rc, PASS);
    assert_eq!(out, direct, "a direct SYN passes untouched");

    let reply = Ipv4Packet::tcp(backend, 8080, CLIENT, 40001).build();
    let (rc, out) = run_prog(&p.to, &reply);
    assert_eq!(rc, PASS);
    let r = parse_and_verify(&out, false);
    assert_eq!((r.src, r.sport), (backend, 8080), "reply keeps its source");
    let egress = dp
        .ct_dump()
        .unwrap()
        .into_iter()
        .find(|(k, _)| k.kind == CT_EGRESS && k.daddr == u32::from_ne_bytes(backend.octets()))
        .unwrap();
    assert_eq!(egress.1.rev_nat_index, 0);
}

#[test]
fn different_flows_spread_over_backends() {
    let (_dir, _dp, p) = setup();
    let mut seen = BTreeSet::new();
    for sport in 41000..41040 {
        let (_, out) = run_prog(
            &p.from,
            &Ipv4Packet::tcp(CLIENT, sport, VIP_TCP, 80).build(),
        );
        seen.insert(parse_and_verify(&out, false).dst);
    }
    // 40 random picks over 2 backends all landing on one: p = 2^-39.
    assert_eq!(seen.len(), 2, "flows were not spread: {seen:?}");
}

#[test]
fn udp_dnat_with_and_without_checksum() {
    let (_dir, _dp, p) = setup();
    let pkt = Ipv4Packet::udp(CLIENT, 50000, VIP_UDP, 53).build();
    let (rc, out) = run_prog(&p.from, &pkt);
    assert_eq!(rc, PASS);
    let got = parse_and_verify(&out, false);
    assert_eq!((got.dst, got.dport), (Ipv4Addr::new(10, 0, 1, 5), 5353));
    assert_ne!(got.l4_csum, 0);

    let mut nocsum = Ipv4Packet::udp(CLIENT, 50001, VIP_UDP, 53);
    nocsum.udp_no_csum = true;
    let (rc, out) = run_prog(&p.from, &nocsum.build());
    assert_eq!(rc, PASS);
    let got = parse_and_verify(&out, true);
    assert_eq!((got.dst, got.dport), (Ipv4Addr::new(10, 0, 1, 5), 5353));
    assert_eq!(got.l4_csum, 0, "a UDP checksum of 0 must stay 0");

    let reply = Ipv4Packet::udp(Ipv4Addr::new(10, 0, 1, 5), 5353, CLIENT, 50000).build();
    let (_, out) = run_prog(&p.to, &reply);
    let r = parse_and_verify(&out, false);
    assert_eq!((r.src, r.sport), (VIP_UDP, 53));
}

#[test]
fn ip_options_are_honoured() {
    let (_dir, _dp, p) = setup();
    let mut pkt = Ipv4Packet::tcp(CLIENT, 42000, VIP_TCP, 80);
    pkt.options = vec![1, 1, 1, 0]; // NOP NOP NOP EOL
    let (rc, out) = run_prog(&p.from, &pkt.build());
    assert_eq!(rc, PASS);
    let got = parse_and_verify(&out, false);
    assert_eq!(got.dport, 8080);
    assert_eq!(got.sport, 42000);
}

#[test]
fn untouched_traffic_is_byte_identical() {
    let (_dir, dp, p) = setup();
    let mut frag = Ipv4Packet::udp(CLIENT, 50000, VIP_UDP, 53);
    frag.frag_off = 0x0010; // non-first fragment
    let cases = [
        ("arp", arp_request()),
        (
            "non-service tcp",
            Ipv4Packet::tcp(CLIENT, 40000, Ipv4Addr::new(10, 0, 2, 2), 80).build(),
        ),
        (
            "service ip, other port",
            Ipv4Packet::tcp(CLIENT, 40000, VIP_TCP, 81).build(),
        ),
        (
            "service port, other proto",
            Ipv4Packet::udp(CLIENT, 40000, VIP_TCP, 80).build(),
        ),
        ("non-first fragment", frag.build()),
    ];
    for (what, pkt) in &cases {
        for prog in [&p.from, &p.to] {
            let (rc, out) = run_prog(prog, pkt);
            assert_eq!(rc, PASS, "{what}");
            assert_eq!(&out, pkt, "{what} was modified");
        }
    }
    assert_eq!(dp.counters().unwrap()["service_dnat"], 0);
    assert_eq!(dp.ct_entries().unwrap(), 0);
}

const REDIRECT: u32 = 7; // TC_ACT_REDIRECT

#[test]
fn syn_to_service_without_backends_is_answered_with_rst() {
    let (_dir, dp, p) = setup();
    // A SYN as a real stack sends it: IP options and TCP data (Fast Open) make
    // the RST's length and ack differ from a naive in-place flag flip.
    let mut syn = Ipv4Packet::tcp(CLIENT, 40000, VIP_EMPTY, 80);
    syn.options = vec![1, 1, 1, 0];
    let syn = syn.build();
    let (rc, out) = run_prog(&p.from, &syn);
    assert_eq!(rc, REDIRECT, "the RST goes back out of the host veth");
    assert_eq!(
        out.len(),
        14 + 20 + 20,
        "Ethernet + IPv4 + TCP, nothing else"
    );
    // MACs swapped: back to the pod that sent the SYN.
    assert_eq!(&out[0..6], &syn[6..12]);
    assert_eq!(&out[6..12], &syn[0..6]);
    let ip = &out[14..34];
    assert_eq!(ip[0], 0x45);
    assert_eq!(u16::from_be_bytes([ip[2], ip[3]]), 40);
    assert_eq!(ip[9], 6);
    assert!(ip[8] > 0, "TTL");
    // parse_and_verify checks the IPv4 and TCP checksums.
    let got = parse_and_verify(&out, false);
    assert_eq!(
        (got.src, got.sport, got.dst, got.dport),
        (VIP_EMPTY, 80, CLIENT, 40000)
    );
    let tcp = &out[34..54];
    assert_eq!(u32::from_be_bytes(tcp[4..8].try_into().unwrap()), 0, "seq");
    // The builder's SYN: seq 1000 and 12 bytes of data; SYN counts one.
    assert_eq!(
        u32::from_be_bytes(tcp[8..12].try_into().unwrap()),
        1000 + 12 + 1,
        "ack = seq + data + 1"
    );
    assert_eq!(tcp[12] >> 4, 5, "data offset");
    assert_eq!(tcp[13], 0x14, "RST|ACK");

    let c = dp.counters().unwrap();
    assert_eq!(c["reject_no_backend"], 1);
    assert_eq!(c["drop_no_backend"], 0);
    assert_eq!(c["service_dnat"], 0);
    assert_eq!(dp.ct_entries().unwrap(), 0);
}

/// UDP is refused with ICMP (lb_select_test_run.rs); these carry no
/// question a refusal could answer.
#[test]
fn non_syn_to_service_without_backends_is_dropped() {
    let (_dir, dp, p) = setup();
    let mut ack = Ipv4Packet::tcp(CLIENT, 40000, VIP_EMPTY, 80);
    ack.tcp_flags = 0x10;
    let mut rst = Ipv4Packet::tcp(CLIENT, 40000, VIP_EMPTY, 80);
    rst.tcp_flags = 0x04;
    let mut synack = Ipv4Packet::tcp(CLIENT, 40000, VIP_EMPTY, 80);
    synack.tcp_flags = 0x12;
    for (what, pkt) in [("ack", ack), ("rst", rst), ("syn-ack", synack)] {
        let (rc, _) = run_prog(&p.from, &pkt.build());
        assert_eq!(rc, SHOT, "{what}");
    }
    let c = dp.counters().unwrap();
    assert_eq!(c["drop_no_backend"], 3);
    assert_eq!(c["reject_no_backend"], 0);
    assert_eq!(dp.ct_entries().unwrap(), 0);
}

#[test]
fn flow_moves_when_its_backend_is_removed() {
    let (_dir, mut dp, p) = setup();
    let (_, out) = run_prog(
        &p.from,
        &Ipv4Packet::tcp(CLIENT, 43000, VIP_TCP, 80).build(),
    );
    let first = parse_and_verify(&out, false).dst;
    // Keep only the other backend.
    let mut d = desired();
    let fe = Frontend {
        address: VIP_TCP,
        port: 80,
        proto: Proto::Tcp,
    };
    d.services
        .get_mut(&fe)
        .unwrap()
        .backends
        .retain(|b| b.address != first);
    dp.apply_services(&d).unwrap();
    let (_, out) = run_prog(
        &p.from,
        &Ipv4Packet::tcp(CLIENT, 43000, VIP_TCP, 80).build(),
    );
    let second = parse_and_verify(&out, false).dst;
    assert_ne!(first, second);
}

#[test]
fn hairpin_pod_reaching_itself_through_its_service() {
    let (_dir, dp, p) = setup();
    let syn = Ipv4Packet::tcp(CLIENT, 40000, VIP_SELF, 80).build();
    let (rc, out) = run_prog(&p.from, &syn);
    assert_eq!(rc, REDIRECT, "straight back to the pod");
    // MACs swapped: the pod's own interface must accept it.
    assert_eq!(&out[0..6], &syn[6..12]);
    assert_eq!(&out[6..12], &syn[0..6]);
    let got = parse_and_verify(&out, false);
    assert_eq!(
        (got.src, got.sport, got.dst, got.dport),
        (HAIRPIN, 40000, CLIENT, 8080)
    );
    assert_eq!(out.len(), syn.len());

    // The pod answers the hairpin address; the reply comes in through
    // from_container again and leaves towards the pod as VIP -> client.
    let reply = Ipv4Packet::tcp(CLIENT, 8080, HAIRPIN, 40000).build();
    let (rc, out) = run_prog(&p.from, &reply);
    assert_eq!(rc, REDIRECT);
    assert_eq!(&out[0..6], &reply[6..12]);
    let r = parse_and_verify(&out, false);
    assert_eq!(
        (r.src, r.sport, r.dst, r.dport),
        (VIP_SELF, 80, CLIENT, 40000)
    );
    // Traffic to the hairpin address that belongs to no flow is not ours.
    let mut udp = Ipv4Packet::udp(CLIENT, 40001, HAIRPIN, 9);
    udp.udp_no_csum = true;
    let (rc, out) = run_prog(&p.from, &udp.build());
    assert_eq!(rc, PASS, "no conntrack entry: not ours");
    assert_eq!(out, udp.build());

    let ct = dp.ct_dump().unwrap();
    let egress = ct
        .iter()
        .find(|(k, _)| k.kind == CT_EGRESS && k.saddr == u32::from_ne_bytes(HAIRPIN.octets()))
        .expect("hairpin CT_EGRESS entry");
    assert_ne!(egress.1.flags & CT_FLAG_SEEN_REPLY, 0);
    let c = dp.counters().unwrap();
    assert_eq!((c["service_dnat"], c["reverse_nat"]), (1, 1));

    // A reply to the hairpin address without a flow is left alone.
    let stray = Ipv4Packet::tcp(CLIENT, 8080, HAIRPIN, 40999).build();
    let (rc, out) = run_prog(&p.from, &stray);
    assert_eq!((rc, out), (PASS, stray));
}
