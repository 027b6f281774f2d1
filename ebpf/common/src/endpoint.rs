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
}

/// Enforce that packets from the pod carry one of its own addresses.
pub const EP_FLAG_ANTI_SPOOF: u32 = 1 << 0;
