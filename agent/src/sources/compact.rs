//! EndpointSlices and Pods as the compilers read them.
//!
//! Why not the k8s-openapi types: a deserialized `EndpointSlice` keeps every
//! endpoint as a 352-byte struct (in a `Vec` grown to the next power of two)
//! with each address a heap string, and a `Pod` is 2.4 KiB before its
//! containers (2.3 KiB each). At 100k endpoints and 5k pods that was over
//! 100 MiB of the agent's memory for a few fields per object. These types
//! keep exactly those fields, parsed once at the source: addresses as
//! `IpAddr` (both families), conditions as three small options, node names
//! interned (a cluster has few nodes and every endpoint names one).
//!
//! Both sources (manifests and Kubernetes) convert through the `From` impls
//! here, so the compilers see the same thing whichever produced it.

use super::ObjectKey;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// The label naming the Service an EndpointSlice belongs to.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// An EndpointSlice: its Service, address type, ports and endpoints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceInfo {
    /// `metadata.resourceVersion`: a re-list keeps the old `Arc` when equal.
    pub resource_version: Option<Box<str>>,
    /// The `kubernetes.io/service-name` label.
    pub service_name: Option<Box<str>>,
    /// `addressType`: `IPv4`, `IPv6` or `FQDN`.
    pub address_type: Box<str>,
    pub ports: Box<[SlicePort]>,
    /// Endpoints with at least one IP address (FQDN endpoints and
    /// unparseable addresses are dropped: no compiler can use them).
    pub endpoints: Box<[SliceEndpoint]>,
}

/// One `ports[]` entry of an EndpointSlice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlicePort {
    pub name: Option<Box<str>>,
    /// As written (`TCP` when unset is the reader's call).
    pub protocol: Option<Box<str>>,
    pub port: Option<i32>,
}

/// One endpoint of an EndpointSlice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceEndpoint {
    /// The first address inline (nearly every endpoint has exactly one).
    first: IpAddr,
    rest: Box<[IpAddr]>,
    /// `conditions.ready` / `serving` / `terminating` as given (unset stays
    /// unset: the API gives each its own default).
    pub ready: Option<bool>,
    pub serving: Option<bool>,
    pub terminating: Option<bool>,
    /// `nodeName`, interned.
    pub node_name: Option<Arc<str>>,
}

impl SliceEndpoint {
    /// An endpoint with these addresses (`None` when there are none).
    pub fn new(addresses: impl IntoIterator<Item = IpAddr>) -> Option<SliceEndpoint> {
        let mut addresses = addresses.into_iter();
        let first = addresses.next()?;
        Some(SliceEndpoint {
            first,
            rest: addresses.collect(),
            ready: None,
            serving: None,
            terminating: None,
            node_name: None,
        })
    }

    /// Its addresses, in the order the slice lists them.
    pub fn addresses(&self) -> impl Iterator<Item = IpAddr> + '_ {
        std::iter::once(self.first).chain(self.rest.iter().copied())
    }

    pub fn with_node_name(mut self, node: Option<&str>) -> SliceEndpoint {
        self.node_name = node.map(intern);
        self
    }
}

impl From<EndpointSlice> for SliceInfo {
    fn from(s: EndpointSlice) -> SliceInfo {
        let service_name = s
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
            .map(|n| n.as_str().into());
        let ports = s
            .ports
            .into_iter()
            .flatten()
            .map(|p| SlicePort {
                name: p.name.map(Into::into),
                protocol: p.protocol.map(Into::into),
                port: p.port,
            })
            .collect();
        let endpoints = s
            .endpoints
            .into_iter()
            .flatten()
            .filter_map(|ep| {
                let addresses = ep.addresses.iter().filter_map(|a| a.parse().ok());
                let mut out =
                    SliceEndpoint::new(addresses)?.with_node_name(ep.node_name.as_deref());
                if let Some(c) = ep.conditions {
                    out.ready = c.ready;
                    out.serving = c.serving;
                    out.terminating = c.terminating;
                }
                Some(out)
            })
            .collect();
        SliceInfo {
            resource_version: s.metadata.resource_version.map(Into::into),
            service_name,
            address_type: s.address_type.into(),
            ports,
            endpoints,
        }
    }
}

/// A Pod: labels, addresses, placement, phase, account and named ports.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodInfo {
    pub resource_version: Option<Box<str>>,
    pub labels: BTreeMap<String, String>,
    /// `status.podIPs` and `status.podIP`, parsed, sorted, without duplicates.
    pub ips: Box<[IpAddr]>,
    /// `spec.nodeName`, interned.
    pub node_name: Option<Arc<str>>,
    /// `status.phase` (`Pending`, `Running`, `Succeeded`, `Failed`, ...).
    pub phase: Option<Box<str>>,
    /// `spec.serviceAccountName` as given (unset stays unset).
    pub service_account_name: Option<Box<str>>,
    /// Container ports (of containers and init containers) that have a name.
    pub named_ports: Box<[PodPort]>,
    /// `metadata.deletionTimestamp` is set: the pod is going away.
    pub deleting: bool,
}

/// One named container port of a Pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodPort {
    pub name: Box<str>,
    /// As written (`TCP` when unset is the reader's call).
    pub protocol: Option<Box<str>>,
    pub container_port: i32,
    /// From an init container (policy resolves those too; Services do not).
    pub init: bool,
}

impl PodInfo {
    /// Whether the pod finished (`Succeeded` or `Failed`): its addresses may
    /// already belong to another pod.
    pub fn finished(&self) -> bool {
        matches!(self.phase.as_deref(), Some("Succeeded" | "Failed"))
    }
}

impl From<Pod> for PodInfo {
    fn from(p: Pod) -> PodInfo {
        let Pod {
            metadata,
            spec,
            status,
        } = p;
        let mut ips: Vec<IpAddr> = status
            .iter()
            .flat_map(|s| {
                s.pod_ips
                    .iter()
                    .flatten()
                    .map(|p| p.ip.as_str())
                    .chain(s.pod_ip.as_deref())
            })
            .filter_map(|ip| ip.parse().ok())
            .collect();
        ips.sort();
        ips.dedup();
        let named_ports = spec
            .iter()
            .flat_map(|s| {
                let containers = s.containers.iter().map(|c| (c, false));
                let init = s.init_containers.iter().flatten().map(|c| (c, true));
                containers.chain(init)
            })
            .flat_map(|(c, init)| c.ports.iter().flatten().map(move |p| (p, init)))
            .filter_map(|(p, init)| {
                Some(PodPort {
                    name: p.name.as_deref()?.into(),
                    protocol: p.protocol.as_deref().map(Into::into),
                    container_port: p.container_port,
                    init,
                })
            })
            .collect();
        PodInfo {
            resource_version: metadata.resource_version.map(Into::into),
            deleting: metadata.deletion_timestamp.is_some(),
            labels: metadata.labels.unwrap_or_default(),
            ips: ips.into(),
            node_name: spec
                .as_ref()
                .and_then(|s| s.node_name.as_deref())
                .map(intern),
            phase: status.and_then(|s| s.phase).map(Into::into),
            service_account_name: spec.and_then(|s| s.service_account_name).map(Into::into),
            named_ports,
        }
    }
}

/// `namespace/name` of a namespaced object (`default` when the namespace is
/// unset, as the API server would default it).
pub fn meta_key(meta: &ObjectMeta) -> ObjectKey {
    ObjectKey::new(
        meta.namespace.clone().unwrap_or_else(|| "default".into()),
        meta.name.clone().unwrap_or_default(),
    )
}

/// One shared copy of a node name. A cluster has a handful of nodes and
/// every endpoint and pod names one; the set only grows by new node names.
pub fn intern(name: &str) -> Arc<str> {
    static NAMES: Mutex<Option<HashSet<Arc<str>>>> = Mutex::new(None);
    let mut names = NAMES.lock().unwrap_or_else(|e| e.into_inner());
    let names = names.get_or_insert_with(HashSet::new);
    if let Some(known) = names.get(name) {
        return known.clone();
    }
    let name: Arc<str> = name.into();
    names.insert(name.clone());
    name
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn slice_keeps_what_the_compilers_read() {
        let s: EndpointSlice = serde_json::from_value(json!({
            "metadata": {"name": "web-1", "namespace": "shop", "resourceVersion": "7",
                         "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080}, {"port": 53, "protocol": "UDP"}],
            "endpoints": [
                {"addresses": ["10.0.0.1"], "nodeName": "n1",
                 "conditions": {"ready": false, "serving": true, "terminating": true},
                 "hostname": "h", "targetRef": {"kind": "Pod", "name": "p"}},
                {"addresses": ["not-an-ip"]},
                {"addresses": ["10.0.0.2", "10.0.0.3"], "nodeName": "n1"}
            ]
        }))
        .unwrap();
        let s = SliceInfo::from(s);
        assert_eq!(s.resource_version.as_deref(), Some("7"));
        assert_eq!(s.service_name.as_deref(), Some("web"));
        assert_eq!(&*s.address_type, "IPv4");
        assert_eq!(s.ports.len(), 2);
        assert_eq!(s.ports[1].protocol.as_deref(), Some("UDP"));
        assert_eq!(s.ports[1].name, None);
        assert_eq!(
            s.endpoints.len(),
            2,
            "the endpoint without an IP is dropped"
        );
        let e0 = &s.endpoints[0];
        assert_eq!(
            e0.addresses().collect::<Vec<_>>(),
            ["10.0.0.1".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(
            (e0.ready, e0.serving, e0.terminating),
            (Some(false), Some(true), Some(true))
        );
        let e1 = &s.endpoints[1];
        assert_eq!(e1.addresses().count(), 2);
        assert_eq!(e1.ready, None);
        // One copy of the node name for both endpoints.
        assert!(Arc::ptr_eq(
            e0.node_name.as_ref().unwrap(),
            e1.node_name.as_ref().unwrap()
        ));
    }

    #[test]
    fn ipv6_slices_keep_their_addresses() {
        let s: EndpointSlice = serde_json::from_value(json!({
            "metadata": {"name": "web-6"},
            "addressType": "IPv6",
            "endpoints": [{"addresses": ["fd00::7"]}]
        }))
        .unwrap();
        let s = SliceInfo::from(s);
        assert_eq!(&*s.address_type, "IPv6");
        assert_eq!(
            s.endpoints[0].addresses().next(),
            Some("fd00::7".parse().unwrap())
        );
    }

    #[test]
    fn pod_keeps_what_the_compilers_read() {
        let p: Pod = serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "a", "labels": {"app": "web"},
                         "resourceVersion": "3", "deletionTimestamp": "2024-01-01T00:00:00Z"},
            "spec": {"nodeName": "n1", "serviceAccountName": "sa",
                     "initContainers": [{"name": "i", "ports": [{"name": "init-port", "containerPort": 9000}]}],
                     "containers": [{"name": "c", "image": "nginx", "env": [{"name": "X", "value": "1"}],
                                     "ports": [{"name": "http", "containerPort": 8080},
                                               {"containerPort": 8081},
                                               {"name": "dns", "containerPort": 53, "protocol": "UDP"}]}]},
            "status": {"phase": "Running", "podIP": "10.0.0.5",
                       "podIPs": [{"ip": "10.0.0.5"}, {"ip": "fd00::5"}]}
        }))
        .unwrap();
        let p = PodInfo::from(p);
        assert_eq!(p.labels["app"], "web");
        assert_eq!(
            &*p.ips,
            [
                "10.0.0.5".parse::<IpAddr>().unwrap(),
                "fd00::5".parse().unwrap()
            ]
        );
        assert_eq!(p.node_name.as_deref(), Some("n1"));
        assert_eq!(p.service_account_name.as_deref(), Some("sa"));
        assert_eq!(p.phase.as_deref(), Some("Running"));
        assert!(p.deleting && !p.finished());
        let names: Vec<(&str, bool)> = p.named_ports.iter().map(|n| (&*n.name, n.init)).collect();
        assert_eq!(
            names,
            [("http", false), ("dns", false), ("init-port", true)]
        );
        assert_eq!(p.named_ports[1].protocol.as_deref(), Some("UDP"));
    }
}
