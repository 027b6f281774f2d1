//! `from_container`: tc ingress of the host-side veth, i.e. every packet the pod
//! sends. In order:
//! 1. the interface's `ENDPOINTS` entry (none: drop, fail closed);
//! 2. anti-spoofing: an IPv4 source other than the pod's own is dropped (an
//!    IPv6 source other than its own, link-local or `::` already was, in
//!    `endpoint::start`);
//! 3. services: IPv4 TCP/UDP to a frontend is DNATed to a backend chosen once
//!    per flow (sticky per client with ClientIP affinity) and remembered in
//!    conntrack; a pod reaching itself is source-NATed to the hairpin address
//!    and its replies translated back here; a TCP SYN to a frontend without
//!    backends is answered with a RST, a UDP datagram with an ICMP port
//!    unreachable; a SYN to anything else clears the reverse translation a
//!    finished Service flow may have left on the same tuple (port reuse);
//! 4. egress policy, after translation (the backend's identity and port), for
//!    new connections of an endpoint under policy; established connections
//!    and replies pass on conntrack.
//!
//! ARP and other non-IP frames pass untouched. IPv6 gets service load
//! balancing (`service6`) unless egress is enforced: catena enforces IPv4
//! only and must not let IPv6 bypass it, so an enforced endpoint drops IPv6
//! except neighbour discovery.

use aya_ebpf::{macros::classifier, programs::TcContext};
use catena_common::{
    ct::{CT_EGRESS, CT_FLAG_SEEN_REPLY},
    endpoint::{EndpointInfo, EP_FLAG_ANTI_SPOOF},
    events::Reason,
    lb::{Service4Key, Service4Value, HAIRPIN_ADDR},
    metrics::Counter,
    policy::{DIR_EGRESS, POLICY_EP_EGRESS},
};

use crate::endpoint::{self, Packet4};
use crate::{
    ct, events, lb, maps::LB4_REVNAT, metrics::count, nat, parse::Flow4, policy, reject,
    VERDICT_PASS,
};

#[classifier]
pub fn from_container(ctx: TcContext) -> i32 {
    count(Counter::FromContainer);
    let Packet4 {
        ifindex,
        ep,
        flags,
        flow,
    } = match endpoint::start(
        &ctx,
        DIR_EGRESS,
        POLICY_EP_EGRESS,
        catena_common::tail_calls::FROM_CONTAINER6,
    ) {
        Ok(p) => p,
        Err(verdict) => return verdict,
    };
    if ep.flags & EP_FLAG_ANTI_SPOOF != 0 && flow.saddr != ep.ipv4 {
        let ev = events::base(DIR_EGRESS, ifindex, &ep, Some(&flow));
        return events::drop(ev, Reason::SpoofedSource);
    }
    match try_from_container(&ctx, &ep, flags, &flow) {
        Ok(verdict) => verdict,
        Err(()) => {
            let ev = events::base(DIR_EGRESS, ifindex, &ep, Some(&flow));
            events::drop(ev, Reason::Invalid)
        }
    }
}

#[inline(always)]
fn try_from_container(
    ctx: &TcContext,
    ep: &EndpointInfo,
    flags: u32,
    flow: &Flow4,
) -> Result<i32, ()> {
    if flow.is_tcp_udp() {
        if flow.daddr == HAIRPIN_ADDR {
            if let Some(verdict) = hairpin_reply(ctx, flow)? {
                return Ok(verdict);
            }
        }
        let master_key = lb::master_key(flow.daddr, flow.dport, flow.proto);
        if let Some(master) = lb::lookup_master(&master_key) {
            return service(ctx, ep, flags, flow, &master_key, &master);
        }
        if flow.syn {
            ct::forget_translation(&ct::tuple_key(flow, CT_EGRESS));
        }
    }
    if flags == 0 {
        // No policy on this endpoint: nothing to track or decide.
        return Ok(VERDICT_PASS);
    }
    Ok(policy::connection(ctx, ep, flags, DIR_EGRESS, flow, || {
        policy::ipcache(flow.daddr)
    }))
}

/// A packet to a service frontend.
#[inline(always)]
fn service(
    ctx: &TcContext,
    ep: &EndpointInfo,
    flags: u32,
    flow: &Flow4,
    master_key: &Service4Key,
    master: &Service4Value,
) -> Result<i32, ()> {
    let now = ct::now_ns();
    let len = ctx.len();
    let svc_ct_key = ct::service_key(flow);

    // An existing flow keeps its backend as long as that backend still exists.
    let mut chosen = None;
    let mut svc_entry = None;
    if let Some(entry) = ct::lookup(&svc_ct_key) {
        // SAFETY: pointer from a CT4 lookup in this run.
        let id = unsafe { (*entry).backend_id };
        if let Some(backend) = lb::backend(id) {
            chosen = Some(backend);
            svc_entry = Some(entry);
        }
    }
    let (backend, new_id) = match chosen {
        Some(backend) => (backend, None),
        None => {
            if master.count == 0 {
                return no_backend(ctx, ep, flow);
            }
            let Some((id, backend)) = lb::select_for_flow(master_key, master, flow, now) else {
                // The agent writes slots before raising the count, so this is a
                // backend removed under us: treat as no backend.
                return no_backend(ctx, ep, flow);
            };
            (backend, Some(id))
        }
    };

    // A pod reaching itself: its own address as the source would make its
    // stack drop the packet (a local source arriving from outside), so the
    // source becomes the hairpin address, and the reply comes back here.
    let hairpin = backend.address == flow.saddr;
    let ct_saddr = if hairpin { HAIRPIN_ADDR } else { flow.saddr };
    // The translated tuple is what replies are matched against, and what
    // egress policy judges (the backend's identity and port).
    let egress_key = ct::egress_key(flow, ct_saddr, backend.address, backend.port);
    let egress_entry = ct::lookup(&egress_key);
    if egress_entry.is_none() && flags & POLICY_EP_EGRESS != 0 {
        let remote = policy::ipcache(backend.address);
        let q = policy::Query {
            remote,
            proto: flow.proto,
            port: backend.port,
            ports_known: true,
        };
        let d = policy::decide(ep.endpoint_id, flags, DIR_EGRESS, &q);
        let mut ev = events::base(DIR_EGRESS, events::ifindex(ctx), ep, Some(flow));
        ev.daddr = backend.address;
        ev.dport = backend.port;
        ev.dst_identity = remote;
        events::verdict(ev, d.allowed, d.rule_ref);
        if !d.allowed {
            // Nothing is created for a denied flow: its retransmissions are
            // judged again (and denied again).
            ev.rule_ref = d.rule_ref;
            return Ok(events::drop(ev, Reason::PolicyDenied));
        }
        count(Counter::PolicyAllowed);
    }

    match (svc_entry, new_id) {
        // SAFETY: pointer from a CT4 lookup in this run.
        (Some(entry), _) => unsafe { ct::touch(entry, now, len, flow.closing) },
        (None, Some(id)) => {
            if ct::create(
                &svc_ct_key,
                id,
                master.rev_nat_index,
                now,
                len,
                flow.closing,
            )
            .is_err()
            {
                return Ok(ct_full(ctx, ep, flow));
            }
        }
        (None, None) => {}
    }
    match egress_entry {
        Some(entry) => {
            // SAFETY: pointer from a CT4 lookup in this run.
            unsafe {
                (*entry).rev_nat_index = master.rev_nat_index;
                ct::touch(entry, now, len, flow.closing);
            }
        }
        None => {
            if ct::create(&egress_key, 0, master.rev_nat_index, now, len, flow.closing).is_err() {
                // Without this entry replies would not be reverse-NATed and the
                // client would drop them: fail the flow visibly instead.
                return Ok(ct_full(ctx, ep, flow));
            }
        }
    }

    nat::rewrite_dst(ctx, flow, backend.address, backend.port)?;
    count(Counter::ServiceDnat);
    if hairpin {
        nat::rewrite_src(ctx, flow, HAIRPIN_ADDR, flow.sport)?;
        return nat::bounce(ctx);
    }
    Ok(VERDICT_PASS)
}

#[inline(always)]
fn ct_full(ctx: &TcContext, ep: &EndpointInfo, flow: &Flow4) -> i32 {
    let ev = events::base(DIR_EGRESS, events::ifindex(ctx), ep, Some(flow));
    events::drop(ev, Reason::CtFull)
}

/// The backend's reply of a hairpin flow (backend -> hairpin address): the
/// source becomes the frontend and the destination the pod itself (client
/// and backend are one), then it goes straight back to the pod. `None`: not
/// a hairpin flow's reply.
#[inline(always)]
fn hairpin_reply(ctx: &TcContext, flow: &Flow4) -> Result<Option<i32>, ()> {
    let Some(entry) = ct::lookup(&ct::reply_key(flow)) else {
        return Ok(None);
    };
    // SAFETY: pointer from a CT4 lookup in this run.
    let rev_nat_index = unsafe { (*entry).rev_nat_index };
    // SAFETY: copied out at once.
    let Some(frontend) = (unsafe { LB4_REVNAT.get(rev_nat_index) }).copied() else {
        return Ok(None);
    };
    // SAFETY: pointer from a CT4 lookup in this run.
    unsafe {
        ct::touch(entry, ct::now_ns(), ctx.len(), flow.closing);
        (*entry).flags |= CT_FLAG_SEEN_REPLY;
    }
    nat::rewrite_src(ctx, flow, frontend.address, frontend.port)?;
    nat::rewrite_dst(ctx, flow, flow.saddr, flow.dport)?;
    count(Counter::ReverseNat);
    nat::bounce(ctx).map(Some)
}

/// A new flow to a frontend without backends: a TCP SYN gets a RST, a UDP
/// datagram an ICMP port unreachable (the client fails at once with
/// ECONNREFUSED), anything else is dropped.
#[inline(always)]
fn no_backend(ctx: &TcContext, ep: &EndpointInfo, flow: &Flow4) -> Result<i32, ()> {
    if let Some(verdict) = reject::refuse(ctx, flow)? {
        count(Counter::RejectNoBackend);
        return Ok(verdict);
    }
    let ev = events::base(DIR_EGRESS, events::ifindex(ctx), ep, Some(flow));
    Ok(events::drop(ev, Reason::NoBackend))
}
