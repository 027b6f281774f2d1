//! The bad-input matrix and the commands that need no network namespace,
//! run against the real binary.

mod common;

use common::*;
use serde_json::json;
use std::path::Path;

const CID: &str = "0f3a9c1e5b7d";

fn env<'a>(cmd: &'a str, extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut e = vec![
        ("CNI_COMMAND", cmd),
        ("CNI_CONTAINERID", CID),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/opt/cni/bin"),
        (
            "CNI_ARGS",
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;K8S_POD_UID=u-1",
        ),
    ];
    for (k, v) in extra {
        e.retain(|(ek, _)| ek != k);
        e.push((k, v));
    }
    e
}

fn conf_for(agent: &Path, state: &Path, version: &str) -> String {
    format!(
        r#"{{"type":"catena-cni","agentSocket":"{}","stateDir":"{}","name":"catena","cniVersion":"{version}"}}"#,
        agent.display(),
        state.display()
    )
}

#[test]
fn version_answers_with_the_requested_version() {
    let r = run_plugin(
        &[("CNI_COMMAND", "VERSION")],
        r#"{"cniVersion":"0.3.1"}"#,
        None,
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(
        v,
        json!({"cniVersion":"0.3.1","supportedVersions":["0.3.0","0.3.1","0.4.0","1.0.0","1.1.0"]})
    );
    let r = run_plugin(&[("CNI_COMMAND", "VERSION")], "", None);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["cniVersion"], "1.1.0");
}

#[test]
fn missing_or_unknown_command_is_code_4() {
    let r = run_plugin(&[], "", None);
    assert_eq!(r.error_code(), 4);
    let r = run_plugin(&[("CNI_COMMAND", "FROB")], "{}", None);
    assert_eq!(r.error_code(), 4);
    assert!(r.error()["msg"].as_str().unwrap().contains("FROB"));
}

#[test]
fn malformed_json_is_code_6() {
    let r = run_plugin(
        &env("ADD", &[("CNI_NETNS", "/run/netns/x")]),
        r#"{"type":"catena-cni","#,
        None,
    );
    assert_eq!(r.error_code(), 6);
    // Errors go to stdout as exactly one JSON object; diagnostics to stderr.
    assert!(r.stderr.contains("catena-cni"), "{}", r.stderr);
}

#[test]
fn missing_prev_result_says_to_chain() {
    let state = tempfile::tempdir().unwrap();
    let conf = conf_for(Path::new("/nonexistent.sock"), state.path(), "0.3.1");
    let r = run_plugin(&env("ADD", &[("CNI_NETNS", "/run/netns/x")]), &conf, None);
    let e = r.error();
    assert_eq!(e["code"], 7);
    assert_eq!(e["cniVersion"], "0.3.1");
    assert!(
        e["msg"]
            .as_str()
            .unwrap()
            .contains("chained after a primary plugin"),
        "{e}"
    );
}

#[test]
fn unsupported_version_is_code_1() {
    for v in ["0.2.0", "2.0.0", "garbage"] {
        let conf = chained_conf(
            v,
            Path::new("/x.sock"),
            Path::new("/tmp"),
            &ptp_result(Path::new("/run/netns/x")),
        );
        let r = run_plugin(&env("ADD", &[("CNI_NETNS", "/run/netns/x")]), &conf, None);
        assert_eq!(r.error_code(), 1, "{v}: {}", r.stdout);
    }
    // No cniVersion at all means 0.1.0, which has no chaining.
    let r = run_plugin(
        &env("ADD", &[("CNI_NETNS", "/run/netns/x")]),
        r#"{"type":"catena-cni"}"#,
        None,
    );
    assert_eq!(r.error_code(), 1);
}

#[test]
fn missing_or_wrong_netns_is_a_clear_code_4() {
    let state = tempfile::tempdir().unwrap();
    let conf = chained_conf(
        "1.0.0",
        Path::new("/x.sock"),
        state.path(),
        &ptp_result(Path::new("/run/netns/x")),
    );
    let r = run_plugin(&env("ADD", &[]), &conf, None);
    let e = r.error();
    assert_eq!(e["code"], 4);
    assert!(e["msg"].as_str().unwrap().contains("CNI_NETNS"), "{e}");

    let r = run_plugin(
        &env(
            "ADD",
            &[("CNI_NETNS", "/run/netns/catena-cni-does-not-exist")],
        ),
        &conf,
        None,
    );
    let e = r.error();
    assert_eq!(e["code"], 4);
    assert!(
        e["msg"]
            .as_str()
            .unwrap()
            .contains("catena-cni-does-not-exist"),
        "{e}"
    );

    let not_ns = state.path().join("plain-file");
    std::fs::write(&not_ns, b"").unwrap();
    let r = run_plugin(
        &env("ADD", &[("CNI_NETNS", not_ns.to_str().unwrap())]),
        &conf,
        None,
    );
    let e = r.error();
    assert_eq!(e["code"], 4);
    assert!(
        e["msg"]
            .as_str()
            .unwrap()
            .contains("not a network namespace"),
        "{e}"
    );
}

#[test]
fn unknown_cni_args_need_ignore_unknown() {
    let conf = chained_conf(
        "1.0.0",
        Path::new("/x.sock"),
        Path::new("/tmp"),
        &ptp_result(Path::new("/run/netns/x")),
    );
    let e = env(
        "ADD",
        &[
            ("CNI_NETNS", "/run/netns/x"),
            ("CNI_ARGS", "K8S_POD_NAME=a;COLOR=blue"),
        ],
    );
    let r = run_plugin(&e, &conf, None);
    let err = r.error();
    assert_eq!(err["code"], 4);
    assert!(err["msg"].as_str().unwrap().contains("COLOR"), "{err}");
}

#[test]
fn check_needs_0_4_0_and_status_gc_need_1_1_0() {
    let state = tempfile::tempdir().unwrap();
    let conf = chained_conf(
        "0.3.1",
        Path::new("/x.sock"),
        state.path(),
        &ptp_result(Path::new("/run/netns/x")),
    );
    assert_eq!(
        run_plugin(&env("CHECK", &[("CNI_NETNS", "/run/netns/x")]), &conf, None).error_code(),
        1
    );
    let conf = conf_for(Path::new("/x.sock"), state.path(), "1.0.0");
    assert_eq!(
        run_plugin(&[("CNI_COMMAND", "STATUS")], &conf, None).error_code(),
        1
    );
    assert_eq!(
        run_plugin(&[("CNI_COMMAND", "GC")], &conf, None).error_code(),
        1
    );
}

#[test]
fn del_with_agent_down_queues_and_succeeds_twice() {
    let state = tempfile::tempdir().unwrap();
    let conf = conf_for(&state.path().join("no-agent.sock"), state.path(), "0.3.1");
    // containerd: first DEL with netns and prevResult, later ones without.
    for netns in ["/run/netns/gone", "", ""] {
        let r = run_plugin(&env("DEL", &[("CNI_NETNS", netns)]), &conf, None);
        assert_eq!(r.code, 0, "{}", r.stderr);
        assert_eq!(r.stdout, "", "DEL prints nothing");
    }
    let dir = state.path().join("del-queue");
    let names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        names,
        vec![std::ffi::OsString::from(format!("{CID}_eth0.json"))]
    );
    let q: catena_api::QueuedDelete =
        serde_json::from_slice(&std::fs::read(dir.join(format!("{CID}_eth0.json"))).unwrap())
            .unwrap();
    assert_eq!(
        (q.container_id.as_str(), q.ifname.as_str(), q.host_ifindex),
        (CID, "eth0", None)
    );
    assert!(q.queued_at > 1_600_000_000);
}

#[test]
fn del_reaches_the_agent_even_with_a_sparse_environment() {
    let agent = FakeAgent::healthy();
    let state = tempfile::tempdir().unwrap();
    let conf = conf_for(&agent.socket(), state.path(), "1.0.0");
    // podman's cleanup process: no netns, a namespace-less CNI_ARGS.
    let sparse = [
        ("CNI_COMMAND", "DEL"),
        ("CNI_CONTAINERID", CID),
        ("CNI_IFNAME", "eth0"),
        ("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAME=happy_turing"),
    ];
    for _ in 0..2 {
        let r = run_plugin(&sparse, &conf, None);
        assert_eq!((r.code, r.stdout.as_str()), (0, ""), "{}", r.stderr);
    }
    let reqs = agent.requests();
    assert_eq!(reqs.len(), 2);
    for r in reqs {
        assert_eq!(
            (r.method.as_str(), r.path.as_str()),
            ("DELETE", &*format!("/v1/endpoints/{CID}/eth0"))
        );
    }
    assert!(
        !state.path().join("del-queue").exists(),
        "nothing to queue when the agent answered"
    );
}

#[test]
fn del_tolerates_garbage_and_missing_ids() {
    // No container id: nothing could have been registered; still exit 0.
    let r = run_plugin(
        &[("CNI_COMMAND", "DEL"), ("CNI_IFNAME", "eth0")],
        "{}",
        None,
    );
    assert_eq!((r.code, r.stdout.as_str()), (0, ""));
    // A failing agent (500) on DEL: still exit 0, the delete is queued.
    let agent = FakeAgent::start(|_| Reply::json(500, json!({"message": "boom"})));
    let state = tempfile::tempdir().unwrap();
    let r = run_plugin(
        &env("DEL", &[]),
        &conf_for(&agent.socket(), state.path(), "1.1.0"),
        None,
    );
    assert_eq!((r.code, r.stdout.as_str()), (0, ""));
    assert!(state
        .path()
        .join(format!("del-queue/{CID}_eth0.json"))
        .exists());
}

#[test]
fn status_reports_agent_readiness() {
    let state = tempfile::tempdir().unwrap();
    let status = [("CNI_COMMAND", "STATUS")];

    let ready = FakeAgent::healthy();
    let r = run_plugin(
        &status,
        &conf_for(&ready.socket(), state.path(), "1.1.0"),
        None,
    );
    assert_eq!((r.code, r.stdout.as_str()), (0, ""), "{}", r.stderr);

    let starting = FakeAgent::start(|_| {
        Reply::json(
            200,
            json!({"ready": false, "reason": "datapath not loaded"}),
        )
    });
    let r = run_plugin(
        &status,
        &conf_for(&starting.socket(), state.path(), "1.1.0"),
        None,
    );
    let e = r.error();
    assert_eq!(e["code"], 50);
    assert!(
        e["msg"].as_str().unwrap().contains("datapath not loaded"),
        "{e}"
    );

    let r = run_plugin(
        &status,
        &conf_for(&state.path().join("none.sock"), state.path(), "1.1.0"),
        None,
    );
    let e = r.error();
    assert_eq!(e["code"], 50);
    assert!(e["msg"].as_str().unwrap().contains("none.sock"), "{e}");
}

#[test]
fn gc_posts_the_valid_attachments() {
    let agent = FakeAgent::start(|r| match r.method.as_str() {
        "POST" => Reply::json(
            200,
            json!({"removed": [{"containerId": "old", "ifname": "eth0"}]}),
        ),
        _ => Reply::empty(404),
    });
    let state = tempfile::tempdir().unwrap();
    let conf = format!(
        r#"{{"type":"catena-cni","agentSocket":"{}","stateDir":"{}","name":"catena","cniVersion":"1.1.0",
            "cni.dev/valid-attachments":[{{"containerID":"c1","ifname":"eth0"}},{{"containerID":"c1","ifname":"net1"}}],
            "cni.dev/attachments":[{{"containerID":"c1","ifname":"eth0"}},{{"containerID":"c1","ifname":"net1"}}]}}"#,
        agent.socket().display(),
        state.path().display()
    );
    let r = run_plugin(
        &[("CNI_COMMAND", "GC"), ("CNI_PATH", "/opt/cni/bin")],
        &conf,
        None,
    );
    assert_eq!((r.code, r.stdout.as_str()), (0, ""), "{}", r.stderr);
    assert!(r.stderr.contains("old/eth0"), "{}", r.stderr);
    let reqs = agent.requests();
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0].path, "/v1/endpoints/gc");
    assert_eq!(
        reqs[0].json(),
        json!({"network":"catena","validAttachments":[{"containerId":"c1","ifname":"eth0"},{"containerId":"c1","ifname":"net1"}]})
    );

    // Without the list GC must not run (it would remove every endpoint).
    let r = run_plugin(
        &[("CNI_COMMAND", "GC")],
        &conf_for(&agent.socket(), state.path(), "1.1.0"),
        None,
    );
    assert_eq!(r.error_code(), 7);
    assert_eq!(agent.requests().len(), 1);
}

#[test]
fn log_file_takes_diagnostics_off_stderr() {
    let state = tempfile::tempdir().unwrap();
    let log = state.path().join("cni.log");
    let conf = format!(
        r#"{{"type":"catena-cni","logFile":"{}","cniVersion":"1.0.0","name":"catena"}}"#,
        log.display()
    );
    let r = run_plugin(&env("ADD", &[("CNI_NETNS", "/run/netns/x")]), &conf, None);
    assert_eq!(r.error_code(), 7);
    assert_eq!(r.stderr, "");
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains(&format!("Add {CID}/eth0: [code 7]")),
        "{logged}"
    );
}
