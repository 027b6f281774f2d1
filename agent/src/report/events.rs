//! Warning Events (`events.k8s.io/v1`) on policy objects: one per problem per
//! policy revision, so `kubectl describe cnp` and `kubectl get events` show
//! what catena could not enforce as written and what it does instead.
//!
//! kube's `Recorder` is not used: it folds Events with the same reason on the
//! same object into one series (patching the first Event), which would hide
//! every problem of a policy but the first. The reporter already
//! deduplicates, so each Event here is a plain create.

use super::{PolicyId, PolicyOutcome, MAX_EVENTS_PER_REVISION, REPORTING_CONTROLLER};
use crate::model::policy::PolicyState;
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};

/// `events.k8s.io/v1` caps `note` at 1 kB.
const MAX_NOTE_BYTES: usize = 1024;
/// Cluster-scoped objects' Events live here, as kubectl and kube-rs do it.
const CLUSTER_SCOPED_EVENT_NAMESPACE: &str = "default";

/// One Event owed to a policy object.
#[derive(Clone, Debug, PartialEq)]
pub struct PolicyEvent {
    pub id: PolicyId,
    pub uid: String,
    pub resource_version: String,
    pub revision: String,
    /// `PolicyPartiallyUnsupported` or `PolicyInvalid`.
    pub reason: &'static str,
    pub note: String,
    /// The node reporting it (`reportingInstance`).
    pub node: String,
}

pub fn reason(state: PolicyState) -> &'static str {
    match state {
        PolicyState::Invalid => "PolicyInvalid",
        _ => "PolicyPartiallyUnsupported",
    }
}

/// The Events a policy with problems gets: one per problem (the message names
/// the field and what the datapath does instead), capped at
/// [`MAX_EVENTS_PER_REVISION`] with a last one counting the rest.
pub fn for_outcome(o: &PolicyOutcome, node: &str) -> Vec<PolicyEvent> {
    let consequence = match o.state {
        PolicyState::Invalid => "the policy selects no endpoint and enforces nothing",
        _ => "the rest of the policy is enforced, fail-closed",
    };
    let mut notes: Vec<String> = o
        .problems
        .iter()
        .map(|p| format!("{p} ({consequence}; node {node})"))
        .collect();
    if o.problems.is_empty() {
        // A state without a message should not happen; still say something.
        notes.push(format!(
            "not enforced exactly as written ({consequence}; node {node})"
        ));
    }
    if notes.len() > MAX_EVENTS_PER_REVISION {
        let rest = notes.len() - (MAX_EVENTS_PER_REVISION - 1);
        notes.truncate(MAX_EVENTS_PER_REVISION - 1);
        notes.push(format!(
            "{rest} more problems in this policy; `catena status` on node {node} lists them all"
        ));
    }
    notes
        .into_iter()
        .map(|note| PolicyEvent {
            id: o.id.clone(),
            uid: o.uid.clone(),
            resource_version: o.resource_version.clone(),
            revision: o.revision.clone(),
            reason: reason(o.state),
            note: truncate(note, MAX_NOTE_BYTES),
            node: node.to_string(),
        })
        .collect()
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() <= max {
        return s;
    }
    let mut end = max - '…'.len_utf8();
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
    s.push('…');
    s
}

/// The Event object as the API server gets it.
pub fn to_event(ev: &PolicyEvent, now: Timestamp) -> Event {
    let namespace = if ev.id.namespace.is_empty() {
        CLUSTER_SCOPED_EVENT_NAMESPACE.to_string()
    } else {
        ev.id.namespace.clone()
    };
    Event {
        metadata: ObjectMeta {
            // Unique per Event, readable next to its object (kubectl's style).
            name: Some(format!("{}.{:x}", ev.id.name, now.as_nanosecond())),
            namespace: Some(namespace),
            ..Default::default()
        },
        event_time: Some(MicroTime(now)),
        type_: Some("Warning".into()),
        reason: Some(ev.reason.into()),
        action: Some("EnforcePolicy".into()),
        note: Some(ev.note.clone()),
        reporting_controller: Some(REPORTING_CONTROLLER.into()),
        reporting_instance: Some(ev.node.clone()),
        regarding: Some(ObjectReference {
            api_version: Some(ev.id.api_version().into()),
            kind: Some(ev.id.kind.as_str().into()),
            namespace: (!ev.id.namespace.is_empty()).then(|| ev.id.namespace.clone()),
            name: Some(ev.id.name.clone()),
            uid: Some(ev.uid.clone()).filter(|u| !u.is_empty()),
            resource_version: Some(ev.resource_version.clone()).filter(|r| !r.is_empty()),
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub async fn post(client: &kube::Client, ev: &PolicyEvent) -> Result<(), kube::Error> {
    let event = to_event(ev, Timestamp::now());
    let namespace = event.metadata.namespace.clone().unwrap_or_default();
    Api::<Event>::namespaced(client.clone(), &namespace)
        .create(&PostParams::default(), &event)
        .await
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::policy::PolicyKind;

    #[test]
    fn event_names_the_policy_node_and_fail_closed_consequence() {
        let o = PolicyOutcome {
            id: PolicyId {
                kind: PolicyKind::CiliumClusterwideNetworkPolicy,
                namespace: String::new(),
                name: "cw".into(),
            },
            uid: "u".into(),
            resource_version: "9".into(),
            revision: "g1".into(),
            state: PolicyState::Partial,
            problems: vec![
                "spec.egress[0]: toFQDNs (needs a DNS proxy) not supported; allow dropped".into(),
            ],
            observed: None,
        };
        let evs = for_outcome(&o, "node-a");
        assert_eq!(evs.len(), 1);
        let e = to_event(&evs[0], Timestamp::UNIX_EPOCH);
        assert_eq!(e.metadata.namespace.as_deref(), Some("default"));
        assert_eq!(e.type_.as_deref(), Some("Warning"));
        assert_eq!(e.reason.as_deref(), Some("PolicyPartiallyUnsupported"));
        assert_eq!(e.reporting_controller.as_deref(), Some("catena-agent"));
        assert_eq!(e.reporting_instance.as_deref(), Some("node-a"));
        let note = e.note.unwrap();
        assert!(
            note.contains("toFQDNs") && note.contains("fail-closed"),
            "{note}"
        );
        let r = e.regarding.unwrap();
        assert_eq!(r.kind.as_deref(), Some("CiliumClusterwideNetworkPolicy"));
        assert_eq!(r.namespace, None);
        assert_eq!(r.uid.as_deref(), Some("u"));
    }

    #[test]
    fn long_notes_are_cut_at_a_char_boundary() {
        let s = truncate("é".repeat(1000), MAX_NOTE_BYTES);
        assert!(s.len() <= MAX_NOTE_BYTES && s.ends_with('…'));
    }
}
