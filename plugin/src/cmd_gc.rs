//! GC (1.1.0): the runtime lists the attachments that still exist; the agent
//! drops every endpoint not in that list.

use crate::config::NetConf;
use crate::error::{CniError, Code};
use crate::{agent, diag, version};
use catena_api::{GcRequest, GcResult};

pub fn run(conf: &NetConf) -> Result<(), CniError> {
    version::require_command(&conf.cni_version, "GC", version::STATUS_GC_SINCE)?;
    // Without the list we cannot tell stale from live; treating a missing
    // key as "nothing is valid" would tear down every pod.
    let valid = conf.valid_attachments.clone().ok_or_else(|| {
        CniError::new(
            Code::InvalidConfig,
            "GC needs \"cni.dev/valid-attachments\" in the configuration",
        )
    })?;
    let request = GcRequest {
        network: conf.name.clone().unwrap_or_default(),
        valid_attachments: valid,
    };
    let result: GcResult = agent::client(conf, conf.agent_timeout)
        .post("/v1/endpoints/gc", &request)
        .map_err(|e| agent::failure(conf, "garbage-collect endpoints", &e))?;
    for a in &result.removed {
        diag!("GC removed stale endpoint {}/{}", a.container_id, a.ifname);
    }
    Ok(())
}
