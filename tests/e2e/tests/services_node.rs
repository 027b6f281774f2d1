//! Seed 000: ClusterIPs must work from node processes, not only from pods.
//! The agent attaches its socket-level load balancer to a cgroup; a process
//! of the node (here: in the lab node's network namespace and in a private
//! cgroup, never the machine's root cgroup) connects to the VIP.

use catena_api::Status;
use catena_e2e::{pod_yaml, service_yaml, socat_request, write_manifest, TestCgroup};
use catena_lab::{CallArgs, CniRunner, Node};
use std::collections::BTreeMap;

#[test]
fn node_processes_reach_cluster_ips() -> anyhow::Result<()> {
    let node = Node::new("e2e-nodesvc")?;
    let cgroup = TestCgroup::new("nodesvc")?;
    let manifests = node.dir().join("manifests");
    write_manifest(
        &manifests,
        "svc.yaml",
        &service_yaml("web", "10.96.0.20", 80, 8080, Some("web")),
    )?;
    write_manifest(
        &manifests,
        "pods.yaml",
        &format!(
            "{}---\n{}",
            pod_yaml("web-1", "web"),
            pod_yaml("web-2", "web")
        ),
    )?;
    let cg = cgroup.0.to_str().unwrap().to_string();
    let agent = node.start_agent(
        &manifests,
        &[
            "--kube-proxy-replacement",
            "true",
            "--cgroup-root",
            &cg,
            "--healthz-bind-address",
            "127.0.0.1:10256",
        ],
    )?;
    let conf = node.ptp_conflist("e2e", "10.244.4.0/24", "1.0.0", vec![node.catena_plugin()])?;
    let cni = CniRunner::new(&node, conf);
    let web1 = node.pod("web-1")?;
    let web2 = node.pod("web-2")?;
    for pod in [&web1, &web2] {
        cni.add(pod, "eth0", &CallArgs::default())?;
    }
    let _s1 = web1.serve_tcp(8080, "web-1")?;
    let _s2 = web2.serve_tcp(8080, "web-2")?;

    // From the node, through the VIP: both backends answer.
    let mut tally: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..16 {
        *tally
            .entry(socat_request(
                node.netns(),
                Some(&cgroup),
                "TCP:10.96.0.20:80",
            )?)
            .or_default() += 1;
    }
    assert!(
        tally.get("web-1").is_some_and(|n| *n > 0) && tally.get("web-2").is_some_and(|n| *n > 0),
        "{tally:?}"
    );
    let status: Status = agent.client().get("/v1/status")?;
    assert!(
        status.datapath.counters["sock_translated"] >= 16,
        "{:?}",
        status.datapath.counters
    );

    // kube-proxy's health endpoint answers like kube-proxy does.
    let health = node.netns().enter_thread(|| -> anyhow::Result<String> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect("127.0.0.1:10256")?;
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: node\r\nConnection: close\r\n\r\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    })??;
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    assert!(
        health.contains("\"lastUpdated\"") && health.contains("\"nodeHealthy\":true"),
        "{health}"
    );

    // A node process outside the cgroup is untouched (there is no route to
    // the VIP in the node namespace, so without catena it fails).
    assert!(socat_request(node.netns(), None, "TCP:10.96.0.20:80").is_err());

    for pod in [&web1, &web2] {
        cni.del(pod, "eth0", &CallArgs::default())?;
    }
    drop(agent);
    Ok(())
}
