//! catena's datapath, user-space side: loads the one precompiled eBPF object,
//! pins programs and maps under the bpffs dir (reusing pinned maps on restart so
//! traffic and state survive the agent), attaches the programs to host-side
//! veths (TCX links, pinned; clsact where TCX is missing), and writes the maps.

mod desired;

pub use desired::{BackendAddr, Frontend, LbDesired, LbService, Proto};

use catena_common::endpoint::EndpointInfo;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// How the programs are attached to an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachMode {
    Tcx,
    Clsact,
}

impl AttachMode {
    pub fn as_str(self) -> &'static str {
        match self {
            AttachMode::Tcx => "tcx",
            AttachMode::Clsact => "clsact",
        }
    }
}

/// What `apply` changed (for logs and metrics).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ApplyStats {
    pub services_added: usize,
    pub services_updated: usize,
    pub services_removed: usize,
    pub backends_added: usize,
    pub backends_removed: usize,
}

/// One frontend as currently programmed (read back from the maps' owner state).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProgrammedService {
    pub frontend: Frontend,
    pub name: String,
    pub backends: Vec<BackendAddr>,
    pub rev_nat_index: u16,
}

pub struct Datapath {
    _bpffs_dir: PathBuf,
}

impl Datapath {
    /// Loads the embedded object, reusing maps already pinned under
    /// `<bpffs_dir>/maps` (so a restart keeps conntrack and service state), and
    /// pins the programs under `<bpffs_dir>/programs`. Creates the dirs; fails
    /// with a clear error if `bpffs_dir` is not on a bpf filesystem.
    pub fn open(bpffs_dir: &Path) -> anyhow::Result<Datapath> {
        let _ = bpffs_dir;
        unimplemented!()
    }

    pub fn bpffs_dir(&self) -> &Path {
        unimplemented!()
    }

    /// Kernel program ids by program name.
    pub fn program_ids(&self) -> BTreeMap<String, u32> {
        unimplemented!()
    }

    /// Attaches from_container (ingress) and to_container (egress) to the
    /// interface, checking that `ifname` still has `ifindex`. Idempotent: an
    /// interface already carrying catena's programs is left as it is. Never
    /// replaces a qdisc or another program; TCX links are pinned under
    /// `<bpffs_dir>/links/`.
    pub fn attach(&mut self, ifindex: u32, ifname: &str) -> anyhow::Result<AttachMode> {
        let _ = (ifindex, ifname);
        unimplemented!()
    }

    /// Removes catena's programs from the interface and their link pins.
    /// Idempotent: a missing interface or missing pins are not an error.
    pub fn detach(&mut self, ifindex: u32) -> anyhow::Result<()> {
        let _ = ifindex;
        unimplemented!()
    }

    /// How catena is attached to `ifindex` right now (asks the kernel), if at all.
    pub fn attachment(&self, ifindex: u32) -> anyhow::Result<Option<AttachMode>> {
        let _ = ifindex;
        unimplemented!()
    }

    /// Writes the per-endpoint config read by the programs.
    pub fn upsert_endpoint(&mut self, ifindex: u32, info: EndpointInfo) -> anyhow::Result<()> {
        let _ = (ifindex, info);
        unimplemented!()
    }

    pub fn remove_endpoint(&mut self, ifindex: u32) -> anyhow::Result<()> {
        let _ = ifindex;
        unimplemented!()
    }

    pub fn endpoint(&self, ifindex: u32) -> anyhow::Result<Option<EndpointInfo>> {
        let _ = ifindex;
        unimplemented!()
    }

    /// Makes the service maps hold exactly `desired`, changing only what
    /// differs, in an order that never exposes a half-written service to
    /// packets (backends, then slots, then the master entry; removals last).
    pub fn apply_services(&mut self, desired: &LbDesired) -> anyhow::Result<ApplyStats> {
        let _ = desired;
        unimplemented!()
    }

    pub fn services(&self) -> Vec<ProgrammedService> {
        unimplemented!()
    }

    /// Packet counters (name -> sum over CPUs).
    pub fn counters(&self) -> anyhow::Result<BTreeMap<String, u64>> {
        unimplemented!()
    }

    /// Number of live conntrack entries.
    pub fn ct_entries(&self) -> anyhow::Result<usize> {
        unimplemented!()
    }
}
