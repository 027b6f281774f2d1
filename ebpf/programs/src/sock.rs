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
//! No per-packet cost: after connect() the kernel sends to the backend
//! directly and neither tc program finds anything to translate. ClientIP
//! affinity is not applied here (a node's processes are one client, and the
//! source address is not known before the kernel routes the socket).

use aya_ebpf::{
    helpers::{bpf_get_socket_cookie, bpf_set_retval},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
    EbpfContext,
};
use catena_common::{
    lb::{Backend4, SockRevNat4Key, SockRevNat4Value},
    metrics::Counter,
    IPPROTO_TCP, IPPROTO_UDP,
};

use crate::{lb, maps::LB4_SOCK_REVNAT, metrics::count};

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
    let key = lb::master_key(addr, port, proto);
    let Some(master) = lb::lookup_master(&key) else {
        return Ok(None);
    };
    if master.count == 0 {
        count(Counter::SockRejected);
        return Err(reject());
    }
    let Some((_, backend)) = lb::select_backend(&key, master.count) else {
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
    };
    // Without this entry a UDP reply would look like it came from a stranger
    // and be dropped by the application: refuse rather than half-work.
    if LB4_SOCK_REVNAT.insert(rev_key, rev, 0).is_err() {
        count(Counter::SockRejected);
        return Err(reject());
    }
    Ok(Some(backend))
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
