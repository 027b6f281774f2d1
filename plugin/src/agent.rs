//! Talking to catena-agent, with the operator-facing wording of failures.

use crate::config::NetConf;
use crate::error::{CniError, Code};
use catena_api::{Client, ClientError};
use std::io::ErrorKind;
use std::time::Duration;

pub fn client(conf: &NetConf, timeout: Duration) -> Client {
    Client::new(&conf.agent_socket).with_timeout(timeout)
}

/// `/v1/endpoints/{cid}/{ifname}`. Both are validated already, but an ifname
/// may legally hold characters with a meaning in URLs (`?`, `#`, `%`).
pub fn endpoint_path(container_id: &str, ifname: &str) -> String {
    catena_api::endpoint_path(&encode(container_id), &encode(ifname))
}

fn encode(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for b in segment.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The request may have reached the agent and be in progress (it did not
/// answer in time), as opposed to never arriving.
pub fn timed_out(err: &ClientError) -> bool {
    matches!(err, ClientError::Unreachable { source, .. }
        if matches!(source.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut))
}

/// Maps a failed request to what the runtime should hear. Transient
/// conditions are code 11 so kubelet/containerd retry the sandbox.
pub fn failure(conf: &NetConf, what: &str, err: &ClientError) -> CniError {
    let socket = conf.agent_socket.display();
    if timed_out(err) {
        CniError::new(
            Code::TryAgainLater,
            format!("catena agent at {socket} did not answer {what} within {} ms; check catena-agent's health and logs", conf.agent_timeout.as_millis()),
        )
        .with_details(err.to_string())
    } else if let ClientError::Unreachable { source, .. } = err {
        CniError::new(
            Code::TryAgainLater,
            format!("catena agent is not reachable at {socket} ({source}); start catena-agent on this node, or make agentSocket in the CNI config match its --socket"),
        )
        .with_details(err.to_string())
    } else if err.is_retryable() {
        CniError::new(
            Code::TryAgainLater,
            format!("catena agent is not ready to {what}; the runtime will retry (see `catena status` and the agent's logs)"),
        )
        .with_details(err.to_string())
    } else {
        CniError::new(
            Code::AgentRejected,
            format!("catena agent refused to {what}"),
        )
        .with_details(err.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_escaped() {
        assert_eq!(
            endpoint_path("abc-1.2_x", "eth0"),
            "/v1/endpoints/abc-1.2_x/eth0"
        );
        assert_eq!(
            endpoint_path("c", "we?ird#%"),
            "/v1/endpoints/c/we%3Fird%23%25"
        );
    }

    #[test]
    fn failure_codes() {
        let conf = NetConf::fallback();
        let down = ClientError::Unreachable {
            path: "/x".into(),
            source: std::io::Error::from(ErrorKind::NotFound),
        };
        let e = failure(&conf, "register", &down);
        assert_eq!(e.code, Code::TryAgainLater);
        assert!(
            e.msg.contains("start catena-agent") && e.msg.contains("/run/catena/agent.sock"),
            "{e}"
        );
        let slow = ClientError::Unreachable {
            path: "/x".into(),
            source: std::io::Error::from(ErrorKind::WouldBlock),
        };
        assert!(timed_out(&slow));
        assert_eq!(failure(&conf, "register", &slow).code, Code::TryAgainLater);
        let busy = ClientError::Api {
            status: 503,
            body: catena_api::ApiError {
                message: "loading".into(),
                retryable: true,
            },
        };
        assert_eq!(failure(&conf, "register", &busy).code, Code::TryAgainLater);
        let bad = ClientError::Api {
            status: 400,
            body: catena_api::ApiError {
                message: "bad ip".into(),
                retryable: false,
            },
        };
        let e = failure(&conf, "register", &bad);
        assert_eq!(e.code, Code::AgentRejected);
        assert!(e.details.contains("bad ip"));
    }
}
