//! The datapath's policy input and its readers. CONTRACT between the agent's
//! policy compiler and the datapath (see the docs on each item).

use crate::Datapath;
use std::collections::BTreeMap;
use std::net::Ipv4Addr;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Traffic into the endpoint (checked in `to_container`).
    Ingress,
    /// Traffic out of the endpoint (checked in `from_container`, after
    /// service translation, so it sees the backend's identity and port).
    Egress,
}

/// An inclusive port range; `{0, 0}` means any port. For ICMP (proto 1) the
/// "port" is the ICMP type.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct PortRange {
    pub start: u16,
    pub end: u16,
}

impl PortRange {
    pub const ANY: PortRange = PortRange { start: 0, end: 0 };

    pub fn single(port: u16) -> PortRange {
        PortRange { start: port, end: port }
    }

    pub fn is_any(self) -> bool {
        self == PortRange::ANY
    }
}

/// One allow or deny entry of an endpoint's policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct PolicyRule {
    pub direction: Direction,
    /// Remote identity; `identity::ANY` (0) matches every identity.
    pub remote_identity: u32,
    /// IP protocol; 0 matches any protocol (and then `ports` must be ANY).
    pub proto: u8,
    pub ports: PortRange,
    /// Deny wins over any allow that also matches.
    pub deny: bool,
    /// Agent-side reference to the policy that produced this entry, carried
    /// in verdict and drop events (0: none).
    pub rule_ref: u32,
}

/// An endpoint's whole policy. A direction that is not enforced allows all
/// (no policy selects the endpoint in that direction); an enforced one allows
/// only what an allow rule matches and no deny rule matches. Replies of
/// allowed connections always pass (conntrack).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EndpointPolicy {
    pub ingress_enforced: bool,
    pub egress_enforced: bool,
    pub rules: Vec<PolicyRule>,
}

/// Everything the policy maps should hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyDesired {
    /// Prefix (address, length) -> identity. Longest prefix wins; an address
    /// matching nothing is `identity::WORLD`.
    pub ipcache: BTreeMap<(Ipv4Addr, u8), u32>,
    /// Endpoint id -> its policy. An endpoint id absent here allows all.
    pub endpoints: BTreeMap<u32, EndpointPolicy>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyStats {
    pub entries_written: usize,
    pub entries_removed: usize,
    pub ipcache_written: usize,
    pub ipcache_removed: usize,
}

impl Datapath {
    /// Makes the policy maps hold exactly `desired`, writing only what
    /// differs, in an order that never opens a hole: new allows and denies
    /// first, enforcement flags after, removals last.
    pub fn apply_policy(&mut self, desired: &PolicyDesired) -> anyhow::Result<PolicyStats> {
        let _ = desired;
        unimplemented!("implemented by the datapath")
    }

    /// The policy entries programmed for an endpoint, read back from the maps.
    pub fn endpoint_policy(&self, endpoint_id: u32) -> anyhow::Result<Option<EndpointPolicy>> {
        let _ = endpoint_id;
        unimplemented!("implemented by the datapath")
    }

    /// The ipcache as programmed.
    pub fn ipcache(&self) -> anyhow::Result<BTreeMap<(Ipv4Addr, u8), u32>> {
        unimplemented!("implemented by the datapath")
    }
}
