//! Service lookup and backend selection over Cilium's master/slot layout: the
//! master entry (slot 0) carries the backend count, slots 1..=count name backend
//! ids. Two hash lookups per new flow whatever the number of services.

use aya_ebpf::helpers::bpf_get_prandom_u32;
use catena_common::lb::{
    Affinity4Key, Backend4, Service4Key, Service4Value, SCOPE_EXTERNAL,
    SCOPE_INTERNAL, SVC_FLAG_AFFINITY, SVC_FLAG_NO_BACKENDS, SVC_FLAG_TWO_SCOPES,
};

use crate::{affinity, maglev};
use crate::maps::{LB4_AFFINITY, LB4_BACKENDS, LB4_SERVICES};
use crate::parse::Flow4;

#[inline(always)]
pub fn master_key(daddr: u32, dport: u16, proto: u8) -> Service4Key {
    Service4Key {
        address: daddr,
        dport,
        backend_slot: 0,
        proto,
        scope: SCOPE_INTERNAL,
        pad: [0; 2],
    }
}

/// The scope external traffic (arriving on an external device) uses: the
/// frontend's `SCOPE_EXTERNAL` entries when its master says it has two
/// scopes, else the master itself. A missing external master (never
/// written after the flag, but a torn update is cheap to survive) means no
/// backends for external clients, never the in-cluster ones.
#[inline(always)]
pub fn external_scope(key: &Service4Key, master: Service4Value) -> (Service4Key, Service4Value) {
    if master.flags & SVC_FLAG_TWO_SCOPES == 0 {
        return (*key, master);
    }
    let ext = Service4Key {
        scope: SCOPE_EXTERNAL,
        ..*key
    };
    match lookup_master(&ext) {
        Some(m) => (ext, m),
        None => (
            ext,
            Service4Value {
                backend_id: 0,
                count: 0,
                rev_nat_index: master.rev_nat_index,
                flags: SVC_FLAG_NO_BACKENDS,
            },
        ),
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
    // Callers check, but a modulo by zero would be a panic path (which BPF
    // cannot have), so it is ruled out here too.
    if count == 0 {
        return None;
    }
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

/// Backend for a flow whose 5-tuple hashes to `hash`: the entry of the
/// frontend's Maglev table when it has one (and the backend it names still
/// exists), else a random slot (`master.count` must be > 0). For every path
/// that translates a new flow (pods here, external traffic alike). The
/// table holds the internal scope's backends, so an external scope (its
/// own, smaller backend set) always picks a random slot of its own.
#[inline(always)]
pub fn select_by_hash(
    key: &Service4Key,
    master: &Service4Value,
    hash: u32,
) -> Option<(u32, Backend4)> {
    if key.scope != SCOPE_INTERNAL {
        return select_backend(key, master.count);
    }
    if let Some(id) = maglev::lookup(master.rev_nat_index, hash) {
        // A missing backend is the short moment between a backend's removal
        // and the table's rewrite: fall back rather than fail the flow.
        if let Some(b) = backend(id) {
            return Some((id, b));
        }
    }
    select_backend(key, master.count)
}

/// Backend for a new flow: with ClientIP affinity the client's previous
/// backend while it is fresh (and still exists); otherwise
/// [`select_by_hash`] over the flow's 5-tuple, which then becomes the
/// client's affinity backend.
#[inline(always)]
pub fn select_for_flow(
    key: &Service4Key,
    master: &Service4Value,
    flow: &Flow4,
    now: u64,
) -> Option<(u32, Backend4)> {
    let hash = maglev::tuple_hash(flow.saddr, flow.daddr, flow.sport, flow.dport, flow.proto);
    with_current_master(key, master, |m| {
        sticky(m, flow.saddr, now, || select_by_hash(key, m, hash))
    })
}

/// `pick` against `master`, and once more against the master as it is now
/// if that found nothing. The agent shrinks a frontend by rewriting its
/// slots, then lowering the count, then deleting the surplus slots and
/// unused backends: a selection that read the master before that and a slot
/// or backend after it finds nothing, and a backend leaving must never
/// refuse a new connection another backend could take.
/// Both families' frontends (`Service4Key`, `Service6Key`; their master
/// entries share one type).
#[inline(always)]
pub fn with_current_master<K: ServiceKey>(
    key: &K,
    master: &Service4Value,
    mut pick: impl FnMut(&Service4Value) -> Option<(u32, K::Backend)>,
) -> Option<(u32, K::Backend)> {
    let mut m = *master;
    for _ in 0..2 {
        if let Some(chosen) = pick(&m) {
            return Some(chosen);
        }
        m = key.lookup_master()?;
        if m.count == 0 {
            return None;
        }
    }
    None
}

/// A frontend's master key, of either family: what [`with_current_master`]
/// needs to read the master entry again.
pub trait ServiceKey {
    type Backend;
    /// The master entry as it is now.
    fn lookup_master(&self) -> Option<Service4Value>;
}

impl ServiceKey for Service4Key {
    type Backend = Backend4;
    #[inline(always)]
    fn lookup_master(&self) -> Option<Service4Value> {
        lookup_master(self)
    }
}

/// ClientIP affinity around a selection (see [`affinity::sticky`]), when the
/// frontend has it.
#[inline(always)]
fn sticky(
    master: &Service4Value,
    client: u32,
    now: u64,
    pick: impl FnOnce() -> Option<(u32, Backend4)>,
) -> Option<(u32, Backend4)> {
    if master.flags & SVC_FLAG_AFFINITY == 0 {
        return pick();
    }
    let key = Affinity4Key {
        client,
        rev_nat_index: master.rev_nat_index,
    };
    // In the master entry `backend_id` holds the affinity timeout (seconds).
    affinity::sticky(&LB4_AFFINITY, &key, master.backend_id, now, backend, pick)
}
