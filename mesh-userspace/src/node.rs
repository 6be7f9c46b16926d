//! `lacewing-node`, the per-node daemon: loads the kernel programs, pins their
//! maps and links under its bpffs root, attaches them at the node's cgroup, and
//! detaches cleanly on SIGTERM.

pub mod config;
pub mod loader;
pub mod maps;

pub use config::NodeConfig;
pub use loader::{Datapath, LoadError};

/// Runs the daemon until SIGTERM or SIGINT.
pub async fn run(config: NodeConfig) -> Result<(), LoadError> {
    let datapath = Datapath::load_and_attach(&config)?;
    tracing::info!(
        node = %config.node_name,
        cgroup = %config.cgroup_root.display(),
        bpffs = %config.bpffs_root.display(),
        "datapath attached; running until SIGTERM"
    );
    crate::shutdown::signal().await;
    tracing::info!("shutting down: detaching programs and removing pins");
    datapath.detach()
}
