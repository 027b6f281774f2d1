//! Connection tracking (`CT4`, an LRU hash). Two kinds of entry are created when
//! a pod opens a connection to a service:
//! - `CT_SERVICE`: keyed by the original tuple (client -> frontend); remembers the
//!   chosen backend so every packet of the flow goes to the same one.
//! - `CT_EGRESS`: keyed by the translated tuple (client -> backend); replies are
//!   matched by reversing their tuple and carry `rev_nat_index` for reverse NAT.
//!
//! For an endpoint under policy (either direction enforced) every connection
//! is tracked, so replies pass without a policy lookup:
//! - `CT_EGRESS` (rev_nat_index 0) for a connection the pod opened, keyed by
//!   its tuple (pod -> remote) exactly like a service flow after translation;
//! - `CT_INGRESS` for a connection opened to the pod, keyed by its tuple
//!   (remote -> pod); the pod's replies match it reversed.
//!
//! ICMP echo is tracked with the identifier as a port (`sport` of a request,
//! `dport` of a reply); other protocols without ports with ports 0.

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Ct4Key {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// `CT_SERVICE`, `CT_EGRESS` or `CT_INGRESS`.
    pub kind: u8,
    pub pad: [u8; 2],
}

pub const CT_EGRESS: u8 = 0;
pub const CT_SERVICE: u8 = 1;
pub const CT_INGRESS: u8 = 2;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ct4Value {
    /// `CT_SERVICE`: the backend chosen for this flow.
    pub backend_id: u32,
    /// `CT_EGRESS`: frontend to restore in replies (0: no reverse NAT).
    pub rev_nat_index: u32,
    /// `CT_FLAG_*`.
    pub flags: u16,
    /// The u64s below are 8-aligned: 6 bytes are padding either way, named
    /// so nothing in the value is an implicit hole.
    pub pad: [u16; 3],
    /// bpf_ktime_get_ns() of creation and of the last packet (either direction).
    pub created_ns: u64,
    pub last_seen_ns: u64,
    pub packets: u64,
    pub bytes: u64,
}

/// A reply has been seen.
pub const CT_FLAG_SEEN_REPLY: u16 = 1 << 0;
/// FIN or RST seen: the entry may be collected after a short timeout.
pub const CT_FLAG_CLOSING: u16 = 1 << 1;
