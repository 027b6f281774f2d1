//! IPv6 and dual-stack Services end to end: dual-stack pods wired by the
//! real ptp + host-local primary (one IPv4 and one IPv6 range) and the real
//! `catena-cni`, the real agent on a manifest directory holding a
//! dual-stack Service. From a client pod, requests to the IPv6 ClusterIP are
//! spread over the backends and answered from the ClusterIP; a node process
//! (in a private cgroup carrying the agent's socket programs) reaches it
//! too; an IPv6 Service without endpoints is refused at once.

use anyhow::Context;
use catena_e2e::dual_stack::{self, no_dad, pod_ipv6};
use catena_e2e::{pod_yaml, socat_request, write_manifest, TestCgroup};
use catena_lab::traffic::serve_udp_on;
use catena_lab::{CallArgs, CniRunner, Node, Pod, Server};
use std::collections::BTreeMap;
use std::io::Read;
use std::net::{Ipv6Addr, SocketAddr, TcpStream, UdpSocket};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

const VIP4: &str = "10.96.0.40";
const VIP6: &str = "fd00:96::40";
const VIP6_EMPTY: &str = "fd00:96::41";

fn dual_service(name: &str, v4: &str, v6: &str, app: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  clusterIP: {v4}\n  clusterIPs: [{v4}, \"{v6}\"]\n  ipFamilies: [IPv4, IPv6]\n  ipFamilyPolicy: RequireDualStack\n  selector: {{app: {app}}}\n  ports:\n  - {{name: http, port: 80, targetPort: 8080}}\n  - {{name: dns, port: 53, protocol: UDP, targetPort: 5353}}\n"
    )
}

/// Servers in the pod on every address (IPv6 sockets that also take IPv4),
/// each answering with the pod's name: socat for TCP 8080, one UDP socket
/// for 5353. (socat's forking UDP server drops a datagram now and then:
/// its child dies on EPIPE without answering when `echo` has already
/// exited by the time the datagram is copied to it.)
fn serve(pod: &Pod) -> anyhow::Result<(Child, Server)> {
    let mut cmd = Command::new("socat");
    cmd.args([
        "TCP6-LISTEN:8080,fork,reuseaddr",
        &format!("SYSTEM:echo {}", pod.name),
    ]);
    let tcp = pod.netns().spawn(cmd)?;
    let udp = serve_udp_on(pod.netns(), Ipv6Addr::UNSPECIFIED.into(), 5353, &pod.name)?;
    Ok((tcp, udp))
}

/// One TCP request from `pod`: (the reply line, the peer the socket reports).
fn tcp_request(pod: &Pod, addr: SocketAddr) -> anyhow::Result<(String, SocketAddr)> {
    pod.netns()
        .enter_thread(move || -> anyhow::Result<(String, SocketAddr)> {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            let peer = s.peer_addr()?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            Ok((out.trim().to_string(), peer))
        })?
}

/// One UDP datagram from `pod` on an unconnected socket: (the reply, the
/// address it came from, as the application sees it).
fn udp_request(pod: &Pod, addr: SocketAddr) -> anyhow::Result<(String, SocketAddr)> {
    pod.netns()
        .enter_thread(move || -> anyhow::Result<(String, SocketAddr)> {
            let s = UdpSocket::bind("[::]:0")?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            s.send_to(b"q\n", addr)?;
            let mut buf = [0u8; 256];
            let (n, from) = s.recv_from(&mut buf)?;
            Ok((String::from_utf8_lossy(&buf[..n]).trim().to_string(), from))
        })?
}

#[test]
fn dual_stack_service_over_ipv6_from_pods_and_node_processes() -> anyhow::Result<()> {
    let node = Node::new("e2e-svc6")?;
    no_dad(node.netns())?;
    let cgroup = TestCgroup::new("svc6")?;
    let manifests = node.dir().join("manifests");
    let pods_yaml: Vec<String> = ["web-1", "web-2", "web-3"]
        .iter()
        .map(|n| pod_yaml(n, "web"))
        .collect();
    write_manifest(
        &manifests,
        "svc.yaml",
        &format!(
            "{}---\n{}",
            dual_service("web", VIP4, VIP6, "web"),
            dual_service("empty", "10.96.0.41", VIP6_EMPTY, "nothing")
        ),
    )?;
    write_manifest(&manifests, "pods.yaml", &pods_yaml.join("---\n"))?;
    let cg = cgroup.0.to_str().unwrap().to_string();
    let agent = node.start_agent(
        &manifests,
        &["--kube-proxy-replacement", "true", "--cgroup-root", &cg],
    )?;
    let cni = CniRunner::new(&node, dual_stack::conflist(&node, "e2e-dual", 6)?);

    let client = node.pod("client")?;
    let webs = [node.pod("web-1")?, node.pod("web-2")?, node.pod("web-3")?];
    let mut servers = Vec::new();
    let mut udp_servers = Vec::new();
    for pod in webs.iter().chain([&client]) {
        no_dad(pod.netns())?;
        cni.add(pod, "eth0", &CallArgs::default())?;
    }
    for pod in &webs {
        let (tcp, udp) = serve(pod)?;
        servers.push(tcp);
        udp_servers.push(udp);
    }
    let backend_ips: Vec<Ipv6Addr> = webs.iter().map(pod_ipv6).collect::<Result<_, _>>()?;
    // Plain IPv6 between pods first (routing, no DAD left), which also
    // waits for the servers to listen.
    for (web, ip) in webs.iter().zip(&backend_ips) {
        let deadline = Instant::now() + Duration::from_secs(10);
        for (port, request) in [
            (8080, tcp_request as fn(&Pod, SocketAddr) -> _),
            (5353, udp_request),
        ] {
            let direct = SocketAddr::from((*ip, port));
            loop {
                match request(&client, direct) {
                    Ok((reply, _)) if reply == web.name => break,
                    other if Instant::now() > deadline => {
                        anyhow::bail!("{} at {direct} not reachable: {other:?}", web.name)
                    }
                    _ => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        }
    }

    // The agent shows the IPv6 frontends with the pods' IPv6 addresses.
    let vip6: SocketAddr = format!("[{VIP6}]:80").parse()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let services: Vec<catena_api::ServiceStatus> = agent.client().get("/v1/services")?;
        let listed = services
            .iter()
            .find(|s| s.frontend == format!("{vip6}/TCP"))
            .map(|s| s.backends.len());
        if listed == Some(3) {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "IPv6 frontend not programmed with 3 backends: {services:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // Pod -> IPv6 ClusterIP over TCP: every backend answers, and the
    // connection is with the ClusterIP throughout (a reply from anywhere
    // else would not even complete the handshake).
    let mut tally: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..30 {
        let (reply, peer) = tcp_request(&client, vip6).context("pod -> IPv6 ClusterIP")?;
        assert_eq!(peer, vip6);
        *tally.entry(reply).or_default() += 1;
    }
    assert!(
        webs.iter()
            .all(|w| tally.get(&w.name).is_some_and(|n| *n > 0)),
        "requests were not spread over the 3 backends: {tally:?}"
    );

    // UDP: the answer comes from the ClusterIP as the application sees it.
    let dns6: SocketAddr = format!("[{VIP6}]:53").parse()?;
    for _ in 0..5 {
        let (reply, from) = udp_request(&client, dns6).context("UDP to the IPv6 ClusterIP")?;
        assert!(reply.starts_with("web-"), "{reply}");
        assert_eq!(from, dns6, "UDP reply source");
    }

    // A backend reaching itself through the Service (hairpin) over IPv6.
    let mut hairpin_ok = 0;
    for _ in 0..12 {
        let (reply, peer) = tcp_request(&webs[0], vip6).context("hairpin")?;
        assert_eq!(peer, vip6);
        if reply == "web-1" {
            hairpin_ok += 1;
        }
    }
    assert!(hairpin_ok > 0, "web-1 never reached itself through the VIP");

    // The IPv4 ClusterIP of the same Service keeps working.
    let vip4: SocketAddr = format!("{VIP4}:80").parse()?;
    let (reply, _) = tcp_request(&client, vip4)?;
    assert!(reply.starts_with("web-"), "{reply}");

    // A node process through the cgroup socket programs.
    let mut node_tally: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..12 {
        *node_tally
            .entry(
                socat_request(node.netns(), Some(&cgroup), &format!("TCP6:[{VIP6}]:80"))
                    .context("node process")?,
            )
            .or_default() += 1;
    }
    assert!(
        node_tally.keys().all(|k| k.starts_with("web-")) && node_tally.len() >= 2,
        "{node_tally:?}"
    );

    // No endpoints: refused promptly, from a pod (RST from the tc program)
    // and from the node (ECONNREFUSED from connect6).
    let empty: SocketAddr = format!("[{VIP6_EMPTY}]:80").parse()?;
    let started = Instant::now();
    let err = tcp_request(&client, empty).expect_err("no endpoints");
    let io = err
        .downcast_ref::<std::io::Error>()
        .map(|e| e.kind())
        .unwrap_or(std::io::ErrorKind::Other);
    assert_eq!(io, std::io::ErrorKind::ConnectionRefused, "{err:#}");
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "{:?}",
        started.elapsed()
    );
    let node_err = socat_request(
        node.netns(),
        Some(&cgroup),
        &format!("TCP6:[{VIP6_EMPTY}]:80"),
    )
    .expect_err("no endpoints from the node");
    assert!(
        node_err.to_string().contains("Connection refused"),
        "{node_err:#}"
    );
    // UDP without endpoints: ICMPv6 port unreachable, so a connected socket
    // fails with ECONNREFUSED instead of waiting.
    let dns_empty: SocketAddr = format!("[{VIP6_EMPTY}]:53").parse()?;
    let udp_refused =
        client
            .netns()
            .enter_thread(move || -> anyhow::Result<std::io::ErrorKind> {
                let s = UdpSocket::bind("[::]:0")?;
                s.connect(dns_empty)?;
                s.set_read_timeout(Some(Duration::from_secs(2)))?;
                s.send(b"q\n")?;
                let mut buf = [0u8; 64];
                Ok(s.recv(&mut buf)
                    .map(|_| std::io::ErrorKind::Other)
                    .unwrap_or_else(|e| e.kind()))
            })??;
    assert_eq!(udp_refused, std::io::ErrorKind::ConnectionRefused);

    let status: catena_api::Status = agent.client().get("/v1/status")?;
    let c = &status.datapath.counters;
    assert!(c["service_dnat"] >= 30 && c["reverse_nat"] >= 30, "{c:?}");
    assert!(c["sock_translated"] >= 12, "{c:?}");
    assert!(c["reject_no_backend"] >= 2, "{c:?}");

    for mut child in servers {
        let _ = child.kill();
        let _ = child.wait();
    }
    for udp in udp_servers {
        udp.stop()?;
    }
    for pod in webs.iter().chain([&client]) {
        cni.del(pod, "eth0", &CallArgs::default())?;
    }
    drop(agent);
    Ok(())
}
