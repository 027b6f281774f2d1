//! `catena monitor`: datapath drop and policy-verdict events, read from the
//! datapath's one event reader by one thread and fanned out to every
//! `GET /v1/monitor` stream (and counted for metrics).

use catena_api::MonitorEvent;
use catena_datapath::events::{DatapathEvent, EventKind, EventReader};
use serde::Deserialize;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::sync::broadcast;

/// Events buffered per slow subscriber before it starts missing some (it is
/// told how many it missed).
const SUBSCRIBER_BUFFER: usize = 4096;
/// How long one poll of the reader waits, which bounds how late shutdown is
/// noticed.
const POLL: Duration = Duration::from_millis(200);

/// rule_ref -> the policy rule it stands for, as of the last policy
/// compile. Kept apart from the agent's state lock: the event thread looks
/// names up for every event and must never wait for a reconcile.
static RULE_NAMES: RwLock<Option<Arc<HashMap<u32, String>>>> = RwLock::new(None);

/// Publishes the names events are labelled with (after each policy compile).
pub fn publish_rule_names(names: HashMap<u32, String>) {
    *RULE_NAMES.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(names));
}

fn rule_name(rule_ref: u32) -> Option<String> {
    if rule_ref == 0 {
        return None;
    }
    let names = RULE_NAMES.read().unwrap_or_else(|p| p.into_inner());
    names.as_ref()?.get(&rule_ref).cloned()
}

/// Whether events can be streamed.
pub enum Events {
    Available(broadcast::Sender<Arc<MonitorEvent>>),
    /// Why not (shown by `catena status` and in the 503 answer).
    Unavailable(String),
}

/// Starts the reader thread on `reader`, or records why there is none.
pub fn start(reader: anyhow::Result<EventReader>, stop: Arc<AtomicBool>) -> Events {
    let mut reader = match reader {
        Ok(r) => r,
        Err(e) => return Events::Unavailable(format!("events not available: {e:#}")),
    };
    let (tx, _) = broadcast::channel(SUBSCRIBER_BUFFER);
    let sender = tx.clone();
    let spawned = std::thread::Builder::new()
        .name("catena-events".into())
        .spawn(move || {
            let mut failing = false;
            while !stop.load(Ordering::Relaxed) {
                match reader.poll(POLL) {
                    Ok(events) => {
                        failing = false;
                        for ev in events {
                            crate::metrics::global().record_event(&ev);
                            // No subscriber is not an error: events are
                            // still counted above.
                            let _ = sender.send(Arc::new(convert(&ev)));
                        }
                    }
                    Err(e) => {
                        if !failing {
                            tracing::error!(error = %format!("{e:#}"), "reading datapath events failed; retrying");
                        }
                        failing = true;
                        std::thread::sleep(POLL);
                    }
                }
            }
        });
    match spawned {
        Ok(_) => Events::Available(tx),
        Err(e) => Events::Unavailable(format!("events not available: cannot start reader: {e}")),
    }
}

pub fn convert(ev: &DatapathEvent) -> MonitorEvent {
    MonitorEvent {
        time: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
        kind: kind_name(ev.kind).into(),
        reason: ev.reason.clone(),
        allowed: ev.allowed,
        direction: direction_name(ev.direction).into(),
        ifindex: ev.ifindex,
        endpoint_id: ev.endpoint_id,
        src_identity: ev.src_identity,
        dst_identity: ev.dst_identity,
        // `10.0.0.1:80`, `[fd00::1]:80`.
        src: std::net::SocketAddr::new(ev.saddr, ev.sport).to_string(),
        dst: std::net::SocketAddr::new(ev.daddr, ev.dport).to_string(),
        proto: super::dump::proto(ev.proto),
        rule_ref: ev.rule_ref,
        policy: rule_name(ev.rule_ref),
    }
}

pub fn kind_name(k: EventKind) -> &'static str {
    match k {
        EventKind::Drop => "drop",
        EventKind::PolicyVerdict => "policy-verdict",
    }
}

pub fn direction_name(d: catena_datapath::policy::Direction) -> &'static str {
    match d {
        catena_datapath::policy::Direction::Ingress => "ingress",
        catena_datapath::policy::Direction::Egress => "egress",
    }
}

/// `GET /v1/monitor` query: every given filter must match.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct Filter {
    pub endpoint: Option<u32>,
    /// Matches the source or the destination identity.
    pub identity: Option<u32>,
    pub reason: Option<String>,
    /// `drop` or `verdict`.
    #[serde(rename = "type")]
    pub kind: Option<String>,
}

impl Filter {
    pub fn validate(&self) -> Result<(), String> {
        match self.kind.as_deref() {
            None | Some("drop") | Some("verdict") => Ok(()),
            Some(other) => Err(format!("type must be drop or verdict, not {other:?}")),
        }
    }

    pub fn matches(&self, ev: &MonitorEvent) -> bool {
        self.endpoint.is_none_or(|id| ev.endpoint_id == id)
            && self
                .identity
                .is_none_or(|id| ev.src_identity == id || ev.dst_identity == id)
            && self.reason.as_ref().is_none_or(|r| ev.reason == *r)
            && match self.kind.as_deref() {
                Some("drop") => ev.kind == "drop",
                Some("verdict") => ev.kind == "policy-verdict",
                _ => true,
            }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use catena_datapath::policy::Direction;
    use std::net::Ipv4Addr;

    fn event(kind: EventKind, reason: &str, ep: u32, src_id: u32) -> MonitorEvent {
        convert(&DatapathEvent {
            kind,
            reason: reason.into(),
            allowed: false,
            direction: Direction::Ingress,
            ifindex: 7,
            endpoint_id: ep,
            src_identity: src_id,
            dst_identity: 300,
            saddr: Ipv4Addr::new(10, 0, 0, 1).into(),
            daddr: Ipv4Addr::new(10, 0, 0, 2).into(),
            sport: 1234,
            dport: 80,
            proto: 6,
            rule_ref: 0,
        })
    }

    #[test]
    fn filters_combine() {
        let drop = event(EventKind::Drop, "policy_denied", 3, 256);
        let verdict = event(EventKind::PolicyVerdict, "policy_allowed", 4, 257);
        assert_eq!(
            (drop.src.as_str(), drop.proto.as_str()),
            ("10.0.0.1:1234", "TCP")
        );
        let f = |q: &str| -> Filter { serde_json::from_str(q).unwrap() };
        assert!(f("{}").matches(&drop) && f("{}").matches(&verdict));
        assert!(f(r#"{"type":"drop"}"#).matches(&drop));
        assert!(!f(r#"{"type":"drop"}"#).matches(&verdict));
        assert!(f(r#"{"type":"verdict"}"#).matches(&verdict));
        assert!(f(r#"{"endpoint":3,"reason":"policy_denied"}"#).matches(&drop));
        assert!(!f(r#"{"endpoint":3,"reason":"fragment"}"#).matches(&drop));
        // identity matches either side
        assert!(f(r#"{"identity":300}"#).matches(&drop));
        assert!(!f(r#"{"identity":999}"#).matches(&drop));
        assert!(f(r#"{"type":"bogus"}"#).validate().is_err());
    }
}
