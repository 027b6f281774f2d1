//! Policy lookups and the per-endpoint connection tracking that lets replies
//! of allowed connections through (layout of the maps: catena_common::policy).

use aya_ebpf::{maps::lpm_trie::Key, programs::TcContext};
use catena_common::{
    ct::{CT_EGRESS, CT_FLAG_SEEN_REPLY, CT_INGRESS},
    endpoint::EndpointInfo,
    events::Reason,
    identity,
    metrics::Counter,
    policy::{
        PolicyKey, DIR_EGRESS, KIND_ALLOW, KIND_DENY, POLICY_EP_EGRESS, POLICY_EP_EGRESS_DENY,
        POLICY_EP_INGRESS, POLICY_EP_INGRESS_DENY, POLICY_PREFIX_FULL, POLICY_PREFIX_PROTO,
    },
};

use crate::{
    ct, events,
    maps::{IPCACHE, POLICY, POLICY_EP},
    metrics::count,
    parse::Flow4,
    VERDICT_PASS,
};

/// The endpoint's `POLICY_EP_*` flags (0: nothing enforced).
#[inline(always)]
pub fn endpoint_flags(endpoint_id: u32) -> u32 {
    POLICY_EP.get(endpoint_id).copied().unwrap_or(0)
}

/// Whether `direction` is enforced under `flags`.
#[inline(always)]
pub fn enforced(flags: u32, direction: u8) -> bool {
    let bit = if direction == DIR_EGRESS {
        POLICY_EP_EGRESS
    } else {
        POLICY_EP_INGRESS
    };
    flags & bit != 0
}

/// Identity of a remote address; `WORLD` when the ipcache has no prefix for it.
#[inline(always)]
pub fn ipcache(addr: u32) -> u32 {
    IPCACHE
        .get(Key::new(32, addr))
        .map_or(identity::WORLD, |v| v.identity)
}

pub struct Decision {
    pub allowed: bool,
    pub rule_ref: u32,
}

/// What is being matched: the remote's identity and the packet's protocol and
/// port (network order; ignored unless `ports_known`).
pub struct Query {
    pub remote: u32,
    pub proto: u8,
    pub port: u16,
    pub ports_known: bool,
}

#[inline(always)]
fn lookup(endpoint_id: u32, direction: u8, kind: u8, identity: u32, q: &Query) -> Option<u32> {
    // Without ports only protocol-level entries (any port) may match: the
    // lookup's own prefix length caps the match there.
    let (prefix, port) = if q.ports_known {
        (POLICY_PREFIX_FULL, q.port)
    } else {
        (POLICY_PREFIX_PROTO, 0)
    };
    let key = Key::new(
        prefix,
        PolicyKey {
            endpoint_id,
            identity,
            direction,
            kind,
            proto: q.proto,
            pad: 0,
            port,
            pad2: 0,
        },
    );
    POLICY.get(key).map(|v| v.rule_ref)
}

/// The verdict of an enforced direction: any matching deny (for the remote's
/// identity or any identity) denies, then any matching allow allows, else the
/// default deny (rule_ref 0).
#[inline(always)]
pub fn decide(endpoint_id: u32, flags: u32, direction: u8, q: &Query) -> Decision {
    let deny_bit = if direction == DIR_EGRESS {
        POLICY_EP_EGRESS_DENY
    } else {
        POLICY_EP_INGRESS_DENY
    };
    if flags & deny_bit != 0 {
        for id in [q.remote, identity::ANY] {
            if let Some(rule_ref) = lookup(endpoint_id, direction, KIND_DENY, id, q) {
                return Decision {
                    allowed: false,
                    rule_ref,
                };
            }
        }
    }
    for id in [q.remote, identity::ANY] {
        if let Some(rule_ref) = lookup(endpoint_id, direction, KIND_ALLOW, id, q) {
            return Decision {
                allowed: true,
                rule_ref,
            };
        }
    }
    Decision {
        allowed: false,
        rule_ref: 0,
    }
}

/// A packet of an endpoint under policy (`flags != 0`) that no service
/// handled: established connections and replies pass on their conntrack
/// entry; a new connection is decided by policy if `direction` is enforced
/// (else allowed) and, if allowed, tracked so its replies pass too.
/// `remote` gives the other end's identity; it is asked only for new
/// connections, so established ones skip the ipcache lookup.
#[inline(always)]
pub fn connection(
    ctx: &TcContext,
    ep: &EndpointInfo,
    flags: u32,
    direction: u8,
    flow: &Flow4,
    remote: impl FnOnce() -> u32,
) -> i32 {
    let (own, other) = if direction == DIR_EGRESS {
        (CT_EGRESS, CT_INGRESS)
    } else {
        (CT_INGRESS, CT_EGRESS)
    };
    let now = ct::now_ns();
    let len = ctx.len();
    let key = ct::tuple_key(flow, own);
    if !flow.fragment {
        if let Some(entry) = ct::lookup(&key) {
            // SAFETY: pointer from a CT4 lookup in this run.
            unsafe { ct::touch(entry, now, len, flow.closing) };
            return VERDICT_PASS;
        }
        if let Some(entry) = ct::lookup(&ct::reversed_key(flow, other)) {
            // SAFETY: as above.
            unsafe {
                ct::touch(entry, now, len, flow.closing);
                (*entry).flags |= CT_FLAG_SEEN_REPLY;
            }
            return VERDICT_PASS;
        }
    }
    let remote = remote();
    let mut ev = events::base(direction, events::ifindex(ctx), ep, Some(flow));
    if direction == DIR_EGRESS {
        ev.dst_identity = remote;
    } else {
        ev.src_identity = remote;
    }
    if enforced(flags, direction) {
        let q = Query {
            remote,
            proto: flow.proto,
            port: flow.policy_port,
            ports_known: flow.ports_known,
        };
        let d = decide(ep.endpoint_id, flags, direction, &q);
        if flow.fragment {
            // Not a connection (no ports to track it by): allowed only by
            // protocol-level entries, and no verdict event for it.
            if d.allowed {
                return VERDICT_PASS;
            }
            ev.rule_ref = d.rule_ref;
            return events::drop(ev, Reason::Fragment);
        }
        events::verdict(ev, d.allowed, d.rule_ref);
        if !d.allowed {
            ev.rule_ref = d.rule_ref;
            return events::drop(ev, Reason::PolicyDenied);
        }
        count(Counter::PolicyAllowed);
    } else if flow.fragment {
        return VERDICT_PASS;
    }
    if ct::create(&key, 0, 0, now, len, flow.closing).is_err() {
        return events::drop(ev, Reason::CtFull);
    }
    VERDICT_PASS
}
