//! Service maps of one address family: id allocation, diffing, and the write
//! order that never shows packets a half-written service (backends, then
//! slots, then the master entry; removals last).
//!
//! The in-memory mirror is rebuilt from the pinned maps on open, so a restarted
//! agent diffs against what the kernel holds instead of rewriting everything,
//! and backend ids / rev-NAT indices stay stable (live conntrack entries refer
//! to them).
//!
//! One implementation serves both families ([`Family`]: `lb::V4`,
//! `lb6::V6`), each over its own maps and number spaces: the IPv6 programs
//! only look ids up in the IPv6 maps, so IPv4 state and writes are untouched
//! by IPv6 and the other way round.

use std::collections::{BTreeMap, BTreeSet, HashMap as StdHashMap, HashSet};
use std::fmt::Debug;
use std::hash::Hash;
use std::ops::RangeInclusive;

use anyhow::{bail, Context};
use aya::maps::{HashMap, MapData};
use catena_common::lb::{
    Service4Value, SCOPE_EXTERNAL, SCOPE_INTERNAL, SVC_FLAG_AFFINITY, SVC_FLAG_NO_BACKENDS,
    SVC_FLAG_TWO_SCOPES,
};
use tracing::{debug, warn};

use crate::lb_common::{
    alloc_backend_id, alloc_rev_nat, del, normalize_affinity, put, put_batch, unref,
};
use crate::{ApplyStats, BackendAddr, Frontend, LbDesired, LbService, ProgrammedService, Proto};

/// A service-map entry (master or slot). Both families share its layout
/// (`Service6Value` is this type): it holds no address.
pub(crate) type ServiceValue = Service4Value;

/// An address family's service maps: their key and value types, how a
/// frontend or backend is written in them, and what the family's programs
/// can do.
pub(crate) trait Family {
    type Addr: Copy + Ord + Hash + Debug;
    type ServiceKey: aya::Pod + Eq + Hash;
    type Backend: aya::Pod;
    type RevNat: aya::Pod + PartialEq;
    /// For logs.
    const NAME: &'static str;
    const SERVICES_MAP: &'static str;
    const BACKENDS_MAP: &'static str;
    const REVNAT_MAP: &'static str;
    /// Whether the family's programs read the `SCOPE_EXTERNAL` entries of a
    /// frontend whose master has `SVC_FLAG_TWO_SCOPES`. Without it
    /// [`LbService::external_backends`] is ignored (never written), and such
    /// entries found at open are repaired away.
    const TWO_SCOPES: bool;

    /// The family's frontends in `desired`.
    fn services(desired: &LbDesired) -> &BTreeMap<Frontend<Self::Addr>, LbService<Self::Addr>>;
    fn service_key(fe: &Frontend<Self::Addr>, scope: u8, slot: u16) -> Self::ServiceKey;
    /// The frontend, scope and slot `key` names; `None` for a protocol
    /// catena does not program.
    fn parse_service_key(key: &Self::ServiceKey) -> Option<(Frontend<Self::Addr>, u8, u16)>;
    fn backend_value(b: &BackendKey<Self::Addr>) -> Self::Backend;
    /// `None` for a protocol catena does not program.
    fn parse_backend(v: &Self::Backend) -> Option<BackendKey<Self::Addr>>;
    fn revnat_value(fe: &Frontend<Self::Addr>) -> Self::RevNat;
}

pub(crate) struct LbMaps<F: Family> {
    pub services: HashMap<MapData, F::ServiceKey, ServiceValue>,
    pub backends: HashMap<MapData, u32, F::Backend>,
    pub revnat: HashMap<MapData, u32, F::RevNat>,
}

/// What one backend id stands for: a backend of one protocol's frontends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct BackendKey<A> {
    pub address: A,
    pub port: u16,
    pub proto: Proto,
}

#[derive(Clone, Debug)]
struct Programmed<A> {
    name: String,
    backends: Vec<BackendAddr<A>>,
    /// Backend id of slot i+1.
    ids: Vec<u32>,
    rev_nat_index: u32,
    /// ClientIP affinity timeout (seconds), `None` without affinity.
    affinity: Option<u32>,
    /// The second (external) scope, when the frontend has two. Boxed: most
    /// frontends have one scope, and this keeps them a pointer bigger only.
    external: Option<Box<ExternalScope<A>>>,
    /// The maps did not hold a consistent service at open: rewrite it whole.
    dirty: bool,
}

impl<A> Programmed<A> {
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
#[derive(Clone, Debug, PartialEq, Eq)]
struct ExternalScope<A> {
    backends: Vec<BackendAddr<A>>,
    /// Backend id of slot i+1.
    ids: Vec<u32>,
}

/// `two_scopes` only on the internal master of a frontend with two scopes.
fn master_value(
    count: u16,
    rev_nat_index: u32,
    affinity: Option<u32>,
    two_scopes: bool,
) -> ServiceValue {
    let mut flags = if count == 0 { SVC_FLAG_NO_BACKENDS } else { 0 };
    if affinity.is_some() {
        flags |= SVC_FLAG_AFFINITY;
    }
    if two_scopes {
        flags |= SVC_FLAG_TWO_SCOPES;
    }
    ServiceValue {
        // The master's backend_id carries the affinity timeout.
        backend_id: affinity.unwrap_or(0),
        count,
        rev_nat_index,
        flags,
    }
}

fn slot_value(backend_id: u32) -> ServiceValue {
    ServiceValue {
        backend_id,
        ..Default::default()
    }
}

/// The external backends of `svc` this family programs.
fn external_of<F: Family>(svc: &LbService<F::Addr>) -> Option<&Vec<BackendAddr<F::Addr>>> {
    svc.external_backends.as_ref().filter(|_| F::TWO_SCOPES)
}

/// A frontend's reverse-NAT index, backends and their ids (aligned).
pub(crate) type FrontendIds<'a, A> = (u32, &'a [BackendAddr<A>], &'a [u32]);

/// One touched frontend's plan: its service, reverse-NAT index, and the
/// backend ids of its slots and of its external scope.
struct Planned<'d, A> {
    fe: Frontend<A>,
    svc: &'d LbService<A>,
    rev: u32,
    ids: Vec<u32>,
    external: Option<Vec<u32>>,
}

/// Map writes of one apply, counted in `writes`.
struct Writer<'a, F: Family> {
    maps: &'a mut LbMaps<F>,
    writes: &'a mut u64,
}

impl<F: Family> Writer<'_, F> {
    fn put_service(&mut self, key: &F::ServiceKey, value: &ServiceValue) -> anyhow::Result<()> {
        put(
            self.writes,
            &mut self.maps.services,
            F::SERVICES_MAP,
            key,
            value,
        )
    }

    fn del_service(&mut self, key: &F::ServiceKey) -> anyhow::Result<()> {
        del(self.writes, &mut self.maps.services, F::SERVICES_MAP, key)
    }

    fn put_revnat(&mut self, index: u32, fe: &Frontend<F::Addr>) -> anyhow::Result<()> {
        let value = F::revnat_value(fe);
        put(
            self.writes,
            &mut self.maps.revnat,
            F::REVNAT_MAP,
            &index,
            &value,
        )
    }

    fn del_revnat(&mut self, index: u32) -> anyhow::Result<()> {
        del(self.writes, &mut self.maps.revnat, F::REVNAT_MAP, &index)
    }

    /// Writes new backends in order; `Err((written, _))`: the first
    /// `written` are in the map.
    fn put_backends(
        &mut self,
        backends: &[(u32, BackendKey<F::Addr>)],
    ) -> Result<(), (usize, anyhow::Error)> {
        let entries: Vec<(u32, F::Backend)> = backends
            .iter()
            .map(|(id, key)| (*id, F::backend_value(key)))
            .collect();
        put_batch(
            self.writes,
            &mut self.maps.backends,
            F::BACKENDS_MAP,
            &entries,
        )
    }

    fn del_backend(&mut self, id: u32) -> anyhow::Result<()> {
        del(self.writes, &mut self.maps.backends, F::BACKENDS_MAP, &id)
    }

    /// Writes the slots of one scope that differ from `old` (every one when
    /// `rewrite`: the maps may disagree with `old`). Whether it wrote any.
    fn slots(
        &mut self,
        fe: &Frontend<F::Addr>,
        scope: u8,
        ids: &[u32],
        old: Option<&[u32]>,
        rewrite: bool,
    ) -> anyhow::Result<bool> {
        let entries: Vec<(F::ServiceKey, ServiceValue)> = ids
            .iter()
            .enumerate()
            .filter(|(i, id)| rewrite || old.and_then(|o| o.get(*i)) != Some(*id))
            .map(|(i, id)| (F::service_key(fe, scope, i as u16 + 1), slot_value(*id)))
            .collect();
        // The kernel writes a batch entry by entry, in this order: readers
        // see what the one-by-one writes showed them.
        put_batch(
            self.writes,
            &mut self.maps.services,
            F::SERVICES_MAP,
            &entries,
        )
        .map_err(|(_, e)| e)?;
        Ok(!entries.is_empty())
    }

    /// Deletes the entries `slots` of one scope (0 is its master). Whether
    /// there were any.
    fn del_slots(
        &mut self,
        fe: &Frontend<F::Addr>,
        scope: u8,
        slots: RangeInclusive<u16>,
    ) -> anyhow::Result<bool> {
        let mut any = false;
        for slot in slots {
            self.del_service(&F::service_key(fe, scope, slot))?;
            any = true;
        }
        Ok(any)
    }
}

pub(crate) struct LbState<F: Family> {
    services: BTreeMap<Frontend<F::Addr>, Programmed<F::Addr>>,
    /// What the backends map holds.
    backends: BTreeMap<u32, BackendKey<F::Addr>>,
    backend_ids: StdHashMap<BackendKey<F::Addr>, u32>,
    next_backend_id: u32,
    next_rev_nat: u32,
    /// Entries found at open that belong to no service: deleted on next apply.
    stray_service_keys: Vec<F::ServiceKey>,
    stray_revnat: Vec<u32>,
    stray_backends: Vec<u32>,
    /// Backend id -> how many slots of programmed frontends name it, so a
    /// partial apply knows which backends its removals left unused.
    backend_refs: StdHashMap<u32, u32>,
    /// Reverse-NAT indices of programmed frontends.
    rev_nats: BTreeSet<u32>,
    /// Whether the mirror matches the maps for every frontend: a full apply
    /// succeeded since open and no apply failed since. Only then may an
    /// apply look at the changed frontends alone.
    in_sync: bool,
    /// Map writes and deletes done so far (observability and tests).
    pub writes: u64,
}

impl<F: Family> LbState<F> {
    /// A mirror of empty maps.
    fn new() -> Self {
        LbState {
            services: BTreeMap::new(),
            backends: BTreeMap::new(),
            backend_ids: StdHashMap::new(),
            next_backend_id: 1,
            next_rev_nat: 1,
            stray_service_keys: Vec::new(),
            stray_revnat: Vec::new(),
            stray_backends: Vec::new(),
            backend_refs: StdHashMap::new(),
            rev_nats: BTreeSet::new(),
            in_sync: false,
            writes: 0,
        }
    }

    /// Rebuilds the mirror from the pinned maps.
    pub fn rebuild(maps: &LbMaps<F>) -> anyhow::Result<Self> {
        let mut st = Self::new();
        for entry in maps.backends.iter() {
            let (id, b) = entry.with_context(|| format!("reading {}", F::BACKENDS_MAP))?;
            match F::parse_backend(&b) {
                Some(key) if id != 0 => {
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
        let mut all: StdHashMap<F::ServiceKey, ServiceValue> = StdHashMap::new();
        for entry in maps.services.iter() {
            let (k, v) = entry.with_context(|| format!("reading {}", F::SERVICES_MAP))?;
            all.insert(k, v);
        }
        let mut revnat: BTreeMap<u32, F::RevNat> = BTreeMap::new();
        for entry in maps.revnat.iter() {
            let (k, v) = entry.with_context(|| format!("reading {}", F::REVNAT_MAP))?;
            revnat.insert(k, v);
        }
        let mut used_keys = HashSet::new();
        let mut used_revnat = BTreeSet::new();
        for (k, v) in &all {
            // Only a key catena would write is a master (padding zero too):
            // the programs never look any other up.
            let Some((fe, SCOPE_INTERNAL, 0)) = F::parse_service_key(k) else {
                continue;
            };
            if F::service_key(&fe, SCOPE_INTERNAL, 0) != *k {
                continue;
            }
            used_keys.insert(*k);
            let mut dirty = false;
            let (ids, backends) = st.read_scope(
                &all,
                &fe,
                SCOPE_INTERNAL,
                v.count,
                &mut used_keys,
                &mut dirty,
            );
            if v.rev_nat_index == 0 || revnat.get(&v.rev_nat_index) != Some(&F::revnat_value(&fe)) {
                dirty = true;
            }
            let affinity = (v.flags & SVC_FLAG_AFFINITY != 0).then_some(v.backend_id);
            let affinity = normalize_affinity(affinity);
            let two_scopes = F::TWO_SCOPES && v.flags & SVC_FLAG_TWO_SCOPES != 0;
            if *v != master_value(v.count, v.rev_nat_index, affinity, two_scopes) {
                dirty = true;
            }
            let external = two_scopes.then(|| {
                let ext_master = F::service_key(&fe, SCOPE_EXTERNAL, 0);
                let Some(em) = all.get(&ext_master) else {
                    dirty = true;
                    return Box::new(ExternalScope {
                        backends: Vec::new(),
                        ids: Vec::new(),
                    });
                };
                used_keys.insert(ext_master);
                if *em != master_value(em.count, v.rev_nat_index, affinity, false) {
                    dirty = true;
                }
                let (ids, backends) = st.read_scope(
                    &all,
                    &fe,
                    SCOPE_EXTERNAL,
                    em.count,
                    &mut used_keys,
                    &mut dirty,
                );
                Box::new(ExternalScope { backends, ids })
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
            family = F::NAME,
            services = st.services.len(),
            backends = st.backends.len(),
            stray = st.stray_service_keys.len() + st.stray_revnat.len() + st.stray_backends.len(),
            "rebuilt service state from pinned maps"
        );
        st.recount();
        Ok(st)
    }

    /// The backend ids and addresses of slots `1..=count` of one scope of
    /// `fe` in `all` (marked used); `dirty` when a slot is missing or names
    /// no backend of the frontend's protocol.
    fn read_scope(
        &self,
        all: &StdHashMap<F::ServiceKey, ServiceValue>,
        fe: &Frontend<F::Addr>,
        scope: u8,
        count: u16,
        used_keys: &mut HashSet<F::ServiceKey>,
        dirty: &mut bool,
    ) -> (Vec<u32>, Vec<BackendAddr<F::Addr>>) {
        let mut ids = Vec::new();
        let mut backends = Vec::new();
        for slot in 1..=count {
            let sk = F::service_key(fe, scope, slot);
            used_keys.insert(sk);
            match all
                .get(&sk)
                .and_then(|s| self.backends.get(&s.backend_id).map(|b| (s.backend_id, b)))
            {
                Some((id, b)) if b.proto == fe.proto => {
                    ids.push(id);
                    backends.push(BackendAddr {
                        address: b.address,
                        port: b.port,
                    });
                }
                _ => *dirty = true,
            }
        }
        (ids, backends)
    }

    pub fn programmed(&self) -> Vec<ProgrammedService<F::Addr>> {
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
    pub(crate) fn frontend(&self, fe: &Frontend<F::Addr>) -> Option<FrontendIds<'_, F::Addr>> {
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

    /// The id of backend `b` of a `proto` frontend: its existing id, or a
    /// new one (reserved at once, written in step 2 of the apply).
    fn backend_id(
        &mut self,
        b: &BackendAddr<F::Addr>,
        proto: Proto,
        new_backends: &mut Vec<(u32, BackendKey<F::Addr>)>,
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

    /// Makes the maps hold exactly `desired`, looking at every frontend.
    pub fn apply(
        &mut self,
        maps: &mut LbMaps<F>,
        desired: &LbDesired,
    ) -> anyhow::Result<ApplyStats> {
        let all: BTreeSet<Frontend<F::Addr>> = F::services(desired)
            .keys()
            .chain(self.services.keys())
            .copied()
            .collect();
        self.apply_frontends(maps, desired, &all, true)
    }

    /// The frontends where `desired` and the programmed state differ
    /// (added, removed, other backends, name or affinity, or found
    /// inconsistent at open): a lockstep walk of two sorted maps, no map
    /// access. Lets an incremental apply skip frontends the caller did not
    /// name without the compiler tracking every family apart.
    pub fn changed_frontends(&self, desired: &LbDesired) -> BTreeSet<Frontend<F::Addr>> {
        use std::cmp::Ordering;
        let mut out = BTreeSet::new();
        let (mut want, mut have) = (
            F::services(desired).iter().peekable(),
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
                            || h.external.as_ref().map(|e| &e.backends) != external_of::<F>(w)
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

    /// Like [`LbState::apply`] when `desired` differs from what the last
    /// apply was given only at the `changed` frontends (added, edited or
    /// removed): only those are looked at, so one EndpointSlice edit at 10k
    /// Services costs one frontend, not a walk of all of them. Falls back to
    /// a full apply until one has succeeded since open, and after any failed
    /// apply (the mirror may then disagree with the maps anywhere).
    pub fn apply_changed(
        &mut self,
        maps: &mut LbMaps<F>,
        desired: &LbDesired,
        changed: &BTreeSet<Frontend<F::Addr>>,
    ) -> anyhow::Result<ApplyStats> {
        if !self.in_sync {
            return self.apply(maps, desired);
        }
        self.apply_frontends(maps, desired, changed, false)
    }

    fn apply_frontends(
        &mut self,
        maps: &mut LbMaps<F>,
        desired: &LbDesired,
        touched: &BTreeSet<Frontend<F::Addr>>,
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
        touched: &BTreeSet<Frontend<F::Addr>>,
        plan: &mut Vec<Planned<'d, F::Addr>>,
        new_backends: &mut Vec<(u32, BackendKey<F::Addr>)>,
    ) -> anyhow::Result<()> {
        let services = F::services(desired);
        for fe in touched {
            let Some(svc) = services.get(fe) else {
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
            let mut external = None;
            if let Some(backends) = external_of::<F>(svc) {
                if backends.len() > u16::MAX as usize {
                    bail!("service {} has too many external backends", svc.name);
                }
                let mut e = Vec::with_capacity(backends.len());
                for b in backends {
                    e.push(self.backend_id(b, fe.proto, new_backends)?);
                }
                external = Some(e);
            }
            plan.push(Planned {
                fe: *fe,
                svc,
                rev,
                ids,
                external,
            });
        }
        Ok(())
    }

    /// Brings the `touched` frontends in line with `desired` (every frontend
    /// when `full`, which also collects every unreferenced backend).
    fn write_frontends(
        &mut self,
        maps: &mut LbMaps<F>,
        desired: &LbDesired,
        touched: &BTreeSet<Frontend<F::Addr>>,
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
            self.forget_backends(&new_backends);
            return Err(e);
        }

        // 2. New backends first: slots may only name existing backends.
        let mut w = Writer {
            maps,
            writes: &mut self.writes,
        };
        if let Err((written, e)) = w.put_backends(&new_backends) {
            // Forget the ids not written so the next apply writes them.
            self.forget_backends(&new_backends[written..]);
            return Err(e);
        }
        stats.backends_added += new_backends.len();

        // 3. Per frontend: rev-NAT, slots, then the master (which publishes the
        //    new count), then surplus slots.
        let mut released = Vec::new();
        for Planned {
            fe,
            svc,
            rev,
            ids,
            external,
        } in plan
        {
            let old = self.services.get(&fe);
            let fresh = old.is_none_or(|o| o.dirty);
            let mut changed = false;
            if fresh || old.is_some_and(|o| o.rev_nat_index != rev) {
                w.put_revnat(rev, &fe)?;
                changed = true;
            }
            changed |= w.slots(
                &fe,
                SCOPE_INTERNAL,
                &ids,
                old.map(|o| o.ids.as_slice()),
                fresh,
            )?;
            let count = ids.len() as u16;
            let old_count = old.map_or(0, |o| o.ids.len() as u16);
            let affinity = normalize_affinity(svc.affinity_timeout);
            let master_changed =
                old.is_some_and(|o| o.rev_nat_index != rev || o.affinity != affinity);
            // The external scope is complete before the internal master
            // points external traffic at it, and outlives that pointer.
            let old_ext: Option<&[u32]> =
                old.and_then(|o| o.external.as_ref().map(|e| e.ids.as_slice()));
            let old_ext_count = old_ext.map_or(0, |o| o.len() as u16);
            if let Some(ext) = &external {
                changed |= w.slots(&fe, SCOPE_EXTERNAL, ext, old_ext, fresh)?;
                let ext_count = ext.len() as u16;
                if fresh || old_ext.is_none() || old_ext_count != ext_count || master_changed {
                    w.put_service(
                        &F::service_key(&fe, SCOPE_EXTERNAL, 0),
                        &master_value(ext_count, rev, affinity, false),
                    )?;
                    changed = true;
                }
                changed |= w.del_slots(&fe, SCOPE_EXTERNAL, ext_count + 1..=old_ext_count)?;
            }
            let two_scopes = external.is_some();
            let had_two_scopes = old_ext.is_some();
            if fresh || old_count != count || had_two_scopes != two_scopes || master_changed {
                w.put_service(
                    &F::service_key(&fe, SCOPE_INTERNAL, 0),
                    &master_value(count, rev, affinity, two_scopes),
                )?;
                changed = true;
            }
            if had_two_scopes && !two_scopes {
                // Its master first, now that the internal master no longer
                // names the scope.
                w.del_slots(&fe, SCOPE_EXTERNAL, 0..=old_ext_count)?;
                changed = true;
            }
            changed |= w.del_slots(&fe, SCOPE_INTERNAL, count + 1..=old_count)?;
            match old {
                None => stats.services_added += 1,
                Some(_) if changed => stats.services_updated += 1,
                Some(_) => {}
            }
            for id in ids.iter().chain(external.iter().flatten()) {
                *self.backend_refs.entry(*id).or_default() += 1;
            }
            self.rev_nats.insert(rev);
            let external = match (external, external_of::<F>(svc)) {
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
        let services = F::services(desired);
        let removed: Vec<Frontend<F::Addr>> = touched
            .iter()
            .filter(|fe| !services.contains_key(fe) && self.services.contains_key(fe))
            .copied()
            .collect();
        for fe in removed {
            let p = &self.services[&fe];
            let (slots, rev_nat_index) = (p.ids.len() as u16, p.rev_nat_index);
            let ext_slots = p.external.as_ref().map(|e| e.ids.len() as u16);
            w.del_service(&F::service_key(&fe, SCOPE_INTERNAL, 0))?;
            if let Some(ext_slots) = ext_slots {
                w.del_slots(&fe, SCOPE_EXTERNAL, 0..=ext_slots)?;
            }
            w.del_slots(&fe, SCOPE_INTERNAL, 1..=slots)?;
            if rev_nat_index != 0 {
                w.del_revnat(rev_nat_index)?;
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
            w.del_service(&key)?;
        }
        for idx in std::mem::take(&mut self.stray_revnat) {
            if !self.rev_nats.contains(&idx) {
                w.del_revnat(idx)?;
            }
        }
        for id in std::mem::take(&mut self.stray_backends) {
            if !self.backend_refs.contains_key(&id) {
                w.del_backend(id)?;
            }
        }

        // 6. Backends no service names any more: every one on a full apply
        //    (also those a failed apply wrote but never named), else those
        //    this apply released.
        let mut unused: Vec<u32> = if full {
            self.backends
                .keys()
                .filter(|id| !self.backend_refs.contains_key(id))
                .copied()
                .collect()
        } else {
            released.retain(|id| !self.backend_refs.contains_key(id));
            released
        };
        unused.sort_unstable();
        unused.dedup();
        for id in unused {
            w.del_backend(id)?;
            if let Some(key) = self.backends.remove(&id) {
                self.backend_ids.remove(&key);
            }
            stats.backends_removed += 1;
        }
        if stats != ApplyStats::default() {
            debug!(family = F::NAME, ?stats, "service maps updated");
        }
        Ok(stats)
    }

    /// Drops reserved backend ids whose backends were never written, so the
    /// next apply allocates and writes them.
    fn forget_backends(&mut self, reserved: &[(u32, BackendKey<F::Addr>)]) {
        for (id, key) in reserved {
            self.backends.remove(id);
            self.backend_ids.remove(key);
        }
    }
}

/// Logs (once per open) services whose stored state had to be repaired.
pub(crate) fn warn_dirty<F: Family>(state: &LbState<F>) {
    let dirty = state.services.values().filter(|p| p.dirty).count();
    if dirty > 0 {
        warn!(
            family = F::NAME,
            dirty,
            "pinned service entries were inconsistent; they will be rewritten on the next apply"
        );
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;
    use crate::lb::V4;
    use crate::lb6::V6;

    fn fe<A>(address: A) -> Frontend<A> {
        Frontend {
            address,
            port: 80,
            proto: Proto::Tcp,
        }
    }

    fn be<A>(address: A) -> BackendAddr<A> {
        BackendAddr {
            address,
            port: 8080,
        }
    }

    fn svc<A>(
        backends: Vec<BackendAddr<A>>,
        external: Option<Vec<BackendAddr<A>>>,
    ) -> LbService<A> {
        LbService {
            name: "ns/web".into(),
            backends,
            affinity_timeout: None,
            external_backends: external,
        }
    }

    /// The mirror as an apply of `services` would leave it (ids made up:
    /// `changed_frontends` never looks at them).
    fn programmed<F: Family>(
        services: &BTreeMap<Frontend<F::Addr>, LbService<F::Addr>>,
    ) -> LbState<F> {
        let mut st = LbState::<F>::new();
        for (f, s) in services {
            let external = external_of::<F>(s).map(|b| {
                Box::new(ExternalScope {
                    backends: b.clone(),
                    ids: (1..=b.len() as u32).collect(),
                })
            });
            st.services.insert(
                *f,
                Programmed {
                    name: s.name.clone(),
                    backends: s.backends.clone(),
                    ids: (1..=s.backends.len() as u32).collect(),
                    rev_nat_index: 1,
                    affinity: normalize_affinity(s.affinity_timeout),
                    external,
                    dirty: false,
                },
            );
        }
        st
    }

    /// An edit of the external scope alone (e.g. `externalTrafficPolicy:
    /// Local` endpoints moving) is a change of an IPv4 frontend, and adding
    /// or dropping the scope is one too.
    #[test]
    fn changed_frontends_sees_external_scope_edits() {
        let a = fe(Ipv4Addr::new(10, 96, 0, 1));
        let b = fe(Ipv4Addr::new(10, 96, 0, 2));
        let (b1, b2) = (
            be(Ipv4Addr::new(10, 0, 1, 1)),
            be(Ipv4Addr::new(10, 0, 1, 2)),
        );
        let mut d = LbDesired::default();
        d.services.insert(a, svc(vec![b1, b2], Some(vec![b1])));
        d.services.insert(b, svc(vec![b1], None));
        let st = programmed::<V4>(&d.services);
        assert!(st.changed_frontends(&d).is_empty());

        let mut edited = d.clone();
        edited.services.get_mut(&a).unwrap().external_backends = Some(vec![b2]);
        assert_eq!(st.changed_frontends(&edited), BTreeSet::from([a]));
        edited.services.get_mut(&a).unwrap().external_backends = None;
        assert_eq!(st.changed_frontends(&edited), BTreeSet::from([a]));
        edited.services.get_mut(&b).unwrap().external_backends = Some(vec![]);
        assert_eq!(st.changed_frontends(&edited), BTreeSet::from([a, b]));
    }

    /// The IPv6 maps as a family whose programs read one scope only.
    struct OneScope;

    impl Family for OneScope {
        type Addr = <V6 as Family>::Addr;
        type ServiceKey = <V6 as Family>::ServiceKey;
        type Backend = <V6 as Family>::Backend;
        type RevNat = <V6 as Family>::RevNat;
        const NAME: &'static str = "one-scope";
        const SERVICES_MAP: &'static str = V6::SERVICES_MAP;
        const BACKENDS_MAP: &'static str = V6::BACKENDS_MAP;
        const REVNAT_MAP: &'static str = V6::REVNAT_MAP;
        const TWO_SCOPES: bool = false;

        fn services(d: &LbDesired) -> &BTreeMap<Frontend<Ipv6Addr>, LbService<Ipv6Addr>> {
            V6::services(d)
        }
        fn service_key(fe: &Frontend<Ipv6Addr>, scope: u8, slot: u16) -> Self::ServiceKey {
            V6::service_key(fe, scope, slot)
        }
        fn parse_service_key(k: &Self::ServiceKey) -> Option<(Frontend<Ipv6Addr>, u8, u16)> {
            V6::parse_service_key(k)
        }
        fn backend_value(b: &BackendKey<Ipv6Addr>) -> Self::Backend {
            V6::backend_value(b)
        }
        fn parse_backend(v: &Self::Backend) -> Option<BackendKey<Ipv6Addr>> {
            V6::parse_backend(v)
        }
        fn revnat_value(fe: &Frontend<Ipv6Addr>) -> Self::RevNat {
            V6::revnat_value(fe)
        }
    }

    /// A family whose programs read one scope ignores external backends: not
    /// planned, and no difference to programmed state that has none.
    #[test]
    fn one_scope_family_ignores_external_backends() {
        let a = fe(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1));
        let b1 = be(Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 1));
        let b2 = be(Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 2));
        let mut d = LbDesired::default();
        d.services6.insert(a, svc(vec![b1], Some(vec![b2])));
        let mut st = programmed::<OneScope>(&d.services6);
        assert!(st.services[&a].external.is_none());
        assert!(st.changed_frontends(&d).is_empty());

        let mut plan = Vec::new();
        let mut new_backends = Vec::new();
        st.plan_frontends(&d, &BTreeSet::from([a]), &mut plan, &mut new_backends)
            .unwrap();
        assert!(plan[0].external.is_none());
        assert_eq!(new_backends.len(), 1, "only the internal backend");
        // A family with two scopes plans both.
        let mut st = programmed::<V4>(&BTreeMap::new());
        let (a4, b4) = (
            fe(Ipv4Addr::new(10, 96, 0, 1)),
            be(Ipv4Addr::new(10, 0, 1, 1)),
        );
        let mut d4 = LbDesired::default();
        d4.services.insert(
            a4,
            svc(vec![b4], Some(vec![be(Ipv4Addr::new(10, 0, 1, 2))])),
        );
        let (mut plan, mut new_backends) = (Vec::new(), Vec::new());
        st.plan_frontends(&d4, &BTreeSet::from([a4]), &mut plan, &mut new_backends)
            .unwrap();
        assert_eq!(plan[0].external.as_ref().map(Vec::len), Some(1));
        assert_eq!(new_backends.len(), 2);
    }
}
