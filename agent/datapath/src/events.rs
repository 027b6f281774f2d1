//! Drop and policy-verdict events from the programs (a ring buffer), read by
//! the agent for `catena monitor` and metrics. CONTRACT: the types and
//! `Datapath::event_reader` are what the agent builds on.
//!
//! The programs rate-limit emission per CPU (`catena_common::events`); events
//! not emitted are counted in the `events_lost` counter, drops always in
//! their `drop_*` counter.

use crate::policy::Direction;
use crate::Datapath;
use anyhow::Context;
use aya::maps::{Map, MapData, RingBuf};
use catena_common::events::{Event, Event6, Reason, EVENT_DROP, EVENT_POLICY_VERDICT};
use catena_common::map_names;
use catena_common::policy::DIR_EGRESS;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

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
    /// `no_backend`, `fragment`, `invalid`. Verdicts: `policy_allowed` or
    /// `policy_denied`.
    pub reason: String,
    pub allowed: bool,
    pub direction: Direction,
    pub ifindex: u32,
    pub endpoint_id: u32,
    /// Identities: the endpoint's own, and the remote's where the program
    /// looked it up (policy decisions); 0 where not known.
    pub src_identity: u32,
    pub dst_identity: u32,
    /// IPv4 or IPv6 (`0.0.0.0` where the packet's tuple is not known).
    pub saddr: IpAddr,
    pub daddr: IpAddr,
    /// For a service flow's egress decision: the backend (after DNAT).
    /// ICMP echo: the identifier (sport of a request, dport of a reply).
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// The `PolicyRule::rule_ref` that decided (0: default deny / none).
    pub rule_ref: u32,
}

/// A consumer of the event ring buffer (one at a time per agent).
pub struct EventReader {
    ring: RingBuf<MapData>,
}

fn decode(bytes: &[u8]) -> Option<DatapathEvent> {
    if bytes.len() < std::mem::size_of::<Event>() {
        return None;
    }
    // SAFETY: length checked; Event is plain data, read unaligned.
    let ev: Event = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
    let (saddr, daddr) = if ev.ipv6 != 0 {
        if bytes.len() < std::mem::size_of::<Event6>() {
            return None;
        }
        // SAFETY: as above, for the longer IPv6 record.
        let ev6: Event6 = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
        (IpAddr::V6(addr6(ev6.saddr6)), IpAddr::V6(addr6(ev6.daddr6)))
    } else {
        (
            IpAddr::V4(Ipv4Addr::from(ev.saddr.to_ne_bytes())),
            IpAddr::V4(Ipv4Addr::from(ev.daddr.to_ne_bytes())),
        )
    };
    let kind = match ev.kind {
        EVENT_DROP => EventKind::Drop,
        EVENT_POLICY_VERDICT => EventKind::PolicyVerdict,
        _ => return None,
    };
    let reason = Reason::from_u8(ev.reason)
        .map_or_else(|| format!("unknown_{}", ev.reason), |r| r.name().to_owned());
    Some(DatapathEvent {
        kind,
        reason,
        allowed: ev.allowed != 0,
        direction: if ev.direction == DIR_EGRESS {
            Direction::Egress
        } else {
            Direction::Ingress
        },
        ifindex: ev.ifindex,
        endpoint_id: ev.endpoint_id,
        src_identity: ev.src_identity,
        dst_identity: ev.dst_identity,
        saddr,
        daddr,
        sport: u16::from_be(ev.sport),
        dport: u16::from_be(ev.dport),
        proto: ev.proto,
        rule_ref: ev.rule_ref,
    })
}

/// An address as the programs hold it: four words in network order.
fn addr6(words: [u32; 4]) -> Ipv6Addr {
    let mut o = [0u8; 16];
    for (i, w) in words.iter().enumerate() {
        o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
    }
    Ipv6Addr::from(o)
}

impl EventReader {
    fn drain(&mut self, out: &mut Vec<DatapathEvent>) {
        while let Some(item) = self.ring.next() {
            if let Some(ev) = decode(&item) {
                out.push(ev);
            }
        }
    }

    /// Events available now, waiting at most `timeout` for the first one.
    pub fn poll(&mut self, timeout: Duration) -> anyhow::Result<Vec<DatapathEvent>> {
        let mut out = Vec::new();
        self.drain(&mut out);
        let deadline = Instant::now() + timeout;
        while out.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let mut pfd = libc::pollfd {
                fd: self.ring.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
            // SAFETY: one valid pollfd for the duration of the call.
            let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
            if rc < 0 {
                let err = std::io::Error::last_os_error();
                if err.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(err).context("poll on the EVENTS ring buffer");
            }
            self.drain(&mut out);
        }
        Ok(out)
    }
}

impl Datapath {
    /// A reader of the pinned `EVENTS` ring buffer. It opens the pin itself,
    /// so it does not borrow the datapath and can live on its own thread.
    pub fn event_reader(&mut self) -> anyhow::Result<EventReader> {
        let path = self.layout.maps().join(map_names::EVENTS);
        let data = MapData::from_pin(&path)
            .with_context(|| format!("opening the pinned ring buffer {}", path.display()))?;
        let ring = RingBuf::try_from(Map::RingBuf(data)).context("EVENTS is not a ring buffer")?;
        Ok(EventReader { ring })
    }
}
