//! Drop and policy-verdict events into the `EVENTS` ring buffer, behind a
//! per-CPU token bucket: a flood of dropped packets costs a counter increment
//! once the bucket is empty, never unbounded ring-buffer traffic. Every drop
//! is counted in `METRICS` whether or not its event is emitted.

use aya_ebpf::programs::TcContext;
use catena_common::{
    endpoint::EndpointInfo,
    events::{Event, Reason, EVENTS_BURST, EVENTS_PER_SEC, EVENT_DROP, EVENT_POLICY_VERDICT},
    metrics::Counter,
    policy::DIR_EGRESS,
};

use crate::{
    ct,
    maps::{EVENTS, EVENTS_RATE},
    metrics::count,
    parse::Flow4,
    VERDICT_DROP,
};

const NS_PER_TOKEN: u64 = 1_000_000_000 / EVENTS_PER_SEC;

/// The interface the program runs on (the host veth).
#[inline(always)]
pub fn ifindex(ctx: &TcContext) -> u32 {
    // SAFETY: reading the program's own context.
    unsafe { (*ctx.skb.skb).ifindex }
}

/// An event about a packet of endpoint `ep` going `direction`; the local
/// side's identity is filled in, the remote's is 0 unless the caller knows it.
#[inline(always)]
pub fn base(direction: u8, ifindex: u32, ep: &EndpointInfo, flow: Option<&Flow4>) -> Event {
    let mut ev = Event {
        direction,
        ifindex,
        endpoint_id: ep.endpoint_id,
        ..Event::default()
    };
    if direction == DIR_EGRESS {
        ev.src_identity = ep.identity;
    } else {
        ev.dst_identity = ep.identity;
    }
    if let Some(f) = flow {
        ev.saddr = f.saddr;
        ev.daddr = f.daddr;
        ev.sport = f.sport;
        ev.dport = f.dport;
        ev.proto = f.proto;
    }
    ev
}

/// Takes a token from this CPU's bucket.
#[inline(always)]
fn take_token() -> bool {
    let Some(slot) = EVENTS_RATE.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: per-CPU slot from this run's lookup; programs do not preempt
    // each other on one CPU.
    let rate = unsafe { &mut *slot };
    let now = ct::now_ns();
    let refill = now.wrapping_sub(rate.last_ns) / NS_PER_TOKEN;
    if refill > 0 {
        rate.tokens = if refill >= EVENTS_BURST {
            EVENTS_BURST
        } else {
            (rate.tokens + refill).min(EVENTS_BURST)
        };
        rate.last_ns = now;
    }
    if rate.tokens == 0 {
        return false;
    }
    rate.tokens -= 1;
    true
}

#[inline(always)]
pub fn emit(ev: &Event) {
    if !take_token() || EVENTS.output::<Event>(ev, 0).is_err() {
        count(Counter::EventsLost);
    }
}

#[inline(always)]
fn drop_counter(reason: Reason) -> Counter {
    match reason {
        Reason::PolicyDenied => Counter::DropPolicyDenied,
        Reason::SpoofedSource => Counter::DropSpoofedSource,
        Reason::Fragment => Counter::DropFragment,
        Reason::NoBackend => Counter::DropNoBackend,
        Reason::CtFull => Counter::DropCtFull,
        Reason::UnknownEndpoint => Counter::DropUnknownEndpoint,
        Reason::UnsupportedL3 => Counter::DropUnsupportedL3,
        Reason::Invalid | Reason::PolicyAllowed => Counter::DropInvalid,
    }
}

/// Counts the drop, emits its event and returns the drop verdict.
#[inline(always)]
pub fn drop(mut ev: Event, reason: Reason) -> i32 {
    count(drop_counter(reason));
    ev.kind = EVENT_DROP;
    ev.reason = reason as u8;
    emit(&ev);
    VERDICT_DROP
}

/// A policy decision on a new connection.
#[inline(always)]
pub fn verdict(mut ev: Event, allowed: bool, rule_ref: u32) {
    ev.kind = EVENT_POLICY_VERDICT;
    ev.allowed = allowed as u8;
    ev.rule_ref = rule_ref;
    ev.reason = if allowed {
        Reason::PolicyAllowed
    } else {
        Reason::PolicyDenied
    } as u8;
    emit(&ev);
}
