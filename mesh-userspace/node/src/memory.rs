//! Gives memory the daemon freed back to the kernel. The daemon allocates
//! with jemalloc (its binary sets it as the global allocator: each worker
//! thread has its own cache in front of the arena, so workers do not wait on
//! each other's allocations). jemalloc keeps freed pages for reuse and hands them
//! back over about ten seconds, but only while the daemon keeps allocating:
//! after a burst (a fast transfer fills the tunnel's flow-control windows,
//! megabytes per stream) an idle daemon would keep them. The daemon is
//! meant to be small on every node, so every few seconds each thread that
//! carries connections hands its cached blocks back to the arena and the
//! arena's free pages go back to the kernel (microseconds when there is
//! nothing to release).
//!
//! A thread's cache is what makes jemalloc fast, and also what it holds on
//! to: a refill takes a batch of blocks of the size asked for, and freed
//! blocks stay cached until the thread allocates enough to collect them. An
//! idle worker, or the main thread once workers carry the connections,
//! would keep its batches for good (0.4-0.6 MB over a daemon's three
//! threads in `bench tunnel`).

use std::{ffi::CStr, time::Duration};

/// How often freed memory is handed back.
const INTERVAL: Duration = Duration::from_secs(5);

/// jemalloc's control that purges every arena: `arena.<i>.purge` with `i`
/// `MALLCTL_ARENAS_ALL` (4096), which stands for all of them.
const PURGE_ALL_ARENAS: &CStr = c"arena.4096.purge";

/// jemalloc's control that returns the calling thread's cached blocks to
/// the arena.
const FLUSH_THREAD_CACHE: &CStr = c"thread.tcache.flush";

/// jemalloc's control that reads or sets whether the calling thread has a
/// cache (a `bool`).
const THREAD_CACHE_ENABLED: &CStr = c"thread.tcache.enabled";

/// A jemalloc control that failed: its name and the error number it gave.
#[derive(Debug, thiserror::Error)]
#[error("jemalloc's {name:?} control failed: {}", std::io::Error::from_raw_os_error(*.errno))]
pub struct ControlError {
    name: &'static CStr,
    errno: i32,
}

/// Releases freed memory now: this thread's cached blocks go back to the
/// arena, and every arena's unused pages back to the kernel.
pub fn release() {
    let flushed = match control(FLUSH_THREAD_CACHE, None) {
        // jemalloc's answer for a thread with no cache (`no_thread_cache`):
        // nothing to hand back.
        Err(ControlError {
            errno: libc::EFAULT,
            ..
        }) => Ok(()),
        flushed => flushed,
    };
    for result in [flushed, control(PURGE_ALL_ARENAS, None)] {
        if let Err(err) = result {
            tracing::debug!(%err, "releasing memory");
        }
    }
}

/// Turns this thread's cache off, for a thread that allocates little: the
/// daemon's main thread once worker threads carry the connections. Its
/// blocks go back to the arena.
pub fn no_thread_cache() {
    if let Err(err) = control(THREAD_CACHE_ENABLED, Some(false)) {
        tracing::debug!(%err, "the main thread keeps its allocation cache");
    }
}

/// Releases freed memory every few seconds, on this thread and on every
/// worker thread, until the tasks are dropped (the workers' with the
/// process).
pub async fn run() {
    lacewing_sys::workers::spawn_on_each(release_every_interval);
    release_every_interval().await;
}

async fn release_every_interval() {
    let mut tick = tokio::time::interval(INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        release();
    }
}

/// Runs a jemalloc control that takes no value, or sets a `bool` one.
fn control(name: &'static CStr, set: Option<bool>) -> Result<(), ControlError> {
    let mut value = set.unwrap_or_default();
    let (new, size) = match set {
        Some(_) => ((&raw mut value).cast(), std::mem::size_of::<bool>()),
        None => (std::ptr::null_mut(), 0),
    };
    // SAFETY: the name is a NUL-terminated string; nothing is read back
    // (null old value and length); a new value, when given, is a valid
    // `bool` of the size passed, which is what these controls take.
    let errno = unsafe {
        tikv_jemalloc_sys::mallctl(
            name.as_ptr(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            new,
            size,
        )
    };
    match errno {
        0 => Ok(()),
        errno => Err(ControlError { name, errno }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether this thread has a jemalloc cache.
    fn thread_cache_enabled() -> bool {
        let mut enabled = false;
        let mut size = std::mem::size_of::<bool>();
        // SAFETY: reads a `bool` into a valid one of the size given.
        let errno = unsafe {
            tikv_jemalloc_sys::mallctl(
                THREAD_CACHE_ENABLED.as_ptr(),
                (&raw mut enabled).cast(),
                &raw mut size,
                std::ptr::null_mut(),
                0,
            )
        };
        assert_eq!(errno, 0);
        enabled
    }

    // The controls' names are jemalloc's: each is taken, and turning the
    // cache off is what the thread then reads back (on a thread of its
    // own: the setting is per thread).
    #[test]
    fn the_controls_are_taken() {
        std::thread::spawn(|| {
            control(FLUSH_THREAD_CACHE, None).unwrap();
            control(PURGE_ALL_ARENAS, None).unwrap();
            assert!(thread_cache_enabled());
            no_thread_cache();
            assert!(!thread_cache_enabled());
            // A thread without a cache has none to flush: jemalloc says so
            // with EFAULT, which `release` takes as nothing to do.
            let err = control(FLUSH_THREAD_CACHE, None).unwrap_err();
            assert_eq!(err.errno, libc::EFAULT);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn a_refused_control_says_which() {
        let err = control(c"thread.no.such.control", None).unwrap_err();
        assert_eq!(err.errno, libc::ENOENT);
        assert_eq!(
            err.to_string(),
            format!(
                "jemalloc's \"thread.no.such.control\" control failed: {}",
                std::io::Error::from_raw_os_error(libc::ENOENT)
            )
        );
    }
}
