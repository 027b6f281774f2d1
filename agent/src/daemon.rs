//! The agent process: restores state, opens the datapath, starts the source and
//! the API, and reconciles the service maps whenever the cluster or the set of
//! endpoints changes.

use crate::api;
use crate::config::AgentConfig;
use crate::core::{AgentCore, SourceInfo};
use crate::report::PolicyReporter;
use crate::sources::watch::{watch_manifest_dir, SourceUpdate};
use anyhow::{Context, Result};
use std::sync::Arc;
use tokio::sync::watch;

pub async fn run(config: AgentConfig) -> Result<()> {
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        socket = %config.socket.display(),
        bpffs = %config.bpffs_dir.display(),
        state = %config.state_dir.display(),
        "starting catena-agent"
    );
    // The API comes up first (answering "not ready") so the CNI plugin gets a
    // clear try-again-later instead of a missing socket while we restore.
    let core = Arc::new(AgentCore::new(config.clone()));
    let ops = crate::ops::Ops::new(core.clone());
    let listener = api::bind(&config.socket)?;
    let server = tokio::spawn(api::serve(listener, core.clone(), ops.clone()));
    if let Some(addr) = config.prometheus_bind_address {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the Prometheus endpoint on {addr}"))?;
        let app = crate::ops::metrics_router(ops.clone());
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!(error = %e, "Prometheus endpoint stopped");
            }
        });
        tracing::info!(%addr, "serving Prometheus metrics");
    }

    if let Some(addr) = config.healthz_bind_address {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the kube-proxy health endpoint on {addr}"))?;
        tokio::spawn(api::healthz::serve(listener, core.clone()));
    }
    let restore_core = core.clone();
    let restore = async move {
        tokio::task::spawn_blocking(move || restore_core.open_and_restore())
            .await
            .context("restore task panicked")?
    };
    // The source's first read (a manifest directory parsed, or the API
    // server's lists) needs no datapath, and loading the programs is the
    // kernel verifier's work on another core: both run at once, so an agent
    // start costs the longer of the two, not their sum. Either failing stops
    // the start at once (a broken bpffs does not wait for an API server).
    let ((), (mut updates, kube_client)) = tokio::try_join!(restore, start_source(&config, &core))?;
    ops.start_events();
    // Devices before the first compile, so NodePort frontends come with it.
    // A `--devices` naming a missing interface stops the agent here.
    let devices = blocking(&core, |c| c.sync_devices()).await?;
    if !devices.is_empty() {
        let names: Vec<&str> = devices.iter().map(|d| d.name.as_str()).collect();
        tracing::info!(devices = ?names, "north-south traffic on external devices");
    }

    // Kubernetes mode only: standalone mode has no API server to report to
    // (`catena status` is the place there).
    let reporter = kube_client.map(|client| PolicyReporter::start(client, config.node_name()));
    let first = updates.borrow_and_update().clone();
    apply_update(&core, first).await?;
    report_policies(&core, reporter.as_ref()).await;
    let drained = blocking(&core, |c| c.drain_delete_queue()).await?;
    if drained > 0 {
        tracing::info!(drained, "processed deletes queued while the agent was down");
    }
    let adopted = blocking(&core, |c| c.adopt_running_pods()).await?;
    if adopted > 0 {
        tracing::info!(adopted, "adopted pods that were running before catena");
    }
    // Only now is the set of live endpoints known (restored, synced, queued
    // deletes applied, running pods adopted): what a previous run left for
    // other interfaces is garbage.
    let (links, entries) = blocking(&core, |c| c.collect_stale_datapath_state()).await?;
    if links + entries > 0 {
        tracing::info!(
            links,
            entries,
            "collected datapath state of endpoints that no longer exist"
        );
    }
    core.set_ready();
    tracing::info!("agent ready");

    let reconciler = {
        let core = core.clone();
        tokio::spawn(async move {
            while updates.changed().await.is_ok() {
                let update = updates.borrow_and_update().clone();
                if let Err(e) = apply_update(&core, update).await {
                    tracing::error!(error = %format!("{e:#}"), "reconcile failed; will retry on the next change");
                }
                report_policies(&core, reporter.as_ref()).await;
            }
        })
    };

    let north_south = config
        .kube_proxy_replacement
        .enabled()
        .then(|| tokio::spawn(north_south_loop(core.clone())));

    let ct_gc = {
        let ops = ops.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(ops.gc_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await; // the first tick is immediate: skip it
            loop {
                tick.tick().await;
                let ops = ops.clone();
                let _ = tokio::task::spawn_blocking(move || ops.run_gc()).await;
            }
        })
    };

    shutdown_signal().await;
    tracing::info!("shutting down; pinned programs and maps keep the datapath running");
    ops.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    ct_gc.abort();
    if let Some(task) = north_south {
        task.abort();
    }
    reconciler.abort();
    server.abort();
    let _ = std::fs::remove_file(&config.socket);
    Ok(())
}

/// The source's updates, and in Kubernetes mode the client it uses (the
/// policy reporter writes through the same one).
/// Keeps the external devices in line with the node's interfaces (address
/// changes, devices coming and going) and the health-check node ports in
/// line with the Services, by polling: both are cheap to recompute, and the
/// period bounds how stale either can be.
async fn north_south_loop(core: Arc<AgentCore>) {
    let mut servers = crate::nodeport::health::HealthServers::default();
    let mut tick = tokio::time::interval(NORTH_SOUTH_PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(e) = blocking(&core, |c| c.sync_devices()).await {
            tracing::warn!(error = %format!("{e:#}"), "external devices not synced; retrying");
        }
        let checks = match blocking(&core, |c| Ok(c.health_checks())).await {
            Ok(c) => c,
            Err(_) => continue,
        };
        servers.reconcile(checks).await;
    }
}

/// How often devices and health-check ports are re-synced.
const NORTH_SOUTH_PERIOD: std::time::Duration = std::time::Duration::from_secs(1);

async fn start_source(
    config: &AgentConfig,
    core: &Arc<AgentCore>,
) -> Result<(watch::Receiver<SourceUpdate>, Option<kube::Client>)> {
    match &config.manifests {
        Some(dir) => {
            core.set_source(SourceInfo::new(format!("manifests:{}", dir.display())));
            Ok((watch_manifest_dir(dir.clone()).await?, None))
        }
        None if config.kubeconfig.is_some() || in_cluster() => {
            core.set_source(SourceInfo::new("kubernetes".to_string()));
            let client = crate::sources::kube::client(config.kubeconfig.as_deref()).await?;
            tracing::info!("waiting for the first list of every Kubernetes kind");
            let updates = crate::sources::kube::watch_kubernetes(client.clone()).await?;
            Ok((updates, Some(client)))
        }
        None => {
            tracing::warn!("no --manifests, no --kubeconfig and not in a cluster: no services or policies will be programmed");
            // No source: endpoints still get their programs, no services exist.
            core.set_source(SourceInfo::new("none".to_string()));
            let (tx, rx) = watch::channel(SourceUpdate::default());
            std::mem::forget(tx); // keep the channel open for the life of the process
            Ok((rx, None))
        }
    }
}

/// Running in a pod with a service account (the chart's DaemonSet), or an
/// operator's `KUBECONFIG` is set (kube's config inference reads it).
fn in_cluster() -> bool {
    std::env::var_os("KUBERNETES_SERVICE_HOST").is_some()
        || std::env::var_os("KUBECONFIG").is_some()
}

async fn apply_update(core: &Arc<AgentCore>, update: SourceUpdate) -> Result<()> {
    let received = std::time::Instant::now();
    let metrics = crate::metrics::global();
    metrics.source_update(update.errors.len());
    core.record_source_errors(update.errors.clone());
    let state = update.state.clone();
    let result = blocking(core, move |c| c.set_cluster(state)).await;
    match &result {
        // From the snapshot reaching the agent (after the source's debounce)
        // to the maps written.
        Ok(()) => {
            let took = received.elapsed();
            metrics.policy_implementation("source", took);
            metrics.service_implementation("source", took);
        }
        Err(_) => metrics.reconcile_failed(),
    }
    result
}

/// Hands the last compile's policy reports to the reporter. Whatever the
/// reporter does with them (API writes, retries) happens on its own task.
async fn report_policies(core: &Arc<AgentCore>, reporter: Option<&PolicyReporter>) {
    let Some(reporter) = reporter else { return };
    if let Ok(Some((cluster, reports))) = blocking(core, |c| Ok(c.policy_reports())).await {
        reporter.submit(cluster, reports);
    }
}

async fn blocking<T: Send + 'static>(
    core: &Arc<AgentCore>,
    f: impl FnOnce(&AgentCore) -> Result<T> + Send + 'static,
) -> Result<T> {
    let core = core.clone();
    tokio::task::spawn_blocking(move || f(&core))
        .await
        .context("agent task panicked")?
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
