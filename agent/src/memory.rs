//! Handing freed heap back to the kernel.
//!
//! The initial sync deserializes every object of a large cluster (list pages
//! of megabytes, transient copies in the compilers) and frees most of it
//! again. glibc's allocator keeps such freed memory inside its arenas, so
//! without a trim the agent's resident size stays at the sync's peak for its
//! whole life, even though live data is a fraction of it.

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
