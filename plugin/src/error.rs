//! The CNI error object (`{"cniVersion","code","msg","details"}`) and the codes
//! this plugin uses. Codes 1-99 keep exactly the meaning SPEC.md gives them;
//! 100+ are catena's own.

use serde::Serialize;
use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Code {
    /// 1: the configuration's `cniVersion` is not one we speak, or the
    /// command does not exist in that version (CHECK < 0.4.0, STATUS/GC < 1.1.0).
    IncompatibleVersion,
    /// 2: a field we understand has a value we do not support.
    UnsupportedField,
    /// 4: a `CNI_*` variable (including `CNI_ARGS` and `CNI_NETNS`) is missing or invalid.
    InvalidEnvironment,
    /// 5: reading stdin failed.
    Io,
    /// 6: stdin (or `prevResult`) is not the JSON we expect.
    Decode,
    /// 7: the configuration decodes but is not usable (e.g. no `prevResult`).
    InvalidConfig,
    /// 11: transient: the agent is down, starting or busy.
    TryAgainLater,
    /// 50: STATUS: the plugin cannot serve ADDs right now.
    PluginNotAvailable,
    /// 100: the host-side veth of `CNI_IFNAME` could not be identified.
    HostInterface,
    /// 101: the agent refused the request for a reason retrying will not fix.
    AgentRejected,
    /// 102: CHECK found the endpoint's datapath not as it should be.
    CheckFailed,
}

impl Code {
    pub fn number(self) -> u32 {
        match self {
            Code::IncompatibleVersion => 1,
            Code::UnsupportedField => 2,
            Code::InvalidEnvironment => 4,
            Code::Io => 5,
            Code::Decode => 6,
            Code::InvalidConfig => 7,
            Code::TryAgainLater => 11,
            Code::PluginNotAvailable => 50,
            Code::HostInterface => 100,
            Code::AgentRejected => 101,
            Code::CheckFailed => 102,
        }
    }
}

/// An error to report to the runtime.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CniError {
    pub code: Code,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: Code, msg: impl Into<String>) -> Self {
        CniError {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    pub fn with_details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }

    /// The JSON object printed on stdout. `cni_version` is the configuration's
    /// version when it is one we support, so the runtime decodes it the way
    /// it decodes our results.
    pub fn to_json(&self, cni_version: &str) -> String {
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Wire<'a> {
            cni_version: &'a str,
            code: u32,
            msg: &'a str,
            #[serde(skip_serializing_if = "str::is_empty")]
            details: &'a str,
        }
        serde_json::to_string(&Wire {
            cni_version,
            code: self.code.number(),
            msg: &self.msg,
            details: &self.details,
        })
        .expect("plain strings and numbers always serialise")
    }
}

impl fmt::Display for CniError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[code {}] {}", self.code.number(), self.msg)?;
        if !self.details.is_empty() {
            write!(f, " ({})", self.details)?;
        }
        Ok(())
    }
}

impl std::error::Error for CniError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_json_has_the_spec_shape() {
        let e = CniError::new(Code::TryAgainLater, "agent down").with_details("connect: ENOENT");
        let v: serde_json::Value = serde_json::from_str(&e.to_json("0.3.1")).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"cniVersion":"0.3.1","code":11,"msg":"agent down","details":"connect: ENOENT"})
        );
        // `details` is optional in the spec: absent rather than "".
        let v: serde_json::Value =
            serde_json::from_str(&CniError::new(Code::Decode, "bad").to_json("1.1.0")).unwrap();
        assert_eq!(v.as_object().unwrap().len(), 3);
        assert_eq!(v["code"], 6);
    }

    #[test]
    fn well_known_codes_match_the_spec_table() {
        let table = [
            (Code::IncompatibleVersion, 1),
            (Code::UnsupportedField, 2),
            (Code::InvalidEnvironment, 4),
            (Code::Io, 5),
            (Code::Decode, 6),
            (Code::InvalidConfig, 7),
            (Code::TryAgainLater, 11),
            (Code::PluginNotAvailable, 50),
        ];
        for (code, n) in table {
            assert_eq!(code.number(), n, "{code:?}");
        }
        // Our own codes must stay out of the reserved 0-99 range.
        for code in [Code::HostInterface, Code::AgentRejected, Code::CheckFailed] {
            assert!(code.number() >= 100, "{code:?}");
        }
    }
}
