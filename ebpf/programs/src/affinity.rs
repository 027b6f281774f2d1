//! ClientIP session affinity, once for every map that keeps it: the tc
//! paths key it by client address (`LB4_AFFINITY`, `LB6_AFFINITY`), the
//! socket-level load balancer by network namespace (`LB_SOCK_AFFINITY`).

use aya_ebpf::maps::LruHashMap;
use catena_common::lb::Affinity4Value;

const NS_PER_SEC: u64 = 1_000_000_000;

/// The client's affinity backend under `key` while it was last used at most
/// `timeout_s` seconds ago and `backend` still finds it; otherwise `pick()`,
/// which then becomes the client's affinity backend.
#[inline(always)]
pub fn sticky<K, B>(
    map: &LruHashMap<K, Affinity4Value>,
    key: &K,
    timeout_s: u32,
    now: u64,
    backend: impl Fn(u32) -> Option<B>,
    pick: impl FnOnce() -> Option<(u32, B)>,
) -> Option<(u32, B)> {
    let timeout_ns = timeout_s as u64 * NS_PER_SEC;
    if let Some(entry) = map.get_ptr_mut(key) {
        // SAFETY: a live value pointer from this run's lookup.
        let e = unsafe { &mut *entry };
        if now.wrapping_sub(e.last_used_ns) <= timeout_ns {
            if let Some(b) = backend(e.backend_id) {
                e.last_used_ns = now;
                return Some((e.backend_id, b));
            }
        }
    }
    let (id, b) = pick()?;
    let value = Affinity4Value {
        last_used_ns: now,
        backend_id: id,
        pad: 0,
    };
    // A failed insert only loses stickiness for this client; the flow itself
    // is fine, so it is not an error.
    let _ = map.insert(key, value, 0);
    Some((id, b))
}
