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
//! - writes an agent makes: `POST .../namespaces/{ns}/events` (core and
//!   `events.k8s.io`) is recorded ([`ApiServer::events`]); `PATCH` (JSON merge
//!   patch) and `PUT` of a Cilium policy's `/status` subresource change only
//!   the stored object's `status` (its `generation` stays, as for a CRD with a
//!   status subresource) and are seen by watchers as MODIFIED.
//!
//! Fault injection for resilience tests: [`ApiServer::compact`] (forces 410s),
//! [`ApiServer::drop_watches`] (cuts every stream mid-way),
//! [`ApiServer::set_unavailable`] (answers 503 to everything),
//! [`ApiServer::fail_event_posts`] and [`ApiServer::fail_status_writes`]
//! (answer a chosen error code to those writes only).

use anyhow::{Context, Result};
use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
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
    /// kind -> (namespace, name) -> (resourceVersion, the object as JSON):
    /// lists are served from here, like a real API server's watch cache,
    /// instead of deep-copying and re-encoding every object per request.
    /// Filled lazily and checked against the stored object's version, so
    /// no write path has to maintain it.
    encoded: HashMap<String, BTreeMap<(String, String), Encoded>>,
    /// Events created through the API, in arrival order.
    events: Vec<Value>,
    /// Answer this code to event POSTs / status writes instead of storing.
    fail_event_posts: Option<u16>,
    fail_status_writes: Option<u16>,
}

/// An object's resourceVersion and its JSON text at that version.
type Encoded = (String, Arc<str>);

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
        if object["metadata"]["uid"].is_null() {
            object["metadata"]["uid"] = json!(format!("uid-{kind}-{namespace}-{name}"));
        }
        let previous = store
            .objects
            .get(&kind)
            .and_then(|m| m.get(&(namespace.clone(), name.clone())));
        // As the real server: generation counts spec edits (everything but
        // metadata and status); a Cilium policy's status belongs to its
        // subresource, so an update without one keeps the stored status.
        let generation = match previous {
            None => 1,
            Some(p) => {
                let g = p["metadata"]["generation"].as_i64().unwrap_or(1);
                if same_spec(p, &object) {
                    g
                } else {
                    g + 1
                }
            }
        };
        object["metadata"]["generation"] = json!(generation);
        if has_status_subresource(&kind) && object.get("status").is_none() {
            if let Some(status) = previous.and_then(|p| p.get("status")).cloned() {
                object["status"] = status;
            }
        }
        Ok(store_object(
            &self.shared,
            &mut store,
            kind,
            namespace,
            name,
            object,
        ))
    }

    /// A stored object (kind, namespace — empty for cluster-scoped —, name).
    pub fn get(&self, kind: &str, namespace: &str, name: &str) -> Option<Value> {
        let store = self.shared.store.lock().unwrap();
        store
            .objects
            .get(kind)?
            .get(&(namespace.to_string(), name.to_string()))
            .cloned()
    }

    /// Events created through the API so far, in arrival order.
    pub fn events(&self) -> Vec<Value> {
        self.shared.store.lock().unwrap().events.clone()
    }

    /// Answers `code` (e.g. 403, 500) to every event POST while set.
    pub fn fail_event_posts(&self, code: Option<u16>) {
        self.shared.store.lock().unwrap().fail_event_posts = code;
    }

    /// Answers `code` to every status subresource write while set.
    pub fn fail_status_writes(&self, code: Option<u16>) {
        self.shared.store.lock().unwrap().fail_status_writes = code;
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

/// Stores `object` under a new resourceVersion and tells watchers.
fn store_object(
    shared: &Shared,
    store: &mut Store,
    kind: String,
    namespace: String,
    name: String,
    mut object: Value,
) -> u64 {
    store.rv += 1;
    let rv = store.rv;
    object["metadata"]["resourceVersion"] = json!(rv.to_string());
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
    let _ = shared.events.send(event);
    rv
}

/// Whether two versions of an object differ only in what
/// `metadata.generation` does not count (metadata and status). Compared in
/// place: the benchmarks apply 100k objects through here.
fn same_spec(a: &Value, b: &Value) -> bool {
    let (Some(ma), Some(mb)) = (a.as_object(), b.as_object()) else {
        return a == b;
    };
    let skip = |k: &String| k == "metadata" || k == "status";
    let len = |m: &serde_json::Map<String, Value>| m.keys().filter(|k| !skip(k)).count();
    len(ma) == len(mb)
        && ma
            .iter()
            .filter(|(k, _)| !skip(k))
            .all(|(k, v)| mb.get(k) == Some(v))
}

fn has_status_subresource(kind: &str) -> bool {
    matches!(
        kind,
        "CiliumNetworkPolicy" | "CiliumClusterwideNetworkPolicy"
    )
}

/// RFC 7386 JSON merge patch.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Some(patch) = patch.as_object() else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    let map = target.as_object_mut().expect("made an object above");
    for (k, v) in patch {
        if v.is_null() {
            map.remove(k);
        } else {
            merge_patch(map.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

/// `POST /api/v1/namespaces/{ns}/events` or the `events.k8s.io/v1` one.
fn create_event(shared: &Shared, path: &str, body: &[u8]) -> Option<Response> {
    let rest = path
        .strip_prefix("/apis/events.k8s.io/v1/namespaces/")
        .or_else(|| path.strip_prefix("/api/v1/namespaces/"))?;
    let (namespace, tail) = rest.split_once('/')?;
    if tail != "events" {
        return None;
    }
    let mut store = shared.store.lock().unwrap();
    if let Some(code) = store.fail_event_posts {
        return Some(injected_failure(code));
    }
    let mut event: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => {
            return Some(answer(
                StatusCode::BAD_REQUEST,
                status(400, "BadRequest", &format!("event body: {e}")),
            ))
        }
    };
    if event["metadata"]["namespace"].as_str().unwrap_or(namespace) != namespace {
        return Some(answer(
            StatusCode::BAD_REQUEST,
            status(
                400,
                "BadRequest",
                "the namespace of the object does not match the namespace on the request",
            ),
        ));
    }
    store.rv += 1;
    event["metadata"]["namespace"] = json!(namespace);
    event["metadata"]["resourceVersion"] = json!(store.rv.to_string());
    event["metadata"]["uid"] = json!(format!("uid-event-{}", store.rv));
    store.events.push(event.clone());
    Some(answer(StatusCode::CREATED, event))
}

/// `PATCH`/`PUT` of `.../{ciliumnetworkpolicies|ciliumclusterwidenetworkpolicies}/{name}/status`.
fn write_status(
    shared: &Shared,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Option<Response> {
    let rest = path.strip_prefix("/apis/cilium.io/v2/")?;
    let rest = rest.strip_suffix("/status")?;
    let (kind, namespace, name) = match rest.split('/').collect::<Vec<_>>()[..] {
        ["namespaces", ns, "ciliumnetworkpolicies", name] => ("CiliumNetworkPolicy", ns, name),
        ["ciliumclusterwidenetworkpolicies", name] => ("CiliumClusterwideNetworkPolicy", "", name),
        _ => return None,
    };
    let mut store = shared.store.lock().unwrap();
    if let Some(code) = store.fail_status_writes {
        return Some(injected_failure(code));
    }
    let key = (namespace.to_string(), name.to_string());
    let Some(mut object) = store.objects.get(kind).and_then(|m| m.get(&key)).cloned() else {
        return Some(answer(
            StatusCode::NOT_FOUND,
            status(
                404,
                "NotFound",
                &format!("{kind} {namespace}/{name} not found"),
            ),
        ));
    };
    let body: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => {
            return Some(answer(
                StatusCode::BAD_REQUEST,
                status(400, "BadRequest", &format!("status body: {e}")),
            ))
        }
    };
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let new_status = match *method {
        // Only the status of the body counts on the status subresource.
        Method::PUT => body.get("status").cloned().unwrap_or(Value::Null),
        Method::PATCH if content_type.starts_with("application/merge-patch+json") => {
            let mut status = object.get("status").cloned().unwrap_or(json!({}));
            merge_patch(&mut status, body.get("status").unwrap_or(&Value::Null));
            status
        }
        Method::PATCH => {
            return Some(answer(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                status(
                    415,
                    "UnsupportedMediaType",
                    &format!("patch type {content_type:?} not supported here"),
                ),
            ))
        }
        _ => return None,
    };
    object["status"] = new_status;
    store_object(
        shared,
        &mut store,
        kind.to_string(),
        key.0,
        key.1,
        object.clone(),
    );
    let stored = store.objects[kind][&(namespace.to_string(), name.to_string())].clone();
    Some(answer(StatusCode::OK, stored))
}

fn injected_failure(code: u16) -> Response {
    let code = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let reason = match code {
        StatusCode::FORBIDDEN => "Forbidden",
        StatusCode::TOO_MANY_REQUESTS => "TooManyRequests",
        _ => "InternalError",
    };
    answer(
        code,
        status(code.as_u16(), reason, "injected failure (test API server)"),
    )
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
    method: Method,
    uri: Uri,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().trim_end_matches('/');
    {
        let mut store = shared.store.lock().unwrap();
        store.requests.push(format!("{method} {uri}"));
        if store.unavailable {
            return answer(
                StatusCode::SERVICE_UNAVAILABLE,
                status(503, "ServiceUnavailable", "test server unavailable"),
            );
        }
    }
    if method != Method::GET {
        let written = match method {
            Method::POST => create_event(&shared, path, &body),
            Method::PATCH | Method::PUT => write_status(&shared, &method, path, &headers, &body),
            _ => None,
        };
        return written.unwrap_or_else(|| {
            answer(
                StatusCode::METHOD_NOT_ALLOWED,
                status(
                    405,
                    "MethodNotAllowed",
                    &format!("{method} {path} is not served here"),
                ),
            )
        });
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
    let mut guard = shared.store.lock().unwrap();
    let store = &mut *guard;
    let empty = BTreeMap::new();
    let objects = store.objects.get(kind).unwrap_or(&empty);
    let offset: usize = query
        .get("continue")
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let limit: usize = query
        .get("limit")
        .and_then(|l| l.parse().ok())
        .filter(|l| *l > 0)
        .unwrap_or(usize::MAX);
    let total = objects.len();
    let end = offset.saturating_add(limit).min(total);
    let mut metadata = json!({"resourceVersion": store.rv.to_string()});
    if end < total {
        metadata["continue"] = json!(end.to_string());
        metadata["remainingItemCount"] = json!(total - end);
    }
    let mut body = format!(
        r#"{{"kind":{},"apiVersion":{},"metadata":{},"items":["#,
        json!(format!("{kind}List")),
        json!(api_version),
        metadata
    );
    let cache = store.encoded.entry(kind.to_string()).or_default();
    for (n, (key, object)) in objects
        .iter()
        .skip(offset.min(total))
        .take(end.saturating_sub(offset))
        .enumerate()
    {
        let version = object["metadata"]["resourceVersion"]
            .as_str()
            .unwrap_or_default();
        let encoded = match cache.get(key) {
            Some((v, text)) if v == version => text.clone(),
            _ => {
                let text: Arc<str> = object.to_string().into();
                cache.insert(key.clone(), (version.to_string(), text.clone()));
                text
            }
        };
        if n > 0 {
            body.push(',');
        }
        body.push_str(&encoded);
    }
    body.push_str("]}");
    (StatusCode::OK, [("content-type", "application/json")], body).into_response()
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
