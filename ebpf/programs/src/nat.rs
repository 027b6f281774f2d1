//! Address/port rewrites with incremental checksum fixes.
//!
//! The IPv4 header checksum gets `bpf_l3_csum_replace`. The L4 checksum covers
//! the pseudo header, so an address change is applied with `BPF_F_PSEUDO_HDR`
//! (which also keeps `CHECKSUM_PARTIAL` skbs from the pod's stack right: only
//! the pseudo-header seed is adjusted there), a port change without it. A UDP
//! checksum of 0 means "none" and must stay 0: `BPF_F_MARK_MANGLED_0` makes the
//! helper skip it, and write 0xffff if the new sum would be 0.

use aya_ebpf::{
    bindings::{bpf_fib_lookup as FibParams, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS},
    helpers::{bpf_fib_lookup, bpf_redirect, bpf_redirect_neigh},
    programs::TcContext,
};

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

/// Forwards the (already rewritten) packet out of the device the kernel's
/// routing table picks for its destination, resolving the next hop's MAC
/// through the neighbour table (`bpf_redirect_neigh`). Returns the
/// `TC_ACT_REDIRECT` verdict, or `None` when the destination is not routed
/// out of a device (local, unreachable, forwarding off on `in_ifindex`).
///
/// Used where the stack must be bypassed: a packet whose source was
/// translated to (or restored as) one of the node's own addresses would be
/// dropped by the input route check as a martian ("local source arriving
/// from outside").
#[inline(always)]
pub fn redirect_routed(ctx: &TcContext, in_ifindex: u32, saddr: u32, daddr: u32) -> Option<i32> {
    let out = route_ifindex(ctx, in_ifindex, saddr, daddr)?;
    // SAFETY: plain helper; no next-hop parameters: the kernel resolves the
    // neighbour from the skb's own route.
    let verdict = unsafe { bpf_redirect_neigh(out, core::ptr::null_mut(), 0, 0) };
    Some(verdict as i32)
}

/// The device the FIB forwards `saddr -> daddr` (network order) out of, as
/// seen from `in_ifindex`.
#[inline(always)]
pub fn route_ifindex(ctx: &TcContext, in_ifindex: u32, saddr: u32, daddr: u32) -> Option<u32> {
    // SAFETY: an all-zero bpf_fib_lookup is a valid (empty) parameter block.
    let mut params: FibParams = unsafe { core::mem::zeroed() };
    params.family = AF_INET;
    params.ifindex = in_ifindex;
    params.__bindgen_anon_3.ipv4_src = saddr;
    params.__bindgen_anon_4.ipv4_dst = daddr;
    // tot_len 0: no MTU verdict (the stack's own checks apply on output).
    // SAFETY: the program's skb and a parameter block on our stack.
    let ret = unsafe {
        bpf_fib_lookup(
            ctx.skb.skb as *mut _,
            &mut params,
            core::mem::size_of::<FibParams>() as i32,
            0,
        )
    };
    // NO_NEIGH still names the output device; bpf_redirect_neigh resolves it.
    if ret == BPF_FIB_LKUP_RET_SUCCESS as i64 || ret == BPF_FIB_LKUP_RET_NO_NEIGH as i64 {
        Some(params.ifindex)
    } else {
        None
    }
}

const AF_INET: u8 = 2;
