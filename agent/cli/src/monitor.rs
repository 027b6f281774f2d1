//! `catena monitor`: drops and policy verdicts streamed live from the agent.

use crate::Output;
use anyhow::{bail, Result};
use catena_api::{Client, MonitorEvent, StreamItem};
use clap::{Args, ValueEnum};
use std::time::{Duration, Instant};

#[derive(Args)]
pub struct MonitorArgs {
    /// Only events of this endpoint id.
    #[arg(long)]
    endpoint: Option<u32>,
    /// Only events where this identity is the source or the destination.
    #[arg(long)]
    identity: Option<u32>,
    /// Only events with this reason (e.g. policy_denied, spoofed_source).
    #[arg(long)]
    reason: Option<String>,
    /// Only drops or only policy verdicts.
    #[arg(long = "type", value_enum)]
    kind: Option<EventType>,
    /// Stop after this long (e.g. 30s); default: until interrupted.
    #[arg(long, value_parser = parse_duration)]
    duration: Option<Duration>,
    /// Stop after this many events.
    #[arg(long)]
    count: Option<usize>,
}

#[derive(Clone, Copy, ValueEnum)]
enum EventType {
    Drop,
    Verdict,
}

impl MonitorArgs {
    fn query(&self) -> String {
        let mut q = Vec::new();
        if let Some(e) = self.endpoint {
            q.push(format!("endpoint={e}"));
        }
        if let Some(i) = self.identity {
            q.push(format!("identity={i}"));
        }
        if let Some(r) = &self.reason {
            q.push(format!("reason={}", encode(r)));
        }
        if let Some(k) = self.kind {
            q.push(
                match k {
                    EventType::Drop => "type=drop",
                    EventType::Verdict => "type=verdict",
                }
                .to_string(),
            );
        }
        if q.is_empty() {
            "/v1/monitor".into()
        } else {
            format!("/v1/monitor?{}", q.join("&"))
        }
    }
}

/// `500ms`, `30s`, `5m`, `1h`, or plain seconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 30s"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "" | "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3600)),
        _ => Err(format!("unknown unit {unit:?} in {s:?} (ms, s, m, h)")),
    }
}

/// Percent-encodes a query value (reasons are snake_case; be safe anyway).
fn encode(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

pub fn run(client: &Client, output: Output, args: &MonitorArgs) -> Result<()> {
    let mut stream = client.stream(&args.query())?;
    let deadline = args.duration.map(|d| Instant::now() + d);
    if output == Output::Table {
        eprintln!("Listening for datapath events (Ctrl-C to stop)...");
    }
    let mut seen = 0;
    loop {
        if args.count.is_some_and(|c| seen >= c) {
            return Ok(());
        }
        let wait = match deadline {
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Ok(());
                }
                left.min(Duration::from_secs(1))
            }
            None => Duration::from_secs(1),
        };
        match stream.next_line(wait)? {
            StreamItem::Line(line) => {
                if line.trim().is_empty() {
                    continue;
                }
                seen += 1;
                match output {
                    Output::Json => println!("{line}"),
                    Output::Table => println!("{}", describe(&line)),
                }
            }
            StreamItem::Idle => {}
            StreamItem::End => bail!("the agent closed the event stream (restarting?)"),
        }
    }
}

/// One event per line, `cilium monitor` style.
fn describe(line: &str) -> String {
    if let Ok(lost) = serde_json::from_str::<serde_json::Value>(line) {
        if let Some(n) = lost.get("lost") {
            return format!("!! {n} events lost (this monitor was too slow)");
        }
    }
    match serde_json::from_str::<MonitorEvent>(line) {
        Ok(e) => {
            let what = if e.kind == "drop" {
                format!("xx drop ({})", e.reason)
            } else if e.allowed {
                format!("-> policy-verdict allowed ({})", e.reason)
            } else {
                format!("xx policy-verdict denied ({})", e.reason)
            };
            format!(
                "{} {what} {} endpoint {} identity {}->{}: {} {} -> {}{}",
                e.time,
                e.direction,
                e.endpoint_id,
                e.src_identity,
                e.dst_identity,
                e.proto,
                e.src,
                e.dst,
                match (&e.policy, e.rule_ref) {
                    (Some(p), _) => format!(" by {p}"),
                    (None, 0) => String::new(),
                    (None, r) => format!(" rule {r}"),
                }
            )
        }
        Err(_) => line.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_queries() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("2x").is_err());
        assert!(parse_duration("s").is_err());
        assert_eq!(encode("policy_denied"), "policy_denied");
        assert_eq!(encode("a b&c"), "a%20b%26c");
        let line = r#"{"time":"t","kind":"drop","reason":"policy_denied","allowed":false,"direction":"ingress","ifindex":3,"endpointId":2,"srcIdentity":256,"dstIdentity":257,"src":"10.0.0.1:5","dst":"10.0.0.2:80","proto":"TCP","ruleRef":0}"#;
        assert_eq!(
            describe(line),
            "t xx drop (policy_denied) ingress endpoint 2 identity 256->257: TCP 10.0.0.1:5 -> 10.0.0.2:80"
        );
        assert!(describe(r#"{"lost":3}"#).contains("3 events lost"));
    }
}
