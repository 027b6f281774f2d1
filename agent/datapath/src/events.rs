//! Drop and policy-verdict events from the programs (a ring buffer), read by
//! the agent for `catena monitor` and metrics. CONTRACT: the types and
//! `Datapath::event_reader` are what the agent builds on.

use crate::policy::Direction;
use crate::Datapath;
use std::net::Ipv4Addr;
use std::time::Duration;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum EventKind {
    /// A packet was dropped (`reason` says why).
    Drop,
    /// A policy decision on a new connection (allowed or denied).
    PolicyVerdict,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DatapathEvent {
    pub kind: EventKind,
    /// Stable snake_case name, e.g. `policy_denied`, `spoofed_source`,
    /// `no_backend`, `fragment`, `invalid`.
    pub reason: String,
    pub allowed: bool,
    pub direction: Direction,
    pub ifindex: u32,
    pub endpoint_id: u32,
    pub src_identity: u32,
    pub dst_identity: u32,
    pub saddr: Ipv4Addr,
    pub daddr: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// The `PolicyRule::rule_ref` that decided (0: default deny / none).
    pub rule_ref: u32,
}

/// A consumer of the event ring buffer (one at a time per agent).
pub struct EventReader {
    _private: (),
}

impl EventReader {
    /// Events available now, waiting at most `timeout` for the first one.
    pub fn poll(&mut self, timeout: Duration) -> anyhow::Result<Vec<DatapathEvent>> {
        let _ = timeout;
        unimplemented!("implemented by the datapath")
    }
}

impl Datapath {
    pub fn event_reader(&mut self) -> anyhow::Result<EventReader> {
        unimplemented!("implemented by the datapath")
    }
}
