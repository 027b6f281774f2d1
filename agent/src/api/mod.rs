//! The agent API: HTTP/JSON on a unix socket (mode 0600), routes as documented
//! in `catena_api`.

pub mod healthz;
mod routes;

use crate::core::AgentCore;
use anyhow::{bail, Context, Result};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use tokio::net::UnixListener;

/// Binds the socket, refusing to steal it from a live agent and replacing a
/// stale one left by a crash.
pub fn bind(path: &Path) -> Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!("another catena-agent is already serving {}", path.display());
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing stale socket {}", path.display()))?;
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod 0600 {}", path.display()))?;
    Ok(listener)
}

pub async fn serve(
    listener: UnixListener,
    core: Arc<AgentCore>,
    ops: Arc<crate::ops::Ops>,
) -> Result<()> {
    let app = routes::router(core)
        .merge(crate::ops::router(ops))
        .layer(axum::middleware::from_fn(crate::ops::track_cni));
    axum::serve(listener, app)
        .await
        .context("agent API server stopped")
}
