//! Captured connections of meshed pods, from the in-pod listener to their
//! destination (chosen by the kernel's load balancer): through the tunnel
//! to a meshed pod on another node, straight to a meshed pod on this node
//! (same checks, no TLS on the wire), or unchanged, from the pod's own
//! network namespace, to anything else.

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use lacewing_core::{
    model::workloads::{PeerEntry, Workload},
    pki,
};
use lacewing_tunnel::{
    self as tunnel, Peer,
    client::{Destination, Pool},
    metrics::TunnelMetrics,
};
use tokio::net::TcpStream;

use crate::{
    inbound::Inbound,
    registry::{Direction, Registry},
    router,
    sockets::{PodNetns, SocketFactory},
    splice::{End, Unread, Watch, Watched, pipe, reset},
    state::{Certificate, StateView},
};

/// How long a pod's connection waits for the certificate of its identity
/// when the node is still getting it (a pod that just started), before it
/// is refused.
pub const CERTIFICATE_WAIT: Duration = Duration::from_secs(5);

/// Where a captured connection goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// A meshed pod on this node: the inbound checks, no TLS on the wire.
    SameNode,
    /// A meshed pod on another node: through the tunnel to that node.
    Tunnel(PeerEntry),
    /// Anything else: unchanged, from the pod's own network namespace.
    PassThrough,
}

/// Why a tunnel stream could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OutboundError {
    #[error(
        "no certificate for {identity} after {waited:?}: is the controller reachable and does it sign for this node?"
    )]
    NoCertificate { identity: String, waited: Duration },
    #[error(transparent)]
    Open(#[from] tunnel::client::TunnelError),
}

impl OutboundError {
    /// Why, as access logs say it.
    pub fn reason(&self) -> &'static str {
        use tunnel::client::TunnelError as T;
        match self {
            Self::NoCertificate { .. } => "no_certificate",
            Self::Open(T::Connect(..)) => "connect_failed",
            Self::Open(T::Handshake(..) | T::Tls(_)) => "handshake_failed",
            Self::Open(T::Http(..)) => "tunnel_failed",
            Self::Open(T::Refused(_, _, status)) if status.as_u16() == 403 => {
                "denied_by_destination"
            }
            Self::Open(T::Refused(_, _, status)) if status.as_u16() == 429 => "rate_limited",
            Self::Open(T::Refused(..)) => "refused_by_destination",
        }
    }
}

/// A captured connection, as the capture listener hands it over.
pub struct Captured {
    /// The pod that opened it.
    pub source: Arc<Workload>,
    pub netns: PodNetns,
    pub netns_cookie: u64,
    pub app: TcpStream,
    /// The original destination (after the kernel's load balancing).
    pub dest: SocketAddr,
}

pub struct Outbound {
    pub state: Arc<dyn StateView>,
    pub sockets: Arc<dyn SocketFactory>,
    pub inbound: Arc<Inbound>,
    pub registry: Arc<Registry>,
    pub pool: Pool,
    pub roots: lacewing_tunnel::tls::Roots,
    pub trust_domain: String,
    pub metrics: TunnelMetrics,
    pub certificate_wait: Duration,
    /// Routed (L7) connections' shared state: pools, latencies, metrics.
    pub router: Arc<crate::router::Router>,
    pub telemetry: crate::telemetry::Telemetry,
}

impl Outbound {
    /// Where a connection to `dest` goes.
    pub fn route(&self, dest: SocketAddr) -> Route {
        if self.state.local(dest.ip()).is_some_and(|w| w.meshed) {
            Route::SameNode
        } else if let Some(to) = self.state.peer(dest.ip()) {
            Route::Tunnel(to)
        } else {
            Route::PassThrough
        }
    }

    /// Carries one captured connection until both sides are done.
    pub async fn handle(self: &Arc<Self>, conn: Captured) {
        let Captured {
            source,
            netns,
            netns_cookie,
            app,
            mut dest,
        } = conn;
        let _ = app.set_nodelay(true);
        let started = std::time::SystemTime::now();
        let dialled = dest;
        // The app's writes reach `app` spliced (when acceleration is on).
        let watch = self.sockets.watch(&app, netns_cookie);
        let Some(source_ip) = source_address(&source, dest) else {
            return;
        };
        // The capture holds the pod as it was when capture started: its
        // switches (access logging) are read as they are now.
        let source = self
            .state
            .local(source_ip)
            .filter(|now| now.key() == source.key())
            .unwrap_or(source);
        let identity = source.identity(&self.trust_domain);
        let peer = Peer {
            identity: identity.clone(),
            source: Some(source_ip),
        };
        // A Service frontend that routes bind: the kernel left it
        // unbalanced, for each request to be routed here.
        let table = self.state.routes();
        if let Some(frontend) = table.frontend(dest) {
            let frontend = frontend.clone();
            if frontend.routes.applies(frontend.port, &source.namespace) {
                // A port that says it speaks HTTP waits for the client's
                // first bytes; one that does not say waits 300 ms at most.
                let declared =
                    frontend.app_protocol == lacewing_core::model::services::AppProtocol::Http;
                match router::sniff(&app, declared).await {
                    Ok(()) => {
                        let registered = self.registry.register(peer, dest, Direction::Outbound);
                        tokio::select! {
                            () = router::serve(&self.router, Arc::clone(self) as Arc<dyn router::Dial>, app, source, netns, source_ip, frontend, Arc::clone(&table)) => {}
                            () = registered.closed.cancelled() => {}
                        }
                        return;
                    }
                    Err(reason) => self.router.metrics.fallback(reason),
                }
            }
            // No route for this client (or not HTTP): one endpoint for the
            // connection, as the kernel would have balanced it.
            match router::pick_l4(&table, &frontend) {
                Some(endpoint) => dest = endpoint,
                None => {
                    tracing::info!(%identity, %dest, "no ready endpoint for a routed Service");
                    reset(app);
                    if let Some(log) = self.telemetry.log_for(Some(&source)) {
                        let mut e = crate::telemetry::access_log::Entry::new(
                            "connection",
                            "outbound",
                            started,
                        )
                        .from_workload(&source, &self.trust_domain);
                        e.destination_address = Some(dialled.to_string());
                        e.destination_service =
                            Some(format!("{}/{}", frontend.service.0, frontend.service.1));
                        e.reason = Some("no_backend".into());
                        log.write(&e);
                    }
                    return;
                }
            }
        }
        let log = self.telemetry.log_for(Some(&source)).cloned();
        let (path, outcome) = match self.route(dest) {
            Route::SameNode => (
                "same_node",
                match self.inbound.connect(peer, dest).await {
                    // Registered inbound: this node's policy is re-checked on it.
                    Ok(upstream) if upstream.per_request => {
                        Ok(self.inbound.serve_requests(app, watch, upstream).await)
                    }
                    Ok(upstream) => {
                        let closed = upstream.registered.closed.clone();
                        Ok(splice_app(app, watch, upstream.stream, upstream.watch, &closed).await)
                    }
                    Err(refusal) => {
                        tracing::info!(%identity, %dest, reason = refusal.reason, detail = %refusal.detail, "same-node connection refused");
                        self.metrics.refused(&refusal);
                        reset(app);
                        Err((refusal.reason, refusal.policy))
                    }
                },
            ),
            Route::Tunnel(to) => (
                "tunnel",
                match self.tunnel(&identity, source_ip, &to, dest).await {
                    Ok(upgraded) => {
                        let registered = self.registry.register(peer, dest, Direction::Outbound);
                        self.metrics.opened("outbound");
                        let tunnel = hyper_util::rt::TokioIo::new(upgraded);
                        let (up, down) =
                            splice_app(app, watch, tunnel, None, &registered.closed).await;
                        self.metrics.closed("outbound", up, down);
                        Ok((up, down))
                    }
                    Err(err) => {
                        tracing::info!(%identity, %dest, node = %to.node, %err, "tunnel stream failed");
                        reset(app);
                        Err((err.reason(), None))
                    }
                },
            ),
            Route::PassThrough => (
                "passthrough",
                match self.sockets.connect_from(&netns, dest).await {
                    Ok(upstream) => {
                        let registered = self.registry.register(peer, dest, Direction::Outbound);
                        Ok(splice_app(app, watch, upstream, None, &registered.closed).await)
                    }
                    Err(err) => {
                        tracing::debug!(%dest, %err, "passthrough connect failed");
                        reset(app);
                        Err(("connect_failed", None))
                    }
                },
            ),
        };
        if let Some(log) = log {
            let mut e = crate::telemetry::access_log::Entry::new("connection", "outbound", started)
                .from_workload(&source, &self.trust_domain);
            e.source_address = Some(source_ip.to_string());
            e.destination_address = Some(dialled.to_string());
            e.backend = (dest != dialled).then(|| dest.to_string());
            if let Some(w) = self.state.local(dest.ip()) {
                e = e.to_workload(&w, &self.trust_domain);
            } else if let Some(p) = self.state.peer(dest.ip()) {
                e.destination_namespace = Some(p.namespace.clone());
                e.destination_identity = Some(p.identity(&self.trust_domain));
            }
            e.path_taken = Some(path);
            match outcome {
                Ok((up, down)) => {
                    e.bytes_sent = Some(up);
                    e.bytes_received = Some(down);
                }
                Err((reason, policy)) => {
                    e.reason = Some(reason.to_owned());
                    e.policy = policy;
                }
            }
            log.write(&e);
        }
    }

    /// The certificate of `identity`; when the node is still getting it (a
    /// pod that just started), waits for it up to `certificate_wait`.
    pub async fn certificate(&self, identity: &str) -> Result<Certificate, OutboundError> {
        // The usual case, on every tunnel connection: the node holds it.
        if let Some(certificate) = self.state.certificate(identity) {
            return Ok(certificate);
        }
        let mut changes = self.state.certificate_changes();
        let wait = async {
            loop {
                changes.borrow_and_update();
                if let Some(certificate) = self.state.certificate(identity) {
                    return Some(certificate);
                }
                if changes.changed().await.is_err() {
                    return None;
                }
            }
        };
        tokio::time::timeout(self.certificate_wait, wait)
            .await
            .ok()
            .flatten()
            .ok_or_else(|| OutboundError::NoCertificate {
                identity: identity.to_owned(),
                waited: self.certificate_wait,
            })
    }

    async fn tunnel(
        &self,
        identity: &str,
        source: IpAddr,
        to: &PeerEntry,
        dest: SocketAddr,
    ) -> Result<hyper::upgrade::Upgraded, OutboundError> {
        let (svid, serial) = self.certificate(identity).await?;
        let destination = Destination {
            node: SocketAddr::new(to.node_address, tunnel::PORT),
            node_identity: pki::node_identity(&self.trust_domain, &to.node),
            pod: dest,
        };
        Ok(self
            .pool
            .open(&svid, &serial, self.roots.current(), source, &destination)
            .await?)
    }
}

impl Outbound {
    /// A stream from `source` to `endpoint` for routed requests, carried as
    /// a captured connection to it would be: through the tunnel, through
    /// the inbound checks to a pod here, or from the pod's namespace.
    async fn open_stream(
        &self,
        source: &Workload,
        netns: &PodNetns,
        source_ip: IpAddr,
        endpoint: SocketAddr,
    ) -> std::io::Result<crate::splice::BoxedStream> {
        let identity = source.identity(&self.trust_domain);
        let peer = Peer {
            identity: identity.clone(),
            source: Some(source_ip),
        };
        let refused =
            |what: String| std::io::Error::new(std::io::ErrorKind::ConnectionRefused, what);
        match self.route(endpoint) {
            Route::SameNode => {
                let upstream = self
                    .inbound
                    .connect(peer, endpoint)
                    .await
                    .map_err(|r| refused(format!("{}: {}", r.reason, r.detail)))?;
                if upstream.per_request {
                    // The pod's L7 policy decides each request: it reads
                    // them from one end of a pipe we write to.
                    let (ours, theirs) = tokio::io::duplex(64 * 1024);
                    let inbound = Arc::clone(&self.inbound);
                    tokio::spawn(async move {
                        inbound.serve_requests(theirs, None, upstream).await;
                    });
                    Ok(Box::new(ours))
                } else {
                    Ok(Box::new(upstream.stream))
                }
            }
            Route::Tunnel(to) => {
                let upgraded = self
                    .tunnel(&identity, source_ip, &to, endpoint)
                    .await
                    .map_err(|e| refused(e.to_string()))?;
                Ok(Box::new(CountedStream::opened(
                    upgraded,
                    self.metrics.clone(),
                )))
            }
            Route::PassThrough => Ok(Box::new(self.sockets.connect_from(netns, endpoint).await?)),
        }
    }
}

impl router::Dial for Outbound {
    fn open(
        self: Arc<Self>,
        source: Arc<Workload>,
        netns: PodNetns,
        source_ip: IpAddr,
        endpoint: SocketAddr,
    ) -> futures::future::BoxFuture<'static, std::io::Result<crate::splice::BoxedStream>> {
        Box::pin(async move { self.open_stream(&source, &netns, source_ip, endpoint).await })
    }
}

/// A routed connection's tunnel stream, counted as a captured
/// connection's is: opened when made, closed with its bytes each way when
/// the router lets it go.
struct CountedStream {
    inner: hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>,
    metrics: TunnelMetrics,
    to_destination: u64,
    to_source: u64,
}

impl CountedStream {
    /// Counts the stream opened; its `Drop` counts it closed.
    fn opened(upgraded: hyper::upgrade::Upgraded, metrics: TunnelMetrics) -> Self {
        metrics.opened("outbound");
        Self {
            inner: hyper_util::rt::TokioIo::new(upgraded),
            metrics,
            to_destination: 0,
            to_source: 0,
        }
    }
}

impl tokio::io::AsyncRead for CountedStream {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        self.to_source += (buf.filled().len() - before) as u64;
        polled
    }
}

impl tokio::io::AsyncWrite for CountedStream {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = polled {
            self.to_destination += n as u64;
        }
        polled
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let std::task::Poll::Ready(Ok(n)) = polled {
            self.to_destination += n as u64;
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl Drop for CountedStream {
    fn drop(&mut self) {
        self.metrics
            .closed("outbound", self.to_destination, self.to_source);
    }
}

/// The pod's address of the destination's family (its first otherwise).
fn source_address(source: &Workload, dest: SocketAddr) -> Option<IpAddr> {
    source
        .addresses
        .iter()
        .find(|a| a.is_ipv4() == dest.is_ipv4())
        .or(source.addresses.first())
        .copied()
}

/// Splices the app's connection with the other side; if the other side
/// resets, or the registry closes the connection, the app's connection is
/// reset too (not closed cleanly). The watches are on spliced writers into
/// each side (the app's; a pod's here).
async fn splice_app<B>(
    mut app: TcpStream,
    app_watch: Option<Arc<Watch>>,
    other: B,
    other_watch: Option<Arc<Watch>>,
    closed: &tokio_util::sync::CancellationToken,
) -> (u64, u64)
where
    B: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unread + Unpin,
{
    let mut other = Watched::new(other, other_watch.clone(), app_watch.clone());
    let mut app_side = Watched::new(&mut app, app_watch, other_watch);
    let end = pipe(&mut app_side, &mut other, closed).await;
    let (up, down) = (app_side.bytes_read(), other.bytes_read());
    tracing::debug!(up, down, ?end, "connection done");
    if end != End::Done {
        drop(app_side);
        drop(other);
        reset(app);
    }
    (up, down)
}

#[cfg(test)]
mod tests;
