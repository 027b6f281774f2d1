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
        if let Some(object) = direct(doc) {
            parsed.objects.push(object);
            continue;
        }
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

/// The kinds that come by the thousand (Services, EndpointSlices, Pods,
/// Namespaces), read from the YAML straight into their typed form, with no
/// JSON tree in between (half of a big file's parse). Taken only when the
/// document states `apiVersion` and `kind` on top-level lines of their own,
/// as generated manifests and `kubectl get -o yaml` do. `None` (any other
/// shape, another kind, or any error) leaves the document to the general
/// path, which accepts every form and words every error.
fn direct(doc: &str) -> Option<Object> {
    let (mut kind, mut api_version) = (None, None);
    for line in doc.lines() {
        if let Some(v) = line.strip_prefix("kind:") {
            if kind.replace(plain_word(v)?).is_some() {
                return None;
            }
        } else if let Some(v) = line.strip_prefix("apiVersion:") {
            if api_version.replace(plain_word(v)?).is_some() {
                return None;
            }
        }
    }
    fn read<T: DeserializeOwned>(doc: &str) -> Option<T> {
        T::deserialize(serde_yaml::Deserializer::from_str(doc)).ok()
    }
    fn named(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> bool {
        meta.name.as_deref().is_some_and(|n| !n.is_empty())
    }
    use k8s_openapi::api::{core::v1 as core, discovery::v1 as discovery};
    match (api_version?, kind?) {
        ("v1", "Service") => {
            let o: core::Service = read(doc)?;
            named(&o.metadata).then(|| Object::Service(Arc::new(o)))
        }
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            let o: discovery::EndpointSlice = read(doc)?;
            named(&o.metadata).then(|| Object::endpoint_slice(o))
        }
        ("v1", "Pod") => {
            let o: core::Pod = read(doc)?;
            named(&o.metadata).then(|| Object::pod(o))
        }
        ("v1", "Namespace") => {
            let o: core::Namespace = read(doc)?;
            named(&o.metadata).then(|| Object::Namespace(Arc::new(o)))
        }
        _ => None,
    }
}

/// A top-level value that is one bare word (`v1`, `Service`); anything
/// quoted, commented or odd is left to the general path.
fn plain_word(v: &str) -> Option<&str> {
    let v = v.trim();
    let ok = !v.is_empty()
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'/' | b'-'));
    ok.then_some(v)
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

    /// The direct typed read and the general JSON path build the same object;
    /// shapes the direct read does not take fall through to the general path.
    #[test]
    fn direct_read_matches_the_general_path() {
        let pod = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n  namespace: shop\n  labels: {app: web}\nspec:\n  nodeName: n1\n  containers: [{name: c, image: i}]\nstatus:\n  podIPs: [{ip: 10.0.0.5}, {ip: 'fd00::5'}]\n";
        let ns = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {team: a}}\n";
        let mut docs: Vec<&str> = split_documents(GOOD).into_iter().map(|(_, d)| d).collect();
        docs.extend([pod, ns]);
        let mut direct_reads = 0;
        for doc in docs {
            let mut general = Parsed::default();
            let value: serde_json::Value = serde_yaml::from_str(doc).unwrap();
            if value.is_null() {
                assert!(direct(doc).is_none());
                continue;
            }
            collect(value, &mut general).unwrap();
            match direct(doc) {
                Some(object) => {
                    direct_reads += 1;
                    assert_eq!(general.objects, vec![object], "{doc}");
                }
                None => assert!(general.objects.is_empty(), "{doc}"),
            }
        }
        assert_eq!(direct_reads, 4);
        // Quoted, commented or flow-style kinds, and unnamed objects, go the
        // general way.
        for doc in [
            "apiVersion: v1\nkind: \"Service\"\nmetadata: {name: a}\n",
            "apiVersion: v1\nkind: Service # web\nmetadata: {name: a}\n",
            "{apiVersion: v1, kind: Service, metadata: {name: a}}\n",
            "apiVersion: v1\nkind: Service\nmetadata: {}\n",
            "apiVersion: v1\nkind: Service\nkind: Pod\nmetadata: {name: a}\n",
        ] {
            assert!(direct(doc).is_none(), "{doc}");
        }
    }

    /// A file big enough to be parsed on several threads gives what an
    /// in-order parse gives: objects in document order, and the first bad
    /// document's line.
    #[test]
    fn big_files_parse_in_document_order_with_the_first_error() {
        let n = PARALLEL_MIN_DOCUMENTS * 3 + 7;
        let doc =
            |i: usize| format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: ns{i}}}\n");
        let text: Vec<String> = (0..n).map(doc).collect();
        let text = text.join("---\n");
        let parsed = parse(Path::new("big.yaml"), &text).unwrap();
        let names: Vec<String> = parsed
            .objects
            .iter()
            .map(|o| match o {
                Object::Namespace(ns) => ns.metadata.name.clone().unwrap_or_default(),
                other => panic!("unexpected {}", other.kind()),
            })
            .collect();
        let expected: Vec<String> = (0..n).map(|i| format!("ns{i}")).collect();
        assert_eq!(names, expected);

        // Two bad documents, in different threads' shares: the earlier one
        // (4 lines per document) is the one reported.
        let mut docs: Vec<String> = (0..n).map(doc).collect();
        let (first, second) = (n / 2 + 3, n - 2);
        docs[first] = "apiVersion: v1\nkind: Namespace\nmetadata: {}\n".into();
        docs[second] = "a: [1,\n".into();
        let err = parse(Path::new("big.yaml"), &docs.join("---\n")).unwrap_err();
        assert_eq!(err.line, first * 4 + 1, "{err}");
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
