//! DEL: tell the agent to forget the endpoint. DEL never fails: runtimes call
//! it repeatedly (containerd three times, the later ones without CNI_NETNS or
//! prevResult), after partial ADDs, and from podman's sparse cleanup process;
//! an error would only block the pod's teardown. What cannot be delivered
//! now is queued on disk for the agent.

use crate::agent;
use crate::config::NetConf;
use crate::env::CniEnv;
use crate::{diag, queue, version, veth};
use catena_api::QueuedDelete;
use std::path::Path;

pub fn run(env: &CniEnv, conf: Result<NetConf, crate::error::CniError>) {
    let conf = conf.unwrap_or_else(|e| {
        diag!("DEL: unusable configuration ({e}); using the default agent socket and state dir");
        NetConf::fallback()
    });
    if !version::is_supported(&conf.cni_version) {
        diag!(
            "DEL: cniVersion {:?} is not supported; deleting anyway",
            conf.cni_version
        );
    }
    let (container_id, ifname) = match (env.container_id(), env.ifname()) {
        (Ok(c), Ok(i)) => (c, i),
        (Err(e), _) | (_, Err(e)) => {
            // ADD refuses the same input, so nothing was registered under it.
            diag!("DEL: nothing to delete: {e}");
            return;
        }
    };

    let path = agent::endpoint_path(container_id, ifname);
    let err = match agent::client(&conf, conf.agent_timeout).delete(&path) {
        Ok(()) => return diag!("{container_id}/{ifname}: endpoint removed"),
        Err(e) if e.status() == Some(404) => return,
        Err(e) => e,
    };
    // The veth usually still exists (the primary's DEL runs after ours); the
    // ifindex lets the agent detach even if it lost its own record.
    let host_ifindex = env
        .netns
        .as_deref()
        .and_then(|ns| veth::find_host_veth(Path::new(ns), ifname).ok())
        .map(|h| h.index);
    let entry = QueuedDelete {
        container_id: container_id.into(),
        ifname: ifname.into(),
        host_ifindex,
        queued_at: queue::now_secs(),
    };
    match queue::enqueue(&conf.state_dir, &entry) {
        Ok(p) => diag!("{container_id}/{ifname}: agent unavailable ({err}); queued the delete in {}", p.display()),
        Err(e) => diag!(
            "{container_id}/{ifname}: agent unavailable ({err}) and the delete could not be queued in {}: {e}",
            queue::queue_dir(&conf.state_dir).display()
        ),
    }
}
