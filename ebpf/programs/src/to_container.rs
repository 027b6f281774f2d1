//! `to_container`: tc egress of the host-side veth, i.e. every packet delivered
//! to the pod. Replies of service flows the pod opened get their source
//! restored to the frontend the pod connected to. For an endpoint under
//! policy, ingress policy decides new connections (remote identity from the
//! ipcache by source address); replies of connections the pod opened and
//! established connections pass on conntrack.
//!
//! ICMP errors about the pod's connections pass as part of them, their
//! quote translated back to the frontend for service flows (`icmp_error`).
//!
//! No `ENDPOINTS` entry: drop (fail closed, as from_container). ARP and other
//! non-IP frames pass untouched; IPv6 service replies are reverse-NATed
//! (`service6`) unless ingress is enforced, which drops IPv6 (neighbour
//! discovery always passes).

use aya_ebpf::{macros::classifier, programs::TcContext};
use catena_common::{
    ct::{CT_FLAG_SEEN_REPLY, CT_SERVICE},
    endpoint::EndpointInfo,
    events::Reason,
    lb::HAIRPIN_ADDR,
    metrics::Counter,
    policy::{DIR_INGRESS, POLICY_EP_INGRESS},
    IPPROTO_ICMP,
};

use crate::endpoint::{self, Packet4};
use crate::{
    ct, events, icmp_error, maps::LB4_REVNAT, metrics::count, nat, parse::Flow4, policy, VERDICT_PASS,
};

#[classifier]
pub fn to_container(ctx: TcContext) -> i32 {
    count(Counter::ToContainer);
    let Packet4 {
        ifindex,
        ep,
        flags,
        flow,
    } = match endpoint::start(
        &ctx,
        DIR_INGRESS,
        POLICY_EP_INGRESS,
        catena_common::tail_calls::TO_CONTAINER6,
    ) {
        Ok(p) => p,
        Err(verdict) => return verdict,
    };
    match try_to_container(&ctx, &ep, flags, &flow) {
        Ok(verdict) => verdict,
        Err(()) => {
            let ev = events::base(DIR_INGRESS, ifindex, &ep, Some(&flow));
            events::drop(ev, Reason::Invalid)
        }
    }
}

#[inline(always)]
fn try_to_container(
    ctx: &TcContext,
    ep: &EndpointInfo,
    flags: u32,
    flow: &Flow4,
) -> Result<i32, ()> {
    // An ICMP error about one of the pod's connections belongs to it (and
    // quotes the backend if it was a service flow).
    if flow.proto == IPPROTO_ICMP && !flow.fragment {
        if let icmp_error::Related::Yes = icmp_error::to_container(ctx, flow)? {
            return Ok(VERDICT_PASS);
        }
    }
    // Without policy only TCP/UDP can be a service reply (as before policy
    // existed); under policy every reply of a connection the pod opened
    // passes here.
    if flow.is_tcp_udp() || (flags != 0 && !flow.fragment) {
        if let Some(entry) = ct::lookup(&ct::reply_key(flow)) {
            // SAFETY: pointer from a CT4 lookup in this run.
            let rev_nat_index = unsafe { (*entry).rev_nat_index };
            // SAFETY: copied out at once (index 0 is never written).
            let frontend = if rev_nat_index != 0 && flow.is_tcp_udp() {
                unsafe { LB4_REVNAT.get(rev_nat_index) }.copied()
            } else {
                None
            };
            if frontend.is_none() && flags == 0 {
                return Ok(VERDICT_PASS);
            }
            // SAFETY: pointer from a CT4 lookup in this run.
            unsafe {
                ct::touch(entry, ct::now_ns(), ctx.len(), flow.closing);
                (*entry).flags |= CT_FLAG_SEEN_REPLY;
            }
            if let Some(frontend) = frontend {
                nat::rewrite_src(ctx, flow, frontend.address, frontend.port)?;
                count(Counter::ReverseNat);
            }
            return Ok(VERDICT_PASS);
        }
    }
    if flags == 0 {
        return Ok(VERDICT_PASS);
    }
    // A hairpin flow's reply was reverse-NATed by from_container and bounced
    // here as frontend -> pod: it belongs to the pod's own service flow.
    if flow.is_tcp_udp() && ct::lookup(&ct::reversed_key(flow, CT_SERVICE)).is_some() {
        return Ok(VERDICT_PASS);
    }
    // The hairpin address stands for the pod itself (a pod reaching itself
    // through a service), whatever the ipcache says about it.
    Ok(policy::connection(
        ctx,
        ep,
        flags,
        DIR_INGRESS,
        flow,
        || {
            if flow.saddr == HAIRPIN_ADDR {
                ep.identity
            } else {
                policy::ipcache(flow.saddr)
            }
        },
    ))
}
