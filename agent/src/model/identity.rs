//! Node-local security identities. In chaining mode identities never leave the
//! node, so a deterministic local allocator is enough: the same label set always
//! gets the same number while any endpoint holds it.

use crate::model::policy::{
    CLUSTER_LABEL, CLUSTER_NAME, NAMESPACE_LABEL, NAMESPACE_LABELS_PREFIX, SERVICE_ACCOUNT_LABEL,
};
use catena_common::identity as id;
use std::collections::BTreeMap;

/// Identities below this are reserved (host, world, ...), as in Cilium.
pub const FIRST_LOCAL_IDENTITY: u32 = 256;

/// Reserved identities and their `reserved:` label, as upstream names them.
pub const RESERVED: &[(u32, &str)] = &[
    (id::HOST, "host"),
    (id::WORLD, "world"),
    (id::UNMANAGED, "unmanaged"),
    (id::HEALTH, "health"),
    (id::INIT, "init"),
    (id::REMOTE_NODE, "remote-node"),
    (id::KUBE_APISERVER, "kube-apiserver"),
];

/// The labels a pod's identity is derived from, as Cilium derives them (all
/// of source `k8s`): the pod's labels; `io.kubernetes.pod.namespace`; every
/// namespace label as `io.cilium.k8s.namespace.labels.<k>` (with
/// `kubernetes.io/metadata.name`, which the API server sets on every
/// namespace, synthesised when the source has no Namespace object);
/// `io.cilium.k8s.policy.serviceaccount` when known; and the cluster name
/// `io.cilium.k8s.policy.cluster`.
pub fn pod_identity_labels(
    namespace: &str,
    pod_labels: &BTreeMap<String, String>,
    namespace_labels: Option<&BTreeMap<String, String>>,
    service_account: Option<&str>,
) -> BTreeMap<String, String> {
    let mut labels = pod_labels.clone();
    labels.insert(NAMESPACE_LABEL.into(), namespace.into());
    let meta_name = (
        "kubernetes.io/metadata.name".to_string(),
        namespace.to_string(),
    );
    for (k, v) in namespace_labels
        .into_iter()
        .flatten()
        .chain(std::iter::once((&meta_name.0, &meta_name.1)))
    {
        labels
            .entry(format!("{NAMESPACE_LABELS_PREFIX}{k}"))
            .or_insert_with(|| v.clone());
    }
    if let Some(sa) = service_account.filter(|s| !s.is_empty()) {
        labels.insert(SERVICE_ACCOUNT_LABEL.into(), sa.into());
    }
    labels.insert(CLUSTER_LABEL.into(), CLUSTER_NAME.into());
    labels
}

#[derive(Debug)]
pub struct IdentityAllocator {
    by_labels: BTreeMap<BTreeMap<String, String>, u32>,
    /// Numbers in use, kept beside `by_labels` so allocating is O(log n):
    /// rebuilding it per allocation made 5k pods cost a second.
    used: std::collections::BTreeSet<u32>,
    /// No number below this is free.
    free_from: u32,
}

impl Default for IdentityAllocator {
    fn default() -> Self {
        IdentityAllocator {
            by_labels: BTreeMap::new(),
            used: Default::default(),
            free_from: FIRST_LOCAL_IDENTITY,
        }
    }
}

impl IdentityAllocator {
    /// The identity of `labels`, allocating the smallest free one if new.
    pub fn allocate(&mut self, labels: BTreeMap<String, String>) -> u32 {
        self.allocate_preferring(labels, None)
    }

    /// Like [`allocate`](Self::allocate), but a new label set takes
    /// `preferred` when it is free: an endpoint keeps the number persisted in
    /// its record across agent restarts, so the pinned maps stay valid.
    pub fn allocate_preferring(
        &mut self,
        labels: BTreeMap<String, String>,
        preferred: Option<u32>,
    ) -> u32 {
        if let Some(id) = self.by_labels.get(&labels) {
            return *id;
        }
        let id = match preferred
            .filter(|p| *p >= FIRST_LOCAL_IDENTITY && *p < id::FIRST_CIDR && !self.used.contains(p))
        {
            Some(p) => p,
            None => {
                let mut candidate = self.free_from;
                // `used` is sorted: walk it from the hint to the first gap.
                for taken in self.used.range(self.free_from..) {
                    if *taken != candidate {
                        break;
                    }
                    candidate += 1;
                }
                if candidate >= id::FIRST_CIDR {
                    u32::MAX
                } else {
                    self.free_from = candidate + 1;
                    candidate
                }
            }
        };
        self.used.insert(id);
        self.by_labels.insert(labels, id);
        id
    }

    /// Forgets every label set not in `live` (called after endpoints change).
    pub fn retain_only(&mut self, live: &[BTreeMap<String, String>]) {
        let live: std::collections::BTreeSet<&BTreeMap<String, String>> = live.iter().collect();
        let mut freed = Vec::new();
        self.by_labels.retain(|labels, id| {
            let keep = live.contains(labels);
            if !keep {
                freed.push(*id);
            }
            keep
        });
        for id in freed {
            self.used.remove(&id);
            self.free_from = self.free_from.min(id.max(FIRST_LOCAL_IDENTITY));
        }
    }

    /// Every label set and its identity.
    pub fn all(&self) -> impl Iterator<Item = (&BTreeMap<String, String>, u32)> {
        self.by_labels.iter().map(|(l, i)| (l, *i))
    }

    pub fn len(&self) -> usize {
        self.by_labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_labels.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_labels_same_identity() {
        let mut a = IdentityAllocator::default();
        let web = BTreeMap::from([("app".into(), "web".into())]);
        let db = BTreeMap::from([("app".into(), "db".into())]);
        let id = a.allocate(web.clone());
        assert_eq!(id, FIRST_LOCAL_IDENTITY);
        assert_eq!(a.allocate(web.clone()), id);
        assert_eq!(a.allocate(db.clone()), id + 1);
        a.retain_only(std::slice::from_ref(&db));
        assert_eq!(a.allocate(web), id, "freed ids are reused");
        assert_eq!(a.len(), 2);
        let x = BTreeMap::from([("app".into(), "x".into())]);
        assert_eq!(
            a.allocate_preferring(x.clone(), Some(id + 1)),
            id + 2,
            "taken"
        );
        let y = BTreeMap::from([("app".into(), "y".into())]);
        assert_eq!(a.allocate_preferring(y, Some(900)), 900);
        assert_eq!(
            a.allocate_preferring(x, Some(901)),
            id + 2,
            "known sets keep theirs"
        );
    }

    #[test]
    fn pod_labels_follow_upstream_conventions() {
        let labels = pod_identity_labels(
            "shop",
            &BTreeMap::from([("app".into(), "web".into())]),
            Some(&BTreeMap::from([("team".into(), "a".into())])),
            Some("web-sa"),
        );
        let want: BTreeMap<String, String> = [
            ("app", "web"),
            ("io.kubernetes.pod.namespace", "shop"),
            ("io.cilium.k8s.namespace.labels.team", "a"),
            (
                "io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name",
                "shop",
            ),
            ("io.cilium.k8s.policy.serviceaccount", "web-sa"),
            ("io.cilium.k8s.policy.cluster", "default"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(labels, want);
    }
}
