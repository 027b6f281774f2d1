//! `ENDPOINTS`: per-pod config read by the programs, keyed by host-veth ifindex.

use anyhow::Context;
use aya::maps::{HashMap, MapData, MapError};
use catena_common::endpoint::EndpointInfo;

pub(crate) struct Endpoints {
    pub map: HashMap<MapData, u32, EndpointInfo>,
}

impl Endpoints {
    pub fn upsert(&mut self, ifindex: u32, info: EndpointInfo) -> anyhow::Result<()> {
        self.map
            .insert(ifindex, info, 0)
            .with_context(|| format!("writing ENDPOINTS[{ifindex}]"))
    }

    pub fn remove(&mut self, ifindex: u32) -> anyhow::Result<()> {
        match self.map.remove(&ifindex) {
            Ok(()) => Ok(()),
            Err(e) if not_found(&e) => Ok(()),
            Err(e) => Err(e).with_context(|| format!("deleting ENDPOINTS[{ifindex}]")),
        }
    }

    /// Whether any interface's entry carries `endpoint_id`.
    pub fn has_endpoint_id(&self, endpoint_id: u32) -> anyhow::Result<bool> {
        for item in self.map.iter() {
            match item {
                Ok((_, info)) if info.endpoint_id == endpoint_id => return Ok(true),
                Ok(_) => {}
                // Deleted while iterating: not a match.
                Err(e) if not_found(&e) => {}
                Err(e) => return Err(e).context("iterating ENDPOINTS"),
            }
        }
        Ok(false)
    }

    pub fn get(&self, ifindex: u32) -> anyhow::Result<Option<EndpointInfo>> {
        match self.map.get(&ifindex, 0) {
            Ok(v) => Ok(Some(v)),
            Err(e) if not_found(&e) => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading ENDPOINTS[{ifindex}]")),
        }
    }
}

pub(crate) fn not_found(e: &MapError) -> bool {
    matches!(e, MapError::KeyNotFound)
        || matches!(e, MapError::SyscallError(s) if s.io_error.raw_os_error() == Some(libc::ENOENT))
}
