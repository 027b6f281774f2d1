//! The Kubernetes source: one kube-rs watcher + reflector store per kind,
//! aggregated into [`ClusterState`] snapshots.
//!
//! Why the datapath never sees a half-listed cluster: the reflector buffers a
//! (re-)list (`Init` .. `InitApply` .. `InitDone`) and swaps the store only when
//! it is complete, and nothing is published until every required kind has
//! finished its first list. Watch errors (dropped connections, `410 Gone`)
//! back off and resume inside the watcher while the last state stays in force.

use super::watch::SourceUpdate;
use super::{CiliumPolicy, ClusterState, Object};
use anyhow::{Context, Result};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use std::collections::BTreeMap;
use std::fmt::Debug;
use std::hash::Hash;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// Coalesces bursts of events (a re-list, a rollout) into one snapshot.
const DEBOUNCE: Duration = Duration::from_millis(20);

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

/// Per-kind watch problems, newest last; cleared when the kind lists again.
type Problems = Arc<Mutex<BTreeMap<&'static str, String>>>;

struct Stores {
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    pods: Store<Pod>,
    namespaces: Store<Namespace>,
    network_policies: Store<NetworkPolicy>,
    cnps: Store<DynamicObject>,
    ccnps: Store<DynamicObject>,
}

/// Starts every watcher, waits for the first complete list of the core kinds
/// (Cilium CRDs may be absent: they join when they appear), publishes the first
/// snapshot and keeps publishing on change.
pub async fn watch_kubernetes(client: Client) -> Result<watch::Receiver<SourceUpdate>> {
    let (changed_tx, mut changed_rx) = mpsc::unbounded_channel::<()>();
    let problems: Problems = Default::default();
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
    let ctx = (&changed_tx, &problems);
    let stores = Stores {
        services: reflect("Service", Api::all(client.clone()), (), ctx),
        slices: reflect("EndpointSlice", Api::all(client.clone()), (), ctx),
        pods: reflect("Pod", Api::all(client.clone()), (), ctx),
        namespaces: reflect("Namespace", Api::all(client.clone()), (), ctx),
        network_policies: reflect("NetworkPolicy", Api::all(client.clone()), (), ctx),
        cnps: reflect(
            "CiliumNetworkPolicy",
            Api::all_with(client.clone(), &cnp),
            cnp.clone(),
            ctx,
        ),
        ccnps: reflect(
            "CiliumClusterwideNetworkPolicy",
            Api::all_with(client.clone(), &ccnp),
            ccnp.clone(),
            ctx,
        ),
    };
    let wait = async {
        stores.services.wait_until_ready().await?;
        stores.slices.wait_until_ready().await?;
        stores.pods.wait_until_ready().await?;
        stores.namespaces.wait_until_ready().await?;
        stores.network_policies.wait_until_ready().await
    };
    wait.await
        .context("a Kubernetes watcher stopped before its first list")?;
    while changed_rx.try_recv().is_ok() {}

    let (tx, rx) = watch::channel(snapshot(&stores, &problems, 1));
    tokio::spawn(async move {
        let mut generation = 1;
        while changed_rx.recv().await.is_some() {
            tokio::time::sleep(DEBOUNCE).await;
            while changed_rx.try_recv().is_ok() {}
            generation += 1;
            // No deep "did anything change" comparison here: at 10k Services
            // it costs more than the compilers' own no-op detection.
            if tx.send(snapshot(&stores, &problems, generation)).is_err() {
                break;
            }
        }
    });
    Ok(rx)
}

/// Runs one watcher feeding one store; every event and error pings `changed`.
fn reflect<K>(
    kind: &'static str,
    api: Api<K>,
    dyntype: K::DynamicType,
    (changed, problems): (&mpsc::UnboundedSender<()>, &Problems),
) -> Store<K>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Eq + Hash + Clone + Send + Sync,
{
    let writer = reflector::store::Writer::new(dyntype);
    let reader = writer.as_reader();
    let changed = changed.clone();
    let problems = problems.clone();
    let stream = watcher(api, watcher::Config::default())
        .default_backoff()
        // managedFields are most of an object's bytes and catena never reads them.
        .modify(|obj: &mut K| obj.managed_fields_mut().clear())
        .reflect(writer);
    tokio::spawn(async move {
        futures::pin_mut!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => continue,
                Ok(watcher::Event::InitDone) => {
                    problems.lock().unwrap().remove(kind);
                    tracing::debug!(kind, "listed");
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(kind, error = %e, "watch failed; backing off and resuming with the last state");
                    problems
                        .lock()
                        .unwrap()
                        .insert(kind, format!("{kind} watch: {e}"));
                }
            }
            if changed.send(()).is_err() {
                break;
            }
        }
    });
    reader
}

fn snapshot(stores: &Stores, problems: &Problems, generation: u64) -> SourceUpdate {
    let mut state = ClusterState::default();
    // The stores hand out Arcs: the snapshot shares every object with them.
    for s in stores.services.state() {
        state.insert(Object::Service(s));
    }
    for s in stores.slices.state() {
        state.insert(Object::EndpointSlice(s));
    }
    for p in stores.pods.state() {
        state.insert(Object::Pod(p));
    }
    for n in stores.namespaces.state() {
        state.insert(Object::Namespace(n));
    }
    for n in stores.network_policies.state() {
        state.insert(Object::NetworkPolicy(n));
    }
    for (kind, store) in [
        ("CiliumNetworkPolicy", &stores.cnps),
        ("CiliumClusterwideNetworkPolicy", &stores.ccnps),
    ] {
        for p in store.state() {
            let mut object = serde_json::to_value(&*p).unwrap_or_default();
            object["kind"] = kind.into();
            if p.namespace().is_none() && kind == "CiliumNetworkPolicy" {
                object["metadata"]["namespace"] = "default".into();
            }
            state.insert(Object::CiliumPolicy(Arc::new(CiliumPolicy {
                kind: kind.to_string(),
                object,
            })));
        }
    }
    SourceUpdate {
        state: Arc::new(state),
        errors: problems.lock().unwrap().values().cloned().collect(),
        generation,
    }
}
