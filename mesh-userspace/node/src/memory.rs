//! Gives memory the daemon freed back to the kernel. glibc's allocator keeps
//! freed pages for reuse: after a burst (a fast transfer fills the tunnel's
//! flow-control windows, megabytes per stream) they would stay resident for
//! good. The daemon is meant to be small on every node, so every few
//! seconds it asks the allocator to release what is free (`malloc_trim`,
//! which costs microseconds when there is nothing to release).

use std::time::Duration;

/// How often freed memory is handed back.
const INTERVAL: Duration = Duration::from_secs(5);

/// Releases freed memory now.
pub fn release() {
    lacewing_sys::os::release_free_memory();
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
