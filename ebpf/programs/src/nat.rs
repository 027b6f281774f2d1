//! Address/port rewrites with incremental checksum fixes.
//!
//! The IPv4 header checksum gets `bpf_l3_csum_replace`. The L4 checksum covers
//! the pseudo header, so an address change is applied with `BPF_F_PSEUDO_HDR`
//! (which also keeps `CHECKSUM_PARTIAL` skbs from the pod's stack right: only
//! the pseudo-header seed is adjusted there), a port change without it. A UDP
//! checksum of 0 means "none" and must stay 0: `BPF_F_MARK_MANGLED_0` makes the
//! helper skip it, and write 0xffff if the new sum would be 0.

use aya_ebpf::{helpers::bpf_redirect, programs::TcContext};

use crate::parse::{Flow4, IP_CSUM_OFF, IP_DADDR_OFF, IP_SADDR_OFF};

/// Sends the packet back out of the interface it arrived on (the host veth's
/// egress, i.e. to the pod that sent it), with the Ethernet addresses swapped
/// so the pod accepts it. Returns the `TC_ACT_REDIRECT` verdict. Used for
/// packets whose answer belongs to the sender itself (hairpin, rejects):
/// going through the node's routing instead would meet rp_filter and the
/// forwarding setting of whatever primary CNI is in use.
#[inline(always)]
pub fn bounce(ctx: &TcContext) -> Result<i32, ()> {
    let macs: [u8; 12] = ctx.load(0).map_err(|_| ())?;
    let mut swapped = [0u8; 12];
    swapped[..6].copy_from_slice(&macs[6..]);
    swapped[6..].copy_from_slice(&macs[..6]);
    ctx.store(0, &swapped, 0).map_err(|_| ())?;
    // SAFETY: reading the program's own context; plain helper.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    Ok(unsafe { bpf_redirect(ifindex, 0) } as i32)
}

const BPF_F_PSEUDO_HDR: u64 = 1 << 4;
const BPF_F_MARK_MANGLED_0: u64 = 1 << 5;

/// DNAT: destination address and port become `addr:port` (network order).
#[inline(always)]
pub fn rewrite_dst(ctx: &TcContext, flow: &Flow4, addr: u32, port: u16) -> Result<(), ()> {
    rewrite(
        ctx,
        flow,
        IP_DADDR_OFF,
        flow.daddr,
        addr,
        flow.l4_off + 2,
        flow.dport,
        port,
    )
}

/// Reverse NAT: source address and port become `addr:port` (network order).
#[inline(always)]
pub fn rewrite_src(ctx: &TcContext, flow: &Flow4, addr: u32, port: u16) -> Result<(), ()> {
    rewrite(
        ctx,
        flow,
        IP_SADDR_OFF,
        flow.saddr,
        addr,
        flow.l4_off,
        flow.sport,
        port,
    )
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn rewrite(
    ctx: &TcContext,
    flow: &Flow4,
    addr_off: usize,
    old_addr: u32,
    new_addr: u32,
    port_off: usize,
    old_port: u16,
    new_port: u16,
) -> Result<(), ()> {
    let csum_off = flow.l4_csum_off();
    let mangled = if flow.is_udp() {
        BPF_F_MARK_MANGLED_0
    } else {
        0
    };
    if old_addr != new_addr {
        ctx.l4_csum_replace(
            csum_off,
            old_addr as u64,
            new_addr as u64,
            BPF_F_PSEUDO_HDR | mangled | 4,
        )
        .map_err(|_| ())?;
        ctx.l3_csum_replace(IP_CSUM_OFF, old_addr as u64, new_addr as u64, 4)
            .map_err(|_| ())?;
        ctx.store(addr_off, &new_addr, 0).map_err(|_| ())?;
    }
    if old_port != new_port {
        ctx.l4_csum_replace(csum_off, old_port as u64, new_port as u64, mangled | 2)
            .map_err(|_| ())?;
        ctx.store(port_off, &new_port, 0).map_err(|_| ())?;
    }
    Ok(())
}
