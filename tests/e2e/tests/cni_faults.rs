//! Faults around catena-cni: the agent down at ADD (fail fast and closed with
//! code 11), the agent down at DEL (exit 0, queued, drained at start), DEL
//! with the netns, the veth or the link pins already gone, and an agent
//! crash with endpoints in place (traffic keeps flowing on the pinned
//! programs; the restarted agent restores every endpoint).

use catena_api::{Endpoint, EndpointCheck};
use catena_e2e::{dir_entries, pod_yaml, service_yaml, write_manifest};
use catena_lab::{count_backends, tcx_program_counts, CallArgs, CniRunner, Netns, Node, Pod};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

const VIP: &str = "10.96.0.10";

fn vip() -> SocketAddr {
    format!("{VIP}:80").parse().unwrap()
}

fn link_pins(node: &Node) -> Vec<String> {
    dir_entries(&node.bpffs_dir().join("links"))
}

fn pins_of(node: &Node, ifindex: u32) -> Vec<String> {
    let prefix = format!("{ifindex}-");
    link_pins(node)
        .into_iter()
        .filter(|p| p.starts_with(&prefix))
        .collect()
}

fn queue_files(node: &Node) -> Vec<String> {
    dir_entries(&node.state_dir().join("del-queue"))
}

fn endpoint_records(node: &Node) -> Vec<String> {
    dir_entries(&node.state_dir().join("endpoints"))
}

fn endpoints(api: &catena_api::Client) -> anyhow::Result<Vec<Endpoint>> {
    Ok(api.get("/v1/endpoints")?)
}

fn endpoint_of(eps: &[Endpoint], pod: &Pod) -> Option<Endpoint> {
    eps.iter()
        .find(|e| e.spec.container_id == pod.container_id)
        .cloned()
}

fn ifindex(ns: &Netns, ifname: &str) -> anyhow::Result<u32> {
    ns.links_json()?
        .iter()
        .find(|l| l["ifname"] == ifname)
        .and_then(|l| l["ifindex"].as_u64())
        .map(|i| i as u32)
        .ok_or_else(|| anyhow::anyhow!("no {ifname} in {}", ns.name()))
}

/// The last catena-cni call of `command` succeeded (exit 0).
fn last_catena_ok(cni: &CniRunner<'_>, command: &str) -> bool {
    cni.calls()
        .iter()
        .rev()
        .find(|c| c.plugin == "catena-cni" && c.command == command)
        .is_some_and(|c| c.success)
}

fn empty_manifests(node: &Node) -> anyhow::Result<std::path::PathBuf> {
    let dir = node.dir().join("manifests");
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Asserts that the failed ADD of `pod` left nothing of catena's behind:
/// no pins, no records, no TCX program on its host veth.
fn assert_nothing_attached(node: &Node, pod: &Pod, ctx: &str) -> anyhow::Result<()> {
    assert!(link_pins(node).is_empty(), "{ctx}: {:?}", link_pins(node));
    assert!(endpoint_records(node).is_empty(), "{ctx}");
    let veth = pod.host_veth(node, "eth0")?;
    assert_eq!(tcx_program_counts(node.netns(), &veth)?, (0, 0), "{ctx}");
    Ok(())
}

/// ADD with the agent down fails within a second with code 11 and attaches
/// nothing, both with no socket at all and with a stale socket of a killed
/// agent; after the agent starts, the runtime's retry (DEL, then ADD) works.
#[test]
fn add_with_agent_down_fails_fast_with_code_11() -> anyhow::Result<()> {
    let node = Node::new("flt-add-down")?;
    let manifests = empty_manifests(&node)?;
    let conf = node.ptp_conflist(
        "faults",
        "10.244.0.0/24",
        "1.0.0",
        vec![node.catena_plugin()],
    )?;
    let cni = CniRunner::new(&node, conf).with_io_recording();
    let pod = node.pod("early")?;

    // Never started: no socket.
    let err = cni
        .add(&pod, "eth0", &CallArgs::default())
        .expect_err("ADD must fail with the agent down");
    let perr = err.plugin_error().expect("a CNI error object");
    assert_eq!(
        (perr.plugin.as_str(), perr.code),
        ("catena-cni", 11),
        "{err}"
    );
    assert!(perr.msg.contains("not reachable"), "{err}");
    let took = catena_add_time(&cni);
    assert!(took < Duration::from_secs(1), "took {took:?}");
    assert_nothing_attached(&node, &pod, "no socket")?;
    // The runtime tears the failed sandbox down, then retries.
    cni.del(&pod, "eth0", &CallArgs::default())?;

    let mut agent = node.start_agent(&manifests, &[])?;
    cni.add(&pod, "eth0", &CallArgs::default())?;
    let ep = endpoint_of(&endpoints(&agent.client())?, &pod).expect("registered after start");
    assert_eq!(ep.spec.host_ifname, pod.host_veth(&node, "eth0")?);
    assert_eq!(
        tcx_program_counts(node.netns(), &ep.spec.host_ifname)?,
        (1, 1)
    );

    // Killed: the socket file is left behind and refuses connections.
    agent.kill()?;
    assert!(
        node.agent_socket().exists(),
        "the test needs a stale socket"
    );
    let late = node.pod("late")?;
    let start = Instant::now();
    let err = cni
        .add(&late, "eth0", &CallArgs::default())
        .expect_err("ADD must fail with the agent killed");
    assert_eq!(err.plugin_error().map(|p| p.code), Some(11), "{err}");
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    let took = catena_add_time(&cni);
    assert!(took < Duration::from_secs(1), "took {took:?}");
    let late_veth = late.host_veth(&node, "eth0")?;
    assert_eq!(tcx_program_counts(node.netns(), &late_veth)?, (0, 0));
    assert!(pins_of(&node, ifindex(node.netns(), &late_veth)?).is_empty());
    assert_eq!(endpoint_records(&node).len(), 1, "only `early`'s record");
    cni.del(&late, "eth0", &CallArgs::default())?;

    agent.start_again()?;
    cni.add(&late, "eth0", &CallArgs::default())?;
    let eps = endpoints(&agent.client())?;
    assert_eq!(eps.len(), 2, "{eps:?}");
    for pod in [&pod, &late] {
        cni.del(pod, "eth0", &CallArgs::default())?;
    }
    assert!(endpoints(&agent.client())?.is_empty());
    assert!(link_pins(&node).is_empty());
    Ok(())
}

/// Wall time of the last catena-cni ADD.
fn catena_add_time(cni: &CniRunner<'_>) -> Duration {
    cni.timings()
        .iter()
        .rev()
        .find(|t| t.plugin == "catena-cni" && t.command == "ADD")
        .map(|t| t.elapsed)
        .expect("catena-cni ran")
}

/// DEL with the agent killed exits 0 and queues; containerd's repeated DELs
/// keep one entry; the started agent drains it: endpoint, record, pins and
/// queue entry gone, the other pod untouched.
#[test]
fn del_with_agent_down_is_queued_and_drained_at_start() -> anyhow::Result<()> {
    let node = Node::new("flt-del-down")?;
    let manifests = empty_manifests(&node)?;
    let mut agent = node.start_agent(&manifests, &[])?;
    let conf = node.ptp_conflist(
        "faults",
        "10.244.0.0/24",
        "1.0.0",
        vec![node.catena_plugin()],
    )?;
    let cni = CniRunner::new(&node, conf).with_io_recording();
    let gone = node.pod("gone")?;
    let stays = node.pod("stays")?;
    for pod in [&gone, &stays] {
        cni.add(pod, "eth0", &CallArgs::default())?;
    }
    let eps = endpoints(&agent.client())?;
    let gone_ep = endpoint_of(&eps, &gone).expect("registered");
    let stays_ep = endpoint_of(&eps, &stays).expect("registered");
    assert_eq!(pins_of(&node, gone_ep.spec.host_ifindex).len(), 2);

    agent.kill()?;
    cni.del(&gone, "eth0", &CallArgs::default())?;
    assert!(last_catena_ok(&cni, "DEL"));
    cni.del(&gone, "eth0", &CallArgs::containerd_repeat_del())?;
    cni.del(&gone, "eth0", &CallArgs::containerd_repeat_del())?;
    assert!(last_catena_ok(&cni, "DEL"));
    let want = format!("{}_eth0.json", gone.container_id);
    assert_eq!(queue_files(&node), vec![want.clone()]);
    let queued: catena_api::QueuedDelete = serde_json::from_slice(&std::fs::read(
        node.state_dir().join("del-queue").join(&want),
    )?)?;
    assert_eq!(queued.host_ifindex, Some(gone_ep.spec.host_ifindex));
    // Nothing could remove them yet.
    assert_eq!(endpoint_records(&node).len(), 2);
    assert_eq!(pins_of(&node, gone_ep.spec.host_ifindex).len(), 2);

    agent.start_again()?;
    let eps = endpoints(&agent.client())?;
    assert!(endpoint_of(&eps, &gone).is_none(), "{eps:?}");
    assert_eq!(endpoint_of(&eps, &stays).map(|e| e.id), Some(stays_ep.id));
    assert!(queue_files(&node).is_empty(), "{:?}", queue_files(&node));
    assert!(pins_of(&node, gone_ep.spec.host_ifindex).is_empty());
    assert_eq!(pins_of(&node, stays_ep.spec.host_ifindex).len(), 2);
    assert_eq!(endpoint_records(&node).len(), 1);

    cni.del(&stays, "eth0", &CallArgs::default())?;
    assert!(endpoints(&agent.client())?.is_empty());
    assert!(link_pins(&node).is_empty(), "{:?}", link_pins(&node));
    assert!(endpoint_records(&node).is_empty());
    Ok(())
}

/// DEL exits 0 and leaves no endpoint when the pod's netns path, the host
/// veth, or catena's link pins are already gone.
#[test]
fn del_tolerates_missing_netns_veth_and_pins() -> anyhow::Result<()> {
    let node = Node::new("flt-missing")?;
    let manifests = empty_manifests(&node)?;
    let agent = node.start_agent(&manifests, &[])?;
    let api = agent.client();
    let conf = node.ptp_conflist(
        "faults",
        "10.244.0.0/24",
        "1.0.0",
        vec![node.catena_plugin()],
    )?;
    let cni = CniRunner::new(&node, conf).with_io_recording();
    let no_netns = node.pod("no-netns")?;
    let no_veth = node.pod("no-veth")?;
    let no_pins = node.pod("no-pins")?;
    for pod in [&no_netns, &no_veth, &no_pins] {
        cni.add(pod, "eth0", &CallArgs::default())?;
    }
    let eps = endpoints(&api)?;
    assert_eq!(eps.len(), 3);

    // The netns path is gone (the runtime removed it before DEL).
    let ep = endpoint_of(&eps, &no_netns).unwrap();
    no_netns
        .netns()
        .run("true", &[])
        .expect("netns usable before");
    std::process::Command::new("ip")
        .args(["netns", "del", no_netns.netns().name()])
        .status()?
        .success()
        .then_some(())
        .ok_or_else(|| anyhow::anyhow!("ip netns del failed"))?;
    assert!(!no_netns.netns_path().exists());
    cni.del(&no_netns, "eth0", &CallArgs::default())?;
    assert!(last_catena_ok(&cni, "DEL"));
    assert!(endpoint_of(&endpoints(&api)?, &no_netns).is_none());
    assert!(pins_of(&node, ep.spec.host_ifindex).is_empty());

    // The host veth is gone.
    let ep = endpoint_of(&eps, &no_veth).unwrap();
    node.netns()
        .run("ip", &["link", "del", &ep.spec.host_ifname])?;
    cni.del(&no_veth, "eth0", &CallArgs::default())?;
    assert!(last_catena_ok(&cni, "DEL"));
    assert!(endpoint_of(&endpoints(&api)?, &no_veth).is_none());
    assert!(pins_of(&node, ep.spec.host_ifindex).is_empty());

    // The link pins are gone (which also detaches the TCX links).
    let ep = endpoint_of(&eps, &no_pins).unwrap();
    let pins = pins_of(&node, ep.spec.host_ifindex);
    assert_eq!(pins.len(), 2);
    for p in &pins {
        std::fs::remove_file(node.bpffs_dir().join("links").join(p))?;
    }
    cni.del(&no_pins, "eth0", &CallArgs::default())?;
    assert!(last_catena_ok(&cni, "DEL"));
    assert!(endpoint_of(&endpoints(&api)?, &no_pins).is_none());

    let dels = cni
        .calls()
        .iter()
        .filter(|c| c.plugin == "catena-cni" && c.command == "DEL")
        .count();
    assert_eq!(dels, 3);
    assert!(
        endpoint_records(&node).is_empty(),
        "{:?}",
        endpoint_records(&node)
    );
    assert!(link_pins(&node).is_empty(), "{:?}", link_pins(&node));
    assert!(queue_files(&node).is_empty());
    Ok(())
}

/// With endpoints in place the agent crashes: requests through the ClusterIP
/// keep being load-balanced by the pinned programs and maps while it is
/// down; the restarted agent restores every endpoint (same ids, same veths)
/// from the state dir, CHECK passes and traffic goes on. A graceful restart
/// keeps them too.
#[test]
fn agent_restart_keeps_endpoints_and_traffic_flows_while_down() -> anyhow::Result<()> {
    let node = Node::new("flt-restart")?;
    let manifests = node.dir().join("manifests");
    write_manifest(
        &manifests,
        "svc.yaml",
        &format!(
            "{}---\n{}---\n{}",
            service_yaml("web", VIP, 80, 8080, Some("web")),
            pod_yaml("web-1", "web"),
            pod_yaml("web-2", "web")
        ),
    )?;
    let mut agent = node.start_agent(&manifests, &[])?;
    let conf = node.ptp_conflist(
        "faults",
        "10.244.0.0/24",
        "1.0.0",
        vec![node.catena_plugin()],
    )?;
    let cni = CniRunner::new(&node, conf);
    let client = node.pod("client")?;
    let web1 = node.pod("web-1")?;
    let web2 = node.pod("web-2")?;
    for pod in [&client, &web1, &web2] {
        cni.add(pod, "eth0", &CallArgs::default())?;
    }
    let _s1 = web1.serve_tcp(8080, "web-1")?;
    let _s2 = web2.serve_tcp(8080, "web-2")?;
    let mut before = endpoints(&agent.client())?;
    before.sort_by_key(|e| e.id);
    assert_eq!(before.len(), 3);
    let counts = count_backends(&client, vip(), 20)?;
    assert_eq!(counts.len(), 2, "{counts:?}");

    agent.kill()?;
    assert!(
        agent
            .client()
            .get::<catena_api::Health>("/v1/healthz")
            .is_err(),
        "the agent must really be down"
    );
    let counts = count_backends(&client, vip(), 40)?;
    assert_eq!(counts.values().sum::<usize>(), 40, "{counts:?}");
    assert!(
        counts.get("web-1").copied().unwrap_or(0) > 3
            && counts.get("web-2").copied().unwrap_or(0) > 3,
        "both backends serve while the agent is down: {counts:?}"
    );
    let reply = client.tcp_request(vip(), Duration::from_secs(3))?;
    assert_eq!(reply.peer, vip());
    assert_eq!(endpoint_records(&node).len(), 3);
    assert_eq!(link_pins(&node).len(), 6);

    for round in ["after a crash", "after a graceful restart"] {
        if round == "after a crash" {
            agent.start_again()?;
        } else {
            agent.restart()?;
        }
        let mut after = endpoints(&agent.client())?;
        after.sort_by_key(|e| e.id);
        assert_eq!(after, before, "{round}");
        for pod in [&client, &web1, &web2] {
            cni.check(pod, "eth0", &CallArgs::default())
                .map_err(|e| anyhow::anyhow!("{round}: CHECK {}: {e}", pod.name))?;
            let ep = endpoint_of(&after, pod).unwrap();
            let check: EndpointCheck = agent
                .client()
                .get(&format!("/v1/endpoints/{}/eth0/check", pod.container_id))?;
            assert!(check.ok, "{round}: {check:?}");
            assert_eq!(
                tcx_program_counts(node.netns(), &ep.spec.host_ifname)?,
                (1, 1),
                "{round}: programs attached once, not twice"
            );
        }
        let counts = count_backends(&client, vip(), 20)?;
        assert_eq!(counts.values().sum::<usize>(), 20, "{round}: {counts:?}");
        assert_eq!(counts.len(), 2, "{round}: {counts:?}");
    }

    for pod in [&client, &web1, &web2] {
        cni.del(pod, "eth0", &CallArgs::default())?;
    }
    assert!(endpoints(&agent.client())?.is_empty());
    assert!(link_pins(&node).is_empty(), "{:?}", link_pins(&node));
    Ok(())
}
