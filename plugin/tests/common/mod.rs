//! Shared test helpers: network namespaces the test owns, a fake agent on a
//! unix socket, and running the real catena-cni binary.
#![allow(dead_code)] // each test crate uses a different subset

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_catena-cni");

// ---------------------------------------------------------------- netns

/// A network namespace named `catena-cni-<pid>-<n>`, deleted on drop (also
/// when the test panics), which takes its links with it.
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    pub fn new() -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        // SAFETY: geteuid has no preconditions.
        assert_eq!(unsafe { libc::geteuid() }, 0, "netns tests need root");
        let name = format!(
            "catena-cni-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        );
        sh(&["ip", "netns", "add", &name]);
        let ns = NetNs { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// `ip -n <ns> args...`, panicking on failure.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut full = vec!["ip", "-n", self.name.as_str()];
        full.extend_from_slice(args);
        sh(&full)
    }

    pub fn ifindex(&self, dev: &str) -> u32 {
        let out = self.ip(&["-j", "link", "show", "dev", dev]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v[0]["ifindex"].as_u64().unwrap() as u32
    }

    /// Runs `f` on a thread that has entered this namespace.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let fd = File::open(self.path()).unwrap();
        std::thread::scope(|s| {
            s.spawn(move || {
                nix::sched::setns(fd.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
                f()
            })
            .join()
            .unwrap()
        })
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

pub fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

// ---------------------------------------------------------------- fake agent

#[derive(Clone, Debug)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub body: String,
}

impl Request {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap()
    }
}

pub struct Reply {
    pub status: u16,
    pub body: String,
    /// Wait this long before answering (an agent that hangs).
    pub delay: Duration,
}

impl Reply {
    pub fn json(status: u16, body: serde_json::Value) -> Self {
        Reply {
            status,
            body: body.to_string(),
            delay: Duration::ZERO,
        }
    }
    pub fn empty(status: u16) -> Self {
        Reply {
            status,
            body: String::new(),
            delay: Duration::ZERO,
        }
    }
}

type Handler = dyn Fn(&Request) -> Reply + Send + Sync;

/// A test double for catena-agent's socket: records requests, answers with
/// `handler`. One thread per connection, so a hanging answer does not block
/// the next request.
pub struct FakeAgent {
    pub dir: tempfile::TempDir,
    pub requests: Arc<Mutex<Vec<Request>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FakeAgent {
    pub fn start(handler: impl Fn(&Request) -> Reply + Send + Sync + 'static) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let listener = UnixListener::bind(dir.path().join("agent.sock")).unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let handler: Arc<Handler> = Arc::new(handler);
        let thread = {
            let (requests, stop) = (requests.clone(), stop.clone());
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    let (requests, handler) = (requests.clone(), handler.clone());
                    std::thread::spawn(move || serve(conn, &requests, &*handler));
                }
            })
        };
        FakeAgent {
            dir,
            requests,
            stop,
            thread: Some(thread),
        }
    }

    /// An agent that registers every endpoint and is healthy.
    pub fn healthy() -> Self {
        Self::start(standard_reply)
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("agent.sock")
    }

    pub fn requests(&self) -> Vec<Request> {
        self.requests.lock().unwrap().clone()
    }
}

/// What a working agent answers.
pub fn standard_reply(r: &Request) -> Reply {
    match r.method.as_str() {
        "PUT" => Reply::json(
            200,
            serde_json::json!({"id": 7, "spec": r.json(), "identity": 1001, "attachMode": "tcx", "created": "2025-01-01T00:00:00Z"}),
        ),
        "DELETE" => Reply::empty(204),
        "GET" if r.path == "/v1/healthz" => Reply::json(200, serde_json::json!({"ready": true})),
        "POST" if r.path == "/v1/endpoints/gc" => {
            Reply::json(200, serde_json::json!({"removed": []}))
        }
        _ => Reply::json(404, serde_json::json!({"message": "no such route"})),
    }
}

impl Drop for FakeAgent {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = UnixStream::connect(self.socket()); // wake accept()
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(conn: UnixStream, requests: &Mutex<Vec<Request>>, handler: &Handler) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).unwrap_or(0) == 0 {
        return;
    }
    let mut parts = line.split_whitespace();
    let (method, path) = (
        parts.next().unwrap_or("").to_string(),
        parts.next().unwrap_or("").to_string(),
    );
    let mut len = 0usize;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                len = v.trim().parse().unwrap_or(0);
            }
        }
    }
    let mut body = vec![0; len];
    reader.read_exact(&mut body).unwrap();
    let req = Request {
        method,
        path,
        body: String::from_utf8(body).unwrap(),
    };
    requests.lock().unwrap().push(req.clone());
    let reply = handler(&req);
    std::thread::sleep(reply.delay);
    let mut conn = conn;
    let _ = write!(
        conn,
        "HTTP/1.1 {} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
        reply.status,
        reply.body.len(),
        reply.body
    );
}

// ---------------------------------------------------------------- the plugin

pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Run {
    /// The error object on stdout, checked for the spec's shape.
    pub fn error(&self) -> serde_json::Value {
        assert_ne!(self.code, 0, "expected a failure; stdout: {}", self.stdout);
        let v: serde_json::Value = serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not one JSON object ({e}): {:?}", self.stdout));
        assert!(
            v["code"].is_u64() && v["msg"].is_string() && v["cniVersion"].is_string(),
            "{v}"
        );
        v
    }

    pub fn error_code(&self) -> u64 {
        self.error()["code"].as_u64().unwrap()
    }
}

/// Runs catena-cni with exactly `env` (plus PATH), `stdin`, optionally with
/// its network namespace switched to `netns` (setns only, like nsenter --net).
pub fn run_plugin(env: &[(&str, &str)], stdin: &str, netns: Option<&NetNs>) -> Run {
    let mut cmd = Command::new(BIN);
    cmd.env_clear().env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
    cmd.envs(env.iter().copied());
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(ns) = netns {
        let fd = File::open(ns.path()).unwrap();
        // SAFETY: setns is a plain syscall, fine between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                nix::sched::setns(fd.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(std::io::Error::from)
            });
        }
    }
    let start = Instant::now();
    let mut child = cmd.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let Output {
        status,
        stdout,
        stderr,
    } = child.wait_with_output().unwrap();
    Run {
        code: status.code().unwrap_or(-1),
        stdout: String::from_utf8(stdout).unwrap(),
        stderr: String::from_utf8(stderr).unwrap(),
        elapsed: start.elapsed(),
    }
}

/// The stdin a runtime sends after ptp, pointing at `socket` and `state`.
pub fn chained_conf(version: &str, socket: &Path, state: &Path, prev: &str) -> String {
    format!(
        r#"{{"type":"catena-cni","agentSocket":"{}","stateDir":"{}","name":"catena","cniVersion":"{version}","prevResult":{prev}}}"#,
        socket.display(),
        state.display()
    )
}

/// A ptp-shaped 1.0.0 result for eth0 in `netns`.
pub fn ptp_result(netns: &Path) -> String {
    format!(
        r#"{{"cniVersion":"1.0.0","interfaces":[{{"name":"veth38fb12a8","mac":"c6:d6:4c:3c:a5:96"}},{{"name":"eth0","mac":"6e:41:bb:9d:48:e4","sandbox":"{}"}}],"ips":[{{"interface":1,"address":"10.99.0.5/24","gateway":"10.99.0.1"}}],"routes":[{{"dst":"0.0.0.0/0"}}],"dns":{{}}}}"#,
        netns.display()
    )
}
