//! Running a 1.1.0 conflist through reference plugins that stop at 1.0.0.
//!
//! Debian 12's containernetworking-plugins (1.1.1) support spec versions up
//! to 1.0.0, and no newer build is reachable from here. [`cni_1_1_shims`]
//! writes one small shim per reference plugin that lets a 1.1.0 conflist run
//! through them: VERSION answers with 1.1.0 added; GC and STATUS (1.1.0
//! commands the 1.0 plugins do not know) succeed doing nothing; every other
//! command runs the real plugin with `"cniVersion":"1.1.0"` rewritten to
//! 1.0.0 on stdin and back on stdout (the plugins print indented JSON) (a 1.1.0 result has the 1.0.0 shape).
//! Chained plugins under test (catena-cni) are never shimmed: they see the
//! 1.1.0 conflist and a 1.1.0 prevResult, as with a 1.1-capable primary.

use anyhow::Result;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// The reference plugins the shims cover.
pub const SHIMMED_PLUGINS: [&str; 7] = [
    "ptp",
    "bridge",
    "host-local",
    "tuning",
    "portmap",
    "bandwidth",
    "loopback",
];

/// Writes the shims into `dir` (created) and returns `CNI_PATH` for a
/// [`crate::CniRunner`]: the shims, then catena's bin dir.
pub fn cni_1_1_shims(dir: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    for plugin in SHIMMED_PLUGINS {
        let script = format!(
            r#"#!/bin/sh
real={sys}/{plugin}
case "$CNI_COMMAND" in
  VERSION) cat >/dev/null; echo '{{"cniVersion":"1.1.0","supportedVersions":["0.3.0","0.3.1","0.4.0","1.0.0","1.1.0"]}}'; exit 0;;
  GC|STATUS) cat >/dev/null; exit 0;;
esac
input=$(cat)
case "$input" in
  *'"cniVersion":"1.1.0"'*) ;;
  # Not a 1.1.0 call (e.g. ptp delegating to host-local with its rewritten
  # 1.0.0 config): pass through untouched.
  *) printf '%s' "$input" | "$real"; exit $?;;
esac
out=$(printf '%s' "$input" | sed 's/"cniVersion":"1\.1\.0"/"cniVersion":"1.0.0"/g' | "$real")
rc=$?
printf '%s' "$out" | sed 's/"cniVersion": *"1\.0\.0"/"cniVersion": "1.1.0"/g'
exit $rc
"#,
            sys = super::runner::SYSTEM_CNI_DIR
        );
        let path = dir.join(plugin);
        std::fs::write(&path, script)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
    }
    Ok(vec![dir.to_path_buf(), crate::bins::bin_dir()?])
}
