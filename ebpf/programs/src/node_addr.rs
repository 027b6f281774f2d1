//! NodePorts reached from the node itself and from its pods, in the socket
//! LB (`sock`, `sock6`): kube-proxy serves `<any local address>:<nodePort>`
//! (its `--nodeport-addresses` default, and `127.0.0.1:<nodePort>` for IPv4
//! localhost), so catena does too.
//!
//! Design (Cilium's `sock4_wildcard_lookup`): the agent compiles, besides
//! one frontend per external-device address (which the tc programs on the
//! devices look up by packet destination), one *wildcard* frontend per
//! NodePort, `0.0.0.0:<nodePort>` / `[::]:<nodePort>`. A socket call whose
//! address is no frontend tries that wildcard and takes it when the address
//! is the node's: a loopback address in the node's network namespace, or
//! one of `NODE_ADDR4` / `NODE_ADDR6`, which the agent keeps in line with
//! the node's interfaces. So the cost is one entry per NodePort plus one per
//! node address, not one per (address, NodePort), and an address that comes
//! or goes touches a single small map instead of every Service.
//!
//! The wildcard is looked up before the address check: it exists only for
//! NodePorts, so an ordinary connect() that is no frontend (any other port)
//! still costs one extra hash lookup and nothing more.

use aya_ebpf::{helpers::bpf_get_netns_cookie, programs::SockAddrContext, EbpfContext};

use crate::maps::{NODE_ADDR4, NODE_ADDR6, NODE_NETNS};

/// `::1` in memory order (the last word, network order).
const LOOPBACK6_WORD: u32 = u32::from_be(1);

/// Whether the caller runs in the node's network namespace (not a pod's).
#[inline(always)]
fn in_node_netns(ctx: &SockAddrContext) -> bool {
    let Some(node) = NODE_NETNS.get(0).copied() else {
        return false;
    };
    // SAFETY: bpf_get_netns_cookie accepts a bpf_sock_addr context.
    node != 0 && unsafe { bpf_get_netns_cookie(ctx.as_ptr()) } == node
}

/// Whether IPv4 `addr` (network order) is the node's own for a socket call
/// of `ctx`: 127.0.0.0/8 or 0.0.0.0 (which the kernel connects to loopback)
/// from the node's namespace, or a node address from anywhere (a pod
/// reaching `<node IP>:<nodePort>`).
#[inline(always)]
pub fn is_node4(ctx: &SockAddrContext, addr: u32) -> bool {
    if addr == 0 || addr.to_ne_bytes()[0] == 127 {
        return in_node_netns(ctx);
    }
    // SAFETY: presence only.
    unsafe { NODE_ADDR4.get(&addr) }.is_some()
}

/// [`is_node4`] for IPv6: `::1` or `::` from the node's namespace, or a
/// node address.
#[inline(always)]
pub fn is_node6(ctx: &SockAddrContext, addr: &[u32; 4]) -> bool {
    if addr[0] == 0 && addr[1] == 0 && addr[2] == 0 && (addr[3] == LOOPBACK6_WORD || addr[3] == 0) {
        return in_node_netns(ctx);
    }
    // SAFETY: presence only.
    unsafe { NODE_ADDR6.get(addr) }.is_some()
}
