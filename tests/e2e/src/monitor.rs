//! `catena monitor` run the way a user watching for one drop would: the
//! real CLI against the node's agent, in the background while the scenario
//! provokes the drop.

use anyhow::{ensure, Result};
use catena_lab::{bin_path, Node};
use serde_json::Value;
use std::process::{Child, Command, Output, Stdio};

/// A `catena monitor -o json` waiting for the first drop event of one
/// reason, for 20 s at most.
pub struct DropMonitor(Child);

impl DropMonitor {
    /// Starts the monitor. It needs a moment to subscribe: a drop provoked
    /// at once may come before it listens.
    pub fn start(node: &Node, reason: &str) -> Result<DropMonitor> {
        let child = Command::new(bin_path("catena")?)
            .arg("--socket")
            .arg(node.agent_socket())
            .args([
                "monitor",
                "--type",
                "drop",
                "--reason",
                reason,
                "--count",
                "1",
                "--duration",
                "20s",
                "-o",
                "json",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        Ok(DropMonitor(child))
    }

    /// What the monitor printed and how it exited, once it has.
    pub fn output(self) -> Result<Output> {
        Ok(self.0.wait_with_output()?)
    }

    /// The event it printed; an error when it failed (no such drop within
    /// its 20 s, the agent unreachable), with what it said.
    pub fn event(self) -> Result<Value> {
        let out = self.output()?;
        ensure!(
            out.status.success(),
            "catena monitor failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(serde_json::from_str(String::from_utf8(out.stdout)?.trim())?)
    }
}
