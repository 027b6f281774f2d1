//! Pods running before catena was installed are adopted at agent start, from
//! the runtime's CNI result cache, without restarting them.

use catena_api::{Endpoint, ServiceStatus};
use catena_e2e::{pod_yaml, service_yaml, write_manifest};
use catena_lab::{count_backends, CallArgs, CniRunner, Node};
use serde_json::json;
use std::net::SocketAddr;

#[test]
fn pods_started_before_catena_are_adopted_from_the_cni_cache() -> anyhow::Result<()> {
    let node = Node::new("e2e-adopt")?;
    // Day 0: the primary alone (the network is named "k8s", as a runtime sees it).
    let primary = node.ptp_conflist("k8s", "10.244.3.0/24", "1.0.0", vec![])?;
    let before = CniRunner::new(&node, primary.clone());
    let client = node.pod("client")?;
    let web = node.pod("web-1")?;
    let other = node.pod("other")?;
    for pod in [&client, &web] {
        before.add(pod, "eth0", &CallArgs::default())?;
    }
    // A pod on a network catena will never chain: must be left alone.
    let unrelated = CniRunner::new(
        &node,
        node.ptp_conflist("side", "10.245.0.0/24", "1.0.0", vec![])?,
    );
    unrelated.add(&other, "eth0", &CallArgs::default())?;
    let _srv = web.serve_tcp(8080, "web-1")?;

    // Day 1: catena is installed: the node's conf dir now chains it on "k8s".
    let mut plugins = primary.raw["plugins"].as_array().unwrap().clone();
    plugins.push(node.catena_plugin());
    let chained = json!({"cniVersion": "1.0.0", "name": "k8s", "plugins": plugins});
    let conf_dir = node.dir().join("net.d");
    std::fs::create_dir_all(&conf_dir)?;
    std::fs::write(conf_dir.join("05-catena.conflist"), chained.to_string())?;
    let manifests = node.dir().join("manifests");
    write_manifest(
        &manifests,
        "svc.yaml",
        &format!(
            "{}---\n{}",
            service_yaml("web", "10.96.0.10", 80, 8080, Some("web")),
            pod_yaml("web-1", "web")
        ),
    )?;
    let cache = node.cni_cache_dir();
    let agent = node.start_agent(
        &manifests,
        &[
            "--cni-cache-dir",
            cache.to_str().unwrap(),
            "--cni-conf-dir",
            conf_dir.to_str().unwrap(),
        ],
    )?;
    let api = agent.client();

    // Both running pods of "k8s" are endpoints now, on their real veths; the
    // pod of the other network is not.
    let endpoints: Vec<Endpoint> = api.get("/v1/endpoints")?;
    let ids: Vec<&str> = endpoints
        .iter()
        .map(|e| e.spec.container_id.as_str())
        .collect();
    assert_eq!(endpoints.len(), 2, "{ids:?}");
    for pod in [&client, &web] {
        let ep = endpoints
            .iter()
            .find(|e| e.spec.container_id == pod.container_id)
            .expect("adopted");
        assert_eq!(ep.spec.host_ifname, pod.host_veth(&node, "eth0")?);
        assert_eq!(ep.spec.network, "k8s");
        assert_eq!(
            ep.spec.pod.name, pod.name,
            "pod identity comes from the cached CNI_ARGS"
        );
        assert_eq!(ep.spec.ips, vec![format!("{}/24", pod.ipv4()?)]);
    }
    // ... so the Service selects the adopted backend and the adopted client's
    // traffic is translated, without either pod having been restarted.
    let services: Vec<ServiceStatus> = api.get("/v1/services")?;
    assert_eq!(services[0].backends, vec![format!("{}:8080", web.ipv4()?)]);
    let vip: SocketAddr = "10.96.0.10:80".parse()?;
    assert_eq!(count_backends(&client, vip, 10)?.get("web-1"), Some(&10));

    // A restart adopts nothing twice.
    let mut agent = agent;
    agent.stop()?;
    agent.start_again()?;
    let again: Vec<Endpoint> = agent.client().get("/v1/endpoints")?;
    assert_eq!(again.len(), 2);
    assert_eq!(
        again.iter().map(|e| e.id).collect::<Vec<_>>(),
        endpoints.iter().map(|e| e.id).collect::<Vec<_>>()
    );

    // Adopted pods are deleted through the chained conflist like any other.
    let after = CniRunner::new(&node, catena_lab::Conflist::from_value(chained)?);
    for pod in [&client, &web] {
        after.del(pod, "eth0", &CallArgs::default())?;
    }
    let left: Vec<Endpoint> = agent.client().get("/v1/endpoints")?;
    assert!(left.is_empty(), "{left:?}");
    unrelated.del(&other, "eth0", &CallArgs::default())?;
    Ok(())
}
