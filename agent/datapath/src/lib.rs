//! catena's datapath, user-space side: loads the one precompiled eBPF object,
//! pins programs and maps under the bpffs dir (reusing pinned maps on restart so
//! traffic and state survive the agent), attaches the programs to host-side
//! veths (TCX links, pinned; clsact where TCX is missing), and writes the maps.

mod attach;
mod cgroup;
mod ct;
mod desired;
mod devices;
mod endpoints;
pub mod events;
mod lb;
mod lb6;
mod lb_common;
mod lb_state;
mod loader;
/// Maglev lookup tables; `populate` is public for tests and benchmarks.
pub mod maglev;
mod metrics;
mod netlink;
mod netlink_socket;
mod node_addr;
pub mod policy;
pub mod rcu;
mod sock_diag;
/// Ending sockets the socket LB translated to backends that left their Service.
pub mod sock_terminate;
/// Raw bpf(2) calls aya does not expose (object pins, link info/update/detach);
/// public so the agent's inspection tools reuse them instead of copying them.
pub mod sys;

pub use attach::{AttachError, Attacher};
pub use cgroup::cgroup2_root;
pub use desired::{
    BackendAddr, BackendAddr6, Frontend, Frontend6, LbDesired, LbService, LbService6, Proto,
};
pub use devices::Device;
pub use lb6::ProgrammedService6;
pub use node_addr::NodeAddrChanges;

use anyhow::Context;
use aya::maps::lpm_trie::LpmTrie;
use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray};
use aya::Ebpf;
use catena_common::ct::{Ct4Key, Ct4Value};
use catena_common::ct6::Ct6Key;
use catena_common::endpoint::EndpointInfo;
use catena_common::map_names;
use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use tracing::info;

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

impl ApplyStats {
    /// Both families' changes together.
    fn plus(self, o: ApplyStats) -> ApplyStats {
        ApplyStats {
            services_added: self.services_added + o.services_added,
            services_updated: self.services_updated + o.services_updated,
            services_removed: self.services_removed + o.services_removed,
            backends_added: self.backends_added + o.backends_added,
            backends_removed: self.backends_removed + o.backends_removed,
        }
    }
}

/// One frontend as currently programmed (read back from the maps' owner
/// state); IPv4 by default, `ProgrammedService<Ipv6Addr>` for IPv6.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProgrammedService<A = Ipv4Addr> {
    pub frontend: Frontend<A>,
    pub name: String,
    pub backends: Vec<BackendAddr<A>>,
    pub rev_nat_index: u32,
    /// ClientIP affinity timeout in seconds, if the service has affinity.
    pub affinity_timeout: Option<u32>,
    /// Backends of the external scope, when the frontend has two (see
    /// [`LbService::external_backends`]).
    pub external_backends: Option<Vec<BackendAddr<A>>>,
}

pub struct Datapath {
    layout: loader::Layout,
    /// Owns the loaded programs (their fds; the pins keep them alive too).
    ebpf: Ebpf,
    /// Attaches to host veths without `&mut self` (see [`Datapath::attacher`]).
    attacher: Attacher,
    lb_maps: lb::LbMaps,
    lb: lb::LbState,
    /// IPv6 frontends (`LB6_*`), apart from the IPv4 ones.
    lb6_maps: lb6::LbMaps6,
    lb6: lb6::LbState6,
    /// `CT6` (IPv6 service flows).
    conntrack6: ct::Conntrack6,
    maglev: maglev::Maglev,
    /// The IPv6 frontends' Maglev tables (`LB6_MAGLEV`).
    maglev6: maglev::Maglev,
    endpoints: endpoints::Endpoints,
    /// External devices and local endpoint addresses (north-south traffic).
    devices: devices::DeviceMaps,
    conntrack: ct::Conntrack,
    metrics: metrics::Metrics,
    policy: policy::Policy,
}

fn take_map(ebpf: &mut Ebpf, name: &str) -> anyhow::Result<Map> {
    ebpf.take_map(name)
        .with_context(|| format!("the eBPF object has no map {name}"))
}

fn hash_map<K: aya::Pod, V: aya::Pod>(
    ebpf: &mut Ebpf,
    name: &str,
) -> anyhow::Result<HashMap<MapData, K, V>> {
    HashMap::try_from(take_map(ebpf, name)?)
        .with_context(|| format!("map {name} has an unexpected type"))
}

impl Datapath {
    /// Loads the embedded object, reusing maps already pinned under
    /// `<bpffs_dir>/maps` (so a restart keeps conntrack and service state), and
    /// pins the programs under `<bpffs_dir>/programs`. Creates the dirs; fails
    /// with a clear error if `bpffs_dir` is not on a bpf filesystem.
    pub fn open(bpffs_dir: &Path) -> anyhow::Result<Datapath> {
        let layout = loader::prepare(bpffs_dir)?;
        let mut ebpf = loader::load(&layout)?;
        let attacher = Attacher::new(&ebpf, &layout)?;
        let lb_maps = lb::LbMaps {
            services: hash_map(&mut ebpf, map_names::LB4_SERVICES)?,
            backends: hash_map(&mut ebpf, map_names::LB4_BACKENDS)?,
            revnat: hash_map(&mut ebpf, map_names::LB4_REVNAT)?,
        };
        let lb = lb::LbState::rebuild(&lb_maps)?;
        lb::warn_dirty(&lb);
        let lb6_maps = lb6::LbMaps6 {
            services: hash_map(&mut ebpf, map_names::LB6_SERVICES)?,
            backends: hash_map(&mut ebpf, map_names::LB6_BACKENDS)?,
            revnat: hash_map(&mut ebpf, map_names::LB6_REVNAT)?,
        };
        let lb6 = lb6::LbState6::rebuild(&lb6_maps)?;
        lb6::warn_dirty(&lb6);
        let conntrack6 = ct::Conntrack6 {
            map: hash_map(&mut ebpf, map_names::CT6)?,
        };
        let maglev = maglev::Maglev::open(
            hash_map(&mut ebpf, map_names::LB4_MAGLEV)?,
            map_names::LB4_MAGLEV,
        )?;
        let maglev6 = maglev::Maglev::open(
            hash_map(&mut ebpf, map_names::LB6_MAGLEV)?,
            map_names::LB6_MAGLEV,
        )?;
        let endpoints = endpoints::Endpoints {
            map: hash_map(&mut ebpf, map_names::ENDPOINTS)?,
        };
        let devices = devices::DeviceMaps {
            devices: hash_map(&mut ebpf, map_names::DEVICES4)?,
            local: hash_map(&mut ebpf, map_names::LOCAL_EP4)?,
        };
        let conntrack = ct::Conntrack {
            map: hash_map::<Ct4Key, Ct4Value>(&mut ebpf, map_names::CT4)?,
        };
        let metrics = metrics::Metrics {
            map: PerCpuArray::try_from(take_map(&mut ebpf, map_names::METRICS)?)
                .context("map METRICS has an unexpected type")?,
        };
        let policy = policy::Policy::open(
            policy::PolicyMaps {
                ipcache: LpmTrie::try_from(take_map(&mut ebpf, map_names::IPCACHE)?)
                    .context("map IPCACHE has an unexpected type")?,
                ipcache6: LpmTrie::try_from(take_map(&mut ebpf, map_names::IPCACHE6)?)
                    .context("map IPCACHE6 has an unexpected type")?,
                policy: LpmTrie::try_from(take_map(&mut ebpf, map_names::POLICY)?)
                    .context("map POLICY has an unexpected type")?,
                endpoints: Array::try_from(take_map(&mut ebpf, map_names::POLICY_EP)?)
                    .context("map POLICY_EP has an unexpected type")?,
            },
            &layout.maps().join(map_names::POLICY_EP),
        )?;
        info!(
            dir = %layout.root.display(),
            services = lb.programmed().len(),
            services6 = lb6.programmed().len(),
            "datapath open"
        );
        Ok(Datapath {
            layout,
            ebpf,
            attacher,
            lb_maps,
            lb,
            lb6_maps,
            lb6,
            conntrack6,
            maglev,
            maglev6,
            endpoints,
            devices,
            conntrack,
            metrics,
            policy,
        })
    }

    pub fn bpffs_dir(&self) -> &Path {
        &self.layout.root
    }

    /// Where a program is pinned (`<bpffs_dir>/programs/<name>`).
    pub fn program_pin(&self, name: &str) -> PathBuf {
        self.layout.program(name)
    }

    /// Kernel program ids by program name.
    pub fn program_ids(&self) -> BTreeMap<String, u32> {
        self.ebpf
            .programs()
            .filter_map(|(name, prog)| Some((name.to_owned(), prog.info().ok()?.id())))
            .collect()
    }

    /// Attaches from_container (ingress) and to_container (egress) to the
    /// interface, checking that `ifname` still has `ifindex`. Idempotent: an
    /// interface already carrying catena's programs is left as it is. Never
    /// replaces a qdisc or another program; TCX links are pinned under
    /// `<bpffs_dir>/links/`.
    pub fn attach(&mut self, ifindex: u32, ifname: &str) -> anyhow::Result<AttachMode> {
        self.attacher.attach(ifindex, ifname, None)
    }

    /// A handle that attaches and detaches like [`Datapath::attach`] and
    /// [`Datapath::detach`] without borrowing the datapath, so a caller can
    /// attach while other threads use the maps. The caller keeps two attaches
    /// or detaches of one interface from running at once.
    pub fn attacher(&self) -> Attacher {
        self.attacher.clone()
    }

    /// Like `attach`, but only in `mode` (no fallback). For tests and for
    /// operators who want to pin the mechanism.
    pub fn attach_with_mode(
        &mut self,
        ifindex: u32,
        ifname: &str,
        mode: AttachMode,
    ) -> anyhow::Result<AttachMode> {
        self.attacher.attach(ifindex, ifname, Some(mode))
    }

    /// Removes catena's programs from the interface and their link pins.
    /// Idempotent: a missing interface or missing pins are not an error.
    pub fn detach(&mut self, ifindex: u32) -> anyhow::Result<()> {
        attach::detach(&self.layout, ifindex)
    }

    /// How catena is attached to `ifindex` right now (asks the kernel), if at all.
    pub fn attachment(&self, ifindex: u32) -> anyhow::Result<Option<AttachMode>> {
        attach::attachment(ifindex)
    }

    /// Removes TCX link pins of interfaces not in `live_ifindexes` (or whose
    /// device is gone). Returns how many pins were removed.
    pub fn gc_links(&mut self, live_ifindexes: &BTreeSet<u32>) -> anyhow::Result<usize> {
        attach::gc_links(&self.layout, live_ifindexes)
    }

    /// Attaches the socket-level load balancer (cgroup `connect4`, `sendmsg4`,
    /// `recvmsg4`, `getpeername4`) to the cgroup v2 directory `cgroup`, so
    /// processes in it and below (for the node's cgroup2 root,
    /// [`cgroup2_root`]: every process on the node, host-network pods
    /// included) reach ClusterIPs, see the VIP in `getpeername()` and in UDP
    /// reply sources, and get ECONNREFUSED at once from a Service without
    /// endpoints. One BPF link per hook (other programs on the cgroup keep
    /// running), pinned at `<bpffs_dir>/links/cgroup-<id>-<hook>` so they
    /// outlive the agent. Idempotent: links already there are kept
    /// (and moved to the currently loaded programs). All hooks or none. The
    /// IPv6 hooks (`connect6`, ...) are attached alongside, the same way.
    pub fn attach_cgroup(&mut self, cgroup: &Path) -> anyhow::Result<()> {
        cgroup::attach(&mut self.ebpf, &self.layout, cgroup)
    }

    /// Detaches catena's socket programs from `cgroup` and unpins their links;
    /// also collects pins whose cgroup no longer exists. Idempotent.
    pub fn detach_cgroup(&mut self, cgroup: &Path) -> anyhow::Result<()> {
        cgroup::detach(&self.layout, cgroup)
    }

    /// Whether the socket programs are attached to `cgroup` (asks the kernel).
    pub fn cgroup_attached(&self, cgroup: &Path) -> anyhow::Result<bool> {
        cgroup::attached(&self.layout, cgroup)
    }

    /// Writes the per-endpoint config read by the programs.
    /// Also records the pod's address as local (`LOCAL_EP4`), which is how
    /// external traffic knows a backend needs no SNAT.
    pub fn upsert_endpoint(&mut self, ifindex: u32, info: EndpointInfo) -> anyhow::Result<()> {
        if let Some(old) = self.endpoints.get(ifindex)? {
            if old.ipv4 != info.ipv4 && old.ipv4 != 0 {
                self.devices.remove_local(old.ipv4, ifindex)?;
            }
        }
        self.endpoints.upsert(ifindex, info)?;
        if info.ipv4 != 0 {
            self.devices.set_local(info.ipv4, ifindex)?;
        }
        Ok(())
    }

    /// Removes the interface's endpoint entry (its packets are dropped from
    /// then on) and, unless another interface still carries the same endpoint
    /// id, that endpoint's policy flags and entries: the agent reuses ids, and
    /// a new endpoint must not inherit a removed one's policy.
    pub fn remove_endpoint(&mut self, ifindex: u32) -> anyhow::Result<()> {
        let old = self.endpoints.get(ifindex)?;
        self.endpoints.remove(ifindex)?;
        if let Some(old) = old.filter(|o| o.ipv4 != 0) {
            self.devices.remove_local(old.ipv4, ifindex)?;
        }
        if let Some(old) = old {
            if !self.endpoints.has_endpoint_id(old.endpoint_id)? {
                self.policy.clear_endpoint(old.endpoint_id)?;
            }
        }
        Ok(())
    }

    /// Attaches `from_netdev` / `to_netdev` to an external device and
    /// records `ipv4` as the address flows SNATed out of it leave with.
    /// Idempotent (a changed address is rewritten). Pins:
    /// `<bpffs_dir>/links/dev-<ifindex>-ingress|egress`.
    pub fn attach_device(
        &mut self,
        ifindex: u32,
        ifname: &str,
        ipv4: Ipv4Addr,
    ) -> anyhow::Result<AttachMode> {
        let mode = devices::attach(&mut self.ebpf, &self.layout, ifindex, ifname)?;
        self.devices.set_device(ifindex, ipv4)?;
        Ok(mode)
    }

    /// Detaches an external device and forgets it. Idempotent.
    pub fn detach_device(&mut self, ifindex: u32) -> anyhow::Result<()> {
        self.devices.remove_device(ifindex)?;
        devices::detach(&self.layout, ifindex)
    }

    /// External devices as programmed (ifindex, SNAT address), plus any that
    /// only have link pins (left by a previous run) with 0.0.0.0.
    pub fn devices(&self) -> anyhow::Result<Vec<(u32, Ipv4Addr)>> {
        let mut out = self.devices.devices()?;
        for ifindex in devices::pinned(&self.layout)? {
            if !out.iter().any(|(i, _)| *i == ifindex) {
                out.push((ifindex, Ipv4Addr::UNSPECIFIED));
            }
        }
        out.sort();
        Ok(out)
    }

    /// Drops `LOCAL_EP4` entries of interfaces not in `live` (a previous
    /// run's endpoints). Returns how many.
    pub fn gc_local_addresses(&mut self, live: &BTreeSet<u32>) -> anyhow::Result<usize> {
        let stale = self.devices.stale_locals(live)?;
        for (addr, ifindex) in &stale {
            self.devices.remove_local(*addr, *ifindex)?;
        }
        Ok(stale.len())
    }

    pub fn endpoint(&self, ifindex: u32) -> anyhow::Result<Option<EndpointInfo>> {
        self.endpoints.get(ifindex)
    }

    /// Makes the service maps hold exactly `desired`, changing only what
    /// differs, in an order that never exposes a half-written service to
    /// packets (backends, then slots, then the master entry; removals last).
    /// Maglev frontends get their lookup table after the service maps (their
    /// backend ids exist by then); tables no longer wanted go first. In
    /// between such a frontend selects at random, never a missing backend.
    pub fn apply_services(&mut self, desired: &LbDesired) -> anyhow::Result<ApplyStats> {
        self.apply_services_with(desired, None)
    }

    /// [`Datapath::apply_services`] for a `desired` that differs from the
    /// last one applied only at the `changed` frontends (added, edited or
    /// removed): only those are diffed and written. The caller must name
    /// every frontend that changed; the first apply after open, and any apply
    /// after a failed one, still looks at every frontend.
    pub fn apply_services_changed(
        &mut self,
        desired: &LbDesired,
        changed: &BTreeSet<Frontend>,
    ) -> anyhow::Result<ApplyStats> {
        self.apply_services_with(desired, Some(changed))
    }

    fn apply_services_with(
        &mut self,
        desired: &LbDesired,
        changed: Option<&BTreeSet<Frontend>>,
    ) -> anyhow::Result<ApplyStats> {
        let keep: BTreeSet<u32> = desired
            .maglev
            .iter()
            .filter(|fe| desired.services.contains_key(fe))
            .filter_map(|fe| self.lb.frontend(fe).map(|(rev_nat, _, _)| rev_nat))
            .collect();
        self.maglev.retain(&keep)?;
        let stats = match changed {
            Some(changed) => self.lb.apply_changed(&mut self.lb_maps, desired, changed)?,
            None => self.lb.apply(&mut self.lb_maps, desired)?,
        };
        let frontends: Vec<maglev::MaglevFrontend<'_>> = desired
            .maglev
            .iter()
            .filter_map(|fe| self.lb.frontend(fe))
            .map(|(rev_nat_index, backends, ids)| maglev::MaglevFrontend {
                rev_nat_index,
                backends,
                ids,
            })
            .collect();
        self.maglev.write(&frontends)?;
        // IPv6 frontends' tables, in the same order around their own maps.
        let keep6: BTreeSet<u32> = desired
            .maglev6
            .iter()
            .filter(|fe| desired.services6.contains_key(fe))
            .filter_map(|fe| self.lb6.frontend(fe).map(|(rev_nat, _, _)| rev_nat))
            .collect();
        self.maglev6.retain(&keep6)?;
        let stats6 = match changed {
            Some(_) => {
                let changed6 = self.lb6.changed_frontends(desired);
                self.lb6
                    .apply_changed(&mut self.lb6_maps, desired, &changed6)?
            }
            None => self.lb6.apply(&mut self.lb6_maps, desired)?,
        };
        let frontends6: Vec<maglev::MaglevFrontend<'_, Ipv6Addr>> = desired
            .maglev6
            .iter()
            .filter_map(|fe| self.lb6.frontend(fe))
            .map(|(rev_nat_index, backends, ids)| maglev::MaglevFrontend {
                rev_nat_index,
                backends,
                ids,
            })
            .collect();
        self.maglev6.write(&frontends6)?;
        Ok(stats.plus(stats6))
    }

    /// The IPv6 frontends as programmed.
    pub fn services6(&self) -> Vec<ProgrammedService6> {
        self.lb6.programmed()
    }

    /// All IPv6 conntrack entries.
    pub fn ct6_dump(&self) -> anyhow::Result<Vec<(Ct6Key, Ct4Value)>> {
        self.conntrack6.dump()
    }

    /// Deletes every IPv6 conntrack entry; returns how many were deleted.
    pub fn ct6_flush(&mut self) -> anyhow::Result<usize> {
        self.conntrack6.flush()
    }

    /// Maglev table writes and deletes done by this instance (both
    /// families).
    pub fn maglev_table_writes(&self) -> u64 {
        self.maglev.writes + self.maglev6.writes
    }

    pub fn services(&self) -> Vec<ProgrammedService> {
        self.lb.programmed()
    }

    /// Service map writes and deletes done by this instance (a no-op apply
    /// adds none).
    pub fn service_map_writes(&self) -> u64 {
        self.lb.writes + self.lb6.writes
    }

    /// Packet counters (name -> sum over CPUs).
    pub fn counters(&self) -> anyhow::Result<BTreeMap<String, u64>> {
        self.metrics.read()
    }

    /// Number of live conntrack entries (IPv4 and IPv6).
    pub fn ct_entries(&self) -> anyhow::Result<usize> {
        Ok(self.conntrack.count()? + self.conntrack6.count()?)
    }

    /// All conntrack entries.
    pub fn ct_dump(&self) -> anyhow::Result<Vec<(Ct4Key, Ct4Value)>> {
        self.conntrack.dump()
    }

    /// Deletes every conntrack entry; returns how many were deleted.
    pub fn ct_flush(&mut self) -> anyhow::Result<usize> {
        self.conntrack.flush()
    }
}
