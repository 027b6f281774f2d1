//! Spec versions we speak and which commands each one has.

use crate::error::{CniError, Code};
use serde::Serialize;

/// Every version whose results and config shape we understand. 0.1.0/0.2.0
/// are left out: they have no `prevResult`, so chaining cannot work.
pub const SUPPORTED: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
pub const LATEST: &str = "1.1.0";

fn triple(v: &str) -> Option<(u32, u32, u32)> {
    let mut it = v.split('.').map(|p| p.parse::<u32>().ok());
    let t = (it.next()??, it.next()??, it.next()??);
    it.next().is_none().then_some(t)
}

pub fn is_supported(v: &str) -> bool {
    SUPPORTED.contains(&v)
}

pub fn require_supported(v: &str) -> Result<(), CniError> {
    if is_supported(v) {
        Ok(())
    } else {
        Err(CniError::new(
            Code::IncompatibleVersion,
            format!("catena-cni does not support cniVersion {v:?}"),
        )
        .with_details(format!("supported versions: {}", SUPPORTED.join(", "))))
    }
}

/// Whether `v` is at least `min` (both `x.y.z`); unparsable versions are not.
pub fn at_least(v: &str, min: (u32, u32, u32)) -> bool {
    triple(v).is_some_and(|t| t >= min)
}

/// Fails with code 1 when `command` does not exist in spec version `v`.
pub fn require_command(v: &str, command: &str, min: (u32, u32, u32)) -> Result<(), CniError> {
    require_supported(v)?;
    if at_least(v, min) {
        Ok(())
    } else {
        Err(CniError::new(
            Code::IncompatibleVersion,
            format!(
                "{command} needs cniVersion {}.{}.{} or later, the configuration says {v}",
                min.0, min.1, min.2
            ),
        ))
    }
}

pub const CHECK_SINCE: (u32, u32, u32) = (0, 4, 0);
pub const STATUS_GC_SINCE: (u32, u32, u32) = (1, 1, 0);

/// The VERSION answer: echo the requested version when we speak it, so the
/// runtime sees the result in the version it asked about; otherwise our latest.
pub fn version_info(requested: Option<&str>) -> String {
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Info<'a> {
        cni_version: &'a str,
        supported_versions: &'a [&'a str],
    }
    let cni_version = requested.filter(|v| is_supported(v)).unwrap_or(LATEST);
    serde_json::to_string(&Info {
        cni_version,
        supported_versions: &SUPPORTED,
    })
    .expect("strings always serialise")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordering_is_numeric_not_lexical() {
        assert!(at_least("0.4.0", CHECK_SINCE));
        assert!(at_least("1.0.0", CHECK_SINCE));
        assert!(!at_least("0.3.1", CHECK_SINCE));
        assert!(at_least("1.10.0", STATUS_GC_SINCE));
        assert!(!at_least("1.0.0", STATUS_GC_SINCE));
        assert!(!at_least("1.1", STATUS_GC_SINCE));
        assert!(!at_least("garbage", (0, 0, 0)));
    }

    #[test]
    fn commands_are_gated_by_version() {
        assert_eq!(
            require_command("0.3.1", "CHECK", CHECK_SINCE)
                .unwrap_err()
                .code,
            Code::IncompatibleVersion
        );
        assert!(require_command("0.4.0", "CHECK", CHECK_SINCE).is_ok());
        assert!(require_command("1.0.0", "STATUS", STATUS_GC_SINCE).is_err());
        assert!(require_command("1.1.0", "GC", STATUS_GC_SINCE).is_ok());
        assert_eq!(
            require_supported("0.2.0").unwrap_err().code,
            Code::IncompatibleVersion
        );
    }

    #[test]
    fn version_answer_echoes_supported_request() {
        let v: serde_json::Value = serde_json::from_str(&version_info(Some("0.3.1"))).unwrap();
        assert_eq!(v["cniVersion"], "0.3.1");
        assert_eq!(
            v["supportedVersions"].as_array().unwrap().len(),
            SUPPORTED.len()
        );
        let v: serde_json::Value = serde_json::from_str(&version_info(Some("9.9.9"))).unwrap();
        assert_eq!(v["cniVersion"], LATEST);
        let v: serde_json::Value = serde_json::from_str(&version_info(None)).unwrap();
        assert_eq!(v["cniVersion"], LATEST);
    }
}
