//! `lacewing-node`: the per-node daemon (one per node, a DaemonSet in a cluster).

use clap::Parser as _;
use lacewing_node::{self as node, config::NodeArgs};

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
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(node::run(config, log_level))?;
    Ok(())
}
