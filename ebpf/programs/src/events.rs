//! Drop and policy-verdict events into the `EVENTS` ring buffer, behind a
//! per-CPU token bucket: a flood of dropped packets costs a counter increment
//! once the bucket is empty, never unbounded ring-buffer traffic. Every drop
//! is counted in `METRICS` whether or not its event is emitted.

use aya_ebpf::programs::TcContext;
use catena_common::{
    endpoint::EndpointInfo,
    events::{
        Event, Event6, Reason, EVENTS_BURST, EVENTS_PER_SEC, EVENT_DROP, EVENT_POLICY_VERDICT,
    },
    metrics::Counter,
    policy::DIR_EGRESS,
};

use crate::{
    ct,
    maps::{EVENT6_SCRATCH, EVENTS, EVENTS_RATE},
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

/// An IPv6 packet's event under construction, in this CPU's
/// `EVENT6_SCRATCH` slot: the IPv6 service program's stack has no room for
/// the longer record. Null only if the slot cannot be had (never: a one-slot
/// per-CPU array); a drop is still counted then.
pub struct Event6Ref(*mut Event6);

impl Event6Ref {
    /// The remote end's identity (the destination's on egress).
    #[inline(always)]
    pub fn set_remote(&mut self, direction: u8, identity: u32) {
        // SAFETY: null or this CPU's scratch slot, used by one program run
        // at a time (programs do not preempt each other on one CPU).
        if let Some(ev) = unsafe { self.0.as_mut() } {
            if direction == DIR_EGRESS {
                ev.event.dst_identity = identity;
            } else {
                ev.event.src_identity = identity;
            }
        }
    }

    #[inline(always)]
    pub fn set_rule_ref(&mut self, rule_ref: u32) {
        // SAFETY: as in `set_remote`.
        if let Some(ev) = unsafe { self.0.as_mut() } {
            ev.event.rule_ref = rule_ref;
        }
    }
}

/// `base` for an IPv6 packet, with its tuple.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn base6(
    direction: u8,
    ifindex: u32,
    ep: &EndpointInfo,
    saddr: &[u32; 4],
    daddr: &[u32; 4],
    sport: u16,
    dport: u16,
    proto: u8,
) -> Event6Ref {
    let Some(slot) = EVENT6_SCRATCH.get_ptr_mut(0) else {
        return Event6Ref(core::ptr::null_mut());
    };
    // SAFETY: this CPU's scratch slot (see `Event6Ref`); every field is
    // written, the previous record's included.
    let ev = unsafe { &mut *slot };
    ev.event = base(direction, ifindex, ep, None);
    ev.event.ipv6 = 1;
    ev.event.sport = sport;
    ev.event.dport = dport;
    ev.event.proto = proto;
    ev.saddr6 = *saddr;
    ev.daddr6 = *daddr;
    Event6Ref(slot)
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
pub fn emit<T>(ev: &T) {
    if !take_token() || EVENTS.output::<T>(ev, 0).is_err() {
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

#[inline(always)]
fn mark_drop(ev: &mut Event, reason: Reason) {
    count(drop_counter(reason));
    ev.kind = EVENT_DROP;
    ev.reason = reason as u8;
}

#[inline(always)]
fn mark_verdict(ev: &mut Event, allowed: bool, rule_ref: u32) {
    ev.kind = EVENT_POLICY_VERDICT;
    ev.allowed = allowed as u8;
    ev.rule_ref = rule_ref;
    ev.reason = if allowed {
        Reason::PolicyAllowed
    } else {
        Reason::PolicyDenied
    } as u8;
}

/// Counts the drop, emits its event and returns the drop verdict.
#[inline(always)]
pub fn drop(mut ev: Event, reason: Reason) -> i32 {
    mark_drop(&mut ev, reason);
    emit(&ev);
    VERDICT_DROP
}

/// `drop` of an IPv6 packet.
#[inline(always)]
pub fn drop6(ev: &mut Event6Ref, reason: Reason) -> i32 {
    // SAFETY: as in `Event6Ref::set_remote`.
    match unsafe { ev.0.as_mut() } {
        Some(ev) => {
            mark_drop(&mut ev.event, reason);
            emit::<Event6>(ev);
        }
        None => count(drop_counter(reason)),
    }
    VERDICT_DROP
}

/// A policy decision on a new connection.
#[inline(always)]
pub fn verdict(mut ev: Event, allowed: bool, rule_ref: u32) {
    mark_verdict(&mut ev, allowed, rule_ref);
    emit(&ev);
}

/// `verdict` on an IPv6 connection (`ev` keeps the verdict's fields).
#[inline(always)]
pub fn verdict6(ev: &mut Event6Ref, allowed: bool, rule_ref: u32) {
    // SAFETY: as in `Event6Ref::set_remote`.
    if let Some(ev) = unsafe { ev.0.as_mut() } {
        mark_verdict(&mut ev.event, allowed, rule_ref);
        emit::<Event6>(ev);
    }
}
