//! `lacewing-node`: the per-node daemon (one per node, a DaemonSet in a cluster).

use clap::Parser as _;
use lacewing_node::{self as node, config::NodeArgs};

// One thread: the daemon's work is short and I/O bound, and on a busy node a
// single event loop avoids cross-thread wakeups (lower latency, less memory).
#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = NodeArgs::parse();
    let log_level = lacewing_sys::telemetry::init(args.log_format);
    let config = args.validate()?;
    node::run(config, log_level).await?;
    Ok(())
}
