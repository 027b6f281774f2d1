//! Keeping the agent's resident memory close to its live data.
//!
//! Measured on the source-sync benchmark (10k Services, 100k endpoints, 5k
//! Pods, 1k CNPs; heaptrack for live bytes, VmRSS for resident):
//! - live heap after sync was 162 MiB with k8s-openapi objects in the
//!   cluster state, 62 MiB with the compact EndpointSlices and Pods of
//!   `sources::compact`;
//! - resident size then stayed ~60 MiB above live data: the initial list
//!   deserializes pages of full objects, and the compact objects built
//!   meanwhile end up scattered between the pages' freed chunks, in one glibc
//!   arena per thread that allocated. Smaller list pages (`sources::kube`)
//!   and at most [`MALLOC_ARENAS`] arenas brought it to ~93 MiB (106 MiB with
//!   glibc's default arenas);
//! - mimalloc instead of glibc was worse (136 MiB after sync and changes,
//!   glibc 122 MiB at the time), and a fixed mmap threshold changed nothing
//!   measurable, so neither is used.
//!
//! The initial sync's freed memory is returned with [`release_free_heap`].

/// Arenas glibc may create (its default allows 8 per core). Few threads
/// allocate at once in the agent (two runtime workers), so contention stays
/// low, and every arena keeps its own freed pages.
#[cfg(target_env = "gnu")]
pub const MALLOC_ARENAS: libc::c_int = 2;

/// Sets the allocator up for the agent. Call first thing in `main`,
/// before any thread starts.
pub fn tune_allocator() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only changes the allocator's parameters.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, MALLOC_ARENAS);
    }
}

/// Returns free heap pages of every malloc arena to the kernel. Costs a walk
/// of the heap (milliseconds): for after a burst of work, not per change.
pub fn release_free_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only touches the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The process's resident set size, from `/proc/self/statm`.
pub fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page).ok()?)
}
