//! Services -> service-map contents. Backends come from EndpointSlices when a
//! Service has any; otherwise, for a Service with a selector, the agent acts as
//! its own endpoints controller over the pods it knows (Pod manifests and
//! endpoints the CNI plugin registered).

use super::maglev::{service_algorithm, LbAlgorithm};
use super::selector::service_selects;
use super::traffic_policy::{internal_local, NodeLocality};
use crate::sources::{ClusterState, ObjectKey};
use crate::sources::{PodInfo, SliceInfo};
use catena_datapath::{BackendAddr, Frontend, Frontend6, LbDesired, LbService, LbService6, Proto};
use k8s_openapi::api::core::v1::{Service, ServicePort};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

/// A pod as the endpoints controller sees it: where it is and its labels.
#[derive(Clone, Debug, PartialEq)]
pub struct PodEndpoint {
    pub key: ObjectKey,
    pub ipv4: Vec<Ipv4Addr>,
    pub ipv6: Vec<Ipv6Addr>,
    pub labels: BTreeMap<String, String>,
    /// The Pod manifest, when the source has one (for named target ports).
    pub pod: Option<std::sync::Arc<PodInfo>>,
}

/// An address family of Service frontends and backends: which
/// EndpointSlices and pod addresses feed it.
pub(super) trait Family: Copy + Ord + std::str::FromStr {
    /// `addressType` of the EndpointSlices carrying this family.
    const SLICE_ADDRESS_TYPE: &'static str;
    /// The pod's addresses of this family.
    fn of_pod(pod: &PodEndpoint) -> &[Self];
    /// `ip` if it is of this family.
    fn of_ip(ip: std::net::IpAddr) -> Option<Self>;
}

impl Family for Ipv4Addr {
    const SLICE_ADDRESS_TYPE: &'static str = "IPv4";
    fn of_pod(pod: &PodEndpoint) -> &[Self] {
        &pod.ipv4
    }
    fn of_ip(ip: std::net::IpAddr) -> Option<Self> {
        match ip {
            std::net::IpAddr::V4(a) => Some(a),
            std::net::IpAddr::V6(_) => None,
        }
    }
}

impl Family for Ipv6Addr {
    const SLICE_ADDRESS_TYPE: &'static str = "IPv6";
    fn of_pod(pod: &PodEndpoint) -> &[Self] {
        &pod.ipv6
    }
    fn of_ip(ip: std::net::IpAddr) -> Option<Self> {
        match ip {
            std::net::IpAddr::V6(a) => Some(a),
            std::net::IpAddr::V4(_) => None,
        }
    }
}

/// One Service's ClusterIP frontends, per family (a dual-stack Service has
/// both; `clusterIPs` order does not matter).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceFrontends {
    pub v4: Vec<(Frontend, LbService)>,
    pub v6: Vec<(Frontend6, LbService6)>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Compiled {
    pub desired: LbDesired,
    /// Things the operator should know (skipped services, unresolvable ports).
    pub warnings: Vec<String>,
}

/// Agent-wide inputs of the service compile (fixed for the agent's life).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceOptions {
    /// This node's name (`internalTrafficPolicy: Local` endpoint placement).
    pub node_name: Option<String>,
    /// `--lb-algorithm`: the default for Services without the annotation.
    pub lb_algorithm: LbAlgorithm,
    /// NodePort / externalIP / LoadBalancer frontends (see `external`).
    pub north_south: super::external::NorthSouth,
}

pub fn compile_services(state: &ClusterState, pods: &[PodEndpoint]) -> Compiled {
    compile_services_with(state, pods, &ServiceOptions::default(), &[])
}

/// [`compile_services`] with the agent's options and the endpoints
/// registered with it (which decide what is local to this node).
pub fn compile_services_with(
    state: &ClusterState,
    pods: &[PodEndpoint],
    options: &ServiceOptions,
    registered: &[catena_api::Endpoint],
) -> Compiled {
    let locality = NodeLocality::new(options.node_name.clone(), registered);
    let mut out = Compiled::default();
    let slices_by_service = slices_by_service(state);
    for (key, svc) in &state.services {
        let slices: Option<Vec<&SliceInfo>> = slices_by_service
            .get(key)
            .map(|v| v.iter().map(|s| s.as_ref()).collect());
        let (frontends, mut warnings) =
            compile_service(key, svc, slices.as_deref(), pods, &locality);
        let mut entries = frontends.v4;
        let mut entries6 = frontends.v6;
        let external = super::external::external_frontends(
            key,
            svc,
            slices.as_deref(),
            pods,
            &locality,
            &options.north_south,
            &mut warnings,
        );
        entries.extend(external.v4);
        entries6.extend(external.v6);
        if service_algorithm(key, svc, options.lb_algorithm, &mut warnings) == LbAlgorithm::Maglev {
            out.desired.maglev.extend(entries.iter().map(|(f, _)| *f));
            out.desired.maglev6.extend(entries6.iter().map(|(f, _)| *f));
        }
        out.desired.services.extend(entries);
        out.desired.services6.extend(entries6);
        out.warnings.extend(warnings);
    }
    out
}

/// One Service's ClusterIP frontends, IPv4 and IPv6. Backends come from its
/// EndpointSlices of the frontend's family when it has any slices (`slices`
/// is `Some`), else from the pods its selector picks (their addresses of
/// that family); with `internalTrafficPolicy: Local` only those on this
/// node (`locality`).
pub fn compile_service(
    key: &ObjectKey,
    svc: &Service,
    slices: Option<&[&SliceInfo]>,
    pods: &[PodEndpoint],
    locality: &NodeLocality,
) -> (ServiceFrontends, Vec<String>) {
    let mut out = ServiceFrontends::default();
    let mut warnings = Vec::new();
    let Some(spec) = &svc.spec else {
        return (out, warnings);
    };
    if spec.type_.as_deref() == Some("ExternalName") {
        return (out, warnings);
    }
    let (ipv4, ipv6) = cluster_ips(svc);
    if ipv4.is_empty() && ipv6.is_empty() {
        return (out, warnings); // headless: nothing to translate
    }
    let selector = spec.selector.clone().unwrap_or_default();
    let affinity_timeout = session_affinity(key, spec, &mut warnings);
    // ClusterIP frontends carry only in-cluster traffic, so the internal
    // policy alone decides their endpoints.
    let local_only = internal_local(spec).then_some(locality);
    for port in spec.ports.as_deref().unwrap_or_default() {
        let Some(proto) = parse_proto(port.protocol.as_deref()) else {
            warnings.push(format!(
                "service {key}: port {} has unknown protocol {:?}",
                port.port, port.protocol
            ));
            continue;
        };
        let Ok(svc_port) = u16::try_from(port.port) else {
            warnings.push(format!("service {key}: port {} out of range", port.port));
            continue;
        };
        let inputs = PortInputs {
            key,
            selector: &selector,
            slices,
            pods,
            local_only,
            port,
            proto,
            svc_port,
            affinity_timeout,
        };
        out.v4.extend(inputs.frontends(&ipv4, &mut warnings));
        out.v6.extend(inputs.frontends(&ipv6, &mut warnings));
    }
    (out, warnings)
}

/// What picks one Service port's backends, whatever the family.
struct PortInputs<'a> {
    key: &'a ObjectKey,
    selector: &'a BTreeMap<String, String>,
    slices: Option<&'a [&'a SliceInfo]>,
    pods: &'a [PodEndpoint],
    local_only: Option<&'a NodeLocality>,
    port: &'a ServicePort,
    proto: Proto,
    /// `port.port`, checked to fit.
    svc_port: u16,
    affinity_timeout: Option<u32>,
}

impl PortInputs<'_> {
    /// The port's frontend on each ClusterIP of family `A`, with the port's
    /// backends of that family (computed once, only if the Service has such
    /// a ClusterIP).
    fn frontends<A: Family>(
        &self,
        cluster_ips: &[A],
        warnings: &mut Vec<String>,
    ) -> Vec<(Frontend<A>, LbService<A>)> {
        if cluster_ips.is_empty() {
            return Vec::new();
        }
        let backends = match self.slices {
            Some(slices) => backends_from_slices(slices, self.port, self.proto, self.local_only),
            None if !self.selector.is_empty() => backends_from_pods(
                &self.key.namespace,
                self.selector,
                self.port,
                self.pods,
                self.local_only,
                warnings,
            ),
            None => Vec::new(),
        };
        let name = self.key.to_string();
        cluster_ips
            .iter()
            .map(|address| {
                let fe = Frontend {
                    address: *address,
                    port: self.svc_port,
                    proto: self.proto,
                };
                let svc = LbService {
                    name: name.clone(),
                    backends: backends.clone(),
                    affinity_timeout: self.affinity_timeout,
                    external_backends: None,
                };
                (fe, svc)
            })
            .collect()
    }
}

/// [`compile_services`], incrementally. Successive cluster snapshots share
/// unchanged objects (`Arc`s), so diffing the previous snapshot's maps against
/// the new ones in lockstep finds what changed by pointer comparison alone;
/// only the Services touched by a change are recompiled and their frontends
/// replaced in the desired state, which is kept rather than rebuilt. A single
/// EndpointSlice edit at 10k Services costs one Service's compile.
///
/// The previous maps are kept alive (not just their addresses) so pointer
/// equality is sound: a freed object's address cannot be reused while held.
#[derive(Default)]
pub struct ServiceCompiler {
    options: ServiceOptions,
    /// Every Service must be recompiled on the next update (an input all of
    /// them share changed: the node's external addresses).
    all_dirty: bool,
    /// The snapshot the current result was computed from.
    prev: Arc<ClusterState>,
    registered: Vec<catena_api::Endpoint>,
    /// Service -> its slices (slice keys, sorted: a set, but without a
    /// B-tree node per Service for the usual one or two slices).
    index: HashMap<ObjectKey, Vec<ObjectKey>>,
    /// Service -> the frontends it contributes to `desired`.
    frontends: HashMap<ObjectKey, Vec<Frontend>>,
    /// Service -> its IPv6 frontends in `desired.services6`.
    frontends6: HashMap<ObjectKey, Vec<Frontend6>>,
    /// Service -> its compile warnings.
    warnings: HashMap<ObjectKey, Vec<String>>,
    desired: LbDesired,
    primed: bool,
}

/// What one incremental compile did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceChanges {
    /// Services recompiled.
    pub recompiled: usize,
    /// Whether `desired` changed.
    pub changed: bool,
    /// Warnings of the recompiled Services.
    pub warnings: Vec<String>,
    /// IPv4 frontends whose entry in `desired` was added, changed or
    /// removed: all the service maps need to look at
    /// (`apply_services_changed`, which finds changed IPv6 frontends by
    /// itself).
    pub frontends: BTreeSet<Frontend>,
}

impl ServiceCompiler {
    pub fn new(options: ServiceOptions) -> ServiceCompiler {
        ServiceCompiler {
            options,
            ..Default::default()
        }
    }

    /// New external-device addresses (or north-south switched): every
    /// Service is recompiled on the next `update` if they differ.
    pub fn set_north_south(&mut self, ns: super::external::NorthSouth) {
        if self.options.north_south != ns {
            self.options.north_south = ns;
            self.all_dirty = true;
        }
    }

    pub fn north_south(&self) -> &super::external::NorthSouth {
        &self.options.north_south
    }

    /// The desired service-map contents after the last `update`.
    pub fn desired(&self) -> &LbDesired {
        &self.desired
    }

    /// Brings `desired` in line with `state` and the registered endpoints.
    pub fn update(
        &mut self,
        state: &Arc<ClusterState>,
        registered: &[catena_api::Endpoint],
    ) -> ServiceChanges {
        let prev = std::mem::replace(&mut self.prev, state.clone());
        let mut dirty: BTreeSet<ObjectKey> = BTreeSet::new();
        if std::mem::take(&mut self.all_dirty) {
            dirty.extend(state.services.keys().cloned());
        }
        for (key, _, _) in diff_arcs(&prev.services, &state.services) {
            dirty.insert(key.clone());
        }
        for (key, old, new) in diff_arcs(&prev.endpoint_slices, &state.endpoint_slices) {
            for (slice, add) in [(old, false), (new, true)] {
                let Some(owner) = slice.and_then(|s| slice_owner(key, s)) else {
                    continue;
                };
                let entry = self.index.entry(owner.clone()).or_default();
                match (entry.binary_search(key), add) {
                    (Err(at), true) => entry.insert(at, key.clone()),
                    (Ok(at), false) => {
                        entry.remove(at);
                    }
                    _ => {}
                }
                dirty.insert(owner);
            }
        }
        self.index.retain(|_, v| !v.is_empty());
        let pods_changed = !self.primed
            || !crate::sources::same_arcs(&prev.pods, &state.pods)
            || self.registered.as_slice() != registered;
        if pods_changed {
            // Selector-based Services (no slices) follow the pods; Services
            // with internalTrafficPolicy: Local follow what is local.
            for (key, svc) in &state.services {
                let local = svc.spec.as_ref().is_some_and(|spec| {
                    internal_local(spec)
                        || (self.options.north_south.enabled
                            && super::external::external_local(spec))
                });
                if local || !self.index.contains_key(key) {
                    dirty.insert(key.clone());
                }
            }
        }
        if pods_changed {
            self.registered = registered.to_vec();
        }
        self.primed = true;

        let mut changes = ServiceChanges::default();
        let mut pods: Option<Vec<PodEndpoint>> = None;
        let mut locality: Option<NodeLocality> = None;
        for key in dirty {
            let mut maglev = false;
            let (entries, entries6, warnings) = match state.services.get(&key) {
                Some(svc) => {
                    let slices: Option<Vec<&SliceInfo>> = self.index.get(&key).map(|keys| {
                        keys.iter()
                            .filter_map(|k| state.endpoint_slices.get(k).map(|s| s.as_ref()))
                            .collect()
                    });
                    let needs_pods = slices.is_none();
                    let pods: &[PodEndpoint] = if needs_pods {
                        pods.get_or_insert_with(|| pod_endpoints(state, registered))
                    } else {
                        &[]
                    };
                    let locality = locality.get_or_insert_with(|| {
                        NodeLocality::new(self.options.node_name.clone(), registered)
                    });
                    let (frontends, mut warnings) =
                        compile_service(&key, svc, slices.as_deref(), pods, locality);
                    let mut entries = frontends.v4;
                    let mut entries6 = frontends.v6;
                    let external = super::external::external_frontends(
                        &key,
                        svc,
                        slices.as_deref(),
                        pods,
                        locality,
                        &self.options.north_south,
                        &mut warnings,
                    );
                    entries.extend(external.v4);
                    entries6.extend(external.v6);
                    maglev = service_algorithm(&key, svc, self.options.lb_algorithm, &mut warnings)
                        == LbAlgorithm::Maglev;
                    (entries, entries6, warnings)
                }
                None => (Vec::new(), Vec::new(), Vec::new()),
            };
            changes.recompiled += 1;
            let (old, differs) = replace_frontends(
                &mut self.frontends,
                &mut self.desired.services,
                &key,
                entries,
            );
            let mut was_maglev = false;
            for f in &old {
                was_maglev |= self.desired.maglev.remove(f);
            }
            let new: &[Frontend] = self.frontends.get(&key).map_or(&[], Vec::as_slice);
            if differs || (was_maglev != maglev && !new.is_empty()) {
                changes.changed = true;
                changes.frontends.extend(old.iter().copied());
                changes.frontends.extend(new.iter().copied());
            }
            if maglev {
                self.desired.maglev.extend(new.iter().copied());
            }
            // IPv6 frontends: replaced the same way, Maglev included. The
            // datapath finds the changed ones itself (and rechecks every
            // IPv6 Maglev table), so only `changed` needs to say so.
            let (old6, differs6) = replace_frontends(
                &mut self.frontends6,
                &mut self.desired.services6,
                &key,
                entries6,
            );
            let mut was_maglev6 = false;
            for f in &old6 {
                was_maglev6 |= self.desired.maglev6.remove(f);
            }
            let new6: &[Frontend6] = self.frontends6.get(&key).map_or(&[], Vec::as_slice);
            changes.changed |= differs6 || (was_maglev6 != maglev && !new6.is_empty());
            if maglev {
                self.desired.maglev6.extend(new6.iter().copied());
            }
            if warnings.is_empty() {
                self.warnings.remove(&key);
            } else {
                changes.warnings.extend(warnings.iter().cloned());
                self.warnings.insert(key, warnings);
            }
        }
        changes
    }
}

/// Replaces Service `key`'s frontends of one family in `services` (listed
/// in `owned`) by `entries`. Returns its previous frontends and whether
/// anything differs.
fn replace_frontends<A: Copy + Ord>(
    owned: &mut HashMap<ObjectKey, Vec<Frontend<A>>>,
    services: &mut BTreeMap<Frontend<A>, LbService<A>>,
    key: &ObjectKey,
    entries: Vec<(Frontend<A>, LbService<A>)>,
) -> (Vec<Frontend<A>>, bool)
where
    LbService<A>: PartialEq,
{
    let old = owned.remove(key).unwrap_or_default();
    let before: Vec<(Frontend<A>, LbService<A>)> = old
        .iter()
        .filter_map(|f| services.remove(f).map(|s| (*f, s)))
        .collect();
    let differs = before != entries;
    if !entries.is_empty() {
        owned.insert(key.clone(), entries.iter().map(|(f, _)| *f).collect());
    }
    services.extend(entries);
    (old, differs)
}

/// The Service an EndpointSlice belongs to (`kubernetes.io/service-name`).
fn slice_owner(key: &ObjectKey, slice: &SliceInfo) -> Option<ObjectKey> {
    let service = slice.service_name.as_deref()?;
    Some(ObjectKey::new(key.namespace.clone(), service))
}

/// One difference between two maps: (key, old value, new value).
type ArcDiff<'a, K, V> = (&'a K, Option<&'a Arc<V>>, Option<&'a Arc<V>>);

/// Entries that differ between two maps of shared objects, found by walking
/// both sorted maps in lockstep and comparing pointers.
fn diff_arcs<'a, K: Ord, V>(
    old: &'a BTreeMap<K, Arc<V>>,
    new: &'a BTreeMap<K, Arc<V>>,
) -> Vec<ArcDiff<'a, K, V>> {
    use std::cmp::Ordering;
    let mut out = Vec::new();
    let (mut a, mut b) = (old.iter().peekable(), new.iter().peekable());
    loop {
        match (a.peek(), b.peek()) {
            (None, None) => return out,
            (Some((ka, va)), None) => {
                out.push((*ka, Some(*va), None));
                a.next();
            }
            (None, Some((kb, vb))) => {
                out.push((*kb, None, Some(*vb)));
                b.next();
            }
            (Some((ka, va)), Some((kb, vb))) => match ka.cmp(kb) {
                Ordering::Less => {
                    out.push((*ka, Some(*va), None));
                    a.next();
                }
                Ordering::Greater => {
                    out.push((*kb, None, Some(*vb)));
                    b.next();
                }
                Ordering::Equal => {
                    if !Arc::ptr_eq(va, vb) {
                        out.push((*ka, Some(*va), Some(*vb)));
                    }
                    a.next();
                    b.next();
                }
            },
        }
    }
}

/// Kubernetes' default `sessionAffinityConfig.clientIP.timeoutSeconds` (3 h).
const DEFAULT_AFFINITY_TIMEOUT: u32 = 10_800;
/// The API server's upper bound for `timeoutSeconds` (one day).
const MAX_AFFINITY_TIMEOUT: i32 = 86_400;

/// `spec.sessionAffinity: ClientIP` -> the timeout in seconds; `None` for
/// `None` (the default) and anything else. An out-of-range timeout (the API
/// server allows 1..=86400) falls back to the default with a warning.
pub(super) fn session_affinity(
    key: &ObjectKey,
    spec: &k8s_openapi::api::core::v1::ServiceSpec,
    warnings: &mut Vec<String>,
) -> Option<u32> {
    if spec.session_affinity.as_deref() != Some("ClientIP") {
        return None;
    }
    let configured = spec
        .session_affinity_config
        .as_ref()
        .and_then(|c| c.client_ip.as_ref())
        .and_then(|c| c.timeout_seconds);
    match configured {
        None => Some(DEFAULT_AFFINITY_TIMEOUT),
        Some(t) if (1..=MAX_AFFINITY_TIMEOUT).contains(&t) => Some(t as u32),
        Some(t) => {
            warnings.push(format!(
                "service {key}: sessionAffinityConfig.clientIP.timeoutSeconds {t} is out of \
                 range 1..={MAX_AFFINITY_TIMEOUT}; using {DEFAULT_AFFINITY_TIMEOUT}"
            ));
            Some(DEFAULT_AFFINITY_TIMEOUT)
        }
    }
}

pub(super) fn parse_proto(p: Option<&str>) -> Option<Proto> {
    match p.unwrap_or("TCP") {
        "TCP" => Some(Proto::Tcp),
        "UDP" => Some(Proto::Udp),
        "SCTP" => Some(Proto::Sctp),
        _ => None,
    }
}

/// The Service's ClusterIPs by family (`clusterIPs`, else `clusterIP`);
/// `None` and unparseable entries are skipped.
fn cluster_ips(svc: &Service) -> (Vec<Ipv4Addr>, Vec<Ipv6Addr>) {
    let Some(spec) = &svc.spec else {
        return (vec![], vec![]);
    };
    let mut ips: Vec<&String> = spec.cluster_ips.iter().flatten().collect();
    if ips.is_empty() {
        ips.extend(spec.cluster_ip.iter());
    }
    let (mut v4, mut v6) = (Vec::new(), Vec::new());
    for ip in ips {
        match ip.parse::<std::net::IpAddr>() {
            Ok(std::net::IpAddr::V4(a)) if !v4.contains(&a) => v4.push(a),
            Ok(std::net::IpAddr::V6(a)) if !v6.contains(&a) => v6.push(a),
            _ => {}
        }
    }
    (v4, v6)
}

fn slices_by_service(state: &ClusterState) -> BTreeMap<ObjectKey, Vec<&Arc<SliceInfo>>> {
    let mut map: BTreeMap<ObjectKey, Vec<&Arc<SliceInfo>>> = BTreeMap::new();
    for (key, slice) in &state.endpoint_slices {
        if let Some(owner) = slice_owner(key, slice) {
            map.entry(owner).or_default().push(slice);
        }
    }
    map
}

/// Ready endpoints of the slices, on the slice port matching the Service port by
/// name and protocol. Terminating endpoints serve only when nothing is ready.
/// With `local_only`, endpoints elsewhere are not considered at all (so local
/// terminating endpoints serve when no local one is ready, as kube-proxy does).
pub(super) fn backends_from_slices<A: Family>(
    slices: &[&SliceInfo],
    port: &ServicePort,
    proto: Proto,
    local_only: Option<&NodeLocality>,
) -> Vec<BackendAddr<A>> {
    let mut ready = BTreeSet::new();
    let mut serving_terminating = BTreeSet::new();
    for slice in slices {
        if &*slice.address_type != A::SLICE_ADDRESS_TYPE {
            continue;
        }
        let want_name = port.name.as_deref().unwrap_or("");
        let slice_port = slice.ports.iter().find(|p| {
            p.name.as_deref().unwrap_or("") == want_name
                && parse_proto(p.protocol.as_deref()) == Some(proto)
        });
        let Some(target) = slice_port
            .and_then(|p| p.port)
            .and_then(|p| u16::try_from(p).ok())
        else {
            continue;
        };
        for ep in slice.endpoints.iter() {
            if local_only.is_some_and(|l| !l.slice_endpoint(ep)) {
                continue;
            }
            // Per the EndpointSlice API, an unset `ready` means ready.
            let is_ready = ep.ready.unwrap_or(true);
            let serving = ep.serving.unwrap_or(is_ready);
            let terminating = ep.terminating.unwrap_or(false);
            for addr in ep.addresses() {
                let Some(address) = A::of_ip(addr) else {
                    continue;
                };
                let b = BackendAddr {
                    address,
                    port: target,
                };
                if is_ready && !terminating {
                    ready.insert(b);
                } else if serving && terminating {
                    serving_terminating.insert(b);
                }
            }
        }
    }
    if ready.is_empty() {
        serving_terminating.into_iter().collect()
    } else {
        ready.into_iter().collect()
    }
}

pub(super) fn backends_from_pods<A: Family>(
    namespace: &str,
    selector: &BTreeMap<String, String>,
    port: &ServicePort,
    pods: &[PodEndpoint],
    local_only: Option<&NodeLocality>,
    warnings: &mut Vec<String>,
) -> Vec<BackendAddr<A>> {
    let mut out = BTreeSet::new();
    for pod in pods {
        if pod.key.namespace != namespace || !service_selects(selector, &pod.labels) {
            continue;
        }
        if local_only.is_some_and(|l| !l.pod(pod)) {
            continue;
        }
        if pod.pod.as_deref().is_some_and(pod_is_gone) {
            continue;
        }
        let Some(target) = target_port(port, pod.pod.as_deref()) else {
            warnings.push(format!(
                "pod {}: no container port named {:?}",
                pod.key, port.target_port
            ));
            continue;
        };
        for address in A::of_pod(pod) {
            out.insert(BackendAddr {
                address: *address,
                port: target,
            });
        }
    }
    out.into_iter().collect()
}

fn pod_is_gone(pod: &PodInfo) -> bool {
    pod.deleting || pod.finished()
}

fn target_port(port: &ServicePort, pod: Option<&PodInfo>) -> Option<u16> {
    match &port.target_port {
        None => u16::try_from(port.port).ok(),
        Some(IntOrString::Int(p)) => u16::try_from(*p).ok(),
        Some(IntOrString::String(name)) => {
            if let Ok(p) = name.parse::<u16>() {
                return Some(p);
            }
            // Containers' ports only: init containers do not serve.
            pod?.named_ports
                .iter()
                .find(|p| !p.init && *p.name == **name)
                .and_then(|p| u16::try_from(p.container_port).ok())
        }
    }
}

/// The pods the endpoints controller knows: Pod manifests with an IP, and
/// registered endpoints (labels from the registration, merged with the Pod
/// manifest of the same namespace/name when there is one).
pub fn pod_endpoints(
    state: &ClusterState,
    registered: &[catena_api::Endpoint],
) -> Vec<PodEndpoint> {
    let mut by_key: BTreeMap<ObjectKey, PodEndpoint> = BTreeMap::new();
    for (key, pod) in &state.pods {
        let ips: BTreeSet<std::net::IpAddr> = pod.ips.iter().copied().collect();
        let (ipv4, ipv6) = split_families(ips);
        by_key.insert(
            key.clone(),
            PodEndpoint {
                key: key.clone(),
                ipv4,
                ipv6,
                labels: pod.labels.clone(),
                pod: Some(pod.clone()),
            },
        );
    }
    for ep in registered {
        let namespace = if ep.spec.pod.namespace.is_empty() {
            "default"
        } else {
            &ep.spec.pod.namespace
        };
        let name = if ep.spec.pod.name.is_empty() {
            &ep.spec.container_id
        } else {
            &ep.spec.pod.name
        };
        let key = ObjectKey::new(namespace, name);
        let ips = ep
            .spec
            .ips
            .iter()
            .filter_map(|cidr| cidr.split('/').next()?.parse::<std::net::IpAddr>().ok());
        let entry = by_key.entry(key.clone()).or_insert_with(|| PodEndpoint {
            key,
            ipv4: vec![],
            ipv6: vec![],
            labels: BTreeMap::new(),
            pod: None,
        });
        entry.labels.extend(ep.spec.labels.clone());
        for ip in ips {
            match ip {
                std::net::IpAddr::V4(a) if !entry.ipv4.contains(&a) => entry.ipv4.push(a),
                std::net::IpAddr::V6(a) if !entry.ipv6.contains(&a) => entry.ipv6.push(a),
                _ => {}
            }
        }
    }
    by_key.into_values().collect()
}

/// Sorted addresses split by family.
fn split_families(ips: BTreeSet<std::net::IpAddr>) -> (Vec<Ipv4Addr>, Vec<Ipv6Addr>) {
    let (mut v4, mut v6) = (Vec::new(), Vec::new());
    for ip in ips {
        match ip {
            std::net::IpAddr::V4(a) => v4.push(a),
            std::net::IpAddr::V6(a) => v6.push(a),
        }
    }
    (v4, v6)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sources::manifests::parse;
    use std::path::Path;

    fn state(yaml: &str) -> ClusterState {
        let mut s = ClusterState::default();
        for o in parse(Path::new("t.yaml"), yaml).unwrap().objects {
            s.insert(o);
        }
        s
    }

    fn fe(ip: &str, port: u16, proto: Proto) -> Frontend {
        Frontend {
            address: ip.parse().unwrap(),
            port,
            proto,
        }
    }

    fn be(ip: &str, port: u16) -> BackendAddr {
        BackendAddr {
            address: ip.parse().unwrap(),
            port,
        }
    }

    const SVC: &str = r#"apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: http}
  - {name: dns, port: 53, protocol: UDP, targetPort: 5353}
"#;

    #[test]
    fn endpoint_slices_by_port_name_with_ready_and_terminating() {
        let s = state(&format!(
            r#"{SVC}---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: web-1, namespace: shop, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
ports: [{{name: http, port: 8080, protocol: TCP}}, {{name: dns, port: 5353, protocol: UDP}}]
endpoints:
- addresses: [10.0.0.2]
- addresses: [10.0.0.1]
  conditions: {{ready: true}}
- addresses: [10.0.0.3]
  conditions: {{ready: false, serving: true, terminating: true}}
- addresses: [10.0.0.4]
  conditions: {{ready: false}}
"#
        ));
        let c = compile_services(&s, &[]);
        let http = &c.desired.services[&fe("10.96.0.10", 80, Proto::Tcp)];
        assert_eq!(http.name, "shop/web");
        assert_eq!(
            http.backends,
            vec![be("10.0.0.1", 8080), be("10.0.0.2", 8080)]
        );
        let dns = &c.desired.services[&fe("10.96.0.10", 53, Proto::Udp)];
        assert_eq!(
            dns.backends,
            vec![be("10.0.0.1", 5353), be("10.0.0.2", 5353)]
        );
    }

    #[test]
    fn terminating_endpoints_only_when_nothing_is_ready() {
        let s = state(&format!(
            r#"{SVC}---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: web-1, namespace: shop, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
ports: [{{name: http, port: 8080}}]
endpoints:
- addresses: [10.0.0.3]
  conditions: {{ready: false, serving: true, terminating: true}}
"#
        ));
        let c = compile_services(&s, &[]);
        assert_eq!(
            c.desired.services[&fe("10.96.0.10", 80, Proto::Tcp)].backends,
            vec![be("10.0.0.3", 8080)]
        );
        // The UDP port has no matching slice port: present, no backends (rejects).
        assert!(c.desired.services[&fe("10.96.0.10", 53, Proto::Udp)]
            .backends
            .is_empty());
    }

    #[test]
    fn selector_over_pod_manifests_and_registered_endpoints() {
        let s = state(&format!(
            r#"{SVC}---
apiVersion: v1
kind: Pod
metadata: {{name: web-a, namespace: shop, labels: {{app: web}}}}
spec:
  containers: [{{name: c, ports: [{{name: http, containerPort: 8080}}]}}]
status: {{podIP: 10.0.0.7}}
---
apiVersion: v1
kind: Pod
metadata: {{name: web-b, namespace: shop, labels: {{app: web}}}}
spec:
  containers: [{{name: c, ports: [{{name: http, containerPort: 9090}}]}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: db, namespace: shop, labels: {{app: db}}}}
spec: {{containers: [{{name: c}}]}}
status: {{podIP: 10.0.0.9}}
---
apiVersion: v1
kind: Pod
metadata: {{name: web-x, namespace: other, labels: {{app: web}}}}
spec: {{containers: [{{name: c}}]}}
status: {{podIP: 10.0.0.10}}
"#
        ));
        // web-b has no IP in its manifest; the CNI plugin registered it.
        let registered = catena_api::Endpoint {
            id: 1,
            spec: catena_api::EndpointSpec {
                container_id: "c1".into(),
                ifname: "eth0".into(),
                ips: vec!["10.0.0.8/24".into()],
                pod: catena_api::PodRef {
                    namespace: "shop".into(),
                    name: "web-b".into(),
                    uid: String::new(),
                },
                ..Default::default()
            },
            identity: 256,
            attach_mode: "tcx".into(),
            created: String::new(),
        };
        let pods = pod_endpoints(&s, &[registered]);
        let c = compile_services(&s, &pods);
        assert_eq!(
            c.desired.services[&fe("10.96.0.10", 80, Proto::Tcp)].backends,
            vec![be("10.0.0.7", 8080), be("10.0.0.8", 9090)]
        );
        assert_eq!(
            c.desired.services[&fe("10.96.0.10", 53, Proto::Udp)].backends,
            vec![be("10.0.0.7", 5353), be("10.0.0.8", 5353)]
        );
    }

    #[test]
    fn skips_headless_external_and_bad_protocols() {
        let s = state(
            r#"apiVersion: v1
kind: Service
metadata: {name: headless}
spec: {clusterIP: None, selector: {a: b}, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: ext}
spec: {type: ExternalName, externalName: example.org}
---
apiVersion: v1
kind: Service
metadata: {name: odd}
spec: {clusterIP: 10.96.0.3, ports: [{port: 80, protocol: ICMP}]}
"#,
        );
        let c = compile_services(&s, &[]);
        assert!(c.desired.services.is_empty());
        assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
    }

    #[test]
    fn session_affinity_client_ip_with_and_without_timeout() {
        let s = state(
            r#"apiVersion: v1
kind: Service
metadata: {name: sticky, namespace: shop}
spec:
  clusterIP: 10.96.0.20
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 30}}
  ports: [{port: 80}, {port: 53, protocol: UDP}]
---
apiVersion: v1
kind: Service
metadata: {name: default-timeout, namespace: shop}
spec: {clusterIP: 10.96.0.21, sessionAffinity: ClientIP, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: plain, namespace: shop}
spec: {clusterIP: 10.96.0.22, sessionAffinity: None, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: bad, namespace: shop}
spec:
  clusterIP: 10.96.0.23
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 0}}
  ports: [{port: 80}]
"#,
        );
        let c = compile_services(&s, &[]);
        let timeout =
            |ip: &str, port, proto| c.desired.services[&fe(ip, port, proto)].affinity_timeout;
        assert_eq!(timeout("10.96.0.20", 80, Proto::Tcp), Some(30));
        assert_eq!(timeout("10.96.0.20", 53, Proto::Udp), Some(30));
        assert_eq!(timeout("10.96.0.21", 80, Proto::Tcp), Some(10_800));
        assert_eq!(timeout("10.96.0.22", 80, Proto::Tcp), None);
        assert_eq!(timeout("10.96.0.23", 80, Proto::Tcp), Some(10_800));
        assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
        assert!(c.warnings[0].contains("shop/bad"), "{:?}", c.warnings);
    }

    fn registered(name: &str, ip: &str) -> catena_api::Endpoint {
        catena_api::Endpoint {
            id: 1,
            spec: catena_api::EndpointSpec {
                container_id: name.into(),
                ifname: "eth0".into(),
                ips: vec![format!("{ip}/24")],
                pod: catena_api::PodRef {
                    namespace: "shop".into(),
                    name: name.into(),
                    uid: String::new(),
                },
                ..Default::default()
            },
            identity: 256,
            attach_mode: "tcx".into(),
            created: String::new(),
        }
    }

    const LOCAL_SVC: &str = r#"apiVersion: v1
kind: Service
metadata: {name: local, namespace: shop}
spec:
  clusterIP: 10.96.0.30
  internalTrafficPolicy: Local
  ports: [{name: http, port: 80}]
"#;

    fn local_slice(endpoints: &str) -> String {
        format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: local-1, namespace: shop, labels: {{kubernetes.io/service-name: local}}}}\naddressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints:\n{endpoints}"
        )
    }

    fn options(node: &str) -> ServiceOptions {
        ServiceOptions {
            node_name: Some(node.into()),
            ..Default::default()
        }
    }

    #[test]
    fn internal_traffic_policy_local_keeps_only_this_nodes_endpoints() {
        let s = state(&format!(
            "{LOCAL_SVC}{}",
            local_slice(
                "- {addresses: [10.0.0.1], nodeName: n1}\n- {addresses: [10.0.0.2], nodeName: n2}\n- {addresses: [10.0.0.3]}\n"
            )
        ));
        let frontend = fe("10.96.0.30", 80, Proto::Tcp);
        // By node name: only n1's endpoint.
        let c = compile_services_with(&s, &[], &options("n1"), &[]);
        assert_eq!(
            c.desired.services[&frontend].backends,
            vec![be("10.0.0.1", 8080)]
        );
        // The endpoint without a node name is local when registered here.
        let c = compile_services_with(&s, &[], &options("n1"), &[registered("c", "10.0.0.3")]);
        assert_eq!(
            c.desired.services[&frontend].backends,
            vec![be("10.0.0.1", 8080), be("10.0.0.3", 8080)]
        );
        // Another node: none local, the frontend stays with no backends (it
        // refuses), it does not fall back to remote endpoints.
        let c = compile_services_with(&s, &[], &options("n3"), &[]);
        assert!(c.desired.services[&frontend].backends.is_empty());
        // Cluster policy (the default) keeps all three.
        let cluster = state(&format!(
            "{}{}",
            LOCAL_SVC.replace("  internalTrafficPolicy: Local\n", ""),
            local_slice("- {addresses: [10.0.0.1], nodeName: n1}\n- {addresses: [10.0.0.2], nodeName: n2}\n- {addresses: [10.0.0.3]}\n")
        ));
        let c = compile_services_with(&cluster, &[], &options("n3"), &[]);
        assert_eq!(c.desired.services[&frontend].backends.len(), 3);
    }

    #[test]
    fn internal_traffic_policy_local_prefers_local_terminating_over_remote_ready() {
        let s = state(&format!(
            "{LOCAL_SVC}{}",
            local_slice(
                "- {addresses: [10.0.0.1], nodeName: n1, conditions: {ready: false, serving: true, terminating: true}}\n- {addresses: [10.0.0.2], nodeName: n2}\n"
            )
        ));
        let c = compile_services_with(&s, &[], &options("n1"), &[]);
        assert_eq!(
            c.desired.services[&fe("10.96.0.30", 80, Proto::Tcp)].backends,
            vec![be("10.0.0.1", 8080)]
        );
    }

    #[test]
    fn internal_traffic_policy_local_over_selected_pods() {
        let s = state(
            r#"apiVersion: v1
kind: Service
metadata: {name: local, namespace: shop}
spec: {clusterIP: 10.96.0.31, internalTrafficPolicy: Local, selector: {app: l}, ports: [{port: 80}]}
---
apiVersion: v1
kind: Pod
metadata: {name: here, namespace: shop, labels: {app: l}}
spec: {nodeName: n1, containers: [{name: c}]}
status: {podIP: 10.0.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: there, namespace: shop, labels: {app: l}}
spec: {nodeName: n2, containers: [{name: c}]}
status: {podIP: 10.0.0.2}
"#,
        );
        let regs = [registered("plugin-only", "10.0.0.9")];
        let mut reg_labels = regs[0].clone();
        reg_labels.spec.labels = [("app".to_string(), "l".to_string())].into();
        let regs = [reg_labels];
        let pods = pod_endpoints(&s, &regs);
        let c = compile_services_with(&s, &pods, &options("n1"), &regs);
        assert_eq!(
            c.desired.services[&fe("10.96.0.31", 80, Proto::Tcp)].backends,
            vec![be("10.0.0.1", 80), be("10.0.0.9", 80)]
        );
    }

    #[test]
    fn incremental_compile_follows_registrations_and_the_lb_algorithm() {
        let text = format!(
            "{LOCAL_SVC}{}---\napiVersion: v1\nkind: Service\nmetadata: {{name: hashed, namespace: shop, annotations: {{service.cilium.io/lb-algorithm: maglev}}}}\nspec: {{clusterIP: 10.96.0.32, ports: [{{port: 53, protocol: UDP}}, {{port: 80}}]}}\n",
            local_slice("- {addresses: [10.0.0.3]}\n")
        );
        let s = Arc::new(state(&text));
        let mut compiler = ServiceCompiler::new(options("n1"));
        compiler.update(&s, &[]);
        let frontend = fe("10.96.0.30", 80, Proto::Tcp);
        assert!(compiler.desired().services[&frontend].backends.is_empty());
        // Registering the endpoint's pod here makes it local: recompiled
        // although no Kubernetes object changed.
        let regs = [registered("c", "10.0.0.3")];
        let changes = compiler.update(&s, &regs);
        assert!(changes.changed);
        assert_eq!(
            compiler.desired().services[&frontend].backends,
            vec![be("10.0.0.3", 8080)]
        );
        let reference = compile_services_with(&s, &pod_endpoints(&s, &regs), &options("n1"), &regs);
        assert_eq!(compiler.desired(), &reference.desired);
        // Both frontends of the annotated Service use Maglev, nothing else does.
        let maglev: Vec<Frontend> = compiler.desired().maglev.iter().copied().collect();
        assert_eq!(
            maglev,
            vec![
                fe("10.96.0.32", 53, Proto::Udp),
                fe("10.96.0.32", 80, Proto::Tcp)
            ]
        );
        // The agent default applies to Services without the annotation; an
        // annotation edit alone is a change.
        let mut all = ServiceCompiler::new(ServiceOptions {
            lb_algorithm: LbAlgorithm::Maglev,
            ..options("n1")
        });
        all.update(&s, &regs);
        assert_eq!(all.desired().maglev.len(), 3);
        let random = Arc::new(state(
            &text.replace("lb-algorithm: maglev", "lb-algorithm: random"),
        ));
        let changes = all.update(&random, &regs);
        assert!(changes.changed);
        assert_eq!(
            all.desired().maglev.iter().collect::<Vec<_>>(),
            vec![&frontend]
        );
    }

    #[test]
    fn incremental_compile_matches_the_reference_through_edits() {
        let base = format!(
            "{SVC}---\napiVersion: v1\nkind: Pod\nmetadata: {{name: web-a, namespace: shop, labels: {{app: web}}}}\nspec: {{containers: [{{name: c, ports: [{{name: http, containerPort: 8080}}]}}]}}\nstatus: {{podIP: 10.0.0.7}}\n"
        );
        let slice = |addrs: &[&str]| {
            let eps: String = addrs
                .iter()
                .map(|a| format!("- addresses: [{a}]\n"))
                .collect();
            format!("---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: web-1, namespace: shop, labels: {{kubernetes.io/service-name: web}}}}\naddressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints:\n{eps}")
        };
        let other = "---\napiVersion: v1\nkind: Service\nmetadata: {name: api, namespace: shop}\nspec: {clusterIP: 10.96.0.11, ports: [{port: 81}]}\n";
        // Each step is a whole new snapshot; objects whose text is unchanged
        // are carried over as the same Arcs, as the sources do.
        let steps = [
            base.clone(),
            format!("{base}{}", slice(&["10.0.0.1", "10.0.0.2"])),
            format!("{base}{}", slice(&["10.0.0.1"])),
            format!("{base}{}{other}", slice(&["10.0.0.1"])),
            format!("{base}{other}"),
            SVC.to_string(),
            String::new(),
        ];
        let mut compiler = ServiceCompiler::default();
        let mut prev = ClusterState::default();
        for (i, text) in steps.iter().enumerate() {
            let fresh = state(text);
            let mut next = ClusterState::default();
            for (k, v) in &fresh.services {
                let keep = prev.services.get(k).filter(|p| p == &v).cloned();
                next.services
                    .insert(k.clone(), keep.unwrap_or_else(|| v.clone()));
            }
            for (k, v) in &fresh.endpoint_slices {
                let keep = prev.endpoint_slices.get(k).filter(|p| p == &v).cloned();
                next.endpoint_slices
                    .insert(k.clone(), keep.unwrap_or_else(|| v.clone()));
            }
            for (k, v) in &fresh.pods {
                let keep = prev.pods.get(k).filter(|p| p == &v).cloned();
                next.pods
                    .insert(k.clone(), keep.unwrap_or_else(|| v.clone()));
            }
            let next = Arc::new(next);
            compiler.update(&next, &[]);
            let reference = compile_services(&next, &pod_endpoints(&next, &[])).desired;
            assert_eq!(compiler.desired(), &reference, "step {i}");
            prev = (*next).clone();
        }
        assert!(compiler.desired().services.is_empty());
    }

    fn fe6(ip: &str, port: u16, proto: Proto) -> Frontend6 {
        Frontend6 {
            address: ip.parse().unwrap(),
            port,
            proto,
        }
    }

    fn be6(ip: &str, port: u16) -> catena_datapath::BackendAddr6 {
        catena_datapath::BackendAddr6 {
            address: ip.parse().unwrap(),
            port,
        }
    }

    const DUAL_SVC: &str = r#"apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10, "fd00:96::10"]
  ipFamilies: [IPv4, IPv6]
  ipFamilyPolicy: RequireDualStack
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: 8080}
  - {name: dns, port: 53, protocol: UDP, targetPort: 5353}
"#;

    fn dual_slices(v6_addrs: &[&str]) -> String {
        let eps6: String = v6_addrs
            .iter()
            .map(|a| format!("- addresses: [\"{a}\"]\n"))
            .collect();
        format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: web-v4, namespace: shop, labels: {{kubernetes.io/service-name: web}}}}\naddressType: IPv4\nports: [{{name: http, port: 8080}}, {{name: dns, port: 5353, protocol: UDP}}]\nendpoints:\n- addresses: [10.0.0.1]\n- addresses: [10.0.0.2]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: web-v6, namespace: shop, labels: {{kubernetes.io/service-name: web}}}}\naddressType: IPv6\nports: [{{name: http, port: 8080}}, {{name: dns, port: 5353, protocol: UDP}}]\nendpoints:\n{eps6}"
        )
    }

    #[test]
    fn dual_stack_service_gets_a_frontend_per_family_with_that_familys_slices() {
        let s = state(&format!(
            "{DUAL_SVC}{}",
            dual_slices(&["fd00:10::1", "fd00:10::2"])
        ));
        let c = compile_services(&s, &[]);
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
        let http4 = &c.desired.services[&fe("10.96.0.10", 80, Proto::Tcp)];
        assert_eq!(
            http4.backends,
            vec![be("10.0.0.1", 8080), be("10.0.0.2", 8080)]
        );
        let http6 = &c.desired.services6[&fe6("fd00:96::10", 80, Proto::Tcp)];
        assert_eq!(http6.name, "shop/web");
        assert_eq!(
            http6.backends,
            vec![be6("fd00:10::1", 8080), be6("fd00:10::2", 8080)]
        );
        let dns6 = &c.desired.services6[&fe6("fd00:96::10", 53, Proto::Udp)];
        assert_eq!(dns6.backends.len(), 2);
        assert_eq!(dns6.backends[0].port, 5353);
        assert_eq!(c.desired.services.len(), 2);
        assert_eq!(c.desired.services6.len(), 2);
    }

    #[test]
    fn ipv6_only_service_and_ipv6_only_slices() {
        let svc = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec: {clusterIP: \"fd00:96::20\", clusterIPs: [\"fd00:96::20\"], ipFamilies: [IPv6], ports: [{name: http, port: 80, targetPort: 8080}]}\n";
        let slice = "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: web-v6, namespace: shop, labels: {kubernetes.io/service-name: web}}\naddressType: IPv6\nports: [{name: http, port: 8080}]\nendpoints:\n- addresses: [\"fd00:10::7\"]\n- addresses: [\"fd00:10::8\"]\n  conditions: {ready: false}\n";
        let c = compile_services(&state(&format!("{svc}{slice}")), &[]);
        assert!(c.desired.services.is_empty());
        assert_eq!(
            c.desired.services6[&fe6("fd00:96::20", 80, Proto::Tcp)].backends,
            vec![be6("fd00:10::7", 8080)],
            "only ready endpoints"
        );
        // Without any slice of its family a frontend has no endpoints
        // (and refuses), even if the other family has some.
        let v4_slice = "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: web-v4, namespace: shop, labels: {kubernetes.io/service-name: web}}\naddressType: IPv4\nports: [{name: http, port: 8080}]\nendpoints:\n- addresses: [10.0.0.1]\n";
        let c = compile_services(&state(&format!("{svc}{v4_slice}")), &[]);
        assert!(c.desired.services6[&fe6("fd00:96::20", 80, Proto::Tcp)]
            .backends
            .is_empty());
    }

    #[test]
    fn dual_stack_selector_uses_each_pods_address_of_the_family() {
        let pods = "---\napiVersion: v1\nkind: Pod\nmetadata: {name: web-a, namespace: shop, labels: {app: web}}\nstatus: {podIP: 10.0.0.7, podIPs: [{ip: 10.0.0.7}, {ip: \"fd00:10::7\"}]}\n";
        let s = state(&format!("{DUAL_SVC}{pods}"));
        let mut regs = vec![registered("web-b", "10.0.0.8")];
        regs[0].spec.ips.push("fd00:10::8/64".into());
        regs[0].spec.labels.insert("app".into(), "web".into());
        let c = compile_services_with(
            &s,
            &pod_endpoints(&s, &regs),
            &ServiceOptions::default(),
            &regs,
        );
        assert_eq!(
            c.desired.services6[&fe6("fd00:96::10", 80, Proto::Tcp)].backends,
            vec![be6("fd00:10::7", 8080), be6("fd00:10::8", 8080)]
        );
        assert_eq!(
            c.desired.services[&fe("10.96.0.10", 80, Proto::Tcp)].backends,
            vec![be("10.0.0.7", 8080), be("10.0.0.8", 8080)]
        );
    }

    #[test]
    fn internal_traffic_policy_local_with_ipv6_endpoints() {
        // No node names anywhere (standalone): the IPv6 address the plugin
        // registered here is what makes an endpoint local.
        let svc = DUAL_SVC.replace(
            "  ipFamilyPolicy: RequireDualStack\n",
            "  ipFamilyPolicy: RequireDualStack\n  internalTrafficPolicy: Local\n",
        );
        let s = state(&format!(
            "{svc}{}",
            dual_slices(&["fd00:10::1", "fd00:10::2"])
        ));
        let http6 = fe6("fd00:96::10", 80, Proto::Tcp);
        let mut here = registered("web-a", "10.0.0.1");
        here.spec.ips.push("fd00:10::2/64".into());
        let c = compile_services_with(&s, &[], &ServiceOptions::default(), &[here]);
        assert_eq!(
            c.desired.services6[&http6].backends,
            vec![be6("fd00:10::2", 8080)]
        );
        assert_eq!(
            c.desired.services[&fe("10.96.0.10", 80, Proto::Tcp)].backends,
            vec![be("10.0.0.1", 8080)]
        );
        // Nothing registered: no local endpoint of either family (refused).
        let c = compile_services_with(&s, &[], &ServiceOptions::default(), &[]);
        assert!(c.desired.services6[&http6].backends.is_empty());
        // Selected pods (no slices): an IPv6-only registered pod is local.
        let pods_only = state(&svc);
        let mut v6_only = registered("web-b", "10.0.0.8");
        v6_only.spec.ips = vec!["fd00:10::8/64".into()];
        v6_only.spec.labels.insert("app".into(), "web".into());
        let regs = [v6_only];
        let c = compile_services_with(
            &pods_only,
            &pod_endpoints(&pods_only, &regs),
            &ServiceOptions::default(),
            &regs,
        );
        assert_eq!(
            c.desired.services6[&http6].backends,
            vec![be6("fd00:10::8", 8080)]
        );
    }

    #[test]
    fn incremental_compile_follows_ipv6_slices() {
        let mut compiler = ServiceCompiler::default();
        let first = Arc::new(state(&format!(
            "{DUAL_SVC}{}",
            dual_slices(&["fd00:10::1"])
        )));
        let changes = compiler.update(&first, &[]);
        assert!(changes.changed);
        // Only the IPv6 slice changes: same Service and IPv4 slice objects.
        let edited = state(&dual_slices(&["fd00:10::1", "fd00:10::2"]));
        let mut next = (*first).clone();
        let v6_key = ObjectKey::new("shop", "web-v6");
        next.endpoint_slices
            .insert(v6_key.clone(), edited.endpoint_slices[&v6_key].clone());
        let next = Arc::new(next);
        let changes = compiler.update(&next, &[]);
        assert!(changes.changed, "an IPv6-only change is a change");
        assert!(
            changes.frontends.is_empty(),
            "no IPv4 frontend changed: {:?}",
            changes.frontends
        );
        assert_eq!(
            compiler.desired().services6[&fe6("fd00:96::10", 80, Proto::Tcp)]
                .backends
                .len(),
            2
        );
        let reference = compile_services(&next, &pod_endpoints(&next, &[])).desired;
        assert_eq!(compiler.desired(), &reference);
        // The Service goes away: both families' frontends go.
        let empty = Arc::new(ClusterState::default());
        assert!(compiler.update(&empty, &[]).changed);
        assert!(compiler.desired().services.is_empty());
        assert!(compiler.desired().services6.is_empty());
    }

    /// The lb-algorithm (annotation or agent default) applies to a Service's
    /// IPv6 frontends as to its IPv4 ones, in the reference compile and the
    /// incremental one alike, and an annotation edit alone is a change.
    #[test]
    fn maglev_covers_ipv6_frontends() {
        let annotated = |algorithm: &str| {
            Arc::new(state(&format!(
                "{}{}",
                DUAL_SVC.replace(
                    "metadata: {name: web, namespace: shop}",
                    &format!(
                        "metadata: {{name: web, namespace: shop, annotations: {{service.cilium.io/lb-algorithm: {algorithm}}}}}"
                    ),
                ),
                dual_slices(&["fd00:10::1", "fd00:10::2"])
            )))
        };
        let maglev = annotated("maglev");
        let reference = compile_services(&maglev, &[]).desired;
        assert_eq!(
            reference.maglev6.iter().copied().collect::<Vec<_>>(),
            vec![
                fe6("fd00:96::10", 53, Proto::Udp),
                fe6("fd00:96::10", 80, Proto::Tcp)
            ]
        );
        assert_eq!(reference.maglev.len(), 2, "the IPv4 frontends too");
        let mut compiler = ServiceCompiler::default();
        assert!(compiler.update(&maglev, &[]).changed);
        assert_eq!(compiler.desired(), &reference);

        // Back to random: only the annotation changed, and it is a change
        // for the IPv6 frontends as well.
        let random = annotated("random");
        assert!(compiler.update(&random, &[]).changed);
        assert!(compiler.desired().maglev6.is_empty());
        assert_eq!(compiler.desired(), &compile_services(&random, &[]).desired);

        // The agent default applies to a Service without the annotation.
        let plain = Arc::new(state(&format!(
            "{DUAL_SVC}{}",
            dual_slices(&["fd00:10::1"])
        )));
        let mut all = ServiceCompiler::new(ServiceOptions {
            lb_algorithm: LbAlgorithm::Maglev,
            ..Default::default()
        });
        all.update(&plain, &[]);
        assert_eq!(all.desired().maglev6.len(), 2);
        // The Service goes away: no Maglev frontend is left behind.
        all.update(&Arc::new(ClusterState::default()), &[]);
        assert!(all.desired().maglev6.is_empty());
        assert!(all.desired().maglev.is_empty());
    }
}
