//! Attaching the programs to host-side veths.
//!
//! TCX first: one BPF link per direction, pinned at
//! `<dir>/links/<ifindex>-ingress|egress` so it outlives the agent and is
//! removed by unpinning. Where TCX is unavailable (kernel < 6.6), clsact: the
//! qdisc is added only if absent (never replacing one), and a direct-action
//! filter is added per direction. The clsact filters need no state on disk: the
//! kernel reports each filter's program name, which is how catena finds its own.

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::os::fd::AsFd;
use std::path::PathBuf;

use anyhow::Context;
use aya::programs::links::FdLink;
use aya::programs::tc::{NlOptions, TcAttachOptions};
use aya::programs::{LinkOrder, ProgramError, SchedClassifier, TcAttachType};
use aya::sys::SyscallError;
use aya::Ebpf;
use catena_common::program_names;
use tracing::{debug, info, warn};

use crate::loader::Layout;
use crate::{netlink, sys, AttachMode};

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("interface {ifname:?} has ifindex {actual:?}, expected {expected} (veth recreated or renamed?)")]
    IfindexMismatch {
        ifname: String,
        expected: u32,
        actual: Option<u32>,
    },
    #[error(
        "interface {ifname:?} has a {kind:?} qdisc at the ingress hook (owned by another component, \
         e.g. the bandwidth plugin) and TCX is unavailable: refusing to replace it with clsact"
    )]
    ForeignIngressQdisc { ifname: String, kind: String },
    #[error("TCX is not supported here: {0}")]
    TcxUnsupported(io::Error),
}

#[derive(Clone, Copy, Debug)]
pub struct Direction {
    pub program: &'static str,
    pub suffix: &'static str,
    pub tc: TcAttachType,
    pub tcx_attach_type: u32,
    pub tc_parent: u32,
}

pub const DIRECTIONS: [Direction; 2] = [
    Direction {
        program: program_names::FROM_CONTAINER,
        suffix: "ingress",
        tc: TcAttachType::Ingress,
        tcx_attach_type: sys::BPF_TCX_INGRESS,
        tc_parent: netlink::TC_PARENT_INGRESS,
    },
    Direction {
        program: program_names::TO_CONTAINER,
        suffix: "egress",
        tc: TcAttachType::Egress,
        tcx_attach_type: sys::BPF_TCX_EGRESS,
        tc_parent: netlink::TC_PARENT_EGRESS,
    },
];

fn link_pin(layout: &Layout, ifindex: u32, dir: &Direction) -> PathBuf {
    layout.links().join(format!("{ifindex}-{}", dir.suffix))
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut SchedClassifier> {
    ebpf.program_mut(name)
        .with_context(|| format!("program {name} missing"))?
        .try_into()
        .with_context(|| format!("program {name} is not a tc classifier"))
}

fn check_ifindex(ifindex: u32, ifname: &str) -> Result<(), AttachError> {
    let actual = sys::ifindex_of(ifname);
    if actual != Some(ifindex) {
        return Err(AttachError::IfindexMismatch {
            ifname: ifname.to_owned(),
            expected: ifindex,
            actual,
        });
    }
    Ok(())
}

/// `mode`: None = TCX with clsact fallback; Some = only that mode.
pub fn attach(
    ebpf: &mut Ebpf,
    layout: &Layout,
    ifindex: u32,
    ifname: &str,
    mode: Option<AttachMode>,
) -> anyhow::Result<AttachMode> {
    check_ifindex(ifindex, ifname)?;
    if mode != Some(AttachMode::Clsact) {
        match attach_tcx(ebpf, layout, ifindex, ifname) {
            Ok(()) => return Ok(AttachMode::Tcx),
            Err(e) => match e.downcast_ref::<AttachError>() {
                Some(AttachError::TcxUnsupported(_)) if mode.is_none() => {
                    info!(ifname, error = %e, "TCX unavailable, falling back to clsact");
                }
                _ => return Err(e),
            },
        }
    }
    attach_clsact(ebpf, ifindex, ifname)?;
    Ok(AttachMode::Clsact)
}

/// Reports whether the pinned link for `dir` is alive on `ifindex`; upgrades
/// it to the currently loaded program if it runs an older one. Stale pins
/// (device gone, or the ifindex now names another device) are removed.
fn pinned_link_alive(
    prog: &SchedClassifier,
    layout: &Layout,
    ifindex: u32,
    dir: &Direction,
) -> anyhow::Result<bool> {
    let pin = link_pin(layout, ifindex, dir);
    let fd = match sys::obj_get(&pin) {
        Ok(fd) => fd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e).with_context(|| format!("opening link pin {}", pin.display())),
    };
    let link =
        sys::link_info(fd.as_fd()).with_context(|| format!("link info of {}", pin.display()))?;
    if link.link_type == sys::BPF_LINK_TYPE_TCX
        && link.tcx_ifindex == ifindex
        && link.tcx_attach_type == dir.tcx_attach_type
    {
        let ours = prog.info().context("program info")?.id();
        if link.prog_id != ours {
            let prog_fd = prog.fd().context("program fd")?;
            sys::link_update(fd.as_fd(), prog_fd.as_fd())
                .with_context(|| format!("updating link {} to program {ours}", pin.display()))?;
            info!(
                ifindex,
                direction = dir.suffix,
                old = link.prog_id,
                new = ours,
                "upgraded TCX link program"
            );
        }
        return Ok(true);
    }
    debug!(
        ifindex,
        direction = dir.suffix,
        ?link,
        "removing stale link pin"
    );
    remove_pin(&pin)?;
    Ok(false)
}

/// Unpins `pin`; an absent pin is fine (idempotent detach and GC).
pub(crate) fn remove_pin(pin: &std::path::Path) -> anyhow::Result<()> {
    match fs::remove_file(pin) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", pin.display())),
    }
}

fn tcx_unsupported(e: &ProgramError) -> Option<io::Error> {
    if let ProgramError::SyscallError(SyscallError { io_error, .. }) = e {
        if matches!(
            io_error.raw_os_error(),
            Some(libc::EINVAL | libc::EOPNOTSUPP | libc::ENOSYS)
        ) {
            return Some(io::Error::from_raw_os_error(
                io_error.raw_os_error().unwrap_or(0),
            ));
        }
    }
    None
}

fn attach_tcx(ebpf: &mut Ebpf, layout: &Layout, ifindex: u32, ifname: &str) -> anyhow::Result<()> {
    for dir in &DIRECTIONS {
        let prog = program(ebpf, dir.program)?;
        if pinned_link_alive(prog, layout, ifindex, dir)? {
            continue;
        }
        let id = prog
            .attach_with_options(
                ifname,
                dir.tc,
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            )
            .map_err(|e| match tcx_unsupported(&e) {
                Some(io) => anyhow::Error::new(AttachError::TcxUnsupported(io)),
                None => anyhow::Error::new(e).context(format!(
                    "attaching {} to {ifname} {} (TCX)",
                    dir.program, dir.suffix
                )),
            })?;
        let link: FdLink = prog
            .take_link(id)
            .context("taking the TCX link")?
            .try_into()
            .context("TCX link as FdLink")?;
        let pin = link_pin(layout, ifindex, dir);
        // Dropping the PinnedLink only closes our fd; the pin keeps the link.
        link.pin(&pin)
            .with_context(|| format!("pinning TCX link at {}", pin.display()))?;
        // aya attached by name: make sure the name still meant our ifindex.
        let fd = sys::obj_get(&pin).with_context(|| format!("reopening {}", pin.display()))?;
        let info = sys::link_info(fd.as_fd()).context("link info")?;
        if info.tcx_ifindex != ifindex {
            let _ = sys::link_detach(fd.as_fd());
            remove_pin(&pin)?;
            return Err(AttachError::IfindexMismatch {
                ifname: ifname.to_owned(),
                expected: ifindex,
                actual: Some(info.tcx_ifindex),
            }
            .into());
        }
        debug!(
            ifindex,
            ifname,
            direction = dir.suffix,
            link_id = info.id,
            "TCX link pinned"
        );
    }
    Ok(())
}

/// Adds clsact only when no qdisc sits at the ingress/clsact hook; a foreign
/// `ingress` qdisc is an error, never replaced.
fn ensure_clsact(ifindex: u32, ifname: &str) -> anyhow::Result<()> {
    for attempt in 0..2 {
        let qdiscs =
            netlink::qdiscs(ifindex).with_context(|| format!("listing qdiscs of {ifname}"))?;
        if let Some(q) = qdiscs.iter().find(|q| q.parent == netlink::TC_H_CLSACT) {
            if q.kind == "clsact" {
                return Ok(());
            }
            return Err(AttachError::ForeignIngressQdisc {
                ifname: ifname.to_owned(),
                kind: q.kind.clone(),
            }
            .into());
        }
        match aya::programs::tc::qdisc_add_clsact(ifname) {
            Ok(()) => {
                debug!(ifname, "added clsact qdisc");
                return Ok(());
            }
            // Someone added a qdisc between the dump and the add: look again.
            Err(e) if attempt == 0 => debug!(ifname, error = %e, "adding clsact raced"),
            Err(e) => return Err(e).with_context(|| format!("adding clsact qdisc to {ifname}")),
        }
    }
    unreachable!("the second attempt returns")
}

fn our_filters(ifindex: u32, dir: &Direction) -> anyhow::Result<Vec<netlink::TcObject>> {
    Ok(netlink::filters(ifindex, dir.tc_parent)
        .with_context(|| format!("listing tc filters of ifindex {ifindex}"))?
        .into_iter()
        .filter(|f| f.kind == "bpf" && f.bpf_name.as_deref() == Some(dir.program))
        .collect())
}

fn attach_clsact(ebpf: &mut Ebpf, ifindex: u32, ifname: &str) -> anyhow::Result<()> {
    ensure_clsact(ifindex, ifname)?;
    for dir in &DIRECTIONS {
        if !our_filters(ifindex, dir)?.is_empty() {
            continue;
        }
        let prog = program(ebpf, dir.program)?;
        let id = prog
            .attach_with_options(
                ifname,
                dir.tc,
                TcAttachOptions::Netlink(NlOptions::default()),
            )
            .with_context(|| {
                format!(
                    "attaching {} to {ifname} {} (clsact)",
                    dir.program, dir.suffix
                )
            })?;
        let link = prog.take_link(id).context("taking the clsact link")?;
        // Dropping a netlink link deletes the filter; the filter must outlive
        // this process, and detach() finds it again by program name.
        std::mem::forget(link);
        debug!(
            ifindex,
            ifname,
            direction = dir.suffix,
            "clsact filter added"
        );
    }
    Ok(())
}

pub fn detach(layout: &Layout, ifindex: u32) -> anyhow::Result<()> {
    for dir in &DIRECTIONS {
        let pin = link_pin(layout, ifindex, dir);
        match sys::obj_get(&pin) {
            Ok(fd) => {
                // Force the detach even if someone else holds the link open.
                if let Err(e) = sys::link_detach(fd.as_fd()) {
                    debug!(ifindex, error = %e, "link detach (device gone?)");
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
    for dir in &DIRECTIONS {
        for filter in our_filters(ifindex, dir)? {
            match netlink::delete_filter(&filter) {
                Ok(()) => debug!(ifindex, direction = dir.suffix, "clsact filter deleted"),
                Err(e)
                    if e.raw_os_error() == Some(libc::ENOENT)
                        || e.raw_os_error() == Some(libc::ENODEV) => {}
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("deleting tc filter on ifindex {ifindex}"))
                }
            }
        }
    }
    Ok(())
}

pub fn attachment(ifindex: u32) -> anyhow::Result<Option<AttachMode>> {
    let Some(ifname) = sys::ifname_of(ifindex) else {
        return Ok(None);
    };
    let mut tcx = 0;
    for dir in &DIRECTIONS {
        match SchedClassifier::query_tcx(&ifname, dir.tc) {
            Ok((_, progs)) => {
                if progs.iter().any(|p| p.name_as_str() == Some(dir.program)) {
                    tcx += 1;
                }
            }
            Err(e) => debug!(ifname, error = %e, "TCX query failed"),
        }
    }
    if tcx == DIRECTIONS.len() {
        return Ok(Some(AttachMode::Tcx));
    }
    let mut clsact = 0;
    for dir in &DIRECTIONS {
        if !our_filters(ifindex, dir)?.is_empty() {
            clsact += 1;
        }
    }
    if clsact == DIRECTIONS.len() {
        return Ok(Some(AttachMode::Clsact));
    }
    if tcx + clsact > 0 {
        warn!(
            ifindex,
            ifname, tcx, clsact, "catena is only partly attached"
        );
    }
    Ok(None)
}

/// Removes link pins whose ifindex is not in `live` or whose link lost its
/// device. Returns how many pins were removed.
pub fn gc_links(layout: &Layout, live: &BTreeSet<u32>) -> anyhow::Result<usize> {
    let dir = layout.links();
    let mut removed = 0;
    for entry in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(ifindex) = name
            .to_str()
            .and_then(|n| n.split_once('-'))
            .and_then(|(i, _)| i.parse::<u32>().ok())
        else {
            continue;
        };
        let path = entry.path();
        let fd = sys::obj_get(&path).ok();
        let defunct = fd.as_ref().is_none_or(|fd| {
            sys::link_info(fd.as_fd())
                .map(|l| l.tcx_ifindex == 0)
                .unwrap_or(true)
        });
        if defunct || !live.contains(&ifindex) {
            if let Some(fd) = &fd {
                let _ = sys::link_detach(fd.as_fd());
            }
            remove_pin(&path)?;
            removed += 1;
            debug!(ifindex, path = %path.display(), "collected link pin");
        }
    }
    Ok(removed)
}
