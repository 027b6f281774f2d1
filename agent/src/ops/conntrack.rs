//! Conntrack from user space: listing `CT4` and `CT6` for `catena ct list`,
//! and the periodic GC that removes expired entries from both.
//!
//! `CT4` and `CT6` are LRU hashes, so they never fail a new flow when full,
//! but LRU evicts by *insertion/access order across CPUs*, not by expiry:
//! without a GC, thousands of finished connections push out live long-idle
//! ones. The timeouts follow Cilium's defaults (TCP established 21600 s, TCP
//! closing 10 s, TCP without a reply 60 s, everything else 60 s).
//!
//! Liveness is judged per flow, not per entry: a service flow has a `service` entry
//! (client -> frontend, holding the chosen backend) and an `egress` entry
//! (client -> backend, refreshed by both directions). A `service` entry is
//! kept while its `egress` partner is kept, so a flow whose client is silent
//! (server push) never loses its backend. Every deletion re-reads the entry
//! first, so a flow that woke up since the scan is left alone; egress entries
//! go before their service entries so a packet racing the GC re-creates the
//! egress entry for the *same* backend instead of picking a new one. Both
//! families follow the same rules ([`CtFamily`]); their backends live in
//! `LB4_BACKENDS` and `LB6_BACKENDS`.

use super::bpf::{from_bytes, monotonic_ns, to_bytes, PinnedMap};
use anyhow::Result;
use catena_api::CtEntry;
use catena_common::ct::{
    Ct4Key, Ct4Value, CT_EGRESS, CT_FLAG_CLOSING, CT_FLAG_SEEN_REPLY, CT_INGRESS, CT_SERVICE,
};
use catena_common::ct6::Ct6Key;
use catena_common::lb::{Backend4, RevNat4, HAIRPIN_ADDR};
use catena_common::lb6::{addr6_octets, Backend6, RevNat6, HAIRPIN6_ADDR};
use catena_common::map_names;
use std::collections::{BTreeMap, HashSet};
use std::hash::Hash;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

/// Idle timeouts by connection state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtTimeouts {
    pub tcp: Duration,
    pub tcp_closing: Duration,
    pub tcp_syn: Duration,
    pub any: Duration,
}

impl CtTimeouts {
    /// The timeout of one entry (of protocol `proto` and kind `kind`) on its own.
    fn of(&self, proto: u8, kind: u8, value: &Ct4Value) -> Duration {
        if proto != catena_common::IPPROTO_TCP {
            self.any
        } else if value.flags & CT_FLAG_CLOSING != 0 {
            self.tcp_closing
        } else if kind != CT_SERVICE && value.flags & CT_FLAG_SEEN_REPLY == 0 {
            self.tcp_syn
        } else {
            self.tcp
        }
    }

    fn of_key<F: CtFamily>(&self, key: &F::Key, value: &Ct4Value) -> Duration {
        self.of(F::proto(key), F::kind(key), value)
    }

    /// How long a `service` entry whose flow has no (live) egress entry is
    /// kept: the two entries are created by one packet, but the GC's scan is
    /// not atomic and may see the first without the second.
    fn orphan_grace(&self) -> Duration {
        self.tcp_closing.min(self.any).max(Duration::from_secs(1))
    }
}

/// What the GC and the listing need to know about one address family's
/// conntrack map: its key layout, and the maps its entries refer to. Both
/// families share the value layout (`Ct4Value`).
pub trait CtFamily {
    type Key: Copy + Eq + Hash;
    type Backend: Copy;
    type RevNat: Copy;
    /// `IPv4` or `IPv6` (listings).
    const NAME: &'static str;
    const CT: &'static str;
    const BACKENDS: &'static str;
    const REVNAT: &'static str;
    fn proto(key: &Self::Key) -> u8;
    fn kind(key: &Self::Key) -> u8;
    /// The egress keys a service entry's flow can have (the client's own
    /// address, or the hairpin address when the client is its own backend).
    fn partner_keys(key: &Self::Key, backend: &Self::Backend) -> [Self::Key; 2];
    /// Source and destination of the key as socket addresses.
    fn ends(key: &Self::Key) -> (SocketAddr, SocketAddr);
    fn backend(b: &Self::Backend) -> SocketAddr;
    fn rev_nat(r: &Self::RevNat) -> SocketAddr;
}

/// `CT4`, resolved through `LB4_BACKENDS` and `LB4_REVNAT`.
pub struct V4;
/// `CT6`, resolved through `LB6_BACKENDS` and `LB6_REVNAT`.
pub struct V6;

fn sock4(a: u32, port_be: u16) -> SocketAddr {
    SocketAddr::new(
        IpAddr::V4(Ipv4Addr::from(a.to_ne_bytes())),
        u16::from_be(port_be),
    )
}

fn sock6(a: &[u32; 4], port_be: u16) -> SocketAddr {
    SocketAddr::new(
        IpAddr::V6(Ipv6Addr::from(addr6_octets(a))),
        u16::from_be(port_be),
    )
}

impl CtFamily for V4 {
    type Key = Ct4Key;
    type Backend = Backend4;
    type RevNat = RevNat4;
    const NAME: &'static str = "IPv4";
    const CT: &'static str = map_names::CT4;
    const BACKENDS: &'static str = map_names::LB4_BACKENDS;
    const REVNAT: &'static str = map_names::LB4_REVNAT;
    fn proto(key: &Ct4Key) -> u8 {
        key.proto
    }
    fn kind(key: &Ct4Key) -> u8 {
        key.kind
    }
    fn partner_keys(key: &Ct4Key, backend: &Backend4) -> [Ct4Key; 2] {
        let direct = Ct4Key {
            saddr: key.saddr,
            daddr: backend.address,
            sport: key.sport,
            dport: backend.port,
            proto: key.proto,
            kind: CT_EGRESS,
            pad: [0; 2],
        };
        let hairpin = Ct4Key {
            saddr: HAIRPIN_ADDR,
            ..direct
        };
        [direct, hairpin]
    }
    fn ends(key: &Ct4Key) -> (SocketAddr, SocketAddr) {
        (sock4(key.saddr, key.sport), sock4(key.daddr, key.dport))
    }
    fn backend(b: &Backend4) -> SocketAddr {
        sock4(b.address, b.port)
    }
    fn rev_nat(r: &RevNat4) -> SocketAddr {
        sock4(r.address, r.port)
    }
}

impl CtFamily for V6 {
    type Key = Ct6Key;
    type Backend = Backend6;
    type RevNat = RevNat6;
    const NAME: &'static str = "IPv6";
    const CT: &'static str = map_names::CT6;
    const BACKENDS: &'static str = map_names::LB6_BACKENDS;
    const REVNAT: &'static str = map_names::LB6_REVNAT;
    fn proto(key: &Ct6Key) -> u8 {
        key.proto
    }
    fn kind(key: &Ct6Key) -> u8 {
        key.kind
    }
    fn partner_keys(key: &Ct6Key, backend: &Backend6) -> [Ct6Key; 2] {
        let direct = Ct6Key {
            saddr: key.saddr,
            daddr: backend.address,
            sport: key.sport,
            dport: backend.port,
            proto: key.proto,
            kind: CT_EGRESS,
            pad: [0; 2],
        };
        let hairpin = Ct6Key {
            saddr: HAIRPIN6_ADDR,
            ..direct
        };
        [direct, hairpin]
    }
    fn ends(key: &Ct6Key) -> (SocketAddr, SocketAddr) {
        (sock6(&key.saddr, key.sport), sock6(&key.daddr, key.dport))
    }
    fn backend(b: &Backend6) -> SocketAddr {
        sock6(&b.address, b.port)
    }
    fn rev_nat(r: &RevNat6) -> SocketAddr {
        sock6(&r.address, r.port)
    }
}

fn idle(now_ns: u64, value: &Ct4Value) -> Duration {
    Duration::from_nanos(now_ns.saturating_sub(value.last_seen_ns))
}

/// Which entries of a snapshot are expired at `now_ns` (pure: unit-tested).
pub fn expired<F: CtFamily>(
    entries: &[(F::Key, Ct4Value)],
    backends: &BTreeMap<u32, F::Backend>,
    timeouts: &CtTimeouts,
    now_ns: u64,
) -> Vec<F::Key> {
    let mut doomed = Vec::new();
    let mut live_egress: HashSet<F::Key> = HashSet::new();
    for (k, v) in entries.iter().filter(|(k, _)| F::kind(k) != CT_SERVICE) {
        if idle(now_ns, v) >= timeouts.of_key::<F>(k, v) {
            doomed.push(*k);
        } else {
            live_egress.insert(*k);
        }
    }
    for (k, v) in entries.iter().filter(|(k, _)| F::kind(k) == CT_SERVICE) {
        let partner_live = backends.get(&v.backend_id).is_some_and(|b| {
            F::partner_keys(k, b)
                .iter()
                .any(|p| live_egress.contains(p))
        });
        // A live flow keeps its backend; a flow whose egress side is gone or
        // expired is dead once its own side is idle past the grace.
        if partner_live {
            continue;
        }
        let limit = timeouts.of_key::<F>(k, v).min(timeouts.orphan_grace());
        if idle(now_ns, v) >= limit {
            doomed.push(*k);
        }
    }
    doomed
}

/// Result of one GC pass over one family's map.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FamilyGc {
    pub scanned: usize,
    pub removed: usize,
}

/// Result of one GC run over `CT4` and `CT6`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GcRun {
    pub v4: FamilyGc,
    pub v6: FamilyGc,
}

impl GcRun {
    pub fn scanned(&self) -> usize {
        self.v4.scanned + self.v6.scanned
    }

    pub fn removed(&self) -> usize {
        self.v4.removed + self.v6.removed
    }
}

/// One GC pass over the pinned `CT4` and `CT6` under `bpffs`. A missing
/// `CT6` pin (programs from before IPv6 support still pinned) means there is
/// no IPv6 conntrack to collect; any other failure fails the run.
pub fn gc(bpffs: &Path, timeouts: &CtTimeouts) -> Result<GcRun> {
    let v4 = gc_family::<V4>(bpffs, timeouts)?;
    let v6 = if pinned(bpffs, V6::CT) {
        gc_family::<V6>(bpffs, timeouts)?
    } else {
        FamilyGc::default()
    };
    Ok(GcRun { v4, v6 })
}

fn pinned(bpffs: &Path, map: &str) -> bool {
    bpffs.join("maps").join(map).exists()
}

fn backends_of<F: CtFamily>(bpffs: &Path) -> Result<BTreeMap<u32, F::Backend>> {
    Ok(
        PinnedMap::open_typed::<u32, F::Backend>(bpffs, F::BACKENDS)?
            .typed::<u32, F::Backend>()?
            .into_iter()
            .collect(),
    )
}

/// One GC pass over one family's conntrack map.
pub fn gc_family<F: CtFamily>(bpffs: &Path, timeouts: &CtTimeouts) -> Result<FamilyGc> {
    let ct = PinnedMap::open_typed::<F::Key, Ct4Value>(bpffs, F::CT)?;
    let backends = backends_of::<F>(bpffs)?;
    let entries = ct.typed::<F::Key, Ct4Value>()?;
    let mut doomed = expired::<F>(&entries, &backends, timeouts, monotonic_ns());
    // Egress entries first (see the module docs).
    doomed.sort_by_key(|k| F::kind(k) == CT_SERVICE);
    let mut removed = 0;
    for key in doomed {
        let bytes = to_bytes(&key);
        // Re-read: a packet may have refreshed the entry since the scan.
        let Some(current) = ct.lookup(&bytes)? else {
            continue;
        };
        let current: Ct4Value = from_bytes(&current)?;
        let own_limit = timeouts.of_key::<F>(&key, &current);
        if F::kind(&key) != CT_SERVICE && idle(monotonic_ns(), &current) < own_limit {
            continue;
        }
        if F::kind(&key) == CT_SERVICE {
            if idle(monotonic_ns(), &current) < own_limit.min(timeouts.orphan_grace()) {
                continue;
            }
            // Its egress partner may have been refreshed (and so kept) since
            // the scan: then the flow is live and keeps its backend.
            if let Some(b) = backends.get(&current.backend_id) {
                let mut live = false;
                for p in F::partner_keys(&key, b) {
                    if let Some(v) = ct.lookup(&to_bytes(&p))? {
                        let v: Ct4Value = from_bytes(&v)?;
                        live |= idle(monotonic_ns(), &v) < timeouts.of_key::<F>(&p, &v);
                    }
                }
                if live {
                    continue;
                }
            }
        }
        if ct.delete(&bytes)? {
            removed += 1;
        }
    }
    Ok(FamilyGc {
        scanned: entries.len(),
        removed,
    })
}

/// `service`, `egress` (a connection the pod opened, service or not) or
/// `ingress` (a connection opened to a pod under policy).
pub fn kind_name(kind: u8) -> String {
    match kind {
        CT_SERVICE => "service".into(),
        CT_EGRESS => "egress".into(),
        CT_INGRESS => "ingress".into(),
        other => format!("kind-{other}"),
    }
}

/// Every `CT4` entry, then every `CT6` entry, decoded (backend and reverse
/// NAT resolved through the family's service maps), each family oldest first.
pub fn list(bpffs: &Path) -> Result<Vec<CtEntry>> {
    let mut out = list_family::<V4>(bpffs)?;
    if pinned(bpffs, V6::CT) {
        out.extend(list_family::<V6>(bpffs)?);
    }
    Ok(out)
}

fn list_family<F: CtFamily>(bpffs: &Path) -> Result<Vec<CtEntry>> {
    let ct = PinnedMap::open_typed::<F::Key, Ct4Value>(bpffs, F::CT)?;
    let backends = backends_of::<F>(bpffs)?;
    let revnat: BTreeMap<u32, F::RevNat> =
        PinnedMap::open_typed::<u32, F::RevNat>(bpffs, F::REVNAT)?
            .typed::<u32, F::RevNat>()?
            .into_iter()
            .collect();
    let now = monotonic_ns();
    let mut entries = ct.typed::<F::Key, Ct4Value>()?;
    entries.sort_by_key(|(_, v)| v.created_ns);
    Ok(entries
        .into_iter()
        .map(|(k, v)| {
            let kind = F::kind(&k);
            let backend = (kind == CT_SERVICE).then(|| match backends.get(&v.backend_id) {
                Some(b) => F::backend(b).to_string(),
                None => format!("#{}", v.backend_id),
            });
            let rev_nat = (kind == CT_EGRESS && v.rev_nat_index != 0).then(|| {
                match revnat.get(&v.rev_nat_index) {
                    Some(r) => F::rev_nat(r).to_string(),
                    None => format!("#{}", v.rev_nat_index),
                }
            });
            let mut flags = Vec::new();
            if v.flags & CT_FLAG_SEEN_REPLY != 0 {
                flags.push("seen-reply".to_string());
            }
            if v.flags & CT_FLAG_CLOSING != 0 {
                flags.push("closing".to_string());
            }
            let (src, dst) = F::ends(&k);
            CtEntry {
                family: F::NAME.into(),
                kind: kind_name(kind),
                proto: super::dump::proto(F::proto(&k)),
                src: src.to_string(),
                dst: dst.to_string(),
                backend,
                rev_nat,
                flags,
                age_secs: now.saturating_sub(v.created_ns) / 1_000_000_000,
                idle_secs: now.saturating_sub(v.last_seen_ns) / 1_000_000_000,
                packets: v.packets,
                bytes: v.bytes,
            }
        })
        .collect())
}

/// Deletes every entry of `CT4` and `CT6`: (IPv4, IPv6) entries removed.
pub fn flush(bpffs: &Path) -> Result<(usize, usize)> {
    let v4 = flush_family::<V4>(bpffs)?;
    let v6 = if pinned(bpffs, V6::CT) {
        flush_family::<V6>(bpffs)?
    } else {
        0
    };
    Ok((v4, v6))
}

fn flush_family<F: CtFamily>(bpffs: &Path) -> Result<usize> {
    let ct = PinnedMap::open_typed::<F::Key, Ct4Value>(bpffs, F::CT)?;
    let mut removed = 0;
    for key in ct.keys()? {
        removed += usize::from(ct.delete(&key)?);
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn timeouts() -> CtTimeouts {
        CtTimeouts {
            tcp: Duration::from_secs(21600),
            tcp_closing: Duration::from_secs(10),
            tcp_syn: Duration::from_secs(60),
            any: Duration::from_secs(60),
        }
    }

    fn ip(a: [u8; 4]) -> u32 {
        u32::from_ne_bytes(a)
    }

    /// A flow client:sport -> 10.96.0.10:80 translated to backend 1
    /// (10.244.0.5:8080): (service entry, egress entry).
    fn flow(sport: u16, proto: u8) -> (Ct4Key, Ct4Key) {
        let svc = Ct4Key {
            saddr: ip([10, 244, 0, 2]),
            daddr: ip([10, 96, 0, 10]),
            sport: sport.to_be(),
            dport: 80u16.to_be(),
            proto,
            kind: CT_SERVICE,
            pad: [0; 2],
        };
        let egress = Ct4Key {
            daddr: ip([10, 244, 0, 5]),
            dport: 8080u16.to_be(),
            kind: CT_EGRESS,
            ..svc
        };
        (svc, egress)
    }

    fn value(last_seen_s: u64, flags: u16) -> Ct4Value {
        Ct4Value {
            backend_id: 1,
            flags,
            last_seen_ns: last_seen_s * S,
            ..Default::default()
        }
    }

    fn backends() -> BTreeMap<u32, Backend4> {
        BTreeMap::from([(
            1,
            Backend4 {
                address: ip([10, 244, 0, 5]),
                port: 8080u16.to_be(),
                proto: 6,
                flags: 0,
            },
        )])
    }

    #[test]
    fn expiry_follows_state_and_keeps_flows_whole() {
        let now = 100_000 * S;
        let tcp = catena_common::IPPROTO_TCP;
        let udp = catena_common::IPPROTO_UDP;
        // An established TCP flow idle for an hour: kept.
        let (est_s, est_e) = flow(1000, tcp);
        // A closed TCP flow (FIN seen) idle 11 s: both entries go.
        let (fin_s, fin_e) = flow(1001, tcp);
        // A SYN never answered, 61 s ago: goes.
        let (syn_s, syn_e) = flow(1002, tcp);
        // UDP server push: the client side has been silent for 5 minutes but
        // the egress entry is refreshed by the replies: kept, both entries.
        let (push_s, push_e) = flow(1003, udp);
        // UDP idle 61 s both ways: goes.
        let (old_s, old_e) = flow(1004, udp);
        // A service entry whose egress partner is missing, 2 s old: kept
        // (the scan may have raced the packet creating the partner)...
        let (young_s, _) = flow(1005, tcp);
        // ...and 30 s old: goes.
        let (orphan_s, _) = flow(1006, tcp);
        let snap = vec![
            (est_s, value(100_000 - 3600, 0)),
            (est_e, value(100_000 - 3600, CT_FLAG_SEEN_REPLY)),
            (fin_s, value(100_000 - 11, CT_FLAG_CLOSING)),
            (
                fin_e,
                value(100_000 - 11, CT_FLAG_CLOSING | CT_FLAG_SEEN_REPLY),
            ),
            (syn_s, value(100_000 - 61, 0)),
            (syn_e, value(100_000 - 61, 0)),
            (push_s, value(100_000 - 300, 0)),
            (push_e, value(100_000 - 1, CT_FLAG_SEEN_REPLY)),
            (old_s, value(100_000 - 61, 0)),
            (old_e, value(100_000 - 61, CT_FLAG_SEEN_REPLY)),
            (young_s, value(100_000 - 2, 0)),
            (orphan_s, value(100_000 - 30, 0)),
        ];
        let mut got = expired::<V4>(&snap, &backends(), &timeouts(), now);
        got.sort_by_key(|k| (u16::from_be(k.sport), k.kind));
        let mut want = vec![fin_e, fin_s, syn_e, syn_s, old_e, old_s, orphan_s];
        want.sort_by_key(|k| (u16::from_be(k.sport), k.kind));
        assert_eq!(got, want);
    }

    #[test]
    fn established_tcp_expires_after_its_timeout() {
        let (s, e) = flow(2000, catena_common::IPPROTO_TCP);
        let snap = vec![(s, value(0, 0)), (e, value(0, CT_FLAG_SEEN_REPLY))];
        let t = timeouts();
        assert!(expired::<V4>(&snap, &backends(), &t, 21599 * S).is_empty());
        assert_eq!(expired::<V4>(&snap, &backends(), &t, 21600 * S).len(), 2);
    }

    fn v6(last: u16) -> [u32; 4] {
        let mut o = [0u8; 16];
        o[..4].copy_from_slice(&[0xfd, 0x00, 0x00, 0x96]);
        o[15] = last as u8;
        catena_common::lb6::addr6_from_octets(&o)
    }

    /// IPv6 flows expire by the same rules, and a hairpin flow (the client
    /// is its own backend: egress keyed by the hairpin source) keeps its
    /// service entry while the egress side is live.
    #[test]
    fn ipv6_entries_follow_the_same_rules() {
        let now = 100_000 * S;
        let backend = Backend6 {
            address: v6(5),
            port: 8080u16.to_be(),
            proto: catena_common::IPPROTO_TCP,
            flags: 0,
        };
        let backends = BTreeMap::from([(7, backend)]);
        let flow = |client: [u32; 4], sport: u16| {
            let svc = Ct6Key {
                saddr: client,
                daddr: v6(0x40),
                sport: sport.to_be(),
                dport: 80u16.to_be(),
                proto: catena_common::IPPROTO_TCP,
                kind: CT_SERVICE,
                pad: [0; 2],
            };
            let egress = Ct6Key {
                daddr: backend.address,
                dport: backend.port,
                kind: CT_EGRESS,
                ..svc
            };
            (svc, egress)
        };
        let val = |last_s: u64, flags: u16| Ct4Value {
            backend_id: 7,
            flags,
            last_seen_ns: last_s * S,
            ..Default::default()
        };
        // Established, idle an hour: kept.
        let (est_s, est_e) = flow(v6(2), 1000);
        // Closed 11 s ago: both go.
        let (fin_s, fin_e) = flow(v6(2), 1001);
        // Hairpin: the backend reaching itself; its egress entry is keyed by
        // the hairpin address and was refreshed a second ago, its service
        // entry is 5 minutes idle: both kept.
        let (hp_s, mut hp_e) = flow(backend.address, 1002);
        hp_e.saddr = HAIRPIN6_ADDR;
        let snap = vec![
            (est_s, val(100_000 - 3600, 0)),
            (est_e, val(100_000 - 3600, CT_FLAG_SEEN_REPLY)),
            (fin_s, val(100_000 - 11, CT_FLAG_CLOSING)),
            (
                fin_e,
                val(100_000 - 11, CT_FLAG_CLOSING | CT_FLAG_SEEN_REPLY),
            ),
            (hp_s, val(100_000 - 300, 0)),
            (hp_e, val(100_000 - 1, CT_FLAG_SEEN_REPLY)),
        ];
        let mut got = expired::<V6>(&snap, &backends, &timeouts(), now);
        got.sort_by_key(|k| k.kind);
        assert_eq!(got, vec![fin_e, fin_s]);
        // The listing's address form: `[addr]:port`.
        assert_eq!(V6::ends(&est_s).1.to_string(), "[fd00:96::40]:80");
    }
}
