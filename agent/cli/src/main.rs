//! `catena`: the operator CLI. Talks to the agent socket; every listing has
//! `-o json` for scripts and an aligned table for people.

mod bpf;
mod ct;
mod monitor;
mod policy;
mod status;
mod table;

use anyhow::Result;
use catena_api::{Client, ClientError, Endpoint, ServiceStatus};
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
pub(crate) enum Output {
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
    /// Network policy as programmed for an endpoint.
    #[command(subcommand)]
    Policy(policy::PolicyCmd),
    /// Security identities (reserved, pods, CIDRs).
    #[command(subcommand)]
    Identity(policy::IdentityCmd),
    /// Connection tracking entries.
    #[command(subcommand)]
    Ct(ct::CtCmd),
    /// Raw dumps of the pinned eBPF maps.
    #[command(subcommand)]
    Bpf(bpf::BpfCmd),
    /// Stream drops and policy verdicts live.
    Monitor(monitor::MonitorArgs),
    /// Liveness (or readiness with --ready) for probes: exits non-zero if not.
    Health {
        #[arg(long)]
        ready: bool,
    },
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
        Command::Status => status::run(&client, cli.output)?,
        Command::Ct(cmd) => ct::run(&client, cli.output, cmd)?,
        Command::Policy(cmd) => policy::run_policy(&client, cli.output, cmd)?,
        Command::Identity(cmd) => policy::run_identity(&client, cli.output, cmd)?,
        Command::Bpf(cmd) => bpf::run(&client, cli.output, cmd)?,
        Command::Monitor(args) => monitor::run(&client, cli.output, args)?,
        Command::Health { ready } => status::health(&client, cli.output, *ready)?,
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

pub(crate) fn print_json<T: serde::Serialize>(value: &T) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).expect("API types serialize")
    );
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
    let mut t = Table::new([
        "SERVICE",
        "KIND",
        "FRONTEND",
        "ALGORITHM",
        "BACKENDS",
        "REVNAT",
    ]);
    let or_dash = |s: &str| {
        if s.is_empty() {
            "-".to_string()
        } else {
            s.to_string()
        }
    };
    for s in svcs {
        let list = |b: &[String]| {
            if b.is_empty() {
                "<none: rejects>".to_string()
            } else {
                b.join(",")
            }
        };
        let backends = match &s.external_backends {
            // Two scopes: in-cluster clients, then clients outside the node.
            Some(ext) => format!("{} (external: {})", list(&s.backends), list(ext)),
            None => list(&s.backends),
        };
        t.row([
            s.name.clone(),
            or_dash(&s.kind),
            s.frontend.clone(),
            or_dash(&s.algorithm),
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
