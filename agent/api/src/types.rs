use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// What the CNI plugin tells the agent about a pod interface on ADD.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct EndpointSpec {
    /// The conflist `name` the plugin ran in: CNI GC is scoped to one network,
    /// so a pod's second catena network (Multus `net1`) is never collected by
    /// the first one's GC.
    #[serde(default)]
    pub network: String,
    pub container_id: String,
    /// Interface name inside the pod (`CNI_IFNAME`).
    pub ifname: String,
    /// Path of the pod's network namespace (`CNI_NETNS`).
    pub netns: String,
    /// Host-side veth peer of `ifname`, as found in the node namespace.
    pub host_ifname: String,
    pub host_ifindex: u32,
    /// Addresses of `ifname` from the primary's result, CIDR notation.
    pub ips: Vec<String>,
    #[serde(default)]
    pub pod: PodRef,
    /// Pod labels, when the caller knows them (the agent also learns them from
    /// its sources by namespace/name).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PodRef {
    #[serde(default)]
    pub namespace: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub uid: String,
}

/// The agent's record of an endpoint.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    /// Node-local endpoint id, stable for the life of the endpoint.
    pub id: u32,
    pub spec: EndpointSpec,
    /// Node-local security identity.
    pub identity: u32,
    /// How the programs are attached: `tcx` or `clsact`.
    pub attach_mode: String,
    /// RFC 3339 time of registration.
    pub created: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Health {
    pub ready: bool,
    /// Why the agent is not ready, when it is not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    pub version: String,
    pub ready: bool,
    pub source: SourceStatus,
    pub datapath: DatapathStatus,
    pub endpoints: usize,
    pub services: usize,
    /// Every network policy the source holds and how well it is enforced.
    #[serde(default)]
    pub policies: Vec<PolicyStatus>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SourceStatus {
    /// `manifests:<dir>` or `kubernetes`.
    pub kind: String,
    pub synced: bool,
    /// Problems with the last input (file, line, reason), newest first.
    #[serde(default)]
    pub errors: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct DatapathStatus {
    pub bpffs_dir: String,
    /// Program name -> kernel program id.
    pub programs: BTreeMap<String, u32>,
    /// Counter name -> value summed over CPUs.
    #[serde(default)]
    pub counters: BTreeMap<String, u64>,
}

/// One frontend of a service as programmed into the datapath.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ServiceStatus {
    /// `namespace/name`.
    pub name: String,
    /// `ip:port/PROTO`.
    pub frontend: String,
    /// `ip:port` of each backend.
    pub backends: Vec<String>,
    pub rev_nat_index: u32,
    /// How clients reach this frontend: `ClusterIP`, `NodePort`,
    /// `ExternalIP` or `LoadBalancer` (empty: the Service is gone from the
    /// source while its entries are still programmed).
    #[serde(default)]
    pub kind: String,
    /// How a new flow picks its backend: `random` or `maglev`.
    #[serde(default)]
    pub algorithm: String,
    /// Frontends with two scopes (traffic policies that differ): the
    /// backends of clients outside the node, while `backends` serve pods
    /// and node processes. E.g. a NodePort with `externalTrafficPolicy:
    /// Local` lists only this node's endpoints here. External clients of a
    /// two-scope Maglev frontend pick at random among these.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_backends: Option<Vec<String>>,
}

/// Error body of a non-2xx answer.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ApiError {
    pub message: String,
    /// The agent would accept the same request later (not ready yet, busy).
    #[serde(default)]
    pub retryable: bool,
}

/// Answer of the CHECK route: what is wrong with an endpoint's datapath.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct EndpointCheck {
    pub ok: bool,
    /// One line per problem (empty when ok).
    pub problems: Vec<String>,
}

/// One attachment (`cni.dev/valid-attachments` entry).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "camelCase")]
pub struct Attachment {
    pub container_id: String,
    pub ifname: String,
}

/// CNI GC: every endpoint not in `valid_attachments` is removed.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct GcRequest {
    /// Only endpoints registered from this network are candidates (empty: all).
    #[serde(default)]
    pub network: String,
    pub valid_attachments: Vec<Attachment>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct GcResult {
    pub removed: Vec<Attachment>,
}

/// A DEL the plugin could not deliver (agent down), queued on disk as
/// `<state-dir>/del-queue/<container_id>_<ifname>.json` (written to a temp file
/// and renamed, so a crash never leaves a torn entry). The agent drains the
/// queue at start.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct QueuedDelete {
    pub container_id: String,
    pub ifname: String,
    /// The host veth ifindex, when the plugin could still learn it.
    #[serde(default)]
    pub host_ifindex: Option<u32>,
    /// Seconds since the epoch.
    pub queued_at: u64,
}

/// Everything `catena status` shows beyond [`Status`]: what is loaded and
/// attached, map pressure, conntrack GC, health checks and what this agent
/// does not do. A separate resource so `Status` stays small for probes.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StatusDetail {
    pub programs: Vec<ProgramStatus>,
    /// Attach mode (`tcx`, `clsact`) -> number of endpoints attached that way.
    pub attach_modes: BTreeMap<String, usize>,
    /// Pinned links under the bpffs dir (TCX and cgroup).
    pub links: Vec<LinkStatus>,
    pub maps: Vec<MapPressure>,
    pub conntrack: ConntrackStatus,
    /// One line per check; `ok: false` ones explain what is wrong.
    pub health: Vec<HealthCheck>,
    /// Features this agent does not implement (yet), so an operator is never
    /// surprised by a silently ignored setting.
    pub unsupported: Vec<String>,
    /// Whether `catena monitor` can stream datapath events, and why not.
    pub events: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ProgramStatus {
    pub name: String,
    /// Kernel program id of the version loaded by this agent run.
    pub id: u32,
    /// The kernel's program tag (hash of the instructions, hex): equal tags
    /// mean the same program version.
    pub tag: String,
    pub pin: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct LinkStatus {
    /// Pin name under `<bpffs>/links`.
    pub pin: String,
    pub link_id: u32,
    /// Program the link runs now.
    pub prog_id: u32,
    /// `tcx`, `cgroup`, or the kernel's link type number.
    pub kind: String,
    /// TCX: the device's ifindex (0 once the device is gone).
    #[serde(default)]
    pub ifindex: u32,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MapPressure {
    pub name: String,
    pub entries: u64,
    pub max_entries: u64,
    /// entries / max_entries.
    pub pressure: f64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ConntrackStatus {
    pub gc_runs: u64,
    pub gc_removed: u64,
    /// Seconds since the last GC run finished (None: no run yet).
    #[serde(default)]
    pub last_gc_secs_ago: Option<u64>,
    pub gc_interval_secs: u64,
    pub tcp_timeout_secs: u64,
    pub tcp_closing_timeout_secs: u64,
    pub tcp_syn_timeout_secs: u64,
    pub any_timeout_secs: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct HealthCheck {
    pub name: String,
    pub ok: bool,
    pub message: String,
}

/// One `CT4` or `CT6` entry as `catena ct list` shows it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct CtEntry {
    /// `IPv4` (`CT4`) or `IPv6` (`CT6`).
    #[serde(default)]
    pub family: String,
    /// `service` (client -> frontend, remembers the backend) or `egress`
    /// (client -> backend, carries the reverse NAT for replies).
    pub kind: String,
    /// `TCP`, `UDP`, `SCTP` or the protocol number.
    pub proto: String,
    /// `ip:port` (IPv6: `[ip]:port`) of the key's source and destination.
    pub src: String,
    pub dst: String,
    /// Service entries: the chosen backend (`ip:port`, or `#id` when the
    /// backend is gone from `LB4_BACKENDS`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    /// Egress entries: the frontend replies are rewritten to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rev_nat: Option<String>,
    /// `seen-reply`, `closing`.
    pub flags: Vec<String>,
    pub age_secs: u64,
    pub idle_secs: u64,
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct CtFlushResult {
    /// Entries removed, both families.
    pub removed: usize,
    /// Of `removed`, the IPv6 ones (`CT6`).
    #[serde(default)]
    pub removed_ipv6: usize,
}

/// A raw dump of pinned eBPF maps, decoded into named columns (`catena bpf
/// ... list`). Generic so that a new map needs only a decoder in the agent.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct BpfMapDump {
    /// The pinned maps read, with their capacity.
    pub maps: Vec<BpfMapInfo>,
    pub columns: Vec<String>,
    /// One row per entry, one cell per column.
    pub rows: Vec<Vec<String>>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct BpfMapInfo {
    pub name: String,
    pub entries: u64,
    pub max_entries: u64,
}

/// One datapath event streamed by `GET /v1/monitor` (one JSON object per
/// line).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct MonitorEvent {
    /// RFC 3339 time the agent read the event.
    pub time: String,
    /// `drop` or `policy-verdict`.
    pub kind: String,
    pub reason: String,
    pub allowed: bool,
    /// `ingress` or `egress`.
    pub direction: String,
    pub ifindex: u32,
    pub endpoint_id: u32,
    pub src_identity: u32,
    pub dst_identity: u32,
    pub src: String,
    pub dst: String,
    pub proto: String,
    pub rule_ref: u32,
    /// The policy rule that decided (`CiliumNetworkPolicy ns/name
    /// spec.egress[0]`), when the agent knows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
}

/// How a network policy is enforced.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PolicyStatus {
    /// `namespace/name`, or `name` for a cluster-wide policy.
    pub name: String,
    /// `CiliumNetworkPolicy`, `CiliumClusterwideNetworkPolicy` or `NetworkPolicy`.
    pub kind: String,
    /// `ok`; `partial` (unsupported parts dropped or widened, fail-closed);
    /// `invalid` (nothing of it applies).
    pub state: String,
    /// What was not enforced as written, and what was done instead.
    #[serde(default)]
    pub messages: Vec<String>,
}

/// A security identity known to the agent.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct IdentityInfo {
    pub id: u32,
    /// `reserved`, `pod` or `cidr`.
    pub kind: String,
    /// `reserved:host`, `k8s:app=web`, `cidr:10.0.0.0/8`.
    pub labels: Vec<String>,
    /// Addresses (or prefixes) the ipcache maps to this identity.
    #[serde(default)]
    pub addresses: Vec<String>,
}

/// An endpoint's policy as programmed in the datapath
/// (`GET /v1/endpoints/{container_id}/{ifname}/policy`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct EndpointPolicyStatus {
    pub endpoint_id: u32,
    pub identity: u32,
    /// Without enforcement a direction allows everything.
    pub ingress_enforced: bool,
    pub egress_enforced: bool,
    pub entries: Vec<PolicyEntryStatus>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PolicyEntryStatus {
    /// `ingress` or `egress`.
    pub direction: String,
    /// `allow` or `deny` (deny wins).
    pub verdict: String,
    /// 0 means any identity.
    pub remote_identity: u32,
    pub remote_labels: Vec<String>,
    /// `any`, `TCP`, `UDP`, `SCTP`, `ICMP` or the protocol number.
    pub protocol: String,
    /// `any`, `80`, `8000-8080` (ICMP: the type).
    pub ports: String,
    pub rule_ref: u32,
    /// `Kind namespace/name path`, e.g. `CiliumNetworkPolicy shop/db spec.ingress[0]`.
    pub source: String,
}
