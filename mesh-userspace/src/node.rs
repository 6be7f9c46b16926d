//! `lacewing-node`, the per-node daemon: loads the kernel programs, pins their
//! maps and links under its bpffs root, attaches them at the node's cgroup,
//! keeps the service load balancer's maps in line with its input, keeps the
//! workloads scheduled on it, and serves metrics, health and `/status` on
//! :15020.

pub mod client;
pub mod config;
pub mod identity;
pub mod lb;
pub mod loader;
pub mod maps;
pub mod metrics;
pub mod source;
pub mod workloads;

use std::sync::{Arc, Mutex, atomic::AtomicBool};

pub use config::NodeConfig;
pub use loader::{Datapath, LoadError};

/// What can stop the daemon.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("{0}")]
    Load(#[from] LoadError),
    #[error("opening the pinned load balancer maps: {0}")]
    Maps(#[from] aya::maps::MapError),
    #[error("{0}")]
    Apply(#[from] lb::ApplyError),
    #[error(
        "serving metrics on {addr}: {source} (is another lacewing-node running? pass --metrics-addr)"
    )]
    Metrics {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// Runs the daemon until SIGTERM or SIGINT.
pub async fn run(config: NodeConfig) -> Result<(), NodeError> {
    let datapath = Datapath::load_and_attach(&config)?;
    let mut balancer = lb::LoadBalancer::reconcile(maps::LbMaps::open(&config.bpffs_root)?)?;
    balancer
        .set_service_cidrs(&config.service_cidrs)
        .map_err(lb::ApplyError::Read)?;
    let lb = Arc::new(Mutex::new(balancer));
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = metrics::Metrics::new(&mut registry, Arc::clone(&lb));
    let local_workloads = Arc::new(workloads::LocalWorkloads::default());
    let identities = Arc::new(identity::Identities::default());
    let shown = (
        Arc::clone(&local_workloads),
        Arc::clone(&identities),
        config.node_name.clone(),
    );
    let endpoint = Arc::new(crate::http::Endpoint {
        registry,
        ready: AtomicBool::new(config.services_file.is_none() && config.controller.is_none()),
        status: Some(Box::new(move || {
            shown.0.status_json(&shown.2, shown.1.shown())
        })),
    });
    let server = crate::http::serve(config.metrics_addr, Arc::clone(&endpoint))
        .await
        .map_err(|source| NodeError::Metrics {
            addr: config.metrics_addr,
            source,
        })?;
    let subscriber = config.controller.clone().map(|controller| {
        tokio::spawn(client::run(
            controller,
            config.node_name.clone(),
            Arc::clone(&lb),
            Arc::clone(&local_workloads),
            metrics.clone(),
            Arc::clone(&endpoint),
        ))
    });
    let certificates = config.controller.clone().map(|controller| {
        tokio::spawn(identity::run(
            controller,
            config.trust_domain.clone(),
            Arc::clone(&local_workloads),
            Arc::clone(&identities),
            metrics.clone(),
        ))
    });
    let watcher = config.services_file.clone().map(|path| {
        tokio::spawn(source::watch_file(
            path,
            Arc::clone(&lb),
            metrics.clone(),
            Arc::clone(&endpoint),
        ))
    });
    tracing::info!(
        node = %config.node_name,
        cgroup = %config.cgroup_root.display(),
        bpffs = %config.bpffs_root.display(),
        "datapath attached; running until SIGTERM"
    );
    crate::shutdown::signal().await;
    server.abort();
    for task in [watcher, subscriber, certificates].into_iter().flatten() {
        task.abort();
    }
    if config.keep_datapath {
        tracing::info!(
            "shutting down; programs and maps stay pinned for the next lacewing-node (--keep-datapath)"
        );
        datapath.keep();
        return Ok(());
    }
    tracing::info!("shutting down: detaching programs and removing pins");
    Ok(datapath.detach()?)
}
