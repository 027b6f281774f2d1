//! Every map, declared once. Symbol names are the pinned names of
//! `catena_common::map_names` (checked by the agent when it opens the object),
//! and all are pinned by name so the agent's `map_pin_path` reuses them across
//! restarts.

use aya_ebpf::bindings::BPF_F_NO_PREALLOC;
use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, ProgramArray, RingBuf},
};
use catena_common::{
    ct::{Ct4Key, Ct4Value},
    endpoint::EndpointInfo,
    events::{EventRate, EVENTS_RING_BYTES},
    lb::{
        Affinity4Key, Affinity4Value, Backend4, RevNat4, Service4Key, Service4Value,
        SockRevNat4Key, SockRevNat4Value, BACKEND_MAP_MAX_ENTRIES, REVNAT_MAX_ENTRIES,
        SERVICE_MAP_MAX_ENTRIES,
    },
    maglev::MaglevTable,
    metrics::COUNTER_MAX,
    policy::{Ipcache4Key, IpcacheValue, PolicyKey, PolicyValue, POLICY_EP_MAX},
};

/// Master entries (slot 0) and backend slots of every frontend. Written by
/// the agent only, so allocated on demand (sizes and cost:
/// catena_common::lb::SERVICE_MAP_MAX_ENTRIES).
#[map]
pub static LB4_SERVICES: HashMap<Service4Key, Service4Value> =
    HashMap::pinned(SERVICE_MAP_MAX_ENTRIES, BPF_F_NO_PREALLOC);

/// Backend id -> backend address.
#[map]
pub static LB4_BACKENDS: HashMap<u32, Backend4> =
    HashMap::pinned(BACKEND_MAP_MAX_ENTRIES, BPF_F_NO_PREALLOC);

/// rev_nat_index -> frontend to restore as the source of replies. Its size
/// is the frontend ceiling (catena_common::lb::REVNAT_MAX_ENTRIES).
#[map]
pub static LB4_REVNAT: HashMap<u32, RevNat4> =
    HashMap::pinned(REVNAT_MAX_ENTRIES, BPF_F_NO_PREALLOC);

/// Connection tracking; LRU so a full table evicts the oldest flows instead of
/// failing new ones.
#[map]
pub static CT4: LruHashMap<Ct4Key, Ct4Value> = LruHashMap::pinned(262_144, 0);

/// Host-veth ifindex -> endpoint config.
#[map]
pub static ENDPOINTS: HashMap<u32, EndpointInfo> = HashMap::pinned(65_536, 0);

/// Packet counters, indexed by `catena_common::metrics::Counter`.
#[map]
pub static METRICS: PerCpuArray<u64> = PerCpuArray::pinned(COUNTER_MAX, 0);

/// Socket-level reverse NAT: (socket cookie, backend) -> frontend, for
/// recvmsg()/getpeername() of sockets `cgroup/connect4|sendmsg4` translated.
/// LRU: entries of closed sockets age out without a cleanup pass.
#[map]
pub static LB4_SOCK_REVNAT: LruHashMap<SockRevNat4Key, SockRevNat4Value> =
    LruHashMap::pinned(131_072, 0);

/// ClientIP session affinity: (client, frontend) -> backend and last use.
/// LRU: idle clients age out; an evicted client merely gets a fresh pick.
#[map]
pub static LB4_AFFINITY: LruHashMap<Affinity4Key, Affinity4Value> = LruHashMap::pinned(65_536, 0);

/// Maglev lookup tables: frontend rev_nat_index -> table of backend ids
/// (catena_common::maglev). Not preallocated: a table is 64 KiB and only
/// Maglev services have one, so the size is a cap, not a reservation.
#[map]
pub static LB4_MAGLEV: HashMap<u32, MaglevTable> = HashMap::pinned(65_536, BPF_F_NO_PREALLOC);

/// IPv4 prefix -> identity of the remote end (longest prefix wins; a miss is
/// `identity::WORLD`). LPM tries are never preallocated: the size is a cap.
#[map]
pub static IPCACHE: LpmTrie<Ipcache4Key, IpcacheValue> = LpmTrie::pinned(524_288, 0);

/// Allow and deny entries of every endpoint (layout: catena_common::policy).
#[map]
pub static POLICY: LpmTrie<PolicyKey, PolicyValue> = LpmTrie::pinned(524_288, 0);

/// Endpoint id -> `POLICY_EP_*` enforcement flags. An array: the lookup is
/// inlined by the JIT, so unenforced endpoints pay next to nothing.
#[map]
pub static POLICY_EP: Array<u32> = Array::pinned(POLICY_EP_MAX, 0);

/// Drop and policy-verdict events for the agent.
#[map]
pub static EVENTS: RingBuf = RingBuf::pinned(EVENTS_RING_BYTES, 0);

/// Per-CPU token bucket limiting event emission.
#[map]
pub static EVENTS_RATE: PerCpuArray<EventRate> = PerCpuArray::pinned(1, 0);

/// External devices (ifindex) -> the address flows are SNATed to there.
#[map]
pub static DEVICES4: HashMap<u32, catena_common::nodeport::NodeDevice> = HashMap::pinned(256, 0);

/// This node's endpoint addresses -> host-veth ifindex: a backend found here
/// is local (external traffic reaches it without SNAT).
#[map]
pub static LOCAL_EP4: HashMap<u32, u32> = HashMap::pinned(65_536, 0);

/// Source translations of external flows sent to remote backends (both
/// directions). LRU: finished flows age out; a fresh flow never reuses a
/// translation still present (ports are claimed with BPF_NOEXIST).
#[map]
pub static SNAT4: LruHashMap<
    catena_common::nodeport::Snat4Key,
    catena_common::nodeport::Snat4Value,
> = LruHashMap::pinned(131_072, 0);

/// External devices (ifindex) -> the IPv6 address flows are SNATed to there
/// (why a map apart from `DEVICES4`: catena_common::nodeport).
#[map]
pub static DEVICES6: HashMap<u32, catena_common::nodeport::NodeDevice6> = HashMap::pinned(256, 0);

/// `SNAT4` for IPv6 flows from external clients sent to remote backends.
#[map]
pub static SNAT6: LruHashMap<
    catena_common::nodeport::Snat6Key,
    catena_common::nodeport::Snat6Value,
> = LruHashMap::pinned(131_072, 0);

/// IPv6 frontends: master entries and backend slots (catena_common::lb6).
#[map]
pub static LB6_SERVICES: HashMap<
    catena_common::lb6::Service6Key,
    catena_common::lb6::Service6Value,
> = HashMap::pinned(SERVICE_MAP_MAX_ENTRIES, BPF_F_NO_PREALLOC);

/// IPv6 backend id -> backend address (ids independent of `LB4_BACKENDS`).
#[map]
pub static LB6_BACKENDS: HashMap<u32, catena_common::lb6::Backend6> =
    HashMap::pinned(BACKEND_MAP_MAX_ENTRIES, BPF_F_NO_PREALLOC);

/// IPv6 rev_nat_index -> frontend to restore as the source of replies.
#[map]
pub static LB6_REVNAT: HashMap<u32, catena_common::lb6::RevNat6> =
    HashMap::pinned(REVNAT_MAX_ENTRIES, BPF_F_NO_PREALLOC);

/// IPv6 connection tracking of service flows; LRU as `CT4`.
#[map]
pub static CT6: LruHashMap<catena_common::ct6::Ct6Key, catena_common::ct6::Ct6Value> =
    LruHashMap::pinned(262_144, 0);

/// Socket-level reverse NAT of IPv6 sockets (`cgroup/connect6|sendmsg6`).
#[map]
pub static LB6_SOCK_REVNAT: LruHashMap<
    catena_common::lb6::SockRevNat6Key,
    catena_common::lb6::SockRevNat6Value,
> = LruHashMap::pinned(131_072, 0);

/// ClientIP session affinity of IPv6 frontends.
#[map]
pub static LB6_AFFINITY: LruHashMap<
    catena_common::lb6::Affinity6Key,
    catena_common::lb6::Affinity6Value,
> = LruHashMap::pinned(65_536, 0);

/// Maglev lookup tables of IPv6 frontends, as `LB4_MAGLEV`: IPv6
/// rev_nat_index -> table of `LB6_BACKENDS` ids. A map of its own because
/// both numbers come from the IPv6 number spaces, which overlap the IPv4
/// ones (one shared map would need a family in its key, a layout change of
/// the pinned `LB4_MAGLEV`).
#[map]
pub static LB6_MAGLEV: HashMap<u32, MaglevTable> = HashMap::pinned(65_536, BPF_F_NO_PREALLOC);

/// ClientIP session affinity of the socket-level load balancer, per network
/// namespace (catena_common::lb::SockAffinityKey), IPv4 and IPv6 frontends.
#[map]
pub static LB_SOCK_AFFINITY: LruHashMap<
    catena_common::lb::SockAffinityKey,
    catena_common::lb::Affinity4Value,
> = LruHashMap::pinned(65_536, 0);

/// The IPv6 service programs, entered by tail call (slots:
/// `catena_common::tail_calls`). Pinned: a program array loses its entries
/// when the last user-space reference goes, and the agent may be down.
#[map]
pub static TAIL_CALLS6: ProgramArray = ProgramArray::pinned(catena_common::tail_calls::COUNT, 0);

/// IPv6 prefix -> identity of the remote end (longest prefix wins; a miss is
/// `identity::WORLD`), the IPv6 half of `IPCACHE`.
#[map]
pub static IPCACHE6: LpmTrie<catena_common::policy::Ipcache6Key, IpcacheValue> =
    LpmTrie::pinned(524_288, 0);

/// Where an IPv6 event is built before it is emitted (one slot per CPU, not
/// pinned: it holds nothing between program runs).
#[map]
pub static EVENT6_SCRATCH: PerCpuArray<catena_common::events::Event6> =
    PerCpuArray::with_max_entries(1, 0);

/// The node's own unicast IPv4 addresses (network order -> 0, presence
/// only), every interface's: a socket call to one of them on a NodePort is
/// a NodePort connection (`node_addr`). Written by the agent.
#[map]
pub static NODE_ADDR4: HashMap<u32, u32> = HashMap::pinned(4_096, 0);

/// The IPv6 half of `NODE_ADDR4` (global and unique-local addresses).
#[map]
pub static NODE_ADDR6: HashMap<[u32; 4], u32> = HashMap::pinned(4_096, 0);

/// Slot 0: the cookie of the node's network namespace (0 until the agent
/// has written it). Loopback NodePorts are served only there: a pod's
/// 127.0.0.1 is the pod's own.
#[map]
pub static NODE_NETNS: Array<u64> = Array::pinned(1, 0);

/// The layout revision the pinned maps were last loaded with
/// (catena_common::MAP_LAYOUT_REVISION); read and written by the agent only.
#[map]
pub static MAP_LAYOUT: Array<u32> = Array::pinned(1, 0);
