//! Gives memory the daemon freed back to the kernel. The daemon allocates
//! with jemalloc (its binary sets it as the global allocator: each worker
//! thread has its own cache in front of the arena, so workers do not wait on
//! each other's allocations). jemalloc keeps freed pages for reuse and hands them
//! back over about ten seconds, but only while the daemon keeps allocating:
//! after a burst (a fast transfer fills the tunnel's flow-control windows,
//! megabytes per stream) an idle daemon would keep them. The daemon is
//! meant to be small on every node, so every few seconds it asks jemalloc to
//! release what is free now (a purge of every arena, which costs
//! microseconds when there is nothing to release).

use std::time::Duration;

/// How often freed memory is handed back.
const INTERVAL: Duration = Duration::from_secs(5);

/// jemalloc's control that purges every arena: `arena.<i>.purge` with `i`
/// `MALLCTL_ARENAS_ALL` (4096), which stands for all of them.
const PURGE_ALL_ARENAS: &std::ffi::CStr = c"arena.4096.purge";

/// Releases freed memory now: every jemalloc arena's unused dirty pages go
/// back to the kernel.
pub fn release() {
    // SAFETY: the purge control reads and writes nothing: the name is a
    // NUL-terminated string and every other pointer is null.
    let failed = unsafe {
        tikv_jemalloc_sys::mallctl(
            PURGE_ALL_ARENAS.as_ptr(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
        )
    };
    if failed != 0 {
        tracing::debug!(errno = failed, "jemalloc did not purge its arenas");
    }
}

/// Releases freed memory every few seconds, until the task is dropped.
pub async fn run() {
    let mut tick = tokio::time::interval(INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        release();
    }
}
