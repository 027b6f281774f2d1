//! The on-disk DEL queue: deletes the agent could not take (it was down) are
//! left as `<stateDir>/del-queue/<containerid>_<ifname>.json` for the agent
//! to drain when it starts. Entries are written to a temp file, fsynced and
//! renamed, so the agent never reads a torn one.

use catena_api::{QueuedDelete, DEL_QUEUE_DIR, DEL_QUEUE_MAX};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

pub fn queue_dir(state_dir: &Path) -> PathBuf {
    state_dir.join(DEL_QUEUE_DIR)
}

pub fn entry_name(container_id: &str, ifname: &str) -> String {
    format!("{container_id}_{ifname}.json")
}

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Queues `entry`, bounded by [`DEL_QUEUE_MAX`]. Returns the entry's path.
pub fn enqueue(state_dir: &Path, entry: &QueuedDelete) -> io::Result<PathBuf> {
    enqueue_bounded(state_dir, entry, DEL_QUEUE_MAX)
}

pub fn enqueue_bounded(state_dir: &Path, entry: &QueuedDelete, max: usize) -> io::Result<PathBuf> {
    let dir = queue_dir(state_dir);
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)?;
    let name = entry_name(&entry.container_id, &entry.ifname);
    let path = dir.join(&name);

    // containerd repeats DEL without CNI_NETNS: keep the ifindex an earlier
    // attempt learned, and the earlier time (the entry's age orders pruning).
    let mut entry = entry.clone();
    if let Some(old) = fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice::<QueuedDelete>(&b).ok())
    {
        if entry.host_ifindex.is_none() && old.host_ifindex.is_some() {
            entry.host_ifindex = old.host_ifindex;
        } else if entry.host_ifindex == old.host_ifindex {
            return Ok(path); // nothing new to say
        }
        entry.queued_at = old.queued_at;
    }

    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let body = serde_json::to_vec(&entry).map_err(io::Error::other)?;
    let write = || -> io::Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&body)?;
        f.sync_all()?;
        fs::rename(&tmp, &path)?;
        File::open(&dir)?.sync_all()
    };
    if let Err(e) = write() {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    prune(&dir, max)?;
    Ok(path)
}

/// Drops the oldest entries beyond `max` (by mtime, then name, so the order
/// is total). A full queue means the agent has been down for a long time;
/// the newest deletes are the ones most likely still to matter.
fn prune(dir: &Path, max: usize) -> io::Result<()> {
    let mut entries: Vec<(SystemTime, String)> = fs::read_dir(dir)?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            (name.ends_with(".json") && !name.starts_with('.'))
                .then(|| Some((e.metadata().ok()?.modified().ok()?, name)))?
        })
        .collect();
    if entries.len() <= max {
        return Ok(());
    }
    entries.sort();
    let excess = entries.len() - max;
    for (_, name) in entries.into_iter().take(excess) {
        match fs::remove_file(dir.join(&name)) {
            Ok(()) => crate::diag!("DEL queue is full ({max}): dropped the oldest entry {name}"),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {} // another DEL pruned it
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(cid: &str, ifindex: Option<u32>, at: u64) -> QueuedDelete {
        QueuedDelete {
            container_id: cid.into(),
            ifname: "eth0".into(),
            host_ifindex: ifindex,
            queued_at: at,
        }
    }

    fn read(p: &Path) -> QueuedDelete {
        serde_json::from_slice(&fs::read(p).unwrap()).unwrap()
    }

    #[test]
    fn writes_the_api_format_without_leftovers() {
        let state = tempfile::tempdir().unwrap();
        let p = enqueue(state.path(), &entry("abc", Some(7), 100)).unwrap();
        assert_eq!(p, state.path().join("del-queue/abc_eth0.json"));
        assert_eq!(read(&p), entry("abc", Some(7), 100));
        let names: Vec<_> = fs::read_dir(p.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("abc_eth0.json")]);
    }

    #[test]
    fn repeated_del_keeps_what_the_first_one_learned() {
        let state = tempfile::tempdir().unwrap();
        let p = enqueue(state.path(), &entry("abc", Some(7), 100)).unwrap();
        enqueue(state.path(), &entry("abc", None, 200)).unwrap();
        assert_eq!(read(&p), entry("abc", Some(7), 100));
        // A later attempt that did learn the ifindex fills it in.
        let q = enqueue(state.path(), &entry("xyz", None, 100)).unwrap();
        enqueue(state.path(), &entry("xyz", Some(9), 300)).unwrap();
        assert_eq!(read(&q), entry("xyz", Some(9), 100));
    }

    #[test]
    fn bounded_queue_drops_the_oldest() {
        let state = tempfile::tempdir().unwrap();
        let dir = queue_dir(state.path());
        for i in 0..5u64 {
            let p = enqueue_bounded(state.path(), &entry(&format!("c{i}"), None, i), 3).unwrap();
            // Distinct, increasing mtimes regardless of filesystem granularity.
            let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000 + i);
            File::options()
                .write(true)
                .open(&p)
                .unwrap()
                .set_modified(t)
                .unwrap();
        }
        let mut left: Vec<String> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        // c0 and c1 were pruned when c3 and c4 arrived.
        assert_eq!(left, vec!["c2_eth0.json", "c3_eth0.json", "c4_eth0.json"]);
    }

    #[test]
    fn unwritable_state_dir_is_an_error() {
        let state = tempfile::tempdir().unwrap();
        let file = state.path().join("not-a-dir");
        fs::write(&file, b"x").unwrap();
        assert!(enqueue(&file, &entry("abc", None, 1)).is_err());
    }
}
