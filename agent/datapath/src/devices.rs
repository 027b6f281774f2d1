//! The node's external devices: `from_netdev` (ingress) and `to_netdev`
//! (egress) attached per device, and the maps only north-south traffic
//! reads (`DEVICES4`, `LOCAL_EP4`, and `DEVICES6` for IPv6; `SNAT4` and
//! `SNAT6` are written by the programs alone).
//!
//! Attachment mirrors the host veths' (TCX links pinned so they outlive the
//! agent, clsact where TCX is missing) but the pins are named
//! `<dir>/links/dev-<ifindex>-ingress|egress`: a device's ifindex can never
//! be mistaken for a pod veth's by the veth link GC, which parses a leading
//! number.

use std::fs;
use std::io;
use std::mem::size_of;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::AsFd;
use std::path::PathBuf;

use anyhow::Context;
use aya::maps::{HashMap, MapData, MapType};
use aya::programs::links::FdLink;
use aya::programs::tc::{NlOptions, TcAttachOptions};
use aya::programs::{LinkOrder, SchedClassifier, TcAttachType};
use aya::Ebpf;
use catena_common::map_names;
use catena_common::nodeport::{
    NodeDevice, NodeDevice6, Snat4Key, Snat4Value, Snat6Key, Snat6Value,
};
use catena_common::program_names;
use tracing::{debug, info};

use crate::endpoints::not_found;
use crate::lb::{addr_from_map, addr_to_map};
use crate::loader::Layout;
use crate::{netlink, sys, AttachMode};

/// (name, type, key size, value size) of the maps this module owns, checked
/// by the loader like every other map.
pub(crate) fn expected_maps() -> [(&'static str, MapType, usize, usize); 5] {
    [
        (
            map_names::DEVICES4,
            MapType::Hash,
            size_of::<u32>(),
            size_of::<NodeDevice>(),
        ),
        (
            map_names::LOCAL_EP4,
            MapType::Hash,
            size_of::<u32>(),
            size_of::<u32>(),
        ),
        (
            map_names::SNAT4,
            MapType::LruHash,
            size_of::<Snat4Key>(),
            size_of::<Snat4Value>(),
        ),
        (
            map_names::DEVICES6,
            MapType::Hash,
            size_of::<u32>(),
            size_of::<NodeDevice6>(),
        ),
        (
            map_names::SNAT6,
            MapType::LruHash,
            size_of::<Snat6Key>(),
            size_of::<Snat6Value>(),
        ),
    ]
}

/// One direction of a device attachment.
struct Hook {
    program: &'static str,
    suffix: &'static str,
    tc: TcAttachType,
    tcx_attach_type: u32,
    tc_parent: u32,
}

const HOOKS: [Hook; 2] = [
    Hook {
        program: program_names::FROM_NETDEV,
        suffix: "ingress",
        tc: TcAttachType::Ingress,
        tcx_attach_type: sys::BPF_TCX_INGRESS,
        tc_parent: netlink::TC_PARENT_INGRESS,
    },
    Hook {
        program: program_names::TO_NETDEV,
        suffix: "egress",
        tc: TcAttachType::Egress,
        tcx_attach_type: sys::BPF_TCX_EGRESS,
        tc_parent: netlink::TC_PARENT_EGRESS,
    },
];

/// Pin-name prefix of device links (see the module doc).
pub const LINK_PREFIX: &str = "dev-";

fn link_pin(layout: &Layout, ifindex: u32, hook: &Hook) -> PathBuf {
    layout
        .links()
        .join(format!("{LINK_PREFIX}{ifindex}-{}", hook.suffix))
}

/// An external device as programmed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Device {
    pub ifindex: u32,
    pub ifname: String,
    /// The address flows SNATed out of this device leave with.
    pub ipv4: Ipv4Addr,
}

pub(crate) struct DeviceMaps {
    pub devices: HashMap<MapData, u32, NodeDevice>,
    pub local: HashMap<MapData, u32, u32>,
}

impl DeviceMaps {
    pub fn set_device(&mut self, ifindex: u32, ipv4: Ipv4Addr) -> anyhow::Result<()> {
        let value = NodeDevice {
            ipv4: addr_to_map(ipv4),
            flags: 0,
        };
        self.devices
            .insert(ifindex, value, 0)
            .with_context(|| format!("writing DEVICES4[{ifindex}]"))
    }

    pub fn remove_device(&mut self, ifindex: u32) -> anyhow::Result<()> {
        match self.devices.remove(&ifindex) {
            Ok(()) => Ok(()),
            Err(e) if not_found(&e) => Ok(()),
            Err(e) => Err(e).with_context(|| format!("deleting DEVICES4[{ifindex}]")),
        }
    }

    pub fn devices(&self) -> anyhow::Result<Vec<(u32, Ipv4Addr)>> {
        let mut out = Vec::new();
        for item in self.devices.iter() {
            match item {
                Ok((ifindex, dev)) => out.push((ifindex, addr_from_map(dev.ipv4))),
                Err(e) if not_found(&e) => {}
                Err(e) => return Err(e).context("iterating DEVICES4"),
            }
        }
        out.sort();
        Ok(out)
    }

    /// Marks `addr` as a local endpoint (host veth `ifindex`).
    pub fn set_local(&mut self, addr: u32, ifindex: u32) -> anyhow::Result<()> {
        self.local
            .insert(addr, ifindex, 0)
            .with_context(|| format!("writing LOCAL_EP4[{}]", addr_from_map(addr)))
    }

    /// Forgets `addr` unless another interface has claimed it since (a pod
    /// recreated with the same address before the old veth's removal).
    pub fn remove_local(&mut self, addr: u32, ifindex: u32) -> anyhow::Result<()> {
        match self.local.get(&addr, 0) {
            Ok(owner) if owner != ifindex => return Ok(()),
            Ok(_) => {}
            Err(e) if not_found(&e) => return Ok(()),
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("reading LOCAL_EP4[{}]", addr_from_map(addr)))
            }
        }
        match self.local.remove(&addr) {
            Ok(()) => Ok(()),
            Err(e) if not_found(&e) => Ok(()),
            Err(e) => {
                Err(e).with_context(|| format!("deleting LOCAL_EP4[{}]", addr_from_map(addr)))
            }
        }
    }

    /// Entries whose host veth is not in `live` (left by a previous run).
    pub fn stale_locals(
        &self,
        live: &std::collections::BTreeSet<u32>,
    ) -> anyhow::Result<Vec<(u32, u32)>> {
        let mut out = Vec::new();
        for item in self.local.iter() {
            match item {
                Ok((addr, ifindex)) if !live.contains(&ifindex) => out.push((addr, ifindex)),
                Ok(_) => {}
                Err(e) if not_found(&e) => {}
                Err(e) => return Err(e).context("iterating LOCAL_EP4"),
            }
        }
        Ok(out)
    }
}

/// `DEVICES6` as held by the loaded object. The map is not taken out of
/// the `Ebpf` like the IPv4 ones: only these methods use it, so the
/// datapath's fields stay as they are.
fn devices6_map(ebpf: &mut Ebpf) -> anyhow::Result<HashMap<&mut MapData, u32, NodeDevice6>> {
    let map = ebpf
        .map_mut(map_names::DEVICES6)
        .context("the eBPF object has no map DEVICES6")?;
    HashMap::try_from(map).context("map DEVICES6 has an unexpected type")
}

impl crate::Datapath {
    /// Records (or, with `None`, forgets) the IPv6 address flows SNATed
    /// out of external device `ifindex` leave with (`DEVICES6`). The
    /// device's hooks are attached by [`crate::Datapath::attach_device`],
    /// which both address families share.
    pub fn set_device6(&mut self, ifindex: u32, ipv6: Option<Ipv6Addr>) -> anyhow::Result<()> {
        let mut map = devices6_map(&mut self.ebpf)?;
        match ipv6 {
            Some(addr) => {
                let value = NodeDevice6 {
                    ipv6: crate::lb6::addr_to_map(addr),
                    flags: 0,
                };
                map.insert(ifindex, value, 0)
                    .with_context(|| format!("writing DEVICES6[{ifindex}]"))
            }
            None => match map.remove(&ifindex) {
                Ok(()) => Ok(()),
                Err(e) if not_found(&e) => Ok(()),
                Err(e) => Err(e).with_context(|| format!("deleting DEVICES6[{ifindex}]")),
            },
        }
    }

    /// External devices with an IPv6 SNAT address (ifindex, address), sorted.
    pub fn devices6(&mut self) -> anyhow::Result<Vec<(u32, Ipv6Addr)>> {
        let map = devices6_map(&mut self.ebpf)?;
        let mut out = Vec::new();
        for item in map.iter() {
            match item {
                Ok((ifindex, dev)) => out.push((ifindex, crate::lb6::addr_from_map(dev.ipv6))),
                Err(e) if not_found(&e) => {}
                Err(e) => return Err(e).context("iterating DEVICES6"),
            }
        }
        out.sort();
        Ok(out)
    }
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut SchedClassifier> {
    ebpf.program_mut(name)
        .with_context(|| format!("program {name} missing"))?
        .try_into()
        .with_context(|| format!("program {name} is not a tc classifier"))
}

fn remove_pin(pin: &std::path::Path) -> anyhow::Result<()> {
    match fs::remove_file(pin) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", pin.display())),
    }
}

/// Whether the pinned link of `hook` is alive on `ifindex`; moves it to the
/// loaded program if it runs an older one, removes it if stale.
fn pinned_link_alive(
    prog: &SchedClassifier,
    layout: &Layout,
    ifindex: u32,
    hook: &Hook,
) -> anyhow::Result<bool> {
    let pin = link_pin(layout, ifindex, hook);
    let fd = match sys::obj_get(&pin) {
        Ok(fd) => fd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e).with_context(|| format!("opening link pin {}", pin.display())),
    };
    let link =
        sys::link_info(fd.as_fd()).with_context(|| format!("link info of {}", pin.display()))?;
    if link.link_type == sys::BPF_LINK_TYPE_TCX
        && link.tcx_ifindex == ifindex
        && link.tcx_attach_type == hook.tcx_attach_type
    {
        let ours = prog.info().context("program info")?.id();
        if link.prog_id != ours {
            let prog_fd = prog.fd().context("program fd")?;
            sys::link_update(fd.as_fd(), prog_fd.as_fd())
                .with_context(|| format!("updating link {} to program {ours}", pin.display()))?;
            info!(
                ifindex,
                direction = hook.suffix,
                "upgraded device link program"
            );
        }
        return Ok(true);
    }
    remove_pin(&pin)?;
    Ok(false)
}

fn our_filters(ifindex: u32, hook: &Hook) -> anyhow::Result<Vec<netlink::TcObject>> {
    Ok(netlink::filters(ifindex, hook.tc_parent)
        .with_context(|| format!("listing tc filters of ifindex {ifindex}"))?
        .into_iter()
        .filter(|f| f.kind == "bpf" && f.bpf_name.as_deref() == Some(hook.program))
        .collect())
}

/// Attaches both hooks to the device (idempotent): TCX links pinned, or
/// clsact filters where TCX is unsupported. A device whose ingress hook holds
/// a foreign qdisc is refused rather than replaced (clsact path only).
pub(crate) fn attach(
    ebpf: &mut Ebpf,
    layout: &Layout,
    ifindex: u32,
    ifname: &str,
) -> anyhow::Result<AttachMode> {
    if sys::ifindex_of(ifname) != Some(ifindex) {
        anyhow::bail!("device {ifname:?} does not have ifindex {ifindex} (renamed or recreated?)");
    }
    match attach_tcx(ebpf, layout, ifindex, ifname) {
        Ok(()) => Ok(AttachMode::Tcx),
        Err(TcxError::Unsupported(e)) => {
            info!(ifname, error = %e, "TCX unavailable on device, falling back to clsact");
            attach_clsact(ebpf, ifindex, ifname)?;
            Ok(AttachMode::Clsact)
        }
        Err(TcxError::Other(e)) => Err(e),
    }
}

enum TcxError {
    Unsupported(io::Error),
    Other(anyhow::Error),
}

impl From<anyhow::Error> for TcxError {
    fn from(e: anyhow::Error) -> Self {
        TcxError::Other(e)
    }
}

fn attach_tcx(
    ebpf: &mut Ebpf,
    layout: &Layout,
    ifindex: u32,
    ifname: &str,
) -> Result<(), TcxError> {
    for hook in &HOOKS {
        let prog = program(ebpf, hook.program)?;
        if pinned_link_alive(prog, layout, ifindex, hook)? {
            continue;
        }
        let id = match prog.attach_with_options(
            ifname,
            hook.tc,
            TcAttachOptions::TcxOrder(LinkOrder::default()),
        ) {
            Ok(id) => id,
            Err(aya::programs::ProgramError::SyscallError(e))
                if matches!(
                    e.io_error.raw_os_error(),
                    Some(libc::EINVAL | libc::EOPNOTSUPP | libc::ENOSYS)
                ) =>
            {
                return Err(TcxError::Unsupported(e.io_error));
            }
            Err(e) => {
                return Err(TcxError::Other(anyhow::Error::new(e).context(format!(
                    "attaching {} to device {ifname} {} (TCX)",
                    hook.program, hook.suffix
                ))))
            }
        };
        let link: FdLink = prog
            .take_link(id)
            .context("taking the TCX link")?
            .try_into()
            .context("TCX link as FdLink")?;
        let pin = link_pin(layout, ifindex, hook);
        link.pin(&pin)
            .with_context(|| format!("pinning TCX link at {}", pin.display()))?;
        debug!(
            ifindex,
            ifname,
            direction = hook.suffix,
            "device TCX link pinned"
        );
    }
    Ok(())
}

fn attach_clsact(ebpf: &mut Ebpf, ifindex: u32, ifname: &str) -> anyhow::Result<()> {
    let qdiscs = netlink::qdiscs(ifindex).with_context(|| format!("listing qdiscs of {ifname}"))?;
    match qdiscs.iter().find(|q| q.parent == netlink::TC_H_CLSACT) {
        Some(q) if q.kind != "clsact" => anyhow::bail!(
            "device {ifname} has a {:?} qdisc at the ingress hook (owned by another component) \
             and TCX is unavailable: refusing to replace it",
            q.kind
        ),
        Some(_) => {}
        None => aya::programs::tc::qdisc_add_clsact(ifname)
            .with_context(|| format!("adding clsact qdisc to {ifname}"))?,
    }
    for hook in &HOOKS {
        if !our_filters(ifindex, hook)?.is_empty() {
            continue;
        }
        let prog = program(ebpf, hook.program)?;
        let id = prog
            .attach_with_options(
                ifname,
                hook.tc,
                TcAttachOptions::Netlink(NlOptions::default()),
            )
            .with_context(|| format!("attaching {} to {ifname} (clsact)", hook.program))?;
        let link = prog.take_link(id).context("taking the clsact link")?;
        // The filter must outlive this process; detach finds it by name.
        std::mem::forget(link);
    }
    Ok(())
}

/// Detaches both hooks from `ifindex` and removes their pins. Idempotent; a
/// vanished device is fine.
pub(crate) fn detach(layout: &Layout, ifindex: u32) -> anyhow::Result<()> {
    for hook in &HOOKS {
        let pin = link_pin(layout, ifindex, hook);
        match sys::obj_get(&pin) {
            Ok(fd) => {
                if let Err(e) = sys::link_detach(fd.as_fd()) {
                    debug!(ifindex, error = %e, "device link detach (device gone?)");
                }
                remove_pin(&pin)?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("opening link pin {}", pin.display())),
        }
    }
    if sys::ifname_of(ifindex).is_none() {
        return Ok(());
    }
    for hook in &HOOKS {
        for filter in our_filters(ifindex, hook)? {
            match netlink::delete_filter(&filter) {
                Ok(()) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ENODEV)) => {}
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("deleting tc filter on ifindex {ifindex}"))
                }
            }
        }
    }
    Ok(())
}

/// Ifindexes that have device link pins.
pub(crate) fn pinned(layout: &Layout) -> anyhow::Result<Vec<u32>> {
    let dir = layout.links();
    let mut out = std::collections::BTreeSet::new();
    for entry in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let name = entry?.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(LINK_PREFIX)) else {
            continue;
        };
        if let Some(ifindex) = rest.split_once('-').and_then(|(i, _)| i.parse().ok()) {
            out.insert(ifindex);
        }
    }
    Ok(out.into_iter().collect())
}
