//! The Kubernetes source: one kube-rs watcher per kind, feeding one
//! persistent [`ClusterState`] that each event changes in place.
//!
//! Why the datapath never sees a half-listed cluster: each kind's watcher task
//! buffers a (re-)list (`Init` .. `InitApply` .. `InitDone`) into a map of its
//! own and hands it over only when it is complete, where it replaces that
//! kind's objects in one swap; and nothing is published until every required
//! kind has finished its first list (Cilium kinds too, unless their CRD is
//! not installed). Watch errors (dropped connections, `410 Gone`) back off and
//! resume inside the watcher while the last state stays in force: a re-list
//! never flushes.
//!
//! Why a change costs little: there is no reflector store to rebuild
//! snapshots from. Watch events are applied to the persistent state (one map
//! insert), each kind's map is copied only when that kind changes (see
//! [`super::KindMap`]), and a snapshot is a handful of pointers. Objects are
//! converted once, on arrival, and trimmed of what catena never reads, so the
//! same `Arc` stays in every snapshot until the object changes; the compilers
//! find changes by pointer comparison.
//!
//! Publishing is immediate when idle and coalescing when busy: everything
//! that queued up while one change was applied goes out as one snapshot, and
//! the agent's reconciler (a `watch` channel) always takes the newest.

use super::watch::SourceUpdate;
use super::{CiliumPolicy, ClusterState, Object};
use anyhow::{Context, Result};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use std::collections::BTreeMap;
use std::fmt::Debug;
use std::path::Path;
use std::sync::Arc;
use tokio::sync::{mpsc, watch};

/// Objects per list page. kube-rs defaults to 500, which at 10k Services and
/// 10k EndpointSlices is 40 round trips before the first snapshot. Larger
/// pages cost memory for good, not just while listing: a page is one
/// deserialized batch of full objects (5000 EndpointSlices are ~35 MiB), and
/// the compact objects built while it is alive end up scattered among its
/// chunks once it is freed. On the source-sync benchmark 5000 left ~113 MiB
/// resident after sync, 1000 ~95 MiB, at the same sync time.
const LIST_PAGE_SIZE: u32 = 1000;

/// Builds a client from `--kubeconfig`, or in-cluster config / `KUBECONFIG`.
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .with_context(|| format!("using kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer()
            .await
            .context("no --kubeconfig, no --manifests, and no in-cluster config")?,
    };
    Client::try_from(config).context("creating the Kubernetes client")
}

/// The kinds catena watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Service,
    EndpointSlice,
    Pod,
    Namespace,
    Node,
    NetworkPolicy,
    CiliumNetworkPolicy,
    CiliumClusterwideNetworkPolicy,
}

const KINDS: [Kind; 8] = [
    Kind::Service,
    Kind::EndpointSlice,
    Kind::Pod,
    Kind::Namespace,
    Kind::Node,
    Kind::NetworkPolicy,
    Kind::CiliumNetworkPolicy,
    Kind::CiliumClusterwideNetworkPolicy,
];

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Pod => "Pod",
            Kind::Namespace => "Namespace",
            Kind::Node => "Node",
            Kind::NetworkPolicy => "NetworkPolicy",
            Kind::CiliumNetworkPolicy => "CiliumNetworkPolicy",
            Kind::CiliumClusterwideNetworkPolicy => "CiliumClusterwideNetworkPolicy",
        }
    }

    /// Cilium's CRDs may not be installed: those kinds join when they appear.
    fn is_crd(self) -> bool {
        matches!(
            self,
            Kind::CiliumNetworkPolicy | Kind::CiliumClusterwideNetworkPolicy
        )
    }
}

/// What a kind's watcher task hands to the aggregator.
enum Change {
    /// A complete (re-)list of one kind: a state holding only that kind.
    Listed(Kind, ClusterState),
    Applied(Object),
    Deleted(Object),
    Failed {
        kind: Kind,
        error: String,
        /// The API answered 404 on the list: the kind (a CRD) is not installed.
        missing: bool,
    },
}

/// Starts every watcher, waits for the first complete list of every kind
/// (a Cilium kind whose CRD is not installed is not waited for), publishes
/// the first snapshot and keeps publishing on change.
pub async fn watch_kubernetes(client: Client) -> Result<watch::Receiver<SourceUpdate>> {
    let (changes_tx, mut changes) = mpsc::unbounded_channel::<Change>();
    let cnp = ApiResource::from_gvk(&GroupVersionKind::gvk(
        "cilium.io",
        "v2",
        "CiliumNetworkPolicy",
    ));
    let ccnp = ApiResource::from_gvk(&GroupVersionKind::gvk(
        "cilium.io",
        "v2",
        "CiliumClusterwideNetworkPolicy",
    ));
    let tx = &changes_tx;
    watch_kind(Kind::Service, Api::all(client.clone()), tx, |s: Service| {
        Object::Service(Arc::new(trim_service(s)))
    });
    // EndpointSlices and Pods are converted to their compact form at once
    // (see `super::compact`): the deserialized object is dropped right here.
    watch_kind(
        Kind::EndpointSlice,
        Api::all(client.clone()),
        tx,
        Object::endpoint_slice,
    );
    watch_kind(Kind::Pod, Api::all(client.clone()), tx, Object::pod);
    watch_kind(
        Kind::Namespace,
        Api::all(client.clone()),
        tx,
        |mut n: Namespace| {
            trim_meta(&mut n.metadata);
            Object::Namespace(Arc::new(n))
        },
    );
    // Nodes: their addresses are the remote-node identity (policy entities).
    watch_kind(Kind::Node, Api::all(client.clone()), tx, Object::node);
    watch_kind(
        Kind::NetworkPolicy,
        Api::all(client.clone()),
        tx,
        |mut n: NetworkPolicy| {
            trim_meta(&mut n.metadata);
            Object::NetworkPolicy(Arc::new(n))
        },
    );
    watch_kind(
        Kind::CiliumNetworkPolicy,
        Api::all_with(client.clone(), &cnp),
        tx,
        |o: DynamicObject| cilium_policy(Kind::CiliumNetworkPolicy, o),
    );
    watch_kind(
        Kind::CiliumClusterwideNetworkPolicy,
        Api::all_with(client, &ccnp),
        tx,
        |o: DynamicObject| cilium_policy(Kind::CiliumClusterwideNetworkPolicy, o),
    );
    drop(changes_tx);

    let mut source = Aggregator::default();
    while !source.complete() {
        let change = changes
            .recv()
            .await
            .context("every Kubernetes watcher stopped before its first list")?;
        source.apply(change);
        while let Ok(change) = changes.try_recv() {
            source.apply(change);
        }
    }
    tracing::info!(
        services = source.state.services.len(),
        endpoint_slices = source.state.endpoint_slices.len(),
        pods = source.state.pods.len(),
        namespaces = source.state.namespaces.len(),
        network_policies = source.state.network_policies.len(),
        cilium_policies = source.state.cilium_policies.len(),
        "every Kubernetes kind listed"
    );
    let (tx, rx) = watch::channel(source.publish());
    tokio::spawn(async move {
        // Leading edge: the first change after a quiet spell goes out at once.
        // Trailing coalescing: whatever queued meanwhile goes out together.
        while let Some(change) = changes.recv().await {
            let started = std::time::Instant::now();
            let mut applied = usize::from(source.apply(change));
            while let Ok(change) = changes.try_recv() {
                applied += usize::from(source.apply(change));
            }
            if applied == 0 && !source.errors_changed {
                continue;
            }
            let update = source.publish();
            tracing::debug!(
                generation = update.generation,
                changes = applied,
                took_us = started.elapsed().as_micros() as u64,
                "published a cluster snapshot"
            );
            if tx.send(update).is_err() {
                break;
            }
        }
    });
    Ok(rx)
}

/// Runs one kind's watcher in its own task (so the kinds deserialize in
/// parallel) and sends its changes, converted, to the aggregator.
fn watch_kind<K>(
    kind: Kind,
    api: Api<K>,
    changes: &mpsc::UnboundedSender<Change>,
    convert: impl Fn(K) -> Object + Send + 'static,
) where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    let changes = changes.clone();
    let config = watcher::Config::default().page_size(LIST_PAGE_SIZE);
    let stream = watcher(api, config).default_backoff();
    tokio::spawn(async move {
        futures::pin_mut!(stream);
        // The list in progress; swapped in whole at InitDone.
        let mut listing = ClusterState::default();
        while let Some(event) = stream.next().await {
            let change = match event {
                Ok(watcher::Event::Init) => {
                    listing = ClusterState::default();
                    continue;
                }
                Ok(watcher::Event::InitApply(object)) => {
                    listing.insert(convert(object));
                    continue;
                }
                Ok(watcher::Event::InitDone) => {
                    tracing::debug!(kind = kind.name(), "listed");
                    Change::Listed(kind, std::mem::take(&mut listing))
                }
                Ok(watcher::Event::Apply(object)) => Change::Applied(convert(object)),
                Ok(watcher::Event::Delete(object)) => Change::Deleted(convert(object)),
                Err(e) => {
                    let missing = matches!(
                        &e,
                        watcher::Error::InitialListFailed(kube::Error::Api(s)) if s.code == 404
                    );
                    if missing && kind.is_crd() {
                        tracing::debug!(kind = kind.name(), "not installed; watching for it");
                    } else {
                        tracing::warn!(kind = kind.name(), error = %e, "watch failed; backing off and resuming with the last state");
                    }
                    Change::Failed {
                        kind,
                        error: format!("{} watch: {e}", kind.name()),
                        missing,
                    }
                }
            };
            if changes.send(change).is_err() {
                break;
            }
        }
    });
}

/// The persistent state every change is applied to.
#[derive(Default)]
struct Aggregator {
    state: ClusterState,
    /// Kinds that completed at least one list.
    listed: Vec<Kind>,
    /// Cilium kinds whose list answered 404 (CRD not installed).
    missing: Vec<Kind>,
    /// Per-kind watch problems, newest last; cleared when the kind lists again.
    problems: BTreeMap<Kind, String>,
    errors_changed: bool,
    generation: u64,
}

impl Aggregator {
    /// Whether every kind is listed (or, for a CRD, known to be absent).
    fn complete(&self) -> bool {
        KINDS
            .iter()
            .all(|k| self.listed.contains(k) || (k.is_crd() && self.missing.contains(k)))
    }

    /// Applies one change; whether the state changed.
    fn apply(&mut self, change: Change) -> bool {
        match change {
            Change::Listed(kind, listed) => {
                if !self.listed.contains(&kind) {
                    self.listed.push(kind);
                }
                self.missing.retain(|k| *k != kind);
                self.errors_changed |= self.problems.remove(&kind).is_some();
                replace_kind(&mut self.state, kind, listed);
                true
            }
            Change::Applied(object) => {
                self.state.insert(object);
                true
            }
            Change::Deleted(object) => self.state.remove(&object),
            Change::Failed {
                kind,
                error,
                missing,
            } => {
                if missing && kind.is_crd() {
                    if !self.missing.contains(&kind) {
                        self.missing.push(kind);
                    }
                    // An absent optional CRD is not a problem to report.
                    return false;
                }
                self.errors_changed |= self.problems.insert(kind, error.clone()) != Some(error);
                false
            }
        }
    }

    fn publish(&mut self) -> SourceUpdate {
        self.generation += 1;
        self.errors_changed = false;
        SourceUpdate {
            // Six map pointers: the snapshot shares everything with the state.
            state: Arc::new(self.state.clone()),
            errors: self.problems.values().cloned().collect(),
            generation: self.generation,
        }
    }
}

/// Swaps in a kind's complete list. Objects whose `resourceVersion` did not
/// change keep their old `Arc`, so a re-list after `410 Gone` looks to the
/// compilers like the few changes it really brought, not like a new cluster.
fn replace_kind(state: &mut ClusterState, kind: Kind, mut listed: ClusterState) {
    fn keep<K: Ord + Clone, T>(
        old: &BTreeMap<K, Arc<T>>,
        new: &mut BTreeMap<K, Arc<T>>,
        rv: impl Fn(&T) -> Option<&str>,
    ) {
        if old.is_empty() {
            return;
        }
        for (key, object) in new.iter_mut() {
            if let Some(previous) = old.get(key) {
                if rv(previous).is_some() && rv(previous) == rv(object) {
                    *object = previous.clone();
                }
            }
        }
    }
    fn meta_rv(m: &ObjectMeta) -> Option<&str> {
        m.resource_version.as_deref()
    }
    fn rv(v: &Option<Box<str>>) -> Option<&str> {
        v.as_deref()
    }
    match kind {
        Kind::Service => {
            keep(&state.services, listed.services.make_mut(), |o| {
                meta_rv(&o.metadata)
            });
            state.services = listed.services;
        }
        Kind::EndpointSlice => {
            keep(
                &state.endpoint_slices,
                listed.endpoint_slices.make_mut(),
                |o| rv(&o.resource_version),
            );
            state.endpoint_slices = listed.endpoint_slices;
        }
        Kind::Pod => {
            keep(&state.pods, listed.pods.make_mut(), |o| {
                rv(&o.resource_version)
            });
            state.pods = listed.pods;
        }
        Kind::Namespace => {
            keep(&state.namespaces, listed.namespaces.make_mut(), |o| {
                meta_rv(&o.metadata)
            });
            state.namespaces = listed.namespaces;
        }
        Kind::Node => {
            keep(&state.nodes, listed.nodes.make_mut(), |o| {
                o.resource_version.as_deref()
            });
            state.nodes = listed.nodes;
        }
        Kind::NetworkPolicy => {
            keep(
                &state.network_policies,
                listed.network_policies.make_mut(),
                |o| meta_rv(&o.metadata),
            );
            state.network_policies = listed.network_policies;
        }
        Kind::CiliumNetworkPolicy | Kind::CiliumClusterwideNetworkPolicy => {
            // Both Cilium kinds share one map: replace only this kind's part.
            let name = kind.name();
            keep(
                &state.cilium_policies,
                listed.cilium_policies.make_mut(),
                |p| p.object["metadata"]["resourceVersion"].as_str(),
            );
            let all = state.cilium_policies.make_mut();
            all.retain(|(k, _), _| k != name);
            all.extend(
                listed
                    .cilium_policies
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone())),
            );
        }
    }
}

/// What no compiler reads and can be large: `managedFields` (most of an
/// object's bytes) and kubectl's copy of the whole last-applied object.
fn trim_meta(meta: &mut ObjectMeta) {
    meta.managed_fields = None;
    if let Some(annotations) = &mut meta.annotations {
        annotations.remove("kubectl.kubernetes.io/last-applied-configuration");
        if annotations.is_empty() {
            meta.annotations = None;
        }
    }
}

/// A Service keeps its type, but without the spare capacity its lists were
/// deserialized with (10k Services each carry several such lists).
fn trim_service(mut s: Service) -> Service {
    trim_meta(&mut s.metadata);
    if let Some(spec) = &mut s.spec {
        for list in [
            &mut spec.cluster_ips,
            &mut spec.ip_families,
            &mut spec.external_ips,
            &mut spec.load_balancer_source_ranges,
        ]
        .into_iter()
        .flatten()
        {
            list.shrink_to_fit();
        }
        if let Some(ports) = &mut spec.ports {
            ports.shrink_to_fit();
        }
    }
    s
}

/// A Cilium policy as the policy compiler reads it: the raw object with its
/// `kind` (and, for a namespaced one listed without it, the `default`
/// namespace the API server would have given it). Built once per object
/// version, so unchanged policies keep their `Arc` across snapshots.
fn cilium_policy(kind: Kind, o: DynamicObject) -> Object {
    let DynamicObject {
        types,
        mut metadata,
        data,
    } = o;
    trim_meta(&mut metadata);
    if kind == Kind::CiliumNetworkPolicy && metadata.namespace.is_none() {
        metadata.namespace = Some("default".into());
    }
    let mut object = match data {
        serde_json::Value::Object(map) => map,
        _ => serde_json::Map::new(),
    };
    object.insert(
        "apiVersion".into(),
        types
            .map(|t| t.api_version)
            .unwrap_or_else(|| "cilium.io/v2".into())
            .into(),
    );
    object.insert("kind".into(), kind.name().into());
    object.insert(
        "metadata".into(),
        serde_json::to_value(&metadata).unwrap_or_default(),
    );
    Object::CiliumPolicy(Arc::new(CiliumPolicy {
        kind: kind.name().to_string(),
        object: serde_json::Value::Object(object),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn slice(name: &str, rv: &str, address: &str) -> Object {
        let s: k8s_openapi::api::discovery::v1::EndpointSlice = serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "a", "resourceVersion": rv,
                         "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [address], "hostname": "h",
                           "targetRef": {"kind": "Pod", "name": "p", "namespace": "a"}}]
        }))
        .unwrap();
        Object::endpoint_slice(s)
    }

    fn listed(kind: Kind, objects: Vec<Object>) -> Change {
        let mut state = ClusterState::default();
        for o in objects {
            state.insert(o);
        }
        Change::Listed(kind, state)
    }

    fn list_every_core_kind(agg: &mut Aggregator) {
        for kind in KINDS.iter().filter(|k| !k.is_crd()) {
            agg.apply(listed(*kind, vec![]));
        }
    }

    #[test]
    fn nothing_is_complete_before_every_kind_listed_or_missing() {
        let mut agg = Aggregator::default();
        list_every_core_kind(&mut agg);
        assert!(!agg.complete(), "Cilium kinds neither listed nor missing");
        agg.apply(listed(Kind::CiliumNetworkPolicy, vec![]));
        assert!(!agg.complete());
        // A transient error on a CRD kind is not "missing": still waiting.
        agg.apply(Change::Failed {
            kind: Kind::CiliumClusterwideNetworkPolicy,
            error: "boom".into(),
            missing: false,
        });
        assert!(!agg.complete());
        agg.apply(Change::Failed {
            kind: Kind::CiliumClusterwideNetworkPolicy,
            error: "404".into(),
            missing: true,
        });
        assert!(agg.complete());
        // A missing core kind is never skipped.
        let mut agg = Aggregator::default();
        agg.apply(Change::Failed {
            kind: Kind::Service,
            error: "404".into(),
            missing: true,
        });
        assert!(!agg.complete());
    }

    #[test]
    fn relist_swaps_whole_and_keeps_unchanged_objects_shared() {
        let mut agg = Aggregator::default();
        agg.apply(listed(
            Kind::EndpointSlice,
            vec![slice("s1", "1", "10.0.0.1"), slice("s2", "2", "10.0.0.2")],
        ));
        let before = agg.publish();
        // A re-list (after 410 Gone): s1 unchanged, s2 edited, s3 new.
        agg.apply(listed(
            Kind::EndpointSlice,
            vec![
                slice("s1", "1", "10.0.0.1"),
                slice("s2", "5", "10.0.0.9"),
                slice("s3", "6", "10.0.0.3"),
            ],
        ));
        let after = agg.publish();
        let (b, a) = (&before.state.endpoint_slices, &after.state.endpoint_slices);
        let k = |n: &str| super::super::ObjectKey::new("a", n);
        assert!(Arc::ptr_eq(&b[&k("s1")], &a[&k("s1")]));
        assert!(!Arc::ptr_eq(&b[&k("s2")], &a[&k("s2")]));
        assert_eq!(a.len(), 3);
        // The earlier snapshot is untouched (copy-on-write).
        assert_eq!(b.len(), 2);
        assert_eq!(after.generation, before.generation + 1);
    }

    #[test]
    fn events_change_one_kind_and_share_the_others() {
        let mut agg = Aggregator::default();
        list_every_core_kind(&mut agg);
        agg.apply(listed(
            Kind::EndpointSlice,
            vec![slice("s1", "1", "10.0.0.1")],
        ));
        let first = agg.publish();
        assert!(agg.apply(Change::Applied(slice("s2", "3", "10.0.0.2"))));
        let second = agg.publish();
        assert!(second.state.services.same_map(&first.state.services));
        assert!(!second
            .state
            .endpoint_slices
            .same_map(&first.state.endpoint_slices));
        assert_eq!(first.state.endpoint_slices.len(), 1);
        assert_eq!(second.state.endpoint_slices.len(), 2);
        assert!(agg.apply(Change::Deleted(slice("s1", "4", "10.0.0.1"))));
        assert!(!agg.apply(Change::Deleted(slice("gone", "5", "10.0.0.1"))));
        assert_eq!(agg.publish().state.endpoint_slices.len(), 1);
    }

    #[test]
    fn errors_are_reported_until_the_kind_lists_again() {
        let mut agg = Aggregator::default();
        list_every_core_kind(&mut agg);
        agg.apply(Change::Failed {
            kind: Kind::Pod,
            error: "Pod watch: connection reset".into(),
            missing: false,
        });
        assert!(agg.errors_changed);
        assert_eq!(agg.publish().errors, vec!["Pod watch: connection reset"]);
        agg.apply(listed(Kind::Pod, vec![]));
        assert!(agg.errors_changed);
        assert!(agg.publish().errors.is_empty());
    }

    #[test]
    fn trimming_drops_what_no_compiler_reads() {
        let mut meta: ObjectMeta = serde_json::from_value(json!({
            "name": "p", "namespace": "a",
            "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}", "keep": "me"},
            "managedFields": [{"manager": "kubectl"}]
        }))
        .unwrap();
        trim_meta(&mut meta);
        assert!(meta.managed_fields.is_none());
        let annotations = meta.annotations.as_ref().unwrap();
        assert_eq!(annotations.len(), 1);
        assert_eq!(annotations["keep"], "me");
    }

    #[test]
    fn cilium_policies_carry_kind_and_default_namespace() {
        let o: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
            "metadata": {"name": "p", "resourceVersion": "7"},
            "spec": {"endpointSelector": {}}
        }))
        .unwrap();
        let Object::CiliumPolicy(p) = cilium_policy(Kind::CiliumNetworkPolicy, o) else {
            unreachable!()
        };
        assert_eq!(p.kind, "CiliumNetworkPolicy");
        assert_eq!(p.object["kind"], "CiliumNetworkPolicy");
        assert_eq!(p.object["metadata"]["namespace"], "default");
        assert_eq!(p.object["spec"]["endpointSelector"], json!({}));
        let mut state = ClusterState::default();
        state.insert(Object::CiliumPolicy(p.clone()));
        let ccnp = Arc::new(CiliumPolicy {
            kind: "CiliumClusterwideNetworkPolicy".into(),
            object: json!({"metadata": {"name": "c"}}),
        });
        state.insert(Object::CiliumPolicy(ccnp));
        // A CNP re-list leaves the clusterwide ones alone.
        replace_kind(
            &mut state,
            Kind::CiliumNetworkPolicy,
            ClusterState::default(),
        );
        assert_eq!(state.cilium_policies.len(), 1);
        assert!(state
            .cilium_policies
            .keys()
            .all(|(k, _)| k == "CiliumClusterwideNetworkPolicy"));
    }
}
