//! IPv6 service lookup and backend selection over `LB6_SERVICES` (the master
//! /slot layout of `lb`): random slot, or the client's backend under
//! ClientIP affinity, or by the frontend's Maglev table (`LB6_MAGLEV`) over
//! the flow's 5-tuple as `lb` does for IPv4.

use aya_ebpf::helpers::bpf_get_prandom_u32;
use catena_common::lb::{SCOPE_INTERNAL, SVC_FLAG_AFFINITY};
use catena_common::lb6::{Affinity6Key, Backend6, Service6Key, Service6Value};

use crate::maps::{LB6_AFFINITY, LB6_BACKENDS, LB6_SERVICES};
use crate::parse::Flow6;
use crate::{affinity, lb, maglev};

#[inline(always)]
pub fn master_key(daddr: &[u32; 4], dport: u16, proto: u8) -> Service6Key {
    Service6Key {
        address: *daddr,
        dport,
        backend_slot: 0,
        proto,
        scope: 0,
        pad: [0; 2],
    }
}

#[inline(always)]
pub fn lookup_master(key: &Service6Key) -> Option<Service6Value> {
    // SAFETY: copied out at once (plain data; a torn read is tolerated as
    // in `lb`).
    unsafe { LB6_SERVICES.get(key) }.copied()
}

#[inline(always)]
pub fn backend(id: u32) -> Option<Backend6> {
    // SAFETY: copied out at once.
    unsafe { LB6_BACKENDS.get(id) }.copied()
}

/// A random slot of the frontend (`count` must be > 0): its backend id and
/// the backend.
#[inline(always)]
pub fn select_backend(master: &Service6Key, count: u16) -> Option<(u32, Backend6)> {
    let id = random_slot(master, count)?;
    Some((id, backend(id)?))
}

/// The backend id in a random slot of the frontend (`count` must be > 0).
#[inline(always)]
fn random_slot(master: &Service6Key, count: u16) -> Option<u32> {
    // Callers check, but a modulo by zero would be a panic path (which BPF
    // cannot have: the verifier refuses the program), so it is ruled out
    // here too.
    if count == 0 {
        return None;
    }
    // SAFETY: helper without arguments.
    let rnd = unsafe { bpf_get_prandom_u32() };
    let slot = (rnd % count as u32) as u16 + 1;
    let slot_key = Service6Key {
        backend_slot: slot,
        ..*master
    };
    // SAFETY: copied out at once.
    Some(unsafe { LB6_SERVICES.get(&slot_key) }?.backend_id)
}

/// The backend id the frontend's Maglev table names for `flow`'s 5-tuple
/// hash; 0 when the frontend has no table. As in [`lb::select_by_hash`],
/// the table holds the internal scope's backends, so an external scope
/// always picks at random among its own.
#[inline(always)]
fn maglev_backend_id(scope: u8, rev_nat_index: u32, flow: &Flow6) -> u32 {
    if scope != SCOPE_INTERNAL {
        return 0;
    }
    maglev::lookup6(rev_nat_index, flow).unwrap_or(0)
}

/// Backend for a new flow: with ClientIP affinity the client's backend
/// while fresh (and still existing), else the backend the frontend's Maglev
/// table names for the flow ([`maglev_backend_id`]) or, without a table, a
/// random one, which then becomes the client's. A frontend shrinking under
/// the pick is read again once ([`lb::with_current_master`]), so a backend
/// leaving never refuses a new connection another backend could take; the
/// retry picks at random, which also covers a Maglev backend already
/// removed while its table is not yet rewritten. Only the pick is retried
/// (the IPv4 path retries the affinity lookup too): what affinity reads of
/// the master (timeout, rev-NAT index) does not change when backends leave,
/// and one retried pick keeps this program's stack within the verifier's
/// limit, which the IPv6 keys and addresses crowd.
///
/// Stack: the Maglev id is looked up first, outside the pick, and enters
/// it as a plain `u32` in place of the random slot's id, so the pick keeps
/// the shape LLVM inlines. A larger pick (a Maglev lookup with its own
/// backend read and fallback in it) is outlined as a BPF subprogram whose
/// frame, added to this program's, exceeds the verifier's 512 bytes. The
/// cost is a table lookup (and, for Maglev frontends, the hash) also for
/// clients whose affinity entry then decides.
#[inline(always)]
pub fn select_for_flow(
    key: &Service6Key,
    master: &Service6Value,
    flow: &Flow6,
    now: u64,
) -> Option<(u32, Backend6)> {
    let maglev_id = maglev_backend_id(key.scope, master.rev_nat_index, flow);
    let pick = || {
        let mut first = maglev_id;
        lb::with_current_master(key, master, |m| {
            let id = match core::mem::take(&mut first) {
                0 => random_slot(key, m.count)?,
                id => id,
            };
            Some((id, backend(id)?))
        })
    };
    if master.flags & SVC_FLAG_AFFINITY == 0 {
        return pick();
    }
    let aff_key = Affinity6Key {
        client: flow.saddr,
        rev_nat_index: master.rev_nat_index,
    };
    // In the master entry `backend_id` holds the affinity timeout (seconds).
    affinity::sticky(
        &LB6_AFFINITY,
        &aff_key,
        master.backend_id,
        now,
        backend,
        pick,
    )
}

impl lb::ServiceKey for Service6Key {
    type Backend = Backend6;
    #[inline(always)]
    fn lookup_master(&self) -> Option<Service6Value> {
        lookup_master(self)
    }
}
