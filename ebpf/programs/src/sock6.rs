//! Socket-level load balancing for IPv6 sockets (`cgroup/connect6`,
//! `sendmsg6`, `recvmsg6`, `getpeername6`), the twin of `sock`: an IPv6
//! frontend becomes a backend from `LB6_SERVICES` in connect()/sendmsg(),
//! and `recvmsg()`/`getpeername()` report the frontend again through
//! `LB6_SOCK_REVNAT`. A frontend without backends fails the call with
//! ECONNREFUSED.
//!
//! A dual-stack socket reaching an IPv4 frontend as an IPv4-mapped address
//! (`::ffff:10.96.0.10`) goes through these hooks too, not the IPv4 ones: it
//! is translated with the IPv4 maps and stays mapped.

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};
use catena_common::{
    lb::{SockRevNat4Key, SOCK_AFFINITY_V6},
    lb6::{SockRevNat6Key, SockRevNat6Value},
    metrics::Counter,
    IPPROTO_TCP, IPPROTO_UDP,
};

use crate::{
    lb6,
    maps::{LB4_SOCK_REVNAT, LB6_SOCK_REVNAT},
    metrics::count,
    node_addr,
    sock::{self, cookie, reject, SYS_PROCEED},
};

/// Word 2 of an IPv4-mapped address (`::ffff:0:0/96`) in memory order.
const V4_MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

#[cgroup_sock_addr(connect6)]
pub fn sock_connect6(ctx: SockAddrContext) -> i32 {
    translate(&ctx)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sock_sendmsg6(ctx: SockAddrContext) -> i32 {
    translate(&ctx)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn sock_recvmsg6(ctx: SockAddrContext) -> i32 {
    reverse(&ctx);
    // recvmsg6 programs must return 1 (the verifier enforces it).
    SYS_PROCEED
}

#[cgroup_sock_addr(getpeername6)]
pub fn sock_getpeername6(ctx: SockAddrContext) -> i32 {
    reverse(&ctx);
    SYS_PROCEED
}

/// The user address, read word by word (the context allows 4-byte loads).
#[inline(always)]
fn user_ip6(ctx: &SockAddrContext) -> [u32; 4] {
    let sa = ctx.sock_addr;
    // SAFETY: readable u32 context fields of the program's context.
    unsafe {
        [
            core::ptr::read_volatile(&(*sa).user_ip6[0]),
            core::ptr::read_volatile(&(*sa).user_ip6[1]),
            core::ptr::read_volatile(&(*sa).user_ip6[2]),
            core::ptr::read_volatile(&(*sa).user_ip6[3]),
        ]
    }
}

/// Writes the user address and port.
///
/// # Safety
/// Only in hooks where both are writable (all four used here).
#[inline(always)]
unsafe fn set_user(ctx: &SockAddrContext, addr: &[u32; 4], port: u16) {
    let sa = ctx.sock_addr;
    // SAFETY: per the contract; 4-byte stores.
    unsafe {
        core::ptr::write_volatile(&mut (*sa).user_ip6[0], addr[0]);
        core::ptr::write_volatile(&mut (*sa).user_ip6[1], addr[1]);
        core::ptr::write_volatile(&mut (*sa).user_ip6[2], addr[2]);
        core::ptr::write_volatile(&mut (*sa).user_ip6[3], addr[3]);
        (*sa).user_port = port as u32;
    }
}

#[inline(always)]
fn is_v4_mapped(a: &[u32; 4]) -> bool {
    a[0] == 0 && a[1] == 0 && a[2] == V4_MAPPED_WORD
}

#[inline(always)]
fn translate(ctx: &SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: readable u32 context fields.
    let (proto, port) = unsafe { ((*sa).protocol as u8, (*sa).user_port as u16) };
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return SYS_PROCEED;
    }
    let addr = user_ip6(ctx);
    if is_v4_mapped(&addr) {
        return translate_mapped(ctx, &addr, port, proto);
    }
    // `::` is the caller's own host, like `::1`; the wildcard `[::]:port`
    // serves `::1` and node addresses (`::ffff:127.0.0.1` and mapped node
    // addresses go through `translate_mapped`).
    let unspecified = addr[0] == 0 && addr[1] == 0 && addr[2] == 0 && addr[3] == 0;
    let found = sock::frontend(
        lb6::master_key(&addr, port, proto),
        unspecified,
        || lb6::master_key(&[0; 4], port, proto),
        || node_addr::is_node6(ctx, &addr),
    );
    let Some((key, master)) = found else {
        return SYS_PROCEED;
    };
    if master.count == 0 {
        count(Counter::SockRejected);
        return reject();
    }
    // In the master entry `backend_id` holds the affinity timeout (seconds).
    let chosen = sock::with_affinity(
        ctx,
        master.flags,
        master.backend_id,
        master.rev_nat_index,
        SOCK_AFFINITY_V6,
        lb6::backend,
        || lb6::select_backend(&key, master.count),
    );
    let Some((_, backend)) = chosen else {
        count(Counter::SockRejected);
        return reject();
    };
    let rev_key = SockRevNat6Key {
        cookie: cookie(ctx),
        address: backend.address,
        port: backend.port,
        pad: [0; 3],
    };
    let rev = SockRevNat6Value {
        address: addr,
        port,
        rev_nat_index: master.rev_nat_index,
        pad: 0,
    };
    // Without it UDP replies would come from a stranger: refuse instead.
    if LB6_SOCK_REVNAT.insert(&rev_key, &rev, 0).is_err() {
        count(Counter::SockRejected);
        return reject();
    }
    // SAFETY: writable in connect6/sendmsg6.
    unsafe { set_user(ctx, &backend.address, backend.port) };
    count(Counter::SockTranslated);
    SYS_PROCEED
}

/// An IPv4 frontend reached as `::ffff:a.b.c.d`: the IPv4 maps decide, and
/// the backend is written back mapped.
#[inline(always)]
fn translate_mapped(ctx: &SockAddrContext, addr: &[u32; 4], port: u16, proto: u8) -> i32 {
    let backend = match sock::choose_backend4(ctx, addr[3], port, proto) {
        Ok(Some(b)) => b,
        Ok(None) => return SYS_PROCEED,
        Err(verdict) => return verdict,
    };
    let mapped = [0, 0, V4_MAPPED_WORD, backend.address];
    // SAFETY: writable in connect6/sendmsg6.
    unsafe { set_user(ctx, &mapped, backend.port) };
    count(Counter::SockTranslated);
    SYS_PROCEED
}

#[inline(always)]
fn reverse(ctx: &SockAddrContext) {
    let sa = ctx.sock_addr;
    // SAFETY: readable u32 context field.
    let port = unsafe { (*sa).user_port } as u16;
    let addr = user_ip6(ctx);
    if is_v4_mapped(&addr) {
        let key = SockRevNat4Key {
            cookie: cookie(ctx),
            address: addr[3],
            port,
            pad: 0,
        };
        // SAFETY: copied out at once.
        if let Some(rev) = (unsafe { LB4_SOCK_REVNAT.get(&key) }).copied() {
            let mapped = [0, 0, V4_MAPPED_WORD, rev.address];
            // SAFETY: writable in recvmsg6/getpeername6.
            unsafe { set_user(ctx, &mapped, rev.port) };
        }
        return;
    }
    let key = SockRevNat6Key {
        cookie: cookie(ctx),
        address: addr,
        port,
        pad: [0; 3],
    };
    // SAFETY: copied out at once.
    let Some(rev) = (unsafe { LB6_SOCK_REVNAT.get(&key) }).copied() else {
        return;
    };
    // SAFETY: writable in recvmsg6/getpeername6.
    unsafe { set_user(ctx, &rev.address, rev.port) };
}
