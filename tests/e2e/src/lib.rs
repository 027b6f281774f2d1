//! Shared pieces of the end-to-end scenarios (the scenarios are in `tests/`).

pub mod dual_stack;
pub mod echo;
pub mod monitor;
pub mod source;

use anyhow::{bail, Context, Result};
use std::path::Path;
use std::time::{Duration, Instant};

/// Writes a manifest the way editors and `kubectl`-style tools do it: to a
/// temp file, then an atomic rename (the agent must never read a torn file).
pub fn write_manifest(dir: &Path, file: &str, yaml: &str) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{file}.tmp"));
    std::fs::write(&tmp, yaml).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, dir.join(file)).with_context(|| format!("renaming into {file}"))?;
    Ok(())
}

/// Polls `check` until it returns `Ok(Some(v))`, for at most `timeout`.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    let mut last_err = None;
    loop {
        match check() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_err = Some(e),
        }
        if Instant::now() >= deadline {
            match last_err {
                Some(e) => bail!("timed out waiting for {what}: {e:#}"),
                None => bail!("timed out waiting for {what}"),
            }
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// Waits until the agent shows `frontend` (as `/v1/services` names it, e.g.
/// `10.96.0.10:80/TCP`) programmed with exactly the backends `want`
/// (`addr:port`, any order).
pub fn wait_for_backends(
    api: &catena_api::Client,
    frontend: &str,
    mut want: Vec<String>,
) -> Result<()> {
    want.sort();
    wait_for(
        "the backend set programmed",
        Duration::from_secs(10),
        || {
            let s: Vec<catena_api::ServiceStatus> = api.get("/v1/services")?;
            Ok(s.iter()
                .find(|s| s.frontend == frontend)
                .filter(|s| s.backends == want)
                .map(|_| ()))
        },
    )
}

/// A ClusterIP Service manifest.
pub fn service_yaml(
    name: &str,
    cluster_ip: &str,
    port: u16,
    target: u16,
    selector: Option<&str>,
) -> String {
    let selector = selector
        .map(|s| format!("  selector: {{app: {s}}}\n"))
        .unwrap_or_default();
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  clusterIP: {cluster_ip}\n{selector}  ports:\n  - {{name: http, port: {port}, targetPort: {target}, protocol: TCP}}\n"
    )
}

/// A Pod manifest carrying only what the endpoints controller needs (labels).
pub fn pod_yaml(name: &str, app: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: default, labels: {{app: {app}}}}}\nspec: {{containers: [{{name: c, image: busybox}}]}}\n"
    )
}

/// An EndpointSlice for `service` with the given ready addresses.
pub fn endpoint_slice_yaml(name: &str, service: &str, port: u16, addresses: &[String]) -> String {
    let endpoints: String = addresses
        .iter()
        .map(|a| format!("- addresses: [\"{a}\"]\n  conditions: {{ready: true}}\n"))
        .collect();
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}\n  namespace: default\n  labels: {{kubernetes.io/service-name: {service}}}\naddressType: IPv4\nports: [{{name: http, port: {port}, protocol: TCP}}]\nendpoints:\n{endpoints}"
    )
}

/// Names of the entries directly in `dir`, sorted (none if it does not exist):
/// link pins (`<bpffs>/links`), queued DELs (`<state>/del-queue`), endpoint
/// records (`<state>/endpoints`).
pub fn dir_entries(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return vec![];
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Raw-socket probes the standard library cannot send (ICMP echo, an IP
/// protocol with no socket type), run by `/usr/bin/python3` inside a network
/// namespace. Python is part of Debian's base system; the lab has no ping.
const RAW_PROBE: &str = r#"
import socket, struct, sys, time
mode, dst, timeout = sys.argv[1], sys.argv[2], float(sys.argv[3])
def csum(b):
    if len(b) % 2: b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    s = (s >> 16) + (s & 0xffff); s += s >> 16
    return ~s & 0xffff
if mode == "ping":
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    ident = (int(time.time() * 1000) ^ 0x5a5a) & 0xffff
    hdr = struct.pack("!BBHHH", 8, 0, 0, ident, 1) + b"catena"
    pkt = struct.pack("!BBHHH", 8, 0, csum(hdr), ident, 1) + b"catena"
    s.sendto(pkt, (dst, 0))
    end = time.time() + timeout
    while time.time() < end:
        s.settimeout(max(0.01, end - time.time()))
        try:
            data, addr = s.recvfrom(2048)
        except socket.timeout:
            break
        ihl = (data[0] & 0x0f) * 4
        t, _, _, rid, _ = struct.unpack("!BBHHH", data[ihl:ihl + 8])
        if t == 0 and rid == ident and addr[0] == dst:
            print("reply"); sys.exit(0)
    print("timeout"); sys.exit(0)
elif mode == "send-proto":
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, int(sys.argv[4]))
    s.sendto(b"catena-raw", (dst, 0)); print("sent")
elif mode == "recv-proto":
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, int(sys.argv[4]))
    s.settimeout(timeout)
    try:
        data, addr = s.recvfrom(2048); print("got", addr[0])
    except socket.timeout:
        print("timeout")
"#;

fn raw_probe(ns: &catena_lab::Netns, args: &[&str]) -> Result<String> {
    let mut full = vec!["-c", RAW_PROBE];
    full.extend_from_slice(args);
    Ok(ns.run("/usr/bin/python3", &full)?.trim().to_string())
}

/// One ICMP echo from `ns` to `dst`: whether a reply came back in time.
pub fn ping(ns: &catena_lab::Netns, dst: std::net::Ipv4Addr, timeout: Duration) -> Result<bool> {
    let out = raw_probe(
        ns,
        &["ping", &dst.to_string(), &timeout.as_secs_f64().to_string()],
    )?;
    Ok(out == "reply")
}

/// Sends one raw IP packet of protocol `proto` from `ns` to `dst`.
pub fn send_ip_proto(ns: &catena_lab::Netns, dst: std::net::Ipv4Addr, proto: u8) -> Result<()> {
    raw_probe(
        ns,
        &["send-proto", &dst.to_string(), "0", &proto.to_string()],
    )?;
    Ok(())
}

/// Starts a receiver for IP protocol `proto` in `ns`; join the handle to
/// learn whether a packet arrived within `timeout` (`Some(source)`).
pub fn receive_ip_proto(
    ns: &catena_lab::Netns,
    proto: u8,
    timeout: Duration,
) -> Result<std::process::Child> {
    let mut cmd = std::process::Command::new("/usr/bin/python3");
    cmd.args([
        "-c",
        RAW_PROBE,
        "recv-proto",
        "0.0.0.0",
        &timeout.as_secs_f64().to_string(),
        &proto.to_string(),
    ])
    .stdout(std::process::Stdio::piped());
    ns.spawn(cmd)
}

/// A pod manifest in `namespace` with `labels` (`k=v` pairs).
pub fn labelled_pod_yaml(namespace: &str, name: &str, labels: &[(&str, &str)]) -> String {
    let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}: {v}")).collect();
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {namespace}, labels: {{{}}}}}\nspec: {{containers: [{{name: c, image: busybox}}]}}\n",
        labels.join(", ")
    )
}

/// A private cgroup v2 directory (for the socket-level load balancer, which
/// must never be attached to the machine's root cgroup in tests), removed on
/// drop once its processes are gone.
pub struct TestCgroup(pub std::path::PathBuf);

impl TestCgroup {
    pub fn new(tag: &str) -> Result<Self> {
        let out = std::process::Command::new("findmnt")
            .args(["-n", "-t", "cgroup2", "-o", "TARGET"])
            .output()?;
        let root = String::from_utf8(out.stdout)?;
        let root = root.lines().next().map(str::trim).filter(|s| !s.is_empty());
        let root = root.ok_or_else(|| anyhow::anyhow!("no cgroup2 mount on this machine"))?;
        let dir =
            std::path::PathBuf::from(root).join(format!("catena-e2e-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        Ok(TestCgroup(dir))
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // rmdir needs the cgroup empty: kill what is left (a client of a
        // failed test), then give the processes a moment to exit.
        let _ = std::fs::write(self.0.join("cgroup.kill"), "1");
        for _ in 0..50 {
            if std::fs::remove_dir(&self.0).is_ok() || !self.0.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("warning: could not remove test cgroup {}", self.0.display());
    }
}

/// One TCP request with `socat` run in `ns` (joined to `cgroup` first, so
/// the socket-level load balancer serves it): what the server said.
/// `address` is socat's, e.g. `TCP:10.96.0.20:80` or `TCP6:[fd00::1]:80`.
pub fn socat_request(
    ns: &catena_lab::Netns,
    cgroup: Option<&TestCgroup>,
    address: &str,
) -> Result<String> {
    let join = cgroup
        .map(|c| format!("echo $$ > {}/cgroup.procs && ", c.0.display()))
        .unwrap_or_default();
    let mut cmd = std::process::Command::new("sh");
    cmd.args([
        "-c",
        &format!("{join}exec socat -T2 - {address},connect-timeout=2 </dev/null"),
    ]);
    let out = ns.output(cmd)?;
    anyhow::ensure!(
        out.status.success(),
        "socat to {address}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8(out.stdout)?.trim().to_string())
}
