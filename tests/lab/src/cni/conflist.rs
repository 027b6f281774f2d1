//! Conflist parsing and validation (the checks libcni's ConfListFromBytes makes).

use super::CniError;
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

/// A parsed network configuration list.
#[derive(Clone, Debug, PartialEq)]
pub struct Conflist {
    pub name: String,
    /// Empty when the conflist has none (libcni then validates against 0.1.0).
    pub cni_version: String,
    pub disable_check: bool,
    pub disable_gc: bool,
    /// Each plugin's object exactly as written.
    pub plugins: Vec<Map<String, Value>>,
    /// The whole conflist as written (cached with results, like libcni).
    pub raw: Value,
}

fn invalid(msg: impl Into<String>) -> CniError {
    CniError::Invalid(format!("error parsing configuration list: {}", msg.into()))
}

impl Conflist {
    pub fn parse(text: &str) -> Result<Conflist, CniError> {
        let v: Value = serde_json::from_str(text).map_err(|e| invalid(e.to_string()))?;
        Conflist::from_value(v)
    }

    pub fn from_file(path: &Path) -> Result<Conflist, CniError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| CniError::Invalid(format!("error reading {}: {e}", path.display())))?;
        Conflist::parse(&text)
    }

    pub fn from_value(raw: Value) -> Result<Conflist, CniError> {
        let obj = raw
            .as_object()
            .ok_or_else(|| invalid("not a JSON object"))?;
        let name = match obj.get("name") {
            None => return Err(invalid("no name")),
            Some(Value::String(s)) => s.clone(),
            Some(other) => return Err(invalid(format!("invalid name type {other}"))),
        };
        validate_network_name(&name)?;
        let cni_version = match obj.get("cniVersion") {
            None => String::new(),
            Some(Value::String(s)) => s.clone(),
            Some(other) => return Err(invalid(format!("invalid cniVersion type {other}"))),
        };
        let disable_check = flag(obj, "disableCheck")?;
        let disable_gc = flag(obj, "disableGC")?;
        let plugins = match obj.get("plugins") {
            None => return Err(invalid("no 'plugins' key")),
            Some(Value::Array(a)) => a,
            Some(other) => return Err(invalid(format!("invalid 'plugins' type {other}"))),
        };
        if plugins.is_empty() {
            return Err(invalid("no plugins in list"));
        }
        let plugins = plugins
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let p = p
                    .as_object()
                    .ok_or_else(|| invalid(format!("plugin config {i} is not an object")))?;
                match p.get("type") {
                    Some(Value::String(t)) if !t.is_empty() => {}
                    _ => {
                        return Err(invalid(format!(
                            "failed to parse plugin config {i}: missing 'type'"
                        )))
                    }
                }
                if let Some(caps) = p.get("capabilities") {
                    let ok = caps
                        .as_object()
                        .is_some_and(|c| c.values().all(Value::is_boolean));
                    if !ok {
                        return Err(invalid(format!(
                            "plugin config {i}: 'capabilities' must map names to booleans"
                        )));
                    }
                }
                Ok(p.clone())
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Conflist {
            name,
            cni_version,
            disable_check,
            disable_gc,
            plugins,
            raw,
        })
    }

    /// The `type` of each plugin, in order.
    pub fn plugin_types(&self) -> Vec<&str> {
        self.plugins
            .iter()
            .map(|p| p["type"].as_str().unwrap_or_default())
            .collect()
    }

    /// Writes `<dir>/<name>.conflist` (for demos and debugging) and returns its path.
    pub fn write_to(&self, dir: &Path) -> anyhow::Result<PathBuf> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(format!("{}.conflist", self.name));
        std::fs::write(&path, serde_json::to_vec_pretty(&self.raw)?)?;
        Ok(path)
    }
}

/// `disableCheck`/`disableGC`: a bool, or the strings "true"/"false".
fn flag(obj: &Map<String, Value>, key: &str) -> Result<bool, CniError> {
    match obj.get(key) {
        None => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(Value::String(s)) if s.eq_ignore_ascii_case("true") => Ok(true),
        Some(Value::String(s)) if s.eq_ignore_ascii_case("false") => Ok(false),
        Some(other) => Err(invalid(format!("invalid {key} value {other}"))),
    }
}

/// libcni: a network name is `[a-zA-Z0-9][a-zA-Z0-9_.\-]*`.
pub(crate) fn validate_network_name(name: &str) -> Result<(), CniError> {
    if name.is_empty() {
        return Err(CniError::Invalid("missing network name".into()));
    }
    if !valid_id_chars(name) {
        return Err(CniError::Invalid(format!(
            "invalid characters found in network name {name:?}"
        )));
    }
    Ok(())
}

/// libcni: container ids follow the same pattern as network names.
pub(crate) fn validate_container_id(id: &str) -> Result<(), CniError> {
    if id.is_empty() {
        return Err(CniError::Invalid("missing containerID".into()));
    }
    if !valid_id_chars(id) {
        return Err(CniError::Invalid(format!(
            "invalid characters in containerID {id:?}"
        )));
    }
    Ok(())
}

/// libcni: non-empty, < IFNAMSIZ (16) bytes, not `.`/`..`, no `/`, `:` or whitespace.
pub(crate) fn validate_ifname(ifname: &str) -> Result<(), CniError> {
    let bad = ifname.is_empty()
        || ifname.len() > 15
        || ifname == "."
        || ifname == ".."
        || ifname
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace());
    if bad {
        return Err(CniError::Invalid(format!(
            "invalid interface name {ifname:?}"
        )));
    }
    Ok(())
}

fn valid_id_chars(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn err(v: Value) -> String {
        Conflist::from_value(v).unwrap_err().to_string()
    }

    #[test]
    fn rejects_what_libcni_rejects() {
        assert!(err(json!({"plugins": [{"type": "ptp"}]})).contains("no name"));
        assert!(err(json!({"name": "n"})).contains("no 'plugins' key"));
        assert!(err(json!({"name": "n", "plugins": []})).contains("no plugins in list"));
        assert!(err(json!({"name": "n", "plugins": [{"ipam": {}}]})).contains("missing 'type'"));
        assert!(
            err(json!({"name": "bad name", "plugins": [{"type": "ptp"}]}))
                .contains("invalid characters")
        );
        assert!(
            err(json!({"name": "n", "cniVersion": 1, "plugins": [{"type": "ptp"}]}))
                .contains("invalid cniVersion")
        );
        assert!(err(
            json!({"name": "n", "plugins": [{"type": "ptp", "capabilities": {"x": "yes"}}]})
        )
        .contains("capabilities"));
    }

    #[test]
    fn parses_a_chained_conflist() {
        let c = Conflist::parse(
            r#"{"cniVersion":"1.0.0","name":"k8s-pod-network","disableCheck":"true",
                "plugins":[{"type":"ptp"},{"type":"catena-cni","capabilities":{"portMappings":true}}]}"#,
        )
        .unwrap();
        assert_eq!(c.plugin_types(), ["ptp", "catena-cni"]);
        assert!(c.disable_check);
        assert_eq!(c.cni_version, "1.0.0");
    }

    #[test]
    fn validates_ids_and_ifnames() {
        assert!(validate_container_id(&"ab".repeat(32)).is_ok());
        assert!(validate_container_id("-x").is_err());
        assert!(validate_ifname("eth0").is_ok());
        assert!(validate_ifname("a-very-long-ifname").is_err());
        assert!(validate_ifname("eth:0").is_err());
    }
}
