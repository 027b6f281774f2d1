//! `METRICS`: a per-CPU array of packet counters indexed by `Counter`.

#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Packets from pods seen by from_container.
    FromContainer = 0,
    /// Packets to pods seen by to_container.
    ToContainer = 1,
    /// Packets translated to a service backend.
    ServiceDnat = 2,
    /// Replies translated back to the service frontend.
    ReverseNat = 3,
    /// Packets of new flows to a service with no backends that were dropped
    /// (TCP SYNs are rejected instead: see `RejectNoBackend`).
    DropNoBackend = 4,
    /// Packets that could not be parsed or rewritten.
    DropInvalid = 5,
    /// CT entries that could not be created (map full).
    DropCtFull = 6,
    /// TCP SYNs to a service with no backends answered with a RST.
    RejectNoBackend = 7,
    /// connect()/sendmsg() calls translated to a backend by the socket-level
    /// (cgroup) programs.
    SockTranslated = 8,
    /// connect()/sendmsg() calls to a service with no backends refused with
    /// ECONNREFUSED by the socket-level programs.
    SockRejected = 9,
    /// New connections denied by policy (and their retransmissions).
    DropPolicyDenied = 10,
    /// Packets from a pod whose IPv4 source is not its own.
    DropSpoofedSource = 11,
    /// Non-first fragments under an enforced direction (ports unknown).
    DropFragment = 12,
    /// Packets on an interface without an `ENDPOINTS` entry.
    DropUnknownEndpoint = 13,
    /// IPv6 (not neighbour discovery) under an enforced direction.
    DropUnsupportedL3 = 14,
    /// New connections allowed by an enforced policy.
    PolicyAllowed = 15,
    /// Events not emitted: over the per-CPU rate limit, or the ring was full.
    EventsLost = 16,
}

/// Slots of the `METRICS` array (room to grow without changing the pin).
pub const COUNTER_MAX: u32 = 32;

impl Counter {
    pub const ALL: [Counter; 17] = [
        Counter::FromContainer,
        Counter::ToContainer,
        Counter::ServiceDnat,
        Counter::ReverseNat,
        Counter::DropNoBackend,
        Counter::DropInvalid,
        Counter::DropCtFull,
        Counter::RejectNoBackend,
        Counter::SockTranslated,
        Counter::SockRejected,
        Counter::DropPolicyDenied,
        Counter::DropSpoofedSource,
        Counter::DropFragment,
        Counter::DropUnknownEndpoint,
        Counter::DropUnsupportedL3,
        Counter::PolicyAllowed,
        Counter::EventsLost,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Counter::FromContainer => "from_container",
            Counter::ToContainer => "to_container",
            Counter::ServiceDnat => "service_dnat",
            Counter::ReverseNat => "reverse_nat",
            Counter::DropNoBackend => "drop_no_backend",
            Counter::DropInvalid => "drop_invalid",
            Counter::DropCtFull => "drop_ct_full",
            Counter::RejectNoBackend => "reject_no_backend",
            Counter::SockTranslated => "sock_translated",
            Counter::SockRejected => "sock_rejected",
            Counter::DropPolicyDenied => "drop_policy_denied",
            Counter::DropSpoofedSource => "drop_spoofed_source",
            Counter::DropFragment => "drop_fragment",
            Counter::DropUnknownEndpoint => "drop_unknown_endpoint",
            Counter::DropUnsupportedL3 => "drop_unsupported_l3",
            Counter::PolicyAllowed => "policy_allowed",
            Counter::EventsLost => "events_lost",
        }
    }
}
