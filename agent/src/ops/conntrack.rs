//! Conntrack from user space: listing `CT4` for `catena ct list`, and the
//! periodic GC that removes expired entries.
//!
//! `CT4` is an LRU hash, so it never fails a new flow when full, but LRU
//! evicts by *insertion/access order across CPUs*, not by expiry: without a
//! GC, thousands of finished connections push out live long-idle ones. The
//! timeouts follow Cilium's defaults (TCP established 21600 s, TCP closing
//! 10 s, TCP without a reply 60 s, everything else 60 s).
//!
//! Liveness is judged per flow, not per entry: a service flow has a `service` entry
//! (client -> frontend, holding the chosen backend) and an `egress` entry
//! (client -> backend, refreshed by both directions). A `service` entry is
//! kept while its `egress` partner is kept, so a flow whose client is silent
//! (server push) never loses its backend. Every deletion re-reads the entry
//! first, so a flow that woke up since the scan is left alone; egress entries
//! go before their service entries so a packet racing the GC re-creates the
//! egress entry for the *same* backend instead of picking a new one.

use super::bpf::{from_bytes, monotonic_ns, to_bytes, PinnedMap};
use anyhow::Result;
use catena_api::CtEntry;
use catena_common::ct::{
    Ct4Key, Ct4Value, CT_EGRESS, CT_FLAG_CLOSING, CT_FLAG_SEEN_REPLY, CT_INGRESS, CT_SERVICE,
};
use catena_common::lb::{Backend4, RevNat4, HAIRPIN_ADDR};
use catena_common::map_names;
use std::collections::{BTreeMap, HashSet};
use std::net::Ipv4Addr;
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
    /// The timeout of one entry on its own.
    fn of(&self, key: &Ct4Key, value: &Ct4Value) -> Duration {
        if key.proto != catena_common::IPPROTO_TCP {
            self.any
        } else if value.flags & CT_FLAG_CLOSING != 0 {
            self.tcp_closing
        } else if key.kind != CT_SERVICE && value.flags & CT_FLAG_SEEN_REPLY == 0 {
            self.tcp_syn
        } else {
            self.tcp
        }
    }

    /// How long a `service` entry whose flow has no (live) egress entry is
    /// kept: the two entries are created by one packet, but the GC's scan is
    /// not atomic and may see the first without the second.
    fn orphan_grace(&self) -> Duration {
        self.tcp_closing.min(self.any).max(Duration::from_secs(1))
    }
}

fn idle(now_ns: u64, value: &Ct4Value) -> Duration {
    Duration::from_nanos(now_ns.saturating_sub(value.last_seen_ns))
}

/// The egress keys a service entry's flow can have (the client's own
/// address, or the hairpin address when the client is its own backend).
fn partner_keys(key: &Ct4Key, backend: &Backend4) -> [Ct4Key; 2] {
    let mut k = Ct4Key {
        saddr: key.saddr,
        daddr: backend.address,
        sport: key.sport,
        dport: backend.port,
        proto: key.proto,
        kind: CT_EGRESS,
        pad: [0; 2],
    };
    let direct = k;
    k.saddr = HAIRPIN_ADDR;
    [direct, k]
}

/// Which entries of a snapshot are expired at `now_ns` (pure: unit-tested).
pub fn expired(
    entries: &[(Ct4Key, Ct4Value)],
    backends: &BTreeMap<u32, Backend4>,
    timeouts: &CtTimeouts,
    now_ns: u64,
) -> Vec<Ct4Key> {
    let mut doomed = Vec::new();
    let mut live_egress: HashSet<Ct4Key> = HashSet::new();
    for (k, v) in entries.iter().filter(|(k, _)| k.kind != CT_SERVICE) {
        if idle(now_ns, v) >= timeouts.of(k, v) {
            doomed.push(*k);
        } else {
            live_egress.insert(*k);
        }
    }
    for (k, v) in entries.iter().filter(|(k, _)| k.kind == CT_SERVICE) {
        let partner_live = backends
            .get(&v.backend_id)
            .is_some_and(|b| partner_keys(k, b).iter().any(|p| live_egress.contains(p)));
        // A live flow keeps its backend; a flow whose egress side is gone or
        // expired is dead once its own side is idle past the grace.
        if partner_live {
            continue;
        }
        let limit = timeouts.of(k, v).min(timeouts.orphan_grace());
        if idle(now_ns, v) >= limit {
            doomed.push(*k);
        }
    }
    doomed
}

/// Result of one GC run.
#[derive(Clone, Copy, Debug, Default)]
pub struct GcRun {
    pub scanned: usize,
    pub removed: usize,
}

/// One GC pass over the pinned `CT4` under `bpffs`.
pub fn gc(bpffs: &Path, timeouts: &CtTimeouts) -> Result<GcRun> {
    let ct = PinnedMap::open_typed::<Ct4Key, Ct4Value>(bpffs, map_names::CT4)?;
    let backends: BTreeMap<u32, Backend4> =
        PinnedMap::open_typed::<u32, Backend4>(bpffs, map_names::LB4_BACKENDS)?
            .typed::<u32, Backend4>()?
            .into_iter()
            .collect();
    let entries = ct.typed::<Ct4Key, Ct4Value>()?;
    let mut doomed = expired(&entries, &backends, timeouts, monotonic_ns());
    // Egress entries first (see the module docs).
    doomed.sort_by_key(|k| k.kind == CT_SERVICE);
    let mut removed = 0;
    for key in doomed {
        let bytes = to_bytes(&key);
        // Re-read: a packet may have refreshed the entry since the scan.
        let Some(current) = ct.lookup(&bytes)? else {
            continue;
        };
        let current: Ct4Value = from_bytes(&current)?;
        if key.kind != CT_SERVICE && idle(monotonic_ns(), &current) < timeouts.of(&key, &current) {
            continue;
        }
        if key.kind == CT_SERVICE {
            if idle(monotonic_ns(), &current)
                < timeouts.of(&key, &current).min(timeouts.orphan_grace())
            {
                continue;
            }
            // Its egress partner may have been refreshed (and so kept) since
            // the scan: then the flow is live and keeps its backend.
            if let Some(b) = backends.get(&current.backend_id) {
                let mut live = false;
                for p in partner_keys(&key, b) {
                    if let Some(v) = ct.lookup(&to_bytes(&p))? {
                        let v: Ct4Value = from_bytes(&v)?;
                        live |= idle(monotonic_ns(), &v) < timeouts.of(&p, &v);
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
    Ok(GcRun {
        scanned: entries.len(),
        removed,
    })
}

fn addr(a: u32) -> Ipv4Addr {
    Ipv4Addr::from(a.to_ne_bytes())
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

/// Every `CT4` entry, decoded (backend and reverse NAT resolved through the
/// service maps), oldest first.
pub fn list(bpffs: &Path) -> Result<Vec<CtEntry>> {
    let ct = PinnedMap::open_typed::<Ct4Key, Ct4Value>(bpffs, map_names::CT4)?;
    let backends: BTreeMap<u32, Backend4> =
        PinnedMap::open_typed::<u32, Backend4>(bpffs, map_names::LB4_BACKENDS)?
            .typed()?
            .into_iter()
            .collect();
    let revnat: BTreeMap<u16, RevNat4> =
        PinnedMap::open_typed::<u16, RevNat4>(bpffs, map_names::LB4_REVNAT)?
            .typed()?
            .into_iter()
            .collect();
    let now = monotonic_ns();
    let mut entries = ct.typed::<Ct4Key, Ct4Value>()?;
    entries.sort_by_key(|(_, v)| v.created_ns);
    Ok(entries
        .into_iter()
        .map(|(k, v)| {
            let backend = (k.kind == CT_SERVICE).then(|| match backends.get(&v.backend_id) {
                Some(b) => format!("{}:{}", addr(b.address), u16::from_be(b.port)),
                None => format!("#{}", v.backend_id),
            });
            let rev_nat = (k.kind == CT_EGRESS && v.rev_nat_index != 0).then(|| {
                match revnat.get(&v.rev_nat_index) {
                    Some(r) => format!("{}:{}", addr(r.address), u16::from_be(r.port)),
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
            CtEntry {
                kind: kind_name(k.kind),
                proto: super::dump::proto(k.proto),
                src: format!("{}:{}", addr(k.saddr), u16::from_be(k.sport)),
                dst: format!("{}:{}", addr(k.daddr), u16::from_be(k.dport)),
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
        let mut got = expired(&snap, &backends(), &timeouts(), now);
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
        assert!(expired(&snap, &backends(), &t, 21599 * S).is_empty());
        assert_eq!(expired(&snap, &backends(), &t, 21600 * S).len(), 2);
    }
}
