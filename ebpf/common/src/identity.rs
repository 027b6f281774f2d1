//! Security identities. Node-local in chaining mode (they never travel on the
//! wire); the reserved numbers follow Cilium's so policies, events and
//! operators' habits read the same.

/// Wildcard in policy entries: any remote identity.
pub const ANY: u32 = 0;
/// The node itself (its addresses and its processes).
pub const HOST: u32 = 1;
/// Anything outside the cluster (the ipcache's default).
pub const WORLD: u32 = 2;
pub const UNMANAGED: u32 = 3;
pub const HEALTH: u32 = 4;
pub const INIT: u32 = 5;
/// Other nodes of the cluster.
pub const REMOTE_NODE: u32 = 6;
pub const KUBE_APISERVER: u32 = 7;
/// First identity of a pod label set.
pub const FIRST_LOCAL: u32 = 256;
/// First identity of a CIDR selected by a policy (Cilium's local scope, 1<<24).
pub const FIRST_CIDR: u32 = 1 << 24;
