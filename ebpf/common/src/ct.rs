//! Connection tracking (`CT4`, an LRU hash). Two kinds of entry are created when
//! a pod opens a connection to a service:
//! - `CT_SERVICE`: keyed by the original tuple (client -> frontend); remembers the
//!   chosen backend so every packet of the flow goes to the same one.
//! - `CT_EGRESS`: keyed by the translated tuple (client -> backend); replies are
//!   matched by reversing their tuple and carry `rev_nat_index` for reverse NAT.

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Ct4Key {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// `CT_SERVICE` or `CT_EGRESS`.
    pub kind: u8,
    pub pad: [u8; 2],
}

pub const CT_EGRESS: u8 = 0;
pub const CT_SERVICE: u8 = 1;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ct4Value {
    /// `CT_SERVICE`: the backend chosen for this flow.
    pub backend_id: u32,
    /// `CT_EGRESS`: frontend to restore in replies (0: no reverse NAT).
    pub rev_nat_index: u16,
    /// `CT_FLAG_*`.
    pub flags: u16,
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
