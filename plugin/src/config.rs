//! The plugin's network configuration (stdin): its own conflist object plus
//! what the runtime adds (`name`, `cniVersion`, `prevResult`, `runtimeConfig`,
//! GC's valid attachments). Only `type` is required in the conflist entry;
//! unknown keys are ignored, as other plugins' capabilities may appear there.

use crate::error::{CniError, Code};
use crate::result::PrevResult;
use catena_api::Attachment;
use serde::Deserialize;
use serde_json::value::RawValue;
use std::path::PathBuf;
use std::time::Duration;

/// The whole ADD budget for the agent. Generous on purpose: a healthy agent
/// under a burst of pod creations (each attach waits on the kernel) must not
/// be mistaken for a dead one. A dead, hung or unready agent is still caught
/// within [`PROBE_TIMEOUT`] by the readiness probe that precedes the ADD.
pub const DEFAULT_AGENT_TIMEOUT_MS: u64 = 10_000;

/// ADD first asks `/v1/healthz` with at most this: the agent answers it
/// without waiting for other requests, so "down, hung or not ready" is known
/// in well under a second (the plugin's promise: code 11 within 1 s).
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(900);

#[derive(Debug)]
pub struct NetConf {
    pub cni_version: String,
    pub name: Option<String>,
    pub agent_socket: PathBuf,
    pub state_dir: PathBuf,
    /// Budget for one agent request (ADD also spends it on the rollback DELETE).
    pub agent_timeout: Duration,
    /// Diagnostics go here instead of stderr when set.
    pub log_file: Option<PathBuf>,
    /// Kept verbatim: ADD must hand the previous result on unchanged.
    pub prev_result: Option<Box<RawValue>>,
    pub runtime_config: RuntimeConfig,
    /// `cni.dev/valid-attachments` (GC); `None` when the key is absent.
    pub valid_attachments: Option<Vec<Attachment>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Wire {
    cni_version: Option<String>,
    name: Option<String>,
    #[serde(rename = "type")]
    plugin_type: Option<String>,
    agent_socket: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    agent_timeout_ms: Option<u64>,
    log_file: Option<PathBuf>,
    prev_result: Option<Box<RawValue>>,
    #[serde(default)]
    runtime_config: Option<RuntimeConfig>,
    #[serde(rename = "cni.dev/valid-attachments")]
    valid_attachments: Option<Vec<GcAttachment>>,
    /// The key an earlier 1.1.0 draft used; libcni sends both.
    #[serde(rename = "cni.dev/attachments")]
    attachments: Option<Vec<GcAttachment>>,
}

/// GC's attachment spelling (`containerID`), not the agent API's.
#[derive(Deserialize)]
struct GcAttachment {
    #[serde(rename = "containerID")]
    container_id: String,
    ifname: String,
}

/// The `runtimeConfig` capabilities we understand. libcni/podman spell the
/// port mapping keys `hostPort`, containerd's CRI (Go field names, no JSON
/// tags) `HostPort`; both are accepted.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
pub struct RuntimeConfig {
    #[serde(default, rename = "portMappings", alias = "PortMappings")]
    pub port_mappings: Vec<PortMapping>,
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct PortMapping {
    #[serde(rename = "hostPort", alias = "HostPort")]
    pub host_port: u16,
    #[serde(rename = "containerPort", alias = "ContainerPort")]
    pub container_port: u16,
    #[serde(default, rename = "protocol", alias = "Protocol")]
    pub protocol: String,
    #[serde(default, rename = "hostIP", alias = "HostIP", alias = "hostIp")]
    pub host_ip: String,
}

impl NetConf {
    pub fn parse(stdin: &[u8]) -> Result<Self, CniError> {
        let wire: Wire = serde_json::from_slice(stdin).map_err(|e| {
            CniError::new(
                Code::Decode,
                "cannot decode the network configuration on stdin",
            )
            .with_details(e.to_string())
        })?;
        let invalid = |msg: String| CniError::new(Code::InvalidConfig, msg);
        match wire.plugin_type.as_deref() {
            Some(t) if !t.is_empty() => {}
            _ => return Err(invalid("the configuration has no \"type\"".into())),
        }
        // Runtimes always inject the list's cniVersion; a missing one means
        // 0.1.0 by the spec's rule, which cannot carry a prevResult.
        let cni_version = wire.cni_version.unwrap_or_else(|| "0.1.0".into());
        let agent_socket = wire
            .agent_socket
            .unwrap_or_else(|| catena_api::DEFAULT_SOCKET.into());
        if !agent_socket.is_absolute() {
            return Err(invalid(format!(
                "agentSocket {agent_socket:?} must be an absolute path"
            )));
        }
        let state_dir = wire
            .state_dir
            .unwrap_or_else(|| catena_api::DEFAULT_STATE_DIR.into());
        if !state_dir.is_absolute() {
            return Err(invalid(format!(
                "stateDir {state_dir:?} must be an absolute path"
            )));
        }
        let timeout_ms = wire.agent_timeout_ms.unwrap_or(DEFAULT_AGENT_TIMEOUT_MS);
        if timeout_ms == 0 {
            return Err(invalid("agentTimeoutMs must be greater than 0".into()));
        }
        let valid_attachments = wire.valid_attachments.or(wire.attachments).map(|list| {
            list.into_iter()
                .map(|a| Attachment {
                    container_id: a.container_id,
                    ifname: a.ifname,
                })
                .collect()
        });
        Ok(NetConf {
            cni_version,
            name: wire.name,
            agent_socket,
            state_dir,
            agent_timeout: Duration::from_millis(timeout_ms),
            log_file: wire.log_file,
            prev_result: wire.prev_result.filter(|r| r.get() != "null"),
            runtime_config: wire.runtime_config.unwrap_or_default(),
            valid_attachments,
        })
    }

    /// What DEL falls back to when stdin cannot be used: defaults everywhere,
    /// so an agent at the default socket still hears about the delete.
    pub fn fallback() -> Self {
        NetConf {
            cni_version: crate::version::LATEST.into(),
            name: None,
            agent_socket: catena_api::DEFAULT_SOCKET.into(),
            state_dir: catena_api::DEFAULT_STATE_DIR.into(),
            agent_timeout: Duration::from_millis(DEFAULT_AGENT_TIMEOUT_MS),
            log_file: None,
            prev_result: None,
            runtime_config: RuntimeConfig::default(),
            valid_attachments: None,
        }
    }

    /// The decoded `prevResult`, or `None` when there is none.
    pub fn prev_result(&self) -> Result<Option<PrevResult>, CniError> {
        self.prev_result
            .as_deref()
            .map(PrevResult::parse)
            .transpose()
    }

    /// ADD and CHECK need a previous result: catena decorates what the
    /// primary plugin created and cannot run first.
    pub fn require_prev_result(&self) -> Result<PrevResult, CniError> {
        self.prev_result()?.ok_or_else(|| {
            CniError::new(
                Code::InvalidConfig,
                "catena-cni must be chained after a primary plugin (ptp, bridge, calico, flannel, ...): no prevResult in the configuration",
            )
            .with_details("put {\"type\":\"catena-cni\"} after the primary plugin in the conflist's \"plugins\" list")
        })
    }
}

/// Peeks at `cniVersion` only, for error objects and VERSION when the rest of
/// stdin may be unusable.
pub fn peek_version(stdin: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct V {
        #[serde(rename = "cniVersion")]
        cni_version: Option<String>,
    }
    serde_json::from_slice::<V>(stdin).ok()?.cni_version
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What libcni sends a chained plugin after ptp (real-parts.md), with the
    /// conflist entry being just `{"type":"catena-cni"}` (seed-004).
    const SEED_004: &str = r#"{"type":"catena-cni","name":"catena","cniVersion":"0.3.1",
      "prevResult":{"cniVersion":"0.3.1",
        "interfaces":[{"name":"veth38fb12a8","mac":"c6:d6:4c:3c:a5:96"},
                      {"name":"eth0","mac":"6e:41:bb:9d:48:e4","sandbox":"/var/run/netns/c5"}],
        "ips":[{"version":"4","interface":1,"address":"10.99.0.5/24","gateway":"10.99.0.1"}],
        "routes":[{"dst":"0.0.0.0/0"}],"dns":{}}}"#;

    #[test]
    fn seed_004_minimal_entry_gets_defaults() {
        let c = NetConf::parse(SEED_004.as_bytes()).unwrap();
        assert_eq!(c.cni_version, "0.3.1");
        assert_eq!(c.name.as_deref(), Some("catena"));
        assert_eq!(c.agent_socket, PathBuf::from("/run/catena/agent.sock"));
        assert_eq!(c.state_dir, PathBuf::from("/var/lib/catena"));
        assert_eq!(c.agent_timeout, Duration::from_millis(10_000));
        assert_eq!(c.runtime_config, RuntimeConfig::default());
        let prev = c.require_prev_result().unwrap();
        assert_eq!(prev.ips_for("eth0").unwrap(), vec!["10.99.0.5/24"]);
    }

    #[test]
    fn prev_result_is_kept_byte_for_byte() {
        let c = NetConf::parse(SEED_004.as_bytes()).unwrap();
        let raw = c.prev_result.unwrap();
        let start = SEED_004
            .find(
                r#"{"cniVersion":"0.3.1",
        "interfaces""#,
            )
            .unwrap();
        assert!(SEED_004[start..].starts_with(raw.get()));
        assert!(raw.get().contains("\n        \"interfaces\""));
    }

    #[test]
    fn every_supported_version_parses() {
        for v in crate::version::SUPPORTED {
            // 0.3.x/0.4.0 results carry ips[].version; 1.x ones do not.
            let ip = if v.starts_with('0') {
                r#"{"version":"4","interface":1,"address":"10.1.0.7/16"}"#
            } else {
                r#"{"interface":1,"address":"10.1.0.7/16"}"#
            };
            let stdin = format!(
                r#"{{"cniVersion":"{v}","name":"k8s-pod-network","type":"catena-cni",
                   "prevResult":{{"cniVersion":"{v}","interfaces":[{{"name":"cni0"}},{{"name":"eth0","sandbox":"/proc/42/ns/net"}}],"ips":[{ip}]}}}}"#
            );
            let c = NetConf::parse(stdin.as_bytes()).unwrap_or_else(|e| panic!("{v}: {e}"));
            assert_eq!(c.cni_version, v);
            assert_eq!(
                c.require_prev_result().unwrap().ips_for("eth0").unwrap(),
                vec!["10.1.0.7/16"]
            );
        }
    }

    #[test]
    fn optional_fields_and_unknown_keys() {
        let c = NetConf::parse(
            br#"{"cniVersion":"1.0.0","name":"n","type":"catena-cni","agentSocket":"/tmp/a.sock",
                 "stateDir":"/tmp/state","agentTimeoutMs":250,"logFile":"/tmp/cni.log",
                 "capabilities":{"portMappings":true},"somethingElse":{"x":1}}"#,
        )
        .unwrap();
        assert_eq!(c.agent_socket, PathBuf::from("/tmp/a.sock"));
        assert_eq!(c.state_dir, PathBuf::from("/tmp/state"));
        assert_eq!(c.agent_timeout, Duration::from_millis(250));
        assert_eq!(c.log_file, Some(PathBuf::from("/tmp/cni.log")));
        assert!(c.prev_result.is_none());
        assert_eq!(
            c.require_prev_result().unwrap_err().code,
            Code::InvalidConfig
        );
    }

    #[test]
    fn invalid_configs() {
        let code = |s: &str| NetConf::parse(s.as_bytes()).unwrap_err().code;
        assert_eq!(code("{not json"), Code::Decode);
        assert_eq!(code(""), Code::Decode);
        assert_eq!(code(r#"{"cniVersion":"1.0.0"}"#), Code::InvalidConfig);
        assert_eq!(
            code(r#"{"type":"catena-cni","agentSocket":"rel.sock"}"#),
            Code::InvalidConfig
        );
        assert_eq!(
            code(r#"{"type":"catena-cni","agentTimeoutMs":0}"#),
            Code::InvalidConfig
        );
        assert_eq!(
            code(r#"{"type":"catena-cni","agentTimeoutMs":"fast"}"#),
            Code::Decode
        );
        // Missing cniVersion means 0.1.0 (the spec's default), which we then refuse.
        assert_eq!(
            NetConf::parse(br#"{"type":"catena-cni"}"#)
                .unwrap()
                .cni_version,
            "0.1.0"
        );
        // `"prevResult": null` is no previous result.
        let c = NetConf::parse(br#"{"type":"catena-cni","prevResult":null}"#).unwrap();
        assert!(c.prev_result.is_none());
    }

    #[test]
    fn runtime_config_spellings() {
        let libcni = r#"{"type":"catena-cni","cniVersion":"1.0.0","runtimeConfig":{"portMappings":[
            {"hostPort":8080,"containerPort":80,"protocol":"tcp","hostIP":"127.0.0.1"}]}}"#;
        let containerd = r#"{"type":"catena-cni","cniVersion":"1.0.0","runtimeConfig":{
            "portMappings":[{"HostPort":8080,"ContainerPort":80,"Protocol":"tcp","HostIP":"127.0.0.1"}],
            "io.kubernetes.cri.pod-annotations":{"a":"b"},"bandwidth":{"ingressRate":1}}}"#;
        let a = NetConf::parse(libcni.as_bytes()).unwrap().runtime_config;
        let b = NetConf::parse(containerd.as_bytes())
            .unwrap()
            .runtime_config;
        assert_eq!(a, b);
        assert_eq!(
            a.port_mappings,
            vec![PortMapping {
                host_port: 8080,
                container_port: 80,
                protocol: "tcp".into(),
                host_ip: "127.0.0.1".into()
            }]
        );
        // No mapping without a host port.
        let bad =
            r#"{"type":"catena-cni","runtimeConfig":{"portMappings":[{"containerPort":80}]}}"#;
        assert_eq!(
            NetConf::parse(bad.as_bytes()).unwrap_err().code,
            Code::Decode
        );
    }

    #[test]
    fn gc_attachments_both_keys() {
        let both = r#"{"type":"catena-cni","cniVersion":"1.1.0",
            "cni.dev/valid-attachments":[{"containerID":"c1","ifname":"eth0"},{"containerID":"c1","ifname":"net1"}],
            "cni.dev/attachments":[{"containerID":"c1","ifname":"eth0"},{"containerID":"c1","ifname":"net1"}]}"#;
        let c = NetConf::parse(both.as_bytes()).unwrap();
        let list = c.valid_attachments.unwrap();
        assert_eq!(list.len(), 2);
        assert_eq!(
            list[1],
            Attachment {
                container_id: "c1".into(),
                ifname: "net1".into()
            }
        );
        let old = r#"{"type":"catena-cni","cni.dev/attachments":[]}"#;
        assert_eq!(
            NetConf::parse(old.as_bytes()).unwrap().valid_attachments,
            Some(vec![])
        );
        let none = r#"{"type":"catena-cni"}"#;
        assert_eq!(
            NetConf::parse(none.as_bytes()).unwrap().valid_attachments,
            None
        );
    }

    #[test]
    fn peek_version_survives_other_errors() {
        assert_eq!(
            peek_version(br#"{"cniVersion":"0.4.0"}"#).as_deref(),
            Some("0.4.0")
        );
        assert_eq!(peek_version(b"{oops"), None);
    }
}
