//! Cost of the pure compilers at the scale of the source-sync benchmark
//! (10k Services, 100k endpoints, 5k pods, 1k CNPs). Ignored by default: run
//! `cargo test --release -p catena-agent --test compile_scale -- --ignored --nocapture`.

use catena_agent::compile::policy::{compile_policy, known_pods, PolicyInput};
use catena_agent::compile::services::{compile_services, pod_endpoints, ServiceCompiler};
use catena_agent::model::identity::IdentityAllocator;
use catena_agent::sources::manifests::parse;
use catena_agent::sources::ClusterState;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

fn cluster() -> ClusterState {
    let mut yaml = String::new();
    for n in 0..50 {
        yaml.push_str(&format!(
            "---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: ns-{n}}}\n"
        ));
    }
    for i in 0..10_000usize {
        let ns = format!("ns-{}", i % 50);
        yaml.push_str(&format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i}, namespace: {ns}}}\nspec: {{clusterIP: 10.96.{}.{}, selector: {{app: a{i}}}, ports: [{{name: http, port: 80, targetPort: 8080}}]}}\n",
            i >> 8, i & 255
        ));
        let eps: String = (0..10)
            .map(|j| {
                let n = (i * 10 + j) as u32 + u32::from(std::net::Ipv4Addr::new(10, 128, 0, 0));
                format!("  - addresses: [\"{}\"]\n", std::net::Ipv4Addr::from(n))
            })
            .collect();
        yaml.push_str(&format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: svc-{i}-a, namespace: {ns}, labels: {{kubernetes.io/service-name: svc-{i}}}}}\naddressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints:\n{eps}"
        ));
    }
    for p in 0..5_000usize {
        yaml.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: pod-{p}, namespace: ns-{}, labels: {{app: a{}, tier: web}}}}\nspec: {{containers: [{{name: c}}]}}\nstatus: {{podIP: 10.200.{}.{}}}\n",
            p % 50, p * 2, p >> 8, p & 255
        ));
    }
    for c in 0..1_000usize {
        yaml.push_str(&format!(
            "---\napiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: cnp-{c}, namespace: ns-{}}}\nspec:\n  endpointSelector: {{matchLabels: {{app: a{}}}}}\n  ingress:\n  - fromEndpoints: [{{matchLabels: {{tier: web}}}}]\n    toPorts: [{{ports: [{{port: \"8080\", protocol: TCP}}]}}]\n",
            c % 50, c * 2
        ));
    }
    let mut state = ClusterState::default();
    for o in parse(Path::new("scale.yaml"), &yaml).unwrap().objects {
        state.insert(o);
    }
    state
}

#[test]
#[ignore]
fn compile_cost_at_scale() {
    let state = cluster();
    for round in 0..3 {
        let t = Instant::now();
        let pods = pod_endpoints(&state, &[]);
        let c = compile_services(&state, &pods);
        let services = t.elapsed();
        assert_eq!(c.desired.services.len(), 10_000);

        let t = Instant::now();
        let mut ppods = known_pods(&state, &[]);
        let mut ids = IdentityAllocator::default();
        for p in &mut ppods {
            p.identity = ids.allocate(p.labels.clone());
        }
        let live: Vec<_> = ppods.iter().map(|p| p.labels.clone()).collect();
        ids.retain_only(&live);
        let identities = t.elapsed();

        let t = Instant::now();
        let out = compile_policy(&PolicyInput {
            cluster: &state,
            pods: &ppods,
            host_addrs: &[],
            remote_node_addrs: &[],
            apiserver_addrs: &[],
            prev_cidr_ids: &BTreeMap::new(),
            prev_rule_refs: &BTreeMap::new(),
        });
        let policy = t.elapsed();
        // The memoizing compiler after one EndpointSlice edit.
        let mut memo = ServiceCompiler::default();
        let shared = std::sync::Arc::new(state.clone());
        memo.update(&shared, &[]);
        let mut edited = state.clone();
        let key = edited
            .endpoint_slices
            .keys()
            .nth(round * 7)
            .unwrap()
            .clone();
        let mut slice = (*edited.endpoint_slices[&key]).clone();
        let mut endpoints = slice.endpoints.into_vec();
        endpoints.pop();
        slice.endpoints = endpoints.into();
        edited
            .endpoint_slices
            .insert(key, std::sync::Arc::new(slice));
        let t = Instant::now();
        let edited = std::sync::Arc::new(edited);
        let changes = memo.update(&edited, &[]);
        let one_change = t.elapsed();
        assert_eq!((changes.recompiled, changes.changed), (1, true));
        assert_eq!(
            memo.desired(),
            &compile_services(&edited, &pod_endpoints(&edited, &[])).desired
        );
        println!(
            "round {round}: one slice edit, memoized: {:.1} ms",
            one_change.as_secs_f64() * 1e3
        );
        println!(
            "round {round}: services {:.1} ms, identities {:.1} ms, policy {:.1} ms ({} endpoints with policy)",
            services.as_secs_f64() * 1e3,
            identities.as_secs_f64() * 1e3,
            policy.as_secs_f64() * 1e3,
            out.desired.endpoints.len()
        );
    }
}
