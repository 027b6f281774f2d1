//! Drives a [`ManifestDir`]: inotify (through `notify`) for prompt pick-up, plus
//! a slow periodic rescan as a safety net for events a watcher can miss. Each
//! change publishes a fresh [`ClusterState`] snapshot.

use super::manifest_dir::ManifestDir;
use super::ClusterState;
use anyhow::{Context, Result};
use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecursiveMode, Watcher};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// What the source reports besides the state itself.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SourceUpdate {
    pub state: Arc<ClusterState>,
    /// Current problems (`file:line: reason`).
    pub errors: Vec<String>,
    /// Monotonic counter of published snapshots.
    pub generation: u64,
}

/// One write makes a burst of inotify events (create, modify, close, rename)
/// within microseconds; a short settle folds them into one rescan. Kept
/// short because it is paid by every change (policy change -> enforced).
/// An editor that writes a file in steps further apart than this can make
/// one rescan see a half-written file: that file is reported and its last
/// good content stays in force until the next event, so nothing is lost.
pub const DEBOUNCE: Duration = Duration::from_millis(3);
const SAFETY_RESCAN: Duration = Duration::from_secs(2);

/// Reads the directory once (so the caller can program the datapath before
/// reporting ready) and then keeps watching it in a task.
pub async fn watch_manifest_dir(dir: PathBuf) -> Result<watch::Receiver<SourceUpdate>> {
    anyhow::ensure!(
        dir.is_dir(),
        "--manifests {}: not a directory",
        dir.display()
    );
    let mut md = ManifestDir::new(&dir);
    md.rescan()
        .with_context(|| format!("reading manifests in {}", dir.display()))?;
    let (tx, rx) = watch::channel(snapshot(&md, 1));

    let (event_tx, mut event_rx) = mpsc::unbounded_channel::<()>();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        // A watcher error (e.g. queue overflow) may hide changes: rescan.
        if res.as_ref().map_or(true, |e| may_change_content(&e.kind)) {
            let _ = event_tx.send(());
        }
    })
    .context("creating the manifest directory watcher")?;
    watcher
        .watch(&dir, RecursiveMode::Recursive)
        .with_context(|| format!("watching {}", dir.display()))?;

    tokio::spawn(async move {
        let _watcher = watcher; // dropped (and stopped) with the task
        let mut generation = 1;
        let mut ticker = tokio::time::interval(SAFETY_RESCAN);
        loop {
            tokio::select! {
                ev = event_rx.recv() => {
                    if ev.is_none() { break; }
                    // Settle the burst of one write, then drain it.
                    tokio::time::sleep(DEBOUNCE).await;
                    while event_rx.try_recv().is_ok() {}
                }
                _ = ticker.tick() => {}
            }
            match md.rescan() {
                Ok(r) if r.changed => {
                    generation += 1;
                    if tx.send(snapshot(&md, generation)).is_err() {
                        break;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(dir = %md.dir().display(), error = %e, "cannot list manifests; keeping the last state")
                }
            }
        }
    });
    Ok(rx)
}

/// Whether an event can mean changed manifests. inotify (as `notify` sets it
/// up) also reports opens, reads and read-only closes, and every rescan
/// opens the directory itself: reacting to those made each rescan trigger
/// the next one, a loop of a few hundred rescans per second on an idle node.
fn may_change_content(kind: &EventKind) -> bool {
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}

fn snapshot(md: &ManifestDir, generation: u64) -> SourceUpdate {
    let (state, duplicates) = md.state();
    let mut errors = md.errors();
    errors.extend(duplicates);
    SourceUpdate {
        state: Arc::new(state),
        errors,
        generation,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc as std_mpsc;

    /// The events the real inotify backend delivers for `action`, until
    /// 300 ms pass without one.
    fn events_of(dir: &std::path::Path, action: impl FnOnce()) -> Vec<EventKind> {
        let (tx, rx) = std_mpsc::channel();
        let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            if let Ok(e) = res {
                let _ = tx.send(e.kind);
            }
        })
        .unwrap();
        watcher.watch(dir, RecursiveMode::Recursive).unwrap();
        action();
        let mut kinds = Vec::new();
        let wait = Duration::from_millis(300);
        while let Ok(kind) = rx.recv_timeout(wait) {
            kinds.push(kind);
        }
        kinds
    }

    #[test]
    fn a_rescan_of_the_directory_does_not_trigger_another() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("svc.yaml"), "kind: Namespace\n").unwrap();
        // What a rescan does: list the directory, stat and read its files.
        let kinds = events_of(dir.path(), || {
            let mut md = ManifestDir::new(dir.path());
            md.rescan().unwrap();
        });
        assert!(
            !kinds.is_empty(),
            "inotify reported nothing for a rescan; the test no longer sees what caused the loop"
        );
        let triggering: Vec<_> = kinds.iter().filter(|k| may_change_content(k)).collect();
        assert!(
            triggering.is_empty(),
            "a rescan would trigger rescans: {triggering:?}"
        );
    }

    #[test]
    fn writes_renames_and_removals_trigger_a_rescan() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("svc.yaml");
        for (what, action) in [
            (
                "write",
                Box::new(|| std::fs::write(&file, "a: 1\n").unwrap()) as Box<dyn FnOnce()>,
            ),
            (
                "rename into place",
                Box::new(|| {
                    let tmp = dir.path().join(".svc.yaml.tmp");
                    std::fs::write(&tmp, "a: 2\n").unwrap();
                    std::fs::rename(&tmp, &file).unwrap();
                }),
            ),
            ("remove", Box::new(|| std::fs::remove_file(&file).unwrap())),
        ] {
            let kinds = events_of(dir.path(), action);
            assert!(
                kinds.iter().any(may_change_content),
                "{what}: no event would trigger a rescan: {kinds:?}"
            );
        }
    }
}
