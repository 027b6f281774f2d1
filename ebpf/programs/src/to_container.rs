//! `to_container`: tc egress of the host-side veth, i.e. every packet delivered
//! to the pod. Replies of service flows the pod opened get their source
//! restored to the frontend the pod connected to.

use aya_ebpf::{macros::classifier, programs::TcContext};
use catena_common::{ct::CT_FLAG_SEEN_REPLY, metrics::Counter};

use crate::{
    ct,
    maps::LB4_REVNAT,
    metrics::count,
    nat,
    parse::{self, Parsed},
    VERDICT_DROP, VERDICT_PASS,
};

#[classifier]
pub fn to_container(ctx: TcContext) -> i32 {
    count(Counter::ToContainer);
    match try_to_container(&ctx) {
        Ok(verdict) => verdict,
        Err(()) => {
            count(Counter::DropInvalid);
            VERDICT_DROP
        }
    }
}

#[inline(always)]
fn try_to_container(ctx: &TcContext) -> Result<i32, ()> {
    let flow = match parse::parse(ctx) {
        Ok(Parsed::Flow(flow)) => flow,
        Ok(Parsed::Other) | Err(()) => return Ok(VERDICT_PASS),
    };
    let Some(entry) = ct::lookup(&ct::reply_key(&flow)) else {
        return Ok(VERDICT_PASS);
    };
    // SAFETY: pointer from a CT4 lookup in this run.
    let rev_nat_index = unsafe { (*entry).rev_nat_index };
    if rev_nat_index == 0 {
        return Ok(VERDICT_PASS);
    }
    // SAFETY: copied out at once.
    let Some(frontend) = (unsafe { LB4_REVNAT.get(rev_nat_index) }).copied() else {
        return Ok(VERDICT_PASS);
    };
    // SAFETY: pointer from a CT4 lookup in this run.
    unsafe {
        ct::touch(entry, ct::now_ns(), ctx.len(), flow.closing);
        (*entry).flags |= CT_FLAG_SEEN_REPLY;
    }
    nat::rewrite_src(ctx, &flow, frontend.address, frontend.port)?;
    count(Counter::ReverseNat);
    Ok(VERDICT_PASS)
}
