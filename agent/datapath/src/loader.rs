//! Loading the embedded object: bpffs checks, pinned-map reuse, program pins.

use std::fs;
use std::io;
use std::mem::size_of;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use aya::maps::{Array, Map, MapData, MapInfo, MapType, ProgramArray};
use aya::programs::{CgroupSockAddr, SchedClassifier};
use aya::{Ebpf, EbpfLoader};
use catena_common::{
    ct, ct6, endpoint, events, lb, lb6, map_names, policy, program_names, tail_calls,
    MAP_LAYOUT_REVISION,
};
use tracing::{debug, info, warn};

use crate::sys;

/// The object built by build.rs from ebpf/programs.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/catena-ebpf.o"));

/// Every tc classifier loaded and pinned: the two attached to host veths, the
/// two attached to external devices, and `noop`, the baseline for per-packet cost measurements (never attached).
const TC_PROGRAMS: [&str; 14] = [
    program_names::FROM_CONTAINER,
    program_names::TO_CONTAINER,
    program_names::FROM_NETDEV,
    program_names::TO_NETDEV,
    program_names::NOOP,
    program_names::FROM_CONTAINER6,
    program_names::TO_CONTAINER6,
    program_names::REFUSE6,
    program_names::POLICY6_EGRESS,
    program_names::POLICY6_INGRESS,
    program_names::FROM_NETDEV6,
    program_names::TO_NETDEV6,
    program_names::FROM_NETDEV6_LB,
    program_names::FROM_NETDEV6_SNAT,
];

/// The IPv6 service programs and their `TAIL_CALLS6` slots.
const TAIL_CALLS6: [(&str, u32); 9] = [
    (program_names::FROM_CONTAINER6, tail_calls::FROM_CONTAINER6),
    (program_names::TO_CONTAINER6, tail_calls::TO_CONTAINER6),
    (program_names::REFUSE6, tail_calls::REFUSE6),
    (program_names::POLICY6_EGRESS, tail_calls::POLICY6_EGRESS),
    (program_names::POLICY6_INGRESS, tail_calls::POLICY6_INGRESS),
    (program_names::FROM_NETDEV6, tail_calls::FROM_NETDEV6),
    (program_names::TO_NETDEV6, tail_calls::TO_NETDEV6),
    (program_names::FROM_NETDEV6_LB, tail_calls::FROM_NETDEV6_LB),
    (
        program_names::FROM_NETDEV6_SNAT,
        tail_calls::FROM_NETDEV6_SNAT,
    ),
];

/// The cgroup sock_addr programs (socket-level load balancing).
pub const SOCK_PROGRAMS: [&str; 8] = [
    program_names::SOCK_CONNECT4,
    program_names::SOCK_SENDMSG4,
    program_names::SOCK_RECVMSG4,
    program_names::SOCK_GETPEERNAME4,
    program_names::SOCK_CONNECT6,
    program_names::SOCK_SENDMSG6,
    program_names::SOCK_RECVMSG6,
    program_names::SOCK_GETPEERNAME6,
];

/// The bpffs layout under the datapath dir.
#[derive(Clone, Debug)]
pub struct Layout {
    pub root: PathBuf,
}

impl Layout {
    pub fn maps(&self) -> PathBuf {
        self.root.join("maps")
    }
    pub fn programs(&self) -> PathBuf {
        self.root.join("programs")
    }
    pub fn program(&self, name: &str) -> PathBuf {
        self.programs().join(name)
    }
    pub fn links(&self) -> PathBuf {
        self.root.join("links")
    }
}

/// Fails unless `dir` is (or would be created) on a bpf filesystem, then
/// creates the layout's directories.
pub fn prepare(dir: &Path) -> anyhow::Result<Layout> {
    // The nearest existing ancestor decides where mkdir would land.
    let mut probe = dir;
    while !probe.exists() {
        probe = probe
            .parent()
            .with_context(|| format!("{} has no existing ancestor", dir.display()))?;
    }
    let magic = sys::fs_magic(probe).with_context(|| format!("statfs {}", probe.display()))?;
    if magic != sys::BPF_FS_MAGIC {
        bail!(
            "{} is not on a bpf filesystem ({} has magic {magic:#x}); mount one with \
             `mount -t bpf bpf /sys/fs/bpf`",
            dir.display(),
            probe.display()
        );
    }
    let layout = Layout {
        root: dir.to_path_buf(),
    };
    for d in [layout.maps(), layout.programs(), layout.links()] {
        fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    }
    Ok(layout)
}

/// (name, type, key size, value size) the programs expect of every map.
fn expected_maps() -> [(&'static str, MapType, usize, usize); 15] {
    [
        (
            map_names::LB4_SERVICES,
            MapType::Hash,
            size_of::<lb::Service4Key>(),
            size_of::<lb::Service4Value>(),
        ),
        (
            map_names::LB4_BACKENDS,
            MapType::Hash,
            size_of::<u32>(),
            size_of::<lb::Backend4>(),
        ),
        (
            map_names::LB4_REVNAT,
            MapType::Hash,
            size_of::<u32>(),
            size_of::<lb::RevNat4>(),
        ),
        (
            map_names::CT4,
            MapType::LruHash,
            size_of::<ct::Ct4Key>(),
            size_of::<ct::Ct4Value>(),
        ),
        (
            map_names::ENDPOINTS,
            MapType::Hash,
            size_of::<u32>(),
            size_of::<endpoint::EndpointInfo>(),
        ),
        (
            map_names::METRICS,
            MapType::PerCpuArray,
            size_of::<u32>(),
            size_of::<u64>(),
        ),
        (
            map_names::LB4_SOCK_REVNAT,
            MapType::LruHash,
            size_of::<lb::SockRevNat4Key>(),
            size_of::<lb::SockRevNat4Value>(),
        ),
        (
            map_names::LB4_AFFINITY,
            MapType::LruHash,
            size_of::<lb::Affinity4Key>(),
            size_of::<lb::Affinity4Value>(),
        ),
        (
            map_names::LB4_MAGLEV,
            MapType::Hash,
            size_of::<u32>(),
            size_of::<catena_common::maglev::MaglevTable>(),
        ),
        (
            map_names::IPCACHE,
            MapType::LpmTrie,
            size_of::<aya::maps::lpm_trie::Key<policy::Ipcache4Key>>(),
            size_of::<policy::IpcacheValue>(),
        ),
        (
            map_names::POLICY,
            MapType::LpmTrie,
            size_of::<aya::maps::lpm_trie::Key<policy::PolicyKey>>(),
            size_of::<policy::PolicyValue>(),
        ),
        (
            map_names::POLICY_EP,
            MapType::Array,
            size_of::<u32>(),
            size_of::<u32>(),
        ),
        // A ring buffer has no key or value; its size is max_entries.
        (map_names::EVENTS, MapType::RingBuf, 0, 0),
        (
            map_names::EVENTS_RATE,
            MapType::PerCpuArray,
            size_of::<u32>(),
            size_of::<events::EventRate>(),
        ),
        (
            map_names::MAP_LAYOUT,
            MapType::Array,
            size_of::<u32>(),
            size_of::<u32>(),
        ),
    ]
}

/// The IPv6 service and conntrack maps, checked like [`expected_maps`].
fn expected_maps6() -> [(&'static str, MapType, usize, usize); 10] {
    [
        (
            map_names::TAIL_CALLS6,
            MapType::ProgramArray,
            size_of::<u32>(),
            size_of::<u32>(),
        ),
        (
            map_names::LB6_SERVICES,
            MapType::Hash,
            size_of::<lb6::Service6Key>(),
            size_of::<lb6::Service6Value>(),
        ),
        (
            map_names::LB6_BACKENDS,
            MapType::Hash,
            size_of::<u32>(),
            size_of::<lb6::Backend6>(),
        ),
        (
            map_names::LB6_REVNAT,
            MapType::Hash,
            size_of::<u32>(),
            size_of::<lb6::RevNat6>(),
        ),
        (
            map_names::CT6,
            MapType::LruHash,
            size_of::<ct6::Ct6Key>(),
            size_of::<ct6::Ct6Value>(),
        ),
        (
            map_names::LB6_SOCK_REVNAT,
            MapType::LruHash,
            size_of::<lb6::SockRevNat6Key>(),
            size_of::<lb6::SockRevNat6Value>(),
        ),
        (
            map_names::LB6_AFFINITY,
            MapType::LruHash,
            size_of::<lb6::Affinity6Key>(),
            size_of::<lb6::Affinity6Value>(),
        ),
        (
            map_names::LB6_MAGLEV,
            MapType::Hash,
            size_of::<u32>(),
            size_of::<catena_common::maglev::MaglevTable>(),
        ),
        (
            map_names::LB_SOCK_AFFINITY,
            MapType::LruHash,
            size_of::<catena_common::lb::SockAffinityKey>(),
            size_of::<catena_common::lb::Affinity4Value>(),
        ),
        (
            map_names::IPCACHE6,
            MapType::LpmTrie,
            size_of::<aya::maps::lpm_trie::Key<policy::Ipcache6Key>>(),
            size_of::<policy::IpcacheValue>(),
        ),
    ]
}

/// Array maps are indexed up to their size: a pinned `METRICS` smaller than
/// the object's (an older version with fewer counters) would silently lose
/// the new counters, so it counts as incompatible too. The same holds for
/// the load-balancer maps whose capacity is a ceiling the agent enforces
/// (reverse-NAT indexes are handed out up to `REVNAT_MAX_ENTRIES - 1`): a
/// smaller pin would make writes fail below the documented limit.
fn min_entries(name: &str) -> u32 {
    match name {
        map_names::METRICS => catena_common::metrics::COUNTER_MAX,
        map_names::POLICY_EP => policy::POLICY_EP_MAX,
        map_names::EVENTS_RATE | map_names::MAP_LAYOUT => 1,
        map_names::TAIL_CALLS6 => tail_calls::COUNT,
        map_names::LB4_REVNAT | map_names::LB6_REVNAT => lb::REVNAT_MAX_ENTRIES,
        map_names::LB4_SERVICES | map_names::LB6_SERVICES => lb::SERVICE_MAP_MAX_ENTRIES,
        map_names::LB4_BACKENDS | map_names::LB6_BACKENDS => lb::BACKEND_MAP_MAX_ENTRIES,
        _ => 0,
    }
}

/// The `MAP_LAYOUT_REVISION` in which a map's key or value layout last
/// changed (0: never). A pin stamped with an older revision is replaced even
/// when its key and value sizes match: same-size reorders are exactly what
/// the size check cannot see.
fn layout_changed_in(name: &str) -> u32 {
    match name {
        // Revision 1: reverse-NAT indexes widened from u16 to u32. Every map
        // holding one is listed, also those whose sizes changed with it.
        map_names::LB4_SERVICES
        | map_names::LB6_SERVICES
        | map_names::LB4_REVNAT
        | map_names::LB6_REVNAT
        | map_names::LB4_MAGLEV
        | map_names::LB6_MAGLEV
        | map_names::CT4
        | map_names::CT6
        | map_names::LB4_AFFINITY
        | map_names::LB6_AFFINITY
        | map_names::LB_SOCK_AFFINITY
        | map_names::LB4_SOCK_REVNAT
        | map_names::LB6_SOCK_REVNAT
        | map_names::SNAT4
        | map_names::SNAT6 => 1,
        _ => 0,
    }
}

/// The layout revision stamped in the pinned `MAP_LAYOUT` (0 when there is
/// none: pins of a version before the stamp, or no pins at all).
fn stamped_revision(layout: &Layout) -> anyhow::Result<u32> {
    let path = layout.maps().join(map_names::MAP_LAYOUT);
    if !path.exists() {
        return Ok(0);
    }
    let data = MapData::from_pin(&path)
        .with_context(|| format!("opening pinned map {}", path.display()))?;
    match Array::<_, u32>::try_from(Map::Array(data)) {
        Ok(stamp) => Ok(stamp.get(&0, 0).unwrap_or(0)),
        // Not the one-u32 array it should be: whatever wrote it, its
        // revision is unknown, so every versioned map is treated as stale.
        Err(_) => Ok(0),
    }
}

/// Records that the pinned maps now have this build's layouts. Written after
/// the object is loaded (the stale pins are gone and every map is ours); a
/// crash before it only makes the next start replace those maps again.
fn stamp_revision(ebpf: &mut Ebpf) -> anyhow::Result<()> {
    let map = ebpf
        .map_mut(map_names::MAP_LAYOUT)
        .context("the eBPF object has no map MAP_LAYOUT")?;
    let mut stamp =
        Array::<_, u32>::try_from(map).context("map MAP_LAYOUT has an unexpected type")?;
    stamp
        .set(0, MAP_LAYOUT_REVISION, 0)
        .context("writing MAP_LAYOUT")
}

/// aya reuses any pin with the map's name without comparing definitions. A pin
/// left by a version with another key/value layout would be read with the wrong
/// layout, so such pins are replaced (their state is lost, which is the lesser
/// evil) before loading.
fn drop_incompatible_pins(layout: &Layout) -> anyhow::Result<()> {
    let stamped = stamped_revision(layout)?;
    // Pins of a newer agent (a downgrade): which layouts changed since ours
    // is unknowable here, so none is trusted.
    let newer = stamped > MAP_LAYOUT_REVISION;
    if newer {
        warn!(
            stamped,
            ours = MAP_LAYOUT_REVISION,
            "pinned maps come from a newer catena; replacing them all"
        );
    }
    for (name, ty, key, value) in expected_maps()
        .into_iter()
        .chain(crate::devices::expected_maps())
        .chain(crate::node_addr::expected_maps())
        .chain(expected_maps6())
    {
        let path = layout.maps().join(name);
        if !path.exists() {
            continue;
        }
        let info = MapInfo::from_pin(&path)
            .with_context(|| format!("reading pinned map {}", path.display()))?;
        let compatible = info.map_type().ok() == Some(ty)
            && info.key_size() as usize == key
            && info.value_size() as usize == value
            && info.max_entries() >= min_entries(name)
            && !newer
            && stamped >= layout_changed_in(name);
        if !compatible {
            warn!(
                map = name,
                stamped,
                ours = MAP_LAYOUT_REVISION,
                "pinned map has an incompatible layout; replacing it"
            );
            fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        }
    }
    Ok(())
}

/// Removes a previous run's pin at `pin` (links hold their own reference to
/// the old program and are upgraded on attach), then pins anew.
fn replace_pin(pin: &Path, do_pin: impl FnOnce(&Path) -> anyhow::Result<()>) -> anyhow::Result<()> {
    match fs::remove_file(pin) {
        Ok(()) => debug!(path = %pin.display(), "replaced stale program pin"),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", pin.display())),
    }
    do_pin(pin)
}

/// Points every `TAIL_CALLS6` slot at the program just loaded. The array is
/// pinned and shared with programs a previous run left attached; they call
/// the new IPv6 programs from here on, which read the same maps.
fn fill_tail_calls(ebpf: &mut Ebpf) -> anyhow::Result<()> {
    let mut calls = ProgramArray::try_from(
        ebpf.take_map(map_names::TAIL_CALLS6)
            .context("the eBPF object has no map TAIL_CALLS6")?,
    )
    .context("map TAIL_CALLS6 has an unexpected type")?;
    for (name, slot) in TAIL_CALLS6 {
        let prog: &SchedClassifier = ebpf
            .program(name)
            .with_context(|| format!("the eBPF object has no program {name}"))?
            .try_into()
            .with_context(|| format!("program {name} is not a tc classifier"))?;
        let fd = prog.fd().with_context(|| format!("fd of {name}"))?;
        calls
            .set(slot, fd, 0)
            .with_context(|| format!("TAIL_CALLS6[{slot}] = {name}"))?;
    }
    Ok(())
}

/// Loads the object (maps reused from or pinned to `<dir>/maps`), loads every
/// program into the kernel and pins them under `<dir>/programs`.
pub fn load(layout: &Layout) -> anyhow::Result<Ebpf> {
    drop_incompatible_pins(layout)?;
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(layout.maps())
        .load(OBJECT)
        .context("loading the catena eBPF object")?;
    for (name, ..) in expected_maps()
        .into_iter()
        .chain(crate::devices::expected_maps())
        .chain(crate::node_addr::expected_maps())
        .chain(expected_maps6())
    {
        if ebpf.map(name).is_none() {
            bail!("the eBPF object has no map {name}");
        }
    }
    stamp_revision(&mut ebpf)?;
    for name in TC_PROGRAMS {
        let prog: &mut SchedClassifier = ebpf
            .program_mut(name)
            .with_context(|| format!("the eBPF object has no program {name}"))?
            .try_into()
            .with_context(|| format!("program {name} is not a tc classifier"))?;
        prog.load()
            .with_context(|| format!("loading program {name} (verifier)"))?;
        replace_pin(&layout.program(name), |pin| {
            prog.pin(pin)
                .with_context(|| format!("pinning {name} at {}", pin.display()))
        })?;
    }
    fill_tail_calls(&mut ebpf)?;
    for name in SOCK_PROGRAMS {
        let prog: &mut CgroupSockAddr = ebpf
            .program_mut(name)
            .with_context(|| format!("the eBPF object has no program {name}"))?
            .try_into()
            .with_context(|| format!("program {name} is not a cgroup sock_addr program"))?;
        prog.load()
            .with_context(|| format!("loading program {name} (verifier)"))?;
        replace_pin(&layout.program(name), |pin| {
            prog.pin(pin)
                .with_context(|| format!("pinning {name} at {}", pin.display()))
        })?;
    }
    info!(dir = %layout.root.display(), "catena eBPF programs loaded");
    Ok(ebpf)
}
