//! State of IPv6 north-south flows, the twin of `nodeport`: the SNAT
//! address of a device (`DEVICES6`), the SNAT table (`SNAT6`), and where the
//! FIB sends a packet, which also tells a local backend from a remote one
//! (see catena_common::nodeport for why there is no `LOCAL_EP6`), and the
//! address rewrites of those programs.

use aya_ebpf::{
    bindings::{
        bpf_fib_lookup as FibParams, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
        BPF_NOEXIST,
    },
    helpers::{bpf_fib_lookup, bpf_get_prandom_u32, bpf_redirect_neigh},
    programs::TcContext,
};
use catena_common::{
    lb6::Addr6,
    nodeport::{Snat6Key, Snat6Value, SNAT_DIR_IN, SNAT_DIR_OUT, SNAT_PORT_MAX, SNAT_PORT_MIN},
};

use crate::{
    maps::{DEVICES6, ENDPOINTS, SNAT6},
    parse::{Flow6, IP6_DADDR_OFF, IP6_L4_OFF, IP6_SADDR_OFF},
};

/// Ports tried before a new flow gives up, as in `nodeport`.
const SNAT_TRIES: u32 = 8;
const SNAT_RANGE: u32 = (SNAT_PORT_MAX - SNAT_PORT_MIN) as u32 + 1;
const AF_INET6: u8 = 10;
const BPF_F_PSEUDO_HDR: u64 = 1 << 4;
const BPF_F_MARK_MANGLED_0: u64 = 1 << 5;

/// The IPv6 SNAT address of external device `ifindex`, if catena manages
/// it and it has one.
#[inline(always)]
pub fn device_addr(ifindex: u32) -> Option<Addr6> {
    // SAFETY: copied out at once.
    let dev = unsafe { DEVICES6.get(&ifindex) }.copied()?;
    (dev.ipv6 != [0; 4]).then_some(dev.ipv6)
}

/// The device the FIB forwards `saddr -> daddr` out of, as seen from
/// `in_ifindex` (which must have IPv6 forwarding on, as the stack would
/// need to forward the packet itself). `None`: not routed out of a device.
#[inline(always)]
pub fn route_ifindex(
    ctx: &TcContext,
    in_ifindex: u32,
    saddr: &Addr6,
    daddr: &Addr6,
) -> Option<u32> {
    // SAFETY: an all-zero bpf_fib_lookup is a valid (empty) parameter block.
    let mut params: FibParams = unsafe { core::mem::zeroed() };
    params.family = AF_INET6;
    params.ifindex = in_ifindex;
    params.__bindgen_anon_3.ipv6_src = *saddr;
    params.__bindgen_anon_4.ipv6_dst = *daddr;
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

/// Whether `ifindex` is a pod veth catena manages: a backend routed out of
/// it is on this node.
#[inline(always)]
pub fn is_endpoint_device(ifindex: u32) -> bool {
    // SAFETY: only the presence is used.
    unsafe { ENDPOINTS.get(&ifindex) }.is_some()
}

/// Sends the (already rewritten) packet out of `ifindex`, the next hop's
/// MAC resolved from the kernel's own route for its destination. Returns
/// the `TC_ACT_REDIRECT` verdict.
#[inline(always)]
pub fn redirect(ifindex: u32) -> i32 {
    // SAFETY: plain helper; no next-hop parameters (see `nat::redirect_routed`).
    unsafe { bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) as i32 }
}

/// A flow to a frontend DNATed to a backend, before SNAT.
pub struct Translated6 {
    pub client: Addr6,
    pub client_port: u16,
    /// The destination the client sent to (see `nodeport::Translated`).
    pub frontend: Addr6,
    pub frontend_port: u16,
    pub backend: Addr6,
    pub backend_port: u16,
    pub proto: u8,
}

/// The reply `saddr:sport -> daddr:dport` of a SNATed flow: the client to
/// restore and the frontend index. Refreshes the entry's clock.
#[inline(always)]
pub fn reply_of(
    saddr: &Addr6,
    daddr: &Addr6,
    sport: u16,
    dport: u16,
    proto: u8,
    now: u64,
) -> Option<Snat6Value> {
    let key = Snat6Key {
        saddr: *saddr,
        daddr: *daddr,
        sport,
        dport,
        proto,
        dir: SNAT_DIR_IN,
        pad: [0; 2],
    };
    let entry = SNAT6.get_ptr_mut(&key)?;
    // SAFETY: a live value pointer from this run's lookup.
    let e = unsafe { &mut *entry };
    e.last_seen_ns = now;
    Some(*e)
}

/// The node port `t` leaves with from `snat_addr` (`nodeport::snat_port`
/// for IPv6, which says why the outbound entry is keyed by the frontend):
/// the flow's existing translation, or a newly claimed port, the inbound
/// entry claimed with BPF_NOEXIST so two flows never share a reply tuple.
/// `None`: no free port after `SNAT_TRIES` or the table is full.
#[inline(always)]
pub fn snat_port(t: &Translated6, snat_addr: &Addr6, rev_nat_index: u32, now: u64) -> Option<u16> {
    let out_key = Snat6Key {
        saddr: t.client,
        daddr: t.frontend,
        sport: t.client_port,
        dport: t.frontend_port,
        proto: t.proto,
        dir: SNAT_DIR_OUT,
        pad: [0; 2],
    };
    if let Some(entry) = SNAT6.get_ptr_mut(&out_key) {
        // SAFETY: a live value pointer from this run's lookup.
        let out = unsafe { &mut *entry };
        // The LRU may have evicted one direction alone, and the flow may
        // have moved to another backend since: reuse the translation only
        // while its reply entry still leads back here.
        if out.to_addr == *snat_addr && leads_back(t, snat_addr, out.to_port, rev_nat_index, now) {
            out.last_seen_ns = now;
            return Some(out.to_port);
        }
    }
    let mut port = SNAT_PORT_MIN as u32 + u16::from_be(t.client_port) as u32 % SNAT_RANGE;
    let back = Snat6Value {
        to_addr: t.client,
        to_port: t.client_port,
        rev_nat_index,
        pad: 0,
        last_seen_ns: now,
    };
    for _ in 0..SNAT_TRIES {
        let nport = (port as u16).to_be();
        let in_key = Snat6Key {
            saddr: t.backend,
            daddr: *snat_addr,
            sport: t.backend_port,
            dport: nport,
            proto: t.proto,
            dir: SNAT_DIR_IN,
            pad: [0; 2],
        };
        // A taken port is still ours when its reply entry already leads back
        // to this very flow (its outbound entry evicted alone).
        if SNAT6.insert(&in_key, &back, BPF_NOEXIST as u64).is_ok()
            || leads_back(t, snat_addr, nport, rev_nat_index, now)
        {
            let out = Snat6Value {
                to_addr: *snat_addr,
                to_port: nport,
                rev_nat_index,
                pad: 0,
                last_seen_ns: now,
            };
            if SNAT6.insert(&out_key, &out, 0).is_err() {
                let _ = SNAT6.remove(&in_key);
                return None;
            }
            return Some(nport);
        }
        // SAFETY: helper without arguments.
        port = SNAT_PORT_MIN as u32 + unsafe { bpf_get_prandom_u32() } % SNAT_RANGE;
    }
    None
}

/// Whether the reply tuple `t.backend -> snat_addr:nport` belongs to `t`:
/// it restores `t`'s client and port and answers as `t`'s frontend.
#[inline(always)]
fn leads_back(
    t: &Translated6,
    snat_addr: &Addr6,
    nport: u16,
    rev_nat_index: u32,
    now: u64,
) -> bool {
    match reply_of(&t.backend, snat_addr, t.backend_port, nport, t.proto, now) {
        Some(back) => {
            back.to_addr == t.client
                && back.to_port == t.client_port
                && back.rev_nat_index == rev_nat_index
        }
        None => false,
    }
}

/// DNAT: destination address and port become `addr:port`.
#[inline(always)]
pub fn rewrite_dst(ctx: &TcContext, flow: &Flow6, addr: &Addr6, port: u16) -> Result<(), ()> {
    rewrite(
        ctx,
        flow,
        IP6_DADDR_OFF,
        &flow.daddr,
        addr,
        IP6_L4_OFF + 2,
        flow.dport,
        port,
    )
}

/// SNAT / reverse NAT: source address and port become `addr:port`.
#[inline(always)]
pub fn rewrite_src(ctx: &TcContext, flow: &Flow6, addr: &Addr6, port: u16) -> Result<(), ()> {
    rewrite(
        ctx,
        flow,
        IP6_SADDR_OFF,
        &flow.saddr,
        addr,
        IP6_L4_OFF,
        flow.sport,
        port,
    )
}

/// `nat6`'s rewrite with the address folded into the L4 checksum word by
/// word (`bpf_l4_csum_replace` of 4 bytes with `BPF_F_PSEUDO_HDR`, as `nat`
/// does for IPv4) instead of through one `bpf_csum_diff` of two stack
/// buffers: in these programs that form crashes bpf-linker's LLVM 22
/// ("Post-RA pseudo instruction expansion", SIGILL). Up to four helper
/// calls instead of two, per rewritten address.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn rewrite(
    ctx: &TcContext,
    flow: &Flow6,
    addr_off: usize,
    old_addr: &Addr6,
    new_addr: &Addr6,
    port_off: usize,
    old_port: u16,
    new_port: u16,
) -> Result<(), ()> {
    let csum_off = flow.l4_csum_off();
    // A UDP checksum of 0 means "none" and stays 0 (see `nat`).
    let mangled = if flow.is_udp() {
        BPF_F_MARK_MANGLED_0
    } else {
        0
    };
    let mut changed = false;
    let mut i = 0;
    while i < 4 {
        if old_addr[i] != new_addr[i] {
            ctx.l4_csum_replace(
                csum_off,
                old_addr[i] as u64,
                new_addr[i] as u64,
                BPF_F_PSEUDO_HDR | mangled | 4,
            )
            .map_err(|_| ())?;
            changed = true;
        }
        i += 1;
    }
    if changed {
        ctx.store(addr_off, new_addr, 0).map_err(|_| ())?;
    }
    if old_port != new_port {
        ctx.l4_csum_replace(csum_off, old_port as u64, new_port as u64, mangled | 2)
            .map_err(|_| ())?;
        ctx.store(port_off, &new_port, 0).map_err(|_| ())?;
    }
    Ok(())
}
