//! `catena ct list|flush`: the conntrack tables (`CT4` and `CT6`) as the
//! datapath holds them.

use crate::table::{human_bytes, human_count, human_secs, Table};
use crate::{print_json, Output};
use anyhow::Result;
use catena_api::{Client, CtEntry, CtFlushResult};
use clap::Subcommand;

#[derive(Subcommand)]
pub enum CtCmd {
    /// Conntrack entries: tuple, kind, backend, reverse NAT, age, traffic.
    List {
        /// Only entries whose source or destination is this: an IP (IPv4 or
        /// IPv6), `ip:port` / `[ipv6]:port`, or a port as `:port`.
        #[arg(long)]
        address: Option<String>,
    },
    /// Delete every conntrack entry. Established connections through a
    /// Service may pick another backend (and reset) on their next packet.
    Flush,
}

pub fn run(client: &Client, output: Output, cmd: &CtCmd) -> Result<()> {
    match cmd {
        CtCmd::List { address } => {
            let mut entries: Vec<CtEntry> = client.get("/v1/ct")?;
            if let Some(a) = address {
                entries.retain(|e| matches_addr(&e.src, a) || matches_addr(&e.dst, a));
            }
            match output {
                Output::Json => print_json(&entries),
                Output::Table => print_entries(&entries),
            }
        }
        CtCmd::Flush => {
            let r: CtFlushResult = client.post("/v1/ct/flush", &serde_json::json!({}))?;
            match output {
                Output::Json => print_json(&r),
                Output::Table => println!(
                    "Flushed {} conntrack entries ({} IPv6)",
                    r.removed, r.removed_ipv6
                ),
            }
        }
    }
    Ok(())
}

/// Whether the tuple (`ip:port` or `[ipv6]:port`) matches `wanted`: an
/// address (IPv6 with or without brackets), a full socket address, or a
/// port as `:port`.
fn matches_addr(tuple: &str, wanted: &str) -> bool {
    let Ok(tuple) = tuple.parse::<std::net::SocketAddr>() else {
        return false;
    };
    if let Some(port) = wanted.strip_prefix(':') {
        return port.parse() == Ok(tuple.port());
    }
    if let Ok(sock) = wanted.parse::<std::net::SocketAddr>() {
        return sock == tuple;
    }
    let bare = wanted.trim_start_matches('[').trim_end_matches(']');
    bare.parse::<std::net::IpAddr>() == Ok(tuple.ip())
}

fn print_entries(entries: &[CtEntry]) {
    let mut t = Table::new([
        "KIND",
        "PROTO",
        "SOURCE",
        "DESTINATION",
        "BACKEND",
        "REV-NAT",
        "FLAGS",
        "AGE",
        "IDLE",
        "PACKETS",
        "BYTES",
    ]);
    for e in entries {
        t.row([
            e.kind.clone(),
            e.proto.clone(),
            e.src.clone(),
            e.dst.clone(),
            e.backend.clone().unwrap_or_else(|| "-".into()),
            e.rev_nat.clone().unwrap_or_else(|| "-".into()),
            if e.flags.is_empty() {
                "-".into()
            } else {
                e.flags.join(",")
            },
            human_secs(e.age_secs),
            human_secs(e.idle_secs),
            human_count(e.packets),
            human_bytes(e.bytes),
        ]);
    }
    t.print();
    println!("{} entries", entries.len());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_filter() {
        assert!(matches_addr("10.0.0.1:80", "10.0.0.1"));
        assert!(!matches_addr("10.0.0.10:80", "10.0.0.1"));
        assert!(matches_addr("10.0.0.1:80", ":80"));
        assert!(!matches_addr("10.0.0.1:8080", ":80"));
        assert!(matches_addr("10.0.0.1:80", "10.0.0.1:80"));
        assert!(!matches_addr("10.0.0.1:80", "10.0.0.1:81"));
        // IPv6 tuples: the address with or without brackets, the socket
        // address, the port.
        assert!(matches_addr("[fd00:96::40]:80", "fd00:96::40"));
        assert!(matches_addr("[fd00:96::40]:80", "[fd00:96::40]"));
        assert!(matches_addr("[fd00:96::40]:80", "[fd00:96::40]:80"));
        assert!(matches_addr("[fd00:96::40]:80", ":80"));
        assert!(!matches_addr("[fd00:96::40]:80", "fd00:96::4"));
        assert!(!matches_addr("[fd00:96::40]:80", "10.0.0.1"));
    }
}
