//! The source side of L7: a meshed pod's connection to a Service frontend
//! that HTTPRoutes bind (the kernel captured it unbalanced, with the
//! ClusterIP as its destination) is read as HTTP, and each request is
//! routed on its own: the rule Gateway API's precedence picks, its filters,
//! a backend Service by weight, an endpoint of it by power of two choices
//! over peak-EWMA latency ([`balance`]), timeouts and retries. Requests go
//! out over pooled connections (hyper-util's client, one pool per source
//! pod and protocol, keyed by endpoint), each connection opened as any
//! captured connection is: through the tunnel, to a pod on this node
//! through the inbound checks, or straight from the pod's namespace.
//!
//! A connection whose first bytes are not HTTP (or that sends nothing in
//! [`SNIFF_TIMEOUT`], as a server-first protocol would) is carried at L4 to
//! one endpoint, as the kernel would have balanced it, and counted.
//!
//! Errors the mesh makes are answered in gRPC form to gRPC clients
//! (`content-type: application/grpc...`: HTTP 200 with `grpc-status`) and
//! in HTTP form to others, each with `x-lacewing-error` saying why.

pub mod balance;
pub mod resilience;

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use futures::future::BoxFuture;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, Uri, Version, header};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::{
    client::legacy::{
        Client,
        connect::{Connected, Connection},
    },
    rt::{TokioExecutor, TokioIo},
};
use lacewing_core::model::{
    routes::{
        self as model, Filter, Frontend, RequestView, RouteTable, Rule, modify_headers,
        redirect_location, rewrite_path,
    },
    services::{BackendEntry, ServiceId},
    traffic::{AbortAnswer, Balance, ServicePolicy},
    workloads::Workload,
};
use tokio::net::TcpStream;

use crate::{
    answer::{self, is_grpc},
    metrics::RequestLabels,
    sockets::PodNetns,
    splice::BoxedStream,
    telemetry::Seen,
};

/// How long a routed connection may stay silent before it is taken for a
/// server-first protocol and carried at L4.
pub const SNIFF_TIMEOUT: Duration = Duration::from_millis(300);
/// How long a connection to a port that says it is HTTP may stay silent
/// before it is served as HTTP without its first bytes checked.
pub const DECLARED_TIMEOUT: Duration = Duration::from_secs(10);
/// Request bodies up to this size are kept for a retry; a larger one is
/// sent once, never retried.
pub const RETRY_BODY_LIMIT: usize = 64 * 1024;
/// How long a pooled HTTP/1.1 connection to an endpoint stays open unused:
/// seconds, as Linkerd's proxy keeps them (3 s). A burst of concurrent
/// requests leaves one connection per request in the pool, each holding
/// buffers here and a stream and a connection at the destination; kept for
/// 90 s, what two bursts of 64 connections left behind was 5-7 MB in each
/// daemon, half of its memory (`bench l7`). A client that keeps sending
/// finds its connections still there.
pub const HTTP1_POOL_IDLE: Duration = Duration::from_secs(3);
/// How long the one HTTP/2 connection per endpoint stays open unused.
pub const HTTP2_POOL_IDLE: Duration = Duration::from_secs(90);

type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Bodies in both directions.
pub type Body = BoxBody<Bytes, BoxError>;

/// Opens a stream from a source pod to an endpoint, as a captured
/// connection to it would be carried (the outbound side implements it).
pub trait Dial: Send + Sync + 'static {
    fn open(
        self: Arc<Self>,
        source: Arc<Workload>,
        netns: PodNetns,
        source_ip: IpAddr,
        endpoint: SocketAddr,
    ) -> BoxFuture<'static, io::Result<BoxedStream>>;
}

/// One pod's pooled connections to endpoints: hyper-util's pool for
/// HTTP/1.1 (keyed by the URI's authority, the endpoint), and for HTTP/2
/// one multiplexed connection per endpoint ([`Http2Pool`]), so that the
/// request's own `:authority` reaches the pod.
struct Clients {
    http1: Client<Dialer, Body>,
    http2: Http2Pool,
}

impl Clients {
    /// Sends `req` to `endpoint` over a pooled connection of its version.
    async fn send(
        self: Arc<Self>,
        endpoint: SocketAddr,
        req: Request<Body>,
    ) -> Result<Response<Incoming>, BoxError> {
        if req.version() == Version::HTTP_2 {
            self.http2.send(endpoint, req).await
        } else {
            Ok(self.http1.request(req).await?)
        }
    }
}

/// An HTTP/2 connection per endpoint, opened on first use and again after
/// the endpoint closed it; one unused for [`HTTP2_POOL_IDLE`] is let go (its
/// connection ends once its last stream does).
struct Http2Pool {
    dialer: Dialer,
    connections: Mutex<Connections>,
    /// Numbers the connections, so that a request that failed on one lets
    /// go of that one only, not of a newer one to the same endpoint.
    opened: std::sync::atomic::AtomicU64,
}

/// The pool's connections, and when idle and closed ones were last let go
/// (a sweep over every endpoint, at most once per [`SWEEP_EVERY`], not on
/// every request).
struct Connections {
    by_endpoint: HashMap<SocketAddr, Pooled>,
    swept: Instant,
}

const SWEEP_EVERY: Duration = Duration::from_secs(1);

struct Pooled {
    send: hyper::client::conn::http2::SendRequest<Body>,
    used: Instant,
    id: u64,
}

impl Http2Pool {
    /// Sends `req` over the endpoint's connection. One that is closing
    /// (the endpoint sent GOAWAY) is let go: a request it handed back
    /// unsent goes on a new one; one it refused unprocessed fails here and
    /// is sent again by the router (see `Session::forward`).
    async fn send(
        &self,
        endpoint: SocketAddr,
        req: Request<Body>,
    ) -> Result<Response<Incoming>, BoxError> {
        let mut req = req;
        for _ in 0..2 {
            let (mut send, id) = self.connection(endpoint).await?;
            match send.try_send_request(req).await {
                Ok(resp) => return Ok(resp),
                Err(mut err) => {
                    let unsent = err.take_message();
                    let err = err.into_error();
                    if unsent.is_some() || crate::l7::refused_unprocessed(&err) {
                        self.let_go(endpoint, id);
                    }
                    match unsent {
                        Some(unsent) => req = unsent,
                        None => return Err(err.into()),
                    }
                }
            }
        }
        Err("the endpoint closed two connections in a row before taking the request".into())
    }

    /// The pooled connection to `endpoint` and its number, or a new one.
    async fn connection(
        &self,
        endpoint: SocketAddr,
    ) -> Result<(hyper::client::conn::http2::SendRequest<Body>, u64), BoxError> {
        let pooled = {
            let mut conns = self.connections.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            if now - conns.swept >= SWEEP_EVERY {
                conns.swept = now;
                conns
                    .by_endpoint
                    .retain(|_, p| !p.send.is_closed() && now - p.used < HTTP2_POOL_IDLE);
            }
            conns
                .by_endpoint
                .get_mut(&endpoint)
                .filter(|p| !p.send.is_closed())
                .map(|p| {
                    p.used = now;
                    (p.send.clone(), p.id)
                })
        };
        if let Some(pooled) = pooled {
            return Ok(pooled);
        }
        let io = Arc::clone(&self.dialer.dial)
            .open(
                Arc::clone(&self.dialer.source),
                Arc::clone(&self.dialer.netns),
                self.dialer.source_ip,
                endpoint,
            )
            .await
            .map_err(|e| ConnectFailed(e.into()))?;
        let (send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
                .await
                .map_err(|e| ConnectFailed(e.into()))?;
        tokio::spawn(async move {
            if let Err(err) = conn.await {
                tracing::debug!(%endpoint, %err, "HTTP/2 connection to an endpoint ended");
            }
        });
        let id = self
            .opened
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let pooled = Pooled {
            send: send.clone(),
            used: Instant::now(),
            id,
        };
        self.connections
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .by_endpoint
            .insert(endpoint, pooled);
        Ok((send, id))
    }

    /// Forgets connection `id` to `endpoint`, if it is still the pooled one.
    fn let_go(&self, endpoint: SocketAddr, id: u64) {
        let mut conns = self.connections.lock().unwrap_or_else(|p| p.into_inner());
        if conns.by_endpoint.get(&endpoint).is_some_and(|p| p.id == id) {
            conns.by_endpoint.remove(&endpoint);
        }
    }
}

/// A connection to an endpoint could not be opened (nothing was sent).
#[derive(Debug)]
struct ConnectFailed(BoxError);

impl std::fmt::Display for ConnectFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "could not connect: {}", self.0)
    }
}

impl std::error::Error for ConnectFailed {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(self.0.as_ref())
    }
}

/// Whether `err` is a failure to connect (the request never left).
fn connect_failed(err: &(dyn std::error::Error + 'static)) -> bool {
    err.downcast_ref::<ConnectFailed>().is_some()
        || err
            .downcast_ref::<hyper_util::client::legacy::Error>()
            .is_some_and(hyper_util::client::legacy::Error::is_connect)
}

/// Which source pod, and which worker: the key of a pod's clients.
type PodKey = (String, std::thread::ThreadId);

/// Every source pod's clients, per worker, and when unused ones were last
/// let go.
struct PodPools {
    by_pod: HashMap<PodKey, PodClients>,
    swept: Instant,
}

/// One source pod's clients on one worker, and when a routed connection
/// last started or ended with them.
struct PodClients {
    clients: Arc<Clients>,
    used: Instant,
}

/// How often the pools of source pods are looked over, at most.
const POD_POOLS_SWEEP_EVERY: Duration = Duration::from_secs(10);

impl PodPools {
    /// Lets go of the clients that no routed connection holds and none has
    /// used for as long as a pooled connection is kept ([`HTTP2_POOL_IDLE`],
    /// the longer idle time): their connections are closed or idle, and
    /// with them goes the pod's network namespace, which the clients' dialer
    /// holds open. A pod that ended (its uid changes with each pod) would
    /// otherwise keep its namespace alive for as long as the daemon runs.
    fn sweep(&mut self, now: Instant) {
        self.swept = now;
        self.by_pod.retain(|_, p| {
            Arc::strong_count(&p.clients) > 1 || now.duration_since(p.used) < HTTP2_POOL_IDLE
        });
    }
}

/// The router's state: pooled clients per source pod and worker, endpoint
/// latencies, what TrafficPolicies keep per Service, request metrics.
pub struct Router {
    clients: Mutex<PodPools>,
    pub balancer: balance::Balancer,
    pub outliers: Arc<resilience::Outliers>,
    pub breakers: Arc<resilience::Breakers>,
    budgets: resilience::Budgets,
    pub metrics: crate::metrics::RequestMetrics,
    pub telemetry: crate::telemetry::Telemetry,
    trust_domain: String,
}

impl Router {
    /// A router whose ejected endpoints are kept in `outliers` and circuit
    /// counts in `breakers` (shared with what shows them).
    pub fn new(
        metrics: crate::metrics::RequestMetrics,
        outliers: Arc<resilience::Outliers>,
        breakers: Arc<resilience::Breakers>,
        telemetry: crate::telemetry::Telemetry,
        trust_domain: String,
    ) -> Self {
        Self {
            clients: Mutex::new(PodPools {
                by_pod: HashMap::new(),
                swept: Instant::now(),
            }),
            balancer: balance::Balancer::default(),
            outliers,
            breakers,
            budgets: resilience::Budgets::default(),
            metrics,
            telemetry,
            trust_domain,
        }
    }

    /// The clients of `source` on this worker, and their key (to give back
    /// with [`Router::done_with`]).
    fn clients(
        &self,
        dial: &Arc<dyn Dial>,
        source: &Arc<Workload>,
        netns: &PodNetns,
        source_ip: IpAddr,
    ) -> (Arc<Clients>, PodKey) {
        let now = Instant::now();
        let mut pools = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if now.duration_since(pools.swept) >= POD_POOLS_SWEEP_EVERY {
            pools.sweep(now);
        }
        // Keyed by pod: a pod's pool dials from its own namespace and
        // address, and ends when the pod does (its uid changes). And by
        // thread, that is by the daemon's worker, as the tunnel's pool is: a
        // request and the connection task that carries it stay on one thread
        // (from a pool shared by workers, a request could take a connection
        // whose task runs on the other worker, and wake it to send and again
        // to answer). Workers live as long as the daemon.
        let key = (
            format!("{}/{}/{}", source.namespace, source.name, source.uid),
            std::thread::current().id(),
        );
        let entry = pools
            .by_pod
            .entry(key.clone())
            .or_insert_with(|| PodClients {
                clients: new_clients(dial, source, netns, source_ip),
                used: now,
            });
        entry.used = now;
        (Arc::clone(&entry.clients), key)
    }

    /// A routed connection of `key`'s pod ended: its clients count as used
    /// until now.
    fn done_with(&self, key: &PodKey) {
        let mut pools = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(entry) = pools.by_pod.get_mut(key) {
            entry.used = Instant::now();
        }
    }
}

/// A source pod's clients, dialling from its namespace and address.
fn new_clients(
    dial: &Arc<dyn Dial>,
    source: &Arc<Workload>,
    netns: &PodNetns,
    source_ip: IpAddr,
) -> Arc<Clients> {
    let dialer = Dialer {
        dial: Arc::clone(dial),
        source: Arc::clone(source),
        netns: Arc::clone(netns),
        source_ip,
    };
    let mut h1 = Client::builder(TokioExecutor::new());
    h1.pool_timer(hyper_util::rt::TokioTimer::new())
        .pool_idle_timeout(HTTP1_POOL_IDLE);
    Arc::new(Clients {
        http1: h1.build(dialer.clone()),
        http2: Http2Pool {
            dialer,
            connections: Mutex::new(Connections {
                by_endpoint: HashMap::new(),
                swept: Instant::now(),
            }),
            opened: std::sync::atomic::AtomicU64::new(0),
        },
    })
}

/// Opens connections to endpoints for one source pod (hyper-util's
/// connector); the URI's authority is the endpoint.
#[derive(Clone)]
struct Dialer {
    dial: Arc<dyn Dial>,
    source: Arc<Workload>,
    netns: PodNetns,
    source_ip: IpAddr,
}

impl tower_service::Service<Uri> for Dialer {
    type Response = Conn;
    type Error = io::Error;
    type Future = BoxFuture<'static, io::Result<Conn>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let dialer = self.clone();
        Box::pin(async move {
            let endpoint: SocketAddr = uri
                .authority()
                .and_then(|a| a.as_str().parse().ok())
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not an endpoint"))?;
            let stream = Arc::clone(&dialer.dial)
                .open(dialer.source, dialer.netns, dialer.source_ip, endpoint)
                .await?;
            Ok(Conn(TokioIo::new(stream)))
        })
    }
}

/// A connection to an endpoint, as hyper-util's client holds it.
pub struct Conn(TokioIo<BoxedStream>);

impl Connection for Conn {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl hyper::rt::Read for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// Whether `first` (a connection's first bytes) starts an HTTP/1 request
/// or the HTTP/2 preface.
pub fn looks_like_http(first: &[u8]) -> bool {
    if first.starts_with(b"PRI * HTTP/2") {
        return true;
    }
    let token = first.iter().take_while(|b| b.is_ascii_uppercase()).count();
    (3..=7).contains(&token) && first.get(token) == Some(&b' ')
}

/// Whether a routed connection speaks HTTP: its first bytes; if not, why
/// not (`not_http`, or `silent`: nothing in [`SNIFF_TIMEOUT`], as a
/// server-first protocol). On a port that says it is HTTP
/// (`declared_http`) the client speaks first: its bytes are awaited up to
/// [`DECLARED_TIMEOUT`] (then served as HTTP), and only checked.
pub async fn sniff(app: &TcpStream, declared_http: bool) -> Result<(), &'static str> {
    let mut first = [0u8; 16];
    let wait = if declared_http {
        DECLARED_TIMEOUT
    } else {
        SNIFF_TIMEOUT
    };
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let peeked = tokio::time::timeout_at(deadline, app.peek(&mut first)).await;
        match peeked {
            Ok(Ok(n)) if n >= first.len() || (n > 0 && first[..n].contains(&b' ')) => {
                return if looks_like_http(&first[..n]) {
                    Ok(())
                } else {
                    Err("not_http")
                };
            }
            // Fewer bytes than a request line's first word: wait for more.
            Ok(Ok(n)) if n > 0 => tokio::time::sleep(Duration::from_millis(5)).await,
            Err(_) if declared_http => return Ok(()),
            _ => return Err("silent"),
        }
    }
}

/// What one routed connection's requests share.
struct Session {
    router: Arc<Router>,
    clients: Arc<Clients>,
    /// Whose clients these are, to tell the router when the connection ends.
    pod: PodKey,
    source: Arc<Workload>,
    frontend: Frontend,
    table: Arc<RouteTable>,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.router.done_with(&self.pod);
    }
}

/// Serves a routed connection's HTTP until the client is done, opening
/// connections to endpoints with `dial`.
#[expect(
    clippy::too_many_arguments,
    reason = "one connection's parts, each used once"
)]
pub async fn serve(
    router: &Arc<Router>,
    dial: Arc<dyn Dial>,
    app: TcpStream,
    source: Arc<Workload>,
    netns: PodNetns,
    source_ip: IpAddr,
    frontend: Frontend,
    table: Arc<RouteTable>,
) {
    let (clients, pod) = router.clients(&dial, &source, &netns, source_ip);
    let session = Arc::new(Session {
        router: Arc::clone(router),
        clients,
        pod,
        source,
        frontend,
        table,
    });
    let service = hyper::service::service_fn(move |req| {
        let session = Arc::clone(&session);
        async move { Ok::<_, std::convert::Infallible>(session.handle(req).await) }
    });
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    if let Err(err) = builder
        .serve_connection_with_upgrades(TokioIo::new(Box::new(app) as BoxedStream), service)
        .await
    {
        tracing::debug!(%err, "routed connection ended");
    }
}

/// Why the mesh answered a request itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    NoRoute,
    NoBackend,
    Timeout,
    Unavailable,
    /// A TrafficPolicy's circuit breaker refused it.
    CircuitOpen,
}

impl Failure {
    fn status(self) -> StatusCode {
        match self {
            Self::NoRoute => StatusCode::NOT_FOUND,
            Self::NoBackend | Self::Unavailable | Self::CircuitOpen => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::Timeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// gRPC's code for it: UNIMPLEMENTED, UNAVAILABLE, DEADLINE_EXCEEDED.
    fn grpc(self) -> u16 {
        match self {
            Self::NoRoute => 12,
            Self::NoBackend | Self::Unavailable | Self::CircuitOpen => 14,
            Self::Timeout => 4,
        }
    }

    fn reason(self) -> &'static str {
        match self {
            Self::NoRoute => "no_route",
            Self::NoBackend => "no_backend",
            Self::Timeout => "timeout",
            Self::Unavailable => "unavailable",
            Self::CircuitOpen => "circuit_open",
        }
    }
}

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// The mesh's own answer for `failure`, in gRPC form to a gRPC client.
fn failure_response(failure: Failure, grpc: bool) -> Response<Body> {
    answer::mesh_error(grpc, failure.status(), failure.grpc(), failure.reason())
}

/// Hop-by-hop headers: never forwarded (HTTP/2 forbids them).
const HOP_BY_HOP: [&str; 6] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "te",
];

fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    for name in HOP_BY_HOP {
        if keep_upgrade && (name == "connection" || name == "upgrade") {
            continue;
        }
        if name == "te"
            && headers
                .get("te")
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"))
        {
            continue;
        }
        headers.remove(name);
    }
}

/// A request body: kept whole (replayable) or streamed once.
enum ReqBody {
    Buffered(Bytes),
    Stream(Body),
    /// A stream already sent: nothing to replay.
    Spent,
}

impl ReqBody {
    /// Reads up to [`RETRY_BODY_LIMIT`]; past it, what was read and the
    /// rest go on as one stream (not retried).
    async fn read(body: Incoming) -> Self {
        let mut body = body;
        let mut kept = bytes::BytesMut::new();
        let mut trailers = None;
        loop {
            match body.frame().await {
                None => break,
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        kept.extend_from_slice(&data);
                        if kept.len() > RETRY_BODY_LIMIT {
                            let head = futures::stream::iter([Ok::<_, BoxError>(Frame::data(
                                kept.freeze(),
                            ))]);
                            let rest =
                                http_body_util::BodyStream::new(body.map_err(BoxError::from));
                            let stream = futures::StreamExt::chain(head, rest);
                            return Self::Stream(BodyExt::boxed(http_body_util::StreamBody::new(
                                stream,
                            )));
                        }
                    }
                    Err(frame) => {
                        trailers = frame.into_trailers().ok();
                    }
                },
                Some(Err(err)) => {
                    return Self::Stream(
                        http_body_util::StreamBody::new(futures::stream::iter([Err::<
                            Frame<Bytes>,
                            BoxError,
                        >(
                            err.into()
                        )]))
                        .boxed(),
                    );
                }
            }
        }
        match trailers {
            // Trailers on a request (gRPC does not send them): not replayed.
            Some(t) => {
                let frames = [
                    Ok::<_, BoxError>(Frame::data(kept.freeze())),
                    Ok(Frame::trailers(t)),
                ];
                Self::Stream(http_body_util::StreamBody::new(futures::stream::iter(frames)).boxed())
            }
            None => Self::Buffered(kept.freeze()),
        }
    }

    /// A body for one attempt; `None` when it was streamed already.
    fn take(&mut self) -> Option<Body> {
        match std::mem::replace(self, Self::Spent) {
            Self::Buffered(b) => {
                *self = Self::Buffered(b.clone());
                Some(full(b))
            }
            Self::Stream(s) => Some(s),
            Self::Spent => None,
        }
    }
}

/// What the mesh did to a request besides carrying it, for the metrics'
/// `mesh_flag` label (so an injected fault is never taken for a real
/// failure).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Flag {
    #[default]
    None,
    FaultAbort,
    FaultDelay,
    CircuitOpen,
    /// The mesh answered it itself for another reason ([`Failure`]).
    Failed(Failure),
}

impl Flag {
    pub fn label(self) -> &'static str {
        match self {
            Self::None => "",
            Self::FaultAbort => "fault_abort",
            Self::FaultDelay => "fault_delay",
            Self::CircuitOpen => "circuit_open",
            Self::Failed(f) => f.reason(),
        }
    }
}

/// One request's answer, and what the metrics say about it.
struct Routed {
    resp: Response<Body>,
    /// The route that chose it (`namespace/name`), or empty.
    route: String,
    flag: Flag,
    /// The circuit breaker's count of it, held until the response ends.
    held: Option<resilience::Admitted>,
}

/// The endpoints a request was sent to, in order, and when (the last
/// answered; the others were retried away from).
#[derive(Default)]
struct Tries {
    sent: Vec<(std::time::SystemTime, SocketAddr)>,
}

impl Tries {
    fn backend(&self) -> Option<SocketAddr> {
        self.sent.last().map(|(_, a)| *a)
    }

    fn retries(&self) -> u32 {
        u32::try_from(self.sent.len().saturating_sub(1)).unwrap_or(u32::MAX)
    }
}

/// How one request is retried: by its rule's `retry` or by its Service's
/// TrafficPolicy (a rule's own settings win).
struct RetryPlan<'a> {
    /// Tries after the first.
    attempts: u32,
    on: Retryable<'a>,
    backoff: Duration,
    max_backoff: Duration,
    budget: Option<resilience::RetryBudget>,
}

enum Retryable<'a> {
    /// An HTTPRoute rule's codes; connection errors too (Gateway API).
    Codes(&'a [u16]),
    Policy(&'a lacewing_core::model::traffic::RetryOn),
}

impl Retryable<'_> {
    fn answer(&self, status: u16, grpc: Option<u16>) -> bool {
        match self {
            Self::Codes(codes) => codes.contains(&status),
            Self::Policy(on) => on.answer(status, grpc),
        }
    }

    fn error(&self, connect: bool) -> bool {
        match self {
            Self::Codes(_) => true,
            Self::Policy(on) if connect => on.connect(),
            Self::Policy(on) => on.no_answer(),
        }
    }
}

/// The budget when a rule retries and no TrafficPolicy sets one.
const DEFAULT_BUDGET: lacewing_core::model::traffic::Budget =
    lacewing_core::model::traffic::Budget {
        percent: lacewing_core::model::traffic::DEFAULT_BUDGET_PERCENT / 100.0,
        min_per_second: lacewing_core::model::traffic::DEFAULT_BUDGET_MIN_PER_SECOND,
        ttl: lacewing_core::model::traffic::DEFAULT_BUDGET_TTL,
    };

impl Session {
    async fn handle(self: Arc<Self>, mut req: Request<Incoming>) -> Response<Body> {
        let started = Instant::now();
        let grpc = is_grpc(req.headers());
        let seen = self.seen(&mut req);
        let mut tries = Tries::default();
        let Routed {
            resp,
            route,
            flag,
            held,
        } = self.route(req, grpc, &mut tries).await;
        // Counted when the response ends: a gRPC status comes in the
        // trailers (or, for an error without a body, in the headers).
        let code = resp.status().as_u16();
        let session = Arc::clone(&self);
        crate::metrics::observe(resp, move |grpc_status, bytes| {
            // The request is in flight (for the circuit breaker) until its
            // response ends.
            drop(held);
            let labels = RequestLabels::outbound(
                &session.source,
                &session.frontend,
                &route,
                code,
                grpc_status,
                flag.label(),
            );
            session.router.metrics.record(&labels, started.elapsed());
            if let Some(seen) = seen {
                session.told(seen, &route, code, grpc_status, bytes, flag, &tries);
            }
        })
    }

    /// What the access log and the tracer need of `req`, when either is
    /// on for it.
    fn seen(&self, req: &mut Request<Incoming>) -> Option<Seen> {
        let telemetry = &self.router.telemetry;
        let log = telemetry.log_for(Some(&self.source)).cloned();
        let span = telemetry.tracer.as_ref().and_then(|t| {
            let name = || format!("{} {}", req.method(), service_name(&self.frontend.service));
            t.start_span(req.headers(), name, crate::telemetry::trace::Kind::Client)
        });
        Seen::of(req, log, span)
    }

    /// Writes a routed request's access log line and ends its span.
    #[expect(
        clippy::too_many_arguments,
        reason = "one finished request's facts, each used once"
    )]
    fn told(
        &self,
        mut seen: Seen,
        route: &str,
        code: u16,
        grpc_status: &str,
        bytes: u64,
        flag: Flag,
        tries: &Tries,
    ) {
        use crate::telemetry::trace::Value;
        let service = service_name(&self.frontend.service);
        let backend = tries.backend();
        let reason = match flag {
            Flag::None => None,
            f => Some(f.label().to_owned()),
        };
        let trace_id = seen.span.as_ref().map(|s| s.trace_id_hex());
        if let Some(mut span) = seen.span.take() {
            for (at, endpoint) in tries.sent.iter().skip(1) {
                span.event_at(
                    *at,
                    "retry",
                    vec![("lacewing.backend", Value::from(endpoint.to_string()))],
                );
            }
            span.answered(&seen.method, &seen.path, code, grpc_status);
            span.attribute("lacewing.direction", "outbound");
            span.attribute("lacewing.source.workload", self.source.key());
            span.attribute("lacewing.destination.service", service.as_str());
            span.attribute("lacewing.route", route);
            if let Some(b) = backend {
                span.attribute("lacewing.backend", b.to_string());
            }
            span.attribute("lacewing.retries", i64::from(tries.retries()));
            if let Some(r) = &reason {
                span.attribute("lacewing.reason", r.as_str());
            }
            if let Some(tracer) = &self.router.telemetry.tracer {
                tracer.finish(span);
            }
        }
        if let Some(log) = &seen.log {
            let mut entry = self.entry(&seen, route, code, grpc_status, bytes, tries, reason);
            entry.trace_id = trace_id;
            log.write(&entry);
        }
    }

    #[expect(
        clippy::too_many_arguments,
        reason = "one finished request's facts, each used once"
    )]
    fn entry(
        &self,
        seen: &Seen,
        route: &str,
        code: u16,
        grpc_status: &str,
        bytes: u64,
        tries: &Tries,
        reason: Option<String>,
    ) -> crate::telemetry::access_log::Entry {
        let mut e = crate::telemetry::access_log::Entry::new("request", "outbound", seen.started)
            .from_workload(&self.source, &self.router.trust_domain);
        e.destination_service = Some(service_name(&self.frontend.service));
        e.destination_namespace = Some(self.frontend.service.0.clone());
        e.route = (!route.is_empty()).then(|| route.to_owned());
        e.backend = tries.backend().map(|b| b.to_string());
        e.protocol = seen.protocol;
        e.method = Some(seen.method.clone());
        e.path = Some(seen.path.clone());
        e.status = Some(code);
        e.grpc_status = (!grpc_status.is_empty()).then(|| grpc_status.to_owned());
        e.bytes_sent = seen.request_bytes;
        e.bytes_received = Some(bytes);
        e.retries = Some(tries.retries());
        e.reason = reason;
        e
    }

    /// The answer to one request.
    async fn route(&self, req: Request<Incoming>, grpc: bool, tries: &mut Tries) -> Routed {
        let (mut parts, body) = req.into_parts();
        let path = parts.uri.path().to_owned();
        let query = parts.uri.query().map(str::to_owned);
        let selected = self.frontend.routes.select(
            self.frontend.port,
            &self.source.namespace,
            &RequestView {
                method: &parts.method,
                path: &path,
                query: query.as_deref(),
                headers: &parts.headers,
            },
        );
        let answered = |resp, route, flag| Routed {
            resp,
            route,
            flag,
            held: None,
        };
        let Some((rule, matched)) = selected else {
            return answered(
                failure_response(Failure::NoRoute, grpc),
                String::new(),
                Flag::Failed(Failure::NoRoute),
            );
        };
        let route = rule.route.to_string();
        let policy = self.frontend.policy.as_deref();
        let mut response_modifiers = Vec::new();
        let mut mirrors = Vec::new();
        let mut path = path;
        for filter in &rule.filters {
            match filter {
                Filter::RequestHeaders(m) => modify_headers(&mut parts.headers, m),
                Filter::ResponseHeaders(m) => response_modifiers.push(m.clone()),
                Filter::Redirect(r) => {
                    let host = host_of(&parts);
                    let (host, port) = split_host_port(&host);
                    let location =
                        redirect_location(r, matched, "http", &host, port, &path, query.as_deref());
                    let mut resp = Response::new(full(Bytes::new()));
                    *resp.status_mut() =
                        StatusCode::from_u16(r.status).unwrap_or(StatusCode::FOUND);
                    if let Ok(v) = HeaderValue::from_str(&location) {
                        resp.headers_mut().insert(header::LOCATION, v);
                    }
                    return answered(resp, route, Flag::None);
                }
                Filter::Rewrite {
                    hostname,
                    path: rewrite,
                } => {
                    if let Some(h) = hostname
                        && let Ok(v) = HeaderValue::from_str(h)
                    {
                        parts.headers.insert(header::HOST, v);
                    }
                    if let Some(rw) = rewrite {
                        path = rewrite_path(&path, rw, matched);
                    }
                }
                Filter::Mirror { backend, fraction } => mirrors.push((backend.clone(), *fraction)),
            }
        }
        let mut flag = Flag::None;
        if let Some(fault) = policy.and_then(|p| p.fault) {
            let service = service_name(&self.frontend.service);
            if let Some((share, delay)) = fault.delay
                && fastrand::f64() < share
            {
                self.router.metrics.event(&service, "fault_delay");
                tokio::time::sleep(delay).await;
                flag = Flag::FaultDelay;
            }
            if let Some(abort) = fault.abort
                && fastrand::f64() < abort.share
            {
                self.router.metrics.event(&service, "fault_abort");
                return answered(fault_response(abort.answer, grpc), route, Flag::FaultAbort);
            }
        }
        // A rule's own timeout wins (`0s` there: none), else the policy's.
        let deadline = request_deadline(
            rule.timeouts
                .request
                .map_or(policy.and_then(|p| p.timeout), |d| {
                    (!d.is_zero()).then_some(d)
                }),
            &parts.headers,
        );
        let retries = rule.retry.is_some() || policy.is_some_and(|p| p.retry.is_some());
        // Kept only when a retry or a mirror may send it again: otherwise
        // it streams through (a streaming gRPC call must not wait for its
        // end).
        let mut body = if hyper::body::Body::is_end_stream(&body) {
            // Nothing to keep: replayable for free (an endpoint that
            // refuses it unprocessed gets it again, see `forward`).
            ReqBody::Buffered(Bytes::new())
        } else if retries || !mirrors.is_empty() {
            ReqBody::read(body).await
        } else {
            ReqBody::Stream(body.map_err(BoxError::from).boxed())
        };
        let forwarded = async {
            self.mirror(&mirrors, &parts, &path, query.as_deref(), &body);
            self.forward(
                rule,
                policy,
                &mut parts,
                &path,
                query.as_deref(),
                &mut body,
                grpc,
                tries,
            )
            .await
        };
        let mut routed = match deadline {
            Some(limit) => match tokio::time::timeout(limit, forwarded).await {
                Ok(routed) => routed,
                Err(_) => {
                    self.router.metrics.timeout(&route);
                    answered(
                        failure_response(Failure::Timeout, grpc),
                        String::new(),
                        Flag::Failed(Failure::Timeout),
                    )
                }
            },
            None => forwarded.await,
        };
        for m in &response_modifiers {
            modify_headers(routed.resp.headers_mut(), m);
        }
        routed.route = route;
        if routed.flag == Flag::None {
            routed.flag = flag;
        }
        routed
    }

    /// How `rule` (or else `policy`) retries a request to `service`.
    fn retry_plan<'a>(
        &self,
        rule: &'a Rule,
        policy: Option<&'a ServicePolicy>,
        service: &ServiceId,
    ) -> Option<RetryPlan<'a>> {
        let policy_retry = policy.and_then(|p| p.retry.as_ref());
        let budget = policy_retry.map_or(DEFAULT_BUDGET, |r| r.budget);
        let plan = match (&rule.retry, policy_retry) {
            (Some(r), _) => RetryPlan {
                attempts: r.attempts,
                on: Retryable::Codes(&r.codes),
                backoff: r.backoff,
                max_backoff: r.backoff.saturating_mul(1 << r.attempts.min(16)),
                budget: None,
            },
            (None, Some(p)) => RetryPlan {
                attempts: p.attempts,
                on: Retryable::Policy(&p.on),
                backoff: p.backoff,
                max_backoff: p.max_backoff,
                budget: None,
            },
            (None, None) => return None,
        };
        Some(RetryPlan {
            budget: Some(self.router.budgets.request(service, &budget)),
            ..plan
        })
    }

    /// Sends the request to a backend of `rule`, retrying as the rule (or
    /// else the policy) says, under the backend Service's circuit breaker,
    /// outlier detection and balancing.
    #[expect(
        clippy::too_many_arguments,
        reason = "one request's parts, each used once"
    )]
    async fn forward(
        &self,
        rule: &Rule,
        policy: Option<&ServicePolicy>,
        parts: &mut http::request::Parts,
        path: &str,
        query: Option<&str>,
        body: &mut ReqBody,
        grpc: bool,
        tries: &mut Tries,
    ) -> Routed {
        let answered = |resp, flag| Routed {
            resp,
            route: String::new(),
            flag,
            held: None,
        };
        let Some(backend) = pick_backend(&rule.backends) else {
            // Gateway API: no backend (or every weight 0) is a 500.
            let mut resp = Response::new(full("no backend\n"));
            *resp.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
            return answered(resp, Flag::Failed(Failure::NoBackend));
        };
        let service = (backend.namespace.clone(), backend.name.clone());
        let port = backend.port.unwrap_or(self.frontend.port);
        let all_endpoints = self.table.endpoints(&service, port);
        if all_endpoints.is_empty() {
            return answered(
                failure_response(Failure::NoBackend, grpc),
                Flag::Failed(Failure::NoBackend),
            );
        }
        // The backend Service's own policy: its breaker, outlier detection
        // and balancing apply to its endpoints whoever routed there.
        let target = self.table.policy(&service, port).map(Arc::as_ref);
        let held = match target.and_then(|p| p.breaker) {
            None => None,
            Some(limits) => {
                let http1 = parts.version != Version::HTTP_2;
                match self.router.breakers.admit(&service, &limits, http1).await {
                    Ok(admitted) => Some(admitted),
                    Err(_) => {
                        self.router
                            .metrics
                            .event(&service_name(&service), "circuit_open");
                        return answered(
                            failure_response(Failure::CircuitOpen, grpc),
                            Flag::CircuitOpen,
                        );
                    }
                }
            }
        };
        let outlier = target.and_then(|p| p.outlier);
        let endpoints = match outlier {
            Some(_) => {
                std::borrow::Cow::Owned(self.router.outliers.healthy(&service, all_endpoints))
            }
            None => std::borrow::Cow::Borrowed(all_endpoints),
        };
        let hash_key = target.and_then(|p| hash_key(&p.balance, &parts.headers));
        let choice = match (target.map(|p| &p.balance), &hash_key) {
            (_, Some(key)) => balance::Choice::Hash(key.as_bytes()),
            (Some(Balance::RoundRobin), None) => balance::Choice::RoundRobin(&service),
            _ => balance::Choice::PeakEwma,
        };
        for f in &backend.filters {
            if let Filter::RequestHeaders(m) = f {
                modify_headers(&mut parts.headers, m);
            }
        }
        let plan = self.retry_plan(rule, policy, &service);
        let per_try = rule.timeouts.backend_request.or_else(|| {
            if rule.retry.is_some() {
                None
            } else {
                policy
                    .and_then(|p| p.retry.as_ref())
                    .and_then(|r| r.per_try_timeout)
            }
        });
        let mut attempts = plan.as_ref().map_or(0, |p| p.attempts) + 1;
        let mut backoff = plan.as_ref().map_or(Duration::ZERO, |p| p.backoff);
        let mut tried = None;
        let mut last = failure_response(Failure::Unavailable, grpc);
        let mut last_flag = Flag::Failed(Failure::Unavailable);
        // A request an endpoint refused unprocessed (its HTTP/2 server was
        // closing the connection) is sent again at once, once, and is no
        // retry: the pooled connection closed under it, nothing failed.
        let (mut resend, mut resent) = (false, false);
        let mut attempt = 0;
        while attempt < attempts {
            // A body already streamed cannot go again: no retry then.
            let Some(payload) = body.take() else {
                break;
            };
            if attempt > 0 && !std::mem::take(&mut resend) {
                let plan = plan.as_ref().expect("only a plan makes attempts");
                if plan.budget.as_ref().is_some_and(|b| !b.withdraw()) {
                    self.router
                        .metrics
                        .event(&service_name(&service), "retry_budget_exhausted");
                    break;
                }
                self.router.metrics.retry(&rule.route.to_string());
                tokio::time::sleep(jittered(backoff)).await;
                backoff = (backoff * 2).min(plan.max_backoff);
            }
            attempt += 1;
            let Some(endpoint) = self.router.balancer.choose(&endpoints, tried, choice) else {
                break;
            };
            let addr = endpoint.addr();
            tried = Some(addr);
            tries.sent.push((std::time::SystemTime::now(), addr));
            let req = build_request(parts, endpoint.addr(), path, query, payload);
            let upgrade = req.headers().contains_key(header::UPGRADE);
            let sent = Arc::clone(&self.clients).send(addr, req);
            let result = match per_try {
                Some(limit) => tokio::time::timeout(limit, sent).await.map_err(|_| None),
                None => Ok(sent.await),
            };
            let outcome = match result {
                Ok(Ok(resp)) => Ok(resp),
                Ok(Err(err)) => Err(Some(err)),
                Err(none) => Err(none),
            };
            // A 5xx counts as a failure too: an endpoint that fails fast
            // must not win the latency comparison (and take every request).
            // Under outlier detection it is that, not the balancer, that
            // takes a failing endpoint out, as its policy says: failures
            // weigh only their time (else the balancer's penalty would keep
            // the endpoint from failing often enough to be ejected, and an
            // operator's ejection settings would never act).
            endpoint.done(
                outlier.is_some() || matches!(&outcome, Ok(r) if !r.status().is_server_error()),
            );
            if let Some(config) = &outlier {
                let health = match &outcome {
                    Ok(r) => resilience::Outcome::of_status(r.status().as_u16()),
                    Err(_) => resilience::Outcome::GatewayError,
                };
                if self
                    .router
                    .outliers
                    .record(&service, config, addr, health, all_endpoints.len())
                {
                    self.router
                        .metrics
                        .event(&service_name(&service), "ejection");
                }
            }
            match outcome {
                Ok(resp) => {
                    let grpc_status = resp
                        .headers()
                        .get("grpc-status")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse().ok());
                    let retryable = plan
                        .as_ref()
                        .is_some_and(|p| p.on.answer(resp.status().as_u16(), grpc_status));
                    let mut resp = resp;
                    if upgrade && resp.status() == StatusCode::SWITCHING_PROTOCOLS {
                        // The caller's side is spliced by `splice_upgrade`.
                        return Routed {
                            held,
                            ..answered(self.upgraded(parts, resp), Flag::None)
                        };
                    }
                    strip_hop_by_hop(resp.headers_mut(), false);
                    let resp = resp.map(|b| b.map_err(BoxError::from).boxed());
                    if retryable && attempt < attempts {
                        last = resp;
                        last_flag = Flag::None;
                        continue;
                    }
                    return Routed {
                        held,
                        ..answered(resp, Flag::None)
                    };
                }
                Err(Some(err)) => {
                    tracing::debug!(endpoint = %addr, %err, "request to an endpoint failed");
                    last = failure_response(Failure::Unavailable, grpc);
                    last_flag = Flag::Failed(Failure::Unavailable);
                    if !resent && crate::l7::refused_unprocessed(err.as_ref()) {
                        (resend, resent) = (true, true);
                        attempts += 1;
                    } else if !plan
                        .as_ref()
                        .is_some_and(|p| p.on.error(connect_failed(err.as_ref())))
                    {
                        break;
                    }
                }
                Err(None) => {
                    last = failure_response(Failure::Timeout, grpc);
                    last_flag = Flag::Failed(Failure::Timeout);
                    if !plan.as_ref().is_some_and(|p| p.on.error(false)) {
                        break;
                    }
                }
            }
        }
        Routed {
            held,
            ..answered(last, last_flag)
        }
    }

    /// A `101` from the endpoint: the client's upgraded stream and the
    /// endpoint's are spliced once both are ready.
    fn upgraded(
        &self,
        parts: &mut http::request::Parts,
        resp: Response<Incoming>,
    ) -> Response<Body> {
        let client_side = parts.extensions.remove::<hyper::upgrade::OnUpgrade>();
        let (mut head, body) = resp.into_parts();
        let endpoint_side = hyper::upgrade::on(Response::from_parts(head.clone(), body));
        head.extensions = http::Extensions::new();
        if let Some(client_side) = client_side {
            tokio::spawn(async move {
                let (Ok(client), Ok(endpoint)) = tokio::join!(client_side, endpoint_side) else {
                    return;
                };
                let mut client = TokioIo::new(client);
                let mut endpoint = TokioIo::new(endpoint);
                let _ = tokio::io::copy_bidirectional(&mut client, &mut endpoint).await;
            });
        }
        Response::from_parts(head, full(Bytes::new()))
    }

    /// Sends copies of the request to the mirrors (fire and forget: never
    /// awaited, never slows or fails the original).
    fn mirror(
        &self,
        mirrors: &[(model::Backend, (u32, u32))],
        parts: &http::request::Parts,
        path: &str,
        query: Option<&str>,
        body: &ReqBody,
    ) {
        for (backend, (num, den)) in mirrors {
            if *den == 0 || fastrand::u32(0..*den) >= *num {
                continue;
            }
            let ReqBody::Buffered(bytes) = body else {
                // A streamed body cannot be copied without holding it.
                continue;
            };
            let port = backend.port.unwrap_or(self.frontend.port);
            let service = (backend.namespace.clone(), backend.name.clone());
            let Some(endpoint) = self
                .router
                .balancer
                .pick(self.table.endpoints(&service, port), None)
            else {
                continue;
            };
            let req = build_request(parts, endpoint.addr(), path, query, full(bytes.clone()));
            let (clients, addr) = (Arc::clone(&self.clients), endpoint.addr());
            let metrics = self.router.metrics.clone();
            let name = format!("{}/{}", backend.namespace, backend.name);
            tokio::spawn(async move {
                let ok = match clients.send(addr, req).await {
                    Ok(resp) => {
                        let _ = resp.into_body().collect().await;
                        true
                    }
                    Err(_) => false,
                };
                endpoint.done(ok);
                metrics.mirrored(&name);
            });
        }
    }
}

/// The request for one attempt at `endpoint`.
fn build_request(
    parts: &http::request::Parts,
    endpoint: SocketAddr,
    path: &str,
    query: Option<&str>,
    body: Body,
) -> Request<Body> {
    let path_and_query = match query {
        Some(q) => format!("{path}?{q}"),
        None => path.to_owned(),
    };
    let mut headers = parts.headers.clone();
    // HTTP/1.1 goes by hyper-util's pool, keyed by the URI's authority: the
    // endpoint (the Host header is sent as it is). HTTP/2 carries the
    // authority in the URI: the client's (or a rewrite's Host), so the pod
    // sees the name the client used; a Host header would clash.
    let authority = if parts.version == Version::HTTP_2 {
        headers
            .remove(header::HOST)
            .and_then(|h| h.to_str().ok().map(str::to_owned))
            .or_else(|| parts.uri.authority().map(ToString::to_string))
            .unwrap_or_else(|| endpoint.to_string())
    } else {
        endpoint.to_string()
    };
    let uri = Uri::builder()
        .scheme("http")
        .authority(authority)
        .path_and_query(path_and_query)
        .build()
        .unwrap_or_else(|_| Uri::from_static("/"));
    let mut req = Request::new(body);
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = uri;
    *req.version_mut() = if parts.version == Version::HTTP_2 {
        Version::HTTP_2
    } else {
        Version::HTTP_11
    };
    let upgrade = parts.version != Version::HTTP_2 && headers.contains_key(header::UPGRADE);
    strip_hop_by_hop(&mut headers, upgrade);
    *req.headers_mut() = headers;
    req
}

/// A backend by weight; `None` when there is none or every weight is 0.
fn pick_backend(backends: &[model::Backend]) -> Option<&model::Backend> {
    weighted(backends, |b| u64::from(b.weight))
}

/// One of `items` at random, each as likely as its weight; `None` when
/// the weights add up to 0.
fn weighted<T>(items: &[T], weight: impl Fn(&T) -> u64) -> Option<&T> {
    let total: u64 = items.iter().map(&weight).sum();
    if total == 0 {
        return None;
    }
    let mut roll = fastrand::u64(0..total);
    items.iter().find(|item| {
        let w = weight(item);
        if roll < w {
            true
        } else {
            roll -= w;
            false
        }
    })
}

/// The deadline of a request: its route's (or policy's) timeout and a gRPC
/// client's `grpc-timeout`, whichever is sooner.
fn request_deadline(route: Option<Duration>, headers: &HeaderMap) -> Option<Duration> {
    let grpc = headers
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(grpc_timeout);
    match (route, grpc) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// gRPC's `grpc-timeout`: up to 8 digits and a unit (H M S m u n).
pub fn grpc_timeout(text: &str) -> Option<Duration> {
    let (digits, unit) = text.split_at(text.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// `namespace/name`, as metrics label a Service.
fn service_name(service: &ServiceId) -> String {
    format!("{}/{}", service.0, service.1)
}

/// The key a consistent-hash policy balances a request on, if it has one.
fn hash_key(balance: &Balance, headers: &HeaderMap) -> Option<String> {
    match balance {
        Balance::Header(name) => headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        Balance::Cookie(name) => headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .find_map(|pair| {
                let (k, v) = pair.trim().split_once('=')?;
                (k == name).then(|| v.to_owned())
            }),
        Balance::PeakEwma | Balance::RoundRobin => None,
    }
}

/// An injected abort: the policy's HTTP status (in gRPC form to a gRPC
/// client: the code gRPC maps the status to) or gRPC code (in HTTP form to
/// others: the status gRPC's gateways map it to).
fn fault_response(abort: AbortAnswer, grpc: bool) -> Response<Body> {
    let (status, code) = match abort {
        AbortAnswer::Http(s) => (s, grpc_code_of_http(s)),
        AbortAnswer::Grpc(c) => (http_of_grpc_code(c), c),
    };
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    answer::mesh_error(grpc, status, code, "fault_abort")
}

/// gRPC's mapping of an HTTP status to a code (its HTTP-to-gRPC doc).
fn grpc_code_of_http(status: u16) -> u16 {
    match status {
        400 => 13,
        401 => 16,
        403 => 7,
        404 => 12,
        429 | 502..=504 => 14,
        _ => 2,
    }
}

/// The HTTP status for a gRPC code (as gRPC gateways answer it).
fn http_of_grpc_code(code: u16) -> u16 {
    match code {
        3 | 9 | 11 => 400,
        16 => 401,
        7 => 403,
        5 => 404,
        6 | 10 => 409,
        8 => 429,
        1 => 499,
        12 => 501,
        14 => 503,
        4 => 504,
        _ => 500,
    }
}

/// `d` plus up to half of it again, so retries of many clients spread out.
fn jittered(d: Duration) -> Duration {
    d + d.mul_f64(fastrand::f64() / 2.0)
}

fn host_of(parts: &http::request::Parts) -> String {
    parts
        .uri
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            parts
                .headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        })
        .unwrap_or_default()
}

fn split_host_port(authority: &str) -> (String, Option<u16>) {
    match authority.rsplit_once(':') {
        Some((host, port)) if !host.ends_with(']') || host.starts_with('[') => match port.parse() {
            Ok(p) => (host.to_owned(), Some(p)),
            Err(_) => (authority.to_owned(), None),
        },
        _ => (authority.to_owned(), None),
    }
}

/// An endpoint for a client that no route applies to: one pick per
/// connection, weighted at random, as the kernel balances.
pub fn pick_l4(table: &RouteTable, frontend: &Frontend) -> Option<SocketAddr> {
    let endpoints = table.endpoints(&frontend.service, frontend.port);
    weighted(endpoints, |e: &BackendEntry| u64::from(e.weight)).map(|e| e.addr)
}

/// `n` endpoints, 10.0.0.1:80 on, for the balancing tests.
#[cfg(test)]
fn test_endpoints(n: u8) -> Vec<BackendEntry> {
    (1..=n)
        .map(|i| BackendEntry {
            addr: SocketAddr::from(([10, 0, 0, i], 80)),
            weight: 1,
        })
        .collect()
}

#[cfg(test)]
mod tests;
