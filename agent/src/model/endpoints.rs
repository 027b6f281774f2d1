//! Endpoints registered by the CNI plugin, persisted one file each under
//! `<state-dir>/endpoints/` so a restarted agent knows every pod it manages.

use crate::state_file;
use anyhow::{Context, Result};
use catena_api::{Attachment, Endpoint};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub type EndpointKey = Attachment;

pub fn key_of(ep: &Endpoint) -> EndpointKey {
    Attachment {
        container_id: ep.spec.container_id.clone(),
        ifname: ep.spec.ifname.clone(),
    }
}

#[derive(Debug)]
pub struct EndpointRegistry {
    dir: PathBuf,
    endpoints: BTreeMap<EndpointKey, Endpoint>,
}

impl EndpointRegistry {
    /// Loads every record; unreadable ones are moved aside (`*.corrupt`) and
    /// reported, never fatal.
    pub fn load(state_dir: &Path) -> Result<Self> {
        let dir = state_dir.join("endpoints");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut endpoints = BTreeMap::new();
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))?
        {
            let path = entry?.path();
            if state_file::is_temp_file(&path) {
                let _ = std::fs::remove_file(&path); // a write that never finished
                continue;
            }
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            match std::fs::read(&path)
                .map_err(anyhow::Error::from)
                .and_then(|b| serde_json::from_slice::<Endpoint>(&b).map_err(Into::into))
            {
                Ok(ep) => {
                    endpoints.insert(key_of(&ep), ep);
                }
                Err(e) => {
                    tracing::error!(file = %path.display(), error = %e, "unreadable endpoint record moved aside");
                    let _ = std::fs::rename(&path, path.with_extension("corrupt"));
                }
            }
        }
        Ok(EndpointRegistry { dir, endpoints })
    }

    pub fn get(&self, key: &EndpointKey) -> Option<&Endpoint> {
        self.endpoints.get(key)
    }

    pub fn all(&self) -> impl Iterator<Item = &Endpoint> {
        self.endpoints.values()
    }

    pub fn len(&self) -> usize {
        self.endpoints.len()
    }

    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty()
    }

    /// Smallest free endpoint id (ids are small so map keys and CLI output stay short).
    pub fn next_id(&self) -> u32 {
        let used: std::collections::BTreeSet<u32> = self.endpoints.values().map(|e| e.id).collect();
        (1..).find(|id| !used.contains(id)).unwrap_or(u32::MAX)
    }

    /// The endpoint using host interface `ifindex`, if any.
    pub fn by_ifindex(&self, ifindex: u32) -> Option<&Endpoint> {
        self.endpoints
            .values()
            .find(|e| e.spec.host_ifindex == ifindex)
    }

    pub fn save(&mut self, ep: Endpoint) -> Result<()> {
        write_record(&self.dir, &ep)?;
        self.endpoints.insert(key_of(&ep), ep);
        Ok(())
    }

    /// Adds or replaces `ep` in memory only; the caller persists it with
    /// [`write_record`] into [`EndpointRegistry::dir`] (an ADD does that
    /// while the programs attach, outside the agent's state lock).
    pub fn insert_unsaved(&mut self, ep: Endpoint) {
        self.endpoints.insert(key_of(&ep), ep);
    }

    /// Where the records live.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn remove(&mut self, key: &EndpointKey) -> Result<Option<Endpoint>> {
        let removed = self.endpoints.remove(key);
        match std::fs::remove_file(self.path_of(key)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).context("removing endpoint record"),
        }
        Ok(removed)
    }

    fn path_of(&self, key: &EndpointKey) -> PathBuf {
        record_path(&self.dir, key)
    }
}

fn record_path(dir: &Path, key: &EndpointKey) -> PathBuf {
    dir.join(format!("{}.json", file_stem(key)))
}

/// Persists `ep` as its record under `dir` (crash-safe, fsynced).
pub fn write_record(dir: &Path, ep: &Endpoint) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(ep)?;
    state_file::write_atomic(&record_path(dir, &key_of(ep)), &bytes)
}

/// `<container_id>_<ifname>` with anything outside `[A-Za-z0-9.-]` escaped, so
/// a hostile container id can never name a path outside the directory.
pub fn file_stem(key: &EndpointKey) -> String {
    fn clean(s: &str) -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    }
    format!("{}_{}", clean(&key.container_id), clean(&key.ifname))
}

#[cfg(test)]
mod tests {
    use super::*;
    use catena_api::EndpointSpec;

    fn ep(id: u32, cid: &str) -> Endpoint {
        Endpoint {
            id,
            spec: EndpointSpec {
                container_id: cid.into(),
                ifname: "eth0".into(),
                host_ifindex: 10 + id,
                ..Default::default()
            },
            identity: 256,
            attach_mode: "tcx".into(),
            created: "2026-01-01T00:00:00Z".into(),
        }
    }

    #[test]
    fn persists_and_recovers_from_corrupt_records() {
        let dir = tempfile::tempdir().unwrap();
        let mut reg = EndpointRegistry::load(dir.path()).unwrap();
        assert_eq!(reg.next_id(), 1);
        reg.save(ep(1, "aaa")).unwrap();
        reg.save(ep(2, "../../etc/passwd")).unwrap();
        assert_eq!(reg.next_id(), 3);
        std::fs::write(dir.path().join("endpoints/broken.json"), b"{\"id\": 1,").unwrap();
        std::fs::write(dir.path().join("endpoints/.x.json.tmp-1"), b"{").unwrap();

        let mut reg = EndpointRegistry::load(dir.path()).unwrap();
        assert_eq!(reg.len(), 2);
        assert!(dir.path().join("endpoints/broken.corrupt").exists());
        assert!(!dir.path().join("endpoints/.x.json.tmp-1").exists());
        assert_eq!(
            reg.by_ifindex(12).unwrap().spec.container_id,
            "../../etc/passwd"
        );
        let key = key_of(&ep(1, "aaa"));
        assert!(reg.remove(&key).unwrap().is_some());
        assert!(reg.remove(&key).unwrap().is_none(), "remove is idempotent");
        assert_eq!(reg.next_id(), 1);
        assert_eq!(EndpointRegistry::load(dir.path()).unwrap().len(), 1);
    }
}
