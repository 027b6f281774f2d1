//! Maglev consistent hashing (Eisenbud et al., NSDI 2016), as Cilium's
//! `loadBalancer.algorithm=maglev`: each Maglev service has a lookup table of
//! `MAGLEV_TABLE_SIZE` backend ids, filled by the agent from the backends'
//! permutations; a new flow takes `table[hash(5-tuple) % MAGLEV_TABLE_SIZE]`.
//! Every node computes the same table from the same backend set, so the same
//! flow picks the same backend on any node, and removing one backend of N
//! moves only ~1/N of the table.

/// Slots per table. A prime (the permutation's skip must be coprime with it)
/// and, as Cilium's default, 16381: with up to ~160 backends every backend
/// owns >= 100 slots, which keeps the load imbalance under ~1%. One table is
/// 64 KiB (`u32` ids).
pub const MAGLEV_TABLE_SIZE: usize = 16_381;

/// Value of `LB4_MAGLEV` and `LB6_MAGLEV` (key: the service frontend's
/// `rev_nat_index`, u32, of that family's number space).
/// A frontend selects by Maglev exactly when its table is in the map; without
/// one (random services, or the moment before the agent writes it) the
/// random slot selection applies.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaglevTable {
    /// Backend ids (keys of `LB4_BACKENDS` or `LB6_BACKENDS`), never 0.
    pub backend_ids: [u32; MAGLEV_TABLE_SIZE],
}
