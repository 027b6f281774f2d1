//! `catena policy get` and `catena identity list`, and the policy lines of
//! `catena status`.

use crate::table::Table;
use crate::{print_json, Output};
use anyhow::Result;
use catena_api::{Client, Endpoint, EndpointPolicyStatus, IdentityInfo, PolicyStatus};
use clap::Subcommand;

#[derive(Subcommand)]
pub enum PolicyCmd {
    /// The effective allow/deny entries of one endpoint, by id or container id (prefix).
    Get { endpoint: String },
}

#[derive(Subcommand)]
pub enum IdentityCmd {
    List,
}

pub fn run_policy(client: &Client, output: Output, cmd: &PolicyCmd) -> Result<()> {
    let PolicyCmd::Get { endpoint } = cmd;
    let eps: Vec<Endpoint> = client.get("/v1/endpoints")?;
    let ep = find_endpoint(&eps, endpoint)?;
    let path = format!(
        "{}/policy",
        catena_api::endpoint_path(&ep.spec.container_id, &ep.spec.ifname)
    );
    let policy: EndpointPolicyStatus = client.get(&path)?;
    match output {
        Output::Json => print_json(&policy),
        Output::Table => print_policy(&policy),
    }
    Ok(())
}

pub fn run_identity(client: &Client, output: Output, cmd: &IdentityCmd) -> Result<()> {
    let IdentityCmd::List = cmd;
    let ids: Vec<IdentityInfo> = client.get("/v1/identities")?;
    match output {
        Output::Json => print_json(&ids),
        Output::Table => {
            let mut t = Table::new(["ID", "KIND", "LABELS", "ADDRESSES"]);
            for i in &ids {
                t.row([
                    i.id.to_string(),
                    i.kind.clone(),
                    i.labels.join(","),
                    if i.addresses.is_empty() {
                        "-".to_string()
                    } else {
                        i.addresses.join(",")
                    },
                ]);
            }
            t.print();
        }
    }
    Ok(())
}

/// The `Policies:` block of `catena status`: every policy, and for those not
/// enforced exactly as written, why.
pub fn print_policy_status(policies: &[PolicyStatus]) {
    println!("Policies:    {}", policies.len());
    for p in policies {
        println!("  {:<8} {} {}", p.state, p.kind, p.name);
        for m in &p.messages {
            println!("    ! {m}");
        }
    }
}

/// One endpoint by id or container id prefix; ambiguity is an error.
fn find_endpoint<'a>(eps: &'a [Endpoint], id: &str) -> Result<&'a Endpoint> {
    let matches: Vec<&Endpoint> = eps
        .iter()
        .filter(|e| e.id.to_string() == id || e.spec.container_id.starts_with(id))
        .collect();
    match matches.as_slice() {
        [one] => Ok(*one),
        [] => {
            anyhow::bail!("no endpoint with id or container id {id:?} (see `catena endpoint list`)")
        }
        _ => anyhow::bail!(
            "{id:?} matches {} endpoints; give more of the container id",
            matches.len()
        ),
    }
}

fn print_policy(p: &EndpointPolicyStatus) {
    let enforced = |on: bool| {
        if on {
            "enforced"
        } else {
            "allow all (no policy selects it)"
        }
    };
    println!("Endpoint:  {} (identity {})", p.endpoint_id, p.identity);
    println!("Ingress:   {}", enforced(p.ingress_enforced));
    println!("Egress:    {}", enforced(p.egress_enforced));
    if p.entries.is_empty() {
        return;
    }
    let mut t = Table::new([
        "DIRECTION",
        "VERDICT",
        "IDENTITY",
        "LABELS",
        "PROTO",
        "PORTS",
        "SOURCE",
    ]);
    for e in &p.entries {
        t.row([
            e.direction.clone(),
            e.verdict.clone(),
            e.remote_identity.to_string(),
            e.remote_labels.join(","),
            e.protocol.clone(),
            e.ports.clone(),
            e.source.clone(),
        ]);
    }
    t.print();
}
