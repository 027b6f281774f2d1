//! `EVENTS`: a ring buffer of drop and policy-verdict records for the agent.
//! Emission is rate-limited per CPU (`EVENTS_RATE`), so a flood of dropped
//! packets costs a counter increment, not a ring-buffer write each.

pub const EVENT_DROP: u8 = 1;
pub const EVENT_POLICY_VERDICT: u8 = 2;

/// One record of an IPv4 packet (or of none). Addresses and ports in network
/// order, as in the packet. An IPv6 packet's record is an [`Event6`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    /// `EVENT_DROP` or `EVENT_POLICY_VERDICT`.
    pub kind: u8,
    /// `Reason` as u8.
    pub reason: u8,
    /// `policy::DIR_INGRESS` or `policy::DIR_EGRESS`.
    pub direction: u8,
    /// 1 if the packet was allowed (verdicts only).
    pub allowed: u8,
    pub ifindex: u32,
    pub endpoint_id: u32,
    pub src_identity: u32,
    pub dst_identity: u32,
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// 1: the record is an [`Event6`] (`saddr`/`daddr` are 0).
    pub ipv6: u8,
    pub pad: [u8; 2],
    pub rule_ref: u32,
}

/// The record of an IPv6 packet: an [`Event`] with `ipv6` set, followed by
/// the addresses. A separate, longer record keeps the IPv4 programs' stack
/// (where events are built) as it was.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event6 {
    pub event: Event,
    pub saddr6: [u32; 4],
    pub daddr6: [u32; 4],
}

/// Why a packet was dropped (or, for verdicts, how it was decided).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Verdict of an allowed new connection.
    PolicyAllowed = 1,
    PolicyDenied = 2,
    SpoofedSource = 3,
    /// A non-first IPv4 fragment under an enforced direction whose
    /// protocol-level entries do not allow it (its ports are unknown).
    Fragment = 4,
    NoBackend = 5,
    /// Malformed packet, or a rewrite that failed.
    Invalid = 6,
    /// No conntrack entry could be created.
    CtFull = 7,
    /// No `ENDPOINTS` entry for the interface (fail closed).
    UnknownEndpoint = 8,
    /// IPv6 (other than neighbour discovery) under an enforced direction
    /// whose IPv6 policy program is missing (the agent loads it before any
    /// endpoint exists): fail closed rather than let IPv6 bypass policy.
    UnsupportedL3 = 9,
}

impl Reason {
    pub const ALL: [Reason; 9] = [
        Reason::PolicyAllowed,
        Reason::PolicyDenied,
        Reason::SpoofedSource,
        Reason::Fragment,
        Reason::NoBackend,
        Reason::Invalid,
        Reason::CtFull,
        Reason::UnknownEndpoint,
        Reason::UnsupportedL3,
    ];

    pub fn from_u8(v: u8) -> Option<Reason> {
        Reason::ALL.into_iter().find(|r| *r as u8 == v)
    }

    /// Stable snake_case name (`DatapathEvent::reason`).
    pub const fn name(self) -> &'static str {
        match self {
            Reason::PolicyAllowed => "policy_allowed",
            Reason::PolicyDenied => "policy_denied",
            Reason::SpoofedSource => "spoofed_source",
            Reason::Fragment => "fragment",
            Reason::NoBackend => "no_backend",
            Reason::Invalid => "invalid",
            Reason::CtFull => "ct_full",
            Reason::UnknownEndpoint => "unknown_endpoint",
            Reason::UnsupportedL3 => "unsupported_l3",
        }
    }
}

/// Per-CPU token bucket of `EVENTS_RATE` (one slot).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventRate {
    pub tokens: u64,
    pub last_ns: u64,
}

/// Events a CPU may emit in a burst, and its refill rate.
pub const EVENTS_BURST: u64 = 1_024;
pub const EVENTS_PER_SEC: u64 = 10_000;
/// Ring buffer size (a power-of-two multiple of the page size).
pub const EVENTS_RING_BYTES: u32 = 1 << 20;
