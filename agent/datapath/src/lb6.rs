//! IPv6 service maps (`LB6_SERVICES`, `LB6_BACKENDS`, `LB6_REVNAT`): the
//! same id allocation, diffing, write order and rebuild-from-pins as `lb`
//! (backends, then slots, then the master entry; removals last), over the
//! IPv6 key and value types. Backend ids and reverse-NAT indices are a
//! number space of their own (the IPv6 programs only look them up in the
//! IPv6 maps), so the IPv4 state and its writes are untouched by IPv6.
//!
//! Kept as a sibling of `lb` rather than a generic over both families so the
//! IPv4 module stays exactly as tuned; the two should be folded into one
//! generic state once that tuning settles.

use std::collections::{BTreeMap, BTreeSet, HashMap as StdHashMap};
use std::net::Ipv6Addr;

use anyhow::{bail, Context};
use aya::maps::{HashMap, MapData};
use catena_common::lb::{SVC_FLAG_AFFINITY, SVC_FLAG_NO_BACKENDS};
use catena_common::lb6::{
    addr6_from_octets, addr6_octets, Addr6, Backend6, RevNat6, Service6Key, Service6Value,
};
use tracing::{debug, warn};

use crate::lb_common::{alloc_backend_id, alloc_rev_nat, del, normalize_affinity, put, unref};

use crate::{ApplyStats, BackendAddr6, Frontend6, LbDesired, Proto};

/// One IPv6 frontend as programmed.
pub type ProgrammedService6 = crate::ProgrammedService<Ipv6Addr>;

pub(crate) fn addr_to_map(a: Ipv6Addr) -> Addr6 {
    // Network order as in the packet: the octets in memory order.
    addr6_from_octets(&a.octets())
}

pub(crate) fn addr_from_map(a: Addr6) -> Ipv6Addr {
    Ipv6Addr::from(addr6_octets(&a))
}

pub(crate) struct LbMaps6 {
    pub services: HashMap<MapData, Service6Key, Service6Value>,
    pub backends: HashMap<MapData, u32, Backend6>,
    pub revnat: HashMap<MapData, u16, RevNat6>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct BackendKey {
    address: Ipv6Addr,
    port: u16,
    proto: Proto,
}

impl BackendKey {
    fn value(self) -> Backend6 {
        Backend6 {
            address: addr_to_map(self.address),
            port: self.port.to_be(),
            proto: self.proto.number(),
            flags: 0,
        }
    }
}

#[derive(Clone, Debug)]
struct Programmed {
    name: String,
    backends: Vec<BackendAddr6>,
    /// Backend id of slot i+1.
    ids: Vec<u32>,
    rev_nat_index: u16,
    /// ClientIP affinity timeout (seconds), `None` without affinity.
    affinity: Option<u32>,
    /// The maps did not hold a consistent service at open: rewrite it whole.
    dirty: bool,
}

fn master_key(fe: &Frontend6, slot: u16) -> Service6Key {
    Service6Key {
        address: addr_to_map(fe.address),
        dport: fe.port.to_be(),
        backend_slot: slot,
        proto: fe.proto.number(),
        scope: 0,
        pad: [0; 2],
    }
}

fn master_value(count: u16, rev_nat_index: u16, affinity: Option<u32>) -> Service6Value {
    let mut flags = if count == 0 { SVC_FLAG_NO_BACKENDS } else { 0 };
    if affinity.is_some() {
        flags |= SVC_FLAG_AFFINITY;
    }
    Service6Value {
        // The master's backend_id carries the affinity timeout.
        backend_id: affinity.unwrap_or(0),
        count,
        rev_nat_index,
        flags,
        pad: 0,
    }
}

fn slot_value(backend_id: u32) -> Service6Value {
    Service6Value {
        backend_id,
        ..Default::default()
    }
}

fn revnat_value(fe: &Frontend6) -> RevNat6 {
    RevNat6 {
        address: addr_to_map(fe.address),
        port: fe.port.to_be(),
        pad: 0,
    }
}

#[derive(Default)]
pub(crate) struct LbState6 {
    services: BTreeMap<Frontend6, Programmed>,
    /// What LB6_BACKENDS holds.
    backends: BTreeMap<u32, BackendKey>,
    backend_ids: StdHashMap<BackendKey, u32>,
    next_backend_id: u32,
    next_rev_nat: u16,
    /// Entries found at open that belong to no service: deleted on next apply.
    stray_service_keys: Vec<Service6Key>,
    stray_revnat: Vec<u16>,
    stray_backends: Vec<u32>,
    /// Backend id -> how many slots of programmed frontends name it, so a
    /// partial apply knows which backends its removals left unused.
    backend_refs: StdHashMap<u32, u32>,
    /// Reverse-NAT indices of programmed frontends.
    rev_nats: BTreeSet<u16>,
    /// Whether the mirror matches the maps for every frontend: a full apply
    /// succeeded since open and no apply failed since. Only then may an
    /// apply look at the changed frontends alone.
    in_sync: bool,
    /// Map writes and deletes done so far (observability and tests).
    pub writes: u64,
}

impl LbState6 {
    /// Rebuilds the mirror from the pinned maps.
    pub fn rebuild(maps: &LbMaps6) -> anyhow::Result<LbState6> {
        let mut st = LbState6 {
            next_backend_id: 1,
            next_rev_nat: 1,
            ..Default::default()
        };
        for entry in maps.backends.iter() {
            let (id, b) = entry.context("reading LB6_BACKENDS")?;
            match Proto::from_number(b.proto) {
                Some(proto) if id != 0 => {
                    let key = BackendKey {
                        address: addr_from_map(b.address),
                        port: u16::from_be(b.port),
                        proto,
                    };
                    if st.backend_ids.insert(key, id).is_some() {
                        // Two ids for one backend: keep one, drop the other later.
                        st.stray_backends.push(id);
                    } else {
                        st.backends.insert(id, key);
                    }
                }
                _ => st.stray_backends.push(id),
            }
            st.next_backend_id = st.next_backend_id.max(id.wrapping_add(1).max(1));
        }
        let mut all: StdHashMap<Service6Key, Service6Value> = StdHashMap::new();
        for entry in maps.services.iter() {
            let (k, v) = entry.context("reading LB6_SERVICES")?;
            all.insert(k, v);
        }
        let mut revnat: BTreeMap<u16, RevNat6> = BTreeMap::new();
        for entry in maps.revnat.iter() {
            let (k, v) = entry.context("reading LB6_REVNAT")?;
            revnat.insert(k, v);
        }
        let mut used_keys = std::collections::HashSet::new();
        let mut used_revnat = BTreeSet::new();
        for (k, v) in &all {
            if k.backend_slot != 0 || k.scope != 0 {
                continue;
            }
            let Some(proto) = Proto::from_number(k.proto) else {
                continue;
            };
            let fe = Frontend6 {
                address: addr_from_map(k.address),
                port: u16::from_be(k.dport),
                proto,
            };
            used_keys.insert(*k);
            let mut dirty = false;
            let mut ids = Vec::new();
            let mut backends = Vec::new();
            for slot in 1..=v.count {
                let sk = Service6Key {
                    backend_slot: slot,
                    ..*k
                };
                used_keys.insert(sk);
                match all
                    .get(&sk)
                    .and_then(|s| st.backends.get(&s.backend_id).map(|b| (s.backend_id, b)))
                {
                    Some((id, b)) if b.proto == proto => {
                        ids.push(id);
                        backends.push(BackendAddr6 {
                            address: b.address,
                            port: b.port,
                        });
                    }
                    _ => dirty = true,
                }
            }
            if v.rev_nat_index == 0 || revnat.get(&v.rev_nat_index) != Some(&revnat_value(&fe)) {
                dirty = true;
            }
            let affinity = (v.flags & SVC_FLAG_AFFINITY != 0).then_some(v.backend_id);
            let affinity = normalize_affinity(affinity);
            if *v != master_value(v.count, v.rev_nat_index, affinity) {
                dirty = true;
            }
            if v.rev_nat_index != 0 {
                used_revnat.insert(v.rev_nat_index);
                st.next_rev_nat = st.next_rev_nat.max(v.rev_nat_index.wrapping_add(1).max(1));
            }
            st.services.insert(
                fe,
                Programmed {
                    name: String::new(),
                    backends,
                    ids,
                    rev_nat_index: v.rev_nat_index,
                    affinity,
                    dirty,
                },
            );
        }
        st.stray_service_keys = all
            .keys()
            .filter(|k| !used_keys.contains(k))
            .copied()
            .collect();
        st.stray_revnat = revnat
            .keys()
            .filter(|k| !used_revnat.contains(k))
            .copied()
            .collect();
        debug!(
            services = st.services.len(),
            backends = st.backends.len(),
            stray = st.stray_service_keys.len() + st.stray_revnat.len() + st.stray_backends.len(),
            "rebuilt IPv6 service state from pinned maps"
        );
        st.recount();
        Ok(st)
    }

    pub fn programmed(&self) -> Vec<ProgrammedService6> {
        self.services
            .iter()
            .map(|(fe, p)| ProgrammedService6 {
                frontend: *fe,
                name: p.name.clone(),
                backends: p.backends.clone(),
                rev_nat_index: p.rev_nat_index,
                affinity_timeout: p.affinity,
                external_backends: None,
            })
            .collect()
    }

    /// Recomputes the backend reference counts and the reverse-NAT indices
    /// in use from the mirror (after open, and before a full apply: a failed
    /// apply may have left counts for writes that never happened).
    fn recount(&mut self) {
        self.backend_refs.clear();
        self.rev_nats.clear();
        for p in self.services.values() {
            for id in &p.ids {
                *self.backend_refs.entry(*id).or_default() += 1;
            }
            if p.rev_nat_index != 0 {
                self.rev_nats.insert(p.rev_nat_index);
            }
        }
    }

    fn referenced(&self, id: u32) -> bool {
        self.backend_refs.contains_key(&id)
    }

    /// Makes the maps hold exactly `desired`, looking at every frontend.
    pub fn apply(&mut self, maps: &mut LbMaps6, desired: &LbDesired) -> anyhow::Result<ApplyStats> {
        let all: BTreeSet<Frontend6> = desired
            .services6
            .keys()
            .chain(self.services.keys())
            .copied()
            .collect();
        self.apply_frontends(maps, desired, &all, true)
    }

    /// The IPv6 frontends where `desired` and the programmed state differ
    /// (added, removed, other backends, name or affinity, or found
    /// inconsistent at open): a lockstep walk of two sorted maps, no map
    /// access. Lets an incremental apply skip IPv6 frontends the caller did
    /// not name without the compiler tracking the two families apart.
    pub fn changed_frontends(&self, desired: &LbDesired) -> BTreeSet<Frontend6> {
        use std::cmp::Ordering;
        let mut out = BTreeSet::new();
        let (mut want, mut have) = (
            desired.services6.iter().peekable(),
            self.services.iter().peekable(),
        );
        loop {
            match (want.peek(), have.peek()) {
                (None, None) => return out,
                (Some((fe, _)), None) => {
                    out.insert(**fe);
                    want.next();
                }
                (None, Some((fe, _))) => {
                    out.insert(**fe);
                    have.next();
                }
                (Some((wf, w)), Some((hf, h))) => match wf.cmp(hf) {
                    Ordering::Less => {
                        out.insert(**wf);
                        want.next();
                    }
                    Ordering::Greater => {
                        out.insert(**hf);
                        have.next();
                    }
                    Ordering::Equal => {
                        if h.dirty
                            || h.name != w.name
                            || h.backends != w.backends
                            || h.affinity != normalize_affinity(w.affinity_timeout)
                        {
                            out.insert(**wf);
                        }
                        want.next();
                        have.next();
                    }
                },
            }
        }
    }

    /// Like [`LbState6::apply`] when `desired` differs from what the last
    /// apply was given only at the `changed` frontends (added, edited or
    /// removed): only those are looked at, so one EndpointSlice edit at 10k
    /// Services costs one frontend, not a walk of all of them. Falls back to
    /// a full apply until one has succeeded since open, and after any failed
    /// apply (the mirror may then disagree with the maps anywhere).
    pub fn apply_changed(
        &mut self,
        maps: &mut LbMaps6,
        desired: &LbDesired,
        changed: &BTreeSet<Frontend6>,
    ) -> anyhow::Result<ApplyStats> {
        if !self.in_sync {
            return self.apply(maps, desired);
        }
        self.apply_frontends(maps, desired, changed, false)
    }

    fn apply_frontends(
        &mut self,
        maps: &mut LbMaps6,
        desired: &LbDesired,
        touched: &BTreeSet<Frontend6>,
        full: bool,
    ) -> anyhow::Result<ApplyStats> {
        self.in_sync = false;
        let stats = self.write_frontends(maps, desired, touched, full)?;
        self.in_sync = true;
        Ok(stats)
    }

    /// Brings the `touched` frontends in line with `desired` (every frontend
    /// when `full`, which also collects every unreferenced backend).
    fn write_frontends(
        &mut self,
        maps: &mut LbMaps6,
        desired: &LbDesired,
        touched: &BTreeSet<Frontend6>,
        full: bool,
    ) -> anyhow::Result<ApplyStats> {
        let mut stats = ApplyStats::default();
        if full {
            self.recount();
        }

        // 1. Ids: existing ones are kept, new ones allocated.
        let mut plan = Vec::new();
        let mut new_backends = Vec::new();
        for fe in touched {
            let Some(svc) = desired.services6.get(fe) else {
                continue;
            };
            if svc.backends.len() > u16::MAX as usize {
                bail!(
                    "service {} has {} backends (max {})",
                    svc.name,
                    svc.backends.len(),
                    u16::MAX
                );
            }
            let rev = match self.services.get(fe).map(|p| p.rev_nat_index) {
                Some(i) if i != 0 => i,
                _ => alloc_rev_nat(&mut self.next_rev_nat, &mut self.rev_nats)?,
            };
            let mut ids = Vec::with_capacity(svc.backends.len());
            for b in &svc.backends {
                let key = BackendKey {
                    address: b.address,
                    port: b.port,
                    proto: fe.proto,
                };
                let id = match self.backend_ids.get(&key) {
                    Some(id) => *id,
                    None => {
                        let id = alloc_backend_id(&mut self.next_backend_id, &self.backends)?;
                        self.backend_ids.insert(key, id);
                        // Reserve the id before the write so the next
                        // allocation cannot return it again.
                        self.backends.insert(id, key);
                        new_backends.push((id, key));
                        id
                    }
                };
                ids.push(id);
            }
            plan.push((*fe, svc, rev, ids));
        }

        // 2. New backends first: slots may only name existing backends.
        for (n, (id, key)) in new_backends.iter().enumerate() {
            if let Err(e) = put(
                &mut self.writes,
                &mut maps.backends,
                "LB6_BACKENDS",
                id,
                &key.value(),
            ) {
                // Forget the ids not written so the next apply writes them.
                for (id, key) in &new_backends[n..] {
                    self.backends.remove(id);
                    self.backend_ids.remove(key);
                }
                return Err(e);
            }
            stats.backends_added += 1;
        }

        // 3. Per frontend: rev-NAT, slots, then the master (which publishes the
        //    new count), then surplus slots.
        let mut released = Vec::new();
        for (fe, svc, rev, ids) in plan {
            let old = self.services.get(&fe);
            let fresh = old.is_none_or(|o| o.dirty);
            let mut changed = false;
            if fresh || old.is_some_and(|o| o.rev_nat_index != rev) {
                put(
                    &mut self.writes,
                    &mut maps.revnat,
                    "LB6_REVNAT",
                    &rev,
                    &revnat_value(&fe),
                )?;
                changed = true;
            }
            for (i, id) in ids.iter().enumerate() {
                if fresh || old.and_then(|o| o.ids.get(i)) != Some(id) {
                    let key = master_key(&fe, i as u16 + 1);
                    put(
                        &mut self.writes,
                        &mut maps.services,
                        "LB6_SERVICES",
                        &key,
                        &slot_value(*id),
                    )?;
                    changed = true;
                }
            }
            let count = ids.len() as u16;
            let old_count = old.map_or(0, |o| o.ids.len() as u16);
            let affinity = normalize_affinity(svc.affinity_timeout);
            if fresh
                || old_count != count
                || old.is_some_and(|o| o.rev_nat_index != rev || o.affinity != affinity)
            {
                put(
                    &mut self.writes,
                    &mut maps.services,
                    "LB6_SERVICES",
                    &master_key(&fe, 0),
                    &master_value(count, rev, affinity),
                )?;
                changed = true;
            }
            for slot in count + 1..=old_count {
                del(
                    &mut self.writes,
                    &mut maps.services,
                    "LB6_SERVICES",
                    &master_key(&fe, slot),
                )?;
                changed = true;
            }
            match old {
                None => stats.services_added += 1,
                Some(_) if changed => stats.services_updated += 1,
                Some(_) => {}
            }
            for id in &ids {
                *self.backend_refs.entry(*id).or_default() += 1;
            }
            self.rev_nats.insert(rev);
            let previous = self.services.insert(
                fe,
                Programmed {
                    name: svc.name.clone(),
                    backends: svc.backends.clone(),
                    ids,
                    rev_nat_index: rev,
                    affinity,
                    dirty: false,
                },
            );
            for id in previous.map(|p| p.ids).unwrap_or_default() {
                if unref(&mut self.backend_refs, id) {
                    released.push(id);
                }
            }
        }

        // 4. Removed frontends: master first (stops new flows), then slots and
        //    the rev-NAT entry; forgotten only once all of that is gone.
        let removed: Vec<Frontend6> = touched
            .iter()
            .filter(|fe| !desired.services6.contains_key(fe) && self.services.contains_key(fe))
            .copied()
            .collect();
        for fe in removed {
            let p = &self.services[&fe];
            let (slots, rev_nat_index) = (p.ids.len() as u16, p.rev_nat_index);
            del(
                &mut self.writes,
                &mut maps.services,
                "LB6_SERVICES",
                &master_key(&fe, 0),
            )?;
            for slot in 1..=slots {
                del(
                    &mut self.writes,
                    &mut maps.services,
                    "LB6_SERVICES",
                    &master_key(&fe, slot),
                )?;
            }
            if rev_nat_index != 0 {
                del(
                    &mut self.writes,
                    &mut maps.revnat,
                    "LB6_REVNAT",
                    &rev_nat_index,
                )?;
            }
            let p = self.services.remove(&fe).expect("listed above");
            self.rev_nats.remove(&p.rev_nat_index);
            for id in p.ids {
                if unref(&mut self.backend_refs, id) {
                    released.push(id);
                }
            }
            stats.services_removed += 1;
        }

        // 5. Leftovers found at open.
        for key in std::mem::take(&mut self.stray_service_keys) {
            del(&mut self.writes, &mut maps.services, "LB6_SERVICES", &key)?;
        }
        for idx in std::mem::take(&mut self.stray_revnat) {
            if !self.rev_nats.contains(&idx) {
                del(&mut self.writes, &mut maps.revnat, "LB6_REVNAT", &idx)?;
            }
        }
        for id in std::mem::take(&mut self.stray_backends) {
            if !self.referenced(id) {
                del(&mut self.writes, &mut maps.backends, "LB6_BACKENDS", &id)?;
            }
        }

        // 6. Backends no service names any more: every one on a full apply
        //    (also those a failed apply wrote but never named), else those
        //    this apply released.
        let mut unused: Vec<u32> = if full {
            self.backends
                .keys()
                .filter(|id| !self.referenced(**id))
                .copied()
                .collect()
        } else {
            released.retain(|id| !self.referenced(*id));
            released
        };
        unused.sort_unstable();
        unused.dedup();
        for id in unused {
            del(&mut self.writes, &mut maps.backends, "LB6_BACKENDS", &id)?;
            if let Some(key) = self.backends.remove(&id) {
                self.backend_ids.remove(&key);
            }
            stats.backends_removed += 1;
        }
        if stats != ApplyStats::default() {
            debug!(?stats, "IPv6 service maps updated");
        }
        Ok(stats)
    }
}

/// Logs (once per open) services whose stored state had to be repaired.
pub(crate) fn warn_dirty(state: &LbState6) {
    let dirty = state.services.values().filter(|p| p.dirty).count();
    if dirty > 0 {
        warn!(
            dirty,
            "pinned IPv6 service entries were inconsistent; they will be rewritten on the next apply"
        );
    }
}
