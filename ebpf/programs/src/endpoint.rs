//! The start both tc programs share: whose interface this is, its policy
//! flags, and the parsed packet. Everything that is not an IPv4 flow to judge
//! is settled here (IPv6 goes on to its own programs), the same way in both
//! directions.

use aya_ebpf::programs::TcContext;
use catena_common::{endpoint::EndpointInfo, events::Reason};

use crate::{
    events,
    maps::{ENDPOINTS, TAIL_CALLS6},
    parse::{self, Flow4, Packet},
    policy, VERDICT_PASS,
};

pub struct Packet4 {
    pub ifindex: u32,
    pub ep: EndpointInfo,
    /// `POLICY_EP_*` flags of the endpoint.
    pub flags: u32,
    pub flow: Flow4,
}

/// `Ok`: an IPv4 packet of a known endpoint, for the program's own logic.
/// `Err(verdict)`: already decided. No `ENDPOINTS` entry drops (fail closed:
/// the agent writes it before attaching); ARP and other non-IP frames pass;
/// unparseable packets pass unless `direction` is enforced (`enforced_flag`).
/// IPv6 tail-calls the program's IPv6 path (`ipv6_call`, a slot of
/// `TAIL_CALLS6`: services, then policy); neighbour discovery always passes
/// here. Should the slot be empty (never, once the agent has loaded the
/// programs), IPv6 passes untranslated, or is dropped if `direction` is
/// enforced (fail closed: IPv6 must not bypass policy).
#[inline(always)]
pub fn start(
    ctx: &TcContext,
    direction: u8,
    enforced_flag: u32,
    ipv6_call: u32,
) -> Result<Packet4, i32> {
    let ifindex = events::ifindex(ctx);
    // SAFETY: copied out at once.
    let Some(ep) = (unsafe { ENDPOINTS.get(ifindex) }).copied() else {
        let ev = events::base(direction, ifindex, &EndpointInfo::default(), None);
        return Err(events::drop(ev, Reason::UnknownEndpoint));
    };
    let flags = policy::endpoint_flags(ep.endpoint_id);
    let enforced = flags & enforced_flag != 0;
    match parse::parse(ctx) {
        Ok(Packet::Ipv4(flow)) => Ok(Packet4 {
            ifindex,
            ep,
            flags,
            flow,
        }),
        Ok(Packet::Other) => Err(VERDICT_PASS),
        Ok(Packet::Ipv6) if parse::is_ipv6_nd(ctx) => Err(VERDICT_PASS),
        Ok(Packet::Ipv6) => {
            // SAFETY: our own context; on success this never returns.
            unsafe { TAIL_CALLS6.tail_call(ctx, ipv6_call) };
            if enforced {
                // No IPv6 program to judge it: fail closed.
                let ev = events::base(direction, ifindex, &ep, None);
                return Err(events::drop(ev, Reason::UnsupportedL3));
            }
            Err(VERDICT_PASS)
        }
        Err(()) if enforced => {
            let ev = events::base(direction, ifindex, &ep, None);
            Err(events::drop(ev, Reason::Invalid))
        }
        // Not ours to judge: a malformed packet is the stack's business and
        // we have not touched it.
        Err(()) => Err(VERDICT_PASS),
    }
}
