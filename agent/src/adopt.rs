//! Adopting pods that were running before catena was installed.
//!
//! Runtimes (containerd, CRI-O, podman through libcni) keep each attachment's
//! final CNI result in a cache (`<cache-dir>/results/<network>-<cid>-<ifname>`,
//! format `cniCacheV1`). At start the agent reads it and registers every
//! attachment of a network that now chains catena, finding the host veth
//! exactly as the plugin's ADD does — without restarting the pods.

use anyhow::{Context, Result};
use base64::Engine;
use catena_api::{EndpointSpec, PodRef};
use serde::Deserialize;
use std::collections::BTreeSet;
use std::path::Path;

/// The parts of libcni's cache entry we use.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CacheEntry {
    kind: String,
    container_id: String,
    if_name: String,
    network_name: String,
    #[serde(default)]
    netns: String,
    /// Go marshals the conflist bytes as base64.
    #[serde(default)]
    config: String,
    #[serde(default)]
    cni_args: Vec<(String, String)>,
    result: Box<serde_json::value::RawValue>,
}

/// An attachment the agent should register, or why it was passed over.
#[derive(Debug)]
pub enum Finding {
    Adopt(EndpointSpec),
    Skip { file: String, reason: String },
}

/// Networks whose conflist in `conf_dir` chains catena-cni.
pub fn chained_networks(conf_dir: &Path) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let Ok(entries) = std::fs::read_dir(conf_dir) else {
        return names;
    };
    for entry in entries.flatten() {
        let Ok(text) = std::fs::read(entry.path()) else {
            continue;
        };
        let Ok(conf) = serde_json::from_slice::<serde_json::Value>(&text) else {
            continue;
        };
        if chains_catena(&conf) {
            if let Some(name) = conf["name"].as_str() {
                names.insert(name.to_string());
            }
        }
    }
    names
}

fn chains_catena(conf: &serde_json::Value) -> bool {
    conf["plugins"]
        .as_array()
        .is_some_and(|p| p.iter().any(|p| p["type"] == "catena-cni"))
}

/// Reads the runtime's cache and resolves each relevant attachment to its host
/// veth. Unreadable entries and vanished pods are reported, never fatal.
pub fn scan(cache_dir: &Path, chained: &BTreeSet<String>) -> Result<Vec<Finding>> {
    let dir = cache_dir.join("results");
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
    };
    let mut findings = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        let file = path.display().to_string();
        let skip = |reason: String| Finding::Skip {
            file: file.clone(),
            reason,
        };
        let entry: CacheEntry = match std::fs::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
        {
            Ok(e) => e,
            Err(e) => {
                findings.push(skip(format!("unreadable cache entry: {e}")));
                continue;
            }
        };
        if entry.kind != "cniCacheV1" {
            findings.push(skip(format!("unknown cache kind {:?}", entry.kind)));
            continue;
        }
        let config_chains = base64::engine::general_purpose::STANDARD
            .decode(entry.config.as_bytes())
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .is_some_and(|c| chains_catena(&c));
        if !config_chains && !chained.contains(&entry.network_name) {
            continue; // a network catena is not part of: not ours to manage
        }
        findings.push(match resolve(&entry) {
            Ok(spec) => Finding::Adopt(spec),
            Err(reason) => skip(reason),
        });
    }
    Ok(findings)
}

fn resolve(entry: &CacheEntry) -> Result<EndpointSpec, String> {
    if entry.netns.is_empty() || !Path::new(&entry.netns).exists() {
        return Err(format!("pod network namespace {:?} is gone", entry.netns));
    }
    let result = catena_cni::result::PrevResult::parse(&entry.result).map_err(|e| e.to_string())?;
    let ips = result.ips_for(&entry.if_name).map_err(|e| e.to_string())?;
    let host = catena_cni::veth::find_host_veth(Path::new(&entry.netns), &entry.if_name)
        .map_err(|e| e.to_string())?;
    let arg = |key: &str| {
        entry
            .cni_args
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    Ok(EndpointSpec {
        network: entry.network_name.clone(),
        container_id: entry.container_id.clone(),
        ifname: entry.if_name.clone(),
        netns: entry.netns.clone(),
        host_ifname: host.name,
        host_ifindex: host.index,
        ips,
        pod: PodRef {
            namespace: arg("K8S_POD_NAMESPACE"),
            name: arg("K8S_POD_NAME"),
            uid: arg("K8S_POD_UID"),
        },
        labels: Default::default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn only_networks_that_chain_catena_are_considered() {
        let conf = tempfile::tempdir().unwrap();
        std::fs::write(
            conf.path().join("05-catena.conflist"),
            json!({"name": "k8s", "plugins": [{"type": "ptp"}, {"type": "catena-cni"}]})
                .to_string(),
        )
        .unwrap();
        std::fs::write(
            conf.path().join("10-other.conflist"),
            json!({"name": "other", "plugins": [{"type": "bridge"}]}).to_string(),
        )
        .unwrap();
        std::fs::write(conf.path().join("99-broken.conflist"), "{").unwrap();
        let chained = chained_networks(conf.path());
        assert_eq!(chained, BTreeSet::from(["k8s".to_string()]));

        let cache = tempfile::tempdir().unwrap();
        let results = cache.path().join("results");
        std::fs::create_dir_all(&results).unwrap();
        let entry = |net: &str, netns: &str| {
            json!({"kind": "cniCacheV1", "containerId": "c1", "ifName": "eth0", "networkName": net,
                   "netns": netns, "config": "", "cniArgs": [["K8S_POD_NAME", "web"]],
                   "result": {"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.5/24"}]}})
            .to_string()
        };
        std::fs::write(
            results.join("k8s-c1-eth0"),
            entry("k8s", "/nonexistent/netns"),
        )
        .unwrap();
        std::fs::write(
            results.join("other-c1-eth0"),
            entry("other", "/nonexistent/netns"),
        )
        .unwrap();
        std::fs::write(results.join("garbage"), "not json").unwrap();
        let findings = scan(cache.path(), &chained).unwrap();
        let reasons: Vec<String> = findings
            .iter()
            .map(|f| match f {
                Finding::Skip { reason, .. } => reason.clone(),
                Finding::Adopt(s) => panic!("adopted {s:?}"),
            })
            .collect();
        assert_eq!(reasons.len(), 2, "{reasons:?}");
        assert!(reasons.iter().any(|r| r.contains("is gone")), "{reasons:?}");
        assert!(
            reasons.iter().any(|r| r.contains("unreadable")),
            "{reasons:?}"
        );
    }
}
