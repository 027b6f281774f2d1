//! IPv6 connection tracking (`CT6`, an LRU hash): the same entry kinds as
//! `ct` with 128-bit addresses: `CT_SERVICE` keyed by client -> frontend,
//! `CT_EGRESS` keyed by the translated client -> backend tuple (carrying the
//! rev-NAT index into `LB6_REVNAT`) or, for an endpoint under policy, by any
//! connection the pod opened (rev-NAT index 0), and `CT_INGRESS` keyed by a
//! connection opened to such a pod. ICMPv6 echo is tracked with the
//! identifier as a port, as ICMP echo in `CT4`.

use crate::lb6::Addr6;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Ct6Key {
    pub saddr: Addr6,
    pub daddr: Addr6,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// `ct::CT_SERVICE`, `ct::CT_EGRESS` or `ct::CT_INGRESS`.
    pub kind: u8,
    pub pad: [u8; 2],
}

/// Value of `CT6`: the IPv4 layout (it holds no address).
pub type Ct6Value = crate::ct::Ct4Value;
