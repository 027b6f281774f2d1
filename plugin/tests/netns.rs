//! Veth discovery and the ADD/CHECK/DEL paths that need real interfaces. Every
//! test builds its own "node" and "pod" namespaces (nothing touches the
//! machine's own), wired like a primary plugin would leave them.

mod common;

use catena_cni::veth::{find_host_veth, VethError};
use common::*;
use serde_json::json;
use std::time::Duration;

const CID: &str = "9b1d2c3e4f5a";

/// node: hveth0<->pod:eth0, hveth1<->pod:net1 (a Multus second network),
/// plus the decoys a "first veth" guess would pick: a bridge, a veth pair
/// wholly in the node, and a bridged veth to another pod whose inside is
/// also named eth0.
struct Topology {
    node: NetNs,
    pod: NetNs,
    _other: NetNs,
}

impl Topology {
    fn new() -> Self {
        let (node, pod, other) = (NetNs::new(), NetNs::new(), NetNs::new());
        node.ip(&["link", "add", "br0", "type", "bridge"]);
        node.ip(&[
            "link", "add", "decoy0", "type", "veth", "peer", "name", "decoy1",
        ]);
        node.ip(&[
            "link",
            "add",
            "hother",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &other.name,
        ]);
        node.ip(&["link", "set", "hother", "master", "br0"]);
        node.ip(&[
            "link", "add", "hveth0", "type", "veth", "peer", "name", "eth0", "netns", &pod.name,
        ]);
        node.ip(&[
            "link", "add", "hveth1", "type", "veth", "peer", "name", "net1", "netns", &pod.name,
        ]);
        Topology {
            node,
            pod,
            _other: other,
        }
    }
}

fn add_env<'a>(cmd: &'a str, netns: &'a str, ifname: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("CNI_COMMAND", cmd),
        ("CNI_CONTAINERID", CID),
        ("CNI_NETNS", netns),
        ("CNI_IFNAME", ifname),
        ("CNI_PATH", "/opt/cni/bin"),
        (
            "CNI_ARGS",
            "K8S_POD_NAME=web-0;K8S_POD_NAMESPACE=shop;K8S_POD_INFRA_CONTAINER_ID=9b1d2c3e4f5a;K8S_POD_UID=4c2e-77;IgnoreUnknown=1",
        ),
    ]
}

#[test]
fn discovery_finds_the_peer_of_the_named_interface() {
    let t = Topology::new();
    let path = t.pod.path();
    let (eth0, net1) = t
        .node
        .run(|| (find_host_veth(&path, "eth0"), find_host_veth(&path, "net1")));
    let eth0 = eth0.unwrap();
    assert_eq!(
        (eth0.name.as_str(), eth0.index),
        ("hveth0", t.node.ifindex("hveth0"))
    );
    assert_eq!(eth0.pod_index, t.pod.ifindex("eth0"));
    let net1 = net1.unwrap();
    assert_eq!(
        (net1.name.as_str(), net1.index),
        ("hveth1", t.node.ifindex("hveth1"))
    );
}

#[test]
fn discovery_refuses_what_is_not_a_node_veth() {
    let t = Topology::new();
    // (no dummy driver in this kernel; a bridge is just as much "not a veth")
    t.pod.ip(&["link", "add", "dummy0", "type", "bridge"]);
    t.pod
        .ip(&["link", "add", "in0", "type", "veth", "peer", "name", "in1"]);
    let path = t.pod.path();
    let results = t.node.run(|| {
        ["dummy0", "in0", "nope0"].map(|i| find_host_veth(&path, i).map_err(|e| e.to_string()))
    });
    let [dummy, inner, missing] = results;
    assert!(dummy.unwrap_err().contains("not a veth"));
    assert!(inner.unwrap_err().contains("in the pod namespace too"));
    assert!(missing.unwrap_err().contains("no interface \"nope0\""));
}

#[test]
fn an_ifindex_collision_in_the_node_is_not_mistaken_for_the_peer() {
    // The pod's eth0 pairs with ifindex 4242 in a third namespace; the node
    // happens to have a veth with ifindex 4242 too.
    let (node, pod, elsewhere) = (NetNs::new(), NetNs::new(), NetNs::new());
    elsewhere.ip(&[
        "link", "add", "name", "far0", "index", "4242", "type", "veth", "peer", "name", "eth0",
        "netns", &pod.name,
    ]);
    node.ip(&[
        "link", "add", "name", "coll0", "index", "4242", "type", "veth", "peer", "name", "coll1",
    ]);
    let path = pod.path();
    let err = node.run(|| find_host_veth(&path, "eth0")).unwrap_err();
    assert!(matches!(err, VethError::PeerElsewhere { .. }), "{err}");
    // From the namespace that does hold the peer, it is found.
    let found = elsewhere.run(|| find_host_veth(&path, "eth0")).unwrap();
    assert_eq!((found.name.as_str(), found.index), ("far0", 4242));
}

#[test]
fn add_registers_the_endpoint_and_echoes_prev_result() {
    let t = Topology::new();
    let agent = FakeAgent::healthy();
    let state = tempfile::tempdir().unwrap();
    let ns = t.pod.path();
    // Bridge-style result listing the bridge first, with odd spacing that must
    // survive byte for byte, in a 0.3.1 chain (ips[].version present).
    let prev = format!(
        r#"{{ "cniVersion": "0.3.1", "interfaces": [{{"name":"br0"}}, {{"name":"hveth0"}}, {{"name":"eth0","sandbox":"{}"}}],
            "ips": [ {{"version":"4","interface":2,"address":"10.22.0.9/16","gateway":"10.22.0.1"}} ], "dns": {{}} }}"#,
        ns.display()
    );
    let conf = chained_conf("0.3.1", &agent.socket(), state.path(), &prev);
    let r = run_plugin(
        &add_env("ADD", ns.to_str().unwrap(), "eth0"),
        &conf,
        Some(&t.node),
    );
    assert_eq!(r.code, 0, "stdout {} stderr {}", r.stdout, r.stderr);
    assert_eq!(r.stdout, prev, "ADD must output prevResult unchanged");

    let reqs = registrations(&agent);
    assert_eq!(reqs.len(), 1);
    assert_eq!(
        (reqs[0].method.as_str(), reqs[0].path.as_str()),
        ("PUT", &*format!("/v1/endpoints/{CID}/eth0"))
    );
    assert_eq!(
        reqs[0].json(),
        json!({
            "network": "catena",
            "containerId": CID, "ifname": "eth0", "netns": ns.to_str().unwrap(),
            "hostIfname": "hveth0", "hostIfindex": t.node.ifindex("hveth0"),
            "ips": ["10.22.0.9/16"],
            "pod": {"namespace": "shop", "name": "web-0", "uid": "4c2e-77"},
            "labels": {}
        })
    );
}

#[test]
fn add_on_a_second_interface_registers_that_interface() {
    let t = Topology::new();
    let agent = FakeAgent::healthy();
    let state = tempfile::tempdir().unwrap();
    let ns = t.pod.path();
    let prev = format!(
        r#"{{"cniVersion":"1.0.0","interfaces":[{{"name":"hveth1"}},{{"name":"net1","sandbox":"{}"}},{{"name":"bwp0"}}],"ips":[{{"interface":1,"address":"192.168.7.2/24"}}]}}"#,
        ns.display()
    );
    let conf = chained_conf("1.0.0", &agent.socket(), state.path(), &prev);
    let r = run_plugin(
        &add_env("ADD", ns.to_str().unwrap(), "net1"),
        &conf,
        Some(&t.node),
    );
    assert_eq!(r.code, 0, "{} {}", r.stdout, r.stderr);
    let put = &registrations(&agent)[0];
    assert_eq!(put.path, format!("/v1/endpoints/{CID}/net1"));
    assert_eq!(put.json()["hostIfname"], "hveth1");
    assert_eq!(put.json()["ips"], json!(["192.168.7.2/24"]));
}

#[test]
fn add_fails_fast_with_code_11_when_the_agent_is_down_or_not_ready() {
    let t = Topology::new();
    let state = tempfile::tempdir().unwrap();
    let ns = t.pod.path();
    let down = state.path().join("agent.sock");
    let conf = chained_conf("1.0.0", &down, state.path(), &ptp_result(&ns));
    let r = run_plugin(
        &add_env("ADD", ns.to_str().unwrap(), "eth0"),
        &conf,
        Some(&t.node),
    );
    let e = r.error();
    assert_eq!(e["code"], 11);
    let msg = e["msg"].as_str().unwrap();
    assert!(
        msg.contains("start catena-agent") && msg.contains(down.to_str().unwrap()),
        "{msg}"
    );
    assert!(r.elapsed < Duration::from_secs(1), "took {:?}", r.elapsed);

    let starting = FakeAgent::start(|_| {
        Reply::json(
            503,
            json!({"message": "datapath loading", "retryable": true}),
        )
    });
    let conf = chained_conf("1.0.0", &starting.socket(), state.path(), &ptp_result(&ns));
    let r = run_plugin(
        &add_env("ADD", ns.to_str().unwrap(), "eth0"),
        &conf,
        Some(&t.node),
    );
    let e = r.error();
    assert_eq!(e["code"], 11);
    assert!(
        e["details"].as_str().unwrap().contains("datapath loading"),
        "{e}"
    );
    assert!(r.elapsed < Duration::from_secs(1), "took {:?}", r.elapsed);
    // The PUT was refused; there is nothing to withdraw.
    assert_eq!(
        starting
            .requests()
            .iter()
            .filter(|r| r.method == "DELETE")
            .count(),
        0
    );

    let refusing = FakeAgent::start(|_| Reply::json(400, json!({"message": "bad ip"})));
    let conf = chained_conf("1.0.0", &refusing.socket(), state.path(), &ptp_result(&ns));
    let r = run_plugin(
        &add_env("ADD", ns.to_str().unwrap(), "eth0"),
        &conf,
        Some(&t.node),
    );
    assert_eq!(r.error_code(), 101);
}

#[test]
fn add_withdraws_a_registration_the_agent_did_not_answer() {
    let t = Topology::new();
    let hung = FakeAgent::start(|r| match r.method.as_str() {
        "PUT" => Reply {
            delay: Duration::from_secs(3),
            ..standard_reply(r)
        },
        _ => standard_reply(r),
    });
    let state = tempfile::tempdir().unwrap();
    let ns = t.pod.path();
    let conf = chained_conf("1.0.0", &hung.socket(), state.path(), &ptp_result(&ns)).replacen(
        r#""type":"catena-cni""#,
        r#""type":"catena-cni","agentTimeoutMs":500"#,
        1,
    );
    let r = run_plugin(
        &add_env("ADD", ns.to_str().unwrap(), "eth0"),
        &conf,
        Some(&t.node),
    );
    assert_eq!(r.error_code(), 11);
    assert!(r.elapsed < Duration::from_secs(1), "took {:?}", r.elapsed);
    let methods: Vec<_> = hung.requests().iter().map(|r| r.method.clone()).collect();
    assert_eq!(
        methods,
        ["GET", "PUT", "DELETE"],
        "probe, registration, withdrawal"
    );
}

#[test]
fn check_compares_the_agent_record_with_the_veth_found_now() {
    let t = Topology::new();
    let ns = t.pod.path();
    let hveth0 = t.node.ifindex("hveth0");
    let record = move |ifindex: u32| {
        move |r: &Request| match r.path.as_str() {
            p if p.ends_with("/check") => Reply::json(200, json!({"ok": true, "problems": []})),
            _ => Reply::json(
                200,
                json!({"id": 7, "identity": 1001, "attachMode": "tcx", "created": "x",
                "spec": {"containerId": CID, "ifname": "eth0", "netns": "", "hostIfname": "hveth0",
                         "hostIfindex": ifindex, "ips": ["10.99.0.5/24"]}}),
            ),
        }
    };
    let state = tempfile::tempdir().unwrap();
    let good = FakeAgent::start(record(hveth0));
    let conf = chained_conf("0.4.0", &good.socket(), state.path(), &ptp_result(&ns));
    let r = run_plugin(
        &add_env("CHECK", ns.to_str().unwrap(), "eth0"),
        &conf,
        Some(&t.node),
    );
    assert_eq!((r.code, r.stdout.as_str()), (0, ""), "{}", r.stderr);

    let stale = FakeAgent::start(record(hveth0 + 1000));
    let conf = chained_conf("1.0.0", &stale.socket(), state.path(), &ptp_result(&ns));
    let r = run_plugin(
        &add_env("CHECK", ns.to_str().unwrap(), "eth0"),
        &conf,
        Some(&t.node),
    );
    let e = r.error();
    assert_eq!(e["code"], 102);
    assert!(
        e["msg"]
            .as_str()
            .unwrap()
            .contains(&format!("ifindex {}", hveth0 + 1000)),
        "{e}"
    );

    let broken = FakeAgent::start(|r: &Request| match r.path.as_str() {
        p if p.ends_with("/check") => Reply::json(
            200,
            json!({"ok": false, "problems": ["ingress program not attached"]}),
        ),
        _ => Reply::json(404, json!({"message": "no such endpoint"})),
    });
    let conf = chained_conf("1.0.0", &broken.socket(), state.path(), &ptp_result(&ns));
    let r = run_plugin(
        &add_env("CHECK", ns.to_str().unwrap(), "eth0"),
        &conf,
        Some(&t.node),
    );
    let e = r.error();
    assert_eq!(e["code"], 102);
    assert!(e["msg"].as_str().unwrap().contains("not registered"), "{e}");
}

#[test]
fn del_with_agent_down_records_the_host_ifindex() {
    let t = Topology::new();
    let state = tempfile::tempdir().unwrap();
    let ns = t.pod.path();
    let conf = chained_conf(
        "1.0.0",
        &state.path().join("down.sock"),
        state.path(),
        &ptp_result(&ns),
    );
    let r = run_plugin(
        &add_env("DEL", ns.to_str().unwrap(), "eth0"),
        &conf,
        Some(&t.node),
    );
    assert_eq!((r.code, r.stdout.as_str()), (0, ""), "{}", r.stderr);
    let q: catena_api::QueuedDelete = serde_json::from_slice(
        &std::fs::read(state.path().join(format!("del-queue/{CID}_eth0.json"))).unwrap(),
    )
    .unwrap();
    assert_eq!(q.host_ifindex, Some(t.node.ifindex("hveth0")));
}

/// Latency of ADD alone (veth discovery + PUT to a fake agent), release build
/// recommended: `cargo test -p catena-cni --release --test netns -- --ignored --nocapture`.
#[test]
#[ignore]
fn add_latency() {
    let t = Topology::new();
    let agent = FakeAgent::healthy();
    let state = tempfile::tempdir().unwrap();
    let ns = t.pod.path();
    let conf = chained_conf("1.0.0", &agent.socket(), state.path(), &ptp_result(&ns));
    let env = add_env("ADD", ns.to_str().unwrap(), "eth0");
    let mut times: Vec<Duration> = (0..100)
        .map(|_| {
            let r = run_plugin(&env, &conf, Some(&t.node));
            assert_eq!(r.code, 0, "{}", r.stdout);
            r.elapsed
        })
        .collect();
    times.sort();
    // Baseline: spawning the binary for VERSION, which does no I/O at all.
    let mut spawn: Vec<Duration> = (0..100)
        .map(|_| run_plugin(&[("CNI_COMMAND", "VERSION")], "", Some(&t.node)).elapsed)
        .collect();
    spawn.sort();
    eprintln!(
        "ADD over 100 runs: p50 {:?}, p90 {:?}, max {:?}; VERSION (spawn baseline) p50 {:?}",
        times[50], times[90], times[99], spawn[50]
    );
    assert!(times[50] < Duration::from_millis(50));
}

/// The requests of a fake agent other than ADD's readiness probe.
fn registrations(agent: &FakeAgent) -> Vec<Request> {
    agent
        .requests()
        .into_iter()
        .filter(|r| r.path != "/v1/healthz")
        .collect()
}

#[test]
fn add_fails_fast_on_a_hung_agent_without_registering() {
    let t = Topology::new();
    // Accepts connections, never answers: down for all practical purposes.
    let hung = FakeAgent::start(|r| Reply {
        delay: Duration::from_secs(5),
        ..standard_reply(r)
    });
    let state = tempfile::tempdir().unwrap();
    let ns = t.pod.path();
    let conf = chained_conf("1.0.0", &hung.socket(), state.path(), &ptp_result(&ns));
    let r = run_plugin(
        &add_env("ADD", ns.to_str().unwrap(), "eth0"),
        &conf,
        Some(&t.node),
    );
    assert_eq!(r.error_code(), 11);
    assert!(r.elapsed < Duration::from_secs(1), "took {:?}", r.elapsed);
    assert!(registrations(&hung).is_empty(), "nothing was registered");
}
