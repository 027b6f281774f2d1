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

    /// External devices for NodePort/LoadBalancer traffic (comma-separated).
    /// Recorded and reported by `catena status`; external-traffic services are
    /// not translated yet.
    #[arg(long, value_delimiter = ',')]
    pub devices: Vec<String>,

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
