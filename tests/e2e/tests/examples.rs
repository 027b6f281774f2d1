//! The shipped chaining examples and the installer, run for real: the
//! conflists from `chaining-examples/` (only per-node paths rewritten, for
//! isolation) driven through the reference plugins and the real catena
//! binaries, seed 004's kube-ovn chain with ptp standing in for kube-ovn
//! (portmap hostPorts included), and `catena-agent install-cni` /
//! `uninstall-cni` on a conf dir a runtime then reads.

use anyhow::{bail, ensure, Context, Result};
use catena_api::{Endpoint, ServiceStatus};
use catena_e2e::{pod_yaml, service_yaml, write_manifest};
use catena_lab::{
    bin_path, count_backends, Agent, CallArgs, CniRunner, Conflist, Node, Pod, Server,
};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

const VIP: &str = "10.96.0.20";
const TIMEOUT: Duration = Duration::from_secs(3);

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn example(rel: &str) -> PathBuf {
    root().join("chaining-examples").join(rel)
}

fn vip() -> SocketAddr {
    format!("{VIP}:80").parse().unwrap()
}

/// The per-node rewrites, and nothing else: host-local's `dataDir` into the
/// node's dir, catena's `agentSocket`/`stateDir` to the node's agent. The
/// subnet, the plugin options and the order stay as shipped.
fn localize(node: &Node, mut conf: Value) -> Result<Conflist> {
    let plugins = conf["plugins"]
        .as_array_mut()
        .context("the conflist has no plugins array")?;
    let (mut ipam, mut catena) = (0, 0);
    for p in plugins {
        if p["ipam"]["type"] == "host-local" {
            p["ipam"]["dataDir"] = json!(node.ipam_dir());
            ipam += 1;
        }
        if p["type"] == "catena-cni" {
            p["agentSocket"] = json!(node.agent_socket());
            p["stateDir"] = json!(node.state_dir());
            catena += 1;
        }
    }
    ensure!(
        ipam == 1 && catena == 1,
        "expected one host-local and one catena-cni entry, found {ipam} and {catena}: {conf}"
    );
    Ok(Conflist::from_value(conf)?)
}

/// An agent in standalone mode serving Service `web` (selector app=web,
/// 80 -> 8080) with pods web-1 and web-2 labelled for it.
fn start_agent(node: &Node) -> Result<Agent<'_>> {
    let manifests = node.dir().join("manifests");
    write_manifest(
        &manifests,
        "web.yaml",
        &service_yaml("web", VIP, 80, 8080, Some("web")),
    )?;
    write_manifest(
        &manifests,
        "pods.yaml",
        &format!(
            "{}---\n{}",
            pod_yaml("web-1", "web"),
            pod_yaml("web-2", "web")
        ),
    )?;
    node.start_agent(&manifests, &[])
}

/// A client and the two Service backends, ADDed through `cni` and serving.
struct Pods {
    client: Pod,
    web: [Pod; 2],
    _servers: Vec<Server>,
}

impl Pods {
    fn all(&self) -> [&Pod; 3] {
        [&self.client, &self.web[0], &self.web[1]]
    }
}

fn add_pods(node: &Node, cni: &CniRunner, backend_args: &CallArgs) -> Result<Pods> {
    let client = node.pod("client")?;
    let web = [node.pod("web-1")?, node.pod("web-2")?];
    cni.add(&client, "eth0", &CallArgs::default())?;
    for pod in &web {
        cni.add(pod, "eth0", backend_args)?;
    }
    let servers = vec![
        web[0].serve_tcp(8080, "web-1")?,
        web[1].serve_tcp(8080, "web-2")?,
    ];
    Ok(Pods {
        client,
        web,
        _servers: servers,
    })
}

/// Every pod is a registered endpoint on the host peer of its eth0, the
/// Service has both backends, and ClusterIP traffic reaches both, with
/// replies from the VIP.
fn assert_service_works(node: &Node, agent: &Agent, pods: &Pods) -> Result<()> {
    let api = agent.client();
    let endpoints: Vec<Endpoint> = api.get("/v1/endpoints")?;
    ensure!(endpoints.len() == 3, "{endpoints:?}");
    for pod in pods.all() {
        let ep = endpoints
            .iter()
            .find(|e| e.spec.container_id == pod.container_id)
            .with_context(|| format!("pod {} not registered: {endpoints:?}", pod.name))?;
        ensure!(
            ep.spec.host_ifname == pod.host_veth(node, "eth0")?,
            "{ep:?}"
        );
        ensure!(ep.spec.pod.name == pod.name, "{ep:?}");
    }
    let services: Vec<ServiceStatus> = api.get("/v1/services")?;
    let mut backends = services
        .iter()
        .find(|s| s.frontend == format!("{VIP}:80/TCP"))
        .with_context(|| format!("no frontend for {VIP}: {services:?}"))?
        .backends
        .clone();
    backends.sort();
    let mut want = vec![
        format!("{}:8080", pods.web[0].ipv4()?),
        format!("{}:8080", pods.web[1].ipv4()?),
    ];
    want.sort();
    ensure!(backends == want, "backends {backends:?}, want {want:?}");

    let reply = pods.client.tcp_request(vip(), TIMEOUT)?;
    ensure!(
        reply.peer == vip(),
        "the reply must come from the VIP, not the backend: {reply:?}"
    );
    let counts = count_backends(&pods.client, vip(), 40)?;
    ensure!(
        counts.get("web-1").copied().unwrap_or(0) >= 5
            && counts.get("web-2").copied().unwrap_or(0) >= 5
            && counts.values().sum::<usize>() == 40,
        "both backends must answer every request: {counts:?}"
    );
    Ok(())
}

/// After every pod's DEL: no endpoint, no link pin, no pod interface (only
/// `keep` may remain), no host-local lease, no iptables rule naming a pod.
fn assert_node_clean(
    node: &Node,
    agent: &Agent,
    network: &str,
    container_ids: &[String],
    keep: &[&str],
) -> Result<()> {
    let endpoints: Vec<Endpoint> = agent.client().get("/v1/endpoints")?;
    ensure!(endpoints.is_empty(), "endpoints left: {endpoints:?}");
    let pins = dir_names(&node.bpffs_dir().join("links"));
    ensure!(pins.is_empty(), "link pins left: {pins:?}");
    let links: Vec<String> = node
        .netns()
        .links()?
        .into_iter()
        .filter(|l| l != "lo" && !keep.contains(&l.as_str()))
        .collect();
    ensure!(links.is_empty(), "interfaces left in the node: {links:?}");
    let leases: Vec<String> = dir_names(&node.ipam_dir().join(network))
        .into_iter()
        .filter(|f| f.parse::<std::net::IpAddr>().is_ok())
        .collect();
    ensure!(leases.is_empty(), "host-local leases left: {leases:?}");
    let nat = iptables_nat(node)?;
    for id in container_ids {
        ensure!(
            !nat.contains(id.as_str()),
            "iptables rules for {id} left:\n{nat}"
        );
    }
    Ok(())
}

fn dir_names(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return vec![];
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// The node netns's nat table (plugins comment their rules with the container id).
fn iptables_nat(node: &Node) -> Result<String> {
    node.netns().run("iptables-save", &["-t", "nat"])
}

/// One TCP request from the node's own network namespace.
fn node_tcp_request(node: &Node, addr: SocketAddr) -> Result<std::io::Result<String>> {
    node.netns().enter_thread(move || {
        let s = TcpStream::connect_timeout(&addr, TIMEOUT)?;
        s.set_read_timeout(Some(TIMEOUT))?;
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line)?;
        Ok(line.trim_end().to_string())
    })
}

/// Runs the example conflist in `folder` for real: ADD, service traffic,
/// CHECK, DEL, and checks that DEL left nothing behind.
fn run_example(folder: &str, file: &str, keep: &[&str]) -> Result<()> {
    let node = Node::new(&format!("ex-{folder}"))?;
    let agent = start_agent(&node)?;
    let shipped = Conflist::from_file(&example(&format!("{folder}/{file}")))?;
    ensure!(
        shipped.plugin_types().last() == Some(&"catena-cni"),
        "{:?}",
        shipped.plugin_types()
    );
    let conf = localize(&node, shipped.raw.clone())?;
    let network = conf.name.clone();
    let cni = CniRunner::new(&node, conf);
    let pods = add_pods(&node, &cni, &CallArgs::default())?;
    for pod in pods.all() {
        ensure!(
            pod.result().unwrap().raw["cniVersion"] == shipped.cni_version.as_str(),
            "{:?}",
            pod.result()
        );
    }
    assert_service_works(&node, &agent, &pods)?;
    for pod in pods.all() {
        cni.check(pod, "eth0", &CallArgs::default())
            .with_context(|| format!("CHECK {}", pod.name))?;
    }

    let ids: Vec<String> = pods.all().iter().map(|p| p.container_id.clone()).collect();
    // Both examples masquerade (ipMasq): the primary's per-pod rules exist
    // now, so the "gone after DEL" check below can fail.
    let nat = iptables_nat(&node)?;
    ensure!(
        ids.iter().all(|id| nat.contains(id.as_str())),
        "ipMasq rules expected for every pod:\n{nat}"
    );
    for pod in pods.all() {
        cni.del(pod, "eth0", &CallArgs::default())?;
    }
    assert_node_clean(&node, &agent, &network, &ids, keep)
}

#[test]
fn generic_veth_example_runs_for_real() -> Result<()> {
    run_example("generic-veth", "05-catena.conflist", &[])
}

#[test]
fn bridge_example_runs_for_real() -> Result<()> {
    // The bridge plugin leaves its bridge in place on DEL (by design).
    run_example("bridge", "05-catena.conflist", &["cni0"])
}

/// Seed 004's conflist from the kube-ovn example's ConfigMap, with the
/// kube-ovn entry (which needs OVS and the kube-ovn daemon) replaced by
/// ptp with host-local; cniVersion 0.3.1, portmap (snat, portMappings) and
/// catena-cni as shipped.
fn seed_004_conflist(node: &Node) -> Result<Conflist> {
    let cm: Value = serde_yaml::from_str(&std::fs::read_to_string(example(
        "kube-ovn/configmap.yaml",
    ))?)?;
    let text = cm["data"]["cni-config"]
        .as_str()
        .context("configmap.yaml has no data.cni-config")?;
    let mut conf: Value = serde_json::from_str(text)?;
    ensure!(conf["cniVersion"] == "0.3.1", "{conf}");
    let plugins = conf["plugins"].as_array_mut().context("no plugins")?;
    let types: Vec<&str> = plugins
        .iter()
        .map(|p| p["type"].as_str().unwrap_or(""))
        .collect();
    ensure!(types == ["kube-ovn", "portmap", "catena-cni"], "{types:?}");
    ensure!(
        plugins[1]["snat"] == true && plugins[1]["capabilities"]["portMappings"] == true,
        "{}",
        plugins[1]
    );
    plugins[0] = json!({
        "type": "ptp",
        "mtu": 1400,
        "ipMasq": false,
        "ipam": {
            "type": "host-local",
            "ranges": [[{"subnet": "10.244.5.0/24"}]],
            "routes": [{"dst": "0.0.0.0/0"}],
        },
    });
    localize(node, conf)
}

#[test]
fn seed_004_chain_with_portmap_hostport_and_clusterip() -> Result<()> {
    const HOST_PORT: u16 = 30080;
    let node = Node::new("ex-seed004")?;
    // A node address that exists only in the test's node netns (on its lo:
    // no dummy module needed).
    node.netns()
        .run("ip", &["addr", "add", "192.0.2.1/32", "dev", "lo"])?;
    let agent = start_agent(&node)?;
    let conf = seed_004_conflist(&node)?;
    assert_eq!(conf.plugin_types(), ["ptp", "portmap", "catena-cni"]);
    let network = conf.name.clone();
    let cni = CniRunner::new(&node, conf);

    // web-1 and web-2 both ask for the same hostPort would conflict; only
    // web-1 gets one (the runtime passes portMappings per pod).
    let mapping = json!([{"hostPort": HOST_PORT, "containerPort": 8080, "protocol": "tcp"}]);
    let client = node.pod("client")?;
    let web = [node.pod("web-1")?, node.pod("web-2")?];
    cni.add(&client, "eth0", &CallArgs::default())?;
    let with_mapping = CallArgs::default().with_capability("portMappings", mapping);
    let r = cni.add(&web[0], "eth0", &with_mapping)?;
    // catena answers in the conflist's version, passing the result through.
    assert_eq!(r.raw["cniVersion"], "0.3.1", "{:?}", r.raw);
    cni.add(&web[1], "eth0", &CallArgs::default())?;
    let servers = vec![
        web[0].serve_tcp(8080, "web-1")?,
        web[1].serve_tcp(8080, "web-2")?,
    ];
    let pods = Pods {
        client,
        web,
        _servers: servers,
    };
    assert_service_works(&node, &agent, &pods)?;

    // hostPort: portmap's DNAT in the node netns, from the node itself
    // (OUTPUT) and from a pod (PREROUTING), next to catena's eBPF.
    let host_port: SocketAddr = format!("192.0.2.1:{HOST_PORT}").parse()?;
    // snat: true is what makes localhost work (portmap masquerades it).
    let localhost: SocketAddr = format!("127.0.0.1:{HOST_PORT}").parse()?;
    for _ in 0..3 {
        assert_eq!(node_tcp_request(&node, host_port)??, "web-1");
        assert_eq!(node_tcp_request(&node, localhost)??, "web-1");
        assert_eq!(pods.client.tcp_request(host_port, TIMEOUT)?.text, "web-1");
    }
    let web1_id = pods.web[0].container_id.clone();
    let nat = iptables_nat(&node)?;
    assert!(
        nat.contains(&web1_id) && nat.contains(&format!("--dport {HOST_PORT}")),
        "{nat}"
    );

    let ids: Vec<String> = pods.all().iter().map(|p| p.container_id.clone()).collect();
    // Below 0.4.0 libcni reads no cache on DEL: the runtime passes the pod's
    // portMappings again (containerd keeps them with the sandbox), and
    // portmap needs them to find its rules.
    cni.del(&pods.web[0], "eth0", &with_mapping)?;
    cni.del(&pods.web[1], "eth0", &CallArgs::default())?;
    cni.del(&pods.client, "eth0", &CallArgs::default())?;
    assert_node_clean(&node, &agent, &network, &ids, &[])?;
    let nat = iptables_nat(&node)?;
    assert!(!nat.contains(&format!("--dport {HOST_PORT}")), "{nat}");
    match node_tcp_request(&node, host_port)? {
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
        other => panic!("the hostPort still answers after DEL: {other:?}"),
    }
    Ok(())
}

/// Every file in `dir` (hidden ones too), by name.
fn snapshot(dir: &Path) -> Result<BTreeMap<String, Vec<u8>>> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        out.insert(
            e.file_name().to_string_lossy().into_owned(),
            std::fs::read(e.path())?,
        );
    }
    Ok(out)
}

/// The configuration a runtime uses: libcni's `ConfFiles` (.conf, .conflist,
/// .json), sorted by name, first one.
fn runtime_pick(dir: &Path) -> Result<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && matches!(
                    p.extension().and_then(|e| e.to_str()),
                    Some("conf" | "conflist" | "json")
                )
        })
        .collect();
    files.sort();
    files
        .into_iter()
        .next()
        .with_context(|| format!("no CNI configuration in {}", dir.display()))
}

/// The real `catena-agent <subcommand> --cni-conf-dir D --cni-bin-dir B ARGS..`.
fn installer(sub: &str, conf_dir: &Path, bin_dir: &Path, args: &[&str]) -> Result<Output> {
    let out = Command::new(bin_path("catena-agent")?)
        .arg(sub)
        .arg("--cni-conf-dir")
        .arg(conf_dir)
        .arg("--cni-bin-dir")
        .arg(bin_dir)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running catena-agent {sub}"))?;
    Ok(out)
}

fn succeeded(sub: &str, out: Output) -> Result<String> {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "catena-agent {sub} failed ({}): {stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(stdout)
}

/// A process started by the test, killed (by its own handle) however the test ends.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn installer_end_to_end_install_pods_uninstall() -> Result<()> {
    let node = Node::new("ex-install")?;
    let mut agent = start_agent(&node)?;
    let conf_dir = node.conf_dir();
    let bin_dir = node.dir().join("bin");
    std::fs::create_dir_all(&bin_dir)?;

    // The primary's own file, laid out the way its installer wrote it
    // (uneven spacing, key order) so "byte for byte" means something.
    let ptp_entry = format!(
        r#"{{ "type":"ptp",  "ipMasq" : false,
      "ipam": {{"type": "host-local", "ranges": [[{{"subnet": "10.244.7.0/24"}}]],
               "routes": [{{"dst": "0.0.0.0/0"}}], "dataDir": {}}} }}"#,
        json!(node.ipam_dir())
    );
    let head = "{\n  \"cniVersion\": \"1.0.0\",\n  \"name\": \"ptpnet\",\n  \"plugins\": [\n    ";
    let tail = "\n  ]\n}\n";
    let primary = format!("{head}{ptp_entry}{tail}");
    std::fs::write(conf_dir.join("10-ptp.conflist"), &primary)?;
    std::fs::write(
        conf_dir.join("99-loopback.conf"),
        r#"{"cniVersion":"0.3.1","name":"lo","type":"loopback"}"#,
    )?;
    let original = snapshot(&conf_dir)?;
    assert_eq!(runtime_pick(&conf_dir)?, conf_dir.join("10-ptp.conflist"));

    // An older catena-cni is executing from the bin dir while the new one is
    // installed: writing into it would fail with ETXTBSY; a rename does not.
    let installed = bin_dir.join("catena-cni");
    std::fs::copy("/bin/sleep", &installed)?;
    let old_inode = std::fs::metadata(&installed)?.ino();
    // A fork by another test thread while `copy` held the file open for
    // writing makes exec fail with ETXTBSY until that child execs: retry.
    let mut tries = 0;
    let running = KillOnDrop(loop {
        match Command::new(&installed).arg("60").spawn() {
            Err(e) if e.raw_os_error() == Some(ETXTBSY) && tries < 50 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => break other?,
        }
    });

    let source = bin_path("catena-cni")?;
    let socket = node.agent_socket().display().to_string();
    let state = node.state_dir().display().to_string();
    let args = [
        "--chaining-mode",
        "generic-veth",
        "--cni-binary",
        source.to_str().unwrap(),
        "--cni-agent-socket",
        &socket,
        "--cni-state-dir",
        &state,
    ];
    let report = succeeded(
        "install-cni",
        installer("install-cni", &conf_dir, &bin_dir, &args)?,
    )?;
    assert!(
        report.contains("written") && report.contains("10-ptp.conflist"),
        "{report}"
    );

    // The runtime now picks catena's file: the primary's bytes with catena
    // appended as the last plugin.
    let picked = runtime_pick(&conf_dir)?;
    assert_eq!(picked, conf_dir.join("05-catena.conflist"));
    let chained = std::fs::read_to_string(&picked)?;
    let kept = format!("{head}{ptp_entry}");
    assert!(chained.starts_with(&kept), "{chained}");
    assert!(chained.ends_with(tail), "{chained}");
    let appended: Value = serde_json::from_str(
        chained[kept.len()..chained.len() - tail.len()]
            .trim_start()
            .strip_prefix(',')
            .context("a separator after the primary's entry")?,
    )?;
    assert_eq!(
        appended,
        json!({"type": "catena-cni", "agentSocket": socket, "stateDir": state})
    );
    let mut others = snapshot(&conf_dir)?;
    others.remove("05-catena.conflist");
    assert_eq!(others, original, "the primary's files are untouched");

    // The binary: replaced by rename (new inode, the running old one is
    // unharmed), complete, executable, no temp file left.
    let meta = std::fs::metadata(&installed)?;
    assert_ne!(meta.ino(), old_inode, "catena-cni was written in place");
    assert_eq!(meta.permissions().mode() & 0o777, 0o755);
    assert_eq!(std::fs::read(&installed)?, std::fs::read(&source)?);
    assert_eq!(dir_names(&bin_dir), ["catena-cni"]);
    drop(running);

    // Idempotent: a second run (an init container restart) changes nothing.
    let before = snapshot(&conf_dir)?;
    let report = succeeded(
        "install-cni",
        installer("install-cni", &conf_dir, &bin_dir, &args)?,
    )?;
    assert!(report.contains("unchanged"), "{report}");
    assert_eq!(snapshot(&conf_dir)?, before);
    assert_eq!(std::fs::metadata(&installed)?.ino(), meta.ino());
    // ...unless the copy lost its exec bit: then it is replaced again.
    std::fs::set_permissions(&installed, std::fs::Permissions::from_mode(0o644))?;
    succeeded(
        "install-cni",
        installer("install-cni", &conf_dir, &bin_dir, &args)?,
    )?;
    assert_eq!(
        std::fs::metadata(&installed)?.permissions().mode() & 0o777,
        0o755
    );
    assert_eq!(snapshot(&conf_dir)?, before);

    // Pods created with the picked conflist, through the installed binary.
    let cni = CniRunner::new(&node, Conflist::from_file(&picked)?)
        .with_cni_path(vec!["/usr/lib/cni".into(), bin_dir.clone()]);
    let pods = add_pods(&node, &cni, &CallArgs::default())?;
    assert_service_works(&node, &agent, &pods)?;

    // With the agent gone and catena's file still in place, no pod can
    // start (fail closed, code 11): the state Cilium #27715 left nodes in.
    agent.stop()?;
    let late = node.pod("late")?;
    let err = cni
        .add(&late, "eth0", &CallArgs::default())
        .expect_err("ADD through catena with the agent stopped");
    assert_eq!(err.plugin_error().map(|e| e.code), Some(11), "{err}");
    cni.del(&late, "eth0", &CallArgs::default())?; // what the runtime does after a failed ADD

    // Uninstall: the directory is byte for byte what it was.
    let report = succeeded(
        "uninstall-cni",
        installer("uninstall-cni", &conf_dir, &bin_dir, &args)?,
    )?;
    assert!(report.contains("10-ptp.conflist"), "{report}");
    assert_eq!(snapshot(&conf_dir)?, original);

    // A pod now starts with the primary alone, the agent still stopped.
    let picked = runtime_pick(&conf_dir)?;
    assert_eq!(picked, conf_dir.join("10-ptp.conflist"));
    let primary_only = CniRunner::new(&node, Conflist::from_file(&picked)?)
        .with_cni_path(vec!["/usr/lib/cni".into(), bin_dir.clone()]);
    assert_eq!(primary_only.conflist().plugin_types(), ["ptp"]);
    let r = primary_only.add(&late, "eth0", &CallArgs::default())?;
    assert!(r.ipv4().is_some(), "{:?}", r.raw);
    assert!(late.host_veth(&node, "eth0").is_ok());
    primary_only.del(&late, "eth0", &CallArgs::default())?;

    // Pods created chained are still deleted through their cached chained
    // config: the binary stays, and DEL succeeds with the agent down.
    assert!(installed.is_file());
    for pod in pods.all() {
        cni.del(pod, "eth0", &CallArgs::default())?;
    }
    let links: Vec<String> = node
        .netns()
        .links()?
        .into_iter()
        .filter(|l| l != "lo")
        .collect();
    assert!(links.is_empty(), "{links:?}");
    Ok(())
}

#[test]
fn custom_conf_from_the_kube_ovn_configmap() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let cm: Value = serde_yaml::from_str(&std::fs::read_to_string(example(
        "kube-ovn/configmap.yaml",
    ))?)?;
    let cni_config = cm["data"]["cni-config"]
        .as_str()
        .context("no data.cni-config")?
        .to_string();
    let custom = tmp.path().join("cni-config");
    std::fs::write(&custom, &cni_config)?;
    let source = bin_path("catena-cni")?;
    let args = |file: &Path| -> Vec<String> {
        vec![
            "--custom-conf".into(),
            file.display().to_string(),
            "--cni-binary".into(),
            source.display().to_string(),
        ]
    };
    // A node after seed 004's step 4: kube-ovn's file renamed to 10-.
    let node_dirs = |name: &str| -> Result<(PathBuf, PathBuf)> {
        let conf = tmp.path().join(name).join("net.d");
        let bin = tmp.path().join(name).join("bin");
        std::fs::create_dir_all(&conf)?;
        std::fs::create_dir_all(&bin)?;
        std::fs::copy(
            example("kube-ovn/01-kube-ovn.conflist"),
            conf.join("10-kube-ovn.conflist"),
        )?;
        Ok((conf, bin))
    };
    let run = |conf: &Path, bin: &Path, file: &Path| -> Result<Output> {
        let a = args(file);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        installer("install-cni", conf, bin, &a)
    };

    let (conf, bin) = node_dirs("good")?;
    succeeded("install-cni", run(&conf, &bin, &custom)?)?;
    assert_eq!(
        std::fs::read_to_string(conf.join("05-catena.conflist"))?,
        cni_config,
        "installed verbatim"
    );
    assert_eq!(runtime_pick(&conf)?, conf.join("05-catena.conflist"));
    assert!(bin.join("catena-cni").is_file());

    // Broken ConfigMaps: a clear message, and nothing in the conf dir changes
    // (neither on this node, which has a good install, nor on a fresh one).
    let broken_json = tmp.path().join("broken-json");
    std::fs::write(
        &broken_json,
        cni_config.replace("\"catena-cni\"\n", "\"catena-cni\",\n"),
    )?;
    let without_catena = tmp.path().join("seed-as-is");
    std::fs::write(
        &without_catena,
        cni_config.replace("\"catena-cni\"", "\"cilium-cni\""),
    )?;
    assert_ne!(std::fs::read_to_string(&broken_json)?, cni_config);
    let cases: [(&Path, &[&str]); 2] = [
        (&broken_json, &["not valid JSON at line", "cni.customConf"]),
        (
            &without_catena,
            &[
                "no plugin of type \"catena-cni\"",
                "cilium-cni",
                "cni.customConf",
            ],
        ),
    ];
    let (fresh_conf, fresh_bin) = node_dirs("fresh")?;
    for (file, wants) in cases {
        for (c, b) in [(&conf, &bin), (&fresh_conf, &fresh_bin)] {
            let before = snapshot(c)?;
            let bin_before = snapshot(b)?;
            let out = run(c, b, file)?;
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{file:?} was accepted");
            for want in wants {
                assert!(stderr.contains(want), "{file:?}: want {want:?} in {stderr}");
            }
            assert!(stderr.contains(&file.display().to_string()), "{stderr}");
            assert_eq!(snapshot(c)?, before, "{file:?} changed the conf dir");
            assert_eq!(snapshot(b)?, bin_before, "{file:?} changed the bin dir");
        }
    }
    Ok(())
}

/// `ETXTBSY` (Linux): "Text file busy".
const ETXTBSY: i32 = 26;
