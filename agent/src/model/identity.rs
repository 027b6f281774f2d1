//! Node-local security identities. In chaining mode identities never leave the
//! node, so a deterministic local allocator is enough: the same label set always
//! gets the same number while any endpoint holds it.

use std::collections::BTreeMap;

/// Identities below this are reserved (host, world, ...), as in Cilium.
pub const FIRST_LOCAL_IDENTITY: u32 = 256;

/// The labels an identity is derived from: pod labels plus the namespace as
/// `io.kubernetes.pod.namespace`, the convention Cilium policies select on.
pub fn identity_labels(
    namespace: &str,
    pod_labels: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let mut labels = pod_labels.clone();
    labels.insert("io.kubernetes.pod.namespace".into(), namespace.into());
    labels
}

#[derive(Debug, Default)]
pub struct IdentityAllocator {
    by_labels: BTreeMap<BTreeMap<String, String>, u32>,
}

impl IdentityAllocator {
    /// The identity of `labels`, allocating the smallest free one if new.
    pub fn allocate(&mut self, labels: BTreeMap<String, String>) -> u32 {
        if let Some(id) = self.by_labels.get(&labels) {
            return *id;
        }
        let used: std::collections::BTreeSet<u32> = self.by_labels.values().copied().collect();
        let id = (FIRST_LOCAL_IDENTITY..)
            .find(|i| !used.contains(i))
            .unwrap_or(u32::MAX);
        self.by_labels.insert(labels, id);
        id
    }

    /// Forgets every label set not in `live` (called after endpoints change).
    pub fn retain_only(&mut self, live: &[BTreeMap<String, String>]) {
        self.by_labels.retain(|labels, _| live.contains(labels));
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
        let web = identity_labels("shop", &BTreeMap::from([("app".into(), "web".into())]));
        let db = identity_labels("shop", &BTreeMap::from([("app".into(), "db".into())]));
        let id = a.allocate(web.clone());
        assert_eq!(id, FIRST_LOCAL_IDENTITY);
        assert_eq!(a.allocate(web.clone()), id);
        assert_eq!(a.allocate(db.clone()), id + 1);
        a.retain_only(std::slice::from_ref(&db));
        assert_eq!(a.allocate(web), id, "freed ids are reused");
        assert_eq!(a.len(), 2);
    }
}
