//! One scenario suite, two sources: the same scenario drives the agent either
//! through a manifest directory (standalone mode) or through the lab's test
//! Kubernetes API server (kube-rs list/watch), with the same calls.

use anyhow::{Context, Result};
use catena_lab::apiserver::ApiServer;
use catena_lab::{Agent, Node};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceKind {
    Manifests,
    Kubernetes,
}

/// An object on the test API server: (kind, namespace, name).
type ObjectRef = (String, String, String);

pub struct ClusterSource {
    kind: SourceKind,
    dir: PathBuf,
    api: Option<ApiServer>,
    /// Objects each "file" created on the API server: (kind, namespace, name).
    applied: Mutex<BTreeMap<String, Vec<ObjectRef>>>,
}

impl ClusterSource {
    pub fn new(kind: SourceKind, node: &Node) -> Result<Self> {
        let dir = node.dir().join("manifests");
        std::fs::create_dir_all(&dir)?;
        let api = match kind {
            SourceKind::Manifests => None,
            SourceKind::Kubernetes => Some(ApiServer::start_in(node.netns())?),
        };
        Ok(ClusterSource {
            kind,
            dir,
            api,
            applied: Mutex::new(BTreeMap::new()),
        })
    }

    pub fn kind(&self) -> SourceKind {
        self.kind
    }

    pub fn start_agent<'n>(&self, node: &'n Node, extra_args: &[&str]) -> Result<Agent<'n>> {
        match &self.api {
            None => node.start_agent(&self.dir, extra_args),
            Some(api) => node.start_agent_kube(&api.write_kubeconfig(node.dir())?, extra_args),
        }
    }

    /// Makes the cluster hold exactly the objects of `yaml` under the name
    /// `file`: a file written atomically, or creates/updates (and deletes of
    /// objects the previous version had) on the API server.
    pub fn apply(&self, file: &str, yaml: &str) -> Result<()> {
        let Some(api) = &self.api else {
            return crate::write_manifest(&self.dir, file, yaml);
        };
        let mut now = Vec::new();
        for doc in serde_yaml::Deserializer::from_str(yaml) {
            let value = serde_yaml::Value::deserialize(doc).context("test YAML")?;
            if value.is_null() {
                continue;
            }
            let object: serde_json::Value = serde_json::to_value(value)?;
            let kind = object["kind"].as_str().context("kind")?.to_string();
            let ns = object["metadata"]["namespace"]
                .as_str()
                .unwrap_or("default")
                .to_string();
            let name = object["metadata"]["name"]
                .as_str()
                .context("name")?
                .to_string();
            api.apply(object)?;
            now.push((kind, ns, name));
        }
        let mut applied = self.applied.lock().unwrap();
        for old in applied.get(file).into_iter().flatten() {
            if !now.contains(old) {
                api.delete(&old.0, &old.1, &old.2)?;
            }
        }
        applied.insert(file.to_string(), now);
        Ok(())
    }

    /// Removes everything `file` held.
    pub fn remove(&self, file: &str) -> Result<()> {
        match &self.api {
            None => Ok(std::fs::remove_file(self.dir.join(file))?),
            Some(api) => {
                let gone = self
                    .applied
                    .lock()
                    .unwrap()
                    .remove(file)
                    .unwrap_or_default();
                for (kind, ns, name) in gone {
                    api.delete(&kind, &ns, &name)?;
                }
                Ok(())
            }
        }
    }

    /// The manifest dir (standalone mode only).
    pub fn dir(&self) -> &std::path::Path {
        &self.dir
    }
}
