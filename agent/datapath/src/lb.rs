//! Service maps: id allocation, diffing, and the write order that never shows
//! packets a half-written service (backends, then slots, then the master entry;
//! removals last).
//!
//! The in-memory mirror is rebuilt from the pinned maps on open, so a restarted
//! agent diffs against what the kernel holds instead of rewriting everything,
//! and backend ids / rev-NAT indices stay stable (live conntrack entries refer
//! to them).

use std::collections::{BTreeMap, BTreeSet, HashMap as StdHashMap};
use std::net::Ipv4Addr;

use anyhow::{bail, Context};
use aya::maps::{HashMap, MapData, MapError};
use catena_common::lb::{
    Backend4, RevNat4, Service4Key, Service4Value, SCOPE_EXTERNAL, SCOPE_INTERNAL,
    SVC_FLAG_AFFINITY, SVC_FLAG_NO_BACKENDS, SVC_FLAG_TWO_SCOPES,
};
use tracing::{debug, warn};

use crate::lb_common::{alloc_backend_id, alloc_rev_nat, del, normalize_affinity, put, unref};

use crate::{ApplyStats, BackendAddr, Frontend, LbDesired, LbService, ProgrammedService, Proto};

pub(crate) fn addr_to_map(a: Ipv4Addr) -> u32 {
    // Network order as in the packet: the octets in memory order.
    u32::from_ne_bytes(a.octets())
}

pub(crate) fn addr_from_map(a: u32) -> Ipv4Addr {
    Ipv4Addr::from(a.to_ne_bytes())
}

pub(crate) struct LbMaps {
    pub services: HashMap<MapData, Service4Key, Service4Value>,
    pub backends: HashMap<MapData, u32, Backend4>,
    pub revnat: HashMap<MapData, u16, RevNat4>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct BackendKey {
    address: Ipv4Addr,
    port: u16,
    proto: Proto,
}

impl BackendKey {
    fn value(self) -> Backend4 {
        Backend4 {
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
    backends: Vec<BackendAddr>,
    /// Backend id of slot i+1.
    ids: Vec<u32>,
    rev_nat_index: u16,
    /// ClientIP affinity timeout (seconds), `None` without affinity.
    affinity: Option<u32>,
    /// The second (external) scope, when the frontend has two. Boxed: most
    /// frontends have one scope, and this keeps them a pointer bigger only.
    external: Option<Box<ExternalScope>>,
    /// The maps did not hold a consistent service at open: rewrite it whole.
    dirty: bool,
}

impl Programmed {
    /// Every backend id its slots name, both scopes.
    fn all_ids(self) -> Vec<u32> {
        let mut ids = self.ids;
        if let Some(e) = self.external {
            ids.extend(e.ids);
        }
        ids
    }
}

/// The `SCOPE_EXTERNAL` entries of a frontend with two scopes: a master
/// (same rev-NAT index and affinity as the internal one) and its slots.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct ExternalScope {
    backends: Vec<BackendAddr>,
    /// Backend id of slot i+1.
    ids: Vec<u32>,
}

fn master_key(fe: &Frontend, slot: u16) -> Service4Key {
    scoped_key(fe, SCOPE_INTERNAL, slot)
}

fn scoped_key(fe: &Frontend, scope: u8, slot: u16) -> Service4Key {
    Service4Key {
        address: addr_to_map(fe.address),
        dport: fe.port.to_be(),
        backend_slot: slot,
        proto: fe.proto.number(),
        scope,
        pad: [0; 2],
    }
}

/// `two_scopes` only on the internal master of a frontend with two scopes.
fn master_value(
    count: u16,
    rev_nat_index: u16,
    affinity: Option<u32>,
    two_scopes: bool,
) -> Service4Value {
    let mut flags = if count == 0 { SVC_FLAG_NO_BACKENDS } else { 0 };
    if affinity.is_some() {
        flags |= SVC_FLAG_AFFINITY;
    }
    if two_scopes {
        flags |= SVC_FLAG_TWO_SCOPES;
    }
    Service4Value {
        // The master's backend_id carries the affinity timeout.
        backend_id: affinity.unwrap_or(0),
        count,
        rev_nat_index,
        flags,
        pad: 0,
    }
}

fn slot_value(backend_id: u32) -> Service4Value {
    Service4Value {
        backend_id,
        ..Default::default()
    }
}

fn revnat_value(fe: &Frontend) -> RevNat4 {
    RevNat4 {
        address: addr_to_map(fe.address),
        port: fe.port.to_be(),
        pad: 0,
    }
}

pub(crate) fn is_not_found(e: &MapError) -> bool {
    matches!(e, MapError::KeyNotFound)
        || matches!(e, MapError::SyscallError(s) if s.io_error.raw_os_error() == Some(libc::ENOENT))
}

#[derive(Default)]
pub(crate) struct LbState {
    services: BTreeMap<Frontend, Programmed>,
    /// What LB4_BACKENDS holds.
    backends: BTreeMap<u32, BackendKey>,
    backend_ids: StdHashMap<BackendKey, u32>,
    next_backend_id: u32,
    next_rev_nat: u16,
    /// Entries found at open that belong to no service: deleted on next apply.
    stray_service_keys: Vec<Service4Key>,
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

/// One frontend's plan: its service, reverse-NAT index, the backend ids of
/// its slots and of its external scope.
type Planned<'d> = (Frontend, &'d LbService, u16, Vec<u32>, Option<Vec<u32>>);

impl LbState {
    /// Rebuilds the mirror from the pinned maps.
    pub fn rebuild(maps: &LbMaps) -> anyhow::Result<LbState> {
        let mut st = LbState {
            next_backend_id: 1,
            next_rev_nat: 1,
            ..Default::default()
        };
        for entry in maps.backends.iter() {
            let (id, b) = entry.context("reading LB4_BACKENDS")?;
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
        let mut all: StdHashMap<Service4Key, Service4Value> = StdHashMap::new();
        for entry in maps.services.iter() {
            let (k, v) = entry.context("reading LB4_SERVICES")?;
            all.insert(k, v);
        }
        let mut revnat: BTreeMap<u16, RevNat4> = BTreeMap::new();
        for entry in maps.revnat.iter() {
            let (k, v) = entry.context("reading LB4_REVNAT")?;
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
            let fe = Frontend {
                address: addr_from_map(k.address),
                port: u16::from_be(k.dport),
                proto,
            };
            used_keys.insert(*k);
            let mut dirty = false;
            let mut ids = Vec::new();
            let mut backends = Vec::new();
            for slot in 1..=v.count {
                let sk = Service4Key {
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
                        backends.push(BackendAddr {
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
            let two_scopes = v.flags & SVC_FLAG_TWO_SCOPES != 0;
            if *v != master_value(v.count, v.rev_nat_index, affinity, two_scopes) {
                dirty = true;
            }
            let external = two_scopes.then(|| {
                let mut ext = ExternalScope::default();
                let ext_master = scoped_key(&fe, SCOPE_EXTERNAL, 0);
                let Some(em) = all.get(&ext_master) else {
                    dirty = true;
                    return Box::new(ext);
                };
                used_keys.insert(ext_master);
                if *em != master_value(em.count, v.rev_nat_index, affinity, false) {
                    dirty = true;
                }
                for slot in 1..=em.count {
                    let sk = scoped_key(&fe, SCOPE_EXTERNAL, slot);
                    used_keys.insert(sk);
                    match all
                        .get(&sk)
                        .and_then(|s| st.backends.get(&s.backend_id).map(|b| (s.backend_id, b)))
                    {
                        Some((id, b)) if b.proto == proto => {
                            ext.ids.push(id);
                            ext.backends.push(BackendAddr {
                                address: b.address,
                                port: b.port,
                            });
                        }
                        _ => dirty = true,
                    }
                }
                Box::new(ext)
            });
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
                    external,
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
            "rebuilt service state from pinned maps"
        );
        st.recount();
        Ok(st)
    }

    pub fn programmed(&self) -> Vec<ProgrammedService> {
        self.services
            .iter()
            .map(|(fe, p)| ProgrammedService {
                frontend: *fe,
                name: p.name.clone(),
                backends: p.backends.clone(),
                rev_nat_index: p.rev_nat_index,
                affinity_timeout: p.affinity,
                external_backends: p.external.as_ref().map(|e| e.backends.clone()),
            })
            .collect()
    }

    /// A programmed frontend's rev_nat_index, backends and their ids
    /// (aligned), for the Maglev tables (`maglev.rs`).
    pub(crate) fn frontend(&self, fe: &Frontend) -> Option<(u16, &[BackendAddr], &[u32])> {
        self.services
            .get(fe)
            .map(|p| (p.rev_nat_index, p.backends.as_slice(), p.ids.as_slice()))
    }

    /// Recomputes the backend reference counts and the reverse-NAT indices
    /// in use from the mirror (after open, and before a full apply: a failed
    /// apply may have left counts for writes that never happened).
    fn recount(&mut self) {
        self.backend_refs.clear();
        self.rev_nats.clear();
        for p in self.services.values() {
            let external = p.external.iter().flat_map(|e| e.ids.iter());
            for id in p.ids.iter().chain(external) {
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

    /// The id of backend `b` of a `proto` frontend: its existing id, or a
    /// new one (reserved at once, written in step 2 of the apply).
    fn backend_id(
        &mut self,
        b: &BackendAddr,
        proto: Proto,
        new_backends: &mut Vec<(u32, BackendKey)>,
    ) -> anyhow::Result<u32> {
        let key = BackendKey {
            address: b.address,
            port: b.port,
            proto,
        };
        if let Some(id) = self.backend_ids.get(&key) {
            return Ok(*id);
        }
        let id = alloc_backend_id(&mut self.next_backend_id, &self.backends)?;
        self.backend_ids.insert(key, id);
        // Reserve the id before the write so the next allocation cannot
        // return it again.
        self.backends.insert(id, key);
        new_backends.push((id, key));
        Ok(id)
    }

    /// Writes a frontend's external scope: changed slots, the master (new
    /// count), then surplus slots. `old_ids`: the external slots programmed
    /// before; `rewrite`: the maps may disagree with them, write every
    /// entry. Whether anything was written.
    #[allow(clippy::too_many_arguments)]
    fn write_external(
        writes: &mut u64,
        maps: &mut LbMaps,
        fe: &Frontend,
        ids: &[u32],
        old_ids: Option<&[u32]>,
        rewrite: bool,
        rev: u16,
        affinity: Option<u32>,
        old: Option<&Programmed>,
    ) -> anyhow::Result<bool> {
        let mut changed = false;
        for (i, id) in ids.iter().enumerate() {
            if rewrite || old_ids.and_then(|o| o.get(i)) != Some(id) {
                let key = scoped_key(fe, SCOPE_EXTERNAL, i as u16 + 1);
                put(
                    writes,
                    &mut maps.services,
                    "LB4_SERVICES",
                    &key,
                    &slot_value(*id),
                )?;
                changed = true;
            }
        }
        let count = ids.len() as u16;
        let old_count = old_ids.map_or(0, |o| o.len() as u16);
        if rewrite
            || old_ids.is_none()
            || old_count != count
            || old.is_some_and(|o| o.rev_nat_index != rev || o.affinity != affinity)
        {
            put(
                writes,
                &mut maps.services,
                "LB4_SERVICES",
                &scoped_key(fe, SCOPE_EXTERNAL, 0),
                &master_value(count, rev, affinity, false),
            )?;
            changed = true;
        }
        for slot in count + 1..=old_count {
            del(
                writes,
                &mut maps.services,
                "LB4_SERVICES",
                &scoped_key(fe, SCOPE_EXTERNAL, slot),
            )?;
            changed = true;
        }
        Ok(changed)
    }

    /// Deletes a frontend's external master, then its `slots` slots (once
    /// the internal master no longer names the scope, or is gone).
    fn delete_external(
        writes: &mut u64,
        maps: &mut LbMaps,
        fe: &Frontend,
        slots: u16,
    ) -> anyhow::Result<()> {
        for slot in 0..=slots {
            del(
                writes,
                &mut maps.services,
                "LB4_SERVICES",
                &scoped_key(fe, SCOPE_EXTERNAL, slot),
            )?;
        }
        Ok(())
    }

    /// Makes the maps hold exactly `desired`, looking at every frontend.
    pub fn apply(&mut self, maps: &mut LbMaps, desired: &LbDesired) -> anyhow::Result<ApplyStats> {
        let all: BTreeSet<Frontend> = desired
            .services
            .keys()
            .chain(self.services.keys())
            .copied()
            .collect();
        self.apply_frontends(maps, desired, &all, true)
    }

    /// Like [`LbState::apply`] when `desired` differs from what the last
    /// apply was given only at the `changed` frontends (added, edited or
    /// removed): only those are looked at, so one EndpointSlice edit at 10k
    /// Services costs one frontend, not a walk of all of them. Falls back to
    /// a full apply until one has succeeded since open, and after any failed
    /// apply (the mirror may then disagree with the maps anywhere).
    pub fn apply_changed(
        &mut self,
        maps: &mut LbMaps,
        desired: &LbDesired,
        changed: &BTreeSet<Frontend>,
    ) -> anyhow::Result<ApplyStats> {
        if !self.in_sync {
            return self.apply(maps, desired);
        }
        self.apply_frontends(maps, desired, changed, false)
    }

    fn apply_frontends(
        &mut self,
        maps: &mut LbMaps,
        desired: &LbDesired,
        touched: &BTreeSet<Frontend>,
        full: bool,
    ) -> anyhow::Result<ApplyStats> {
        self.in_sync = false;
        let stats = self.write_frontends(maps, desired, touched, full)?;
        self.in_sync = true;
        Ok(stats)
    }

    /// Step 1 of a write: the reverse-NAT index and backend ids of every
    /// touched frontend; backend ids new to the maps are reserved and listed
    /// in `new_backends` (even when this fails part-way).
    fn plan_frontends<'d>(
        &mut self,
        desired: &'d LbDesired,
        touched: &BTreeSet<Frontend>,
        plan: &mut Vec<Planned<'d>>,
        new_backends: &mut Vec<(u32, BackendKey)>,
    ) -> anyhow::Result<()> {
        for fe in touched {
            let Some(svc) = desired.services.get(fe) else {
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
                ids.push(self.backend_id(b, fe.proto, new_backends)?);
            }
            let mut ext_ids = None;
            if let Some(external) = &svc.external_backends {
                if external.len() > u16::MAX as usize {
                    bail!("service {} has too many external backends", svc.name);
                }
                let mut e = Vec::with_capacity(external.len());
                for b in external {
                    e.push(self.backend_id(b, fe.proto, new_backends)?);
                }
                ext_ids = Some(e);
            }
            plan.push((*fe, svc, rev, ids, ext_ids));
        }

        Ok(())
    }

    /// Brings the `touched` frontends in line with `desired` (every frontend
    /// when `full`, which also collects every unreferenced backend).
    fn write_frontends(
        &mut self,
        maps: &mut LbMaps,
        desired: &LbDesired,
        touched: &BTreeSet<Frontend>,
        full: bool,
    ) -> anyhow::Result<ApplyStats> {
        let mut stats = ApplyStats::default();
        if full {
            self.recount();
        }

        // 1. Ids: existing ones are kept, new ones allocated.
        let mut plan = Vec::new();
        let mut new_backends = Vec::new();
        if let Err(e) = self.plan_frontends(desired, touched, &mut plan, &mut new_backends) {
            // Nothing was written: forget the backend ids reserved so far, or
            // a later apply would take them as written and point slots at
            // backends that are not in the map. (Reverse-NAT indices are
            // recounted by the full apply that follows a failed one.)
            for (id, key) in &new_backends {
                self.backends.remove(id);
                self.backend_ids.remove(key);
            }
            return Err(e);
        }

        // 2. New backends first: slots may only name existing backends.
        for (n, (id, key)) in new_backends.iter().enumerate() {
            if let Err(e) = put(
                &mut self.writes,
                &mut maps.backends,
                "LB4_BACKENDS",
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
        for (fe, svc, rev, ids, ext_ids) in plan {
            let old = self.services.get(&fe);
            let fresh = old.is_none_or(|o| o.dirty);
            let mut changed = false;
            if fresh || old.is_some_and(|o| o.rev_nat_index != rev) {
                put(
                    &mut self.writes,
                    &mut maps.revnat,
                    "LB4_REVNAT",
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
                        "LB4_SERVICES",
                        &key,
                        &slot_value(*id),
                    )?;
                    changed = true;
                }
            }
            let count = ids.len() as u16;
            let old_count = old.map_or(0, |o| o.ids.len() as u16);
            let affinity = normalize_affinity(svc.affinity_timeout);
            // The external scope is complete before the internal master
            // points external traffic at it, and outlives that pointer.
            let old_ext: Option<&[u32]> =
                old.and_then(|o| o.external.as_ref().map(|e| e.ids.as_slice()));
            if let Some(ext) = &ext_ids {
                changed |= Self::write_external(
                    &mut self.writes,
                    maps,
                    &fe,
                    ext,
                    old_ext,
                    fresh,
                    rev,
                    affinity,
                    old,
                )?;
            }
            let two_scopes = ext_ids.is_some();
            let had_two_scopes = old.is_some_and(|o| o.external.is_some());
            if fresh
                || old_count != count
                || had_two_scopes != two_scopes
                || old.is_some_and(|o| o.rev_nat_index != rev || o.affinity != affinity)
            {
                put(
                    &mut self.writes,
                    &mut maps.services,
                    "LB4_SERVICES",
                    &master_key(&fe, 0),
                    &master_value(count, rev, affinity, two_scopes),
                )?;
                changed = true;
            }
            if ext_ids.is_none() {
                if let Some(old_ext) = old_ext {
                    let slots = old_ext.len() as u16;
                    Self::delete_external(&mut self.writes, maps, &fe, slots)?;
                    changed = true;
                }
            }
            for slot in count + 1..=old_count {
                del(
                    &mut self.writes,
                    &mut maps.services,
                    "LB4_SERVICES",
                    &master_key(&fe, slot),
                )?;
                changed = true;
            }
            match old {
                None => stats.services_added += 1,
                Some(_) if changed => stats.services_updated += 1,
                Some(_) => {}
            }
            for id in ids.iter().chain(ext_ids.iter().flatten()) {
                *self.backend_refs.entry(*id).or_default() += 1;
            }
            self.rev_nats.insert(rev);
            let external = match (ext_ids, &svc.external_backends) {
                (Some(ids), Some(backends)) => Some(Box::new(ExternalScope {
                    backends: backends.clone(),
                    ids,
                })),
                _ => None,
            };
            let previous = self.services.insert(
                fe,
                Programmed {
                    name: svc.name.clone(),
                    backends: svc.backends.clone(),
                    ids,
                    rev_nat_index: rev,
                    affinity,
                    external,
                    dirty: false,
                },
            );
            for id in previous.map(Programmed::all_ids).unwrap_or_default() {
                if unref(&mut self.backend_refs, id) {
                    released.push(id);
                }
            }
        }

        // 4. Removed frontends: master first (stops new flows), then slots and
        //    the rev-NAT entry; forgotten only once all of that is gone.
        let removed: Vec<Frontend> = touched
            .iter()
            .filter(|fe| !desired.services.contains_key(fe) && self.services.contains_key(fe))
            .copied()
            .collect();
        for fe in removed {
            let p = &self.services[&fe];
            let (slots, rev_nat_index) = (p.ids.len() as u16, p.rev_nat_index);
            let ext_slots = p.external.as_ref().map(|e| e.ids.len() as u16);
            del(
                &mut self.writes,
                &mut maps.services,
                "LB4_SERVICES",
                &master_key(&fe, 0),
            )?;
            if let Some(ext_slots) = ext_slots {
                Self::delete_external(&mut self.writes, maps, &fe, ext_slots)?;
            }
            for slot in 1..=slots {
                del(
                    &mut self.writes,
                    &mut maps.services,
                    "LB4_SERVICES",
                    &master_key(&fe, slot),
                )?;
            }
            if rev_nat_index != 0 {
                del(
                    &mut self.writes,
                    &mut maps.revnat,
                    "LB4_REVNAT",
                    &rev_nat_index,
                )?;
            }
            let p = self.services.remove(&fe).expect("listed above");
            self.rev_nats.remove(&p.rev_nat_index);
            for id in p.all_ids() {
                if unref(&mut self.backend_refs, id) {
                    released.push(id);
                }
            }
            stats.services_removed += 1;
        }

        // 5. Leftovers found at open.
        for key in std::mem::take(&mut self.stray_service_keys) {
            del(&mut self.writes, &mut maps.services, "LB4_SERVICES", &key)?;
        }
        for idx in std::mem::take(&mut self.stray_revnat) {
            if !self.rev_nats.contains(&idx) {
                del(&mut self.writes, &mut maps.revnat, "LB4_REVNAT", &idx)?;
            }
        }
        for id in std::mem::take(&mut self.stray_backends) {
            if !self.referenced(id) {
                del(&mut self.writes, &mut maps.backends, "LB4_BACKENDS", &id)?;
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
            del(&mut self.writes, &mut maps.backends, "LB4_BACKENDS", &id)?;
            if let Some(key) = self.backends.remove(&id) {
                self.backend_ids.remove(&key);
            }
            stats.backends_removed += 1;
        }
        if stats != ApplyStats::default() {
            debug!(?stats, "service maps updated");
        }
        Ok(stats)
    }
}

/// Logs (once per open) services whose stored state had to be repaired.
pub(crate) fn warn_dirty(state: &LbState) {
    let dirty = state.services.values().filter(|p| p.dirty).count();
    if dirty > 0 {
        warn!(
            dirty,
            "pinned service entries were inconsistent; they will be rewritten on the next apply"
        );
    }
}
