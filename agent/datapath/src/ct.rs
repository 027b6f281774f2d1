//! `CT4` and `CT6` from user space: counting, dumping and flushing entries.

use anyhow::Context;
use aya::maps::{HashMap, MapData};
use catena_common::ct::{Ct4Key, Ct4Value};

use crate::endpoints::not_found;

pub(crate) struct Conntrack {
    pub map: HashMap<MapData, Ct4Key, Ct4Value>,
}

impl Conntrack {
    pub fn count(&self) -> anyhow::Result<usize> {
        let mut n = 0;
        for key in self.map.keys() {
            match key {
                Ok(_) => n += 1,
                // An LRU entry evicted while iterating: just skip it.
                Err(e) if not_found(&e) => {}
                Err(e) => return Err(e).context("iterating CT4"),
            }
        }
        Ok(n)
    }

    pub fn dump(&self) -> anyhow::Result<Vec<(Ct4Key, Ct4Value)>> {
        let mut out = Vec::new();
        for entry in self.map.iter() {
            match entry {
                Ok(kv) => out.push(kv),
                Err(e) if not_found(&e) => {}
                Err(e) => return Err(e).context("iterating CT4"),
            }
        }
        Ok(out)
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
        let mut n = 0;
        for key in self.map.keys() {
            match key {
                Ok(_) => n += 1,
                Err(e) if not_found(&e) => {}
                Err(e) => return Err(e).context("iterating CT6"),
            }
        }
        Ok(n)
    }

    pub fn dump(&self) -> anyhow::Result<Vec<(catena_common::ct6::Ct6Key, Ct4Value)>> {
        let mut out = Vec::new();
        for entry in self.map.iter() {
            match entry {
                Ok(kv) => out.push(kv),
                Err(e) if not_found(&e) => {}
                Err(e) => return Err(e).context("iterating CT6"),
            }
        }
        Ok(out)
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
