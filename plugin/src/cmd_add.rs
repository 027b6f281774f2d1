//! ADD: find the host veth of the pod interface the primary plugin made,
//! register it with the agent (which attaches the programs), and hand the
//! primary's result on unchanged.

use crate::agent;
use crate::args::CniArgs;
use crate::config::NetConf;
use crate::env::CniEnv;
use crate::error::CniError;
use crate::veth;
use crate::{diag, version};
use catena_api::{Endpoint, EndpointSpec, PodRef};
use std::path::Path;

/// Returns what to print on stdout: the `prevResult` text exactly as received.
pub fn run(env: &CniEnv, conf: &NetConf) -> Result<String, CniError> {
    version::require_supported(&conf.cni_version)?;
    let container_id = env.container_id()?;
    let ifname = env.ifname()?;
    let netns = env.netns()?;
    let args = CniArgs::parse(env.args.as_deref().unwrap_or(""))?;
    let prev = conf.require_prev_result()?;
    let ips = prev.ips_for(ifname)?;
    for pm in &conf.runtime_config.port_mappings {
        // Host ports are the portmap plugin's job; noted for the operator.
        diag!(
            "{container_id}/{ifname}: port mapping {}:{} -> {}/{} (left to the portmap plugin)",
            pm.host_ip,
            pm.host_port,
            pm.container_port,
            pm.protocol
        );
    }

    let host = veth::find_host_veth(Path::new(netns), ifname)?;
    let spec = EndpointSpec {
        network: conf.name.clone().unwrap_or_default(),
        container_id: container_id.into(),
        ifname: ifname.into(),
        netns: netns.into(),
        host_ifname: host.name.clone(),
        host_ifindex: host.index,
        ips,
        pod: PodRef {
            namespace: args.pod_namespace.unwrap_or_default(),
            name: args.pod_name.unwrap_or_default(),
            uid: args.pod_uid.unwrap_or_default(),
        },
        labels: Default::default(),
    };
    probe_ready(conf)?;
    register(conf, &spec)?;
    let raw = conf
        .prev_result
        .as_ref()
        .expect("checked by require_prev_result");
    Ok(raw.get().to_string())
}

/// Fails fast (code 11) when the agent is down, hung or not ready, before
/// anything is registered: the registration itself may then take its own
/// budget on a busy but healthy agent.
fn probe_ready(conf: &NetConf) -> Result<(), CniError> {
    let budget = conf.agent_timeout.min(crate::config::PROBE_TIMEOUT);
    agent::client(conf, budget)
        .get::<catena_api::Health>("/v1/healthz")
        .map(|_| ())
        .map_err(|e| agent::failure(conf, "the readiness probe", &e))
}

/// PUT the endpoint. The agent attaches before it answers, so a refused PUT
/// leaves nothing behind; a PUT that timed out may still complete, so it is
/// withdrawn with a best-effort DELETE. `agentTimeoutMs` is split so the PUT
/// and the DELETE both fit in it (the readiness probe comes before, with its
/// own sub-second budget).
fn register(conf: &NetConf, spec: &EndpointSpec) -> Result<Endpoint, CniError> {
    let path = agent::endpoint_path(&spec.container_id, &spec.ifname);
    let put_budget = conf.agent_timeout * 4 / 5;
    let rollback_budget = conf.agent_timeout - put_budget;
    match agent::client(conf, put_budget).put::<_, Endpoint>(&path, spec) {
        Ok(ep) => {
            diag!(
                "{}/{}: registered host veth {} (ifindex {}) as endpoint {} ({})",
                spec.container_id,
                spec.ifname,
                spec.host_ifname,
                spec.host_ifindex,
                ep.id,
                ep.attach_mode
            );
            Ok(ep)
        }
        Err(err) => {
            if agent::timed_out(&err) || matches!(err, catena_api::ClientError::Protocol(_)) {
                match agent::client(conf, rollback_budget).delete(&path) {
                    Ok(()) => diag!("{path}: withdrew the unanswered registration"),
                    Err(e) => diag!("{path}: could not withdraw the unanswered registration: {e}"),
                }
            }
            Err(agent::failure(conf, "register the pod's endpoint", &err))
        }
    }
}
