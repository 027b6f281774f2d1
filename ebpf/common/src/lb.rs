//! Service load-balancing maps (Cilium's layout): one master entry per frontend
//! (`backend_slot == 0`, carrying the backend count) plus one entry per slot
//! `1..=count` naming a backend id. A per-packet lookup is two hash lookups no
//! matter how many services exist, and an update can be made atomic for traffic
//! by writing slots before the master count.

/// Key of `LB4_SERVICES`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Service4Key {
    /// Frontend address (ClusterIP), network order.
    pub address: u32,
    /// Frontend port, network order.
    pub dport: u16,
    /// 0 for the master entry, 1..=count for backend slots.
    pub backend_slot: u16,
    /// IPPROTO_TCP / IPPROTO_UDP / IPPROTO_SCTP.
    pub proto: u8,
    /// `SCOPE_INTERNAL` (every lookup) or `SCOPE_EXTERNAL` (the second
    /// scope of a frontend whose master has `SVC_FLAG_TWO_SCOPES`).
    pub scope: u8,
    pub pad: [u8; 2],
}

/// The scope every lookup starts with: pods, node processes, and external
/// traffic to a frontend with one scope.
pub const SCOPE_INTERNAL: u8 = 0;
/// The backends of traffic arriving on an external device (`from_netdev`)
/// for a frontend with two scopes: its own master (same rev-NAT index) and
/// slots. Cilium keeps the scopes the same way for
/// `externalTrafficPolicy: Local` (external: local endpoints only) while
/// in-cluster clients keep every endpoint.
pub const SCOPE_EXTERNAL: u8 = 1;

/// Value of `LB4_SERVICES`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Service4Value {
    /// In slot entries: the backend id (key of `LB4_BACKENDS`). In the master
    /// entry: the ClientIP affinity timeout in seconds when
    /// `SVC_FLAG_AFFINITY` is set, else 0 (Cilium shares the field the same way).
    pub backend_id: u32,
    /// Key of `LB4_REVNAT` for replies of this frontend (1..`REVNAT_MAX_ENTRIES`).
    pub rev_nat_index: u32,
    /// In the master entry: how many slots follow. 0 means "no endpoints".
    pub count: u16,
    /// `SVC_FLAG_*`.
    pub flags: u16,
}

/// Capacity of `LB4_REVNAT` / `LB6_REVNAT`, and so the frontend ceiling.
/// Reverse-NAT indexes are `u32` (service values, conntrack, SNAT, affinity
/// keys, socket reverse NAT) and 0 means "none", so a node programs at most
/// `REVNAT_MAX_ENTRIES - 1` = 262,143 frontends per family (a frontend is one
/// ClusterIP, NodePort address, externalIP or LoadBalancer IP, per port and
/// protocol): 100k Services with two frontends each fit with room to spare.
/// The agent refuses the frontend past it with a clear error. The map is
/// allocated on demand (`BPF_F_NO_PREALLOC`, only the agent writes it): the
/// cap costs its hash buckets up front (2^18 x 16 B = 4 MiB per family) and
/// each programmed frontend one element (~100 B: the kernel's 48 B element
/// header, key and value, in an allocator size class); 100k frontends
/// ~10 MiB.
pub const REVNAT_MAX_ENTRIES: u32 = 262_144;

/// Capacity of `LB4_SERVICES` / `LB6_SERVICES`: every frontend's master
/// entry plus one slot per backend (plus the external scope's, for two-scope
/// frontends). 2^19: 100k frontends with up to ~4 backends each. On demand
/// like the reverse-NAT maps: 8 MiB of buckets up front per family, ~100 B
/// per entry written (100k Services x 1 port x 2.5 backends: ~35 MiB).
pub const SERVICE_MAP_MAX_ENTRIES: u32 = 524_288;

/// Capacity of `LB4_BACKENDS` / `LB6_BACKENDS` (distinct backend address,
/// port and protocol): 2^19, on demand as above (8 MiB of buckets per family
/// up front, ~100 B per backend).
pub const BACKEND_MAP_MAX_ENTRIES: u32 = 524_288;

/// The service has no ready backends: reject new connections at once.
pub const SVC_FLAG_NO_BACKENDS: u16 = 1 << 0;
/// `sessionAffinity: ClientIP`: new flows of a client reuse the backend its
/// last flow used, if that was less than the timeout ago (`LB4_AFFINITY`).
pub const SVC_FLAG_AFFINITY: u16 = 1 << 1;
/// On the `SCOPE_INTERNAL` master: external traffic uses the
/// `SCOPE_EXTERNAL` entries of the same frontend instead.
pub const SVC_FLAG_TWO_SCOPES: u16 = 1 << 2;

/// Key of `LB4_AFFINITY`: one client of one frontend.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Affinity4Key {
    /// Client address, network order.
    pub client: u32,
    pub rev_nat_index: u32,
}

/// Key of `LB_SOCK_AFFINITY`: ClientIP affinity of the socket-level load
/// balancer. Its "client" is the caller's network namespace (a pod, or the
/// node's own processes), as in Cilium: in connect() the source address is
/// not chosen yet, and one netns is one client address for a pod and the
/// node address for host processes. IPv4 and IPv6 frontends share the map;
/// `family` keeps their rev-NAT indexes apart.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockAffinityKey {
    pub netns_cookie: u64,
    pub rev_nat_index: u32,
    /// `SOCK_AFFINITY_V4` or `SOCK_AFFINITY_V6`.
    pub family: u8,
    pub pad: [u8; 3],
}

pub const SOCK_AFFINITY_V4: u8 = 4;
pub const SOCK_AFFINITY_V6: u8 = 6;

/// Value of `LB4_AFFINITY` (and of `LB6_AFFINITY`, `LB_SOCK_AFFINITY`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Affinity4Value {
    /// The datapath clock (`ct::now_ns`) at the last new flow that used this entry.
    pub last_used_ns: u64,
    pub backend_id: u32,
    pub pad: u32,
}

/// Hairpin source address, 169.254.42.1 in network order (as in the packet):
/// when a pod reaches itself through a Service, the source is rewritten to it
/// on the way in (a pod drops packets from its own address arriving on its
/// interface) and the reply, sent to it, is translated back.
pub const HAIRPIN_ADDR: u32 = u32::from_ne_bytes([169, 254, 42, 1]);

/// Value of `LB4_BACKENDS` (key: backend id, u32, never 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend4 {
    /// Backend (pod) address, network order.
    pub address: u32,
    /// Backend port, network order.
    pub port: u16,
    pub proto: u8,
    pub flags: u8,
}

/// Value of `LB4_REVNAT` (key: rev_nat_index, u32): the frontend to restore as
/// the source of replies.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RevNat4 {
    pub address: u32,
    pub port: u16,
    pub pad: u16,
}

/// Key of `LB4_SOCK_REVNAT`: what a socket-level translated socket talks to
/// (the backend), per socket. Written by `cgroup/connect4` and
/// `cgroup/sendmsg4`, read by `cgroup/recvmsg4` and `cgroup/getpeername4` so
/// the application sees the frontend it asked for. Socket cookies are never
/// reused, so a stale entry can only waste a slot (the map is an LRU).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockRevNat4Key {
    /// `bpf_get_socket_cookie()` of the socket.
    pub cookie: u64,
    /// Backend address, network order.
    pub address: u32,
    /// Backend port, network order.
    pub port: u16,
    pub pad: u16,
}

/// Value of `LB4_SOCK_REVNAT`: the frontend to report instead of the backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockRevNat4Value {
    pub address: u32,
    pub rev_nat_index: u32,
    pub port: u16,
    pub pad: u16,
}
