//! IPv6 address/port rewrites. IPv6 has no header checksum; the L4 checksum
//! covers the pseudo header, so a 128-bit address change is folded into it
//! as a `bpf_csum_diff` of the old and new address applied with
//! `BPF_F_PSEUDO_HDR` (which keeps `CHECKSUM_PARTIAL` skbs right, as in
//! `nat`). Ports as in `nat`.

use aya_ebpf::{helpers::bpf_csum_diff, programs::TcContext};

use crate::parse::{Flow6, IP6_DADDR_OFF, IP6_SADDR_OFF};

const BPF_F_PSEUDO_HDR: u64 = 1 << 4;
const BPF_F_MARK_MANGLED_0: u64 = 1 << 5;

/// DNAT: destination address and port become `addr:port` (network order).
#[inline(always)]
pub fn rewrite_dst(ctx: &TcContext, flow: &Flow6, addr: &[u32; 4], port: u16) -> Result<(), ()> {
    rewrite(
        ctx,
        flow,
        IP6_DADDR_OFF,
        &flow.daddr,
        addr,
        Flow6::L4_OFF + 2,
        flow.dport,
        port,
    )
}

/// Reverse NAT: source address and port become `addr:port` (network order).
#[inline(always)]
pub fn rewrite_src(ctx: &TcContext, flow: &Flow6, addr: &[u32; 4], port: u16) -> Result<(), ()> {
    rewrite(
        ctx,
        flow,
        IP6_SADDR_OFF,
        &flow.saddr,
        addr,
        Flow6::L4_OFF,
        flow.sport,
        port,
    )
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn rewrite(
    ctx: &TcContext,
    flow: &Flow6,
    addr_off: usize,
    old_addr: &[u32; 4],
    new_addr: &[u32; 4],
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
        let mut from = *old_addr;
        let mut to = *new_addr;
        // SAFETY: two 16-byte buffers on our stack, sizes multiples of 4.
        let diff = unsafe { bpf_csum_diff(from.as_mut_ptr(), 16, to.as_mut_ptr(), 16, 0) };
        if diff < 0 {
            return Err(());
        }
        ctx.l4_csum_replace(csum_off, 0, diff as u32 as u64, BPF_F_PSEUDO_HDR | mangled)
            .map_err(|_| ())?;
        ctx.store(addr_off, new_addr, 0).map_err(|_| ())?;
    }
    if old_port != new_port {
        ctx.l4_csum_replace(csum_off, old_port as u64, new_port as u64, mangled | 2)
            .map_err(|_| ())?;
        ctx.store(port_off, &new_port, 0).map_err(|_| ())?;
    }
    Ok(())
}
