//! North-south frontends of a Service: what clients outside the node reach
//! on the node's external devices (and what pods and node processes reach
//! through the same addresses).
//!
//! - NodePort (`type: NodePort` / `LoadBalancer` with `nodePort`): one
//!   frontend per node address on the external devices, on the nodePort;
//! - `spec.externalIPs` and `status.loadBalancer.ingress[].ip`: one frontend
//!   each, on the Service port.
//!
//! `externalTrafficPolicy: Local` gives these frontends only the endpoints on
//! this node (so the client address survives: no SNAT is ever needed) and
//! none at all when none is here (new connections are refused). `Cluster`
//! gives them every endpoint, whatever `internalTrafficPolicy` says: that
//! policy is for in-cluster traffic only. All of this is compiled only when
//! catena replaces kube-proxy; otherwise kube-proxy owns these addresses.

use super::services::{backends_from_pods, backends_from_slices, parse_proto, PodEndpoint};
use super::traffic_policy::NodeLocality;
use crate::sources::ObjectKey;
use catena_datapath::{Frontend, LbService};
use k8s_openapi::api::core::v1::{Service, ServiceSpec};
use k8s_openapi::api::discovery::v1::EndpointSlice;
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
    slices: Option<&[&EndpointSlice]>,
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
    let local_only = external_local(spec).then_some(locality);
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
        let backends = match slices {
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
        };
        let service = LbService {
            name: key.to_string(),
            backends,
            affinity_timeout,
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
