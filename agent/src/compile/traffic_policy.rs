//! `internalTrafficPolicy: Local`: traffic from this node (its pods and
//! processes) to such a Service only goes to endpoints on this node; with
//! none here the Service has no endpoints for this node and new connections
//! are refused at once (kube-proxy and Cilium behave the same way).
//!
//! "On this node" is known two ways, and either is enough:
//! - the endpoint's `nodeName` (EndpointSlice endpoint) or the Pod's
//!   `spec.nodeName` equals the agent's node name (`--node-name`);
//! - the address (IPv4 or IPv6) belongs to an endpoint the CNI plugin
//!   registered with this agent (standalone clusters often carry no node
//!   names at all).
//!
//! An endpoint that names another node is remote even if an address matches
//! a local one: the control plane's placement wins over an address that may
//! have been reused.

use super::services::PodEndpoint;
use crate::sources::compact::SliceEndpoint;
use k8s_openapi::api::core::v1::ServiceSpec;
use std::collections::BTreeSet;
use std::net::IpAddr;

/// Whether the Service restricts in-cluster traffic to local endpoints.
pub fn internal_local(spec: &ServiceSpec) -> bool {
    spec.internal_traffic_policy.as_deref() == Some("Local")
}

/// What "on this node" means for endpoint selection.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeLocality {
    /// The agent's node name; `None`: only registered addresses count.
    pub node_name: Option<String>,
    /// Addresses (both families) of the endpoints registered with this agent.
    pub local_ips: BTreeSet<IpAddr>,
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

    fn placed(&self, node: Option<&str>, mut addresses: impl Iterator<Item = IpAddr>) -> bool {
        match (node.filter(|n| !n.is_empty()), self.node_name.as_deref()) {
            (Some(node), Some(me)) => node == me,
            // Named after a node but this agent has no name to compare:
            // only a registered address proves it is here.
            _ => addresses.any(|a| self.local_ips.contains(&a)),
        }
    }

    /// Whether an EndpointSlice endpoint is on this node.
    pub fn slice_endpoint(&self, ep: &SliceEndpoint) -> bool {
        self.placed(ep.node_name.as_deref(), ep.addresses())
    }

    /// Whether a pod the endpoints controller selected is on this node.
    pub fn pod(&self, pod: &PodEndpoint) -> bool {
        let node = pod.pod.as_deref().and_then(|p| p.node_name.as_deref());
        let v4 = pod.ipv4.iter().map(|a| IpAddr::V4(*a));
        self.placed(node, v4.chain(pod.ipv6.iter().map(|a| IpAddr::V6(*a))))
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

    fn registered(ips: &[&str]) -> catena_api::Endpoint {
        catena_api::Endpoint {
            id: 1,
            spec: catena_api::EndpointSpec {
                ips: ips.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            },
            identity: 256,
            attach_mode: "tcx".into(),
            created: String::new(),
        }
    }

    #[test]
    fn registered_ipv6_addresses_are_local() {
        let l = NodeLocality::new(
            None,
            &[
                registered(&["10.0.0.5/24", "fd00:10::5/64"]),
                registered(&["fd00:10::7/64"]),
            ],
        );
        // An IPv6-only pod and a dual-stack one: each address counts.
        assert!(l.slice_endpoint(&ep(None, "fd00:10::5")));
        assert!(l.slice_endpoint(&ep(None, "fd00:10::7")));
        assert!(l.slice_endpoint(&ep(None, "10.0.0.5")));
        assert!(!l.slice_endpoint(&ep(None, "fd00:10::6")));
        // The same address spelled another way is the same address.
        assert!(l.slice_endpoint(&ep(None, "fd00:10:0:0:0:0:0:7")));
        // A node name still wins over a local-looking IPv6 address.
        let named = NodeLocality::new(Some("n1".into()), &[registered(&["fd00:10::5/64"])]);
        assert!(!named.slice_endpoint(&ep(Some("n2"), "fd00:10::5")));
        assert!(named.slice_endpoint(&ep(Some("n1"), "fd00:10::9")));
    }

    #[test]
    fn ipv6_only_pod_is_local_by_its_ipv6_address() {
        let l = NodeLocality::new(None, &[registered(&["fd00:10::5/64"])]);
        let pod = |ipv4: &[&str], ipv6: &[&str]| PodEndpoint {
            key: crate::sources::ObjectKey {
                namespace: "shop".into(),
                name: "p".into(),
            },
            ipv4: ipv4.iter().map(|a| a.parse().unwrap()).collect(),
            ipv6: ipv6.iter().map(|a| a.parse().unwrap()).collect(),
            labels: Default::default(),
            pod: None,
        };
        assert!(l.pod(&pod(&[], &["fd00:10::5"])));
        assert!(l.pod(&pod(&["10.0.0.9"], &["fd00:10::5"])));
        assert!(!l.pod(&pod(&[], &["fd00:10::6"])));
        assert!(!l.pod(&pod(&["10.0.0.9"], &[])));
    }
}
