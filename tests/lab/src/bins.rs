//! Where the catena binaries under test are.

use anyhow::{bail, Context, Result};
use std::path::PathBuf;

/// Env var that overrides where catena binaries are looked up.
pub const BIN_DIR_ENV: &str = "CATENA_BIN_DIR";

/// The directory holding catena's binaries: `$CATENA_BIN_DIR`, else the
/// cargo profile dir of the running test (`target/<profile>/deps/xxx` ->
/// `target/<profile>`; examples live one level down too).
pub fn bin_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os(BIN_DIR_ENV) {
        return Ok(PathBuf::from(dir));
    }
    let exe = std::env::current_exe().context("locating the test executable")?;
    let mut dir = exe
        .parent()
        .context("test executable has no parent dir")?
        .to_path_buf();
    if matches!(
        dir.file_name().and_then(|n| n.to_str()),
        Some("deps" | "examples")
    ) {
        dir.pop();
    }
    Ok(dir)
}

/// Path of catena binary `name`, checked to exist.
pub fn bin_path(name: &str) -> Result<PathBuf> {
    let dir = bin_dir()?;
    let path = dir.join(name);
    if !path.is_file() {
        bail!(
            "{} not found (looked in {}; set ${BIN_DIR_ENV} or run `cargo build --bins` first)",
            name,
            dir.display()
        );
    }
    Ok(path)
}
