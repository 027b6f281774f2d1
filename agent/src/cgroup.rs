//! Where the socket-level load balancer attaches: the node's cgroup v2 root,
//! so every node process (kubelet probes, host-network pods, an operator's
//! curl) reaches ClusterIPs — the failure of seed 000.

use anyhow::{Context, Result};
use std::path::PathBuf;

/// Where catena mounts a cgroup2 hierarchy when the node has none mounted
/// (cgroup v1 hosts), as Cilium does.
const OWN_MOUNT: &str = "/run/catena/cgroupv2";

/// `auto` -> the node's cgroup2 root (mounting one if needed), `none` -> off,
/// anything else -> that directory, which must be on a cgroup2 filesystem.
pub fn resolve_root(flag: &str) -> Result<Option<PathBuf>> {
    match flag {
        "none" | "" => Ok(None),
        "auto" => {
            if let Some(root) = catena_datapath::cgroup2_root() {
                return Ok(Some(root));
            }
            mount_own().map(Some)
        }
        path => Ok(Some(PathBuf::from(path))),
    }
}

fn mount_own() -> Result<PathBuf> {
    let target = PathBuf::from(OWN_MOUNT);
    std::fs::create_dir_all(&target).with_context(|| format!("creating {OWN_MOUNT}"))?;
    nix::mount::mount(
        Some("none"),
        &target,
        Some("cgroup2"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .with_context(|| {
        format!("no cgroup2 mount on this node and mounting one at {OWN_MOUNT} failed")
    })?;
    Ok(target)
}
