//! North-south frontends of a Service: what clients outside the node reach
//! on the node's external devices (and what pods and node processes reach
//! through the same addresses).
//!
//! - NodePort (`type: NodePort` / `LoadBalancer` with `nodePort`): one
//!   frontend per node address on the external devices, on the nodePort;
//! - `spec.externalIPs` and `status.loadBalancer.ingress[].ip`: one frontend
//!   each, on the Service port.
//!
//! Each frontend has two scopes when its traffic policies differ (Cilium's
//! `SVC_FLAG_TWO_SCOPES`): clients outside the node (traffic arriving on an
//! external device) follow `externalTrafficPolicy`, in-cluster clients
//! (pods and node processes reaching the same address) follow
//! `internalTrafficPolicy`, as in Cilium. So with `externalTrafficPolicy:
//! Local` external clients get only the endpoints on this node (the client
//! address survives: no SNAT is ever needed) and are refused when none is
//! here, while a pod on the same node still reaches every endpoint. With
//! equal policies the frontend has one scope. All of this is compiled only
//! when catena replaces kube-proxy; otherwise kube-proxy owns these
//! addresses.

use super::services::{backends_from_pods, backends_from_slices, parse_proto, PodEndpoint};
use super::traffic_policy::{internal_local, NodeLocality};
use crate::sources::ObjectKey;
use crate::sources::SliceInfo;
use catena_datapath::{Frontend, LbService};
use k8s_openapi::api::core::v1::{Service, ServiceSpec};
use std::net::Ipv4Addr;

/// What the external frontends depend on besides the Service.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NorthSouth {
    /// Compile external frontends at all (`--kube-proxy-replacement`).
    pub enabled: bool,
    /// IPv4 addresses of the external devices: the NodePort frontends.
    pub node_addresses: Vec<Ipv4Addr>,
}

/// Whether external traffic to the Service only goes to local endpoints.
pub fn external_local(spec: &ServiceSpec) -> bool {
    spec.external_traffic_policy.as_deref() == Some("Local")
}

/// The kind of a Service's external frontend (for status output).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExternalKind {
    NodePort,
    ExternalIp,
    LoadBalancer,
}

impl ExternalKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ExternalKind::NodePort => "NodePort",
            ExternalKind::ExternalIp => "ExternalIP",
            ExternalKind::LoadBalancer => "LoadBalancer",
        }
    }
}

/// How `frontend` of `svc` is reached from outside, or `None` for its
/// ClusterIP (or a frontend it does not have).
pub fn kind_of(svc: &Service, frontend: &Frontend) -> Option<ExternalKind> {
    let spec = svc.spec.as_ref()?;
    for port in spec.ports.iter().flatten() {
        if parse_proto(port.protocol.as_deref()) != Some(frontend.proto) {
            continue;
        }
        if port.port == i32::from(frontend.port) {
            if ipv4s(spec.external_ips.iter().flatten()).any(|a| a == frontend.address) {
                return Some(ExternalKind::ExternalIp);
            }
            if lb_ingress_ips(svc).any(|a| a == frontend.address) {
                return Some(ExternalKind::LoadBalancer);
            }
        }
        if port.node_port == Some(i32::from(frontend.port)) && has_node_ports(spec) {
            return Some(ExternalKind::NodePort);
        }
    }
    None
}

/// The kind `catena service list` shows for an IPv4 frontend of `svc`:
/// its external kind, else `ClusterIP`; empty when the Service is unknown.
pub fn frontend_kind(svc: Option<&Service>, frontend: &Frontend) -> &'static str {
    match svc {
        None => "",
        Some(svc) => kind_of(svc, frontend).map_or("ClusterIP", ExternalKind::as_str),
    }
}

fn ipv4s<'a>(ips: impl Iterator<Item = &'a String> + 'a) -> impl Iterator<Item = Ipv4Addr> + 'a {
    ips.filter_map(|ip| ip.parse().ok())
}

fn lb_ingress_ips(svc: &Service) -> impl Iterator<Item = Ipv4Addr> + '_ {
    svc.status
        .iter()
        .flat_map(|s| s.load_balancer.iter())
        .flat_map(|lb| lb.ingress.iter().flatten())
        .filter_map(|i| i.ip.as_deref()?.parse().ok())
}

fn has_node_ports(spec: &ServiceSpec) -> bool {
    matches!(spec.type_.as_deref(), Some("NodePort" | "LoadBalancer"))
}

/// The Service's external frontends (empty when north-south is disabled).
/// `pods` must be the endpoint controller's pods when `slices` is `None`.
pub fn external_frontends(
    key: &ObjectKey,
    svc: &Service,
    slices: Option<&[&SliceInfo]>,
    pods: &[PodEndpoint],
    locality: &NodeLocality,
    ns: &NorthSouth,
    warnings: &mut Vec<String>,
) -> Vec<(Frontend, LbService)> {
    let mut out = Vec::new();
    let Some(spec) = svc.spec.as_ref().filter(|_| ns.enabled) else {
        return out;
    };
    if spec.type_.as_deref() == Some("ExternalName") {
        return out;
    }
    let external_ips: Vec<Ipv4Addr> = ipv4s(spec.external_ips.iter().flatten()).collect();
    let lb_ips: Vec<Ipv4Addr> = if spec.type_.as_deref() == Some("LoadBalancer") {
        lb_ingress_ips(svc).collect()
    } else {
        Vec::new()
    };
    let node_ports = has_node_ports(spec);
    if external_ips.is_empty() && lb_ips.is_empty() && !node_ports {
        return out;
    }
    let selector = spec.selector.clone().unwrap_or_default();
    let (int_local, ext_local) = (internal_local(spec), external_local(spec));
    // The ClusterIP compile reports bad protocols and ports already.
    let mut ignored = Vec::new();
    let affinity_timeout = super::services::session_affinity(key, spec, &mut ignored);
    for port in spec.ports.as_deref().unwrap_or_default() {
        let Some(proto) = parse_proto(port.protocol.as_deref()) else {
            continue;
        };
        let Ok(svc_port) = u16::try_from(port.port) else {
            continue;
        };
        let mut backends_of = |local: bool| {
            let local_only = local.then_some(locality);
            match slices {
                Some(slices) => backends_from_slices(slices, port, proto, local_only),
                None if !selector.is_empty() => backends_from_pods(
                    &key.namespace,
                    &selector,
                    port,
                    pods,
                    local_only,
                    &mut ignored,
                ),
                None => Vec::new(),
            }
        };
        let backends = backends_of(int_local);
        let external_backends = (int_local != ext_local).then(|| backends_of(ext_local));
        let service = LbService {
            name: key.to_string(),
            backends,
            affinity_timeout,
            external_backends,
        };
        let mut add = |address: Ipv4Addr, port: u16| {
            out.push((
                Frontend {
                    address,
                    port,
                    proto,
                },
                service.clone(),
            ));
        };
        for ip in external_ips.iter().chain(&lb_ips) {
            add(*ip, svc_port);
        }
        if node_ports {
            match port.node_port.map(u16::try_from) {
                Some(Ok(node_port)) if node_port != 0 => {
                    for addr in &ns.node_addresses {
                        add(*addr, node_port);
                    }
                }
                Some(_) => warnings.push(format!(
                    "service {key}: nodePort {:?} of port {} is out of range",
                    port.node_port, port.port
                )),
                // Not allocated (yet): a manifest without nodePort, or
                // allocateLoadBalancerNodePorts: false.
                None => {}
            }
        }
    }
    out
}

/// A Service's health-check node port: what load balancers probe to find
/// the nodes with local endpoints (`externalTrafficPolicy: Local` only).
pub fn health_check_node_port(spec: &ServiceSpec) -> Option<u16> {
    if !external_local(spec) {
        return None;
    }
    spec.health_check_node_port
        .and_then(|p| u16::try_from(p).ok())
        .filter(|p| *p != 0)
}

#[cfg(test)]
mod tests {
    use super::super::services::{compile_services_with, ServiceOptions};
    use super::*;
    use crate::sources::{manifests::parse, ClusterState};
    use catena_datapath::{BackendAddr, Proto};
    use std::path::Path;

    const NODE_IP: &str = "192.168.1.1";

    /// A NodePort Service with the given traffic policies and two
    /// endpoints, on nodes n1 and n2.
    fn state(etp: &str, itp: &str) -> ClusterState {
        let yaml = format!(
            r#"apiVersion: v1
kind: Service
metadata: {{name: web, namespace: shop}}
spec:
  type: NodePort
  clusterIP: 10.96.0.30
  externalTrafficPolicy: {etp}
  internalTrafficPolicy: {itp}
  ports: [{{name: http, port: 80, nodePort: 30080}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: web-1, namespace: shop, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
ports: [{{name: http, port: 8080}}]
endpoints:
- {{addresses: [10.0.0.1], nodeName: n1}}
- {{addresses: [10.0.0.2], nodeName: n2}}
"#
        );
        let mut s = ClusterState::default();
        for o in parse(Path::new("t.yaml"), &yaml).unwrap().objects {
            s.insert(o);
        }
        s
    }

    fn compile(s: &ClusterState, node: &str) -> catena_datapath::LbDesired {
        let options = ServiceOptions {
            node_name: Some(node.into()),
            north_south: NorthSouth {
                enabled: true,
                node_addresses: vec![NODE_IP.parse().unwrap()],
            },
            ..Default::default()
        };
        compile_services_with(s, &[], &options, &[]).desired
    }

    fn fe(ip: &str, port: u16) -> Frontend {
        Frontend {
            address: ip.parse().unwrap(),
            port,
            proto: Proto::Tcp,
        }
    }

    fn be(ip: &str) -> BackendAddr {
        BackendAddr {
            address: ip.parse().unwrap(),
            port: 8080,
        }
    }

    /// (backends, external_backends) of the NodePort and of the ClusterIP.
    type Scopes = (Vec<BackendAddr>, Option<Vec<BackendAddr>>);

    fn scopes(d: &catena_datapath::LbDesired) -> (Scopes, Scopes) {
        let of = |f: Frontend| {
            let s = &d.services[&f];
            (s.backends.clone(), s.external_backends.clone())
        };
        (of(fe(NODE_IP, 30080)), of(fe("10.96.0.30", 80)))
    }

    #[test]
    fn external_local_gives_the_nodeport_a_local_only_external_scope() {
        let all = vec![be("10.0.0.1"), be("10.0.0.2")];
        let s = state("Local", "Cluster");
        // A node with no endpoint: in-cluster clients reach every endpoint,
        // external ones none (refused).
        let (np, cip) = scopes(&compile(&s, "n3"));
        assert_eq!(np, (all.clone(), Some(vec![])));
        // The ClusterIP is in-cluster only: one scope.
        assert_eq!(cip, (all.clone(), None));
        // On n1 external clients get n1's endpoint alone.
        let (np, _) = scopes(&compile(&s, "n1"));
        assert_eq!(np, (all.clone(), Some(vec![be("10.0.0.1")])));
    }

    #[test]
    fn equal_policies_keep_one_scope_and_internal_local_applies_in_cluster() {
        let all = vec![be("10.0.0.1"), be("10.0.0.2")];
        // Cluster/Cluster: one scope with every endpoint.
        let (np, _) = scopes(&compile(&state("Cluster", "Cluster"), "n1"));
        assert_eq!(np, (all.clone(), None));
        // Local/Local: one scope with the local endpoint.
        let (np, cip) = scopes(&compile(&state("Local", "Local"), "n1"));
        assert_eq!(np, (vec![be("10.0.0.1")], None));
        assert_eq!(cip, (vec![be("10.0.0.1")], None));
        // eTP Cluster, iTP Local: in-cluster clients stay on this node,
        // external ones reach every endpoint.
        let (np, _) = scopes(&compile(&state("Cluster", "Local"), "n1"));
        assert_eq!(np, (vec![be("10.0.0.1")], Some(all)));
    }
}
