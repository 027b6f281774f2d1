//! Maglev backend selection (catena_common::maglev): the flow's 5-tuple hash
//! indexes the frontend's lookup table in `LB4_MAGLEV`. The hash is a pure
//! function of the tuple (no per-boot seed, unlike the skb hash), so every
//! node maps a flow to the same slot.

use catena_common::maglev::MAGLEV_TABLE_SIZE;

use crate::maps::LB4_MAGLEV;

const JHASH_INITVAL: u32 = 0xdead_beef;

/// Linux's `jhash_3words` (include/linux/jhash.h), as Cilium hashes tuples.
#[inline(always)]
fn jhash_3words(a: u32, b: u32, c: u32, initval: u32) -> u32 {
    let init = initval.wrapping_add(JHASH_INITVAL).wrapping_add(3 << 2);
    let (mut a, mut b, mut c) = (
        a.wrapping_add(init),
        b.wrapping_add(init),
        c.wrapping_add(init),
    );
    // __jhash_final
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

/// The backend id the frontend's Maglev table holds for `hash`; `None` when
/// the frontend has no table (it selects randomly).
#[inline(always)]
pub fn lookup(rev_nat_index: u32, hash: u32) -> Option<u32> {
    // SAFETY: a reference into the map value, read once below; the agent
    // replaces a table whole (a hash-map update swaps the element), so the
    // read sees one table or the other.
    let table = unsafe { LB4_MAGLEV.get(&rev_nat_index) }?;
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
