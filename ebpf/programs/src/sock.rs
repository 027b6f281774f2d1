//! Socket-level load balancing for processes in a cgroup (attached by the
//! agent to the node's cgroup2 root): packets from the node's own processes
//! never cross a host veth's tc ingress, so a ClusterIP is translated where the
//! destination is chosen instead, in the socket calls themselves.
//!
//! - `cgroup/connect4` (TCP and connected UDP) and `cgroup/sendmsg4`
//!   (unconnected UDP): a frontend address becomes a backend, chosen once per
//!   call from the same `LB4_SERVICES` / `LB4_BACKENDS` as the tc path; the
//!   socket's (cookie, backend) -> frontend mapping goes to `LB4_SOCK_REVNAT`.
//!   A frontend without backends fails the call with ECONNREFUSED at once.
//! - `cgroup/recvmsg4` and `cgroup/getpeername4`: a backend address a
//!   translated socket reports becomes the frontend again, so UDP replies come
//!   "from" the VIP and `getpeername()` shows it.
//!
//! - NodePorts on the node's own addresses (127.0.0.0/8 from the node's
//!   namespace, any node IP from anywhere) through a wildcard frontend,
//!   as kube-proxy serves them: see `node_addr`.
//!
//! No per-packet cost: after connect() the kernel sends to the backend
//! directly and neither tc program finds anything to translate. Attached at
//! the node's cgroup2 root, this serves pods too (their cgroups descend
//! from it), so most pod -> ClusterIP connections never need the tc DNAT.
//! ClientIP affinity is kept per network namespace (`LB_SOCK_AFFINITY`):
//! the source address is not chosen yet in connect(), and a netns is one
//! client address (a pod's, or the node's for its own processes).

use aya_ebpf::{
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
    EbpfContext,
};
use catena_common::{
    lb::{
        Backend4, Service4Value, SockAffinityKey, SockRevNat4Key, SockRevNat4Value,
        SOCK_AFFINITY_V4, SVC_FLAG_AFFINITY,
    },
    metrics::Counter,
    IPPROTO_TCP, IPPROTO_UDP,
};

use crate::{
    affinity, ct,
    lb::{self, ServiceKey},
    maps::{LB4_SOCK_REVNAT, LB_SOCK_AFFINITY},
    metrics::count,
    node_addr,
};

/// Return values of cgroup sock_addr programs.
pub(crate) const SYS_PROCEED: i32 = 1;
const SYS_REJECT: i32 = 0;
const ECONNREFUSED: i32 = 111;

#[cgroup_sock_addr(connect4)]
pub fn sock_connect4(ctx: SockAddrContext) -> i32 {
    translate(&ctx)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    translate(&ctx)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn sock_recvmsg4(ctx: SockAddrContext) -> i32 {
    reverse(&ctx);
    // recvmsg4 programs must return 1 (the verifier enforces it).
    SYS_PROCEED
}

#[cgroup_sock_addr(getpeername4)]
pub fn sock_getpeername4(ctx: SockAddrContext) -> i32 {
    reverse(&ctx);
    SYS_PROCEED
}

#[inline(always)]
pub(crate) fn cookie(ctx: &SockAddrContext) -> u64 {
    // SAFETY: bpf_get_socket_cookie accepts a bpf_sock_addr context.
    unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
}

/// The caller's network namespace, the "client" of socket-level affinity.
#[inline(always)]
fn netns_cookie(ctx: &SockAddrContext) -> u64 {
    // SAFETY: bpf_get_netns_cookie accepts a bpf_sock_addr context.
    unsafe { bpf_get_netns_cookie(ctx.as_ptr()) }
}

/// `pick()` under the frontend's ClientIP affinity (if it has it), keyed by
/// the caller's netns and the frontend (`family`: `SOCK_AFFINITY_V4|V6`).
/// `backend` looks an affinity entry's backend id up in the family's map.
#[inline(always)]
pub(crate) fn with_affinity<B>(
    ctx: &SockAddrContext,
    flags: u16,
    timeout_s: u32,
    rev_nat_index: u32,
    family: u8,
    backend: impl Fn(u32) -> Option<B>,
    pick: impl FnOnce() -> Option<(u32, B)>,
) -> Option<(u32, B)> {
    if flags & SVC_FLAG_AFFINITY == 0 {
        return pick();
    }
    let key = SockAffinityKey {
        netns_cookie: netns_cookie(ctx),
        rev_nat_index,
        family,
        pad: [0; 3],
    };
    affinity::sticky(
        &LB_SOCK_AFFINITY,
        &key,
        timeout_s,
        ct::now_ns(),
        backend,
        pick,
    )
}

#[inline(always)]
fn translate(ctx: &SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: `sa` is the program's context; these are readable u32 fields.
    let (proto, addr, port) = unsafe { ((*sa).protocol, (*sa).user_ip4, (*sa).user_port) };
    let proto = proto as u8;
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return SYS_PROCEED;
    }
    // user_port holds the network-order port in its low 16 bits, exactly as
    // the maps store ports.
    let port = port as u16;
    let backend = match choose_backend4(ctx, addr, port, proto) {
        Ok(Some(b)) => b,
        Ok(None) => return SYS_PROCEED,
        Err(verdict) => return verdict,
    };
    // SAFETY: user_ip4 and user_port are writable in connect4/sendmsg4.
    unsafe {
        (*sa).user_ip4 = backend.address;
        (*sa).user_port = backend.port as u32;
    }
    count(Counter::SockTranslated);
    SYS_PROCEED
}

/// The IPv4 frontend `addr:port/proto` of a socket call: `Ok(None)` if it is
/// no frontend, `Ok(Some(backend))` once the backend is chosen and the
/// reverse entry written (so replies and getpeername show the frontend),
/// `Err(verdict)` when the call must be refused. Shared by the IPv4 hooks
/// and the IPv6 ones for IPv4-mapped addresses.
#[inline(always)]
pub(crate) fn choose_backend4(
    ctx: &SockAddrContext,
    addr: u32,
    port: u16,
    proto: u8,
) -> Result<Option<Backend4>, i32> {
    let found = frontend(
        lb::master_key(addr, port, proto),
        addr == 0,
        || lb::master_key(0, port, proto),
        || node_addr::is_node4(ctx, addr),
    );
    let Some((key, master)) = found else {
        return Ok(None);
    };
    if master.count == 0 {
        count(Counter::SockRejected);
        return Err(reject());
    }
    let Some((_, backend)) = select4(ctx, &key, &master) else {
        // The slot vanished under an update: as for the tc path, no backend.
        count(Counter::SockRejected);
        return Err(reject());
    };
    let rev_key = SockRevNat4Key {
        cookie: cookie(ctx),
        address: backend.address,
        port: backend.port,
        pad: 0,
    };
    let rev = SockRevNat4Value {
        address: addr,
        port,
        rev_nat_index: master.rev_nat_index,
        pad: 0,
    };
    // Without this entry a UDP reply would look like it came from a stranger
    // and be dropped by the application: refuse rather than half-work.
    if LB4_SOCK_REVNAT.insert(rev_key, rev, 0).is_err() {
        count(Counter::SockRejected);
        return Err(reject());
    }
    Ok(Some(backend))
}

/// The frontend (key and master) a socket call to `key`'s address and
/// port reaches, of either family: the exact frontend, else the wildcard
/// NodePort frontend (`0.0.0.0:port`, `[::]:port`) when `is_node` says the
/// address is one of the node's own (see `node_addr`). `unspecified`
/// (0.0.0.0, `::`) is the caller's own host (the kernel connects it to
/// loopback), which the exact entry must not answer for a pod: it goes
/// through the node-address check like 127.0.0.1.
///
/// The reverse entry keeps the dialled address itself, so getpeername() and
/// recvmsg() report it (127.0.0.1, a node IP), not the wildcard. Backends
/// are the frontend's in-cluster scope, like every socket call: node-local
/// clients of an `externalTrafficPolicy: Local` Service are not external
/// (kube-proxy sends them to the cluster-wide chain, Cilium's socket LB
/// uses the internal scope).
#[inline(always)]
pub(crate) fn frontend<K: ServiceKey>(
    key: K,
    unspecified: bool,
    wildcard: impl FnOnce() -> K,
    is_node: impl FnOnce() -> bool,
) -> Option<(K, Service4Value)> {
    if !unspecified {
        if let Some(master) = key.lookup_master() {
            return Some((key, master));
        }
    }
    let wildcard = wildcard();
    let master = wildcard.lookup_master()?;
    is_node().then_some((wildcard, master))
}

/// A backend of an IPv4 frontend for this socket call.
#[inline(always)]
fn select4(
    ctx: &SockAddrContext,
    key: &catena_common::lb::Service4Key,
    master: &Service4Value,
) -> Option<(u32, Backend4)> {
    lb::with_current_master(key, master, |m| {
        // In the master entry `backend_id` holds the affinity timeout (seconds).
        with_affinity(
            ctx,
            m.flags,
            m.backend_id,
            m.rev_nat_index,
            SOCK_AFFINITY_V4,
            lb::backend,
            || lb::select_backend(key, m.count),
        )
    })
}

/// Fails the socket call with ECONNREFUSED (a plain `0` would be EPERM, which
/// clients treat as a local policy error rather than "nobody listens").
#[inline(always)]
pub(crate) fn reject() -> i32 {
    // SAFETY: plain helper; allowed in connect4/sendmsg4.
    unsafe { bpf_set_retval(-ECONNREFUSED) };
    SYS_REJECT
}

#[inline(always)]
fn reverse(ctx: &SockAddrContext) {
    let sa = ctx.sock_addr;
    // SAFETY: readable u32 context fields.
    let (addr, port) = unsafe { ((*sa).user_ip4, (*sa).user_port) };
    let key = SockRevNat4Key {
        cookie: cookie(ctx),
        address: addr,
        port: port as u16,
        pad: 0,
    };
    // SAFETY: copied out at once.
    let Some(rev) = (unsafe { LB4_SOCK_REVNAT.get(key) }).copied() else {
        return;
    };
    // SAFETY: user_ip4 and user_port are writable in recvmsg4/getpeername4.
    unsafe {
        (*sa).user_ip4 = rev.address;
        (*sa).user_port = rev.port as u32;
    }
}
