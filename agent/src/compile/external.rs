//! North-south frontends of a Service: what clients outside the node reach
//! on the node's external devices (and what pods and node processes reach
//! through the same addresses).
//!
//! - NodePort (`type: NodePort` / `LoadBalancer` with `nodePort`): one
//!   frontend per node address on the external devices, on the nodePort
//!   (what the devices' tc programs look packets up by), plus one wildcard
//!   frontend `0.0.0.0:<nodePort>` / `[::]:<nodePort>` that only the
//!   socket-level load balancer reads: node processes and pods reaching
//!   the NodePort on 127.0.0.1, ::1 or any node address (the datapath's
//!   `NODE_ADDR4` / `NODE_ADDR6`) get it, so no frontend per (address,
//!   NodePort) is needed for addresses off the external devices;
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
//!
//! Both address families get the same frontends: IPv4 NodePorts on the
//! devices' IPv4 addresses with the Service's IPv4 backends, IPv6 NodePorts
//! on their IPv6 addresses with its IPv6 backends (EndpointSlices of
//! `addressType: IPv6`, or the selected pods' IPv6 addresses), and each
//! externalIP / LoadBalancer IP in its own family. As kube-proxy does,
//! NodePorts of a family are opened only for a Service of that family
//! (`ipFamilies`, else the families of its ClusterIPs); an externalIP or
//! LB IP is used whatever the Service's families say, and simply has no
//! backends when the Service has none of its family.

use super::services::{
    backends_from_pods, backends_from_slices, parse_proto, Family, PodEndpoint, ServiceFrontends,
};
use super::traffic_policy::{internal_local, NodeLocality};
use crate::sources::ObjectKey;
use crate::sources::SliceInfo;
use catena_datapath::{Frontend, Frontend6, LbService, Proto};
use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use std::net::{Ipv4Addr, Ipv6Addr};

/// What the external frontends depend on besides the Service.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NorthSouth {
    /// Compile external frontends at all (`--kube-proxy-replacement`).
    pub enabled: bool,
    /// IPv4 addresses of the external devices: the NodePort frontends.
    pub node_addresses: Vec<Ipv4Addr>,
    /// IPv6 addresses of the external devices: the IPv6 NodePort frontends.
    pub node_addresses6: Vec<Ipv6Addr>,
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

/// How IPv4 `frontend` of `svc` is reached from outside, or `None` for its
/// ClusterIP (or a frontend it does not have).
pub fn kind_of(svc: &Service, frontend: &Frontend) -> Option<ExternalKind> {
    kind_of_family(svc, frontend)
}

/// `kind_of` for an IPv6 frontend.
pub fn kind_of6(svc: &Service, frontend: &Frontend6) -> Option<ExternalKind> {
    kind_of_family(svc, frontend)
}

fn kind_of_family<A: Family>(svc: &Service, frontend: &Frontend<A>) -> Option<ExternalKind> {
    let spec = svc.spec.as_ref()?;
    for port in spec.ports.iter().flatten() {
        if parse_proto(port.protocol.as_deref()) != Some(frontend.proto) {
            continue;
        }
        if port.port == i32::from(frontend.port) {
            if addresses::<A>(spec.external_ips.iter().flatten()).any(|a| a == frontend.address) {
                return Some(ExternalKind::ExternalIp);
            }
            if lb_ingress_ips::<A>(svc).any(|a| a == frontend.address) {
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
    kind_name(svc, frontend)
}

/// [`frontend_kind`] for an IPv6 frontend.
pub fn frontend_kind6(svc: Option<&Service>, frontend: &Frontend6) -> &'static str {
    kind_name(svc, frontend)
}

fn kind_name<A: Family>(svc: Option<&Service>, frontend: &Frontend<A>) -> &'static str {
    match svc {
        None => "",
        Some(svc) => kind_of_family(svc, frontend).map_or("ClusterIP", ExternalKind::as_str),
    }
}

/// The addresses of family `A` among `ips` (others and garbage skipped).
fn addresses<'a, A: Family + 'a>(
    ips: impl Iterator<Item = &'a String> + 'a,
) -> impl Iterator<Item = A> + 'a {
    ips.filter_map(|ip| A::of_ip(ip.parse().ok()?))
}

fn lb_ingress_ips<A: Family>(svc: &Service) -> impl Iterator<Item = A> + '_ {
    svc.status
        .iter()
        .flat_map(|s| s.load_balancer.iter())
        .flat_map(|lb| lb.ingress.iter().flatten())
        .filter_map(|i| A::of_ip(i.ip.as_deref()?.parse().ok()?))
}

/// Whether the Service is of family `A`: listed in `ipFamilies` (whose
/// names, `IPv4` / `IPv6`, are the EndpointSlice address types), or,
/// without that field (older manifests), one of its ClusterIPs is. A
/// headless Service without either is taken as IPv4, the API server's
/// default family.
fn has_family<A: Family>(spec: &ServiceSpec) -> bool {
    if let Some(families) = spec.ip_families.as_ref().filter(|f| !f.is_empty()) {
        return families.iter().any(|f| f == A::SLICE_ADDRESS_TYPE);
    }
    let cluster_ips: Vec<&String> = spec
        .cluster_ips
        .iter()
        .flatten()
        .chain(spec.cluster_ip.iter())
        .filter(|ip| ip.as_str() != "None")
        .collect();
    if cluster_ips.is_empty() {
        return A::SLICE_ADDRESS_TYPE == "IPv4";
    }
    addresses::<A>(cluster_ips.into_iter()).next().is_some()
}

fn has_node_ports(spec: &ServiceSpec) -> bool {
    matches!(spec.type_.as_deref(), Some("NodePort" | "LoadBalancer"))
}

/// The Service's external frontends of both families (empty when
/// north-south is disabled). `pods` must be the endpoint controller's pods
/// when `slices` is `None`.
pub fn external_frontends(
    key: &ObjectKey,
    svc: &Service,
    slices: Option<&[&SliceInfo]>,
    pods: &[PodEndpoint],
    locality: &NodeLocality,
    ns: &NorthSouth,
    warnings: &mut Vec<String>,
) -> ServiceFrontends {
    let mut out = ServiceFrontends::default();
    let Some(spec) = svc.spec.as_ref().filter(|_| ns.enabled) else {
        return out;
    };
    if spec.type_.as_deref() == Some("ExternalName") {
        return out;
    }
    let inputs = Inputs {
        key,
        svc,
        spec,
        slices,
        pods,
        locality,
    };
    out.v4 = inputs.frontends(&ns.node_addresses, Ipv4Addr::UNSPECIFIED, warnings);
    // The nodePort range warning is the same for both families: once.
    let mut ignored = Vec::new();
    out.v6 = inputs.frontends(&ns.node_addresses6, Ipv6Addr::UNSPECIFIED, &mut ignored);
    out
}

/// What one Service's external frontends are computed from.
struct Inputs<'a> {
    key: &'a ObjectKey,
    svc: &'a Service,
    spec: &'a ServiceSpec,
    slices: Option<&'a [&'a SliceInfo]>,
    pods: &'a [PodEndpoint],
    locality: &'a NodeLocality,
}

impl Inputs<'_> {
    /// The external frontends of family `A`: externalIPs and LoadBalancer
    /// IPs of that family on each Service port, and NodePorts on
    /// `node_addresses` and on `wildcard` (the family's unspecified
    /// address, see the module doc) if the Service is of that family.
    fn frontends<A: Family>(
        &self,
        node_addresses: &[A],
        wildcard: A,
        warnings: &mut Vec<String>,
    ) -> Vec<(Frontend<A>, LbService<A>)> {
        let (key, spec) = (self.key, self.spec);
        let mut out = Vec::new();
        let external_ips: Vec<A> = addresses::<A>(spec.external_ips.iter().flatten()).collect();
        let lb_ips: Vec<A> = if spec.type_.as_deref() == Some("LoadBalancer") {
            lb_ingress_ips::<A>(self.svc).collect()
        } else {
            Vec::new()
        };
        let node_ports = has_node_ports(spec) && has_family::<A>(spec);
        if external_ips.is_empty() && lb_ips.is_empty() && !node_ports {
            return out;
        }
        let (int_local, ext_local) = (internal_local(spec), external_local(spec));
        // The ClusterIP compile reports bad protocols, ports and affinity.
        let mut ignored = Vec::new();
        let affinity_timeout = super::services::session_affinity(key, spec, &mut ignored);
        for port in spec.ports.as_deref().unwrap_or_default() {
            let Some(proto) = parse_proto(port.protocol.as_deref()) else {
                continue;
            };
            let Ok(svc_port) = u16::try_from(port.port) else {
                continue;
            };
            let backends = self.backends::<A>(port, proto, int_local, &mut ignored);
            let external_backends = (int_local != ext_local)
                .then(|| self.backends::<A>(port, proto, ext_local, &mut ignored));
            let service = LbService {
                name: key.to_string(),
                backends,
                affinity_timeout,
                external_backends,
            };
            let mut add = |address: A, port: u16| {
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
                        for addr in node_addresses.iter().chain([&wildcard]) {
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

    /// The port's backends of family `A`; with `local`, this node's only.
    fn backends<A: Family>(
        &self,
        port: &ServicePort,
        proto: Proto,
        local: bool,
        ignored: &mut Vec<String>,
    ) -> Vec<catena_datapath::BackendAddr<A>> {
        let local_only = local.then_some(self.locality);
        let selector = self.spec.selector.clone().unwrap_or_default();
        match self.slices {
            Some(slices) => backends_from_slices(slices, port, proto, local_only),
            None if !selector.is_empty() => backends_from_pods(
                &self.key.namespace,
                &selector,
                port,
                self.pods,
                local_only,
                ignored,
            ),
            None => Vec::new(),
        }
    }
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
    const NODE_IP6: &str = "fd00:77::1";

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
                node_addresses6: vec![NODE_IP6.parse().unwrap()],
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

    /// Parses `yaml` into a cluster state.
    fn cluster(yaml: &str) -> ClusterState {
        let mut s = ClusterState::default();
        for o in parse(Path::new("t.yaml"), yaml).unwrap().objects {
            s.insert(o);
        }
        s
    }

    fn fe6(ip: &str, port: u16) -> catena_datapath::Frontend6 {
        Frontend {
            address: ip.parse().unwrap(),
            port,
            proto: Proto::Tcp,
        }
    }

    fn be6(ip: &str) -> catena_datapath::BackendAddr6 {
        BackendAddr {
            address: ip.parse().unwrap(),
            port: 8080,
        }
    }

    #[test]
    fn dual_stack_service_gets_ipv6_nodeports_with_ipv6_backends_and_scopes() {
        let s = cluster(
            r#"apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  type: LoadBalancer
  clusterIPs: [10.96.0.30, "fd00:96::30"]
  ipFamilies: [IPv4, IPv6]
  externalTrafficPolicy: Local
  externalIPs: ["fd00:203::10", 203.0.113.10]
  ports: [{name: http, port: 80, nodePort: 30080}]
status: {loadBalancer: {ingress: [{ip: "fd00:203::20"}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-6, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv6
ports: [{name: http, port: 8080}]
endpoints:
- {addresses: ["fd00:10::1"], nodeName: n1}
- {addresses: ["fd00:10::2"], nodeName: n2}
"#,
        );
        let d = compile(&s, "n1");
        let all = vec![be6("fd00:10::1"), be6("fd00:10::2")];
        // NodePort on the node's IPv6 address, externalIP and LB IP on the
        // Service port: every endpoint in-cluster, n1's alone externally.
        for f in [
            fe6(NODE_IP6, 30080),
            fe6("fd00:203::10", 80),
            fe6("fd00:203::20", 80),
        ] {
            let svc = &d.services6[&f];
            assert_eq!(svc.backends, all, "{f:?}");
            assert_eq!(
                svc.external_backends,
                Some(vec![be6("fd00:10::1")]),
                "{f:?}"
            );
        }
        // The ClusterIP has one scope; the IPv4 frontends have no IPv4
        // endpoints here (no IPv4 slice) but exist.
        assert_eq!(d.services6[&fe6("fd00:96::30", 80)].external_backends, None);
        assert!(d.services.contains_key(&fe(NODE_IP, 30080)));
        assert!(d.services.contains_key(&fe("203.0.113.10", 80)));
        // ...and the NodePort's wildcard frontend `[::]:30080`.
        assert_eq!(d.services6.len(), 5, "{:?}", d.services6.keys());
        assert_eq!(
            d.services6[&fe6("::", 30080)],
            d.services6[&fe6(NODE_IP6, 30080)]
        );
        let svc = s.services.values().next().unwrap();
        assert_eq!(
            frontend_kind6(Some(svc), &fe6("fd00:203::20", 80)),
            "LoadBalancer"
        );
        assert_eq!(frontend_kind6(Some(svc), &fe6(NODE_IP6, 30080)), "NodePort");
        assert_eq!(
            frontend_kind6(Some(svc), &fe6("fd00:96::30", 80)),
            "ClusterIP"
        );
    }

    #[test]
    fn external_local_with_registered_ipv6_endpoints() {
        // No node names (standalone): the plugin's registrations decide
        // which IPv6 endpoints are here, for an IPv6-only Service.
        let s = cluster(
            r#"apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  type: NodePort
  clusterIPs: ["fd00:96::30"]
  ipFamilies: [IPv6]
  externalTrafficPolicy: Local
  ports: [{name: http, port: 80, nodePort: 30080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-6, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv6
ports: [{name: http, port: 8080}]
endpoints:
- {addresses: ["fd00:10::1"]}
- {addresses: ["fd00:10::2"]}
"#,
        );
        let registered = catena_api::Endpoint {
            id: 1,
            spec: catena_api::EndpointSpec {
                ips: vec!["fd00:10::2/64".into()],
                ..Default::default()
            },
            identity: 256,
            attach_mode: "tcx".into(),
            created: String::new(),
        };
        let options = ServiceOptions {
            north_south: NorthSouth {
                enabled: true,
                node_addresses: vec![NODE_IP.parse().unwrap()],
                node_addresses6: vec![NODE_IP6.parse().unwrap()],
            },
            ..Default::default()
        };
        let d = compile_services_with(&s, &[], &options, &[registered]).desired;
        let np = &d.services6[&fe6(NODE_IP6, 30080)];
        assert_eq!(np.backends, vec![be6("fd00:10::1"), be6("fd00:10::2")]);
        assert_eq!(np.external_backends, Some(vec![be6("fd00:10::2")]));
        let svc = s.services.values().next().unwrap();
        assert_eq!(
            kind_of6(svc, &fe6(NODE_IP6, 30080)),
            Some(ExternalKind::NodePort)
        );
        assert_eq!(kind_of6(svc, &fe6("fd00:96::30", 80)), None);
    }

    #[test]
    fn each_nodeport_gets_one_wildcard_frontend_with_the_same_scopes() {
        // Two node addresses, one NodePort: two device frontends and one
        // wildcard, whatever the number of addresses.
        let s = state("Local", "Cluster");
        let options = ServiceOptions {
            node_name: Some("n1".into()),
            north_south: NorthSouth {
                enabled: true,
                node_addresses: vec![NODE_IP.parse().unwrap(), "10.10.0.1".parse().unwrap()],
                node_addresses6: vec![],
            },
            ..Default::default()
        };
        let d = compile_services_with(&s, &[], &options, &[]).desired;
        let mut nodeports: Vec<Frontend> = d
            .services
            .keys()
            .filter(|f| f.port == 30080)
            .copied()
            .collect();
        nodeports.sort();
        assert_eq!(
            nodeports,
            vec![
                fe("0.0.0.0", 30080),
                fe("10.10.0.1", 30080),
                fe(NODE_IP, 30080)
            ]
        );
        // The wildcard carries both scopes: the socket LB picks in-cluster
        // backends (every endpoint), the health check sees the local one.
        let wildcard = &d.services[&fe("0.0.0.0", 30080)];
        assert_eq!(wildcard, &d.services[&fe(NODE_IP, 30080)]);
        assert_eq!(wildcard.backends, vec![be("10.0.0.1"), be("10.0.0.2")]);
        assert_eq!(wildcard.external_backends, Some(vec![be("10.0.0.1")]));
        let svc = s.services.values().next().unwrap();
        assert_eq!(frontend_kind(Some(svc), &fe("0.0.0.0", 30080)), "NodePort");

        // No external device at all: loopback NodePorts still need the
        // wildcard.
        let options = ServiceOptions {
            north_south: NorthSouth {
                enabled: true,
                ..Default::default()
            },
            ..Default::default()
        };
        let d = compile_services_with(&s, &[], &options, &[]).desired;
        assert!(d.services.contains_key(&fe("0.0.0.0", 30080)));
        // Without kube-proxy replacement there are no NodePorts at all.
        let d = compile_services_with(&s, &[], &ServiceOptions::default(), &[]).desired;
        assert!(!d.services.keys().any(|f| f.port == 30080));
    }

    #[test]
    fn nodeports_follow_the_service_families() {
        // IPv4 only (by ipFamilies, and by ClusterIP without them): no
        // IPv6 NodePort; an IPv6 externalIP is still served.
        for families in ["  ipFamilies: [IPv4]\n", ""] {
            let s = cluster(&format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: shop}}\nspec:\n  type: NodePort\n  clusterIP: 10.96.0.30\n{families}  externalIPs: [\"fd00:203::10\"]\n  ports: [{{name: http, port: 80, nodePort: 30080}}]\n"
            ));
            let d = compile(&s, "n1");
            assert!(d.services.contains_key(&fe(NODE_IP, 30080)));
            let v6: Vec<_> = d.services6.keys().copied().collect();
            assert_eq!(v6, vec![fe6("fd00:203::10", 80)], "{families:?}");
            assert!(d.services.contains_key(&fe("0.0.0.0", 30080)));
        }
        // IPv6 only: no IPv4 NodePort.
        let s = cluster(
            "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec:\n  type: NodePort\n  clusterIP: \"fd00:96::30\"\n  ipFamilies: [IPv6]\n  ports: [{name: http, port: 80, nodePort: 30080}]\n",
        );
        let d = compile(&s, "n1");
        assert!(d.services.is_empty(), "{:?}", d.services.keys());
        assert!(d.services6.contains_key(&fe6(NODE_IP6, 30080)));
        assert!(d.services6.contains_key(&fe6("::", 30080)));
    }
}
