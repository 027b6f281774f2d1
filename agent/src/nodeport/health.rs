//! Health-check node ports (`spec.healthCheckNodePort` of Services with
//! `externalTrafficPolicy: Local`): a cloud load balancer probes this port on
//! every node and sends the Service's traffic only to nodes answering 200,
//! i.e. nodes with a local endpoint. The answer is kube-proxy's, byte for
//! byte in its fields, on any path:
//! `{"service":{"namespace":..,"name":..},"localEndpoints":N,"serviceProxyHealthy":true}`,
//! 200 when N > 0, 503 otherwise.
//!
//! One listener per port, opened and closed as Services come and go
//! (`HealthServers::reconcile`). The counts are swapped in place, so a
//! listener outlives changes of its Service's endpoints.

use crate::compile::external::{kind_of, kind_of6};
use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use catena_datapath::{BackendAddr, LbDesired, LbService};
use k8s_openapi::api::core::v1::Service;
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, RwLock};

/// What one health-check node port reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub port: u16,
    pub namespace: String,
    pub name: String,
    /// Endpoints of the Service on this node.
    pub local_endpoints: usize,
}

/// How many endpoints of each Service in `services` (`namespace/name` ->
/// Service) are on this node: the distinct addresses of the backends its
/// external frontends (NodePorts, externalIPs, LoadBalancer IPs) give
/// external clients, which `externalTrafficPolicy: Local` limits to this
/// node, in either family. Families are counted apart and the larger count
/// is the answer: a dual-stack pod is one endpoint with an address of each
/// family (kube-proxy, one proxier per family, reports one family's
/// count), while an IPv6-only Service counts its IPv6 endpoints. A Service
/// without external frontends here is absent (no local endpoints).
pub fn local_endpoints(
    desired: &LbDesired,
    services: &BTreeMap<&str, &Service>,
) -> BTreeMap<String, usize> {
    fn external_scope<A: Copy>(svc: &LbService<A>) -> impl Iterator<Item = A> + '_ {
        // The external scope when the frontend has two.
        let backends: &[BackendAddr<A>] = svc.external_backends.as_ref().unwrap_or(&svc.backends);
        backends.iter().map(|b| b.address)
    }
    let mut v4: BTreeMap<&str, BTreeSet<Ipv4Addr>> = BTreeMap::new();
    for (fe, svc) in &desired.services {
        if let Some(service) = services.get(svc.name.as_str()) {
            if kind_of(service, fe).is_some() {
                v4.entry(&svc.name).or_default().extend(external_scope(svc));
            }
        }
    }
    let mut v6: BTreeMap<&str, BTreeSet<std::net::Ipv6Addr>> = BTreeMap::new();
    for (fe, svc) in &desired.services6 {
        if let Some(service) = services.get(svc.name.as_str()) {
            if kind_of6(service, fe).is_some() {
                v6.entry(&svc.name).or_default().extend(external_scope(svc));
            }
        }
    }
    let mut out: BTreeMap<String, usize> = BTreeMap::new();
    let counts = v4.iter().map(|(n, a)| (n, a.len()));
    for (name, n) in counts.chain(v6.iter().map(|(n, a)| (n, a.len()))) {
        let c = out.entry(name.to_string()).or_default();
        *c = (*c).max(n);
    }
    out
}

type Shared = Arc<RwLock<HealthCheck>>;

struct Listener {
    state: Shared,
    task: tokio::task::JoinHandle<()>,
}

/// The open health-check listeners.
pub struct HealthServers {
    bind: IpAddr,
    listeners: BTreeMap<u16, Listener>,
}

impl Default for HealthServers {
    fn default() -> Self {
        HealthServers {
            bind: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            listeners: BTreeMap::new(),
        }
    }
}

impl HealthServers {
    /// Opens listeners for new ports, updates the others' counts and closes
    /// those no Service wants any more. A port that cannot be bound (in use)
    /// is logged and tried again on the next call.
    pub async fn reconcile(&mut self, checks: Vec<HealthCheck>) {
        let wanted: BTreeMap<u16, HealthCheck> = checks.into_iter().map(|c| (c.port, c)).collect();
        self.listeners.retain(|port, l| {
            let keep = wanted.contains_key(port);
            if !keep {
                l.task.abort();
                tracing::info!(port, "health-check node port closed");
            }
            keep
        });
        for (port, check) in wanted {
            if let Some(l) = self.listeners.get(&port) {
                let mut state = l.state.write().unwrap_or_else(|p| p.into_inner());
                if *state != check {
                    *state = check;
                }
                continue;
            }
            let addr = SocketAddr::new(self.bind, port);
            let listener = match tokio::net::TcpListener::bind(addr).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(%addr, service = %format!("{}/{}", check.namespace, check.name), error = %e, "cannot open health-check node port; retrying later");
                    continue;
                }
            };
            tracing::info!(%addr, service = %format!("{}/{}", check.namespace, check.name), "health-check node port open");
            let state: Shared = Arc::new(RwLock::new(check));
            let app = Router::new().fallback(answer).with_state(state.clone());
            let task = tokio::spawn(async move {
                if let Err(e) = axum::serve(listener, app).await {
                    tracing::error!(port, error = %e, "health-check node port stopped");
                }
            });
            self.listeners.insert(port, Listener { state, task });
        }
    }

    /// Ports currently served.
    pub fn ports(&self) -> Vec<u16> {
        self.listeners.keys().copied().collect()
    }
}

impl Drop for HealthServers {
    fn drop(&mut self) {
        for l in self.listeners.values() {
            l.task.abort();
        }
    }
}

async fn answer(State(state): State<Shared>) -> Response {
    let check = state.read().unwrap_or_else(|p| p.into_inner()).clone();
    body(&check)
}

/// kube-proxy's answer for one Service.
fn body(check: &HealthCheck) -> Response {
    let json = json!({
        "service": { "namespace": check.namespace, "name": check.name },
        "localEndpoints": check.local_endpoints,
        "serviceProxyHealthy": true,
    });
    let code = if check.local_endpoints > 0 {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut resp = (code, json.to_string()).into_response();
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(
        "X-Content-Type-Options",
        HeaderValue::from_static("nosniff"),
    );
    // kube-proxy advertises the local endpoint count as a weight hint.
    if let Ok(v) = HeaderValue::from_str(&check.local_endpoints.to_string()) {
        headers.insert("X-Load-Balancing-Endpoint-Weight", v);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compile::external::NorthSouth;
    use crate::compile::services::{compile_services_with, ServiceOptions};
    use crate::sources::{manifests::parse, ClusterState};
    use std::path::Path;

    /// A NodePort Service named `web` of `families` with
    /// `externalTrafficPolicy: Local`, plus `slices`.
    fn cluster(families: &str, cluster_ips: &str, slices: &str) -> ClusterState {
        let yaml = format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: shop}}\nspec:\n  type: NodePort\n  clusterIPs: {cluster_ips}\n  ipFamilies: {families}\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 32000\n  ports: [{{name: http, port: 80, nodePort: 30080}}]\n{slices}"
        );
        let mut s = ClusterState::default();
        for o in parse(Path::new("t.yaml"), &yaml).unwrap().objects {
            s.insert(o);
        }
        s
    }

    fn slice(family: &str, endpoints: &[(&str, &str)]) -> String {
        let eps: String = endpoints
            .iter()
            .map(|(a, node)| format!("- {{addresses: [\"{a}\"], nodeName: {node}}}\n"))
            .collect();
        format!("---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: web-{family}, namespace: shop, labels: {{kubernetes.io/service-name: web}}}}\naddressType: {family}\nports: [{{name: http, port: 8080}}]\nendpoints:\n{eps}")
    }

    /// `local_endpoints` of `shop/web` as node `node` compiles it.
    fn count(s: &ClusterState, node: &str) -> usize {
        let options = ServiceOptions {
            node_name: Some(node.into()),
            north_south: NorthSouth {
                enabled: true,
                node_addresses: vec!["192.168.1.1".parse().unwrap()],
                node_addresses6: vec!["fd00:77::1".parse().unwrap()],
            },
            ..Default::default()
        };
        let desired = compile_services_with(s, &[], &options, &[]).desired;
        let svc = s.services.values().next().unwrap();
        let services: BTreeMap<&str, &Service> = [("shop/web", &**svc)].into();
        let counts = local_endpoints(&desired, &services);
        assert!(counts.keys().all(|k| k == "shop/web"), "{counts:?}");
        counts.get("shop/web").copied().unwrap_or(0)
    }

    #[test]
    fn ipv6_only_service_counts_its_local_ipv6_endpoints() {
        let s = cluster(
            "[IPv6]",
            "[\"fd00:96::30\"]",
            &slice(
                "IPv6",
                &[
                    ("fd00:10::1", "n1"),
                    ("fd00:10::2", "n1"),
                    ("fd00:10::3", "n2"),
                ],
            ),
        );
        assert_eq!(count(&s, "n1"), 2);
        assert_eq!(count(&s, "n2"), 1);
        // Endpoints elsewhere only: the ClusterIP's backends do not count.
        assert_eq!(count(&s, "n3"), 0);
    }

    #[test]
    fn dual_stack_pods_count_once() {
        let s = cluster(
            "[IPv4, IPv6]",
            "[10.96.0.30, \"fd00:96::30\"]",
            &format!(
                "{}{}",
                slice(
                    "IPv4",
                    &[("10.0.0.1", "n1"), ("10.0.0.2", "n1"), ("10.0.0.3", "n2")]
                ),
                slice(
                    "IPv6",
                    &[
                        ("fd00:10::1", "n1"),
                        ("fd00:10::2", "n1"),
                        ("fd00:10::3", "n2")
                    ]
                ),
            ),
        );
        // Two dual-stack pods on n1: two endpoints, not four addresses.
        assert_eq!(count(&s, "n1"), 2);
        assert_eq!(count(&s, "n2"), 1);
        assert_eq!(count(&s, "n3"), 0);
    }

    #[test]
    fn a_dual_stack_service_with_only_ipv6_endpoints_here_is_healthy() {
        let s = cluster(
            "[IPv4, IPv6]",
            "[10.96.0.30, \"fd00:96::30\"]",
            &format!(
                "{}{}",
                slice("IPv4", &[("10.0.0.3", "n2")]),
                slice("IPv6", &[("fd00:10::1", "n1")]),
            ),
        );
        assert_eq!(count(&s, "n1"), 1);
    }
}
