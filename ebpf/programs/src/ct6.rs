//! IPv6 conntrack in `CT6` (catena_common::ct6): service flows and the
//! connections of endpoints under policy, with the entry kinds and
//! accounting of `ct` (whose `touch` and `now_ns` are shared: the value
//! layout is the same).

use catena_common::{
    ct::{Ct4Value, CT_EGRESS, CT_FLAG_CLOSING, CT_SERVICE},
    ct6::Ct6Key,
};

use crate::{maps::CT6, parse::Flow6};

/// Key of the `CT_SERVICE` entry: the original tuple (client -> frontend).
#[inline(always)]
pub fn service_key(flow: &Flow6) -> Ct6Key {
    Ct6Key {
        saddr: flow.saddr,
        daddr: flow.daddr,
        sport: flow.sport,
        dport: flow.dport,
        proto: flow.proto,
        kind: CT_SERVICE,
        pad: [0; 2],
    }
}

/// Key of the `CT_EGRESS` entry: the translated tuple (client, or the
/// hairpin address, -> backend).
#[inline(always)]
pub fn egress_key(flow: &Flow6, saddr: &[u32; 4], backend: &[u32; 4], port: u16) -> Ct6Key {
    Ct6Key {
        saddr: *saddr,
        daddr: *backend,
        sport: flow.sport,
        dport: port,
        proto: flow.proto,
        kind: CT_EGRESS,
        pad: [0; 2],
    }
}

/// The egress entry a reply belongs to: the reply's tuple reversed.
#[inline(always)]
pub fn reply_key(flow: &Flow6) -> Ct6Key {
    Ct6Key {
        saddr: flow.daddr,
        daddr: flow.saddr,
        sport: flow.dport,
        dport: flow.sport,
        proto: flow.proto,
        kind: CT_EGRESS,
        pad: [0; 2],
    }
}

/// The `CT_SERVICE` entry a hairpin flow's reverse-NATed reply (frontend ->
/// pod, bounced back by `from_container6`) belongs to: its tuple reversed.
#[inline(always)]
pub fn reversed_service_key(flow: &Flow6) -> Ct6Key {
    key(
        &flow.daddr,
        &flow.saddr,
        flow.dport,
        flow.sport,
        flow.proto,
        CT_SERVICE,
    )
}

/// A `kind` entry of the tuple `saddr:sport -> daddr:dport`.
#[inline(always)]
pub fn key(
    saddr: &[u32; 4],
    daddr: &[u32; 4],
    sport: u16,
    dport: u16,
    proto: u8,
    kind: u8,
) -> Ct6Key {
    Ct6Key {
        saddr: *saddr,
        daddr: *daddr,
        sport,
        dport,
        proto,
        kind,
        pad: [0; 2],
    }
}

#[inline(always)]
pub fn lookup(key: &Ct6Key) -> Option<*mut Ct4Value> {
    CT6.get_ptr_mut(key)
}

/// Creates or overwrites an entry for a flow's first packet.
#[inline(always)]
pub fn create(
    key: &Ct6Key,
    backend_id: u32,
    rev_nat_index: u32,
    now: u64,
    len: u32,
    closing: bool,
) -> Result<(), ()> {
    let value = Ct4Value {
        backend_id,
        rev_nat_index,
        flags: if closing { CT_FLAG_CLOSING } else { 0 },
        pad: [0; 3],
        created_ns: now,
        last_seen_ns: now,
        packets: 1,
        bytes: len as u64,
    };
    CT6.insert(key, value, 0).map_err(|_| ())
}
