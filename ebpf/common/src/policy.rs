//! Network policy maps.
//!
//! `IPCACHE` (LPM trie): IPv4 prefix -> security identity of the remote end.
//! A miss means `identity::WORLD`. `IPCACHE6`: the same for IPv6 prefixes.
//! `POLICY` is shared by both families: its key holds identities and ports,
//! never addresses, so one rule set judges IPv4 and IPv6 alike.
//!
//! `POLICY` (LPM trie) holds one entry per (endpoint, remote identity,
//! direction, allow|deny, protocol, port prefix). The key's bits are ordered so
//! that the prefix length expresses the wildcards the programs need:
//!
//! ```text
//! | endpoint_id | identity | direction | kind | proto | 0 | port (network order) |
//! |<--------------- POLICY_PREFIX_ANY_PROTO ------->|
//! |<---------------------- POLICY_PREFIX_PROTO ---------->|
//! |<------------------------------ POLICY_PREFIX_FULL ------------------------->|
//! ```
//!
//! - "any protocol" entries stop before `proto` (the rule's ports are ANY too);
//! - "any port" entries stop before `port`;
//! - a port range is split into the minimal set of aligned port prefixes.
//!
//! A packet is looked up with its exact key in at most four lookups: the remote's
//! identity and `identity::ANY`, each for deny and for allow entries. Keeping
//! denies and allows under different keys means a longer allow can never hide
//! a shorter deny (longest-prefix match would pick the allow): any deny match
//! denies, then any allow match allows, else the default deny of an enforced
//! direction.
//!
//! `POLICY_EP` (array indexed by endpoint id): `POLICY_EP_*` flags. Reading it
//! is an inlined array access, so an endpoint without enforcement costs nothing
//! more than that.

/// Data part of the `IPCACHE` key (after the LPM prefix length): the address in
/// network order. Prefix lengths 0..=32.
pub type Ipcache4Key = u32;

/// Data part of the `IPCACHE6` key: the IPv6 address as four network-order
/// words, exactly as in the packet. Prefix lengths 0..=128.
pub type Ipcache6Key = crate::lb6::Addr6;

/// Value of `IPCACHE`: the identity of every address in the prefix.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IpcacheValue {
    pub identity: u32,
    /// Reserved (0).
    pub flags: u32,
}

pub const DIR_INGRESS: u8 = 0;
pub const DIR_EGRESS: u8 = 1;

pub const KIND_ALLOW: u8 = 0;
pub const KIND_DENY: u8 = 1;

/// Data part of the `POLICY` key (after the LPM prefix length).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyKey {
    /// The local endpoint whose policy this is (`EndpointInfo::endpoint_id`).
    pub endpoint_id: u32,
    /// Remote identity; `identity::ANY` (0) for "every identity".
    pub identity: u32,
    /// `DIR_INGRESS` or `DIR_EGRESS`.
    pub direction: u8,
    /// `KIND_ALLOW` or `KIND_DENY`.
    pub kind: u8,
    /// IP protocol (0 in "any protocol" entries, beyond their prefix).
    pub proto: u8,
    /// Always 0 (inside the protocol's prefix, so lookups must zero it too).
    pub pad: u8,
    /// Destination port in network order; for ICMP and ICMPv6 the type, as
    /// `[0, type]`.
    pub port: u16,
    /// Beyond the longest prefix: never compared. Always 0.
    pub pad2: u16,
}

/// Bits of `endpoint_id`, `identity`, `direction` and `kind`.
pub const POLICY_PREFIX_ANY_PROTO: u32 = 80;
/// ... plus `proto` and `pad`.
pub const POLICY_PREFIX_PROTO: u32 = 96;
/// ... plus all 16 bits of `port`.
pub const POLICY_PREFIX_FULL: u32 = 112;

/// Value of `POLICY`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyValue {
    /// `PolicyRule::rule_ref` of the rule that produced the entry (carried in
    /// verdict and drop events).
    pub rule_ref: u32,
    /// Reserved (0).
    pub flags: u32,
}

/// Slots of `POLICY_EP`: endpoint ids must be below this to carry policy.
pub const POLICY_EP_MAX: u32 = 65_536;

/// Ingress (to the endpoint) is enforced: only allowed new connections pass.
pub const POLICY_EP_INGRESS: u32 = 1 << 0;
/// Egress (from the endpoint) is enforced.
pub const POLICY_EP_EGRESS: u32 = 1 << 1;
/// The endpoint has deny entries for ingress: the deny lookups are needed.
pub const POLICY_EP_INGRESS_DENY: u32 = 1 << 2;
/// The endpoint has deny entries for egress.
pub const POLICY_EP_EGRESS_DENY: u32 = 1 << 3;
