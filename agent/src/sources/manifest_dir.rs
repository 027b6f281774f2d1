//! The standalone source's state: every manifest file with its last good parse.
//! A file that stops parsing keeps its previous objects (and reports why), so a
//! typo never takes a Service or a policy out of the datapath.

use super::manifests::{self, ManifestError};
use super::{ClusterState, Object};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

#[derive(Clone, Debug, PartialEq, Eq)]
struct Fingerprint {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

#[derive(Debug)]
struct FileState {
    fingerprint: Fingerprint,
    /// Objects of the last successful parse.
    objects: Vec<Object>,
    error: Option<ManifestError>,
}

#[derive(Debug)]
pub struct ManifestDir {
    dir: PathBuf,
    files: BTreeMap<PathBuf, FileState>,
}

/// What a rescan found.
#[derive(Debug, Default)]
pub struct Rescan {
    /// Some file was added, changed or removed.
    pub changed: bool,
    /// Files that failed to parse in this rescan (their old objects stay).
    pub new_errors: Vec<ManifestError>,
}

impl ManifestDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        ManifestDir {
            dir: dir.into(),
            files: BTreeMap::new(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Re-reads files whose size, mtime or inode changed (an atomic rename gives
    /// a new inode), forgets removed files.
    pub fn rescan(&mut self) -> std::io::Result<Rescan> {
        let mut seen = Vec::new();
        let mut result = Rescan::default();
        list_manifest_files(&self.dir, &mut seen)?;
        for path in &seen {
            let Ok(meta) = std::fs::metadata(path) else {
                continue; // vanished between listing and stat
            };
            let fingerprint = Fingerprint {
                modified: meta.modified().ok(),
                len: meta.len(),
                inode: std::os::unix::fs::MetadataExt::ino(&meta),
            };
            if self
                .files
                .get(path)
                .is_some_and(|f| f.fingerprint == fingerprint)
            {
                continue;
            }
            result.changed = true;
            let parse = std::fs::read_to_string(path)
                .map_err(|e| ManifestError {
                    file: path.clone(),
                    line: 0,
                    reason: format!("cannot read: {e}"),
                })
                .and_then(|text| manifests::parse(path, &text));
            let previous = self.files.remove(path);
            let state = match parse {
                Ok(parsed) => {
                    for skipped in &parsed.ignored {
                        tracing::debug!(file = %path.display(), object = %skipped, "ignoring kind catena does not use");
                    }
                    FileState {
                        fingerprint,
                        objects: parsed.objects,
                        error: None,
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "manifest rejected; keeping its last good state");
                    result.new_errors.push(error.clone());
                    FileState {
                        fingerprint,
                        objects: previous.map(|p| p.objects).unwrap_or_default(),
                        error: Some(error),
                    }
                }
            };
            self.files.insert(path.clone(), state);
        }
        let before = self.files.len();
        // `seen` is sorted: a linear `contains` per file made every rescan
        // quadratic (1k files: ~70 ms per change, most of the change ->
        // datapath latency).
        self.files.retain(|p, _| seen.binary_search(p).is_ok());
        result.changed |= self.files.len() != before;
        Ok(result)
    }

    /// The merged state of every file (files in path order; a later duplicate
    /// wins and is reported).
    pub fn state(&self) -> (ClusterState, Vec<String>) {
        let mut state = ClusterState::default();
        let mut duplicates = Vec::new();
        for (path, file) in &self.files {
            for object in &file.objects {
                if let Some(dup) = state.insert(object.clone()) {
                    duplicates.push(format!("{dup} defined again in {}", path.display()));
                }
            }
        }
        (state, duplicates)
    }

    /// Current problems, one line each: `file:line: reason`.
    pub fn errors(&self) -> Vec<String> {
        self.files
            .values()
            .filter_map(|f| f.error.as_ref().map(|e| e.to_string()))
            .collect()
    }
}

/// `*.yaml`, `*.yml` and `*.json`, recursively; hidden files and editor/temp
/// files are skipped so a half-written file is never read.
fn list_manifest_files(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') || name.ends_with('~') {
            continue;
        }
        let file_type = entry.file_type()?;
        if file_type.is_dir() {
            list_manifest_files(&path, out)?;
        } else if name.ends_with(".yaml") || name.ends_with(".yml") || name.ends_with(".json") {
            out.push(path);
        }
    }
    out.sort();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    const SVC: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}\n";

    #[test]
    fn keeps_last_good_state_and_picks_up_changes() {
        let dir = tempfile::tempdir().unwrap();
        let mut md = ManifestDir::new(dir.path());
        assert!(!md.rescan().unwrap().changed);

        fs::write(dir.path().join("svc.yaml"), SVC).unwrap();
        assert!(md.rescan().unwrap().changed);
        assert_eq!(md.state().0.services.len(), 1);
        assert!(
            !md.rescan().unwrap().changed,
            "unchanged files are not re-read"
        );

        // A broken edit keeps the service and reports the file and line.
        fs::write(
            dir.path().join("svc.yaml"),
            "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {ports: [{port: x}]}\n",
        )
        .unwrap();
        let r = md.rescan().unwrap();
        assert_eq!(r.new_errors.len(), 1);
        assert_eq!(md.state().0.services.len(), 1);
        assert!(md.errors()[0].contains("svc.yaml:1:"), "{:?}", md.errors());

        // An atomic rename replaces it; the error clears.
        let tmp = dir.path().join(".svc.yaml.new");
        fs::write(&tmp, SVC.replace("web", "api")).unwrap();
        fs::rename(&tmp, dir.path().join("svc.yaml")).unwrap();
        md.rescan().unwrap();
        let (state, _) = md.state();
        assert!(state.services.keys().all(|k| k.name == "api"));
        assert!(md.errors().is_empty());

        fs::remove_file(dir.path().join("svc.yaml")).unwrap();
        assert!(md.rescan().unwrap().changed);
        assert!(md.state().0.services.is_empty());
    }

    #[test]
    fn forgets_removed_files_among_many_in_nested_dirs() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("sub")).unwrap();
        let svc = |i: usize| SVC.replace("web", &format!("web-{i}"));
        for i in 0..50 {
            let sub = if i % 2 == 0 { "" } else { "sub/" };
            fs::write(dir.path().join(format!("{sub}s{i}.yaml")), svc(i)).unwrap();
        }
        let mut md = ManifestDir::new(dir.path());
        md.rescan().unwrap();
        assert_eq!(md.state().0.services.len(), 50);
        fs::remove_file(dir.path().join("s10.yaml")).unwrap();
        fs::remove_file(dir.path().join("sub/s33.yaml")).unwrap();
        assert!(md.rescan().unwrap().changed);
        let (state, _) = md.state();
        let names: Vec<&str> = state.services.keys().map(|k| k.name.as_str()).collect();
        assert_eq!(names.len(), 48);
        assert!(!names.contains(&"web-10") && !names.contains(&"web-33"));
        assert!(
            !md.rescan().unwrap().changed,
            "the files still there are kept, not re-read"
        );
    }

    #[test]
    fn reports_duplicates_across_files() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("a.yaml"), SVC).unwrap();
        fs::create_dir(dir.path().join("more")).unwrap();
        fs::write(dir.path().join("more/b.yml"), SVC).unwrap();
        fs::write(dir.path().join("notes.txt"), "not a manifest").unwrap();
        let mut md = ManifestDir::new(dir.path());
        md.rescan().unwrap();
        let (state, dups) = md.state();
        assert_eq!(state.services.len(), 1);
        assert_eq!(dups.len(), 1, "{dups:?}");
    }
}
