//! `to_netdev`: tc egress of the node's external devices. A local backend's
//! reply to an external client (DNATed by `from_netdev` without SNAT, so it
//! leaves through the stack to the client's address) gets its source
//! restored to the frontend the client connected to (IPv6: `to_netdev6`,
//! by tail call). Everything else passes untouched; the lookup is one
//! conntrack probe per TCP/UDP packet.

use aya_ebpf::{macros::classifier, programs::TcContext};
use catena_common::{
    ct::CT_FLAG_SEEN_REPLY, endpoint::EndpointInfo, events::Reason, metrics::Counter,
    policy::DIR_EGRESS, tail_calls,
};

use crate::{
    ct, events,
    maps::{LB4_REVNAT, TAIL_CALLS6},
    metrics::count,
    nat,
    parse::{self, Packet},
    VERDICT_PASS,
};

#[classifier]
pub fn to_netdev(ctx: TcContext) -> i32 {
    let flow = match parse::parse(&ctx) {
        Ok(Packet::Ipv4(flow)) => flow,
        Ok(Packet::Ipv6) => {
            // SAFETY: our own context; on success this never returns.
            unsafe { TAIL_CALLS6.tail_call(&ctx, tail_calls::TO_NETDEV6) };
            return VERDICT_PASS;
        }
        _ => return VERDICT_PASS,
    };
    if !flow.is_tcp_udp() {
        return VERDICT_PASS;
    }
    let Some(entry) = ct::lookup(&ct::reply_key(&flow)) else {
        return VERDICT_PASS;
    };
    // SAFETY: pointer from a CT4 lookup in this run.
    let rev_nat_index = unsafe { (*entry).rev_nat_index };
    if rev_nat_index == 0 {
        return VERDICT_PASS;
    }
    // SAFETY: copied out at once.
    let Some(frontend) = (unsafe { LB4_REVNAT.get(rev_nat_index) }).copied() else {
        return VERDICT_PASS;
    };
    // SAFETY: pointer from a CT4 lookup in this run.
    unsafe {
        ct::touch(entry, ct::now_ns(), ctx.len(), flow.closing);
        (*entry).flags |= CT_FLAG_SEEN_REPLY;
    }
    if nat::rewrite_src(&ctx, &flow, frontend.address, frontend.port).is_err() {
        let ev = events::base(
            DIR_EGRESS,
            events::ifindex(&ctx),
            &EndpointInfo::default(),
            Some(&flow),
        );
        return events::drop(ev, Reason::Invalid);
    }
    count(Counter::ReverseNat);
    VERDICT_PASS
}
