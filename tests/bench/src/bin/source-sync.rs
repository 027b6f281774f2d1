//! Benchmark: the agent's Kubernetes source at scale.
//!
//! The lab's list/watch API server serves 10k Services, 10k EndpointSlices
//! (100k endpoints), 5k Pods and 1k CiliumNetworkPolicies. We measure, in one
//! run:
//! - full sync: agent start -> ready with every frontend in the pinned
//!   service map, next to the wire floor (listing the same objects over HTTP
//!   once, no processing);
//! - RSS after sync (VmRSS, and the peak VmHWM);
//! - event -> map latency for single changes: an EndpointSlice edit on the
//!   API server until the pinned LB4_SERVICES master entry shows the new
//!   backend count (read straight from the map, not through the agent).
//!
//! Targets (issue 6): full sync <= 2 s, RSS <= 100 MiB, p99 <= 50 ms.

use anyhow::{bail, Context, Result};
use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use catena_common::lb::{Service4Key, Service4Value};
use catena_lab::apiserver::ApiServer;
use catena_lab::{AgentSource, Node};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

const SERVICES: usize = 10_000;
const ENDPOINTS_PER_SERVICE: usize = 10;
const PODS: usize = 5_000;
const POLICIES: usize = 1_000;
const NAMESPACES: usize = 50;
const CHANGES: usize = 200;

fn vip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 96, (i >> 8) as u8, (i & 0xff) as u8)
}

fn backend(i: usize, j: usize) -> Ipv4Addr {
    let n = (i * ENDPOINTS_PER_SERVICE + j) as u32;
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 0)) + n)
}

fn ns(i: usize) -> String {
    format!("ns-{}", i % NAMESPACES)
}

fn slice(i: usize, endpoints: usize) -> Value {
    let eps: Vec<Value> = (0..endpoints)
        .map(|j| json!({"addresses": [backend(i, j).to_string()], "conditions": {"ready": true}}))
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"name": format!("svc-{i}-abc"), "namespace": ns(i),
                        "labels": {"kubernetes.io/service-name": format!("svc-{i}")}},
           "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
           "endpoints": eps})
}

fn load(api: &ApiServer) -> Result<()> {
    for n in 0..NAMESPACES {
        api.apply(json!({"apiVersion": "v1", "kind": "Namespace",
                         "metadata": {"name": format!("ns-{n}"), "labels": {"team": format!("t{}", n % 5)}}}))?;
    }
    for i in 0..SERVICES {
        api.apply(json!({"apiVersion": "v1", "kind": "Service",
                         "metadata": {"name": format!("svc-{i}"), "namespace": ns(i)},
                         "spec": {"clusterIP": vip(i).to_string(), "selector": {"app": format!("a{i}")},
                                  "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}}))?;
        api.apply(slice(i, ENDPOINTS_PER_SERVICE))?;
    }
    for p in 0..PODS {
        api.apply(json!({"apiVersion": "v1", "kind": "Pod",
                         "metadata": {"name": format!("pod-{p}"), "namespace": ns(p),
                                      "labels": {"app": format!("a{}", p * 2), "tier": "web"}},
                         "spec": {"containers": [{"name": "c", "image": "x", "ports": [{"name": "http", "containerPort": 8080}]}]},
                         "status": {"phase": "Running", "podIP": backend(p * 2, 0).to_string()}}))?;
    }
    for c in 0..POLICIES {
        api.apply(json!({"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
                         "metadata": {"name": format!("cnp-{c}"), "namespace": ns(c)},
                         "spec": {"endpointSelector": {"matchLabels": {"app": format!("a{}", c * 2)}},
                                  "ingress": [{"fromEndpoints": [{"matchLabels": {"tier": "web"}}],
                                               "toPorts": [{"ports": [{"port": "8080", "protocol": "TCP"}]}]}]}}))?;
    }
    Ok(())
}

/// GETs every list once over plain HTTP: the floor for moving the bytes.
fn list_floor(node: &Node, url: &str) -> Result<Duration> {
    let addr = url.trim_start_matches("http://").to_string();
    node.netns().enter_thread(move || -> Result<Duration> {
        let started = Instant::now();
        for path in [
            "/api/v1/services",
            "/apis/discovery.k8s.io/v1/endpointslices",
            "/api/v1/pods",
            "/api/v1/namespaces",
            "/apis/cilium.io/v2/ciliumnetworkpolicies",
        ] {
            let mut s = std::net::TcpStream::connect(&addr)?;
            write!(
                s,
                "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )?;
            let mut body = Vec::new();
            s.read_to_end(&mut body)?;
            if body.len() < 100 {
                bail!("short answer for {path}");
            }
        }
        Ok(started.elapsed())
    })?
}

fn proc_status_kib(pid: u32, field: &str) -> Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = text
        .lines()
        .find(|l| l.starts_with(field))
        .context(field.to_string())?;
    Ok(line.split_whitespace().nth(1).context("value")?.parse()?)
}

struct ServiceMap(BpfHashMap<MapData, Service4Key, Service4Value>);

impl ServiceMap {
    fn open(node: &Node) -> Result<Self> {
        let path = node.bpffs_dir().join("maps/LB4_SERVICES");
        let data =
            MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
        Ok(ServiceMap(BpfHashMap::try_from(Map::HashMap(data))?))
    }

    /// The backend count of service `i`'s frontend, if programmed.
    fn count(&self, i: usize) -> Option<u16> {
        let key = Service4Key {
            address: u32::from_ne_bytes(vip(i).octets()),
            dport: 80u16.to_be(),
            backend_slot: 0,
            proto: catena_common::IPPROTO_TCP,
            scope: 0,
            pad: [0; 2],
        };
        self.0.get(&key, 0).ok().map(|v| v.count)
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() -> Result<()> {
    let node = Node::new("bench-sync")?;
    let api = ApiServer::start_in(node.netns())?;
    let t = Instant::now();
    load(&api)?;
    println!(
        "loaded {SERVICES} services, {} endpoints, {PODS} pods, {POLICIES} CNPs into the test API server in {:.1} s",
        SERVICES * ENDPOINTS_PER_SERVICE,
        t.elapsed().as_secs_f64()
    );
    // The test server encodes each object once and serves lists from that
    // (as a real API server serves from its watch cache): the first list
    // warms it, the second is the floor the agent's own lists compare with.
    list_floor(&node, &api.url())?;
    let floor = list_floor(&node, &api.url())?;

    let kubeconfig = api.write_kubeconfig(node.dir())?;
    let bin = catena_lab::bin_path("catena-agent")?;
    let started = Instant::now();
    let agent = node.start_agent_from(
        &bin,
        AgentSource::Kubeconfig(kubeconfig),
        &[],
        Duration::from_secs(120),
    )?;
    let ready = started.elapsed();
    let map = ServiceMap::open(&node)?;
    let last = SERVICES - 1;
    if map.count(last) != Some(ENDPOINTS_PER_SERVICE as u16) {
        bail!(
            "agent ready but service {last} is not programmed: {:?}",
            map.count(last)
        );
    }
    let pid = agent.pid().context("agent pid")?;
    let rss = proc_status_kib(pid, "VmRSS:")? as f64 / 1024.0;
    let hwm = proc_status_kib(pid, "VmHWM:")? as f64 / 1024.0;
    // Heap and stacks (anonymous) apart from the mapped binary (file).
    let rss_anon = proc_status_kib(pid, "RssAnon:")? as f64 / 1024.0;
    let rss_file = proc_status_kib(pid, "RssFile:")? as f64 / 1024.0;

    // Single changes: each takes one endpoint out of a different service's
    // slice (7919 is coprime with the service count, so all are distinct) and
    // waits until the pinned map shows it.
    let mut lat = Vec::with_capacity(CHANGES);
    let want = ENDPOINTS_PER_SERVICE - 1;
    for c in 0..CHANGES {
        let i = (c * 7919) % SERVICES;
        let t = Instant::now();
        api.apply(slice(i, want))?;
        let deadline = t + Duration::from_secs(10);
        while map.count(i) != Some(want as u16) {
            if Instant::now() > deadline {
                bail!("change {c} (service {i} -> {want} backends) not programmed within 10 s");
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        lat.push(t.elapsed());
    }
    lat.sort();
    let rss_after = proc_status_kib(pid, "VmRSS:")? as f64 / 1024.0;

    let verdict = |ok: bool| if ok { "PASS" } else { "MISS" };
    println!();
    println!(
        "{:<44} {:>10} {:>10} {:>6}",
        "measure", "value", "target", ""
    );
    println!(
        "{:<44} {:>8.0}ms {:>10} {:>6}",
        "full sync (start -> ready, all programmed)",
        ms(ready),
        "<= 2000ms",
        verdict(ready <= Duration::from_secs(2))
    );
    println!(
        "{:<44} {:>8.0}ms",
        "wire floor (one HTTP list of every kind)",
        ms(floor)
    );
    println!(
        "{:<44} {:>9.1}x",
        "full sync / wire floor",
        ready.as_secs_f64() / floor.as_secs_f64()
    );
    println!(
        "{:<44} {:>7.1}MiB {:>10} {:>6}",
        "RSS after sync",
        rss,
        "<= 100MiB",
        verdict(rss <= 100.0)
    );
    println!(
        "{:<44} {:>7.1}MiB",
        "  of which anonymous (heap, stacks)", rss_anon
    );
    println!(
        "{:<44} {:>7.1}MiB",
        "  of which file-backed (the binary)", rss_file
    );
    println!("{:<44} {:>7.1}MiB", "RSS peak (VmHWM) during sync", hwm);
    println!(
        "{:<44} {:>7.1}MiB",
        "RSS after the single changes", rss_after
    );
    println!(
        "{:<44} {:>8.1}ms",
        "event -> map p50",
        ms(percentile(&lat, 0.50))
    );
    println!(
        "{:<44} {:>8.1}ms",
        "event -> map p90",
        ms(percentile(&lat, 0.90))
    );
    println!(
        "{:<44} {:>8.1}ms {:>10} {:>6}",
        "event -> map p99",
        ms(percentile(&lat, 0.99)),
        "<= 50ms",
        verdict(percentile(&lat, 0.99) <= Duration::from_millis(50))
    );
    println!(
        "{:<44} {:>8.1}ms",
        "event -> map max",
        ms(*lat.last().unwrap())
    );
    // For a breakdown: run with RUST_LOG=catena_agent=debug and this set to
    // a path; the agent's log (per-change timings) is kept there.
    if let Some(path) = std::env::var_os("CATENA_BENCH_AGENT_LOG") {
        std::fs::write(&path, agent.log())
            .with_context(|| format!("writing the agent log to {path:?}"))?;
    }
    drop(agent);
    Ok(())
}
