//! `lacewing-node`, the per-node daemon: loads the kernel programs, pins their
//! maps and links under its bpffs root, attaches them at the node's cgroup,
//! keeps the service load balancer's maps in line with its input, keeps the
//! workloads scheduled on it and their certificates (the state store the
//! proxy reads through [`view::NodeView`]), captures meshed pods, runs the
//! tunnel server and the [`lacewing_proxy::Proxy`] over the node's sockets
//! ([`sockets::NodeSockets`]), and serves metrics, health and `/status` on
//! :15020. On SIGTERM it drains (see [`run`]) before it exits.
//!
//! Upgrades: a new daemon started on a node where one runs takes over from
//! it through the handoff socket in `--run-dir` ([`lacewing_sys::handoff`]):
//! it receives every listener (the pods', :15008, :15020, the admin port),
//! adopts the pinned datapath, catches up with the controller, and only
//! then does the old one stop accepting and drain. See [`run`].

pub mod admin;
pub mod bootstrap;
pub mod capture;
pub mod channel;
pub mod client;
pub mod cni;
pub mod config;
pub mod explain;
pub mod fastpath;
pub mod identity;
pub mod lb;
pub mod loader;
pub mod maps;
pub mod memory;
pub mod metrics;
pub mod node_cert;
pub mod sockets;
pub mod sockops;
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
use lacewing_sys::admission::{Admission, AdmissionMetrics, Limits};
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
    #[error("this node's credentials: {0} (check --tls-dir)")]
    NodeTls(#[from] node_cert::RenewError),
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
    #[error("serving the CNI hand-over on {path}: {source} (check --cni-socket)")]
    CniSocket {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{0} (check --run-dir)")]
    Handoff(#[from] lacewing_sys::handoff::HandoffError),
    #[error("--takeover: no lacewing-node serves {0}; start without --takeover to start afresh")]
    NothingToTakeOver(std::path::PathBuf),
    #[error("writing the ready file {0}: {1} (check --ready-file)")]
    ReadyFile(std::path::PathBuf, std::io::Error),
}

/// This build's version, as a successor or predecessor is told.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// How long a daemon taking over waits to catch up with the controller and
/// get its pods' certificates before it gives up (the old one runs on).
const TAKEOVER_TIMEOUT: Duration = Duration::from_secs(60);

/// The nice value of a daemon while it prepares to take over.
const PREPARING_NICE: i32 = 19;

/// How long a daemon handing over waits for its listeners to close.
const STOP_TIMEOUT: Duration = Duration::from_secs(2);

/// Runs the daemon until SIGTERM or SIGINT, or until a successor took
/// over, then drains: no new connections, GOAWAY on the tunnel's, and up
/// to `--drain-timeout` for the established ones before the rest are reset.
///
/// Started where a daemon runs, it first takes over from it: inherits its
/// listeners, adopts the datapath, waits until it has caught up
/// ([`CaughtUp`]), tells the old one, and accepts once it stopped. Across a
/// map layout change (also after a crash) the links switch to the new maps
/// only once this daemon filled them.
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
    let file_limit = match lacewing_sys::os::raise_fd_limit() {
        Ok(limit) => {
            tracing::info!(limit, "open-file limit");
            Some(limit)
        }
        Err(err) => {
            tracing::warn!(%err, "could not raise the open-file limit");
            None
        }
    };
    maps::set_layout_bump(config.layout_bump);
    let handoff_path = config.run_dir.join(lacewing_sys::handoff::SOCKET_NAME);
    // An upgrade: the daemon running here hands its listeners over.
    let mut takeover = {
        let path = handoff_path.clone();
        tokio::task::spawn_blocking(move || {
            lacewing_sys::handoff::connect(&path, VERSION, maps::layout())
        })
        .await
        .map_err(|e| lacewing_sys::handoff::HandoffError::Io(std::io::Error::other(e)))??
    };
    if config.takeover && takeover.is_none() {
        return Err(NodeError::NothingToTakeOver(handoff_path));
    }
    // Preparing (loading the programs, catching up) at a low priority: the
    // daemon serving now keeps the CPU it needs until the handover.
    let nice = match &takeover {
        Some(_) => lacewing_sys::os::set_process_nice(PREPARING_NICE)
            .inspect_err(|err| tracing::debug!(%err, "cannot lower the priority while taking over"))
            .ok(),
        None => None,
    };
    let listeners = match &mut takeover {
        Some(t) => {
            tracing::info!(
                from_version = %t.version,
                from_layout = t.layout,
                layout = maps::layout(),
                listeners = t.listeners.len(),
                "taking over from the lacewing-node running here"
            );
            lacewing_sys::handoff::Listeners::inheriting(std::mem::take(&mut t.listeners))
        }
        None => lacewing_sys::handoff::Listeners::fresh(),
    };
    let mut datapath = Datapath::load_and_attach(&config)?;
    let mut balancer = lb::LoadBalancer::reconcile(
        maps::LbMaps::open(&config.bpffs_root)?,
        config.maglev_capacity,
    )?;
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
    let admission_metrics = AdmissionMetrics::new(&mut registry);
    let node_cert_metrics = node_cert::NodeCertMetrics::new(&mut registry);
    if let Some(limit) = file_limit {
        admission_metrics.set_file_limit(limit);
    }
    let admission =
        |listener, limits: Limits| Admission::new(listener, limits, admission_metrics.clone());
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
    if let Some(t) = &takeover {
        numbers.import(&t.state["identity_numbers"]);
    }
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
    let (metrics_listener, metrics_held) = listen(&listeners, "metrics", config.metrics_addr)
        .map_err(|source| NodeError::Metrics {
            addr: config.metrics_addr,
            source,
        })?;
    let server = lacewing_sys::http::serve(
        metrics_listener,
        Arc::clone(&endpoint),
        accepting(&listeners),
        admission("metrics", config.limits.clone()),
    );
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
    let (reconciled, capture_version) = tokio::sync::watch::channel(0);
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
                    listeners: Arc::clone(&listeners),
                    reconciled,
                    sock_ops: datapath.sock_ops(),
                    tunnel_admission: admission("tunnel", config.limits.clone()),
                    pod_admission: capture::PodAdmission {
                        outbound: admission("pod_outbound", config.limits.per_pod()),
                        plaintext: admission("pod_plaintext", config.limits.per_pod()),
                    },
                    node_cert_metrics,
                },
                &drain,
            )
            .await?,
        ),
        None => None,
    };
    let (admin_listener, admin_held) =
        listen(&listeners, "admin", config.admin_addr).map_err(|source| NodeError::Listen {
            what: "the admin endpoint",
            addr: config.admin_addr,
            source,
        })?;
    let admin = Arc::new(admin::Admin {
        node: config.node_name.clone(),
        trust_domain: config.trust_domain.clone(),
        workloads: Arc::clone(&local_workloads),
        identities: Arc::clone(&identities),
        lb: Arc::clone(&lb),
        outliers,
        breakers,
        log_level,
        fast_path: capturing(&config).then(|| (Arc::clone(&numbers), config.bpffs_root.clone())),
    })
    .serve(
        admin_listener,
        accepting(&listeners),
        admission("admin", config.limits.clone()),
    );
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
    let affinity_sweeper = tokio::spawn(lb::sweep_affinity(Arc::clone(&lb)));
    // A takeover, a layout change or a predecessor's sock_ops link at the
    // node's root (before per-cgroup links) each wait until capture has
    // caught up: then the meshed pods have their own links.
    if takeover.is_some() || datapath.switch_pending() || datapath.has_root_sock_ops() {
        let caught_up = CaughtUp {
            endpoint: &endpoint,
            workloads: &local_workloads,
            identities: &identities,
            trust_domain: &config.trust_domain,
            capture: capture_version,
            capturing: mesh.is_some() && capturing(&config),
        }
        .wait();
        tokio::pin!(caught_up);
        let in_time = tokio::time::timeout(TAKEOVER_TIMEOUT, &mut caught_up)
            .await
            .is_ok();
        match takeover {
            Some(_) if !in_time => {
                tracing::error!(
                    timeout_s = TAKEOVER_TIMEOUT.as_secs(),
                    "not caught up with the controller in time: the takeover is abandoned, the running daemon goes on"
                );
                // The running daemon keeps its listeners (we only had
                // copies) and the maps; the links run our programs on
                // the same maps, or, across a layout change, still its own.
                datapath.keep();
                std::process::exit(1);
            }
            Some(takeover) => {
                let unclaimed = listeners.release_unclaimed();
                // From here on the old daemon accepts nothing; the
                // connections that arrive wait in the shared queues.
                if let Err(err) = takeover.ready().await {
                    tracing::warn!(%err, "the old daemon did not confirm its stop; taking over anyway");
                }
                datapath.switch_over()?;
                listeners.start_accepting();
                if let Some(nice) = nice
                    && let Err(err) = lacewing_sys::os::set_process_nice(nice)
                {
                    tracing::warn!(%err, nice, "cannot restore the priority after the takeover");
                }
                tracing::info!(
                    unclaimed,
                    "took over: accepting on every listener; the old daemon drains"
                );
            }
            None => {
                if !in_time {
                    // Stale maps that serve beat new ones that are empty.
                    tracing::warn!(
                        timeout_s = TAKEOVER_TIMEOUT.as_secs(),
                        "not caught up with the controller yet: the programs stay on the previous layout's maps until it is"
                    );
                    tokio::select! {
                        () = &mut caught_up => {}
                        () = lacewing_sys::shutdown::signal() => {
                            datapath.keep();
                            return Ok(());
                        }
                    }
                }
                datapath.switch_over()?;
            }
        }
    }
    datapath.retire_root_sock_ops()?;
    // The CNI plugin is answered by the daemon that serves the node: a
    // successor takes the socket's name once it has taken over.
    let cni_stop = CancellationToken::new();
    if let (Some(path), Some(pods)) = (
        &config.cni_socket,
        mesh.as_ref().and_then(|m| m.pods.clone()),
    ) {
        let listener = cni::bind(path).map_err(|source| NodeError::CniSocket {
            path: path.clone(),
            source,
        })?;
        tracing::info!(socket = %path.display(), "answering the CNI plugin");
        tokio::spawn(cni::serve(
            listener,
            path.clone(),
            pods,
            Arc::clone(&local_workloads),
            cni_stop.clone(),
        ));
    }
    let mut handovers = lacewing_sys::handoff::serve(
        &handoff_path,
        Arc::clone(&listeners),
        VERSION.to_owned(),
        maps::layout(),
        Box::new({
            let numbers = Arc::clone(&numbers);
            move || serde_json::json!({ "identity_numbers": numbers.export() })
        }),
    )?;
    if let Some(file) = &config.ready_file {
        ready_file(file, &endpoint).await?;
    }
    let handover = tokio::select! {
        () = lacewing_sys::shutdown::signal() => None,
        handover = handovers.recv() => handover,
    };
    if let Some(file) = &config.ready_file {
        let _ = std::fs::remove_file(file);
    }
    // Drain first: configuration, certificates and metrics keep being
    // served to the connections still open.
    cni_stop.cancel();
    drain.cancel();
    server.abort();
    admin.abort();
    drop((metrics_held, admin_held));
    let handed_over = handover.is_some();
    if let Some(handover) = handover {
        // The successor writes the maps from now on.
        for task in [&watcher, &subscriber].into_iter().flatten() {
            task.abort();
        }
        if let Some(mesh) = &mesh {
            mesh.stop_writing();
        }
        let deadline = tokio::time::Instant::now() + STOP_TIMEOUT;
        while listeners.held() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tracing::info!(
            to_version = %handover.version,
            to_layout = handover.layout,
            still_held = listeners.held(),
            "handed over: accepting nothing more; draining"
        );
        let _ = handover.stopped.send(());
    }
    if let Some(mesh) = mesh {
        mesh.drain(config.drain_timeout).await;
    }
    trimmer.abort();
    affinity_sweeper.abort();
    for task in [watcher, subscriber, certificates].into_iter().flatten() {
        task.abort();
    }
    if handed_over {
        tracing::info!("drained after the handover; the successor runs the datapath");
        datapath.keep();
        return Ok(());
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

/// A listener on `addr` for `role` (inherited in a takeover), non-blocking
/// for tokio, held for the next handoff.
fn listen(
    listeners: &Arc<lacewing_sys::handoff::Listeners>,
    role: &str,
    addr: std::net::SocketAddr,
) -> std::io::Result<(tokio::net::TcpListener, lacewing_sys::handoff::Held)> {
    let (listener, held) = listeners.listen(role, addr)?;
    listener.set_nonblocking(true)?;
    Ok((tokio::net::TcpListener::from_std(listener)?, held))
}

/// Resolves once this daemon may accept (see [`lacewing_sys::handoff`]).
fn accepting(
    listeners: &Arc<lacewing_sys::handoff::Listeners>,
) -> impl Future<Output = ()> + Send + 'static {
    let listeners = Arc::clone(listeners);
    async move { listeners.until_accepting().await }
}

/// Creates the ready file once the first configuration is applied.
async fn ready_file(
    file: &std::path::Path,
    endpoint: &lacewing_sys::http::Endpoint,
) -> Result<(), NodeError> {
    while !endpoint.ready.load(std::sync::atomic::Ordering::Acquire) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    std::fs::write(file, b"ready\n").map_err(|e| NodeError::ReadyFile(file.to_owned(), e))
}

/// What a daemon taking over (or switching to a new map layout) waits for
/// before it says it is ready: the controller's configuration applied to
/// the maps, capture caught up with it, and a certificate for every meshed
/// identity here (a connection accepted before would wait for one).
struct CaughtUp<'a> {
    endpoint: &'a lacewing_sys::http::Endpoint,
    workloads: &'a workloads::LocalWorkloads,
    identities: &'a identity::Identities,
    trust_domain: &'a str,
    capture: tokio::sync::watch::Receiver<u64>,
    capturing: bool,
}

impl CaughtUp<'_> {
    async fn wait(mut self) {
        use std::sync::atomic::Ordering;
        while !self.endpoint.ready.load(Ordering::Acquire) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let version = *self.workloads.watch().borrow();
        if self.capturing {
            let _ = self.capture.wait_for(|v| *v >= version).await;
        }
        let mut stored = self.identities.watch();
        loop {
            let wanted = self.workloads.meshed_identities(self.trust_domain);
            if wanted.keys().all(|id| self.identities.get(id).is_some()) {
                return;
            }
            let _ = tokio::time::timeout(Duration::from_millis(200), stored.changed()).await;
        }
    }
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
        listeners,
        reconciled,
        sock_ops,
        tunnel_admission,
        pod_admission,
        node_cert_metrics,
    } = parts;
    let telemetry = start_telemetry(config, log_lines, spans)?;
    let node_tls = Arc::new(node_cert::NodeTls::load(
        &controller.tls_dir,
        node_cert_metrics,
    )?);
    let proxy = Arc::new(Proxy::new(
        ProxyConfig {
            trust_domain: config.trust_domain.clone(),
            roots: node_tls.roots(),
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
    let (listener, held) =
        listen(&listeners, "tunnel", config.tunnel_addr).map_err(|source| NodeError::Listen {
            what: "the tunnel port",
            addr: config.tunnel_addr,
            source,
        })?;
    let tunnel_tls = node_tls.tunnel();
    let tunnel = tokio::spawn({
        let accepting = accepting(&listeners);
        let drain = drain.clone();
        let serve = tunnel::server::serve(
            listener,
            Arc::clone(&tunnel_tls),
            proxy.inbound.connector(),
            tunnel_metrics,
            tunnel_admission,
            drain.clone(),
        );
        async move {
            tokio::select! {
                () = accepting => {}
                // Handed over before it ever accepted.
                () = drain.cancelled() => return,
            }
            serve.await;
        }
    });
    // Let go (for a successor) as soon as the tunnel stops accepting.
    tokio::spawn({
        let drain = drain.clone();
        async move {
            drain.cancelled().await;
            drop(held);
        }
    });
    let mut tasks = vec![tokio::spawn({
        let proxy = Arc::clone(&proxy);
        async move { proxy.recheck_on_change().await }
    })];
    // The node certificate in --tls-dir is written by one daemon at a
    // time: after a handover, by the successor.
    let mut writers = vec![tokio::spawn(
        node_cert::NodeCert {
            controller: controller.clone(),
            trust_domain: config.trust_domain.clone(),
            node: config.node_name.clone(),
            tls: Arc::clone(&node_tls),
        }
        .run(),
    )];
    writers.push(tokio::spawn(node_tls.follow_bundle(controller.clone())));
    tracing::info!(addr = %config.tunnel_addr, "tunnel listening (HBONE, mutual TLS 1.3)");
    let mut pods = None;
    if capturing(config) {
        let pod_nets = Arc::new(cni::PodNets::default());
        pods = Some(Arc::clone(&pod_nets));
        let maps = capture::CaptureMaps::open(&config.bpffs_root, sock_ops, &config.cgroup_root)?;
        let fast_maps = fastpath::FastPathMaps::open(&config.bpffs_root)?;
        writers.push(tokio::spawn(fastpath::run(
            Arc::clone(&local_workloads),
            fast_maps,
            Arc::clone(&numbers),
            config.trust_domain.clone(),
        )));
        tasks.push(tokio::spawn(capture::run(
            maps,
            capture::CaptureParts {
                netns_dir: config.pod_netns_dir.clone(),
                pods: pod_nets,
                workloads: local_workloads,
                proxy: Arc::clone(&proxy),
                numbers,
                captured_pods,
                listeners,
                reconciled,
                admission: pod_admission,
            },
            drain.clone(),
        )));
    }
    Ok(Mesh {
        proxy,
        pods,
        tunnel,
        tasks,
        writers,
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
    /// Where the listeners are opened (or inherited) and held.
    listeners: Arc<lacewing_sys::handoff::Listeners>,
    /// Where capture attaches sock_ops for each pod.
    sock_ops: Arc<sockops::SockOpsLinks>,
    /// Where capture says how far it has caught up.
    reconciled: tokio::sync::watch::Sender<u64>,
    /// What one peer may hold on :15008, and on the pods' capture ports.
    tunnel_admission: Admission,
    pod_admission: capture::PodAdmission,
    node_cert_metrics: node_cert::NodeCertMetrics,
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
    /// The pods' namespaces capture works from, when capturing.
    pods: Option<Arc<cni::PodNets>>,
    tunnel: tokio::task::JoinHandle<()>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// Tasks that write the kernel's maps (the fast path's).
    writers: Vec<tokio::task::JoinHandle<()>>,
}

impl Mesh {
    /// After a handover: the successor keeps the maps from now on.
    fn stop_writing(&self) {
        for task in &self.writers {
            task.abort();
        }
    }

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
        for task in self.tasks.into_iter().chain(self.writers) {
            task.abort();
        }
    }
}

/// Whether this daemon captures pods: it learns their namespaces from the
/// CNI plugin or from a folder.
fn capturing(config: &NodeConfig) -> bool {
    config.pod_netns_dir.is_some() || config.cni_socket.is_some()
}
