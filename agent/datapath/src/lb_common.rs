//! What the IPv4 and IPv6 load-balancer states share: id allocation,
//! backend reference counting and map writes counted for observability.
//! The two families keep separate maps and number spaces (lb.rs, lb6.rs);
//! only these mechanics are the same.

use std::collections::{BTreeMap, BTreeSet, HashMap as StdHashMap};

use anyhow::{bail, Context};
use aya::maps::{HashMap, IterableMap, MapData};
use std::os::fd::AsFd;

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

/// Entries per `BPF_MAP_UPDATE_BATCH` call: the kernel copies them in one
/// go, so a batch's keys and values are held twice; 4096 keeps that small.
const BATCH: usize = 4096;

/// Writes `entries` in order with one bpf(2) call per [`BATCH`] instead of
/// one per entry: a first apply of 10k services x 10 endpoints is 200k
/// entries, and per-entry syscalls were most of its time. On failure,
/// `Err((written, error))`: the first `written` entries are in the map.
/// Where the kernel has no batch update for the map, it writes one by one.
pub(crate) fn put_batch<K: aya::Pod, V: aya::Pod>(
    writes: &mut u64,
    map: &mut HashMap<MapData, K, V>,
    name: &str,
    entries: &[(K, V)],
) -> Result<(), (usize, anyhow::Error)> {
    let mut written = 0;
    for chunk in entries.chunks(BATCH) {
        let (mut keys, mut values) = (Vec::new(), Vec::new());
        for (k, v) in chunk {
            keys.extend_from_slice(pod_bytes(k));
            values.extend_from_slice(pod_bytes(v));
        }
        let fd = map.map().fd().as_fd();
        match crate::sys::map_update_batch(fd, &keys, &values, chunk.len() as u32) {
            Ok(()) => {
                written += chunk.len();
                *writes += chunk.len() as u64;
            }
            Err((0, e)) if written == 0 && is_unsupported(&e) => {
                for (n, (k, v)) in entries.iter().enumerate() {
                    put(writes, map, name, k, v).map_err(|e| (n, e))?;
                }
                return Ok(());
            }
            Err((n, e)) => {
                let n = (n as usize).min(chunk.len());
                *writes += n as u64;
                let error = anyhow::Error::new(e).context(format!("writing {name} (batch)"));
                return Err((written + n, error));
            }
        }
    }
    Ok(())
}

fn is_unsupported(e: &std::io::Error) -> bool {
    // EINVAL: a kernel without the command; EOPNOTSUPP/ENOTSUPP (524): a map
    // type without batch operations.
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL | libc::EOPNOTSUPP | 524)
    )
}

fn pod_bytes<T: aya::Pod>(v: &T) -> &[u8] {
    // SAFETY: `aya::Pod` types are plain data without padding-sensitive
    // invariants; the bytes are exactly what a single-entry write sends.
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), std::mem::size_of::<T>()) }
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

    /// A real 8-entry hash map (bpf(2) needs root, as every datapath test).
    fn small_hash_map() -> HashMap<MapData, u32, u64> {
        // union bpf_attr for BPF_MAP_CREATE: map_type, key_size, value_size,
        // max_entries, map_flags.
        let mut attr = [0u64; 9];
        attr[0] = 1 | 4 << 32; // BPF_MAP_TYPE_HASH, 4-byte keys
        attr[1] = 8 | 8 << 32; // 8-byte values, 8 entries
        let fd = crate::sys::bpf(0, &mut attr).expect("BPF_MAP_CREATE");
        // SAFETY: a new fd owned by nobody else.
        let fd =
            unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) };
        let data = MapData::from_fd(fd).unwrap();
        HashMap::try_from(aya::maps::Map::HashMap(data)).unwrap()
    }

    #[test]
    fn batched_writes_land_in_order_and_report_how_many_on_failure() {
        let mut map = small_hash_map();
        let mut writes = 0;
        let entries: Vec<(u32, u64)> = (1..=5).map(|k| (k, u64::from(k) * 10)).collect();
        put_batch(&mut writes, &mut map, "TEST", &entries).unwrap();
        assert_eq!(writes, 5);
        for (k, v) in &entries {
            assert_eq!(map.get(k, 0).unwrap(), *v);
        }
        // 3 more fit, the 4th new key does not: the first three are written
        // and reported as such, the rest are not in the map.
        let more: Vec<(u32, u64)> = (6..=10).map(|k| (k, u64::from(k))).collect();
        let (written, err) = put_batch(&mut writes, &mut map, "TEST", &more).unwrap_err();
        assert_eq!(written, 3, "{err:#}");
        assert!(format!("{err:#}").contains("writing TEST"), "{err:#}");
        assert_eq!(map.get(&8, 0).unwrap(), 8);
        assert!(map.get(&9, 0).is_err());
        assert_eq!(writes, 8);
    }

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
