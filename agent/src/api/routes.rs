use crate::core::{AgentCore, AgentError};
use crate::model::endpoints::EndpointKey;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use catena_api::{ApiError, EndpointSpec, GcRequest, Health};
use std::sync::Arc;

type Core = State<Arc<AgentCore>>;

pub fn router(core: Arc<AgentCore>) -> Router {
    Router::new()
        .route("/v1/healthz", get(healthz))
        .route("/v1/status", get(status))
        .route("/v1/services", get(services))
        .route("/v1/endpoints", get(list_endpoints))
        .route("/v1/endpoints/gc", post(gc))
        .route(
            "/v1/endpoints/{container_id}/{ifname}",
            get(get_endpoint).put(put_endpoint).delete(delete_endpoint),
        )
        .route(
            "/v1/endpoints/{container_id}/{ifname}/check",
            get(check_endpoint),
        )
        .route(
            "/v1/endpoints/{container_id}/{ifname}/policy",
            get(endpoint_policy),
        )
        .route("/v1/identities", get(identities))
        .with_state(core)
}

impl IntoResponse for AgentError {
    fn into_response(self) -> Response {
        let (status, retryable) = match &self {
            AgentError::NotReady(_) => (StatusCode::SERVICE_UNAVAILABLE, true),
            AgentError::BadRequest(_) => (StatusCode::BAD_REQUEST, false),
            AgentError::NotFound(_) => (StatusCode::NOT_FOUND, false),
            AgentError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, false),
        };
        let message = match &self {
            AgentError::Internal(e) => format!("{e:#}"),
            other => other.to_string(),
        };
        (status, Json(ApiError { message, retryable })).into_response()
    }
}

/// Runs a blocking core operation off the async workers.
async fn run<T: Send + 'static>(
    core: Arc<AgentCore>,
    f: impl FnOnce(&AgentCore) -> Result<T, AgentError> + Send + 'static,
) -> Result<T, AgentError> {
    tokio::task::spawn_blocking(move || f(&core))
        .await
        .map_err(|e| AgentError::Internal(anyhow::anyhow!("agent task failed: {e}")))?
}

async fn healthz(State(core): Core) -> (StatusCode, Json<Health>) {
    let ready = core.is_ready();
    let health = Health {
        ready,
        reason: (!ready).then(|| "restoring state and syncing the source".to_string()),
    };
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(health))
}

async fn status(State(core): Core) -> impl IntoResponse {
    Json(
        run(core, |c| Ok(c.status()))
            .await
            .expect("status never fails"),
    )
}

async fn services(State(core): Core) -> Result<impl IntoResponse, AgentError> {
    Ok(Json(run(core, |c| c.services()).await?))
}

async fn list_endpoints(State(core): Core) -> Result<impl IntoResponse, AgentError> {
    Ok(Json(run(core, |c| c.endpoints()).await?))
}

async fn get_endpoint(
    State(core): Core,
    Path(key): Path<(String, String)>,
) -> Result<impl IntoResponse, AgentError> {
    let key = endpoint_key(key);
    Ok(Json(run(core, move |c| c.endpoint(&key)).await?))
}

async fn put_endpoint(
    State(core): Core,
    Path(key): Path<(String, String)>,
    Json(spec): Json<EndpointSpec>,
) -> Result<impl IntoResponse, AgentError> {
    let key = endpoint_key(key);
    if spec.container_id != key.container_id || spec.ifname != key.ifname {
        return Err(AgentError::BadRequest(
            "body does not match the endpoint path".into(),
        ));
    }
    Ok(Json(run(core, move |c| c.add_endpoint(spec)).await?))
}

async fn delete_endpoint(
    State(core): Core,
    Path(key): Path<(String, String)>,
) -> Result<StatusCode, AgentError> {
    let key = endpoint_key(key);
    run(core, move |c| c.delete_endpoint(&key)).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn check_endpoint(
    State(core): Core,
    Path(key): Path<(String, String)>,
) -> Result<impl IntoResponse, AgentError> {
    let key = endpoint_key(key);
    Ok(Json(run(core, move |c| c.check_endpoint(&key)).await?))
}

async fn endpoint_policy(
    State(core): Core,
    Path(key): Path<(String, String)>,
) -> Result<impl IntoResponse, AgentError> {
    let key = endpoint_key(key);
    Ok(Json(run(core, move |c| c.endpoint_policy(&key)).await?))
}

async fn identities(State(core): Core) -> Result<impl IntoResponse, AgentError> {
    Ok(Json(run(core, |c| c.identities()).await?))
}

async fn gc(
    State(core): Core,
    Json(req): Json<GcRequest>,
) -> Result<impl IntoResponse, AgentError> {
    Ok(Json(
        run(core, move |c| c.gc(&req.network, &req.valid_attachments)).await?,
    ))
}

fn endpoint_key((container_id, ifname): (String, String)) -> EndpointKey {
    EndpointKey {
        container_id,
        ifname,
    }
}
