//! IPv6 north-south services with real traffic: an external client (its own
//! network namespace, linked to the node by a veth that is the node's
//! external device) reaches IPv6 NodePort, externalIP and LoadBalancer-IP
//! frontends of dual-stack Services whose pods are wired by the real ptp +
//! host-local (IPv4 and IPv6 ranges) + catena-cni chain, through the real
//! agent (`--kube-proxy-replacement true`) and `from_netdev6` /
//! `to_netdev6` on the devices.
//!
//! Topology (all addresses inside throwaway namespaces, DAD off):
//! ```text
//!  client fd00:77::2 ──ext0── node1 fd00:77::1 ──link1── node2 fd00:10::2
//!         192.168.78.2        192.168.78.1        │       pods fd00:10:244:2::/64
//!                             pods fd00:10:244:1::/64     (ptp only, no catena)
//!                             link1: fd00:10::1 (IPv6 only)
//! ```
//! node2 has a backend pod of its own: reaching it from node1 with
//! externalTrafficPolicy: Cluster needs SNAT to node1's IPv6 address on
//! link1 so its reply returns through node1.

use anyhow::Context;
use catena_api::ServiceStatus;
use catena_e2e::echo::{echo_request, one_port_to_each, EchoPeer};
use catena_e2e::source::{ClusterSource, SourceKind};
use catena_e2e::{dual_stack, pod_yaml, wait_for};
use catena_lab::{CallArgs, CniRunner, Conflist, Netns, Node, Pod};
use serde_json::json;
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

const NODE_EXT: &str = "fd00:77::1";
const CLIENT: &str = "fd00:77::2";
const NODE_EXT4: &str = "192.168.78.1";
const CLIENT4: &str = "192.168.78.2";
const NODE_LINK: &str = "fd00:10::1";
const NODE2_LINK: &str = "fd00:10::2";
const EXTERNAL_IP: &str = "fd00:203::10";
const LB_IP: &str = "fd00:203::20";
/// Frontends of a Service whose only endpoint is on node2.
const REMOTE_EXTERNAL_IP: &str = "fd00:203::30";
const REMOTE_LB_IP: &str = "fd00:203::31";
/// The one ephemeral port the client uses while checking port reuse.
const REUSED_PORT: u16 = 40000;
/// Where the echo servers listen (any address of their family).
const ANY: IpAddr = IpAddr::V6(Ipv6Addr::UNSPECIFIED);

fn sa(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), port)
}

/// A dual-stack NodePort (or, with `lb_ip`, LoadBalancer) Service: TCP 80
/// (nodePort `node_port`) and UDP 53 (nodePort `node_port + 1`).
#[allow(clippy::too_many_arguments)]
fn service(
    name: &str,
    cluster_ips: (&str, &str),
    node_port: u16,
    policy: &str,
    selector: Option<&str>,
    external_ips: &[&str],
    lb_ip: Option<&str>,
) -> String {
    let selector = selector
        .map(|s| format!("  selector: {{app: {s}}}\n"))
        .unwrap_or_default();
    let ext = if external_ips.is_empty() {
        String::new()
    } else {
        let quoted: Vec<String> = external_ips.iter().map(|ip| format!("\"{ip}\"")).collect();
        format!("  externalIPs: [{}]\n", quoted.join(", "))
    };
    let (kind, status) = match lb_ip {
        Some(ip) => (
            "LoadBalancer",
            format!("status:\n  loadBalancer:\n    ingress: [{{ip: \"{ip}\"}}]\n"),
        ),
        None => ("NodePort", String::new()),
    };
    let (v4, v6) = cluster_ips;
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  type: {kind}\n  clusterIP: {v4}\n  clusterIPs: [{v4}, \"{v6}\"]\n  ipFamilies: [IPv4, IPv6]\n  ipFamilyPolicy: RequireDualStack\n  externalTrafficPolicy: {policy}\n{selector}{ext}  ports:\n  - {{name: http, port: 80, targetPort: 8080, nodePort: {node_port}, protocol: TCP}}\n  - {{name: dns, port: 53, targetPort: 5353, nodePort: {}, protocol: UDP}}\n{status}",
        node_port + 1
    )
}

/// An IPv6 EndpointSlice for `service` (port `http` 8080/TCP).
fn slice6(name: &str, service: &str, addresses: &[Ipv6Addr]) -> String {
    let addresses: Vec<String> = addresses.iter().map(|a| a.to_string()).collect();
    catena_e2e::endpoint_slice_yaml(name, service, 8080, &addresses)
        .replace("addressType: IPv4", "addressType: IPv6")
}

/// ptp + host-local with an IPv4 and an IPv6 range (default routes for
/// both), then `extra` (catena on node1, nothing on node2).
fn dual_stack_conflist(
    node: &Node,
    v4: &str,
    v6: &str,
    extra: Vec<serde_json::Value>,
) -> anyhow::Result<Conflist> {
    let mut plugins = vec![json!({
        "type": "ptp",
        "ipMasq": false,
        "ipam": {
            "type": "host-local",
            "ranges": [[{"subnet": v4}], [{"subnet": v6}]],
            "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}],
            "dataDir": node.ipam_dir(),
        }
    })];
    plugins.extend(extra);
    Ok(Conflist::from_value(
        json!({"cniVersion": "1.0.0", "name": "np6", "plugins": plugins}),
    )?)
}

fn pod_ipv6(pod: &Pod) -> anyhow::Result<Ipv6Addr> {
    let result = pod
        .result()
        .ok_or_else(|| anyhow::anyhow!("{} has no ADD result", pod.name))?;
    let ips = result.raw["ips"].as_array().cloned().unwrap_or_default();
    ips.iter()
        .filter_map(|ip| ip["address"].as_str()?.split('/').next()?.parse().ok())
        .next()
        .ok_or_else(|| anyhow::anyhow!("{}'s ADD result has no IPv6 address", pod.name))
}

/// Links the client namespace to node1 (ext0: IPv6 and IPv4, node1's
/// default routes through it) and node1 to node2 (link1: IPv6 only), all
/// with DAD off.
fn wire(node1: &Node, node2: &Node, client: &Netns) -> anyhow::Result<()> {
    let (n1, n2) = (node1.netns(), node2.netns());
    for ns in [n1, n2, client] {
        dual_stack::no_dad(ns)?;
    }
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
        &[
            "addr",
            "add",
            &format!("{NODE_EXT}/64"),
            "dev",
            "ext0",
            "nodad",
        ],
    )?;
    n1.run(
        "ip",
        &["addr", "add", &format!("{NODE_EXT4}/24"), "dev", "ext0"],
    )?;
    n1.run("ip", &["link", "set", "ext0", "up"])?;
    n1.run("ip", &["-6", "route", "add", "default", "via", CLIENT])?;
    n1.run("ip", &["route", "add", "default", "via", CLIENT4])?;
    client.run(
        "ip",
        &[
            "addr",
            "add",
            &format!("{CLIENT}/64"),
            "dev",
            "cl0",
            "nodad",
        ],
    )?;
    client.run(
        "ip",
        &["addr", "add", &format!("{CLIENT4}/24"), "dev", "cl0"],
    )?;
    client.run("ip", &["link", "set", "cl0", "up"])?;
    client.run("ip", &["link", "set", "lo", "up"])?;
    // externalIPs and LoadBalancer IPs are routed to the node.
    client.run(
        "ip",
        &["-6", "route", "add", "fd00:203::/64", "via", NODE_EXT],
    )?;

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
            n2.name(),
        ],
    )?;
    n1.run(
        "ip",
        &[
            "addr",
            "add",
            &format!("{NODE_LINK}/64"),
            "dev",
            "link1",
            "nodad",
        ],
    )?;
    n1.run("ip", &["link", "set", "link1", "up"])?;
    n1.run(
        "ip",
        &[
            "-6",
            "route",
            "add",
            "fd00:10:244:2::/64",
            "via",
            NODE2_LINK,
        ],
    )?;
    n2.run(
        "ip",
        &[
            "addr",
            "add",
            &format!("{NODE2_LINK}/64"),
            "dev",
            "link2",
            "nodad",
        ],
    )?;
    n2.run("ip", &["link", "set", "link2", "up"])?;
    n2.run("ip", &["link", "set", "lo", "up"])?;
    n2.run(
        "ip",
        &["-6", "route", "add", "fd00:10:244:1::/64", "via", NODE_LINK],
    )?;
    for ns in [n1, n2] {
        ns.run(
            "sysctl",
            &[
                "-qw",
                "net.ipv6.conf.all.forwarding=1",
                "net.ipv4.ip_forward=1",
            ],
        )?;
    }
    Ok(())
}

/// Waits until `ns` reaches `addr` directly (routes and neighbours settled,
/// the server listening).
fn reachable(ns: &Netns, addr: SocketAddr) -> anyhow::Result<()> {
    wait_for(
        &format!("{addr} reachable"),
        Duration::from_secs(10),
        || Ok(echo_request(ns, addr).ok().map(|_| ())),
    )
}

/// A connected UDP socket in `ns` sending one datagram to `addr`: how the
/// receive ends (ConnectionRefused for an ICMPv6 port unreachable).
fn udp_outcome(ns: &Netns, addr: SocketAddr) -> anyhow::Result<std::io::ErrorKind> {
    ns.enter_thread(move || -> anyhow::Result<std::io::ErrorKind> {
        let s = UdpSocket::bind("[::]:0")?;
        s.connect(addr)?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        s.send(b"q\n")?;
        let mut buf = [0u8; 64];
        Ok(s.recv(&mut buf)
            .map(|_| std::io::ErrorKind::Other)
            .unwrap_or_else(|e| e.kind()))
    })?
}

#[test]
fn ipv6_nodeport_external_ips_and_traffic_policies() -> anyhow::Result<()> {
    let node1 = Node::new("np6a")?;
    let node2 = Node::new("np6b")?;
    let client = Netns::new("np6-cl")?;
    wire(&node1, &node2, &client)?;

    let cni1 = CniRunner::new(
        &node1,
        dual_stack_conflist(
            &node1,
            "10.244.11.0/24",
            "fd00:10:244:1::/64",
            vec![node1.catena_plugin()],
        )?,
    );
    let cni2 = CniRunner::new(
        &node2,
        dual_stack_conflist(&node2, "10.244.12.0/24", "fd00:10:244:2::/64", vec![])?,
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
            ("10.96.0.50", "fd00:96::50"),
            30180,
            "Local",
            Some("web"),
            &[],
            None,
        ),
    )?;
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
    for pod in [&web1, &web2, &remote] {
        dual_stack::no_dad(pod.netns())?;
    }
    for pod in [&web1, &web2] {
        cni1.add(pod, "eth0", &CallArgs::default())?;
    }
    cni2.add(&remote, "eth0", &CallArgs::default())?;
    let _e1 = EchoPeer::start(web1.netns(), ANY, 8080, "web-1")?;
    let _e2 = EchoPeer::start(web2.netns(), ANY, 8080, "web-2")?;
    let _e3 = EchoPeer::start(remote.netns(), ANY, 8080, "remote-1")?;
    let (ip1, ip_remote) = (pod_ipv6(&web1)?, pod_ipv6(&remote)?);
    // Plain IPv6 routing first: node1 reaches both nodes' pods.
    reachable(node1.netns(), SocketAddr::from((ip1, 8080)))?;
    reachable(node1.netns(), SocketAddr::from((ip_remote, 8080)))?;

    source.apply(
        "cluster.yaml",
        &format!(
            "{}---\n{}",
            service(
                "web-cluster",
                ("10.96.0.51", "fd00:96::51"),
                30182,
                "Cluster",
                None,
                &[EXTERNAL_IP],
                Some(LB_IP)
            ),
            slice6("web-cluster-1", "web-cluster", &[ip1, ip_remote])
        ),
    )?;
    source.apply(
        "remote-pair.yaml",
        &format!(
            "{}---\n{}",
            service(
                "remote-pair",
                ("10.96.0.53", "fd00:96::53"),
                30186,
                "Cluster",
                None,
                &[REMOTE_EXTERNAL_IP],
                Some(REMOTE_LB_IP)
            ),
            slice6("remote-pair-1", "remote-pair", &[ip_remote])
        ),
    )?;
    source.apply(
        "remote-only.yaml",
        &format!(
            "{}---\n{}",
            service(
                "remote-only",
                ("10.96.0.52", "fd00:96::52"),
                30184,
                "Local",
                None,
                &[],
                None
            ),
            slice6("remote-only-1", "remote-only", &[ip_remote])
        ),
    )?;

    // IPv6 NodePorts on both devices' IPv6 addresses (link1 has no IPv4),
    // externalIP and LB IP on the service port; the IPv4 NodePort of the
    // same dual-stack Service on ext0's IPv4 address.
    let np = |ip: &str, port: u16| format!("{}/TCP", sa(ip, port));
    let services: Vec<ServiceStatus> =
        wait_for("IPv6 NodePort frontends", Duration::from_secs(10), || {
            let s: Vec<ServiceStatus> = api.get("/v1/services")?;
            let want = [
                np(NODE_EXT, 30180),
                np(NODE_EXT, 30182),
                np(NODE_LINK, 30182),
                np(EXTERNAL_IP, 80),
                np(LB_IP, 80),
                np(NODE_EXT, 30184),
                np(NODE_EXT4, 30180),
                np(REMOTE_EXTERNAL_IP, 80),
                np(REMOTE_LB_IP, 80),
            ];
            Ok(want
                .iter()
                .all(|w| s.iter().any(|x| &x.frontend == w))
                .then_some(s))
        })?;
    let status = |fe: &str| {
        services
            .iter()
            .find(|s| s.frontend == fe)
            .cloned()
            .unwrap_or_else(|| panic!("{fe} not listed: {services:?}"))
    };
    for (fe, kind) in [
        (np(NODE_EXT, 30180), "NodePort"),
        (np(NODE_LINK, 30182), "NodePort"),
        (np(EXTERNAL_IP, 80), "ExternalIP"),
        (np(LB_IP, 80), "LoadBalancer"),
        (np("fd00:96::51", 80), "ClusterIP"),
    ] {
        assert_eq!(status(&fe).kind, kind, "{fe}");
    }
    // eTP=Local, iTP=Cluster: two scopes. remote-only's in-cluster scope
    // keeps the remote endpoint, its external scope is empty; eTP=Cluster
    // has one scope.
    let remote_only = status(&np(NODE_EXT, 30184));
    assert_eq!(
        remote_only.backends,
        vec![format!("{}", SocketAddr::from((ip_remote, 8080)))]
    );
    assert_eq!(remote_only.external_backends, Some(vec![]));
    assert_eq!(status(&np(NODE_EXT, 30182)).external_backends, None);

    // eTP=Local NodePort over IPv6: both local backends serve, the client's
    // IPv6 address reaches them unchanged, replies come from the frontend.
    let mut served: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..40 {
        let (by, seen, peer) =
            echo_request(&client, sa(NODE_EXT, 30180)).context("eTP=Local IPv6 NodePort")?;
        assert_eq!(seen, CLIENT, "eTP=Local keeps the client address");
        assert_eq!(peer, sa(NODE_EXT, 30180));
        *served.entry(by).or_default() += 1;
    }
    assert!(
        served.get("web-1").copied().unwrap_or(0) > 5
            && served.get("web-2").copied().unwrap_or(0) > 5,
        "both local backends serve: {served:?}"
    );
    // The IPv4 NodePort of the same Service still works alongside.
    let (by, seen, _) = echo_request(&client, sa(NODE_EXT4, 30180)).context("IPv4 NodePort")?;
    assert!(by.starts_with("web-"), "{by}");
    // (The echo server's IPv6 socket sees IPv4 clients as ::ffff:a.b.c.d.)
    assert_eq!(
        seen.parse::<IpAddr>()?.to_canonical(),
        CLIENT4.parse::<IpAddr>()?
    );

    // eTP=Cluster: the local backend sees the client, the remote one (on
    // node2) sees node1's IPv6 address on link1 (SNAT), and the reply still
    // comes from the frontend. Same for the externalIP and the LB IP.
    for frontend in [sa(NODE_EXT, 30182), sa(EXTERNAL_IP, 80), sa(LB_IP, 80)] {
        let mut served: BTreeMap<String, usize> = BTreeMap::new();
        for _ in 0..30 {
            let (by, seen, peer) =
                echo_request(&client, frontend).with_context(|| format!("to {frontend}"))?;
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
    // once, TCP with a RST...
    let started = Instant::now();
    let err = echo_request(&client, sa(NODE_EXT, 30184)).expect_err("no local endpoint");
    let kind = err
        .downcast_ref::<std::io::Error>()
        .map(|e| e.kind())
        .unwrap_or(std::io::ErrorKind::Other);
    assert_eq!(kind, std::io::ErrorKind::ConnectionRefused, "{err:#}");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    // ...UDP with an ICMPv6 port unreachable.
    assert_eq!(
        udp_outcome(&client, sa(NODE_EXT, 30185))?,
        std::io::ErrorKind::ConnectionRefused
    );
    // A pod on this node, an in-cluster client, reaches the same NodePort
    // through the remote endpoint with its own address, the reply from the
    // NodePort.
    let web1_ip = ip1.to_string();
    for _ in 0..5 {
        let (by, seen, peer) =
            echo_request(web1.netns(), sa(NODE_EXT, 30184)).context("pod -> IPv6 NodePort")?;
        assert_eq!((by.as_str(), seen.as_str()), ("remote-1", web1_ip.as_str()));
        assert_eq!(peer, sa(NODE_EXT, 30184));
    }

    let status: catena_api::Status = api.get("/v1/status")?;
    let c = &status.datapath.counters;
    assert!(c["reject_no_backend"] >= 2, "{c:?}");

    for pod in [&web1, &web2] {
        cni1.del(pod, "eth0", &CallArgs::default())?;
    }
    cni2.del(&remote, "eth0", &CallArgs::default())?;
    Ok(())
}

/// Without `--devices`: a device with only IPv6 addresses and the IPv6
/// default route is external (its IPv6 address gets NodePorts); link1 (a
/// veth without a default route) and the pods' veths are not.
#[test]
fn auto_detection_takes_an_ipv6_only_default_route_device() -> anyhow::Result<()> {
    let node1 = Node::new("np6d1")?;
    let node2 = Node::new("np6d2")?;
    let client = Netns::new("np6d-cl")?;
    wire(&node1, &node2, &client)?;
    // ext0 without its IPv4 address and IPv4 default route.
    node1.netns().run(
        "ip",
        &["addr", "del", &format!("{NODE_EXT4}/24"), "dev", "ext0"],
    )?;
    let source = ClusterSource::new(SourceKind::Manifests, &node1)?;
    source.apply("pods.yaml", &pod_yaml("web-1", "web"))?;
    source.apply(
        "svc.yaml",
        &service(
            "web",
            ("10.96.0.60", "fd00:96::60"),
            30190,
            "Cluster",
            Some("web"),
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
        dual_stack_conflist(
            &node1,
            "10.244.11.0/24",
            "fd00:10:244:1::/64",
            vec![node1.catena_plugin()],
        )?,
    );
    let web1 = node1.pod("web-1")?;
    dual_stack::no_dad(web1.netns())?;
    cni.add(&web1, "eth0", &CallArgs::default())?;
    let _e1 = EchoPeer::start(web1.netns(), ANY, 8080, "web-1")?;
    reachable(node1.netns(), SocketAddr::from((pod_ipv6(&web1)?, 8080)))?;

    let frontend = format!("{}/TCP", sa(NODE_EXT, 30190));
    let frontends = wait_for("IPv6 NodePort frontend", Duration::from_secs(10), || {
        let s: Vec<ServiceStatus> = api.get("/v1/services")?;
        let f: Vec<String> = s.into_iter().map(|s| s.frontend).collect();
        Ok(f.contains(&frontend).then_some(f))
    })?;
    // (Besides the socket LB's wildcard NodePort frontends, `[::]` and
    // `0.0.0.0`, which no device serves.)
    let wildcard = |f: &String| f.starts_with("[::]:") || f.starts_with("0.0.0.0:");
    assert!(
        !frontends.iter().any(|f| f.contains(NODE_LINK)
            || f.contains(":30190") && !f.contains(NODE_EXT) && !wildcard(f)),
        "only ext0 is external: {frontends:?}"
    );
    let (by, seen, _) = echo_request(&client, sa(NODE_EXT, 30190))?;
    assert_eq!((by.as_str(), seen.as_str()), ("web-1", CLIENT));
    cni.del(&web1, "eth0", &CallArgs::default())?;
    Ok(())
}
