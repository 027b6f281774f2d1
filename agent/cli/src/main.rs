//! `catena`: the operator CLI. Talks to the agent socket; every listing has
//! `-o json` for scripts and an aligned table for people.

mod table;

use anyhow::Result;
use catena_api::{Client, ClientError, Endpoint, ServiceStatus, Status};
use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use table::Table;

#[derive(Parser)]
#[command(
    name = "catena",
    version,
    about = "Inspect and operate the catena agent on this node"
)]
struct Cli {
    /// Agent API socket.
    #[arg(long, global = true, env = "CATENA_SOCKET", default_value = catena_api::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Output format.
    #[arg(short, long, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Agent, datapath and source health.
    Status,
    /// Pod endpoints managed on this node.
    #[command(subcommand)]
    Endpoint(EndpointCmd),
    /// Services as programmed into the datapath.
    #[command(subcommand)]
    Service(ServiceCmd),
}

#[derive(Subcommand)]
enum EndpointCmd {
    List,
    /// One endpoint, by id or container id (prefix).
    Get {
        id: String,
    },
}

#[derive(Subcommand)]
enum ServiceCmd {
    List,
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(&cli) {
        eprintln!("Error: {}", explain(&e, &cli.socket));
        std::process::exit(1);
    }
}

fn run(cli: &Cli) -> Result<()> {
    let client = Client::new(&cli.socket);
    match &cli.command {
        Command::Status => {
            let status: Status = client.get("/v1/status")?;
            match cli.output {
                Output::Json => print_json(&status),
                Output::Table => print_status(&status),
            }
        }
        Command::Endpoint(EndpointCmd::List) => {
            let eps: Vec<Endpoint> = client.get("/v1/endpoints")?;
            match cli.output {
                Output::Json => print_json(&eps),
                Output::Table => print_endpoints(&eps),
            }
        }
        Command::Endpoint(EndpointCmd::Get { id }) => {
            let eps: Vec<Endpoint> = client.get("/v1/endpoints")?;
            let matches: Vec<&Endpoint> = eps
                .iter()
                .filter(|e| e.id.to_string() == *id || e.spec.container_id.starts_with(id.as_str()))
                .collect();
            let ep = match matches.as_slice() {
                [one] => *one,
                [] => anyhow::bail!(
                    "no endpoint with id or container id {id:?} (see `catena endpoint list`)"
                ),
                _ => anyhow::bail!(
                    "{id:?} matches {} endpoints; give more of the container id",
                    matches.len()
                ),
            };
            match cli.output {
                Output::Json => print_json(ep),
                Output::Table => print_endpoints(std::slice::from_ref(ep)),
            }
        }
        Command::Service(ServiceCmd::List) => {
            let svcs: Vec<ServiceStatus> = client.get("/v1/services")?;
            match cli.output {
                Output::Json => print_json(&svcs),
                Output::Table => print_services(&svcs),
            }
        }
    }
    Ok(())
}

fn print_json<T: serde::Serialize>(value: &T) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).expect("API types serialize")
    );
}

fn print_status(s: &Status) {
    let ready = if s.ready { "Ready" } else { "NotReady" };
    println!("Agent:       {ready} (version {})", s.version);
    let synced = if s.source.synced { "synced" } else { "syncing" };
    println!("Source:      {} ({synced})", s.source.kind);
    for e in &s.source.errors {
        println!("  ! {e}");
    }
    println!("Datapath:    {}", s.datapath.bpffs_dir);
    for (name, id) in &s.datapath.programs {
        println!("  program    {name:<16} id {id}");
    }
    println!("Endpoints:   {}", s.endpoints);
    println!("Services:    {} frontends", s.services);
    if !s.datapath.counters.is_empty() {
        println!("Counters:");
        for (name, value) in &s.datapath.counters {
            println!("  {name:<18} {}", table::human_count(*value));
        }
    }
}

fn print_endpoints(eps: &[Endpoint]) {
    let mut t = Table::new([
        "ID",
        "POD",
        "IPS",
        "INTERFACE",
        "IDENTITY",
        "ATTACH",
        "CONTAINER",
    ]);
    for e in eps {
        let pod = if e.spec.pod.name.is_empty() {
            "-".to_string()
        } else {
            format!("{}/{}", e.spec.pod.namespace, e.spec.pod.name)
        };
        t.row([
            e.id.to_string(),
            pod,
            e.spec.ips.join(","),
            format!(
                "{}({}) <- {}",
                e.spec.host_ifname, e.spec.host_ifindex, e.spec.ifname
            ),
            e.identity.to_string(),
            e.attach_mode.clone(),
            e.spec.container_id.chars().take(12).collect(),
        ]);
    }
    t.print();
}

fn print_services(svcs: &[ServiceStatus]) {
    let mut t = Table::new(["SERVICE", "FRONTEND", "BACKENDS", "REVNAT"]);
    for s in svcs {
        let backends = if s.backends.is_empty() {
            "<none: rejects>".to_string()
        } else {
            s.backends.join(",")
        };
        t.row([
            s.name.clone(),
            s.frontend.clone(),
            backends,
            s.rev_nat_index.to_string(),
        ]);
    }
    t.print();
}

/// Turns "connection refused" into what the operator should do.
fn explain(e: &anyhow::Error, socket: &std::path::Path) -> String {
    match e.downcast_ref::<ClientError>() {
        Some(ClientError::Unreachable { source, .. }) => format!(
            "the catena agent is not running or not reachable at {} ({source}).\n       Start it (catena-agent) or pass --socket to point at its socket.",
            socket.display()
        ),
        _ => format!("{e:#}"),
    }
}
