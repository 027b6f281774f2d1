//! The agent's state and every operation on it. Operations are synchronous
//! (short syscalls on maps and links) and serialised by one mutex, so an ADD,
//! a DEL and a reconcile never interleave half-way. The one exception: an
//! ADD's attach and a DEL's detach (each waits on the kernel for RCU grace
//! periods) and the ADD's fsync of the endpoint record run outside that
//! mutex, under per-endpoint [`Claims`]; see [`AgentCore::add_endpoint`].

use crate::compile::policy::{compile_policy, known_pods, PolicyInput, PolicyReport, RuleOrigin};
use crate::config::AgentConfig;
use crate::model::endpoints::{key_of, EndpointKey, EndpointRegistry};
use crate::model::identity::{IdentityAllocator, RESERVED};
use crate::model::policy::Prefix;
use crate::sources::ClusterState;
use anyhow::{Context, Result};
use catena_api::{
    Attachment, DatapathStatus, Endpoint, EndpointCheck, EndpointSpec, GcResult, QueuedDelete,
    ServiceStatus, SourceStatus, Status,
};
use catena_common::endpoint::{EndpointInfo, EP_FLAG_ANTI_SPOOF};
use catena_datapath::policy::PolicyDesired;
use catena_datapath::Datapath;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};

/// Errors the API maps to HTTP statuses.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("agent is not ready yet: {0}")]
    NotReady(String),
    #[error("invalid request: {0}")]
    BadRequest(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

#[derive(Clone, Debug)]
pub struct SourceInfo {
    pub kind: String,
    pub synced: bool,
    pub errors: Vec<String>,
}

impl SourceInfo {
    pub fn new(kind: String) -> Self {
        SourceInfo {
            kind,
            synced: false,
            errors: vec![],
        }
    }
}

struct Inner {
    datapath: Datapath,
    registry: EndpointRegistry,
    identities: IdentityAllocator,
    cluster: Arc<ClusterState>,
    /// How many frontends the service maps hold (None until the first apply).
    programmed: Option<usize>,
    /// Memoizes per-Service results so one change recompiles one Service.
    services: crate::compile::services::ServiceCompiler,
    /// The policy compiler's inputs last time (as `Arc`s, kept alive so
    /// pointer comparison is sound): unchanged inputs skip the compile.
    policy_inputs: Option<PolicyInputs>,
    programmed_at: Option<std::time::SystemTime>,
    policy: PolicyProgram,
    /// This node's name (`--node-name`): its Node object is the host, every
    /// other Node is a remote node.
    node_name: String,
    /// Ends sockets the socket LB translated to backends that left their
    /// Service (None without socket-level load balancing).
    sockets: Option<catena_datapath::sock_terminate::SocketTerminator>,
}

/// What the policy maps hold and the tables that keep numbers stable.
#[derive(Default)]
struct PolicyProgram {
    /// None until the first apply (or until an apply failed).
    programmed: Option<PolicyDesired>,
    /// CIDR identities in use (None: not yet read back from the pinned maps).
    cidr_ids: Option<BTreeMap<Prefix, u32>>,
    /// rule_ref -> where it came from, for events and `catena policy get`.
    rule_refs: BTreeMap<RuleOrigin, u32>,
    reports: Vec<PolicyReport>,
    /// Identity -> addresses, for `catena identity list`.
    addresses: BTreeMap<u32, Vec<String>>,
}

pub struct AgentCore {
    config: AgentConfig,
    inner: Mutex<Option<Inner>>,
    /// Endpoints with an ADD or DEL between its locked phases.
    claims: Claims,
    ready: AtomicBool,
    source: RwLock<SourceInfo>,
}

impl AgentCore {
    pub fn new(config: AgentConfig) -> Self {
        AgentCore {
            config,
            inner: Mutex::new(None),
            claims: Claims::default(),
            ready: AtomicBool::new(false),
            source: RwLock::new(SourceInfo::new("none".into())),
        }
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// When the service maps were last made current (kube-proxy's `lastUpdated`).
    pub fn last_programmed(&self) -> Option<std::time::SystemTime> {
        let guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        guard.as_ref().and_then(|i| i.programmed_at)
    }

    pub fn config(&self) -> &AgentConfig {
        &self.config
    }

    /// Liveness: whether the state lock can be taken within `within` (a
    /// deadlocked or wedged agent cannot, a busy one can).
    pub fn responsive(&self, within: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + within;
        loop {
            match self.inner.try_lock() {
                Ok(_) | Err(std::sync::TryLockError::Poisoned(_)) => return true,
                Err(std::sync::TryLockError::WouldBlock) => {}
            }
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    /// The datapath's event reader (one per agent). The datapath may not
    /// implement events yet (its contract body panics with
    /// `unimplemented!`): that is reported as an error, not a crash.
    pub fn event_reader(&self) -> Result<catena_datapath::events::EventReader> {
        let mut guard = self.lock().map_err(|e| anyhow::anyhow!("{e}"))?;
        let inner = guard.as_mut().expect("checked by lock");
        let datapath = &mut inner.datapath;
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| datapath.event_reader()))
            .unwrap_or_else(|_| {
                Err(anyhow::anyhow!(
                    "the datapath does not implement the event reader"
                ))
            })
    }

    /// Removes what a previous run left in the datapath for endpoints that no
    /// longer exist: link pins of unknown or vanished interfaces and
    /// `ENDPOINTS` entries without a record. Only safe once the state is
    /// restored, deletes queued while down are applied and running pods are
    /// adopted (before that, a live pod's links could look stale), and before
    /// the agent reports ready (so no ADD races it).
    pub fn collect_stale_datapath_state(&self) -> Result<(usize, usize)> {
        let mut guard = self.lock().map_err(|e| anyhow::anyhow!("{e}"))?;
        let inner = guard.as_mut().expect("checked by lock");
        let live: std::collections::BTreeSet<u32> =
            inner.registry.all().map(|e| e.spec.host_ifindex).collect();
        let links = inner.datapath.gc_links(&live)?;
        let map = crate::ops::bpf::PinnedMap::open_typed::<u32, EndpointInfo>(
            &self.config.bpffs_dir,
            catena_common::map_names::ENDPOINTS,
        )?;
        let mut entries = 0;
        for key in map.keys()? {
            let ifindex: u32 = crate::ops::bpf::from_bytes(&key)?;
            if !live.contains(&ifindex) {
                inner.datapath.remove_endpoint(ifindex)?;
                entries += 1;
            }
        }
        Ok((links, entries))
    }

    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Release);
    }

    pub fn set_source(&self, info: SourceInfo) {
        *self.source.write().unwrap() = info;
    }

    pub fn record_source_errors(&self, errors: Vec<String>) {
        let mut s = self.source.write().unwrap();
        s.errors = errors;
        s.synced = true;
    }

    fn lock(&self) -> Result<MutexGuard<'_, Option<Inner>>, AgentError> {
        let guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if guard.is_none() {
            return Err(AgentError::NotReady("datapath not loaded".into()));
        }
        Ok(guard)
    }

    /// Loads the datapath (reusing pinned maps) and re-establishes every
    /// endpoint from the state dir: still-present veths are re-attached
    /// (idempotent), vanished ones are cleaned up.
    pub fn open_and_restore(&self) -> Result<()> {
        let datapath = Datapath::open(&self.config.bpffs_dir).with_context(|| {
            format!(
                "opening the datapath under {}",
                self.config.bpffs_dir.display()
            )
        })?;
        let mut datapath = datapath;
        if self.config.expedite_attach {
            datapath
                .attacher()
                .expedite_rcu(catena_datapath::rcu::RcuExpedite::new(
                    catena_datapath::rcu::KNOB,
                    &self.config.state_dir,
                ));
        }
        let cgroup_root = if self.config.kube_proxy_replacement.enabled() {
            crate::cgroup::resolve_root(&self.config.cgroup_root)?
        } else {
            None // kube-proxy still serves node processes
        };
        let socket_lb = cgroup_root.is_some();
        if let Some(cgroup) = cgroup_root {
            datapath.attach_cgroup(&cgroup).with_context(|| {
                format!(
                    "attaching socket load balancing to cgroup {}",
                    cgroup.display()
                )
            })?;
            tracing::info!(cgroup = %cgroup.display(), "socket load balancing for node processes attached");
        }
        // A worker thread of its own: a pass walks every pod's netns, which
        // must never hold up a service apply or an ADD.
        let sockets = if socket_lb {
            Some(
                catena_datapath::sock_terminate::SocketTerminator::spawn(
                    self.config.bpffs_dir.clone(),
                    |r| crate::metrics::global().sockets_destroyed(r.destroyed()),
                )
                .context("starting the socket termination worker")?,
            )
        } else {
            None
        };
        let registry = EndpointRegistry::load(&self.config.state_dir)?;
        let mut inner = Inner {
            datapath,
            registry,
            identities: IdentityAllocator::default(),
            cluster: Arc::new(ClusterState::default()),
            programmed: None,
            services: crate::compile::services::ServiceCompiler::new(
                crate::compile::services::ServiceOptions {
                    node_name: Some(self.config.node_name()),
                    lb_algorithm: self.config.lb_algorithm,
                    north_south: Default::default(),
                },
            ),
            policy_inputs: None,
            programmed_at: None,
            policy: PolicyProgram::default(),
            node_name: self.config.node_name(),
            sockets,
        };
        let endpoints: Vec<Endpoint> = inner.registry.all().cloned().collect();
        for ep in endpoints {
            let key = key_of(&ep);
            if interface_index(&ep.spec.host_ifname) == Some(ep.spec.host_ifindex) {
                // The persisted identity stays in the ENDPOINTS entry until
                // the first reconcile, which knows the cluster (namespace
                // labels, manifests) and keeps that number when it can.
                if let Err(e) = program_endpoint(&mut inner.datapath, &ep) {
                    tracing::error!(endpoint = ep.id, error = %format!("{e:#}"), "cannot re-attach restored endpoint");
                }
            } else {
                tracing::info!(endpoint = ep.id, veth = %ep.spec.host_ifname, "interface gone while the agent was down; removing endpoint");
                remove_endpoint(&mut inner, &key)?;
            }
        }
        tracing::info!(endpoints = inner.registry.len(), "restored endpoints");
        *self.inner.lock().unwrap() = Some(inner);
        Ok(())
    }

    /// Registers (or re-registers) an endpoint: writes its map entry, attaches
    /// the programs, persists the record and reprograms services it backs.
    /// Only returns once all of that is in place.
    pub fn add_endpoint(&self, spec: EndpointSpec) -> Result<Endpoint, AgentError> {
        if !self.is_ready() {
            return Err(AgentError::NotReady(
                "still restoring state and syncing the source".into(),
            ));
        }
        self.register(spec)
    }

    /// Registers pods that were running before catena was installed (found
    /// in the runtime's CNI cache), skipping those already known. Called once
    /// at start, before the agent reports ready.
    pub fn adopt_running_pods(&self) -> Result<usize> {
        let chained = crate::adopt::chained_networks(&self.config.cni_conf_dir);
        let findings = crate::adopt::scan(&self.config.cni_cache_dir, &chained)?;
        let mut adopted = 0;
        for finding in findings {
            let spec = match finding {
                crate::adopt::Finding::Adopt(spec) => spec,
                crate::adopt::Finding::Skip { file, reason } => {
                    tracing::debug!(%file, %reason, "CNI cache entry not adopted");
                    continue;
                }
            };
            let key = EndpointKey {
                container_id: spec.container_id.clone(),
                ifname: spec.ifname.clone(),
            };
            if self.endpoint(&key).is_ok() {
                continue;
            }
            match self.register(spec) {
                Ok(ep) => {
                    tracing::info!(endpoint = ep.id, container = %ep.spec.container_id, veth = %ep.spec.host_ifname, "adopted a pod that was running before catena");
                    adopted += 1;
                }
                Err(e) => {
                    tracing::warn!(container = %key.container_id, error = %e, "cannot adopt running pod")
                }
            }
        }
        Ok(adopted)
    }

    /// An ADD in three phases, so the slow parts (two TCX links, each an RCU
    /// grace period in the kernel, and the fsync of the record) do not hold
    /// the state lock that every other request needs:
    ///
    /// 1. state lock: claim the endpoint's key and interface, replace stale
    ///    records, compile and write its identity and policy, write its
    ///    `ENDPOINTS` entry, and put the record in the registry (memory);
    /// 2. no lock: attach the programs while the record is written to disk;
    /// 3. state lock: commit (services, the final record) or undo all of it.
    ///
    /// Why this is safe. Pods never run unenforced: the programs see no
    /// packet before phase 2 attaches them, and by then phase 1 has written
    /// the endpoint's `ENDPOINTS` entry and its policy. While the lock is
    /// released, the endpoint is an ordinary registry entry to everyone else,
    /// so a reconcile in between (a cluster change, another pod's ADD or DEL)
    /// compiles policy *with* it and keeps its identity and `ENDPOINTS` entry
    /// current instead of withdrawing them. Nothing else touches its links,
    /// entry or record meanwhile: every ADD and DEL claims the key and the
    /// interfaces it works on (waiting while another holds one), and CNI GC
    /// skips claimed endpoints. A failed attach or write removes the links,
    /// the entry, the policy and the record in phase 3, before the claim is
    /// released. The endpoint may be selected as a Service backend by a
    /// reconcile before its programs are attached; its sandbox has no
    /// process serving anything before the ADD returns, so that is harmless.
    fn register(&self, spec: EndpointSpec) -> Result<Endpoint, AgentError> {
        let started = std::time::Instant::now();
        validate_spec(&spec)?;
        let key = EndpointKey {
            container_id: spec.container_id.clone(),
            ifname: spec.ifname.clone(),
        };
        let ifindex = spec.host_ifindex;

        // Phase 1.
        let (mut guard, _claim) = self.lock_claiming(|inner| {
            let mut claims = vec![Claim::Key(key.clone()), Claim::Interface(ifindex)];
            if let Some(old) = inner.registry.get(&key) {
                claims.push(Claim::Interface(old.spec.host_ifindex));
            }
            claims
        })?;
        let claimed = started.elapsed();
        let inner = guard.as_mut().expect("checked by lock");
        // A record holding the same host interface under another key is stale
        // (a pod deleted without DEL whose ifindex was reused).
        let stale: Vec<EndpointKey> = inner
            .registry
            .all()
            .filter(|e| e.spec.host_ifindex == ifindex && key_of(e) != key)
            .map(key_of)
            .collect();
        for k in stale {
            tracing::warn!(container = %k.container_id, "replacing stale endpoint on the same interface");
            remove_endpoint(inner, &k)?;
        }
        if let Some(old) = inner.registry.get(&key).cloned() {
            if old.spec.host_ifindex != ifindex {
                remove_endpoint(inner, &key)?;
            }
        }
        let attacher = inner.datapath.attacher();
        let id = inner
            .registry
            .get(&key)
            .map(|e| e.id)
            .unwrap_or_else(|| inner.registry.next_id());
        let mut ep = Endpoint {
            id,
            spec,
            identity: inner.registry.get(&key).map_or(0, |e| e.identity),
            // Written to disk before the attach says which mode it used; the
            // commit rewrites the record in the rare case it guessed wrong.
            attach_mode: attacher.expected_mode().as_str().to_string(),
            created: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        };
        let identities = match reconcile_policy(inner, std::slice::from_ref(&ep)) {
            Ok(ids) => ids,
            Err(e) => return Err(AgentError::Internal(e.context("programming policy"))),
        };
        ep.identity = identities.get(&ep.id).copied().unwrap_or(ep.identity);
        if let Err(e) = inner.datapath.upsert_endpoint(ifindex, endpoint_info(&ep)) {
            abandon_endpoint(inner, &key, &ep);
            return Err(AgentError::Internal(
                e.context("writing the endpoint map entry"),
            ));
        }
        inner.registry.insert_unsaved(ep.clone());
        let records = inner.registry.dir().to_path_buf();
        drop(guard);
        let prepared = started.elapsed();

        // Phase 2. The attach stays on this thread (it must run in the
        // agent's network namespace); the record is written beside it.
        let (attached, persisted) = std::thread::scope(|scope| {
            let persist = scope.spawn(|| crate::model::endpoints::write_record(&records, &ep));
            let attached = attacher.attach(ifindex, &ep.spec.host_ifname, None);
            let persisted = persist
                .join()
                .unwrap_or_else(|_| Err(anyhow::anyhow!("writing the endpoint record panicked")));
            (attached, persisted)
        });
        let attached_at = started.elapsed();

        // Phase 3.
        let mut guard = self.lock()?;
        let inner = guard.as_mut().expect("checked by lock");
        let committed = attached
            .and_then(|mode| {
                persisted
                    .context("persisting the endpoint record")
                    .map(|()| mode)
            })
            .and_then(|mode| commit_endpoint(inner, &key, &ep, mode));
        let ep = match committed {
            Ok(ep) => ep,
            Err(e) => {
                // Fail closed and leave nothing behind.
                abandon_endpoint(inner, &key, &ep);
                return Err(AgentError::Internal(e));
            }
        };
        drop(guard);
        let took = started.elapsed();
        crate::metrics::global().policy_implementation("endpoint", took);
        crate::metrics::global().service_implementation("endpoint", took);
        tracing::info!(endpoint = ep.id, container = %ep.spec.container_id, veth = %ep.spec.host_ifname, ifindex = ep.spec.host_ifindex, mode = %ep.attach_mode, "endpoint added");
        tracing::debug!(
            endpoint = ep.id,
            claim_us = claimed.as_micros() as u64,
            prepare_us = (prepared - claimed).as_micros() as u64,
            attach_us = (attached_at - prepared).as_micros() as u64,
            commit_us = (took - attached_at).as_micros() as u64,
            "endpoint add timing"
        );
        Ok(ep)
    }

    /// Idempotent: an unknown endpoint is not an error. The endpoint's map
    /// entry, policy and record go under the state lock (from then on its
    /// programs drop every packet: no entry, fail closed); the detach, which
    /// waits on the kernel, runs after the lock is released, with the key and
    /// interface still claimed so no ADD reuses them half-way.
    pub fn delete_endpoint(&self, key: &EndpointKey) -> Result<(), AgentError> {
        let (mut guard, _claim) = self.lock_claiming(|inner| {
            let mut claims = vec![Claim::Key(key.clone())];
            if let Some(ep) = inner.registry.get(key) {
                claims.push(Claim::Interface(ep.spec.host_ifindex));
            }
            claims
        })?;
        let inner = guard.as_mut().expect("checked by lock");
        let Some(ep) = withdraw_endpoint(inner, key)? else {
            return Ok(());
        };
        let reconciled =
            reconcile_services(inner).and_then(|()| reconcile_policy(inner, &[]).map(|_| ()));
        let attacher = inner.datapath.attacher();
        drop(guard);
        let ifindex = ep.spec.host_ifindex;
        if let Err(e) = attacher.detach(ifindex) {
            // Only an interface that is still the one we attached to matters;
            // a vanished one took its links with it (pins are collected).
            if interface_index(&ep.spec.host_ifname) == Some(ifindex) {
                return Err(AgentError::Internal(e.context("detaching the programs")));
            }
            tracing::debug!(ifindex, error = %format!("{e:#}"), "detach of a vanished interface");
        }
        reconciled?;
        Ok(())
    }

    /// Takes the state lock with every claim `wanted` computes (from the
    /// state, under the lock) held by this caller; while another caller holds
    /// one of them, waits without the state lock and tries again.
    fn lock_claiming(
        &self,
        wanted: impl Fn(&Inner) -> Vec<Claim>,
    ) -> Result<(MutexGuard<'_, Option<Inner>>, ClaimGuard<'_>), AgentError> {
        loop {
            let guard = self.lock()?;
            let claims = wanted(guard.as_ref().expect("checked by lock"));
            let held = self.claims.held.lock().unwrap_or_else(|p| p.into_inner());
            if claims.iter().all(|c| !held.contains(c)) {
                return Ok((guard, ClaimGuard::take(&self.claims, held, claims)));
            }
            // Lock order is state, then claims; waiting releases both, and a
            // release cannot slip in between (it needs `held`).
            drop(guard);
            drop(
                self.claims
                    .released
                    .wait(held)
                    .unwrap_or_else(|p| p.into_inner()),
            );
        }
    }

    pub fn endpoint(&self, key: &EndpointKey) -> Result<Endpoint, AgentError> {
        let guard = self.lock()?;
        guard
            .as_ref()
            .and_then(|i| i.registry.get(key).cloned())
            .ok_or_else(|| {
                AgentError::NotFound(format!("endpoint {}/{}", key.container_id, key.ifname))
            })
    }

    pub fn endpoints(&self) -> Result<Vec<Endpoint>, AgentError> {
        let guard = self.lock()?;
        Ok(guard
            .as_ref()
            .map(|i| i.registry.all().cloned().collect())
            .unwrap_or_default())
    }

    /// What CNI CHECK asks: are the programs on the right interface, and do the
    /// maps hold the endpoint?
    pub fn check_endpoint(&self, key: &EndpointKey) -> Result<EndpointCheck, AgentError> {
        let guard = self.lock()?;
        let inner = guard.as_ref().expect("checked by lock");
        let ep = inner.registry.get(key).ok_or_else(|| {
            AgentError::NotFound(format!("endpoint {}/{}", key.container_id, key.ifname))
        })?;
        let mut problems = Vec::new();
        let ifindex = ep.spec.host_ifindex;
        match interface_index(&ep.spec.host_ifname) {
            Some(i) if i == ifindex => {}
            Some(i) => problems.push(format!(
                "{} now has ifindex {i}, expected {ifindex}",
                ep.spec.host_ifname
            )),
            None => problems.push(format!(
                "host interface {} does not exist",
                ep.spec.host_ifname
            )),
        }
        match inner.datapath.attachment(ifindex) {
            Ok(Some(_)) => {}
            Ok(None) => problems.push(format!(
                "catena programs are not attached to ifindex {ifindex}"
            )),
            Err(e) => problems.push(format!(
                "cannot query attachments of ifindex {ifindex}: {e:#}"
            )),
        }
        match inner.datapath.endpoint(ifindex) {
            Ok(Some(info)) if info.endpoint_id == ep.id => {}
            Ok(Some(info)) => problems.push(format!(
                "endpoint map holds id {} for ifindex {ifindex}, expected {}",
                info.endpoint_id, ep.id
            )),
            Ok(None) => problems.push(format!("endpoint map has no entry for ifindex {ifindex}")),
            Err(e) => problems.push(format!("cannot read the endpoint map: {e:#}")),
        }
        Ok(EndpointCheck {
            ok: problems.is_empty(),
            problems,
        })
    }

    /// CNI GC: removes every endpoint of `network` (every network when empty)
    /// that is not listed.
    pub fn gc(&self, network: &str, valid: &[Attachment]) -> Result<GcResult, AgentError> {
        let mut guard = self.lock()?;
        let inner = guard.as_mut().expect("checked by lock");
        let doomed: Vec<EndpointKey> = inner
            .registry
            .all()
            .filter(|e| network.is_empty() || e.spec.network == network)
            .map(key_of)
            .filter(|k| !valid.contains(k))
            // An ADD or DEL in flight owns it; the next GC sees how it ended.
            .filter(|k| !self.claims.holds_key(k))
            .collect();
        for key in &doomed {
            remove_endpoint(inner, key)?;
        }
        if !doomed.is_empty() {
            reconcile_services(inner)?;
            reconcile_policy(inner, &[])?;
        }
        Ok(GcResult { removed: doomed })
    }

    /// A new cluster snapshot from the source.
    pub fn set_cluster(&self, state: Arc<ClusterState>) -> Result<()> {
        let mut guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let inner = guard.as_mut().context("datapath not loaded")?;
        inner.cluster = state;
        // Policy first: pods new to the cluster get their identities before
        // a Service can send them traffic. A policy failure must not keep
        // services stale (and vice versa): both run, the first error wins.
        let started = std::time::Instant::now();
        let first = inner.programmed.is_none();
        let policy = reconcile_policy(inner, &[]).map(|_| ());
        let policy_done = started.elapsed();
        let services = reconcile_services(inner);
        tracing::debug!(
            policy_us = policy_done.as_micros() as u64,
            services_us = (started.elapsed() - policy_done).as_micros() as u64,
            "cluster snapshot applied"
        );
        if first {
            // The initial sync's transient allocations (list pages, first
            // compiles) are freed by now: give their pages back.
            let before = crate::memory::resident_bytes();
            crate::memory::release_free_heap();
            tracing::debug!(
                before = ?before,
                after = ?crate::memory::resident_bytes(),
                "released free heap after the first sync"
            );
        }
        policy.and(services)
    }

    /// Applies the DELs the plugin queued while the agent was down.
    pub fn drain_delete_queue(&self) -> Result<usize> {
        let dir = self.config.state_dir.join(catena_api::DEL_QUEUE_DIR);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return Ok(0);
        };
        let mut done = 0;
        for entry in entries.flatten() {
            let path = entry.path();
            if crate::state_file::is_temp_file(&path)
                || path.extension().and_then(|e| e.to_str()) != Some("json")
            {
                continue;
            }
            match std::fs::read(&path)
                .map_err(anyhow::Error::from)
                .and_then(|b| Ok(serde_json::from_slice::<QueuedDelete>(&b)?))
            {
                Ok(q) => {
                    let key = EndpointKey {
                        container_id: q.container_id,
                        ifname: q.ifname,
                    };
                    self.delete_endpoint(&key)
                        .map_err(|e| anyhow::anyhow!("{e}"))?;
                    done += 1;
                }
                Err(e) => {
                    tracing::warn!(file = %path.display(), error = %format!("{e:#}"), "dropping unreadable queued delete")
                }
            }
            std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        }
        Ok(done)
    }

    /// Attaches the north-south programs to the external devices (`--devices`,
    /// else detected; see `nodeport::devices`), detaches devices no longer
    /// external, and recompiles the Services when the node's external
    /// addresses changed. A no-op unless catena replaces kube-proxy. Returns
    /// the devices now attached.
    pub fn sync_devices(&self) -> Result<Vec<crate::nodeport::devices::ExternalDevice>> {
        if !self.config.kube_proxy_replacement.enabled() {
            return Ok(Vec::new());
        }
        let mut guard = self.lock().map_err(|e| anyhow::anyhow!("{e}"))?;
        let inner = guard.as_mut().expect("checked by lock");
        let veths: std::collections::BTreeSet<String> = inner
            .registry
            .all()
            .map(|e| e.spec.host_ifname.clone())
            .collect();
        let devices = crate::nodeport::devices::select(&self.config.devices, &veths)?;
        let programmed = inner.datapath.devices()?;
        for (ifindex, _) in &programmed {
            if !devices.iter().any(|d| d.ifindex == *ifindex) {
                inner.datapath.detach_device(*ifindex)?;
                tracing::info!(ifindex, "external device detached");
            }
        }
        for d in &devices {
            let addr = d.snat4();
            if !programmed.contains(&(d.ifindex, addr)) {
                let mode = inner
                    .datapath
                    .attach_device(d.ifindex, &d.name, addr)
                    .with_context(|| format!("attaching to external device {}", d.name))?;
                tracing::info!(device = %d.name, ifindex = d.ifindex, snat = %addr, mode = mode.as_str(), "external device attached");
            }
        }
        crate::nodeport::devices::sync_ipv6(&mut inner.datapath, &devices)?;
        crate::nodeport::node_addresses::sync(&mut inner.datapath)?;
        let ns = crate::compile::external::NorthSouth {
            enabled: true,
            node_addresses: crate::nodeport::devices::node_addresses(&devices),
            node_addresses6: crate::nodeport::devices::node_addresses6(&devices),
        };
        if *inner.services.north_south() != ns {
            tracing::info!(addresses = ?ns.node_addresses, addresses6 = ?ns.node_addresses6, "NodePort addresses changed");
            inner.services.set_north_south(ns);
            reconcile_services(inner)?;
        }
        Ok(devices)
    }

    /// The health-check node ports to serve: Services with
    /// `externalTrafficPolicy: Local` and a `healthCheckNodePort`, with how
    /// many of their endpoints (of either family: `health::local_endpoints`)
    /// are on this node.
    pub fn health_checks(&self) -> Vec<crate::nodeport::health::HealthCheck> {
        if !self.config.kube_proxy_replacement.enabled() {
            return Vec::new();
        }
        let guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let Some(inner) = guard.as_ref() else {
            return Vec::new();
        };
        let mut wanted: BTreeMap<String, (u16, &crate::sources::ObjectKey)> = BTreeMap::new();
        for (key, svc) in &inner.cluster.services {
            if let Some(port) = svc
                .spec
                .as_ref()
                .and_then(crate::compile::external::health_check_node_port)
            {
                wanted.insert(key.to_string(), (port, key));
            }
        }
        if wanted.is_empty() {
            return Vec::new();
        }
        let services: BTreeMap<&str, &k8s_openapi::api::core::v1::Service> = wanted
            .iter()
            .filter_map(|(name, (_, key))| {
                Some((name.as_str(), &**inner.cluster.services.get(*key)?))
            })
            .collect();
        let local = crate::nodeport::health::local_endpoints(inner.services.desired(), &services);
        wanted
            .iter()
            .map(|(name, (port, key))| crate::nodeport::health::HealthCheck {
                port: *port,
                namespace: key.namespace.clone(),
                name: key.name.clone(),
                local_endpoints: local.get(name).copied().unwrap_or(0),
            })
            .collect()
    }

    pub fn services(&self) -> Result<Vec<ServiceStatus>, AgentError> {
        let guard = self.lock()?;
        let inner = guard.as_ref().expect("checked by lock");
        let service_of = |name: &str| {
            let (ns, n) = name.split_once('/')?;
            inner
                .cluster
                .services
                .get(&crate::sources::ObjectKey::new(ns, n))
                .map(|s| s.as_ref())
        };
        let maglev = &inner.services.desired().maglev;
        let maglev6 = &inner.services.desired().maglev6;
        let algorithm = |maglev: bool| if maglev { "maglev" } else { "random" }.to_string();
        Ok(inner
            .datapath
            .services()
            .into_iter()
            .map(|s| ServiceStatus {
                kind: crate::compile::external::frontend_kind(service_of(&s.name), &s.frontend)
                    .to_string(),
                algorithm: algorithm(maglev.contains(&s.frontend)),
                name: s.name,
                frontend: format!(
                    "{}:{}/{}",
                    s.frontend.address,
                    s.frontend.port,
                    s.frontend.proto.as_str()
                ),
                backends: s
                    .backends
                    .iter()
                    .map(|b| format!("{}:{}", b.address, b.port))
                    .collect(),
                rev_nat_index: s.rev_nat_index,
                external_backends: s.external_backends.map(|b| {
                    b.iter()
                        .map(|b| format!("{}:{}", b.address, b.port))
                        .collect()
                }),
            })
            .chain(inner.datapath.services6().into_iter().map(|s| {
                // IPv6 as `[addr]:port`, the usual socket-address form.
                let sock = |a, p| std::net::SocketAddr::from((a, p)).to_string();
                let kind =
                    crate::compile::external::frontend_kind6(service_of(&s.name), &s.frontend);
                ServiceStatus {
                    name: s.name,
                    frontend: format!(
                        "{}/{}",
                        sock(s.frontend.address, s.frontend.port),
                        s.frontend.proto.as_str()
                    ),
                    backends: s.backends.iter().map(|b| sock(b.address, b.port)).collect(),
                    rev_nat_index: s.rev_nat_index,
                    kind: kind.to_string(),
                    algorithm: algorithm(maglev6.contains(&s.frontend)),
                    external_backends: s
                        .external_backends
                        .map(|b| b.iter().map(|b| sock(b.address, b.port)).collect()),
                }
            }))
            .collect())
    }

    /// The reports of the last successful policy compile together with the
    /// snapshot they were compiled from (so a reporter can name each policy's
    /// uid and generation exactly as compiled). None before the first compile.
    pub fn policy_reports(&self) -> Option<(Arc<ClusterState>, Vec<PolicyReport>)> {
        let guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let inner = guard.as_ref()?;
        let inputs = inner.policy_inputs.as_ref()?;
        Some((inputs.cluster.clone(), inner.policy.reports.clone()))
    }

    pub fn status(&self) -> Status {
        let source = self.source.read().unwrap().clone();
        let guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let policies = guard
            .as_ref()
            .map(|i| {
                i.policy
                    .reports
                    .iter()
                    .map(|r| catena_api::PolicyStatus {
                        name: r.name.clone(),
                        kind: r.kind.clone(),
                        state: r.state.as_str().to_string(),
                        messages: r.messages.clone(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        let (datapath, endpoints, services) = match guard.as_ref() {
            Some(inner) => (
                DatapathStatus {
                    bpffs_dir: self.config.bpffs_dir.display().to_string(),
                    programs: inner.datapath.program_ids(),
                    counters: inner.datapath.counters().unwrap_or_default(),
                },
                inner.registry.len(),
                inner.programmed.unwrap_or(0),
            ),
            None => (
                DatapathStatus {
                    bpffs_dir: self.config.bpffs_dir.display().to_string(),
                    programs: Default::default(),
                    counters: Default::default(),
                },
                0,
                0,
            ),
        };
        Status {
            version: env!("CARGO_PKG_VERSION").to_string(),
            ready: self.is_ready(),
            source: SourceStatus {
                kind: source.kind,
                synced: source.synced,
                errors: source.errors,
            },
            datapath,
            endpoints,
            services,
            policies,
        }
    }

    /// An endpoint's policy as the maps hold it, explained: remote identity
    /// labels and the policy each entry came from.
    pub fn endpoint_policy(
        &self,
        key: &EndpointKey,
    ) -> Result<catena_api::EndpointPolicyStatus, AgentError> {
        let guard = self.lock()?;
        let inner = guard.as_ref().expect("checked by lock");
        let ep = inner.registry.get(key).ok_or_else(|| {
            AgentError::NotFound(format!("endpoint {}/{}", key.container_id, key.ifname))
        })?;
        let programmed = inner.datapath.endpoint_policy(ep.id)?.unwrap_or_default();
        let labels = identity_labels_by_id(inner);
        let origins: BTreeMap<u32, &RuleOrigin> = inner
            .policy
            .rule_refs
            .iter()
            .map(|(o, r)| (*r, o))
            .collect();
        let entries = programmed
            .rules
            .iter()
            .map(|r| catena_api::PolicyEntryStatus {
                direction: match r.direction {
                    catena_datapath::policy::Direction::Ingress => "ingress".into(),
                    catena_datapath::policy::Direction::Egress => "egress".into(),
                },
                verdict: if r.deny { "deny" } else { "allow" }.into(),
                remote_identity: r.remote_identity,
                remote_labels: if r.remote_identity == catena_common::identity::ANY {
                    vec!["any".into()]
                } else {
                    labels.get(&r.remote_identity).cloned().unwrap_or_default()
                },
                protocol: match r.proto {
                    0 => "any".into(),
                    1 => "ICMP".into(),
                    6 => "TCP".into(),
                    17 => "UDP".into(),
                    132 => "SCTP".into(),
                    n => n.to_string(),
                },
                ports: if r.ports.is_any() {
                    "any".into()
                } else if r.ports.start == r.ports.end {
                    r.ports.start.to_string()
                } else {
                    format!("{}-{}", r.ports.start, r.ports.end)
                },
                rule_ref: r.rule_ref,
                source: origins.get(&r.rule_ref).map_or_else(String::new, |o| {
                    format!("{} {} {}", o.kind, o.policy, o.path)
                        .trim()
                        .to_string()
                }),
            })
            .collect();
        Ok(catena_api::EndpointPolicyStatus {
            endpoint_id: ep.id,
            identity: ep.identity,
            ingress_enforced: programmed.ingress_enforced,
            egress_enforced: programmed.egress_enforced,
            entries,
        })
    }

    /// Every identity: reserved, pods' and CIDRs'.
    pub fn identities(&self) -> Result<Vec<catena_api::IdentityInfo>, AgentError> {
        let guard = self.lock()?;
        let inner = guard.as_ref().expect("checked by lock");
        let labels = identity_labels_by_id(inner);
        Ok(labels
            .into_iter()
            .map(|(id, labels)| catena_api::IdentityInfo {
                id,
                kind: if id < catena_common::identity::FIRST_LOCAL {
                    "reserved"
                } else if id >= catena_common::identity::FIRST_CIDR {
                    "cidr"
                } else {
                    "pod"
                }
                .into(),
                labels,
                addresses: inner.policy.addresses.get(&id).cloned().unwrap_or_default(),
            })
            .collect())
    }
}

fn identity_labels_by_id(inner: &Inner) -> BTreeMap<u32, Vec<String>> {
    let mut out: BTreeMap<u32, Vec<String>> = RESERVED
        .iter()
        .map(|(id, name)| (*id, vec![format!("reserved:{name}")]))
        .collect();
    for (labels, id) in inner.identities.all() {
        out.insert(
            id,
            labels.iter().map(|(k, v)| format!("k8s:{k}={v}")).collect(),
        );
    }
    for (prefix, id) in inner.policy.cidr_ids.iter().flatten() {
        out.insert(*id, vec![format!("cidr:{prefix}")]);
    }
    out
}

fn validate_spec(spec: &EndpointSpec) -> Result<(), AgentError> {
    let bad = |m: &str| Err(AgentError::BadRequest(m.to_string()));
    if spec.container_id.is_empty() {
        return bad("containerId is empty");
    }
    if spec.ifname.is_empty() || spec.host_ifname.is_empty() {
        return bad("ifname and hostIfname are required");
    }
    if spec.host_ifindex == 0 {
        return bad("hostIfindex must be non-zero");
    }
    for ip in &spec.ips {
        let addr = ip.split('/').next().unwrap_or_default();
        if addr.parse::<std::net::IpAddr>().is_err() {
            return Err(AgentError::BadRequest(format!("invalid IP {ip:?}")));
        }
    }
    Ok(())
}

/// Writes the endpoint's map entry, then attaches: by the time a packet can
/// reach the programs, its configuration is there.
fn program_endpoint(datapath: &mut Datapath, ep: &Endpoint) -> Result<catena_datapath::AttachMode> {
    datapath.upsert_endpoint(ep.spec.host_ifindex, endpoint_info(ep))?;
    datapath.attach(ep.spec.host_ifindex, &ep.spec.host_ifname)
}

/// The programs' view of an endpoint: its first address of each family
/// (what anti-spoofing allows as the source). Anti-spoofing is on whenever
/// the pod has an address at all; a family it has none of then allows only
/// the unspecified (and, for IPv6, link-local) source: a single-stack pod
/// sending from a global address of the other family is spoofing, since
/// nothing gave it one. A pod without any address (a primary plugin without
/// IPAM) is left unchecked: there is nothing to check against.
fn endpoint_info(ep: &Endpoint) -> EndpointInfo {
    let addrs = || {
        ep.spec
            .ips
            .iter()
            .filter_map(|ip| ip.split('/').next()?.parse::<std::net::IpAddr>().ok())
    };
    let ipv4 = addrs()
        .find_map(|ip| match ip {
            std::net::IpAddr::V4(a) => Some(a),
            std::net::IpAddr::V6(_) => None,
        })
        .map_or(0, |ip| u32::from_ne_bytes(ip.octets()));
    let ipv6 = addrs()
        .find_map(|ip| match ip {
            std::net::IpAddr::V6(a) => Some(a),
            std::net::IpAddr::V4(_) => None,
        })
        .map_or([0; 4], |ip| {
            catena_common::lb6::addr6_from_octets(&ip.octets())
        });
    let has_address = ipv4 != 0 || ipv6 != [0; 4];
    EndpointInfo {
        ipv4,
        endpoint_id: ep.id,
        identity: ep.identity,
        flags: if has_address { EP_FLAG_ANTI_SPOOF } else { 0 },
        ipv6,
    }
}

fn remove_endpoint(inner: &mut Inner, key: &EndpointKey) -> Result<Option<Endpoint>> {
    let Some(ep) = inner.registry.get(key).cloned() else {
        return Ok(None);
    };
    let ifindex = ep.spec.host_ifindex;
    // Only touch the interface if it is still the one we attached to.
    if interface_index(&ep.spec.host_ifname) == Some(ifindex)
        || inner.datapath.attachment(ifindex).ok().flatten().is_some()
    {
        inner.datapath.detach(ifindex)?;
    } else {
        inner.datapath.detach(ifindex).ok(); // clears pins of a vanished interface
    }
    inner.datapath.remove_endpoint(ifindex)?;
    inner.registry.remove(key)?;
    tracing::info!(endpoint = ep.id, container = %key.container_id, "endpoint removed");
    Ok(Some(ep))
}

/// Phase 3 of an ADD that attached and persisted: the record gets the mode
/// the attach used (rewritten on disk if that or, through a reconcile in
/// between, its identity differs from what phase 2 wrote), and Services see
/// the endpoint. Returns the record as it now stands.
fn commit_endpoint(
    inner: &mut Inner,
    key: &EndpointKey,
    written: &Endpoint,
    mode: catena_datapath::AttachMode,
) -> Result<Endpoint> {
    let Some(mut ep) = inner
        .registry
        .get(key)
        .filter(|e| e.id == written.id)
        .cloned()
    else {
        anyhow::bail!(
            "endpoint {} was removed while it was being attached",
            written.id
        );
    };
    ep.attach_mode = mode.as_str().to_string();
    if ep != *written {
        inner.registry.save(ep.clone())?;
    }
    reconcile_services(inner)?;
    Ok(ep)
}

/// Undoes an ADD that failed after phase 1: links, map entry, policy and
/// record of `ep` go (each step best effort, so one failure does not keep
/// the others from running).
fn abandon_endpoint(inner: &mut Inner, key: &EndpointKey, ep: &Endpoint) {
    let ifindex = ep.spec.host_ifindex;
    if let Err(e) = inner.datapath.detach(ifindex) {
        tracing::warn!(ifindex, error = %format!("{e:#}"), "cannot detach a failed endpoint");
    }
    if let Err(e) = inner.datapath.remove_endpoint(ifindex) {
        tracing::warn!(ifindex, error = %format!("{e:#}"), "cannot remove the map entry of a failed endpoint");
    }
    if inner.registry.get(key).is_some_and(|e| e.id == ep.id) {
        if let Err(e) = inner.registry.remove(key) {
            tracing::warn!(endpoint = ep.id, error = %format!("{e:#}"), "cannot remove the record of a failed endpoint");
        }
    }
    if let Err(e) = reconcile_policy(inner, &[]) {
        tracing::warn!(error = %format!("{e:#}"), "cannot withdraw the policy of a failed endpoint");
    }
    if let Err(e) = reconcile_services(inner) {
        tracing::warn!(error = %format!("{e:#}"), "cannot withdraw a failed endpoint from Services");
    }
}

/// Removes the endpoint's map entry and record but leaves its programs
/// attached (the caller detaches without the state lock). Without a map
/// entry the programs drop every packet of the interface.
fn withdraw_endpoint(inner: &mut Inner, key: &EndpointKey) -> Result<Option<Endpoint>> {
    let Some(ep) = inner.registry.get(key).cloned() else {
        return Ok(None);
    };
    inner.datapath.remove_endpoint(ep.spec.host_ifindex)?;
    inner.registry.remove(key)?;
    tracing::info!(endpoint = ep.id, container = %key.container_id, "endpoint removed");
    Ok(Some(ep))
}

/// What an ADD or DEL works on while it has released the state lock.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Claim {
    Key(EndpointKey),
    /// A host interface (ifindex): its links, link pins and map entry.
    Interface(u32),
}

/// Claims in force. Taken only together with the state lock (state lock
/// first), released without it.
#[derive(Default)]
struct Claims {
    held: Mutex<std::collections::BTreeSet<Claim>>,
    released: Condvar,
}

impl Claims {
    fn holds_key(&self, key: &EndpointKey) -> bool {
        self.held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&Claim::Key(key.clone()))
    }
}

/// Releases its claims when dropped (also when the operation fails or panics).
struct ClaimGuard<'a> {
    claims: &'a Claims,
    mine: Vec<Claim>,
}

impl<'a> ClaimGuard<'a> {
    fn take(
        claims: &'a Claims,
        mut held: MutexGuard<'_, std::collections::BTreeSet<Claim>>,
        mine: Vec<Claim>,
    ) -> Self {
        held.extend(mine.iter().cloned());
        ClaimGuard { claims, mine }
    }
}

impl Drop for ClaimGuard<'_> {
    fn drop(&mut self) {
        let mut held = self.claims.held.lock().unwrap_or_else(|p| p.into_inner());
        for c in &self.mine {
            held.remove(c);
        }
        drop(held);
        self.claims.released.notify_all();
    }
}

fn reconcile_services(inner: &mut Inner) -> Result<()> {
    let started = std::time::Instant::now();
    let registered: Vec<Endpoint> = inner.registry.all().cloned().collect();
    let changes = inner.services.update(&inner.cluster, &registered);
    let compiled = started.elapsed();
    for w in &changes.warnings {
        tracing::warn!(warning = %w, "service compile");
    }
    if !changes.changed && inner.programmed.is_some() {
        inner.programmed_at = Some(std::time::SystemTime::now());
        return Ok(());
    }
    let desired = inner.services.desired();
    // Once the maps hold a compile's result, only what changed is diffed.
    let stats = if inner.programmed.is_some() {
        inner
            .datapath
            .apply_services_changed(desired, &changes.frontends)?
    } else {
        inner.datapath.apply_services(desired)?
    };
    tracing::info!(
        services = desired.services.len(),
        recompiled = changes.recompiled,
        frontends = changes.frontends.len(),
        compile_us = compiled.as_micros() as u64,
        apply_us = (started.elapsed() - compiled).as_micros() as u64,
        ?stats,
        "service maps updated"
    );
    // A backend may have left a frontend (or the frontend went): sockets the
    // socket LB sent there must end. Also once after start, for backends
    // removed while the agent was down.
    if let Some(sockets) = &inner.sockets {
        if inner.programmed.is_none() || stats.services_updated + stats.services_removed > 0 {
            let netns: std::collections::BTreeSet<std::path::PathBuf> = registered
                .iter()
                .filter(|e| !e.spec.netns.is_empty())
                .map(|e| e.spec.netns.clone().into())
                .collect();
            sockets.request(netns.into_iter().collect());
        }
    }
    inner.programmed = Some(desired.services.len());
    inner.programmed_at = Some(std::time::SystemTime::now());
    Ok(())
}

/// Compiles the policy of every known pod and makes the policy maps hold it.
/// `pending` are endpoints being registered (not yet in the registry): they
/// get identities and policy like the others. Returns endpoint id -> identity.
///
/// Identities: every pod's label set is allocated (registered endpoints
/// first, each keeping its current number when free), then label sets no pod
/// holds any more are released — after allocation, so a number freed by a
/// label change is never handed to another label set in the same pass (an
/// ENDPOINTS entry not yet updated must not name someone else).
fn reconcile_policy(inner: &mut Inner, pending: &[Endpoint]) -> Result<BTreeMap<u32, u32>> {
    let mut registered: Vec<Endpoint> = inner
        .registry
        .all()
        .filter(|e| !pending.iter().any(|p| key_of(p) == key_of(e)))
        .cloned()
        .collect();
    registered.extend(pending.iter().cloned());
    let current: BTreeMap<u32, u32> = registered.iter().map(|e| (e.id, e.identity)).collect();
    let host_addrs = local_addrs();
    let peers = crate::compile::policy::NodePeers::of(&inner.cluster, &inner.node_name);
    let inputs = PolicyInputs::capture(&inner.cluster, &registered, &host_addrs, &peers);
    if pending.is_empty()
        && inner
            .policy_inputs
            .as_ref()
            .is_some_and(|p| p.same(&inputs))
    {
        // Nothing the policy compiler reads has changed (e.g. an EndpointSlice
        // edit with no toServices policy): the maps already hold the result.
        return Ok(current);
    }
    let mut pods = known_pods(&inner.cluster, &registered);
    pods.sort_by_key(|p| p.endpoint_id.is_none());
    for p in &mut pods {
        let preferred = p
            .endpoint_id
            .and_then(|id| current.get(&id).copied())
            .filter(|i| *i != 0);
        p.identity = inner
            .identities
            .allocate_preferring(p.labels.clone(), preferred);
    }
    let live: Vec<BTreeMap<String, String>> = pods.iter().map(|p| p.labels.clone()).collect();
    inner.identities.retain_only(&live);

    let prev_cidr = match &inner.policy.cidr_ids {
        Some(c) => c.clone(),
        // After a restart the pinned ipcache still holds the CIDR identities
        // in force: keep their numbers.
        None => inner
            .datapath
            .ipcache()
            .unwrap_or_default()
            .into_iter()
            .filter(|(_, id)| *id >= catena_common::identity::FIRST_CIDR)
            .map(|((a, l), id)| (Prefix::new(a, l), id))
            .collect(),
    };
    let out = compile_policy(&PolicyInput {
        cluster: &inner.cluster,
        pods: &pods,
        host_addrs: &host_addrs,
        remote_node_addrs: &peers.remote_nodes,
        apiserver_addrs: &peers.apiserver,
        prev_cidr_ids: &prev_cidr,
        prev_rule_refs: &inner.policy.rule_refs,
    });
    for r in &out.reports {
        let before = inner
            .policy
            .reports
            .iter()
            .find(|p| p.kind == r.kind && p.name == r.name);
        if r.state != crate::model::policy::PolicyState::Ok && before != Some(r) {
            tracing::warn!(policy = %r.name, kind = %r.kind, state = r.state.as_str(), messages = ?r.messages, "policy not enforced exactly as written (fail-closed)");
        }
    }
    if inner.policy.programmed.as_ref() != Some(&out.desired) {
        inner.policy.programmed = None;
        let stats = inner.datapath.apply_policy(&out.desired)?;
        tracing::info!(
            endpoints = out.desired.endpoints.len(),
            ipcache = out.desired.ipcache.len(),
            ?stats,
            "policy maps updated"
        );
        inner.policy.programmed = Some(out.desired.clone());
    }
    let mut addresses: BTreeMap<u32, Vec<String>> = BTreeMap::new();
    for ((a, l), id) in &out.desired.ipcache {
        addresses.entry(*id).or_default().push(format!("{a}/{l}"));
    }
    inner.policy.addresses = addresses;
    inner.policy_inputs = Some(inputs);
    inner.policy.cidr_ids = Some(out.cidr_ids);
    crate::ops::monitor::publish_rule_names(
        out.rule_refs
            .iter()
            .map(|(o, r)| (*r, o.describe()))
            .collect(),
    );
    inner.policy.rule_refs = out.rule_refs;
    inner.policy.reports = out.reports;

    // ENDPOINTS entries follow identity changes (a Pod's labels edited),
    // written after the maps already know the new identity.
    let identities: BTreeMap<u32, u32> = pods
        .iter()
        .filter_map(|p| Some((p.endpoint_id?, p.identity)))
        .collect();
    let changed: Vec<Endpoint> = inner
        .registry
        .all()
        .filter(|e| !pending.iter().any(|p| p.id == e.id))
        .filter(|e| identities.get(&e.id).is_some_and(|i| *i != e.identity))
        .cloned()
        .collect();
    for mut ep in changed {
        let old = ep.identity;
        ep.identity = identities[&ep.id];
        inner
            .datapath
            .upsert_endpoint(ep.spec.host_ifindex, endpoint_info(&ep))?;
        tracing::info!(
            endpoint = ep.id,
            old,
            new = ep.identity,
            "endpoint identity changed"
        );
        inner.registry.save(ep)?;
    }
    Ok(identities)
}

/// This node's addresses (the HOST identity), IPv4 and IPv6, from the
/// agent's network namespace (the node's). Loopback is left out, a pod
/// never sees it as a source. IPv6 link-local ones included: the host
/// reaches a pod over its veth from its fe80:: address there (neighbour
/// discovery's peer, and any link-local traffic).
fn local_addrs() -> Vec<std::net::IpAddr> {
    let Ok(addrs) = crate::nodeport::node_addresses::interface_addresses() else {
        return vec![];
    };
    let mut out: Vec<std::net::IpAddr> = addrs.filter(|ip| !ip.is_loopback()).collect();
    out.sort();
    out.dedup();
    out
}

/// ifindex of `name` in the agent's network namespace.
pub fn interface_index(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: if_nametoindex reads a NUL-terminated string and has no other effects.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (idx != 0).then_some(idx)
}

/// What the policy compiler reads: the snapshot itself (kept alive, so that
/// "unchanged" is a pointer comparison that a freed object's reused address
/// cannot fool), the registered endpoints and the node's addresses.
struct PolicyInputs {
    cluster: Arc<ClusterState>,
    /// Services and slices matter only to `toServices` rules.
    uses_services: bool,
    registered: Vec<Endpoint>,
    host_addrs: Vec<std::net::IpAddr>,
    /// Other nodes' and the API server's addresses (from Nodes and the
    /// `default/kubernetes` EndpointSlices).
    peers: crate::compile::policy::NodePeers,
}

impl PolicyInputs {
    fn capture(
        cluster: &Arc<ClusterState>,
        registered: &[Endpoint],
        host_addrs: &[std::net::IpAddr],
        peers: &crate::compile::policy::NodePeers,
    ) -> Self {
        PolicyInputs {
            peers: peers.clone(),
            cluster: cluster.clone(),
            uses_services: cluster
                .cilium_policies
                .values()
                .any(|p| mentions_to_services(&p.object)),
            registered: registered.to_vec(),
            host_addrs: host_addrs.to_vec(),
        }
    }

    fn same(&self, other: &PolicyInputs) -> bool {
        use crate::sources::same_arcs;
        let (a, b) = (&self.cluster, &other.cluster);
        let cluster_same = Arc::ptr_eq(a, b)
            || (same_arcs(&a.pods, &b.pods)
                && same_arcs(&a.namespaces, &b.namespaces)
                && same_arcs(&a.network_policies, &b.network_policies)
                && same_arcs(&a.cilium_policies, &b.cilium_policies)
                && (!self.uses_services
                    || (same_arcs(&a.services, &b.services)
                        && same_arcs(&a.endpoint_slices, &b.endpoint_slices))));
        cluster_same
            && self.uses_services == other.uses_services
            && self.registered == other.registered
            && self.host_addrs == other.host_addrs
            && self.peers == other.peers
    }
}

/// Whether a Cilium policy object has a `toServices` peer anywhere.
fn mentions_to_services(object: &serde_json::Value) -> bool {
    let specs =
        std::iter::once(&object["spec"]).chain(object["specs"].as_array().into_iter().flatten());
    specs.into_iter().any(|spec| {
        ["egress", "egressDeny"].iter().any(|dir| {
            spec[*dir]
                .as_array()
                .is_some_and(|rules| rules.iter().any(|r| r.get("toServices").is_some()))
        })
    })
}

#[cfg(test)]
mod endpoint_info_tests {
    use super::*;

    fn ep(ips: &[&str]) -> Endpoint {
        Endpoint {
            id: 7,
            spec: catena_api::EndpointSpec {
                ips: ips.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            },
            identity: 300,
            attach_mode: "tcx".into(),
            created: String::new(),
        }
    }

    #[test]
    fn dual_stack_pod_gets_both_addresses_and_anti_spoofing() {
        let info = endpoint_info(&ep(&["fd00:10::5/64", "10.0.0.5/24", "fd00:10::6/64"]));
        assert_eq!(info.ipv4, u32::from_ne_bytes([10, 0, 0, 5]));
        // The first IPv6 address, in network order like the packet.
        let want: std::net::Ipv6Addr = "fd00:10::5".parse().unwrap();
        assert_eq!(
            info.ipv6,
            catena_common::lb6::addr6_from_octets(&want.octets())
        );
        assert_eq!(info.flags, EP_FLAG_ANTI_SPOOF);
        assert_eq!((info.endpoint_id, info.identity), (7, 300));
    }

    #[test]
    fn single_stack_pods_are_checked_in_both_families() {
        let v4 = endpoint_info(&ep(&["10.0.0.5/24"]));
        assert_eq!((v4.ipv6, v4.flags), ([0; 4], EP_FLAG_ANTI_SPOOF));
        let v6 = endpoint_info(&ep(&["fd00:10::5/64"]));
        assert_eq!((v6.ipv4, v6.flags), (0, EP_FLAG_ANTI_SPOOF));
        assert_ne!(v6.ipv6, [0; 4]);
    }

    #[test]
    fn pod_without_addresses_is_not_checked() {
        let info = endpoint_info(&ep(&[]));
        assert_eq!((info.ipv4, info.ipv6, info.flags), (0, [0; 4], 0));
    }
}
