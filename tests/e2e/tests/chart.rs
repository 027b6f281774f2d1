//! The Helm chart (manifests/helm/catena), rendered and linted by real Helm
//! (helm-python-sdk, via tests/e2e/helm/render.py), every object parsed with
//! the Kubernetes API types; the plain manifests; and the chaining examples,
//! run through the installer the chart's init container runs.

use catena_agent::config::AgentConfig;
use catena_agent::install::{self, conflist, InstallArgs};
use clap::Parser;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Container, EnvVar, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde_json::Value;
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn chart_dir() -> PathBuf {
    root().join("manifests/helm/catena")
}

/// Every object kind the chart renders, parsed.
#[derive(Default)]
struct Objects {
    daemonsets: Vec<DaemonSet>,
    configmaps: Vec<ConfigMap>,
    service_accounts: Vec<ServiceAccount>,
    cluster_roles: Vec<ClusterRole>,
    cluster_role_bindings: Vec<ClusterRoleBinding>,
}

impl Objects {
    fn ds(&self) -> &DaemonSet {
        assert_eq!(self.daemonsets.len(), 1);
        &self.daemonsets[0]
    }
    fn pod_containers(&self) -> (&Vec<Container>, &Vec<Container>) {
        let spec = self.ds().spec.template.spec.as_ref().unwrap();
        (spec.init_containers.as_ref().unwrap(), &spec.containers)
    }
    fn agent(&self) -> &Container {
        let (_, c) = self.pod_containers();
        c.iter().find(|c| c.name == "catena-agent").unwrap()
    }
    fn init(&self, name: &str) -> Option<&Container> {
        self.pod_containers().0.iter().find(|c| c.name == name)
    }
    fn config(&self) -> BTreeMap<String, String> {
        assert_eq!(self.configmaps.len(), 1);
        self.configmaps[0].data.clone().unwrap_or_default()
    }
    /// The agent's command line as the kubelet runs it: `$(VAR)` expanded
    /// from the container's env, configMapKeyRef resolved from the rendered
    /// ConfigMap.
    fn agent_argv(&self) -> Vec<String> {
        let agent = self.agent();
        let env = resolve_env(agent.env.as_deref().unwrap_or_default(), &self.config());
        let mut argv = agent.command.clone().unwrap_or_default();
        for a in agent.args.clone().unwrap_or_default() {
            let mut s = a.clone();
            for (k, v) in &env {
                s = s.replace(&format!("$({k})"), v);
            }
            assert!(!s.contains("$("), "unresolved variable in {a}");
            argv.push(s);
        }
        argv
    }
    fn agent_env(&self) -> BTreeMap<String, String> {
        resolve_env(
            self.agent().env.as_deref().unwrap_or_default(),
            &self.config(),
        )
    }
}

fn resolve_env(env: &[EnvVar], config: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for e in env {
        if let Some(v) = &e.value {
            out.insert(e.name.clone(), v.clone());
        } else if let Some(r) = e
            .value_from
            .as_ref()
            .and_then(|f| f.config_map_key_ref.as_ref())
        {
            assert_eq!(r.name, "catena-config");
            let v = config
                .get(&r.key)
                .unwrap_or_else(|| panic!("env {} refers to missing key {}", e.name, r.key));
            out.insert(e.name.clone(), v.clone());
        }
    }
    out
}

struct Rendered {
    manifests: BTreeMap<String, String>,
    crds: Vec<(String, String)>,
    lint: Option<Value>,
    objects: Objects,
}

enum Outcome {
    Ok(Box<Rendered>),
    /// Helm refused (a template `fail`, a schema violation): the message.
    Refused(String),
}

/// Run the render helper. `None` only when helm-python-sdk is missing.
/// Without helm-python-sdk the chart tests cannot run: loudly skipped on a
/// developer's machine, a failure in CI (where tests/setup.sh installs it),
/// so a green CI always means the chart was really rendered.
fn skip(why: &str) {
    assert!(
        std::env::var_os("CI").is_none(),
        "chart tests need real Helm in CI: {why}"
    );
    eprintln!("\n!!!!!!!! SKIPPED: {why} !!!!!!!!\n");
}

fn helm(sets: &[&str], files: &[&Path], lint: bool) -> Option<Outcome> {
    let mut cmd = Command::new("python3");
    cmd.arg(root().join("tests/e2e/helm/render.py"))
        .arg(chart_dir());
    for s in sets {
        cmd.args(["--set", s]);
    }
    for f in files {
        cmd.arg("-f").arg(f);
    }
    if lint {
        cmd.arg("--lint");
    }
    let out = cmd
        .output()
        .expect("running python3 tests/e2e/helm/render.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "render.py printed no JSON ({e}); stderr:\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    match out.status.code() {
        Some(0) => {}
        Some(2) => {
            return Some(Outcome::Refused(
                v["error"]["message"].as_str().unwrap().into(),
            ))
        }
        Some(3) => {
            skip(v["missing"].as_str().unwrap_or("helm-python-sdk missing"));
            return None;
        }
        other => panic!("render.py exited {other:?}: {stdout}"),
    }
    let manifests: BTreeMap<String, String> =
        serde_json::from_value(v["manifests"].clone()).unwrap();
    let crds = v["crds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap().to_owned(),
                c["data"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let mut objects = Objects::default();
    for (path, text) in &manifests {
        if path.ends_with("NOTES.txt") {
            continue;
        }
        parse_objects(path, text, &mut objects);
    }
    Some(Outcome::Ok(Box::new(Rendered {
        manifests,
        crds,
        lint: v.get("lint").cloned(),
        objects,
    })))
}

fn render(sets: &[&str]) -> Option<Rendered> {
    render_files(sets, &[])
}

fn render_files(sets: &[&str], files: &[&Path]) -> Option<Rendered> {
    match helm(sets, files, true)? {
        Outcome::Ok(r) => {
            assert_lint_clean(&r, sets);
            Some(*r)
        }
        Outcome::Refused(m) => panic!("helm refused {sets:?} {files:?}: {m}"),
    }
}

fn assert_lint_clean(r: &Rendered, what: &[&str]) {
    let lint = r.lint.as_ref().unwrap();
    let errors: Vec<&Value> = lint["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["severity"].as_i64().unwrap() >= 2)
        .collect();
    assert!(errors.is_empty(), "helm lint {what:?}: {errors:?}");
    assert!(
        lint["errors"].as_array().is_none_or(|e| e.is_empty()),
        "{lint}"
    );
}

/// Parse every YAML document with its Kubernetes type, and check the type
/// understood every field: serialising it back must give the same document,
/// so a misspelt field (which serde would silently drop) fails here.
fn parse_objects(path: &str, text: &str, objects: &mut Objects) {
    for doc in serde_yaml::Deserializer::from_str(text) {
        let yaml = serde_yaml::Value::deserialize(doc).unwrap_or_else(|e| panic!("{path}: {e}"));
        if yaml.is_null() {
            continue;
        }
        let json: Value = serde_json::to_value(&yaml).unwrap();
        let kind = json["kind"]
            .as_str()
            .unwrap_or_else(|| panic!("{path}: no kind"))
            .to_owned();
        fn typed<T: serde::de::DeserializeOwned + serde::Serialize>(path: &str, json: &Value) -> T {
            let t: T =
                serde_json::from_value(json.clone()).unwrap_or_else(|e| panic!("{path}: {e}"));
            let back = serde_json::to_value(&t).unwrap();
            assert_eq!(
                &back, json,
                "{path}: fields the Kubernetes type does not know"
            );
            t
        }
        match kind.as_str() {
            "DaemonSet" => objects.daemonsets.push(typed(path, &json)),
            "ConfigMap" => objects.configmaps.push(typed(path, &json)),
            "ServiceAccount" => objects.service_accounts.push(typed(path, &json)),
            "ClusterRole" => objects.cluster_roles.push(typed(path, &json)),
            "ClusterRoleBinding" => objects.cluster_role_bindings.push(typed(path, &json)),
            other => panic!("{path}: unexpected kind {other}"),
        }
    }
}

use serde::Deserialize;

/// `InstallArgs` as clap parses the init container's command line.
#[derive(Parser)]
struct InstallCmd {
    #[command(flatten)]
    args: InstallArgs,
}

/// The init container's installer arguments, parsed by the installer's own
/// clap definition (so a flag the chart invents fails here).
fn install_args_of(c: &Container, subcommand: &str) -> InstallArgs {
    let cmd = c.command.clone().unwrap();
    assert_eq!(cmd, ["/usr/local/bin/catena-agent", subcommand]);
    let argv = std::iter::once(subcommand.to_owned()).chain(c.args.clone().unwrap_or_default());
    InstallCmd::try_parse_from(argv)
        .unwrap_or_else(|e| panic!("{subcommand} args {:?}: {e}", c.args))
        .args
}

/// Point the container paths of `a` at a throwaway node under `dir`.
fn relocate(a: &mut InstallArgs, dir: &Path) {
    let host = |p: &Path| dir.join(p.strip_prefix("/").unwrap());
    a.cni_conf_dir = host(&a.cni_conf_dir);
    a.cni_bin_dir = host(&a.cni_bin_dir);
    let fake = dir.join("image/catena-cni");
    fs::create_dir_all(fake.parent().unwrap()).unwrap();
    fs::write(&fake, b"catena-cni from the image").unwrap();
    a.cni_binary = fake;
    if let Some(c) = &a.custom_conf {
        a.custom_conf = Some(host(c));
    }
    fs::create_dir_all(&a.cni_conf_dir).unwrap();
}

const MODES: [&str; 6] = [
    "generic-veth",
    "kube-ovn",
    "calico",
    "flannel",
    "portmap",
    "none",
];
const SEED_004: [&str; 6] = [
    "cni.chainingMode=generic-veth",
    "cni.customConf=true",
    "cni.configMap=cni-configuration",
    "tunnel=disabled",
    "enableIPv4Masquerade=false",
    "enableIdentityMark=false",
];

#[test]
fn every_chaining_mode_renders_lints_and_parses() {
    for mode in MODES {
        let set = format!("cni.chainingMode={mode}");
        let Some(r) = render(&[&set]) else { return };
        let o = &r.objects;
        assert_eq!(o.service_accounts.len(), 1);
        assert_eq!(o.cluster_roles.len(), 1);
        assert_eq!(o.cluster_role_bindings.len(), 1);
        let install = o.init("install-cni").expect("install-cni init container");
        let a = install_args_of(install, "install-cni");
        assert_eq!(
            a.chaining_mode,
            <install::ChainingMode as clap::ValueEnum>::from_str(mode, false).unwrap()
        );
        assert_eq!(a.cni_conf_dir, Path::new("/host/etc/cni/net.d"));
        assert_eq!(a.cni_bin_dir, Path::new("/host/opt/cni/bin"));
        assert_eq!(a.conf_file_name, "05-catena.conflist");
        assert!(!a.exclusive, "chaining must not move the primary's files");
        assert_eq!(a.custom_conf, None);
        // The mounts those paths live on.
        let mounts: Vec<&str> = install
            .volume_mounts
            .as_ref()
            .unwrap()
            .iter()
            .map(|m| m.mount_path.as_str())
            .collect();
        assert!(mounts.contains(&"/host/etc/cni/net.d") && mounts.contains(&"/host/opt/cni/bin"));
        // No uninstall hook unless asked.
        assert!(o.agent().lifecycle.is_none());
    }
}

#[test]
fn chained_modes_install_a_conflist_with_catena_from_the_rendered_args() {
    // What the init container would write on a node that runs ptp, per mode.
    let primary =
        fs::read_to_string(root().join("chaining-examples/generic-veth/10-ptp.conflist")).unwrap();
    for mode in ["generic-veth", "portmap"] {
        let set = format!("cni.chainingMode={mode}");
        let Some(r) = render(&[&set]) else { return };
        let mut a = install_args_of(r.objects.init("install-cni").unwrap(), "install-cni");
        let node = tempfile::tempdir().unwrap();
        relocate(&mut a, node.path());
        fs::write(a.cni_conf_dir.join("10-ptp.conflist"), &primary).unwrap();
        let report = install::install(&a).unwrap();
        let written = fs::read_to_string(a.cni_conf_dir.join("05-catena.conflist")).unwrap();
        let parsed = conflist::parse(&written).unwrap();
        assert_eq!(
            conflist::plugin_types(&parsed),
            ["ptp", "portmap", "catena-cni"],
            "{mode}"
        );
        assert_eq!(report.binary.unwrap().0, a.cni_bin_dir.join("catena-cni"));
        assert_eq!(
            fs::read(a.cni_bin_dir.join("catena-cni")).unwrap(),
            b"catena-cni from the image"
        );
    }
    // Mode none writes no conflist, but still installs the binary.
    let Some(r) = render(&["cni.chainingMode=none"]) else {
        return;
    };
    let mut a = install_args_of(r.objects.init("install-cni").unwrap(), "install-cni");
    let node = tempfile::tempdir().unwrap();
    relocate(&mut a, node.path());
    fs::write(a.cni_conf_dir.join("10-ptp.conflist"), &primary).unwrap();
    assert_eq!(install::install(&a).unwrap().conflist, None);
    assert!(!a.cni_conf_dir.join("05-catena.conflist").exists());
}

#[test]
fn seed_004_kube_ovn_flags_work() {
    let Some(r) = render(&SEED_004) else { return };
    let o = &r.objects;
    let install = o.init("install-cni").unwrap();
    let mut a = install_args_of(install, "install-cni");
    assert_eq!(
        a.custom_conf.as_deref(),
        Some(Path::new("/etc/catena/cni-configuration/cni-config"))
    );
    // The ConfigMap is mounted where --custom-conf points.
    let spec = o.ds().spec.template.spec.as_ref().unwrap();
    let vol = spec
        .volumes
        .as_ref()
        .unwrap()
        .iter()
        .find(|v| v.name == "cni-configuration")
        .expect("cni-configuration volume");
    let cm = vol.config_map.as_ref().unwrap();
    assert_eq!(cm.name, "cni-configuration");
    assert_eq!(cm.items.as_ref().unwrap()[0].key, "cni-config");
    let mount = install
        .volume_mounts
        .as_ref()
        .unwrap()
        .iter()
        .find(|m| m.name == "cni-configuration")
        .unwrap();
    assert_eq!(mount.mount_path, "/etc/catena/cni-configuration");

    // Run the installer on a node laid out as the guide's: kube-ovn's
    // 10-kube-ovn.conflist (renamed, step 4) and the ConfigMap mounted.
    let node = tempfile::tempdir().unwrap();
    relocate(&mut a, node.path());
    let example = root().join("chaining-examples/kube-ovn");
    fs::copy(
        example.join("01-kube-ovn.conflist"),
        a.cni_conf_dir.join("10-kube-ovn.conflist"),
    )
    .unwrap();
    let cm: ConfigMap =
        serde_yaml::from_str(&fs::read_to_string(example.join("configmap.yaml")).unwrap()).unwrap();
    assert_eq!(cm.metadata.name.as_deref(), Some("cni-configuration"));
    let conf = cm.data.unwrap()["cni-config"].clone();
    let custom = a.custom_conf.clone().unwrap();
    fs::create_dir_all(custom.parent().unwrap()).unwrap();
    fs::write(&custom, &conf).unwrap();
    let report = install::install(&a).unwrap();
    assert!(report.warnings.is_empty(), "{:?}", report.warnings);
    let written = fs::read_to_string(a.cni_conf_dir.join("05-catena.conflist")).unwrap();
    assert_eq!(written, conf, "customConf is installed verbatim");
    let parsed = conflist::parse(&written).unwrap();
    assert_eq!(
        conflist::plugin_types(&parsed),
        ["kube-ovn", "portmap", "catena-cni"]
    );
    assert_eq!(parsed["cniVersion"], "0.3.1");

    // The guide's own first layout (01-kube-ovn sorts first) is reported.
    fs::rename(
        a.cni_conf_dir.join("10-kube-ovn.conflist"),
        a.cni_conf_dir.join("01-kube-ovn.conflist"),
    )
    .unwrap();
    let report = install::install(&a).unwrap();
    assert!(
        report
            .warnings
            .iter()
            .any(|w| w.contains("01-kube-ovn.conflist")),
        "{:?}",
        report.warnings
    );

    // Step "Replace kube-proxy": helm upgrade with the three flags.
    let mut upgrade = SEED_004.to_vec();
    upgrade.extend([
        "kubeProxyReplacement=strict",
        "k8sServiceHost=192.168.0.10",
        "k8sServicePort=6443",
    ]);
    let Some(r) = render(&upgrade) else { return };
    let argv = r.objects.agent_argv();
    assert!(
        argv.contains(&"--kube-proxy-replacement=true".to_owned()),
        "{argv:?}"
    );
    assert!(
        argv.contains(&"--healthz-bind-address=0.0.0.0:10256".to_owned()),
        "{argv:?}"
    );
    let env = r.objects.agent_env();
    assert_eq!(env["KUBERNETES_SERVICE_HOST"], "192.168.0.10");
    assert_eq!(env["KUBERNETES_SERVICE_PORT"], "6443");
    let ports = r.objects.agent().ports.clone().unwrap();
    assert_eq!(ports[0].container_port, 10256);
    assert_eq!(ports[0].host_port, Some(10256));
    assert!(r.manifests["catena/templates/NOTES.txt"].contains("kube-proxy replacement: true"));

    // Without kube-proxy replacement none of that is passed.
    let Some(r) = render(&SEED_004) else { return };
    let argv = r.objects.agent_argv();
    assert!(
        !argv
            .iter()
            .any(|a| a.starts_with("--kube-proxy-replacement") || a.starts_with("--healthz")),
        "{argv:?}"
    );
    assert!(!r
        .objects
        .agent_env()
        .contains_key("KUBERNETES_SERVICE_HOST"));
    assert!(r.objects.agent().ports.is_none());
}

#[test]
fn kube_proxy_replacement_spellings() {
    let api = ["k8sServiceHost=10.0.0.1", "k8sServicePort=6443"];
    for (value, want) in [
        ("true", Some("true")),
        ("strict", Some("true")),
        ("partial", Some("partial")),
        ("false", None),
        ("disabled", None),
    ] {
        let set = format!("kubeProxyReplacement={value}");
        let Some(r) = render(&[&set, api[0], api[1]]) else {
            return;
        };
        let argv = r.objects.agent_argv();
        let got = argv
            .iter()
            .find_map(|a| a.strip_prefix("--kube-proxy-replacement="))
            .map(str::to_owned);
        assert_eq!(got.as_deref(), want, "{value}: {argv:?}");
        // The agent itself must accept exactly this command line.
        let config = AgentConfig::try_parse_from(&argv)
            .unwrap_or_else(|e| panic!("catena-agent rejects the chart's args {argv:?}: {e}"));
        assert_eq!(
            config.kube_proxy_replacement.enabled(),
            want.is_some(),
            "{value}"
        );
    }
}

#[test]
fn load_balancer_algorithm_reaches_the_agent() {
    use catena_agent::compile::maglev::LbAlgorithm;
    // Cilium's other loadBalancer values ride along unused.
    for (sets, want, flag) in [
        (&[][..], LbAlgorithm::Random, "random"),
        (
            &["loadBalancer.algorithm=maglev"][..],
            LbAlgorithm::Maglev,
            "maglev",
        ),
        (
            &["loadBalancer.algorithm=random", "loadBalancer.mode=dsr"][..],
            LbAlgorithm::Random,
            "random",
        ),
    ] {
        let Some(r) = render(sets) else { return };
        let argv = r.objects.agent_argv();
        assert!(
            argv.contains(&format!("--lb-algorithm={flag}")),
            "{sets:?}: {argv:?}"
        );
        assert_eq!(
            r.objects.config().get("lbAlgorithm").map(String::as_str),
            Some(flag)
        );
        let config = AgentConfig::try_parse_from(&argv)
            .unwrap_or_else(|e| panic!("catena-agent rejects the chart's args {argv:?}: {e}"));
        assert_eq!(config.lb_algorithm, want, "{sets:?}");
    }
}

#[test]
fn the_agent_accepts_every_rendered_command_line() {
    let api = ["k8sServiceHost=10.0.0.1", "k8sServicePort=6443"];
    let mut cases: Vec<Vec<&str>> = MODES.iter().map(|m| vec![*m]).collect();
    cases.push(SEED_004.to_vec());
    cases.push(vec![
        "kubeProxyReplacement=strict",
        api[0],
        api[1],
        "devices={eth0,eth1}",
        "loadBalancer.algorithm=maglev",
    ]);
    for sets in cases {
        let sets: Vec<String> = sets
            .iter()
            .map(|s| {
                if s.contains('=') {
                    s.to_string()
                } else {
                    format!("cni.chainingMode={s}")
                }
            })
            .collect();
        let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
        let Some(r) = render(&sets) else { return };
        let argv = r.objects.agent_argv();
        if let Err(e) = AgentConfig::try_parse_from(&argv) {
            panic!("catena-agent rejects the chart's args for {sets:?}: {argv:?}: {e}");
        }
    }
}

#[test]
fn agent_runs_unprivileged_with_the_minimal_capabilities() {
    let Some(r) = render(&[]) else { return };
    let o = &r.objects;
    let agent = o.agent();
    let sc = agent.security_context.as_ref().unwrap();
    assert_eq!(sc.privileged, Some(false));
    let caps = sc.capabilities.as_ref().unwrap();
    assert_eq!(
        caps.add.as_deref().unwrap(),
        ["NET_ADMIN", "BPF", "PERFMON", "SYS_ADMIN", "SYS_RESOURCE"]
    );
    assert_eq!(caps.drop.as_deref().unwrap(), ["ALL"]);
    assert_eq!(sc.seccomp_profile.as_ref().unwrap().type_, "Unconfined");
    assert_eq!(sc.app_armor_profile.as_ref().unwrap().type_, "Unconfined");

    let spec = o.ds().spec.template.spec.as_ref().unwrap();
    assert_eq!(spec.host_network, Some(true));
    assert_eq!(
        spec.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    let tol = spec.tolerations.as_ref().unwrap();
    assert_eq!(tol.len(), 1);
    assert_eq!(tol[0].operator.as_deref(), Some("Exists"));
    assert!(
        tol[0].key.is_none() && tol[0].effect.is_none(),
        "must tolerate every taint"
    );

    // Host paths and where the agent sees them.
    let host_paths: BTreeMap<String, String> = spec
        .volumes
        .as_ref()
        .unwrap()
        .iter()
        .filter_map(|v| Some((v.name.clone(), v.host_path.as_ref()?.path.clone())))
        .collect();
    for path in [
        "/sys/fs/bpf",
        "/run/catena",
        "/var/lib/catena",
        "/etc/cni/net.d",
        "/opt/cni/bin",
        "/var/run/netns",
        "/proc",
    ] {
        assert!(
            host_paths.values().any(|p| p == path),
            "no hostPath {path}: {host_paths:?}"
        );
    }
    let mounts: BTreeMap<String, String> = agent
        .volume_mounts
        .as_ref()
        .unwrap()
        .iter()
        .map(|m| (host_paths[&m.name].clone(), m.mount_path.clone()))
        .collect();
    assert_eq!(mounts["/sys/fs/bpf"], "/sys/fs/bpf");
    assert_eq!(mounts["/run/catena"], "/run/catena");
    assert_eq!(mounts["/var/lib/catena"], "/var/lib/catena");
    // Agent flags match the mounts: the socket and state the plugin sees.
    let argv = o.agent_argv();
    for flag in [
        "--socket=/run/catena/agent.sock",
        "--bpffs-dir=/sys/fs/bpf/catena",
        "--state-dir=/var/lib/catena",
        "--log-format=text",
    ] {
        assert!(argv.contains(&flag.to_owned()), "{flag} not in {argv:?}");
    }
    let env = o.agent_env();
    assert!(agent
        .env
        .as_ref()
        .unwrap()
        .iter()
        .any(|e| e.name == "NODE_NAME"
            && e.value_from
                .as_ref()
                .unwrap()
                .field_ref
                .as_ref()
                .unwrap()
                .field_path
                == "spec.nodeName"));
    assert_eq!(env["RUST_LOG"], "info");

    assert_mount_propagation_rule(o);
    // The one privileged container is the bpffs mounter, and it can be off.
    let mounter = o.init("mount-bpf-fs").unwrap();
    assert_eq!(
        mounter.security_context.as_ref().unwrap().privileged,
        Some(true)
    );
    let Some(r) = render(&["bpf.autoMount=false"]) else {
        return;
    };
    assert!(r.objects.init("mount-bpf-fs").is_none());
    let (inits, containers) = r.objects.pod_containers();
    for c in inits.iter().chain(containers) {
        assert_ne!(
            c.security_context.as_ref().and_then(|s| s.privileged),
            Some(true),
            "{}",
            c.name
        );
    }
}

/// The API server rejects Bidirectional mount propagation in a container
/// that is not privileged; check it here, since no API server runs.
fn assert_mount_propagation_rule(o: &Objects) {
    let (inits, containers) = o.pod_containers();
    for c in inits.iter().chain(containers) {
        let privileged = c.security_context.as_ref().and_then(|s| s.privileged) == Some(true);
        for m in c.volume_mounts.as_deref().unwrap_or_default() {
            if m.mount_propagation.as_deref() == Some("Bidirectional") {
                assert!(
                    privileged,
                    "{}: Bidirectional mount {} in an unprivileged container",
                    c.name, m.mount_path
                );
            }
        }
    }
}

#[test]
fn privileged_remains_an_option() {
    let Some(r) = render(&["securityContext.privileged=true"]) else {
        return;
    };
    let agent = r.objects.agent();
    let sc = agent.security_context.as_ref().unwrap();
    assert_eq!(sc.privileged, Some(true));
    assert!(sc.capabilities.is_none());
    let bpf = agent
        .volume_mounts
        .as_ref()
        .unwrap()
        .iter()
        .find(|m| m.name == "bpf-maps")
        .unwrap();
    assert_eq!(bpf.mount_propagation.as_deref(), Some("Bidirectional"));
    assert_mount_propagation_rule(&r.objects);
}

#[test]
fn rbac_is_read_only_except_events_and_policy_status() {
    let Some(r) = render(&[]) else { return };
    let role = &r.objects.cluster_roles[0];
    let mut granted: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for rule in role.rules.as_ref().unwrap() {
        let verbs = &rule.verbs;
        assert!(!verbs.iter().any(|v| v == "*"), "wildcard verb");
        for group in rule.api_groups.as_ref().unwrap() {
            assert_ne!(group, "*");
            for res in rule.resources.as_ref().unwrap() {
                assert_ne!(res, "*");
                let allowed: &[&str] = if res == "events" {
                    &["create", "patch"]
                } else if res.ends_with("/status") {
                    &["patch", "update"]
                } else {
                    &["get", "list", "watch"]
                };
                for v in verbs {
                    assert!(
                        allowed.contains(&v.as_str()),
                        "{group}/{res}: verb {v} beyond {allowed:?}"
                    );
                }
                granted
                    .entry(format!("{group}/{res}"))
                    .or_default()
                    .extend(verbs.iter().cloned());
            }
        }
    }
    for res in [
        "/services",
        "/pods",
        "/namespaces",
        "/nodes",
        "discovery.k8s.io/endpointslices",
        "networking.k8s.io/networkpolicies",
        "cilium.io/ciliumnetworkpolicies",
        "cilium.io/ciliumclusterwidenetworkpolicies",
    ] {
        let v = granted
            .get(res)
            .unwrap_or_else(|| panic!("{res} not granted"));
        for want in ["get", "list", "watch"] {
            assert!(v.iter().any(|x| x == want), "{res}: {want}");
        }
    }
    assert!(granted["cilium.io/ciliumnetworkpolicies/status"].contains(&"update".to_owned()));
    assert!(granted["/events"].contains(&"create".to_owned()));
    let binding = &r.objects.cluster_role_bindings[0];
    assert_eq!(binding.role_ref.name, role.metadata.name.clone().unwrap());
    let subject = &binding.subjects.as_ref().unwrap()[0];
    assert_eq!(
        Some(&subject.name),
        r.objects.service_accounts[0].metadata.name.as_ref()
    );
    assert_eq!(subject.namespace.as_deref(), Some("kube-system"));
}

#[test]
fn invalid_values_fail_with_clear_messages() {
    let cases: &[(&[&str], &str)] = &[
        (&["cni.chainingMode=weave"], "cni.chainingMode=\"weave\" is not one of: generic-veth, kube-ovn, calico, flannel, portmap, none"),
        (&["cni.customConf=true"], "cni.customConf=true needs cni.configMap"),
        (&["kubeProxyReplacement=strict"], "needs k8sServiceHost and k8sServicePort"),
        (&["kubeProxyReplacement=sometimes"], "is not one of false, true, strict, partial"),
        (&["k8sServiceHost=10.0.0.1"], "k8sServicePort is not"),
        (&["cni.confFileName=05-catena.conf"], "must be a plain file name ending in .conflist"),
        (&["securityContext.capabilities.add={PERFMON}"], "needs at least NET_ADMIN and BPF"),
        (&["cni.customConf=yes"], "want boolean"),
        (&["agent.logFormat=xml"], "agent.logFormat"),
        (&["loadBalancer.algorithm=roundrobin"], "loadBalancer.algorithm=\"roundrobin\" is not random or maglev"),
    ];
    for (sets, want) in cases {
        match helm(sets, &[], false) {
            None => return,
            Some(Outcome::Ok(_)) => panic!("{sets:?} rendered"),
            Some(Outcome::Refused(m)) => assert!(m.contains(want), "{sets:?}: {m}"),
        }
    }
}

#[test]
fn cilium_only_values_are_accepted_and_harmless() {
    let Some(plain) = render(&[]) else { return };
    let Some(cilium) = render(&[
        "tunnel=vxlan",
        "enableIPv4Masquerade=true",
        "enableIdentityMark=true",
        "ipam.mode=kubernetes",
    ]) else {
        return;
    };
    for (path, text) in &plain.manifests {
        if !path.ends_with("NOTES.txt") {
            assert_eq!(
                text, &cilium.manifests[path],
                "{path} changed by Cilium-only values"
            );
        }
    }
    let notes = &cilium.manifests["catena/templates/NOTES.txt"];
    assert!(
        notes.contains("Ignored Cilium settings") && notes.contains("tunnel=vxlan"),
        "{notes}"
    );
    assert!(!plain.manifests["catena/templates/NOTES.txt"].contains("Ignored"));
}

#[test]
fn uninstall_hook_removes_only_catenas_conflist() {
    let Some(r) = render(&["cni.uninstall=true", "cni.chainingMode=kube-ovn"]) else {
        return;
    };
    let agent = r.objects.agent();
    let exec = agent
        .lifecycle
        .as_ref()
        .unwrap()
        .pre_stop
        .as_ref()
        .unwrap()
        .exec
        .as_ref()
        .unwrap();
    let cmd = exec.command.clone().unwrap();
    let hook = Container {
        command: Some(cmd[..2].to_vec()),
        args: Some(cmd[2..].to_vec()),
        ..Default::default()
    };
    let mut a = install_args_of(&hook, "uninstall-cni");
    // Same flags as the installer, so it removes the file the installer wrote.
    let installed = install_args_of(r.objects.init("install-cni").unwrap(), "install-cni");
    assert_eq!(format!("{a:?}"), format!("{installed:?}"));
    let mounts: Vec<&str> = agent
        .volume_mounts
        .as_ref()
        .unwrap()
        .iter()
        .map(|m| m.mount_path.as_str())
        .collect();
    assert!(mounts.contains(&"/host/etc/cni/net.d"), "{mounts:?}");

    let node = tempfile::tempdir().unwrap();
    relocate(&mut a, node.path());
    let primary = root().join("chaining-examples/kube-ovn/01-kube-ovn.conflist");
    let target = a.cni_conf_dir.join("10-kube-ovn.conflist");
    fs::copy(&primary, &target).unwrap();
    install::install(&a).unwrap();
    let report = install::uninstall(&a).unwrap();
    assert_eq!(report.now_active.as_deref(), Some(target.as_path()));
    assert_eq!(fs::read(&target).unwrap(), fs::read(&primary).unwrap());
    assert_eq!(fs::read_dir(&a.cni_conf_dir).unwrap().count(), 1);
}

#[test]
fn crds_ship_in_the_crds_dir_and_parse() {
    let Some(r) = render(&[]) else { return };
    let mut names: Vec<String> = Vec::new();
    for (file, data) in &r.crds {
        let crd: CustomResourceDefinition =
            serde_yaml::from_str(data).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(crd.spec.group, "cilium.io");
        assert_eq!(crd.spec.versions[0].name, "v2");
        assert!(crd.spec.versions[0]
            .subresources
            .as_ref()
            .unwrap()
            .status
            .is_some());
        names.push(crd.metadata.name.unwrap());
    }
    names.sort();
    assert_eq!(
        names,
        [
            "ciliumclusterwidenetworkpolicies.cilium.io",
            "ciliumnetworkpolicies.cilium.io"
        ]
    );
    // Not templates: Helm installs crds/ only when absent (Cilium's stay).
    assert!(r
        .manifests
        .values()
        .all(|t| !t.contains("kind: CustomResourceDefinition")));
}

#[test]
fn plain_manifests_are_up_to_date_and_parse() {
    let out = Command::new("python3")
        .arg(root().join("manifests/render.py"))
        .arg("--check")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if stderr.contains("No module named 'helm_python'") {
        skip("helm-python-sdk is not installed; run tests/setup.sh");
        return;
    }
    assert!(
        out.status.success(),
        "{}{stderr}",
        String::from_utf8_lossy(&out.stdout)
    );
    let mut o = Objects::default();
    parse_objects(
        "manifests/catena.yaml",
        &fs::read_to_string(root().join("manifests/catena.yaml")).unwrap(),
        &mut o,
    );
    assert_eq!(o.daemonsets.len(), 1);
    let a = install_args_of(o.init("install-cni").unwrap(), "install-cni");
    assert_eq!(a.chaining_mode, install::ChainingMode::GenericVeth);
    let text = fs::read_to_string(root().join("manifests/catena.yaml")).unwrap();
    assert!(!text.contains("managed-by: Helm"));
    for doc in serde_yaml::Deserializer::from_str(
        &fs::read_to_string(root().join("manifests/catena-crds.yaml")).unwrap(),
    ) {
        let _: CustomResourceDefinition = CustomResourceDefinition::deserialize(doc).unwrap();
    }
}

/// (folder, primary's file, chained cniVersion)
const EXAMPLES: [(&str, &str, &str); 5] = [
    ("kube-ovn", "01-kube-ovn.conflist", "0.3.1"),
    ("calico", "10-calico.conflist", "0.3.1"),
    ("flannel", "10-flannel.conflist", "0.3.1"),
    ("generic-veth", "10-ptp.conflist", "1.0.0"),
    ("bridge", "10-bridge.conflist", "1.0.0"),
];

#[test]
fn chaining_examples_are_valid_and_match_the_installer() {
    let dir = root().join("chaining-examples");
    let mut folders: Vec<String> = fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    folders.sort();
    let mut listed: Vec<&str> = EXAMPLES.iter().map(|e| e.0).collect();
    listed.sort();
    assert_eq!(folders, listed, "every example folder is checked");
    let index = fs::read_to_string(dir.join("README.md")).unwrap();

    for (folder, primary_file, version) in EXAMPLES {
        let d = dir.join(folder);
        assert!(
            index.contains(&format!("]({folder}/)")),
            "README.md does not index {folder}"
        );
        for f in [
            "README.md",
            "values.yaml",
            "configmap.yaml",
            "05-catena.conflist",
            primary_file,
        ] {
            assert!(d.join(f).is_file(), "{folder}/{f} missing");
        }
        let chained = fs::read_to_string(d.join("05-catena.conflist")).unwrap();
        let parsed = conflist::parse(&chained).unwrap_or_else(|e| panic!("{folder}: {e}"));
        assert_eq!(parsed["cniVersion"], version, "{folder}");
        let types = conflist::plugin_types(&parsed);
        assert_eq!(
            types.last().map(String::as_str),
            Some("catena-cni"),
            "{folder}: {types:?}"
        );
        assert_eq!(types.iter().filter(|t| *t == "catena-cni").count(), 1);
        if let Some(pm) = types.iter().position(|t| t == "portmap") {
            assert!(pm < types.len() - 1, "{folder}: catena before portmap");
        }
        conflist::validate_custom(&chained).unwrap_or_else(|e| panic!("{folder}: {e}"));
        let primary = fs::read_to_string(d.join(primary_file)).unwrap();
        let p = conflist::parse(&primary).unwrap();
        assert!(
            !conflist::has_catena(&p),
            "{folder}/{primary_file} is the primary's own"
        );

        // configmap.yaml carries exactly the chained conflist.
        let cm: ConfigMap =
            serde_yaml::from_str(&fs::read_to_string(d.join("configmap.yaml")).unwrap()).unwrap();
        assert_eq!(cm.metadata.name.as_deref(), Some("cni-configuration"));
        assert_eq!(
            cm.data.unwrap()["cni-config"].trim_end(),
            chained.trim_end(),
            "{folder}"
        );

        // values.yaml renders; and, for derived modes, the installer run with
        // the rendered args on a node holding the primary's file writes what
        // 05-catena.conflist shows.
        let Some(r) = render_files(&[], &[&d.join("values.yaml")]) else {
            return;
        };
        let mut a = install_args_of(r.objects.init("install-cni").unwrap(), "install-cni");
        let node = tempfile::tempdir().unwrap();
        relocate(&mut a, node.path());
        if a.custom_conf.is_some() {
            // kube-ovn: the guide's ConfigMap (covered in seed_004_kube_ovn_flags_work).
            assert_eq!(folder, "kube-ovn");
            continue;
        }
        // The primary renamed like seed 004 step 4 where needed.
        fs::write(
            a.cni_conf_dir.join(primary_file.replace("01-", "10-")),
            &primary,
        )
        .unwrap();
        let report = install::install(&a).unwrap();
        assert!(
            report.warnings.is_empty(),
            "{folder}: {:?}",
            report.warnings
        );
        let written = fs::read_to_string(a.cni_conf_dir.join("05-catena.conflist")).unwrap();
        assert_eq!(
            conflist::parse(&written).unwrap(),
            parsed,
            "{folder}: installer output differs from 05-catena.conflist"
        );
    }

    // kube-ovn's kube-proxy replacement values layer on its values.yaml.
    let kovn = dir.join("kube-ovn");
    let Some(r) = render_files(
        &[],
        &[
            &kovn.join("values.yaml"),
            &kovn.join("values-kube-proxy-replacement.yaml"),
        ],
    ) else {
        return;
    };
    assert!(r
        .objects
        .agent_argv()
        .contains(&"--kube-proxy-replacement=true".to_owned()));
    assert_eq!(r.objects.agent_env()["KUBERNETES_SERVICE_PORT"], "6443");
}
