//! Builds the kernel-side programs (`ebpf/programs`, its own cargo workspace for
//! the bpfel-unknown-none target) with a nested cargo and copies the object to
//! `$OUT_DIR/catena-ebpf.o`, which `src/object.rs` embeds.
//!
//! The nested cargo must not inherit the outer invocation's compiler settings:
//! under `cargo clippy` the outer cargo sets `RUSTC_WORKSPACE_WRAPPER` to
//! clippy-driver, and RUSTFLAGS/CARGO_ENCODED_RUSTFLAGS/CARGO_TARGET_DIR... are
//! meant for host code. Everything cargo passes to build scripts is scrubbed and
//! only what the BPF build needs is set.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR"));
    let ebpf_root = manifest_dir.join("../../ebpf");
    let programs = ebpf_root.join("programs");
    let common = ebpf_root.join("common");

    for path in [
        programs.join("src"),
        programs.join("Cargo.toml"),
        programs.join("Cargo.lock"),
        programs.join(".cargo/config.toml"),
        common.join("src"),
        common.join("Cargo.toml"),
    ] {
        println!("cargo:rerun-if-changed={}", path.display());
    }

    // One shared target dir for `cargo build`, `cargo test` and `cargo clippy`
    // (their OUT_DIRs differ; a per-OUT_DIR target would rebuild the BPF side
    // for each of them).
    let target_dir = match env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => PathBuf::from(dir).join("ebpf"),
        None => manifest_dir.join("../../target/ebpf"),
    };

    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&programs)
        .args(["build", "--release", "--target-dir"])
        .arg(&target_dir);
    for (key, _) in env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        if scrub(key) {
            cmd.env_remove(key);
        }
    }
    // build-std needs the unstable table of ebpf/programs/.cargo/config.toml.
    cmd.env("RUSTC_BOOTSTRAP", "1");

    let status = cmd.status().unwrap_or_else(|e| {
        panic!(
            "running cargo for the eBPF programs in {}: {e}",
            programs.display()
        )
    });
    if !status.success() {
        panic!(
            "building the eBPF programs failed ({status}); they need `rustup component add \
             rust-src` and bpf-linker 0.13 built against rustc's LLVM in $CARGO_HOME/bin \
             (see scripts/setup)"
        );
    }

    let object = target_dir.join("bpfel-unknown-none/release/catena-ebpf");
    copy(&object, &out_dir.join("catena-ebpf.o"));
}

/// Variables cargo sets for build scripts or that steer rustc: none of them is
/// meant for the nested BPF build. CARGO_HOME (registry) and CARGO_MAKEFLAGS
/// (the jobserver, so the nested build shares the outer job limit) are kept.
fn scrub(key: &str) -> bool {
    if key == "CARGO_HOME" || key == "CARGO_MAKEFLAGS" {
        return false;
    }
    key.starts_with("CARGO_")
        || key.starts_with("RUSTC")
        || key.starts_with("RUSTDOC")
        || matches!(
            key,
            "RUSTFLAGS"
                | "TARGET"
                | "HOST"
                | "OUT_DIR"
                | "PROFILE"
                | "OPT_LEVEL"
                | "DEBUG"
                | "NUM_JOBS"
        )
}

fn copy(from: &Path, to: &Path) {
    std::fs::copy(from, to).unwrap_or_else(|e| {
        panic!(
            "copying the eBPF object {} to {}: {e}",
            from.display(),
            to.display()
        )
    });
}
