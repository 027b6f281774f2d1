//! Shared pieces of the end-to-end scenarios (the scenarios are in `tests/`).

pub mod source;

use anyhow::{bail, Context, Result};
use std::path::Path;
use std::time::{Duration, Instant};

/// Writes a manifest the way editors and `kubectl`-style tools do it: to a
/// temp file, then an atomic rename (the agent must never read a torn file).
pub fn write_manifest(dir: &Path, file: &str, yaml: &str) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{file}.tmp"));
    std::fs::write(&tmp, yaml).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, dir.join(file)).with_context(|| format!("renaming into {file}"))?;
    Ok(())
}

/// Polls `check` until it returns `Ok(Some(v))`, for at most `timeout`.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    let mut last_err = None;
    loop {
        match check() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_err = Some(e),
        }
        if Instant::now() >= deadline {
            match last_err {
                Some(e) => bail!("timed out waiting for {what}: {e:#}"),
                None => bail!("timed out waiting for {what}"),
            }
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// A ClusterIP Service manifest.
pub fn service_yaml(
    name: &str,
    cluster_ip: &str,
    port: u16,
    target: u16,
    selector: Option<&str>,
) -> String {
    let selector = selector
        .map(|s| format!("  selector: {{app: {s}}}\n"))
        .unwrap_or_default();
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  clusterIP: {cluster_ip}\n{selector}  ports:\n  - {{name: http, port: {port}, targetPort: {target}, protocol: TCP}}\n"
    )
}

/// A Pod manifest carrying only what the endpoints controller needs (labels).
pub fn pod_yaml(name: &str, app: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: default, labels: {{app: {app}}}}}\nspec: {{containers: [{{name: c, image: busybox}}]}}\n"
    )
}

/// An EndpointSlice for `service` with the given ready addresses.
pub fn endpoint_slice_yaml(name: &str, service: &str, port: u16, addresses: &[String]) -> String {
    let endpoints: String = addresses
        .iter()
        .map(|a| format!("- addresses: [\"{a}\"]\n  conditions: {{ready: true}}\n"))
        .collect();
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}\n  namespace: default\n  labels: {{kubernetes.io/service-name: {service}}}\naddressType: IPv4\nports: [{{name: http, port: {port}, protocol: TCP}}]\nendpoints:\n{endpoints}"
    )
}

/// Names of the entries directly in `dir`, sorted (none if it does not exist):
/// link pins (`<bpffs>/links`), queued DELs (`<state>/del-queue`), endpoint
/// records (`<state>/endpoints`).
pub fn dir_entries(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return vec![];
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}
