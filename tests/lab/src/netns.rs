//! Named network namespaces with guaranteed cleanup.
//!
//! Everything the lab runs "inside" a namespace enters ONLY its network
//! namespace (`setns(fd, CLONE_NEWNET)` in `pre_exec` or on a fresh thread).
//! `ip netns exec` is never used: it also unshares the mount namespace and
//! remounts `/sys`, which hides the bpffs at `/sys/fs/bpf` from the agent.

use anyhow::{anyhow, bail, Context, Result};
use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, Once};

/// Every name the lab creates starts with this; the sweeper only looks at these.
pub(crate) const PREFIX: &str = "catena-";
const NETNS_DIR: &str = "/run/netns";
/// Longest tag kept in a name, so `catena-<tag>-<pid>-<n>` stays <= ~40 chars.
const MAX_TAG: usize = 16;

static COUNTER: AtomicU64 = AtomicU64::new(0);
/// `ip netns add/del` race when several run at once in one process (the first
/// one bind-mounts /run/netns); tests run in parallel threads, so serialize.
static IP_NETNS_LOCK: Mutex<()> = Mutex::new(());
static SWEEP_ONCE: Once = Once::new();

/// A process-unique number for names (netns, bpffs dirs).
pub(crate) fn next_unique() -> u64 {
    COUNTER.fetch_add(1, Ordering::Relaxed)
}

/// Lowercase alphanumerics and `-`, trimmed, at most [`MAX_TAG`] chars.
pub(crate) fn sanitize_tag(tag: &str) -> String {
    let s: String = tag
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    let s = s.trim_matches('-');
    let s: String = s.chars().take(MAX_TAG).collect();
    let s = s.trim_end_matches('-').to_string();
    if s.is_empty() {
        "x".into()
    } else {
        s
    }
}

/// A named network namespace (`/run/netns/NAME`) owned by this process.
///
/// Dropping it kills every process still inside (they can only be ours: the
/// name is unique to this run) and deletes the namespace. Drop runs on unwind,
/// so a panicking test still cleans up; [`sweep_stale`] handles killed runs.
#[derive(Debug)]
pub struct Netns {
    name: String,
    path: PathBuf,
    /// Held open for the namespace's lifetime: `pre_exec` closures use its raw
    /// fd, which must stay valid until the child has exec'd.
    file: Option<File>,
}

impl Netns {
    /// Creates `catena-<tag>-<pid>-<n>` and brings `lo` up.
    pub fn new(tag: &str) -> Result<Netns> {
        SWEEP_ONCE.call_once(|| {
            if let Err(e) = sweep_stale() {
                eprintln!("catena-lab: sweeping stale namespaces failed: {e:#}");
            }
        });
        let name = format!(
            "{PREFIX}{}-{}-{}",
            sanitize_tag(tag),
            std::process::id(),
            next_unique()
        );
        {
            let _g = IP_NETNS_LOCK.lock().unwrap_or_else(|p| p.into_inner());
            run_checked(Command::new("ip").args(["netns", "add", &name]))
                .with_context(|| format!("creating network namespace {name}"))?;
        }
        let path = Path::new(NETNS_DIR).join(&name);
        // From here on Drop deletes the namespace, even if a step below fails.
        let mut ns = Netns {
            name,
            path,
            file: None,
        };
        ns.file =
            Some(File::open(&ns.path).with_context(|| format!("opening {}", ns.path.display()))?);
        ns.run("ip", &["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/NAME`, what runtimes pass as `CNI_NETNS`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn fd(&self) -> RawFd {
        self.file
            .as_ref()
            .expect("netns file is open while Netns lives")
            .as_raw_fd()
    }

    /// Makes `cmd` enter this network namespace (and nothing else) before exec.
    pub fn prepare(&self, cmd: &mut Command) {
        let fd = self.fd();
        // SAFETY: the closure only issues the async-signal-safe setns syscall
        // on an fd that `self` keeps open until the child has exec'd.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }

    /// Runs `program args..` inside the namespace; returns stdout, or an error
    /// carrying the exit status and stderr.
    pub fn run(&self, program: &str, args: &[&str]) -> Result<String> {
        let mut cmd = Command::new(program);
        cmd.args(args);
        self.prepare(&mut cmd);
        let out = run_checked(&mut cmd).with_context(|| format!("in netns {}", self.name))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs `cmd` inside the namespace and returns its output whatever the exit status.
    pub fn output(&self, mut cmd: Command) -> Result<Output> {
        self.prepare(&mut cmd);
        cmd.stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {cmd:?} in netns {}", self.name))
    }

    /// Spawns a long-running process inside the namespace. Whatever is still
    /// running inside when the namespace is dropped gets SIGKILL; callers that
    /// want a clean stop (and no zombie) should kill and wait themselves.
    pub fn spawn(&self, mut cmd: Command) -> Result<Child> {
        self.prepare(&mut cmd);
        cmd.spawn()
            .with_context(|| format!("spawning {cmd:?} in netns {}", self.name))
    }

    /// Runs `f` on a new OS thread that has entered this namespace, and waits
    /// for it. Sockets `f` creates belong to this namespace.
    pub fn enter_thread<T, F>(&self, f: F) -> Result<T>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        self.spawn_thread(f)?
            .join()
            .map_err(|_| anyhow!("thread in netns {} panicked", self.name))?
    }

    /// Like [`Netns::enter_thread`] without waiting. The handle yields an
    /// error if entering the namespace failed.
    pub fn spawn_thread<T, F>(&self, f: F) -> Result<std::thread::JoinHandle<Result<T>>>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        // The thread gets its own fd: it may outlive `self`'s borrow.
        let file =
            File::open(&self.path).with_context(|| format!("opening {}", self.path.display()))?;
        let name = self.name.clone();
        std::thread::Builder::new()
            .name(format!("ns:{}", self.name))
            .spawn(move || {
                // setns on one thread moves only that thread (net namespaces are per task).
                if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(anyhow!(
                        "setns into {name}: {}",
                        std::io::Error::last_os_error()
                    ));
                }
                drop(file);
                Ok(f())
            })
            .context("spawning a thread")
    }

    /// SIGKILLs every process inside (all started by this run: the name is unique).
    pub fn kill_all(&self) {
        kill_pids_in(&self.name);
    }

    /// Names of the network interfaces in this namespace.
    pub fn links(&self) -> Result<Vec<String>> {
        Ok(self
            .links_json()?
            .iter()
            .filter_map(|l| l["ifname"].as_str().map(str::to_string))
            .collect())
    }

    /// `ip -j link show` as JSON objects (ifindex, ifname, link_index, ...).
    pub fn links_json(&self) -> Result<Vec<serde_json::Value>> {
        let out = self.run("ip", &["-j", "link", "show"])?;
        serde_json::from_str(&out).with_context(|| format!("parsing `ip -j link` output {out:?}"))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        delete_netns(&self.name);
        self.file = None;
    }
}

/// Kills whatever runs inside `name` and deletes it; errors go to stderr
/// because this runs from Drop.
fn delete_netns(name: &str) {
    kill_pids_in(name);
    let _g = IP_NETNS_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    if let Err(e) = run_checked(Command::new("ip").args(["netns", "del", name])) {
        eprintln!("catena-lab: deleting netns {name}: {e:#}");
    }
}

fn kill_pids_in(name: &str) {
    let me = std::process::id() as i32;
    let Ok(out) = Command::new("ip").args(["netns", "pids", name]).output() else {
        return;
    };
    for pid in String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse::<i32>().ok())
        .filter(|&p| p != me && p > 1)
    {
        // SIGKILL by pid: only processes inside a namespace this run created.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// Whether a process with this pid exists (zombies count).
pub(crate) fn pid_alive(pid: i32) -> bool {
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None) {
        Ok(()) => true,
        Err(nix::errno::Errno::EPERM) => true,
        Err(_) => false,
    }
}

/// Parses `<prefix><tag>-<pid>-<n>`, the lab's naming scheme, returning the pid.
pub(crate) fn owner_pid(name: &str, prefix: &str) -> Option<i32> {
    let rest = name.strip_prefix(prefix)?;
    let mut parts = rest.rsplitn(3, '-');
    let n = parts.next()?;
    let pid = parts.next()?;
    let tag = parts.next()?;
    if tag.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) || n.is_empty() {
        return None;
    }
    pid.parse().ok()
}

/// Deletes namespaces, bpffs dirs and temp dirs left by earlier lab runs whose
/// process is gone (killed runs never reach Drop). Returns what was removed.
/// Runs automatically once per process before the first namespace is created.
pub fn sweep_stale() -> Result<Vec<String>> {
    let mut removed = Vec::new();
    let me = std::process::id() as i32;
    let stale = |pid: i32| pid != me && !pid_alive(pid);
    if let Ok(entries) = std::fs::read_dir(NETNS_DIR) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if owner_pid(&name, PREFIX).is_some_and(stale) {
                delete_netns(&name);
                removed.push(format!("netns {name}"));
            }
        }
    }
    for (dir, prefix) in [
        (
            crate::node::BPFFS_ROOT.to_string(),
            crate::node::BPFFS_PREFIX,
        ),
        (
            std::env::temp_dir().to_string_lossy().into_owned(),
            crate::node::TMP_PREFIX,
        ),
    ] {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            // Temp dirs carry a random suffix after `<pid>-<n>-`: parse the pid directly.
            let pid = name
                .strip_prefix(prefix)
                .and_then(|r| r.split('-').next())
                .and_then(|p| p.parse::<i32>().ok());
            if pid.is_some_and(stale) {
                let path = e.path();
                if let Err(err) = std::fs::remove_dir_all(&path) {
                    eprintln!("catena-lab: removing {}: {err}", path.display());
                } else {
                    removed.push(path.display().to_string());
                }
            }
        }
    }
    Ok(removed)
}

/// Runs `cmd` to completion; a non-zero exit is an error that shows stderr.
pub(crate) fn run_checked(cmd: &mut Command) -> Result<Output> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            if out.stdout.is_empty() {
                String::new()
            } else {
                format!(" (stdout: {})", String::from_utf8_lossy(&out.stdout).trim())
            }
        );
    }
    Ok(out)
}

/// Names in `ip netns list` (first column).
pub fn list_netns() -> Result<Vec<String>> {
    let out = run_checked(Command::new("ip").args(["netns", "list"]))?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect())
}

/// `n` random bytes as lowercase hex (from the kernel's CSPRNG).
pub(crate) fn random_hex(n: usize) -> String {
    let mut buf = vec![0u8; n];
    let mut filled = 0;
    while filled < n {
        let r = unsafe { libc::getrandom(buf[filled..].as_mut_ptr().cast(), n - filled, 0) };
        assert!(
            r > 0,
            "getrandom failed: {}",
            std::io::Error::last_os_error()
        );
        filled += r as usize;
    }
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_are_sanitized_and_short() {
        assert_eq!(sanitize_tag("My Pod/1"), "my-pod-1");
        assert_eq!(sanitize_tag("---"), "x");
        assert!(sanitize_tag(&"a".repeat(100)).len() <= MAX_TAG);
    }

    #[test]
    fn owner_pid_parses_only_the_lab_scheme() {
        assert_eq!(owner_pid("catena-node-a-1234-7", PREFIX), Some(1234));
        assert_eq!(owner_pid("catena-1234-7", PREFIX), None);
        assert_eq!(owner_pid("catena-x-abc-7", PREFIX), None);
        assert_eq!(owner_pid("other-x-12-7", PREFIX), None);
    }

    #[test]
    fn random_hex_has_requested_length() {
        let a = random_hex(32);
        assert_eq!(a.len(), 64);
        assert_ne!(a, random_hex(32));
    }
}
