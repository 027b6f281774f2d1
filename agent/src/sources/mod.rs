//! Where the agent learns the cluster: a directory of manifests (standalone, the
//! embedded default) or, later, the Kubernetes API. Every source produces the
//! same [`ClusterState`] snapshot; the compilers never know which one it was.

pub mod compact;
pub mod kube;
pub mod manifest_dir;
pub mod manifests;
pub mod node;
pub mod watch;

use compact::meta_key;
pub use compact::{PodInfo, SliceInfo};
use k8s_openapi::api::core::v1::{Namespace, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
pub use node::NodeInfo;
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

/// One object from a source. EndpointSlices and Pods come converted to
/// their compact form (see [`compact`]), with the key they had.
#[derive(Clone, Debug, PartialEq)]
pub enum Object {
    Service(Arc<Service>),
    EndpointSlice(ObjectKey, Arc<SliceInfo>),
    Pod(ObjectKey, Arc<PodInfo>),
    Namespace(Arc<Namespace>),
    NetworkPolicy(Arc<NetworkPolicy>),
    CiliumPolicy(Arc<CiliumPolicy>),
    Node(Arc<NodeInfo>),
}

impl Object {
    pub fn kind(&self) -> &str {
        match self {
            Object::Service(_) => "Service",
            Object::EndpointSlice(..) => "EndpointSlice",
            Object::Pod(..) => "Pod",
            Object::Namespace(_) => "Namespace",
            Object::NetworkPolicy(_) => "NetworkPolicy",
            Object::CiliumPolicy(p) => &p.kind,
            Object::Node(_) => "Node",
        }
    }
}

impl Object {
    /// A Kubernetes EndpointSlice, converted.
    pub fn endpoint_slice(s: k8s_openapi::api::discovery::v1::EndpointSlice) -> Object {
        Object::EndpointSlice(meta_key(&s.metadata), Arc::new(SliceInfo::from(s)))
    }

    /// A Kubernetes Node, converted.
    pub fn node(n: k8s_openapi::api::core::v1::Node) -> Object {
        Object::Node(Arc::new(NodeInfo::from(n)))
    }

    /// A Kubernetes Pod, converted.
    pub fn pod(p: k8s_openapi::api::core::v1::Pod) -> Object {
        Object::Pod(meta_key(&p.metadata), Arc::new(PodInfo::from(p)))
    }
}

/// One kind's objects in a snapshot. Successive snapshots share the map
/// itself (cloning a [`ClusterState`] clones six pointers) until that kind
/// changes; a change copies only that kind's map (copy-on-write), and the
/// objects in it stay shared. Reads go through `Deref` to the `BTreeMap`.
#[derive(Debug)]
pub struct KindMap<K, V>(Arc<BTreeMap<K, V>>);

impl<K, V> KindMap<K, V> {
    /// Whether both are the very same map (no change in between). Only
    /// meaningful while both are alive, which holding them guarantees.
    pub fn same_map(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl<K: Clone + Ord, V: Clone> KindMap<K, V> {
    /// The map to change: copied first if a published snapshot shares it.
    pub fn make_mut(&mut self) -> &mut BTreeMap<K, V> {
        Arc::make_mut(&mut self.0)
    }

    pub fn insert(&mut self, key: K, value: V) -> Option<V> {
        self.make_mut().insert(key, value)
    }

    pub fn remove(&mut self, key: &K) -> Option<V> {
        if !self.0.contains_key(key) {
            return None; // no copy for a no-op
        }
        self.make_mut().remove(key)
    }
}

impl<K, V> Clone for KindMap<K, V> {
    fn clone(&self) -> Self {
        KindMap(self.0.clone())
    }
}

impl<K, V> Default for KindMap<K, V> {
    fn default() -> Self {
        KindMap(Arc::new(BTreeMap::new()))
    }
}

impl<K: PartialEq, V: PartialEq> PartialEq for KindMap<K, V> {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0) || self.0 == other.0
    }
}

impl<K, V> std::ops::Deref for KindMap<K, V> {
    type Target = BTreeMap<K, V>;
    fn deref(&self) -> &BTreeMap<K, V> {
        &self.0
    }
}

impl<'a, K, V> IntoIterator for &'a KindMap<K, V> {
    type Item = (&'a K, &'a V);
    type IntoIter = std::collections::btree_map::Iter<'a, K, V>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

impl<K: Ord, V> FromIterator<(K, V)> for KindMap<K, V> {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        KindMap(Arc::new(iter.into_iter().collect()))
    }
}

/// The whole cluster as one source sees it. Objects are shared (`Arc`) with
/// the source's own maps and between successive snapshots, and so are the
/// per-kind maps until their kind changes: a snapshot costs pointers, not
/// copies. At 10k Services and 100k endpoints, deep copies (and later
/// per-change rebuilds) were most of the agent's memory and update latency.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ClusterState {
    pub services: KindMap<ObjectKey, Arc<Service>>,
    pub endpoint_slices: KindMap<ObjectKey, Arc<SliceInfo>>,
    pub pods: KindMap<ObjectKey, Arc<PodInfo>>,
    pub namespaces: KindMap<String, Arc<Namespace>>,
    pub network_policies: KindMap<ObjectKey, Arc<NetworkPolicy>>,
    pub cilium_policies: KindMap<(String, ObjectKey), Arc<CiliumPolicy>>,
    /// By node name.
    pub nodes: KindMap<String, Arc<NodeInfo>>,
}

impl ClusterState {
    /// Inserts an object; returns the key it replaced, if any (a duplicate).
    pub fn insert(&mut self, object: Object) -> Option<String> {
        let kind = object.kind().to_string();
        let replaced = match object {
            Object::Service(o) => {
                let k = meta_key(&o.metadata);
                self.services.insert(k.clone(), o).map(|_| k)
            }
            Object::EndpointSlice(k, o) => self.endpoint_slices.insert(k.clone(), o).map(|_| k),
            Object::Pod(k, o) => self.pods.insert(k.clone(), o).map(|_| k),
            Object::Namespace(o) => {
                let name = o.metadata.name.clone().unwrap_or_default();
                self.namespaces
                    .insert(name.clone(), o)
                    .map(|_| ObjectKey::new("", name))
            }
            Object::NetworkPolicy(o) => {
                let k = meta_key(&o.metadata);
                self.network_policies.insert(k.clone(), o).map(|_| k)
            }
            Object::CiliumPolicy(p) => {
                let k = cilium_key(&p);
                self.cilium_policies
                    .insert((p.kind.clone(), k.clone()), p)
                    .map(|_| k)
            }
            Object::Node(n) => {
                let name = n.name.clone();
                self.nodes
                    .insert(name.clone(), n)
                    .map(|_| ObjectKey::new("", name))
            }
        };
        replaced.map(|k| format!("{kind} {k}"))
    }

    /// Removes the object stored under `object`'s key; whether there was one.
    pub fn remove(&mut self, object: &Object) -> bool {
        match object {
            Object::Service(o) => self.services.remove(&meta_key(&o.metadata)).is_some(),
            Object::EndpointSlice(k, _) => self.endpoint_slices.remove(k).is_some(),
            Object::Pod(k, _) => self.pods.remove(k).is_some(),
            Object::Namespace(o) => self
                .namespaces
                .remove(&o.metadata.name.clone().unwrap_or_default())
                .is_some(),
            Object::NetworkPolicy(o) => self
                .network_policies
                .remove(&meta_key(&o.metadata))
                .is_some(),
            Object::CiliumPolicy(p) => self
                .cilium_policies
                .remove(&(p.kind.clone(), cilium_key(p)))
                .is_some(),
            Object::Node(n) => self.nodes.remove(&n.name).is_some(),
        }
    }

    /// Pod labels by `namespace/name`, as the endpoints controller needs them.
    pub fn pod_labels(&self, key: &ObjectKey) -> Option<&BTreeMap<String, String>> {
        self.pods.get(key).map(|p| &p.labels)
    }
}

/// A Cilium policy's key: clusterwide ones have no namespace.
fn cilium_key(p: &CiliumPolicy) -> ObjectKey {
    let meta = &p.object["metadata"];
    let namespace = if p.kind == "CiliumClusterwideNetworkPolicy" {
        String::new()
    } else {
        meta["namespace"].as_str().unwrap_or("default").to_string()
    };
    ObjectKey::new(namespace, meta["name"].as_str().unwrap_or_default())
}

/// Whether two object maps hold the very same objects (same keys, same
/// `Arc`s). Comparing pointers is only sound while both maps are alive, which
/// is why callers keep the previous maps (not their addresses) to compare
/// against: a freed object's address can be reused by a new one.
pub fn same_arcs<K: Ord, V>(a: &BTreeMap<K, Arc<V>>, b: &BTreeMap<K, Arc<V>>) -> bool {
    // One map shared by both snapshots (the kind did not change): O(1).
    std::ptr::eq(a, b)
        || a.len() == b.len()
            && a.iter()
                .zip(b)
                .all(|((ka, va), (kb, vb))| ka == kb && Arc::ptr_eq(va, vb))
}
