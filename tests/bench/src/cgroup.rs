//! A private cgroup v2 for benchmarks that measure the socket-level load
//! balancer: the agent attaches it there (never to the machine's root), and
//! the benchmark process joins the cgroup only while it measures that path.

use anyhow::{anyhow, Context, Result};
use std::path::PathBuf;
use std::time::Duration;

/// A leaf cgroup under the machine's cgroup2 mount, removed on drop.
pub struct PrivateCgroup {
    dir: PathBuf,
    /// The cgroup this process came from, where `Joined` returns it.
    home: PathBuf,
}

impl PrivateCgroup {
    pub fn new(tag: &str) -> Result<Self> {
        let out = std::process::Command::new("findmnt")
            .args(["-n", "-t", "cgroup2", "-o", "TARGET"])
            .output()
            .context("running findmnt")?;
        let mounts = String::from_utf8(out.stdout)?;
        let root = mounts
            .lines()
            .map(str::trim)
            .find(|s| !s.is_empty())
            .ok_or_else(|| anyhow!("no cgroup2 mount on this machine"))?;
        // "0::/path" is this process's cgroup v2 membership.
        let own = std::fs::read_to_string("/proc/self/cgroup")?;
        let rel = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .ok_or_else(|| anyhow!("this process is in no cgroup v2"))?;
        let home = PathBuf::from(root).join(rel.trim_start_matches('/'));
        let dir = PathBuf::from(root).join(format!("catena-bench-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(PrivateCgroup { dir, home })
    }

    pub fn path(&self) -> &std::path::Path {
        &self.dir
    }

    /// Moves this whole process (every thread) into the cgroup until the
    /// guard drops.
    pub fn join(&self) -> Result<Joined<'_>> {
        move_self(&self.dir)?;
        Ok(Joined { cgroup: self })
    }
}

fn move_self(dir: &std::path::Path) -> Result<()> {
    std::fs::write(dir.join("cgroup.procs"), std::process::id().to_string())
        .with_context(|| format!("moving this process into {}", dir.display()))
}

/// Membership of a [`PrivateCgroup`]; dropping it moves the process home.
pub struct Joined<'c> {
    cgroup: &'c PrivateCgroup,
}

impl Drop for Joined<'_> {
    fn drop(&mut self) {
        if let Err(e) = move_self(&self.cgroup.home) {
            eprintln!("warning: {e:#}");
        }
    }
}

impl Drop for PrivateCgroup {
    fn drop(&mut self) {
        // rmdir needs it empty: this process left when its guard dropped;
        // anything else (a child of a failed run) is killed first.
        let _ = std::fs::write(self.dir.join("cgroup.kill"), "1");
        for _ in 0..50 {
            if std::fs::remove_dir(&self.dir).is_ok() || !self.dir.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("warning: could not remove cgroup {}", self.dir.display());
    }
}
