//! Health-check node ports (`spec.healthCheckNodePort` of Services with
//! `externalTrafficPolicy: Local`): a cloud load balancer probes this port on
//! every node and sends the Service's traffic only to nodes answering 200,
//! i.e. nodes with a local endpoint. The answer is kube-proxy's, byte for
//! byte in its fields, on any path:
//! `{"service":{"namespace":..,"name":..},"localEndpoints":N,"serviceProxyHealthy":true}`,
//! 200 when N > 0, 503 otherwise.
//!
//! One listener per port, opened and closed as Services come and go
//! (`HealthServers::reconcile`). The counts are swapped in place, so a
//! listener outlives changes of its Service's endpoints.

use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use serde_json::json;
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, RwLock};

/// What one health-check node port reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub port: u16,
    pub namespace: String,
    pub name: String,
    /// Endpoints of the Service on this node.
    pub local_endpoints: usize,
}

type Shared = Arc<RwLock<HealthCheck>>;

struct Listener {
    state: Shared,
    task: tokio::task::JoinHandle<()>,
}

/// The open health-check listeners.
pub struct HealthServers {
    bind: IpAddr,
    listeners: BTreeMap<u16, Listener>,
}

impl Default for HealthServers {
    fn default() -> Self {
        HealthServers {
            bind: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            listeners: BTreeMap::new(),
        }
    }
}

impl HealthServers {
    /// Opens listeners for new ports, updates the others' counts and closes
    /// those no Service wants any more. A port that cannot be bound (in use)
    /// is logged and tried again on the next call.
    pub async fn reconcile(&mut self, checks: Vec<HealthCheck>) {
        let wanted: BTreeMap<u16, HealthCheck> = checks.into_iter().map(|c| (c.port, c)).collect();
        self.listeners.retain(|port, l| {
            let keep = wanted.contains_key(port);
            if !keep {
                l.task.abort();
                tracing::info!(port, "health-check node port closed");
            }
            keep
        });
        for (port, check) in wanted {
            if let Some(l) = self.listeners.get(&port) {
                let mut state = l.state.write().unwrap_or_else(|p| p.into_inner());
                if *state != check {
                    *state = check;
                }
                continue;
            }
            let addr = SocketAddr::new(self.bind, port);
            let listener = match tokio::net::TcpListener::bind(addr).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(%addr, service = %format!("{}/{}", check.namespace, check.name), error = %e, "cannot open health-check node port; retrying later");
                    continue;
                }
            };
            tracing::info!(%addr, service = %format!("{}/{}", check.namespace, check.name), "health-check node port open");
            let state: Shared = Arc::new(RwLock::new(check));
            let app = Router::new().fallback(answer).with_state(state.clone());
            let task = tokio::spawn(async move {
                if let Err(e) = axum::serve(listener, app).await {
                    tracing::error!(port, error = %e, "health-check node port stopped");
                }
            });
            self.listeners.insert(port, Listener { state, task });
        }
    }

    /// Ports currently served.
    pub fn ports(&self) -> Vec<u16> {
        self.listeners.keys().copied().collect()
    }
}

impl Drop for HealthServers {
    fn drop(&mut self) {
        for l in self.listeners.values() {
            l.task.abort();
        }
    }
}

async fn answer(State(state): State<Shared>) -> Response {
    let check = state.read().unwrap_or_else(|p| p.into_inner()).clone();
    body(&check)
}

/// kube-proxy's answer for one Service.
fn body(check: &HealthCheck) -> Response {
    let json = json!({
        "service": { "namespace": check.namespace, "name": check.name },
        "localEndpoints": check.local_endpoints,
        "serviceProxyHealthy": true,
    });
    let code = if check.local_endpoints > 0 {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut resp = (code, json.to_string()).into_response();
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(
        "X-Content-Type-Options",
        HeaderValue::from_static("nosniff"),
    );
    // kube-proxy advertises the local endpoint count as a weight hint.
    if let Ok(v) = HeaderValue::from_str(&check.local_endpoints.to_string()) {
        headers.insert("X-Load-Balancing-Endpoint-Weight", v);
    }
    resp
}
