//! CHECK (0.4.0+): is the endpoint still registered, attached to the veth
//! that is the pod interface's peer now, with the primary's addresses?

use crate::agent;
use crate::args::CniArgs;
use crate::config::NetConf;
use crate::env::CniEnv;
use crate::error::{CniError, Code};
use crate::{version, veth};
use catena_api::{Endpoint, EndpointCheck};
use std::path::Path;

pub fn run(env: &CniEnv, conf: &NetConf) -> Result<(), CniError> {
    version::require_command(&conf.cni_version, "CHECK", version::CHECK_SINCE)?;
    let container_id = env.container_id()?;
    let ifname = env.ifname()?;
    let netns = env.netns()?;
    CniArgs::parse(env.args.as_deref().unwrap_or(""))?;
    let prev = conf.require_prev_result()?;
    let mut want_ips = prev.ips_for(ifname)?;
    let host = veth::find_host_veth(Path::new(netns), ifname)?;

    let client = agent::client(conf, conf.agent_timeout);
    let path = agent::endpoint_path(container_id, ifname);
    let endpoint = match client.get::<Endpoint>(&path) {
        Ok(ep) => ep,
        Err(e) if e.status() == Some(404) => {
            return Err(problems(
                container_id,
                ifname,
                vec!["the endpoint is not registered with the catena agent".into()],
            ))
        }
        Err(e) => return Err(agent::failure(conf, "report the endpoint", &e)),
    };
    let check = client
        .get::<EndpointCheck>(&format!("{path}/check"))
        .map_err(|e| agent::failure(conf, "check the endpoint", &e))?;

    let mut found = check.problems;
    if !check.ok && found.is_empty() {
        found.push("the agent reports the endpoint as not ok".into());
    }
    let spec = &endpoint.spec;
    if spec.host_ifindex != host.index || spec.host_ifname != host.name {
        found.push(format!(
            "the host veth of {ifname} is now {} (ifindex {}), the agent attached to {} (ifindex {})",
            host.name, host.index, spec.host_ifname, spec.host_ifindex
        ));
    }
    let mut have_ips = spec.ips.clone();
    want_ips.sort();
    have_ips.sort();
    if want_ips != have_ips {
        found.push(format!(
            "addresses differ: prevResult has {want_ips:?}, the agent has {have_ips:?}"
        ));
    }
    if found.is_empty() {
        Ok(())
    } else {
        Err(problems(container_id, ifname, found))
    }
}

fn problems(container_id: &str, ifname: &str, found: Vec<String>) -> CniError {
    CniError::new(
        Code::CheckFailed,
        format!(
            "catena endpoint {container_id}/{ifname} failed CHECK: {}",
            found.join("; ")
        ),
    )
    .with_details(found.join("\n"))
}
