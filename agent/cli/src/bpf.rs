//! `catena bpf <map> list`: raw dumps of the pinned maps, read by the agent
//! and decoded into columns. Every map is listed the same way, so a new one
//! is one variant here (and a decoder in the agent's `ops::dump`).

use crate::table::render_rows;
use crate::{print_json, Output};
use anyhow::Result;
use catena_api::{BpfMapDump, Client};
use clap::Subcommand;

#[derive(Subcommand)]
pub enum BpfCmd {
    /// LB4_SERVICES and LB6_SERVICES (master entries and backend slots),
    /// resolved through LB4/LB6_BACKENDS and LB4/LB6_REVNAT.
    #[command(subcommand)]
    Lb(List),
    /// CT4 then CT6, undecoded flags and ids (IPv6 ids refer to the LB6
    /// maps; see `catena ct list` for the friendly view).
    #[command(subcommand)]
    Ct(List),
    /// ENDPOINTS: per-veth configuration read by the programs.
    #[command(subcommand)]
    Endpoint(List),
    /// POLICY: allow/deny entries per endpoint, identity, protocol and port
    /// prefix (port ranges appear as several prefixes).
    #[command(subcommand)]
    Policy(List),
    /// IPCACHE: prefix -> security identity of remote addresses.
    #[command(subcommand)]
    Ipcache(List),
}

#[derive(Subcommand)]
pub enum List {
    List,
}

impl BpfCmd {
    /// The agent's name for the dump (`GET /v1/bpf/{name}`).
    fn dump_name(&self) -> &'static str {
        match self {
            BpfCmd::Lb(_) => "lb",
            BpfCmd::Ct(_) => "ct",
            BpfCmd::Endpoint(_) => "endpoint",
            BpfCmd::Policy(_) => "policy",
            BpfCmd::Ipcache(_) => "ipcache",
        }
    }
}

pub fn run(client: &Client, output: Output, cmd: &BpfCmd) -> Result<()> {
    let dump: BpfMapDump = client.get(&format!("/v1/bpf/{}", cmd.dump_name()))?;
    match output {
        Output::Json => print_json(&as_objects(&dump)),
        Output::Table => {
            print!("{}", render_rows(&dump.columns, &dump.rows));
            for m in &dump.maps {
                println!("{}: {} / {} entries", m.name, m.entries, m.max_entries);
            }
        }
    }
    Ok(())
}

/// JSON for scripts: each row as an object keyed by lower-case column.
fn as_objects(dump: &BpfMapDump) -> serde_json::Value {
    let rows: Vec<serde_json::Value> = dump
        .rows
        .iter()
        .map(|row| {
            dump.columns
                .iter()
                .zip(row)
                .map(|(c, v)| (c.to_lowercase(), serde_json::Value::String(v.clone())))
                .collect::<serde_json::Map<_, _>>()
                .into()
        })
        .collect();
    serde_json::json!({ "maps": dump.maps, "entries": rows })
}
