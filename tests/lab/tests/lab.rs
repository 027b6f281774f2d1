//! The lab itself, exercised with the real reference plugins (no catena).
//! Every test builds its own node, so they run in parallel.

use anyhow::{Context, Result};
use catena_lab::{list_netns, CallArgs, CniError, CniRunner, GcAttachment, Node};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

const T: Duration = Duration::from_secs(3);

fn assert_gone(names: &[String], dirs: &[PathBuf]) {
    let live = list_netns().unwrap();
    for n in names {
        assert!(!live.contains(n), "netns {n} still exists: {live:?}");
    }
    for d in dirs {
        assert!(!d.exists(), "{} still exists", d.display());
    }
}

/// Two pods through a conflist: traffic between them, CHECK, DEL (twice,
/// plus containerd's netns-less repeat), veths gone afterwards.
fn two_pods_roundtrip(node: &Node, cni: &CniRunner) -> Result<()> {
    let a = node.pod("a")?;
    let b = node.pod("b")?;
    let ra = cni.add(&a, "eth0", &CallArgs::default())?;
    let rb = cni.add(&b, "eth0", &CallArgs::default())?;
    assert_ne!(a.ipv4()?, b.ipv4()?);
    assert_eq!(ra.ipv4(), Some(a.ipv4()?));
    assert_eq!(
        ra.sandbox_interface("eth0").map(|(_, i)| i.name.as_str()),
        Some("eth0")
    );

    let veth_a = a.host_veth(node, "eth0")?;
    let veth_b = b.host_veth(node, "eth0")?;
    assert!(
        rb.host_interfaces().any(|i| i.name == veth_b),
        "{rb:?} vs {veth_b}"
    );

    let srv = b.serve_tcp(8080, "hello-from-b")?;
    let to_b = SocketAddr::new(b.ipv4()?.into(), 8080);
    let reply = a.tcp_request(to_b, T)?;
    assert_eq!(reply.text, "hello-from-b");
    assert_eq!(reply.peer, to_b);
    assert_eq!(reply.local.ip(), std::net::IpAddr::from(a.ipv4()?));
    let tally = catena_lab::count_backends(&a, to_b, 5)?;
    assert_eq!(tally.get("hello-from-b"), Some(&5), "{tally:?}");
    assert_eq!(srv.count(), 6);
    drop(srv);
    // Nothing listens any more: the client sees a refusal, not a hang.
    assert!(a.tcp_request(to_b, T).is_err());

    cni.check(&a, "eth0", &CallArgs::default())?;
    cni.check(&b, "eth0", &CallArgs::default())?;

    let cache = node.cni_cache_dir().join("results");
    let cached = |cid: &str| cache.join(format!("{}-{cid}-eth0", cni.conflist().name));
    let doc: Value = serde_json::from_slice(&std::fs::read(cached(&a.container_id))?)?;
    assert_eq!(doc["kind"], "cniCacheV1");
    assert_eq!(doc["result"], ra.raw);

    let links = node.netns().links()?;
    assert!(
        links.contains(&veth_a) && links.contains(&veth_b),
        "{links:?}"
    );
    cni.del(&a, "eth0", &CallArgs::default())?;
    assert!(a.result().is_none());
    assert!(!cached(&a.container_id).exists());
    let links = node.netns().links()?;
    assert!(
        !links.contains(&veth_a),
        "{veth_a} left after DEL: {links:?}"
    );
    assert!(links.contains(&veth_b));
    // The pod side went with the pair.
    assert!(!a.netns().links()?.contains(&"eth0".to_string()));

    // Runtimes repeat DEL; it must stay a success.
    cni.del(&a, "eth0", &CallArgs::default())?;
    cni.del(&a, "eth0", &CallArgs::containerd_repeat_del())?;

    cni.del(&b, "eth0", &CallArgs::default())?;
    assert!(!node.netns().links()?.contains(&veth_b));

    // Every plugin was asked for its version, once, before its first ADD.
    let timings = cni.timings();
    let first_add = timings.iter().position(|t| t.command == "ADD").unwrap();
    for ty in cni.conflist().plugin_types() {
        let v = timings
            .iter()
            .position(|t| t.command == "VERSION" && t.plugin == ty)
            .unwrap_or_else(|| panic!("no VERSION for {ty}"));
        assert!(v < first_add);
    }
    assert_eq!(timings.iter().filter(|t| t.command == "VERSION").count(), 1);
    assert!(timings.iter().all(|t| t.elapsed > Duration::ZERO));
    Ok(())
}

#[test]
fn ptp_two_pods_add_traffic_check_del() -> Result<()> {
    let node = Node::new("ptp")?;
    let names = vec![node.netns().name().to_string()];
    let dirs = vec![node.dir().to_path_buf(), node.bpffs_dir().to_path_buf()];
    assert!(node.bpffs_dir().is_dir());
    let conf = node.ptp_conflist("labnet", "10.250.0.0/24", "1.0.0", vec![])?;
    let cni = CniRunner::new(&node, conf);
    two_pods_roundtrip(&node, &cni)?;
    drop(cni);
    drop(node);
    assert_gone(&names, &dirs);
    Ok(())
}

#[test]
fn bridge_two_pods_add_traffic_check_del() -> Result<()> {
    let node = Node::new("bridge")?;
    let conf = node.bridge_conflist("labbr", "labbr0", "10.250.0.0/24", "1.0.0", vec![])?;
    let cni = CniRunner::new(&node, conf);
    two_pods_roundtrip(&node, &cni)?;
    // The bridge itself belongs to the node, not to a pod: it stays.
    assert!(node.netns().links()?.contains(&"labbr0".to_string()));
    Ok(())
}

#[test]
fn old_spec_version_works_and_check_is_refused() -> Result<()> {
    let node = Node::new("v031")?;
    let conf = node.ptp_conflist("old", "10.250.1.0/24", "0.3.1", vec![])?;
    let cni = CniRunner::new(&node, conf);
    let p = node.pod("p")?;
    let r = cni.add(&p, "eth0", &CallArgs::default())?;
    assert_eq!(
        r.raw["ips"][0]["version"], "4",
        "0.3.x results carry ip version"
    );
    assert!(matches!(
        cni.check(&p, "eth0", &CallArgs::default()),
        Err(CniError::Invalid(m)) if m.contains("CHECK")
    ));
    cni.del(&p, "eth0", &CallArgs::default())?;
    Ok(())
}

#[test]
fn pods_and_nodes_are_cleaned_up_when_a_test_panics() {
    let seen = std::sync::Mutex::new((Vec::<String>::new(), Vec::<PathBuf>::new()));
    let outcome = std::panic::catch_unwind(|| {
        let node = Node::new("panics").unwrap();
        let pod = node.pod("victim").unwrap();
        let cni = CniRunner::new(
            &node,
            node.ptp_conflist("pn", "10.250.2.0/24", "1.0.0", vec![])
                .unwrap(),
        );
        cni.add(&pod, "eth0", &CallArgs::default()).unwrap();
        let _srv = pod.serve_tcp(9000, "x").unwrap();
        {
            let mut s = seen.lock().unwrap();
            s.0.push(node.netns().name().into());
            s.0.push(pod.netns().name().into());
            s.1.push(node.dir().into());
            s.1.push(node.bpffs_dir().into());
        }
        assert!(list_netns()
            .unwrap()
            .contains(&pod.netns().name().to_string()));
        panic!("test body fails");
    });
    assert!(outcome.is_err());
    let (names, dirs) = seen.into_inner().unwrap();
    assert_eq!(names.len(), 2);
    assert_gone(&names, &dirs);
}

#[test]
fn plugin_errors_are_parsed() -> Result<()> {
    let node = Node::new("errors")?;
    let p = node.pod("p")?;

    // host-local rejects the range; ptp relays the error object.
    let bad = node.ptp_conflist("bad", "10.250.3.0/33", "1.0.0", vec![])?;
    let cni = CniRunner::new(&node, bad);
    let err = cni.add(&p, "eth0", &CallArgs::default()).unwrap_err();
    let pe = err.plugin_error().with_context(|| format!("{err:?}"))?;
    assert_eq!((pe.plugin.as_str(), pe.command.as_str()), ("ptp", "ADD"));
    assert!(pe.code > 0, "{pe:?}");
    assert!(pe.msg.contains("10.250.3.0/33"), "{pe:?}");

    // Garbage on stdin: the plugin's own decoding error, through the raw exec.
    let err = cni
        .exec_plugin(
            "ptp",
            "ADD",
            &[
                ("CNI_CONTAINERID", "c1"),
                ("CNI_NETNS", &p.netns_path().display().to_string()),
                ("CNI_IFNAME", "eth0"),
            ],
            b"{not json",
        )
        .unwrap_err();
    let pe = err.plugin_error().with_context(|| format!("{err:?}"))?;
    assert!(pe.code > 0 && !pe.msg.is_empty(), "{pe:?}");

    // A version the plugin does not speak is refused after VERSION, before ADD.
    let future = node.ptp_conflist("future", "10.250.3.0/24", "9.9.9", vec![])?;
    let cni = CniRunner::new(&node, future);
    let err = cni.add(&p, "eth0", &CallArgs::default()).unwrap_err();
    assert!(
        matches!(&err, CniError::Invalid(m) if m.contains("does not support config version")),
        "{err:?}"
    );
    assert!(cni.timings().iter().all(|t| t.command == "VERSION"));

    // A missing plugin and a bad ifname are caught like libcni does.
    let missing = CniRunner::new(
        &node,
        catena_lab::Conflist::from_value(
            json!({"cniVersion": "1.0.0", "name": "m", "plugins": [{"type": "no-such-plugin"}]}),
        )?,
    );
    assert!(matches!(
        missing.add(&p, "eth0", &CallArgs::default()),
        Err(CniError::Invalid(m)) if m.contains("no-such-plugin")
    ));
    assert!(matches!(
        missing.add(&p, "eth0:bad", &CallArgs::default()),
        Err(CniError::Invalid(_))
    ));
    Ok(())
}

/// A chained plugin that records what it was sent (stdin and CNI_* env) and
/// passes `prevResult` through, like a real chained plugin would.
fn recorder(dir: &Path) -> Result<PathBuf> {
    assert!(
        Path::new("/usr/bin/jq").exists(),
        "the recorder plugin needs jq"
    );
    let bin = dir.join("bin");
    let log = dir.join("calls");
    std::fs::create_dir_all(&bin)?;
    std::fs::create_dir_all(&log)?;
    let script = format!(
        r#"#!/bin/sh
set -e
if [ "$CNI_COMMAND" = VERSION ]; then
  echo '{{"cniVersion":"1.1.0","supportedVersions":["0.4.0","1.0.0","1.1.0"]}}'
  exit 0
fi
n=$(ls {log} | wc -l)
in=$(cat)
printf '%s' "$in" | jq --arg cmd "$CNI_COMMAND" --arg args "$CNI_ARGS" --arg netns "$CNI_NETNS" \
  --arg cid "$CNI_CONTAINERID" --arg ifname "$CNI_IFNAME" \
  '{{cmd: $cmd, args: $args, netns: $netns, cid: $cid, ifname: $ifname, stdin: .}}' \
  > {log}/$(printf %03d "$n").json
if [ "$CNI_COMMAND" = ADD ]; then
  printf '%s' "$in" | jq -c '.prevResult // {{cniVersion: .cniVersion, interfaces: [], ips: []}}'
fi
"#,
        log = log.display()
    );
    let path = bin.join("recorder");
    std::fs::write(&path, script)?;
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    Ok(bin)
}

fn recorded(dir: &Path) -> Result<Vec<Value>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir.join("calls"))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    files.sort();
    files
        .iter()
        .map(|f| Ok(serde_json::from_slice(&std::fs::read(f)?)?))
        .collect()
}

#[test]
fn chained_plugin_sees_what_libcni_sends() -> Result<()> {
    let node = Node::new("chain")?;
    let bin = recorder(node.dir())?;
    let conf = node.ptp_conflist(
        "chain",
        "10.250.4.0/24",
        "1.0.0",
        vec![json!({"type": "recorder", "capabilities": {"portMappings": true, "io.x/off": false}, "knob": 7})],
    )?;
    let cni = CniRunner::new(&node, conf).with_cni_path(vec!["/usr/lib/cni".into(), bin]);
    let p = node.pod("p")?;
    let ports = json!([{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]);
    let args = CallArgs::default()
        .with_capability("portMappings", ports.clone())
        .with_capability("bandwidth", json!({"ingressRate": 1}))
        .with_capability("io.x/off", json!(1));
    let res = cni.add(&p, "eth0", &args)?;
    let ip = p.ipv4()?;
    cni.del(&p, "eth0", &CallArgs::default())?;

    let calls = recorded(node.dir())?;
    assert_eq!(calls.len(), 2, "{calls:#?}");
    let (add, del) = (&calls[0], &calls[1]);
    assert_eq!(
        (add["cmd"].as_str(), del["cmd"].as_str()),
        (Some("ADD"), Some("DEL"))
    );
    let stdin = &add["stdin"];
    assert_eq!(stdin["name"], "chain");
    assert_eq!(stdin["cniVersion"], "1.0.0");
    assert_eq!(stdin["knob"], 7);
    assert_eq!(
        stdin["runtimeConfig"],
        json!({"portMappings": ports}),
        "only declared, enabled capabilities"
    );
    assert_eq!(stdin["prevResult"]["ips"][0]["address"], format!("{ip}/24"));
    assert_eq!(
        stdin["prevResult"], res.raw,
        "the recorder passes prevResult through"
    );
    assert_eq!(add["netns"], p.netns_path().display().to_string());
    assert_eq!(add["cid"], p.container_id);
    assert_eq!(add["ifname"], "eth0");
    assert_eq!(
        add["args"],
        format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=p;K8S_POD_INFRA_CONTAINER_ID={};K8S_POD_UID={}",
            p.container_id, p.uid
        )
    );
    // DEL: cached final result and the ADD's runtime config.
    assert_eq!(del["stdin"]["prevResult"], res.raw);
    assert_eq!(
        del["stdin"]["runtimeConfig"],
        json!({"portMappings": ports})
    );
    // Reverse order: the chained plugin is torn down before the primary.
    let order: Vec<(String, String)> = cni
        .timings()
        .into_iter()
        .filter(|t| t.command != "VERSION")
        .map(|t| (t.plugin, t.command))
        .collect();
    let s = |a: &str, b: &str| (a.to_string(), b.to_string());
    assert_eq!(
        order,
        [
            s("ptp", "ADD"),
            s("recorder", "ADD"),
            s("recorder", "DEL"),
            s("ptp", "DEL")
        ]
    );
    Ok(())
}

#[test]
fn status_and_gc_on_a_1_1_0_conflist() -> Result<()> {
    let node = Node::new("gc")?;
    let bin = recorder(node.dir())?;
    let conf = catena_lab::Conflist::from_value(
        json!({"cniVersion": "1.1.0", "name": "gcnet", "plugins": [{"type": "recorder"}]}),
    )?;
    let cni = CniRunner::new(&node, conf).with_cni_path(vec![bin]);
    let (a, b) = (node.pod("a")?, node.pod("b")?);
    cni.add(&a, "eth0", &CallArgs::default())?;
    cni.add(&b, "eth0", &CallArgs::default())?;
    cni.status()?;
    let keep = GcAttachment {
        container_id: a.container_id.clone(),
        ifname: "eth0".into(),
    };
    cni.gc(std::slice::from_ref(&keep))?;
    let calls = recorded(node.dir())?;
    let cmds: Vec<&str> = calls.iter().filter_map(|c| c["cmd"].as_str()).collect();
    // b is stale: DEL with its cached result, then GC with the valid list.
    assert_eq!(cmds, ["ADD", "ADD", "STATUS", "DEL", "GC"]);
    assert_eq!(calls[3]["cid"], b.container_id);
    assert_eq!(calls[3]["stdin"]["prevResult"]["cniVersion"], "1.1.0");
    assert_eq!(
        calls[4]["stdin"]["cni.dev/valid-attachments"],
        json!([{"containerID": a.container_id, "ifname": "eth0"}])
    );
    assert_eq!(calls[2]["stdin"]["name"], "gcnet");
    assert_eq!(calls[2]["cid"], "", "STATUS carries no attachment");
    Ok(())
}

#[test]
fn gc_deletes_stale_cached_attachments() -> Result<()> {
    let node = Node::new("gc-stale")?;
    let conf = node.ptp_conflist("stale", "10.250.5.0/24", "1.0.0", vec![])?;
    let cni = CniRunner::new(&node, conf);
    let (a, b) = (node.pod("a")?, node.pod("b")?);
    cni.add(&a, "eth0", &CallArgs::default())?;
    cni.add(&b, "eth0", &CallArgs::default())?;
    let (va, vb) = (a.host_veth(&node, "eth0")?, b.host_veth(&node, "eth0")?);
    cni.gc(&[GcAttachment {
        container_id: a.container_id.clone(),
        ifname: "eth0".into(),
    }])?;
    let links = node.netns().links()?;
    assert!(links.contains(&va), "{links:?}");
    assert!(
        !links.contains(&vb),
        "stale attachment survived GC: {links:?}"
    );
    // 1.0.0: STATUS is a no-op, as in libcni.
    cni.status()?;
    Ok(())
}

#[test]
fn agent_runs_in_the_node_netns_only_and_failures_show_its_log() -> Result<()> {
    let node = Node::new("agent")?;
    let dir = node.dir().join("fake");
    std::fs::create_dir_all(&dir)?;
    // Exits at once after saying which namespaces it is in.
    let fake = dir.join("fake-agent");
    std::fs::write(
        &fake,
        "#!/bin/sh\necho \"net=$(readlink /proc/self/ns/net) mnt=$(readlink /proc/self/ns/mnt) args=$*\"\nexit 3\n",
    )?;
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let manifests = node.dir().join("manifests");
    let err = node
        .start_agent_with(&fake, &manifests, &["--x"], Duration::from_secs(5))
        .err()
        .context("the fake agent never becomes ready")?;
    let msg = format!("{err:#}");
    assert!(msg.contains("exited"), "{msg}");
    let net_ino = std::fs::metadata(node.netns().path())?;
    let want_net = format!(
        "net=net:[{}]",
        std::os::unix::fs::MetadataExt::ino(&net_ino)
    );
    let want_mnt = format!("mnt={}", std::fs::read_link("/proc/self/ns/mnt")?.display());
    assert!(msg.contains(&want_net), "not in the node netns: {msg}");
    assert!(msg.contains(&want_mnt), "mount namespace changed: {msg}");
    let socket = node.agent_socket();
    assert!(
        msg.contains(&format!(
            "--manifests {} --socket {} --bpffs-dir {} --state-dir {} --x",
            manifests.display(),
            socket.display(),
            node.bpffs_dir().display(),
            node.state_dir().display()
        )),
        "{msg}"
    );

    // Never ready: times out with the log; Drop of the node kills it.
    let slow = dir.join("slow-agent");
    std::fs::write(&slow, "#!/bin/sh\necho starting\nexec sleep 600\n")?;
    std::fs::set_permissions(&slow, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let err = node
        .start_agent_with(&slow, &manifests, &[], Duration::from_millis(300))
        .err()
        .context("the slow agent never becomes ready")?;
    let msg = format!("{err:#}");
    assert!(
        msg.contains("not ready") && msg.contains("starting"),
        "{msg}"
    );
    Ok(())
}

#[test]
fn sweeper_removes_leftovers_of_dead_runs() -> Result<()> {
    // First, so this process's automatic one-time sweep is over before the
    // fakes exist; a live run's state (ours) must survive the sweep.
    let node = Node::new("sweep-live")?;
    // A pid that is certainly dead: a child we already reaped.
    let mut child = std::process::Command::new("true").spawn()?;
    child.wait()?;
    let dead = child.id();
    let name = format!("catena-sweep-{dead}-0");
    std::process::Command::new("ip")
        .args(["netns", "add", &name])
        .status()?
        .success()
        .then_some(())
        .context("ip netns add")?;
    // A process left running inside, as a killed run's agent would be.
    let mut orphan = std::process::Command::new("nsenter")
        .arg(format!("--net=/run/netns/{name}"))
        .args(["sleep", "600"])
        .spawn()?;
    let bpf = PathBuf::from(format!("/sys/fs/bpf/catena-lab-{dead}-0"));
    std::fs::create_dir_all(&bpf)?;
    // Sweep only once the orphan really is inside: nsenter joins the
    // namespace some time after spawn() returns.
    let entered = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let pids = std::process::Command::new("ip")
            .args(["netns", "pids", &name])
            .output()?;
        if String::from_utf8_lossy(&pids.stdout)
            .split_whitespace()
            .any(|p| p == orphan.id().to_string())
        {
            break;
        }
        anyhow::ensure!(
            std::time::Instant::now() < entered,
            "the orphan never entered {name}"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }

    let removed = catena_lab::sweep_stale()?;
    // Bounded: a sweeper of another test process running at the same moment
    // can win the race for the fake namespace; never hang on the orphan.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let reaped = loop {
        if let Some(status) = orphan.try_wait()? {
            break Some(status);
        }
        if std::time::Instant::now() > deadline {
            let _ = orphan.kill();
            let _ = orphan.wait();
            break None;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let reaped = reaped.context("the sweeper left the orphan process running")?;
    assert!(!reaped.success());
    assert!(removed.iter().any(|r| r.contains(&name)), "{removed:?}");
    assert_gone(&[name], &[bpf]);
    assert!(list_netns()?.contains(&node.netns().name().to_string()));
    assert!(node.bpffs_dir().exists());
    Ok(())
}
