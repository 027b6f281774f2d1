//! Which backend-selection algorithm a Service uses: the agent's
//! `--lb-algorithm` (Cilium's `loadBalancer.algorithm`), overridden per
//! Service by Cilium's annotation `service.cilium.io/lb-algorithm`.
//! The tables themselves are computed by the datapath (catena_datapath's
//! `maglev` module) from the backends this compiler chose.

use crate::sources::ObjectKey;
use k8s_openapi::api::core::v1::Service;

/// Cilium's per-Service override.
pub const LB_ALGORITHM_ANNOTATION: &str = "service.cilium.io/lb-algorithm";

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LbAlgorithm {
    /// A random backend per new flow (Cilium's default).
    #[default]
    Random,
    /// Maglev consistent hashing of the flow's 5-tuple: the same flow picks
    /// the same backend on every node, and a backend change moves only
    /// ~1/N of the flows' choices.
    Maglev,
}

impl LbAlgorithm {
    fn parse(value: &str) -> Option<LbAlgorithm> {
        match value.trim() {
            "random" => Some(LbAlgorithm::Random),
            "maglev" => Some(LbAlgorithm::Maglev),
            _ => None,
        }
    }
}

/// The algorithm `svc` uses: its annotation when valid, else `default`. An
/// unknown annotation value is reported and ignored (as Cilium does).
pub fn service_algorithm(
    key: &ObjectKey,
    svc: &Service,
    default: LbAlgorithm,
    warnings: &mut Vec<String>,
) -> LbAlgorithm {
    let Some(value) = svc
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(LB_ALGORITHM_ANNOTATION))
    else {
        return default;
    };
    LbAlgorithm::parse(value).unwrap_or_else(|| {
        warnings.push(format!(
            "service {key}: annotation {LB_ALGORITHM_ANNOTATION}: {value:?} is neither \
             \"random\" nor \"maglev\"; using the agent's default"
        ));
        default
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn svc(annotation: Option<&str>) -> Service {
        Service {
            metadata: ObjectMeta {
                annotations: annotation
                    .map(|v| [(LB_ALGORITHM_ANNOTATION.to_string(), v.to_string())].into()),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn annotation_overrides_the_default_both_ways() {
        let key = ObjectKey::new("ns", "s");
        let mut w = Vec::new();
        for default in [LbAlgorithm::Random, LbAlgorithm::Maglev] {
            assert_eq!(
                service_algorithm(&key, &svc(None), default, &mut w),
                default
            );
            assert_eq!(
                service_algorithm(&key, &svc(Some("maglev")), default, &mut w),
                LbAlgorithm::Maglev
            );
            assert_eq!(
                service_algorithm(&key, &svc(Some("random")), default, &mut w),
                LbAlgorithm::Random
            );
        }
        assert!(w.is_empty(), "{w:?}");
    }

    #[test]
    fn unknown_value_warns_and_keeps_the_default() {
        let key = ObjectKey::new("ns", "s");
        let mut w = Vec::new();
        let got = service_algorithm(&key, &svc(Some("round-robin")), LbAlgorithm::Maglev, &mut w);
        assert_eq!(got, LbAlgorithm::Maglev);
        assert_eq!(w.len(), 1);
        assert!(
            w[0].contains("ns/s") && w[0].contains("round-robin"),
            "{w:?}"
        );
    }
}
