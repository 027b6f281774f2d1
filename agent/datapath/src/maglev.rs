//! Maglev lookup tables (catena_common::maglev): computed here from each
//! Maglev frontend's backends and written to `LB4_MAGLEV` (IPv4 frontends)
//! or `LB6_MAGLEV` (IPv6) under the frontend's rev_nat_index. A table is a
//! list of backend ids, so one [`Maglev`] per map serves either family;
//! only a backend's name in the permutation depends on its address family.
//!
//! The table depends only on the backends' addresses and ports (never on
//! node-local backend ids), so every node computes the same slot -> backend
//! assignment and a flow hashes to the same backend wherever it lands.
//!
//! Ordering against the service maps (`lb.rs`): tables of frontends that stop
//! using Maglev are deleted before the service maps change, new tables are
//! written after (their backend ids then exist). In between the datapath
//! falls back to random selection for the frontend, never to a wrong or
//! missing backend.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, Ipv6Addr};

use anyhow::Context;
use aya::maps::{HashMap, MapData};
use catena_common::maglev::{MaglevTable, MAGLEV_TABLE_SIZE};
use tracing::debug;

use crate::lb::is_not_found;
use crate::BackendAddr;

/// FNV-1a over `bytes` from `seed`, then the splitmix64 finalizer so nearby
/// inputs (addresses differing in one octet) spread over the whole range.
/// Fixed forever: changing it changes every node's tables.
fn hash64(bytes: &[u8], seed: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed;
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// A backend address family whose addresses Maglev tables can name.
pub trait MaglevAddress: Copy + Ord {
    /// The address in network order.
    fn network_octets(&self) -> Vec<u8>;
}

impl MaglevAddress for Ipv4Addr {
    fn network_octets(&self) -> Vec<u8> {
        self.octets().to_vec()
    }
}

impl MaglevAddress for Ipv6Addr {
    fn network_octets(&self) -> Vec<u8> {
        self.octets().to_vec()
    }
}

/// What identifies a backend in the permutation: address and port in
/// network order (6 bytes for IPv4, 18 for IPv6).
fn backend_name<A: MaglevAddress>(b: &BackendAddr<A>) -> Vec<u8> {
    let mut name = b.address.network_octets();
    name.extend_from_slice(&b.port.to_be_bytes());
    name
}

/// Maglev's population (paper, section 3.4): backend i walks its permutation
/// `(offset_i + j * skip_i) % m` and claims the first free slot, round-robin
/// over backends until all `m` slots are taken. Returns, per slot, the index
/// into `backends`. `m` must be prime (so every permutation visits every
/// slot) and `backends` non-empty; callers sort `backends` so every node
/// feeds the same order.
pub fn populate<A: MaglevAddress>(backends: &[BackendAddr<A>], m: usize) -> Vec<u32> {
    assert!(m > 1 && !backends.is_empty(), "maglev: m > 1 and backends");
    let perms: Vec<(u64, u64)> = backends
        .iter()
        .map(|b| {
            let name = backend_name(b);
            let offset = hash64(&name, 0) % m as u64;
            let skip = hash64(&name, 0x9e37_79b9_7f4a_7c15) % (m as u64 - 1) + 1;
            (offset, skip)
        })
        .collect();
    let mut next = vec![0u64; backends.len()];
    let mut table = vec![u32::MAX; m];
    let mut filled = 0;
    loop {
        for (i, (offset, skip)) in perms.iter().enumerate() {
            let mut slot = ((offset + next[i] * skip) % m as u64) as usize;
            while table[slot] != u32::MAX {
                next[i] += 1;
                slot = ((offset + next[i] * skip) % m as u64) as usize;
            }
            table[slot] = i as u32;
            next[i] += 1;
            filled += 1;
            if filled == m {
                return table;
            }
        }
    }
}

/// One frontend's Maglev input: its rev_nat_index and its backends with the
/// ids the service maps gave them (aligned), of one family.
pub(crate) struct MaglevFrontend<'a, A = Ipv4Addr> {
    pub rev_nat_index: u32,
    pub backends: &'a [BackendAddr<A>],
    pub ids: &'a [u32],
}

/// The tables of one family's frontends (one map; rev_nat indices and
/// backend ids of that family's number spaces).
pub(crate) struct Maglev {
    map: HashMap<MapData, u32, MaglevTable>,
    /// The map's name, for errors.
    name: &'static str,
    /// rev_nat_index -> the backend ids its table holds (sorted, distinct).
    /// The table is a pure function of the backend set, so an equal set
    /// means an equal table and no write.
    written: BTreeMap<u32, BTreeSet<u32>>,
    /// Table writes and deletes so far (tests and logs).
    pub writes: u64,
}

impl Maglev {
    /// Reads back what the pinned map holds, so a restarted agent rewrites
    /// only tables whose backends changed.
    pub fn open(
        map: HashMap<MapData, u32, MaglevTable>,
        name: &'static str,
    ) -> anyhow::Result<Maglev> {
        let mut written = BTreeMap::new();
        for entry in map.iter() {
            let (idx, table) = entry.with_context(|| format!("reading {name}"))?;
            written.insert(idx, table.backend_ids.iter().copied().collect());
        }
        Ok(Maglev {
            map,
            name,
            written,
            writes: 0,
        })
    }

    /// Deletes every table whose rev_nat_index is not in `keep`. Run before
    /// the service maps change, so a frontend that stops using Maglev (or is
    /// removed, freeing its index) never sees a stale table.
    pub fn retain(&mut self, keep: &BTreeSet<u32>) -> anyhow::Result<()> {
        let stale: Vec<u32> = self
            .written
            .keys()
            .filter(|i| !keep.contains(i))
            .copied()
            .collect();
        for idx in stale {
            self.writes += 1;
            match self.map.remove(&idx) {
                Ok(()) => {}
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(e).with_context(|| format!("deleting from {}", self.name)),
            }
            self.written.remove(&idx);
        }
        Ok(())
    }

    /// Writes the tables of `frontends` whose backend set changed (after the
    /// service maps, so every id named exists). A frontend without backends
    /// gets no table (it rejects new flows anyway).
    pub fn write<A: MaglevAddress>(
        &mut self,
        frontends: &[MaglevFrontend<'_, A>],
    ) -> anyhow::Result<usize> {
        let mut written = 0;
        for fe in frontends {
            let ids: BTreeSet<u32> = fe.ids.iter().copied().collect();
            if ids.is_empty() {
                self.retain_except(fe.rev_nat_index)?;
                continue;
            }
            if self.written.get(&fe.rev_nat_index) == Some(&ids) {
                continue;
            }
            // Sorted by address so every node feeds the permutation the same
            // order (desired backends are sorted already; this makes it a
            // property of the table, not of the caller).
            let mut order: Vec<usize> = (0..fe.backends.len()).collect();
            order.sort_by_key(|&i| (fe.backends[i].address, fe.backends[i].port));
            let sorted: Vec<BackendAddr<A>> = order.iter().map(|&i| fe.backends[i]).collect();
            let slots = populate(&sorted, MAGLEV_TABLE_SIZE);
            let mut table = Box::new(MaglevTable {
                backend_ids: [0; MAGLEV_TABLE_SIZE],
            });
            for (slot, backend) in table.backend_ids.iter_mut().zip(&slots) {
                *slot = fe.ids[order[*backend as usize]];
            }
            self.writes += 1;
            self.map
                .insert(fe.rev_nat_index, table, 0)
                .with_context(|| format!("writing {}", self.name))?;
            debug!(
                map = self.name,
                rev_nat_index = fe.rev_nat_index,
                backends = ids.len(),
                "maglev table written"
            );
            self.written.insert(fe.rev_nat_index, ids);
            written += 1;
        }
        Ok(written)
    }

    fn retain_except(&mut self, idx: u32) -> anyhow::Result<()> {
        if !self.written.contains_key(&idx) {
            return Ok(());
        }
        let keep: BTreeSet<u32> = self
            .written
            .keys()
            .filter(|i| **i != idx)
            .copied()
            .collect();
        self.retain(&keep)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn backends(n: u32) -> Vec<BackendAddr> {
        (0..n)
            .map(|i| BackendAddr {
                address: Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 0, 0, 1)) + i),
                port: 8080,
            })
            .collect()
    }

    /// Table slots whose backend differs between `before` (indices into
    /// `old`) and `after` (indices into `new`): compared by backend, since
    /// indices shift when one is removed.
    fn moved<A: PartialEq>(before: &[u32], old: &[A], after: &[u32], new: &[A]) -> usize {
        before
            .iter()
            .zip(after)
            .filter(|(b, a)| old[**b as usize] != new[**a as usize])
            .count()
    }

    fn counts(table: &[u32], n: usize) -> Vec<usize> {
        let mut c = vec![0; n];
        for i in table {
            c[*i as usize] += 1;
        }
        c
    }

    #[test]
    fn every_slot_is_filled_and_shares_are_even() {
        for (n, m) in [(1, 251), (3, 251), (7, 251), (10, MAGLEV_TABLE_SIZE)] {
            let table = populate(&backends(n), m);
            assert_eq!(table.len(), m);
            let c = counts(&table, n as usize);
            let (min, max) = (*c.iter().min().unwrap(), *c.iter().max().unwrap());
            // Maglev guarantees shares within one slot of each other when
            // every backend's turn fills one slot (no weights).
            assert!(max - min <= 1, "n={n} m={m}: {c:?}");
        }
    }

    #[test]
    fn deterministic_and_independent_of_input_identity() {
        let a = populate(&backends(5), MAGLEV_TABLE_SIZE);
        let b = populate(&backends(5), MAGLEV_TABLE_SIZE);
        assert_eq!(a, b);
        // A different port is a different backend: a different table.
        let mut other = backends(5);
        other[0].port = 9090;
        assert_ne!(a, populate(&other, MAGLEV_TABLE_SIZE));
    }

    /// The property Maglev exists for: removing one backend of N moves the
    /// slots that backend owned (~M/N) and barely any other.
    #[test]
    fn removing_a_backend_moves_about_one_nth_of_the_table() {
        let m = MAGLEV_TABLE_SIZE;
        for n in [4u32, 10, 50] {
            let all = backends(n);
            let before = populate(&all, m);
            let removed = (n / 2) as usize;
            let mut rest = all.clone();
            rest.remove(removed);
            let after = populate(&rest, m);
            let changed = moved(&before, &all, &after, &rest);
            let owned = before.iter().filter(|b| **b as usize == removed).count();
            // The removed backend's slots must move; the paper measures the
            // rest of the churn at a few percent of M. Allow up to 1/N of M
            // beyond the unavoidable part, which still proves "minimal".
            let extra = changed - owned;
            assert!(
                changed >= owned && (extra as f64) < m as f64 / n as f64,
                "n={n}: {changed} slots changed, {owned} owned by the removed backend"
            );
            let share = changed as f64 / m as f64;
            eprintln!("maglev n={n}: removing one backend moved {changed}/{m} slots ({owned} were its own)");
            assert!(
                share < 2.0 / n as f64,
                "n={n}: {share:.3} of the table moved"
            );
        }
    }

    #[test]
    fn adding_a_backend_takes_about_one_nth() {
        let m = 1009; // prime
        let before = populate(&backends(4), m);
        let after = populate(&backends(5), m);
        let five = backends(5);
        let changed = moved(&before, &five, &after, &five);
        assert!(
            (changed as f64) < 2.0 * m as f64 / 5.0,
            "{changed} of {m} slots changed"
        );
    }

    fn backends6(n: u16) -> Vec<BackendAddr<Ipv6Addr>> {
        (0..n)
            .map(|i| BackendAddr {
                address: Ipv6Addr::new(0xfd00, 0, 0, 1, 0, 0, 0, 5 + i),
                port: 8080,
            })
            .collect()
    }

    /// A backend's name is its address and port bytes in network order; the
    /// IPv4 form must never change (it would change every node's tables).
    #[test]
    fn backend_names_are_network_order_address_and_port() {
        assert_eq!(
            backend_name(&backends(1)[0]),
            [10, 0, 0, 1, 0x1f, 0x90].to_vec()
        );
        let v6 = backend_name(&backends6(1)[0]);
        assert_eq!(v6.len(), 18);
        assert_eq!(&v6[..2], &[0xfd, 0x00]);
        assert_eq!(&v6[14..], &[0x00, 0x05, 0x1f, 0x90]);
    }

    /// IPv6 backends get tables with the same properties: full, even,
    /// deterministic, and removing one backend moves little beyond its own
    /// slots.
    #[test]
    fn ipv6_tables_are_even_and_move_about_one_nth() {
        let m = MAGLEV_TABLE_SIZE;
        let all = backends6(8);
        let before = populate(&all, m);
        assert_eq!(before, populate(&all, m));
        let c = counts(&before, all.len());
        let (min, max) = (*c.iter().min().unwrap(), *c.iter().max().unwrap());
        assert!(max - min <= 1, "{c:?}");
        let mut rest = all.clone();
        rest.remove(3);
        let after = populate(&rest, m);
        let changed = moved(&before, &all, &after, &rest);
        let owned = before.iter().filter(|b| **b == 3).count();
        assert!(changed >= owned && ((changed - owned) as f64) < m as f64 / 8.0);
    }

    #[test]
    #[should_panic(expected = "maglev")]
    fn no_backends_is_a_caller_bug() {
        populate::<Ipv4Addr>(&[], 251);
    }
}
