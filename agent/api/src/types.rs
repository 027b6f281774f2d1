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
    pub rev_nat_index: u16,
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
