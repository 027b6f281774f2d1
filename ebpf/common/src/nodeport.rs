//! North-south service traffic: NodePorts, externalIPs and LoadBalancer IPs
//! reached from outside the node on its external devices (`from_netdev` /
//! `to_netdev`). The frontends themselves live in `LB4_SERVICES` like
//! ClusterIPs (one per node address and nodePort); these maps hold what only
//! external traffic needs:
//!
//! - `DEVICES4`: the external devices and the address SNAT uses on each;
//! - `LOCAL_EP4`: addresses of this node's endpoints, so a chosen backend is
//!   known to be local (no SNAT, client address kept) or remote;
//! - `SNAT4`: source translations of flows sent to a remote backend, one
//!   entry per direction.

/// Value of `DEVICES4` (key: ifindex, u32): an external device catena is
/// attached to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeDevice {
    /// The device's primary IPv4 address, network order: the source of
    /// flows SNATed out of this device.
    pub ipv4: u32,
    pub flags: u32,
}

/// Key of `SNAT4`: a tuple exactly as it is on the wire, plus the direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Snat4Key {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// `SNAT_DIR_OUT` or `SNAT_DIR_IN`.
    pub dir: u8,
    pub pad: [u8; 2],
}

/// Key: client -> frontend, as the client sent it (before DNAT and SNAT;
/// not client -> backend, which two frontends of one backend can share).
/// Value: the node address and port the flow leaves with.
pub const SNAT_DIR_OUT: u8 = 0;
/// Key: backend -> node address:port (a reply as it arrives). Value: the
/// client address and port to restore, and the frontend (`rev_nat_index`) to
/// restore as the reply's source.
pub const SNAT_DIR_IN: u8 = 1;

/// Value of `SNAT4`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Snat4Value {
    pub to_addr: u32,
    pub rev_nat_index: u32,
    pub to_port: u16,
    pub pad: [u16; 3],
    /// bpf_ktime_get_ns() of the last packet of the flow in this direction.
    pub last_seen_ns: u64,
}

/// SNAT source ports (host order, inclusive): above Linux's default
/// ephemeral range (32768-60999), so a translated flow does not take the
/// 4-tuple of a socket the node itself opened to the same backend.
pub const SNAT_PORT_MIN: u16 = 61_000;
pub const SNAT_PORT_MAX: u16 = 65_535;

// IPv6 (`from_netdev6` / `to_netdev6`). Maps of their own rather than
// wider IPv4 ones: the IPv4 maps keep their layout (a changed value size
// would make the agent replace the pins live IPv4 flows use), an IPv4-only
// node pays nothing for IPv6, and a device may have addresses of one
// family only. There is no `LOCAL_EP6`: the IPv6 program asks the FIB
// where a backend is routed, and a backend routed out of a pod veth catena
// manages (`ENDPOINTS`) is local. That needs no per-pod IPv6 bookkeeping
// and cannot disagree with the routing that delivers the packet.

/// Value of `DEVICES6` (key: ifindex, u32): an external device catena is
/// attached to that has a global IPv6 address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeDevice6 {
    /// The device's first global IPv6 address (packet order, see
    /// `lb6::Addr6`): the source of IPv6 flows SNATed out of this device.
    pub ipv6: crate::lb6::Addr6,
    pub flags: u32,
}

/// Key of `SNAT6`: `Snat4Key` with IPv6 addresses (the same directions,
/// `SNAT_DIR_OUT` / `SNAT_DIR_IN`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Snat6Key {
    pub saddr: crate::lb6::Addr6,
    pub daddr: crate::lb6::Addr6,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub dir: u8,
    pub pad: [u8; 2],
}

/// Value of `SNAT6`: as `Snat4Value`, with an IPv6 address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Snat6Value {
    pub to_addr: crate::lb6::Addr6,
    pub rev_nat_index: u32,
    pub to_port: u16,
    pub pad: u16,
    /// bpf_ktime_get_ns() of the last packet of the flow in this direction.
    pub last_seen_ns: u64,
}
