//! `lacewing-node`, the per-node daemon: loads the kernel programs, pins their
//! maps and links under its bpffs root, attaches them at the node's cgroup,
//! keeps the service load balancer's maps in line with its input, keeps the
//! workloads scheduled on it and their certificates (the state store the
//! proxy reads through [`view::NodeView`]), captures meshed pods, runs the
//! tunnel server and the [`lacewing_proxy::Proxy`] over the node's sockets
//! ([`sockets::NodeSockets`]), and serves metrics, health and `/status` on
//! :15020. On SIGTERM it drains (see [`run`]) before it exits.

pub mod admin;
pub mod bootstrap;
pub mod capture;
pub mod channel;
pub mod client;
pub mod config;
pub mod explain;
pub mod fastpath;
pub mod identity;
pub mod lb;
pub mod loader;
pub mod maps;
pub mod memory;
pub mod metrics;
pub mod sockets;
pub mod source;
pub mod splice;
pub mod view;
pub mod workloads;

use std::{
    sync::{Arc, Mutex, atomic::AtomicBool},
    time::Duration,
};

pub use config::NodeConfig;
use lacewing_proxy::{Proxy, ProxyConfig};
pub use loader::{Datapath, LoadError};
use tokio_util::sync::CancellationToken;

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
    #[error("{0}")]
    Bootstrap(#[from] bootstrap::BootstrapError),
    #[error("reading this node's credentials: {0} (check --tls-dir)")]
    Credentials(#[from] lacewing_core::pki::PkiError),
    #[error("this node's credentials cannot serve the tunnel: {0} (check --tls-dir)")]
    TunnelCredentials(#[from] lacewing_tunnel::tls::TlsError),
    #[error("{0}")]
    Capture(#[from] capture::CaptureError),
    #[error("listening on {what} {addr}: {source} (is another lacewing-node running?)")]
    Listen {
        what: &'static str,
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("opening the access log {sink}: {source} (check --access-log-file)")]
    AccessLog {
        sink: String,
        source: std::io::Error,
    },
    #[error("--otlp-endpoint {0}: {1}")]
    Otlp(String, String),
    #[error(
        "serving metrics on {addr}: {source} (is another lacewing-node running? pass --metrics-addr)"
    )]
    Metrics {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// Runs the daemon until SIGTERM or SIGINT, then drains: no new
/// connections, GOAWAY on the tunnel's, and up to `--drain-timeout` for the
/// established ones before the rest are reset.
pub async fn run(
    config: NodeConfig,
    log_level: lacewing_sys::telemetry::LogLevel,
) -> Result<(), NodeError> {
    if let (Some(controller), Some(bootstrap)) = (&config.controller, &config.bootstrap) {
        bootstrap::ensure_credentials(
            controller,
            bootstrap,
            &config.node_name,
            &config.trust_domain,
        )
        .await?;
    }
    match lacewing_sys::os::raise_fd_limit() {
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
    let tunnel_metrics = lacewing_tunnel::metrics::TunnelMetrics::new(&mut registry);
    let request_metrics = lacewing_proxy::metrics::RequestMetrics::new(&mut registry);
    let connections = Arc::new(lacewing_proxy::registry::Registry::default());
    metrics::register_connections(&mut registry, Arc::clone(&connections));
    let splice_off = Arc::new(splice::SpliceOff::open(&config.bpffs_root)?);
    registry.register(
        "lacewing_splice_writers_switched_off",
        "Spliced writers the daemon switched back to plain TCP because it fell behind them (TCP then bounds what is queued)",
        splice_off.switched_off.clone(),
    );
    let log_lines = lacewing_proxy::telemetry::OutcomeFamily::default();
    registry.register(
        "lacewing_access_log_lines",
        "Access log lines, by outcome: written, or dropped (the writer fell behind, or the sink failed); requests never wait for them",
        log_lines.clone(),
    );
    let spans = lacewing_proxy::telemetry::OutcomeFamily::default();
    registry.register(
        "lacewing_trace_spans",
        "Trace spans, by outcome: exported to the OTLP collector, or dropped (queue full, or the collector down or refusing); requests never wait for them",
        spans.clone(),
    );
    let local_workloads = Arc::new(workloads::LocalWorkloads::default());
    let numbers = Arc::new(fastpath::IdentityNumbers::default());
    let outliers = Arc::new(lacewing_proxy::router::resilience::Outliers::default());
    let breakers = Arc::new(lacewing_proxy::router::resilience::Breakers::default());
    let identities = Arc::new(identity::Identities::default());
    let shown = (
        Arc::clone(&local_workloads),
        Arc::clone(&identities),
        config.node_name.clone(),
    );
    let endpoint = Arc::new(lacewing_sys::http::Endpoint {
        registry,
        ready: AtomicBool::new(config.services_file.is_none() && config.controller.is_none()),
        status: Some(Box::new(move || {
            shown.0.status_json(&shown.2, shown.1.shown())
        })),
        routes: Some(Box::new({
            let workloads = Arc::clone(&local_workloads);
            let outliers = Arc::clone(&outliers);
            move || {
                serde_json::to_string_pretty(&workloads.routes().describe(&ejected(&outliers)))
                    .unwrap_or_default()
            }
        })),
    });
    let server = lacewing_sys::http::serve(config.metrics_addr, Arc::clone(&endpoint))
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
    let drain = CancellationToken::new();
    let mesh = match &config.controller {
        Some(controller) => Some(
            start_mesh(
                &config,
                controller,
                MeshParts {
                    workloads: Arc::clone(&local_workloads),
                    identities: Arc::clone(&identities),
                    tunnel_metrics,
                    request_metrics,
                    splice_off,
                    captured_pods: metrics.captured_pods.clone(),
                    connections,
                    outliers: Arc::clone(&outliers),
                    breakers: Arc::clone(&breakers),
                    numbers: Arc::clone(&numbers),
                    log_lines,
                    spans,
                },
                &drain,
            )
            .await?,
        ),
        None => None,
    };
    let admin = Arc::new(admin::Admin {
        node: config.node_name.clone(),
        trust_domain: config.trust_domain.clone(),
        workloads: Arc::clone(&local_workloads),
        identities: Arc::clone(&identities),
        lb: Arc::clone(&lb),
        outliers,
        breakers,
        log_level,
        fast_path: config
            .pod_netns_dir
            .as_ref()
            .map(|_| (numbers, config.bpffs_root.clone())),
    })
    .serve(config.admin_addr)
    .await
    .map_err(|source| NodeError::Listen {
        what: "the admin endpoint",
        addr: config.admin_addr,
        source,
    })?;
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
    lacewing_sys::shutdown::signal().await;
    // Drain first: configuration, certificates and metrics keep being
    // served to the connections still open.
    drain.cancel();
    if let Some(mesh) = mesh {
        mesh.drain(config.drain_timeout).await;
    }
    trimmer.abort();
    server.abort();
    admin.abort();
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

/// The endpoints outlier detection holds out now, with why, as `/routes`
/// and the admin endpoint show them.
fn ejected(
    outliers: &lacewing_proxy::router::resilience::Outliers,
) -> Vec<(
    lacewing_core::model::services::ServiceId,
    std::net::SocketAddr,
    String,
)> {
    outliers
        .ejected()
        .into_iter()
        .map(|(service, e)| {
            let why = format!(
                "ejected {}x, back in {}s",
                e.ejections,
                e.remaining.as_secs_f64().ceil()
            );
            (service, e.endpoint, why)
        })
        .collect()
}

/// The tunnel server on :15008 and, with `--pod-netns-dir`, capture of the
/// meshed pods here, around one [`Proxy`]. The node's certificate (from
/// `--tls-dir`) serves the tunnel; its CA is the mesh's trust bundle.
async fn start_mesh(
    config: &NodeConfig,
    controller: &config::Controller,
    parts: MeshParts,
    drain: &CancellationToken,
) -> Result<Mesh, NodeError> {
    use lacewing_tunnel as tunnel;
    let MeshParts {
        workloads: local_workloads,
        identities,
        tunnel_metrics,
        request_metrics,
        splice_off,
        captured_pods,
        connections,
        outliers,
        breakers,
        numbers,
        log_lines,
        spans,
    } = parts;
    let telemetry = start_telemetry(config, log_lines, spans)?;
    let (ca, cert, key) = lacewing_core::pki::read_credentials(&controller.tls_dir)?;
    let roots = tunnel::tls::roots(&ca)?;
    let server_config = tunnel::tls::server_config(&cert, &key, Arc::clone(&roots))?;
    let proxy = Arc::new(Proxy::new(
        ProxyConfig {
            trust_domain: config.trust_domain.clone(),
            roots,
            tunnel_mark: Some(lacewing_sys::net::BYPASS_MARK),
            certificate_wait: config.certificate_wait,
            outliers,
            breakers,
            telemetry,
        },
        Arc::new(view::NodeView {
            workloads: Arc::clone(&local_workloads),
            identities,
        }),
        Arc::new(sockets::NodeSockets {
            splice_off: Some(splice_off),
        }),
        connections,
        tunnel_metrics.clone(),
        request_metrics,
    ));
    let listener = tokio::net::TcpListener::bind(config.tunnel_addr)
        .await
        .map_err(|source| NodeError::Listen {
            what: "the tunnel port",
            addr: config.tunnel_addr,
            source,
        })?;
    let tunnel = tokio::spawn(tunnel::server::serve(
        listener,
        Arc::new(std::sync::RwLock::new(Arc::new(server_config))),
        proxy.inbound.connector(),
        tunnel_metrics,
        drain.clone(),
    ));
    let mut tasks = vec![tokio::spawn({
        let proxy = Arc::clone(&proxy);
        async move { proxy.recheck_on_change().await }
    })];
    tracing::info!(addr = %config.tunnel_addr, "tunnel listening (HBONE, mutual TLS 1.3)");
    if let Some(dir) = &config.pod_netns_dir {
        let maps = capture::CaptureMaps::open(&config.bpffs_root, config.maglev_capacity)?;
        let fast_maps = fastpath::FastPathMaps::open(&config.bpffs_root)?;
        tasks.push(tokio::spawn(fastpath::run(
            Arc::clone(&local_workloads),
            fast_maps,
            Arc::clone(&numbers),
            config.trust_domain.clone(),
        )));
        tasks.push(tokio::spawn(capture::run(
            dir.clone(),
            local_workloads,
            maps,
            Arc::clone(&proxy),
            numbers,
            captured_pods,
            drain.clone(),
        )));
    }
    Ok(Mesh {
        proxy,
        tunnel,
        tasks,
    })
}

/// What the mesh is built from: the node's state and the metrics it feeds.
struct MeshParts {
    workloads: Arc<workloads::LocalWorkloads>,
    identities: Arc<identity::Identities>,
    tunnel_metrics: lacewing_tunnel::metrics::TunnelMetrics,
    request_metrics: lacewing_proxy::metrics::RequestMetrics,
    splice_off: Arc<splice::SpliceOff>,
    captured_pods: prometheus_client::metrics::gauge::Gauge,
    connections: Arc<lacewing_proxy::registry::Registry>,
    outliers: Arc<lacewing_proxy::router::resilience::Outliers>,
    breakers: Arc<lacewing_proxy::router::resilience::Breakers>,
    /// The fast path's identity numbers (the admin endpoint reads them).
    numbers: Arc<fastpath::IdentityNumbers>,
    /// Where access log lines and spans are counted.
    log_lines: lacewing_proxy::telemetry::OutcomeFamily,
    spans: lacewing_proxy::telemetry::OutcomeFamily,
}

/// The access log (its writer runs whenever the mesh does: a MeshConfig
/// may switch it on for a namespace at any time) and, with
/// `--otlp-endpoint`, the tracer.
fn start_telemetry(
    config: &NodeConfig,
    log_lines: lacewing_proxy::telemetry::OutcomeFamily,
    spans: lacewing_proxy::telemetry::OutcomeFamily,
) -> Result<lacewing_proxy::telemetry::Telemetry, NodeError> {
    use lacewing_proxy::telemetry::{access_log::AccessLog, trace::Tracer};
    let t = &config.telemetry;
    let access_log = AccessLog::start(
        &t.access_log_sink,
        t.access_log_queue,
        t.access_log_all,
        log_lines,
    )
    .map_err(|source| NodeError::AccessLog {
        sink: t.access_log_sink.to_string(),
        source,
    })?;
    let tracer = match &t.otlp_endpoint {
        None => None,
        Some(endpoint) => {
            let tracer = Tracer::start(
                endpoint,
                &config.node_name,
                t.trace_sampling,
                t.trace_queue,
                spans,
            )
            .map_err(|e| NodeError::Otlp(endpoint.clone(), e.to_string()))?;
            tracing::info!(%endpoint, sampling = t.trace_sampling, "exporting trace spans over OTLP/gRPC");
            Some(tracer)
        }
    };
    Ok(lacewing_proxy::telemetry::Telemetry {
        access_log: Some(access_log),
        tracer,
    })
}

/// The running mesh: its proxy (and registry), the tunnel server, and the
/// tasks that stop with the daemon.
struct Mesh {
    proxy: Arc<Proxy>,
    tunnel: tokio::task::JoinHandle<()>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Mesh {
    /// Drain: the listeners have stopped accepting (the token was
    /// cancelled) and GOAWAY went out on every tunnel connection; waits
    /// for open connections to end, up to `timeout`, then closes the rest.
    async fn drain(self, timeout: Duration) {
        let registry = &self.proxy.registry;
        let deadline = tokio::time::Instant::now() + timeout;
        let open = registry.len();
        tracing::info!(
            open,
            timeout_s = timeout.as_secs_f64(),
            "draining: no new connections; waiting for open ones to end"
        );
        if tokio::time::timeout(timeout, registry.until_empty())
            .await
            .is_err()
        {
            let closed = registry.close_all();
            tracing::warn!(closed, "drain timeout: closing the connections still open");
            // Closing is immediate (a reset); let the copy loops see it.
            let _ = tokio::time::timeout(Duration::from_secs(1), registry.until_empty()).await;
        } else {
            tracing::info!("drained: every connection ended");
        }
        // The tunnel's connections close once their last stream has ended
        // and what they still buffer is sent (GOAWAY, then a graceful
        // close): exiting before would cut the tail of a finished transfer.
        let tail = deadline.max(tokio::time::Instant::now() + Duration::from_secs(1));
        let _ = tokio::time::timeout_at(tail, self.tunnel).await;
        for task in self.tasks {
            task.abort();
        }
    }
}
