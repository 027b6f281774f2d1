//! Parsing ordinary Kubernetes manifests (multi-document YAML, JSON, `kind: List`)
//! into typed objects. Every problem names the file, the line and the reason.

use super::{CiliumPolicy, Object};
use serde::de::DeserializeOwned;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManifestError {
    pub file: PathBuf,
    /// 1-based line where the offending document (or the syntax error) is.
    pub line: usize,
    pub reason: String,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.file.display(), self.line, self.reason)
    }
}

impl std::error::Error for ManifestError {}

/// What a file held: the objects catena uses, and the kinds it skipped
/// (a Deployment in the same directory is not an error).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Parsed {
    pub objects: Vec<Object>,
    pub ignored: Vec<String>,
}

/// Parses one file's text. Any bad document fails the whole file, so a
/// half-edited file never half-applies.
///
/// A big file (a generated dump of thousands of Services and EndpointSlices)
/// is parsed on every core: its documents are independent, and parsing is
/// most of what an agent start with 10k services costs. The result is the
/// same as parsing in order, first error included.
pub fn parse(file: &Path, text: &str) -> Result<Parsed, ManifestError> {
    let docs = split_documents(text);
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    if workers < 2 || docs.len() < PARALLEL_MIN_DOCUMENTS {
        return parse_documents(file, &docs);
    }
    let chunk = docs.len().div_ceil(workers);
    let results: Vec<Result<Parsed, ManifestError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = docs
            .chunks(chunk)
            .map(|part| scope.spawn(move || parse_documents(file, part)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .collect()
    });
    let mut parsed = Parsed::default();
    for part in results {
        let part = part?;
        parsed.objects.extend(part.objects);
        parsed.ignored.extend(part.ignored);
    }
    Ok(parsed)
}

/// Below this many documents a file is parsed on the calling thread: spawning
/// costs more than it saves.
const PARALLEL_MIN_DOCUMENTS: usize = 256;

fn parse_documents(file: &Path, docs: &[(usize, &str)]) -> Result<Parsed, ManifestError> {
    let mut parsed = Parsed::default();
    for &(start_line, doc) in docs {
        let err = |line: usize, reason: String| ManifestError {
            file: file.to_path_buf(),
            line,
            reason,
        };
        // Straight into JSON values: the typed Kubernetes objects and the
        // CiliumNetworkPolicy translation both read JSON, and going through
        // serde_yaml's own Value first cost a third of the parse.
        let value: serde_json::Value = match serde_yaml::from_str::<serde_json::Value>(doc) {
            Ok(serde_json::Value::Null) => continue, // empty document
            Ok(v) => v,
            Err(e) => {
                let line = e.location().map_or(0, |l| l.line().saturating_sub(1));
                return Err(err(start_line + line, format!("invalid YAML: {e}")));
            }
        };
        collect(value, &mut parsed).map_err(|reason| err(start_line, reason))?;
    }
    Ok(parsed)
}

/// Splits at YAML document markers (`---` on a line of its own), returning each
/// document with its 1-based start line. JSON files are one document.
fn split_documents(text: &str) -> Vec<(usize, &str)> {
    let mut docs = Vec::new();
    let mut start_byte = 0;
    let mut start_line = 1;
    let mut offset = 0;
    for (idx, line) in text.split_inclusive('\n').enumerate() {
        let trimmed = line.trim_end();
        if trimmed == "---" || trimmed.starts_with("--- ") {
            docs.push((start_line, &text[start_byte..offset]));
            start_byte = offset + line.len();
            start_line = idx + 2;
        }
        offset += line.len();
    }
    docs.push((start_line, &text[start_byte..]));
    docs
}

fn collect(value: serde_json::Value, parsed: &mut Parsed) -> Result<(), String> {
    let obj = value
        .as_object()
        .ok_or_else(|| "a manifest must be a mapping with apiVersion and kind".to_string())?;
    let kind = obj
        .get("kind")
        .and_then(|k| k.as_str())
        .ok_or("missing `kind`")?
        .to_string();
    let api_version = obj
        .get("apiVersion")
        .and_then(|k| k.as_str())
        .ok_or("missing `apiVersion`")?
        .to_string();
    if kind == "List" || kind.ends_with("List") && obj.contains_key("items") {
        let items = obj
            .get("items")
            .and_then(|i| i.as_array())
            .ok_or("a List needs an `items` array")?;
        for (i, item) in items.iter().enumerate() {
            collect(item.clone(), parsed).map_err(|e| format!("items[{i}]: {e}"))?;
        }
        return Ok(());
    }
    let name = value["metadata"]["name"].as_str().unwrap_or_default();
    if name.is_empty() {
        return Err(format!("{kind} has no metadata.name"));
    }
    let object = match (api_version.as_str(), kind.as_str()) {
        ("v1", "Service") => Object::Service(Arc::new(typed(value, &kind)?)),
        ("discovery.k8s.io/v1", "EndpointSlice") => Object::endpoint_slice(typed(value, &kind)?),
        ("v1", "Pod") => Object::pod(typed(value, &kind)?),
        ("v1", "Namespace") => Object::Namespace(Arc::new(typed(value, &kind)?)),
        ("v1", "Node") => Object::node(typed(value, &kind)?),
        ("networking.k8s.io/v1", "NetworkPolicy") => {
            Object::NetworkPolicy(Arc::new(typed(value, &kind)?))
        }
        ("cilium.io/v2", "CiliumNetworkPolicy" | "CiliumClusterwideNetworkPolicy") => {
            Object::CiliumPolicy(Arc::new(CiliumPolicy {
                kind: kind.clone(),
                object: value,
            }))
        }
        (_, "Service" | "EndpointSlice" | "Pod" | "Namespace" | "Node" | "NetworkPolicy") => {
            return Err(format!("unsupported apiVersion {api_version} for {kind}"));
        }
        _ => {
            parsed.ignored.push(format!("{api_version}/{kind} {name}"));
            return Ok(());
        }
    };
    parsed.objects.push(object);
    Ok(())
}

fn typed<T: DeserializeOwned>(value: serde_json::Value, kind: &str) -> Result<T, String> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        format!("invalid {kind} at {path}: {}", e.into_inner())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"# a comment
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: shop
spec:
  clusterIP: 10.96.0.10
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: 8080}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
---
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abc
  namespace: shop
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- addresses: [10.0.0.5]
"#;

    #[test]
    fn parses_multi_document_yaml_and_skips_unknown_kinds() {
        let parsed = parse(Path::new("svc.yaml"), GOOD).unwrap();
        let kinds: Vec<_> = parsed
            .objects
            .iter()
            .map(|o| o.kind().to_string())
            .collect();
        assert_eq!(kinds, ["Service", "EndpointSlice"]);
        assert_eq!(parsed.ignored, ["apps/v1/Deployment web"]);
    }

    #[test]
    fn reports_file_line_and_reason() {
        let text = "apiVersion: v1\nkind: Service\nmetadata: {name: a}\n---\napiVersion: v1\nkind: Service\nmetadata:\n  name: b\nspec:\n  ports: [{port: notanumber}]\n";
        let err = parse(Path::new("bad.yaml"), text).unwrap_err();
        assert_eq!(err.line, 5, "{err}");
        assert!(err.reason.contains("spec.ports[0].port"), "{err}");
        assert!(err.to_string().starts_with("bad.yaml:5: "), "{err}");

        let err = parse(Path::new("x.yaml"), "a: [1, 2\nb: 3\n").unwrap_err();
        assert!(err.reason.starts_with("invalid YAML"), "{err}");

        let err = parse(Path::new("x.yaml"), "kind: Service\n").unwrap_err();
        assert!(err.reason.contains("apiVersion"), "{err}");
        let err = parse(
            Path::new("x.yaml"),
            "apiVersion: v1\nkind: Pod\nmetadata: {}\n",
        )
        .unwrap_err();
        assert!(err.reason.contains("metadata.name"), "{err}");
    }

    #[test]
    fn reads_json_lists_and_cilium_policies() {
        let text = r#"{"apiVersion":"v1","kind":"List","items":[
            {"apiVersion":"v1","kind":"Namespace","metadata":{"name":"shop"}},
            {"apiVersion":"cilium.io/v2","kind":"CiliumNetworkPolicy","metadata":{"name":"p","namespace":"shop"},"spec":{}}]}"#;
        let parsed = parse(Path::new("l.json"), text).unwrap();
        let kinds: Vec<_> = parsed
            .objects
            .iter()
            .map(|o| o.kind().to_string())
            .collect();
        assert_eq!(kinds, ["Namespace", "CiliumNetworkPolicy"]);
    }
}
