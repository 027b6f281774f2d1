//! Reports policy problems where Kubernetes users look: a Warning Event on the
//! policy object ([`events`]) and, for Cilium policies, this node's entry in
//! the object's `status.nodes` ([`cnp_status`]), as `kubectl get cnp -o yaml`
//! shows it. `catena status` stays the place in standalone mode, which has no
//! API server.
//!
//! The reconcile loop only hands the reporter the last compile's reports (a
//! watch channel holding the latest one: never blocks, never grows); this
//! module's own task turns them into API writes, remembers what it wrote so a
//! problem is reported once per policy revision and not once per reconcile,
//! and retries failed writes (API server down, 403) with backoff. A write that
//! fails never touches the datapath: policy is enforced whether or not it
//! could be reported.

pub mod cnp_status;
pub mod events;

use crate::compile::policy::PolicyReport;
use crate::model::policy::{PolicyKind, PolicyState};
use crate::sources::{ClusterState, ObjectKey};
use cnp_status::NodeStatus;
use events::PolicyEvent;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// The Events' `reportingController`.
pub const REPORTING_CONTROLLER: &str = "catena-agent";
/// At most this many Events per policy revision; past it one more Event says
/// how many problems were left out (`catena status` lists them all).
pub const MAX_EVENTS_PER_REVISION: usize = 8;
/// Every write gives up after this long (a hung API server must not wedge
/// the reporter; the write is retried like any other failure).
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Pacing between two writes, so a thousand policies with problems do not
/// hit the API server from every node at once.
const WRITE_SPACING: Duration = Duration::from_millis(20);

/// Which policy object: kind, namespace (empty for a
/// CiliumClusterwideNetworkPolicy) and name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyId {
    pub kind: PolicyKind,
    pub namespace: String,
    pub name: String,
}

impl PolicyId {
    pub fn api_version(&self) -> &'static str {
        match self.kind {
            PolicyKind::NetworkPolicy => "networking.k8s.io/v1",
            PolicyKind::CiliumNetworkPolicy | PolicyKind::CiliumClusterwideNetworkPolicy => {
                "cilium.io/v2"
            }
        }
    }

    /// Whether the object has Cilium's per-node status.
    pub fn has_node_status(&self) -> bool {
        self.kind != PolicyKind::NetworkPolicy
    }
}

impl std::fmt::Display for PolicyId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{} {}", self.kind.as_str(), self.name)
        } else {
            write!(f, "{} {}/{}", self.kind.as_str(), self.namespace, self.name)
        }
    }
}

/// One compiled policy, named precisely enough to write to its object.
#[derive(Clone, Debug, PartialEq)]
pub struct PolicyOutcome {
    pub id: PolicyId,
    pub uid: String,
    pub resource_version: String,
    /// `metadata.generation` (`g<n>`): spec edits bump it, status writes do
    /// not, so the reporter's own status patch never looks like a new
    /// revision. A server that sets no generation gets a digest of the
    /// object without metadata and status (`s<hex>`) instead.
    pub revision: String,
    pub state: PolicyState,
    pub problems: Vec<String>,
    /// Cilium policies: `status.nodes.<this node>` as the object holds it.
    pub observed: Option<NodeStatus>,
}

/// Joins the compiler's reports with the objects they were compiled from.
/// Reports whose object is not in `cluster` (cannot happen for a matching
/// pair) are skipped.
pub fn outcomes(
    cluster: &ClusterState,
    reports: &[PolicyReport],
    node: &str,
) -> Vec<PolicyOutcome> {
    reports
        .iter()
        .filter_map(|r| outcome(cluster, r, node))
        .collect()
}

fn outcome(cluster: &ClusterState, report: &PolicyReport, node: &str) -> Option<PolicyOutcome> {
    let kind = match report.kind.as_str() {
        "CiliumNetworkPolicy" => PolicyKind::CiliumNetworkPolicy,
        "CiliumClusterwideNetworkPolicy" => PolicyKind::CiliumClusterwideNetworkPolicy,
        "NetworkPolicy" => PolicyKind::NetworkPolicy,
        _ => return None,
    };
    // Report names are `namespace/name` (`name` when cluster-wide); neither
    // part of a Kubernetes name can hold a '/'.
    let (namespace, name) = match report.name.split_once('/') {
        Some((ns, n)) => (ns.to_string(), n.to_string()),
        None => (String::new(), report.name.clone()),
    };
    let key = ObjectKey::new(namespace.clone(), name.clone());
    let id = PolicyId {
        kind,
        namespace,
        name,
    };
    // Read in place: this runs for every policy on every compile.
    let (uid, resource_version, revision, observed) = match kind {
        PolicyKind::NetworkPolicy => {
            let np = cluster.network_policies.get(&key)?;
            let meta = &np.metadata;
            let revision = match meta.generation {
                Some(g) => format!("g{g}"),
                None => format!("s{:x}", digest(&serde_json::to_string(&np.spec).ok()?)),
            };
            (
                meta.uid.clone(),
                meta.resource_version.clone(),
                revision,
                None,
            )
        }
        _ => {
            let object = &cluster
                .cilium_policies
                .get(&(report.kind.clone(), key))?
                .object;
            let meta = &object["metadata"];
            let revision = match meta["generation"].as_i64() {
                Some(g) => format!("g{g}"),
                None => format!("s{:x}", spec_digest(object)),
            };
            (
                meta["uid"].as_str().map(str::to_string),
                meta["resourceVersion"].as_str().map(str::to_string),
                revision,
                object["status"]["nodes"]
                    .get(node)
                    .map(NodeStatus::from_object),
            )
        }
    };
    Some(PolicyOutcome {
        id,
        uid: uid.unwrap_or_default(),
        resource_version: resource_version.unwrap_or_default(),
        revision,
        state: report.state,
        problems: report.messages.clone(),
        observed,
    })
}

fn digest(s: &str) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    s.hash(&mut h);
    h.finish()
}

/// A digest of everything but metadata and status (what a generation counts).
fn spec_digest(object: &Value) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    if let Some(map) = object.as_object() {
        for (k, v) in map {
            if k != "metadata" && k != "status" {
                k.hash(&mut h);
                v.to_string().hash(&mut h);
            }
        }
    }
    h.finish()
}

/// What Events were posted for one policy revision.
#[derive(Debug)]
struct Posted {
    uid: String,
    revision: String,
    notes: BTreeSet<String>,
}

/// The pure part of the reporter: from complete lists of outcomes to the
/// writes still owed, remembering the writes already done.
#[derive(Debug)]
pub struct ReportState {
    node: String,
    posted: HashMap<PolicyId, Posted>,
    /// Cilium policies: the node status last written (or found already in
    /// place), with the object's uid.
    written: HashMap<PolicyId, (String, NodeStatus)>,
    pending_events: Vec<PolicyEvent>,
    pending_status: BTreeMap<PolicyId, StatusWrite>,
}

/// A node status owed to one Cilium policy object.
#[derive(Clone, Debug, PartialEq)]
pub struct StatusWrite {
    pub id: PolicyId,
    pub uid: String,
    pub status: NodeStatus,
}

impl ReportState {
    pub fn new(node: impl Into<String>) -> Self {
        ReportState {
            node: node.into(),
            posted: HashMap::new(),
            written: HashMap::new(),
            pending_events: Vec::new(),
            pending_status: BTreeMap::new(),
        }
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// Recomputes the owed writes from a complete list (the latest compile):
    /// what an older list still owed but this one no longer needs is dropped.
    pub fn plan(&mut self, outcomes: &[PolicyOutcome]) {
        let live: HashMap<&PolicyId, &PolicyOutcome> =
            outcomes.iter().map(|o| (&o.id, o)).collect();
        // Forget deleted policies, recreated ones (new uid) and, for Events,
        // older revisions: an edited policy that still has the problem gets
        // its Event again.
        self.posted.retain(|id, p| {
            live.get(id)
                .is_some_and(|o| o.uid == p.uid && o.revision == p.revision)
        });
        self.written
            .retain(|id, (uid, _)| live.get(id).is_some_and(|o| o.uid == *uid));
        self.pending_events.clear();
        self.pending_status.clear();
        for o in outcomes {
            if o.state != PolicyState::Ok {
                let posted = self.posted.get(&o.id);
                for ev in events::for_outcome(o, &self.node) {
                    if !posted.is_some_and(|p| p.notes.contains(&ev.note)) {
                        self.pending_events.push(ev);
                    }
                }
            }
            if o.id.has_node_status() {
                self.plan_status(o);
            }
        }
    }

    fn plan_status(&mut self, o: &PolicyOutcome) {
        let desired = NodeStatus::for_outcome(o.state, &o.problems);
        match self.written.get(&o.id) {
            Some((_, w)) if *w == desired => {}
            Some(_) => self.owe_status(o, desired),
            // Nothing written by this run: trust what the object holds (a
            // restarted agent finds its earlier status), and leave a policy
            // that is fine and never had a problem reported here alone: a
            // write per policy per node per restart would buy nothing.
            None if o.observed.as_ref() == Some(&desired) => {
                self.written.insert(o.id.clone(), (o.uid.clone(), desired));
            }
            None if desired.ok && o.observed.is_none() => {}
            None => self.owe_status(o, desired),
        }
    }

    fn owe_status(&mut self, o: &PolicyOutcome, status: NodeStatus) {
        self.pending_status.insert(
            o.id.clone(),
            StatusWrite {
                id: o.id.clone(),
                uid: o.uid.clone(),
                status,
            },
        );
    }

    pub fn next_event(&self) -> Option<&PolicyEvent> {
        self.pending_events.first()
    }

    pub fn next_status(&self) -> Option<&StatusWrite> {
        self.pending_status.values().next()
    }

    /// The first owed Event is done (posted, or refused for good).
    pub fn event_done(&mut self) {
        if self.pending_events.is_empty() {
            return;
        }
        let ev = self.pending_events.remove(0);
        let posted = self.posted.entry(ev.id.clone()).or_insert_with(|| Posted {
            uid: ev.uid.clone(),
            revision: ev.revision.clone(),
            notes: BTreeSet::new(),
        });
        posted.notes.insert(ev.note);
    }

    /// The first owed status is done (written, or refused for good).
    pub fn status_done(&mut self) {
        if let Some((id, w)) = self.pending_status.pop_first() {
            self.written.insert(id, (w.uid, w.status));
        }
    }

    /// The first owed status needs no write any more (its object is gone).
    pub fn status_dropped(&mut self) {
        self.pending_status.pop_first();
    }

    pub fn owed(&self) -> (usize, usize) {
        (self.pending_events.len(), self.pending_status.len())
    }
}

/// Exponential backoff between failed writes of one kind.
#[derive(Debug)]
struct Backoff {
    failures: u32,
    until: Option<Instant>,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(500);
    const MAX: Duration = Duration::from_secs(30);

    fn new() -> Self {
        Backoff {
            failures: 0,
            until: None,
        }
    }

    fn ready(&self) -> bool {
        self.until.is_none_or(|t| Instant::now() >= t)
    }

    fn failed(&mut self) -> Duration {
        let wait = Self::FIRST
            .saturating_mul(1 << self.failures.min(16))
            .min(Self::MAX);
        self.failures += 1;
        self.until = Some(Instant::now() + wait);
        wait
    }

    /// Whether this success ended a run of failures.
    fn succeeded(&mut self) -> bool {
        let recovered = self.failures > 0;
        self.failures = 0;
        self.until = None;
        recovered
    }
}

/// How a failed write is treated.
#[derive(Debug)]
pub enum WriteError {
    /// Worth retrying: transport errors, timeouts, 403 (RBAC may be fixed),
    /// 429 and 5xx.
    Retry(String),
    /// The object is gone (404): nothing to report on any more.
    Gone(String),
    /// The server refused this write for good (400, 422, ...): retrying the
    /// same body cannot succeed.
    Refused(String),
}

impl WriteError {
    fn from_kube(e: kube::Error) -> Self {
        match e {
            kube::Error::Api(s) if s.code == 404 => WriteError::Gone(s.message.clone()),
            kube::Error::Api(s) if s.code == 403 || s.code == 429 || s.code >= 500 => {
                WriteError::Retry(format!("{} {}", s.code, s.message))
            }
            kube::Error::Api(s) if s.code >= 400 => {
                WriteError::Refused(format!("{} {}", s.code, s.message))
            }
            other => WriteError::Retry(other.to_string()),
        }
    }
}

async fn with_timeout<T>(
    f: impl std::future::Future<Output = Result<T, kube::Error>>,
) -> Result<T, WriteError> {
    match tokio::time::timeout(WRITE_TIMEOUT, f).await {
        Ok(r) => r.map_err(WriteError::from_kube),
        Err(_) => Err(WriteError::Retry(format!(
            "no answer within {WRITE_TIMEOUT:?}"
        ))),
    }
}

/// The latest compile handed to the reporter.
#[derive(Clone)]
struct Compiled {
    cluster: Arc<ClusterState>,
    reports: Vec<PolicyReport>,
}

/// The reconcile loop's end of the reporter.
pub struct PolicyReporter {
    latest: watch::Sender<Option<Compiled>>,
}

impl PolicyReporter {
    /// Starts the reporter task for this node.
    pub fn start(client: kube::Client, node: String) -> PolicyReporter {
        let (latest, rx) = watch::channel(None);
        tracing::info!(%node, "reporting policy problems as Events and CiliumNetworkPolicy status");
        tokio::spawn(run(client, ReportState::new(node), rx));
        PolicyReporter { latest }
    }

    /// Hands over the last compile's reports and the snapshot they came
    /// from. Replaces whatever the task has not picked up yet; never blocks.
    pub fn submit(&self, cluster: Arc<ClusterState>, reports: Vec<PolicyReport>) {
        self.latest
            .send_replace(Some(Compiled { cluster, reports }));
    }
}

async fn run(
    client: kube::Client,
    mut state: ReportState,
    mut latest: watch::Receiver<Option<Compiled>>,
) {
    let mut event_backoff = Backoff::new();
    let mut status_backoff = Backoff::new();
    // `changed()` marks the value seen, so whether there is a new compile is
    // carried from the wait below rather than asked again.
    let mut fresh = true;
    loop {
        if std::mem::take(&mut fresh) {
            let compiled = latest.borrow_and_update().clone();
            if let Some(c) = compiled {
                let list = outcomes(&c.cluster, &c.reports, state.node());
                state.plan(&list);
            }
        }
        if event_backoff.ready() {
            while let Some(ev) = state.next_event().cloned() {
                match with_timeout(events::post(&client, &ev)).await {
                    Ok(()) => {
                        tracing::debug!(policy = %ev.id, reason = ev.reason, "posted policy Event");
                        if event_backoff.succeeded() {
                            tracing::info!("posting policy Events works again");
                        }
                        state.event_done();
                    }
                    Err(WriteError::Retry(e)) => {
                        let wait = event_backoff.failed();
                        log_failure(
                            "posting a policy Event",
                            &ev.id,
                            &e,
                            wait,
                            event_backoff.failures,
                        );
                        break;
                    }
                    Err(WriteError::Gone(e) | WriteError::Refused(e)) => {
                        tracing::warn!(policy = %ev.id, error = %e, "the API server refused a policy Event; not retrying it");
                        state.event_done();
                    }
                }
                tokio::time::sleep(WRITE_SPACING).await;
            }
        }
        if status_backoff.ready() {
            while let Some(w) = state.next_status().cloned() {
                match with_timeout(cnp_status::patch(&client, &w, state.node())).await {
                    Ok(()) => {
                        tracing::debug!(policy = %w.id, ok = w.status.ok, "wrote policy node status");
                        if status_backoff.succeeded() {
                            tracing::info!("writing policy status works again");
                        }
                        state.status_done();
                    }
                    Err(WriteError::Retry(e)) => {
                        let wait = status_backoff.failed();
                        log_failure(
                            "writing a policy's node status",
                            &w.id,
                            &e,
                            wait,
                            status_backoff.failures,
                        );
                        break;
                    }
                    Err(WriteError::Gone(_)) => state.status_dropped(),
                    Err(WriteError::Refused(e)) => {
                        tracing::warn!(policy = %w.id, error = %e, "the API server refused a policy status write; not retrying it");
                        state.status_done();
                    }
                }
                tokio::time::sleep(WRITE_SPACING).await;
            }
        }
        // Sleep until there is something new or a backoff ends.
        let (events_owed, status_owed) = state.owed();
        let wake = [
            (events_owed > 0).then_some(event_backoff.until).flatten(),
            (status_owed > 0).then_some(status_backoff.until).flatten(),
        ]
        .into_iter()
        .flatten()
        .min();
        tokio::select! {
            changed = latest.changed() => match changed {
                Ok(()) => fresh = true,
                Err(_) => return, // the agent is shutting down
            },
            _ = sleep_until(wake) => {}
        }
    }
}

async fn sleep_until(when: Option<Instant>) {
    match when {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// The first failure of a run is a warning; repeats are debug lines, so an
/// API server that is down for an hour does not flood the log.
fn log_failure(what: &str, id: &PolicyId, error: &str, retry_in: Duration, failures: u32) {
    if failures == 1 {
        tracing::warn!(policy = %id, %error, ?retry_in, "{what} failed; the policy is enforced regardless, retrying with backoff");
    } else {
        tracing::debug!(policy = %id, %error, ?retry_in, failures, "{what} failed again");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(name: &str, revision: &str, state: PolicyState, problems: &[&str]) -> PolicyOutcome {
        PolicyOutcome {
            id: PolicyId {
                kind: PolicyKind::CiliumNetworkPolicy,
                namespace: "default".into(),
                name: name.into(),
            },
            uid: format!("uid-{name}"),
            resource_version: "7".into(),
            revision: revision.into(),
            state,
            problems: problems.iter().map(|s| s.to_string()).collect(),
            observed: None,
        }
    }

    fn drain(state: &mut ReportState) -> (Vec<String>, Vec<NodeStatus>) {
        let mut notes = vec![];
        while let Some(ev) = state.next_event() {
            notes.push(ev.note.clone());
            state.event_done();
        }
        let mut statuses = vec![];
        while let Some(w) = state.next_status() {
            statuses.push(w.status.clone());
            state.status_done();
        }
        (notes, statuses)
    }

    #[test]
    fn a_problem_is_reported_once_per_revision() {
        let mut s = ReportState::new("n1");
        let bad = outcome("p", "g1", PolicyState::Partial, &["spec.ingress[0]: L7"]);
        s.plan(std::slice::from_ref(&bad));
        let (notes, statuses) = drain(&mut s);
        assert_eq!(notes.len(), 1);
        assert_eq!(statuses.len(), 1);
        assert!(!statuses[0].ok && statuses[0].enforcing);
        // The same compile again (a reconcile for an unrelated change, or the
        // MODIFIED event of our own status patch): nothing more to write.
        let mut seen = bad.clone();
        seen.resource_version = "8".into();
        seen.observed = Some(statuses[0].clone());
        s.plan(&[seen.clone()]);
        assert_eq!(s.owed(), (0, 0));
        // An edit that keeps the problem: a new Event, the status stands.
        let mut edited = seen.clone();
        edited.revision = "g2".into();
        s.plan(&[edited.clone()]);
        assert_eq!(s.owed(), (1, 0));
        drain(&mut s);
        // The problem goes away: the status turns ok, no Event.
        let fixed = outcome("p", "g3", PolicyState::Ok, &[]);
        s.plan(&[fixed]);
        let (notes, statuses) = drain(&mut s);
        assert!(notes.is_empty());
        assert_eq!(
            statuses,
            vec![NodeStatus {
                ok: true,
                error: None,
                enforcing: true
            }]
        );
    }

    #[test]
    fn fine_policies_cost_no_writes_and_restarts_adopt_the_status_in_place() {
        let mut s = ReportState::new("n1");
        s.plan(&[outcome("fine", "g1", PolicyState::Ok, &[])]);
        assert_eq!(
            s.owed(),
            (0, 0),
            "a fine policy never reported is left alone"
        );
        // A restarted agent finds a status it wrote before: no write; an
        // outdated one (the problem was fixed while it was down) is fixed.
        let mut same = outcome("p", "g1", PolicyState::Partial, &["x"]);
        same.observed = Some(NodeStatus::for_outcome(PolicyState::Partial, &["x".into()]));
        let mut stale = outcome("q", "g4", PolicyState::Ok, &[]);
        stale.observed = Some(NodeStatus::for_outcome(PolicyState::Partial, &["y".into()]));
        let mut s = ReportState::new("n1");
        s.plan(&[same, stale]);
        let (notes, statuses) = drain(&mut s);
        assert_eq!(notes.len(), 1, "Events are not persisted across restarts");
        assert_eq!(statuses.len(), 1);
        assert!(statuses[0].ok);
    }

    #[test]
    fn many_problems_are_capped_with_a_summary() {
        let problems: Vec<String> = (0..20).map(|i| format!("spec.ingress[{i}]: L7")).collect();
        let refs: Vec<&str> = problems.iter().map(String::as_str).collect();
        let mut s = ReportState::new("n1");
        s.plan(&[outcome("p", "g1", PolicyState::Partial, &refs)]);
        let (notes, _) = drain(&mut s);
        assert_eq!(notes.len(), MAX_EVENTS_PER_REVISION);
        assert!(notes.last().unwrap().contains("13 more"), "{notes:?}");
    }

    #[test]
    fn deleted_and_recreated_policies_are_forgotten() {
        let mut s = ReportState::new("n1");
        let bad = outcome("p", "g1", PolicyState::Partial, &["x"]);
        s.plan(std::slice::from_ref(&bad));
        drain(&mut s);
        s.plan(&[]);
        assert!(s.posted.is_empty() && s.written.is_empty());
        let mut again = bad.clone();
        again.uid = "uid-new".into();
        s.plan(&[again]);
        assert_eq!(s.owed(), (1, 1));
    }

    #[test]
    fn outcomes_name_the_object_and_its_revision() {
        let mut cluster = ClusterState::default();
        let cnp = serde_json::json!({
            "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
            "metadata": {"name": "l7", "namespace": "web", "uid": "u1", "resourceVersion": "42", "generation": 3},
            "spec": {"endpointSelector": {}},
            "status": {"nodes": {"n1": {"ok": false, "error": "boom", "enforcing": true}}}
        });
        cluster.insert(crate::sources::Object::CiliumPolicy(Arc::new(
            crate::sources::CiliumPolicy {
                kind: "CiliumNetworkPolicy".into(),
                object: cnp,
            },
        )));
        let np: k8s_openapi::api::networking::v1::NetworkPolicy =
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "np", "namespace": "web", "uid": "u2", "resourceVersion": "43"},
                "spec": {"podSelector": {}}
            }))
            .unwrap();
        cluster.insert(crate::sources::Object::NetworkPolicy(Arc::new(np)));
        let reports = vec![
            PolicyReport {
                kind: "CiliumNetworkPolicy".into(),
                name: "web/l7".into(),
                state: PolicyState::Partial,
                messages: vec!["m".into()],
            },
            PolicyReport {
                kind: "NetworkPolicy".into(),
                name: "web/np".into(),
                state: PolicyState::Ok,
                messages: vec![],
            },
        ];
        let out = outcomes(&cluster, &reports, "n1");
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].uid, "u1");
        assert_eq!(out[0].revision, "g3");
        assert_eq!(out[0].resource_version, "42");
        assert_eq!(
            out[0].observed,
            Some(NodeStatus {
                ok: false,
                error: Some("boom".into()),
                enforcing: true
            })
        );
        assert_eq!(out[1].id.kind, PolicyKind::NetworkPolicy);
        assert!(out[1].revision.starts_with('s'), "no generation: a digest");
        assert_eq!(out[1].observed, None);
    }
}
