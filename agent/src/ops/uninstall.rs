//! `catena-agent uninstall`: takes catena off the node completely. Unlike
//! `uninstall-cni` (the DaemonSet's preStop, which only takes catena out of
//! the CNI configuration, so a rolling upgrade keeps every pod's datapath),
//! this also detaches the programs from every pod veth and the cgroup,
//! removes every pin and the state dir. Order matters: the conflist goes
//! first so no new pod is wired to catena while the rest is torn down.

use super::bpf;
use crate::install::{self, InstallArgs};
use anyhow::{bail, Context, Result};
use clap::Args;
use std::fmt;
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, Args)]
pub struct UninstallArgs {
    #[command(flatten)]
    pub cni: InstallArgs,

    /// The agent API socket: uninstall refuses to run while an agent answers
    /// there (it would re-attach what is being removed).
    #[arg(long, default_value = catena_api::DEFAULT_SOCKET)]
    pub socket: PathBuf,

    /// catena's pinned programs, maps and links.
    #[arg(long, default_value = catena_api::DEFAULT_BPFFS_DIR)]
    pub bpffs_dir: PathBuf,

    /// Endpoint records and the DEL queue.
    #[arg(long, default_value = catena_api::DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
}

#[derive(Debug, Default)]
pub struct Report {
    pub cni: Option<install::UninstallReport>,
    pub endpoints_detached: usize,
    pub links_removed: usize,
    pub bpffs_removed: bool,
    pub state_removed: bool,
    pub warnings: Vec<String>,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(cni) = &self.cni {
            writeln!(f, "{cni}")?;
        }
        write!(
            f,
            "detached {} endpoint(s), removed {} link(s); pins {}; state {}",
            self.endpoints_detached,
            self.links_removed,
            if self.bpffs_removed {
                "removed"
            } else {
                "absent"
            },
            if self.state_removed {
                "removed"
            } else {
                "absent"
            },
        )?;
        for w in &self.warnings {
            write!(f, "\nwarning: {w}")?;
        }
        Ok(())
    }
}

pub fn uninstall(args: &UninstallArgs) -> Result<Report> {
    if std::os::unix::net::UnixStream::connect(&args.socket).is_ok() {
        bail!(
            "a catena-agent is serving {}: stop it first (a running agent re-attaches what uninstall removes)",
            args.socket.display()
        );
    }
    let mut report = Report {
        cni: Some(
            install::uninstall(&args.cni).context("taking catena out of the CNI configuration")?,
        ),
        ..Default::default()
    };
    if args.bpffs_dir.exists() {
        detach_endpoints(args, &mut report);
        let links = args.bpffs_dir.join("links");
        for entry in std::fs::read_dir(&links).into_iter().flatten().flatten() {
            bpf::detach_and_unpin_link(&entry.path())?;
            report.links_removed += 1;
        }
        remove_tree(&args.bpffs_dir)?;
        report.bpffs_removed = true;
    }
    if args.state_dir.exists() {
        std::fs::remove_dir_all(&args.state_dir)
            .with_context(|| format!("removing {}", args.state_dir.display()))?;
        report.state_removed = true;
    }
    let _ = std::fs::remove_file(&args.socket);
    Ok(report)
}

/// Detaches catena from every recorded endpoint's veth through the datapath
/// (TCX links and, on older kernels, clsact filters, which have no pin).
/// Best effort: what fails here is still caught by the link sweep after it.
fn detach_endpoints(args: &UninstallArgs, report: &mut Report) {
    let Ok(registry) = crate::model::endpoints::EndpointRegistry::load(&args.state_dir) else {
        return;
    };
    if registry.is_empty() {
        return;
    }
    let mut datapath = match catena_datapath::Datapath::open(&args.bpffs_dir) {
        Ok(d) => d,
        Err(e) => {
            report.warnings.push(format!(
                "cannot open the datapath to remove clsact filters: {e:#}"
            ));
            return;
        }
    };
    for ep in registry.all() {
        match datapath.detach(ep.spec.host_ifindex) {
            Ok(()) => report.endpoints_detached += 1,
            Err(e) => report.warnings.push(format!(
                "detaching from {} (ifindex {}): {e:#}",
                ep.spec.host_ifname, ep.spec.host_ifindex
            )),
        }
    }
}

/// Removes a bpffs directory tree (pins are files; unlinking the last pin
/// of a map or program frees it once no fd holds it).
fn remove_tree(dir: &Path) -> Result<()> {
    std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))
}
