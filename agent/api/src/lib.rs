//! The agent API spoken over `/run/catena/agent.sock` (HTTP/1.1 + JSON).
//!
//! Routes (all JSON):
//! - `GET    /v1/healthz`                         -> [`Health`]
//! - `GET    /v1/status`                          -> [`Status`]
//! - `PUT    /v1/endpoints/{container_id}/{ifname}` body [`EndpointSpec`] -> [`Endpoint`]
//!   (returns once the endpoint's maps are written and programs attached)
//! - `DELETE /v1/endpoints/{container_id}/{ifname}` -> 204 (idempotent)
//! - `GET    /v1/endpoints`                       -> `Vec<Endpoint>`
//! - `GET    /v1/endpoints/{container_id}/{ifname}` -> [`Endpoint`]
//! - `GET    /v1/endpoints/{container_id}/{ifname}/check` -> [`EndpointCheck`]
//! - `POST   /v1/endpoints/gc` body [`GcRequest`]  -> [`GcResult`]
//! - `GET    /v1/services`                        -> `Vec<ServiceStatus>`
//! - `GET    /v1/endpoints/{container_id}/{ifname}/policy` -> [`EndpointPolicyStatus`]
//! - `GET    /v1/identities`                      -> `Vec<IdentityInfo>`
//!
//! Errors are answered with a non-2xx status and an [`ApiError`] body.

pub mod client;
mod types;

pub use client::{Client, ClientError, LineStream, StreamItem};
pub use types::*;

/// Default agent socket path.
pub const DEFAULT_SOCKET: &str = "/run/catena/agent.sock";
/// Default agent state dir (the CNI plugin's DEL queue lives below it).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/catena";
/// Default bpffs dir for catena's pins.
pub const DEFAULT_BPFFS_DIR: &str = "/sys/fs/bpf/catena";
/// Sub-directory of the state dir holding deletes the plugin could not hand to
/// the agent (one [`QueuedDelete`] JSON file each).
pub const DEL_QUEUE_DIR: &str = "del-queue";
/// At most this many queued deletes are kept; older ones are dropped first.
pub const DEL_QUEUE_MAX: usize = 4096;

/// Path of an endpoint resource.
pub fn endpoint_path(container_id: &str, ifname: &str) -> String {
    format!("/v1/endpoints/{container_id}/{ifname}")
}
