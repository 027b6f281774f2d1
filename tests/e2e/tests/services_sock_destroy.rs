//! Removing a backend ends only its own flows — also for sockets the
//! socket-level load balancer translated at connect(), which never meet a
//! service map again. A client pod (in the cgroup the socket LB serves)
//! holds connected UDP sockets (like a DNS resolver) and TCP connections
//! through the VIP to both backends, plus a TCP connection and a connected
//! UDP socket straight to backend A's pod address (same peer as the
//! translated ones, no translation). When A leaves the EndpointSlice (its
//! pod keeps running and answering), the agent must destroy exactly the
//! translated sockets to A: their owner sees ECONNABORTED; everything else
//! keeps working.

use catena_e2e::{dual_stack, wait_for, wait_for_backends, write_manifest, TestCgroup};
use catena_lab::{CallArgs, CniRunner, Node, Pod};
use serde::Deserialize;
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

const TCP_PORT: u16 = 8080;
const UDP_PORT: u16 = 5353;
/// Sockets opened through the VIP per protocol: random picks, so both
/// backends get some unless all land on one (2 * 2^-16).
const PER_PROTO: usize = 16;
/// From "the agent shows A gone" to "A's translated sockets ended".
const END_WITHIN: Duration = Duration::from_secs(5);

#[derive(Clone, Copy, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

impl Family {
    fn vip(self) -> &'static str {
        match self {
            Family::V4 => "10.96.0.94",
            Family::V6 => "fd00:96::94",
        }
    }
}

/// A backend: a TCP echo server that first greets with its name, and a UDP
/// server answering every datagram with its name, on every address (IPv6
/// sockets that take IPv4 too).
const SERVER: &str = r#"
import socket, sys, threading
name = (sys.argv[1] + "\n").encode()
def sock(kind, port):
    s = socket.socket(socket.AF_INET6, kind)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("::", port))
    return s
def conn(c):
    try:
        c.sendall(name)
        while True:
            d = c.recv(4096)
            if not d:
                return
            c.sendall(d)
    except OSError:
        pass
    finally:
        c.close()
def udp(u):
    while True:
        _, peer = u.recvfrom(2048)
        u.sendto(name, peer)
l, u = sock(socket.SOCK_STREAM, int(sys.argv[2])), sock(socket.SOCK_DGRAM, int(sys.argv[3]))
l.listen(128)
threading.Thread(target=udp, args=(u,), daemon=True).start()
print("ready", flush=True)
while True:
    c, _ = l.accept()
    threading.Thread(target=conn, args=(c,), daemon=True).start()
"#;

struct Server(Child);

impl Server {
    fn start(pod: &Pod) -> anyhow::Result<Server> {
        let mut cmd = Command::new("python3");
        cmd.args([
            "-c",
            SERVER,
            &pod.name,
            &TCP_PORT.to_string(),
            &UDP_PORT.to_string(),
        ]);
        cmd.stdout(Stdio::piped());
        let mut child = Server(pod.netns().spawn(cmd)?);
        let mut line = String::new();
        BufReader::new(child.0.stdout.take().unwrap()).read_line(&mut line)?;
        anyhow::ensure!(line.trim() == "ready", "server in {}: {line:?}", pod.name);
        Ok(child)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The client: opens the sockets, prints them as JSON, then answers every
/// `probe` line on stdin with one JSON line: per socket its first error
/// (an errno name, kept once seen) or the backend that answered.
const CLIENT: &str = r#"
import errno, json, socket, sys
vip, tport, uport, direct, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
socks = []
def tcp(addr):
    s = socket.create_connection(addr, timeout=3)
    f = s.makefile("rb")
    return s, f, f.readline().decode().strip()
def udp(addr):
    s = socket.socket(socket.AF_INET6 if ":" in addr[0] else socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(3)
    s.connect(addr)
    s.send(b"q\n")
    return s, None, s.recv(512).decode().split("\n")[0]
for kind, opener, addr in ([("tcp-vip", tcp, (vip, tport))] * n + [("udp-vip", udp, (vip, uport))] * n
                           + [("tcp-direct", tcp, (direct, 8080)), ("udp-direct", udp, (direct, 5353))]):
    s, f, backend = opener(addr)
    socks.append({"kind": kind, "sock": s, "file": f, "backend": backend, "error": None})
print(json.dumps([{"kind": x["kind"], "backend": x["backend"]} for x in socks]), flush=True)
def probe(x):
    s = x["sock"]
    if x["kind"].startswith("tcp"):
        s.sendall(b"ping\n")
        if x["file"].readline() != b"ping\n":
            raise OSError(errno.EPROTO, "bad echo")
        return x["backend"]
    s.setblocking(False)  # (a timeout would make Python wait first)
    try:
        s.recv(512)  # a pending error surfaces here
    except BlockingIOError:
        pass
    finally:
        s.settimeout(3)
    s.send(b"q\n")
    return s.recv(512).decode().split("\n")[0]
for line in sys.stdin:
    out = []
    for x in socks:
        if x["error"] is None:
            try:
                out.append({"ok": probe(x)})
                continue
            except OSError as e:
                x["error"] = errno.errorcode.get(e.errno, str(e))
        out.append({"error": x["error"]})
    print(json.dumps(out), flush=True)
"#;

#[derive(Debug, Deserialize)]
struct Opened {
    kind: String,
    backend: String,
}

#[derive(Debug, Deserialize)]
struct Probe {
    ok: Option<String>,
    error: Option<String>,
}

struct Client {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    sockets: Vec<Opened>,
}

impl Client {
    /// Starts the client in `pod`'s netns, inside `cgroup` (cgroup
    /// membership is per process, hence a child process, joined before exec).
    fn start(pod: &Pod, cgroup: &TestCgroup, vip: &str, direct: &str) -> anyhow::Result<Client> {
        let mut cmd = Command::new("sh");
        cmd.args([
            "-c",
            &format!(
                "echo $$ > {}/cgroup.procs && exec python3 -c \"$0\" \"$@\"",
                cgroup.0.display()
            ),
            CLIENT,
            vip,
            "80",
            "53",
            direct,
            &PER_PROTO.to_string(),
        ]);
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped());
        let mut child = pod.netns().spawn(cmd)?;
        let stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line)?;
        let sockets: Vec<Opened> = serde_json::from_str(&line)
            .map_err(|e| anyhow::anyhow!("client start: {e}: {line:?}"))?;
        Ok(Client {
            child,
            stdin,
            stdout,
            sockets,
        })
    }

    fn probe(&mut self) -> anyhow::Result<Vec<Probe>> {
        self.stdin.write_all(b"probe\n")?;
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        let p: Vec<Probe> = serde_json::from_str(&line)
            .map_err(|e| anyhow::anyhow!("client probe: {e}: {line:?}"))?;
        anyhow::ensure!(p.len() == self.sockets.len(), "probe size {line}");
        Ok(p)
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn service_manifest(family: Family, addrs: &[&str]) -> String {
    let vip = family.vip();
    let (families, address_type) = match family {
        Family::V4 => ("[IPv4]", "IPv4"),
        Family::V6 => ("[IPv6]", "IPv6"),
    };
    let endpoints: String = addrs
        .iter()
        .map(|a| format!("- addresses: [\"{a}\"]\n  conditions: {{ready: true}}\n"))
        .collect();
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: dns, namespace: default}}\nspec:\n  clusterIP: \"{vip}\"\n  clusterIPs: [\"{vip}\"]\n  ipFamilies: {families}\n  ipFamilyPolicy: SingleStack\n  ports:\n  - {{name: tcp, port: 80, targetPort: {TCP_PORT}, protocol: TCP}}\n  - {{name: dns, port: 53, targetPort: {UDP_PORT}, protocol: UDP}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: dns-1\n  namespace: default\n  labels: {{kubernetes.io/service-name: dns}}\naddressType: {address_type}\nports: [{{name: tcp, port: {TCP_PORT}, protocol: TCP}}, {{name: dns, port: {UDP_PORT}, protocol: UDP}}]\nendpoints:\n{endpoints}"
    )
}

/// The pod's address of `family`, from its ADD result.
fn pod_ip(pod: &Pod, family: Family) -> anyhow::Result<IpAddr> {
    let result = pod
        .result()
        .ok_or_else(|| anyhow::anyhow!("{} has no ADD result", pod.name))?;
    let ips = result.raw["ips"].as_array().cloned().unwrap_or_default();
    ips.iter()
        .filter_map(|ip| {
            ip["address"]
                .as_str()?
                .split('/')
                .next()?
                .parse::<IpAddr>()
                .ok()
        })
        .find(|ip| ip.is_ipv6() == (family == Family::V6))
        .ok_or_else(|| anyhow::anyhow!("{}'s ADD result has no address of the family", pod.name))
}

fn sockets_destroyed(agent: &catena_lab::Agent<'_>) -> anyhow::Result<u64> {
    let text = String::from_utf8(agent.client().request("GET", "/metrics", None)?)?;
    text.lines()
        .find_map(|l| l.strip_prefix("catena_lb_sockets_destroyed_total "))
        .ok_or_else(|| anyhow::anyhow!("no catena_lb_sockets_destroyed_total in metrics"))?
        .trim()
        .parse()
        .map_err(Into::into)
}

#[test]
fn removing_a_backend_destroys_only_the_sockets_translated_to_it() -> anyhow::Result<()> {
    run(Family::V4)
}

/// The same through `cgroup/connect6` and `LB6_SOCK_REVNAT`.
#[test]
fn removing_an_ipv6_backend_destroys_only_the_sockets_translated_to_it() -> anyhow::Result<()> {
    run(Family::V6)
}

fn run(family: Family) -> anyhow::Result<()> {
    let tag = match family {
        Family::V4 => "sockd4",
        Family::V6 => "sockd6",
    };
    let vip = family.vip();
    let node = Node::new(&format!("e2e-{tag}"))?;
    let cgroup = TestCgroup::new(tag)?;
    let manifests = node.dir().join("manifests");
    std::fs::create_dir_all(&manifests)?;
    let cg = cgroup.0.to_str().unwrap().to_string();
    let agent = node.start_agent(
        &manifests,
        &["--kube-proxy-replacement", "true", "--cgroup-root", &cg],
    )?;
    let cni = CniRunner::new(&node, dual_stack::conflist(&node, "e2e-sockd", 70)?);
    let (a, b, client_pod) = (node.pod("a")?, node.pod("b")?, node.pod("client")?);
    for pod in [&a, &b, &client_pod] {
        dual_stack::no_dad(pod.netns())?;
        cni.add(pod, "eth0", &CallArgs::default())?;
    }
    let _servers = [Server::start(&a)?, Server::start(&b)?];
    let (a_ip, b_ip) = (
        pod_ip(&a, family)?.to_string(),
        pod_ip(&b, family)?.to_string(),
    );
    let api = agent.client();
    let frontend = format!("{}/TCP", SocketAddr::new(vip.parse()?, 80));
    let programmed = |addrs: &[&String]| -> anyhow::Result<()> {
        let want = addrs
            .iter()
            .map(|a| Ok(SocketAddr::new(a.parse()?, TCP_PORT).to_string()))
            .collect::<anyhow::Result<_>>()?;
        wait_for_backends(&api, &frontend, want)
    };
    write_manifest(
        &manifests,
        "dns.yaml",
        &service_manifest(family, &[&a_ip, &b_ip]),
    )?;
    programmed(&[&a_ip, &b_ip])?;

    let mut client = Client::start(&client_pod, &cgroup, vip, &a_ip)?;
    let via_vip_to = |kind: &str, backend: &str| {
        client
            .sockets
            .iter()
            .filter(|s| s.kind == kind && s.backend == backend)
            .count()
    };
    for kind in ["tcp-vip", "udp-vip"] {
        for backend in ["a", "b"] {
            assert!(
                via_vip_to(kind, backend) > 0,
                "no {kind} socket reached {backend}: {:?}",
                client.sockets
            );
        }
    }
    let (via_tcp_to_a, via_udp_to_a) = (via_vip_to("tcp-vip", "a"), via_vip_to("udp-vip", "a"));
    let doomed: Vec<bool> = client
        .sockets
        .iter()
        .map(|s| s.kind.ends_with("-vip") && s.backend == "a")
        .collect();
    let doomed_count = doomed.iter().filter(|d| **d).count();
    assert!(client
        .sockets
        .iter()
        .any(|s| s.kind == "tcp-direct" && s.backend == "a"));
    assert!(client
        .sockets
        .iter()
        .any(|s| s.kind == "udp-direct" && s.backend == "a"));
    // Every socket works before the change (and passes run meanwhile, as
    // the pods' ADDs changed the Service, without touching any of them).
    for (i, p) in client.probe()?.iter().enumerate() {
        assert_eq!(
            p.ok.as_deref(),
            Some(client.sockets[i].backend.as_str()),
            "{i}: {p:?}"
        );
    }
    let destroyed_before = sockets_destroyed(&agent)?;

    // A leaves the Service; its pod keeps serving (so without termination
    // the translated sockets would go on working with it forever).
    write_manifest(&manifests, "dns.yaml", &service_manifest(family, &[&b_ip]))?;
    programmed(&[&b_ip])?;
    let removed_at = Instant::now();
    let probes = loop {
        let probes = client.probe()?;
        let ended = probes
            .iter()
            .zip(&doomed)
            .filter(|(p, d)| **d && p.error.is_some())
            .count();
        if ended == doomed_count || removed_at.elapsed() > END_WITHIN {
            break probes;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    for (i, (p, s)) in probes.iter().zip(&client.sockets).enumerate() {
        if doomed[i] {
            assert_eq!(
                p.error.as_deref(),
                Some("ECONNABORTED"),
                "{i} {} to {} not aborted within {END_WITHIN:?}: {p:?}\n{}",
                s.kind,
                s.backend,
                agent.log_tail(30)
            );
        } else {
            assert_eq!(
                p.ok.as_deref(),
                Some(s.backend.as_str()),
                "{i} {}: {p:?}",
                s.kind
            );
        }
    }
    // Exactly those sockets, counted by the agent.
    let destroyed = wait_for("the destroy count", Duration::from_secs(2), || {
        let n = sockets_destroyed(&agent)? - destroyed_before;
        Ok((n == doomed_count as u64).then_some(n))
    });
    assert!(
        destroyed.is_ok(),
        "agent destroyed {} sockets, expected {doomed_count}",
        sockets_destroyed(&agent)? - destroyed_before
    );

    // The pass is logged with what it did.
    let log = agent.log();
    let summary = log
        .lines()
        .find(|l| l.contains("sockets to removed backends terminated"))
        .unwrap_or_default();
    eprintln!("{summary}");
    assert!(
        summary.contains(&format!(
            "destroyed_tcp={} destroyed_udp={}",
            via_tcp_to_a, via_udp_to_a
        )),
        "no summary of the pass: {summary:?}"
    );

    // Later passes (another change to the Service) leave the survivors be.
    let c_ip = pod_ip(&client_pod, family)?.to_string();
    write_manifest(
        &manifests,
        "dns.yaml",
        &service_manifest(family, &[&b_ip, &c_ip]),
    )?;
    programmed(&[&b_ip, &c_ip])?;
    write_manifest(&manifests, "dns.yaml", &service_manifest(family, &[&b_ip]))?;
    programmed(&[&b_ip])?;
    std::thread::sleep(Duration::from_millis(500));
    for (i, (p, s)) in client.probe()?.iter().zip(&client.sockets).enumerate() {
        if !doomed[i] {
            assert_eq!(
                p.ok.as_deref(),
                Some(s.backend.as_str()),
                "{i} {}: {p:?}",
                s.kind
            );
        }
    }
    assert_eq!(
        sockets_destroyed(&agent)? - destroyed_before,
        doomed_count as u64
    );

    drop(client);
    for pod in [&a, &b, &client_pod] {
        cni.del(pod, "eth0", &CallArgs::default())?;
    }
    drop(agent);
    Ok(())
}
