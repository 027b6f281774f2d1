//! Network policies as the compiler sees them: CiliumNetworkPolicy,
//! CiliumClusterwideNetworkPolicy and Kubernetes NetworkPolicy parsed into one
//! normalised form ([`ParsedPolicy`]), with the implicit scoping upstream
//! applies already made explicit (a CNP's selectors restricted to its
//! namespace, a CCNP's to pods), and every construct an eBPF-only datapath
//! cannot enforce turned into a fail-closed decision plus a message.
//!
//! Fail closed means: an *allow* that cannot be enforced exactly is dropped
//! (what it would have allowed stays denied); a *deny* whose peers cannot be
//! resolved is widened to every peer (on the ports it names); a construct that
//! restricts the other rules (`fromRequires`/`toRequires`) suppresses every
//! allow of the endpoints it selects in that direction.

use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Deserialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub use catena_datapath::policy::Direction;

/// Label carrying a pod's namespace (Cilium's `k8s:io.kubernetes.pod.namespace`).
pub const NAMESPACE_LABEL: &str = "io.kubernetes.pod.namespace";
/// Prefix of a pod's namespace labels in its identity.
pub const NAMESPACE_LABELS_PREFIX: &str = "io.cilium.k8s.namespace.labels.";
/// The pod's service account.
pub const SERVICE_ACCOUNT_LABEL: &str = "io.cilium.k8s.policy.serviceaccount";
/// The cluster name label Cilium gives every pod and injects into peer
/// selectors that do not name a cluster.
pub const CLUSTER_LABEL: &str = "io.cilium.k8s.policy.cluster";
/// Cilium's default `cluster-name`; catena has one cluster.
pub const CLUSTER_NAME: &str = "default";

pub const IP_TCP: u8 = 6;
pub const IP_UDP: u8 = 17;
pub const IP_SCTP: u8 = 132;
pub const IP_ICMP: u8 = 1;
pub const IP_ICMPV6: u8 = 58;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PolicyKind {
    CiliumNetworkPolicy,
    CiliumClusterwideNetworkPolicy,
    NetworkPolicy,
}

impl PolicyKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyKind::CiliumNetworkPolicy => "CiliumNetworkPolicy",
            PolicyKind::CiliumClusterwideNetworkPolicy => "CiliumClusterwideNetworkPolicy",
            PolicyKind::NetworkPolicy => "NetworkPolicy",
        }
    }
}

/// How well a policy could be taken in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum PolicyState {
    /// Enforced exactly as written.
    Ok,
    /// Some parts are unsupported; they were dropped or widened fail-closed.
    Partial,
    /// Nothing of it could be understood (no subject): it selects nothing.
    Invalid,
}

impl PolicyState {
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyState::Ok => "ok",
            PolicyState::Partial => "partial",
            PolicyState::Invalid => "invalid",
        }
    }
}

/// An IPv4 or IPv6 prefix, normalised (host bits cleared). IPv4 prefixes
/// sort before IPv6 ones; a prefix never covers one of the other family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Prefix {
    pub addr: IpAddr,
    pub len: u8,
}

impl Prefix {
    /// `len` is capped at the family's address length.
    pub fn new(addr: IpAddr, len: u8) -> Prefix {
        match addr {
            IpAddr::V4(a) => {
                let len = len.min(32);
                let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
                Prefix {
                    addr: IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask)),
                    len,
                }
            }
            IpAddr::V6(a) => {
                let len = len.min(128);
                let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
                Prefix {
                    addr: IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask)),
                    len,
                }
            }
        }
    }

    /// The address's family length: 32 or 128.
    pub fn max_len(addr: IpAddr) -> u8 {
        if addr.is_ipv4() {
            32
        } else {
            128
        }
    }

    /// The single address (a /32 or /128).
    pub fn host(addr: IpAddr) -> Prefix {
        Prefix::new(addr, Prefix::max_len(addr))
    }

    /// `a.b.c.d/n`, `x:y::z/n` or a bare address (a /32 or /128).
    pub fn parse(s: &str) -> Result<Prefix, String> {
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| format!("invalid CIDR {s:?}"))?;
        let max = Prefix::max_len(addr);
        let len = match len {
            None => max,
            Some(l) => l
                .parse::<u8>()
                .ok()
                .filter(|l| *l <= max)
                .ok_or_else(|| format!("invalid prefix length in {s:?}"))?,
        };
        Ok(Prefix::new(addr, len))
    }

    /// Whether every address of `other` is in `self`.
    pub fn covers(&self, other: &Prefix) -> bool {
        self.addr.is_ipv4() == other.addr.is_ipv4()
            && other.len >= self.len
            && Prefix::new(other.addr, self.len) == *self
    }

    pub fn contains(&self, addr: IpAddr) -> bool {
        self.covers(&Prefix::host(addr))
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// The source a selector key is restricted to (`k8s:app`, `reserved:host`;
/// an unprefixed key and `any:` match every source).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LabelSource {
    Any,
    K8s,
    Reserved,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LabelKey {
    pub source: LabelSource,
    pub key: String,
}

impl LabelKey {
    /// Parses `source:key`. Sources other than `any`, `k8s` and `reserved`
    /// (`container:`, `cidr:`, `unspec:`, ...) never label a catena identity.
    pub fn parse(raw: &str) -> Result<LabelKey, String> {
        let (source, key) = match raw.split_once(':') {
            Some(("any", k)) => (LabelSource::Any, k),
            Some(("k8s", k)) => (LabelSource::K8s, k),
            Some(("reserved", k)) => (LabelSource::Reserved, k),
            Some((s, _)) => {
                return Err(format!(
                    "label source {s:?} in selector key {raw:?} is not supported"
                ))
            }
            None => (LabelSource::Any, raw),
        };
        Ok(LabelKey {
            source,
            key: key.to_string(),
        })
    }

    fn k8s(key: impl Into<String>) -> LabelKey {
        LabelKey {
            source: LabelSource::K8s,
            key: key.into(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Requirement {
    pub key: LabelKey,
    pub op: Op,
    pub values: Vec<String>,
}

/// A label selector over identity labels: every requirement must hold; no
/// requirement selects everything.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Selector {
    pub reqs: Vec<Requirement>,
}

/// The labels of one identity, by source.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IdentityLabels {
    /// Labels from Kubernetes (pods): `app=web`, `io.kubernetes.pod.namespace=ns`, ...
    pub k8s: BTreeMap<String, String>,
    /// Reserved labels (`host`, `world`, ...), valueless.
    pub reserved: Vec<String>,
}

impl IdentityLabels {
    fn get(&self, key: &LabelKey) -> Option<&str> {
        let k8s = || self.k8s.get(&key.key).map(String::as_str);
        let reserved = || self.reserved.contains(&key.key).then_some("");
        match key.source {
            LabelSource::K8s => k8s(),
            LabelSource::Reserved => reserved(),
            LabelSource::Any => k8s().or_else(reserved),
        }
    }

    /// `k8s:app=web` / `reserved:host` strings for display.
    pub fn display(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .reserved
            .iter()
            .map(|r| format!("reserved:{r}"))
            .collect();
        out.extend(self.k8s.iter().map(|(k, v)| format!("k8s:{k}={v}")));
        out
    }
}

impl Selector {
    /// From a Kubernetes `LabelSelector` whose keys may carry Cilium source
    /// prefixes. Unknown operators or sources are errors (the caller decides
    /// what failing closed means for its rule).
    pub fn from_label_selector(sel: &LabelSelector) -> Result<Selector, String> {
        Selector::build(sel, LabelKey::parse, true)
    }

    /// A plain Kubernetes selector (NetworkPolicy): keys are pod label keys,
    /// optionally re-rooted under `prefix` (namespace labels).
    fn from_k8s(sel: &LabelSelector, prefix: &str) -> Result<Selector, String> {
        Selector::build(sel, |k| Ok(LabelKey::k8s(format!("{prefix}{k}"))), false)
    }

    /// `matchLabels` and `matchExpressions` as requirements, each key made
    /// by `key`. `check_values`: `In`/`NotIn` without values is an error
    /// (the API server already refuses it for NetworkPolicy).
    fn build(
        sel: &LabelSelector,
        key: impl Fn(&str) -> Result<LabelKey, String>,
        check_values: bool,
    ) -> Result<Selector, String> {
        let mut reqs = Vec::new();
        for (k, v) in sel.match_labels.iter().flatten() {
            reqs.push(Requirement {
                key: key(k)?,
                op: Op::In,
                values: vec![v.clone()],
            });
        }
        for e in sel.match_expressions.iter().flatten() {
            let op = match e.operator.as_str() {
                "In" => Op::In,
                "NotIn" => Op::NotIn,
                "Exists" => Op::Exists,
                "DoesNotExist" => Op::DoesNotExist,
                other => return Err(format!("unknown selector operator {other:?}")),
            };
            let values = e.values.clone().unwrap_or_default();
            if check_values && matches!(op, Op::In | Op::NotIn) && values.is_empty() {
                return Err(format!(
                    "operator {} on {:?} needs values",
                    e.operator, e.key
                ));
            }
            reqs.push(Requirement {
                key: key(&e.key)?,
                op,
                values,
            });
        }
        Ok(Selector { reqs })
    }

    pub fn matches(&self, labels: &IdentityLabels) -> bool {
        self.reqs.iter().all(|r| {
            let value = labels.get(&r.key);
            match r.op {
                Op::In => value.is_some_and(|v| r.values.iter().any(|x| x == v)),
                Op::NotIn => value.is_none_or(|v| !r.values.iter().any(|x| x == v)),
                Op::Exists => value.is_some(),
                Op::DoesNotExist => value.is_none(),
            }
        })
    }

    fn has_key(&self, key: &str) -> bool {
        self.reqs
            .iter()
            .any(|r| r.key.key == key && r.key.source != LabelSource::Reserved)
    }

    fn has_key_prefix(&self, prefix: &str) -> bool {
        self.reqs
            .iter()
            .any(|r| r.key.key.starts_with(prefix) && r.key.source != LabelSource::Reserved)
    }

    fn has_reserved(&self) -> bool {
        self.reqs
            .iter()
            .any(|r| r.key.source == LabelSource::Reserved)
    }

    fn require(&mut self, key: &str, value: &str) {
        // Upstream's AddMatch overwrites a matchLabels entry of the same key.
        self.reqs.retain(|r| !(r.key.key == key && r.op == Op::In));
        self.reqs.push(Requirement {
            key: LabelKey::k8s(key),
            op: Op::In,
            values: vec![value.to_string()],
        });
    }

    fn require_exists(&mut self, key: &str) {
        self.reqs.push(Requirement {
            key: LabelKey::k8s(key),
            op: Op::Exists,
            values: vec![],
        });
    }
}

/// Entities (`fromEntities`/`toEntities`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Entity {
    All,
    World,
    Cluster,
    Host,
    RemoteNode,
    KubeApiserver,
    Init,
    Health,
    Unmanaged,
    /// Entities that exist upstream but never have members on a catena node
    /// (`ingress`, `none`, `world-ipv6`).
    Nothing,
}

impl Entity {
    pub fn parse(s: &str) -> Option<Entity> {
        Some(match s {
            "all" => Entity::All,
            "world" | "world-ipv4" => Entity::World,
            "cluster" => Entity::Cluster,
            "host" => Entity::Host,
            "remote-node" => Entity::RemoteNode,
            "kube-apiserver" => Entity::KubeApiserver,
            "init" => Entity::Init,
            "health" => Entity::Health,
            "unmanaged" => Entity::Unmanaged,
            "none" | "ingress" | "world-ipv6" => Entity::Nothing,
            _ => return None,
        })
    }
}

/// Whom a rule entry talks to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Peer {
    /// Every identity, including the world (an L4-only rule, `all`, a
    /// NetworkPolicy rule without `from`/`to`).
    Any,
    /// Identities (pods and reserved) whose labels match.
    Endpoints(Selector),
    Entity(Entity),
    /// Addresses outside the cluster in `cidr` but not in any `except`.
    Cidr {
        cidr: Prefix,
        except: Vec<Prefix>,
    },
    /// The backends of the Services matching.
    Service(ServiceSelector),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServiceSelector {
    Name {
        namespace: String,
        name: String,
    },
    Labels {
        namespace: Option<String>,
        selector: Selector,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PortSpec {
    /// Inclusive range; `(0, 0)` is every port.
    Range(u16, u16),
    /// A container port name, resolved against the pods (the subject on
    /// ingress, the peer on egress).
    Named(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortMatch {
    pub proto: u8,
    pub port: PortSpec,
}

/// One allow or deny entry: peers x ports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub direction: Direction,
    pub deny: bool,
    /// Where it came from in the object (`spec.ingress[0]`), for events and CLI.
    pub path: String,
    pub peers: Vec<Peer>,
    /// `None`: every protocol and port.
    pub ports: Option<Vec<PortMatch>>,
}

/// One rule (a CNP `spec`/`specs[i]`, or a whole NetworkPolicy).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// Which endpoints it applies to (namespace scoping already injected).
    pub subject: Selector,
    pub default_deny_ingress: bool,
    pub default_deny_egress: bool,
    /// Set when a construct that restricts the rule's other allows could not
    /// be enforced: selected endpoints get no allow in that direction.
    pub suppress_ingress_allows: Option<String>,
    pub suppress_egress_allows: Option<String>,
    pub entries: Vec<Entry>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParsedPolicy {
    pub kind: PolicyKind,
    /// Empty for a CiliumClusterwideNetworkPolicy.
    pub namespace: String,
    pub name: String,
    pub rules: Vec<Rule>,
    pub state: PolicyState,
    pub messages: Vec<String>,
}

impl ParsedPolicy {
    pub fn display_name(&self) -> String {
        if self.namespace.is_empty() {
            self.name.clone()
        } else {
            format!("{}/{}", self.namespace, self.name)
        }
    }

    fn partial(&mut self, message: String) {
        if self.state == PolicyState::Ok {
            self.state = PolicyState::Partial;
        }
        self.messages.push(message);
    }

    fn invalid(mut self, message: String) -> ParsedPolicy {
        self.state = PolicyState::Invalid;
        self.rules.clear();
        self.messages.push(message);
        self
    }
}

// ---------------------------------------------------------------------------
// Cilium policies (cilium.io/v2). The wire types reject unknown fields so a
// typo (`toPort`) is reported instead of silently widening a rule.

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct WireRule {
    endpoint_selector: Option<LabelSelector>,
    node_selector: Option<LabelSelector>,
    ingress: Option<Vec<Value>>,
    ingress_deny: Option<Vec<Value>>,
    egress: Option<Vec<Value>>,
    egress_deny: Option<Vec<Value>>,
    enable_default_deny: Option<WireDefaultDeny>,
    #[allow(dead_code)]
    labels: Option<Value>,
    #[allow(dead_code)]
    description: Option<String>,
    #[allow(dead_code)]
    log: Option<Value>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct WireDefaultDeny {
    ingress: Option<bool>,
    egress: Option<bool>,
}

/// Ingress and egress rule fields together; which ones a direction allows is
/// checked after parsing.
#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct WirePeerRule {
    from_endpoints: Option<Vec<LabelSelector>>,
    to_endpoints: Option<Vec<LabelSelector>>,
    #[serde(rename = "fromCIDR")]
    from_cidr: Option<Vec<String>>,
    #[serde(rename = "toCIDR")]
    to_cidr: Option<Vec<String>>,
    #[serde(rename = "fromCIDRSet")]
    from_cidr_set: Option<Vec<WireCidrRule>>,
    #[serde(rename = "toCIDRSet")]
    to_cidr_set: Option<Vec<WireCidrRule>>,
    from_entities: Option<Vec<String>>,
    to_entities: Option<Vec<String>>,
    to_services: Option<Vec<WireService>>,
    to_ports: Option<Vec<WirePortRule>>,
    icmps: Option<Vec<WireIcmpRule>>,
    // Parsed only to be refused precisely.
    from_requires: Option<Value>,
    to_requires: Option<Value>,
    #[serde(rename = "toFQDNs")]
    to_fqdns: Option<Value>,
    from_groups: Option<Value>,
    to_groups: Option<Value>,
    from_nodes: Option<Value>,
    to_nodes: Option<Value>,
    authentication: Option<Value>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct WireCidrRule {
    cidr: Option<String>,
    except: Option<Vec<String>>,
    cidr_group_ref: Option<Value>,
    cidr_group_selector: Option<Value>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct WireService {
    k8s_service: Option<WireServiceName>,
    k8s_service_selector: Option<WireServiceSelector>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct WireServiceName {
    service_name: String,
    namespace: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct WireServiceSelector {
    selector: LabelSelector,
    namespace: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct WirePortRule {
    ports: Option<Vec<WirePort>>,
    rules: Option<Value>,
    server_names: Option<Value>,
    #[serde(rename = "originatingTLS")]
    originating_tls: Option<Value>,
    #[serde(rename = "terminatingTLS")]
    terminating_tls: Option<Value>,
    listener: Option<Value>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct WirePort {
    /// A string upstream (`"80"`, `"http"`); a YAML number is accepted too.
    port: Option<Value>,
    end_port: Option<i64>,
    protocol: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct WireIcmpRule {
    fields: Vec<WireIcmpField>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct WireIcmpField {
    family: Option<String>,
    #[serde(rename = "type")]
    type_: Value,
}

/// Parses a CiliumNetworkPolicy or CiliumClusterwideNetworkPolicy object.
pub fn parse_cilium(kind: &str, object: &Value) -> ParsedPolicy {
    let clusterwide = kind == "CiliumClusterwideNetworkPolicy";
    let namespace = if clusterwide {
        String::new()
    } else {
        object["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_string()
    };
    let mut policy = ParsedPolicy {
        kind: if clusterwide {
            PolicyKind::CiliumClusterwideNetworkPolicy
        } else {
            PolicyKind::CiliumNetworkPolicy
        },
        namespace,
        name: object["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        rules: vec![],
        state: PolicyState::Ok,
        messages: vec![],
    };
    let mut specs: Vec<(String, &Value)> = Vec::new();
    if let Some(spec) = object.get("spec").filter(|s| !s.is_null()) {
        specs.push(("spec".into(), spec));
    }
    if let Some(list) = object.get("specs").and_then(|s| s.as_array()) {
        specs.extend(
            list.iter()
                .enumerate()
                .map(|(i, s)| (format!("specs[{i}]"), s)),
        );
    }
    if specs.is_empty() {
        return policy.invalid("has neither spec nor specs".into());
    }
    let mut any_subject = false;
    for (path, spec) in specs {
        let wire: WireRule = match serde_path_to_error::deserialize(spec) {
            Ok(w) => w,
            Err(e) => {
                // Without the rule we do not know whom it meant to protect;
                // upstream's API server would have rejected the object.
                policy.partial(format!("{path}.{}: {}; rule ignored", e.path(), e.inner()));
                continue;
            }
        };
        if let Some(rule) = parse_cilium_rule(&mut policy, &path, wire) {
            any_subject = true;
            policy.rules.push(rule);
        }
    }
    if !any_subject {
        let msg = "no rule with a usable endpointSelector".to_string();
        return policy.invalid(msg);
    }
    policy
}

fn parse_cilium_rule(policy: &mut ParsedPolicy, path: &str, wire: WireRule) -> Option<Rule> {
    let namespace = policy.namespace.clone();
    let mut subject = match (&wire.endpoint_selector, &wire.node_selector) {
        (Some(sel), None) => match Selector::from_label_selector(sel) {
            Ok(s) => s,
            Err(e) => {
                policy.partial(format!("{path}.endpointSelector: {e}; rule ignored"));
                return None;
            }
        },
        (None, Some(_)) => {
            policy.partial(format!(
                "{path}.nodeSelector: host policies are not supported (catena enforces on pod interfaces only); rule ignored"
            ));
            return None;
        }
        (Some(_), Some(_)) => {
            policy.partial(format!(
                "{path}: endpointSelector and nodeSelector are mutually exclusive; rule ignored"
            ));
            return None;
        }
        (None, None) => {
            policy.partial(format!("{path}: no endpointSelector; rule ignored"));
            return None;
        }
    };
    if !namespace.is_empty() {
        // A CNP only ever applies in its own namespace (upstream overrides any
        // namespace the selector names).
        subject.require(NAMESPACE_LABEL, &namespace);
    }
    let has = |v: &Option<Vec<Value>>| v.as_ref().is_some_and(|v| !v.is_empty());
    let dd = wire.enable_default_deny.unwrap_or_default();
    let mut rule = Rule {
        subject,
        // Upstream: default deny in a direction defaults to "the rule has
        // rules (allow or deny) in that direction", unless set explicitly.
        default_deny_ingress: dd
            .ingress
            .unwrap_or(has(&wire.ingress) || has(&wire.ingress_deny)),
        default_deny_egress: dd
            .egress
            .unwrap_or(has(&wire.egress) || has(&wire.egress_deny)),
        suppress_ingress_allows: None,
        suppress_egress_allows: None,
        entries: vec![],
    };
    let sections = [
        ("ingress", Direction::Ingress, false, &wire.ingress),
        ("ingressDeny", Direction::Ingress, true, &wire.ingress_deny),
        ("egress", Direction::Egress, false, &wire.egress),
        ("egressDeny", Direction::Egress, true, &wire.egress_deny),
    ];
    for (field, direction, deny, list) in sections {
        for (i, raw) in list.iter().flatten().enumerate() {
            let entry_path = format!("{path}.{field}[{i}]");
            let ctx = EntryCtx {
                namespace: &namespace,
                direction,
                deny,
                path: &entry_path,
            };
            match parse_peer_rule(&ctx, raw) {
                Ok(parsed) => {
                    for m in parsed.messages {
                        policy.partial(m);
                    }
                    if let Some(reason) = parsed.suppress_allows {
                        match direction {
                            Direction::Ingress => rule.suppress_ingress_allows = Some(reason),
                            Direction::Egress => rule.suppress_egress_allows = Some(reason),
                        }
                    }
                    rule.entries.extend(parsed.entry);
                }
                Err(e) if deny => {
                    policy.partial(format!(
                        "{entry_path}: {e}; deny widened to every peer, port and protocol"
                    ));
                    rule.entries.push(Entry {
                        direction,
                        deny,
                        path: entry_path,
                        peers: vec![Peer::Any],
                        ports: None,
                    });
                }
                Err(e) => policy.partial(format!("{entry_path}: {e}; allow dropped")),
            }
        }
    }
    Some(rule)
}

struct EntryCtx<'a> {
    namespace: &'a str,
    direction: Direction,
    deny: bool,
    path: &'a str,
}

#[derive(Default)]
struct ParsedEntry {
    entry: Option<Entry>,
    messages: Vec<String>,
    suppress_allows: Option<String>,
}

/// Upstream's implicit scoping of a peer selector: reserved selectors as
/// written; otherwise restricted to the policy's namespace (CNP) unless the
/// selector names the namespace or namespace labels, or to pods at all (CCNP);
/// and to the local cluster unless it names one.
fn scope_peer_selector(mut sel: Selector, namespace: &str) -> Selector {
    if sel.has_reserved() {
        return sel;
    }
    if !sel.has_key(NAMESPACE_LABEL) {
        if namespace.is_empty() {
            sel.require_exists(NAMESPACE_LABEL);
        } else if !sel.has_key_prefix(NAMESPACE_LABELS_PREFIX) {
            sel.require(NAMESPACE_LABEL, namespace);
        }
    }
    if !sel.has_key(CLUSTER_LABEL) {
        sel.require(CLUSTER_LABEL, CLUSTER_NAME);
    }
    sel
}

fn parse_peer_rule(ctx: &EntryCtx, raw: &Value) -> Result<ParsedEntry, String> {
    let w: WirePeerRule = serde_path_to_error::deserialize(raw)
        .map_err(|e| format!("{}: {}", e.path(), e.inner()))?;
    let ingress = ctx.direction == Direction::Ingress;
    // Fields of the other direction are a schema error upstream.
    let wrong = if ingress {
        [
            ("toEndpoints", w.to_endpoints.is_some()),
            ("toCIDR", w.to_cidr.is_some()),
            ("toCIDRSet", w.to_cidr_set.is_some()),
            ("toEntities", w.to_entities.is_some()),
            ("toServices", w.to_services.is_some()),
            ("toRequires", w.to_requires.is_some()),
            ("toFQDNs", w.to_fqdns.is_some()),
            ("toGroups", w.to_groups.is_some()),
            ("toNodes", w.to_nodes.is_some()),
        ]
    } else {
        [
            ("fromEndpoints", w.from_endpoints.is_some()),
            ("fromCIDR", w.from_cidr.is_some()),
            ("fromCIDRSet", w.from_cidr_set.is_some()),
            ("fromEntities", w.from_entities.is_some()),
            ("fromRequires", w.from_requires.is_some()),
            ("fromGroups", w.from_groups.is_some()),
            ("fromNodes", w.from_nodes.is_some()),
            ("toServices", false),
            ("toFQDNs", false),
        ]
    };
    if let Some((field, _)) = wrong.iter().find(|(_, set)| *set) {
        return Err(format!(
            "{field} is not a field of an {} rule",
            if ingress { "ingress" } else { "egress" }
        ));
    }
    let mut out = ParsedEntry::default();
    let endpoints = if ingress {
        &w.from_endpoints
    } else {
        &w.to_endpoints
    };
    let cidrs = if ingress { &w.from_cidr } else { &w.to_cidr };
    let cidr_sets = if ingress {
        &w.from_cidr_set
    } else {
        &w.to_cidr_set
    };
    let entities = if ingress {
        &w.from_entities
    } else {
        &w.to_entities
    };
    let requires = if ingress {
        &w.from_requires
    } else {
        &w.to_requires
    };
    let groups = if ingress {
        &w.from_groups
    } else {
        &w.to_groups
    };
    let nodes = if ingress { &w.from_nodes } else { &w.to_nodes };

    // Constructs that cannot be enforced without an L7 proxy, a DNS proxy, a
    // cloud provider or node objects: name them so the caller fails closed.
    let mut unsupported_peers = Vec::new();
    if w.to_fqdns.is_some() {
        unsupported_peers.push("toFQDNs (needs a DNS proxy)");
    }
    if groups.is_some() {
        unsupported_peers.push(if ingress { "fromGroups" } else { "toGroups" });
    }
    if nodes.is_some() {
        unsupported_peers.push(if ingress { "fromNodes" } else { "toNodes" });
    }
    if w.authentication.is_some() && !ctx.deny {
        return Err("authentication (mutual auth) is not supported".into());
    }
    if requires.is_some() {
        let field = if ingress {
            "fromRequires"
        } else {
            "toRequires"
        };
        let reason = format!(
            "{}: {field} is not supported; every allow of the selected endpoints in this direction is suppressed",
            ctx.path
        );
        out.messages.push(reason.clone());
        out.suppress_allows = Some(reason);
    }

    let mut peers = Vec::new();
    let mut l3_given = false;
    for (i, sel) in endpoints.iter().flatten().enumerate() {
        l3_given = true;
        let s = Selector::from_label_selector(sel).map_err(|e| format!("endpoints[{i}]: {e}"))?;
        peers.push(Peer::Endpoints(scope_peer_selector(s, ctx.namespace)));
    }
    for c in cidrs.iter().flatten() {
        l3_given = true;
        peers.push(Peer::Cidr {
            cidr: Prefix::parse(c)?,
            except: vec![],
        });
    }
    for set in cidr_sets.iter().flatten() {
        l3_given = true;
        if set.cidr_group_ref.is_some() || set.cidr_group_selector.is_some() {
            unsupported_peers.push("CiliumCIDRGroup references");
            continue;
        }
        let raw = set.cidr.as_deref().ok_or("a CIDR set entry has no cidr")?;
        let cidr = Prefix::parse(raw)?;
        let mut except = Vec::new();
        for e in set.except.iter().flatten() {
            let p = Prefix::parse(e)?;
            if !cidr.covers(&p) {
                // Upstream rejects it; ignoring it is exact (it removes nothing).
                out.messages.push(format!(
                    "{}: except {e} is not inside {raw}; ignored",
                    ctx.path
                ));
                continue;
            }
            except.push(p);
        }
        peers.push(Peer::Cidr { cidr, except });
    }
    for e in entities.iter().flatten() {
        l3_given = true;
        let entity = Entity::parse(e).ok_or_else(|| format!("unknown entity {e:?}"))?;
        peers.push(Peer::Entity(entity));
    }
    for (i, svc) in w.to_services.iter().flatten().enumerate() {
        l3_given = true;
        match (&svc.k8s_service, &svc.k8s_service_selector) {
            (Some(n), None) => peers.push(Peer::Service(ServiceSelector::Name {
                namespace: n
                    .namespace
                    .clone()
                    .unwrap_or_else(|| default_ns(ctx.namespace)),
                name: n.service_name.clone(),
            })),
            (None, Some(s)) => {
                let selector = Selector::from_label_selector(&s.selector)
                    .map_err(|e| format!("toServices[{i}]: {e}"))?;
                let namespace = s
                    .namespace
                    .clone()
                    .or_else(|| (!ctx.namespace.is_empty()).then(|| ctx.namespace.to_string()));
                peers.push(Peer::Service(ServiceSelector::Labels {
                    namespace,
                    selector,
                }));
            }
            _ => {
                return Err(format!(
                    "toServices[{i}] needs exactly one of k8sService and k8sServiceSelector"
                ))
            }
        }
    }
    if !unsupported_peers.is_empty() {
        let what = unsupported_peers.join(", ");
        if !ctx.deny {
            return Err(format!("{what} not supported"));
        }
        // A deny must still deny at least what it named: widen to everyone.
        out.messages.push(format!(
            "{}: {what} not supported; deny widened to every peer",
            ctx.path
        ));
        peers = vec![Peer::Any];
        l3_given = true;
    }

    // L4: toPorts and icmps add up; neither means every protocol and port.
    let mut ports: Option<Vec<PortMatch>> = None;
    let mut l4_given = false;
    for (i, pr) in w.to_ports.iter().flatten().enumerate() {
        l4_given = true;
        let l7 = [
            (
                "rules (L7)",
                pr.rules.as_ref().is_some_and(|r| !is_empty_value(r)),
            ),
            ("serverNames", pr.server_names.is_some()),
            ("originatingTLS", pr.originating_tls.is_some()),
            ("terminatingTLS", pr.terminating_tls.is_some()),
            ("listener", pr.listener.is_some()),
        ];
        if let Some((what, _)) = l7.iter().find(|(_, set)| *set) {
            if ctx.deny {
                // Upstream deny port rules carry no L7; be safe anyway and
                // deny the ports without the L7 condition.
                out.messages.push(format!(
                    "{}: toPorts[{i}].{what} ignored in a deny (the ports are denied outright)",
                    ctx.path
                ));
            } else {
                out.messages.push(format!(
                    "{}: toPorts[{i}] has {what}, which needs an L7 proxy; that port rule is dropped (its traffic stays denied)",
                    ctx.path
                ));
                continue;
            }
        }
        let list = ports.get_or_insert_with(Vec::new);
        match &pr.ports {
            // `toPorts` entry without ports: every port, per protocol.
            None => list.extend(expand_protocol(None)?.into_iter().map(any_port)),
            Some(ps) if ps.is_empty() => {
                list.extend(expand_protocol(None)?.into_iter().map(any_port))
            }
            Some(ps) => {
                for (j, p) in ps.iter().enumerate() {
                    let spec = parse_port(p.port.as_ref(), p.end_port)
                        .map_err(|e| format!("toPorts[{i}].ports[{j}]: {e}"))?;
                    for proto in expand_protocol(p.protocol.as_deref())
                        .map_err(|e| format!("toPorts[{i}].ports[{j}]: {e}"))?
                    {
                        list.push(PortMatch {
                            proto,
                            port: spec.clone(),
                        });
                    }
                }
            }
        }
    }
    for (i, icmp) in w.icmps.iter().flatten().enumerate() {
        l4_given = true;
        let list = ports.get_or_insert_with(Vec::new);
        for (j, f) in icmp.fields.iter().enumerate() {
            let (proto, t) = match f.family.as_deref().unwrap_or("IPv4") {
                "IPv4" => (IP_ICMP, icmp_type(&f.type_)),
                "IPv6" => (IP_ICMPV6, icmp6_type(&f.type_)),
                other => return Err(format!("icmps[{i}].fields[{j}]: unknown family {other:?}")),
            };
            let t = t.map_err(|e| format!("icmps[{i}].fields[{j}]: {e}"))?;
            list.push(PortMatch {
                proto,
                port: PortSpec::Range(u16::from(t), u16::from(t)),
            });
        }
    }
    if l4_given && ports.as_ref().is_none_or(|p| p.is_empty()) {
        // Every L4 condition was dropped: allowing "any port" instead would
        // widen the rule, denying it would deny what was not written.
        // Nothing remains.
        return Ok(out);
    }
    if !l3_given {
        if !l4_given {
            // `ingress: [{}]`: selects no peer (upstream's way of writing
            // "default deny, allow nothing").
            return Ok(out);
        }
        // An L4-only rule applies to every peer (upstream wildcards L3).
        peers.push(Peer::Any);
    }
    if peers.is_empty() {
        return Ok(out);
    }
    out.entry = Some(Entry {
        direction: ctx.direction,
        deny: ctx.deny,
        path: ctx.path.to_string(),
        peers,
        ports,
    });
    Ok(out)
}

fn default_ns(ns: &str) -> String {
    if ns.is_empty() {
        "default".into()
    } else {
        ns.into()
    }
}

fn is_empty_value(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Object(m) => m.values().all(is_empty_value),
        Value::Array(a) => a.is_empty(),
        _ => false,
    }
}

fn any_port(proto: u8) -> PortMatch {
    PortMatch {
        proto,
        port: PortSpec::Range(0, 0),
    }
}

/// Cilium's protocol: `ANY` (or unset) is TCP, UDP and SCTP — never ICMP,
/// which only `icmps` allows.
fn expand_protocol(p: Option<&str>) -> Result<Vec<u8>, String> {
    Ok(match p.unwrap_or("ANY") {
        "TCP" => vec![IP_TCP],
        "UDP" => vec![IP_UDP],
        "SCTP" => vec![IP_SCTP],
        "ANY" => vec![IP_TCP, IP_UDP, IP_SCTP],
        other => return Err(format!("unsupported protocol {other:?}")),
    })
}

fn parse_port(port: Option<&Value>, end_port: Option<i64>) -> Result<PortSpec, String> {
    let text = match port {
        None | Some(Value::Null) => "0".to_string(),
        Some(Value::Number(n)) => n.to_string(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => return Err(format!("invalid port {other}")),
    };
    let start = match text.parse::<u32>() {
        Ok(p) if p <= 65535 => p as u16,
        Ok(p) => return Err(format!("port {p} out of range")),
        Err(_) => {
            if end_port.is_some_and(|e| e != 0) {
                return Err(format!("endPort cannot be used with named port {text:?}"));
            }
            return Ok(PortSpec::Named(text.to_ascii_lowercase()));
        }
    };
    port_range(start, end_port)
}

fn port_range(start: u16, end_port: Option<i64>) -> Result<PortSpec, String> {
    match end_port {
        None | Some(0) => Ok(PortSpec::Range(start, start)),
        Some(_) if start == 0 => Err("endPort needs a port".into()),
        Some(e) => {
            let end = u16::try_from(e).map_err(|_| format!("endPort {e} out of range"))?;
            if end < start {
                return Err(format!("endPort {end} is below port {start}"));
            }
            Ok(PortSpec::Range(start, end))
        }
    }
}

/// ICMP type by number or by upstream's names (IPv4).
fn icmp_type(v: &Value) -> Result<u8, String> {
    if let Some(n) = v.as_u64() {
        return u8::try_from(n).map_err(|_| format!("ICMP type {n} out of range"));
    }
    let s = v.as_str().ok_or("ICMP type must be a number or a name")?;
    if let Ok(n) = s.parse::<u8>() {
        return Ok(n);
    }
    Ok(match s {
        "EchoReply" => 0,
        "DestinationUnreachable" => 3,
        "Redirect" => 5,
        "Echo" | "EchoRequest" => 8,
        "RouterAdvertisement" => 9,
        "RouterSelection" => 10,
        "TimeExceeded" => 11,
        "ParameterProblem" => 12,
        "Timestamp" => 13,
        "TimestampReply" => 14,
        "Photuris" => 40,
        "ExtendedEchoRequest" => 42,
        "ExtendedEchoReply" => 43,
        other => return Err(format!("unknown ICMP type {other:?}")),
    })
}

/// ICMPv6 type by number or by upstream's names.
fn icmp6_type(v: &Value) -> Result<u8, String> {
    if let Some(n) = v.as_u64() {
        return u8::try_from(n).map_err(|_| format!("ICMPv6 type {n} out of range"));
    }
    let s = v.as_str().ok_or("ICMPv6 type must be a number or a name")?;
    if let Ok(n) = s.parse::<u8>() {
        return Ok(n);
    }
    Ok(match s {
        "DestinationUnreachable" => 1,
        "PacketTooBig" => 2,
        "TimeExceeded" => 3,
        "ParameterProblem" => 4,
        "Echo" | "EchoRequest" => 128,
        "EchoReply" => 129,
        "MulticastListenerQuery" => 130,
        "MulticastListenerReport" => 131,
        "MulticastListenerDone" => 132,
        "RouterSolicitation" => 133,
        "RouterAdvertisement" => 134,
        "NeighborSolicitation" => 135,
        "NeighborAdvertisement" => 136,
        "RedirectMessage" => 137,
        "RouterRenumbering" => 138,
        "ICMPNodeInformationQuery" => 139,
        "ICMPNodeInformationResponse" => 140,
        "InverseNeighborDiscoverySolicitation" => 141,
        "InverseNeighborDiscoveryAdvertisement" => 142,
        "HomeAgentAddressDiscoveryRequest" => 144,
        "HomeAgentAddressDiscoveryReply" => 145,
        "MobilePrefixSolicitation" => 146,
        "MobilePrefixAdvertisement" => 147,
        "DuplicateAddressRequestCodeSuffix" => 157,
        "DuplicateAddressConfirmationCodeSuffix" => 158,
        "ExtendedEchoRequest" => 160,
        "ExtendedEchoReply" => 161,
        other => return Err(format!("unknown ICMPv6 type {other:?}")),
    })
}

// ---------------------------------------------------------------------------
// Kubernetes NetworkPolicy (networking.k8s.io/v1), expressed in the same
// terms the way upstream Cilium translates it.

pub fn parse_network_policy(np: &NetworkPolicy) -> ParsedPolicy {
    let namespace = np
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let mut policy = ParsedPolicy {
        kind: PolicyKind::NetworkPolicy,
        namespace: namespace.clone(),
        name: np.metadata.name.clone().unwrap_or_default(),
        rules: vec![],
        state: PolicyState::Ok,
        messages: vec![],
    };
    let Some(spec) = &np.spec else {
        return policy.invalid("has no spec".into());
    };
    let mut subject = match Selector::from_k8s(
        spec.pod_selector
            .as_ref()
            .unwrap_or(&LabelSelector::default()),
        "",
    ) {
        Ok(s) => s,
        Err(e) => return policy.invalid(format!("spec.podSelector: {e}")),
    };
    subject.require(NAMESPACE_LABEL, &namespace);
    // API defaulting: Ingress always, Egress when egress rules exist.
    let types: Vec<String> = match &spec.policy_types {
        Some(t) if !t.is_empty() => t.clone(),
        _ => {
            let mut t = vec!["Ingress".to_string()];
            if spec.egress.as_ref().is_some_and(|e| !e.is_empty()) {
                t.push("Egress".into());
            }
            t
        }
    };
    let mut rule = Rule {
        subject,
        default_deny_ingress: types.iter().any(|t| t == "Ingress"),
        default_deny_egress: types.iter().any(|t| t == "Egress"),
        suppress_ingress_allows: None,
        suppress_egress_allows: None,
        entries: vec![],
    };
    let mut sections: Vec<NpSection> = Vec::new();
    // Rules of a direction not in policyTypes have no effect (API semantics).
    if rule.default_deny_ingress {
        for (i, r) in spec.ingress.iter().flatten().enumerate() {
            sections.push((
                Direction::Ingress,
                format!("spec.ingress[{i}]"),
                r.from.as_ref(),
                r.ports.as_ref(),
            ));
        }
    }
    if rule.default_deny_egress {
        for (i, r) in spec.egress.iter().flatten().enumerate() {
            sections.push((
                Direction::Egress,
                format!("spec.egress[{i}]"),
                r.to.as_ref(),
                r.ports.as_ref(),
            ));
        }
    }
    for (direction, path, peers, ports) in sections {
        match np_entry(&namespace, direction, &path, peers, ports) {
            Ok(Some(e)) => rule.entries.push(e),
            Ok(None) => {}
            Err(e) => policy.partial(format!("{path}: {e}; allow dropped")),
        }
    }
    policy.rules.push(rule);
    policy
}

/// A NetworkPolicy rule: direction, path, peers, ports.
type NpSection<'a> = (
    Direction,
    String,
    Option<&'a Vec<NetworkPolicyPeer>>,
    Option<&'a Vec<NetworkPolicyPort>>,
);

fn np_entry(
    namespace: &str,
    direction: Direction,
    path: &str,
    peers: Option<&Vec<NetworkPolicyPeer>>,
    ports: Option<&Vec<NetworkPolicyPort>>,
) -> Result<Option<Entry>, String> {
    let mut out = Vec::new();
    match peers {
        // An empty or missing from/to matches every source/destination.
        None => out.push(Peer::Any),
        Some(list) if list.is_empty() => out.push(Peer::Any),
        Some(list) => {
            for (i, p) in list.iter().enumerate() {
                out.push(np_peer(namespace, p).map_err(|e| format!("peers[{i}]: {e}"))?);
            }
        }
    }
    let ports = match ports {
        None => None,
        Some(list) if list.is_empty() => None,
        Some(list) => {
            let mut v = Vec::new();
            for (i, p) in list.iter().enumerate() {
                let proto = match p.protocol.as_deref().unwrap_or("TCP") {
                    "TCP" => IP_TCP,
                    "UDP" => IP_UDP,
                    "SCTP" => IP_SCTP,
                    other => return Err(format!("ports[{i}]: unsupported protocol {other:?}")),
                };
                let spec = match &p.port {
                    None => PortSpec::Range(0, 0),
                    Some(IntOrString::Int(n)) => {
                        let start = u16::try_from(*n)
                            .ok()
                            .filter(|n| *n != 0)
                            .ok_or_else(|| format!("ports[{i}]: port {n} out of range"))?;
                        port_range(start, p.end_port.map(i64::from))
                            .map_err(|e| format!("ports[{i}]: {e}"))?
                    }
                    Some(IntOrString::String(name)) => {
                        if p.end_port.is_some() {
                            return Err(format!(
                                "ports[{i}]: endPort cannot be used with a named port"
                            ));
                        }
                        PortSpec::Named(name.to_ascii_lowercase())
                    }
                };
                v.push(PortMatch { proto, port: spec });
            }
            Some(v)
        }
    };
    Ok(Some(Entry {
        direction,
        deny: false,
        path: path.to_string(),
        peers: out,
        ports,
    }))
}

fn np_peer(namespace: &str, p: &NetworkPolicyPeer) -> Result<Peer, String> {
    if let Some(block) = &p.ip_block {
        if p.pod_selector.is_some() || p.namespace_selector.is_some() {
            return Err("ipBlock cannot be combined with selectors".into());
        }
        let cidr = Prefix::parse(&block.cidr)?;
        let mut except = Vec::new();
        for e in block.except.iter().flatten() {
            let p = Prefix::parse(e)?;
            if cidr.covers(&p) {
                except.push(p);
            }
        }
        return Ok(Peer::Cidr { cidr, except });
    }
    let mut sel = match &p.pod_selector {
        Some(s) => Selector::from_k8s(s, "")?,
        None => Selector::default(),
    };
    match &p.namespace_selector {
        None if p.pod_selector.is_none() => {
            return Err("a peer needs podSelector, namespaceSelector or ipBlock".into())
        }
        // podSelector alone: pods of the policy's namespace.
        None => sel.require(NAMESPACE_LABEL, namespace),
        Some(ns) => {
            let ns_sel = Selector::from_k8s(ns, NAMESPACE_LABELS_PREFIX)?;
            // Both: AND. An empty namespaceSelector: every namespace, i.e.
            // every pod (never the host or the world).
            sel.reqs.extend(ns_sel.reqs);
            sel.require_exists(NAMESPACE_LABEL);
        }
    }
    sel.require(CLUSTER_LABEL, CLUSTER_NAME);
    Ok(Peer::Endpoints(sel))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(pairs: &[(&str, &str)]) -> IdentityLabels {
        IdentityLabels {
            k8s: pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            reserved: vec![],
        }
    }

    #[test]
    fn prefixes() {
        let p = Prefix::parse("10.1.2.3/16").unwrap();
        assert_eq!(p.to_string(), "10.1.0.0/16");
        assert!(p.contains("10.1.255.1".parse().unwrap()));
        assert!(!p.contains("10.2.0.1".parse().unwrap()));
        assert!(p.covers(&Prefix::parse("10.1.3.0/24").unwrap()));
        assert!(!p.covers(&Prefix::parse("10.0.0.0/8").unwrap()));
        assert_eq!(Prefix::parse("1.2.3.4").unwrap().len, 32);
        assert!(Prefix::parse("10.0.0.0/33").is_err());
        assert!(Prefix::parse("nonsense").is_err());

        let p6 = Prefix::parse("fd00:10:244:6::1234/64").unwrap();
        assert_eq!(p6.to_string(), "fd00:10:244:6::/64");
        assert!(p6.contains("fd00:10:244:6::9".parse().unwrap()));
        assert!(!p6.contains("fd00:10:244:7::9".parse().unwrap()));
        assert!(p6.covers(&Prefix::parse("fd00:10:244:6:8000::/65").unwrap()));
        assert_eq!(Prefix::parse("::1").unwrap().len, 128);
        assert_eq!(Prefix::parse("::/0").unwrap().len, 0);
        assert!(Prefix::parse("fd00::/129").is_err());
        // The families never cover each other, not even at /0.
        assert!(!Prefix::parse("0.0.0.0/0").unwrap().covers(&p6));
        assert!(!Prefix::parse("::/0").unwrap().covers(&p));
        assert!(!Prefix::parse("::/0").unwrap().contains(
            "::ffff:10.1.0.1"
                .parse::<Ipv6Addr>()
                .unwrap()
                .to_canonical()
        ));
    }

    #[test]
    fn label_sources() {
        let labels = IdentityLabels {
            k8s: BTreeMap::from([("app".into(), "web".into())]),
            reserved: vec!["host".into()],
        };
        let sel = |k: &str, v: &str| Selector {
            reqs: vec![Requirement {
                key: LabelKey::parse(k).unwrap(),
                op: Op::In,
                values: vec![v.into()],
            }],
        };
        assert!(sel("app", "web").matches(&labels));
        assert!(sel("k8s:app", "web").matches(&labels));
        assert!(sel("any:app", "web").matches(&labels));
        assert!(!sel("reserved:app", "web").matches(&labels));
        assert!(sel("reserved:host", "").matches(&labels));
        assert!(!sel("k8s:host", "").matches(&labels));
        assert!(LabelKey::parse("container:x").is_err());
    }

    #[test]
    fn cnp_peer_selectors_are_scoped_like_upstream() {
        let cnp = json!({
            "metadata": {"name": "p", "namespace": "shop"},
            "spec": {
                "endpointSelector": {"matchLabels": {"app": "db", "io.kubernetes.pod.namespace": "other"}},
                "ingress": [
                    {"fromEndpoints": [{}]},
                    {"fromEndpoints": [{"matchLabels": {"k8s:io.kubernetes.pod.namespace": "ops"}}]},
                    {"fromEndpoints": [{"matchLabels": {"io.cilium.k8s.namespace.labels.team": "a"}}]},
                    {"fromEndpoints": [{"matchLabels": {"reserved:host": ""}}]}
                ]
            }
        });
        let p = parse_cilium("CiliumNetworkPolicy", &cnp);
        assert_eq!(p.state, PolicyState::Ok, "{:?}", p.messages);
        let rule = &p.rules[0];
        let in_shop = pod(&[
            ("app", "db"),
            (NAMESPACE_LABEL, "shop"),
            (CLUSTER_LABEL, "default"),
        ]);
        let in_other = pod(&[
            ("app", "db"),
            (NAMESPACE_LABEL, "other"),
            (CLUSTER_LABEL, "default"),
        ]);
        assert!(
            rule.subject.matches(&in_shop),
            "the subject is forced into the policy namespace"
        );
        assert!(!rule.subject.matches(&in_other));
        let peer = |i: usize| match &rule.entries[i].peers[0] {
            Peer::Endpoints(s) => s.clone(),
            other => panic!("{other:?}"),
        };
        assert!(
            peer(0).matches(&in_shop),
            "{{}} is every pod of the namespace"
        );
        assert!(!peer(0).matches(&in_other));
        let ops = pod(&[(NAMESPACE_LABEL, "ops"), (CLUSTER_LABEL, "default")]);
        assert!(peer(1).matches(&ops) && !peer(1).matches(&in_shop));
        let team_a = pod(&[
            (NAMESPACE_LABEL, "x"),
            ("io.cilium.k8s.namespace.labels.team", "a"),
            (CLUSTER_LABEL, "default"),
        ]);
        assert!(
            peer(2).matches(&team_a),
            "namespace labels select across namespaces"
        );
        let host = IdentityLabels {
            k8s: BTreeMap::new(),
            reserved: vec!["host".into()],
        };
        assert!(
            peer(3).matches(&host),
            "reserved selectors are not namespace-scoped"
        );
    }

    #[test]
    fn ccnp_empty_selector_means_every_pod() {
        let ccnp = json!({
            "metadata": {"name": "c"},
            "spec": {"endpointSelector": {}, "egress": [{"toEndpoints": [{}]}]}
        });
        let p = parse_cilium("CiliumClusterwideNetworkPolicy", &ccnp);
        let Peer::Endpoints(sel) = &p.rules[0].entries[0].peers[0] else {
            panic!()
        };
        assert!(sel.matches(&pod(&[
            (NAMESPACE_LABEL, "any"),
            (CLUSTER_LABEL, "default")
        ])));
        let host = IdentityLabels {
            k8s: BTreeMap::new(),
            reserved: vec!["host".into()],
        };
        assert!(!sel.matches(&host));
        assert!(
            p.rules[0].subject.reqs.is_empty(),
            "CCNP subject is not namespaced"
        );
        assert!(p.rules[0].default_deny_egress && !p.rules[0].default_deny_ingress);
    }

    #[test]
    fn default_deny_follows_sections_and_enable_default_deny() {
        let mk = |spec: Value| {
            parse_cilium(
                "CiliumNetworkPolicy",
                &json!({"metadata": {"name": "p"}, "spec": spec}),
            )
        };
        let p = mk(json!({"endpointSelector": {}, "ingressDeny": [{"fromEntities": ["world"]}]}));
        assert!(
            p.rules[0].default_deny_ingress,
            "deny rules also turn on default deny"
        );
        let p = mk(
            json!({"endpointSelector": {}, "ingress": [{}], "enableDefaultDeny": {"ingress": false}}),
        );
        assert!(!p.rules[0].default_deny_ingress);
        assert!(
            p.rules[0].entries.is_empty(),
            "`ingress: [{{}}]` allows nothing"
        );
        let p = mk(json!({"endpointSelector": {}, "enableDefaultDeny": {"egress": true}}));
        assert!(p.rules[0].default_deny_egress);
    }

    #[test]
    fn ports_and_icmp() {
        let p = parse_cilium(
            "CiliumNetworkPolicy",
            &json!({"metadata": {"name": "p"}, "spec": {"endpointSelector": {}, "ingress": [
                {"toPorts": [{"ports": [{"port": "8000", "endPort": 8010, "protocol": "TCP"}, {"port": "http"}, {"port": 53, "protocol": "UDP"}]}],
                 "icmps": [{"fields": [{"type": 8}, {"type": "EchoReply"}, {"family": "IPv6", "type": 128}]}]}
            ]}}),
        );
        assert_eq!(p.state, PolicyState::Ok, "{:?}", p.messages);
        let e = &p.rules[0].entries[0];
        assert_eq!(
            e.peers,
            vec![Peer::Any],
            "an L4-only rule applies to every peer"
        );
        let ports = e.ports.as_ref().unwrap();
        assert_eq!(
            ports[0],
            PortMatch {
                proto: IP_TCP,
                port: PortSpec::Range(8000, 8010)
            }
        );
        let named: Vec<u8> = ports
            .iter()
            .filter(|p| p.port == PortSpec::Named("http".into()))
            .map(|p| p.proto)
            .collect();
        assert_eq!(named, [IP_TCP, IP_UDP, IP_SCTP], "ANY is TCP, UDP and SCTP");
        assert!(ports.contains(&PortMatch {
            proto: IP_UDP,
            port: PortSpec::Range(53, 53)
        }));
        assert!(ports.contains(&PortMatch {
            proto: IP_ICMP,
            port: PortSpec::Range(8, 8)
        }));
        assert!(ports.contains(&PortMatch {
            proto: IP_ICMP,
            port: PortSpec::Range(0, 0)
        }));
        assert_eq!(ports.iter().filter(|p| p.proto == IP_ICMP).count(), 2);
        assert_eq!(
            ports
                .iter()
                .filter(|p| p.proto == IP_ICMPV6)
                .collect::<Vec<_>>(),
            [&PortMatch {
                proto: IP_ICMPV6,
                port: PortSpec::Range(128, 128)
            }],
            "ICMPv6 types are their own protocol's ports"
        );
    }

    #[test]
    fn unsupported_constructs_fail_closed() {
        let p = parse_cilium(
            "CiliumNetworkPolicy",
            &json!({"metadata": {"name": "p", "namespace": "n"}, "spec": {"endpointSelector": {},
                "ingress": [
                    {"fromEndpoints": [{}], "toPorts": [{"ports": [{"port": "80"}], "rules": {"http": [{"method": "GET"}]}}]},
                    {"fromEndpoints": [{}], "toPorts": [{"ports": [{"port": "81"}], "rules": {"http": [{}]}}, {"ports": [{"port": "82"}]}]},
                    {"fromEndpoints": [{}], "toPort": [{"ports": [{"port": "83"}]}]}
                ],
                "egress": [{"toFQDNs": [{"matchName": "example.com"}]}, {"toRequires": [{}]}],
                "egressDeny": [{"toGroups": [{"aws": {}}], "toPorts": [{"ports": [{"port": "443"}]}]}]
            }}),
        );
        assert_eq!(p.state, PolicyState::Partial);
        let rule = &p.rules[0];
        let allows: Vec<&Entry> = rule.entries.iter().filter(|e| !e.deny).collect();
        assert_eq!(allows.len(), 1, "{allows:?}");
        assert_eq!(allows[0].path, "spec.ingress[1]");
        assert_eq!(
            allows[0]
                .ports
                .as_deref()
                .unwrap()
                .iter()
                .map(|p| p.port.clone())
                .collect::<Vec<_>>(),
            vec![PortSpec::Range(82, 82); 3],
            "only the L7-free port rule survives"
        );
        assert!(rule.suppress_egress_allows.is_some());
        let deny = rule.entries.iter().find(|e| e.deny).unwrap();
        assert_eq!(
            deny.peers,
            vec![Peer::Any],
            "a deny with unknown peers is widened"
        );
        assert!(deny.ports.is_some(), "but keeps its ports");
        let all = p.messages.join("\n");
        for needle in ["L7 proxy", "toPort", "toFQDNs", "toRequires", "toGroups"] {
            assert!(all.contains(needle), "{needle} not reported in {all}");
        }
        let p = parse_cilium(
            "CiliumClusterwideNetworkPolicy",
            &json!({"metadata": {"name": "h"}, "spec": {"nodeSelector": {}, "ingress": [{}]}}),
        );
        assert_eq!(p.state, PolicyState::Invalid);
        assert!(p.messages[0].contains("nodeSelector"), "{:?}", p.messages);
    }

    #[test]
    fn network_policy_translation() {
        let np: NetworkPolicy = serde_json::from_value(json!({
            "metadata": {"name": "np", "namespace": "shop"},
            "spec": {
                "podSelector": {"matchLabels": {"app": "db"}},
                "ingress": [
                    {"from": [{"podSelector": {"matchLabels": {"app": "web"}}},
                              {"namespaceSelector": {"matchLabels": {"team": "ops"}}, "podSelector": {}},
                              {"ipBlock": {"cidr": "192.168.0.0/16", "except": ["192.168.1.0/24"]}}],
                     "ports": [{"port": 5432}, {"port": "metrics", "protocol": "TCP"}, {"protocol": "UDP", "port": 7000, "endPort": 7010}]},
                    {}
                ],
                "egress": [{"to": [{"namespaceSelector": {}}]}]
            }
        }))
        .unwrap();
        let p = parse_network_policy(&np);
        assert_eq!(p.state, PolicyState::Ok, "{:?}", p.messages);
        let r = &p.rules[0];
        assert!(
            r.default_deny_ingress && r.default_deny_egress,
            "egress rules imply Egress"
        );
        let web_here = pod(&[
            ("app", "web"),
            (NAMESPACE_LABEL, "shop"),
            (CLUSTER_LABEL, "default"),
        ]);
        let web_there = pod(&[
            ("app", "web"),
            (NAMESPACE_LABEL, "x"),
            (CLUSTER_LABEL, "default"),
        ]);
        let ops = pod(&[
            (NAMESPACE_LABEL, "x"),
            ("io.cilium.k8s.namespace.labels.team", "ops"),
            (CLUSTER_LABEL, "default"),
        ]);
        let Peer::Endpoints(s0) = &r.entries[0].peers[0] else {
            panic!()
        };
        let Peer::Endpoints(s1) = &r.entries[0].peers[1] else {
            panic!()
        };
        assert!(s0.matches(&web_here) && !s0.matches(&web_there));
        assert!(s1.matches(&ops) && !s1.matches(&web_there));
        assert_eq!(
            r.entries[0].peers[2],
            Peer::Cidr {
                cidr: Prefix::parse("192.168.0.0/16").unwrap(),
                except: vec![Prefix::parse("192.168.1.0/24").unwrap()]
            }
        );
        let ports = r.entries[0].ports.as_ref().unwrap();
        assert_eq!(
            ports[0],
            PortMatch {
                proto: IP_TCP,
                port: PortSpec::Range(5432, 5432)
            }
        );
        assert_eq!(ports[1].port, PortSpec::Named("metrics".into()));
        assert_eq!(
            ports[2],
            PortMatch {
                proto: IP_UDP,
                port: PortSpec::Range(7000, 7010)
            }
        );
        assert_eq!(
            r.entries[1].peers,
            vec![Peer::Any],
            "`ingress: [{{}}]` allows everything"
        );
        assert_eq!(r.entries[1].ports, None);
        let Peer::Endpoints(all_ns) = &r.entries[2].peers[0] else {
            panic!()
        };
        assert!(
            all_ns.matches(&web_there)
                && !all_ns.matches(&IdentityLabels {
                    k8s: BTreeMap::new(),
                    reserved: vec!["world".into()]
                })
        );

        // Egress rules without Egress in policyTypes have no effect.
        let np: NetworkPolicy = serde_json::from_value(json!({
            "metadata": {"name": "np"},
            "spec": {"podSelector": {}, "policyTypes": ["Ingress"], "egress": [{}]}
        }))
        .unwrap();
        let p = parse_network_policy(&np);
        assert!(!p.rules[0].default_deny_egress && p.rules[0].entries.is_empty());
    }
}
