//! A Kubernetes API server for tests: no Kubernetes API server can be installed
//! on these machines, so this one speaks the part of the wire protocol that
//! kube-rs's watcher (and kubectl get) use, for real, over HTTP on loopback:
//!
//! - list: `GET /api/v1/services?limit=N&continue=T` answering a `...List` with
//!   `metadata.resourceVersion` (and `continue` while pages remain);
//! - watch: `GET ...?watch=true&resourceVersion=N&timeoutSeconds=S` streamed as
//!   chunked newline-delimited events (ADDED, MODIFIED, DELETED, BOOKMARK);
//!   a resourceVersion older than the compaction point gets an ERROR event
//!   carrying a `410 Gone` Status, after which clients re-list.
//!
//! Fault injection for resilience tests: [`ApiServer::compact`] (forces 410s),
//! [`ApiServer::drop_watches`] (cuts every stream mid-way),
//! [`ApiServer::set_unavailable`] (answers 503 to everything).

use anyhow::{Context, Result};
use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{broadcast, oneshot};

/// The resources the server knows: URL path -> (kind, namespaced).
const RESOURCES: &[(&str, &str, &str, bool)] = &[
    ("/api/v1/services", "v1", "Service", true),
    ("/api/v1/pods", "v1", "Pod", true),
    ("/api/v1/namespaces", "v1", "Namespace", false),
    ("/api/v1/nodes", "v1", "Node", false),
    (
        "/apis/discovery.k8s.io/v1/endpointslices",
        "discovery.k8s.io/v1",
        "EndpointSlice",
        true,
    ),
    (
        "/apis/networking.k8s.io/v1/networkpolicies",
        "networking.k8s.io/v1",
        "NetworkPolicy",
        true,
    ),
    (
        "/apis/cilium.io/v2/ciliumnetworkpolicies",
        "cilium.io/v2",
        "CiliumNetworkPolicy",
        true,
    ),
    (
        "/apis/cilium.io/v2/ciliumclusterwidenetworkpolicies",
        "cilium.io/v2",
        "CiliumClusterwideNetworkPolicy",
        false,
    ),
];

#[derive(Clone, Debug)]
struct WatchEvent {
    rv: u64,
    kind: String,
    kind_type: &'static str,
    object: Value,
}

#[derive(Default)]
struct Store {
    rv: u64,
    /// kind -> (namespace, name) -> object (with its resourceVersion set).
    objects: HashMap<String, BTreeMap<(String, String), Value>>,
    history: Vec<WatchEvent>,
    /// Watches from a resourceVersion below this get 410 Gone.
    compacted: u64,
    unavailable: bool,
    /// Kinds answered with 404 (a CRD that is not installed).
    missing_kinds: Vec<String>,
    requests: Vec<String>,
    /// How many watches were answered with 410 Gone.
    gone_sent: usize,
}

struct Shared {
    store: Mutex<Store>,
    events: broadcast::Sender<WatchEvent>,
    /// Bumped to cut every open watch stream.
    cut: tokio::sync::watch::Sender<u64>,
}

/// A running test API server on 127.0.0.1. Stops on Drop.
pub struct ApiServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ApiServer {
    /// Listens on 127.0.0.1 of the test process's own network namespace.
    pub fn start() -> Result<ApiServer> {
        Self::start_inner(None)
    }

    /// Listens on 127.0.0.1 inside `netns` (e.g. a lab node, where the agent
    /// runs: loopback is per namespace).
    pub fn start_in(netns: &crate::Netns) -> Result<ApiServer> {
        Self::start_inner(Some(netns.path().to_path_buf()))
    }

    fn start_inner(netns: Option<PathBuf>) -> Result<ApiServer> {
        let (events, _) = broadcast::channel(65536);
        let (cut, _) = tokio::sync::watch::channel(0);
        let shared = Arc::new(Shared {
            store: Mutex::new(Store {
                rv: 1,
                ..Default::default()
            }),
            events,
            cut,
        });
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let state = shared.clone();
        let thread = std::thread::Builder::new()
            .name("test-apiserver".into())
            .spawn(move || {
                // Enter the namespace before the runtime exists: its worker
                // threads inherit it, and the listener is created in it.
                if let Some(path) = netns {
                    let entered = std::fs::File::open(&path).and_then(|f| {
                        nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET)
                            .map_err(std::io::Error::from)
                    });
                    if let Err(e) = entered {
                        let _ = addr_tx.send(Err(e));
                        return;
                    }
                }
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("apiserver runtime");
                rt.block_on(async move {
                    let listener = match tokio::net::TcpListener::bind("127.0.0.1:0").await {
                        Ok(l) => l,
                        Err(e) => {
                            let _ = addr_tx.send(Err(e));
                            return;
                        }
                    };
                    let _ = addr_tx.send(listener.local_addr());
                    let app = Router::new().fallback(handle).with_state(state);
                    let _ = axum::serve(listener, app)
                        .with_graceful_shutdown(async {
                            let _ = stop_rx.await;
                        })
                        .await;
                });
            })
            .context("starting the test API server thread")?;
        let addr = addr_rx
            .recv()
            .context("test API server thread died")?
            .context("binding the test API server")?;
        Ok(ApiServer {
            addr,
            shared,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Writes a kubeconfig pointing at this server (plain HTTP, no auth).
    pub fn write_kubeconfig(&self, dir: &Path) -> Result<PathBuf> {
        let path = dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: test\ncurrent-context: test\nusers:\n- name: test\n  user: {{}}\n",
            self.url()
        );
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }

    /// Creates or replaces an object (ADDED or MODIFIED for watchers).
    pub fn apply(&self, mut object: Value) -> Result<u64> {
        let kind = object["kind"]
            .as_str()
            .context("object without kind")?
            .to_string();
        let (_, _, _, namespaced) = resource_by_kind(&kind)?;
        let name = object["metadata"]["name"]
            .as_str()
            .context("object without metadata.name")?
            .to_string();
        let namespace = if namespaced {
            let ns = object["metadata"]["namespace"]
                .as_str()
                .unwrap_or("default")
                .to_string();
            object["metadata"]["namespace"] = json!(ns);
            ns
        } else {
            String::new()
        };
        let mut store = self.shared.store.lock().unwrap();
        store.rv += 1;
        let rv = store.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        if object["metadata"]["uid"].is_null() {
            object["metadata"]["uid"] = json!(format!("uid-{kind}-{namespace}-{name}"));
        }
        let previous = store
            .objects
            .entry(kind.clone())
            .or_default()
            .insert((namespace, name), object.clone());
        let event = WatchEvent {
            rv,
            kind,
            kind_type: if previous.is_some() {
                "MODIFIED"
            } else {
                "ADDED"
            },
            object,
        };
        store.history.push(event.clone());
        let _ = self.shared.events.send(event);
        Ok(rv)
    }

    /// Deletes an object (DELETED for watchers). Missing objects are fine.
    pub fn delete(&self, kind: &str, namespace: &str, name: &str) -> Result<()> {
        let (_, _, _, namespaced) = resource_by_kind(kind)?;
        let ns = if namespaced {
            namespace.to_string()
        } else {
            String::new()
        };
        let mut store = self.shared.store.lock().unwrap();
        let Some(mut object) = store
            .objects
            .get_mut(kind)
            .and_then(|m| m.remove(&(ns, name.to_string())))
        else {
            return Ok(());
        };
        store.rv += 1;
        let rv = store.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        let event = WatchEvent {
            rv,
            kind: kind.to_string(),
            kind_type: "DELETED",
            object,
        };
        store.history.push(event.clone());
        let _ = self.shared.events.send(event);
        Ok(())
    }

    /// Forgets history: every watch resuming from before now gets 410 Gone.
    pub fn compact(&self) {
        let mut store = self.shared.store.lock().unwrap();
        store.compacted = store.rv;
        store.history.clear();
    }

    /// Cuts every open watch stream mid-way (a dropped connection).
    pub fn drop_watches(&self) {
        self.shared.cut.send_modify(|n| *n += 1);
    }

    /// Answers 503 to every request while set.
    pub fn set_unavailable(&self, unavailable: bool) {
        self.shared.store.lock().unwrap().unavailable = unavailable;
        if unavailable {
            self.drop_watches();
        }
    }

    /// Answers 404 for a kind, as for a CRD that is not installed.
    pub fn set_missing(&self, kind: &str, missing: bool) {
        let mut store = self.shared.store.lock().unwrap();
        store.missing_kinds.retain(|k| k != kind);
        if missing {
            store.missing_kinds.push(kind.to_string());
        }
    }

    /// Request lines seen so far (`GET /api/v1/services?...`).
    pub fn requests(&self) -> Vec<String> {
        self.shared.store.lock().unwrap().requests.clone()
    }

    /// How many watches were answered with `410 Gone`.
    pub fn gone_answers(&self) -> usize {
        self.shared.store.lock().unwrap().gone_sent
    }

    pub fn resource_version(&self) -> u64 {
        self.shared.store.lock().unwrap().rv
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.drop_watches();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn resource_by_kind(kind: &str) -> Result<(&'static str, &'static str, &'static str, bool)> {
    RESOURCES
        .iter()
        .find(|r| r.2 == kind)
        .copied()
        .with_context(|| format!("the test API server does not serve {kind}"))
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

fn answer(code: StatusCode, body: Value) -> Response {
    (
        code,
        [("content-type", "application/json")],
        body.to_string(),
    )
        .into_response()
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    uri: Uri,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let path = uri.path().trim_end_matches('/');
    {
        let mut store = shared.store.lock().unwrap();
        store.requests.push(format!("GET {uri}"));
        if store.unavailable {
            return answer(
                StatusCode::SERVICE_UNAVAILABLE,
                status(503, "ServiceUnavailable", "test server unavailable"),
            );
        }
    }
    let Some(&(_, api_version, kind, _)) = RESOURCES.iter().find(|r| r.0 == path) else {
        return answer(
            StatusCode::NOT_FOUND,
            status(404, "NotFound", &format!("no resource at {path}")),
        );
    };
    if shared
        .store
        .lock()
        .unwrap()
        .missing_kinds
        .iter()
        .any(|k| k == kind)
    {
        return answer(
            StatusCode::NOT_FOUND,
            status(
                404,
                "NotFound",
                "the server could not find the requested resource",
            ),
        );
    }
    let watch = matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
    if watch {
        watch_response(shared, api_version, kind, &query)
    } else {
        list_response(&shared, api_version, kind, &query)
    }
}

fn list_response(
    shared: &Shared,
    api_version: &str,
    kind: &str,
    query: &HashMap<String, String>,
) -> Response {
    let store = shared.store.lock().unwrap();
    let all: Vec<&Value> = store
        .objects
        .get(kind)
        .map(|m| m.values().collect())
        .unwrap_or_default();
    let offset: usize = query
        .get("continue")
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let limit: usize = query
        .get("limit")
        .and_then(|l| l.parse().ok())
        .filter(|l| *l > 0)
        .unwrap_or(usize::MAX);
    let end = offset.saturating_add(limit).min(all.len());
    let items: Vec<Value> = all[offset.min(all.len())..end]
        .iter()
        .map(|o| (*o).clone())
        .collect();
    let mut metadata = json!({"resourceVersion": store.rv.to_string()});
    if end < all.len() {
        metadata["continue"] = json!(end.to_string());
        metadata["remainingItemCount"] = json!(all.len() - end);
    }
    answer(
        StatusCode::OK,
        json!({"kind": format!("{kind}List"), "apiVersion": api_version, "metadata": metadata, "items": items}),
    )
}

fn watch_response(
    shared: Arc<Shared>,
    _api_version: &str,
    kind: &str,
    query: &HashMap<String, String>,
) -> Response {
    let from: u64 = query
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|t| t.parse().ok())
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(290));
    let bookmarks = query
        .get("allowWatchBookmarks")
        .is_some_and(|v| v == "true");
    let kind = kind.to_string();
    // Subscribe before reading history so no event falls between the two.
    let mut live = shared.events.subscribe();
    let mut cut = shared.cut.subscribe();
    let (backlog, gone) = {
        let mut store = shared.store.lock().unwrap();
        let gone = from < store.compacted;
        if gone {
            store.gone_sent += 1;
        }
        let backlog: Vec<WatchEvent> = store
            .history
            .iter()
            .filter(|e| e.kind == kind && e.rv > from)
            .cloned()
            .collect();
        (backlog, gone)
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<String, std::io::Error>>(1024);
    tokio::spawn(async move {
        let line = |t: &str, o: &Value| format!("{}\n", json!({"type": t, "object": o}));
        if gone {
            let s = status(410, "Expired", &format!("too old resource version: {from}"));
            let _ = tx.send(Ok(line("ERROR", &s))).await;
            return;
        }
        let mut last = from;
        for e in backlog {
            last = e.rv;
            if tx.send(Ok(line(e.kind_type, &e.object))).await.is_err() {
                return;
            }
        }
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = &mut deadline => return,
                _ = cut.changed() => return, // dropped connection: no final chunk
                _ = tick.tick(), if bookmarks => {
                    let bm = json!({"kind": kind, "apiVersion": "v1", "metadata": {"resourceVersion": last.to_string()}});
                    if tx.send(Ok(line("BOOKMARK", &bm))).await.is_err() { return; }
                }
                ev = live.recv() => match ev {
                    Ok(e) if e.kind == kind && e.rv > last => {
                        last = e.rv;
                        if tx.send(Ok(line(e.kind_type, &e.object))).await.is_err() { return; }
                    }
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        let s = status(410, "Expired", "watch fell behind");
                        let _ = tx.send(Ok(line("ERROR", &s))).await;
                        return;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        }
    });
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(Body::from_stream(stream))
        .expect("valid response")
}
