//! Prometheus metrics: a few counters and histograms the agent updates as it
//! works, plus gauges read at scrape time (datapath counters, map pressure,
//! endpoints, services). Hand-rolled text exposition (format 0.0.4): the
//! agent needs a dozen families, not a metrics framework.

use catena_datapath::events::DatapathEvent;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

/// Upper bounds in seconds: from sub-millisecond map writes to the 10 s an
/// overloaded node may take.
const BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

#[derive(Clone, Debug, Default)]
pub struct Histogram {
    /// Non-cumulative counts per bucket; the last slot is +Inf.
    counts: [u64; BUCKETS.len() + 1],
    sum: f64,
    count: u64,
}

impl Histogram {
    pub fn observe(&mut self, d: Duration) {
        let v = d.as_secs_f64();
        let slot = BUCKETS
            .iter()
            .position(|b| v <= *b)
            .unwrap_or(BUCKETS.len());
        self.counts[slot] += 1;
        self.sum += v;
        self.count += 1;
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (i, bound) in BUCKETS.iter().enumerate() {
            cumulative += self.counts[i];
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {cumulative}"
            );
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}",
            self.count
        );
        let braces = |l: &str| {
            if l.is_empty() {
                String::new()
            } else {
                format!("{{{l}}}")
            }
        };
        let _ = writeln!(out, "{name}_sum{} {}", braces(labels), self.sum);
        let _ = writeln!(out, "{name}_count{} {}", braces(labels), self.count);
    }
}

/// What the agent records as it runs (process-wide, like the agent).
#[derive(Default)]
pub struct Metrics {
    /// (route, HTTP status) -> requests.
    cni_requests: Mutex<BTreeMap<(String, u16), u64>>,
    cni_latency: Mutex<BTreeMap<String, Histogram>>,
    /// trigger (`source`, `endpoint`) -> time until the service maps were written.
    service_delay: Mutex<BTreeMap<String, Histogram>>,
    /// trigger -> time until the policy maps were written.
    policy_delay: Mutex<BTreeMap<String, Histogram>>,
    source_updates: AtomicU64,
    source_updates_with_errors: AtomicU64,
    reconcile_failures: AtomicU64,
    ct_gc_runs: AtomicU64,
    ct_gc_removed: AtomicU64,
    ct_gc_failures: AtomicU64,
    ct_gc_last_entries: AtomicU64,
    /// Sockets the socket LB translated to a since-removed backend, destroyed.
    sockets_destroyed: AtomicU64,
    /// (kind, reason, direction) -> events read from the datapath.
    events: Mutex<BTreeMap<(String, String, String), u64>>,
}

static GLOBAL: LazyLock<Metrics> = LazyLock::new(Metrics::default);

pub fn global() -> &'static Metrics {
    &GLOBAL
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Metrics {
    pub fn cni_request(&self, route: &str, status: u16, took: Duration) {
        *lock(&self.cni_requests)
            .entry((route.to_string(), status))
            .or_default() += 1;
        lock(&self.cni_latency)
            .entry(route.to_string())
            .or_default()
            .observe(took);
    }

    pub fn service_implementation(&self, trigger: &str, took: Duration) {
        lock(&self.service_delay)
            .entry(trigger.to_string())
            .or_default()
            .observe(took);
    }

    /// Both kinds of maps are written in one pass after a change (policy
    /// first), so this is measured to the end of that pass: an upper bound.
    pub fn policy_implementation(&self, trigger: &str, took: Duration) {
        lock(&self.policy_delay)
            .entry(trigger.to_string())
            .or_default()
            .observe(took);
    }

    pub fn source_update(&self, errors: usize) {
        self.source_updates.fetch_add(1, Ordering::Relaxed);
        if errors > 0 {
            self.source_updates_with_errors
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn reconcile_failed(&self) {
        self.reconcile_failures.fetch_add(1, Ordering::Relaxed);
    }

    pub fn ct_gc_run(&self, removed: usize, entries_left: usize) {
        self.ct_gc_runs.fetch_add(1, Ordering::Relaxed);
        self.ct_gc_removed
            .fetch_add(removed as u64, Ordering::Relaxed);
        self.ct_gc_last_entries
            .store(entries_left as u64, Ordering::Relaxed);
    }

    pub fn sockets_destroyed(&self, n: usize) {
        self.sockets_destroyed
            .fetch_add(n as u64, Ordering::Relaxed);
    }

    pub fn ct_gc_failed(&self) {
        self.ct_gc_failures.fetch_add(1, Ordering::Relaxed);
    }

    pub fn ct_gc_totals(&self) -> (u64, u64) {
        (
            self.ct_gc_runs.load(Ordering::Relaxed),
            self.ct_gc_removed.load(Ordering::Relaxed),
        )
    }

    pub fn record_event(&self, ev: &DatapathEvent) {
        let key = (
            crate::ops::monitor::kind_name(ev.kind).to_string(),
            ev.reason.clone(),
            crate::ops::monitor::direction_name(ev.direction).to_string(),
        );
        *lock(&self.events).entry(key).or_default() += 1;
    }
}

/// What is read fresh at scrape time.
pub struct Snapshot<'a> {
    pub ready: bool,
    pub version: &'a str,
    pub endpoints: usize,
    pub services: usize,
    pub source_synced: bool,
    pub source_errors: usize,
    /// METRICS map counters by name, summed over CPUs.
    pub counters: &'a BTreeMap<String, u64>,
    pub maps: &'a [catena_api::MapPressure],
    pub links: usize,
}

/// How each datapath counter is exposed: (family, labels). Counters this
/// agent does not know (a newer datapath) still show up, by name.
fn counter_family(name: &str) -> (&'static str, String) {
    match name {
        "from_container" => (
            "catena_datapath_packets_total",
            r#"direction="egress""#.into(),
        ),
        "to_container" => (
            "catena_datapath_packets_total",
            r#"direction="ingress""#.into(),
        ),
        "service_dnat" => ("catena_services_translated_total", r#"kind="dnat""#.into()),
        "reverse_nat" => (
            "catena_services_translated_total",
            r#"kind="reverse_nat""#.into(),
        ),
        "sock_translated" => (
            "catena_services_translated_total",
            r#"kind="socket""#.into(),
        ),
        "drop_no_backend" => (
            "catena_drop_count_total",
            r#"reason="no_backend",direction="egress""#.into(),
        ),
        "reject_no_backend" => (
            "catena_drop_count_total",
            r#"reason="no_backend_reset",direction="egress""#.into(),
        ),
        "sock_rejected" => (
            "catena_drop_count_total",
            r#"reason="no_backend_socket",direction="egress""#.into(),
        ),
        "drop_ct_full" => (
            "catena_drop_count_total",
            r#"reason="ct_full",direction="egress""#.into(),
        ),
        // The rest (drop_invalid among them) are counted by both programs:
        // the map does not say which direction.
        other => match other.strip_prefix("drop_") {
            Some(reason) => (
                "catena_drop_count_total",
                format!("reason=\"{}\",direction=\"any\"", escape(reason)),
            ),
            None => (
                "catena_datapath_counter_total",
                format!("name=\"{}\"", escape(other)),
            ),
        },
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', r"\\")
        .replace('"', "\\\"")
        .replace('\n', r"\n")
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// A family with one unlabelled sample.
fn scalar(out: &mut String, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
    family(out, name, kind, help);
    let _ = writeln!(out, "{name} {value}");
}

fn family_help(name: &str) -> &'static str {
    match name {
        "catena_datapath_packets_total" => "Packets seen by catena's programs on pod veths (egress: sent by pods; ingress: delivered to pods).",
        "catena_services_translated_total" => "Packets or socket calls translated for a Service.",
        "catena_drop_count_total" => "Packets (or socket calls) dropped or rejected by the datapath, by reason.",
        _ => "Datapath counter without a dedicated family.",
    }
}

impl Metrics {
    pub fn render(&self, s: &Snapshot<'_>) -> String {
        let mut out = String::new();
        family(&mut out, "catena_build_info", "gauge", "Agent version.");
        let _ = writeln!(
            out,
            "catena_build_info{{version=\"{}\"}} 1",
            escape(s.version)
        );
        scalar(
            &mut out,
            "catena_agent_ready",
            "gauge",
            "1 once the agent restored its state and synced its source.",
            u8::from(s.ready),
        );
        scalar(
            &mut out,
            "catena_endpoints",
            "gauge",
            "Pod endpoints managed on this node.",
            s.endpoints,
        );
        scalar(
            &mut out,
            "catena_services",
            "gauge",
            "Service frontends programmed into the datapath.",
            s.services,
        );
        scalar(
            &mut out,
            "catena_bpf_links",
            "gauge",
            "BPF links pinned by catena (TCX and cgroup).",
            s.links,
        );

        // Datapath counters, grouped by family (a family must be contiguous).
        let mut families: BTreeMap<&str, Vec<(String, u64)>> = BTreeMap::new();
        for (name, v) in s.counters {
            let (fam, labels) = counter_family(name);
            families.entry(fam).or_default().push((labels, *v));
        }
        for (fam, samples) in &families {
            family(&mut out, fam, "counter", family_help(fam));
            for (labels, v) in samples {
                let _ = writeln!(out, "{fam}{{{labels}}} {v}");
            }
        }

        family(
            &mut out,
            "catena_datapath_events_total",
            "counter",
            "Drop and policy-verdict events read from the datapath's event ring.",
        );
        for ((kind, reason, dir), v) in lock(&self.events).iter() {
            let _ = writeln!(
                out,
                "catena_datapath_events_total{{kind=\"{}\",reason=\"{}\",direction=\"{}\"}} {v}",
                escape(kind),
                escape(reason),
                escape(dir)
            );
        }

        family(
            &mut out,
            "catena_bpf_map_entries",
            "gauge",
            "Entries in a pinned map.",
        );
        for m in s.maps {
            let _ = writeln!(
                out,
                "catena_bpf_map_entries{{map_name=\"{}\"}} {}",
                m.name, m.entries
            );
        }
        family(
            &mut out,
            "catena_bpf_map_capacity",
            "gauge",
            "max_entries of a pinned map.",
        );
        for m in s.maps {
            let _ = writeln!(
                out,
                "catena_bpf_map_capacity{{map_name=\"{}\"}} {}",
                m.name, m.max_entries
            );
        }
        family(
            &mut out,
            "catena_bpf_map_pressure",
            "gauge",
            "Fill ratio of a pinned map (entries / max_entries).",
        );
        for m in s.maps {
            let _ = writeln!(
                out,
                "catena_bpf_map_pressure{{map_name=\"{}\"}} {}",
                m.name, m.pressure
            );
        }

        let ct_entries = s
            .maps
            .iter()
            .find(|m| m.name == catena_common::map_names::CT4);
        scalar(
            &mut out,
            "catena_conntrack_entries",
            "gauge",
            "Entries in the conntrack map.",
            ct_entries.map_or(0, |m| m.entries),
        );
        scalar(
            &mut out,
            "catena_conntrack_gc_runs_total",
            "counter",
            "Conntrack GC passes completed.",
            self.ct_gc_runs.load(Ordering::Relaxed),
        );
        scalar(
            &mut out,
            "catena_conntrack_gc_entries_removed_total",
            "counter",
            "Expired conntrack entries removed by the GC.",
            self.ct_gc_removed.load(Ordering::Relaxed),
        );
        scalar(
            &mut out,
            "catena_conntrack_gc_failures_total",
            "counter",
            "Conntrack GC passes that failed.",
            self.ct_gc_failures.load(Ordering::Relaxed),
        );
        scalar(
            &mut out,
            "catena_lb_sockets_destroyed_total",
            "counter",
            "Sockets translated by the socket-level load balancer to a backend that left its Service, destroyed.",
            self.sockets_destroyed.load(Ordering::Relaxed),
        );

        scalar(
            &mut out,
            "catena_source_synced",
            "gauge",
            "1 once the cluster source completed its first sync.",
            u8::from(s.source_synced),
        );
        scalar(
            &mut out,
            "catena_source_errors",
            "gauge",
            "Problems in the source's current input (unparsable manifests, ...).",
            s.source_errors,
        );
        scalar(
            &mut out,
            "catena_source_updates_total",
            "counter",
            "Cluster snapshots received from the source.",
            self.source_updates.load(Ordering::Relaxed),
        );
        scalar(
            &mut out,
            "catena_source_sync_errors_total",
            "counter",
            "Source snapshots that carried errors.",
            self.source_updates_with_errors.load(Ordering::Relaxed),
        );
        scalar(
            &mut out,
            "catena_reconcile_failures_total",
            "counter",
            "Reconciles of the datapath that failed (retried on the next change).",
            self.reconcile_failures.load(Ordering::Relaxed),
        );

        family(
            &mut out,
            "catena_service_implementation_delay_seconds",
            "histogram",
            "Time from a source change or an endpoint add to the service maps written.",
        );
        for (trigger, h) in lock(&self.service_delay).iter() {
            h.render(
                &mut out,
                "catena_service_implementation_delay_seconds",
                &format!("trigger=\"{}\"", escape(trigger)),
            );
        }

        family(
            &mut out,
            "catena_policy_implementation_delay_seconds",
            "histogram",
            "Time from a source change or an endpoint add to the policy maps written.",
        );
        for (trigger, h) in lock(&self.policy_delay).iter() {
            h.render(
                &mut out,
                "catena_policy_implementation_delay_seconds",
                &format!("trigger=\"{}\"", escape(trigger)),
            );
        }

        family(
            &mut out,
            "catena_cni_requests_total",
            "counter",
            "CNI plugin requests to the agent API, by route and HTTP status.",
        );
        for ((route, code), v) in lock(&self.cni_requests).iter() {
            let _ = writeln!(
                out,
                "catena_cni_requests_total{{route=\"{}\",code=\"{code}\"}} {v}",
                escape(route)
            );
        }
        family(
            &mut out,
            "catena_cni_request_duration_seconds",
            "histogram",
            "Latency of CNI plugin requests to the agent API, by route.",
        );
        for (route, h) in lock(&self.cni_latency).iter() {
            h.render(
                &mut out,
                "catena_cni_request_duration_seconds",
                &format!("route=\"{}\"", escape(route)),
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_is_well_formed() {
        let m = Metrics::default();
        m.cni_request("put_endpoint", 200, Duration::from_millis(3));
        m.cni_request("put_endpoint", 200, Duration::from_millis(30));
        m.service_implementation("source", Duration::from_micros(700));
        m.ct_gc_run(5, 10);
        let counters = BTreeMap::from([
            ("from_container".to_string(), 7),
            ("drop_invalid".to_string(), 1),
            ("drop_policy".to_string(), 2),
            ("future_thing".to_string(), 3),
        ]);
        let text = m.render(&Snapshot {
            ready: true,
            version: "0.1.0",
            endpoints: 2,
            services: 1,
            source_synced: true,
            source_errors: 0,
            counters: &counters,
            maps: &[],
            links: 4,
        });
        for line in [
            r#"catena_datapath_packets_total{direction="egress"} 7"#,
            r#"catena_drop_count_total{reason="invalid",direction="any"} 1"#,
            r#"catena_drop_count_total{reason="policy",direction="any"} 2"#,
            r#"catena_datapath_counter_total{name="future_thing"} 3"#,
            r#"catena_cni_requests_total{route="put_endpoint",code="200"} 2"#,
            r#"catena_cni_request_duration_seconds_bucket{route="put_endpoint",le="0.005"} 1"#,
            r#"catena_cni_request_duration_seconds_bucket{route="put_endpoint",le="+Inf"} 2"#,
            r#"catena_cni_request_duration_seconds_count{route="put_endpoint"} 2"#,
            r#"catena_service_implementation_delay_seconds_bucket{trigger="source",le="0.001"} 1"#,
            "catena_conntrack_gc_entries_removed_total 5",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        // Every family is declared once and its samples follow it.
        let mut seen = std::collections::HashSet::new();
        for l in text.lines().filter(|l| l.starts_with("# TYPE ")) {
            assert!(seen.insert(l.to_string()), "duplicate {l}");
        }
        for l in text.lines().filter(|l| !l.starts_with('#')) {
            let value = l.rsplit(' ').next().unwrap();
            assert!(value.parse::<f64>().is_ok(), "bad sample {l:?}");
        }
    }
}
