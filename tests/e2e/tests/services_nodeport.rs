//! North-south services with real traffic: an external client (its own
//! network namespace, linked to the node by a veth that is the node's
//! external device) reaches NodePort, externalIP and LoadBalancer-IP
//! frontends of pods wired by the real ptp + catena-cni chain, through the
//! real agent (`--kube-proxy-replacement true`) and the eBPF programs on the
//! device.
//!
//! Topology (all addresses inside throwaway namespaces):
//! ```text
//!  client 192.168.77.2 ──ext0── node1 192.168.77.1 ──link1── node2 10.10.0.2
//!                                 10.10.0.1                  pod CIDR 10.244.2.0/24
//!                                 pods 10.244.1.0/24         (ptp only, no catena)
//! ```
//! node2 is a second node with a backend pod of its own: reaching it from
//! node1 with externalTrafficPolicy: Cluster needs SNAT so its reply returns
//! through node1.

use catena_api::ServiceStatus;
use catena_e2e::echo::{echo_request, one_port_to_each, EchoPeer};
use catena_e2e::source::{ClusterSource, SourceKind};
use catena_e2e::{pod_yaml, wait_for};
use catena_lab::{CallArgs, CniRunner, Netns, Node};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::time::Duration;

const NODE_EXT: &str = "192.168.77.1";
const CLIENT: &str = "192.168.77.2";
const NODE_LINK: &str = "10.10.0.1";
const EXTERNAL_IP: &str = "203.0.113.10";
const LB_IP: &str = "203.0.113.20";
/// Frontends of a Service whose only endpoint is on node2.
const REMOTE_EXTERNAL_IP: &str = "203.0.113.30";
const REMOTE_LB_IP: &str = "203.0.113.31";
/// The one ephemeral port the client uses while checking port reuse.
const REUSED_PORT: u16 = 40000;
/// Where the echo servers listen (any address of their family).
const ANY: IpAddr = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
const TIMEOUT: Duration = Duration::from_secs(3);

/// A plain HTTP GET from `ns`: (status code, body).
fn http_get(ns: &Netns, addr: SocketAddr) -> anyhow::Result<(u16, String)> {
    ns.enter_thread(move || -> anyhow::Result<(u16, String)> {
        let mut s = TcpStream::connect_timeout(&addr, TIMEOUT)?;
        s.set_read_timeout(Some(TIMEOUT))?;
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n")?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        let code = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| anyhow::anyhow!("not HTTP: {text:?}"))?;
        let body = text
            .split("\r\n\r\n")
            .nth(1)
            .unwrap_or_default()
            .to_string();
        Ok((code, body))
    })?
}

fn sa(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), port)
}

#[allow(clippy::too_many_arguments)]
fn service(
    name: &str,
    cluster_ip: &str,
    node_port: u16,
    policy: &str,
    selector: Option<&str>,
    health_port: Option<u16>,
    external_ips: &[&str],
    lb_ip: Option<&str>,
) -> String {
    let selector = selector
        .map(|s| format!("  selector: {{app: {s}}}\n"))
        .unwrap_or_default();
    let health = health_port
        .map(|p| format!("  healthCheckNodePort: {p}\n"))
        .unwrap_or_default();
    let ext = if external_ips.is_empty() {
        String::new()
    } else {
        format!("  externalIPs: [{}]\n", external_ips.join(", "))
    };
    let (kind, status) = match lb_ip {
        Some(ip) => (
            "LoadBalancer",
            format!("status:\n  loadBalancer:\n    ingress: [{{ip: {ip}}}]\n"),
        ),
        None => ("NodePort", String::new()),
    };
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  type: {kind}\n  clusterIP: {cluster_ip}\n  externalTrafficPolicy: {policy}\n{selector}{health}{ext}  ports:\n  - {{name: http, port: 80, targetPort: 8080, nodePort: {node_port}, protocol: TCP}}\n{status}"
    )
}

fn slice(name: &str, service: &str, addresses: &[String]) -> String {
    catena_e2e::endpoint_slice_yaml(name, service, 8080, addresses)
}

/// Links the client namespace to node1 (ext0, with node1's default route
/// through it, so auto-detection takes it) and node1 to node2 (link1).
fn wire(node1: &Node, node2: &Node, client: &Netns) -> anyhow::Result<()> {
    let n1 = node1.netns();
    n1.run(
        "ip",
        &[
            "link",
            "add",
            "ext0",
            "type",
            "veth",
            "peer",
            "name",
            "cl0",
            "netns",
            client.name(),
        ],
    )?;
    n1.run(
        "ip",
        &["addr", "add", &format!("{NODE_EXT}/24"), "dev", "ext0"],
    )?;
    n1.run("ip", &["link", "set", "ext0", "up"])?;
    n1.run("ip", &["route", "add", "default", "via", CLIENT])?;
    client.run(
        "ip",
        &["addr", "add", &format!("{CLIENT}/24"), "dev", "cl0"],
    )?;
    client.run("ip", &["link", "set", "cl0", "up"])?;
    client.run("ip", &["link", "set", "lo", "up"])?;
    // externalIPs and LoadBalancer IPs are routed to the node.
    client.run("ip", &["route", "add", "203.0.113.0/24", "via", NODE_EXT])?;

    n1.run(
        "ip",
        &[
            "link",
            "add",
            "link1",
            "type",
            "veth",
            "peer",
            "name",
            "link2",
            "netns",
            node2.netns().name(),
        ],
    )?;
    n1.run(
        "ip",
        &["addr", "add", &format!("{NODE_LINK}/24"), "dev", "link1"],
    )?;
    n1.run("ip", &["link", "set", "link1", "up"])?;
    n1.run("ip", &["route", "add", "10.244.2.0/24", "via", "10.10.0.2"])?;
    let n2 = node2.netns();
    n2.run("ip", &["addr", "add", "10.10.0.2/24", "dev", "link2"])?;
    n2.run("ip", &["link", "set", "link2", "up"])?;
    n2.run("ip", &["link", "set", "lo", "up"])?;
    n2.run("ip", &["route", "add", "10.244.1.0/24", "via", NODE_LINK])?;
    for ns in [n1, n2] {
        ns.run("sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
    }
    Ok(())
}

#[test]
fn nodeport_external_ips_and_traffic_policies() -> anyhow::Result<()> {
    let node1 = Node::new("np1")?;
    let node2 = Node::new("np2")?;
    let client = Netns::new("np-cl")?;
    wire(&node1, &node2, &client)?;

    // Pods: two local backends on node1 (chained with catena), one remote
    // backend on node2 (ptp alone: node2 runs no catena).
    let cni1 = CniRunner::new(
        &node1,
        node1.ptp_conflist("np", "10.244.1.0/24", "1.0.0", vec![node1.catena_plugin()])?,
    );
    let cni2 = CniRunner::new(
        &node2,
        node2.ptp_conflist("np", "10.244.2.0/24", "1.0.0", vec![])?,
    );

    let source = ClusterSource::new(SourceKind::Manifests, &node1)?;
    source.apply(
        "pods.yaml",
        &format!(
            "{}---\n{}",
            pod_yaml("web-1", "web"),
            pod_yaml("web-2", "web")
        ),
    )?;
    source.apply(
        "local.yaml",
        &service(
            "web-local",
            "10.96.0.20",
            30080,
            "Local",
            Some("web"),
            Some(30999),
            &[],
            None,
        ),
    )?;
    // link1 (towards node2) is named too: a flow SNATed to node2's pod must
    // come back on a device catena is attached to (auto-detection would
    // skip it, see `auto_detection_takes_the_default_route_device`).
    let agent = source.start_agent(
        &node1,
        &[
            "--kube-proxy-replacement",
            "true",
            "--cgroup-root",
            "none",
            "--devices",
            "ext0,link1",
        ],
    )?;
    let api = agent.client();

    let web1 = node1.pod("web-1")?;
    let web2 = node1.pod("web-2")?;
    let remote = node2.pod("remote-1")?;
    for pod in [&web1, &web2] {
        cni1.add(pod, "eth0", &CallArgs::default())?;
    }
    cni2.add(&remote, "eth0", &CallArgs::default())?;
    let _e1 = EchoPeer::start(web1.netns(), ANY, 8080, "web-1")?;
    let _e2 = EchoPeer::start(web2.netns(), ANY, 8080, "web-2")?;
    let _e3 = EchoPeer::start(remote.netns(), ANY, 8080, "remote-1")?;
    let (ip1, ip2, ip_remote) = (web1.ipv4()?, web2.ipv4()?, remote.ipv4()?);

    // Services with the remote backend (EndpointSlices name it directly).
    source.apply(
        "cluster.yaml",
        &format!(
            "{}---\n{}",
            service(
                "web-cluster",
                "10.96.0.21",
                30081,
                "Cluster",
                None,
                None,
                &[EXTERNAL_IP],
                Some(LB_IP)
            ),
            slice(
                "web-cluster-1",
                "web-cluster",
                &[ip1.to_string(), ip_remote.to_string()]
            )
        ),
    )?;
    source.apply(
        "remote-pair.yaml",
        &format!(
            "{}---\n{}",
            service(
                "remote-pair",
                "10.96.0.23",
                30084,
                "Cluster",
                None,
                None,
                &[REMOTE_EXTERNAL_IP],
                Some(REMOTE_LB_IP)
            ),
            slice("remote-pair-1", "remote-pair", &[ip_remote.to_string()])
        ),
    )?;
    source.apply(
        "remote-only.yaml",
        &format!(
            "{}---\n{}",
            service(
                "remote-only",
                "10.96.0.22",
                30082,
                "Local",
                None,
                Some(30998),
                &[],
                None
            )
            .replace(
                "namespace: default}",
                "namespace: default, annotations: {service.cilium.io/lb-algorithm: maglev}}"
            ),
            slice("remote-only-1", "remote-only", &[ip_remote.to_string()])
        ),
    )?;

    // NodePort frontends on both devices' addresses, externalIP and LB IP
    // on the service port.
    let services: Vec<ServiceStatus> =
        wait_for("NodePort frontends", Duration::from_secs(10), || {
            let s: Vec<ServiceStatus> = api.get("/v1/services")?;
            let want = [
                format!("{NODE_EXT}:30080/TCP"),
                format!("{NODE_EXT}:30081/TCP"),
                format!("{EXTERNAL_IP}:80/TCP"),
                format!("{LB_IP}:80/TCP"),
                format!("{NODE_EXT}:30082/TCP"),
                format!("{NODE_LINK}:30081/TCP"),
                format!("{REMOTE_EXTERNAL_IP}:80/TCP"),
                format!("{REMOTE_LB_IP}:80/TCP"),
            ];
            Ok(want
                .iter()
                .all(|w| s.iter().any(|x| &x.frontend == w))
                .then_some(s))
        })?;
    let backends = |fe: &str| {
        services
            .iter()
            .find(|s| s.frontend == fe)
            .map(|s| s.backends.clone())
            .unwrap_or_default()
    };
    let status = |fe: &str| {
        services
            .iter()
            .find(|s| s.frontend == fe)
            .cloned()
            .unwrap_or_else(|| panic!("{fe} not listed: {services:?}"))
    };
    let mut local = vec![format!("{ip1}:8080"), format!("{ip2}:8080")];
    local.sort();
    // eTP=Local, iTP=Cluster: two scopes. The NodePort of web-local has only
    // local endpoints anyway; remote-only's in-cluster scope keeps the
    // remote endpoint while its external scope is empty.
    assert_eq!(backends(&format!("{NODE_EXT}:30080/TCP")), local);
    let remote_only = status(&format!("{NODE_EXT}:30082/TCP"));
    assert_eq!(remote_only.backends, vec![format!("{ip_remote}:8080")]);
    assert_eq!(remote_only.external_backends, Some(vec![]));
    // eTP=Cluster: one scope.
    assert_eq!(
        status(&format!("{NODE_EXT}:30081/TCP")).external_backends,
        None
    );
    // Each frontend's kind and algorithm (remote-only by annotation).
    for (fe, kind, algorithm) in [
        ("10.96.0.20:80/TCP".to_string(), "ClusterIP", "random"),
        (format!("{NODE_EXT}:30080/TCP"), "NodePort", "random"),
        (format!("{NODE_LINK}:30081/TCP"), "NodePort", "random"),
        (format!("{EXTERNAL_IP}:80/TCP"), "ExternalIP", "random"),
        (format!("{LB_IP}:80/TCP"), "LoadBalancer", "random"),
        (format!("{NODE_EXT}:30082/TCP"), "NodePort", "maglev"),
        ("10.96.0.22:80/TCP".to_string(), "ClusterIP", "maglev"),
    ] {
        let s = status(&fe);
        assert_eq!(
            (s.kind.as_str(), s.algorithm.as_str()),
            (kind, algorithm),
            "{fe}"
        );
    }
    // The CLI shows the same, as a table and as JSON.
    let cli = |args: &[&str]| -> anyhow::Result<String> {
        let out = std::process::Command::new(catena_lab::bin_path("catena")?)
            .arg("--socket")
            .arg(node1.agent_socket())
            .args(args)
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8(out.stdout)?)
    };
    let table = cli(&["service", "list"])?;
    let row = table
        .lines()
        .find(|l| l.contains(&format!("{NODE_EXT}:30082/TCP")))
        .unwrap_or_else(|| panic!("{table}"));
    for want in ["NodePort", "maglev", "(external: <none: rejects>)"] {
        assert!(row.contains(want), "{want:?} missing: {row}");
    }
    assert!(table.lines().next().unwrap().contains("KIND"), "{table}");
    let listed: Vec<ServiceStatus> =
        serde_json::from_str(&cli(&["service", "list", "-o", "json"])?)?;
    let lb = listed
        .iter()
        .find(|s| s.frontend == format!("{LB_IP}:80/TCP"))
        .expect("LB frontend in JSON");
    assert_eq!(
        (lb.kind.as_str(), lb.algorithm.as_str()),
        ("LoadBalancer", "random")
    );

    // eTP=Local NodePort: both local backends serve, the client's address
    // reaches them unchanged, replies come from the frontend.
    let mut served: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..40 {
        let (by, seen, peer) = echo_request(&client, sa(NODE_EXT, 30080))?;
        assert_eq!(seen, CLIENT, "eTP=Local keeps the client address");
        assert_eq!(peer, sa(NODE_EXT, 30080));
        *served.entry(by).or_default() += 1;
    }
    assert!(
        served.get("web-1").copied().unwrap_or(0) > 5
            && served.get("web-2").copied().unwrap_or(0) > 5,
        "both local backends serve: {served:?}"
    );

    // eTP=Cluster: the local backend sees the client, the remote one (on
    // node2) sees node1's address on link1 (SNAT), and the reply still comes
    // back from the frontend. Same for the externalIP and the LB IP.
    for frontend in [sa(NODE_EXT, 30081), sa(EXTERNAL_IP, 80), sa(LB_IP, 80)] {
        let mut served: BTreeMap<String, usize> = BTreeMap::new();
        for _ in 0..30 {
            let (by, seen, peer) = echo_request(&client, frontend)?;
            assert_eq!(peer, frontend, "reply from the frontend");
            match by.as_str() {
                "web-1" => assert_eq!(seen, CLIENT, "local backend: no SNAT"),
                "remote-1" => assert_eq!(seen, NODE_LINK, "remote backend: SNAT to link1"),
                other => panic!("unexpected backend {other:?}"),
            }
            *served.entry(by).or_default() += 1;
        }
        assert!(
            served.get("web-1").copied().unwrap_or(0) > 3
                && served.get("remote-1").copied().unwrap_or(0) > 3,
            "{frontend}: both backends serve: {served:?}"
        );
    }

    // One client port to two frontends of one remote backend: each reply
    // must come from its own frontend (see `one_port_to_each`).
    one_port_to_each(
        &client,
        REUSED_PORT,
        &[sa(REMOTE_EXTERNAL_IP, 80), sa(REMOTE_LB_IP, 80)],
        "remote-1",
        NODE_LINK,
    )?;

    // eTP=Local without a local endpoint: an external client is refused at
    // once (TCP RST)...
    let err = echo_request(&client, sa(NODE_EXT, 30082)).unwrap_err();
    assert!(
        format!("{err:#}").contains("refused"),
        "remote-only NodePort must be refused: {err:#}"
    );
    // ...while a pod on this node, an in-cluster client, reaches the same
    // NodePort through the remote endpoint (kube-proxy and Cilium alike),
    // with its own address and the reply from the NodePort.
    for _ in 0..5 {
        let (by, seen, peer) = echo_request(web1.netns(), sa(NODE_EXT, 30082))?;
        assert_eq!((by.as_str(), seen), ("remote-1", ip1.to_string()));
        assert_eq!(peer, sa(NODE_EXT, 30082));
    }

    // Health-check node ports: 200 with the local count, 503 with none. The
    // agent re-syncs them every second: wait for the answer to settle.
    let body = wait_for("health-check node port", Duration::from_secs(10), || {
        Ok(match http_get(&client, sa(NODE_EXT, 30999)) {
            Ok((200, body)) => Some(body),
            _ => None,
        })
    })?;
    let json: serde_json::Value = serde_json::from_str(&body)?;
    assert_eq!(
        json,
        serde_json::json!({"service": {"namespace": "default", "name": "web-local"},
                            "localEndpoints": 2, "serviceProxyHealthy": true})
    );
    let (code, body) = wait_for("remote-only health port", Duration::from_secs(10), || {
        Ok(http_get(&client, sa(NODE_EXT, 30998)).ok())
    })?;
    assert_eq!(code, 503, "{body}");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body)?["localEndpoints"],
        0
    );

    // A local backend going away lowers the count.
    cni1.del(&web2, "eth0", &CallArgs::default())?;
    wait_for("count follows DEL", Duration::from_secs(10), || {
        let (code, body) = http_get(&client, sa(NODE_EXT, 30999))?;
        let v: serde_json::Value = serde_json::from_str(&body)?;
        Ok((code == 200 && v["localEndpoints"] == 1).then_some(()))
    })?;

    // Device links are pinned apart from the veths' and go with uninstall.
    let pins: Vec<String> = std::fs::read_dir(node1.bpffs_dir().join("links"))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        pins.iter()
            .any(|p| p.starts_with("dev-") && p.ends_with("-ingress"))
            && pins
                .iter()
                .any(|p| p.starts_with("dev-") && p.ends_with("-egress")),
        "{pins:?}"
    );

    cni1.del(&web1, "eth0", &CallArgs::default())?;
    cni2.del(&remote, "eth0", &CallArgs::default())?;
    Ok(())
}

/// Without `--devices`: ext0 (holding the default route) is external, link1
/// (a veth without it) and the pods' ptp veths are not.
#[test]
fn auto_detection_takes_the_default_route_device() -> anyhow::Result<()> {
    let node1 = Node::new("npd1")?;
    let node2 = Node::new("npd2")?;
    let client = Netns::new("npd-cl")?;
    wire(&node1, &node2, &client)?;
    let source = ClusterSource::new(SourceKind::Manifests, &node1)?;
    source.apply("pods.yaml", &pod_yaml("web-1", "web"))?;
    source.apply(
        "svc.yaml",
        &service(
            "web",
            "10.96.0.30",
            30090,
            "Cluster",
            Some("web"),
            None,
            &[],
            None,
        ),
    )?;
    let agent = source.start_agent(
        &node1,
        &["--kube-proxy-replacement", "true", "--cgroup-root", "none"],
    )?;
    let api = agent.client();
    let cni = CniRunner::new(
        &node1,
        node1.ptp_conflist("np", "10.244.1.0/24", "1.0.0", vec![node1.catena_plugin()])?,
    );
    let web1 = node1.pod("web-1")?;
    cni.add(&web1, "eth0", &CallArgs::default())?;
    let _e1 = EchoPeer::start(web1.netns(), ANY, 8080, "web-1")?;

    let frontends = wait_for("NodePort frontend", Duration::from_secs(10), || {
        let s: Vec<ServiceStatus> = api.get("/v1/services")?;
        let f: Vec<String> = s.into_iter().map(|s| s.frontend).collect();
        Ok(f.contains(&format!("{NODE_EXT}:30090/TCP")).then_some(f))
    })?;
    assert!(
        !frontends
            .iter()
            .any(|f| f.starts_with(NODE_LINK) || f.starts_with("10.244.1.1:")),
        "only ext0 is external: {frontends:?}"
    );
    let (by, seen, _) = echo_request(&client, sa(NODE_EXT, 30090))?;
    assert_eq!((by.as_str(), seen.as_str()), ("web-1", CLIENT));

    // Both hooks of ext0 pinned under links/ with the `dev-` prefix (so the
    // veth link GC, which parses a leading ifindex, never takes them).
    let links = node1.bpffs_dir().join("links");
    let dev_pins = || -> Vec<String> {
        std::fs::read_dir(&links)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("dev-"))
            .collect()
    };
    assert_eq!(dev_pins().len(), 2, "{:?}", dev_pins());
    cni.del(&web1, "eth0", &CallArgs::default())?;
    Ok(())
}
