//! One packet through every layer: the real ptp + host-local primary, the real
//! `catena-cni` chained after it, the real `catena-agent` in standalone mode,
//! and TCP through a ClusterIP translated by the eBPF programs on the host veths.
//! Every scenario runs twice: with the manifest-directory source and with the
//! Kubernetes source against the lab's list/watch API server.

use catena_api::{Endpoint, ServiceStatus, Status};
use catena_e2e::source::{ClusterSource, SourceKind};
use catena_e2e::{endpoint_slice_yaml, pod_yaml, service_yaml, wait_for};
use catena_lab::{count_backends, CallArgs, CniRunner, Node};
use std::net::SocketAddr;
use std::time::Duration;

const VIP: &str = "10.96.0.10";

fn vip() -> SocketAddr {
    format!("{VIP}:80").parse().unwrap()
}

fn backends_of(services: &[ServiceStatus], frontend: &str) -> Option<Vec<String>> {
    services
        .iter()
        .find(|s| s.frontend == frontend)
        .map(|s| s.backends.clone())
}

#[test]
fn clusterip_with_selected_pods_from_manifests() -> anyhow::Result<()> {
    clusterip_with_selected_pods(SourceKind::Manifests)
}

#[test]
fn clusterip_with_selected_pods_from_kubernetes() -> anyhow::Result<()> {
    clusterip_with_selected_pods(SourceKind::Kubernetes)
}

#[test]
fn clusterip_from_endpoint_slices_from_manifests() -> anyhow::Result<()> {
    clusterip_from_endpoint_slices(SourceKind::Manifests)
}

#[test]
fn clusterip_from_endpoint_slices_from_kubernetes() -> anyhow::Result<()> {
    clusterip_from_endpoint_slices(SourceKind::Kubernetes)
}

fn clusterip_with_selected_pods(kind: SourceKind) -> anyhow::Result<()> {
    let node = Node::new("e2e-svc")?;
    let source = ClusterSource::new(kind, &node)?;
    source.apply("web.yaml", &service_yaml("web", VIP, 80, 8080, Some("web")))?;
    let pods = format!(
        "{}---\n{}",
        pod_yaml("web-1", "web"),
        pod_yaml("web-2", "web")
    );
    source.apply("pods.yaml", &pods)?;
    let agent = source.start_agent(&node, &[])?;
    let api = agent.client();

    let conf = node.ptp_conflist("e2e", "10.244.1.0/24", "1.0.0", vec![node.catena_plugin()])?;
    let cni = CniRunner::new(&node, conf);
    let client = node.pod("client")?;
    let web1 = node.pod("web-1")?;
    let web2 = node.pod("web-2")?;
    for pod in [&client, &web1, &web2] {
        let result = cni.add(pod, "eth0", &CallArgs::default())?;
        // catena passes the primary's result through unchanged.
        assert_eq!(result.raw["ips"], pod.result().unwrap().raw["ips"]);
    }
    let _s1 = web1.serve_tcp(8080, "web-1")?;
    let _s2 = web2.serve_tcp(8080, "web-2")?;

    // ADD returned only after the endpoint was programmed: the Service already
    // has both selected pods as backends.
    let services: Vec<ServiceStatus> = api.get("/v1/services")?;
    let mut expected = vec![
        format!("{}:8080", web1.ipv4()?),
        format!("{}:8080", web2.ipv4()?),
    ];
    expected.sort();
    assert_eq!(
        backends_of(&services, &format!("{VIP}:80/TCP")),
        Some(expected)
    );

    // The endpoints sit on the real host-side peers of each pod's eth0.
    let endpoints: Vec<Endpoint> = api.get("/v1/endpoints")?;
    assert_eq!(endpoints.len(), 3);
    for pod in [&client, &web1, &web2] {
        let ep = endpoints
            .iter()
            .find(|e| e.spec.container_id == pod.container_id)
            .expect("registered");
        assert_eq!(ep.spec.host_ifname, pod.host_veth(&node, "eth0")?);
        assert_eq!(ep.spec.pod.name, pod.name);
        assert_eq!(ep.attach_mode, "tcx");
        assert_eq!(ep.spec.ips, vec![format!("{}/24", pod.ipv4()?)]);
    }

    // DNAT to a backend, reply translated back: the client sees the VIP.
    let reply = client.tcp_request(vip(), Duration::from_secs(3))?;
    assert_eq!(
        reply.peer,
        vip(),
        "the reply must come from the VIP, not the backend"
    );
    assert!(reply.text == "web-1" || reply.text == "web-2", "{reply:?}");
    let counts = count_backends(&client, vip(), 60)?;
    assert_eq!(counts.values().sum::<usize>(), 60, "{counts:?}");
    assert!(
        counts.get("web-1").copied().unwrap_or(0) > 5
            && counts.get("web-2").copied().unwrap_or(0) > 5,
        "both backends serve: {counts:?}"
    );

    cni.check(&client, "eth0", &CallArgs::default())?;
    let status: Status = api.get("/v1/status")?;
    assert!(
        status.ready && status.datapath.counters["service_dnat"] >= 61,
        "{status:?}"
    );

    // DEL of a backend takes it out of the Service at once and detaches.
    let web2_ifindex = endpoints
        .iter()
        .find(|e| e.spec.container_id == web2.container_id)
        .unwrap()
        .spec
        .host_ifindex;
    cni.del(&web2, "eth0", &CallArgs::default())?;
    let services: Vec<ServiceStatus> = api.get("/v1/services")?;
    assert_eq!(
        backends_of(&services, &format!("{VIP}:80/TCP")),
        Some(vec![format!("{}:8080", web1.ipv4()?)])
    );
    let counts = count_backends(&client, vip(), 10)?;
    assert_eq!(counts.get("web-1"), Some(&10), "{counts:?}");
    let pins = link_pins(&node)?;
    assert!(
        !pins
            .iter()
            .any(|p| p.starts_with(&format!("{web2_ifindex}-"))),
        "link pins of the deleted pod remain: {pins:?}"
    );
    // containerd calls DEL again, without netns or prevResult: still fine.
    cni.del(&web2, "eth0", &CallArgs::containerd_repeat_del())?;

    for pod in [&client, &web1] {
        cni.del(pod, "eth0", &CallArgs::default())?;
    }
    let endpoints: Vec<Endpoint> = api.get("/v1/endpoints")?;
    assert!(endpoints.is_empty(), "{endpoints:?}");
    assert!(link_pins(&node)?.is_empty(), "{:?}", link_pins(&node)?);
    Ok(())
}

fn clusterip_from_endpoint_slices(kind: SourceKind) -> anyhow::Result<()> {
    let node = Node::new("e2e-slice")?;
    let source = ClusterSource::new(kind, &node)?;
    // No selector: backends come only from EndpointSlices.
    source.apply("svc.yaml", &service_yaml("api", VIP, 80, 9000, None))?;
    let agent = source.start_agent(&node, &[])?;
    let api = agent.client();
    let conf = node.ptp_conflist("e2e", "10.244.2.0/24", "0.3.1", vec![node.catena_plugin()])?;
    let cni = CniRunner::new(&node, conf);
    let client = node.pod("client")?;
    let b1 = node.pod("b1")?;
    let b2 = node.pod("b2")?;
    for pod in [&client, &b1, &b2] {
        cni.add(pod, "eth0", &CallArgs::default())?;
    }
    let _s1 = b1.serve_tcp(9000, "b1")?;
    let _s2 = b2.serve_tcp(9000, "b2")?;
    let frontend = format!("{VIP}:80/TCP");

    let addrs = vec![b1.ipv4()?.to_string(), b2.ipv4()?.to_string()];
    source.apply(
        "slice.yaml",
        &endpoint_slice_yaml("api-1", "api", 9000, &addrs),
    )?;
    wait_for(
        "both slice endpoints programmed",
        Duration::from_secs(10),
        || {
            let s: Vec<ServiceStatus> = api.get("/v1/services")?;
            Ok(backends_of(&s, &frontend).filter(|b| b.len() == 2))
        },
    )?;
    let counts = count_backends(&client, vip(), 40)?;
    assert!(
        counts.contains_key("b1") && counts.contains_key("b2"),
        "{counts:?}"
    );

    // An edit removing b2 is picked up live.
    source.apply(
        "slice.yaml",
        &endpoint_slice_yaml("api-1", "api", 9000, &addrs[..1]),
    )?;
    wait_for("b2 removed", Duration::from_secs(10), || {
        let s: Vec<ServiceStatus> = api.get("/v1/services")?;
        Ok(backends_of(&s, &frontend).filter(|b| b.len() == 1))
    })?;
    assert_eq!(count_backends(&client, vip(), 10)?.get("b1"), Some(&10));

    if kind == SourceKind::Manifests {
        // A broken edit is reported with file and line; the last good state stays.
        catena_e2e::write_manifest(source.dir(), "slice.yaml", "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: api-1}\naddressType: IPv4\nendpoints: [{addresses: 7}]\n")?;
        let status: Status = wait_for("the error reported", Duration::from_secs(10), || {
            let s: Status = api.get("/v1/status")?;
            Ok((!s.source.errors.is_empty()).then_some(s))
        })?;
        assert!(
            status.source.errors[0].contains("slice.yaml:1:"),
            "{:?}",
            status.source.errors
        );
        assert_eq!(count_backends(&client, vip(), 5)?.get("b1"), Some(&5));
    }

    // Removing the slice leaves the Service without backends.
    source.remove("slice.yaml")?;
    wait_for("backends gone", Duration::from_secs(10), || {
        let s: Vec<ServiceStatus> = api.get("/v1/services")?;
        Ok(backends_of(&s, &frontend).filter(|b| b.is_empty()))
    })?;
    for pod in [&client, &b1, &b2] {
        cni.del(pod, "eth0", &CallArgs::default())?;
    }
    Ok(())
}

fn link_pins(node: &Node) -> anyhow::Result<Vec<String>> {
    let dir = node.bpffs_dir().join("links");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Ok(vec![]);
    };
    Ok(entries
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect())
}
