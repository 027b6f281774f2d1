//! `internalTrafficPolicy: Local` through the real chain (ptp + host-local,
//! then catena-cni, the real agent in standalone mode with a node name):
//! pods and node processes reach only the endpoints on this node — one
//! placed here by `nodeName`, one known local because the CNI plugin
//! registered its pod — never the endpoint placed on another node (which
//! does not even exist in the lab: a single stray pick would fail). With no
//! local endpoint left, new connections are refused at once, although the
//! Service still has a (remote) endpoint. The same holds over IPv6, where
//! the registered pod is known local by its IPv6 address.

use catena_api::ServiceStatus;
use catena_e2e::{socat_request, wait_for, write_manifest, TestCgroup};
use catena_lab::{count_backends, CallArgs, CniRunner, Node};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

const NODE_NAME: &str = "node-a";
const LOCAL_VIP: &str = "10.96.0.70";
const CLUSTER_VIP: &str = "10.96.0.71";
/// On "another node": nothing in the lab answers there.
const REMOTE_IP: &str = "10.244.99.5";

fn service_yaml(name: &str, vip: &str, policy: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  clusterIP: {vip}\n  internalTrafficPolicy: {policy}\n  ports:\n  - {{name: http, port: 80, targetPort: 8080, protocol: TCP}}\n"
    )
}

/// `(address, nodeName)` endpoints; `None`: no nodeName at all.
fn slice_yaml(service: &str, endpoints: &[(String, Option<&str>)]) -> String {
    let eps: String = endpoints
        .iter()
        .map(|(a, n)| {
            let node = n.map(|n| format!(", nodeName: {n}")).unwrap_or_default();
            format!("- {{addresses: [\"{a}\"]{node}}}\n")
        })
        .collect();
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {service}-1\n  namespace: default\n  labels: {{kubernetes.io/service-name: {service}}}\naddressType: IPv4\nports: [{{name: http, port: 8080, protocol: TCP}}]\nendpoints:\n{eps}"
    )
}

fn backends_of(api: &catena_lab::Agent<'_>, frontend: &str) -> anyhow::Result<Option<Vec<String>>> {
    let s: Vec<ServiceStatus> = api.client().get("/v1/services")?;
    Ok(s.iter()
        .find(|s| s.frontend == frontend)
        .map(|s| s.backends.clone()))
}

#[test]
fn internal_traffic_policy_local_uses_only_this_nodes_endpoints() -> anyhow::Result<()> {
    let node = Node::new("e2e-itp")?;
    let cgroup = TestCgroup::new("itp")?;
    let manifests = node.dir().join("manifests");
    write_manifest(
        &manifests,
        "svc.yaml",
        &format!(
            "{}---\n{}",
            service_yaml("local", LOCAL_VIP, "Local"),
            service_yaml("cluster", CLUSTER_VIP, "Cluster")
        ),
    )?;
    let cg = cgroup.0.to_str().unwrap().to_string();
    let agent = node.start_agent(
        &manifests,
        &[
            "--node-name",
            NODE_NAME,
            "--kube-proxy-replacement",
            "true",
            "--cgroup-root",
            &cg,
        ],
    )?;
    let conf = node.ptp_conflist("e2e", "10.244.7.0/24", "1.0.0", vec![node.catena_plugin()])?;
    let cni = CniRunner::new(&node, conf);
    let client = node.pod("client")?;
    let placed = node.pod("placed")?;
    let registered = node.pod("registered")?;
    for pod in [&client, &placed, &registered] {
        cni.add(pod, "eth0", &CallArgs::default())?;
    }
    let _s1 = placed.serve_tcp(8080, "placed")?;
    let _s2 = registered.serve_tcp(8080, "registered")?;
    let placed_ip = placed.ipv4()?.to_string();
    let registered_ip = registered.ipv4()?.to_string();

    // `placed` is on this node by nodeName; `registered` carries no nodeName
    // but its pod is registered here; the third endpoint is on node-b.
    let endpoints = vec![
        (placed_ip.clone(), Some(NODE_NAME)),
        (registered_ip.clone(), None),
        (REMOTE_IP.to_string(), Some("node-b")),
    ];
    write_manifest(
        &manifests,
        "slices.yaml",
        &format!(
            "{}---\n{}",
            slice_yaml("local", &endpoints),
            slice_yaml("cluster", &endpoints)
        ),
    )?;
    let local_fe = format!("{LOCAL_VIP}:80/TCP");
    let mut want = vec![format!("{placed_ip}:8080"), format!("{registered_ip}:8080")];
    want.sort();
    wait_for("the local endpoints", Duration::from_secs(10), || {
        Ok(backends_of(&agent, &local_fe)?.filter(|b| *b == want))
    })?;
    // The same endpoints under the Cluster policy: all three, so the remote
    // one really is in play and only the policy keeps it out.
    assert_eq!(
        backends_of(&agent, &format!("{CLUSTER_VIP}:80/TCP"))?.map(|b| b.len()),
        Some(3)
    );

    // Pods: every request answered, only by the two local backends (a pick
    // of the remote endpoint would time out and show as an error).
    let vip: SocketAddr = format!("{LOCAL_VIP}:80").parse()?;
    let tally = count_backends(&client, vip, 60)?;
    assert_eq!(
        tally.keys().cloned().collect::<Vec<_>>(),
        vec!["placed".to_string(), "registered".to_string()],
        "{tally:?}"
    );
    assert_eq!(tally.values().sum::<usize>(), 60, "{tally:?}");
    // Node processes (socket-level load balancing): the same.
    for _ in 0..10 {
        let who = socat_request(node.netns(), Some(&cgroup), &format!("TCP:{LOCAL_VIP}:80"))?;
        assert!(who == "placed" || who == "registered", "{who}");
    }

    // No local endpoint left (the remote one stays): refused at once.
    let only_remote = vec![(REMOTE_IP.to_string(), Some("node-b"))];
    write_manifest(
        &manifests,
        "slices.yaml",
        &slice_yaml("local", &only_remote),
    )?;
    wait_for("no local endpoint", Duration::from_secs(10), || {
        Ok(backends_of(&agent, &local_fe)?.filter(|b| b.is_empty()))
    })?;
    for _ in 0..3 {
        let (result, elapsed) = client.netns().enter_thread(move || {
            let start = Instant::now();
            let r = TcpStream::connect_timeout(&vip, Duration::from_secs(3));
            (r.map(|_| ()), start.elapsed())
        })?;
        let err = result.expect_err("connected with no local endpoint");
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
        assert!(
            elapsed < Duration::from_millis(100),
            "refused after {elapsed:?}"
        );
    }
    let started = Instant::now();
    let node_err = socat_request(node.netns(), Some(&cgroup), &format!("TCP:{LOCAL_VIP}:80"))
        .expect_err("a node process connected with no local endpoint");
    assert!(
        started.elapsed() < Duration::from_secs(1) && format!("{node_err:#}").contains("refused"),
        "{node_err:#} after {:?}",
        started.elapsed()
    );

    for pod in [&client, &placed, &registered] {
        cni.del(pod, "eth0", &CallArgs::default())?;
    }
    drop(agent);
    Ok(())
}

/// The same over IPv6 (an IPv6-only Service, dual-stack pods): the endpoint
/// without a nodeName is local because its pod's IPv6 address was
/// registered here by the CNI plugin; the IPv6 endpoint placed on node-b
/// (nothing answers there) is never picked.
#[test]
fn internal_traffic_policy_local_over_ipv6() -> anyhow::Result<()> {
    use catena_e2e::dual_stack::{conflist, no_dad, pod_ipv6};
    use std::io::Read;
    use std::process::Command;

    const VIP6: &str = "fd00:96::70";
    const REMOTE_IP6: &str = "fd00:10:244:99::5";
    let node = Node::new("e2e-itp6")?;
    no_dad(node.netns())?;
    let manifests = node.dir().join("manifests");
    write_manifest(
        &manifests,
        "svc.yaml",
        &format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: local6, namespace: default}}\nspec:\n  clusterIP: \"{VIP6}\"\n  clusterIPs: [\"{VIP6}\"]\n  ipFamilies: [IPv6]\n  internalTrafficPolicy: Local\n  ports:\n  - {{name: http, port: 80, targetPort: 8080, protocol: TCP}}\n"
        ),
    )?;
    let agent = node.start_agent(&manifests, &["--node-name", NODE_NAME])?;
    let cni = CniRunner::new(&node, conflist(&node, "e2e-itp6", 19)?);
    let client = node.pod("client")?;
    let placed = node.pod("placed")?;
    let registered = node.pod("registered")?;
    for pod in [&client, &placed, &registered] {
        no_dad(pod.netns())?;
        cni.add(pod, "eth0", &CallArgs::default())?;
    }
    let mut servers = Vec::new();
    for pod in [&placed, &registered] {
        let mut cmd = Command::new("socat");
        cmd.args([
            "TCP6-LISTEN:8080,fork,reuseaddr",
            &format!("SYSTEM:echo {}", pod.name),
        ]);
        servers.push(pod.netns().spawn(cmd)?);
    }
    let placed_ip = pod_ipv6(&placed)?;
    let registered_ip = pod_ipv6(&registered)?;
    let endpoints = vec![
        (placed_ip.to_string(), Some(NODE_NAME)),
        (registered_ip.to_string(), None),
        (REMOTE_IP6.to_string(), Some("node-b")),
    ];
    write_manifest(
        &manifests,
        "slices.yaml",
        &slice_yaml("local6", &endpoints).replace("addressType: IPv4", "addressType: IPv6"),
    )?;
    let vip: SocketAddr = format!("[{VIP6}]:80").parse()?;
    let mut want = vec![
        SocketAddr::from((placed_ip, 8080)).to_string(),
        SocketAddr::from((registered_ip, 8080)).to_string(),
    ];
    want.sort();
    wait_for("the local IPv6 endpoints", Duration::from_secs(10), || {
        Ok(backends_of(&agent, &format!("{vip}/TCP"))?.filter(|b| *b == want))
    })?;

    // Every request answered, only by the two local backends (a pick of the
    // remote endpoint would time out and fail the request).
    let mut tally = std::collections::BTreeMap::<String, usize>::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while tally.values().sum::<usize>() < 40 {
        let reply = client
            .netns()
            .enter_thread(move || -> std::io::Result<String> {
                let mut s = TcpStream::connect_timeout(&vip, Duration::from_secs(2))?;
                s.set_read_timeout(Some(Duration::from_secs(2)))?;
                let mut out = String::new();
                s.read_to_string(&mut out)?;
                Ok(out.trim().to_string())
            })?;
        match reply {
            Ok(who) => *tally.entry(who).or_default() += 1,
            // Only while the servers start listening, before any answer.
            Err(_) if tally.is_empty() && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => anyhow::bail!("request to {vip} failed after {tally:?}: {e}"),
        }
    }
    assert_eq!(
        tally.keys().cloned().collect::<Vec<_>>(),
        vec!["placed".to_string(), "registered".to_string()],
        "{tally:?}"
    );

    for mut child in servers {
        let _ = child.kill();
        let _ = child.wait();
    }
    for pod in [&client, &placed, &registered] {
        cni.del(pod, "eth0", &CallArgs::default())?;
    }
    drop(agent);
    Ok(())
}
