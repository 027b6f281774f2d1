//! Maglev backend selection (catena_common::maglev): the flow's 5-tuple hash
//! indexes the frontend's lookup table in `LB4_MAGLEV` (IPv4) or
//! `LB6_MAGLEV` (IPv6). The hash is a pure function of the tuple (no
//! per-boot seed, unlike the skb hash), so every node maps a flow to the
//! same slot.

use aya_ebpf::maps::HashMap;
use catena_common::maglev::{MaglevTable, MAGLEV_TABLE_SIZE};

use crate::maps::{LB4_MAGLEV, LB6_MAGLEV};
use crate::parse::Flow6;

const JHASH_INITVAL: u32 = 0xdead_beef;

/// Linux's `jhash_3words` (include/linux/jhash.h), as Cilium hashes tuples.
#[inline(always)]
fn jhash_3words(a: u32, b: u32, c: u32, initval: u32) -> u32 {
    let init = initval.wrapping_add(JHASH_INITVAL).wrapping_add(3 << 2);
    jhash_final(
        a.wrapping_add(init),
        b.wrapping_add(init),
        c.wrapping_add(init),
    )
}

/// Linux's `__jhash_final`: the last mix of the three-word state; returns c.
#[inline(always)]
fn jhash_final(mut a: u32, mut b: u32, mut c: u32) -> u32 {
    c ^= b;
    c = c.wrapping_sub(b.rotate_left(14));
    a ^= c;
    a = a.wrapping_sub(c.rotate_left(11));
    b ^= a;
    b = b.wrapping_sub(a.rotate_left(25));
    c ^= b;
    c = c.wrapping_sub(b.rotate_left(16));
    a ^= c;
    a = a.wrapping_sub(c.rotate_left(4));
    b ^= a;
    b = b.wrapping_sub(a.rotate_left(14));
    c ^= b;
    c = c.wrapping_sub(b.rotate_left(24));
    c
}

/// Hash of a flow's 5-tuple (addresses and ports in network order, as in
/// the packet).
#[inline(always)]
pub fn tuple_hash(saddr: u32, daddr: u32, sport: u16, dport: u16, proto: u8) -> u32 {
    let ports = ((sport as u32) << 16) | dport as u32;
    jhash_3words(saddr, daddr, ports, proto as u32)
}

/// Linux's `__jhash_mix`: folds three more words into the state.
#[inline(always)]
fn jhash_mix(a: &mut u32, b: &mut u32, c: &mut u32) {
    *a = a.wrapping_sub(*c) ^ c.rotate_left(4);
    *c = c.wrapping_add(*b);
    *b = b.wrapping_sub(*a) ^ a.rotate_left(6);
    *a = a.wrapping_add(*c);
    *c = c.wrapping_sub(*b) ^ b.rotate_left(8);
    *b = b.wrapping_add(*a);
    *a = a.wrapping_sub(*c) ^ c.rotate_left(16);
    *c = c.wrapping_add(*b);
    *b = b.wrapping_sub(*a) ^ a.rotate_left(19);
    *a = a.wrapping_add(*c);
    *c = c.wrapping_sub(*b) ^ b.rotate_left(4);
    *b = b.wrapping_add(*a);
}

/// Hash of an IPv6 flow's 5-tuple: Linux's `jhash2` over the nine words
/// source address, destination address, ports (as [`tuple_hash`] packs
/// them), seeded with the protocol. Every address bit counts, so flows from
/// clients of one /64 still spread over the table.
#[inline(always)]
pub fn tuple_hash6(saddr: &[u32; 4], daddr: &[u32; 4], sport: u16, dport: u16, proto: u8) -> u32 {
    let ports = ((sport as u32) << 16) | dport as u32;
    let init = JHASH_INITVAL
        .wrapping_add(9 << 2)
        .wrapping_add(proto as u32);
    let (mut a, mut b, mut c) = (init, init, init);
    a = a.wrapping_add(saddr[0]);
    b = b.wrapping_add(saddr[1]);
    c = c.wrapping_add(saddr[2]);
    jhash_mix(&mut a, &mut b, &mut c);
    a = a.wrapping_add(saddr[3]);
    b = b.wrapping_add(daddr[0]);
    c = c.wrapping_add(daddr[1]);
    jhash_mix(&mut a, &mut b, &mut c);
    a = a.wrapping_add(daddr[2]);
    b = b.wrapping_add(daddr[3]);
    c = c.wrapping_add(ports);
    jhash_final(a, b, c)
}

/// The backend id the IPv4 frontend's Maglev table holds for `hash`; `None`
/// when the frontend has no table (it selects randomly).
#[inline(always)]
pub fn lookup(rev_nat_index: u32, hash: u32) -> Option<u32> {
    lookup_in(&LB4_MAGLEV, rev_nat_index, hash)
}

/// [`lookup`] for an IPv6 frontend (`LB6_MAGLEV`, IPv6 rev_nat_index) and
/// `flow`. The tuple is hashed only once a table is found: nothing is kept
/// live across the caller's other work, whose stack the IPv6 addresses and
/// keys already crowd, and random frontends never pay for the hash.
#[inline(always)]
pub fn lookup6(rev_nat_index: u32, flow: &Flow6) -> Option<u32> {
    let table = table(&LB6_MAGLEV, rev_nat_index)?;
    let hash = tuple_hash6(&flow.saddr, &flow.daddr, flow.sport, flow.dport, flow.proto);
    slot(table, hash)
}

#[inline(always)]
fn lookup_in(map: &HashMap<u32, MaglevTable>, rev_nat_index: u32, hash: u32) -> Option<u32> {
    slot(table(map, rev_nat_index)?, hash)
}

#[inline(always)]
fn table(map: &HashMap<u32, MaglevTable>, rev_nat_index: u32) -> Option<&MaglevTable> {
    // SAFETY: a reference into the map value, read once (`slot`); the agent
    // replaces a table whole (a hash-map update swaps the element), so the
    // read sees one table or the other.
    unsafe { map.get(&rev_nat_index) }
}

/// The backend id in `table`'s slot for `hash` (`None`: an empty slot).
#[inline(always)]
fn slot(table: &MaglevTable, hash: u32) -> Option<u32> {
    let index = (hash % MAGLEV_TABLE_SIZE as u32) as usize;
    // Hide the modulo's range from LLVM so the bounds check below stays in
    // the program: the verifier does not derive a range from a modulo and
    // needs an explicit comparison before indexing the map value.
    // SAFETY: a plain read of a local.
    let index = unsafe { core::ptr::read_volatile(&index) };
    if index >= MAGLEV_TABLE_SIZE {
        return None;
    }
    let id = table.backend_ids[index];
    (id != 0).then_some(id)
}
