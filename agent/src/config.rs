use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

/// Every path is a flag with the production default, so tests can run several
/// isolated "nodes" side by side.
#[derive(Clone, Debug, Parser)]
#[command(
    name = "catena-agent",
    version,
    about = "catena node agent",
    args_conflicts_with_subcommands = true
)]
pub struct AgentConfig {
    /// One-shot jobs of the DaemonSet; without one, run the agent.
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Standalone mode: watch this directory of Kubernetes YAML/JSON manifests
    /// (Services, EndpointSlices, Pods, Namespaces, NetworkPolicies,
    /// CiliumNetworkPolicies) instead of a cluster.
    #[arg(long, env = "CATENA_MANIFESTS")]
    pub manifests: Option<PathBuf>,

    /// Kubernetes mode: use this kubeconfig. Without it (and without
    /// --manifests) the agent uses in-cluster config when it runs in a pod.
    #[arg(long, conflicts_with = "manifests")]
    pub kubeconfig: Option<PathBuf>,

    /// This node's name as Kubernetes knows it: Events about policies name it
    /// as their reporting instance and CiliumNetworkPolicy status is written
    /// under `status.nodes.<name>`. The chart sets NODE_NAME from the downward
    /// API; without either, the machine's hostname.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,

    /// Agent API socket (HTTP/JSON, mode 0600).
    #[arg(long, default_value = catena_api::DEFAULT_SOCKET)]
    pub socket: PathBuf,

    /// Directory on a bpf filesystem for catena's pinned programs, maps and links.
    #[arg(long, default_value = catena_api::DEFAULT_BPFFS_DIR)]
    pub bpffs_dir: PathBuf,

    /// Agent state (endpoint records, the CNI plugin's DEL queue).
    #[arg(long, default_value = catena_api::DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,

    /// The runtime's CNI result cache (libcni `cniCacheV1`), read at start to
    /// adopt pods that were running before catena was installed.
    #[arg(long, default_value = "/var/lib/cni")]
    pub cni_cache_dir: PathBuf,

    /// The node's CNI configuration dir: networks whose conflist chains
    /// catena-cni are the ones whose running pods get adopted.
    #[arg(long, default_value = "/etc/cni/net.d")]
    pub cni_conf_dir: PathBuf,

    /// cgroup v2 directory whose processes get socket-level service load
    /// balancing (node processes reaching ClusterIPs). `auto`: the node's
    /// cgroup2 root (mounted at /run/catena/cgroupv2 if the node has none);
    /// `none`: off.
    #[arg(long, default_value = "auto")]
    pub cgroup_root: String,

    /// Expedite RCU grace periods (`/sys/kernel/rcu_expedited`) while a TCX
    /// link is created or released, and only then: an attach then takes
    /// ~0.1 ms instead of a 10-30 ms grace period per link, which is most of
    /// what catena adds to a CNI ADD. Left alone if someone else set it; off
    /// (`false`) for nodes with isolated CPUs that must not take IPIs.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub expedite_attach: bool,

    /// Whether catena replaces kube-proxy (the chart's `kubeProxyReplacement`;
    /// off by default, as there). `false`: kube-proxy still serves
    /// node processes and external traffic, so catena translates only pod
    /// traffic (no socket load balancing). `true`/`strict`/`partial`: catena
    /// also serves node processes (see --cgroup-root).
    #[arg(long, value_enum, default_value_t = KubeProxyReplacement::False)]
    pub kube_proxy_replacement: KubeProxyReplacement,

    /// Serve kube-proxy's health endpoint (`GET /healthz`, as load balancers
    /// probe it on port 10256) on this address when replacing kube-proxy.
    #[arg(long)]
    pub healthz_bind_address: Option<std::net::SocketAddr>,

    /// External devices for NodePort / externalIP / LoadBalancer traffic
    /// (comma-separated), used with --kube-proxy-replacement. Without it they
    /// are detected (up, a global IPv4 address, not loopback, a pod veth, a
    /// bridge or an overlay device; veths only with the default route) and
    /// followed as addresses change. Name every device a flow SNATed to a
    /// remote backend may leave through.
    #[arg(long, value_delimiter = ',')]
    pub devices: Vec<String>,

    /// How a Service picks a backend for a new flow (Cilium's
    /// `loadBalancer.algorithm`): `random`, or `maglev` consistent hashing of
    /// the 5-tuple (the same flow picks the same backend on every node; a
    /// backend change moves ~1/N of the flows' choices). A Service's
    /// `service.cilium.io/lb-algorithm` annotation overrides it.
    #[arg(long, value_enum, default_value_t = crate::compile::maglev::LbAlgorithm::Random, alias = "bpf-lb-algorithm")]
    pub lb_algorithm: crate::compile::maglev::LbAlgorithm,

    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Serve Prometheus metrics (`GET /metrics`) on this address, e.g.
    /// 127.0.0.1:9962. They are also on the agent socket.
    #[arg(long)]
    pub prometheus_bind_address: Option<std::net::SocketAddr>,

    /// How often expired conntrack entries are removed.
    #[arg(long, default_value = "60s", alias = "conntrack-gc-interval")]
    pub ct_gc_interval: humantime::Duration,

    /// Idle timeout of an established TCP connection (Cilium's default).
    #[arg(long, default_value = "21600s", alias = "bpf-ct-timeout-regular-tcp")]
    pub ct_tcp_timeout: humantime::Duration,

    /// Idle timeout of a TCP connection once a FIN or RST was seen.
    #[arg(long, default_value = "10s", alias = "bpf-ct-timeout-regular-tcp-fin")]
    pub ct_tcp_closing_timeout: humantime::Duration,

    /// Idle timeout of a TCP connection that never saw a reply.
    #[arg(long, default_value = "60s", alias = "bpf-ct-timeout-regular-tcp-syn")]
    pub ct_tcp_syn_timeout: humantime::Duration,

    /// Idle timeout of UDP, SCTP and other flows.
    #[arg(long, default_value = "60s", alias = "bpf-ct-timeout-regular-any")]
    pub ct_any_timeout: humantime::Duration,
}

impl AgentConfig {
    /// `--node-name`, else `$NODE_NAME` (both via clap), else the hostname.
    pub fn node_name(&self) -> String {
        if let Some(name) = self.node_name.as_deref().map(str::trim) {
            if !name.is_empty() {
                return name.to_string();
            }
        }
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "localhost".to_string())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum KubeProxyReplacement {
    False,
    True,
    /// Cilium's spelling of `true`, accepted so existing values files work.
    Strict,
    /// Cilium's older partial mode: catena has no partial datapath, so this
    /// enables what catena implements, like `true`.
    Partial,
}

impl KubeProxyReplacement {
    pub fn enabled(self) -> bool {
        !matches!(self, KubeProxyReplacement::False)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Debug, Subcommand)]
pub enum Command {
    /// Install catena-cni into the CNI bin dir and catena's conflist into the
    /// CNI conf dir (the DaemonSet's init container). Idempotent.
    InstallCni(crate::install::InstallArgs),
    /// Take catena out of the CNI configuration so new pods start with the
    /// primary alone (the DaemonSet's preStop when `cni.uninstall` is set).
    UninstallCni(crate::install::InstallArgs),
    /// Remove catena from the node: the CNI configuration (as uninstall-cni),
    /// the programs on every pod veth and the cgroup, every pin under the
    /// bpffs dir and the state dir. Not for upgrades: run it with the agent
    /// stopped, when catena is being removed for good. Also spelled
    /// `catena-agent --uninstall`.
    Uninstall(crate::ops::uninstall::UninstallArgs),
}
