//! STATUS (1.1.0): can this node take new pods? Only if the agent is up and
//! ready, since every ADD needs it.

use crate::config::NetConf;
use crate::error::{CniError, Code};
use crate::{agent, version};
use catena_api::Health;

pub fn run(conf: &NetConf) -> Result<(), CniError> {
    version::require_command(&conf.cni_version, "STATUS", version::STATUS_GC_SINCE)?;
    let socket = conf.agent_socket.display();
    match agent::client(conf, conf.agent_timeout).get::<Health>("/v1/healthz") {
        Ok(Health { ready: true, .. }) => Ok(()),
        Ok(Health { reason, .. }) => Err(CniError::new(
            Code::PluginNotAvailable,
            format!(
                "catena agent is not ready: {}",
                reason.as_deref().unwrap_or("no reason given")
            ),
        )),
        Err(e) => Err(CniError::new(
            Code::PluginNotAvailable,
            format!("catena agent at {socket} is not available; start or check catena-agent"),
        )
        .with_details(e.to_string())),
    }
}
