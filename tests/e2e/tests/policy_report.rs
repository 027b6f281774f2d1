//! Policy problems reported where Kubernetes users look: a real agent in
//! Kubernetes mode against the lab's test API server posts a Warning Event
//! per problem on the policy object and writes the Cilium policy's
//! `status.nodes.<node>`, once per policy revision; when the API refuses
//! those writes, the policy is enforced all the same and the writes happen
//! once the API takes them again.

use catena_api::EndpointPolicyStatus;
use catena_e2e::wait_for;
use catena_lab::apiserver::ApiServer;
use catena_lab::{Agent, CallArgs, CniRunner, Node};
use serde_json::{json, Value};
use std::time::Duration;

const NODE: &str = "lab-node-1";
const WAIT: Duration = Duration::from_secs(20);

/// A CNP on app=web: TCP 8080 from the cluster, plus (with `l7`) an HTTP
/// rule on 9090 that needs a proxy catena does not have.
fn cnp(name: &str, l7: bool, extra_port: Option<u16>) -> Value {
    let mut ingress = vec![json!({
        "fromEntities": ["cluster"],
        "toPorts": [{"ports": [{"port": "8080", "protocol": "TCP"}]}]
    })];
    if l7 {
        ingress.push(json!({
            "fromEntities": ["cluster"],
            "toPorts": [{"ports": [{"port": "9090", "protocol": "TCP"}],
                         "rules": {"http": [{"method": "GET", "path": "/public"}]}}]
        }));
    }
    if let Some(port) = extra_port {
        ingress.push(json!({
            "fromEntities": ["cluster"],
            "toPorts": [{"ports": [{"port": port.to_string(), "protocol": "TCP"}]}]
        }));
    }
    json!({
        "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"endpointSelector": {"matchLabels": {"app": "web"}}, "ingress": ingress}
    })
}

/// A cluster-wide policy with one unsupported peer (toFQDNs): used as a
/// barrier — once its Event is in, every earlier compile has been handled.
fn fqdn_ccnp(name: &str) -> Value {
    json!({
        "apiVersion": "cilium.io/v2", "kind": "CiliumClusterwideNetworkPolicy",
        "metadata": {"name": name},
        "spec": {"endpointSelector": {"matchLabels": {"app": "web"}},
                 "egress": [{"toFQDNs": [{"matchName": "example.com"}]}]}
    })
}

fn knp() -> Value {
    json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "web-from-clients", "namespace": "default"},
        "spec": {"podSelector": {"matchLabels": {"app": "web"}},
                 "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "client"}}}],
                              "ports": [{"port": 8080, "protocol": "TCP"}]}]}
    })
}

fn pod(name: &str, app: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "labels": {"app": app}},
        "spec": {"containers": [{"name": "c", "image": "busybox"}]}
    })
}

/// Events the API server got about one object.
fn events_about(api: &ApiServer, kind: &str, name: &str) -> Vec<Value> {
    api.events()
        .into_iter()
        .filter(|e| e["regarding"]["kind"] == kind && e["regarding"]["name"] == name)
        .collect()
}

fn node_status(api: &ApiServer, kind: &str, ns: &str, name: &str) -> Option<Value> {
    let object = api.get(kind, ns, name)?;
    object["status"]["nodes"].get(NODE).cloned()
}

fn status_writes(api: &ApiServer, name: &str) -> usize {
    let suffix = format!("/{name}/status");
    api.requests()
        .iter()
        .filter(|r| r.starts_with("PATCH ") && r.contains(&suffix))
        .count()
}

/// Applies a barrier policy and waits for its Event: the reporter handles
/// compiles in order, so everything before it has been reported by then.
fn barrier(api: &ApiServer, agent: &Agent, name: &str) -> anyhow::Result<()> {
    api.apply(fqdn_ccnp(name))?;
    wait_for(&format!("the Event for barrier {name}"), WAIT, || {
        Ok((!events_about(api, "CiliumClusterwideNetworkPolicy", name).is_empty()).then_some(()))
    })
    .map_err(|e| {
        e.context(format!(
            "events: {:#?}\nagent log:\n{}",
            api.events(),
            agent.log_tail(40)
        ))
    })
}

#[test]
fn policy_problems_become_events_and_cnp_status_once_per_revision() -> anyhow::Result<()> {
    let node = Node::new("e2e-report")?;
    let api = ApiServer::start_in(node.netns())?;
    api.apply(pod("web", "web"))?;
    api.apply(cnp("l7", true, None))?;
    api.apply(knp())?;
    let kubeconfig = api.write_kubeconfig(node.dir())?;
    let agent = node.start_agent_kube(&kubeconfig, &["--node-name", NODE])?;

    // One Warning Event on the CNP, naming the field and the fail-closed outcome.
    let events = wait_for("a Warning Event on the L7 policy", WAIT, || {
        let evs = events_about(&api, "CiliumNetworkPolicy", "l7");
        Ok((!evs.is_empty()).then_some(evs))
    })
    .map_err(|e| e.context(format!("agent log:\n{}", agent.log_tail(40))))?;
    let ev = &events[0];
    let cnp_object = api
        .get("CiliumNetworkPolicy", "default", "l7")
        .expect("stored");
    assert_eq!(ev["type"], "Warning", "{ev:#}");
    assert_eq!(ev["reason"], "PolicyPartiallyUnsupported", "{ev:#}");
    assert_eq!(ev["reportingController"], "catena-agent", "{ev:#}");
    assert_eq!(ev["reportingInstance"], NODE, "{ev:#}");
    assert_eq!(ev["metadata"]["namespace"], "default", "{ev:#}");
    assert_eq!(ev["regarding"]["apiVersion"], "cilium.io/v2", "{ev:#}");
    assert_eq!(
        ev["regarding"]["uid"], cnp_object["metadata"]["uid"],
        "{ev:#}"
    );
    let note = ev["note"].as_str().unwrap_or_default();
    assert!(
        note.contains("spec.ingress[1]") && note.contains("L7") && note.contains("fail-closed"),
        "the note names the field and what is done instead: {note}"
    );

    // This node's status on the CNP says the same.
    let status = wait_for("status.nodes.<node> on the L7 policy", WAIT, || {
        Ok(node_status(&api, "CiliumNetworkPolicy", "default", "l7"))
    })?;
    assert_eq!(status["ok"], false, "{status:#}");
    assert_eq!(
        status["enforcing"], true,
        "the rest is enforced: {status:#}"
    );
    assert!(
        status["error"].as_str().unwrap_or_default().contains("L7"),
        "{status:#}"
    );
    assert!(status["lastUpdated"].is_string(), "{status:#}");
    // The status write is on the subresource: the spec's generation stays.
    let after_status = api.get("CiliumNetworkPolicy", "default", "l7").unwrap();
    assert_eq!(after_status["metadata"]["generation"], 1);

    // Reconciles that change nothing about the policy (pods coming and
    // going, the MODIFIED event of the status write itself) write nothing.
    for i in 0..5 {
        api.apply(pod(&format!("churn-{i}"), "other"))?;
        std::thread::sleep(Duration::from_millis(50));
    }
    barrier(&api, &agent, "barrier-1")?;
    assert_eq!(events_about(&api, "CiliumNetworkPolicy", "l7").len(), 1);
    assert_eq!(status_writes(&api, "l7"), 1, "{:?}", api.requests());
    assert!(
        events_about(&api, "NetworkPolicy", "web-from-clients").is_empty(),
        "a fine NetworkPolicy gets no Event"
    );
    // The cluster-wide barrier got its status through the cluster-scoped path.
    let ccnp = wait_for("the barrier's node status", WAIT, || {
        Ok(node_status(
            &api,
            "CiliumClusterwideNetworkPolicy",
            "",
            "barrier-1",
        ))
    })?;
    assert!(
        ccnp["error"]
            .as_str()
            .unwrap_or_default()
            .contains("toFQDNs"),
        "{ccnp:#}"
    );

    // The L7 rule is dropped from the policy: the status turns ok, and no
    // Event is posted for the fixed revision.
    api.apply(cnp("l7", false, None))?;
    let fixed = wait_for("the L7 policy's status to turn ok", WAIT, || {
        Ok(node_status(&api, "CiliumNetworkPolicy", "default", "l7").filter(|s| s["ok"] == true))
    })?;
    assert_eq!(fixed["enforcing"], true, "{fixed:#}");
    assert!(
        fixed.get("error").is_none(),
        "the old error is removed: {fixed:#}"
    );
    barrier(&api, &agent, "barrier-2")?;
    assert_eq!(
        events_about(&api, "CiliumNetworkPolicy", "l7").len(),
        1,
        "no duplicate Event: {:#?}",
        api.events()
    );
    assert_eq!(status_writes(&api, "l7"), 2);
    assert!(events_about(&api, "NetworkPolicy", "web-from-clients").is_empty());

    // `catena status` keeps the node-local view in Kubernetes mode too.
    let st: catena_api::Status = agent.client().get("/v1/status")?;
    let l7 = st
        .policies
        .iter()
        .find(|p| p.name == "default/l7")
        .expect("listed");
    assert_eq!(l7.state, "ok", "{l7:?}");
    Ok(())
}

#[test]
fn refused_reports_never_stop_enforcement_and_are_retried() -> anyhow::Result<()> {
    let node = Node::new("e2e-report-f")?;
    let api = ApiServer::start_in(node.netns())?;
    api.fail_event_posts(Some(403));
    api.fail_status_writes(Some(500));
    api.apply(pod("web", "web"))?;
    api.apply(cnp("l7", true, None))?;
    let kubeconfig = api.write_kubeconfig(node.dir())?;
    let agent = node.start_agent_kube(&kubeconfig, &["--node-name", NODE])?;
    let conf = node.ptp_conflist("e2e", "10.244.21.0/24", "1.0.0", vec![node.catena_plugin()])?;
    let cni = CniRunner::new(&node, conf);
    let mut web = node.pod("web")?;
    web.namespace = "default".into();
    cni.add(&web, "eth0", &CallArgs::default())?;
    let client = agent.client();
    let policy_path = format!(
        "{}/policy",
        catena_api::endpoint_path(&web.container_id, "eth0")
    );
    let allows = |port: &str| -> anyhow::Result<bool> {
        let p: EndpointPolicyStatus = client.get(&policy_path)?;
        Ok(p.ingress_enforced
            && p.entries.iter().any(|e| {
                e.verdict == "allow"
                    && e.protocol == "TCP"
                    && e.ports == port
                    && e.source.contains("default/l7")
            }))
    };

    // Both kinds of write were tried and refused, and logged as such.
    wait_for("the refused writes in the agent log", WAIT, || {
        let log = agent.log();
        Ok((log.contains("posting a policy Event failed")
            && log.contains("writing a policy's node status failed"))
        .then_some(()))
    })
    .map_err(|e| e.context(format!("agent log:\n{}", agent.log_tail(40))))?;
    assert!(api.events().is_empty());
    // The policy is programmed regardless: the L4 part allows 8080, the L7
    // port stays denied (fail-closed).
    wait_for("the policy in the endpoint's maps", WAIT, || {
        Ok(allows("8080")?.then_some(()))
    })?;
    assert!(!allows("9090")?, "the L7 port must stay closed");

    // A policy change while the API refuses every report still reaches the
    // datapath: the reporter's retries never hold up the reconcile loop.
    api.fail_event_posts(Some(500));
    api.apply(cnp("l7", true, Some(8443)))?;
    wait_for("the edited policy in the endpoint's maps", WAIT, || {
        Ok(allows("8443")?.then_some(()))
    })?;
    assert!(api.events().is_empty());

    // The API takes writes again: the current revision is reported, once.
    api.fail_event_posts(None);
    api.fail_status_writes(None);
    let retry = Duration::from_secs(45); // past the longest backoff (30 s)
    wait_for("the Event once the API accepts it", retry, || {
        Ok((!events_about(&api, "CiliumNetworkPolicy", "l7").is_empty()).then_some(()))
    })?;
    let status = wait_for("the node status once the API accepts it", retry, || {
        Ok(node_status(&api, "CiliumNetworkPolicy", "default", "l7"))
    })?;
    assert_eq!(status["ok"], false, "{status:#}");
    barrier(&api, &agent, "barrier-f")?;
    let evs = events_about(&api, "CiliumNetworkPolicy", "l7");
    assert_eq!(evs.len(), 1, "one problem, one Event: {evs:#?}");
    assert!(agent.log().contains("works again"), "recovery is logged");
    cni.del(&web, "eth0", &CallArgs::default())?;
    Ok(())
}
