//! Per-CPU packet counters. Per-CPU slots need no atomics: a program runs to
//! completion on one CPU without preemption.

use catena_common::metrics::Counter;

use crate::maps::METRICS;

#[inline(always)]
pub fn count(counter: Counter) {
    if let Some(slot) = METRICS.get_ptr_mut(counter as u32) {
        // SAFETY: the pointer comes from a successful per-CPU array lookup and is
        // valid for the duration of the program run on this CPU.
        unsafe { *slot += 1 };
    }
}
