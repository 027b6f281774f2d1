//! The IPv6 service path of the real programs on hand-built packets
//! (BPF_PROG_TEST_RUN), with IPv6 frontends programmed through
//! `apply_services`. Every translated packet is compared byte for byte with
//! the packet a stack would have sent to (or from) the translated tuple,
//! checksums included, and its checksums are recomputed from scratch.

mod common;

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, Ipv6Addr};

use aya::programs::SchedClassifier;
use catena_common::ct::{CT_EGRESS, CT_FLAG_SEEN_REPLY, CT_SERVICE};
use catena_common::endpoint::EP_FLAG_ANTI_SPOOF;
use catena_common::lb6::addr6_from_octets;
use catena_datapath::policy::{EndpointPolicy, PolicyDesired};
use catena_datapath::{BackendAddr6, Datapath, Frontend6, LbDesired, LbService6, Proto};
use common::*;

const PASS: u32 = -1i32 as u32;
const SHOT: u32 = 2;
const REDIRECT: u32 = 7;

const CLIENT4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const CLIENT: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0, 0, 0, 0, 0, 1);
const VIP_TCP: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x10);
const VIP_UDP: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x11);
const VIP_EMPTY: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x12);
const VIP_SELF: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x13);
const HAIRPIN6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xa9fe, 0x2a01, 0, 0, 0, 0, 1);

fn backend(i: u16) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x10, 0, 1, 0, 0, 0, 5 + i)
}

fn fe(address: Ipv6Addr, port: u16, proto: Proto) -> Frontend6 {
    Frontend6 {
        address,
        port,
        proto,
    }
}

fn svc(name: &str, backends: Vec<(Ipv6Addr, u16)>) -> LbService6 {
    LbService6 {
        name: name.into(),
        backends: backends
            .into_iter()
            .map(|(address, port)| BackendAddr6 { address, port })
            .collect(),
        affinity_timeout: None,
        external_backends: None,
    }
}

fn desired() -> LbDesired {
    let mut d = LbDesired::default();
    let s6 = &mut d.services6;
    s6.insert(
        fe(VIP_TCP, 80, Proto::Tcp),
        svc("default/web", vec![(backend(0), 8080), (backend(1), 8080)]),
    );
    s6.insert(
        fe(VIP_UDP, 53, Proto::Udp),
        svc("kube-system/dns", vec![(backend(0), 5353)]),
    );
    s6.insert(
        fe(VIP_SELF, 80, Proto::Tcp),
        svc("default/self", vec![(CLIENT, 8080)]),
    );
    s6.insert(fe(VIP_EMPTY, 80, Proto::Tcp), svc("default/empty", vec![]));
    s6.insert(fe(VIP_EMPTY, 53, Proto::Udp), svc("default/empty", vec![]));
    d
}

// ---- IPv6 packets ----

fn sum16(data: &[u8], mut acc: u32) -> u32 {
    for chunk in data.chunks(2) {
        let hi = chunk[0];
        let lo = chunk.get(1).copied().unwrap_or(0);
        acc += u16::from_be_bytes([hi, lo]) as u32;
    }
    acc
}

fn fold(mut acc: u32) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

/// An Ethernet frame (MAC_A -> MAC_B) carrying an IPv6 header from `src`
/// to `dst` with `next_header`, `hop_limit` and `l4` as payload.
fn frame6(src: Ipv6Addr, dst: Ipv6Addr, next_header: u8, hop_limit: u8, l4: &[u8]) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&MAC_B);
    p.extend_from_slice(&MAC_A);
    p.extend_from_slice(&0x86ddu16.to_be_bytes());
    p.extend_from_slice(&[0x60, 0, 0, 0]);
    p.extend_from_slice(&(l4.len() as u16).to_be_bytes());
    p.push(next_header);
    p.push(hop_limit);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(l4);
    p
}

/// The L4 checksum over the IPv6 pseudo header (RFC 8200 8.1) and `l4`
/// (with its checksum field zeroed by the caller).
fn l4_csum6(src: Ipv6Addr, dst: Ipv6Addr, next_header: u8, l4: &[u8]) -> u16 {
    let mut acc = sum16(&src.octets(), 0);
    acc = sum16(&dst.octets(), acc);
    acc += l4.len() as u32 + next_header as u32;
    fold(sum16(l4, acc))
}

#[derive(Clone)]
struct Pkt6 {
    src: Ipv6Addr,
    sport: u16,
    dst: Ipv6Addr,
    dport: u16,
    udp: bool,
    tcp_flags: u8,
    payload: Vec<u8>,
}

impl Pkt6 {
    fn tcp(src: Ipv6Addr, sport: u16, dst: Ipv6Addr, dport: u16) -> Pkt6 {
        Pkt6 {
            src,
            sport,
            dst,
            dport,
            udp: false,
            tcp_flags: 0x02,
            payload: b"0123456789ab".to_vec(),
        }
    }
    fn udp(src: Ipv6Addr, sport: u16, dst: Ipv6Addr, dport: u16) -> Pkt6 {
        Pkt6 {
            udp: true,
            ..Pkt6::tcp(src, sport, dst, dport)
        }
    }
    /// The same packet with another tuple (what a translation must yield).
    fn with(&self, src: Ipv6Addr, sport: u16, dst: Ipv6Addr, dport: u16) -> Pkt6 {
        Pkt6 {
            src,
            sport,
            dst,
            dport,
            ..self.clone()
        }
    }

    fn build(&self) -> Vec<u8> {
        let mut l4 = Vec::new();
        l4.extend_from_slice(&self.sport.to_be_bytes());
        l4.extend_from_slice(&self.dport.to_be_bytes());
        if self.udp {
            l4.extend_from_slice(&((8 + self.payload.len()) as u16).to_be_bytes());
            l4.extend_from_slice(&[0, 0]);
        } else {
            l4.extend_from_slice(&1000u32.to_be_bytes()); // seq
            l4.extend_from_slice(&0u32.to_be_bytes()); // ack
            l4.push(5 << 4);
            l4.push(self.tcp_flags);
            l4.extend_from_slice(&64240u16.to_be_bytes());
            l4.extend_from_slice(&[0, 0, 0, 0]); // csum, urg
        }
        l4.extend_from_slice(&self.payload);
        let nh = if self.udp { 17 } else { 6 };
        let csum = l4_csum6(self.src, self.dst, nh, &l4);
        let off = if self.udp { 6 } else { 16 };
        l4[off..off + 2].copy_from_slice(&csum.to_be_bytes());
        frame6(self.src, self.dst, nh, 64, &l4)
    }
}

struct Parsed6 {
    src: Ipv6Addr,
    sport: u16,
    dst: Ipv6Addr,
    dport: u16,
}

/// Reads the tuple and checks the IPv6 payload length and the L4 checksum.
fn parse_and_verify6(p: &[u8]) -> Parsed6 {
    assert_eq!(u16::from_be_bytes([p[12], p[13]]), 0x86dd, "ethertype");
    assert_eq!(p[14] >> 4, 6, "version");
    let plen = u16::from_be_bytes([p[18], p[19]]) as usize;
    assert_eq!(p.len(), 14 + 40 + plen, "payload length");
    let nh = p[20];
    let src = Ipv6Addr::from(<[u8; 16]>::try_from(&p[22..38]).unwrap());
    let dst = Ipv6Addr::from(<[u8; 16]>::try_from(&p[38..54]).unwrap());
    let l4 = &p[54..];
    let mut zeroed = l4.to_vec();
    let off = match nh {
        6 => 16,
        17 => 6,
        58 => 2,
        other => panic!("next header {other}"),
    };
    zeroed[off..off + 2].copy_from_slice(&[0, 0]);
    let want = l4_csum6(src, dst, nh, &zeroed);
    let got = u16::from_be_bytes([l4[off], l4[off + 1]]);
    assert_eq!(got, want, "L4 checksum");
    Parsed6 {
        src,
        sport: u16::from_be_bytes([l4[0], l4[1]]),
        dst,
        dport: u16::from_be_bytes([l4[2], l4[3]]),
    }
}

struct Progs {
    from: SchedClassifier,
    to: SchedClassifier,
}

fn setup() -> (BpffsDir, Datapath, Progs) {
    let dir = BpffsDir::new();
    let mut dp = Datapath::open(dir.path()).expect("open");
    test_endpoint_dual(&mut dp, CLIENT4, CLIENT, 1, 256, EP_FLAG_ANTI_SPOOF);
    dp.apply_services(&desired()).expect("apply");
    let p = Progs {
        from: SchedClassifier::from_pin(dp.program_pin("from_container")).unwrap(),
        to: SchedClassifier::from_pin(dp.program_pin("to_container")).unwrap(),
    };
    (dir, dp, p)
}

fn m(a: Ipv6Addr) -> [u32; 4] {
    addr6_from_octets(&a.octets())
}

#[test]
fn tcp_dnat_conntrack_and_reverse_nat_are_byte_exact() {
    let (_dir, dp, p) = setup();
    let syn = Pkt6::tcp(CLIENT, 40000, VIP_TCP, 80);
    let (rc, out) = run_prog(&p.from, &syn.build());
    assert_eq!(rc, PASS);
    let got = parse_and_verify6(&out);
    assert!(
        [backend(0), backend(1)].contains(&got.dst),
        "dst {} is not a backend",
        got.dst
    );
    assert_eq!(out, syn.with(CLIENT, 40000, got.dst, 8080).build());

    let ct = dp.ct6_dump().unwrap();
    let svc = ct
        .iter()
        .find(|(k, _)| k.kind == CT_SERVICE && k.daddr == m(VIP_TCP))
        .expect("CT_SERVICE entry");
    assert_eq!(svc.0.sport, 40000u16.to_be());
    assert_ne!(svc.1.backend_id, 0);
    let egress = ct
        .iter()
        .find(|(k, _)| k.kind == CT_EGRESS && k.daddr == m(got.dst))
        .expect("CT_EGRESS entry");
    let rev = dp
        .services6()
        .iter()
        .find(|s| s.frontend.address == VIP_TCP)
        .unwrap()
        .rev_nat_index;
    assert_eq!(egress.1.rev_nat_index, rev);

    // The same flow keeps its backend.
    for _ in 0..8 {
        let (_, again) = run_prog(&p.from, &syn.build());
        assert_eq!(again, out);
    }

    // The backend's reply leaves towards the pod from VIP:80.
    let mut reply = Pkt6::tcp(got.dst, 8080, CLIENT, 40000);
    reply.tcp_flags = 0x12;
    let (rc, back) = run_prog(&p.to, &reply.build());
    assert_eq!(rc, PASS);
    parse_and_verify6(&back);
    assert_eq!(back, reply.with(VIP_TCP, 80, CLIENT, 40000).build());
    let ct = dp.ct6_dump().unwrap();
    let egress = ct
        .iter()
        .find(|(k, _)| k.kind == CT_EGRESS && k.daddr == m(got.dst))
        .unwrap();
    assert_ne!(egress.1.flags & CT_FLAG_SEEN_REPLY, 0);
    assert_eq!(egress.1.packets, 1 + 8 + 1);

    let c = dp.counters().unwrap();
    assert_eq!(c["service_dnat"], 9);
    assert_eq!(c["reverse_nat"], 1);
    // IPv4 conntrack is untouched by IPv6 flows.
    assert!(dp.ct_dump().unwrap().is_empty());
}

/// Port reuse over IPv6: a direct SYN from the port a finished Service flow
/// used clears that flow's reverse translation, so the backend's reply
/// keeps its own source.
#[test]
fn direct_connection_reusing_a_service_flows_tuple_is_not_reverse_natted() {
    let (_dir, dp, p) = setup();
    let (_, out) = run_prog(&p.from, &Pkt6::tcp(CLIENT, 40001, VIP_TCP, 80).build());
    let backend = parse_and_verify6(&out).dst;

    let direct = Pkt6::tcp(CLIENT, 40001, backend, 8080).build();
    let (rc, out) = run_prog(&p.from, &direct);
    assert_eq!(rc, PASS);
    assert_eq!(out, direct, "a direct SYN passes untouched");

    let mut reply = Pkt6::tcp(backend, 8080, CLIENT, 40001);
    reply.tcp_flags = 0x12;
    let (rc, back) = run_prog(&p.to, &reply.build());
    assert_eq!(rc, PASS);
    assert_eq!(back, reply.build(), "reply keeps its source");
    let ct = dp.ct6_dump().unwrap();
    let egress = ct
        .iter()
        .find(|(k, _)| k.kind == CT_EGRESS && k.daddr == m(backend))
        .unwrap();
    assert_eq!(egress.1.rev_nat_index, 0);
}

#[test]
fn flows_spread_over_backends() {
    let (_dir, _dp, p) = setup();
    let mut seen = BTreeSet::new();
    for sport in 41000..41040 {
        let (_, out) = run_prog(&p.from, &Pkt6::tcp(CLIENT, sport, VIP_TCP, 80).build());
        seen.insert(parse_and_verify6(&out).dst);
    }
    // 40 random picks over 2 backends all landing on one: p = 2^-39.
    assert_eq!(seen.len(), 2, "flows were not spread: {seen:?}");
}

#[test]
fn udp_dnat_and_reverse_nat_are_byte_exact() {
    let (_dir, _dp, p) = setup();
    let q = Pkt6::udp(CLIENT, 50000, VIP_UDP, 53);
    let (rc, out) = run_prog(&p.from, &q.build());
    assert_eq!(rc, PASS);
    parse_and_verify6(&out);
    assert_eq!(out, q.with(CLIENT, 50000, backend(0), 5353).build());

    let a = Pkt6::udp(backend(0), 5353, CLIENT, 50000);
    let (rc, back) = run_prog(&p.to, &a.build());
    assert_eq!(rc, PASS);
    assert_eq!(back, a.with(VIP_UDP, 53, CLIENT, 50000).build());
}

#[test]
fn hairpin_uses_the_ipv6_hairpin_address_both_ways() {
    let (_dir, _dp, p) = setup();
    let syn = Pkt6::tcp(CLIENT, 40000, VIP_SELF, 80);
    let built = syn.build();
    let (rc, out) = run_prog(&p.from, &built);
    assert_eq!(rc, REDIRECT, "straight back to the pod");
    let mut want = syn.with(HAIRPIN6, 40000, CLIENT, 8080).build();
    want[0..6].copy_from_slice(&built[6..12]);
    want[6..12].copy_from_slice(&built[0..6]);
    assert_eq!(out, want);

    // The pod answers the hairpin address; it leaves towards the pod as
    // VIP:80 -> client.
    let mut reply = Pkt6::tcp(CLIENT, 8080, HAIRPIN6, 40000);
    reply.tcp_flags = 0x12;
    let built = reply.build();
    let (rc, out) = run_prog(&p.from, &built);
    assert_eq!(rc, REDIRECT);
    let mut want = reply.with(VIP_SELF, 80, CLIENT, 40000).build();
    want[0..6].copy_from_slice(&built[6..12]);
    want[6..12].copy_from_slice(&built[0..6]);
    assert_eq!(out, want);
}

#[test]
fn syn_without_backends_gets_a_rst() {
    let (_dir, dp, p) = setup();
    let syn = Pkt6::tcp(CLIENT, 40000, VIP_EMPTY, 80).build();
    let (rc, out) = run_prog(&p.from, &syn);
    assert_eq!(rc, REDIRECT);
    assert_eq!(out.len(), 14 + 40 + 20, "Ethernet + IPv6 + TCP");
    assert_eq!(&out[0..6], &syn[6..12]);
    let got = parse_and_verify6(&out);
    assert_eq!(
        (got.src, got.sport, got.dst, got.dport),
        (VIP_EMPTY, 80, CLIENT, 40000)
    );
    assert_eq!(out[20], 6, "next header");
    assert_eq!(out[21], 64, "hop limit");
    let tcp = &out[54..];
    assert_eq!(u32::from_be_bytes(tcp[4..8].try_into().unwrap()), 0, "seq");
    assert_eq!(
        u32::from_be_bytes(tcp[8..12].try_into().unwrap()),
        1000 + 12 + 1,
        "ack = seq + data + SYN"
    );
    assert_eq!(tcp[13], 0x14, "RST|ACK");
    assert_eq!(dp.counters().unwrap()["reject_no_backend"], 1);
    assert!(dp.ct6_dump().unwrap().is_empty());

    // Anything but a SYN is dropped.
    let mut ack = Pkt6::tcp(CLIENT, 40000, VIP_EMPTY, 80);
    ack.tcp_flags = 0x10;
    assert_eq!(run_prog(&p.from, &ack.build()).0, SHOT);
    assert_eq!(dp.counters().unwrap()["drop_no_backend"], 1);
}

#[test]
fn udp_without_backends_gets_icmpv6_port_unreachable() {
    let (_dir, dp, p) = setup();
    let q = Pkt6::udp(CLIENT, 50000, VIP_EMPTY, 53).build();
    let (rc, out) = run_prog(&p.from, &q);
    assert_eq!(rc, REDIRECT);
    assert_eq!(out.len(), 14 + 40 + 8 + 48, "IPv6 + ICMPv6 + quote");
    assert_eq!(&out[0..6], &q[6..12]);
    let got = parse_and_verify6(&out);
    assert_eq!((got.src, got.dst), (VIP_EMPTY, CLIENT));
    assert_eq!(out[20], 58, "ICMPv6");
    assert_eq!((out[54], out[55]), (1, 4), "destination / port unreachable");
    assert_eq!(&out[62..110], &q[14..62], "quotes the IPv6 and UDP headers");
    assert_eq!(dp.counters().unwrap()["reject_no_backend"], 1);
}

#[test]
fn other_ipv6_traffic_is_byte_identical() {
    let (_dir, dp, p) = setup();
    let mut nd = Pkt6::udp(CLIENT, 1, VIP_TCP, 1).build();
    nd[20] = 58; // ICMPv6 (type byte 0x00 from the port: not ND, not TCP/UDP)
    let cases = [
        (
            "non-service tcp",
            Pkt6::tcp(CLIENT, 40000, backend(3), 80).build(),
        ),
        (
            "service ip, other port",
            Pkt6::tcp(CLIENT, 40000, VIP_TCP, 81).build(),
        ),
        (
            "service port, other proto",
            Pkt6::udp(CLIENT, 40000, VIP_TCP, 80).build(),
        ),
        ("icmpv6", nd),
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

/// An ICMPv6 message of type `ty` from `src` (neighbour solicitation: 135,
/// router solicitation: 133, echo request: 128), target `dst`.
fn icmp6(src: Ipv6Addr, dst: Ipv6Addr, ty: u8) -> Vec<u8> {
    let mut l4 = vec![ty, 0, 0, 0, 0, 0, 0, 0];
    l4.extend_from_slice(&dst.octets());
    let csum = l4_csum6(src, dst, 58, &l4);
    l4[2..4].copy_from_slice(&csum.to_be_bytes());
    frame6(src, dst, 58, 255, &l4)
}

#[test]
fn ipv6_anti_spoofing_drops_foreign_sources_and_keeps_nd() {
    let (_dir, mut dp, p) = setup();
    let other = Ipv6Addr::new(0xfd00, 0x10, 0, 0, 0, 0, 0, 0x99);
    let link_local = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0x42);
    let solicited = "ff02::1:ff00:1".parse::<Ipv6Addr>().unwrap();
    let passes = [
        (
            "own address, not a service",
            Pkt6::tcp(CLIENT, 40000, backend(3), 80).build(),
        ),
        ("own address, echo", icmp6(CLIENT, backend(3), 128)),
        (
            "own address, neighbour solicitation",
            icmp6(CLIENT, solicited, 135),
        ),
        (
            "link-local neighbour solicitation",
            icmp6(link_local, solicited, 135),
        ),
        (
            "link-local router solicitation",
            icmp6(link_local, "ff02::2".parse().unwrap(), 133),
        ),
        (
            "duplicate address detection from ::",
            icmp6(Ipv6Addr::UNSPECIFIED, solicited, 135),
        ),
    ];
    for (what, pkt) in &passes {
        let (rc, out) = run_prog(&p.from, pkt);
        assert_eq!(rc, PASS, "{what}");
        assert_eq!(&out, pkt, "{what} was modified");
    }
    let drops = [
        (
            "foreign source to a service",
            Pkt6::tcp(other, 40000, VIP_TCP, 80).build(),
        ),
        (
            "foreign source, not a service",
            Pkt6::udp(other, 40000, backend(3), 53).build(),
        ),
        (
            "foreign source, neighbour solicitation",
            icmp6(other, solicited, 135),
        ),
        // Link-local is fe80::/10 only.
        (
            "fec0::/10 is not link-local",
            icmp6("fec0::1".parse().unwrap(), solicited, 135),
        ),
    ];
    for (what, pkt) in &drops {
        assert_eq!(run_prog(&p.from, pkt).0, SHOT, "{what}");
    }
    let c = dp.counters().unwrap();
    assert_eq!(c["drop_spoofed_source"], drops.len() as u64);
    assert_eq!(c["service_dnat"], 0, "a spoofed SYN is never translated");
    assert_eq!(dp.ct_entries().unwrap(), 0);
    // Only what the pod sends is checked: traffic to it from anywhere passes.
    let inbound = Pkt6::tcp(other, 80, CLIENT, 40000).build();
    assert_eq!(run_prog(&p.to, &inbound), (PASS, inbound.clone()));

    // An IPv4-only pod was given no IPv6 address: every global IPv6 source
    // is foreign, link-local and :: still pass (its interface's own ND).
    test_endpoint(&mut dp, CLIENT4, 1, 256, EP_FLAG_ANTI_SPOOF);
    assert_eq!(
        run_prog(&p.from, &Pkt6::tcp(CLIENT, 40001, VIP_TCP, 80).build()).0,
        SHOT
    );
    assert_eq!(
        run_prog(&p.from, &icmp6(link_local, solicited, 135)).0,
        PASS
    );
    assert_eq!(
        run_prog(&p.from, &icmp6(Ipv6Addr::UNSPECIFIED, solicited, 135)).0,
        PASS
    );
    // Without the flag nothing is checked.
    test_endpoint_dual(&mut dp, CLIENT4, CLIENT, 1, 256, 0);
    let (rc, out) = run_prog(&p.from, &Pkt6::tcp(other, 40002, VIP_TCP, 80).build());
    assert_eq!(rc, PASS);
    assert_eq!(
        parse_and_verify6(&out).src,
        other,
        "translated, source kept"
    );
    assert_eq!(
        dp.counters().unwrap()["drop_spoofed_source"],
        drops.len() as u64 + 1
    );
}

#[test]
fn enforced_endpoint_still_drops_ipv6_service_traffic() {
    let (_dir, mut dp, p) = setup();
    let mut pol = PolicyDesired::default();
    pol.endpoints.insert(
        1,
        EndpointPolicy {
            ingress_enforced: false,
            egress_enforced: true,
            rules: vec![],
        },
    );
    dp.apply_policy(&pol).expect("apply_policy");
    let (rc, _) = run_prog(&p.from, &Pkt6::tcp(CLIENT, 40000, VIP_TCP, 80).build());
    assert_eq!(rc, SHOT, "policy is IPv4-only: fail closed");
    assert_eq!(dp.counters().unwrap()["service_dnat"], 0);
}

#[test]
fn ipv6_services_are_diffed_and_removed() {
    let (_dir, mut dp, _p) = setup();
    let before = dp.service_map_writes();
    let stats = dp.apply_services(&desired()).unwrap();
    assert_eq!(stats, Default::default());
    assert_eq!(
        dp.service_map_writes(),
        before,
        "a no-op apply writes nothing"
    );
    let mut d = desired();
    d.services6.remove(&fe(VIP_UDP, 53, Proto::Udp));
    let stats = dp
        .apply_services_changed(&d, &BTreeSet::new())
        .expect("incremental apply finds IPv6 changes itself");
    assert_eq!(stats.services_removed, 1);
    assert_eq!(stats.backends_removed, 1, "backend(0):5353 is unused now");
    assert!(dp.services6().iter().all(|s| s.frontend.address != VIP_UDP));
    // Reopening rebuilds the same IPv6 state from the pins.
    let dir = dp.bpffs_dir().to_path_buf();
    let want = dp.services6();
    drop(dp);
    let mut dp = Datapath::open(&dir).unwrap();
    let got: Vec<_> = dp
        .services6()
        .into_iter()
        .map(|s| (s.frontend, s.backends, s.rev_nat_index))
        .collect();
    let want: Vec<_> = want
        .into_iter()
        .map(|s| (s.frontend, s.backends, s.rev_nat_index))
        .collect();
    assert_eq!(got, want);
    assert_eq!(dp.apply_services(&d).unwrap().services_added, 0);
}
