//! Nodes as the policy compiler needs them: their addresses. Other nodes'
//! addresses get the `remote-node` identity, this node's `host`.

use std::net::IpAddr;

use k8s_openapi::api::core::v1::Node;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: String,
    /// `status.addresses` of type InternalIP and ExternalIP (hostnames and
    /// DNS names are not addresses), in the order the node reports them.
    pub addresses: Vec<IpAddr>,
    pub resource_version: Option<String>,
}

impl From<Node> for NodeInfo {
    fn from(n: Node) -> NodeInfo {
        let addresses = n
            .status
            .and_then(|s| s.addresses)
            .unwrap_or_default()
            .into_iter()
            .filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP")
            .filter_map(|a| a.address.parse().ok())
            .collect();
        NodeInfo {
            name: n.metadata.name.unwrap_or_default(),
            addresses,
            resource_version: n.metadata.resource_version,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_ip_addresses_only() {
        let n: Node = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": "n2", "resourceVersion": "7"},
            "status": {"addresses": [
                {"type": "Hostname", "address": "n2"},
                {"type": "InternalIP", "address": "192.168.1.2"},
                {"type": "ExternalIP", "address": "2001:db8::2"},
                {"type": "InternalDNS", "address": "n2.cluster.local"}
            ]}
        }))
        .unwrap();
        let info = NodeInfo::from(n);
        assert_eq!(info.name, "n2");
        assert_eq!(
            info.addresses,
            vec![
                "192.168.1.2".parse::<IpAddr>().unwrap(),
                "2001:db8::2".parse().unwrap()
            ]
        );
        assert_eq!(info.resource_version.as_deref(), Some("7"));
    }
}
