//! Finding the host side of the pod's interface.
//!
//! The host veth is the peer of `CNI_IFNAME` inside `CNI_NETNS` — never "the
//! first veth" or "the first interface without a sandbox" in the result
//! (bridge lists the bridge first, bandwidth adds an ifb, Multus chains add
//! more veths). So: read `IFLA_LINK` of the pod interface from inside the pod
//! namespace, look that index up in our (node) namespace, and make sure both
//! ends point at each other across the right namespaces — an index alone can
//! collide with an unrelated link when the peer lives elsewhere.

use crate::error::{CniError, Code};
use crate::netlink::{LinkFacts, RouteSocket};
use nix::sched::{setns, CloneFlags};
use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostVeth {
    pub name: String,
    pub index: u32,
    /// The pod interface's ifindex inside its namespace.
    pub pod_index: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum VethError {
    #[error("cannot open CNI_NETNS {path:?}: {source}")]
    OpenNetns { path: PathBuf, source: io::Error },
    #[error("CNI_NETNS {path:?} is not a network namespace: {source}")]
    NotNetns { path: PathBuf, source: nix::Error },
    #[error("no interface {ifname:?} in the pod network namespace {path:?} (did the primary plugin run?)")]
    NoPodInterface { ifname: String, path: PathBuf },
    #[error("pod interface {ifname:?} is a {kind}, not a veth; catena needs a veth-based primary plugin")]
    NotVeth { ifname: String, kind: String },
    #[error(
        "the veth peer of pod interface {ifname:?} is in the pod namespace too, not on the node"
    )]
    PeerInPod { ifname: String },
    #[error("the veth peer of pod interface {ifname:?} is not in this node's network namespace ({detail})")]
    PeerElsewhere { ifname: String, detail: String },
    #[error("netlink lookup failed ({context}): {source}")]
    Netlink {
        context: &'static str,
        source: io::Error,
    },
}

impl From<VethError> for CniError {
    fn from(e: VethError) -> Self {
        let code = match e {
            // The runtime handed us a netns we cannot use: an invalid CNI_NETNS.
            VethError::OpenNetns { .. } | VethError::NotNetns { .. } => Code::InvalidEnvironment,
            _ => Code::HostInterface,
        };
        CniError::new(code, e.to_string())
    }
}

/// Finds the node-side veth of `ifname` in the namespace at `netns`. The
/// caller's thread must be in the node namespace.
pub fn find_host_veth(netns: &Path, ifname: &str) -> Result<HostVeth, VethError> {
    let pod_ns = File::open(netns).map_err(|source| VethError::OpenNetns {
        path: netns.into(),
        source,
    })?;
    // Our own namespace, so the pod side can tell whether the peer is here.
    let node_ns = File::open("/proc/thread-self/ns/net").map_err(|source| VethError::Netlink {
        context: "open /proc/thread-self/ns/net",
        source,
    })?;

    let (pod_if, node_nsid_in_pod) = std::thread::scope(|s| {
        s.spawn(|| pod_side(&pod_ns, &node_ns, netns, ifname))
            .join()
            .expect("pod-side lookup thread panicked")
    })?;

    let kind = pod_if
        .kind
        .clone()
        .unwrap_or_else(|| "device without a kind".into());
    if kind != "veth" {
        return Err(VethError::NotVeth {
            ifname: ifname.into(),
            kind,
        });
    }
    let (Some(peer_index), Some(peer_nsid)) = (pod_if.peer_index, pod_if.link_netnsid) else {
        return Err(VethError::PeerInPod {
            ifname: ifname.into(),
        });
    };
    if node_nsid_in_pod != Some(peer_nsid) {
        return Err(VethError::PeerElsewhere {
            ifname: ifname.into(),
            detail: format!(
                "the peer's namespace has id {peer_nsid} in the pod, ours has {node_nsid_in_pod:?}"
            ),
        });
    }

    let netlink = |context| move |source| VethError::Netlink { context, source };
    let mut nl = RouteSocket::open().map_err(netlink("open node socket"))?;
    let elsewhere = |detail: String| VethError::PeerElsewhere {
        ifname: ifname.into(),
        detail,
    };
    let host = nl
        .link_by_index(peer_index)
        .map_err(netlink("node link by index"))?
        .ok_or_else(|| elsewhere(format!("no link with ifindex {peer_index} here")))?;
    check_node_side(&host, &pod_if, &mut nl, &pod_ns).map_err(elsewhere)?;
    Ok(HostVeth {
        name: host.name,
        index: host.index,
        pod_index: pod_if.index,
    })
}

/// Runs on its own thread: moves into the pod namespace (only this thread),
/// reads the pod interface and the id our namespace has there.
fn pod_side(
    pod_ns: &File,
    node_ns: &File,
    path: &Path,
    ifname: &str,
) -> Result<(LinkFacts, Option<i32>), VethError> {
    setns(pod_ns.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|source| VethError::NotNetns {
        path: path.into(),
        source,
    })?;
    let netlink = |context| move |source| VethError::Netlink { context, source };
    let mut nl = RouteSocket::open().map_err(netlink("open pod socket"))?;
    let link = nl
        .link_by_name(ifname)
        .map_err(netlink("pod link by name"))?
        .ok_or_else(|| VethError::NoPodInterface {
            ifname: ifname.into(),
            path: path.into(),
        })?;
    // Asked after the link dump, which makes the kernel assign the id.
    let nsid = nl
        .nsid_of(node_ns.as_fd())
        .map_err(netlink("node nsid in pod"))?;
    Ok((link, nsid))
}

fn check_node_side(
    host: &LinkFacts,
    pod_if: &LinkFacts,
    nl: &mut RouteSocket,
    pod_ns: &File,
) -> Result<(), String> {
    if host.kind.as_deref() != Some("veth") {
        return Err(format!(
            "ifindex {} here is {:?} ({}), not a veth",
            host.index,
            host.name,
            host.kind.as_deref().unwrap_or("no kind")
        ));
    }
    if host.peer_index != Some(pod_if.index) {
        return Err(format!(
            "veth {:?} here pairs with ifindex {:?}, not the pod's {}",
            host.name, host.peer_index, pod_if.index
        ));
    }
    let pod_nsid = nl
        .nsid_of(pod_ns.as_fd())
        .map_err(|e| format!("nsid lookup: {e}"))?;
    if host.link_netnsid.is_none() || host.link_netnsid != pod_nsid {
        return Err(format!(
            "veth {:?} here pairs with a link in namespace {:?}, the pod's namespace has id {:?}",
            host.name, host.link_netnsid, pod_nsid
        ));
    }
    Ok(())
}
