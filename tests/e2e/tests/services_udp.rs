//! A DNS-like UDP Service through the real chain (ptp + host-local, then
//! catena-cni, the real agent in standalone mode): queries spread over the
//! backends, every answer comes from the ClusterIP (reverse NAT), and a
//! UDP Service without endpoints refuses at once: the datapath answers with
//! ICMP port unreachable and a connected socket gets ECONNREFUSED instead of
//! waiting out its timeout.

use catena_api::{ServiceStatus, Status};
use catena_e2e::{pod_yaml, wait_for, write_manifest};
use catena_lab::traffic::udp_connected_request;
use catena_lab::{count_backends_udp, CallArgs, CniRunner, Node};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

const DNS_VIP: &str = "10.96.0.60";
const EMPTY_VIP: &str = "10.96.0.61";
/// Generous on purpose: the refusal takes well under a millisecond here;
/// without it the client would wait its whole timeout (2 s below).
const REFUSE_WITHIN: Duration = Duration::from_millis(500);

fn udp_service_yaml(name: &str, vip: &str, selector: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  clusterIP: {vip}\n  selector: {{app: {selector}}}\n  ports:\n  - {{name: dns, port: 53, targetPort: 5353, protocol: UDP}}\n"
    )
}

fn backends_of(services: &[ServiceStatus], frontend: &str) -> Option<Vec<String>> {
    services
        .iter()
        .find(|s| s.frontend == frontend)
        .map(|s| s.backends.clone())
}

#[test]
fn udp_service_spreads_answers_from_the_vip_and_refuses_without_endpoints() -> anyhow::Result<()> {
    let node = Node::new("e2e-udp")?;
    let manifests = node.dir().join("manifests");
    let pods: Vec<String> = (1..=3)
        .map(|i| pod_yaml(&format!("dns-{i}"), "dns"))
        .collect();
    write_manifest(
        &manifests,
        "dns.yaml",
        &format!(
            "{}---\n{}---\n{}",
            udp_service_yaml("dns", DNS_VIP, "dns"),
            udp_service_yaml("empty", EMPTY_VIP, "nobody"),
            pods.join("---\n")
        ),
    )?;
    let agent = node.start_agent(&manifests, &[])?;
    let api = agent.client();
    let conf = node.ptp_conflist("e2e", "10.244.6.0/24", "1.0.0", vec![node.catena_plugin()])?;
    let cni = CniRunner::new(&node, conf);
    let client = node.pod("client")?;
    let dns: Vec<_> = (1..=3)
        .map(|i| node.pod(&format!("dns-{i}")))
        .collect::<anyhow::Result<_>>()?;
    cni.add(&client, "eth0", &CallArgs::default())?;
    let mut servers = Vec::new();
    for pod in &dns {
        cni.add(pod, "eth0", &CallArgs::default())?;
        servers.push(pod.serve_udp(5353, &pod.name)?);
    }
    let frontend = format!("{DNS_VIP}:53/UDP");
    wait_for("three DNS backends", Duration::from_secs(10), || {
        let s: Vec<ServiceStatus> = api.get("/v1/services")?;
        Ok(backends_of(&s, &frontend).filter(|b| b.len() == 3))
    })?;
    wait_for("the empty service", Duration::from_secs(10), || {
        let s: Vec<ServiceStatus> = api.get("/v1/services")?;
        Ok(backends_of(&s, &format!("{EMPTY_VIP}:53/UDP")).filter(|b| b.is_empty()))
    })?;

    let vip: SocketAddr = format!("{DNS_VIP}:53").parse()?;
    // The answer's source is the VIP, not the backend: an unconnected
    // socket sees the real source address of the datagram.
    for _ in 0..5 {
        let reply = client.udp_request(vip, Duration::from_secs(2))?;
        assert_eq!(reply.peer, vip, "answer not from the ClusterIP: {reply:?}");
        assert!(reply.text.starts_with("dns-"), "{reply:?}");
    }
    // Each query is a new flow (a new source port): they spread.
    let tally = count_backends_udp(&client, vip, 90)?;
    assert_eq!(tally.values().sum::<usize>(), 90, "{tally:?}");
    for pod in &dns {
        let n = tally.get(&pod.name).copied().unwrap_or(0);
        assert!(n >= 10, "{} answered {n} of 90: {tally:?}", pod.name);
    }
    // A connected socket (what resolvers use) gets its answers too.
    let reply = client
        .netns()
        .enter_thread(move || udp_connected_request(vip, Duration::from_secs(2)))??;
    assert_eq!(reply.peer, vip);

    // No endpoints: refused at once, every time.
    let empty: SocketAddr = format!("{EMPTY_VIP}:53").parse()?;
    let mut worst = Duration::ZERO;
    for _ in 0..10 {
        let (result, elapsed) = client.netns().enter_thread(move || {
            let start = Instant::now();
            let r = udp_connected_request(empty, Duration::from_secs(2));
            (r, start.elapsed())
        })?;
        let err = result.expect_err("a UDP Service without endpoints answered");
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
        assert!(elapsed < REFUSE_WITHIN, "refused after {elapsed:?}");
        worst = worst.max(elapsed);
    }
    eprintln!("UDP service without endpoints: ECONNREFUSED after at most {worst:?} (10 queries)");
    let status: Status = api.get("/v1/status")?;
    assert!(
        status.datapath.counters["reject_no_backend"] >= 10,
        "{:?}",
        status.datapath.counters
    );

    drop(servers);
    for pod in dns.iter().chain([&client]) {
        cni.del(pod, "eth0", &CallArgs::default())?;
    }
    Ok(())
}

/// A backend that has no listener on the target port answers with ICMP port
/// unreachable about the translated datagram (client -> backend). The
/// datapath translates the error's quote back to the frontend, so the
/// client's socket, connected to the ClusterIP, gets ECONNREFUSED at once
/// instead of waiting out its timeout; a pod under default-deny ingress
/// still receives it (an error belongs to its connection).
#[test]
fn a_backends_port_unreachable_reaches_the_client_as_econnrefused() -> anyhow::Result<()> {
    let node = Node::new("e2e-udp-icmp")?;
    let manifests = node.dir().join("manifests");
    write_manifest(
        &manifests,
        "svc.yaml",
        &format!(
            "{}---\n{}---\n{}",
            udp_service_yaml("silent", DNS_VIP, "silent"),
            pod_yaml("silent-1", "silent"),
            // Default-deny ingress for the client: the error must pass as
            // part of the client's own flow.
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny-in, namespace: default}\nspec:\n  podSelector: {matchLabels: {app: client}}\n  policyTypes: [Ingress]\n"
        ),
    )?;
    write_manifest(&manifests, "client.yaml", &pod_yaml("client", "client"))?;
    let agent = node.start_agent(&manifests, &[])?;
    let api = agent.client();
    let conf = node.ptp_conflist("e2e", "10.244.7.0/24", "1.0.0", vec![node.catena_plugin()])?;
    let cni = CniRunner::new(&node, conf);
    let client = node.pod("client")?;
    let silent = node.pod("silent-1")?;
    for pod in [&client, &silent] {
        cni.add(pod, "eth0", &CallArgs::default())?;
    }
    let frontend = format!("{DNS_VIP}:53/UDP");
    wait_for("the silent backend", Duration::from_secs(10), || {
        let s: Vec<ServiceStatus> = api.get("/v1/services")?;
        Ok(backends_of(&s, &frontend).filter(|b| b.len() == 1))
    })?;
    let vip: SocketAddr = format!("{DNS_VIP}:53").parse()?;
    for _ in 0..5 {
        let (result, elapsed) = client.netns().enter_thread(move || {
            let start = Instant::now();
            let r = udp_connected_request(vip, Duration::from_secs(2));
            (r, start.elapsed())
        })?;
        let err = result.expect_err("a backend without a listener answered");
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
        assert!(elapsed < REFUSE_WITHIN, "refused after {elapsed:?}");
    }
    // The backend's error, not the datapath's no-backend refusal.
    let status: Status = api.get("/v1/status")?;
    assert_eq!(status.datapath.counters["reject_no_backend"], 0);
    for pod in [&client, &silent] {
        cni.del(pod, "eth0", &CallArgs::default())?;
    }
    Ok(())
}
