//! The agent restarts, crashes and upgrades under sustained traffic: a few
//! long-lived TCP streams exchanging data continuously and a steady rate of
//! new connections through a ClusterIP, across `kill -9`, a graceful restart
//! and a program upgrade (a new agent run loads new programs and moves every
//! TCX link to them in place). Nothing may reset or fail: the pinned
//! programs, maps and links carry the traffic while no agent runs, and a
//! restarted agent changes nothing a flow depends on.

use catena_api::{Endpoint, Status};
use catena_e2e::source::{ClusterSource, SourceKind};
use catena_e2e::{pod_yaml, service_yaml};
use catena_lab::{CallArgs, CniRunner, Node, Pod};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const VIP: &str = "10.96.0.40";
const PORT: u16 = 9000;
const STREAMS: usize = 4;
/// A new connection every this often.
const NEW_CONN_EVERY: Duration = Duration::from_millis(25);
/// A stream's round trip (write a block, read it echoed back) every this often.
const STREAM_EVERY: Duration = Duration::from_millis(10);
const BLOCK: usize = 512;
/// A single read or connect waiting this long counts as a failure.
const IO_TIMEOUT: Duration = Duration::from_secs(3);

fn vip() -> SocketAddr {
    format!("{VIP}:80").parse().unwrap()
}

/// An echo server in a backend pod: one thread per connection, all
/// stopping with the flag. Returns the accept thread.
fn echo_server(pod: &Pod, stop: Arc<AtomicBool>) -> anyhow::Result<JoinHandle<anyhow::Result<()>>> {
    let (tx, rx) = std::sync::mpsc::channel();
    let handle = pod.netns().spawn_thread(move || -> anyhow::Result<()> {
        let listener = TcpListener::bind((Ipv4Addr::UNSPECIFIED, PORT))?;
        listener.set_nonblocking(true)?;
        let _ = tx.send(());
        let mut workers = Vec::new();
        while !stop.load(Ordering::SeqCst) {
            match listener.accept() {
                Ok((conn, _)) => {
                    let stop = stop.clone();
                    workers.push(std::thread::spawn(move || echo(conn, &stop)));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(e.into()),
            }
            workers.retain(|w| !w.is_finished());
        }
        for w in workers {
            let _ = w.join();
        }
        Ok(())
    })?;
    rx.recv_timeout(Duration::from_secs(5))
        .map_err(|_| anyhow::anyhow!("echo server in {} did not start", pod.name))?;
    Ok(std::thread::spawn(move || {
        handle
            .join()
            .map_err(|_| anyhow::anyhow!("echo panicked"))??
    }))
}

fn echo(mut conn: TcpStream, stop: &AtomicBool) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(Duration::from_millis(100)));
    let mut buf = [0u8; 4096];
    while !stop.load(Ordering::SeqCst) {
        match conn.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if conn.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
}

/// What the load saw.
#[derive(Default)]
struct Tally {
    stream_round_trips: AtomicU64,
    new_ok: AtomicU64,
    new_failed: AtomicU64,
    /// (phase, what happened), for the failure message.
    failures: Mutex<Vec<String>>,
}

struct Load {
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
    phase: Arc<Mutex<String>>,
    threads: Vec<JoinHandle<anyhow::Result<anyhow::Result<()>>>>,
}

impl Load {
    fn start(client: &Pod) -> anyhow::Result<Load> {
        let stop = Arc::new(AtomicBool::new(false));
        let tally = Arc::new(Tally::default());
        let phase = Arc::new(Mutex::new("warm-up".to_string()));
        let mut threads = Vec::new();
        for i in 0..STREAMS {
            let (stop, tally, phase) = (stop.clone(), tally.clone(), phase.clone());
            threads.push(
                client
                    .netns()
                    .spawn_thread(move || stream(i, &stop, &tally, &phase))?,
            );
        }
        let (s, t, p) = (stop.clone(), tally.clone(), phase.clone());
        threads.push(
            client
                .netns()
                .spawn_thread(move || new_connections(&s, &t, &p))?,
        );
        Ok(Load {
            stop,
            tally,
            phase,
            threads,
        })
    }

    fn phase(&self, name: &str) {
        *self.phase.lock().unwrap() = name.to_string();
    }

    fn finish(mut self) -> anyhow::Result<Arc<Tally>> {
        self.stop.store(true, Ordering::SeqCst);
        for t in std::mem::take(&mut self.threads) {
            t.join()
                .map_err(|_| anyhow::anyhow!("load thread panicked"))???;
        }
        Ok(self.tally.clone())
    }
}

/// A failed assertion before `finish` must not leave the load running.
impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Raises a stop flag when dropped (the echo servers on an early failure).
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

fn fail(tally: &Tally, phase: &Mutex<String>, what: String) {
    let phase = phase.lock().unwrap().clone();
    tally
        .failures
        .lock()
        .unwrap()
        .push(format!("[{phase}] {what}"));
}

/// One long-lived connection: blocks out, the same blocks back, forever.
/// Any error (a reset, a timeout, corrupted data) ends it and is recorded.
fn stream(i: usize, stop: &AtomicBool, tally: &Tally, phase: &Mutex<String>) -> anyhow::Result<()> {
    let mut s = TcpStream::connect_timeout(&vip(), IO_TIMEOUT)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut seq: u64 = 0;
    let mut back = vec![0u8; BLOCK];
    while !stop.load(Ordering::SeqCst) {
        let block: Vec<u8> = (0..BLOCK)
            .map(|j| (seq as usize * 31 + j + i) as u8)
            .collect();
        let result = s.write_all(&block).and_then(|_| s.read_exact(&mut back));
        match result {
            Ok(()) if back == block => {
                tally.stream_round_trips.fetch_add(1, Ordering::Relaxed);
            }
            Ok(()) => {
                fail(
                    tally,
                    phase,
                    format!("stream {i}: corrupted echo at block {seq}"),
                );
                return Ok(());
            }
            Err(e) => {
                fail(
                    tally,
                    phase,
                    format!("stream {i}: {e} ({:?}) at block {seq}", e.kind()),
                );
                return Ok(());
            }
        }
        seq += 1;
        std::thread::sleep(STREAM_EVERY);
    }
    Ok(())
}

/// A new connection every NEW_CONN_EVERY: connect, one echo, close.
fn new_connections(stop: &AtomicBool, tally: &Tally, phase: &Mutex<String>) -> anyhow::Result<()> {
    let mut n = 0u64;
    while !stop.load(Ordering::SeqCst) {
        let started = Instant::now();
        let r = (|| -> std::io::Result<()> {
            let mut s = TcpStream::connect_timeout(&vip(), IO_TIMEOUT)?;
            s.set_read_timeout(Some(IO_TIMEOUT))?;
            let msg = format!("hello {n}\n");
            s.write_all(msg.as_bytes())?;
            let mut back = vec![0u8; msg.len()];
            s.read_exact(&mut back)?;
            if back != msg.as_bytes() {
                return Err(std::io::Error::other("wrong echo"));
            }
            Ok(())
        })();
        match r {
            Ok(()) => {
                tally.new_ok.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                tally.new_failed.fetch_add(1, Ordering::Relaxed);
                fail(tally, phase, format!("new connection {n}: {e}"));
            }
        }
        n += 1;
        std::thread::sleep(NEW_CONN_EVERY.saturating_sub(started.elapsed()));
    }
    Ok(())
}

/// (link id, program id) of every pinned TCX link, by pin name, as the
/// kernel reports them (bpftool, not the agent's own bookkeeping).
fn link_programs(bpffs: &Path) -> anyhow::Result<Vec<(String, u64, u64)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(bpffs.join("links"))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let o = Command::new("bpftool")
            .args(["-j", "link", "show", "pinned"])
            .arg(entry.path())
            .output()?;
        anyhow::ensure!(
            o.status.success(),
            "bpftool: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&o.stdout)?;
        out.push((
            name,
            v["id"].as_u64().unwrap_or_default(),
            v["prog_id"].as_u64().unwrap_or_default(),
        ));
    }
    out.sort();
    Ok(out)
}

#[test]
fn sustained_traffic_survives_kill_restart_and_upgrade() -> anyhow::Result<()> {
    let node = Node::new("ops-restart")?;
    let source = ClusterSource::new(SourceKind::Manifests, &node)?;
    source.apply(
        "svc.yaml",
        &service_yaml("echo", VIP, 80, PORT, Some("echo")),
    )?;
    source.apply(
        "pods.yaml",
        &format!(
            "{}---\n{}",
            pod_yaml("echo-1", "echo"),
            pod_yaml("echo-2", "echo")
        ),
    )?;
    // A short GC interval with Cilium's timeouts: the GC runs many times
    // during the test and must never touch a live flow.
    let mut agent = source.start_agent(&node, &["--ct-gc-interval", "1s"])?;
    let conf = node.ptp_conflist("ops", "10.244.40.0/24", "1.0.0", vec![node.catena_plugin()])?;
    let cni = CniRunner::new(&node, conf);
    let client = node.pod("client")?;
    let backends = [node.pod("echo-1")?, node.pod("echo-2")?];
    for pod in std::iter::once(&client).chain(&backends) {
        cni.add(pod, "eth0", &CallArgs::default())?;
    }
    let server_stop = Arc::new(AtomicBool::new(false));
    let _stop_servers = StopOnDrop(server_stop.clone());
    let servers: Vec<_> = backends
        .iter()
        .map(|b| echo_server(b, server_stop.clone()))
        .collect::<anyhow::Result<_>>()?;

    let load = Load::start(&client)?;
    std::thread::sleep(Duration::from_millis(1500));

    // 1. kill -9, a while without any agent, then a torn state dir: an
    //    endpoint record and a queued delete cut short (disk full, power
    //    loss without the atomic rename) must not stop the agent.
    load.phase("kill -9");
    agent.kill()?;
    let ok_at_kill = load.tally.new_ok.load(Ordering::Relaxed);
    let trips_at_kill = load.tally.stream_round_trips.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(1500));
    // No agent at all: the pinned datapath alone serves old and new flows.
    let ok_while_down = load.tally.new_ok.load(Ordering::Relaxed) - ok_at_kill;
    let trips_while_down = load.tally.stream_round_trips.load(Ordering::Relaxed) - trips_at_kill;
    println!("while no agent ran: {ok_while_down} new connections, {trips_while_down} stream round trips");
    assert!(
        ok_while_down > 20 && trips_while_down > 100,
        "traffic stalled without the agent"
    );
    let state = node.state_dir();
    std::fs::write(
        state.join("endpoints/torn_eth0.json"),
        br#"{"id": 9, "spec": {"contai"#,
    )?;
    std::fs::create_dir_all(state.join("del-queue"))?;
    std::fs::write(
        state.join("del-queue/torn_eth0.json"),
        br#"{"containerId":"#,
    )?;
    agent.start_again()?;
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        state.join("endpoints/torn_eth0.corrupt").exists(),
        "torn record moved aside"
    );
    assert!(
        !state.join("del-queue/torn_eth0.json").exists(),
        "torn queued delete dropped"
    );
    let endpoints: Vec<Endpoint> = agent.client().get("/v1/endpoints")?;
    assert_eq!(endpoints.len(), 3, "{endpoints:?}");

    // 2. graceful restart.
    load.phase("graceful restart");
    agent.restart()?;
    std::thread::sleep(Duration::from_secs(2));

    // 3. upgrade: the new run loads its programs and moves each TCX link to
    //    them with bpf_link_update; the links themselves must stay.
    load.phase("upgrade");
    let before = link_programs(node.bpffs_dir())?;
    let status_before: Status = agent.client().get("/v1/status")?;
    agent.restart()?;
    let after = link_programs(node.bpffs_dir())?;
    let status_after: Status = agent.client().get("/v1/status")?;
    assert_eq!(before.len(), 6, "two links per pod: {before:?}");
    assert_eq!(before.len(), after.len(), "{before:?} -> {after:?}");
    let new_ids: Vec<u64> = status_after
        .datapath
        .programs
        .values()
        .map(|i| u64::from(*i))
        .collect();
    for ((pin, link_before, prog_before), (pin2, link_after, prog_after)) in
        before.iter().zip(&after)
    {
        assert_eq!(pin, pin2);
        assert_eq!(
            link_before, link_after,
            "{pin}: the link was replaced, not updated in place"
        );
        assert_ne!(prog_before, prog_after, "{pin}: still runs the old program");
        assert!(
            new_ids.contains(prog_after),
            "{pin}: runs {prog_after}, not one of {new_ids:?}"
        );
    }
    assert_ne!(
        status_before.datapath.programs,
        status_after.datapath.programs
    );
    std::thread::sleep(Duration::from_secs(2));

    load.phase("after");
    let tally = load.finish()?;
    server_stop.store(true, Ordering::SeqCst);
    for s in servers {
        s.join().map_err(|_| anyhow::anyhow!("server panicked"))??;
    }
    let round_trips = tally.stream_round_trips.load(Ordering::Relaxed);
    let (ok, failed) = (
        tally.new_ok.load(Ordering::Relaxed),
        tally.new_failed.load(Ordering::Relaxed),
    );
    let failures = tally.failures.lock().unwrap().clone();
    println!(
        "sustained traffic: {STREAMS} streams, {round_trips} round trips ({} KiB each way), \
         {ok} new connections ok, {failed} failed, {} stream(s) reset",
        round_trips * BLOCK as u64 / 1024,
        failures.iter().filter(|f| f.contains("stream")).count()
    );
    assert!(
        failures.is_empty(),
        "failures: {failures:#?}\nagent log:\n{}",
        agent.log_tail(40)
    );
    // The load really ran through every phase (about 9 s).
    assert!(ok > 200, "only {ok} new connections");
    assert!(round_trips > 1000, "only {round_trips} round trips");
    // The GC ran next to all that live traffic (1 s interval).
    let metrics = agent.client().request("GET", "/metrics", None)?;
    let metrics = String::from_utf8_lossy(&metrics);
    let gc_runs: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("catena_conntrack_gc_runs_total "))
        .and_then(|v| v.parse().ok())
        .unwrap_or_default();
    println!("conntrack GC passes in the last agent run: {gc_runs}");
    assert!(gc_runs >= 1, "{metrics}");
    for pod in std::iter::once(&client).chain(&backends) {
        cni.del(pod, "eth0", &CallArgs::default())?;
    }
    Ok(())
}
