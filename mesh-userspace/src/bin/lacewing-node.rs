//! `lacewing-node`: the per-node daemon (one per node, a DaemonSet in a cluster).

use clap::Parser as _;
use lacewing::node::{self, config::NodeArgs};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = NodeArgs::parse();
    lacewing::telemetry::init(args.log_format);
    let config = args.validate()?;
    node::run(config).await?;
    Ok(())
}
