//! Drives a [`ManifestDir`]: inotify (through `notify`) for prompt pick-up, plus
//! a slow periodic rescan as a safety net for events a watcher can miss. Each
//! change publishes a fresh [`ClusterState`] snapshot.

use super::manifest_dir::ManifestDir;
use super::ClusterState;
use anyhow::{Context, Result};
use notify::{RecursiveMode, Watcher};
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
        if res.is_ok() {
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
