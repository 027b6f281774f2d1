//! The agent's state and every operation on it. Operations are synchronous
//! (short syscalls on maps and links) and serialised by one mutex, so an ADD,
//! a DEL and a reconcile never interleave half-way.

use crate::compile::services::{compile_services, pod_endpoints};
use crate::config::AgentConfig;
use crate::model::endpoints::{key_of, EndpointKey, EndpointRegistry};
use crate::model::identity::{identity_labels, IdentityAllocator};
use crate::sources::{ClusterState, ObjectKey};
use anyhow::{Context, Result};
use catena_api::{
    Attachment, DatapathStatus, Endpoint, EndpointCheck, EndpointSpec, GcResult, QueuedDelete,
    ServiceStatus, SourceStatus, Status,
};
use catena_common::endpoint::{EndpointInfo, EP_FLAG_ANTI_SPOOF};
use catena_datapath::{Datapath, LbDesired};
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

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
    /// What the service maps hold (None until the first apply).
    programmed: Option<LbDesired>,
    programmed_at: Option<std::time::SystemTime>,
}

pub struct AgentCore {
    config: AgentConfig,
    inner: Mutex<Option<Inner>>,
    ready: AtomicBool,
    source: RwLock<SourceInfo>,
}

impl AgentCore {
    pub fn new(config: AgentConfig) -> Self {
        AgentCore {
            config,
            inner: Mutex::new(None),
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
        let cgroup_root = if self.config.kube_proxy_replacement.enabled() {
            crate::cgroup::resolve_root(&self.config.cgroup_root)?
        } else {
            None // kube-proxy still serves node processes
        };
        if let Some(cgroup) = cgroup_root {
            datapath.attach_cgroup(&cgroup).with_context(|| {
                format!(
                    "attaching socket load balancing to cgroup {}",
                    cgroup.display()
                )
            })?;
            tracing::info!(cgroup = %cgroup.display(), "socket load balancing for node processes attached");
        }
        let registry = EndpointRegistry::load(&self.config.state_dir)?;
        let mut inner = Inner {
            datapath,
            registry,
            identities: IdentityAllocator::default(),
            cluster: Arc::new(ClusterState::default()),
            programmed: None,
            programmed_at: None,
        };
        let endpoints: Vec<Endpoint> = inner.registry.all().cloned().collect();
        for ep in endpoints {
            let key = key_of(&ep);
            if interface_index(&ep.spec.host_ifname) == Some(ep.spec.host_ifindex) {
                let labels = identity_labels(&ep.spec.pod.namespace, &ep.spec.labels);
                inner.identities.allocate(labels);
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

    fn register(&self, spec: EndpointSpec) -> Result<Endpoint, AgentError> {
        validate_spec(&spec)?;
        let mut guard = self.lock()?;
        let inner = guard.as_mut().expect("checked by lock");
        let key = EndpointKey {
            container_id: spec.container_id.clone(),
            ifname: spec.ifname.clone(),
        };
        // A record holding the same host interface under another key is stale
        // (a pod deleted without DEL whose ifindex was reused).
        let stale: Vec<EndpointKey> = inner
            .registry
            .all()
            .filter(|e| e.spec.host_ifindex == spec.host_ifindex && key_of(e) != key)
            .map(key_of)
            .collect();
        for k in stale {
            tracing::warn!(container = %k.container_id, "replacing stale endpoint on the same interface");
            remove_endpoint(inner, &k)?;
        }
        if let Some(old) = inner.registry.get(&key).cloned() {
            if old.spec.host_ifindex != spec.host_ifindex {
                remove_endpoint(inner, &key)?;
            }
        }
        let id = inner
            .registry
            .get(&key)
            .map(|e| e.id)
            .unwrap_or_else(|| inner.registry.next_id());
        let mut labels = spec.labels.clone();
        if let Some(pod_labels) = inner
            .cluster
            .pod_labels(&ObjectKey::new(&spec.pod.namespace, &spec.pod.name))
        {
            labels.extend(pod_labels.clone());
        }
        let identity = inner
            .identities
            .allocate(identity_labels(&spec.pod.namespace, &labels));
        let mut ep = Endpoint {
            id,
            spec,
            identity,
            attach_mode: String::new(),
            created: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        };
        match program_endpoint(&mut inner.datapath, &ep) {
            Ok(mode) => ep.attach_mode = mode.as_str().to_string(),
            Err(e) => {
                // Fail closed and leave nothing behind.
                let _ = inner.datapath.detach(ep.spec.host_ifindex);
                let _ = inner.datapath.remove_endpoint(ep.spec.host_ifindex);
                return Err(AgentError::Internal(e));
            }
        }
        inner.registry.save(ep.clone())?;
        reconcile_services(inner)?;
        tracing::info!(endpoint = ep.id, container = %ep.spec.container_id, veth = %ep.spec.host_ifname, ifindex = ep.spec.host_ifindex, mode = %ep.attach_mode, "endpoint added");
        Ok(ep)
    }

    /// Idempotent: an unknown endpoint is not an error.
    pub fn delete_endpoint(&self, key: &EndpointKey) -> Result<(), AgentError> {
        let mut guard = self.lock()?;
        let inner = guard.as_mut().expect("checked by lock");
        if remove_endpoint(inner, key)?.is_some() {
            reconcile_services(inner)?;
        }
        Ok(())
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
            .collect();
        for key in &doomed {
            remove_endpoint(inner, key)?;
        }
        if !doomed.is_empty() {
            reconcile_services(inner)?;
        }
        Ok(GcResult { removed: doomed })
    }

    /// A new cluster snapshot from the source.
    pub fn set_cluster(&self, state: Arc<ClusterState>) -> Result<()> {
        let mut guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let inner = guard.as_mut().context("datapath not loaded")?;
        inner.cluster = state;
        reconcile_services(inner)
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

    pub fn services(&self) -> Result<Vec<ServiceStatus>, AgentError> {
        let guard = self.lock()?;
        let inner = guard.as_ref().expect("checked by lock");
        Ok(inner
            .datapath
            .services()
            .into_iter()
            .map(|s| ServiceStatus {
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
            })
            .collect())
    }

    pub fn status(&self) -> Status {
        let source = self.source.read().unwrap().clone();
        let guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let (datapath, endpoints, services) = match guard.as_ref() {
            Some(inner) => (
                DatapathStatus {
                    bpffs_dir: self.config.bpffs_dir.display().to_string(),
                    programs: inner.datapath.program_ids(),
                    counters: inner.datapath.counters().unwrap_or_default(),
                },
                inner.registry.len(),
                inner.programmed.as_ref().map_or(0, |p| p.services.len()),
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
        }
    }
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
    let ipv4 = ep
        .spec
        .ips
        .iter()
        .filter_map(|ip| ip.split('/').next()?.parse::<Ipv4Addr>().ok())
        .next()
        .map_or(0, |ip| u32::from_ne_bytes(ip.octets()));
    datapath.upsert_endpoint(
        ep.spec.host_ifindex,
        EndpointInfo {
            ipv4,
            endpoint_id: ep.id,
            identity: ep.identity,
            flags: if ipv4 != 0 { EP_FLAG_ANTI_SPOOF } else { 0 },
        },
    )?;
    datapath.attach(ep.spec.host_ifindex, &ep.spec.host_ifname)
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
    let live: Vec<_> = inner
        .registry
        .all()
        .map(|e| identity_labels(&e.spec.pod.namespace, &e.spec.labels))
        .collect();
    inner.identities.retain_only(&live);
    tracing::info!(endpoint = ep.id, container = %key.container_id, "endpoint removed");
    Ok(Some(ep))
}

fn reconcile_services(inner: &mut Inner) -> Result<()> {
    let registered: Vec<Endpoint> = inner.registry.all().cloned().collect();
    let pods = pod_endpoints(&inner.cluster, &registered);
    let compiled = compile_services(&inner.cluster, &pods);
    for w in &compiled.warnings {
        tracing::warn!(warning = %w, "service compile");
    }
    if inner.programmed.as_ref() == Some(&compiled.desired) {
        inner.programmed_at = Some(std::time::SystemTime::now());
        return Ok(());
    }
    let stats = inner.datapath.apply_services(&compiled.desired)?;
    tracing::info!(
        services = compiled.desired.services.len(),
        ?stats,
        "service maps updated"
    );
    inner.programmed = Some(compiled.desired);
    inner.programmed_at = Some(std::time::SystemTime::now());
    Ok(())
}

/// ifindex of `name` in the agent's network namespace.
pub fn interface_index(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: if_nametoindex reads a NUL-terminated string and has no other effects.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (idx != 0).then_some(idx)
}
