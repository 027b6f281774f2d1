//! Per-endpoint configuration (`ENDPOINTS`, a hash keyed by the host-side veth
//! ifindex as u32). The shared programs read their per-pod behaviour from here.

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointInfo {
    /// The pod's primary IPv4 address, network order (0 if none).
    pub ipv4: u32,
    /// Agent-assigned endpoint id (stable across restarts).
    pub endpoint_id: u32,
    /// Node-local security identity of the pod's labels.
    pub identity: u32,
    /// `EP_FLAG_*`.
    pub flags: u32,
    /// The pod's primary IPv6 address, network order (all zero if none).
    pub ipv6: [u32; 4],
}

/// Enforce that packets from the pod carry one of its own addresses: the
/// IPv4 source must be `ipv4`, the IPv6 source `ipv6`, a link-local address
/// (fe80::/10: neighbour discovery, router solicitation) or the unspecified
/// address (`::`, duplicate address detection). A family the pod has no
/// address of (zero) allows only the unspecified source (and, for IPv6,
/// link-local ones): a single-stack pod was given no global address of the
/// other family, so any such source is not its own.
pub const EP_FLAG_ANTI_SPOOF: u32 = 1 << 0;
