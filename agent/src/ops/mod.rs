//! Operating the agent: conntrack listing and GC, raw map dumps, the event
//! monitor, health and readiness, detailed status, Prometheus metrics, and the
//! full uninstall. Routes here are merged into the agent API router.

pub mod bpf;
pub mod conntrack;
pub mod dump;
pub mod monitor;
pub mod uninstall;

use crate::core::AgentCore;
use axum::extract::{Path, Query, State};
use axum::http::{Method, Request, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use catena_api::{
    ApiError, ConntrackStatus, CtFlushResult, Health, HealthCheck, LinkStatus, ProgramStatus,
    StatusDetail,
};
use conntrack::CtTimeouts;
use monitor::Events;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// A map this full is reported as unhealthy (new flows or services start to
/// fail or evict soon).
const PRESSURE_WARN: f64 = 0.9;
/// Liveness: the agent's state lock must be obtainable within this.
const LIVENESS_LOCK_WAIT: Duration = Duration::from_secs(3);

/// State of the operational routes and tasks.
pub struct Ops {
    pub core: Arc<AgentCore>,
    pub bpffs: PathBuf,
    pub gc_interval: Duration,
    pub timeouts: CtTimeouts,
    /// Set once the datapath is open (before: 503 on `/v1/monitor`).
    events: OnceLock<Events>,
    last_gc: Mutex<Option<Instant>>,
    /// Tells background threads (the event reader) to stop.
    pub stop: Arc<AtomicBool>,
}

impl Ops {
    pub fn new(core: Arc<AgentCore>) -> Arc<Ops> {
        let c = core.config().clone();
        Arc::new(Ops {
            core,
            bpffs: c.bpffs_dir.clone(),
            gc_interval: c.ct_gc_interval.into(),
            timeouts: CtTimeouts {
                tcp: c.ct_tcp_timeout.into(),
                tcp_closing: c.ct_tcp_closing_timeout.into(),
                tcp_syn: c.ct_tcp_syn_timeout.into(),
                any: c.ct_any_timeout.into(),
            },
            events: OnceLock::new(),
            last_gc: Mutex::new(None),
            stop: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Takes the datapath's event reader (once the datapath is open).
    pub fn start_events(&self) {
        let events = monitor::start(self.core.event_reader(), self.stop.clone());
        match &events {
            Events::Available(_) => tracing::info!("datapath events available for catena monitor"),
            Events::Unavailable(why) => tracing::warn!(reason = %why, "catena monitor disabled"),
        }
        let _ = self.events.set(events);
    }

    /// One conntrack GC pass (blocking).
    pub fn run_gc(&self) {
        let started = Instant::now();
        match conntrack::gc(&self.bpffs, &self.timeouts) {
            Ok(run) => {
                // The GC metrics carry no family label: both maps add up.
                crate::metrics::global().ct_gc_run(run.removed(), run.scanned() - run.removed());
                *self.last_gc.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
                let took = started.elapsed();
                if run.removed() > 0 {
                    tracing::info!(
                        scanned_ipv4 = run.v4.scanned,
                        removed_ipv4 = run.v4.removed,
                        scanned_ipv6 = run.v6.scanned,
                        removed_ipv6 = run.v6.removed,
                        ?took,
                        "conntrack GC"
                    );
                } else {
                    tracing::debug!(
                        scanned_ipv4 = run.v4.scanned,
                        scanned_ipv6 = run.v6.scanned,
                        ?took,
                        "conntrack GC: nothing expired"
                    );
                }
            }
            Err(e) => {
                crate::metrics::global().ct_gc_failed();
                tracing::error!(error = %format!("{e:#}"), "conntrack GC failed");
            }
        }
    }

    pub fn detail(&self) -> StatusDetail {
        let core = &self.core;
        let mut programs: Vec<ProgramStatus> = std::fs::read_dir(self.bpffs.join("programs"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let (id, tag) = bpf::program_info(&e.path()).ok()?;
                Some(ProgramStatus {
                    name: e.file_name().to_string_lossy().into_owned(),
                    id,
                    tag,
                    pin: e.path().display().to_string(),
                })
            })
            .collect();
        programs.sort_by(|a, b| a.name.cmp(&b.name));
        let links: Vec<LinkStatus> = bpf::links(&self.bpffs)
            .into_iter()
            .map(|l| LinkStatus {
                kind: l.kind(),
                pin: l.pin,
                link_id: l.id,
                prog_id: l.prog_id,
                ifindex: l.tcx_ifindex,
            })
            .collect();
        let endpoints = core.endpoints().unwrap_or_default();
        let mut attach_modes = std::collections::BTreeMap::new();
        for ep in &endpoints {
            *attach_modes.entry(ep.attach_mode.clone()).or_insert(0) += 1;
        }
        let maps = dump::pressure(&self.bpffs);
        let (gc_runs, gc_removed) = crate::metrics::global().ct_gc_totals();
        let last_gc = *self.last_gc.lock().unwrap_or_else(|p| p.into_inner());
        let status = core.status();

        let mut health = Vec::new();
        let mut check = |name: &str, ok: bool, message: String| {
            health.push(HealthCheck {
                name: name.into(),
                ok,
                message,
            })
        };
        check(
            "agent",
            status.ready,
            if status.ready {
                "ready".into()
            } else {
                "restoring state and syncing the source".into()
            },
        );
        check(
            "source",
            status.source.synced && status.source.errors.is_empty(),
            if !status.source.synced {
                "first sync not complete".into()
            } else if status.source.errors.is_empty() {
                "synced".into()
            } else {
                format!(
                    "{} problem(s) in the input; last good state in force",
                    status.source.errors.len()
                )
            },
        );
        // Every TCX endpoint must have both links, running the programs this
        // agent loaded: after an upgrade this says the upgrade is complete.
        let current: std::collections::BTreeMap<&str, u32> =
            programs.iter().map(|p| (p.name.as_str(), p.id)).collect();
        let mut stale = Vec::new();
        for ep in endpoints.iter().filter(|e| e.attach_mode == "tcx") {
            for (suffix, prog) in [("ingress", "from_container"), ("egress", "to_container")] {
                let pin = format!("{}-{suffix}", ep.spec.host_ifindex);
                match links.iter().find(|l| l.pin == pin) {
                    Some(l)
                        if Some(&l.prog_id) == current.get(prog)
                            && l.ifindex == ep.spec.host_ifindex => {}
                    Some(l) => stale.push(format!(
                        "{pin} runs program {} on ifindex {}",
                        l.prog_id, l.ifindex
                    )),
                    None => stale.push(format!("{pin} missing")),
                }
            }
        }
        check(
            "attachments",
            stale.is_empty(),
            if stale.is_empty() {
                format!("{} endpoint(s) run the loaded programs", endpoints.len())
            } else {
                stale.join("; ")
            },
        );
        let gc_ok = match last_gc {
            Some(t) => t.elapsed() <= self.gc_interval * 3 + Duration::from_secs(5),
            None => true,
        };
        check(
            "conntrack-gc",
            gc_ok,
            match last_gc {
                Some(t) => format!("last run {}s ago", t.elapsed().as_secs()),
                None => "not run yet".into(),
            },
        );
        let full: Vec<String> = maps
            .iter()
            .filter(|m| m.pressure >= PRESSURE_WARN)
            .map(|m| format!("{} at {:.0}%", m.name, m.pressure * 100.0))
            .collect();
        check(
            "map-pressure",
            full.is_empty(),
            if full.is_empty() {
                "below 90%".into()
            } else {
                full.join(", ")
            },
        );
        let events = match self.events.get() {
            Some(Events::Available(_)) => "available".to_string(),
            Some(Events::Unavailable(why)) => why.clone(),
            None => "not started yet".into(),
        };
        let config = core.config();
        let mut unsupported = vec![
            "IPv6 NodePort, externalIPs and LoadBalancer IPs (IPv6 ClusterIPs are served)"
                .to_string(),
            "IPv6 network policy: an endpoint under policy drops IPv6 in that direction"
                .to_string(),
        ];
        if !config.kube_proxy_replacement.enabled() {
            unsupported.push("NodePort, LoadBalancer and externalIPs: left to kube-proxy (--kube-proxy-replacement=false)".into());
        }
        if !config.kube_proxy_replacement.enabled() {
            unsupported.push("node processes reaching ClusterIPs: left to kube-proxy (--kube-proxy-replacement=false)".into());
        }
        StatusDetail {
            programs,
            attach_modes,
            links,
            maps,
            conntrack: ConntrackStatus {
                gc_runs,
                gc_removed,
                last_gc_secs_ago: last_gc.map(|t| t.elapsed().as_secs()),
                gc_interval_secs: self.gc_interval.as_secs(),
                tcp_timeout_secs: self.timeouts.tcp.as_secs(),
                tcp_closing_timeout_secs: self.timeouts.tcp_closing.as_secs(),
                tcp_syn_timeout_secs: self.timeouts.tcp_syn.as_secs(),
                any_timeout_secs: self.timeouts.any.as_secs(),
            },
            health,
            unsupported,
            events,
        }
    }

    pub fn metrics_text(&self) -> String {
        let status = self.core.status();
        let maps = dump::pressure(&self.bpffs);
        crate::metrics::global().render(&crate::metrics::Snapshot {
            ready: status.ready,
            version: &status.version,
            endpoints: status.endpoints,
            services: status.services,
            source_synced: status.source.synced,
            source_errors: status.source.errors.len(),
            counters: &status.datapath.counters,
            maps: &maps,
            links: bpf::links(&self.bpffs).len(),
        })
    }
}

/// ifname of `ifindex` in the agent's namespace.
pub fn ifname(ifindex: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: buf has IF_NAMESIZE bytes as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: on success buf holds a NUL-terminated name.
    Some(
        unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }
            .to_string_lossy()
            .into_owned(),
    )
}

type St = State<Arc<Ops>>;

fn error(status: StatusCode, message: String) -> Response {
    let retryable = status == StatusCode::SERVICE_UNAVAILABLE;
    (status, Json(ApiError { message, retryable })).into_response()
}

/// Runs blocking work (bpf syscalls over whole maps) off the async workers.
async fn blocking<T: Send + 'static>(
    ops: Arc<Ops>,
    f: impl FnOnce(&Ops) -> anyhow::Result<T> + Send + 'static,
) -> Result<T, Response> {
    match tokio::task::spawn_blocking(move || f(&ops)).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}"))),
        Err(e) => Err(error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("agent task failed: {e}"),
        )),
    }
}

pub fn router(ops: Arc<Ops>) -> Router {
    Router::new()
        .route("/v1/livez", get(livez))
        .route("/v1/readyz", get(readyz))
        .route("/v1/status/detail", get(detail))
        .route("/v1/ct", get(ct_list))
        .route("/v1/ct/flush", post(ct_flush))
        .route("/v1/bpf/{map}", get(bpf_dump))
        .route("/v1/monitor", get(monitor_stream))
        .route("/metrics", get(metrics))
        .with_state(ops)
}

/// The Prometheus listener (`--prometheus-bind-address`): metrics only.
pub fn metrics_router(ops: Arc<Ops>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .with_state(ops)
}

/// Liveness: the process serves and its state lock is not wedged (a
/// deadlocked or stuck agent must be restarted; a not-yet-ready one must not).
async fn livez(State(ops): St) -> (StatusCode, Json<Health>) {
    let core = ops.core.clone();
    let alive = tokio::task::spawn_blocking(move || core.responsive(LIVENESS_LOCK_WAIT))
        .await
        .unwrap_or(false);
    let code = if alive {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let reason =
        (!alive).then(|| format!("the agent's state lock was busy for {LIVENESS_LOCK_WAIT:?}"));
    (
        code,
        Json(Health {
            ready: alive,
            reason,
        }),
    )
}

/// Readiness: state restored, source synced, datapath programmed.
async fn readyz(State(ops): St) -> (StatusCode, Json<Health>) {
    let ready = ops.core.is_ready();
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let reason = (!ready).then(|| "restoring state and syncing the source".to_string());
    (code, Json(Health { ready, reason }))
}

async fn detail(State(ops): St) -> Result<Json<StatusDetail>, Response> {
    blocking(ops, |o| Ok(o.detail())).await.map(Json)
}

async fn ct_list(State(ops): St) -> Result<Response, Response> {
    let list = blocking(ops, |o| conntrack::list(&o.bpffs)).await?;
    Ok(Json(list).into_response())
}

/// The (empty) body is read so that closing the connection after the answer
/// does not reset it: unread request bytes make the kernel send a RST, which
/// can destroy the answer before the client reads it.
async fn ct_flush(
    State(ops): St,
    _body: axum::body::Bytes,
) -> Result<Json<CtFlushResult>, Response> {
    blocking(ops, |o| {
        let (v4, v6) = conntrack::flush(&o.bpffs)?;
        tracing::warn!(
            removed_ipv4 = v4,
            removed_ipv6 = v6,
            "conntrack flushed on request: live connections through Services may reset"
        );
        Ok(CtFlushResult {
            removed: v4 + v6,
            removed_ipv6: v6,
        })
    })
    .await
    .map(Json)
}

async fn bpf_dump(State(ops): St, Path(map): Path<String>) -> Result<Response, Response> {
    if dump::dump(std::path::Path::new("/nonexistent"), &map).is_none() {
        return Err(error(
            StatusCode::NOT_FOUND,
            format!(
                "no map dump {map:?}; available: {}",
                dump::DUMPABLE.join(", ")
            ),
        ));
    }
    let out = blocking(ops, move |o| {
        dump::dump(&o.bpffs, &map).expect("checked above")
    })
    .await?;
    Ok(Json(out).into_response())
}

async fn monitor_stream(State(ops): St, Query(filter): Query<monitor::Filter>) -> Response {
    if let Err(e) = filter.validate() {
        return error(StatusCode::BAD_REQUEST, e);
    }
    let rx = match ops.events.get() {
        Some(Events::Available(tx)) => tx.subscribe(),
        Some(Events::Unavailable(why)) => {
            return error(StatusCode::SERVICE_UNAVAILABLE, why.clone())
        }
        None => {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "events not available yet: the datapath is still loading".into(),
            )
        }
    };
    let stream = futures::stream::unfold((rx, filter), |(mut rx, filter)| async move {
        loop {
            match rx.recv().await {
                Ok(ev) if filter.matches(&ev) => {
                    let mut line = serde_json::to_vec(&*ev).expect("events serialize");
                    line.push(b'\n');
                    return Some((Ok::<_, std::convert::Infallible>(line), (rx, filter)));
                }
                Ok(_) => continue,
                // A slow reader is told what it missed instead of silently skipping.
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    let line = format!("{{\"lost\":{n}}}\n").into_bytes();
                    return Some((Ok(line), (rx, filter)));
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    Response::builder()
        .header("content-type", "application/x-ndjson")
        .body(axum::body::Body::from_stream(stream))
        .expect("static response parts")
}

async fn metrics(State(ops): St) -> Result<Response, Response> {
    let text = blocking(ops, |o| Ok(o.metrics_text())).await?;
    Ok((
        [("content-type", "text/plain; version=0.0.4; charset=utf-8")],
        text,
    )
        .into_response())
}

/// Counts and times the CNI plugin's requests (the routes the plugin uses).
pub async fn track_cni(req: Request<axum::body::Body>, next: Next) -> Response {
    let path = req.uri().path();
    let route = match (req.method(), path.starts_with("/v1/endpoints/")) {
        (&Method::PUT, true) => Some("put_endpoint"),
        (&Method::DELETE, true) => Some("delete_endpoint"),
        (&Method::GET, true) if path.ends_with("/check") => Some("check_endpoint"),
        (&Method::POST, _) if path == "/v1/endpoints/gc" => Some("gc"),
        _ => None,
    };
    let started = Instant::now();
    let resp = next.run(req).await;
    if let Some(route) = route {
        crate::metrics::global().cni_request(route, resp.status().as_u16(), started.elapsed());
    }
    resp
}
