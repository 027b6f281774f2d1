//! IPv6 connection tracking (`CT6`, an LRU hash): the same entry kinds as
//! `ct` (`CT_SERVICE` keyed by client -> frontend, `CT_EGRESS` keyed by the
//! translated client -> backend tuple, carrying the rev-NAT index into
//! `LB6_REVNAT`) with 128-bit addresses. Only service flows are tracked:
//! policy is IPv4-only, and an endpoint under policy drops IPv6 before it
//! reaches the service code.

use crate::lb6::Addr6;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Ct6Key {
    pub saddr: Addr6,
    pub daddr: Addr6,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// `ct::CT_SERVICE` or `ct::CT_EGRESS`.
    pub kind: u8,
    pub pad: [u8; 2],
}

/// Value of `CT6`: the IPv4 layout (it holds no address).
pub type Ct6Value = crate::ct::Ct4Value;
