//! `lacewing-node`, the per-node daemon: loads the kernel programs, pins their
//! maps and links under its bpffs root, attaches them at the node's cgroup,
//! keeps the service load balancer's maps in line with its input, keeps the
//! workloads scheduled on it, and serves metrics, health and `/status` on
//! :15020.

pub mod bootstrap;
pub mod capture;
pub mod client;
pub mod config;
pub mod fastpath;
pub mod identity;
pub mod inbound;
pub mod lb;
pub mod loader;
pub mod maps;
pub mod memory;
pub mod metrics;
pub mod outbound;
pub mod source;
pub mod splice;
pub mod workloads;

use std::sync::{Arc, Mutex, atomic::AtomicBool};

pub use config::NodeConfig;
pub use loader::{Datapath, LoadError};

/// What can stop the daemon.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("{0}")]
    Load(#[from] LoadError),
    #[error("opening the pinned maps: {0}")]
    Maps(#[from] aya::maps::MapError),
    #[error("setting the acceleration switch: {0}")]
    Acceleration(maps::MapOpError),
    #[error("{0}")]
    Apply(#[from] lb::ApplyError),
    #[error("the mesh: {0}")]
    Mesh(String),
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
    if let (Some(controller), Some(bootstrap)) = (&config.controller, &config.bootstrap) {
        bootstrap::ensure_credentials(
            controller,
            bootstrap,
            &config.node_name,
            &config.trust_domain,
        )
        .await
        .map_err(NodeError::Mesh)?;
    }
    match crate::sys::raise_fd_limit() {
        Ok(limit) => tracing::debug!(limit, "open-file limit"),
        Err(err) => tracing::warn!(%err, "could not raise the open-file limit"),
    }
    let datapath = Datapath::load_and_attach(&config)?;
    let mut balancer = lb::LoadBalancer::reconcile(maps::LbMaps::open(&config.bpffs_root)?)?;
    balancer
        .set_service_cidrs(&config.service_cidrs)
        .map_err(lb::ApplyError::Read)?;
    let mut splice = maps::SpliceMaps::open(&config.bpffs_root)?;
    splice
        .set_acceleration(config.acceleration)
        .and_then(|()| splice.set_fast_path(config.fast_path))
        .map_err(NodeError::Acceleration)?;
    let lb = Arc::new(Mutex::new(balancer));
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = metrics::Metrics::new(&mut registry, Arc::clone(&lb), splice);
    let tunnel_metrics = crate::tunnel::metrics::TunnelMetrics::new(&mut registry);
    let splice_off = Arc::new(splice::SpliceOff::open(&config.bpffs_root)?);
    registry.register(
        "lacewing_splice_writers_switched_off",
        "Spliced writers the daemon switched back to plain TCP because it fell behind them (TCP then bounds what is queued)",
        splice_off.switched_off.clone(),
    );
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
    let mesh = match &config.controller {
        Some(controller) => {
            start_mesh(
                &config,
                controller,
                &local_workloads,
                &identities,
                tunnel_metrics,
                splice_off,
            )
            .await?
        }
        None => Vec::new(),
    };
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
    // Loading the programs parsed the embedded object: hand that back now.
    memory::release();
    let trimmer = tokio::spawn(memory::run());
    crate::shutdown::signal().await;
    trimmer.abort();
    server.abort();
    for task in [watcher, subscriber, certificates]
        .into_iter()
        .flatten()
        .chain(mesh)
    {
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

/// The tunnel server on :15008 and, with `--pod-netns-dir`, capture of the
/// meshed pods here. The node's certificate (from `--tls-dir`) serves the
/// tunnel; its CA is the mesh's trust bundle.
async fn start_mesh(
    config: &NodeConfig,
    controller: &config::Controller,
    local_workloads: &Arc<workloads::LocalWorkloads>,
    identities: &Arc<identity::Identities>,
    tunnel_metrics: crate::tunnel::metrics::TunnelMetrics,
    splice_off: Arc<splice::SpliceOff>,
) -> Result<Vec<tokio::task::JoinHandle<()>>, NodeError> {
    use crate::tunnel;
    let mesh_err = |e: String| NodeError::Mesh(e);
    let (ca, cert, key) =
        crate::pki::read_credentials(&controller.tls_dir).map_err(|e| mesh_err(e.to_string()))?;
    let roots = tunnel::tls::roots(&ca).map_err(|e| mesh_err(e.to_string()))?;
    let server_config = tunnel::tls::server_config(&cert, &key, Arc::clone(&roots))
        .map_err(|e| mesh_err(e.to_string()))?;
    let inbound = Arc::new(inbound::Inbound {
        workloads: Arc::clone(local_workloads),
        trust_domain: config.trust_domain.clone(),
        splice_off: Some(Arc::clone(&splice_off)),
    });
    let listener = tokio::net::TcpListener::bind(config.tunnel_addr)
        .await
        .map_err(|e| mesh_err(format!("tunnel port {}: {e}", config.tunnel_addr)))?;
    let connector_inbound = Arc::clone(&inbound);
    let connector: tunnel::server::Connector = Arc::new(move |peer, dest| {
        let inbound = Arc::clone(&connector_inbound);
        Box::pin(async move { inbound.connect(peer, dest).await })
    });
    let mut tasks = vec![tokio::spawn(tunnel::server::serve(
        listener,
        Arc::new(std::sync::RwLock::new(Arc::new(server_config))),
        connector,
        tunnel_metrics.clone(),
    ))];
    tracing::info!(addr = %config.tunnel_addr, "tunnel listening (HBONE, mutual TLS 1.3)");
    if let Some(dir) = &config.pod_netns_dir {
        let maps = capture::CaptureMaps::open(&config.bpffs_root, config.maglev_capacity)
            .map_err(mesh_err)?;
        let outbound = Arc::new(outbound::Outbound {
            workloads: Arc::clone(local_workloads),
            identities: Arc::clone(identities),
            inbound,
            pool: tunnel::client::Pool::new(Some(crate::net::BYPASS_MARK)),
            roots,
            trust_domain: config.trust_domain.clone(),
            metrics: tunnel_metrics,
            splice_off: Some(splice_off),
        });
        let numbers = Arc::new(fastpath::IdentityNumbers::default());
        let fast_maps = fastpath::FastPathMaps::open(&config.bpffs_root)
            .map_err(|e| mesh_err(format!("opening the fast path maps: {e}")))?;
        tasks.push(tokio::spawn(fastpath::run(
            Arc::clone(local_workloads),
            fast_maps,
            Arc::clone(&numbers),
            config.trust_domain.clone(),
        )));
        tasks.push(tokio::spawn(capture::run(
            dir.clone(),
            Arc::clone(local_workloads),
            maps,
            outbound,
            numbers,
        )));
    }
    Ok(tasks)
}
