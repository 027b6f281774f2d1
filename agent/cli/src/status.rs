//! `catena status` (the details beyond the agent's summary) and `catena
//! health` (for probes: exit status says it all).

use crate::table::{human_count, Table};
use crate::{print_json, Output};
use anyhow::{bail, Result};
use catena_api::{Client, ClientError, Health, Status, StatusDetail};

pub fn run(client: &Client, output: Output) -> Result<()> {
    let status: Status = client.get("/v1/status")?;
    // Agents before the detail route answer 404: show what there is.
    let detail: Option<StatusDetail> = match client.get("/v1/status/detail") {
        Ok(d) => Some(d),
        Err(ClientError::Api { status: 404, .. }) => None,
        Err(e) => return Err(e.into()),
    };
    match output {
        Output::Json => {
            let mut v = serde_json::to_value(&status)?;
            if let (Some(obj), Some(d)) = (v.as_object_mut(), &detail) {
                obj.insert("detail".into(), serde_json::to_value(d)?);
            }
            print_json(&v);
        }
        Output::Table => {
            print_summary(&status);
            if let Some(d) = &detail {
                print_detail(d);
            }
        }
    }
    Ok(())
}

fn print_summary(s: &Status) {
    let ready = if s.ready { "Ready" } else { "NotReady" };
    println!("Agent:       {ready} (version {})", s.version);
    let synced = if s.source.synced { "synced" } else { "syncing" };
    println!("Source:      {} ({synced})", s.source.kind);
    for e in &s.source.errors {
        println!("  ! {e}");
    }
    println!("Datapath:    {}", s.datapath.bpffs_dir);
    println!("Endpoints:   {}", s.endpoints);
    println!("Services:    {} frontends", s.services);
    crate::policy::print_policy_status(&s.policies);
    if !s.datapath.counters.is_empty() {
        println!("Counters:");
        for (name, value) in &s.datapath.counters {
            println!("  {name:<20} {}", human_count(*value));
        }
    }
}

fn print_detail(d: &StatusDetail) {
    println!("Programs:");
    let mut t = Table::new(["  NAME", "ID", "TAG", "PIN"]);
    for p in &d.programs {
        t.row([
            format!("  {}", p.name),
            p.id.to_string(),
            p.tag.clone(),
            p.pin.clone(),
        ]);
    }
    t.print();
    let modes: Vec<String> = d
        .attach_modes
        .iter()
        .map(|(m, n)| format!("{m}: {n}"))
        .collect();
    println!(
        "Attach:      {} ({} links pinned)",
        if modes.is_empty() {
            "no endpoints".to_string()
        } else {
            modes.join(", ")
        },
        d.links.len()
    );
    println!("Maps:");
    for m in &d.maps {
        println!(
            "  {:<14} {:>8} / {:<8} {:>5.1}%",
            m.name,
            m.entries,
            m.max_entries,
            m.pressure * 100.0
        );
    }
    let c = &d.conntrack;
    println!(
        "Conntrack GC: {} runs, {} removed, every {}s{} (timeouts: tcp {}s, closing {}s, syn {}s, other {}s)",
        c.gc_runs,
        c.gc_removed,
        c.gc_interval_secs,
        c.last_gc_secs_ago
            .map(|s| format!(", last {s}s ago"))
            .unwrap_or_default(),
        c.tcp_timeout_secs,
        c.tcp_closing_timeout_secs,
        c.tcp_syn_timeout_secs,
        c.any_timeout_secs
    );
    println!("Monitor:     {}", d.events);
    println!("Health:");
    for h in &d.health {
        let mark = if h.ok { "ok  " } else { "FAIL" };
        println!("  {mark} {:<14} {}", h.name, h.message);
    }
    if !d.unsupported.is_empty() {
        println!("Not supported:");
        for u in &d.unsupported {
            println!("  - {u}");
        }
    }
}

/// `catena health`: liveness (the agent answers and is not wedged) or, with
/// `--ready`, readiness. Non-zero exit when not, for exec probes.
pub fn health(client: &Client, output: Output, ready: bool) -> Result<()> {
    let path = if ready { "/v1/readyz" } else { "/v1/livez" };
    let what = if ready { "ready" } else { "alive" };
    match client.get::<Health>(path) {
        Ok(h) => {
            match output {
                Output::Json => print_json(&h),
                Output::Table => println!("{what}"),
            }
            Ok(())
        }
        Err(ClientError::Api { status: 503, body }) => {
            bail!("agent not {what}: {}", body.message)
        }
        Err(e) => Err(e.into()),
    }
}
