//! Policies -> policy-map contents: a pure function of the cluster, the pods
//! the agent knows (with their identities) and the node's addresses.
//!
//! Model (Cilium's): every address maps to an identity through the ipcache
//! (longest prefix wins, a miss is WORLD); an endpoint selected by a policy in
//! a direction with default deny allows only what an allow entry matches and
//! no deny entry matches; deny always wins.

use crate::model::identity::RESERVED;
use crate::model::policy::{
    parse_cilium, parse_network_policy, Direction, Entity, Entry, IdentityLabels, Op, ParsedPolicy,
    Peer, PolicyState, PortSpec, Prefix, Selector, ServiceSelector, IP_ICMP,
};
use crate::sources::PodInfo;
use crate::sources::{ClusterState, ObjectKey};
use catena_common::identity as id;
use catena_datapath::policy::{EndpointPolicy, PolicyDesired, PolicyRule, PortRange};
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::rc::Rc;

/// A pod the compiler knows: where it is, who it is, what it exposes.
#[derive(Clone, Debug, PartialEq)]
pub struct PolicyPod {
    pub key: ObjectKey,
    /// IPv4 and IPv6 addresses.
    pub ips: Vec<IpAddr>,
    pub identity: u32,
    /// The identity's label set (see `model::identity::pod_identity_labels`).
    pub labels: BTreeMap<String, String>,
    /// (lower-cased name, protocol, port) of every named container port.
    pub named_ports: Vec<(String, u8, u16)>,
    /// Set when the pod is a registered endpoint on this node.
    pub endpoint_id: Option<u32>,
}

/// Where a compiled entry came from (carried as `rule_ref` in the maps).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RuleOrigin {
    /// Policy kind, or `catena` for entries the agent adds itself.
    pub kind: String,
    /// `namespace/name` (`name` for cluster-wide policies).
    pub policy: String,
    /// Path in the object (`spec.ingress[0]`), or what the entry is for.
    pub path: String,
    pub direction: Direction,
    pub deny: bool,
}

impl RuleOrigin {
    /// `CiliumNetworkPolicy shop/web spec.ingress[0] (allow)`.
    pub fn describe(&self) -> String {
        let verdict = if self.deny { "deny" } else { "allow" };
        format!("{} {} {} ({verdict})", self.kind, self.policy, self.path)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyReport {
    pub kind: String,
    pub name: String,
    pub state: PolicyState,
    pub messages: Vec<String>,
}

pub struct PolicyInput<'a> {
    pub cluster: &'a ClusterState,
    pub pods: &'a [PolicyPod],
    /// Addresses of this node (HOST), IPv4 and IPv6.
    pub host_addrs: &'a [IpAddr],
    /// Addresses of the other nodes (REMOTE_NODE).
    pub remote_node_addrs: &'a [IpAddr],
    /// Addresses of the API server (KUBE_APISERVER), see [`NodePeers`].
    pub apiserver_addrs: &'a [IpAddr],
    /// The previous compile's CIDR identities, kept stable while in use.
    pub prev_cidr_ids: &'a BTreeMap<Prefix, u32>,
    /// The previous compile's rule refs, kept stable while in use.
    pub prev_rule_refs: &'a BTreeMap<RuleOrigin, u32>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct PolicyOutput {
    pub desired: PolicyDesired,
    pub cidr_ids: BTreeMap<Prefix, u32>,
    pub rule_refs: BTreeMap<RuleOrigin, u32>,
    pub reports: Vec<PolicyReport>,
}

/// The addresses behind the `remote-node` and `kube-apiserver` entities.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodePeers {
    /// IPv4 and IPv6 addresses of every Node but this one.
    pub remote_nodes: Vec<IpAddr>,
    /// Endpoints of the `default/kubernetes` Service (Cilium's
    /// kube-apiserver entity). An address that is also a node's keeps the
    /// kube-apiserver identity; the `host`/`remote-node` entities include it
    /// then (see `entity_ids`).
    pub apiserver: Vec<IpAddr>,
}

impl NodePeers {
    pub fn of(cluster: &ClusterState, own_node: &str) -> NodePeers {
        let mut remote_nodes: Vec<IpAddr> = cluster
            .nodes
            .values()
            .filter(|n| n.name != own_node)
            .flat_map(|n| n.addresses.iter().copied())
            .collect();
        remote_nodes.sort_unstable();
        remote_nodes.dedup();
        let mut apiserver: Vec<IpAddr> = cluster
            .endpoint_slices
            .iter()
            .filter(|(k, s)| {
                k.namespace == "default" && s.service_name.as_deref() == Some("kubernetes")
            })
            .flat_map(|(_, s)| s.endpoints.iter().flat_map(|e| e.addresses()))
            .collect();
        apiserver.sort_unstable();
        apiserver.dedup();
        NodePeers {
            remote_nodes,
            apiserver,
        }
    }
}

/// Synthetic origins.
const ALLOW_LOCALHOST: &str = "allow-localhost";
const NO_DEFAULT_DENY: &str = "no-default-deny";

/// Every policy of the cluster, parsed, in a stable order.
pub fn parse_policies(cluster: &ClusterState) -> Vec<ParsedPolicy> {
    let mut out: Vec<ParsedPolicy> = cluster
        .cilium_policies
        .values()
        .map(|p| parse_cilium(&p.kind, &p.object))
        .collect();
    out.extend(
        cluster
            .network_policies
            .values()
            .map(|np| parse_network_policy(np)),
    );
    out
}

/// An identity set: everything, or these.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Peers {
    Any,
    Set(BTreeSet<u32>),
}

struct Universe<'a> {
    /// Pod and reserved identities with their labels.
    labelled: BTreeMap<u32, IdentityLabels>,
    pod_ids: BTreeSet<u32>,
    cidr_ids: &'a BTreeMap<Prefix, u32>,
    /// Single address -> identity for pods and nodes (how a Service backend
    /// address is resolved).
    addr_ids: BTreeMap<IpAddr, u32>,
    /// Peers already resolved in this compile, by the address of the rule
    /// entry's peer list (the parsed policies outlive the compile). A rule
    /// that selects many endpoints is resolved once, not once per endpoint:
    /// each resolution scans every identity (Cilium's SelectorCache idea).
    resolved: RefCell<HashMap<(usize, usize), Rc<Peers>>>,
    /// Identities each distinct label selector matches, computed once per
    /// compile: many policies repeat the same selectors (a team, a
    /// namespace), and each evaluation scans every identity.
    selected: RefCell<HashMap<Selector, Rc<Vec<u32>>>>,
    /// `(key, value)` -> identities carrying that label (reserved labels
    /// with value ""), so a selector with an `In` requirement only checks the
    /// identities that can match instead of all of them.
    by_label: HashMap<(String, String), Vec<u32>>,
    /// The API server runs on this node / on another node: its identity is
    /// then also part of the `host` / `remote-node` entity (Cilium gives such
    /// an address both labels).
    apiserver_on_host: bool,
    apiserver_on_remote_node: bool,
}

impl Universe<'_> {
    fn index(labelled: &BTreeMap<u32, IdentityLabels>) -> HashMap<(String, String), Vec<u32>> {
        let mut by_label: HashMap<(String, String), Vec<u32>> = HashMap::new();
        for (id, l) in labelled {
            for (k, v) in &l.k8s {
                by_label
                    .entry((k.clone(), v.clone()))
                    .or_default()
                    .push(*id);
            }
            for r in &l.reserved {
                by_label
                    .entry((r.clone(), String::new()))
                    .or_default()
                    .push(*id);
            }
        }
        by_label
    }

    fn select(&self, sel: &Selector) -> Rc<Vec<u32>> {
        if let Some(hit) = self.selected.borrow().get(sel) {
            return Rc::clone(hit);
        }
        // Candidates: the identities carrying one of the values of the
        // narrowest `In` requirement (any source: the exact match below
        // checks the source). No `In` requirement: every identity.
        let narrowest = sel
            .reqs
            .iter()
            .filter(|r| r.op == Op::In)
            .map(|r| {
                let mut ids: Vec<u32> = r
                    .values
                    .iter()
                    .filter_map(|v| self.by_label.get(&(r.key.key.clone(), v.clone())))
                    .flatten()
                    .copied()
                    .collect();
                ids.sort_unstable();
                ids.dedup();
                ids
            })
            .min_by_key(Vec::len);
        let matches = |id: &u32| self.labelled.get(id).is_some_and(|l| sel.matches(l));
        let ids: Rc<Vec<u32>> = Rc::new(match narrowest {
            Some(candidates) => candidates.into_iter().filter(matches).collect(),
            None => self.labelled.keys().copied().filter(matches).collect(),
        });
        self.selected
            .borrow_mut()
            .insert(sel.clone(), Rc::clone(&ids));
        ids
    }
}

pub fn compile_policy(input: &PolicyInput) -> PolicyOutput {
    let policies = parse_policies(input.cluster);
    let mut out = PolicyOutput::default();

    // Addresses of pods and nodes: their /32 (/128) beats any CIDR
    // (upstream: CIDR rules never select cluster-managed addresses).
    let mut addr_ids: BTreeMap<IpAddr, u32> = BTreeMap::new();
    for a in input.remote_node_addrs {
        addr_ids.insert(*a, id::REMOTE_NODE);
    }
    for a in input.host_addrs {
        addr_ids.insert(*a, id::HOST);
    }
    for a in input.apiserver_addrs {
        addr_ids.insert(*a, id::KUBE_APISERVER);
    }
    for p in input.pods {
        for a in &p.ips {
            addr_ids.insert(*a, p.identity);
        }
    }

    // Every prefix a policy uses (CIDRs, their excepts, Service backends that
    // are not pods or nodes) gets a CIDR identity.
    let mut prefixes: BTreeSet<Prefix> = BTreeSet::new();
    for pol in &policies {
        for rule in &pol.rules {
            for entry in &rule.entries {
                for peer in &entry.peers {
                    match peer {
                        Peer::Cidr { cidr, except } => {
                            prefixes.insert(*cidr);
                            prefixes.extend(except.iter().copied());
                        }
                        Peer::Service(sel) => {
                            for a in service_backends(input, sel) {
                                if !addr_ids.contains_key(&a) {
                                    prefixes.insert(Prefix::host(a));
                                }
                            }
                        }
                        _ => {}
                    }
                }
            }
        }
    }
    // 0.0.0.0/0 is the world itself (the IPv4 ipcache miss). An IPv6 miss
    // is WORLD too, so once a policy names a /0, ::/0 gets a CIDR identity
    // of its own: 0.0.0.0/0 then selects no IPv6 address and ::/0 no IPv4
    // one (the families never cover each other), while the `world` entity
    // still spans both (it includes every CIDR identity).
    if prefixes.iter().any(|p| p.len == 0) {
        prefixes.insert(Prefix::new(IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED), 0));
    }
    prefixes.retain(|p| p.len > 0 || p.addr.is_ipv6());
    out.cidr_ids = allocate_cidr_ids(&prefixes, input.prev_cidr_ids);

    let ipcache = &mut out.desired.ipcache;
    for (p, cid) in &out.cidr_ids {
        ipcache.insert((p.addr, p.len), *cid);
    }
    for (a, ident) in &addr_ids {
        ipcache.insert((*a, Prefix::max_len(*a)), *ident);
    }

    let mut labelled: BTreeMap<u32, IdentityLabels> = RESERVED
        .iter()
        .map(|(n, name)| {
            (
                *n,
                IdentityLabels {
                    k8s: BTreeMap::new(),
                    reserved: vec![name.to_string()],
                },
            )
        })
        .collect();
    for p in input.pods {
        labelled
            .entry(p.identity)
            .or_insert_with(|| IdentityLabels {
                k8s: p.labels.clone(),
                reserved: vec![],
            });
    }
    let uni = Universe {
        apiserver_on_host: input
            .apiserver_addrs
            .iter()
            .any(|a| input.host_addrs.contains(a)),
        apiserver_on_remote_node: input
            .apiserver_addrs
            .iter()
            .any(|a| input.remote_node_addrs.contains(a)),
        by_label: Universe::index(&labelled),
        pod_ids: input.pods.iter().map(|p| p.identity).collect(),
        labelled,
        cidr_ids: &out.cidr_ids,
        addr_ids,
        resolved: RefCell::default(),
        selected: RefCell::default(),
    };

    let mut refs = RefAllocator::new(input.prev_rule_refs);
    for pod in input.pods {
        let Some(ep_id) = pod.endpoint_id else {
            continue;
        };
        let labels = IdentityLabels {
            k8s: pod.labels.clone(),
            reserved: vec![],
        };
        if let Some(policy) = endpoint_policy(input, &uni, &policies, pod, &labels, &mut refs) {
            out.desired.endpoints.insert(ep_id, policy);
        }
    }
    out.rule_refs = refs.used;
    out.reports = policies
        .iter()
        .map(|p| PolicyReport {
            kind: p.kind.as_str().to_string(),
            name: p.display_name(),
            state: p.state,
            messages: p.messages.clone(),
        })
        .collect();
    out
}

fn allocate_cidr_ids(
    prefixes: &BTreeSet<Prefix>,
    prev: &BTreeMap<Prefix, u32>,
) -> BTreeMap<Prefix, u32> {
    let mut out: BTreeMap<Prefix, u32> = prefixes
        .iter()
        .filter_map(|p| prev.get(p).map(|i| (*p, *i)))
        .collect();
    let mut used: BTreeSet<u32> = out.values().copied().collect();
    let mut next = id::FIRST_CIDR;
    for p in prefixes {
        if out.contains_key(p) {
            continue;
        }
        while used.contains(&next) {
            next += 1;
        }
        used.insert(next);
        out.insert(*p, next);
    }
    out
}

struct RefAllocator<'a> {
    prev: &'a BTreeMap<RuleOrigin, u32>,
    prev_ids: BTreeSet<u32>,
    used: BTreeMap<RuleOrigin, u32>,
    used_ids: BTreeSet<u32>,
}

impl<'a> RefAllocator<'a> {
    fn new(prev: &'a BTreeMap<RuleOrigin, u32>) -> Self {
        RefAllocator {
            prev,
            prev_ids: prev.values().copied().collect(),
            used: BTreeMap::new(),
            used_ids: BTreeSet::new(),
        }
    }

    /// A stable ref for `origin`: its previous one, else a number neither in
    /// use nor recently used by another origin (so an event never names the
    /// wrong policy right after a change).
    fn get(&mut self, origin: RuleOrigin) -> u32 {
        if let Some(r) = self.used.get(&origin) {
            return *r;
        }
        let r = match self.prev.get(&origin) {
            Some(r) => *r,
            None => (1..)
                .find(|i| !self.used_ids.contains(i) && !self.prev_ids.contains(i))
                .unwrap_or(u32::MAX),
        };
        self.used_ids.insert(r);
        self.used.insert(origin, r);
        r
    }
}

fn endpoint_policy(
    input: &PolicyInput,
    uni: &Universe,
    policies: &[ParsedPolicy],
    pod: &PolicyPod,
    labels: &IdentityLabels,
    refs: &mut RefAllocator,
) -> Option<EndpointPolicy> {
    let mut policy = EndpointPolicy::default();
    let mut rules: BTreeSet<PolicyRule> = BTreeSet::new();
    for direction in [Direction::Ingress, Direction::Egress] {
        let mut default_deny = false;
        let mut suppressed = false;
        let mut entries: Vec<(&ParsedPolicy, &Entry)> = Vec::new();
        for pol in policies {
            for rule in pol.rules.iter().filter(|r| r.subject.matches(labels)) {
                let (dd, suppress) = match direction {
                    Direction::Ingress => {
                        (rule.default_deny_ingress, &rule.suppress_ingress_allows)
                    }
                    Direction::Egress => (rule.default_deny_egress, &rule.suppress_egress_allows),
                };
                default_deny |= dd;
                suppressed |= suppress.is_some();
                entries.extend(
                    rule.entries
                        .iter()
                        .filter(|e| e.direction == direction)
                        .map(|e| (pol, e)),
                );
            }
        }
        let has_deny = entries.iter().any(|(_, e)| e.deny);
        // An unenforced direction allows everything: nothing to write.
        if !default_deny && !has_deny && !suppressed {
            continue;
        }
        let mut push = |rule: PolicyRule| {
            rules.insert(rule);
        };
        if !default_deny && !suppressed {
            // enableDefaultDeny false (or deny-only policies that opted out):
            // only the denies restrict.
            let r = refs.get(synthetic(NO_DEFAULT_DENY, direction));
            push(rule_of(direction, id::ANY, 0, PortRange::ANY, false, r));
        }
        if direction == Direction::Ingress {
            // Upstream's allow-localhost (always, in Kubernetes mode): the
            // node may always reach its pods (kubelet probes). Denies still win.
            let r = refs.get(synthetic(ALLOW_LOCALHOST, direction));
            push(rule_of(direction, id::HOST, 0, PortRange::ANY, false, r));
        }
        for (pol, entry) in entries {
            if !entry.deny && suppressed {
                continue;
            }
            let origin = RuleOrigin {
                kind: pol.kind.as_str().to_string(),
                policy: pol.display_name(),
                path: entry.path.clone(),
                direction,
                deny: entry.deny,
            };
            let peers = resolve_peers_cached(input, uni, &entry.peers);
            let peers = &*peers;
            if *peers == Peers::Set(BTreeSet::new()) {
                continue;
            }
            let r = refs.get(origin);
            let peer_list: Vec<u32> = match peers {
                Peers::Any => vec![id::ANY],
                Peers::Set(s) => s.iter().copied().collect(),
            };
            let Some(ports) = &entry.ports else {
                for peer in &peer_list {
                    push(rule_of(direction, *peer, 0, PortRange::ANY, entry.deny, r));
                }
                continue;
            };
            for pm in ports {
                match &pm.port {
                    PortSpec::Range(s, e) => {
                        let range = PortRange { start: *s, end: *e };
                        for peer in &peer_list {
                            push(rule_of(direction, *peer, pm.proto, range, entry.deny, r));
                        }
                    }
                    PortSpec::Named(name) => {
                        for peer in &peer_list {
                            for port in
                                named_port(input, uni, pod, direction, *peer, name, pm.proto)
                            {
                                push(rule_of(
                                    direction,
                                    *peer,
                                    pm.proto,
                                    PortRange::single(port),
                                    entry.deny,
                                    r,
                                ));
                            }
                        }
                    }
                }
            }
        }
        match direction {
            Direction::Ingress => policy.ingress_enforced = true,
            Direction::Egress => policy.egress_enforced = true,
        }
    }
    if !policy.ingress_enforced && !policy.egress_enforced {
        return None;
    }
    policy.rules = rules.into_iter().collect();
    Some(policy)
}

fn synthetic(what: &str, direction: Direction) -> RuleOrigin {
    RuleOrigin {
        kind: "catena".into(),
        policy: what.into(),
        path: String::new(),
        direction,
        deny: false,
    }
}

fn rule_of(
    direction: Direction,
    remote: u32,
    proto: u8,
    ports: PortRange,
    deny: bool,
    rule_ref: u32,
) -> PolicyRule {
    PolicyRule {
        direction,
        remote_identity: remote,
        proto,
        // Protocol "any" carries no ports (the contract's invariant).
        ports: if proto == 0 { PortRange::ANY } else { ports },
        deny,
        rule_ref,
    }
}

/// A named port: on ingress the subject pod's own port; on egress the peer
/// pods' (for a peer that is not a pod, any pod's port of that name, as
/// upstream resolves egress names node-wide).
fn named_port(
    input: &PolicyInput,
    uni: &Universe,
    pod: &PolicyPod,
    direction: Direction,
    peer: u32,
    name: &str,
    proto: u8,
) -> BTreeSet<u16> {
    let matches = |p: &PolicyPod| {
        p.named_ports
            .iter()
            .filter(|(n, pr, _)| n == name && (*pr == proto || proto == IP_ICMP))
            .map(|(_, _, port)| *port)
            .collect::<Vec<_>>()
    };
    match direction {
        Direction::Ingress => matches(pod).into_iter().collect(),
        Direction::Egress => input
            .pods
            .iter()
            .filter(|p| !uni.pod_ids.contains(&peer) || p.identity == peer)
            .flat_map(matches)
            .collect(),
    }
}

fn resolve_peers_cached(input: &PolicyInput, uni: &Universe, peers: &[Peer]) -> Rc<Peers> {
    let key = (peers.as_ptr() as usize, peers.len());
    if let Some(hit) = uni.resolved.borrow().get(&key) {
        return Rc::clone(hit);
    }
    let resolved = Rc::new(resolve_peers(input, uni, peers));
    uni.resolved.borrow_mut().insert(key, Rc::clone(&resolved));
    resolved
}

fn resolve_peers(input: &PolicyInput, uni: &Universe, peers: &[Peer]) -> Peers {
    let mut set = BTreeSet::new();
    for peer in peers {
        match peer {
            Peer::Any => return Peers::Any,
            Peer::Entity(Entity::All) => return Peers::Any,
            Peer::Entity(e) => set.extend(entity_ids(uni, *e)),
            Peer::Endpoints(sel) => set.extend(uni.select(sel).iter().copied()),
            Peer::Cidr { cidr, except } => {
                if cidr.len == 0 && cidr.addr.is_ipv4() {
                    // The IPv4 ipcache miss (IPv6 misses cannot happen while
                    // a /0 is in use: ::/0 has its own identity then).
                    set.insert(id::WORLD);
                }
                set.extend(
                    uni.cidr_ids
                        .iter()
                        .filter(|(p, _)| cidr.covers(p) && !except.iter().any(|e| e.covers(p)))
                        .map(|(_, i)| *i),
                );
            }
            Peer::Service(sel) => {
                for a in service_backends(input, sel) {
                    let ident = uni
                        .addr_ids
                        .get(&a)
                        .or_else(|| uni.cidr_ids.get(&Prefix::host(a)))
                        .copied();
                    set.extend(ident);
                }
            }
        }
    }
    Peers::Set(set)
}

fn entity_ids(uni: &Universe, e: Entity) -> Vec<u32> {
    match e {
        Entity::All => vec![id::ANY],
        // CIDR identities are outside the cluster: part of the world.
        Entity::World => std::iter::once(id::WORLD)
            .chain(uni.cidr_ids.values().copied())
            .collect(),
        Entity::Cluster => [
            id::HOST,
            id::REMOTE_NODE,
            id::INIT,
            id::HEALTH,
            id::UNMANAGED,
            id::KUBE_APISERVER,
        ]
        .into_iter()
        .chain(uni.pod_ids.iter().copied())
        .collect(),
        Entity::Host if uni.apiserver_on_host => vec![id::HOST, id::KUBE_APISERVER],
        Entity::Host => vec![id::HOST],
        Entity::RemoteNode if uni.apiserver_on_remote_node => {
            vec![id::REMOTE_NODE, id::KUBE_APISERVER]
        }
        Entity::RemoteNode => vec![id::REMOTE_NODE],
        Entity::KubeApiserver => vec![id::KUBE_APISERVER],
        Entity::Init => vec![id::INIT],
        Entity::Health => vec![id::HEALTH],
        Entity::Unmanaged => vec![id::UNMANAGED],
        Entity::Nothing => vec![],
    }
}

/// Backend addresses of the Services a `toServices` entry names: its
/// EndpointSlices' addresses, or (no slices) the pods its selector picks.
fn service_backends(input: &PolicyInput, sel: &ServiceSelector) -> BTreeSet<IpAddr> {
    let cluster = input.cluster;
    let services: Vec<&ObjectKey> = cluster
        .services
        .iter()
        .filter(|(key, svc)| match sel {
            ServiceSelector::Name { namespace, name } => {
                key.namespace == *namespace && key.name == *name
            }
            ServiceSelector::Labels {
                namespace,
                selector,
            } => {
                namespace.as_ref().is_none_or(|n| *n == key.namespace)
                    && selector.matches(&IdentityLabels {
                        k8s: svc.metadata.labels.clone().unwrap_or_default(),
                        reserved: vec![],
                    })
            }
        })
        .map(|(k, _)| k)
        .collect();
    let mut out = BTreeSet::new();
    for key in services {
        let mut from_slices = false;
        for (skey, slice) in &cluster.endpoint_slices {
            if skey.namespace != key.namespace
                || slice.service_name.as_deref() != Some(key.name.as_str())
                || !matches!(&*slice.address_type, "IPv4" | "IPv6")
            {
                continue;
            }
            from_slices = true;
            for ep in slice.endpoints.iter() {
                out.extend(ep.addresses());
            }
        }
        if from_slices {
            continue;
        }
        let selector = cluster
            .services
            .get(key)
            .and_then(|s| s.spec.as_ref())
            .and_then(|s| s.selector.clone())
            .unwrap_or_default();
        if selector.is_empty() {
            continue;
        }
        for p in input.pods {
            if p.key.namespace == key.namespace
                && selector.iter().all(|(k, v)| p.labels.get(k) == Some(v))
            {
                out.extend(p.ips.iter().copied());
            }
        }
    }
    out
}

/// Every pod the agent knows, with its identity label set (identity left 0
/// for the caller's allocator): Pod manifests with an address (pods on any
/// node, so remote peers resolve too) and registered endpoints (merged with
/// the manifest of the same namespace/name; the manifest's labels win, as it
/// is the live source of truth). Finished pods are left out: their
/// addresses may already belong to someone else.
pub fn known_pods(cluster: &ClusterState, registered: &[catena_api::Endpoint]) -> Vec<PolicyPod> {
    struct Acc<'a> {
        ips: BTreeSet<IpAddr>,
        labels: BTreeMap<String, String>,
        pod: Option<&'a PodInfo>,
        endpoint_id: Option<u32>,
    }
    let mut by_key: BTreeMap<ObjectKey, Acc> = BTreeMap::new();
    for (key, pod) in &cluster.pods {
        if pod.finished() {
            continue;
        }
        by_key.insert(
            key.clone(),
            Acc {
                ips: pod.ips.iter().copied().collect(),
                labels: BTreeMap::new(),
                pod: Some(pod.as_ref()),
                endpoint_id: None,
            },
        );
    }
    for ep in registered {
        let key = endpoint_pod_key(ep);
        let acc = by_key.entry(key).or_insert_with(|| Acc {
            ips: BTreeSet::new(),
            labels: BTreeMap::new(),
            pod: None,
            endpoint_id: None,
        });
        acc.labels = ep.spec.labels.clone();
        acc.endpoint_id = Some(ep.id);
        acc.ips.extend(
            ep.spec
                .ips
                .iter()
                .filter_map(|c| c.split('/').next()?.parse::<IpAddr>().ok()),
        );
    }
    by_key
        .into_iter()
        .filter(|(_, a)| !a.ips.is_empty() || a.endpoint_id.is_some())
        .map(|(key, a)| {
            let mut labels = a.labels;
            if let Some(p) = a.pod {
                labels.extend(p.labels.clone());
            }
            let ns_labels = cluster
                .namespaces
                .get(&key.namespace)
                .and_then(|n| n.metadata.labels.as_ref());
            // The API server defaults serviceAccountName to "default"; a pod
            // known only from its CNI registration has no known account.
            let sa = a
                .pod
                .map(|p| p.service_account_name.as_deref().unwrap_or("default"));
            PolicyPod {
                labels: crate::model::identity::pod_identity_labels(
                    &key.namespace,
                    &labels,
                    ns_labels,
                    sa,
                ),
                key,
                ips: a.ips.into_iter().collect(),
                identity: 0,
                named_ports: a.pod.map(named_ports).unwrap_or_default(),
                endpoint_id: a.endpoint_id,
            }
        })
        .collect()
}

/// The namespace/name a registered endpoint stands for (its container id when
/// the runtime passed no pod name), as the services compiler keys it.
pub fn endpoint_pod_key(ep: &catena_api::Endpoint) -> ObjectKey {
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
    ObjectKey::new(namespace, name)
}

/// Named container ports of a Pod manifest (init containers too), lower-cased.
pub fn named_ports(pod: &PodInfo) -> Vec<(String, u8, u16)> {
    pod.named_ports
        .iter()
        .filter_map(|p| {
            let name = p.name.to_ascii_lowercase();
            let proto = match p.protocol.as_deref().unwrap_or("TCP") {
                "TCP" => 6,
                "UDP" => 17,
                "SCTP" => 132,
                _ => return None,
            };
            Some((name, proto, u16::try_from(p.container_port).ok()?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::identity::pod_identity_labels;
    use crate::sources::{CiliumPolicy, Object};
    use catena_datapath::policy::Direction::{Egress, Ingress};
    use serde_json::json;
    use std::sync::Arc;

    const TCP: u8 = 6;
    const UDP: u8 = 17;

    struct Lab {
        cluster: ClusterState,
        pods: Vec<PolicyPod>,
        host: Vec<IpAddr>,
    }

    impl Lab {
        fn new() -> Lab {
            let mut cluster = ClusterState::default();
            // This node and one other, as the sources report them.
            for (name, addr) in [("self", "10.244.1.1"), ("other", "192.168.0.2")] {
                cluster.insert(Object::Node(Arc::new(crate::sources::NodeInfo {
                    name: name.into(),
                    addresses: vec![addr.parse().unwrap()],
                    resource_version: None,
                })));
            }
            Lab {
                cluster,
                pods: vec![],
                host: vec!["10.244.1.1".parse().unwrap()],
            }
        }

        /// A pod on this node (endpoint id = its index + 1); `ip` may list
        /// several addresses, comma-separated (dual stack).
        fn pod(
            &mut self,
            ns: &str,
            name: &str,
            ip: &str,
            labels: &[(&str, &str)],
        ) -> &mut PolicyPod {
            let l: BTreeMap<String, String> = labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            let ns_labels = self
                .cluster
                .namespaces
                .get(ns)
                .and_then(|n| n.metadata.labels.clone());
            let labels = pod_identity_labels(ns, &l, ns_labels.as_ref(), Some("default"));
            // Same label set, same identity (as the allocator does).
            let identity = self
                .pods
                .iter()
                .find(|p| p.labels == labels)
                .map(|p| p.identity)
                .unwrap_or(id::FIRST_LOCAL + self.pods.len() as u32);
            let n = self.pods.len() as u32 + 1;
            self.pods.push(PolicyPod {
                key: ObjectKey::new(ns, name),
                ips: ip.split(',').map(|a| a.parse().unwrap()).collect(),
                identity,
                labels,
                named_ports: vec![],
                endpoint_id: Some(n),
            });
            self.pods.last_mut().unwrap()
        }

        fn namespace(&mut self, name: &str, labels: &[(&str, &str)]) {
            let ns = serde_json::from_value::<k8s_openapi::api::core::v1::Namespace>(json!({
                "apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": name, "labels": labels.iter().cloned().collect::<BTreeMap<_, _>>()}
            }))
            .unwrap();
            self.cluster.insert(Object::Namespace(ns.into()));
        }

        fn cnp(&mut self, kind: &str, object: serde_json::Value) {
            self.cluster.insert(Object::CiliumPolicy(
                CiliumPolicy {
                    kind: kind.into(),
                    object,
                }
                .into(),
            ));
        }

        fn knp(&mut self, object: serde_json::Value) {
            self.cluster.insert(Object::NetworkPolicy(
                serde_json::from_value::<k8s_openapi::api::networking::v1::NetworkPolicy>(object)
                    .unwrap()
                    .into(),
            ));
        }

        fn compile(&self) -> PolicyOutput {
            let peers = NodePeers::of(&self.cluster, "self");
            compile_policy(&PolicyInput {
                cluster: &self.cluster,
                pods: &self.pods,
                host_addrs: &self.host,
                remote_node_addrs: &peers.remote_nodes,
                apiserver_addrs: &peers.apiserver,
                prev_cidr_ids: &BTreeMap::new(),
                prev_rule_refs: &BTreeMap::new(),
            })
        }

        fn id_of(&self, name: &str) -> u32 {
            self.pods
                .iter()
                .find(|p| p.key.name == name)
                .unwrap()
                .identity
        }

        fn ep_of(&self, name: &str) -> u32 {
            self.pods
                .iter()
                .find(|p| p.key.name == name)
                .unwrap()
                .endpoint_id
                .unwrap()
        }
    }

    /// What the datapath decides for one packet, per the contract.
    fn verdict(
        out: &PolicyOutput,
        ep: u32,
        dir: Direction,
        remote: u32,
        proto: u8,
        port: u16,
    ) -> bool {
        let Some(p) = out.desired.endpoints.get(&ep) else {
            return true;
        };
        let enforced = match dir {
            Ingress => p.ingress_enforced,
            Egress => p.egress_enforced,
        };
        if !enforced {
            return true;
        }
        let hit = |r: &&PolicyRule| {
            r.direction == dir
                && (r.remote_identity == id::ANY || r.remote_identity == remote)
                && (r.proto == 0 || r.proto == proto)
                && (r.ports.is_any() || (r.ports.start..=r.ports.end).contains(&port))
        };
        let matching: Vec<&PolicyRule> = p.rules.iter().filter(hit).collect();
        !matching.iter().any(|r| r.deny) && matching.iter().any(|r| !r.deny)
    }

    /// The identity the ipcache gives `addr` (longest prefix, else WORLD).
    fn lookup(out: &PolicyOutput, addr: &str) -> u32 {
        let a: IpAddr = addr.parse().unwrap();
        out.desired
            .ipcache
            .iter()
            .filter(|((p, l), _)| Prefix::new(*p, *l).contains(a))
            .max_by_key(|((_, l), _)| *l)
            .map_or(id::WORLD, |(_, i)| *i)
    }

    fn meta(name: &str, ns: &str) -> serde_json::Value {
        json!({"name": name, "namespace": ns})
    }

    #[test]
    fn unselected_endpoints_allow_everything() {
        let mut lab = Lab::new();
        lab.pod("default", "a", "10.244.1.10", &[("app", "a")]);
        let out = lab.compile();
        assert!(out.desired.endpoints.is_empty());
        assert_eq!(
            lab.compile().desired.ipcache[&("10.244.1.10".parse().unwrap(), 32)],
            id::FIRST_LOCAL
        );
        assert_eq!(
            out.desired.ipcache[&("10.244.1.1".parse().unwrap(), 32)],
            id::HOST
        );
        assert_eq!(
            out.desired.ipcache[&("192.168.0.2".parse().unwrap(), 32)],
            id::REMOTE_NODE
        );
    }

    #[test]
    fn allow_by_labels_with_default_deny_and_localhost() {
        let mut lab = Lab::new();
        lab.pod("default", "web", "10.244.1.10", &[("app", "web")]);
        lab.pod("default", "db", "10.244.1.11", &[("app", "db")]);
        lab.pod("default", "other", "10.244.1.12", &[("app", "other")]);
        lab.pod("prod", "web-prod", "10.244.1.13", &[("app", "web")]);
        lab.cnp("CiliumNetworkPolicy", json!({"metadata": meta("db", "default"), "spec": {
            "endpointSelector": {"matchLabels": {"app": "db"}},
            "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "web"}}], "toPorts": [{"ports": [{"port": "5432", "protocol": "TCP"}]}]}]
        }}));
        let out = lab.compile();
        let db = lab.ep_of("db");
        let (web, other, web_prod) = (lab.id_of("web"), lab.id_of("other"), lab.id_of("web-prod"));
        assert!(verdict(&out, db, Ingress, web, TCP, 5432));
        assert!(!verdict(&out, db, Ingress, web, TCP, 5433));
        assert!(!verdict(&out, db, Ingress, web, UDP, 5432));
        assert!(
            !verdict(&out, db, Ingress, web, 253, 0),
            "unknown L4 protocol is not allowed"
        );
        assert!(!verdict(&out, db, Ingress, other, TCP, 5432));
        assert!(
            !verdict(&out, db, Ingress, web_prod, TCP, 5432),
            "CNP peers are namespaced"
        );
        assert!(!verdict(&out, db, Ingress, id::WORLD, TCP, 5432));
        assert!(
            verdict(&out, db, Ingress, id::HOST, TCP, 1),
            "allow-localhost"
        );
        assert!(
            verdict(&out, db, Egress, id::WORLD, TCP, 1),
            "egress not selected"
        );
        assert!(!out.desired.endpoints.contains_key(&lab.ep_of("web")));
        // Every entry carries the ref of its policy.
        let p = &out.desired.endpoints[&db];
        let refd = p.rules.iter().find(|r| r.remote_identity == web).unwrap();
        let origin = out
            .rule_refs
            .iter()
            .find(|(_, r)| **r == refd.rule_ref)
            .unwrap()
            .0;
        assert_eq!(
            (origin.policy.as_str(), origin.path.as_str()),
            ("default/db", "spec.ingress[0]")
        );
    }

    #[test]
    fn deny_wins_and_default_deny_can_be_disabled() {
        let mut lab = Lab::new();
        lab.pod("default", "client", "10.244.1.10", &[("app", "client")]);
        lab.pod("default", "server", "10.244.1.11", &[("app", "server")]);
        lab.cnp(
            "CiliumNetworkPolicy",
            json!({"metadata": meta("allow", "default"), "spec": {
                "endpointSelector": {"matchLabels": {"app": "server"}},
                "ingress": [{"fromEndpoints": [{}]}]
            }}),
        );
        lab.cnp("CiliumNetworkPolicy", json!({"metadata": meta("deny", "default"), "spec": {
            "endpointSelector": {"matchLabels": {"app": "server"}},
            "ingressDeny": [{"fromEndpoints": [{"matchLabels": {"app": "client"}}], "toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}]}]}]
        }}));
        let out = lab.compile();
        let (server, client) = (lab.ep_of("server"), lab.id_of("client"));
        assert!(
            !verdict(&out, server, Ingress, client, TCP, 80),
            "deny wins"
        );
        assert!(verdict(&out, server, Ingress, client, TCP, 81));
        assert!(verdict(&out, server, Ingress, client, IP_ICMP, 8));
        assert!(!verdict(&out, server, Ingress, id::WORLD, TCP, 81));

        // Only a deny policy that opts out of default deny: everything else passes.
        let mut lab2 = Lab::new();
        lab2.pod("default", "client", "10.244.1.10", &[("app", "client")]);
        lab2.pod("default", "server", "10.244.1.11", &[("app", "server")]);
        lab2.cnp(
            "CiliumNetworkPolicy",
            json!({"metadata": meta("deny", "default"), "spec": {
                "endpointSelector": {"matchLabels": {"app": "server"}},
                "enableDefaultDeny": {"ingress": false},
                "ingressDeny": [{"fromEndpoints": [{"matchLabels": {"app": "client"}}]}]
            }}),
        );
        let out = lab2.compile();
        let server = lab2.ep_of("server");
        assert!(!verdict(
            &out,
            server,
            Ingress,
            lab2.id_of("client"),
            TCP,
            80
        ));
        assert!(
            verdict(&out, server, Ingress, id::WORLD, TCP, 80),
            "no default deny"
        );
        // An allow policy with enableDefaultDeny false does not restrict.
        let mut lab3 = Lab::new();
        lab3.pod("default", "server", "10.244.1.11", &[("app", "server")]);
        lab3.cnp(
            "CiliumNetworkPolicy",
            json!({"metadata": meta("p", "default"), "spec": {
                "endpointSelector": {}, "enableDefaultDeny": {"ingress": false, "egress": false},
                "ingress": [{"fromEntities": ["host"]}]
            }}),
        );
        assert!(lab3.compile().desired.endpoints.is_empty());
    }

    #[test]
    fn entities() {
        let mut lab = Lab::new();
        lab.pod("default", "a", "10.244.1.10", &[("app", "a")]);
        lab.pod("other", "b", "10.244.1.11", &[("app", "b")]);
        lab.cnp(
            "CiliumNetworkPolicy",
            json!({"metadata": meta("e", "default"), "spec": {
                "endpointSelector": {"matchLabels": {"app": "a"}},
                "egress": [{"toEntities": ["cluster"]}],
                "ingress": [{"fromEntities": ["world"]}]
            }}),
        );
        let out = lab.compile();
        let a = lab.ep_of("a");
        let b = lab.id_of("b");
        assert!(
            verdict(&out, a, Egress, b, TCP, 80),
            "cluster covers pods of every namespace"
        );
        assert!(verdict(&out, a, Egress, id::HOST, UDP, 53));
        assert!(verdict(&out, a, Egress, id::REMOTE_NODE, TCP, 1));
        assert!(!verdict(&out, a, Egress, id::WORLD, TCP, 80));
        assert!(verdict(&out, a, Ingress, id::WORLD, TCP, 80));
        assert!(!verdict(&out, a, Ingress, b, TCP, 80));
    }

    /// Remote nodes come from Node objects (this node's own is the host); the
    /// kube-apiserver entity is the `default/kubernetes` endpoints, and an
    /// API server on another node is part of `remote-node` too.
    #[test]
    fn remote_node_and_kube_apiserver_from_nodes_and_kubernetes_endpoints() {
        let mut lab = Lab::new();
        lab.pod("default", "a", "10.244.1.10", &[("app", "a")]);
        lab.cluster
            .insert(Object::Node(Arc::new(crate::sources::NodeInfo {
                name: "cp".into(),
                addresses: vec!["192.168.0.9".parse().unwrap()],
                resource_version: None,
            })));
        lab.cluster.insert(Object::endpoint_slice(
            serde_json::from_value::<k8s_openapi::api::discovery::v1::EndpointSlice>(json!({
                "metadata": {"name": "kubernetes", "namespace": "default",
                             "labels": {"kubernetes.io/service-name": "kubernetes"}},
                "addressType": "IPv4", "endpoints": [{"addresses": ["192.168.0.9"]}]
            }))
            .unwrap(),
        ));
        lab.cnp(
            "CiliumNetworkPolicy",
            json!({"metadata": meta("n", "default"), "spec": {
                "endpointSelector": {"matchLabels": {"app": "a"}},
                "egress": [{"toEntities": ["kube-apiserver"], "toPorts": [{"ports": [{"port": "6443", "protocol": "TCP"}]}]},
                           {"toEntities": ["remote-node"], "toPorts": [{"ports": [{"port": "10250", "protocol": "TCP"}]}]}]
            }}),
        );
        let out = lab.compile();
        assert_eq!(lookup(&out, "192.168.0.2"), id::REMOTE_NODE);
        assert_eq!(lookup(&out, "192.168.0.9"), id::KUBE_APISERVER);
        assert_eq!(lookup(&out, "10.244.1.1"), id::HOST, "this node's own Node");
        let a = lab.ep_of("a");
        let v = |addr: &str, port: u16| verdict(&out, a, Egress, lookup(&out, addr), TCP, port);
        assert!(v("192.168.0.9", 6443));
        assert!(
            !v("192.168.0.2", 6443),
            "a plain node is not the API server"
        );
        assert!(v("192.168.0.2", 10250));
        assert!(
            v("192.168.0.9", 10250),
            "the API server's node is a remote node"
        );
        assert!(!v("10.244.1.1", 10250), "the host is not a remote node");
    }

    #[test]
    fn cidr_with_except_and_longest_prefix() {
        let mut lab = Lab::new();
        lab.pod("default", "a", "10.244.1.10", &[("app", "a")]);
        lab.pod("default", "b", "10.244.1.11", &[("app", "b")]);
        lab.cnp("CiliumNetworkPolicy", json!({"metadata": meta("c", "default"), "spec": {
            "endpointSelector": {"matchLabels": {"app": "a"}},
            "egress": [
                {"toCIDRSet": [{"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}]},
                {"toCIDR": ["10.1.2.0/24"], "toPorts": [{"ports": [{"port": "443", "protocol": "TCP"}]}]}
            ]
        }}));
        let out = lab.compile();
        let a = lab.ep_of("a");
        let v = |addr: &str, port: u16| verdict(&out, a, Egress, lookup(&out, addr), TCP, port);
        assert!(v("10.9.9.9", 80));
        assert!(!v("10.1.9.9", 80), "except");
        assert!(
            v("10.1.2.3", 443),
            "a more specific allow inside the except"
        );
        assert!(!v("10.1.2.3", 80));
        assert!(!v("11.0.0.1", 80), "world");
        assert!(!v("10.244.1.11", 80), "CIDR never selects a pod");
        assert!(!v("10.244.1.1", 80), "nor the host");
        assert!(out.cidr_ids.values().all(|i| *i >= id::FIRST_CIDR));
        assert_eq!(out.cidr_ids.len(), 3);

        // Stable across recompiles, and a new prefix does not renumber.
        let prev = out.cidr_ids.clone();
        lab.cnp(
            "CiliumNetworkPolicy",
            json!({"metadata": meta("d", "default"), "spec": {
                "endpointSelector": {"matchLabels": {"app": "b"}},
                "egress": [{"toCIDR": ["9.0.0.0/8"]}]
            }}),
        );
        let out2 = compile_policy(&PolicyInput {
            cluster: &lab.cluster,
            pods: &lab.pods,
            host_addrs: &lab.host,
            remote_node_addrs: &[],
            apiserver_addrs: &[],
            prev_cidr_ids: &prev,
            prev_rule_refs: &out.rule_refs,
        });
        for (p, i) in &prev {
            assert_eq!(out2.cidr_ids[p], *i);
        }
        assert_eq!(out2.rule_refs.len(), out.rule_refs.len() + 1);
        for (o, r) in &out.rule_refs {
            assert_eq!(out2.rule_refs[o], *r, "rule refs are stable");
        }
        // 0.0.0.0/0 is the world.
        let mut lab = Lab::new();
        lab.pod("default", "a", "10.244.1.10", &[("app", "a")]);
        lab.cnp("CiliumNetworkPolicy", json!({"metadata": meta("c", "default"), "spec": {
            "endpointSelector": {}, "egress": [{"toCIDRSet": [{"cidr": "0.0.0.0/0", "except": ["1.2.3.0/24"]}]}]
        }}));
        let out = lab.compile();
        assert!(verdict(&out, 1, Egress, lookup(&out, "8.8.8.8"), UDP, 53));
        assert!(!verdict(&out, 1, Egress, lookup(&out, "1.2.3.4"), UDP, 53));
    }

    #[test]
    fn ipv6_cidrs_pods_nodes_and_world() {
        let mut lab = Lab::new();
        lab.host.push("fd00:10:244:1::1".parse().unwrap());
        lab.cluster
            .insert(Object::Node(Arc::new(crate::sources::NodeInfo {
                name: "other6".into(),
                addresses: vec!["fd00:192:168::2".parse().unwrap()],
                resource_version: None,
            })));
        lab.pod(
            "default",
            "a",
            "10.244.1.10,fd00:10:244:1::10",
            &[("app", "a")],
        );
        lab.pod(
            "default",
            "b",
            "10.244.1.11,fd00:10:244:1::11",
            &[("app", "b")],
        );
        lab.cnp("CiliumNetworkPolicy", json!({"metadata": meta("c", "default"), "spec": {
            "endpointSelector": {"matchLabels": {"app": "a"}},
            "egress": [
                {"toCIDRSet": [{"cidr": "fd00:100::/32", "except": ["fd00:100:1::/48"]}]},
                {"toCIDR": ["2001:db8::/64"], "toPorts": [{"ports": [{"port": "443", "protocol": "TCP"}]}]},
                {"toEndpoints": [{"matchLabels": {"app": "b"}}]},
                {"toEntities": ["remote-node"]},
                {"icmps": [{"fields": [{"family": "IPv6", "type": "EchoRequest"}]}]}
            ]
        }}));
        let out = lab.compile();
        let a = lab.ep_of("a");
        let v = |addr: &str, port: u16| verdict(&out, a, Egress, lookup(&out, addr), TCP, port);
        assert!(v("fd00:100:9::1", 80));
        assert!(!v("fd00:100:1::1", 80), "except");
        assert!(v("2001:db8::5", 443));
        assert!(!v("2001:db8::5", 80));
        assert!(!v("2001:db9::1", 80), "world");
        assert_eq!(lookup(&out, "fd00:10:244:1::11"), lab.id_of("b"));
        assert!(v("fd00:10:244:1::11", 80), "a pod by its IPv6 address");
        assert!(v("10.244.1.11", 80), "and by its IPv4 one");
        assert!(!v("fd00:10:244:1::12", 80), "an address no pod has");
        assert_eq!(lookup(&out, "fd00:10:244:1::1"), id::HOST);
        assert_eq!(lookup(&out, "fd00:192:168::2"), id::REMOTE_NODE);
        assert!(v("fd00:192:168::2", 80), "remote-node over IPv6");
        assert!(!v("10.0.0.1", 80), "an IPv6 CIDR selects no IPv4 address");
        let icmp6 = |t: u16| verdict(&out, a, Egress, id::WORLD, 58, t);
        assert!(icmp6(128), "ICMPv6 echo request allowed to any peer");
        assert!(!icmp6(129));
        assert!(
            !verdict(&out, a, Egress, id::WORLD, 1, 8),
            "ICMPv6 is not ICMP"
        );
        assert_eq!(
            out.desired.ipcache[&("fd00:100::".parse().unwrap(), 32)],
            out.cidr_ids[&Prefix::parse("fd00:100::/32").unwrap()]
        );
        assert!(out.cidr_ids.values().all(|i| *i >= id::FIRST_CIDR));

        // A /0 of one family selects nothing of the other; `world` is both.
        for (peer, v4_world, v6_world) in [
            (json!({"ipBlock": {"cidr": "0.0.0.0/0"}}), true, false),
            (
                json!({"ipBlock": {"cidr": "::/0", "except": ["2001:db8:bad::/48"]}}),
                false,
                true,
            ),
        ] {
            let mut lab = Lab::new();
            lab.pod(
                "default",
                "b",
                "10.244.1.11,fd00:10:244:1::11",
                &[("app", "b")],
            );
            lab.knp(json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                "metadata": meta("n", "default"),
                "spec": {"podSelector": {}, "policyTypes": ["Ingress"], "ingress": [{"from": [peer]}]}}));
            let out = lab.compile();
            let b = lab.ep_of("b");
            let v = |addr: &str| verdict(&out, b, Ingress, lookup(&out, addr), TCP, 80);
            assert_eq!(v("8.8.8.8"), v4_world, "{peer}: IPv4 world");
            assert_eq!(v("2001:db8::1"), v6_world, "{peer}: IPv6 world");
            if v6_world {
                assert!(!v("2001:db8:bad::1"), "except inside ::/0");
            }
            assert!(out
                .desired
                .ipcache
                .contains_key(&("::".parse().unwrap(), 0)));
        }
        let mut lab = Lab::new();
        lab.pod(
            "default",
            "b",
            "10.244.1.11,fd00:10:244:1::11",
            &[("app", "b")],
        );
        lab.cnp("CiliumNetworkPolicy", json!({"metadata": meta("w", "default"), "spec": {
            "endpointSelector": {}, "ingress": [
                {"fromEntities": ["world"]},
                {"fromCIDR": ["0.0.0.0/0"], "toPorts": [{"ports": [{"port": "1", "protocol": "TCP"}]}]}
            ]
        }}));
        let out = lab.compile();
        let b = lab.ep_of("b");
        let v = |addr: &str| verdict(&out, b, Ingress, lookup(&out, addr), TCP, 80);
        assert!(
            v("8.8.8.8") && v("2001:db8::1"),
            "world spans both families"
        );
    }

    #[test]
    fn namespace_selectors_and_network_policy() {
        let mut lab = Lab::new();
        lab.namespace("ops", &[("team", "ops")]);
        lab.namespace("dev", &[("team", "dev")]);
        lab.pod("shop", "db", "10.244.1.10", &[("app", "db")])
            .named_ports = vec![("pg".into(), TCP, 5432)];
        lab.pod("shop", "web", "10.244.1.11", &[("app", "web")]);
        lab.pod("ops", "mon", "10.244.1.12", &[("app", "mon")]);
        lab.pod("dev", "mon-dev", "10.244.1.13", &[("app", "mon")]);
        lab.knp(json!({"metadata": meta("db", "shop"), "spec": {
            "podSelector": {"matchLabels": {"app": "db"}},
            "ingress": [
                {"from": [{"podSelector": {"matchLabels": {"app": "web"}}}], "ports": [{"port": "pg"}]},
                {"from": [{"namespaceSelector": {"matchLabels": {"team": "ops"}}}], "ports": [{"port": 9100, "endPort": 9200}]},
                {"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "dev"}}, "podSelector": {"matchLabels": {"app": "nope"}}}]}
            ]
        }}));
        let out = lab.compile();
        let db = lab.ep_of("db");
        let (web, mon, mon_dev) = (lab.id_of("web"), lab.id_of("mon"), lab.id_of("mon-dev"));
        assert!(
            verdict(&out, db, Ingress, web, TCP, 5432),
            "named port resolved on the subject"
        );
        assert!(!verdict(&out, db, Ingress, web, TCP, 9100));
        assert!(verdict(&out, db, Ingress, mon, TCP, 9150));
        assert!(
            !verdict(&out, db, Ingress, mon, UDP, 9150),
            "protocol defaults to TCP"
        );
        assert!(!verdict(&out, db, Ingress, mon_dev, TCP, 9150));
        assert!(
            !verdict(&out, db, Ingress, mon_dev, TCP, 5432),
            "namespace AND pod selector"
        );
        assert!(
            verdict(&out, db, Egress, id::WORLD, TCP, 1),
            "Ingress-only policy"
        );

        // Egress named port: the peer's port.
        lab.knp(json!({"metadata": meta("web", "shop"), "spec": {
            "podSelector": {"matchLabels": {"app": "web"}}, "policyTypes": ["Egress"],
            "egress": [{"to": [{"podSelector": {"matchLabels": {"app": "db"}}}], "ports": [{"port": "pg"}]}]
        }}));
        let out = lab.compile();
        let web_ep = lab.ep_of("web");
        assert!(verdict(&out, web_ep, Egress, lab.id_of("db"), TCP, 5432));
        assert!(!verdict(&out, web_ep, Egress, lab.id_of("db"), TCP, 5433));
        assert!(verdict(&out, web_ep, Ingress, mon, TCP, 1));
    }

    #[test]
    fn icmp_and_port_ranges() {
        let mut lab = Lab::new();
        lab.pod("default", "a", "10.244.1.10", &[("app", "a")]);
        lab.cnp("CiliumNetworkPolicy", json!({"metadata": meta("i", "default"), "spec": {
            "endpointSelector": {},
            "ingress": [{"fromEntities": ["world"], "icmps": [{"fields": [{"type": 8}]}], "toPorts": [{"ports": [{"port": "7000", "endPort": 7002, "protocol": "UDP"}]}]}]
        }}));
        let out = lab.compile();
        assert!(verdict(&out, 1, Ingress, id::WORLD, IP_ICMP, 8));
        assert!(!verdict(&out, 1, Ingress, id::WORLD, IP_ICMP, 13));
        assert!(verdict(&out, 1, Ingress, id::WORLD, UDP, 7002));
        assert!(!verdict(&out, 1, Ingress, id::WORLD, UDP, 7003));
        assert!(!verdict(&out, 1, Ingress, id::WORLD, TCP, 7001));
    }

    #[test]
    fn to_services_and_ccnp() {
        let mut lab = Lab::new();
        lab.pod("default", "client", "10.244.1.10", &[("app", "client")]);
        lab.pod("default", "api", "10.244.1.11", &[("app", "api")]);
        lab.cluster.insert(Object::Service(
            serde_json::from_value::<k8s_openapi::api::core::v1::Service>(json!({
                "metadata": {"name": "api", "namespace": "default"},
                "spec": {"selector": {"app": "api"}, "ports": [{"port": 80}]}
            }))
            .unwrap()
            .into(),
        ));
        lab.cluster.insert(Object::Service(
            serde_json::from_value::<k8s_openapi::api::core::v1::Service>(json!({
                "metadata": {"name": "ext", "namespace": "default", "labels": {"kind": "external"}},
                "spec": {"ports": [{"port": 80}]}
            }))
            .unwrap()
            .into(),
        ));
        lab.cluster.insert(Object::endpoint_slice(serde_json::from_value::<k8s_openapi::api::discovery::v1::EndpointSlice>(json!({
            "metadata": {"name": "ext-1", "namespace": "default", "labels": {"kubernetes.io/service-name": "ext"}},
            "addressType": "IPv4", "endpoints": [{"addresses": ["203.0.113.7"]}]
        })).unwrap()));
        lab.cnp("CiliumClusterwideNetworkPolicy", json!({"metadata": {"name": "svc"}, "spec": {
            "endpointSelector": {"matchLabels": {"app": "client"}},
            "egress": [{"toServices": [{"k8sService": {"serviceName": "api", "namespace": "default"}},
                                       {"k8sServiceSelector": {"selector": {"matchLabels": {"kind": "external"}}, "namespace": "default"}}]}]
        }}));
        let out = lab.compile();
        let c = lab.ep_of("client");
        assert!(verdict(&out, c, Egress, lab.id_of("api"), TCP, 8080));
        assert!(verdict(
            &out,
            c,
            Egress,
            lookup(&out, "203.0.113.7"),
            TCP,
            80
        ));
        assert!(!verdict(
            &out,
            c,
            Egress,
            lookup(&out, "203.0.113.8"),
            TCP,
            80
        ));
        assert!(!verdict(&out, c, Egress, id::HOST, TCP, 80));
    }

    #[test]
    fn unsupported_allow_stays_denied_and_is_reported() {
        let mut lab = Lab::new();
        lab.pod("default", "a", "10.244.1.10", &[("app", "a")]);
        lab.cnp("CiliumNetworkPolicy", json!({"metadata": meta("l7", "default"), "spec": {
            "endpointSelector": {},
            "ingress": [{"fromEntities": ["world"], "toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}], "rules": {"http": [{"method": "GET"}]}}]}]
        }}));
        let out = lab.compile();
        assert!(
            !verdict(&out, 1, Ingress, id::WORLD, TCP, 80),
            "the L7 allow is dropped, not widened"
        );
        assert_eq!(out.reports[0].state, PolicyState::Partial);
        assert!(
            out.reports[0].messages[0].contains("L7"),
            "{:?}",
            out.reports
        );

        lab.cnp("CiliumNetworkPolicy", json!({"metadata": meta("req", "default"), "spec": {
            "endpointSelector": {},
            "ingress": [{"fromEntities": ["world"]}, {"fromRequires": [{"matchLabels": {"env": "prod"}}]}]
        }}));
        let out = lab.compile();
        assert!(
            !verdict(&out, 1, Ingress, id::WORLD, TCP, 81),
            "requires suppresses the allows"
        );
        assert!(verdict(&out, 1, Ingress, id::HOST, TCP, 81));
    }
}
