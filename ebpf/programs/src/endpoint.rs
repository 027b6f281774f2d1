//! The start both tc programs share: whose interface this is, its policy
//! flags, and the parsed packet. Everything that is not an IPv4 flow to judge
//! is settled here (IPv6 goes on to its own programs), the same way in both
//! directions except one: what the pod sends over IPv6 has its source
//! checked first (anti-spoofing, before neighbour discovery passes).

use aya_ebpf::programs::TcContext;
use catena_common::{
    endpoint::{EndpointInfo, EP_FLAG_ANTI_SPOOF},
    events::Reason,
    policy::DIR_EGRESS,
    IPPROTO_TCP, IPPROTO_UDP,
};

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
/// `TAIL_CALLS6`: services, then policy); neighbour discovery passes here.
/// In the egress direction (what the pod sends) an endpoint with
/// `EP_FLAG_ANTI_SPOOF` first has its IPv6 source checked (`spoofed6`), ND
/// included; IPv4 sources are checked by `from_container` itself. Should the slot be empty (never, once the agent has loaded the
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
        // Before anything lets IPv6 through (neighbour discovery included:
        // a forged source there would poison the node's neighbour cache).
        Ok(Packet::Ipv6) if direction == DIR_EGRESS && ep.flags & EP_FLAG_ANTI_SPOOF != 0 => {
            if let Some(verdict) = spoofed6(ctx, ifindex, &ep, direction) {
                return Err(verdict);
            }
            Err(ipv6(ctx, ifindex, &ep, direction, enforced, ipv6_call))
        }
        Ok(Packet::Ipv6) => Err(ipv6(ctx, ifindex, &ep, direction, enforced, ipv6_call)),
        Err(()) if enforced => {
            let ev = events::base(direction, ifindex, &ep, None);
            Err(events::drop(ev, Reason::Invalid))
        }
        // Not ours to judge: a malformed packet is the stack's business and
        // we have not touched it.
        Err(()) => Err(VERDICT_PASS),
    }
}

/// An IPv6 packet of a known endpoint: neighbour discovery passes, anything
/// else goes to the program's IPv6 path (`ipv6_call`); should that slot be
/// empty, it passes, or is dropped if `direction` is enforced.
#[inline(always)]
fn ipv6(
    ctx: &TcContext,
    ifindex: u32,
    ep: &EndpointInfo,
    direction: u8,
    enforced: bool,
    ipv6_call: u32,
) -> i32 {
    if parse::is_ipv6_nd(ctx) {
        return VERDICT_PASS;
    }
    // SAFETY: our own context; on success this never returns.
    unsafe { TAIL_CALLS6.tail_call(ctx, ipv6_call) };
    if enforced {
        // No IPv6 program to judge it: fail closed.
        let ev = events::base(direction, ifindex, ep, None);
        return events::drop(ev, Reason::UnsupportedL3);
    }
    VERDICT_PASS
}

/// IPv6 anti-spoofing (`EP_FLAG_ANTI_SPOOF`): `Some(drop)` unless the source
/// is the pod's IPv6 address, link-local (fe80::/10) or unspecified (`::`).
/// A truncated header is not judged here (the IPv6 path decides on it).
#[inline(always)]
fn spoofed6(ctx: &TcContext, ifindex: u32, ep: &EndpointInfo, direction: u8) -> Option<i32> {
    let hdr: [[u32; 4]; 2] = parse::read(ctx, parse::IP6_SADDR_OFF).ok()?;
    let saddr = hdr[0];
    if saddr == ep.ipv6 || saddr == [0; 4] || u32::from_be(saddr[0]) & 0xffc0_0000 == 0xfe80_0000 {
        return None;
    }
    // The event names the flow as far as the fixed header tells it.
    let next: u8 = parse::read(ctx, parse::ETH_HLEN + 6).unwrap_or(0);
    let ports: [u16; 2] = if next == IPPROTO_TCP || next == IPPROTO_UDP {
        parse::read(ctx, parse::IP6_L4_OFF).unwrap_or([0; 2])
    } else {
        [0; 2]
    };
    let mut ev = events::base6(
        direction, ifindex, ep, &saddr, &hdr[1], ports[0], ports[1], next,
    );
    Some(events::drop6(&mut ev, Reason::SpoofedSource))
}
