//! The IPv6 half of the external-device programs, tail-called from
//! `from_netdev` / `to_netdev` (slots `FROM_NETDEV6` / `TO_NETDEV6` of
//! `TAIL_CALLS6`) so the IPv4 path's code, stack and verification stay as
//! they were. The same steps as the IPv4 programs, over `LB6_*`, `CT6`,
//! `DEVICES6` and `SNAT6`:
//!
//! - `from_netdev6`: a remote backend's reply to a SNATed flow gets the
//!   client back as destination and the frontend as source and goes
//!   straight out towards the client; TCP/UDP to an IPv6 NodePort,
//!   externalIP or LoadBalancer IP frontend goes on to `from_netdev6_lb`;
//!   anything else passes after two hash lookups.
//! - `from_netdev6_lb`: the flow is DNATed to a backend chosen once per
//!   flow (`CT6`; the external scope when the frontend has two). Where the
//!   FIB routes the backend decides the rest: out of a pod veth catena
//!   manages, it is local and reached through the stack with the client's
//!   address intact; otherwise `from_netdev6_snat` takes over. No
//!   (external) backends: a SYN gets a RST, a UDP datagram ICMPv6 port
//!   unreachable (`refuse6`).
//! - `from_netdev6_snat`: a flow to a remote backend also gets the node's
//!   IPv6 address on the output device (`DEVICES6`, else the ingress
//!   device's) as source and is redirected out of that device.
//! - `to_netdev6`: a local backend's reply to an external client gets the
//!   frontend back as its source.
//!
//! The three ingress stages are tail calls apart (the backend travels in
//! the flow's `CT6` entry) so each has its own 512-byte stack and verifier
//! budget, and a packet pays only for the stages it needs.
//!
//! Everything else IPv6 (ICMPv6 and neighbour discovery, extension
//! headers, traffic for the node or for pods) passes untouched.

use aya_ebpf::{macros::classifier, programs::TcContext};
use catena_common::{
    ct::{CT_FLAG_SEEN_REPLY, CT_SERVICE},
    ct6::Ct6Key,
    endpoint::EndpointInfo,
    events::Reason,
    lb::{SCOPE_EXTERNAL, SVC_FLAG_NO_BACKENDS, SVC_FLAG_TWO_SCOPES},
    lb6::{Addr6, Service6Key, Service6Value},
    metrics::Counter,
    policy::{DIR_EGRESS, DIR_INGRESS},
    tail_calls,
};

use crate::{
    ct, ct6, events, lb6,
    maps::{LB6_REVNAT, TAIL_CALLS6},
    metrics::count,
    nodeport6::{self, Translated6},
    parse::{parse6, Flow6},
    VERDICT_PASS,
};

/// The IPv6 part of `from_netdev`: SNAT replies, and the hand-over of
/// frontend traffic to `from_netdev6_lb`.
#[classifier]
pub fn from_netdev6(ctx: TcContext) -> i32 {
    let flow = match parse6(&ctx) {
        Ok(Some(flow)) => flow,
        // Not TCP/UDP right after the fixed header, or malformed: not ours
        // to judge on a device the node owns.
        Ok(None) | Err(()) => return VERDICT_PASS,
    };
    if let Some(back) = nodeport6::reply_of(
        &flow.saddr,
        &flow.daddr,
        flow.sport,
        flow.dport,
        flow.proto,
        ct::now_ns(),
    ) {
        return match snat_reply(&ctx, &flow, &back.to_addr, back.to_port, back.rev_nat_index) {
            Ok(verdict) => verdict,
            Err(()) => drop(&ctx, DIR_INGRESS, Reason::Invalid),
        };
    }
    let key = lb6::master_key(&flow.daddr, flow.dport, flow.proto);
    if lb6::lookup_master(&key).is_none() {
        return VERDICT_PASS;
    }
    // SAFETY: our own context; on success this never returns.
    unsafe { TAIL_CALLS6.tail_call(&ctx, tail_calls::FROM_NETDEV6_LB) };
    // The slot is empty (never once the agent has loaded the programs).
    drop(&ctx, DIR_INGRESS, Reason::Invalid)
}

/// Load balancing of a packet `from_netdev6` found addressed to an IPv6
/// frontend.
#[classifier]
pub fn from_netdev6_lb(ctx: TcContext) -> i32 {
    let Ok(Some(flow)) = parse6(&ctx) else {
        return drop(&ctx, DIR_INGRESS, Reason::Invalid);
    };
    match try_from_netdev6_lb(&ctx, &flow) {
        Ok(verdict) => verdict,
        Err(()) => drop(&ctx, DIR_INGRESS, Reason::Invalid),
    }
}

/// A flow `from_netdev6_lb` DNATed for a remote backend: its backend and
/// frontend come from the flow's `CT_SERVICE` entry written there.
#[classifier]
pub fn from_netdev6_snat(ctx: TcContext) -> i32 {
    let Ok(Some(flow)) = parse6(&ctx) else {
        return drop(&ctx, DIR_INGRESS, Reason::Invalid);
    };
    match remote(&ctx, &flow) {
        Ok(verdict) => verdict,
        Err(()) => drop(&ctx, DIR_INGRESS, Reason::Invalid),
    }
}

/// The IPv6 part of `to_netdev`: a local backend's reply to an external
/// client (DNATed without SNAT, so it leaves through the stack) gets its
/// source restored to the frontend. One `CT6` probe per TCP/UDP packet.
#[classifier]
pub fn to_netdev6(ctx: TcContext) -> i32 {
    let Ok(Some(flow)) = parse6(&ctx) else {
        return VERDICT_PASS;
    };
    let Some(entry) = ct6::lookup(&ct6::reply_key(&flow)) else {
        return VERDICT_PASS;
    };
    // SAFETY: pointer from a CT6 lookup in this run.
    let rev_nat_index = unsafe { (*entry).rev_nat_index };
    if rev_nat_index == 0 {
        return VERDICT_PASS;
    }
    // SAFETY: copied out at once.
    let Some(frontend) = (unsafe { LB6_REVNAT.get(rev_nat_index) }).copied() else {
        return VERDICT_PASS;
    };
    // SAFETY: pointer from a CT6 lookup in this run.
    unsafe {
        ct::touch(entry, ct::now_ns(), ctx.len(), flow.closing);
        (*entry).flags |= CT_FLAG_SEEN_REPLY;
    }
    if nodeport6::rewrite_src(&ctx, &flow, &frontend.address, frontend.port).is_err() {
        return drop(&ctx, DIR_EGRESS, Reason::Invalid);
    }
    count(Counter::ReverseNat);
    VERDICT_PASS
}

/// Drop with an event; there is no endpoint on a device (endpoint id 0),
/// and IPv6 events carry no addresses.
#[inline(always)]
fn drop(ctx: &TcContext, direction: u8, reason: Reason) -> i32 {
    let ev = events::base(
        direction,
        events::ifindex(ctx),
        &EndpointInfo::default(),
        None,
    );
    events::drop(ev, reason)
}

#[inline(always)]
fn try_from_netdev6_lb(ctx: &TcContext, flow: &Flow6) -> Result<i32, ()> {
    let key = lb6::master_key(&flow.daddr, flow.dport, flow.proto);
    let Some(master) = lb6::lookup_master(&key) else {
        // Removed since `from_netdev6` looked: no longer a frontend.
        return Ok(VERDICT_PASS);
    };
    let (key, master) = external_scope(&key, master);
    service(ctx, flow, &key, &master, ct::now_ns())
}

/// The scope clients outside the node use (`lb::external_scope` for IPv6):
/// the frontend's `SCOPE_EXTERNAL` entries when its master has two scopes,
/// else the master itself. A missing external master means no backends for
/// external clients, never the in-cluster ones.
#[inline(always)]
fn external_scope(key: &Service6Key, master: Service6Value) -> (Service6Key, Service6Value) {
    if master.flags & SVC_FLAG_TWO_SCOPES == 0 {
        return (*key, master);
    }
    let ext = Service6Key {
        scope: SCOPE_EXTERNAL,
        ..*key
    };
    match lb6::lookup_master(&ext) {
        Some(m) => (ext, m),
        None => (
            ext,
            Service6Value {
                backend_id: 0,
                count: 0,
                rev_nat_index: master.rev_nat_index,
                flags: SVC_FLAG_NO_BACKENDS,
            },
        ),
    }
}

#[inline(always)]
fn service(
    ctx: &TcContext,
    flow: &Flow6,
    key: &Service6Key,
    master: &Service6Value,
    now: u64,
) -> Result<i32, ()> {
    let len = ctx.len();
    let svc_key = ct6::service_key(flow);
    let mut existing = None;
    if let Some(entry) = ct6::lookup(&svc_key) {
        // SAFETY: pointer from a CT6 lookup in this run.
        let id = unsafe { (*entry).backend_id };
        if let Some(b) = lb6::backend(id) {
            // SAFETY: as above.
            unsafe { ct::touch(entry, now, len, flow.closing) };
            existing = Some(b);
        }
    }
    let backend = match existing {
        Some(b) => b,
        None => {
            if master.count == 0 {
                return Ok(no_backend(ctx));
            }
            let Some((id, b)) = lb6::select_for_flow(key, master, flow, now) else {
                // A slot removed under us: as without backends.
                return Ok(no_backend(ctx));
            };
            if ct6::create(&svc_key, id, master.rev_nat_index, now, len, flow.closing).is_err() {
                return Ok(drop(ctx, DIR_INGRESS, Reason::CtFull));
            }
            b
        }
    };

    let in_ifindex = events::ifindex(ctx);
    let Some(out_ifindex) =
        nodeport6::route_ifindex(ctx, in_ifindex, &flow.saddr, &backend.address)
    else {
        return Ok(drop(ctx, DIR_INGRESS, Reason::NoBackend));
    };
    if nodeport6::is_endpoint_device(out_ifindex) {
        // Local: the backend answers the client directly; `to_netdev6`
        // restores the frontend as the source of its replies from this
        // entry.
        let egress_key = ct6::egress_key(flow, &flow.saddr, &backend.address, backend.port);
        match ct6::lookup(&egress_key) {
            // SAFETY: pointer from a CT6 lookup in this run.
            Some(entry) => unsafe {
                (*entry).rev_nat_index = master.rev_nat_index;
                ct::touch(entry, now, len, flow.closing);
            },
            None => {
                if ct6::create(&egress_key, 0, master.rev_nat_index, now, len, flow.closing)
                    .is_err()
                {
                    return Ok(drop(ctx, DIR_INGRESS, Reason::CtFull));
                }
            }
        }
        nodeport6::rewrite_dst(ctx, flow, &backend.address, backend.port)?;
        count(Counter::ServiceDnat);
        return Ok(VERDICT_PASS);
    }

    // SAFETY: our own context; on success this never returns.
    unsafe { TAIL_CALLS6.tail_call(ctx, tail_calls::FROM_NETDEV6_SNAT) };
    Ok(drop(ctx, DIR_INGRESS, Reason::Invalid))
}

/// Remote backend: the flow leaves with the node's IPv6 address on the
/// output device so the reply returns here, and bypasses the stack (it
/// would drop a packet with a local source arriving from outside). A
/// backend routed out of a device catena does not manage still gets an
/// address it can answer: the ingress device's.
#[inline(always)]
fn remote(ctx: &TcContext, flow: &Flow6) -> Result<i32, ()> {
    let now = ct::now_ns();
    let Some(entry) = ct6::lookup(&ct6::service_key(flow)) else {
        // Evicted since `from_netdev6_lb` wrote it.
        return Ok(drop(ctx, DIR_INGRESS, Reason::CtFull));
    };
    // SAFETY: pointer from a CT6 lookup in this run.
    let (id, rev_nat_index) = unsafe { ((*entry).backend_id, (*entry).rev_nat_index) };
    let Some(backend) = lb6::backend(id) else {
        return Ok(drop(ctx, DIR_INGRESS, Reason::NoBackend));
    };
    let in_ifindex = events::ifindex(ctx);
    let Some(out_ifindex) =
        nodeport6::route_ifindex(ctx, in_ifindex, &flow.saddr, &backend.address)
    else {
        return Ok(drop(ctx, DIR_INGRESS, Reason::NoBackend));
    };
    let Some(snat_addr) =
        nodeport6::device_addr(out_ifindex).or_else(|| nodeport6::device_addr(in_ifindex))
    else {
        return Ok(drop(ctx, DIR_INGRESS, Reason::Invalid));
    };
    let t = Translated6 {
        client: flow.saddr,
        client_port: flow.sport,
        frontend: flow.daddr,
        frontend_port: flow.dport,
        backend: backend.address,
        backend_port: backend.port,
        proto: flow.proto,
    };
    let Some(snat_port) = nodeport6::snat_port(&t, &snat_addr, rev_nat_index, now) else {
        return Ok(drop(ctx, DIR_INGRESS, Reason::CtFull));
    };
    nodeport6::rewrite_dst(ctx, flow, &backend.address, backend.port)?;
    // Only the destination changed: the source still reads as in `flow`,
    // which rewrite_src needs as the old value.
    nodeport6::rewrite_src(ctx, flow, &snat_addr, snat_port)?;
    count(Counter::ServiceDnat);
    Ok(nodeport6::redirect(out_ifindex))
}

/// A remote backend's reply to a SNATed flow: destination back to the
/// client, source back to the frontend, then straight out towards the
/// client.
#[inline(always)]
fn snat_reply(
    ctx: &TcContext,
    flow: &Flow6,
    client: &Addr6,
    client_port: u16,
    rev_nat_index: u32,
) -> Result<i32, ()> {
    // SAFETY: copied out at once.
    let Some(frontend) = (unsafe { LB6_REVNAT.get(rev_nat_index) }).copied() else {
        // The Service is gone: nothing to answer as.
        return Ok(drop(ctx, DIR_INGRESS, Reason::NoBackend));
    };
    let in_ifindex = events::ifindex(ctx);
    let Some(out_ifindex) = nodeport6::route_ifindex(ctx, in_ifindex, &frontend.address, client)
    else {
        return Ok(drop(ctx, DIR_INGRESS, Reason::Invalid));
    };
    nodeport6::rewrite_dst(ctx, flow, client, client_port)?;
    nodeport6::rewrite_src(ctx, flow, &frontend.address, frontend.port)?;
    // Keep the client -> frontend conntrack entry alive with its replies.
    let svc_key = Ct6Key {
        saddr: *client,
        daddr: frontend.address,
        sport: client_port,
        dport: frontend.port,
        proto: flow.proto,
        kind: CT_SERVICE,
        pad: [0; 2],
    };
    if let Some(entry) = ct6::lookup(&svc_key) {
        // SAFETY: pointer from a CT6 lookup in this run.
        unsafe {
            ct::touch(entry, ct::now_ns(), ctx.len(), flow.closing);
            (*entry).flags |= CT_FLAG_SEEN_REPLY;
        }
    }
    count(Counter::ReverseNat);
    Ok(nodeport6::redirect(out_ifindex))
}

/// A new flow to a frontend without (external) backends: answered by
/// `refuse6` (RST or ICMPv6 port unreachable, bounced back out of this
/// device; a tail call keeps its buffers out of this program's stack);
/// dropped with a `NoBackend` event should the slot be empty.
#[inline(always)]
fn no_backend(ctx: &TcContext) -> i32 {
    // SAFETY: our own context; on success this never returns.
    unsafe { TAIL_CALLS6.tail_call(ctx, tail_calls::REFUSE6) };
    drop(ctx, DIR_INGRESS, Reason::NoBackend)
}
