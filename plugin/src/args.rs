//! `CNI_ARGS`: `KEY=VALUE;KEY=VALUE`. Like libcni's `LoadArgs`, an unknown key
//! is an error unless `IgnoreUnknown` is true — runtimes set it because they
//! pass the same args to every plugin in a chain.

use crate::error::{CniError, Code};

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CniArgs {
    pub pod_namespace: Option<String>,
    pub pod_name: Option<String>,
    pub pod_uid: Option<String>,
    pub infra_container_id: Option<String>,
    pub ignore_unknown: bool,
}

impl CniArgs {
    pub fn parse(raw: &str) -> Result<Self, CniError> {
        let pairs = raw
            .split(';')
            .filter(|p| !p.is_empty())
            .map(|p| {
                p.split_once('=').ok_or_else(|| {
                    CniError::new(
                        Code::InvalidEnvironment,
                        format!("CNI_ARGS: {p:?} is not KEY=VALUE"),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;

        // IgnoreUnknown applies to the whole string, wherever it appears.
        let mut args = CniArgs::default();
        for (k, v) in &pairs {
            if *k == "IgnoreUnknown" {
                args.ignore_unknown = parse_bool(v)?;
            }
        }
        let mut unknown = Vec::new();
        for (k, v) in pairs {
            let value = Some(v.to_string()).filter(|v| !v.is_empty());
            match k {
                "K8S_POD_NAMESPACE" => args.pod_namespace = value,
                "K8S_POD_NAME" => args.pod_name = value,
                "K8S_POD_UID" => args.pod_uid = value,
                "K8S_POD_INFRA_CONTAINER_ID" => args.infra_container_id = value,
                "IgnoreUnknown" => {}
                other => unknown.push(other.to_string()),
            }
        }
        if !unknown.is_empty() && !args.ignore_unknown {
            return Err(CniError::new(
                Code::InvalidEnvironment,
                format!(
                    "CNI_ARGS: unknown keys {} (set IgnoreUnknown=1 to allow them)",
                    unknown.join(", ")
                ),
            ));
        }
        Ok(args)
    }
}

/// libcni's boolean spelling: 1/0/true/false, any case.
fn parse_bool(v: &str) -> Result<bool, CniError> {
    match v.to_ascii_lowercase().as_str() {
        "1" | "true" => Ok(true),
        "0" | "false" => Ok(false),
        _ => Err(CniError::new(
            Code::InvalidEnvironment,
            format!("CNI_ARGS: IgnoreUnknown={v:?} is not a boolean"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn containerd_args() {
        let a = CniArgs::parse(
            "K8S_POD_NAME=web-0;K8S_POD_NAMESPACE=shop;K8S_POD_INFRA_CONTAINER_ID=4f1c;K8S_POD_UID=0b9e-11;IgnoreUnknown=1",
        )
        .unwrap();
        assert_eq!(
            a,
            CniArgs {
                pod_namespace: Some("shop".into()),
                pod_name: Some("web-0".into()),
                pod_uid: Some("0b9e-11".into()),
                infra_container_id: Some("4f1c".into()),
                ignore_unknown: true,
            }
        );
    }

    #[test]
    fn podman_args_have_no_namespace() {
        let a = CniArgs::parse("IgnoreUnknown=1;K8S_POD_NAME=happy_turing").unwrap();
        assert_eq!(a.pod_name.as_deref(), Some("happy_turing"));
        assert_eq!(a.pod_namespace, None);
    }

    #[test]
    fn unknown_keys_need_ignore_unknown() {
        let err = CniArgs::parse("K8S_POD_NAME=a;FOO=bar").unwrap_err();
        assert_eq!(err.code, Code::InvalidEnvironment);
        assert!(err.msg.contains("FOO"), "{err}");
        // The flag may come after the unknown key; TRUE in any case counts.
        assert!(CniArgs::parse("FOO=bar;IgnoreUnknown=TRUE").is_ok());
        assert!(CniArgs::parse("FOO=bar;IgnoreUnknown=true").is_ok());
        assert!(CniArgs::parse("FOO=bar;IgnoreUnknown=0").is_err());
        assert!(CniArgs::parse("FOO=bar;IgnoreUnknown=false").is_err());
        assert!(CniArgs::parse("IgnoreUnknown=maybe").is_err());
    }

    #[test]
    fn malformed_pairs_and_values_with_equals() {
        assert!(CniArgs::parse("K8S_POD_NAME").is_err());
        assert_eq!(CniArgs::parse("").unwrap(), CniArgs::default());
        // A trailing ';' is tolerated; '=' inside a value is kept.
        let a = CniArgs::parse("K8S_POD_UID=a=b;").unwrap();
        assert_eq!(a.pod_uid.as_deref(), Some("a=b"));
    }
}
