//! `catena monitor` names the policy rule that decided: a connection denied
//! by an `ingressDeny` rule shows up as a `policy_denied` drop carrying the
//! policy's kind, name and rule path.

use catena_e2e::monitor::DropMonitor;
use catena_e2e::pod_yaml;
use catena_e2e::source::{ClusterSource, SourceKind};
use catena_lab::{CallArgs, CniRunner, Node};
use std::net::SocketAddr;
use std::time::Duration;

const POLICY: &str = "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: web-guard, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
  ingressDeny:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts: [{ports: [{port: \"9090\", protocol: TCP}]}]
";

#[test]
fn a_denied_connection_is_shown_with_the_rule_that_denied_it() -> anyhow::Result<()> {
    let node = Node::new("pol-events")?;
    let source = ClusterSource::new(SourceKind::Manifests, &node)?;
    source.apply("policy.yaml", POLICY)?;
    source.apply(
        "pods.yaml",
        &format!(
            "{}---\n{}",
            pod_yaml("web-1", "web"),
            pod_yaml("client", "client")
        ),
    )?;
    let _agent = source.start_agent(&node, &[])?;
    let cni = CniRunner::new(
        &node,
        node.ptp_conflist("pe", "10.244.60.0/24", "1.0.0", vec![node.catena_plugin()])?,
    );
    let client = node.pod("client")?;
    let web = node.pod("web-1")?;
    cni.add(&client, "eth0", &CallArgs::default())?;
    cni.add(&web, "eth0", &CallArgs::default())?;
    let _allowed = web.serve_tcp(8080, "web-1")?;
    let _denied = web.serve_tcp(9090, "web-1")?;
    let web_ip = web.ipv4()?;

    let allowed: SocketAddr = (web_ip, 8080).into();
    client.tcp_request(allowed, Duration::from_secs(3))?;

    let mon = DropMonitor::start(&node, "policy_denied")?;
    std::thread::sleep(Duration::from_millis(500)); // let it subscribe
    let denied: SocketAddr = (web_ip, 9090).into();
    for _ in 0..3 {
        assert!(
            client
                .tcp_request(denied, Duration::from_millis(500))
                .is_err(),
            "port 9090 is denied"
        );
    }
    let ev = mon.event()?;
    assert_eq!(ev["direction"], "ingress", "{ev}");
    assert_eq!(
        ev["policy"].as_str(),
        Some("CiliumNetworkPolicy default/web-guard spec.ingressDeny[0] (deny)"),
        "{ev}"
    );
    Ok(())
}
