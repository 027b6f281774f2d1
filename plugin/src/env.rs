//! The `CNI_*` environment, typed. Empty values count as absent: containerd
//! sends `CNI_NETNS=""` on its later DELs, podman's cleanup DEL sends little.

use crate::error::{CniError, Code};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
    Status,
    Gc,
}

impl Command {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "VERSION" => Command::Version,
            "STATUS" => Command::Status,
            "GC" => Command::Gc,
            _ => return None,
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CniEnv {
    pub command: Command,
    pub container_id: Option<String>,
    pub netns: Option<String>,
    pub ifname: Option<String>,
    pub args: Option<String>,
}

impl CniEnv {
    pub fn from_process() -> Result<Self, CniError> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, CniError> {
        let get = |k: &str| get(k).filter(|v| !v.is_empty());
        let command = match get("CNI_COMMAND") {
            None => return Err(CniError::new(
                Code::InvalidEnvironment,
                "CNI_COMMAND is not set; catena-cni is a CNI plugin run by the container runtime",
            )),
            Some(c) => Command::parse(&c).ok_or_else(|| {
                CniError::new(
                    Code::InvalidEnvironment,
                    format!("CNI_COMMAND {c:?} is not one of ADD, DEL, CHECK, VERSION, STATUS, GC"),
                )
            })?,
        };
        Ok(CniEnv {
            command,
            container_id: get("CNI_CONTAINERID"),
            netns: get("CNI_NETNS"),
            ifname: get("CNI_IFNAME"),
            args: get("CNI_ARGS"),
        })
    }

    /// `CNI_CONTAINERID`, validated like libcni does (it ends up in an HTTP
    /// path and a file name).
    pub fn container_id(&self) -> Result<&str, CniError> {
        let id = require("CNI_CONTAINERID", self.container_id.as_deref())?;
        let mut chars = id.chars();
        let ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
            && chars.all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
        if ok {
            Ok(id)
        } else {
            Err(CniError::new(
                Code::InvalidEnvironment,
                format!("CNI_CONTAINERID {id:?} must be [a-zA-Z0-9][a-zA-Z0-9_.-]*"),
            ))
        }
    }

    /// `CNI_IFNAME`, validated with the kernel's rules for interface names.
    pub fn ifname(&self) -> Result<&str, CniError> {
        let name = require("CNI_IFNAME", self.ifname.as_deref())?;
        let ok = name.len() < 16
            && name != "."
            && name != ".."
            && !name
                .chars()
                .any(|c| c == '/' || c == ':' || c.is_whitespace());
        if ok {
            Ok(name)
        } else {
            Err(CniError::new(
                Code::InvalidEnvironment,
                format!("CNI_IFNAME {name:?} is not a valid interface name"),
            ))
        }
    }

    pub fn netns(&self) -> Result<&str, CniError> {
        require("CNI_NETNS", self.netns.as_deref())
    }
}

fn require<'a>(var: &str, value: Option<&'a str>) -> Result<&'a str, CniError> {
    value.ok_or_else(|| CniError::new(Code::InvalidEnvironment, format!("{var} is not set")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> Result<CniEnv, CniError> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        CniEnv::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn containerd_add_environment() {
        let e = env(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "4f1c0a9e7b"),
            ("CNI_NETNS", "/var/run/netns/cni-1234"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/opt/cni/bin"),
            ("CNI_ARGS", "K8S_POD_NAME=web;IgnoreUnknown=1"),
        ])
        .unwrap();
        assert_eq!(e.command, Command::Add);
        assert_eq!(e.container_id().unwrap(), "4f1c0a9e7b");
        assert_eq!(e.netns().unwrap(), "/var/run/netns/cni-1234");
        assert_eq!(e.ifname().unwrap(), "eth0");
    }

    #[test]
    fn empty_netns_counts_as_missing() {
        let e = env(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_NETNS", ""),
            ("CNI_IFNAME", "eth0"),
        ])
        .unwrap();
        assert_eq!(e.netns, None);
        let err = e.netns().unwrap_err();
        assert_eq!(err.code, Code::InvalidEnvironment);
        assert!(err.msg.contains("CNI_NETNS"), "{err}");
        assert!(e
            .container_id()
            .unwrap_err()
            .msg
            .contains("CNI_CONTAINERID"));
    }

    #[test]
    fn bad_command_and_names_are_code_4() {
        assert_eq!(env(&[]).unwrap_err().code, Code::InvalidEnvironment);
        assert_eq!(
            env(&[("CNI_COMMAND", "add")]).unwrap_err().code,
            Code::InvalidEnvironment
        );
        let e = env(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "../etc"),
            ("CNI_IFNAME", "a/b"),
        ])
        .unwrap();
        assert_eq!(e.container_id().unwrap_err().code, Code::InvalidEnvironment);
        assert_eq!(e.ifname().unwrap_err().code, Code::InvalidEnvironment);
        let long = env(&[("CNI_COMMAND", "ADD"), ("CNI_IFNAME", "abcdefghijklmnop")]).unwrap();
        assert!(long.ifname().is_err());
    }
}
