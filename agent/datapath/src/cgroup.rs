//! Attaching the socket-level load balancer (`sock_*` cgroup sock_addr
//! programs) to a cgroup v2 directory, usually the node's cgroup2 root so every
//! process on the node (kubelet, host-network pods, node daemons) reaches
//! ClusterIPs.
//!
//! One BPF link per program (cgroup BPF links always coexist with other
//! programs on the cgroup, like `BPF_F_ALLOW_MULTI`), pinned at
//! `<dir>/links/cgroup-<cgroup id>-<hook>` so it outlives the agent. The pins
//! start with `cgroup-`, which the veth link GC (`<ifindex>-<dir>`) skips.

use std::fs::{self, File};
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use aya::programs::links::{CgroupAttachMode, FdLink};
use aya::programs::CgroupSockAddr;
use aya::Ebpf;
use catena_common::program_names;
use tracing::{debug, info};

use crate::loader::Layout;
use crate::sys;

/// `enum bpf_attach_type` values of the eight hooks (uapi/linux/bpf.h).
const BPF_CGROUP_INET4_CONNECT: u32 = 10;
const BPF_CGROUP_INET6_CONNECT: u32 = 11;
const BPF_CGROUP_UDP4_SENDMSG: u32 = 14;
const BPF_CGROUP_UDP6_SENDMSG: u32 = 15;
const BPF_CGROUP_UDP4_RECVMSG: u32 = 19;
const BPF_CGROUP_UDP6_RECVMSG: u32 = 20;
const BPF_CGROUP_INET4_GETPEERNAME: u32 = 29;
const BPF_CGROUP_INET6_GETPEERNAME: u32 = 30;

/// (program, pin suffix, attach type): IPv4 and IPv6 sockets.
const HOOKS: [(&str, &str, u32); 8] = [
    (
        program_names::SOCK_CONNECT4,
        "connect4",
        BPF_CGROUP_INET4_CONNECT,
    ),
    (
        program_names::SOCK_SENDMSG4,
        "sendmsg4",
        BPF_CGROUP_UDP4_SENDMSG,
    ),
    (
        program_names::SOCK_RECVMSG4,
        "recvmsg4",
        BPF_CGROUP_UDP4_RECVMSG,
    ),
    (
        program_names::SOCK_GETPEERNAME4,
        "getpeername4",
        BPF_CGROUP_INET4_GETPEERNAME,
    ),
    (
        program_names::SOCK_CONNECT6,
        "connect6",
        BPF_CGROUP_INET6_CONNECT,
    ),
    (
        program_names::SOCK_SENDMSG6,
        "sendmsg6",
        BPF_CGROUP_UDP6_SENDMSG,
    ),
    (
        program_names::SOCK_RECVMSG6,
        "recvmsg6",
        BPF_CGROUP_UDP6_RECVMSG,
    ),
    (
        program_names::SOCK_GETPEERNAME6,
        "getpeername6",
        BPF_CGROUP_INET6_GETPEERNAME,
    ),
];

const PIN_PREFIX: &str = "cgroup-";

fn pin_path(layout: &Layout, cgroup_id: u64, suffix: &str) -> PathBuf {
    layout
        .links()
        .join(format!("{PIN_PREFIX}{cgroup_id}-{suffix}"))
}

/// The first cgroup v2 mount of this mount namespace (from
/// /proc/self/mountinfo), e.g. `/sys/fs/cgroup` on a unified host or
/// `/sys/fs/cgroup/unified` on a hybrid one.
pub fn cgroup2_root() -> Option<PathBuf> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").ok()?;
    mountinfo.lines().find_map(|line| {
        // "<id> <parent> <maj:min> <root> <mount point> <opts> ... - <fstype> ..."
        let (left, right) = line.split_once(" - ")?;
        if right.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        let mount_point = left.split_whitespace().nth(4)?;
        // Octal escapes (\040 for a space) as the kernel writes them.
        Some(PathBuf::from(unescape_mount_path(mount_point)))
    })
}

fn unescape_mount_path(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(d) => {
                out.push((d[0] - b'0') << 6 | (d[1] - b'0') << 3 | (d[2] - b'0'));
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Opens `path` as a cgroup v2 directory; returns it and its cgroup id (the
/// directory's inode number on cgroup2).
fn open_cgroup(path: &Path) -> anyhow::Result<(File, u64)> {
    let magic = sys::fs_magic(path).with_context(|| format!("statfs {}", path.display()))?;
    if magic != sys::CGROUP2_SUPER_MAGIC {
        bail!(
            "{} is not a cgroup v2 directory (filesystem magic {magic:#x}); pass a path on a \
             cgroup2 mount (see /proc/self/mountinfo) or mount one with \
             `mount -t cgroup2 none <dir>`",
            path.display()
        );
    }
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let id = file
        .metadata()
        .with_context(|| format!("stat {}", path.display()))?
        .ino();
    Ok((file, id))
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut CgroupSockAddr> {
    ebpf.program_mut(name)
        .with_context(|| format!("program {name} missing"))?
        .try_into()
        .with_context(|| format!("program {name} is not a cgroup sock_addr program"))
}

use crate::attach::remove_pin;

/// Detaches the link pinned at `pin` (even if others hold it) and unpins it.
fn destroy_pin(pin: &Path) -> anyhow::Result<()> {
    if let Ok(fd) = sys::obj_get(pin) {
        if let Err(e) = sys::link_detach(fd.as_fd()) {
            debug!(path = %pin.display(), error = %e, "cgroup link detach (cgroup gone?)");
        }
    }
    remove_pin(pin)
}

/// Whether the link pinned at `pin` is alive on `cgroup_id` for
/// `attach_type`; upgrades it to the loaded program if it runs an older one.
/// A pin that is not (its cgroup was removed and recreated) is destroyed.
fn pinned_link_alive(
    prog: &CgroupSockAddr,
    pin: &Path,
    cgroup_id: u64,
    attach_type: u32,
) -> anyhow::Result<bool> {
    let fd = match sys::obj_get(pin) {
        Ok(fd) => fd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e).with_context(|| format!("opening link pin {}", pin.display())),
    };
    let link =
        sys::link_info(fd.as_fd()).with_context(|| format!("link info of {}", pin.display()))?;
    if link.link_type == sys::BPF_LINK_TYPE_CGROUP
        && link.cgroup_id == cgroup_id
        && link.cgroup_attach_type == attach_type
    {
        let ours = prog.info().context("program info")?.id();
        if link.prog_id != ours {
            let prog_fd = prog.fd().context("program fd")?;
            sys::link_update(fd.as_fd(), prog_fd.as_fd())
                .with_context(|| format!("updating link {} to program {ours}", pin.display()))?;
            info!(
                cgroup_id,
                old = link.prog_id,
                new = ours,
                "upgraded cgroup link program"
            );
        }
        return Ok(true);
    }
    debug!(path = %pin.display(), ?link, "removing stale cgroup link pin");
    drop(fd);
    destroy_pin(pin)?;
    Ok(false)
}

pub fn attach(ebpf: &mut Ebpf, layout: &Layout, cgroup: &Path) -> anyhow::Result<()> {
    let (file, cgroup_id) = open_cgroup(cgroup)?;
    let mut created = Vec::new();
    let result = (|| -> anyhow::Result<()> {
        for (name, suffix, attach_type) in HOOKS {
            let pin = pin_path(layout, cgroup_id, suffix);
            let prog = program(ebpf, name)?;
            if pinned_link_alive(prog, &pin, cgroup_id, attach_type)? {
                continue;
            }
            // With BPF links (aya uses them on kernels >= 5.7) the kernel
            // requires flags 0, i.e. `Single`, and still runs the link next to
            // any other program on the cgroup: link attachments are multi.
            let id = prog
                .attach(file.as_fd(), CgroupAttachMode::Single)
                .with_context(|| format!("attaching {name} to cgroup {}", cgroup.display()))?;
            let link: FdLink = prog
                .take_link(id)
                .context("taking the cgroup link")?
                .try_into()
                .context("cgroup link as FdLink (kernel without BPF links?)")?;
            // Dropping the PinnedLink only closes our fd; the pin keeps the link.
            link.pin(&pin)
                .with_context(|| format!("pinning cgroup link at {}", pin.display()))?;
            created.push(pin);
            debug!(cgroup = %cgroup.display(), cgroup_id, hook = suffix, "cgroup link pinned");
        }
        Ok(())
    })();
    if result.is_err() {
        // All hooks or none: connect without recvmsg would show clients
        // the backend instead of the VIP.
        for pin in &created {
            let _ = destroy_pin(pin);
        }
    }
    result
}

/// Removes catena's links from the cgroup at `cgroup` (if it still exists)
/// and every cgroup link pin whose cgroup is gone. Idempotent.
pub fn detach(layout: &Layout, cgroup: &Path) -> anyhow::Result<()> {
    let cgroup_id = match open_cgroup(cgroup) {
        Ok((_, id)) => Some(id),
        Err(_) if !cgroup.exists() => None,
        Err(e) => return Err(e),
    };
    for (pin, link_cgroup) in cgroup_pins(layout)? {
        if Some(link_cgroup).filter(|id| *id != 0) == cgroup_id || link_cgroup == 0 {
            destroy_pin(&pin)?;
            debug!(path = %pin.display(), "cgroup link removed");
        }
    }
    Ok(())
}

/// Whether all eight socket programs (IPv4 and IPv6) are attached to the cgroup at `cgroup`
/// through catena's pinned links.
pub fn attached(layout: &Layout, cgroup: &Path) -> anyhow::Result<bool> {
    let (_, cgroup_id) = open_cgroup(cgroup)?;
    for (_, suffix, attach_type) in HOOKS {
        let pin = pin_path(layout, cgroup_id, suffix);
        let Ok(fd) = sys::obj_get(&pin) else {
            return Ok(false);
        };
        let link = sys::link_info(fd.as_fd()).context("link info")?;
        if link.link_type != sys::BPF_LINK_TYPE_CGROUP
            || link.cgroup_id != cgroup_id
            || link.cgroup_attach_type != attach_type
        {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Every `cgroup-*` pin with the cgroup id its link reports (0: the cgroup is
/// gone or the pin is unreadable).
fn cgroup_pins(layout: &Layout) -> anyhow::Result<Vec<(PathBuf, u64)>> {
    let dir = layout.links();
    let mut out = Vec::new();
    for entry in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        if !entry.file_name().to_string_lossy().starts_with(PIN_PREFIX) {
            continue;
        }
        let path = entry.path();
        let id = sys::obj_get(&path)
            .and_then(|fd| sys::link_info(fd.as_fd()))
            .map(|l| {
                if l.link_type == sys::BPF_LINK_TYPE_CGROUP {
                    l.cgroup_id
                } else {
                    0
                }
            })
            .unwrap_or(0);
        out.push((path, id));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_paths_are_unescaped() {
        assert_eq!(unescape_mount_path("/sys/fs/cgroup"), "/sys/fs/cgroup");
        assert_eq!(unescape_mount_path("/a\\040b"), "/a b");
        assert_eq!(unescape_mount_path("/a\\"), "/a\\");
    }
}
