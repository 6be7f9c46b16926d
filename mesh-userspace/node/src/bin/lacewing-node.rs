//! `lacewing-node`: the per-node daemon (one per node, a DaemonSet in a cluster).

use clap::Parser as _;
use lacewing_node::{self as node, config::NodeArgs};

/// jemalloc, as linkerd2-proxy and ztunnel use. glibc's allocator, held to
/// one arena for memory's sake, made the worker threads wait on its lock
/// (its per-thread cache holds only a few small blocks of each size); with
/// jemalloc each thread allocates and frees from its own cache, and only
/// refills it from the arena in batches.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's settings, read at its first allocation: one arena behind the
/// threads' caches (an arena per thread measured the same speed on two
/// workers and 0.8 MB more memory). `_RJEM_MALLOC_CONF` overrides it, for
/// example `narenas:4` on a node given many workers.
#[unsafe(export_name = "_rjem_malloc_conf")]
static MALLOC_CONF: Option<&std::ffi::c_char> = Some(
    // SAFETY: a pointer to the first byte of a static C string literal.
    unsafe { &*c"narenas:1".as_ptr() },
);

fn main() -> anyhow::Result<()> {
    // Profiling the daemon's code layout (`cargo xtask code-layout`).
    if std::env::var_os("LACEWING_CODE_PROFILE").is_some() {
        lacewing_sys::os::trace_own_code_pages()?;
    }
    let args = NodeArgs::parse();
    let log_level = lacewing_sys::telemetry::init(args.log_format);
    let config = args.validate()?;
    // Connections are carried by `--workers` threads, each with its own
    // runtime (see `lacewing_sys::workers`); with one, by this thread. The
    // rest (accepting, the controller, the kernel's maps) is short work
    // on this one thread.
    lacewing_sys::workers::install(config.workers)?;
    // This thread's allocations are then few (start-up, the controller's
    // updates): without a cache of its own it holds no blocks for them.
    if config.workers > 1 {
        node::memory::no_thread_cache();
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(node::run(config, log_level))?;
    Ok(())
}
