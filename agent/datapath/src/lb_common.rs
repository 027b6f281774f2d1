//! What the IPv4 and IPv6 load-balancer states share: id allocation,
//! backend reference counting and map writes counted for observability.
//! The two families keep separate maps and number spaces (lb.rs, lb6.rs);
//! only these mechanics are the same.

use std::collections::{BTreeMap, BTreeSet, HashMap as StdHashMap};

use anyhow::{bail, Context};
use aya::maps::{HashMap, MapData};

use crate::lb::is_not_found;
use catena_common::lb::REVNAT_MAX_ENTRIES;

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

/// The highest reverse-NAT index, and so the most frontends per address
/// family: the REVNAT maps hold `REVNAT_MAX_ENTRIES` keys and 0 means "none".
pub(crate) const MAX_REV_NAT: u32 = REVNAT_MAX_ENTRIES - 1;

/// A new reverse-NAT index in `1..=MAX_REV_NAT`, marked used. Monotonic
/// (wrapping, skipping live ones) like backend ids, so a conntrack entry of
/// a removed frontend does not soon restore a new frontend's address.
pub(crate) fn alloc_rev_nat(next: &mut u32, used: &mut BTreeSet<u32>) -> anyhow::Result<u32> {
    if used.len() < MAX_REV_NAT as usize {
        for _ in 0..MAX_REV_NAT {
            let idx = if (1..=MAX_REV_NAT).contains(next) {
                *next
            } else {
                1
            };
            *next = idx + 1;
            if used.insert(idx) {
                return Ok(idx);
            }
        }
    }
    bail!(
        "no free reverse-NAT index: {MAX_REV_NAT} frontends per address family is the ceiling \
         (each ClusterIP, NodePort address, externalIP and LoadBalancer IP, per port and \
         protocol, is one frontend; the limit is the capacity of the reverse-NAT map)"
    )
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rev_nat_indexes_go_past_u16_and_wrap_to_the_lowest_free() {
        let mut used = BTreeSet::new();
        let mut next = u16::MAX as u32;
        assert_eq!(alloc_rev_nat(&mut next, &mut used).unwrap(), 65_535);
        assert_eq!(alloc_rev_nat(&mut next, &mut used).unwrap(), 65_536);
        next = MAX_REV_NAT;
        used.insert(1);
        assert_eq!(alloc_rev_nat(&mut next, &mut used).unwrap(), MAX_REV_NAT);
        // Past the last index: wraps, skipping live ones (never 0).
        assert_eq!(alloc_rev_nat(&mut next, &mut used).unwrap(), 2);
    }

    #[test]
    fn the_frontend_past_the_ceiling_is_refused_clearly() {
        let mut used: BTreeSet<u32> = (1..MAX_REV_NAT).collect();
        let mut next = 1;
        // The last free index is found wherever `next` points.
        assert_eq!(alloc_rev_nat(&mut next, &mut used).unwrap(), MAX_REV_NAT);
        let err = alloc_rev_nat(&mut next, &mut used).unwrap_err().to_string();
        assert!(
            err.contains("262143 frontends per address family is the ceiling"),
            "{err}"
        );
        assert_eq!(used.len(), MAX_REV_NAT as usize);
    }
}
