//! Map keys and values shared by the kernel-side programs (`ebpf/programs`) and
//! the agent. Every type is `#[repr(C)]`, padded explicitly (the verifier and the
//! kernel's hash compare whole keys, so padding bytes must be zeroed), and holds
//! addresses and ports in **network byte order**, exactly as they sit in the
//! packet, so the datapath never converts.
#![no_std]

pub mod ct;
pub mod ct6;
pub mod endpoint;
pub mod events;
pub mod identity;
pub mod lb;
pub mod lb6;
pub mod maglev;
pub mod metrics;
pub mod nodeport;
pub mod policy;

/// Pinned map names, declared once: the programs use them as symbol names and the
/// agent opens `<bpffs>/maps/<name>`. Kernel map names hold at most 15 bytes.
pub mod map_names {
    pub const LB4_SERVICES: &str = "LB4_SERVICES";
    pub const LB4_BACKENDS: &str = "LB4_BACKENDS";
    pub const LB4_REVNAT: &str = "LB4_REVNAT";
    pub const CT4: &str = "CT4";
    pub const ENDPOINTS: &str = "ENDPOINTS";
    pub const METRICS: &str = "METRICS";
    pub const LB4_SOCK_REVNAT: &str = "LB4_SOCK_REVNAT";
    pub const LB4_AFFINITY: &str = "LB4_AFFINITY";
    pub const LB4_MAGLEV: &str = "LB4_MAGLEV";
    pub const IPCACHE: &str = "IPCACHE";
    pub const POLICY: &str = "POLICY";
    pub const POLICY_EP: &str = "POLICY_EP";
    pub const EVENTS: &str = "EVENTS";
    pub const EVENTS_RATE: &str = "EVENTS_RATE";
    pub const DEVICES4: &str = "DEVICES4";
    pub const LOCAL_EP4: &str = "LOCAL_EP4";
    pub const SNAT4: &str = "SNAT4";
    pub const LB6_SERVICES: &str = "LB6_SERVICES";
    pub const LB6_BACKENDS: &str = "LB6_BACKENDS";
    pub const LB6_REVNAT: &str = "LB6_REVNAT";
    pub const CT6: &str = "CT6";
    pub const LB6_SOCK_REVNAT: &str = "LB6_SOCK_REVNAT";
    pub const LB6_AFFINITY: &str = "LB6_AFFINITY";
    pub const LB6_MAGLEV: &str = "LB6_MAGLEV";
    pub const LB_SOCK_AFFINITY: &str = "LB_SOCK_AFFINITY";
    pub const TAIL_CALLS6: &str = "TAIL_CALLS6";
    pub const IPCACHE6: &str = "IPCACHE6";
    pub const DEVICES6: &str = "DEVICES6";
    pub const SNAT6: &str = "SNAT6";
    /// The node's own unicast addresses (IPv4, then IPv6): where the
    /// socket-level load balancer serves NodePorts to node processes and
    /// pods (see `programs/src/node_addr.rs`).
    pub const NODE_ADDR4: &str = "NODE_ADDR4";
    pub const NODE_ADDR6: &str = "NODE_ADDR6";
    /// One u64: the cookie of the node's network namespace, whose loopback
    /// addresses serve NodePorts too.
    pub const NODE_NETNS: &str = "NODE_NETNS";
    /// One u32: the `MAP_LAYOUT_REVISION` the pinned maps were last loaded
    /// with (see `MAP_LAYOUT_REVISION`).
    pub const MAP_LAYOUT: &str = "MAP_LAYOUT";
}

/// Revision of the pinned maps' key/value layouts, stamped into the pinned
/// `MAP_LAYOUT` map by the agent after every load. A layout change that keeps
/// a map's key and value sizes (reordered or retyped fields) is invisible to
/// the agent's size check of pins left by an older version, so every such
/// change bumps this and names the map in the agent's `layout_changed_in`:
/// a pin stamped with an older revision is then replaced instead of misread.
///
/// 1: reverse-NAT indexes widened from u16 to u32 (`Service4Value`,
/// `SockAffinityKey`, `Snat6Value` and the affinity keys kept their sizes).
pub const MAP_LAYOUT_REVISION: u32 = 1;

/// `size_of` each shared type must have: with every field listed, a
/// mismatch means the compiler inserted an implicit hole (or someone grew a
/// type without meaning to). Checked at compile time for both sides.
const _: () = {
    use core::mem::size_of;
    assert!(size_of::<lb::Service4Key>() == 12);
    assert!(size_of::<lb::Service4Value>() == 12);
    assert!(size_of::<lb::Affinity4Key>() == 8);
    assert!(size_of::<lb::SockAffinityKey>() == 16);
    assert!(size_of::<lb::Affinity4Value>() == 16);
    assert!(size_of::<lb::RevNat4>() == 8);
    assert!(size_of::<lb::SockRevNat4Key>() == 16);
    assert!(size_of::<lb::SockRevNat4Value>() == 12);
    assert!(size_of::<lb6::Service6Key>() == 24);
    assert!(size_of::<lb6::RevNat6>() == 20);
    assert!(size_of::<lb6::Affinity6Key>() == 20);
    assert!(size_of::<lb6::SockRevNat6Key>() == 32);
    assert!(size_of::<lb6::SockRevNat6Value>() == 24);
    assert!(size_of::<ct::Ct4Value>() == 48);
    assert!(size_of::<nodeport::Snat4Value>() == 24);
    assert!(size_of::<nodeport::Snat6Value>() == 32);
};

/// Program names as they appear in the object file (one per attach point).
pub mod program_names {
    /// tc ingress of the host-side veth: packets the pod sends.
    pub const FROM_CONTAINER: &str = "from_container";
    /// tc egress of the host-side veth: packets delivered to the pod.
    pub const TO_CONTAINER: &str = "to_container";
    /// Socket-level load balancing for processes in a cgroup (the node's own
    /// processes): `connect()` / `sendmsg()` to a frontend go to a backend
    /// directly, `recvmsg()` / `getpeername()` report the frontend.
    pub const SOCK_CONNECT4: &str = "sock_connect4";
    pub const SOCK_SENDMSG4: &str = "sock_sendmsg4";
    pub const SOCK_RECVMSG4: &str = "sock_recvmsg4";
    pub const SOCK_GETPEERNAME4: &str = "sock_getpeername4";
    /// The same four for IPv6 sockets (and IPv4-mapped addresses on them).
    pub const SOCK_CONNECT6: &str = "sock_connect6";
    pub const SOCK_SENDMSG6: &str = "sock_sendmsg6";
    pub const SOCK_RECVMSG6: &str = "sock_recvmsg6";
    pub const SOCK_GETPEERNAME6: &str = "sock_getpeername6";
    /// tc ingress of an external device: NodePort / externalIP /
    /// LoadBalancer frontends, and replies of flows SNATed to a remote backend.
    pub const FROM_NETDEV: &str = "from_netdev";
    /// tc egress of an external device: replies of local backends to
    /// external clients get the frontend back as their source.
    pub const TO_NETDEV: &str = "to_netdev";
    /// The IPv6 service path of the host-veth programs: tc classifiers
    /// never attached, entered by tail call (`TAIL_CALLS6`) from
    /// `from_container` / `to_container`, so their code and stack stay apart
    /// from the IPv4 path's (the verifier's 512-byte stack limit counts a
    /// BPF function call's frames together, a tail call's not).
    pub const FROM_CONTAINER6: &str = "from_container6";
    pub const TO_CONTAINER6: &str = "to_container6";
    /// Answers a new IPv6 flow to a frontend without backends (RST or
    /// ICMPv6 port unreachable); entered by tail call from `from_container6`.
    pub const REFUSE6: &str = "refuse6";
    /// IPv6 network policy of the host-veth programs (connection tracking
    /// in `CT6`, identities from `IPCACHE6`, the shared `POLICY` rules):
    /// entered by tail call from `from_container6` (egress) and
    /// `to_container6` (ingress) for endpoints under policy.
    pub const POLICY6_EGRESS: &str = "policy6_egress";
    pub const POLICY6_INGRESS: &str = "policy6_ingress";
    /// The IPv6 path of the external-device programs (NodePort,
    /// externalIPs, LoadBalancer IPs over IPv6): tc classifiers entered by
    /// tail call from `from_netdev` / `to_netdev`, so the IPv4 path's code
    /// and stack stay as they were.
    pub const FROM_NETDEV6: &str = "from_netdev6";
    pub const TO_NETDEV6: &str = "to_netdev6";
    /// The stages of `from_netdev6` after it (tail calls, each its own
    /// stack): load balancing of a frontend's traffic, and SNAT of a flow
    /// sent to a remote backend.
    pub const FROM_NETDEV6_LB: &str = "from_netdev6_lb";
    pub const FROM_NETDEV6_SNAT: &str = "from_netdev6_snat";
    /// An empty tc classifier (returns "continue"): the baseline of per-packet
    /// cost measurements. Never attached.
    pub const NOOP: &str = "noop";
}

/// Slots of the `TAIL_CALLS6` program array.
pub mod tail_calls {
    pub const FROM_CONTAINER6: u32 = 0;
    pub const TO_CONTAINER6: u32 = 1;
    pub const REFUSE6: u32 = 2;
    pub const POLICY6_EGRESS: u32 = 3;
    pub const POLICY6_INGRESS: u32 = 4;
    pub const FROM_NETDEV6: u32 = 5;
    pub const TO_NETDEV6: u32 = 6;
    pub const FROM_NETDEV6_LB: u32 = 7;
    pub const FROM_NETDEV6_SNAT: u32 = 8;
    /// Size of the array.
    pub const COUNT: u32 = 9;
}

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_SCTP: u8 = 132;
pub const IPPROTO_ICMPV6: u8 = 58;

#[cfg(feature = "user")]
mod pod_impls {
    use super::*;
    // SAFETY: every type is #[repr(C)], Copy, has explicit padding fields and no
    // pointers, so any bit pattern is a valid value.
    unsafe impl aya::Pod for lb::Service4Key {}
    unsafe impl aya::Pod for lb::Service4Value {}
    unsafe impl aya::Pod for lb::Backend4 {}
    unsafe impl aya::Pod for lb::RevNat4 {}
    unsafe impl aya::Pod for lb::SockRevNat4Key {}
    unsafe impl aya::Pod for lb::SockRevNat4Value {}
    unsafe impl aya::Pod for lb::Affinity4Key {}
    unsafe impl aya::Pod for lb::Affinity4Value {}
    unsafe impl aya::Pod for maglev::MaglevTable {}
    unsafe impl aya::Pod for ct::Ct4Key {}
    unsafe impl aya::Pod for ct::Ct4Value {}
    unsafe impl aya::Pod for endpoint::EndpointInfo {}
    unsafe impl aya::Pod for policy::PolicyKey {}
    unsafe impl aya::Pod for policy::PolicyValue {}
    unsafe impl aya::Pod for policy::IpcacheValue {}
    unsafe impl aya::Pod for events::Event {}
    unsafe impl aya::Pod for nodeport::NodeDevice {}
    unsafe impl aya::Pod for nodeport::Snat4Key {}
    unsafe impl aya::Pod for nodeport::Snat4Value {}
    unsafe impl aya::Pod for nodeport::NodeDevice6 {}
    unsafe impl aya::Pod for nodeport::Snat6Key {}
    unsafe impl aya::Pod for nodeport::Snat6Value {}
    unsafe impl aya::Pod for lb6::Service6Key {}
    unsafe impl aya::Pod for lb6::Backend6 {}
    unsafe impl aya::Pod for lb6::RevNat6 {}
    unsafe impl aya::Pod for lb6::Affinity6Key {}
    unsafe impl aya::Pod for lb6::SockRevNat6Key {}
    unsafe impl aya::Pod for lb6::SockRevNat6Value {}
    unsafe impl aya::Pod for ct6::Ct6Key {}
}
