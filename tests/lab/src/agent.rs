//! The real `catena-agent` running "on" a lab node.

use crate::bins::bin_path;
use crate::node::Node;
use anyhow::{bail, Context, Result};
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long an agent gets to answer `/v1/healthz` with `ready: true`.
pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `stop()` waits after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Where the agent learns the cluster.
#[derive(Clone, Debug)]
pub enum AgentSource {
    /// Standalone: `--manifests DIR`.
    Manifests(PathBuf),
    /// Kubernetes: `--kubeconfig FILE` (e.g. pointing at the lab's test API server).
    Kubeconfig(PathBuf),
}

/// A running `catena-agent` in a node's network namespace. Drop kills it.
pub struct Agent<'n> {
    node: &'n Node,
    bin: PathBuf,
    source: AgentSource,
    extra_args: Vec<String>,
    child: Option<Child>,
    ready_timeout: Duration,
}

impl Node {
    /// Starts `catena-agent --manifests DIR --socket <dir>/agent.sock
    /// --bpffs-dir <node bpffs> --state-dir <dir>/state EXTRA..` inside the
    /// node netns and waits until it reports ready.
    pub fn start_agent(&self, manifests_dir: &Path, extra_args: &[&str]) -> Result<Agent<'_>> {
        self.start_agent_with(
            &bin_path("catena-agent")?,
            manifests_dir,
            extra_args,
            DEFAULT_READY_TIMEOUT,
        )
    }

    /// Starts the agent in Kubernetes mode against `kubeconfig`.
    pub fn start_agent_kube(&self, kubeconfig: &Path, extra_args: &[&str]) -> Result<Agent<'_>> {
        self.start_agent_from(
            &bin_path("catena-agent")?,
            AgentSource::Kubeconfig(kubeconfig.to_path_buf()),
            extra_args,
            DEFAULT_READY_TIMEOUT,
        )
    }

    /// [`Node::start_agent`] with an explicit binary and readiness timeout.
    pub fn start_agent_with(
        &self,
        bin: &Path,
        manifests_dir: &Path,
        extra_args: &[&str],
        ready_timeout: Duration,
    ) -> Result<Agent<'_>> {
        let source = AgentSource::Manifests(manifests_dir.to_path_buf());
        self.start_agent_from(bin, source, extra_args, ready_timeout)
    }

    /// Starts the agent with any source.
    pub fn start_agent_from(
        &self,
        bin: &Path,
        source: AgentSource,
        extra_args: &[&str],
        ready_timeout: Duration,
    ) -> Result<Agent<'_>> {
        let mut agent = Agent {
            node: self,
            bin: bin.to_path_buf(),
            source,
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            child: None,
            ready_timeout,
        };
        agent.start()?;
        Ok(agent)
    }
}

impl Agent<'_> {
    /// A client for the agent's API socket.
    pub fn client(&self) -> catena_api::Client {
        catena_api::Client::new(self.node.agent_socket()).with_timeout(Duration::from_secs(10))
    }

    pub fn socket(&self) -> PathBuf {
        self.node.agent_socket()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Everything the agent wrote so far (all runs).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.node.agent_log()).unwrap_or_default()
    }

    /// The last `n` lines of the log.
    pub fn log_tail(&self, n: usize) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    fn start(&mut self) -> Result<()> {
        let log_path = self.node.agent_log();
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("opening {}", log_path.display()))?;
        // A stale socket from a killed run must not answer the readiness probe.
        let _ = std::fs::remove_file(self.node.agent_socket());
        let mut cmd = Command::new(&self.bin);
        match &self.source {
            AgentSource::Manifests(dir) => cmd.arg("--manifests").arg(dir),
            AgentSource::Kubeconfig(file) => cmd.arg("--kubeconfig").arg(file),
        };
        cmd.arg("--socket")
            .arg(self.node.agent_socket())
            .arg("--bpffs-dir")
            .arg(self.node.bpffs_dir())
            .arg("--state-dir")
            .arg(self.node.state_dir())
            .args(&self.extra_args);
        // Socket load balancing attaches to a cgroup, which is machine-wide,
        // not per network namespace: a lab node must never take over the
        // machine's root cgroup. Tests of that feature pass a private cgroup.
        if !self
            .extra_args
            .iter()
            .any(|a| a.starts_with("--cgroup-root"))
        {
            cmd.args(["--cgroup-root", "none"]);
        }
        cmd
            // Plain log lines: they end up in test failure messages.
            .env("NO_COLOR", "1")
            // The caller's cluster must never leak into a lab node.
            .env_remove("KUBECONFIG")
            .env_remove("KUBERNETES_SERVICE_HOST")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        self.child = Some(self.node.netns().spawn(cmd)?);
        self.wait_ready()
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + self.ready_timeout;
        let client = self.client().with_timeout(Duration::from_secs(2));
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    self.child = None;
                    bail!(
                        "catena-agent exited ({status}) before becoming ready; log tail:\n{}",
                        self.log_tail(40)
                    );
                }
            }
            let last = match client.get::<catena_api::Health>("/v1/healthz") {
                Ok(h) if h.ready => return Ok(()),
                Ok(h) => format!("not ready: {}", h.reason.unwrap_or_default()),
                Err(e) => e.to_string(),
            };
            if Instant::now() >= deadline {
                bail!(
                    "catena-agent not ready after {:?} ({last}); log tail:\n{}",
                    self.ready_timeout,
                    self.log_tail(40)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, then wait (SIGKILL after a grace period). Returns whether it
    /// exited on its own within the grace period.
    pub fn stop(&mut self) -> Result<bool> {
        let Some(mut child) = self.child.take() else {
            return Ok(true);
        };
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline {
            if child.try_wait()?.is_some() {
                return Ok(true);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        child.wait()?;
        Ok(false)
    }

    /// SIGKILL (a crash, as far as the agent can tell) and reap.
    pub fn kill(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            child.wait().context("reaping catena-agent")?;
        }
        Ok(())
    }

    /// Graceful stop, then start with the same flags (pins in the node's bpffs
    /// dir survive, which is what restart tests are about).
    pub fn restart(&mut self) -> Result<()> {
        self.stop()?;
        self.start()
    }

    /// Start again after [`Agent::kill`] or [`Agent::stop`].
    pub fn start_again(&mut self) -> Result<()> {
        if self.child.is_some() {
            bail!("catena-agent is still running");
        }
        self.start()
    }

    pub fn set_ready_timeout(&mut self, t: Duration) {
        self.ready_timeout = t;
    }
}

impl Drop for Agent<'_> {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}
