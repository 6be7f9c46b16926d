//! `lacewing-node`: the per-node daemon (one per node, a DaemonSet in a cluster).

use clap::Parser as _;
use lacewing_node::{self as node, config::NodeArgs};

fn main() -> anyhow::Result<()> {
    let args = NodeArgs::parse();
    let log_level = lacewing_sys::telemetry::init(args.log_format);
    let config = args.validate()?;
    // `--workers`: the daemon's work is short and I/O bound; one thread
    // avoids cross-thread wakeups, two (the default) let one busy
    // connection not hold up the rest of the node.
    let runtime = node::runtime(config.workers)?;
    runtime.block_on(node::run(config, log_level))?;
    Ok(())
}
