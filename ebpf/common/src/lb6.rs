//! IPv6 service load-balancing maps (Cilium's `LB6_*`): the same master/slot
//! layout as `lb` with 128-bit addresses. The values that hold no address
//! (service entries, conntrack) reuse the IPv4 types. Reverse-NAT indices,
//! backend ids and affinity entries of IPv6 frontends live in their own maps
//! and number spaces, so the IPv4 maps and their lookups are untouched.

use crate::lb::Service4Value;

/// An IPv6 address as four u32 words in memory order: the 16 bytes exactly as
/// they sit in the packet (network order), compared word by word.
pub type Addr6 = [u32; 4];

/// Key of `LB6_SERVICES`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Service6Key {
    /// Frontend address (ClusterIP), network order.
    pub address: Addr6,
    /// Frontend port, network order.
    pub dport: u16,
    /// 0 for the master entry, 1..=count for backend slots.
    pub backend_slot: u16,
    /// IPPROTO_TCP / IPPROTO_UDP / IPPROTO_SCTP.
    pub proto: u8,
    /// Reserved for traffic-policy scopes; 0 today.
    pub scope: u8,
    pub pad: [u8; 2],
}

/// Value of `LB6_SERVICES`: the same fields as the IPv4 one (backend id or
/// affinity timeout, count, rev-NAT index into `LB6_REVNAT`, flags).
pub type Service6Value = Service4Value;

/// Value of `LB6_BACKENDS` (key: backend id, u32, never 0; ids are allocated
/// separately from `LB4_BACKENDS`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend6 {
    pub address: Addr6,
    pub port: u16,
    pub proto: u8,
    pub flags: u8,
}

/// Value of `LB6_REVNAT` (key: rev_nat_index, u32).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RevNat6 {
    pub address: Addr6,
    pub port: u16,
    pub pad: u16,
}

/// Key of `LB6_AFFINITY`: one client of one IPv6 frontend.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Affinity6Key {
    pub client: Addr6,
    pub rev_nat_index: u32,
}

/// Value of `LB6_AFFINITY`: the IPv4 layout (timestamp and backend id).
pub type Affinity6Value = crate::lb::Affinity4Value;

/// Key of `LB6_SOCK_REVNAT`: (socket cookie, backend) of a socket
/// `cgroup/connect6|sendmsg6` translated.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockRevNat6Key {
    pub cookie: u64,
    pub address: Addr6,
    pub port: u16,
    pub pad: [u16; 3],
}

/// Value of `LB6_SOCK_REVNAT`: the frontend to report instead of the backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockRevNat6Value {
    pub address: Addr6,
    pub rev_nat_index: u32,
    pub port: u16,
    pub pad: u16,
}

/// IPv6 hairpin source, `fd00:a9fe:2a01::1` (a unique-local address whose
/// bits echo the IPv4 hairpin 169.254.42.1 = a9fe:2a01): a pod reaching
/// itself through an IPv6 Service sees the connection come from here, and
/// its reply, routed to it through the host veth, is translated back. Not
/// link-local on purpose: the pod routes it through its default route (the
/// host veth) instead of resolving it on-link with neighbour discovery.
pub const HAIRPIN6_ADDR: Addr6 = [
    u32::from_ne_bytes([0xfd, 0x00, 0xa9, 0xfe]),
    u32::from_ne_bytes([0x2a, 0x01, 0, 0]),
    0,
    u32::from_ne_bytes([0, 0, 0, 1]),
];

/// The 16 address bytes in packet order.
#[inline(always)]
pub fn addr6_octets(a: &Addr6) -> [u8; 16] {
    let mut out = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let w = a[i].to_ne_bytes();
        out[i * 4] = w[0];
        out[i * 4 + 1] = w[1];
        out[i * 4 + 2] = w[2];
        out[i * 4 + 3] = w[3];
        i += 1;
    }
    out
}

/// The map form of 16 address bytes in packet order.
#[inline(always)]
pub fn addr6_from_octets(o: &[u8; 16]) -> Addr6 {
    [
        u32::from_ne_bytes([o[0], o[1], o[2], o[3]]),
        u32::from_ne_bytes([o[4], o[5], o[6], o[7]]),
        u32::from_ne_bytes([o[8], o[9], o[10], o[11]]),
        u32::from_ne_bytes([o[12], o[13], o[14], o[15]]),
    ]
}
