//! Service load-balancing behaviour through the real chain (ptp + host-local,
//! then catena-cni, the real agent in standalone mode): a Service without
//! endpoints refuses at once, a pod reaches itself through its own Service
//! (hairpin), and sessionAffinity: ClientIP keeps a client on one backend.

use catena_api::ServiceStatus;
use catena_e2e::{pod_yaml, service_yaml, wait_for, write_manifest};
use catena_lab::{count_backends, CallArgs, CniRunner, Node};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

fn backends_of(services: &[ServiceStatus], frontend: &str) -> Option<Vec<String>> {
    services
        .iter()
        .find(|s| s.frontend == frontend)
        .map(|s| s.backends.clone())
}

#[test]
fn service_without_endpoints_refuses_connections_at_once() -> anyhow::Result<()> {
    let node = Node::new("svc-reject")?;
    let manifests = node.dir().join("manifests");
    // The selector matches no pod: the Service exists but has no endpoints.
    write_manifest(
        &manifests,
        "empty.yaml",
        &service_yaml("empty", "10.96.0.20", 80, 8080, Some("nobody")),
    )?;
    let agent = node.start_agent(&manifests, &[])?;
    let api = agent.client();
    let conf = node.ptp_conflist("e2e", "10.244.3.0/24", "1.0.0", vec![node.catena_plugin()])?;
    let cni = CniRunner::new(&node, conf);
    let client = node.pod("client")?;
    cni.add(&client, "eth0", &CallArgs::default())?;
    wait_for(
        "the empty service programmed",
        Duration::from_secs(10),
        || {
            let s: Vec<ServiceStatus> = api.get("/v1/services")?;
            Ok(backends_of(&s, "10.96.0.20:80/TCP").filter(|b| b.is_empty()))
        },
    )?;

    let vip: SocketAddr = "10.96.0.20:80".parse()?;
    for _ in 0..3 {
        let (result, elapsed) = client.netns().enter_thread(move || {
            let start = Instant::now();
            let r = TcpStream::connect_timeout(&vip, Duration::from_secs(3));
            (r.map(|_| ()), start.elapsed())
        })?;
        let err = result.expect_err("connect to a Service without endpoints succeeded");
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
        assert!(
            elapsed < Duration::from_millis(100),
            "refused after {elapsed:?}, not at once"
        );
    }
    cni.del(&client, "eth0", &CallArgs::default())?;
    Ok(())
}

#[test]
fn pod_reaches_itself_through_its_service() -> anyhow::Result<()> {
    let node = Node::new("svc-hairpin")?;
    let manifests = node.dir().join("manifests");
    write_manifest(
        &manifests,
        "self.yaml",
        &format!(
            "{}---\n{}",
            service_yaml("self", "10.96.0.21", 80, 8080, Some("self")),
            pod_yaml("web", "self")
        ),
    )?;
    let agent = node.start_agent(&manifests, &[])?;
    let api = agent.client();
    let conf = node.ptp_conflist("e2e", "10.244.4.0/24", "1.0.0", vec![node.catena_plugin()])?;
    let cni = CniRunner::new(&node, conf);
    let web = node.pod("web")?;
    cni.add(&web, "eth0", &CallArgs::default())?;
    let _srv = web.serve_tcp(8080, "web")?;
    let services: Vec<ServiceStatus> = api.get("/v1/services")?;
    assert_eq!(
        backends_of(&services, "10.96.0.21:80/TCP"),
        Some(vec![format!("{}:8080", web.ipv4()?)])
    );

    let vip: SocketAddr = "10.96.0.21:80".parse()?;
    // The only backend is the caller itself.
    let reply = web.tcp_request(vip, Duration::from_secs(3))?;
    assert_eq!((reply.text.as_str(), reply.peer), ("web", vip));
    let counts = count_backends(&web, vip, 20)?;
    assert_eq!(counts.get("web"), Some(&20), "{counts:?}");
    cni.del(&web, "eth0", &CallArgs::default())?;
    Ok(())
}

#[test]
fn client_ip_affinity_keeps_a_client_on_one_backend() -> anyhow::Result<()> {
    let node = Node::new("svc-affinity")?;
    let manifests = node.dir().join("manifests");
    write_manifest(
        &manifests,
        "sticky.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: sticky, namespace: default}\nspec:\n  clusterIP: 10.96.0.22\n  selector: {app: sticky}\n  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}\n  ports:\n  - {name: http, port: 80, targetPort: 8080, protocol: TCP}\n",
    )?;
    write_manifest(
        &manifests,
        "pods.yaml",
        &format!(
            "{}---\n{}---\n{}",
            pod_yaml("s-1", "sticky"),
            pod_yaml("s-2", "sticky"),
            pod_yaml("s-3", "sticky")
        ),
    )?;
    let agent = node.start_agent(&manifests, &[])?;
    let api = agent.client();
    let conf = node.ptp_conflist("e2e", "10.244.5.0/24", "1.0.0", vec![node.catena_plugin()])?;
    let cni = CniRunner::new(&node, conf);
    let client = node.pod("client")?;
    let other = node.pod("other")?;
    let backends = [node.pod("s-1")?, node.pod("s-2")?, node.pod("s-3")?];
    for pod in [&client, &other].into_iter().chain(&backends) {
        cni.add(pod, "eth0", &CallArgs::default())?;
    }
    let _servers = backends
        .iter()
        .map(|p| p.serve_tcp(8080, &p.name))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let services: Vec<ServiceStatus> = api.get("/v1/services")?;
    assert_eq!(
        backends_of(&services, "10.96.0.22:80/TCP").map(|b| b.len()),
        Some(3)
    );

    // 30 connections (each a new flow) per client, each to one backend; with
    // random picks over 3 backends that would happen with p = 3^-29.
    let vip: SocketAddr = "10.96.0.22:80".parse()?;
    for pod in [&client, &other] {
        let counts = count_backends(pod, vip, 30)?;
        assert_eq!(
            counts.len(),
            1,
            "{} was not kept on one backend: {counts:?}",
            pod.name
        );
        assert_eq!(counts.values().sum::<usize>(), 30, "{counts:?}");
    }
    for pod in [&client, &other].into_iter().chain(&backends) {
        cni.del(pod, "eth0", &CallArgs::default())?;
    }
    Ok(())
}
