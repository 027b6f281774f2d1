//! Where the agent learns the cluster: a directory of manifests (standalone, the
//! embedded default) or, later, the Kubernetes API. Every source produces the
//! same [`ClusterState`] snapshot; the compilers never know which one it was.

pub mod kube;
pub mod manifest_dir;
pub mod manifests;
pub mod watch;

use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

/// `namespace/name` of a namespaced object (namespace empty for cluster-scoped).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        ObjectKey {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            f.write_str(&self.name)
        } else {
            write!(f, "{}/{}", self.namespace, self.name)
        }
    }
}

/// A Cilium policy kept as its raw object until the policy compiler types it.
#[derive(Clone, Debug, PartialEq)]
pub struct CiliumPolicy {
    /// `CiliumNetworkPolicy` or `CiliumClusterwideNetworkPolicy`.
    pub kind: String,
    pub object: serde_json::Value,
}

/// One object from a source.
#[derive(Clone, Debug, PartialEq)]
pub enum Object {
    Service(Arc<Service>),
    EndpointSlice(Arc<EndpointSlice>),
    Pod(Arc<Pod>),
    Namespace(Arc<Namespace>),
    NetworkPolicy(Arc<NetworkPolicy>),
    CiliumPolicy(Arc<CiliumPolicy>),
}

impl Object {
    pub fn kind(&self) -> &str {
        match self {
            Object::Service(_) => "Service",
            Object::EndpointSlice(_) => "EndpointSlice",
            Object::Pod(_) => "Pod",
            Object::Namespace(_) => "Namespace",
            Object::NetworkPolicy(_) => "NetworkPolicy",
            Object::CiliumPolicy(p) => &p.kind,
        }
    }
}

/// The whole cluster as one source sees it. Objects are shared (`Arc`) with
/// the source's own stores and between successive snapshots, so a snapshot
/// costs pointers, not copies: at 10k Services and 100k endpoints, deep copies
/// per change were most of the agent's memory and of its update latency.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ClusterState {
    pub services: BTreeMap<ObjectKey, Arc<Service>>,
    pub endpoint_slices: BTreeMap<ObjectKey, Arc<EndpointSlice>>,
    pub pods: BTreeMap<ObjectKey, Arc<Pod>>,
    pub namespaces: BTreeMap<String, Arc<Namespace>>,
    pub network_policies: BTreeMap<ObjectKey, Arc<NetworkPolicy>>,
    pub cilium_policies: BTreeMap<(String, ObjectKey), Arc<CiliumPolicy>>,
}

impl ClusterState {
    /// Inserts an object; returns the key it replaced, if any (a duplicate).
    pub fn insert(&mut self, object: Object) -> Option<String> {
        fn key(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> ObjectKey {
            ObjectKey::new(
                meta.namespace.clone().unwrap_or_else(|| "default".into()),
                meta.name.clone().unwrap_or_default(),
            )
        }
        let kind = object.kind().to_string();
        let replaced = match object {
            Object::Service(o) => {
                let k = key(&o.metadata);
                self.services.insert(k.clone(), o).map(|_| k)
            }
            Object::EndpointSlice(o) => {
                let k = key(&o.metadata);
                self.endpoint_slices.insert(k.clone(), o).map(|_| k)
            }
            Object::Pod(o) => {
                let k = key(&o.metadata);
                self.pods.insert(k.clone(), o).map(|_| k)
            }
            Object::Namespace(o) => {
                let name = o.metadata.name.clone().unwrap_or_default();
                self.namespaces
                    .insert(name.clone(), o)
                    .map(|_| ObjectKey::new("", name))
            }
            Object::NetworkPolicy(o) => {
                let k = key(&o.metadata);
                self.network_policies.insert(k.clone(), o).map(|_| k)
            }
            Object::CiliumPolicy(p) => {
                let meta = &p.object["metadata"];
                let namespace = if p.kind == "CiliumClusterwideNetworkPolicy" {
                    String::new()
                } else {
                    meta["namespace"].as_str().unwrap_or("default").to_string()
                };
                let k = ObjectKey::new(namespace, meta["name"].as_str().unwrap_or_default());
                self.cilium_policies
                    .insert((p.kind.clone(), k.clone()), p)
                    .map(|_| k)
            }
        };
        replaced.map(|k| format!("{kind} {k}"))
    }

    /// Pod labels by `namespace/name`, as the endpoints controller needs them.
    pub fn pod_labels(&self, key: &ObjectKey) -> Option<&BTreeMap<String, String>> {
        self.pods.get(key).and_then(|p| p.metadata.labels.as_ref())
    }
}

/// Whether two object maps hold the very same objects (same keys, same
/// `Arc`s). Comparing pointers is only sound while both maps are alive, which
/// is why callers keep the previous maps (not their addresses) to compare
/// against: a freed object's address can be reused by a new one.
pub fn same_arcs<K: Ord, V>(a: &BTreeMap<K, Arc<V>>, b: &BTreeMap<K, Arc<V>>) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|((ka, va), (kb, vb))| ka == kb && Arc::ptr_eq(va, vb))
}
