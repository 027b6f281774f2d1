//! Kubernetes label selectors (the equality-based `spec.selector` of a Service
//! and the full `LabelSelector` with matchExpressions).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use std::collections::BTreeMap;

/// A Service selector: every pair must match. An empty selector selects nothing
/// (a Service without a selector has manually managed endpoints).
pub fn service_selects(
    selector: &BTreeMap<String, String>,
    labels: &BTreeMap<String, String>,
) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// A `LabelSelector`: matchLabels and matchExpressions must all hold. An empty
/// selector selects everything.
pub fn label_selector_matches(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let labels_ok = selector
        .match_labels
        .as_ref()
        .is_none_or(|m| m.iter().all(|(k, v)| labels.get(k) == Some(v)));
    let exprs_ok = selector.match_expressions.as_ref().is_none_or(|exprs| {
        exprs.iter().all(|e| {
            let values = e.values.as_deref().unwrap_or_default();
            let value = labels.get(&e.key);
            match e.operator.as_str() {
                "In" => value.is_some_and(|v| values.contains(v)),
                "NotIn" => value.is_none_or(|v| !values.contains(v)),
                "Exists" => value.is_some(),
                "DoesNotExist" => value.is_none(),
                _ => false, // unknown operators select nothing (fail closed)
            }
        })
    });
    labels_ok && exprs_ok
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn service_selector_semantics() {
        let sel = labels(&[("app", "web")]);
        assert!(service_selects(
            &sel,
            &labels(&[("app", "web"), ("x", "y")])
        ));
        assert!(!service_selects(&sel, &labels(&[("app", "db")])));
        assert!(!service_selects(
            &BTreeMap::new(),
            &labels(&[("app", "web")])
        ));
    }

    #[test]
    fn match_expressions() {
        let req = |key: &str, op: &str, values: &[&str]| LabelSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: Some(values.iter().map(|s| s.to_string()).collect()),
        };
        let sel = LabelSelector {
            match_labels: Some(labels(&[("tier", "front")])),
            match_expressions: Some(vec![
                req("app", "In", &["web", "api"]),
                req("env", "NotIn", &["dev"]),
                req("canary", "DoesNotExist", &[]),
            ]),
        };
        assert!(label_selector_matches(
            &sel,
            &labels(&[("tier", "front"), ("app", "api")])
        ));
        assert!(!label_selector_matches(
            &sel,
            &labels(&[("tier", "front"), ("app", "api"), ("env", "dev")])
        ));
        assert!(!label_selector_matches(
            &sel,
            &labels(&[("tier", "front"), ("app", "db")])
        ));
        assert!(!label_selector_matches(
            &sel,
            &labels(&[("tier", "front"), ("app", "web"), ("canary", "1")])
        ));
        assert!(label_selector_matches(
            &LabelSelector::default(),
            &labels(&[])
        ));
    }
}
