//! IPv6 network policy of the host-veth programs, with the semantics of the
//! IPv4 path (`policy::connection`): established connections and replies pass
//! on their `CT6` entry; a new connection of an enforced direction is decided
//! by the shared `POLICY` rules (identity of the remote from `IPCACHE6`,
//! protocol and port; ICMPv6 type as the port) and, if allowed, tracked so
//! its replies pass; neighbour discovery and multicast listener discovery
//! (the link's own plumbing, `flow6::PolicyFlow6::link_control`) always pass.
//!
//! Two classifiers, never attached, entered by tail call (`TAIL_CALLS6`):
//! `policy6_egress` from `from_container6` for packets no service handled,
//! `policy6_ingress` from `to_container6` for packets that are no reply of a
//! connection the pod opened. Service flows are judged in `service6` itself
//! (after the backend is chosen, before anything is created for the flow).
//! A tail call gives each its own stack and verification, so the IPv4 and
//! IPv6 service paths stay as they were.

use aya_ebpf::{macros::classifier, maps::lpm_trie::Key, programs::TcContext};
use catena_common::{
    ct::{CT_EGRESS, CT_FLAG_SEEN_REPLY, CT_INGRESS},
    endpoint::EndpointInfo,
    events::Reason,
    identity,
    lb6::HAIRPIN6_ADDR,
    metrics::Counter,
    policy::{DIR_EGRESS, DIR_INGRESS},
};

use crate::{
    ct, ct6,
    events::{self, Event6Ref},
    flow6::{self, PolicyFlow6},
    maps::{ENDPOINTS, IPCACHE6},
    metrics::count,
    policy, VERDICT_PASS,
};

/// Identity of a remote IPv6 address; `WORLD` when the ipcache has no
/// prefix for it.
#[inline(always)]
pub fn ipcache6(addr: &[u32; 4]) -> u32 {
    IPCACHE6
        .get(Key::new(128, *addr))
        .map_or(identity::WORLD, |v| v.identity)
}

/// Packets the pod sends that no IPv6 service translated.
#[classifier]
pub fn policy6_egress(ctx: TcContext) -> i32 {
    judge(&ctx, DIR_EGRESS)
}

/// Packets delivered to the pod that are no reply of its own connections.
#[classifier]
pub fn policy6_ingress(ctx: TcContext) -> i32 {
    judge(&ctx, DIR_INGRESS)
}

#[inline(always)]
fn judge(ctx: &TcContext, direction: u8) -> i32 {
    let ifindex = events::ifindex(ctx);
    // SAFETY: copied out at once.
    let Some(ep) = (unsafe { ENDPOINTS.get(ifindex) }).copied() else {
        let ev = events::base(direction, ifindex, &EndpointInfo::default(), None);
        return events::drop(ev, Reason::UnknownEndpoint);
    };
    let flags = policy::endpoint_flags(ep.endpoint_id);
    let flow = match flow6::read(ctx) {
        Ok(flow) => flow,
        Err(()) if policy::enforced(flags, direction) => {
            let ev = events::base(direction, ifindex, &ep, None);
            return events::drop(ev, Reason::Invalid);
        }
        // Not ours to judge: the stack's business, untouched.
        Err(()) => return VERDICT_PASS,
    };
    // Policy may have been lifted between the caller's check and this one.
    if flow.link_control || flags == 0 {
        return VERDICT_PASS;
    }
    let remote = || {
        if direction == DIR_EGRESS {
            ipcache6(&flow.daddr)
        } else if flow.saddr == HAIRPIN6_ADDR {
            // The hairpin address stands for the pod itself (a pod reaching
            // itself through a service), whatever the ipcache says.
            ep.identity
        } else {
            ipcache6(&flow.saddr)
        }
    };
    connection(ctx, &ep, flags, direction, &flow, remote)
}

/// An event about this packet, with its tuple.
#[inline(always)]
fn event(ctx: &TcContext, ep: &EndpointInfo, direction: u8, flow: &PolicyFlow6) -> Event6Ref {
    events::base6(
        direction,
        events::ifindex(ctx),
        ep,
        &flow.saddr,
        &flow.daddr,
        flow.sport,
        flow.dport,
        flow.proto,
    )
}

/// `policy::connection` for IPv6, on `CT6`.
#[inline(always)]
fn connection(
    ctx: &TcContext,
    ep: &EndpointInfo,
    flags: u32,
    direction: u8,
    flow: &PolicyFlow6,
    remote: impl FnOnce() -> u32,
) -> i32 {
    let (own, other) = if direction == DIR_EGRESS {
        (CT_EGRESS, CT_INGRESS)
    } else {
        (CT_INGRESS, CT_EGRESS)
    };
    let now = ct::now_ns();
    let len = ctx.len();
    let key = ct6::key(
        &flow.saddr,
        &flow.daddr,
        flow.sport,
        flow.dport,
        flow.proto,
        own,
    );
    if !flow.fragment {
        if let Some(entry) = ct6::lookup(&key) {
            // SAFETY: pointer from a CT6 lookup in this run.
            unsafe { ct::touch(entry, now, len, flow.closing) };
            return VERDICT_PASS;
        }
        let reply_of = ct6::key(
            &flow.daddr,
            &flow.saddr,
            flow.dport,
            flow.sport,
            flow.proto,
            other,
        );
        if let Some(entry) = ct6::lookup(&reply_of) {
            // SAFETY: as above.
            unsafe {
                ct::touch(entry, now, len, flow.closing);
                (*entry).flags |= CT_FLAG_SEEN_REPLY;
            }
            return VERDICT_PASS;
        }
    }
    let remote = remote();
    let mut ev = event(ctx, ep, direction, flow);
    ev.set_remote(direction, remote);
    if policy::enforced(flags, direction) {
        let q = policy::Query {
            remote,
            proto: flow.proto,
            port: flow.policy_port,
            ports_known: flow.ports_known,
        };
        let d = policy::decide(ep.endpoint_id, flags, direction, &q);
        if flow.fragment {
            // Not a connection (no ports to track it by): allowed only by
            // protocol-level entries, and no verdict event for it.
            if d.allowed {
                return VERDICT_PASS;
            }
            ev.set_rule_ref(d.rule_ref);
            return events::drop6(&mut ev, Reason::Fragment);
        }
        events::verdict6(&mut ev, d.allowed, d.rule_ref);
        if !d.allowed {
            ev.set_rule_ref(d.rule_ref);
            return events::drop6(&mut ev, Reason::PolicyDenied);
        }
        count(Counter::PolicyAllowed);
    } else if flow.fragment {
        return VERDICT_PASS;
    }
    if ct6::create(&key, 0, 0, now, len, flow.closing).is_err() {
        return events::drop6(&mut ev, Reason::CtFull);
    }
    VERDICT_PASS
}
