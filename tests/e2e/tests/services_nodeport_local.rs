//! NodePorts reached from the node itself and from its pods, as kube-proxy
//! serves them: `127.0.0.1:<nodePort>`, `[::1]:<nodePort>` and any node
//! address, over TCP and UDP, through the socket-level load balancer (a
//! private cgroup stands in for the node's root cgroup). The client sees
//! the address it dialled (getpeername, recvfrom); a port that is no
//! NodePort stays the local listener's; a pod's own loopback stays the
//! pod's.
//!
//! Node addresses (all inside the lab node's namespace):
//! ```text
//!  ext0 (veth, the external device)    192.168.88.1  fd00:88::1
//!  int0 (veth, not a device)           172.20.0.1    fd00:89::1
//!  pods (ptp + catena)                 10.244.21.0/24  fd00:21::/64
//!  far-1 (ptp only, "another node")    10.244.22.0/24
//! ```
//! ext0's addresses have NodePort frontends of their own; int0's and the
//! loopback addresses are served by the NodePort's wildcard frontend.

use catena_e2e::dual_stack::{self, pod_ipv6};
use catena_e2e::source::{ClusterSource, SourceKind};
use catena_e2e::{pod_yaml, wait_for, TestCgroup};
use catena_lab::{CallArgs, CniRunner, Conflist, Netns, Node};
use serde_json::json;
use std::net::{Ipv6Addr, SocketAddr, UdpSocket};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

const PROBE: &str = env!("CARGO_BIN_EXE_sock_probe");

/// `sock_probe <mode> <addr>` in `ns`, joined to `cgroup` first when given:
/// (reply line, peer the socket API reported).
fn probe(
    ns: &Netns,
    cgroup: Option<&TestCgroup>,
    mode: &str,
    addr: &str,
) -> anyhow::Result<(String, SocketAddr)> {
    let join = cgroup
        .map(|c| format!("echo $$ > {}/cgroup.procs && ", c.0.display()))
        .unwrap_or_default();
    let mut cmd = Command::new("sh");
    cmd.args(["-c", &format!("{join}exec {PROBE} {mode} '{addr}'")]);
    let out = ns.output(cmd)?;
    anyhow::ensure!(
        out.status.success(),
        "{mode} {addr}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let text = String::from_utf8(out.stdout)?;
    let mut lines = text.lines();
    let reply = lines.next().unwrap_or_default().to_string();
    let peer = lines
        .next()
        .ok_or_else(|| anyhow::anyhow!("{mode} {addr}: no peer in {text:?}"))?
        .parse()?;
    Ok((reply, peer))
}

/// Asserts that `mode` to `addr` from `ns` (in `cgroup`) is answered by
/// `want` and that the socket reports `addr` itself as its peer.
fn expect_served(
    ns: &Netns,
    cgroup: Option<&TestCgroup>,
    mode: &str,
    addr: &str,
    want: &str,
) -> anyhow::Result<()> {
    let (reply, peer) = probe(ns, cgroup, mode, addr)?;
    assert_eq!(reply, want, "{mode} {addr}");
    assert_eq!(peer, addr.parse::<SocketAddr>()?, "{mode} {addr}: peer");
    Ok(())
}

/// A socat TCP server in `ns` on `listen` answering `name`.
fn serve(ns: &Netns, name: &str, listen: &str) -> anyhow::Result<Child> {
    let mut cmd = Command::new("socat");
    cmd.args([listen, &format!("SYSTEM:echo {name}")]);
    let child = ns.spawn(cmd)?;
    // socat listens a moment after it starts.
    std::thread::sleep(Duration::from_millis(200));
    Ok(child)
}

/// A UDP server on `[::]:port` (IPv4 too) answering every datagram with
/// `name`, from one socket (socat's forking UDP server can lose datagrams
/// that arrive while a child still holds the socket). Stopped on drop.
struct UdpServer {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<anyhow::Result<anyhow::Result<()>>>>,
}

impl UdpServer {
    fn start(ns: &Netns, port: u16, name: &str) -> anyhow::Result<UdpServer> {
        let stop = Arc::new(AtomicBool::new(false));
        let (stop2, reply) = (stop.clone(), format!("{name}\n"));
        let (tx, rx) = std::sync::mpsc::channel();
        let handle = ns.spawn_thread(move || -> anyhow::Result<()> {
            let s = UdpSocket::bind((Ipv6Addr::UNSPECIFIED, port))?;
            s.set_read_timeout(Some(Duration::from_millis(50)))?;
            let _ = tx.send(());
            let mut buf = [0u8; 512];
            while !stop2.load(Ordering::Relaxed) {
                match s.recv_from(&mut buf) {
                    Ok((_, from)) => {
                        s.send_to(reply.as_bytes(), from)?;
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            Ok(())
        })?;
        rx.recv_timeout(Duration::from_secs(5))
            .map_err(|_| anyhow::anyhow!("UDP server in {} did not start", ns.name()))?;
        Ok(UdpServer {
            stop,
            handle: Some(handle),
        })
    }
}

impl Drop for UdpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// ptp + host-local with `v4` and, if given, `v6` ranges, then `extra`.
fn conflist(
    node: &Node,
    name: &str,
    v4: &str,
    v6: Option<&str>,
    extra: Vec<serde_json::Value>,
) -> anyhow::Result<Conflist> {
    let mut ranges = vec![json!([{"subnet": v4}])];
    let mut routes = vec![json!({"dst": "0.0.0.0/0"})];
    if let Some(v6) = v6 {
        ranges.push(json!([{"subnet": v6}]));
        routes.push(json!({"dst": "::/0"}));
    }
    let mut plugins = vec![json!({
        "type": "ptp",
        "ipMasq": false,
        "ipam": {
            "type": "host-local",
            "ranges": ranges,
            "routes": routes,
            "dataDir": node.ipam_dir().join(name),
        }
    })];
    plugins.extend(extra);
    Ok(Conflist::from_value(
        json!({"cniVersion": "1.0.0", "name": name, "plugins": plugins}),
    )?)
}

/// Two interfaces with IPv4 and IPv6 addresses in the node: veths whose
/// peers sit in `outside` (the lab kernel may have no dummy driver).
fn wire(node: &Node, outside: &Netns) -> anyhow::Result<()> {
    let ns = node.netns();
    dual_stack::no_dad(ns)?;
    for (dev, peer, v4, v6) in [
        ("ext0", "ext0p", "192.168.88.1/24", "fd00:88::1/64"),
        ("int0", "int0p", "172.20.0.1/24", "fd00:89::1/64"),
    ] {
        ns.run(
            "ip",
            &[
                "link",
                "add",
                dev,
                "type",
                "veth",
                "peer",
                "name",
                peer,
                "netns",
                outside.name(),
            ],
        )?;
        outside.run("ip", &["link", "set", peer, "up"])?;
        ns.run("ip", &["addr", "add", v4, "dev", dev])?;
        ns.run("ip", &["addr", "add", v6, "dev", dev, "nodad"])?;
        ns.run("ip", &["link", "set", dev, "up"])?;
    }
    Ok(())
}

#[test]
fn node_processes_and_pods_reach_node_ports_on_node_addresses() -> anyhow::Result<()> {
    let node = Node::new("npl")?;
    let cgroup = TestCgroup::new("npl")?;
    let outside = Netns::new("npl-out")?;
    wire(&node, &outside)?;
    let ns = node.netns();

    let source = ClusterSource::new(SourceKind::Manifests, &node)?;
    source.apply(
        "pods.yaml",
        &format!(
            "{}---\n{}",
            pod_yaml("web-1", "web"),
            pod_yaml("client", "client")
        ),
    )?;
    let cg = cgroup.0.to_str().unwrap().to_string();
    let agent = source.start_agent(
        &node,
        &[
            "--kube-proxy-replacement",
            "true",
            "--cgroup-root",
            &cg,
            "--devices",
            "ext0",
        ],
    )?;
    let api = agent.client();
    let chained = CniRunner::new(
        &node,
        conflist(
            &node,
            "npl",
            "10.244.21.0/24",
            Some("fd00:21::/64"),
            vec![node.catena_plugin()],
        )?,
    );
    // far-1 stands for an endpoint on another node: wired by ptp alone, so
    // catena does not count it as local.
    let plain = CniRunner::new(
        &node,
        conflist(&node, "far", "10.244.22.0/24", None, vec![])?,
    );
    let web1 = node.pod("web-1")?;
    let client = node.pod("client")?;
    let far = node.pod("far-1")?;
    for pod in [&web1, &client] {
        chained.add(pod, "eth0", &CallArgs::default())?;
    }
    plain.add(&far, "eth0", &CallArgs::default())?;
    let (web_ip, web_ip6, far_ip) = (web1.ipv4()?, pod_ipv6(&web1)?, far.ipv4()?);
    let _udp = UdpServer::start(web1.netns(), 5353, "web-1")?;
    let tcp = "TCP6-LISTEN:8080,fork,reuseaddr";
    let mut children = vec![
        serve(web1.netns(), "web-1", tcp)?,
        serve(far.netns(), "far-1", tcp)?,
    ];
    // Not NodePorts: a node process's own listener on 127.0.0.1:30081, and
    // the client pod's own on its 127.0.0.1:30080 (a NodePort number).
    children.push(serve(
        ns,
        "node-local",
        "TCP4-LISTEN:30081,bind=127.0.0.1,fork,reuseaddr",
    )?);
    children.push(serve(
        client.netns(),
        "pod-own",
        "TCP4-LISTEN:30080,bind=127.0.0.1,fork,reuseaddr",
    )?);

    // web: dual stack, externalTrafficPolicy Cluster, TCP 30080 and UDP
    // 30053. far: IPv4, externalTrafficPolicy Local, its only endpoint on
    // "another node".
    let web = String::from(
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\nspec:\n  type: NodePort\n  clusterIP: 10.96.0.50\n  clusterIPs: [10.96.0.50, \"fd00:96::50\"]\n  ipFamilies: [IPv4, IPv6]\n  ipFamilyPolicy: RequireDualStack\n  ports:\n  - {name: http, port: 80, targetPort: 8080, nodePort: 30080, protocol: TCP}\n  - {name: dns, port: 53, targetPort: 5353, nodePort: 30053, protocol: UDP}\n"
    );
    let slice = |name: &str, service: &str, family: &str, addr: String, node: &str| {
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}, namespace: default, labels: {{kubernetes.io/service-name: {service}}}}}\naddressType: {family}\nports:\n- {{name: http, port: 8080, protocol: TCP}}\n- {{name: dns, port: 5353, protocol: UDP}}\nendpoints:\n- {{addresses: [\"{addr}\"], nodeName: {node}}}\n"
        )
    };
    let far_svc = "apiVersion: v1\nkind: Service\nmetadata: {name: far, namespace: default}\nspec:\n  type: NodePort\n  clusterIP: 10.96.0.51\n  externalTrafficPolicy: Local\n  ports:\n  - {name: http, port: 80, targetPort: 8080, nodePort: 30090, protocol: TCP}\n";
    source.apply(
        "services.yaml",
        &[
            web,
            slice("web-4", "web", "IPv4", web_ip.to_string(), "here"),
            slice("web-6", "web", "IPv6", web_ip6.to_string(), "here"),
            far_svc.to_string(),
            slice("far-1", "far", "IPv4", far_ip.to_string(), "elsewhere"),
        ]
        .join("---\n"),
    )?;

    // Programmed: the wildcard frontends are listed as NodePorts.
    wait_for(
        "wildcard NodePort frontends",
        Duration::from_secs(10),
        || {
            let s: Vec<catena_api::ServiceStatus> = api.get("/v1/services")?;
            let has = |fe: &str, kind: &str| s.iter().any(|x| x.frontend == fe && x.kind == kind);
            Ok((has("0.0.0.0:30080/TCP", "NodePort")
                && has("0.0.0.0:30053/UDP", "NodePort")
                && has("[::]:30080/TCP", "NodePort")
                && has("0.0.0.0:30090/TCP", "NodePort")
                && has("192.168.88.1:30080/TCP", "NodePort"))
            .then_some(()))
        },
    )?;
    // The node addresses reach the datapath within a sync period.
    wait_for("node addresses", Duration::from_secs(10), || {
        Ok(probe(ns, Some(&cgroup), "tcp", "172.20.0.1:30080").ok())
    })?;

    // A node process: TCP on loopback (IPv4, IPv4-mapped, IPv6), on the
    // external device's addresses and on int0's.
    for addr in [
        "127.0.0.1:30080",
        "127.0.0.53:30080",
        "0.0.0.0:30080",
        "[::]:30080",
        "[::ffff:127.0.0.1]:30080",
        "[::1]:30080",
        "192.168.88.1:30080",
        "172.20.0.1:30080",
        "[fd00:88::1]:30080",
        "[fd00:89::1]:30080",
    ] {
        expect_served(ns, Some(&cgroup), "tcp", addr, "web-1")?;
    }
    // UDP, unconnected (sendmsg/recvmsg) and connected (connect/getpeername).
    for addr in [
        "127.0.0.1:30053",
        "[::1]:30053",
        "172.20.0.1:30053",
        "[fd00:89::1]:30053",
        "192.168.88.1:30053",
    ] {
        expect_served(ns, Some(&cgroup), "udp", addr, "web-1")?;
        expect_served(ns, Some(&cgroup), "udp-connected", addr, "web-1")?;
    }

    // externalTrafficPolicy: Local does not apply to node-local clients
    // (kube-proxy sends them to the cluster-wide chain): the endpoint on
    // "another node" serves them, on loopback and on node addresses.
    for addr in ["127.0.0.1:30090", "172.20.0.1:30090", "192.168.88.1:30090"] {
        expect_served(ns, Some(&cgroup), "tcp", addr, "far-1")?;
    }

    // Not a NodePort: 127.0.0.1:30081 stays the local listener's, and a
    // node IP on a port that is no NodePort is not translated either.
    expect_served(ns, Some(&cgroup), "tcp", "127.0.0.1:30081", "node-local")?;
    assert!(probe(ns, Some(&cgroup), "tcp", "172.20.0.1:30082").is_err());
    // Outside the cgroup nothing is translated: nobody listens there.
    assert!(probe(ns, None, "tcp", "127.0.0.1:30080").is_err());

    // A pod in the cgroup reaches the NodePort on every node address, and
    // its own 127.0.0.1:30080 stays its own.
    let pod_ns = client.netns();
    for addr in [
        "172.20.0.1:30080",
        "192.168.88.1:30080",
        "[fd00:89::1]:30080",
    ] {
        expect_served(pod_ns, Some(&cgroup), "tcp", addr, "web-1")?;
    }
    expect_served(pod_ns, Some(&cgroup), "udp", "172.20.0.1:30053", "web-1")?;
    expect_served(pod_ns, Some(&cgroup), "tcp", "127.0.0.1:30080", "pod-own")?;
    // 0.0.0.0 is the pod's own host too (the kernel reports the loopback
    // address it connected to).
    let (reply, _) = probe(pod_ns, Some(&cgroup), "tcp", "0.0.0.0:30080")?;
    assert_eq!(reply, "pod-own");
    assert!(probe(pod_ns, Some(&cgroup), "tcp", "[::1]:30080").is_err());
    // Outside the cgroup the pod's packets take the tc path, which serves
    // the external device's NodePort frontends.
    expect_served(pod_ns, None, "tcp", "192.168.88.1:30080", "web-1")?;

    for child in &mut children {
        let _ = child.kill();
        let _ = child.wait();
    }
    for pod in [&web1, &client] {
        chained.del(pod, "eth0", &CallArgs::default())?;
    }
    plain.del(&far, "eth0", &CallArgs::default())?;
    drop(agent);
    Ok(())
}
