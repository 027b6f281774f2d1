//! One set of ClusterIP Services (TCP, one port each) rendered the three ways
//! a node can be told about it, so the service benchmarks compare the same
//! work:
//! - kube-proxy's iptables mode: an `iptables-restore` file (nat table
//!   `KUBE-SERVICES` -> `KUBE-SVC-*` with `-m statistic --mode random` ->
//!   `KUBE-SEP-*` DNAT, `KUBE-MARK-MASQ`/`KUBE-POSTROUTING`, and the filter
//!   table's `KUBE-FORWARD`), in the shape `iptables-save` shows for
//!   kube-proxy 1.29+;
//! - kube-proxy's nftables mode: an `nft -f` script (table `ip kube-proxy`,
//!   the `service-ips` verdict map -> per-service chain with
//!   `numgen random mod N vmap` -> per-endpoint `dnat` chain);
//! - Kubernetes YAML (a Service without selector plus its EndpointSlice) for
//!   catena's manifest directory.
//!
//! The order of [`ServiceSet::services`] is the order of `KUBE-SERVICES`:
//! iptables matches that chain linearly, so the last service is the most
//! expensive one to reach.

use std::fmt::Write as _;
use std::net::Ipv4Addr;

/// The pod network: traffic from outside it to a service is masqueraded
/// (kube-proxy's `--cluster-cidr`). Lab pods live in it, so pod-to-service
/// traffic is not masqueraded, as in a cluster.
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";
/// kube-proxy's masquerade bit (`--iptables-masquerade-bit` 14).
const MASQ_MARK: &str = "0x4000";
/// Service port name in every rendering.
const PORT_NAME: &str = "http";
/// Filler VIPs start above this address (nothing else uses 10.97.0.0/16).
const FILLER_VIP_BASE: Ipv4Addr = Ipv4Addr::new(10, 97, 0, 0);
/// Filler endpoints start above this address: nothing routes there, and no
/// filler ever sees traffic.
const FILLER_BACKEND_BASE: Ipv4Addr = Ipv4Addr::new(10, 128, 0, 0);

#[derive(Clone, Debug)]
pub struct Service {
    pub namespace: String,
    pub name: String,
    pub vip: Ipv4Addr,
    pub port: u16,
    pub target_port: u16,
    pub backends: Vec<Ipv4Addr>,
}

impl Service {
    /// kube-proxy's `ServicePortName` string.
    fn port_name(&self) -> String {
        format!("{}/{}:{PORT_NAME}", self.namespace, self.name)
    }
}

/// `count` services `ns-<k>/filler-<i>` on port 80 -> 8080, each with
/// `endpoints` backends that nothing routes to.
pub fn fillers(count: usize, endpoints: usize) -> Vec<Service> {
    (0..count)
        .map(|i| {
            let vip = Ipv4Addr::from(u32::from(FILLER_VIP_BASE) + 1 + i as u32);
            let backends = (0..endpoints)
                .map(|j| {
                    Ipv4Addr::from(u32::from(FILLER_BACKEND_BASE) + 1 + (i * endpoints + j) as u32)
                })
                .collect();
            Service {
                namespace: format!("ns-{}", i % 50),
                name: format!("filler-{i}"),
                vip,
                port: 80,
                target_port: 8080,
                backends,
            }
        })
        .collect()
}

/// Services in `KUBE-SERVICES` order.
pub struct ServiceSet {
    pub services: Vec<Service>,
}

/// 64-bit FNV-1a: stands in for kube-proxy's sha256 in chain names (only
/// uniqueness and the name length matter here).
fn fnv1a(data: &str, seed: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for b in data.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// `len` base32 characters of a hash of `data`, like kube-proxy's
/// `portProtoHash` (16 for iptables chains, 8 for nftables chains).
fn chain_hash(data: &str, len: usize) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let bits = ((fnv1a(data, 0) as u128) << 64) | fnv1a(data, 0x9e37_79b9) as u128;
    (0..len)
        .map(|k| ALPHABET[((bits >> (5 * k)) & 31) as usize] as char)
        .collect()
}

impl ServiceSet {
    pub fn new(services: Vec<Service>) -> ServiceSet {
        ServiceSet { services }
    }

    pub fn endpoints(&self) -> usize {
        self.services.iter().map(|s| s.backends.len()).sum()
    }

    fn svc_chain(s: &Service) -> String {
        format!(
            "KUBE-SVC-{}",
            chain_hash(&format!("{}tcp", s.port_name()), 16)
        )
    }

    fn sep_chain(s: &Service, backend: Ipv4Addr) -> String {
        format!(
            "KUBE-SEP-{}",
            chain_hash(
                &format!("{}tcp{backend}:{}", s.port_name(), s.target_port),
                16
            )
        )
    }

    /// The `iptables-restore` input kube-proxy's iptables mode would write
    /// for these services (a full restore: it replaces the filter and nat
    /// tables of the namespace it runs in).
    pub fn iptables_restore(&self) -> String {
        let mut out = String::with_capacity(self.services.len() * 400 + self.endpoints() * 400);
        out.push_str("*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n");
        out.push_str(":KUBE-FORWARD - [0:0]\n:KUBE-SERVICES - [0:0]\n");
        out.push_str(
            "-A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD\n",
        );
        out.push_str("-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n");
        out.push_str("-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n");
        let _ = writeln!(out, "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark {MASQ_MARK}/{MASQ_MARK} -j ACCEPT");
        out.push_str("-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n");
        out.push_str("COMMIT\n");

        out.push_str("*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n");
        out.push_str(":KUBE-SERVICES - [0:0]\n:KUBE-NODEPORTS - [0:0]\n:KUBE-POSTROUTING - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n");
        for s in &self.services {
            let _ = writeln!(out, ":{} - [0:0]", Self::svc_chain(s));
            for b in &s.backends {
                let _ = writeln!(out, ":{} - [0:0]", Self::sep_chain(s, *b));
            }
        }
        out.push_str(
            "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
        );
        out.push_str(
            "-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
        );
        out.push_str("-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n");
        let _ = writeln!(
            out,
            "-A KUBE-POSTROUTING -m mark ! --mark {MASQ_MARK}/{MASQ_MARK} -j RETURN"
        );
        let _ = writeln!(out, "-A KUBE-POSTROUTING -j MARK --xor-mark {MASQ_MARK}");
        out.push_str("-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n");
        let _ = writeln!(out, "-A KUBE-MARK-MASQ -j MARK --or-mark {MASQ_MARK}");
        for s in &self.services {
            let _ = writeln!(
                out,
                "-A KUBE-SERVICES -d {}/32 -p tcp -m comment --comment \"{} cluster IP\" -m tcp --dport {} -j {}",
                s.vip,
                s.port_name(),
                s.port,
                Self::svc_chain(s)
            );
        }
        out.push_str("-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n");
        for s in &self.services {
            let svc = Self::svc_chain(s);
            let _ = writeln!(
                out,
                "-A {svc} ! -s {CLUSTER_CIDR} -d {}/32 -p tcp -m comment --comment \"{} cluster IP\" -m tcp --dport {} -j KUBE-MARK-MASQ",
                s.vip,
                s.port_name(),
                s.port
            );
            let n = s.backends.len();
            for (j, b) in s.backends.iter().enumerate() {
                // Endpoint j of n is taken with probability 1/(n-j): uniform
                // overall; the last one takes what is left.
                let statistic = if j + 1 < n {
                    format!(
                        "-m statistic --mode random --probability {:.10} ",
                        1.0 / (n - j) as f64
                    )
                } else {
                    String::new()
                };
                let _ = writeln!(
                    out,
                    "-A {svc} -m comment --comment \"{} -> {b}:{}\" {statistic}-j {}",
                    s.port_name(),
                    s.target_port,
                    Self::sep_chain(s, *b)
                );
            }
            for b in &s.backends {
                let sep = Self::sep_chain(s, *b);
                // Hairpin: a backend reaching its own service is masqueraded.
                let _ = writeln!(
                    out,
                    "-A {sep} -s {b}/32 -m comment --comment {} -j KUBE-MARK-MASQ",
                    s.port_name()
                );
                let _ = writeln!(
                    out,
                    "-A {sep} -p tcp -m comment --comment {} -m tcp -j DNAT --to-destination {b}:{}",
                    s.port_name(),
                    s.target_port
                );
            }
        }
        out.push_str("COMMIT\n");
        out
    }

    fn nft_service_chain(s: &Service) -> String {
        let id = format!("{}/{}/tcp/{PORT_NAME}", s.namespace, s.name);
        format!("service-{}-{id}", chain_hash(&id, 8))
    }

    fn nft_endpoint_chain(s: &Service, b: Ipv4Addr) -> String {
        let id = format!(
            "{}/{}/tcp/{PORT_NAME}__{b}/{}",
            s.namespace, s.name, s.target_port
        );
        format!("endpoint-{}-{id}", chain_hash(&id, 8))
    }

    /// The `nft -f` script kube-proxy's nftables mode would produce for these
    /// services (table `ip kube-proxy`, replaced as a whole in one transaction).
    pub fn nft_script(&self) -> String {
        let mut out = String::with_capacity(self.services.len() * 300 + self.endpoints() * 300);
        // kube-proxy flushes its table and refills it in one transaction;
        // deleting it (created first so the delete cannot fail) also drops
        // map elements and chains a smaller set no longer has.
        out.push_str("add table ip kube-proxy\ndelete table ip kube-proxy\n");
        out.push_str("table ip kube-proxy {\n");
        out.push_str("  map no-endpoint-services { type ipv4_addr . inet_proto . inet_service : verdict ; }\n");
        let _ = writeln!(
            out,
            "  chain mark-for-masquerade {{ meta mark set meta mark or {MASQ_MARK} ; }}"
        );
        let _ = writeln!(out, "  chain masquerading {{ meta mark & {MASQ_MARK} == 0 return ; meta mark set meta mark xor {MASQ_MARK} ; masquerade fully-random ; }}");
        out.push_str("  chain service-endpoints-check { ip daddr . meta l4proto . th dport vmap @no-endpoint-services ; }\n");
        for s in &self.services {
            for b in &s.backends {
                let _ = writeln!(
                    out,
                    "  chain {} {{ ip saddr {b} jump mark-for-masquerade ; meta l4proto tcp dnat to {b}:{} ; }}",
                    Self::nft_endpoint_chain(s, *b),
                    s.target_port
                );
            }
            let vmap: Vec<String> = s
                .backends
                .iter()
                .enumerate()
                .map(|(j, b)| format!("{j} : goto {}", Self::nft_endpoint_chain(s, *b)))
                .collect();
            let _ = writeln!(
                out,
                "  chain {} {{ ip daddr {} tcp dport {} ip saddr != {CLUSTER_CIDR} jump mark-for-masquerade ; numgen random mod {} vmap {{ {} }} ; }}",
                Self::nft_service_chain(s),
                s.vip,
                s.port,
                s.backends.len(),
                vmap.join(", ")
            );
        }
        out.push_str("  map service-ips {\n    type ipv4_addr . inet_proto . inet_service : verdict ;\n    elements = {\n");
        for (k, s) in self.services.iter().enumerate() {
            let sep = if k + 1 < self.services.len() { "," } else { "" };
            let _ = writeln!(
                out,
                "      {} . tcp . {} : goto {}{sep}",
                s.vip,
                s.port,
                Self::nft_service_chain(s)
            );
        }
        out.push_str("    }\n  }\n");
        out.push_str(
            "  chain services { ip daddr . meta l4proto . th dport vmap @service-ips ; }\n",
        );
        // Hooks last: every chain they reach exists by then.
        out.push_str("  chain filter-forward { type filter hook forward priority -110 ; policy accept ; ct state new jump service-endpoints-check ; }\n");
        out.push_str("  chain nat-prerouting { type nat hook prerouting priority -100 ; policy accept ; jump services ; }\n");
        out.push_str("  chain nat-output { type nat hook output priority -100 ; policy accept ; jump services ; }\n");
        out.push_str("  chain nat-postrouting { type nat hook postrouting priority 100 ; policy accept ; jump masquerading ; }\n");
        out.push_str("}\n");
        out
    }

    /// Kubernetes YAML for catena's manifest directory: per service a
    /// Service without selector and the EndpointSlice naming its backends.
    pub fn manifests_yaml(&self) -> String {
        let mut out = String::with_capacity(self.services.len() * 500 + self.endpoints() * 60);
        for s in &self.services {
            let _ = write!(
                out,
                "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {}, namespace: {}}}\nspec:\n  clusterIP: {}\n  ports:\n  - {{name: {PORT_NAME}, port: {}, targetPort: {}, protocol: TCP}}\n",
                s.name, s.namespace, s.vip, s.port, s.target_port
            );
            let _ = write!(
                out,
                "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {}-1\n  namespace: {}\n  labels: {{kubernetes.io/service-name: {}}}\naddressType: IPv4\nports: [{{name: {PORT_NAME}, port: {}, protocol: TCP}}]\nendpoints:\n",
                s.name, s.namespace, s.name, s.target_port
            );
            for b in &s.backends {
                let _ = writeln!(out, "- addresses: [\"{b}\"]\n  conditions: {{ready: true}}");
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one() -> ServiceSet {
        let mut s = fillers(1, 3);
        s[0].name = "web".into();
        s[0].namespace = "default".into();
        ServiceSet::new(s)
    }

    #[test]
    fn iptables_rules_have_kube_proxy_shape() {
        let rules = one().iptables_restore();
        let sep: Vec<&str> = rules
            .lines()
            .filter(|l| l.starts_with("-A KUBE-SVC-") && l.contains("-j KUBE-SEP-"))
            .collect();
        assert_eq!(sep.len(), 3);
        assert!(sep[0].contains("--probability 0.3333333333"), "{}", sep[0]);
        assert!(sep[1].contains("--probability 0.5000000000"), "{}", sep[1]);
        assert!(!sep[2].contains("statistic"), "{}", sep[2]);
        assert_eq!(rules.matches("-j DNAT --to-destination").count(), 3);
        assert_eq!(rules.matches("COMMIT").count(), 2);
    }

    #[test]
    fn nft_script_maps_every_service() {
        let set = ServiceSet::new(fillers(4, 2));
        let script = set.nft_script();
        assert_eq!(script.matches(" . tcp . 80 : goto service-").count(), 4);
        assert_eq!(script.matches("numgen random mod 2 vmap").count(), 4);
        assert_eq!(script.matches("dnat to ").count(), 8);
    }

    #[test]
    fn chain_names_are_unique_and_kube_proxy_length() {
        let set = ServiceSet::new(fillers(2000, 1));
        let names: std::collections::BTreeSet<String> =
            set.services.iter().map(ServiceSet::svc_chain).collect();
        assert_eq!(names.len(), 2000);
        assert!(names.iter().all(|n| n.len() == "KUBE-SVC-".len() + 16));
    }
}
