//! This node's entry in a Cilium policy's status, shaped as Cilium's agents
//! write it (`status.nodes.<node>` with `ok`, `error`, `enforcing` and
//! `lastUpdated`), so `kubectl get cnp -o yaml` and tools reading Cilium's
//! status see whether this node took the policy in as written.
//!
//! Written with a JSON merge patch on the `status` subresource: only this
//! node's key changes, other nodes' entries stay as they are.

use super::StatusWrite;
use crate::model::policy::PolicyState;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use serde_json::{json, Value};

/// Longest `error` written; `catena status` on the node has every message.
const MAX_ERROR_BYTES: usize = 2048;

/// What the reporter compares (`lastUpdated` is left out: it changes on
/// every write and says nothing about the policy).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeStatus {
    /// Taken in exactly as written.
    pub ok: bool,
    /// What could not be enforced and what is done instead.
    pub error: Option<String>,
    /// The node enforces (the rest of) the policy: true for ok and partial
    /// policies, false for an invalid one, which selects nothing.
    pub enforcing: bool,
}

impl NodeStatus {
    pub fn for_outcome(state: PolicyState, problems: &[String]) -> Self {
        let error = (state != PolicyState::Ok).then(|| {
            let prefix = match state {
                PolicyState::Invalid => "invalid, not enforced: ",
                _ => "partially unsupported, enforced fail-closed: ",
            };
            cap(format!("{prefix}{}", problems.join("; ")))
        });
        NodeStatus {
            ok: state == PolicyState::Ok,
            error,
            enforcing: state != PolicyState::Invalid,
        }
    }

    /// Reads `status.nodes.<node>` as the object holds it (Cilium omits
    /// false and empty fields).
    pub fn from_object(v: &Value) -> Self {
        NodeStatus {
            ok: v["ok"].as_bool().unwrap_or(false),
            error: v["error"]
                .as_str()
                .filter(|e| !e.is_empty())
                .map(str::to_string),
            enforcing: v["enforcing"].as_bool().unwrap_or(false),
        }
    }

    /// The merge patch setting this node's entry (a null `error` removes an
    /// earlier one).
    pub fn merge_patch(&self, node: &str, now: Timestamp) -> Value {
        let last_updated = serde_json::to_value(Time(now)).unwrap_or(Value::Null);
        json!({"status": {"nodes": {node: {
            "ok": self.ok,
            "error": self.error,
            "enforcing": self.enforcing,
            "lastUpdated": last_updated,
        }}}})
    }
}

fn cap(mut s: String) -> String {
    if s.len() > MAX_ERROR_BYTES {
        let mut end = MAX_ERROR_BYTES;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}

pub async fn patch(client: &kube::Client, w: &StatusWrite, node: &str) -> Result<(), kube::Error> {
    let resource = ApiResource::from_gvk(&GroupVersionKind::gvk(
        "cilium.io",
        "v2",
        w.id.kind.as_str(),
    ));
    let api: Api<DynamicObject> = if w.id.namespace.is_empty() {
        Api::all_with(client.clone(), &resource)
    } else {
        Api::namespaced_with(client.clone(), &w.id.namespace, &resource)
    };
    let body = w.status.merge_patch(node, Timestamp::now());
    api.patch_status(&w.id.name, &PatchParams::default(), &Patch::Merge(&body))
        .await
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_the_object_shape() {
        let partial = NodeStatus::for_outcome(PolicyState::Partial, &["a".into(), "b".into()]);
        assert!(!partial.ok && partial.enforcing);
        assert_eq!(
            partial.error.as_deref(),
            Some("partially unsupported, enforced fail-closed: a; b")
        );
        let patch = partial.merge_patch("n1", Timestamp::UNIX_EPOCH);
        let entry = &patch["status"]["nodes"]["n1"];
        assert_eq!(entry["lastUpdated"], "1970-01-01T00:00:00Z");
        assert_eq!(NodeStatus::from_object(entry), partial);

        let ok = NodeStatus::for_outcome(PolicyState::Ok, &[]);
        let patch = ok.merge_patch("n1", Timestamp::UNIX_EPOCH);
        assert!(
            patch["status"]["nodes"]["n1"]["error"].is_null(),
            "clears the old error"
        );
        assert_eq!(NodeStatus::from_object(&patch["status"]["nodes"]["n1"]), ok);

        let invalid = NodeStatus::for_outcome(PolicyState::Invalid, &["no subject".into()]);
        assert!(!invalid.ok && !invalid.enforcing);
    }
}
