//! Running CNI plugins the way libcni does (conflists, chaining, cache).

mod compat;
mod conflist;
mod result;
mod runner;
mod tcx;

pub use compat::{cni_1_1_shims, SHIMMED_PLUGINS};
pub use conflist::Conflist;
pub use result::{AddResult, IpConfig, ResultInterface};
pub use runner::{CallArgs, CallTiming, CniRunner, GcAttachment, PluginCall, PluginOutput};
pub use tcx::tcx_program_counts;

/// An error object a plugin printed on stdout with a non-zero exit
/// (`{"cniVersion","code","msg","details"}`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PluginError {
    /// The plugin's `type`.
    pub plugin: String,
    /// `ADD`, `DEL`, ...
    pub command: String,
    pub code: u32,
    pub msg: String,
    pub details: String,
    pub stderr: String,
}

impl std::fmt::Display for PluginError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "plugin {} failed ({}): code {}: {}",
            self.plugin, self.command, self.code, self.msg
        )?;
        if !self.details.is_empty() {
            write!(f, " ({})", self.details)?;
        }
        if !self.stderr.trim().is_empty() {
            write!(f, "; stderr: {}", self.stderr.trim())?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CniError {
    /// The plugin answered with a CNI error object.
    #[error("{0}")]
    Plugin(Box<PluginError>),
    /// The plugin failed without a parseable error object (crash, timeout,
    /// garbage on stdout), or succeeded with output that is not valid JSON.
    #[error(
        "plugin {plugin} ({command}) misbehaved: {reason}; stdout: {stdout:?}; stderr: {stderr:?}"
    )]
    Misbehaved {
        plugin: String,
        command: String,
        reason: String,
        stdout: String,
        stderr: String,
    },
    /// Rejected before running anything, as libcni would (bad conflist,
    /// unsupported version, invalid container id or ifname, missing cache).
    #[error("{0}")]
    Invalid(String),
    /// Spawning, I/O, cache files.
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

impl CniError {
    /// The plugin's error object, if that is what this is.
    pub fn plugin_error(&self) -> Option<&PluginError> {
        match self {
            CniError::Plugin(p) => Some(p.as_ref()),
            _ => None,
        }
    }
}

/// Compares `a.b.c` versions numerically (missing parts are 0).
pub(crate) fn version_ge(v: &str, other: &str) -> bool {
    fn parse(v: &str) -> (u32, u32, u32) {
        let mut it = v.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
        (
            it.next().unwrap_or(0),
            it.next().unwrap_or(0),
            it.next().unwrap_or(0),
        )
    }
    parse(v) >= parse(other)
}

#[cfg(test)]
mod tests {
    #[test]
    fn versions_compare_numerically() {
        assert!(super::version_ge("1.0.0", "0.4.0"));
        assert!(super::version_ge("0.10.0", "0.4.0"));
        assert!(!super::version_ge("0.3.1", "0.4.0"));
        assert!(super::version_ge("1.1.0", "1.1.0"));
    }
}
