//! Service lookup and backend selection over Cilium's master/slot layout: the
//! master entry (slot 0) carries the backend count, slots 1..=count name backend
//! ids. Two hash lookups per new flow whatever the number of services.

use aya_ebpf::helpers::bpf_get_prandom_u32;
use catena_common::lb::{Backend4, Service4Key, Service4Value};

use crate::{
    maps::{LB4_BACKENDS, LB4_SERVICES},
    parse::Flow4,
};

#[inline(always)]
pub fn master_key(flow: &Flow4) -> Service4Key {
    Service4Key {
        address: flow.daddr,
        dport: flow.dport,
        backend_slot: 0,
        proto: flow.proto,
        scope: 0,
        pad: [0; 2],
    }
}

#[inline(always)]
pub fn lookup_master(key: &Service4Key) -> Option<Service4Value> {
    // SAFETY: the value is copied out at once; a concurrent update can at worst
    // give a torn read of a plain-data value, which every field tolerates.
    unsafe { LB4_SERVICES.get(key) }.copied()
}

#[inline(always)]
pub fn backend(id: u32) -> Option<Backend4> {
    // SAFETY: as above, copied out immediately.
    unsafe { LB4_BACKENDS.get(id) }.copied()
}

/// Picks a random slot of the service (`count` must be > 0) and returns the
/// backend id it names and the backend.
#[inline(always)]
pub fn select_backend(master: &Service4Key, count: u16) -> Option<(u32, Backend4)> {
    // SAFETY: helper without arguments.
    let rnd = unsafe { bpf_get_prandom_u32() };
    let slot = (rnd % count as u32) as u16 + 1;
    let slot_key = Service4Key {
        backend_slot: slot,
        ..*master
    };
    // SAFETY: copied out immediately.
    let id = unsafe { LB4_SERVICES.get(slot_key) }?.backend_id;
    Some((id, backend(id)?))
}
