//! `lacewing-controller`: the control plane (one per cluster; in the lab, on
//! the underlay).

use clap::Parser as _;
use lacewing_controller::{self as controller, config::ControllerArgs};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = ControllerArgs::parse();
    let _log_level = lacewing_sys::telemetry::init(args.log_format);
    let config = args.validate()?;
    controller::run(config).await?;
    Ok(())
}
