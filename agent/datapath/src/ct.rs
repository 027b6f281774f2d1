//! `CT4` and `CT6` from user space: counting, dumping and flushing entries.

use anyhow::Context;
use aya::maps::{HashMap, MapData};
use catena_common::ct::{Ct4Key, Ct4Value};

use crate::endpoints::not_found;

/// How many distinct keys (see [`unique_entries`] for why not a plain count).
fn unique_keys<K, V>(map: &HashMap<MapData, K, V>, name: &str) -> anyhow::Result<usize>
where
    K: aya::Pod + Eq + std::hash::Hash,
    V: aya::Pod,
{
    let mut seen = std::collections::HashSet::new();
    for key in map.keys() {
        match key {
            Ok(k) => {
                seen.insert(k);
            }
            Err(e) if not_found(&e) => {}
            Err(e) => return Err(e).with_context(|| format!("iterating {name}")),
        }
    }
    Ok(seen.len())
}

/// Every entry once. Iterating a hash map while the datapath and the
/// conntrack GC change it can restart from the first bucket when the key it
/// stood on is deleted (`BPF_MAP_GET_NEXT_KEY` has nothing to continue
/// from), so an entry may come twice; the later read wins. An entry evicted
/// under the iteration is skipped.
fn unique_entries<K, V>(map: &HashMap<MapData, K, V>, name: &str) -> anyhow::Result<Vec<(K, V)>>
where
    K: aya::Pod + Eq + std::hash::Hash,
    V: aya::Pod,
{
    let mut seen = std::collections::HashMap::new();
    let mut order = Vec::new();
    for entry in map.iter() {
        match entry {
            Ok((k, v)) => {
                if seen.insert(k, v).is_none() {
                    order.push(k);
                }
            }
            Err(e) if not_found(&e) => {}
            Err(e) => return Err(e).with_context(|| format!("iterating {name}")),
        }
    }
    Ok(order.into_iter().map(|k| (k, seen[&k])).collect())
}

pub(crate) struct Conntrack {
    pub map: HashMap<MapData, Ct4Key, Ct4Value>,
}

impl Conntrack {
    pub fn count(&self) -> anyhow::Result<usize> {
        unique_keys(&self.map, "CT4")
    }

    pub fn dump(&self) -> anyhow::Result<Vec<(Ct4Key, Ct4Value)>> {
        unique_entries(&self.map, "CT4")
    }

    pub fn flush(&mut self) -> anyhow::Result<usize> {
        let keys: Vec<Ct4Key> = self.map.keys().filter_map(Result::ok).collect();
        let mut n = 0;
        for key in keys {
            match self.map.remove(&key) {
                Ok(()) => n += 1,
                Err(e) if not_found(&e) => {}
                Err(e) => return Err(e).context("deleting from CT4"),
            }
        }
        Ok(n)
    }
}

/// `CT6`, the IPv6 service flows (same value layout as `CT4`).
pub(crate) struct Conntrack6 {
    pub map: HashMap<MapData, catena_common::ct6::Ct6Key, Ct4Value>,
}

impl Conntrack6 {
    pub fn count(&self) -> anyhow::Result<usize> {
        unique_keys(&self.map, "CT6")
    }

    pub fn dump(&self) -> anyhow::Result<Vec<(catena_common::ct6::Ct6Key, Ct4Value)>> {
        unique_entries(&self.map, "CT6")
    }

    pub fn flush(&mut self) -> anyhow::Result<usize> {
        let keys: Vec<catena_common::ct6::Ct6Key> =
            self.map.keys().filter_map(Result::ok).collect();
        let mut n = 0;
        for key in keys {
            match self.map.remove(&key) {
                Ok(()) => n += 1,
                Err(e) if not_found(&e) => {}
                Err(e) => return Err(e).context("deleting from CT6"),
            }
        }
        Ok(n)
    }
}
