//! Network policy over IPv6, end to end: dual-stack pods wired by the real
//! ptp + host-local primary (an IPv4 and an IPv6 range) and the real
//! `catena-cni`, the real agent on a manifest directory holding
//! CiliumNetworkPolicies, real TCP in the pods' namespaces. A host outside
//! the cluster (its own namespace, routed through the node) stands for the
//! world. Checked: default-deny ingress and allow by label over IPv6, allow
//! and deny by IPv6 CIDR, replies of a connection a policed pod opened pass
//! its enforced ingress, neighbour discovery keeps working under policy,
//! IPv6 verdicts and drops show in `catena monitor` with IPv6 addresses, and
//! the same policy over IPv4 decides as before.

use catena_e2e::dual_stack::{self, no_dad, pod_ipv6};
use catena_e2e::monitor::DropMonitor;
use catena_e2e::{pod_yaml, write_manifest};
use catena_lab::{CallArgs, CniRunner, Netns, Node};
use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

const POLICIES: &str = "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: web-in, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: client-out, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toEndpoints: [{matchLabels: {app: web}}]
  - toCIDR: [\"fd00:99::/64\"]
  egressDeny:
  - toCIDR: [\"fd00:99::3/128\"]
";

/// A socat TCP server on every address of `ns` (IPv6 sockets that also take
/// IPv4), answering with `name`.
fn serve(ns: &Netns, name: &str) -> anyhow::Result<Child> {
    let mut cmd = Command::new("socat");
    cmd.args([
        "TCP6-LISTEN:8080,fork,reuseaddr",
        &format!("SYSTEM:echo {name}"),
    ]);
    ns.spawn(cmd)
}

/// One TCP request from `ns`: the reply line.
fn request(ns: &Netns, addr: SocketAddr, timeout: Duration) -> anyhow::Result<String> {
    ns.enter_thread(move || -> anyhow::Result<String> {
        let mut s = TcpStream::connect_timeout(&addr, timeout)?;
        s.set_read_timeout(Some(timeout))?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out.trim().to_string())
    })?
}

/// `request` retried until it answers (servers starting, policy being
/// programmed), for at most 10 s.
fn reaches(ns: &Netns, addr: SocketAddr, want: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match request(ns, addr, Duration::from_millis(500)) {
            Ok(reply) if reply == want => return Ok(()),
            other if Instant::now() > deadline => {
                anyhow::bail!("{addr} did not answer {want:?}: {other:?}")
            }
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// The connection is refused by policy: no answer, three times over.
fn blocked(ns: &Netns, addr: SocketAddr, what: &str) {
    for _ in 0..3 {
        let r = request(ns, addr, Duration::from_millis(400));
        assert!(r.is_err(), "{what}: {addr} answered {r:?}");
    }
}

/// A namespace outside the cluster, routed through the node: fd00:99::2
/// and fd00:99::3 (the world to the policy), the node's end fd00:99::1.
fn outside_host(node: &Node) -> anyhow::Result<Netns> {
    let out = Netns::new("pol6-out")?;
    no_dad(&out)?;
    let n = node.netns();
    n.run("sysctl", &["-q", "-w", "net.ipv6.conf.all.forwarding=1"])?;
    n.run(
        "ip",
        &[
            "link",
            "add",
            "out6",
            "type",
            "veth",
            "peer",
            "name",
            "out6p",
            "netns",
            out.name(),
        ],
    )?;
    n.run(
        "ip",
        &["-6", "addr", "add", "fd00:99::1/64", "dev", "out6", "nodad"],
    )?;
    n.run("ip", &["link", "set", "out6", "up"])?;
    for a in ["fd00:99::2/64", "fd00:99::3/64"] {
        out.run("ip", &["-6", "addr", "add", a, "dev", "out6p", "nodad"])?;
    }
    out.run("ip", &["link", "set", "out6p", "up"])?;
    out.run(
        "ip",
        &["-6", "route", "add", "default", "via", "fd00:99::1"],
    )?;
    Ok(out)
}

#[test]
fn ipv6_policy_by_label_and_cidr_with_replies_nd_and_events() -> anyhow::Result<()> {
    let node = Node::new("e2e-pol6")?;
    no_dad(node.netns())?;
    let manifests = node.dir().join("manifests");
    write_manifest(&manifests, "policy.yaml", POLICIES)?;
    write_manifest(
        &manifests,
        "pods.yaml",
        &[
            pod_yaml("web", "web"),
            pod_yaml("client", "client"),
            pod_yaml("other", "other"),
        ]
        .join("---\n"),
    )?;
    let agent = node.start_agent(&manifests, &[])?;
    let cni = CniRunner::new(&node, dual_stack::conflist(&node, "e2e-pol6", 16)?);
    let web = node.pod("web")?;
    let client = node.pod("client")?;
    let other = node.pod("other")?;
    for pod in [&web, &client, &other] {
        no_dad(pod.netns())?;
        cni.add(pod, "eth0", &CallArgs::default())?;
    }
    let outside = outside_host(&node)?;
    let mut servers = vec![serve(web.netns(), "web")?, serve(other.netns(), "other")?];
    servers.push(serve(&outside, "outside")?);

    let web6 = SocketAddr::from((pod_ipv6(&web)?, 8080));
    let other6 = SocketAddr::from((pod_ipv6(&other)?, 8080));
    let web4 = SocketAddr::from((web.ipv4()?, 8080));
    let allowed_world: SocketAddr = "[fd00:99::2]:8080".parse()?;
    let denied_world: SocketAddr = "[fd00:99::3]:8080".parse()?;

    // Allow by label over IPv6 (client's egress and web's ingress both
    // enforced): the whole exchange, replies included, passes.
    reaches(client.netns(), web6, "web")?;
    // Replies of a connection the policed pod opened pass its default-deny
    // ingress (web's egress is not enforced; `other` is not allowed in).
    reaches(web.netns(), other6, "other")?;
    // Default-deny ingress over IPv6.
    blocked(other.netns(), web6, "other -> web over IPv6");
    // client's egress: not to `other`, to the world only as its CIDRs say.
    blocked(client.netns(), other6, "client -> other over IPv6");
    reaches(client.netns(), allowed_world, "outside")?;
    blocked(client.netns(), denied_world, "IPv6 CIDR deny");
    // The outside host itself is fine: it answers from where no policy is.
    reaches(node.netns(), denied_world, "outside")?;

    // Neighbour discovery keeps working under enforcement in both
    // directions: forget every neighbour and reconnect.
    for pod in [&client, &web] {
        pod.netns().run("ip", &["-6", "neigh", "flush", "all"])?;
    }
    node.netns().run("ip", &["-6", "neigh", "flush", "all"])?;
    reaches(client.netns(), web6, "web")?;

    // IPv4 decides as before under the same policies.
    reaches(client.netns(), web4, "web")?;
    blocked(other.netns(), web4, "other -> web over IPv4");

    // `catena monitor` shows an IPv6 drop with its addresses and the
    // endpoint it hit.
    let mon = DropMonitor::start(&node, "policy_denied")?;
    std::thread::sleep(Duration::from_millis(500)); // let it subscribe
    blocked(other.netns(), web6, "other -> web over IPv6, watched");
    let ev = mon.event()?;
    assert_eq!(ev["direction"], "ingress", "{ev}");
    assert_eq!(ev["dst"], web6.to_string(), "{ev}");
    let src: SocketAddr = ev["src"].as_str().unwrap_or_default().parse()?;
    assert_eq!(src.ip(), other6.ip(), "{ev}");
    assert_eq!(ev["proto"], "TCP", "{ev}");

    let status: catena_api::Status = agent.client().get("/v1/status")?;
    let c = &status.datapath.counters;
    assert_eq!(c["drop_unsupported_l3"], 0, "{c:?}");
    assert!(c["drop_policy_denied"] >= 12, "{c:?}");

    for mut child in servers {
        let _ = child.kill();
        let _ = child.wait();
    }
    for pod in [&web, &client, &other] {
        cni.del(pod, "eth0", &CallArgs::default())?;
    }
    drop(agent);
    Ok(())
}
