//! Connection tracking in the `CT4` LRU hash (see catena_common::ct for the two
//! entry kinds). Packet/byte counters are plain read-modify-writes: two CPUs
//! racing on the same flow may lose an increment, which is acceptable for
//! statistics and keeps the per-packet path free of atomics.

use aya_ebpf::helpers::bpf_ktime_get_coarse_ns;
use catena_common::ct::{Ct4Key, Ct4Value, CT_EGRESS, CT_FLAG_CLOSING, CT_SERVICE};

use crate::{maps::CT4, parse::Flow4};

/// CLOCK_MONOTONIC at tick resolution (a few ms), the clock of every
/// timestamp the datapath keeps (conntrack, affinity, event tokens). Their
/// timeouts are seconds, and the coarse clock costs no TSC read, which the
/// per-packet path would otherwise pay on every packet. The agent compares
/// against CLOCK_MONOTONIC, which the coarse clock trails by at most a tick.
#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: helper without arguments.
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// Key of the `CT_SERVICE` entry: the original tuple (client -> frontend).
#[inline(always)]
pub fn service_key(flow: &Flow4) -> Ct4Key {
    Ct4Key {
        saddr: flow.saddr,
        daddr: flow.daddr,
        sport: flow.sport,
        dport: flow.dport,
        proto: flow.proto,
        kind: CT_SERVICE,
        pad: [0; 2],
    }
}

/// Key of the `CT_EGRESS` entry: the translated tuple (client -> backend;
/// `saddr` is the client, or the hairpin address for a pod reaching itself).
#[inline(always)]
pub fn egress_key(flow: &Flow4, saddr: u32, backend_addr: u32, backend_port: u16) -> Ct4Key {
    Ct4Key {
        saddr,
        daddr: backend_addr,
        sport: flow.sport,
        dport: backend_port,
        proto: flow.proto,
        kind: CT_EGRESS,
        pad: [0; 2],
    }
}

/// The egress entry a reply belongs to: the reply's tuple reversed.
#[inline(always)]
pub fn reply_key(flow: &Flow4) -> Ct4Key {
    reversed_key(flow, CT_EGRESS)
}

/// The packet's own tuple as a `kind` entry.
#[inline(always)]
pub fn tuple_key(flow: &Flow4, kind: u8) -> Ct4Key {
    Ct4Key {
        saddr: flow.saddr,
        daddr: flow.daddr,
        sport: flow.sport,
        dport: flow.dport,
        proto: flow.proto,
        kind,
        pad: [0; 2],
    }
}

/// The `kind` entry the packet is a reply of: its tuple reversed.
#[inline(always)]
pub fn reversed_key(flow: &Flow4, kind: u8) -> Ct4Key {
    Ct4Key {
        saddr: flow.daddr,
        daddr: flow.saddr,
        sport: flow.dport,
        dport: flow.sport,
        proto: flow.proto,
        kind,
        pad: [0; 2],
    }
}

/// A new connection (TCP SYN) on a tuple that a finished Service flow used
/// (same client port to the same backend) must not inherit its reverse
/// translation: replies would come back with the frontend as their source
/// and the client would drop them. Clears it; conntrack's other state stays.
#[inline(always)]
pub fn forget_translation(key: &Ct4Key) {
    if let Some(entry) = lookup(key) {
        // SAFETY: pointer from a CT4 lookup in this run.
        unsafe {
            if (*entry).rev_nat_index != 0 {
                (*entry).rev_nat_index = 0;
            }
        }
    }
}

#[inline(always)]
pub fn lookup(key: &Ct4Key) -> Option<*mut Ct4Value> {
    CT4.get_ptr_mut(key)
}

/// Accounts one packet in an existing entry.
///
/// # Safety
/// `entry` must come from `lookup` in this program run.
#[inline(always)]
pub unsafe fn touch(entry: *mut Ct4Value, now: u64, len: u32, closing: bool) {
    // SAFETY: per the contract, a live map value pointer.
    let e = unsafe { &mut *entry };
    e.last_seen_ns = now;
    e.packets += 1;
    e.bytes += len as u64;
    if closing {
        e.flags |= CT_FLAG_CLOSING;
    }
}

/// Creates or overwrites an entry for a flow's first packet.
#[inline(always)]
pub fn create(
    key: &Ct4Key,
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
    CT4.insert(key, value, 0).map_err(|_| ())
}
