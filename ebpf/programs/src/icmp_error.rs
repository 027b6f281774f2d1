//! ICMP errors (destination unreachable, time exceeded, parameter problem)
//! on their way to a pod, about a connection the pod is part of. They quote
//! the offending packet's header, which is what the pod's stack matches the
//! error to its socket by:
//! - for a service flow that quote shows the backend (the packet was
//!   translated after the pod sent it), so it is translated back to the
//!   frontend the socket is connected to; otherwise a connected UDP client
//!   never learns the backend refused (it waits its whole timeout instead of
//!   getting ECONNREFUSED), and TCP misses "fragmentation needed" (a path
//!   MTU black hole);
//! - under policy an error is judged as part of its connection, like a
//!   reply, never as a new flow a default-deny would drop.

use aya_ebpf::programs::TcContext;
use catena_common::{
    ct::{Ct4Key, CT_EGRESS, CT_INGRESS},
    IPPROTO_TCP, IPPROTO_UDP,
};

use crate::{
    ct,
    maps::LB4_REVNAT,
    metrics::count,
    parse::{Flow4, Ipv4Hdr, IPV4_CSUM, IPV4_DADDR, IPV4_HLEN, IP_CSUM_OFF, IP_SADDR_OFF},
};
use catena_common::metrics::Counter;

/// Reads through the load helper: errors are rare, so this path does not
/// need direct packet access, and its offsets (behind the outer header's
/// variable length) are ones the verifier cannot always follow through a
/// direct-access bounds check.
#[inline(always)]
fn load<T>(ctx: &TcContext, off: usize) -> Result<T, ()> {
    ctx.load(off).map_err(|_| ())
}

const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETERPROB: u8 = 12;
/// Type, code, checksum and the 4 type-specific bytes before the quote.
const ICMP_HLEN: usize = 8;
const ICMP_CSUM: usize = 2;

/// What an ICMP packet to a pod is.
pub enum Related {
    /// Not an error about a tracked TCP/UDP connection: handled as any packet.
    No,
    /// An error about a connection the pod opened or accepted (translated
    /// back to the frontend if it was a service flow): let it through.
    Yes,
}

/// Classifies (and for service flows translates) an ICMP packet `flow`
/// delivered to a pod. `Err`: the packet could not be rewritten.
#[inline(always)]
pub fn to_container(ctx: &TcContext, flow: &Flow4) -> Result<Related, ()> {
    let icmp_type: u8 = load(ctx, flow.l4_off)?;
    if !matches!(
        icmp_type,
        ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETERPROB
    ) {
        return Ok(Related::No);
    }
    let inner_off = flow.l4_off + ICMP_HLEN;
    let Ok(inner) = load::<Ipv4Hdr>(ctx, inner_off) else {
        return Ok(Related::No);
    };
    // Quotes with IP options are not worth a variable offset here: such an
    // error is handled as any packet.
    if inner.version_ihl != 0x45 || !matches!(inner.protocol, IPPROTO_TCP | IPPROTO_UDP) {
        return Ok(Related::No);
    }
    let ports_off = inner_off + IPV4_HLEN;
    let Ok(ports) = load::<[u16; 2]>(ctx, ports_off) else {
        return Ok(Related::No);
    };
    // The quote is a packet the pod sent: pod -> remote, as the pod's own
    // connection (CT_EGRESS, keyed after translation) or as its reply to a
    // connection it accepted (CT_INGRESS, keyed remote -> pod).
    let sent = Ct4Key {
        saddr: inner.saddr,
        daddr: inner.daddr,
        sport: ports[0],
        dport: ports[1],
        proto: inner.protocol,
        kind: CT_EGRESS,
        pad: [0; 2],
    };
    if let Some(entry) = ct::lookup(&sent) {
        // SAFETY: pointer from a CT4 lookup in this run.
        let rev_nat_index = unsafe { (*entry).rev_nat_index };
        if rev_nat_index != 0 {
            // SAFETY: copied out at once.
            if let Some(frontend) = unsafe { LB4_REVNAT.get(rev_nat_index) }.copied() {
                let quote = Quote {
                    icmp_csum_off: flow.l4_off + ICMP_CSUM,
                    inner_off,
                    ports_off,
                };
                rewrite_quote(ctx, &quote, &inner, ports[1], frontend.address, frontend.port)?;
                // An error the backend itself sent comes from the frontend,
                // as its replies do; a router's keeps the router's address.
                if flow.saddr == inner.daddr {
                    ctx.l3_csum_replace(
                        IP_CSUM_OFF,
                        flow.saddr as u64,
                        frontend.address as u64,
                        4,
                    )
                    .map_err(|_| ())?;
                    ctx.store(IP_SADDR_OFF, &frontend.address, 0)
                        .map_err(|_| ())?;
                }
                count(Counter::ReverseNat);
            }
        }
        return Ok(Related::Yes);
    }
    let accepted = Ct4Key {
        saddr: inner.daddr,
        daddr: inner.saddr,
        sport: ports[1],
        dport: ports[0],
        kind: CT_INGRESS,
        ..sent
    };
    if ct::lookup(&accepted).is_some() {
        return Ok(Related::Yes);
    }
    Ok(Related::No)
}

/// Where the quoted header lies.
struct Quote {
    icmp_csum_off: usize,
    inner_off: usize,
    ports_off: usize,
}

/// The quote's destination (the backend) becomes `addr:port` (network
/// order). The ICMP checksum covers the quote, so every changed word is
/// accounted there, the quoted IPv4 checksum included. The quoted TCP/UDP
/// checksum is left as it is: it may not even be quoted, and no stack
/// checks it in an ICMP error.
#[inline(always)]
fn rewrite_quote(
    ctx: &TcContext,
    q: &Quote,
    inner: &Ipv4Hdr,
    old_port: u16,
    addr: u32,
    port: u16,
) -> Result<(), ()> {
    let csum_off = q.inner_off + IPV4_CSUM;
    let old_csum = inner.check;
    ctx.l3_csum_replace(csum_off, inner.daddr as u64, addr as u64, 4)
        .map_err(|_| ())?;
    let new_csum: u16 = load(ctx, csum_off)?;
    ctx.store(q.inner_off + IPV4_DADDR, &addr, 0)
        .map_err(|_| ())?;
    ctx.l4_csum_replace(q.icmp_csum_off, inner.daddr as u64, addr as u64, 4)
        .map_err(|_| ())?;
    ctx.l4_csum_replace(q.icmp_csum_off, old_csum as u64, new_csum as u64, 2)
        .map_err(|_| ())?;
    if old_port != port {
        ctx.store(q.ports_off + 2, &port, 0).map_err(|_| ())?;
        ctx.l4_csum_replace(q.icmp_csum_off, old_port as u64, port as u64, 2)
            .map_err(|_| ())?;
    }
    Ok(())
}
