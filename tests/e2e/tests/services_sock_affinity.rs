//! ClientIP session affinity in the socket-level load balancer, which serves
//! node processes and (attached at the node's cgroup root, as by default)
//! pods. In connect() the client's address is not chosen yet, so the
//! caller's network namespace is the client: a node process and a pod are
//! two clients, each sticky to its own backend while the affinity is fresh.
//! Lab: a private cgroup stands in for the node's root cgroup.

use catena_e2e::{pod_yaml, service_yaml, socat_request, wait_for, write_manifest, TestCgroup};
use catena_lab::{CallArgs, CniRunner, Netns, Node};
use std::collections::BTreeSet;
use std::time::Duration;

/// `n` requests to `target` from `netns`: the backends that answered.
fn answers(
    netns: &Netns,
    cgroup: &TestCgroup,
    target: &str,
    n: usize,
) -> anyhow::Result<BTreeSet<String>> {
    let address = format!("TCP:{target}");
    (0..n)
        .map(|_| socat_request(netns, Some(cgroup), &address))
        .collect()
}

fn affinity_service(name: &str, vip: &str, timeout_s: u32) -> String {
    format!(
        "{}  sessionAffinity: ClientIP\n  sessionAffinityConfig: {{clientIP: {{timeoutSeconds: {timeout_s}}}}}\n",
        service_yaml(name, vip, 80, 8080, Some("web"))
    )
}

#[test]
fn socket_lb_keeps_client_ip_affinity_per_netns() -> anyhow::Result<()> {
    let node = Node::new("e2e-sockaff")?;
    let cgroup = TestCgroup::new("sockaff")?;
    let manifests = node.dir().join("manifests");
    write_manifest(
        &manifests,
        "svc.yaml",
        &format!(
            "{}---\n{}---\n{}",
            affinity_service("sticky", "10.96.0.30", 3600),
            affinity_service("brief", "10.96.0.31", 1),
            service_yaml("plain", "10.96.0.32", 80, 8080, Some("web")),
        ),
    )?;
    let pods: Vec<String> = (1..=3)
        .map(|i| pod_yaml(&format!("web-{i}"), "web"))
        .collect();
    write_manifest(&manifests, "pods.yaml", &pods.join("---\n"))?;
    let cg = cgroup.0.to_str().unwrap().to_string();
    let agent = node.start_agent(
        &manifests,
        &["--kube-proxy-replacement", "true", "--cgroup-root", &cg],
    )?;
    let conf = node.ptp_conflist("e2e", "10.244.6.0/24", "1.0.0", vec![node.catena_plugin()])?;
    let cni = CniRunner::new(&node, conf);
    let backends: Vec<_> = (1..=3)
        .map(|i| node.pod(&format!("web-{i}")))
        .collect::<anyhow::Result<_>>()?;
    let client = node.pod("client")?;
    for pod in backends.iter().chain([&client]) {
        cni.add(pod, "eth0", &CallArgs::default())?;
    }
    let _servers: Vec<_> = backends
        .iter()
        .enumerate()
        .map(|(i, p)| p.serve_tcp(8080, &format!("web-{}", i + 1)))
        .collect::<anyhow::Result<_>>()?;

    // Programmed once every frontend answers (the pods' endpoints follow
    // their ADDs).
    for vip in ["10.96.0.30:80", "10.96.0.31:80", "10.96.0.32:80"] {
        wait_for(vip, Duration::from_secs(10), || {
            socat_request(node.netns(), Some(&cgroup), &format!("TCP:{vip}")).map(Some)
        })?;
    }

    // Without affinity the same client spreads over the backends: the
    // stickiness below is the affinity's doing, not a fixed pick.
    let spread = answers(node.netns(), &cgroup, "10.96.0.32:80", 24)?;
    assert!(spread.len() > 1, "no affinity, yet one backend: {spread:?}");

    // Each netns is one client, sticky to one backend.
    let from_node = answers(node.netns(), &cgroup, "10.96.0.30:80", 12)?;
    assert_eq!(
        from_node.len(),
        1,
        "node processes not sticky: {from_node:?}"
    );
    let from_pod = answers(client.netns(), &cgroup, "10.96.0.30:80", 12)?;
    assert_eq!(from_pod.len(), 1, "pod not sticky: {from_pod:?}");
    let status: catena_api::Status = agent.client().get("/v1/status")?;
    assert!(
        status.datapath.counters["sock_translated"] >= 24 + 24,
        "{:?}",
        status.datapath.counters
    );

    // Affinity expires after timeoutSeconds: fresh picks then reach more
    // than one backend (all ten landing on one: (1/3)^9).
    let mut after_expiry = BTreeSet::new();
    for _ in 0..10 {
        after_expiry.insert(socat_request(
            node.netns(),
            Some(&cgroup),
            "TCP:10.96.0.31:80",
        )?);
        std::thread::sleep(Duration::from_millis(1300));
    }
    assert!(
        after_expiry.len() > 1,
        "affinity never expired: {after_expiry:?}"
    );

    for pod in backends.iter().chain([&client]) {
        cni.del(pod, "eth0", &CallArgs::default())?;
    }
    drop(agent);
    Ok(())
}
