//! Pure conflist surgery: no file I/O here, so every rule is unit-testable.
//!
//! catena's chained conflist is the primary's conflist with one more entry,
//! `{"type":"catena-cni", ...}`, at the end of `plugins`. The primary's plugin
//! entries are copied as *text*, byte for byte: a serde round trip would
//! reorder keys, drop duplicate keys, rewrite number formats (`1400.0`,
//! `1e3`) and lose anything the primary's own tooling greps for. serde is used
//! only to validate the input and to check the result.

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{Map, Value};
use std::ops::Range;

/// The `type` catena's CNI plugin registers under.
pub const CATENA_TYPE: &str = "catena-cni";

/// CNI spec versions `catena-cni` understands. Mirrors `SUPPORTED` in
/// plugin/src/version.rs: the agent does not link the plugin crate, and a
/// chained conflist with another version would make every pod ADD fail.
pub const SUPPORTED_CNI_VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// The optional keys catena-cni reads from its own conflist entry.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CatenaEntry {
    pub agent_socket: Option<String>,
    pub state_dir: Option<String>,
    pub log_file: Option<String>,
}

impl CatenaEntry {
    /// The entry as compact JSON, keys in a fixed order so the output is
    /// deterministic (idempotent installs compare bytes).
    pub fn to_json(&self) -> String {
        // Built by hand rather than through serde_json::Map, whose key order
        // depends on the `preserve_order` feature.
        let mut parts = vec![format!("\"type\":{}", Value::from(CATENA_TYPE))];
        for (key, value) in [
            ("agentSocket", &self.agent_socket),
            ("stateDir", &self.state_dir),
            ("logFile", &self.log_file),
        ] {
            if let Some(v) = value {
                parts.push(format!("{}:{}", Value::from(key), Value::from(v.as_str())));
            }
        }
        format!("{{{}}}", parts.join(","))
    }
}

/// Parse a CNI configuration with a readable error (line and column).
pub fn parse(text: &str) -> Result<Map<String, Value>> {
    let value: Value = serde_json::from_str(text).map_err(|e| {
        anyhow!(
            "not valid JSON at line {} column {}: {}",
            e.line(),
            e.column(),
            e
        )
    })?;
    match value {
        Value::Object(m) => Ok(m),
        other => bail!("expected a JSON object, found {}", kind(&other)),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The network `name` of a conf or conflist, if it has one.
pub fn network_name(text: &str) -> Option<String> {
    parse(text)
        .ok()?
        .get("name")
        .and_then(Value::as_str)
        .map(str::to_owned)
}

/// The `type` of every plugin in a conflist (or the single type of a conf).
pub fn plugin_types(conf: &Map<String, Value>) -> Vec<String> {
    match conf.get("plugins").and_then(Value::as_array) {
        Some(plugins) => plugins
            .iter()
            .map(|p| {
                p.get("type")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned()
            })
            .collect(),
        None => conf
            .get("type")
            .and_then(Value::as_str)
            .map(|t| vec![t.to_owned()])
            .unwrap_or_default(),
    }
}

/// Whether a parsed configuration already chains catena.
pub fn has_catena(conf: &Map<String, Value>) -> bool {
    plugin_types(conf).iter().any(|t| t == CATENA_TYPE)
}

/// Checks a runtime applies (libcni) plus the version catena-cni needs.
fn check_common(conf: &Map<String, Value>) -> Result<()> {
    match conf.get("name") {
        Some(Value::String(n)) if !n.is_empty() => {}
        _ => bail!("missing network \"name\" (libcni rejects a configuration without one)"),
    }
    // libcni defaults a missing cniVersion to 0.1.0, which catena-cni cannot speak.
    let version = conf
        .get("cniVersion")
        .and_then(Value::as_str)
        .unwrap_or("0.1.0");
    if !SUPPORTED_CNI_VERSIONS.contains(&version) {
        bail!(
            "cniVersion {version:?} is not supported by catena-cni (supported: {})",
            SUPPORTED_CNI_VERSIONS.join(", ")
        );
    }
    Ok(())
}

/// Validate a complete chained conflist provided by the operator
/// (`cni.customConf`): it is written as-is, so it must already be right.
/// Returns warnings that do not stop the install.
pub fn validate_custom(text: &str) -> Result<Vec<String>> {
    let conf = parse(text)?;
    check_common(&conf)?;
    let plugins = match conf.get("plugins") {
        Some(Value::Array(p)) if !p.is_empty() => p,
        Some(Value::Array(_)) => bail!("\"plugins\" is empty"),
        Some(other) => bail!("\"plugins\" must be an array, found {}", kind(other)),
        None => bail!("no \"plugins\" array: a custom configuration must be a conflist (primary plugin(s), then {{\"type\": \"{CATENA_TYPE}\"}})"),
    };
    for (i, p) in plugins.iter().enumerate() {
        match p.get("type") {
            Some(Value::String(t)) if !t.is_empty() => {}
            _ => bail!("plugins[{i}] has no \"type\""),
        }
    }
    let types = plugin_types(&conf);
    let catena: Vec<usize> = (0..types.len())
        .filter(|&i| types[i] == CATENA_TYPE)
        .collect();
    match catena.as_slice() {
        [] => bail!(
            "no plugin of type \"{CATENA_TYPE}\" in plugins [{}]: add {{\"type\": \"{CATENA_TYPE}\"}} after the primary plugin",
            types.join(", ")
        ),
        [0] => bail!(
            "\"{CATENA_TYPE}\" is the first plugin: it is a chained plugin and needs the primary plugin (which creates the veth and assigns the IP) before it"
        ),
        [_] => {}
        _ => bail!("\"{CATENA_TYPE}\" appears {} times in plugins", catena.len()),
    }
    let mut warnings = Vec::new();
    if catena[0] != types.len() - 1 {
        warnings.push(format!(
            "\"{CATENA_TYPE}\" is not the last plugin (plugins [{}]): plugins after it may change the interfaces it attached to",
            types.join(", ")
        ));
    }
    Ok(warnings)
}

/// Byte offset just past JSON whitespace starting at `i`.
fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && matches!(b[i], b' ' | b'\t' | b'\n' | b'\r') {
        i += 1;
    }
    i
}

/// End (exclusive) of the JSON value starting at `i`. The text has already
/// been validated by serde, so this only has to track strings and nesting.
fn value_end(b: &[u8], i: usize) -> usize {
    match b[i] {
        b'"' => string_end(b, i),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut j = i;
            while j < b.len() {
                match b[j] {
                    b'"' => {
                        j = string_end(b, j);
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return j + 1;
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
            b.len()
        }
        _ => {
            let mut j = i;
            while j < b.len() && !matches!(b[j], b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r')
            {
                j += 1;
            }
            j
        }
    }
}

/// End (exclusive, past the closing quote) of the string starting at `i`.
fn string_end(b: &[u8], i: usize) -> usize {
    let mut j = i + 1;
    while j < b.len() {
        match b[j] {
            b'\\' => j += 2,
            b'"' => return j + 1,
            _ => j += 1,
        }
    }
    b.len()
}

/// Top-level members of a validated JSON object: (decoded key, value span).
fn members(text: &str) -> Result<Vec<(String, Range<usize>)>> {
    let b = text.as_bytes();
    let mut i = skip_ws(b, 0);
    if b.get(i) != Some(&b'{') {
        bail!("expected a JSON object");
    }
    i = skip_ws(b, i + 1);
    let mut out = Vec::new();
    while b.get(i) == Some(&b'"') {
        let key_end = string_end(b, i);
        let key: String = serde_json::from_str(&text[i..key_end]).context("object key")?;
        i = skip_ws(b, key_end);
        if b.get(i) != Some(&b':') {
            bail!("expected ':' after key {key:?}");
        }
        let start = skip_ws(b, i + 1);
        let end = value_end(b, start);
        out.push((key, start..end));
        i = skip_ws(b, end);
        if b.get(i) == Some(&b',') {
            i = skip_ws(b, i + 1);
        }
    }
    Ok(out)
}

/// Spans of the elements of the validated JSON array at `span`.
fn elements(text: &str, span: Range<usize>) -> Vec<Range<usize>> {
    let b = text.as_bytes();
    let mut i = skip_ws(b, span.start + 1);
    let mut out = Vec::new();
    while i < span.end - 1 && b[i] != b']' {
        let end = value_end(b, i);
        out.push(i..end);
        i = skip_ws(b, end);
        if b.get(i) == Some(&b',') {
            i = skip_ws(b, i + 1);
        }
    }
    out
}

/// Last span for `key` (Go's encoding/json, which libcni uses, keeps the last
/// of duplicate keys, and so does serde_json).
fn member(members: &[(String, Range<usize>)], key: &str) -> Option<Range<usize>> {
    members
        .iter()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, r)| r.clone())
}

/// Build catena's chained conflist from the primary's conf or conflist text.
///
/// * conflist: the `plugins` array is rebuilt from the primary's entries,
///   copied verbatim, minus any existing catena entry, plus `entry` last;
///   every other byte of the file (name, cniVersion, unknown keys, layout) is
///   kept.
/// * single-plugin conf (`.conf`/`.json`): wrapped into a conflist the way
///   libcni's `ConfListFromConf` does, with the whole conf object verbatim as
///   the first plugin (libcni overrides `name`/`cniVersion` inside plugin
///   entries, so leaving them there is harmless).
///
/// The network `name` stays the primary's: runtimes key their result cache
/// (`/var/lib/cni/results/<name>-<id>-<if>`) on it, so pods created before
/// catena was installed are still deleted cleanly through the chained list.
pub fn chain(primary: &str, entry: &CatenaEntry) -> Result<String> {
    let conf = parse(primary)?;
    check_common(&conf)?;
    let entry_json = entry.to_json();
    let tops = members(primary)?;
    let out = match conf.get("plugins") {
        Some(Value::Array(list)) => {
            if list.is_empty() {
                bail!("\"plugins\" is empty: there is no primary plugin to chain after");
            }
            let span = member(&tops, "plugins").ok_or_else(|| anyhow!("\"plugins\" not found"))?;
            let elems = elements(primary, span.clone());
            let kept: Vec<&str> = elems
                .iter()
                .zip(list)
                .filter(|(_, v)| v.get("type").and_then(Value::as_str) != Some(CATENA_TYPE))
                .map(|(r, _)| &primary[r.clone()])
                .collect();
            if kept.is_empty() {
                bail!("the conflist holds only \"{CATENA_TYPE}\": there is no primary plugin to chain after");
            }
            // Reuse the primary's own layout: the text between '[' and the
            // first element separates elements, the text before ']' closes.
            let first = elems[0].start;
            let last_end = elems[elems.len() - 1].end;
            let lead = &primary[span.start + 1..first];
            let trail = &primary[last_end..span.end - 1];
            let sep = format!(",{lead}");
            let mut array = String::from("[");
            array.push_str(lead);
            for k in &kept {
                array.push_str(k);
                array.push_str(&sep);
            }
            array.push_str(&entry_json);
            array.push_str(trail);
            array.push(']');
            format!(
                "{}{}{}",
                &primary[..span.start],
                array,
                &primary[span.end..]
            )
        }
        Some(other) => bail!("\"plugins\" must be an array, found {}", kind(other)),
        None => {
            if conf
                .get("type")
                .and_then(Value::as_str)
                .unwrap_or("")
                .is_empty()
            {
                bail!("neither a conflist (\"plugins\") nor a plugin conf (\"type\")");
            }
            if has_catena(&conf) {
                bail!("the configuration is catena-cni alone: there is no primary plugin to chain after");
            }
            let span_of = |k: &str| member(&tops, k).map(|r| primary[r].to_owned());
            let mut head = String::from("{\n");
            for key in ["cniVersion", "name"] {
                if let Some(v) = span_of(key) {
                    head.push_str(&format!("  {}: {},\n", Value::from(key), v));
                }
            }
            let body = primary.trim();
            format!("{head}  \"plugins\": [\n{body},\n{entry_json}\n  ]\n}}\n")
        }
    };
    verify_chained(primary, &out, &entry_json)?;
    Ok(out)
}

/// The result must parse, end with catena, and hold the primary's plugins
/// unchanged (as values, and as text: see the tests).
fn verify_chained(primary: &str, out: &str, entry_json: &str) -> Result<()> {
    let produced = parse(out).context("internal error: produced conflist does not parse")?;
    let orig = parse(primary)?;
    let want: Vec<Value> = match orig.get("plugins").and_then(Value::as_array) {
        Some(list) => list
            .iter()
            .filter(|p| p.get("type").and_then(Value::as_str) != Some(CATENA_TYPE))
            .cloned()
            .collect(),
        None => vec![Value::Object(orig.clone())],
    };
    let got = produced
        .get("plugins")
        .and_then(Value::as_array)
        .ok_or_else(|| anyhow!("internal error: produced conflist has no plugins"))?;
    let entry: Value = serde_json::from_str(entry_json)?;
    if got.len() != want.len() + 1 || got[..want.len()] != want[..] || got[want.len()] != entry {
        bail!("internal error: produced conflist does not preserve the primary's plugins");
    }
    for key in ["name", "cniVersion"] {
        if produced.get(key) != orig.get(key) {
            bail!("internal error: produced conflist changed {key:?}");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const KUBE_OVN: &str = r#"{
  "name": "kube-ovn",
  "cniVersion": "0.3.1",
  "plugins": [
    {
      "type":"kube-ovn",
      "server_socket":"/run/openvswitch/kube-ovn-daemon.sock",
      "mtu": 1400.0,
      "ipam": {"type": "kube-ovn", "server_socket": "/run/openvswitch/kube-ovn-daemon.sock"}
    },
    {
      "type": "portmap",
      "capabilities": {"portMappings": true},
      "snat": true
    }
  ]
}
"#;

    #[test]
    fn chain_appends_catena_and_keeps_plugins_as_text() {
        let out = chain(KUBE_OVN, &CatenaEntry::default()).unwrap();
        let parsed = parse(&out).unwrap();
        assert_eq!(plugin_types(&parsed), ["kube-ovn", "portmap", "catena-cni"]);
        // Each primary entry appears verbatim, including `1400.0` and the
        // original key order, which a serde round trip would rewrite.
        let conf = parse(KUBE_OVN).unwrap();
        let tops = members(KUBE_OVN).unwrap();
        let span = member(&tops, "plugins").unwrap();
        for e in elements(KUBE_OVN, span) {
            assert!(
                out.contains(&KUBE_OVN[e]),
                "entry not kept verbatim:\n{out}"
            );
        }
        assert!(out.contains("\"mtu\": 1400.0"));
        assert_eq!(parsed.get("name"), conf.get("name"));
        // Everything before the plugins array is untouched.
        let head = &KUBE_OVN[..KUBE_OVN.find("\"plugins\"").unwrap()];
        assert!(out.starts_with(head));
        assert!(out.ends_with("}\n"));
    }

    #[test]
    fn chain_is_idempotent_and_replaces_an_existing_entry() {
        let once = chain(KUBE_OVN, &CatenaEntry::default()).unwrap();
        let twice = chain(&once, &CatenaEntry::default()).unwrap();
        assert_eq!(once, twice);
        let socket = CatenaEntry {
            agent_socket: Some("/run/x.sock".into()),
            ..Default::default()
        };
        let replaced = chain(&once, &socket).unwrap();
        let p = parse(&replaced).unwrap();
        assert_eq!(plugin_types(&p), ["kube-ovn", "portmap", "catena-cni"]);
        assert!(replaced.contains(r#"{"type":"catena-cni","agentSocket":"/run/x.sock"}"#));
    }

    #[test]
    fn chain_wraps_a_single_plugin_conf() {
        let conf = r#"{"cniVersion":"0.4.0","name":"mynet","type":"bridge","bridge":"cni0","ipam":{"type":"host-local","subnet":"10.1.0.0/16"}}"#;
        let out = chain(conf, &CatenaEntry::default()).unwrap();
        let p = parse(&out).unwrap();
        assert_eq!(plugin_types(&p), ["bridge", "catena-cni"]);
        assert_eq!(p["name"], "mynet");
        assert_eq!(p["cniVersion"], "0.4.0");
        assert!(out.contains(conf));
        assert_eq!(chain(&out, &CatenaEntry::default()).unwrap(), out);
    }

    #[test]
    fn chain_handles_compact_and_tricky_strings() {
        let conf =
            r#"{"name":"n","cniVersion":"1.0.0","plugins":[{"type":"ptp","x":"a]}\"[{"}],"z":1}"#;
        let out = chain(conf, &CatenaEntry::default()).unwrap();
        assert_eq!(
            out,
            r#"{"name":"n","cniVersion":"1.0.0","plugins":[{"type":"ptp","x":"a]}\"[{"},{"type":"catena-cni"}],"z":1}"#
        );
    }

    #[test]
    fn entry_keys_are_ordered() {
        let e = CatenaEntry {
            agent_socket: Some("/s".into()),
            state_dir: Some("/d".into()),
            log_file: Some("/l".into()),
        };
        assert_eq!(
            e.to_json(),
            r#"{"type":"catena-cni","agentSocket":"/s","stateDir":"/d","logFile":"/l"}"#
        );
    }

    #[test]
    fn chain_rejects_broken_or_unusable_primaries() {
        let err = chain(
            "{\"name\": \"x\",\n \"plugins\": [",
            &CatenaEntry::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("line 2"), "{err}");
        let err = chain(
            r#"{"name":"x","cniVersion":"0.2.0","plugins":[{"type":"ptp"}]}"#,
            &CatenaEntry::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("not supported by catena-cni"), "{err}");
        let err = chain(
            r#"{"cniVersion":"1.0.0","plugins":[{"type":"ptp"}]}"#,
            &CatenaEntry::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("name"), "{err}");
        let err = chain(
            r#"{"name":"x","cniVersion":"1.0.0","plugins":[{"type":"catena-cni"}]}"#,
            &CatenaEntry::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("no primary plugin"), "{err}");
    }

    #[test]
    fn custom_conf_validation_messages() {
        let ok = r#"{"name":"generic-veth","cniVersion":"0.3.1","plugins":[{"type":"kube-ovn"},{"type":"portmap"},{"type":"catena-cni"}]}"#;
        assert!(validate_custom(ok).unwrap().is_empty());
        let cases = [
            (
                r#"{"name":"n","cniVersion":"0.3.1","plugins":[{"type":"ptp"}]}"#,
                "no plugin of type \"catena-cni\"",
            ),
            (
                r#"{"name":"n","cniVersion":"0.3.1","plugins":[{"type":"catena-cni"},{"type":"ptp"}]}"#,
                "is the first plugin",
            ),
            (
                r#"{"name":"n","cniVersion":"0.3.1","type":"ptp"}"#,
                "must be a conflist",
            ),
            (
                r#"{"name":"n","cniVersion":"0.3.1","plugins":[{"x":1},{"type":"catena-cni"}]}"#,
                "plugins[0] has no \"type\"",
            ),
            ("[1,2]", "expected a JSON object"),
            ("{\"name\": }", "not valid JSON at line 1"),
        ];
        for (text, want) in cases {
            let err = validate_custom(text).unwrap_err().to_string();
            assert!(err.contains(want), "{text}: {err}");
        }
        let warn = validate_custom(
            r#"{"name":"n","cniVersion":"1.0.0","plugins":[{"type":"ptp"},{"type":"catena-cni"},{"type":"bandwidth"}]}"#,
        )
        .unwrap();
        assert_eq!(warn.len(), 1, "{warn:?}");
    }
}
