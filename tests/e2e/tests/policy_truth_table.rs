//! Network policy end to end: real pods in two namespaces wired by ptp +
//! catena, real TCP, UDP and ICMP, and the whole connectivity matrix compared
//! with the expected one after every policy change (applied while the pods
//! run; each change must take effect within a bounded time).

use catena_api::{EndpointPolicyStatus, Status};
use catena_e2e::source::{ClusterSource, SourceKind};
use catena_e2e::{labelled_pod_yaml, ping, receive_ip_proto, send_ip_proto};
use catena_lab::{CallArgs, CniRunner, Netns, Node, Pod};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

const TCP_PORT: u16 = 8080;
const UDP_PORT: u16 = 9090;
const PROBE: Duration = Duration::from_millis(400);
/// How long a policy change may take to show in the datapath.
const CONVERGE: Duration = Duration::from_secs(15);

fn tcp_ok(ns: &Netns, ip: Ipv4Addr) -> anyhow::Result<bool> {
    let addr = SocketAddr::from((ip, TCP_PORT));
    ns.enter_thread(move || {
        let Ok(s) = TcpStream::connect_timeout(&addr, PROBE) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(PROBE));
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).is_ok() && !line.is_empty()
    })
}

fn udp_ok(ns: &Netns, ip: Ipv4Addr, bind: Option<Ipv4Addr>) -> anyhow::Result<bool> {
    let addr = SocketAddr::from((ip, UDP_PORT));
    ns.enter_thread(move || {
        let s = UdpSocket::bind((bind.unwrap_or(Ipv4Addr::UNSPECIFIED), 0))?;
        s.set_read_timeout(Some(PROBE))?;
        s.send_to(b"probe\n", addr)?;
        let mut buf = [0u8; 128];
        Ok::<bool, std::io::Error>(s.recv_from(&mut buf).is_ok())
    })?
    .map_err(Into::into)
}

/// (source, protocol) -> reachable, towards the server pod.
type Matrix = BTreeMap<(String, &'static str), bool>;

struct Lab<'a> {
    sources: Vec<(&'static str, &'a Netns)>,
    server: Ipv4Addr,
}

impl Lab<'_> {
    fn measure(&self) -> anyhow::Result<Matrix> {
        let mut m = Matrix::new();
        for (name, ns) in &self.sources {
            m.insert((name.to_string(), "tcp"), tcp_ok(ns, self.server)?);
            m.insert((name.to_string(), "udp"), udp_ok(ns, self.server, None)?);
            m.insert((name.to_string(), "icmp"), ping(ns, self.server, PROBE)?);
        }
        Ok(m)
    }

    /// Waits until the matrix is `expected` (a change applied while traffic
    /// runs), then checks it stays so on a second full measurement.
    fn expect(&self, step: &str, expected: &[(&str, [bool; 3])]) -> anyhow::Result<Duration> {
        let want: Matrix = expected
            .iter()
            .flat_map(|(src, [t, u, i])| {
                [("tcp", *t), ("udp", *u), ("icmp", *i)]
                    .map(|(proto, ok)| ((src.to_string(), proto), ok))
            })
            .collect();
        let start = Instant::now();
        let mut last = Matrix::new();
        while start.elapsed() < CONVERGE {
            last = self.measure()?;
            if last == want {
                let took = start.elapsed();
                assert_eq!(self.measure()?, want, "{step}: matrix did not stay stable");
                return Ok(took);
            }
        }
        panic!(
            "{step}: connectivity differs from the expected matrix after {CONVERGE:?}\n{}",
            render(&want, &last)
        );
    }
}

fn render(want: &Matrix, got: &Matrix) -> String {
    want.iter()
        .map(|((src, proto), w)| {
            let g = got.get(&(src.clone(), *proto)).copied();
            let mark = if g == Some(*w) { " " } else { "!" };
            format!("{mark} {src:>10} -> server {proto:<4}: want {w}, got {g:?}\n")
        })
        .collect()
}

const A: &str = "client-a"; // app=client in alpha
const B: &str = "client-b"; // app=client in beta
const HOST: &str = "host";

#[test]
fn policy_truth_table_from_manifests() -> anyhow::Result<()> {
    policy_truth_table(SourceKind::Manifests)
}

#[test]
fn policy_truth_table_from_kubernetes() -> anyhow::Result<()> {
    policy_truth_table(SourceKind::Kubernetes)
}

fn policy_truth_table(kind: SourceKind) -> anyhow::Result<()> {
    let node = Node::new("e2e-pol")?;
    let source = ClusterSource::new(kind, &node)?;
    let namespaces = "apiVersion: v1\nkind: Namespace\nmetadata: {name: alpha, labels: {team: a}}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: beta, labels: {team: b}}\n";
    source.apply("namespaces.yaml", namespaces)?;
    let pods = [
        labelled_pod_yaml("alpha", "server", &[("app", "server")]),
        labelled_pod_yaml("alpha", "client-a", &[("app", "client")]),
        labelled_pod_yaml("beta", "client-b", &[("app", "client")]),
    ]
    .join("---\n");
    source.apply("pods.yaml", &pods)?;
    let agent = source.start_agent(&node, &[])?;
    let api = agent.client();
    let conf = node.ptp_conflist("e2e", "10.244.7.0/24", "1.0.0", vec![node.catena_plugin()])?;
    let cni = CniRunner::new(&node, conf);
    let mk = |name: &str, ns: &str| -> anyhow::Result<Pod> {
        let mut p = node.pod(name)?;
        p.namespace = ns.into();
        Ok(p)
    };
    let server = mk("server", "alpha")?;
    let client_a = mk("client-a", "alpha")?;
    let client_b = mk("client-b", "beta")?;
    for pod in [&server, &client_a, &client_b] {
        cni.add(pod, "eth0", &CallArgs::default())?;
    }
    let _tcp = server.serve_tcp(TCP_PORT, "server")?;
    let udp = server.serve_udp(UDP_PORT, "server")?;
    let lab = Lab {
        sources: vec![
            (A, client_a.netns()),
            (B, client_b.netns()),
            (HOST, node.netns()),
        ],
        server: server.ipv4()?,
    };

    // No policy selects anyone: everything flows, including an IP protocol
    // no policy port can name (the control for the bypass check below).
    lab.expect(
        "no policy",
        &[(A, [true; 3]), (B, [true; 3]), (HOST, [true; 3])],
    )?;
    assert!(
        raw_protocol_arrives(&client_a, &server)?,
        "control: protocol 253 must pass without policy"
    );

    // Allow by labels: same-namespace clients on TCP 8080 and echo requests.
    // CNP peers are implicitly in the policy's namespace, so client-b (same
    // labels, other namespace) is denied; the node always reaches its pods.
    let allow = r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: allow-clients, namespace: alpha}
spec:
  endpointSelector: {matchLabels: {app: server}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
    icmps: [{fields: [{type: 8, family: IPv4}]}]
"#;
    source.apply("allow.yaml", allow)?;
    let took = lab.expect(
        "allow by labels",
        &[(A, [true, false, true]), (B, [false; 3]), (HOST, [true; 3])],
    )?;
    eprintln!("allow policy effective after {took:?}");

    // Bypass attempts under an L4 policy: an unknown IP protocol, and UDP
    // from an address that is not the pod's (a second address added inside
    // the pod and bound to) must not reach the server.
    assert!(
        !raw_protocol_arrives(&client_a, &server)?,
        "an IP protocol no rule names passed an L4 policy"
    );
    client_a
        .netns()
        .run("ip", &["addr", "add", "10.244.7.250/32", "dev", "eth0"])?;
    let before = udp.count();
    let spoofed = udp_ok(client_a.netns(), lab.server, Some("10.244.7.250".parse()?))?;
    assert!(!spoofed, "a reply came back to a spoofed source");
    assert_eq!(
        udp.count(),
        before,
        "a packet from a spoofed source reached the server"
    );

    // The endpoint's programmed policy names its source and the peer labels.
    let ep_path = format!(
        "{}/policy",
        catena_api::endpoint_path(&server.container_id, "eth0")
    );
    let programmed: EndpointPolicyStatus = api.get(&ep_path)?;
    assert!(
        programmed.ingress_enforced && !programmed.egress_enforced,
        "{programmed:?}"
    );
    assert!(
        programmed.entries.iter().any(|e| e.verdict == "allow"
            && e.protocol == "TCP"
            && e.ports == "8080"
            && e.source.contains("alpha/allow-clients")
            && e.remote_labels.iter().any(|l| l == "k8s:app=client")),
        "{programmed:#?}"
    );

    // Deny wins over the allow; ICMP (not named by the deny) still passes.
    let deny = r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: deny-tcp, namespace: alpha}
spec:
  endpointSelector: {matchLabels: {app: server}}
  ingressDeny:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
"#;
    source.apply("deny.yaml", deny)?;
    lab.expect(
        "deny precedence",
        &[
            (A, [false, false, true]),
            (B, [false; 3]),
            (HOST, [true; 3]),
        ],
    )?;

    // A Kubernetes NetworkPolicy instead: namespace selector on the
    // API server's automatic name label, UDP only.
    source.remove("deny.yaml")?;
    source.remove("allow.yaml")?;
    let knp = r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: from-beta, namespace: alpha}
spec:
  podSelector: {matchLabels: {app: server}}
  ingress:
  - from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: beta}}}]
    ports: [{port: 9090, protocol: UDP}]
"#;
    source.apply("knp.yaml", knp)?;
    lab.expect(
        "NetworkPolicy namespace selector",
        &[
            (A, [false; 3]),
            (B, [false, true, false]),
            (HOST, [true; 3]),
        ],
    )?;

    // Egress, and default deny switched off: client-b may only talk TCP to
    // the server (its ingress is open again), while a deny-only policy with
    // enableDefaultDeny false on client-a blocks ICMP and nothing else.
    source.remove("knp.yaml")?;
    let egress = r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: b-egress, namespace: beta}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toEndpoints: [{matchLabels: {app: server, io.kubernetes.pod.namespace: alpha}}]
    toPorts: [{ports: [{port: "8000", endPort: 8100, protocol: TCP}]}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: a-no-icmp, namespace: alpha}
spec:
  endpointSelector: {matchLabels: {app: client}}
  enableDefaultDeny: {egress: false}
  egressDeny:
  - toEntities: [cluster]
    icmps: [{fields: [{type: 8}]}]
"#;
    source.apply("egress.yaml", egress)?;
    lab.expect(
        "egress allow, port range, deny without default deny",
        &[
            (A, [true, true, false]),
            (B, [true, false, false]),
            (HOST, [true; 3]),
        ],
    )?;

    // Removing every policy restores full connectivity.
    source.remove("egress.yaml")?;
    lab.expect(
        "all policies removed",
        &[(A, [true; 3]), (B, [true; 3]), (HOST, [true; 3])],
    )?;
    let status: Status = api.get("/v1/status")?;
    assert!(status.policies.is_empty(), "{:?}", status.policies);

    for pod in [&server, &client_a, &client_b] {
        cni.del(pod, "eth0", &CallArgs::default())?;
    }
    Ok(())
}

/// Whether one packet of IP protocol 253 (reserved for experimentation, no
/// socket type, no ports) from `from` reaches `to`.
fn raw_protocol_arrives(from: &Pod, to: &Pod) -> anyhow::Result<bool> {
    let rx = receive_ip_proto(to.netns(), 253, Duration::from_millis(800))?;
    std::thread::sleep(Duration::from_millis(200)); // let the receiver bind
    send_ip_proto(from.netns(), to.ipv4()?, 253)?;
    let out = rx.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text.starts_with("got"))
}

#[test]
fn unsupported_policy_is_reported_and_fails_closed() -> anyhow::Result<()> {
    let node = Node::new("e2e-pol-l7")?;
    let source = ClusterSource::new(SourceKind::Manifests, &node)?;
    source.apply(
        "pods.yaml",
        &labelled_pod_yaml("default", "web", &[("app", "web")]),
    )?;
    // The L7 rule would allow GET on 80 only; without a proxy catena cannot
    // tell methods apart, so port 80 stays denied rather than fully open.
    let l7 = r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: l7, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
  - toPorts:
    - ports: [{port: "8080", protocol: TCP}]
      rules: {http: [{method: GET}]}
"#;
    source.apply("l7.yaml", l7)?;
    let agent = source.start_agent(&node, &[])?;
    let api = agent.client();
    let conf = node.ptp_conflist("e2e", "10.244.8.0/24", "1.0.0", vec![node.catena_plugin()])?;
    let cni = CniRunner::new(&node, conf);
    let web = node.pod("web")?;
    let client = node.pod("client")?;
    for pod in [&web, &client] {
        cni.add(pod, "eth0", &CallArgs::default())?;
    }
    let _s = web.serve_tcp(TCP_PORT, "web")?;
    assert!(
        !tcp_ok(client.netns(), web.ipv4()?)?,
        "the L7 allow must not open the port"
    );
    assert!(
        tcp_ok(node.netns(), web.ipv4()?)?,
        "the node still reaches its pod"
    );
    let status: Status = api.get("/v1/status")?;
    let p = status
        .policies
        .iter()
        .find(|p| p.name == "default/l7")
        .expect("reported");
    assert_eq!(p.state, "partial", "{p:?}");
    assert!(p.messages.iter().any(|m| m.contains("L7")), "{p:?}");
    assert!(agent.log().contains("fail-closed"), "warned in the log");
    for pod in [&web, &client] {
        cni.del(pod, "eth0", &CallArgs::default())?;
    }
    Ok(())
}
