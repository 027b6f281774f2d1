//! What the IPv4 and IPv6 load-balancer states share: id allocation,
//! backend reference counting and map writes counted for observability.
//! The two families keep separate maps and number spaces (lb.rs, lb6.rs);
//! only these mechanics are the same.

use std::collections::{BTreeMap, BTreeSet, HashMap as StdHashMap};

use anyhow::{bail, Context};
use aya::maps::{HashMap, MapData};

use crate::lb::is_not_found;

/// `Some(0)` means no affinity (a zero timeout could never match).
pub(crate) fn normalize_affinity(timeout: Option<u32>) -> Option<u32> {
    timeout.filter(|t| *t != 0)
}

/// A new backend id. Monotonic (wrapping, skipping live ids): a freed id is
/// not reused soon, so a conntrack entry naming a removed backend does not
/// silently follow a new backend that got its id.
pub(crate) fn alloc_backend_id<V>(
    next: &mut u32,
    backends: &BTreeMap<u32, V>,
) -> anyhow::Result<u32> {
    for _ in 0..=backends.len() {
        let id = (*next).max(1);
        *next = id.wrapping_add(1);
        if !backends.contains_key(&id) {
            return Ok(id);
        }
    }
    bail!("no free backend id")
}

/// A new reverse-NAT index, marked used.
pub(crate) fn alloc_rev_nat(next: &mut u16, used: &mut BTreeSet<u16>) -> anyhow::Result<u16> {
    for _ in 0..=u16::MAX {
        let idx = (*next).max(1);
        *next = idx.wrapping_add(1);
        if used.insert(idx) {
            return Ok(idx);
        }
    }
    bail!("no free reverse-NAT index (65535 frontends)")
}

/// Drops one slot's reference; whether the backend is now unreferenced.
pub(crate) fn unref(refs: &mut StdHashMap<u32, u32>, id: u32) -> bool {
    match refs.get_mut(&id) {
        Some(n) if *n > 1 => {
            *n -= 1;
            false
        }
        _ => {
            refs.remove(&id);
            true
        }
    }
}

pub(crate) fn put<K: aya::Pod, V: aya::Pod>(
    writes: &mut u64,
    map: &mut HashMap<MapData, K, V>,
    name: &str,
    key: &K,
    value: &V,
) -> anyhow::Result<()> {
    *writes += 1;
    map.insert(key, value, 0)
        .with_context(|| format!("writing {name}"))
}

/// Deletes `key`; an absent key is fine.
pub(crate) fn del<K: aya::Pod, V: aya::Pod>(
    writes: &mut u64,
    map: &mut HashMap<MapData, K, V>,
    name: &str,
    key: &K,
) -> anyhow::Result<()> {
    *writes += 1;
    match map.remove(key) {
        Ok(()) => Ok(()),
        Err(e) if is_not_found(&e) => Ok(()),
        Err(e) => Err(e).with_context(|| format!("deleting from {name}")),
    }
}
