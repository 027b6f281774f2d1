//! Attaching the programs to host-side veths.
//!
//! TCX first: one BPF link per direction, created by ifindex with raw
//! `BPF_LINK_CREATE` and pinned at `<dir>/links/<ifindex>-ingress|egress` so
//! it outlives the agent and is removed by unpinning. Where TCX is unavailable
//! (kernel < 6.6), clsact: the qdisc is added only if absent (never replacing
//! one), and a direct-action filter is added per direction. The clsact filters
//! need no state on disk: the kernel reports each filter's program name, which
//! is how catena finds its own.
//!
//! [`Attacher`] owns duplicates of the two program fds, so attaching needs
//! neither `&mut Ebpf` nor the agent's state lock: the agent attaches outside
//! it, and one pod's attach (two RCU grace periods in the kernel) does not
//! hold up every other request.
//!
//! The two links are created one after the other on purpose: the kernel
//! creates a TCX link under `rtnl_lock` and waits for an RCU grace period
//! before dropping it, so two threads creating the ingress and egress links
//! at once take as long as one thread doing both (measured on 6.18: ~21-24 ms
//! either way). That wait is what [`crate::rcu`] shortens.

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use anyhow::Context;
use aya::programs::tc::{NlOptions, TcAttachOptions};
use aya::programs::{SchedClassifier, TcAttachType};
use aya::Ebpf;
use catena_common::program_names;
use tracing::{debug, info, warn};

use crate::loader::Layout;
use crate::rcu::{ExpediteGuard, RcuExpedite};
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

/// One loaded tc program as the attach code needs it.
#[derive(Debug)]
struct LoadedProgram {
    fd: OwnedFd,
    id: u32,
}

/// Attaches and detaches catena's tc programs. Cheap to clone, `Send + Sync`:
/// it holds its own fds of the loaded programs (the kernel keeps a program
/// alive while any fd or pin refers to it).
#[derive(Clone, Debug)]
pub struct Attacher {
    inner: Arc<AttacherInner>,
}

#[derive(Debug)]
struct AttacherInner {
    layout: Layout,
    /// Indexed like [`DIRECTIONS`].
    programs: [LoadedProgram; 2],
    /// Set once the kernel refused TCX: a kernel property, so later
    /// attaches go to clsact at once instead of asking again.
    tcx_unavailable: AtomicBool,
    /// Expedited RCU while a TCX link is created or released (see
    /// [`crate::rcu`]); unset = every link waits a normal grace period.
    expedite: OnceLock<RcuExpedite>,
}

impl Attacher {
    pub(crate) fn new(ebpf: &Ebpf, layout: &Layout) -> anyhow::Result<Attacher> {
        let loaded = |dir: &Direction| -> anyhow::Result<LoadedProgram> {
            let prog: &SchedClassifier = ebpf
                .program(dir.program)
                .with_context(|| format!("program {} missing", dir.program))?
                .try_into()
                .with_context(|| format!("program {} is not a tc classifier", dir.program))?;
            let fd = prog
                .fd()
                .with_context(|| format!("program {} is not loaded", dir.program))?
                .as_fd()
                .try_clone_to_owned()
                .with_context(|| format!("duplicating the fd of {}", dir.program))?;
            let id = prog
                .info()
                .with_context(|| format!("program info of {}", dir.program))?
                .id();
            Ok(LoadedProgram { fd, id })
        };
        Ok(Attacher {
            inner: Arc::new(AttacherInner {
                layout: layout.clone(),
                programs: [loaded(&DIRECTIONS[0])?, loaded(&DIRECTIONS[1])?],
                tcx_unavailable: AtomicBool::new(false),
                expedite: OnceLock::new(),
            }),
        })
    }

    /// Expedite RCU grace periods around TCX link creation and release from
    /// now on. Set once, before the first attach; later calls are ignored.
    pub fn expedite_rcu(&self, expedite: RcuExpedite) {
        expedite.recover();
        let _ = self.inner.expedite.set(expedite);
    }

    fn expedited(&self) -> Option<ExpediteGuard<'_>> {
        self.inner.expedite.get().map(RcuExpedite::hold)
    }

    /// `mode`: None = TCX with clsact fallback; Some = only that mode.
    pub fn attach(
        &self,
        ifindex: u32,
        ifname: &str,
        mode: Option<AttachMode>,
    ) -> anyhow::Result<AttachMode> {
        check_ifindex(ifindex, ifname)?;
        let try_tcx = match mode {
            None => self.expected_mode() == AttachMode::Tcx,
            Some(m) => m == AttachMode::Tcx,
        };
        if try_tcx {
            match self.attach_tcx(ifindex, ifname) {
                Ok(()) => return Ok(AttachMode::Tcx),
                Err(e) => match e.downcast_ref::<AttachError>() {
                    Some(AttachError::TcxUnsupported(_)) if mode.is_none() => {
                        info!(ifname, error = %e, "TCX unavailable, falling back to clsact");
                        self.inner.tcx_unavailable.store(true, Ordering::Relaxed);
                    }
                    _ => return Err(e),
                },
            }
        }
        attach_clsact(&self.inner.layout, ifindex, ifname)?;
        Ok(AttachMode::Clsact)
    }

    /// The mode an attach without a forced mode will use: TCX until the
    /// kernel refused it once.
    pub fn expected_mode(&self) -> AttachMode {
        if self.inner.tcx_unavailable.load(Ordering::Relaxed) {
            AttachMode::Clsact
        } else {
            AttachMode::Tcx
        }
    }

    /// Removes catena's programs from the interface and their link pins.
    pub fn detach(&self, ifindex: u32) -> anyhow::Result<()> {
        let _expedited = self.expedited();
        detach(&self.inner.layout, ifindex)
    }

    /// Both directions as TCX links, or none: a link this call created is
    /// detached and unpinned again when the other direction fails. Links
    /// already pinned and alive are reused (and moved to the loaded program).
    fn attach_tcx(&self, ifindex: u32, ifname: &str) -> anyhow::Result<()> {
        let layout = &self.inner.layout;
        let _expedited = self.expedited();
        let mut created: Vec<PathBuf> = Vec::new();
        for (dir, prog) in DIRECTIONS.iter().zip(&self.inner.programs) {
            let result = pinned_link_alive(prog, layout, ifindex, dir).and_then(|alive| {
                if alive {
                    return Ok(None);
                }
                create_tcx_link(prog, layout, ifindex, ifname, dir).map(Some)
            });
            match result {
                Ok(Some(pin)) => created.push(pin),
                Ok(None) => {}
                Err(e) => {
                    for pin in &created {
                        if let Err(undo) = unpin_and_detach(pin) {
                            warn!(ifindex, error = %format!("{undo:#}"), "rolling back a TCX link");
                        }
                    }
                    return Err(e);
                }
            }
        }
        Ok(())
    }
}

fn link_pin(layout: &Layout, ifindex: u32, dir: &Direction) -> PathBuf {
    layout.links().join(format!("{ifindex}-{}", dir.suffix))
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

/// Reports whether the pinned link for `dir` is alive on `ifindex`; upgrades
/// it to the currently loaded program if it runs an older one. Stale pins
/// (device gone, or the ifindex now names another device) are removed.
fn pinned_link_alive(
    prog: &LoadedProgram,
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
        if link.prog_id != prog.id {
            sys::link_update(fd.as_fd(), prog.fd.as_fd()).with_context(|| {
                format!("updating link {} to program {}", pin.display(), prog.id)
            })?;
            info!(
                ifindex,
                direction = dir.suffix,
                old = link.prog_id,
                new = prog.id,
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

/// Detaches the link pinned at `pin` (even if someone else holds it open)
/// and removes the pin.
fn unpin_and_detach(pin: &std::path::Path) -> anyhow::Result<()> {
    match sys::obj_get(pin) {
        Ok(fd) => {
            if let Err(e) = sys::link_detach(fd.as_fd()) {
                debug!(pin = %pin.display(), error = %e, "link detach (device gone?)");
            }
            remove_pin(pin)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("opening link pin {}", pin.display())),
    }
}

/// Errors of `BPF_LINK_CREATE` that mean "this kernel has no TCX" (an unknown
/// attach type is EINVAL), as opposed to a problem with this device.
fn tcx_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL | libc::EOPNOTSUPP | libc::ENOSYS)
    )
}

/// Creates the TCX link of `dir` on `ifindex` and pins it; returns the pin.
/// The link is created by ifindex, so it cannot land on another device that
/// took the name meanwhile. Until it is pinned only our fd holds it: any
/// failure before that closes the fd, which destroys the link.
fn create_tcx_link(
    prog: &LoadedProgram,
    layout: &Layout,
    ifindex: u32,
    ifname: &str,
    dir: &Direction,
) -> anyhow::Result<PathBuf> {
    let link =
        sys::tcx_link_create(prog.fd.as_fd(), ifindex, dir.tcx_attach_type).map_err(|e| match e
            .raw_os_error()
        {
            Some(libc::ENODEV) => anyhow::Error::new(AttachError::IfindexMismatch {
                ifname: ifname.to_owned(),
                expected: ifindex,
                actual: sys::ifindex_of(ifname),
            }),
            _ if tcx_unsupported(&e) => anyhow::Error::new(AttachError::TcxUnsupported(e)),
            _ => anyhow::Error::new(e).context(format!(
                "attaching {} to {ifname} {} (TCX)",
                dir.program, dir.suffix
            )),
        })?;
    let pin = link_pin(layout, ifindex, dir);
    sys::obj_pin(link.as_fd(), &pin)
        .with_context(|| format!("pinning TCX link at {}", pin.display()))?;
    debug!(
        ifindex,
        ifname,
        direction = dir.suffix,
        pin = %pin.display(),
        "TCX link pinned"
    );
    Ok(pin)
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

/// The clsact fallback (kernels without TCX): aya adds the filters by
/// netlink, which needs a program object; it is opened from the program's pin
/// (the loaded program, pinned by the loader), so no `&mut Ebpf` is needed.
fn attach_clsact(layout: &Layout, ifindex: u32, ifname: &str) -> anyhow::Result<()> {
    ensure_clsact(ifindex, ifname)?;
    for dir in &DIRECTIONS {
        if !our_filters(ifindex, dir)?.is_empty() {
            continue;
        }
        let pin = layout.program(dir.program);
        let mut prog = SchedClassifier::from_pin(&pin)
            .with_context(|| format!("opening program pin {}", pin.display()))?;
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
        unpin_and_detach(&link_pin(layout, ifindex, dir))?;
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
