//! `from_container`: tc ingress of the host-side veth, i.e. every packet the pod
//! sends. IPv4 TCP/UDP to a service frontend is DNATed to a backend chosen once
//! per flow (sticky per client with ClientIP affinity) and remembered in
//! conntrack; a pod reaching itself is source-NATed to the hairpin address
//! and its replies translated back here; a TCP SYN to a frontend without
//! backends is answered with a RST;
//! everything else passes untouched.

use aya_ebpf::{macros::classifier, programs::TcContext};
use catena_common::{ct::CT_FLAG_SEEN_REPLY, lb::HAIRPIN_ADDR, metrics::Counter};

use crate::{
    ct, lb,
    maps::LB4_REVNAT,
    metrics::count,
    nat,
    parse::{self, Flow4, Parsed},
    reject, VERDICT_DROP, VERDICT_PASS,
};

#[classifier]
pub fn from_container(ctx: TcContext) -> i32 {
    count(Counter::FromContainer);
    match try_from_container(&ctx) {
        Ok(verdict) => verdict,
        Err(()) => {
            count(Counter::DropInvalid);
            VERDICT_DROP
        }
    }
}

#[inline(always)]
fn try_from_container(ctx: &TcContext) -> Result<i32, ()> {
    let flow = match parse::parse(ctx) {
        Ok(Parsed::Flow(flow)) => flow,
        Ok(Parsed::Other) => return Ok(VERDICT_PASS),
        // Not ours to judge: a malformed packet is the stack's business and we
        // have not touched it (only service traffic is dropped by catena).
        Err(()) => return Ok(VERDICT_PASS),
    };
    if flow.daddr == HAIRPIN_ADDR {
        return hairpin_reply(ctx, &flow);
    }
    let master_key = lb::master_key(flow.daddr, flow.dport, flow.proto);
    let Some(master) = lb::lookup_master(&master_key) else {
        return Ok(VERDICT_PASS);
    };

    let now = ct::now_ns();
    let len = ctx.len();
    let svc_ct_key = ct::service_key(&flow);

    // An existing flow keeps its backend as long as that backend still exists.
    let mut chosen = None;
    if let Some(entry) = ct::lookup(&svc_ct_key) {
        // SAFETY: pointer from a CT4 lookup in this run.
        let id = unsafe { (*entry).backend_id };
        if let Some(backend) = lb::backend(id) {
            // SAFETY: as above.
            unsafe { ct::touch(entry, now, len, flow.closing) };
            chosen = Some(backend);
        }
    }
    let backend = match chosen {
        Some(backend) => backend,
        None => {
            if master.count == 0 {
                return no_backend(ctx, &flow);
            }
            let Some((id, backend)) = lb::select_for_client(&master_key, &master, flow.saddr, now)
            else {
                // The agent writes slots before raising the count, so this is a
                // backend removed under us: treat as no backend.
                return no_backend(ctx, &flow);
            };
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
                count(Counter::DropCtFull);
                return Ok(VERDICT_DROP);
            }
            backend
        }
    };

    // A pod reaching itself: its own address as the source would make its
    // stack drop the packet (a local source arriving from outside), so the
    // source becomes the hairpin address, and the reply comes back here.
    let hairpin = backend.address == flow.saddr;
    let ct_saddr = if hairpin { HAIRPIN_ADDR } else { flow.saddr };
    // The translated tuple is what replies are matched against.
    let egress_key = ct::egress_key(&flow, ct_saddr, backend.address, backend.port);
    match ct::lookup(&egress_key) {
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
                count(Counter::DropCtFull);
                return Ok(VERDICT_DROP);
            }
        }
    }

    nat::rewrite_dst(ctx, &flow, backend.address, backend.port)?;
    count(Counter::ServiceDnat);
    if hairpin {
        nat::rewrite_src(ctx, &flow, HAIRPIN_ADDR, flow.sport)?;
        return nat::bounce(ctx);
    }
    Ok(VERDICT_PASS)
}

/// The backend's reply of a hairpin flow (backend -> hairpin address): the
/// source becomes the frontend and the destination the pod itself (client
/// and backend are one), then it goes straight back to the pod.
#[inline(always)]
fn hairpin_reply(ctx: &TcContext, flow: &Flow4) -> Result<i32, ()> {
    let Some(entry) = ct::lookup(&ct::reply_key(flow)) else {
        return Ok(VERDICT_PASS);
    };
    // SAFETY: pointer from a CT4 lookup in this run.
    let rev_nat_index = unsafe { (*entry).rev_nat_index };
    // SAFETY: copied out at once.
    let Some(frontend) = (unsafe { LB4_REVNAT.get(rev_nat_index) }).copied() else {
        return Ok(VERDICT_PASS);
    };
    // SAFETY: pointer from a CT4 lookup in this run.
    unsafe {
        ct::touch(entry, ct::now_ns(), ctx.len(), flow.closing);
        (*entry).flags |= CT_FLAG_SEEN_REPLY;
    }
    nat::rewrite_src(ctx, flow, frontend.address, frontend.port)?;
    nat::rewrite_dst(ctx, flow, flow.saddr, flow.dport)?;
    count(Counter::ReverseNat);
    nat::bounce(ctx)
}

/// A new flow to a frontend without backends: a TCP SYN gets a RST (the client
/// fails at once with ECONNREFUSED), anything else is dropped.
#[inline(always)]
fn no_backend(ctx: &TcContext, flow: &Flow4) -> Result<i32, ()> {
    if let Some(verdict) = reject::tcp_reset(ctx, flow)? {
        count(Counter::RejectNoBackend);
        return Ok(verdict);
    }
    count(Counter::DropNoBackend);
    Ok(VERDICT_DROP)
}
