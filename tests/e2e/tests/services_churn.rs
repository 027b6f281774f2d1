//! Backend churn under sustained load, through the real chain (ptp +
//! host-local, then catena-cni, the real agent in standalone mode): a
//! Service with four backends, two client pods holding long-lived TCP
//! streams (a round trip every 10 ms) and opening new connections
//! continuously, while the EndpointSlice drops and adds backends again and
//! again. Removing a backend ends only its own flows, promptly (the next
//! packet of such a flow is reset); streams to backends that stay never see
//! an error while the slots around them are renumbered; no new connection
//! fails unless its backend's removal caught it mid-exchange (like a
//! stream), and none reaches a backend after its removal took effect.

use catena_e2e::{endpoint_slice_yaml, service_yaml, wait_for_backends, write_manifest};
use catena_lab::traffic::{serve_echo, EchoStream};
use catena_lab::{CallArgs, CniRunner, Node, Pod};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const VIP: &str = "10.96.0.80";
const PORT: u16 = 9000;
const STREAM_EVERY: Duration = Duration::from_millis(10);
const NEW_CONN_EVERY: Duration = Duration::from_millis(20);
const IO_TIMEOUT: Duration = Duration::from_secs(3);
/// How long after the agent shows a backend gone its streams must have
/// ended. They end at their next round trip (10 ms); this is generous.
const END_WITHIN: Duration = Duration::from_secs(1);
/// Each edit stays in force this long before the next.
const DWELL: Duration = Duration::from_millis(400);

fn vip() -> SocketAddr {
    format!("{VIP}:80").parse().unwrap()
}

/// How a stream ended (only if it did before the test stopped it).
#[derive(Clone, Debug)]
struct StreamEnd {
    at: Instant,
    kind: std::io::ErrorKind,
    error: String,
}

impl StreamEnd {
    /// The end a connection met just now, by `e`.
    fn now(e: &std::io::Error) -> StreamEnd {
        StreamEnd {
            at: Instant::now(),
            kind: e.kind(),
            error: e.to_string(),
        }
    }

    /// A reset or close by the peer: how a backend's removal ends a flow
    /// (its next packet reaches another backend, which resets it).
    fn is_reset_or_close(&self) -> bool {
        matches!(
            self.kind,
            std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::UnexpectedEof
                | std::io::ErrorKind::BrokenPipe
        )
    }
}

struct StreamLog {
    backend: String,
    round_trips: u64,
    end: Option<StreamEnd>,
}

/// One new connection: when it started, which backend greeted it (if one
/// did) and, if it failed, when and how.
#[derive(Clone, Debug)]
struct NewConn {
    started: Instant,
    backend: Option<String>,
    failure: Option<StreamEnd>,
}

fn run_stream(mut s: EchoStream, stop: Arc<AtomicBool>) -> StreamLog {
    let mut round_trips = 0;
    while !stop.load(Ordering::SeqCst) {
        if let Err(e) = s.round_trip(256) {
            return StreamLog {
                backend: s.backend.clone(),
                round_trips,
                end: Some(StreamEnd::now(&e)),
            };
        }
        round_trips += 1;
        std::thread::sleep(STREAM_EVERY);
    }
    let backend = s.backend.clone();
    s.abort();
    StreamLog {
        backend,
        round_trips,
        end: None,
    }
}

fn new_connections(
    client: &Pod,
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<Vec<NewConn>>>,
) -> anyhow::Result<JoinHandle<anyhow::Result<()>>> {
    // The outer Result of the thread is entering the namespace.
    client.netns().spawn_thread(move || {
        while !stop.load(Ordering::SeqCst) {
            let started = Instant::now();
            let mut backend = None;
            let r = EchoStream::connect(vip(), IO_TIMEOUT).and_then(|mut s| {
                backend = Some(s.backend.clone());
                s.round_trip(64)?;
                s.abort();
                Ok(())
            });
            let failure = r.err().map(|e| StreamEnd::now(&e));
            log.lock().unwrap().push(NewConn {
                started,
                backend,
                failure,
            });
            std::thread::sleep(NEW_CONN_EVERY.saturating_sub(started.elapsed()));
        }
    })
}

/// Raises the stop flag when dropped, so an early failure stops the load.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Entries of the pinned LB4_MAGLEV map, as bpftool (not the agent) sees it.
fn maglev_tables(node: &Node) -> anyhow::Result<usize> {
    let out = std::process::Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(node.bpffs_dir().join("maps/LB4_MAGLEV"))
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "bpftool: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let entries: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout)?;
    Ok(entries.len())
}

/// One edit of the backend set, as requested and as seen programmed.
struct Edit {
    removed: Option<String>,
    added: Option<String>,
    requested: Instant,
    programmed: Instant,
}

#[test]
fn backend_churn_ends_only_the_removed_backends_flows() -> anyhow::Result<()> {
    churn("e2e-churn", &[])
}

/// The same with Maglev selection: the tables are rewritten on every edit,
/// established flows still keep their backend.
#[test]
fn backend_churn_with_maglev_ends_only_the_removed_backends_flows() -> anyhow::Result<()> {
    churn("e2e-churnmg", &["--lb-algorithm", "maglev"])
}

fn churn(tag: &str, agent_args: &[&str]) -> anyhow::Result<()> {
    let node = Node::new(tag)?;
    let manifests = node.dir().join("manifests");
    write_manifest(
        &manifests,
        "svc.yaml",
        &service_yaml("churn", VIP, 80, PORT, None),
    )?;
    let agent = node.start_agent(&manifests, agent_args)?;
    let api = agent.client();
    let conf = node.ptp_conflist("e2e", "10.244.8.0/24", "1.0.0", vec![node.catena_plugin()])?;
    let cni = CniRunner::new(&node, conf);
    let clients = [node.pod("client-1")?, node.pod("client-2")?];
    let backends: Vec<Pod> = (0..6)
        .map(|i| node.pod(&format!("b{i}")))
        .collect::<anyhow::Result<_>>()?;
    for pod in clients.iter().chain(&backends) {
        cni.add(pod, "eth0", &CallArgs::default())?;
    }
    let _servers = backends
        .iter()
        .map(|b| serve_echo(b.netns(), PORT, &b.name))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let ip_of: BTreeMap<String, String> = backends
        .iter()
        .map(|b| Ok((b.name.clone(), b.ipv4()?.to_string())))
        .collect::<anyhow::Result<_>>()?;
    let frontend = format!("{VIP}:80/TCP");

    // Applies a backend set and waits until the agent shows it programmed.
    let apply = |set: &BTreeSet<String>| -> anyhow::Result<Instant> {
        let addrs: Vec<String> = set.iter().map(|n| ip_of[n].clone()).collect();
        write_manifest(
            &manifests,
            "slice.yaml",
            &endpoint_slice_yaml("churn-1", "churn", PORT, &addrs),
        )?;
        let want = addrs.iter().map(|a| format!("{a}:{PORT}")).collect();
        wait_for_backends(&api, &frontend, want)?;
        Ok(Instant::now())
    };
    let mut current: BTreeSet<String> = ["b0", "b1", "b2", "b3"].map(String::from).into();
    apply(&current)?;
    // The Maglev run really selects through a table (one per frontend).
    let maglev = agent_args.contains(&"maglev");
    assert_eq!(maglev_tables(&node)?, usize::from(maglev));

    // Long-lived streams until every initial backend holds at least two.
    let stop = Arc::new(AtomicBool::new(false));
    let _stop_guard = StopOnDrop(stop.clone());
    let mut streams: Vec<JoinHandle<StreamLog>> = Vec::new();
    let mut per_backend: BTreeMap<String, usize> = BTreeMap::new();
    for attempt in 0..80 {
        if current
            .iter()
            .all(|b| per_backend.get(b).copied().unwrap_or(0) >= 2)
        {
            break;
        }
        let client = &clients[attempt % 2];
        let s = client
            .netns()
            .enter_thread(|| EchoStream::connect(vip(), IO_TIMEOUT))??;
        *per_backend.entry(s.backend.clone()).or_default() += 1;
        let stop = stop.clone();
        streams.push(std::thread::spawn(move || run_stream(s, stop)));
    }
    assert!(
        current
            .iter()
            .all(|b| per_backend.get(b).copied().unwrap_or(0) >= 2),
        "streams did not reach every backend: {per_backend:?}"
    );
    let new_log = Arc::new(Mutex::new(Vec::new()));
    let openers = clients
        .iter()
        .map(|c| new_connections(c, stop.clone(), new_log.clone()))
        .collect::<anyhow::Result<Vec<_>>>()?;
    std::thread::sleep(DWELL);

    // b2 and b3 stay throughout; b0 and b1 go, come back and go again; the
    // spares b4 and b5 come and go in between.
    let steps: [(Option<&str>, Option<&str>); 8] = [
        (Some("b0"), None),
        (None, Some("b4")),
        (Some("b1"), None),
        (None, Some("b0")),
        (Some("b4"), None),
        (None, Some("b5")),
        (Some("b0"), None),
        (None, Some("b1")),
    ];
    let mut edits = Vec::new();
    for (remove, add) in steps {
        if let Some(b) = remove {
            current.remove(b);
        }
        if let Some(b) = add {
            current.insert(b.to_string());
        }
        let requested = Instant::now();
        let programmed = apply(&current)?;
        edits.push(Edit {
            removed: remove.map(String::from),
            added: add.map(String::from),
            requested,
            programmed,
        });
        std::thread::sleep(DWELL);
    }
    stop.store(true, Ordering::SeqCst);
    let logs: Vec<StreamLog> = streams
        .into_iter()
        .map(|h| h.join().map_err(|_| anyhow::anyhow!("stream panicked")))
        .collect::<anyhow::Result<_>>()?;
    for o in openers {
        o.join().map_err(|_| anyhow::anyhow!("opener panicked"))??;
    }
    let new_log = new_log.lock().unwrap().clone();

    // Streams: those to b2/b3 never failed; those to b0/b1 ended with a
    // reset (or close) right after their backend's first removal.
    let first_removal = |b: &str| edits.iter().find(|e| e.removed.as_deref() == Some(b));
    let mut ended_after: Vec<Duration> = Vec::new();
    for log in &logs {
        match (first_removal(&log.backend), &log.end) {
            (None, None) => {}
            (None, Some(end)) => panic!(
                "stream to {} (never removed) failed after {} round trips: {} ({:?})",
                log.backend, log.round_trips, end.error, end.kind
            ),
            (Some(_), None) => panic!(
                "stream to {} outlived its backend's removal ({} round trips)",
                log.backend, log.round_trips
            ),
            (Some(edit), Some(end)) => {
                assert!(
                    end.is_reset_or_close(),
                    "stream to {} ended by {} ({:?}), not a reset or close",
                    log.backend,
                    end.error,
                    end.kind
                );
                assert!(
                    end.at >= edit.requested,
                    "stream to {} ended before its removal: {}",
                    log.backend,
                    end.error
                );
                let after = end.at.saturating_duration_since(edit.programmed);
                assert!(
                    after < END_WITHIN,
                    "stream to {} ended {after:?} after its removal",
                    log.backend
                );
                ended_after.push(end.at.duration_since(edit.requested));
            }
        }
    }

    // New connections: one may fail only the way a stream does, by its
    // backend's removal: it reached that backend before the removal took
    // effect and was reset by it. One reset before the greeting named its
    // backend must at least fall inside a removal. Any other failure, or
    // one far from every removal, fails the test.
    let removal_hit = |c: &NewConn, end: &StreamEnd| {
        end.is_reset_or_close()
            && edits.iter().any(|e| {
                e.removed.is_some()
                    && c.backend
                        .as_ref()
                        .is_none_or(|b| e.removed.as_ref() == Some(b))
                    && c.started < e.programmed + Duration::from_millis(100)
                    && end.at >= e.requested
                    && end.at < e.programmed + END_WITHIN
            })
    };
    let mut removed_under: Vec<&str> = Vec::new();
    for c in &new_log {
        let Some(end) = &c.failure else { continue };
        assert!(
            removal_hit(c, end),
            "new connection to {:?} failed {:?} after it began: {} ({:?})",
            c.backend,
            end.at.duration_since(c.started),
            end.error,
            end.kind
        );
        removed_under.push(c.backend.as_deref().unwrap_or("(before its greeting)"));
    }
    // None reached a backend while it was out (allowing 100 ms for
    // connections begun just before the removal took effect).
    for (i, edit) in edits.iter().enumerate() {
        let Some(b) = &edit.removed else { continue };
        let back = edits[i + 1..]
            .iter()
            .find(|e| e.added.as_deref() == Some(b.as_str()))
            .map(|e| e.requested);
        let stray = new_log
            .iter()
            .filter(|c| {
                c.started > edit.programmed + Duration::from_millis(100)
                    && back.is_none_or(|t| c.started < t)
                    && c.backend.as_ref() == Some(b)
            })
            .count();
        assert_eq!(
            stray, 0,
            "{stray} new connections reached {b} after its removal"
        );
    }
    let mut by_backend: BTreeMap<&str, usize> = BTreeMap::new();
    for c in &new_log {
        let b = c.backend.as_deref().unwrap_or("(none)");
        *by_backend.entry(b).or_default() += 1;
    }
    for spare in ["b4", "b5"] {
        assert!(
            by_backend.get(spare).is_some_and(|n| *n > 0),
            "{spare} never served: {by_backend:?}"
        );
    }

    let survivors = logs.iter().filter(|l| l.end.is_none()).count();
    let round_trips: u64 = logs.iter().map(|l| l.round_trips).sum();
    eprintln!(
        "churn {agent_args:?}: {} edits; {} streams ({survivors} on kept backends, 0 errors; {} ended by their \
         backend's removal, {:?} after the edit at most); {round_trips} stream round trips; \
         {} new connections, {} reset by their backend's removal {removed_under:?}, by backend {by_backend:?}",
        edits.len(),
        logs.len(),
        ended_after.len(),
        ended_after.iter().max(),
        new_log.len(),
        removed_under.len(),
    );
    for pod in clients.iter().chain(&backends) {
        cni.del(pod, "eth0", &CallArgs::default())?;
    }
    Ok(())
}
