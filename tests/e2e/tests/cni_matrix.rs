//! The CNI matrix: every cniVersion catena accepts × each generic-veth primary
//! (ptp, bridge) × catena alone or among bandwidth, portmap and tuning, all
//! through the real reference plugins, the real catena-cni and the real
//! agent. Each primary×layout combination is its own #[test] (one node each)
//! so they run in parallel; versions run one after another on that node.
//!
//! Every combination: ADD; catena prints exactly the prevResult it got; the
//! endpoint sits on the kernel's host-side peer of eth0 with TCX programs on
//! it; TCP through a ClusterIP reaches the pod's backend (through bandwidth's
//! ingress qdisc + ifb when bandwidth is in the chain); CHECK passes (0.4.0+)
//! or is refused by the runner (0.3.x); DEL, DEL again, containerd's DEL
//! without netns/prevResult all succeed and leave no endpoint and no pins.
//!
//! Also: a Multus-style second network on `net1` (scoped GC), and "catena
//! never touches the primary's addresses, routes or rules".

use catena_api::{Endpoint, Status};
use catena_e2e::{dir_entries, pod_yaml, service_yaml, write_manifest};
use catena_lab::{
    cni_1_1_shims, tcx_program_counts, CallArgs, CniError, CniRunner, Conflist, GcAttachment,
    Netns, Node, Pod,
};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::time::Duration;

const VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
const SUBNET: &str = "10.244.0.0/24";

#[derive(Clone, Copy, Debug)]
enum Primary {
    Ptp,
    Bridge,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Layout {
    /// primary, catena
    Alone,
    /// primary, tuning, catena, portmap, bandwidth
    Middle,
    /// primary, tuning, portmap, bandwidth, catena
    Last,
}

fn vtag(v: &str) -> String {
    format!("v{}", v.replace('.', ""))
}

fn vip(i: usize) -> SocketAddr {
    format!("10.96.0.{}:80", 10 + i).parse().unwrap()
}

fn conflist(node: &Node, primary: Primary, layout: Layout, version: &str) -> Conflist {
    let tuning = json!({"type": "tuning", "sysctl": {"net.core.somaxconn": "1024"}});
    let portmap = json!({"type": "portmap", "capabilities": {"portMappings": true}});
    let bandwidth = json!({"type": "bandwidth", "capabilities": {"bandwidth": true}});
    let catena = node.catena_plugin();
    let after = match layout {
        Layout::Alone => vec![catena],
        Layout::Middle => vec![tuning, catena, portmap, bandwidth],
        Layout::Last => vec![tuning, portmap, bandwidth, catena],
    };
    match primary {
        Primary::Ptp => node.ptp_conflist("matrix", SUBNET, version, after),
        Primary::Bridge => node.bridge_conflist("matrix", "cni0", SUBNET, version, after),
    }
    .expect("valid conflist")
}

/// A recording runner; 1.1.0 conflists go through the 1.1 shims of the
/// reference plugins (see `catena_lab::cni_1_1_shims`).
fn runner(node: &Node, conf: Conflist) -> anyhow::Result<CniRunner<'_>> {
    let v11 = conf.cni_version == "1.1.0";
    let r = CniRunner::new(node, conf).with_io_recording();
    Ok(if v11 {
        r.with_cni_path(cni_1_1_shims(&node.dir().join("cni-1.1-shims"))?)
    } else {
        r
    })
}

fn add_args(layout: Layout, host_port: u16) -> CallArgs {
    let args = CallArgs::default();
    if layout == Layout::Alone {
        return args;
    }
    args.with_capability(
        "portMappings",
        json!([{"hostPort": host_port, "containerPort": 8080, "protocol": "tcp"}]),
    )
    .with_capability(
        "bandwidth",
        json!({"ingressRate": 1_000_000_000u64, "ingressBurst": 100_000_000u64,
               "egressRate": 1_000_000_000u64, "egressBurst": 100_000_000u64}),
    )
}

fn endpoints(api: &catena_api::Client) -> anyhow::Result<Vec<Endpoint>> {
    Ok(api.get("/v1/endpoints")?)
}

fn endpoint_of(eps: &[Endpoint], pod: &Pod, ifname: &str) -> Option<Endpoint> {
    eps.iter()
        .find(|e| e.spec.container_id == pod.container_id && e.spec.ifname == ifname)
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

fn link_pins(node: &Node) -> Vec<String> {
    dir_entries(&node.bpffs_dir().join("links"))
}

/// Packets the ifb device sent (bandwidth's egress shaping path).
fn tx_packets(node: &Node, dev: &str) -> anyhow::Result<u64> {
    let out = node
        .netns()
        .run("ip", &["-j", "-s", "link", "show", "dev", dev])?;
    let v: Value = serde_json::from_str(&out)?;
    v[0]["stats64"]["tx"]["packets"]
        .as_u64()
        .ok_or_else(|| anyhow::anyhow!("no tx stats for {dev}: {out}"))
}

/// The endpoint of `pod` is registered on the real host peer of eth0 and
/// the kernel shows one catena program at each TCX hook of that veth.
fn assert_registered(
    node: &Node,
    api: &catena_api::Client,
    pod: &Pod,
    ctx: &str,
) -> anyhow::Result<Endpoint> {
    let eps = endpoints(api)?;
    let ep = endpoint_of(&eps, pod, "eth0")
        .ok_or_else(|| anyhow::anyhow!("{ctx}: {} not registered: {eps:?}", pod.name))?;
    let veth = pod.host_veth(node, "eth0")?;
    assert_eq!(ep.spec.host_ifname, veth, "{ctx}");
    assert_eq!(ep.spec.host_ifindex, ifindex(node.netns(), &veth)?, "{ctx}");
    assert_eq!(ep.spec.network, "matrix", "{ctx}");
    assert_eq!(ep.spec.pod.name, pod.name, "{ctx}");
    assert_eq!(ep.spec.ips, vec![format!("{}/24", pod.ipv4()?)], "{ctx}");
    assert_eq!(ep.attach_mode, "tcx", "{ctx}");
    assert_eq!(tcx_program_counts(node.netns(), &veth)?, (1, 1), "{ctx}");
    Ok(ep)
}

fn run_combination(primary: Primary, layout: Layout) -> anyhow::Result<()> {
    let node = Node::new(&format!("mx-{primary:?}-{layout:?}"))?;
    let manifests = node.dir().join("manifests");
    for (i, v) in VERSIONS.iter().enumerate() {
        let t = vtag(v);
        write_manifest(
            &manifests,
            &format!("{t}.yaml"),
            &format!(
                "{}---\n{}",
                service_yaml(
                    &format!("web-{t}"),
                    &vip(i).ip().to_string(),
                    80,
                    8080,
                    Some(&format!("web-{t}"))
                ),
                pod_yaml(&format!("web-{t}"), &format!("web-{t}"))
            ),
        )?;
    }
    let agent = node.start_agent(&manifests, &[])?;
    let api = agent.client();
    let mut host_port = 30000;

    for (i, version) in VERSIONS.iter().enumerate() {
        let ctx = format!("{primary:?}/{layout:?}/{version}");
        let t = vtag(version);
        let cni = runner(&node, conflist(&node, primary, layout, version))?;
        let client = node.pod(&format!("cli-{t}"))?;
        let web = node.pod(&format!("web-{t}"))?;
        for pod in [&client, &web] {
            host_port += 1;
            cni.add(pod, "eth0", &add_args(layout, host_port))
                .map_err(|e| anyhow::anyhow!("{ctx}: ADD {}: {e}", pod.name))?;
        }

        // catena printed exactly what it was given, for both pods.
        let calls = cni.calls();
        let catena_adds: Vec<_> = calls
            .iter()
            .filter(|c| c.plugin == "catena-cni" && c.command == "ADD")
            .collect();
        assert_eq!(catena_adds.len(), 2, "{ctx}");
        for c in &catena_adds {
            c.check_passes_prev_result()
                .map_err(|e| anyhow::anyhow!("{ctx}: {e:#}"))?;
            let stdin: Value = serde_json::from_slice(&c.stdin)?;
            assert_eq!(stdin["cniVersion"], *version, "{ctx}");
            assert_eq!(stdin["prevResult"]["cniVersion"], *version, "{ctx}");
        }
        // With catena last, its output is the chain's final result.
        if layout != Layout::Middle {
            let last: Value = serde_json::from_slice(&catena_adds[1].stdout)?;
            assert_eq!(web.result().unwrap().raw, last, "{ctx}");
        }

        let web_ep = assert_registered(&node, &api, &web, &ctx)?;
        assert_registered(&node, &api, &client, &ctx)?;
        let web_veth = web_ep.spec.host_ifname.clone();

        // Traffic through this version's ClusterIP reaches this version's backend.
        let _srv = web.serve_tcp(8080, &format!("web-{t}"))?;
        let ifb = web
            .result()
            .unwrap()
            .host_interfaces()
            .map(|i| i.name.clone())
            .find(|n| n.starts_with("bwp"));
        if layout != Layout::Alone {
            // bandwidth really is in the path: an ingress qdisc on the very
            // veth catena's TCX programs sit on, redirecting to its ifb.
            let qdiscs = node
                .netns()
                .run("tc", &["-j", "qdisc", "show", "dev", &web_veth])?;
            let qdiscs: Value = serde_json::from_str(&qdiscs)?;
            assert!(
                qdiscs
                    .as_array()
                    .is_some_and(|a| a.iter().any(|q| q["kind"] == "ingress")),
                "{ctx}: no ingress qdisc on {web_veth}: {qdiscs}"
            );
            assert!(ifb.is_some(), "{ctx}: bandwidth reported no ifb device");
        }
        let ifb_before = match &ifb {
            Some(dev) => tx_packets(&node, dev)?,
            None => 0,
        };
        for _ in 0..5 {
            let reply = client
                .tcp_request(vip(i), Duration::from_secs(3))
                .map_err(|e| anyhow::anyhow!("{ctx}: request to {}: {e:#}", vip(i)))?;
            assert_eq!(reply.text, format!("web-{t}"), "{ctx}");
            assert_eq!(reply.peer, vip(i), "{ctx}: reply not reverse-NATed");
        }
        if let Some(dev) = &ifb {
            // The replies left web through its veth's ingress: bandwidth's
            // redirect to the ifb still ran after catena's TCX program.
            let after = tx_packets(&node, dev)?;
            assert!(
                after >= ifb_before + 5,
                "{ctx}: {dev} sent {ifb_before} -> {after} packets"
            );
        }

        // CHECK: 0.4.0+ through the whole chain; 0.3.x refused before any plugin runs.
        let checks_before = cni.calls().iter().filter(|c| c.command == "CHECK").count();
        // portmap 1.1.1's CHECK looks for ip6tables chains it never made for
        // an IPv4-only pod and fails (containernetworking/plugins#819, fixed
        // upstream later); it skips its check when the runtime config has no
        // port mappings, so CHECK sends only the bandwidth capability.
        let check_args = match layout {
            Layout::Alone => CallArgs::default(),
            _ => {
                let mut a = add_args(layout, 0);
                a.capability_args.remove("portMappings");
                a
            }
        };
        for pod in [&client, &web] {
            match cni.check(pod, "eth0", &check_args) {
                Ok(()) => assert!(version >= &"0.4.0", "{ctx}: CHECK accepted"),
                Err(CniError::Invalid(msg)) if version < &"0.4.0" => {
                    assert!(msg.contains("CHECK"), "{ctx}: {msg}")
                }
                Err(e) => panic!("{ctx}: CHECK {}: {e}", pod.name),
            }
        }
        let checks = cni.calls().iter().filter(|c| c.command == "CHECK").count() - checks_before;
        let plugins = cni.conflist().plugins.len();
        assert_eq!(
            checks,
            if version >= &"0.4.0" { 2 * plugins } else { 0 },
            "{ctx}"
        );

        // DEL, DEL again (no prevResult: libcni forgot it), containerd's DEL
        // without netns and prevResult: all succeed, nothing is left.
        for pod in [&web, &client] {
            let ep = endpoint_of(&endpoints(&api)?, pod, "eth0").expect("registered");
            cni.del(pod, "eth0", &CallArgs::default())
                .map_err(|e| anyhow::anyhow!("{ctx}: DEL {}: {e}", pod.name))?;
            assert!(
                endpoint_of(&endpoints(&api)?, pod, "eth0").is_none(),
                "{ctx}: endpoint left after DEL"
            );
            let prefix = format!("{}-", ep.spec.host_ifindex);
            assert!(
                !link_pins(&node).iter().any(|p| p.starts_with(&prefix)),
                "{ctx}: pins of {} left: {:?}",
                pod.name,
                link_pins(&node)
            );
            cni.del(pod, "eth0", &CallArgs::default())
                .map_err(|e| anyhow::anyhow!("{ctx}: second DEL {}: {e}", pod.name))?;
            cni.del(pod, "eth0", &CallArgs::containerd_repeat_del())
                .map_err(|e| anyhow::anyhow!("{ctx}: repeat DEL {}: {e}", pod.name))?;
        }
        let catena_dels = cni
            .calls()
            .iter()
            .filter(|c| c.plugin == "catena-cni" && c.command == "DEL")
            .map(|c| c.success)
            .collect::<Vec<_>>();
        assert_eq!(catena_dels, vec![true; 6], "{ctx}");
        assert!(endpoints(&api)?.is_empty(), "{ctx}");
        assert!(link_pins(&node).is_empty(), "{ctx}: {:?}", link_pins(&node));
        assert!(
            dir_entries(&node.state_dir().join("endpoints")).is_empty(),
            "{ctx}"
        );
    }
    let status: Status = api.get("/v1/status")?;
    assert!(
        status.datapath.counters.get("service_dnat").copied() >= Some(25),
        "{status:?}"
    );
    Ok(())
}

#[test]
fn ptp_then_catena() -> anyhow::Result<()> {
    run_combination(Primary::Ptp, Layout::Alone)
}

#[test]
fn ptp_tuning_catena_portmap_bandwidth() -> anyhow::Result<()> {
    run_combination(Primary::Ptp, Layout::Middle)
}

#[test]
fn ptp_tuning_portmap_bandwidth_catena() -> anyhow::Result<()> {
    run_combination(Primary::Ptp, Layout::Last)
}

#[test]
fn bridge_then_catena() -> anyhow::Result<()> {
    run_combination(Primary::Bridge, Layout::Alone)
}

#[test]
fn bridge_tuning_catena_portmap_bandwidth() -> anyhow::Result<()> {
    run_combination(Primary::Bridge, Layout::Middle)
}

#[test]
fn bridge_tuning_portmap_bandwidth_catena() -> anyhow::Result<()> {
    run_combination(Primary::Bridge, Layout::Last)
}

/// A pod on two catena networks (Multus style): ptp on eth0 (network A,
/// 1.1.0) and bridge on net1 (network B, another subnet). Each interface is
/// its own endpoint; DEL of one leaves the other; GC of A never touches B.
#[test]
fn second_network_on_net1_is_separate_and_survives_gc_of_the_first() -> anyhow::Result<()> {
    let node = Node::new("mx-multus")?;
    let manifests = node.dir().join("manifests");
    std::fs::create_dir_all(&manifests)?;
    let agent = node.start_agent(&manifests, &[])?;
    let api = agent.client();
    let net_a = runner(
        &node,
        node.ptp_conflist(
            "net-a",
            "10.244.0.0/24",
            "1.1.0",
            vec![node.catena_plugin()],
        )?,
    )?;
    // No default route on net1: the pod's eth0 has it (lab conflists add one).
    let net_b = runner(
        &node,
        Conflist::from_value(json!({
            "cniVersion": "1.0.0",
            "name": "net-b",
            "plugins": [
                {"type": "bridge", "bridge": "br-b", "isGateway": true, "ipMasq": false,
                 "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.245.0.0/24"}]],
                          "dataDir": node.ipam_dir()}},
                node.catena_plugin(),
            ],
        }))?,
    )?;
    let pod = node.pod("multi")?;
    let other = node.pod("other")?;
    net_a.add(&pod, "eth0", &CallArgs::default())?;
    net_b.add(&pod, "net1", &CallArgs::default())?;
    net_a.add(&other, "eth0", &CallArgs::default())?;
    for c in net_a.calls().iter().chain(net_b.calls().iter()) {
        if c.plugin == "catena-cni" && c.command == "ADD" {
            c.check_passes_prev_result()?;
        }
    }

    let eps = endpoints(&api)?;
    assert_eq!(eps.len(), 3, "{eps:?}");
    let eth0 = endpoint_of(&eps, &pod, "eth0").expect("eth0 registered");
    let net1 = endpoint_of(&eps, &pod, "net1").expect("net1 registered");
    assert_eq!(
        (eth0.spec.network.as_str(), net1.spec.network.as_str()),
        ("net-a", "net-b")
    );
    assert_eq!(eth0.spec.host_ifname, pod.host_veth(&node, "eth0")?);
    assert_eq!(net1.spec.host_ifname, pod.host_veth(&node, "net1")?);
    assert_ne!(eth0.spec.host_ifindex, net1.spec.host_ifindex);
    assert_ne!(eth0.id, net1.id);
    assert!(eth0.spec.ips[0].starts_with("10.244.0."), "{eth0:?}");
    assert!(net1.spec.ips[0].starts_with("10.245.0."), "{net1:?}");
    for ifname in ["eth0", "net1"] {
        let veth = pod.host_veth(&node, ifname)?;
        assert_eq!(tcx_program_counts(node.netns(), &veth)?, (1, 1), "{ifname}");
    }

    // GC of network A listing only the pod's eth0: libcni's DEL of cached
    // attachments would remove `other` itself, so drop its cache entry first
    // (as after a runtime restart that lost it): then only catena's GC, scoped
    // to net-a, can remove it. net1 is not listed either, but belongs to net-b.
    let cache = node
        .cni_cache_dir()
        .join("results")
        .join(format!("net-a-{}-eth0", other.container_id));
    std::fs::remove_file(&cache)?;
    net_a.gc(&[GcAttachment {
        container_id: pod.container_id.clone(),
        ifname: "eth0".into(),
    }])?;
    let gcs: Vec<_> = net_a
        .calls()
        .into_iter()
        .filter(|c| c.plugin == "catena-cni" && c.command == "GC")
        .collect();
    assert_eq!(gcs.len(), 1);
    assert!(gcs[0].success);
    let eps = endpoints(&api)?;
    assert!(
        endpoint_of(&eps, &other, "eth0").is_none(),
        "GC missed {eps:?}"
    );
    assert!(endpoint_of(&eps, &pod, "eth0").is_some(), "{eps:?}");
    assert_eq!(
        endpoint_of(&eps, &pod, "net1"),
        Some(net1.clone()),
        "GC of net-a touched net-b"
    );

    // DEL of net1 leaves eth0 (and the reverse).
    net_b.del(&pod, "net1", &CallArgs::default())?;
    let eps = endpoints(&api)?;
    assert!(endpoint_of(&eps, &pod, "net1").is_none());
    assert_eq!(endpoint_of(&eps, &pod, "eth0"), Some(eth0.clone()));
    assert_eq!(
        tcx_program_counts(node.netns(), &pod.host_veth(&node, "eth0")?)?,
        (1, 1)
    );
    net_a.del(&pod, "eth0", &CallArgs::default())?;
    // `other` lost its cache entry: DEL without prevResult, like a runtime would.
    net_a.del(&other, "eth0", &CallArgs::default())?;
    assert!(endpoints(&api)?.is_empty());
    assert!(link_pins(&node).is_empty(), "{:?}", link_pins(&node));
    Ok(())
}

fn snapshots(node: &Node, pod: &Pod) -> anyhow::Result<Value> {
    Ok(json!({"node": net_snapshot(node.netns())?, "pod": net_snapshot(pod.netns())?}))
}

/// Snapshots once the kernel has finished what the primary started: IPv6
/// link-local addresses leave DAD (and get their local route) on a timer of
/// their own. Waits for no tentative address and two equal snapshots 200 ms
/// apart, within 10 s.
fn settled_snapshots(node: &Node, pod: &Pod) -> anyhow::Result<Value> {
    let mut last = snapshots(node, pod)?;
    for _ in 0..50 {
        std::thread::sleep(Duration::from_millis(200));
        let now = snapshots(node, pod)?;
        if now == last && !now.to_string().contains("tentative") {
            return Ok(now);
        }
        last = now;
    }
    anyhow::bail!("the network kept changing for 10 s: {last}")
}

/// `ip -j addr`, `ip -j route show table all`, `ip -j rule` of a namespace.
fn net_snapshot(ns: &Netns) -> anyhow::Result<Value> {
    let mut out = serde_json::Map::new();
    for (key, args) in [
        ("addr", &["-j", "addr", "show"][..]),
        ("route", &["-j", "route", "show", "table", "all"][..]),
        ("rule", &["-j", "rule", "show"][..]),
    ] {
        out.insert(key.into(), serde_json::from_str(&ns.run("ip", args)?)?);
    }
    Ok(Value::Object(out))
}

/// catena run by hand after the primary, with the primary's result as
/// prevResult: the node's and the pod's addresses, routes and rules are the
/// same before and after its ADD (and its DEL), for both primaries.
#[test]
fn catena_never_changes_addresses_routes_or_rules() -> anyhow::Result<()> {
    let node = Node::new("mx-untouched")?;
    let manifests = node.dir().join("manifests");
    std::fs::create_dir_all(&manifests)?;
    let agent = node.start_agent(&manifests, &[])?;
    let api = agent.client();
    for (i, primary) in [Primary::Ptp, Primary::Bridge].into_iter().enumerate() {
        let conf = match primary {
            Primary::Ptp => node.ptp_conflist("plain", "10.244.0.0/24", "1.0.0", vec![])?,
            Primary::Bridge => {
                node.bridge_conflist("plain-br", "cni0", "10.245.0.0/24", "1.0.0", vec![])?
            }
        };
        let name = conf.name.clone();
        let cni = CniRunner::new(&node, conf);
        let pod = node.pod(&format!("untouched-{i}"))?;
        let result = cni.add(&pod, "eth0", &CallArgs::default())?;
        let before = settled_snapshots(&node, &pod)?;
        assert!(
            before["pod"]["addr"]
                .to_string()
                .contains(&pod.ipv4()?.to_string()),
            "the snapshot sees the primary's work: {before}"
        );

        let mut conf = node.catena_plugin();
        conf["name"] = json!(name);
        conf["cniVersion"] = json!("1.0.0");
        conf["prevResult"] = result.raw.clone();
        let stdin = serde_json::to_vec(&conf)?;
        let netns = pod.netns_path().display().to_string();
        let cni_args = pod.cni_args();
        let env = [
            ("CNI_CONTAINERID", pod.container_id.as_str()),
            ("CNI_NETNS", netns.as_str()),
            ("CNI_IFNAME", "eth0"),
            ("CNI_ARGS", cni_args.as_str()),
        ];
        let out = cni.exec_plugin_raw("catena-cni", "ADD", &env, &stdin)?;
        assert!(out.status.success(), "{primary:?}: {}", out.stderr);
        assert_eq!(out.stdout, serde_json::to_vec(&result.raw)?, "{primary:?}");
        let ep = endpoint_of(&endpoints(&api)?, &pod, "eth0").expect("registered");
        assert_eq!(ep.spec.host_ifname, pod.host_veth(&node, "eth0")?);
        let after_add = snapshots(&node, &pod)?;
        assert_eq!(
            before, after_add,
            "{primary:?}: catena ADD changed the network"
        );

        let out = cni.exec_plugin_raw("catena-cni", "DEL", &env, &stdin)?;
        assert!(out.status.success(), "{primary:?}: {}", out.stderr);
        assert!(endpoint_of(&endpoints(&api)?, &pod, "eth0").is_none());
        assert_eq!(
            before,
            snapshots(&node, &pod)?,
            "{primary:?}: catena DEL changed the network"
        );
        cni.del(&pod, "eth0", &CallArgs::default())?;
    }
    assert!(link_pins(&node).is_empty(), "{:?}", link_pins(&node));
    Ok(())
}
