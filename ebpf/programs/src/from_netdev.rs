//! `from_netdev`: tc ingress of the node's external devices, i.e. traffic from
//! outside the node. In order:
//! 1. a reply of a flow SNATed to a remote backend (backend -> node
//!    address:SNAT port) gets the client back as its destination and the
//!    frontend as its source, and is forwarded straight to the client;
//! 2. a new or ongoing flow to a NodePort, externalIP or LoadBalancer IP
//!    frontend is DNATed to a backend chosen once per flow (conntrack as for
//!    pods). A frontend with two scopes (`SVC_FLAG_TWO_SCOPES`) picks from
//!    its external scope here, pods and node processes from the internal
//!    one. A local backend is reached through the stack with the client's
//!    address intact (its reply is reverse-NATed by `to_netdev`); a remote
//!    one (only with externalTrafficPolicy: Cluster: the external scope of a
//!    Local frontend lists local backends only) also gets the node's address
//!    on the output device as source, so its reply comes back through this
//!    node;
//! 3. a frontend without (local) backends refuses new flows (TCP RST, UDP
//!    port unreachable).
//!
//! IPv6 is handled the same way by `from_netdev6` (`netdev6`, by tail
//! call). Everything else (traffic for the node or for pods, non-IP) passes
//! untouched: this program never drops what it does not translate.

use aya_ebpf::{macros::classifier, programs::TcContext};
use catena_common::{
    endpoint::EndpointInfo,
    events::Reason,
    lb::{Service4Key, Service4Value},
    metrics::Counter,
    policy::DIR_INGRESS,
    tail_calls,
};

use crate::{
    ct, events, lb,
    maps::{LB4_REVNAT, TAIL_CALLS6},
    metrics::count,
    nat,
    nodeport::{self, Translated},
    parse::{self, Flow4, Packet},
    reject, VERDICT_PASS,
};

#[classifier]
pub fn from_netdev(ctx: TcContext) -> i32 {
    // Malformed IPv4 is not ours to judge on a device the node owns.
    let flow = match parse::parse(&ctx) {
        Ok(Packet::Ipv4(flow)) => flow,
        Ok(Packet::Ipv6) => {
            // SAFETY: our own context; on success this never returns. An
            // empty slot (never, once the agent has loaded the programs)
            // passes IPv6 untranslated.
            unsafe { TAIL_CALLS6.tail_call(&ctx, tail_calls::FROM_NETDEV6) };
            return VERDICT_PASS;
        }
        _ => return VERDICT_PASS,
    };
    if !flow.is_tcp_udp() {
        return VERDICT_PASS;
    }
    match try_from_netdev(&ctx, &flow) {
        Ok(verdict) => verdict,
        Err(()) => drop(&ctx, &flow, Reason::Invalid),
    }
}

#[inline(always)]
fn try_from_netdev(ctx: &TcContext, flow: &Flow4) -> Result<i32, ()> {
    let now = ct::now_ns();
    if let Some(back) = nodeport::reply_of(
        flow.saddr, flow.daddr, flow.sport, flow.dport, flow.proto, now,
    ) {
        return snat_reply(ctx, flow, back.to_addr, back.to_port, back.rev_nat_index);
    }
    let key = lb::master_key(flow.daddr, flow.dport, flow.proto);
    let Some(master) = lb::lookup_master(&key) else {
        return Ok(VERDICT_PASS);
    };
    // Clients outside the node get the external scope of a frontend with
    // two scopes (externalTrafficPolicy: Local: this node's endpoints only).
    let (key, master) = lb::external_scope(&key, master);
    service(ctx, flow, &key, &master, now)
}

/// Drop with an event; there is no endpoint on a device (endpoint id 0).
#[inline(always)]
fn drop(ctx: &TcContext, flow: &Flow4, reason: Reason) -> i32 {
    let ev = events::base(
        DIR_INGRESS,
        events::ifindex(ctx),
        &EndpointInfo::default(),
        Some(flow),
    );
    events::drop(ev, reason)
}

#[inline(always)]
fn service(
    ctx: &TcContext,
    flow: &Flow4,
    key: &Service4Key,
    master: &Service4Value,
    now: u64,
) -> Result<i32, ()> {
    let len = ctx.len();
    let svc_key = ct::service_key(flow);
    let mut existing = None;
    if let Some(entry) = ct::lookup(&svc_key) {
        // SAFETY: pointer from a CT4 lookup in this run.
        let id = unsafe { (*entry).backend_id };
        if let Some(b) = lb::backend(id) {
            // SAFETY: as above.
            unsafe { ct::touch(entry, now, len, flow.closing) };
            existing = Some(b);
        }
    }
    let backend = match existing {
        Some(b) => b,
        None => {
            let picked = if master.count == 0 {
                None
            } else {
                lb::select_for_flow(key, master, flow, now)
            };
            let Some((id, b)) = picked else {
                if let Some(verdict) = reject::refuse(ctx, flow)? {
                    count(Counter::RejectNoBackend);
                    return Ok(verdict);
                }
                return Ok(drop(ctx, flow, Reason::NoBackend));
            };
            if ct::create(&svc_key, id, master.rev_nat_index, now, len, flow.closing).is_err() {
                return Ok(drop(ctx, flow, Reason::CtFull));
            }
            b
        }
    };

    if nodeport::is_local(backend.address) {
        // The backend answers the client directly; `to_netdev` restores the
        // frontend as the source of its replies from this entry.
        let egress_key = ct::egress_key(flow, flow.saddr, backend.address, backend.port);
        match ct::lookup(&egress_key) {
            // SAFETY: pointer from a CT4 lookup in this run.
            Some(entry) => unsafe {
                (*entry).rev_nat_index = master.rev_nat_index;
                ct::touch(entry, now, len, flow.closing);
            },
            None => {
                if ct::create(&egress_key, 0, master.rev_nat_index, now, len, flow.closing).is_err()
                {
                    return Ok(drop(ctx, flow, Reason::CtFull));
                }
            }
        }
        nat::rewrite_dst(ctx, flow, backend.address, backend.port)?;
        count(Counter::ServiceDnat);
        return Ok(VERDICT_PASS);
    }

    // Remote backend: leave with the node's address on the output device so
    // the reply returns here, and bypass the stack (it would drop a packet
    // with a local source arriving from outside).
    let in_ifindex = events::ifindex(ctx);
    let Some(out_ifindex) = nat::route_ifindex(ctx, in_ifindex, flow.saddr, backend.address) else {
        return Ok(drop(ctx, flow, Reason::NoBackend));
    };
    // A backend routed out of a device catena does not manage (a tunnel, a
    // bridge) still gets a node address it can answer: the ingress device's.
    let Some(snat_addr) =
        nodeport::device_addr(out_ifindex).or_else(|| nodeport::device_addr(in_ifindex))
    else {
        return Ok(drop(ctx, flow, Reason::Invalid));
    };
    let t = Translated {
        client: flow.saddr,
        client_port: flow.sport,
        frontend: flow.daddr,
        frontend_port: flow.dport,
        backend: backend.address,
        backend_port: backend.port,
        proto: flow.proto,
    };
    let Some(snat_port) = nodeport::snat_port(&t, snat_addr, master.rev_nat_index, now) else {
        return Ok(drop(ctx, flow, Reason::CtFull));
    };
    nat::rewrite_dst(ctx, flow, backend.address, backend.port)?;
    // The rewrite above changed the destination only: the source still reads
    // as in `flow`, which rewrite_src needs as the old value.
    nat::rewrite_src(ctx, flow, snat_addr, snat_port)?;
    count(Counter::ServiceDnat);
    match nat::redirect_routed(ctx, in_ifindex, snat_addr, backend.address) {
        Some(verdict) => Ok(verdict),
        None => Ok(drop(ctx, flow, Reason::NoBackend)),
    }
}

/// A remote backend's reply to a SNATed flow: destination back to the
/// client, source back to the frontend, then straight out towards the client.
#[inline(always)]
fn snat_reply(
    ctx: &TcContext,
    flow: &Flow4,
    client: u32,
    client_port: u16,
    rev_nat_index: u32,
) -> Result<i32, ()> {
    // SAFETY: copied out at once.
    let Some(frontend) = (unsafe { LB4_REVNAT.get(rev_nat_index) }).copied() else {
        // The Service is gone: nothing to answer as.
        return Ok(drop(ctx, flow, Reason::NoBackend));
    };
    nat::rewrite_dst(ctx, flow, client, client_port)?;
    nat::rewrite_src(ctx, flow, frontend.address, frontend.port)?;
    // Keep the client -> frontend conntrack entry alive with its replies.
    let svc_key = catena_common::ct::Ct4Key {
        saddr: client,
        daddr: frontend.address,
        sport: client_port,
        dport: frontend.port,
        proto: flow.proto,
        kind: catena_common::ct::CT_SERVICE,
        pad: [0; 2],
    };
    if let Some(entry) = ct::lookup(&svc_key) {
        // SAFETY: pointer from a CT4 lookup in this run.
        unsafe {
            ct::touch(entry, ct::now_ns(), ctx.len(), flow.closing);
            (*entry).flags |= catena_common::ct::CT_FLAG_SEEN_REPLY;
        }
    }
    count(Counter::ReverseNat);
    let in_ifindex = events::ifindex(ctx);
    match nat::redirect_routed(ctx, in_ifindex, frontend.address, client) {
        Some(verdict) => Ok(verdict),
        None => Ok(drop(ctx, flow, Reason::Invalid)),
    }
}
