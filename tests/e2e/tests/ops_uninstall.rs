//! `catena-agent uninstall` takes catena off a node completely: no link, no
//! pin, no state file, no conflist entry is left, the cgroup and every pod
//! veth run none of catena's programs, and a pod created afterwards starts
//! with the primary alone.

use catena_e2e::{service_yaml, TestCgroup};
use catena_lab::{bin_path, tcx_program_counts, CallArgs, CniRunner, Conflist, Node};
use serde_json::Value;
use std::path::Path;
use std::process::{Command, Output, Stdio};

fn agent_cmd(sub: &str, node: &Node, bin_dir: &Path, extra: &[&str]) -> anyhow::Result<Output> {
    let mut cmd = Command::new(bin_path("catena-agent")?);
    cmd.arg(sub)
        .arg("--cni-conf-dir")
        .arg(node.conf_dir())
        .arg("--cni-bin-dir")
        .arg(bin_dir)
        .args(extra)
        .stdin(Stdio::null());
    // Run in the node's namespace, where the pod veths are.
    node.netns().output(cmd)
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Programs attached to `cgroup` (any attach type), as the kernel reports.
fn cgroup_programs(cgroup: &Path) -> anyhow::Result<usize> {
    let o = Command::new("bpftool")
        .args(["-j", "cgroup", "show"])
        .arg(cgroup)
        .output()?;
    anyhow::ensure!(o.status.success(), "bpftool: {}", text(&o));
    if o.stdout.iter().all(u8::is_ascii_whitespace) {
        return Ok(0);
    }
    let v: Value = serde_json::from_slice(&o.stdout)?;
    Ok(v.as_array().map_or(0, Vec::len))
}

/// Ids of every BPF link on the machine and the program each runs.
fn all_link_programs() -> anyhow::Result<Vec<u64>> {
    let o = Command::new("bpftool")
        .args(["-j", "link", "show"])
        .output()?;
    anyhow::ensure!(o.status.success(), "bpftool: {}", text(&o));
    let v: Value = serde_json::from_slice(&o.stdout)?;
    Ok(v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| l["prog_id"].as_u64())
        .collect())
}

#[test]
fn uninstall_leaves_nothing_behind() -> anyhow::Result<()> {
    let node = Node::new("ops-uninstall")?;
    let cgroup = TestCgroup::new("uninstall")?;
    let manifests = node.dir().join("manifests");
    catena_e2e::write_manifest(
        &manifests,
        "svc.yaml",
        &service_yaml("web", "10.96.0.60", 80, 8080, Some("web")),
    )?;
    let cg = cgroup.0.to_str().unwrap().to_string();
    let mut agent = node.start_agent(
        &manifests,
        &["--kube-proxy-replacement", "true", "--cgroup-root", &cg],
    )?;

    // The node as the chart leaves it: the primary's conflist plus catena's
    // chained copy written by install-cni.
    let bin_dir = node.dir().join("bin");
    std::fs::create_dir_all(&bin_dir)?;
    let primary = serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "ptpnet",
        "plugins": [{"type": "ptp", "ipam": {"type": "host-local", "subnet": "10.244.60.0/24",
            "routes": [{"dst": "0.0.0.0/0"}], "dataDir": node.ipam_dir()}}]
    });
    std::fs::write(
        node.conf_dir().join("10-ptp.conflist"),
        serde_json::to_vec_pretty(&primary)?,
    )?;
    let cni_bin = bin_path("catena-cni")?;
    let socket = node.agent_socket().display().to_string();
    let state = node.state_dir().display().to_string();
    let install_args = [
        "--chaining-mode",
        "generic-veth",
        "--cni-binary",
        cni_bin.to_str().unwrap(),
        "--cni-agent-socket",
        &socket,
        "--cni-state-dir",
        &state,
    ];
    let o = agent_cmd("install-cni", &node, &bin_dir, &install_args)?;
    anyhow::ensure!(o.status.success(), "install-cni: {}", text(&o));
    let chained = node.conf_dir().join("05-catena.conflist");
    let cni = CniRunner::new(&node, Conflist::from_file(&chained)?)
        .with_cni_path(vec!["/usr/lib/cni".into(), bin_dir.clone()]);
    let pods = [node.pod("a")?, node.pod("b")?];
    for pod in &pods {
        cni.add(pod, "eth0", &CallArgs::default())?;
        assert_eq!(
            tcx_program_counts(node.netns(), &pod.host_veth(&node, "eth0")?)?,
            (1, 1)
        );
    }
    assert!(
        cgroup_programs(&cgroup.0)? >= 4,
        "socket LB attached to the cgroup"
    );
    let programs: catena_api::Status = agent.client().get("/v1/status")?;
    let ours: Vec<u64> = programs
        .datapath
        .programs
        .values()
        .map(|i| u64::from(*i))
        .collect();

    // Refused while the agent runs: it would re-attach what is removed.
    let uninstall_args = [
        "--socket",
        &socket,
        "--bpffs-dir",
        node.bpffs_dir().to_str().unwrap(),
        "--state-dir",
        &state,
    ];
    let o = agent_cmd("uninstall", &node, &bin_dir, &uninstall_args)?;
    assert!(
        !o.status.success() && text(&o).contains("stop it first"),
        "{}",
        text(&o)
    );
    assert!(chained.exists(), "a refused uninstall changes nothing");

    agent.stop()?;
    let o = agent_cmd("uninstall", &node, &bin_dir, &uninstall_args)?;
    anyhow::ensure!(o.status.success(), "uninstall: {}", text(&o));
    println!("{}", text(&o).trim());

    // Nothing left: pins, state, socket, conflist entry, links, programs.
    assert!(
        !node.bpffs_dir().exists(),
        "pins remain under {}",
        node.bpffs_dir().display()
    );
    assert!(!node.state_dir().exists(), "state remains");
    assert!(!node.agent_socket().exists());
    for entry in std::fs::read_dir(node.conf_dir())? {
        let path = entry?.path();
        let content = std::fs::read_to_string(&path)?;
        assert!(
            !content.contains("catena-cni"),
            "{} still chains catena",
            path.display()
        );
    }
    for pod in &pods {
        let veth = pod.host_veth(&node, "eth0")?;
        assert_eq!(tcx_program_counts(node.netns(), &veth)?, (0, 0), "{veth}");
    }
    assert_eq!(
        cgroup_programs(&cgroup.0)?,
        0,
        "programs left on the cgroup"
    );
    let links = all_link_programs()?;
    assert!(
        !links.iter().any(|p| ours.contains(p)),
        "links still run catena's programs {ours:?}: {links:?}"
    );

    // A new pod starts with the primary alone (no agent running, none needed).
    let primary_only = CniRunner::new(
        &node,
        Conflist::from_file(&node.conf_dir().join("10-ptp.conflist"))?,
    )
    .with_cni_path(vec!["/usr/lib/cni".into(), bin_dir.clone()]);
    assert_eq!(primary_only.conflist().plugin_types(), ["ptp"]);
    let late = node.pod("late")?;
    let r = primary_only.add(&late, "eth0", &CallArgs::default())?;
    assert!(r.ipv4().is_some(), "{:?}", r.raw);
    assert_eq!(
        tcx_program_counts(node.netns(), &late.host_veth(&node, "eth0")?)?,
        (0, 0)
    );
    primary_only.del(&late, "eth0", &CallArgs::default())?;

    // Idempotent: a second run finds nothing to do.
    let o = agent_cmd("uninstall", &node, &bin_dir, &uninstall_args)?;
    anyhow::ensure!(o.status.success(), "second uninstall: {}", text(&o));
    assert!(
        text(&o).contains("pins absent; state absent"),
        "{}",
        text(&o)
    );
    Ok(())
}
