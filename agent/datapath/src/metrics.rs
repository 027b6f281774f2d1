//! `METRICS`: per-CPU counters summed over CPUs.

use std::collections::BTreeMap;

use anyhow::Context;
use aya::maps::{MapData, PerCpuArray};
use catena_common::metrics::Counter;

pub(crate) struct Metrics {
    pub map: PerCpuArray<MapData, u64>,
}

impl Metrics {
    pub fn read(&self) -> anyhow::Result<BTreeMap<String, u64>> {
        let mut out = BTreeMap::new();
        for counter in Counter::ALL {
            let values = self
                .map
                .get(&(counter as u32), 0)
                .with_context(|| format!("reading METRICS[{}]", counter.name()))?;
            out.insert(counter.name().to_owned(), values.iter().sum());
        }
        Ok(out)
    }
}
