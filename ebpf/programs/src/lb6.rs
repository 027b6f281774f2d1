//! IPv6 service lookup and backend selection over `LB6_SERVICES` (the master
//! /slot layout of `lb`): random slot, or the client's backend under
//! ClientIP affinity. Maglev tables are IPv4-only: IPv6 frontends always
//! select at random.

use aya_ebpf::helpers::bpf_get_prandom_u32;
use catena_common::lb::SVC_FLAG_AFFINITY;
use catena_common::lb6::{Affinity6Key, Backend6, Service6Key, Service6Value};

use crate::maps::{LB6_AFFINITY, LB6_BACKENDS, LB6_SERVICES};
use crate::{affinity, lb};

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
    let id = unsafe { LB6_SERVICES.get(&slot_key) }?.backend_id;
    Some((id, backend(id)?))
}

/// Backend for a new flow from `client`: with ClientIP affinity the
/// client's backend while fresh (and still existing), else a random one,
/// which then becomes the client's. A frontend shrinking under the random
/// pick is read again once ([`lb::with_current_master`]), so a backend
/// leaving never refuses a new connection another backend could take. Only
/// the pick is retried (the IPv4 path retries the affinity lookup too): what
/// affinity reads of the master (timeout, rev-NAT index) does not change
/// when backends leave, and one retried pick keeps this program's stack
/// within the verifier's limit, which the IPv6 keys and addresses crowd.
#[inline(always)]
pub fn select_for_client(
    key: &Service6Key,
    master: &Service6Value,
    client: &[u32; 4],
    now: u64,
) -> Option<(u32, Backend6)> {
    let pick = || lb::with_current_master(key, master, |m| select_backend(key, m.count));
    if master.flags & SVC_FLAG_AFFINITY == 0 {
        return pick();
    }
    let aff_key = Affinity6Key {
        client: *client,
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
