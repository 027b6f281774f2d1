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
use std::time::{Duration, Instant};

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
    // One budget for everything the ADD asks the agent: what the probe spent
    // is no longer there for the registration.
    let deadline = Instant::now() + conf.agent_timeout;
    probe_ready(conf, deadline)?;
    register(conf, &spec, deadline)?;
    let raw = conf
        .prev_result
        .as_ref()
        .expect("checked by require_prev_result");
    Ok(raw.get().to_string())
}

/// Fails fast (code 11) when the agent is down, hung or not ready, before
/// anything is registered: the registration itself may then take its own
/// budget on a busy but healthy agent.
fn probe_ready(conf: &NetConf, deadline: Instant) -> Result<(), CniError> {
    let budget = remaining(deadline).min(crate::config::PROBE_TIMEOUT);
    agent::client(conf, budget)
        .get::<catena_api::Health>("/v1/healthz")
        .map(|_| ())
        .map_err(|e| agent::failure(conf, "the readiness probe", &e))
}

/// PUT the endpoint. The agent attaches before it answers, so a refused PUT
/// leaves nothing behind; a PUT that timed out may still complete, so it is
/// withdrawn with a best-effort DELETE. What is left of `agentTimeoutMs`
/// after the readiness probe is split so the PUT and the DELETE both fit in
/// it: the whole ADD never talks to the agent for longer than the budget.
fn register(conf: &NetConf, spec: &EndpointSpec, deadline: Instant) -> Result<Endpoint, CniError> {
    let path = agent::endpoint_path(&spec.container_id, &spec.ifname);
    let (put_budget, rollback_budget) = split_budget(remaining(deadline));
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
                // The rollback's share, plus whatever the PUT left unused.
                let rollback_budget = rollback_budget.max(remaining(deadline));
                match agent::client(conf, rollback_budget).delete(&path) {
                    Ok(()) => diag!("{path}: withdrew the unanswered registration"),
                    Err(e) => diag!("{path}: could not withdraw the unanswered registration: {e}"),
                }
            }
            Err(agent::failure(conf, "register the pod's endpoint", &err))
        }
    }
}

/// Time left until `deadline` (zero once it has passed: a request with a zero
/// budget fails at once as timed out).
fn remaining(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

/// PUT and rollback DELETE shares of `left`: four fifths for the PUT.
fn split_budget(left: Duration) -> (Duration, Duration) {
    let put = left * 4 / 5;
    (put, left - put)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_split_fits_what_is_left() {
        let (put, rollback) = split_budget(Duration::from_millis(9_100));
        assert_eq!(put, Duration::from_millis(7_280));
        assert_eq!(put + rollback, Duration::from_millis(9_100));
        assert_eq!(
            split_budget(Duration::ZERO),
            (Duration::ZERO, Duration::ZERO)
        );
    }

    #[test]
    fn a_passed_deadline_leaves_nothing() {
        let past = Instant::now() - Duration::from_millis(5);
        assert_eq!(remaining(past), Duration::ZERO);
        let future = Instant::now() + Duration::from_secs(60);
        assert!(remaining(future) > Duration::from_secs(59));
    }
}
