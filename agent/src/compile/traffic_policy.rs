//! `internalTrafficPolicy: Local`: traffic from this node (its pods and
//! processes) to such a Service only goes to endpoints on this node; with
//! none here the Service has no endpoints for this node and new connections
//! are refused at once (kube-proxy and Cilium behave the same way).
//!
//! "On this node" is known two ways, and either is enough:
//! - the endpoint's `nodeName` (EndpointSlice endpoint) or the Pod's
//!   `spec.nodeName` equals the agent's node name (`--node-name`);
//! - the address belongs to an endpoint the CNI plugin registered with this
//!   agent (standalone clusters often carry no node names at all).
//!
//! An endpoint that names another node is remote even if an address matches
//! a local one: the control plane's placement wins over an address that may
//! have been reused.

use super::services::PodEndpoint;
use crate::sources::compact::SliceEndpoint;
use k8s_openapi::api::core::v1::ServiceSpec;
use std::collections::BTreeSet;
use std::net::Ipv4Addr;

/// Whether the Service restricts in-cluster traffic to local endpoints.
pub fn internal_local(spec: &ServiceSpec) -> bool {
    spec.internal_traffic_policy.as_deref() == Some("Local")
}

/// What "on this node" means for endpoint selection.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeLocality {
    /// The agent's node name; `None`: only registered addresses count.
    pub node_name: Option<String>,
    /// Addresses of the endpoints registered with this agent.
    pub local_ips: BTreeSet<Ipv4Addr>,
}

impl NodeLocality {
    pub fn new(node_name: Option<String>, registered: &[catena_api::Endpoint]) -> NodeLocality {
        let local_ips = registered
            .iter()
            .flat_map(|ep| ep.spec.ips.iter())
            .filter_map(|cidr| cidr.split('/').next()?.parse().ok())
            .collect();
        NodeLocality {
            node_name: node_name.filter(|n| !n.is_empty()),
            local_ips,
        }
    }

    fn placed(&self, node: Option<&str>, mut addresses: impl Iterator<Item = Ipv4Addr>) -> bool {
        match (node.filter(|n| !n.is_empty()), self.node_name.as_deref()) {
            (Some(node), Some(me)) => node == me,
            // Named after a node but this agent has no name to compare:
            // only a registered address proves it is here.
            _ => addresses.any(|a| self.local_ips.contains(&a)),
        }
    }

    /// Whether an EndpointSlice endpoint is on this node.
    pub fn slice_endpoint(&self, ep: &SliceEndpoint) -> bool {
        self.placed(
            ep.node_name.as_deref(),
            ep.addresses().filter_map(|a| match a {
                std::net::IpAddr::V4(a) => Some(a),
                std::net::IpAddr::V6(_) => None,
            }),
        )
    }

    /// Whether a pod the endpoints controller selected is on this node.
    pub fn pod(&self, pod: &PodEndpoint) -> bool {
        let node = pod.pod.as_deref().and_then(|p| p.node_name.as_deref());
        self.placed(node, pod.ipv4.iter().copied())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(node: Option<&str>, addr: &str) -> SliceEndpoint {
        SliceEndpoint::new([addr.parse().unwrap()])
            .unwrap()
            .with_node_name(node)
    }

    #[test]
    fn node_name_decides_when_both_sides_have_one() {
        let l = NodeLocality {
            node_name: Some("n1".into()),
            local_ips: ["10.0.0.5".parse().unwrap()].into(),
        };
        assert!(l.slice_endpoint(&ep(Some("n1"), "10.0.9.9")));
        // Placed on another node: remote, even with a local-looking address.
        assert!(!l.slice_endpoint(&ep(Some("n2"), "10.0.0.5")));
        // No node name on the endpoint: the registered address decides.
        assert!(l.slice_endpoint(&ep(None, "10.0.0.5")));
        assert!(!l.slice_endpoint(&ep(None, "10.0.0.6")));
    }

    #[test]
    fn without_a_node_name_only_registered_addresses_are_local() {
        let l = NodeLocality {
            node_name: None,
            local_ips: ["10.0.0.5".parse().unwrap()].into(),
        };
        assert!(l.slice_endpoint(&ep(Some("n1"), "10.0.0.5")));
        assert!(!l.slice_endpoint(&ep(Some("n1"), "10.0.0.6")));
    }
}
