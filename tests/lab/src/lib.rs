//! catena's network-namespace lab: throwaway nodes and pods, the real CNI
//! plugins driven with libcni's semantics, the real agent, and small traffic
//! helpers. Everything lives in namespaces and directories the lab created,
//! is uniquely named (tests run in parallel) and is removed on Drop, also
//! when a test panics; [`sweep_stale`] removes what killed runs left behind.
//!
//! A typical end-to-end test:
//!
//! ```no_run
//! use catena_lab::{CallArgs, CniRunner, Node};
//! use serde_json::json;
//! use std::time::Duration;
//!
//! # fn main() -> anyhow::Result<()> {
//! let node = Node::new("svc-basic")?;
//! let _agent = node.start_agent("manifests/basic".as_ref(), &[])?;
//! let conf = node.ptp_conflist("k8s", "10.244.0.0/24", "1.0.0", vec![json!({"type": "catena-cni"})])?;
//! let cni = CniRunner::new(&node, conf);
//! let (client, backend) = (node.pod("client")?, node.pod("backend")?);
//! cni.add(&client, "eth0", &CallArgs::default())?;
//! cni.add(&backend, "eth0", &CallArgs::default())?;
//! let _srv = backend.serve_tcp(8080, "backend-1")?;
//! let reply = client.tcp_request("10.96.0.10:80".parse()?, Duration::from_secs(2))?;
//! assert_eq!((reply.text.as_str(), reply.peer), ("backend-1", "10.96.0.10:80".parse()?));
//! cni.del(&client, "eth0", &CallArgs::default())?;
//! # Ok(()) }
//! ```
//!
//! Declare the node first: the agent, runner and pods borrow from or run
//! inside it and must be dropped before it (the borrow checker enforces
//! this for the agent and runner).

mod agent;
pub mod apiserver;
mod bins;
pub mod cni;
mod netns;
mod node;
pub mod traffic;

pub use agent::{Agent, AgentSource, DEFAULT_READY_TIMEOUT};
pub use bins::{bin_dir, bin_path, BIN_DIR_ENV};
pub use cni::{cni_1_1_shims, tcx_program_counts};
pub use cni::{
    AddResult, CallArgs, CallTiming, CniError, CniRunner, Conflist, GcAttachment, PluginCall,
    PluginError, PluginOutput,
};
pub use netns::{list_netns, sweep_stale, Netns};
pub use node::{Node, Pod};
pub use traffic::{count_backends, count_backends_udp, Reply, Server};
