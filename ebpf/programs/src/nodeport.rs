//! State of north-south flows (see catena_common::nodeport): which backends
//! are local, which address SNAT uses on a device, and the SNAT table.

use aya_ebpf::{bindings::BPF_NOEXIST, helpers::bpf_get_prandom_u32};
use catena_common::nodeport::{
    Snat4Key, Snat4Value, SNAT_DIR_IN, SNAT_DIR_OUT, SNAT_PORT_MAX, SNAT_PORT_MIN,
};

use crate::maps::{DEVICES4, LOCAL_EP4, SNAT4};

/// Ports tried before a new flow gives up (the range has 4536; a collision
/// needs the same backend, backend port and node address).
const SNAT_TRIES: u32 = 8;
const SNAT_RANGE: u32 = (SNAT_PORT_MAX - SNAT_PORT_MIN) as u32 + 1;

/// Whether `addr` (network order) is one of this node's endpoints.
#[inline(always)]
pub fn is_local(addr: u32) -> bool {
    // SAFETY: only the presence is used.
    unsafe { LOCAL_EP4.get(&addr) }.is_some()
}

/// The SNAT address of external device `ifindex`, if catena manages it.
#[inline(always)]
pub fn device_addr(ifindex: u32) -> Option<u32> {
    // SAFETY: copied out at once.
    let dev = unsafe { DEVICES4.get(&ifindex) }.copied()?;
    (dev.ipv4 != 0).then_some(dev.ipv4)
}

/// A flow to a frontend DNATed to a backend, before SNAT.
pub struct Translated {
    pub client: u32,
    pub client_port: u16,
    /// The destination the client sent to (a node address and NodePort,
    /// an externalIP or a LoadBalancer IP and the service port).
    pub frontend: u32,
    pub frontend_port: u16,
    pub backend: u32,
    pub backend_port: u16,
    pub proto: u8,
}

/// The reply `saddr:sport -> daddr:dport` of a SNATed flow: the client to
/// restore and the frontend index. Refreshes the entry's clock.
#[inline(always)]
pub fn reply_of(
    saddr: u32,
    daddr: u32,
    sport: u16,
    dport: u16,
    proto: u8,
    now: u64,
) -> Option<Snat4Value> {
    let key = Snat4Key {
        saddr,
        daddr,
        sport,
        dport,
        proto,
        dir: SNAT_DIR_IN,
        pad: [0; 2],
    };
    let entry = SNAT4.get_ptr_mut(&key)?;
    // SAFETY: a live value pointer from this run's lookup.
    let e = unsafe { &mut *entry };
    e.last_seen_ns = now;
    Some(*e)
}

/// The node port `t` leaves with from `snat_addr`: the flow's existing
/// translation, or a newly claimed port. Both directions are written; the
/// inbound entry is claimed with BPF_NOEXIST, so two flows never share a
/// reply tuple. `None`: no free port after `SNAT_TRIES` or the table is full.
///
/// The outbound entry is keyed by the flow as the client sent it (to the
/// frontend), not as DNATed: one client port may reach two frontends of the
/// same backend (an externalIP and a LoadBalancer IP, say), and each needs
/// a reply tuple, and a `rev_nat_index` to answer as, of its own.
#[inline(always)]
pub fn snat_port(t: &Translated, snat_addr: u32, rev_nat_index: u32, now: u64) -> Option<u16> {
    let out_key = Snat4Key {
        saddr: t.client,
        daddr: t.frontend,
        sport: t.client_port,
        dport: t.frontend_port,
        proto: t.proto,
        dir: SNAT_DIR_OUT,
        pad: [0; 2],
    };
    if let Some(entry) = SNAT4.get_ptr_mut(&out_key) {
        // SAFETY: a live value pointer from this run's lookup.
        let out = unsafe { &mut *entry };
        // The LRU may have evicted one direction alone, and the flow may
        // have moved to another backend since: reuse the translation only
        // while its reply entry still leads back here.
        if out.to_addr == snat_addr && leads_back(t, snat_addr, out.to_port, rev_nat_index, now) {
            out.last_seen_ns = now;
            return Some(out.to_port);
        }
    }
    // First choice derived from the client's port (stable for retries of one
    // flow), then random ones.
    let mut port = SNAT_PORT_MIN as u32 + u16::from_be(t.client_port) as u32 % SNAT_RANGE;
    let back = Snat4Value {
        to_addr: t.client,
        to_port: t.client_port,
        rev_nat_index,
        pad: [0; 3],
        last_seen_ns: now,
    };
    for _ in 0..SNAT_TRIES {
        let nport = (port as u16).to_be();
        let in_key = Snat4Key {
            saddr: t.backend,
            daddr: snat_addr,
            sport: t.backend_port,
            dport: nport,
            proto: t.proto,
            dir: SNAT_DIR_IN,
            pad: [0; 2],
        };
        // A taken port is still ours when its reply entry already leads back
        // to this very flow (its outbound entry evicted alone).
        if SNAT4.insert(&in_key, &back, BPF_NOEXIST as u64).is_ok()
            || leads_back(t, snat_addr, nport, rev_nat_index, now)
        {
            let out = Snat4Value {
                to_addr: snat_addr,
                to_port: nport,
                rev_nat_index,
                pad: [0; 3],
                last_seen_ns: now,
            };
            if SNAT4.insert(&out_key, &out, 0).is_err() {
                let _ = SNAT4.remove(&in_key);
                return None;
            }
            return Some(nport);
        }
        // SAFETY: helper without arguments.
        port = SNAT_PORT_MIN as u32 + unsafe { bpf_get_prandom_u32() } % SNAT_RANGE;
    }
    None
}

/// Whether the reply tuple `t.backend -> snat_addr:nport` belongs to `t`:
/// it restores `t`'s client and port and answers as `t`'s frontend.
#[inline(always)]
fn leads_back(t: &Translated, snat_addr: u32, nport: u16, rev_nat_index: u32, now: u64) -> bool {
    match reply_of(t.backend, snat_addr, t.backend_port, nport, t.proto, now) {
        Some(back) => {
            back.to_addr == t.client
                && back.to_port == t.client_port
                && back.rev_nat_index == rev_nat_index
        }
        None => false,
    }
}
