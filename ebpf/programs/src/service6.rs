//! IPv6 service load balancing in the tc programs, then IPv6 policy.
//! Separate classifiers entered by tail call from the shared start, so the
//! IPv4 path's code, stack and verification stay as they were.
//!
//! - `from_container6`: TCP/UDP to an IPv6 frontend is DNATed to a backend
//!   chosen once per flow (CT6 `CT_SERVICE`), replies matched through the
//!   translated tuple (CT6 `CT_EGRESS`, with the rev-NAT index); a pod
//!   reaching itself is source-NATed to `HAIRPIN6_ADDR` and its replies
//!   translated back here; a frontend without backends answers a SYN with a
//!   RST and a UDP datagram with ICMPv6 port unreachable.
//!   Egress policy judges a new service flow here, after the backend is
//!   chosen (its identity and port), as `from_container` does for IPv4.
//! - `to_container6`: replies of backends get the frontend back as source;
//!   replies of any connection the pod opened pass on their `CT6` entry.
//!
//! Everything else IPv6 (ICMPv6, extension headers, non-service traffic)
//! passes untouched, or, for an endpoint under policy, goes on to
//! `policy6_egress` / `policy6_ingress` (`policy6`).

use aya_ebpf::{macros::classifier, programs::TcContext};
use catena_common::{
    ct::{CT_EGRESS, CT_FLAG_SEEN_REPLY},
    endpoint::EndpointInfo,
    events::Reason,
    lb6::{Service6Key, Service6Value, HAIRPIN6_ADDR},
    metrics::Counter,
    policy::{DIR_EGRESS, DIR_INGRESS, POLICY_EP_EGRESS},
    tail_calls,
};

use crate::{
    ct, ct6, events, lb6,
    maps::{ENDPOINTS, LB6_REVNAT, TAIL_CALLS6},
    metrics::count,
    nat, nat6,
    parse::Flow6,
    policy, policy6, reject6, VERDICT_PASS,
};

/// The IPv6 part of `from_container`, tail-called from it.
#[classifier]
pub fn from_container6(ctx: TcContext) -> i32 {
    let ep = endpoint(&ctx);
    let flags = policy::endpoint_flags(ep.endpoint_id);
    let flow = match crate::parse::parse6(&ctx) {
        Ok(Some(flow)) => flow,
        // Not TCP/UDP right after the fixed header (ICMPv6, extension
        // headers): not a service flow, but policy's. A malformed packet is
        // the stack's unless policy says otherwise.
        Ok(None) | Err(()) => return to_policy(&ctx, &ep, flags, DIR_EGRESS),
    };
    match try_from_container6(&ctx, &ep, flags, &flow) {
        Ok(verdict) => verdict,
        Err(()) => drop(&ctx, &ep, DIR_EGRESS, Reason::Invalid),
    }
}

/// The IPv6 part of `to_container`, tail-called from it.
#[classifier]
pub fn to_container6(ctx: TcContext) -> i32 {
    let ep = endpoint(&ctx);
    let flags = policy::endpoint_flags(ep.endpoint_id);
    let Ok(Some(flow)) = crate::parse::parse6(&ctx) else {
        return to_policy(&ctx, &ep, flags, DIR_INGRESS);
    };
    match reply(&ctx, &flow) {
        Ok(true) => return VERDICT_PASS,
        Ok(false) => {}
        Err(()) => return drop(&ctx, &ep, DIR_INGRESS, Reason::Invalid),
    }
    if flags == 0 {
        return VERDICT_PASS;
    }
    // A hairpin flow's reply was reverse-NATed by from_container6 and
    // bounced here as frontend -> pod: it belongs to the pod's own service
    // flow.
    if ct6::lookup(&ct6::reversed_service_key(&flow)).is_some() {
        return VERDICT_PASS;
    }
    to_policy(&ctx, &ep, flags, DIR_INGRESS)
}

/// A packet no service handled: judged by `policy6_egress` /
/// `policy6_ingress` if the endpoint is under policy (either direction: an
/// unenforced direction still tracks connections so the other's replies
/// pass). Should the slot be empty (never, once the agent has loaded the
/// programs), an enforced direction drops (fail closed).
#[inline(always)]
fn to_policy(ctx: &TcContext, ep: &EndpointInfo, flags: u32, direction: u8) -> i32 {
    if flags == 0 {
        return VERDICT_PASS;
    }
    let slot = if direction == DIR_EGRESS {
        tail_calls::POLICY6_EGRESS
    } else {
        tail_calls::POLICY6_INGRESS
    };
    // SAFETY: our own context; on success this never returns.
    unsafe { TAIL_CALLS6.tail_call(ctx, slot) };
    if policy::enforced(flags, direction) {
        return drop(ctx, ep, direction, Reason::UnsupportedL3);
    }
    VERDICT_PASS
}

/// Answers a new flow to a frontend without backends, tail-called from
/// `from_container6`: RST for a SYN, ICMPv6 port unreachable for UDP, else
/// a drop with a `NoBackend` event.
#[classifier]
pub fn refuse6(ctx: TcContext) -> i32 {
    let ep = endpoint(&ctx);
    let Ok(Some(flow)) = crate::parse::parse6(&ctx) else {
        return drop(&ctx, &ep, DIR_EGRESS, Reason::Invalid);
    };
    match reject6::refuse(&ctx, &flow) {
        Ok(Some(verdict)) => {
            count(Counter::RejectNoBackend);
            verdict
        }
        Ok(None) => drop(&ctx, &ep, DIR_EGRESS, Reason::NoBackend),
        Err(()) => drop(&ctx, &ep, DIR_EGRESS, Reason::Invalid),
    }
}

/// The interface's endpoint, for events (the caller already checked it
/// exists before the tail call).
#[inline(always)]
fn endpoint(ctx: &TcContext) -> EndpointInfo {
    // SAFETY: copied out at once.
    unsafe { ENDPOINTS.get(events::ifindex(ctx)) }
        .copied()
        .unwrap_or_default()
}

/// A drop outside any flow's context (no tuple in the event).
#[inline(always)]
fn drop(ctx: &TcContext, ep: &EndpointInfo, direction: u8, reason: Reason) -> i32 {
    let ev = events::base(direction, events::ifindex(ctx), ep, None);
    events::drop(ev, reason)
}

/// A drop of a service flow's packet, with its tuple.
#[inline(always)]
fn drop_flow(ctx: &TcContext, ep: &EndpointInfo, flow: &Flow6, reason: Reason) -> i32 {
    let mut ev = events::base6(
        DIR_EGRESS,
        events::ifindex(ctx),
        ep,
        &flow.saddr,
        &flow.daddr,
        flow.sport,
        flow.dport,
        flow.proto,
    );
    events::drop6(&mut ev, reason)
}

#[inline(always)]
fn try_from_container6(
    ctx: &TcContext,
    ep: &EndpointInfo,
    flags: u32,
    flow: &Flow6,
) -> Result<i32, ()> {
    if flow.daddr == HAIRPIN6_ADDR {
        if let Some(verdict) = hairpin_reply(ctx, flow)? {
            return Ok(verdict);
        }
    }
    let key = lb6::master_key(&flow.daddr, flow.dport, flow.proto);
    match lb6::lookup_master(&key) {
        Some(master) => service(ctx, ep, flags, flow, &key, &master),
        None => {
            // A new connection on a tuple a finished Service flow used must
            // not inherit its reverse translation (as `ct::forget_translation`
            // for IPv4).
            if flow.syn {
                let own = ct6::key(
                    &flow.saddr,
                    &flow.daddr,
                    flow.sport,
                    flow.dport,
                    flow.proto,
                    CT_EGRESS,
                );
                if let Some(entry) = ct6::lookup(&own) {
                    // SAFETY: pointer from a CT6 lookup in this run.
                    unsafe {
                        if (*entry).rev_nat_index != 0 {
                            (*entry).rev_nat_index = 0;
                        }
                    }
                }
            }
            Ok(to_policy(ctx, ep, flags, DIR_EGRESS))
        }
    }
}

/// A packet to an IPv6 frontend.
#[inline(always)]
fn service(
    ctx: &TcContext,
    ep: &EndpointInfo,
    flags: u32,
    flow: &Flow6,
    key: &Service6Key,
    master: &Service6Value,
) -> Result<i32, ()> {
    let now = ct::now_ns();
    let len = ctx.len();
    let svc_ct_key = ct6::service_key(flow);

    // An existing flow keeps its backend as long as that backend exists.
    let mut chosen = None;
    let mut svc_entry = None;
    if let Some(entry) = ct6::lookup(&svc_ct_key) {
        // SAFETY: pointer from a CT6 lookup in this run.
        let id = unsafe { (*entry).backend_id };
        if let Some(backend) = lb6::backend(id) {
            chosen = Some(backend);
            svc_entry = Some(entry);
        }
    }
    let (backend, new_id) = match chosen {
        Some(backend) => (backend, None),
        None => {
            if master.count == 0 {
                return Ok(no_backend(ctx, ep));
            }
            let Some((id, backend)) = lb6::select_for_flow(key, master, flow, now) else {
                // A slot removed under us: as without backends.
                return Ok(no_backend(ctx, ep));
            };
            (backend, Some(id))
        }
    };

    // A pod reaching itself: its own address as the source would make its
    // stack drop the packet, so the source becomes the hairpin address.
    let hairpin = backend.address == flow.saddr;
    let ct_saddr = if hairpin { HAIRPIN6_ADDR } else { flow.saddr };
    // The translated tuple is what replies are matched against, and what
    // egress policy judges (the backend's identity and port).
    let egress_key = ct6::egress_key(flow, &ct_saddr, &backend.address, backend.port);
    let egress_entry = ct6::lookup(&egress_key);
    if egress_entry.is_none() && flags & POLICY_EP_EGRESS != 0 {
        let remote = policy6::ipcache6(&backend.address);
        let q = policy::Query {
            remote,
            proto: flow.proto,
            port: backend.port,
            ports_known: true,
        };
        let d = policy::decide(ep.endpoint_id, flags, DIR_EGRESS, &q);
        let mut ev = events::base6(
            DIR_EGRESS,
            events::ifindex(ctx),
            ep,
            &flow.saddr,
            &backend.address,
            flow.sport,
            backend.port,
            flow.proto,
        );
        ev.set_remote(DIR_EGRESS, remote);
        events::verdict6(&mut ev, d.allowed, d.rule_ref);
        if !d.allowed {
            // Nothing is created for a denied flow: its retransmissions are
            // judged again (and denied again).
            ev.set_rule_ref(d.rule_ref);
            return Ok(events::drop6(&mut ev, Reason::PolicyDenied));
        }
        count(Counter::PolicyAllowed);
    }

    match (svc_entry, new_id) {
        // SAFETY: pointer from a CT6 lookup in this run.
        (Some(entry), _) => unsafe { ct::touch(entry, now, len, flow.closing) },
        (None, Some(id)) => {
            if ct6::create(
                &svc_ct_key,
                id,
                master.rev_nat_index,
                now,
                len,
                flow.closing,
            )
            .is_err()
            {
                return Ok(drop_flow(ctx, ep, flow, Reason::CtFull));
            }
        }
        (None, None) => {}
    }
    match egress_entry {
        Some(entry) => {
            // SAFETY: pointer from a CT6 lookup in this run.
            unsafe {
                (*entry).rev_nat_index = master.rev_nat_index;
                ct::touch(entry, now, len, flow.closing);
            }
        }
        None => {
            // Without it replies would not be reverse-NATed: fail visibly.
            if ct6::create(&egress_key, 0, master.rev_nat_index, now, len, flow.closing).is_err() {
                return Ok(drop_flow(ctx, ep, flow, Reason::CtFull));
            }
        }
    }

    nat6::rewrite_dst(ctx, flow, &backend.address, backend.port)?;
    count(Counter::ServiceDnat);
    if hairpin {
        nat6::rewrite_src(ctx, flow, &HAIRPIN6_ADDR, flow.sport)?;
        return nat::bounce(ctx);
    }
    Ok(VERDICT_PASS)
}

/// The backend's reply of a hairpin flow (pod -> hairpin address): source
/// becomes the frontend, destination the pod itself, straight back to it.
/// `None`: not a hairpin flow's reply.
#[inline(always)]
fn hairpin_reply(ctx: &TcContext, flow: &Flow6) -> Result<Option<i32>, ()> {
    let Some(entry) = ct6::lookup(&ct6::reply_key(flow)) else {
        return Ok(None);
    };
    // SAFETY: pointer from a CT6 lookup in this run.
    let rev_nat_index = unsafe { (*entry).rev_nat_index };
    // SAFETY: copied out at once.
    let Some(frontend) = (unsafe { LB6_REVNAT.get(rev_nat_index) }).copied() else {
        return Ok(None);
    };
    // SAFETY: pointer from a CT6 lookup in this run.
    unsafe {
        ct::touch(entry, ct::now_ns(), ctx.len(), flow.closing);
        (*entry).flags |= CT_FLAG_SEEN_REPLY;
    }
    nat6::rewrite_src(ctx, flow, &frontend.address, frontend.port)?;
    nat6::rewrite_dst(ctx, flow, &flow.saddr, flow.dport)?;
    count(Counter::ReverseNat);
    nat::bounce(ctx).map(Some)
}

/// A reply of a connection the pod opened (a service flow, or any flow of an
/// endpoint under policy), on its way to the pod: accounted, and for a
/// service flow its source becomes the frontend the pod connected to.
/// `false`: no such connection.
#[inline(always)]
fn reply(ctx: &TcContext, flow: &Flow6) -> Result<bool, ()> {
    let Some(entry) = ct6::lookup(&ct6::reply_key(flow)) else {
        return Ok(false);
    };
    // SAFETY: pointer from a CT6 lookup in this run.
    let rev_nat_index = unsafe { (*entry).rev_nat_index };
    // SAFETY: copied out at once (index 0 is never written).
    let frontend = if rev_nat_index != 0 {
        unsafe { LB6_REVNAT.get(rev_nat_index) }.copied()
    } else {
        None
    };
    // SAFETY: pointer from a CT6 lookup in this run.
    unsafe {
        ct::touch(entry, ct::now_ns(), ctx.len(), flow.closing);
        (*entry).flags |= CT_FLAG_SEEN_REPLY;
    }
    if let Some(frontend) = frontend {
        nat6::rewrite_src(ctx, flow, &frontend.address, frontend.port)?;
        count(Counter::ReverseNat);
    }
    Ok(true)
}

/// A new flow to a frontend without backends: answered by `refuse6`
/// (a tail call keeps its buffers out of this program's stack); dropped
/// with a `NoBackend` event should the slot be empty.
#[inline(always)]
fn no_backend(ctx: &TcContext, ep: &EndpointInfo) -> i32 {
    // SAFETY: our own context; on success this never returns.
    unsafe { TAIL_CALLS6.tail_call(ctx, tail_calls::REFUSE6) };
    drop(ctx, ep, DIR_EGRESS, Reason::NoBackend)
}
