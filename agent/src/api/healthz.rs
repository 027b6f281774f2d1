//! kube-proxy's health endpoint (`GET /healthz`, port 10256 by convention):
//! cloud load balancers probe it to decide whether a node can take traffic
//! for `externalTrafficPolicy: Cluster` services, so a kube-proxy replacement
//! must answer it the same way.

use crate::core::AgentCore;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::SystemTime;

pub async fn serve(listener: tokio::net::TcpListener, core: Arc<AgentCore>) {
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/livez", get(healthz))
        .with_state((core, SystemTime::now()));
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "kube-proxy health endpoint stopped");
    }
}

/// 200 once the datapath is programmed, 503 before; the body has kube-proxy's
/// fields (`lastUpdated`, `currentTime`, `nodeHealthy`).
async fn healthz(
    State((core, started)): State<(Arc<AgentCore>, SystemTime)>,
) -> (StatusCode, Json<Value>) {
    let now = SystemTime::now();
    let ready = core.is_ready();
    let stamp = |t: SystemTime| humantime::format_rfc3339_seconds(t).to_string();
    let body = json!({
        "lastUpdated": stamp(if ready { core.last_programmed().unwrap_or(started) } else { started }),
        "currentTime": stamp(now),
        "nodeHealthy": ready,
    });
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body))
}
