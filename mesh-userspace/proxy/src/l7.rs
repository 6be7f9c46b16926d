//! HTTP inside a connection to a pod that an AuthorizationPolicy with L7
//! conditions selects (methods, paths, headers), or that a TrafficPolicy's
//! rate limit covers per request: the destination's node
//! reads each request (HTTP/1.1 or HTTP/2, told apart by the preface),
//! decides it with the peer's proven identity, and either answers the
//! refusal itself or passes the request to the pod over the connection it
//! holds to it (one at a time per client connection). A refused request
//! does not end the connection: the next one on it is decided again.
//!
//! The connection to the pod is the node's own: when the pod ends it (an
//! nginx closes a keep-alive connection after `keepalive_requests`, an
//! HTTP/2 server sends GOAWAY), the next request opens a new one, and a
//! request the old one refused before sending it is sent on the new one. The
//! client's connection lives on as a sidecar's would.
//!
//! An upgrade the policies allow (WebSocket, or any `Upgrade:`) is passed
//! to the pod, and once it answers `101 Switching Protocols` the two
//! upgraded streams are spliced until either ends.
//!
//! A refusal is 403 with `x-lacewing-denied-by: <namespace>/<policy>`; to a
//! gRPC client (`content-type: application/grpc...`) it is gRPC's
//! PERMISSION_DENIED (HTTP 200, `grpc-status: 7`, no body), with the same
//! header. Over a rate limit it is 429 with `Retry-After` (gRPC's
//! RESOURCE_EXHAUSTED). Each is logged and counted as a denied connection
//! is.

use std::{
    io,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use bytes::Bytes;
use futures::future::BoxFuture;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Empty, combinators::BoxBody};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use lacewing_core::model::authorization;
use lacewing_tunnel::{Peer, Refusal, metrics::TunnelMetrics};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};
use tokio_util::sync::CancellationToken;

use crate::{
    splice::{BoxedStream, Unread, Watch, Watched},
    telemetry::Seen,
};

/// The destination's side of each request (the inbound checks, for the
/// proxy): who decides it, and how a new connection to the pod is opened.
pub trait PodSide: Send + Sync + 'static {
    /// The peer, the destination and the request, to its refusal if
    /// refused.
    fn decide_request(
        &self,
        peer: &Peer,
        dest: SocketAddr,
        request: &authorization::Request<'_>,
    ) -> Result<(), Refusal>;

    /// A new connection to the pod at `dest` (after the pod ended the
    /// last one), with the watch on its spliced writes.
    fn reconnect(&self, dest: SocketAddr) -> BoxFuture<'static, io::Result<PodConnection>>;
}

/// Why the mesh answered a request itself.
struct Refused {
    reason: &'static str,
    policy: Option<String>,
}

/// How a decided request ended.
struct Said<'a> {
    identity: String,
    source: Option<std::net::IpAddr>,
    dest: SocketAddr,
    code: u16,
    grpc_status: &'a str,
    bytes: u64,
    refusal: Option<Refused>,
}

/// Writes a decided request's access log line and ends its span.
fn told(seen: Seen, requests: &Requests, said: Said<'_>) {
    let pod = &requests.pod;
    let trace_id = seen.span.as_ref().map(|s| s.trace_id_hex());
    if let Some(mut span) = seen.span {
        span.answered(&seen.method, &seen.path, said.code, said.grpc_status);
        span.attribute("lacewing.direction", "inbound");
        span.attribute("lacewing.source.identity", said.identity.as_str());
        span.attribute("lacewing.destination.workload", pod.key());
        if let Some(r) = &said.refusal {
            span.attribute("lacewing.reason", r.reason);
            if let Some(p) = &r.policy {
                span.attribute("lacewing.policy", p.as_str());
            }
        }
        if let Some(tracer) = &requests.telemetry.tracer {
            tracer.finish(span);
        }
    }
    let Some(log) = seen.log else {
        return;
    };
    let mut e = crate::telemetry::access_log::Entry::new("request", "inbound", seen.started)
        .to_workload(pod, &requests.trust_domain);
    e.source_namespace = crate::metrics::namespace_of(&said.identity).map(str::to_owned);
    e.source_identity = Some(said.identity);
    e.source_address = said.source.map(|a| a.to_string());
    e.destination_address = Some(said.dest.to_string());
    e.protocol = seen.protocol;
    e.method = Some(seen.method);
    e.path = Some(seen.path);
    e.status = Some(said.code);
    e.grpc_status = (!said.grpc_status.is_empty()).then(|| said.grpc_status.to_owned());
    e.bytes_sent = seen.request_bytes;
    e.bytes_received = Some(said.bytes);
    if let Some(r) = said.refusal {
        e.reason = Some(r.reason.to_owned());
        e.policy = r.policy;
    }
    e.trace_id = trace_id;
    log.write(&e);
}

/// A connection to the pod and the watch on the pod's spliced writes into it.
pub type PodConnection = (TcpStream, Option<Arc<Watch>>);

/// The header that names the policy that refused a request.
pub const DENIED_BY: &str = "x-lacewing-denied-by";
/// gRPC's PERMISSION_DENIED.
const GRPC_PERMISSION_DENIED: u16 = 7;
/// gRPC's RESOURCE_EXHAUSTED.
const GRPC_RESOURCE_EXHAUSTED: u16 = 8;

type Body = BoxBody<Bytes, hyper::Error>;

/// The connection to the pod, speaking the protocol of the client's
/// requests.
enum Upstream {
    Http1(hyper::client::conn::http1::SendRequest<Body>),
    Http2(hyper::client::conn::http2::SendRequest<Body>),
}

impl Upstream {
    fn is_closed(&self) -> bool {
        match self {
            Self::Http1(s) => s.is_closed(),
            Self::Http2(s) => s.is_closed(),
        }
    }
}

/// Where a pod's decided requests are counted (`direction="inbound"`).
#[derive(Clone)]
pub struct Requests {
    pub metrics: crate::metrics::RequestMetrics,
    pub pod: Arc<lacewing_core::model::workloads::Workload>,
    /// The access log and tracer, and the trust domain identities are in.
    pub telemetry: crate::telemetry::Telemetry,
    pub trust_domain: String,
}

/// What one connection's requests share.
struct Connection {
    /// Cancelled when the registry closes the connection; ends an upgraded
    /// stream too.
    closed: CancellationToken,
    pod_side: Arc<dyn PodSide>,
    metrics: TunnelMetrics,
    requests: Option<Requests>,
    peer: Peer,
    dest: SocketAddr,
    /// The pod's socket until the first allowed request opens the upstream.
    pod: Mutex<Option<Watched<TcpStream>>>,
    /// Counts the bytes read from the pod, over every connection to it.
    from_pod: Arc<AtomicU64>,
    client_watch: Option<Arc<Watch>>,
    /// The current connection to the pod. Held across a request on
    /// HTTP/1.1 (one request at a time), only to clone the sender on HTTP/2.
    upstream: tokio::sync::Mutex<Slot>,
}

/// The connection to the pod, if one is open, and how many were opened: a
/// request that failed on connection `n` lets go of that one only, not of a
/// newer one another request opened meanwhile.
#[derive(Default)]
struct Slot {
    current: Option<Upstream>,
    opened: u64,
}

/// Serves the HTTP of `client` (a tunnel stream, or a same-node app's
/// socket) for the pod behind `pod` until either side ends or `closed` is
/// cancelled; returns the bytes read from the client and from the pod.
#[expect(
    clippy::too_many_arguments,
    reason = "one connection's parts, each used once"
)]
pub async fn serve<C>(
    client: C,
    client_watch: Option<Arc<Watch>>,
    pod: TcpStream,
    pod_watch: Option<Arc<Watch>>,
    peer: Peer,
    dest: SocketAddr,
    pod_side: Arc<dyn PodSide>,
    metrics: TunnelMetrics,
    requests: Option<Requests>,
    closed: &CancellationToken,
) -> (u64, u64)
where
    C: AsyncRead + AsyncWrite + Unread + Unpin + Send + 'static,
{
    let (from_client, from_pod) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let client: BoxedStream = Box::new(
        Watched::new(client, client_watch.clone(), pod_watch.clone())
            .counted(Arc::clone(&from_client)),
    );
    let pod = Watched::new(pod, pod_watch, client_watch.clone()).counted(Arc::clone(&from_pod));
    let connection = Arc::new(Connection {
        closed: closed.clone(),
        pod_side,
        metrics,
        requests,
        peer,
        dest,
        pod: Mutex::new(Some(pod)),
        from_pod: Arc::clone(&from_pod),
        client_watch,
        upstream: tokio::sync::Mutex::default(),
    });
    serve_boxed(client, connection, closed).await;
    (
        from_client.load(Ordering::Relaxed),
        from_pod.load(Ordering::Relaxed),
    )
}

/// [`serve`] past its one generic step: nothing here (the HTTP server
/// above all) is compiled once per kind of client stream.
async fn serve_boxed(client: BoxedStream, connection: Arc<Connection>, closed: &CancellationToken) {
    let dest = connection.dest;
    let service = hyper::service::service_fn(move |req| {
        let connection = Arc::clone(&connection);
        async move { Ok::<_, std::convert::Infallible>(connection.handle(req).await) }
    });
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    let serving = builder.serve_connection_with_upgrades(TokioIo::new(client), service);
    tokio::select! {
        ended = serving => {
            if let Err(err) = ended {
                tracing::debug!(%dest, %err, "HTTP connection ended");
            }
        }
        () = closed.cancelled() => {}
    }
}

impl Connection {
    /// One request, decided and answered; counted when its answer ends.
    async fn handle(&self, mut req: Request<Incoming>) -> Response<Body> {
        let started = std::time::Instant::now();
        let seen = self.seen(&mut req);
        let (resp, refusal) = self.decide_and_forward(req).await;
        let Some(requests) = self.requests.clone() else {
            return resp;
        };
        let identity = self.peer.identity.clone();
        let code = resp.status().as_u16();
        let (source, dest) = (self.peer.source, self.dest);
        crate::metrics::observe(resp, move |grpc_status, bytes| {
            let labels =
                crate::metrics::RequestLabels::inbound(&identity, &requests.pod, code, grpc_status);
            requests.metrics.record(&labels, started.elapsed());
            if let Some(seen) = seen {
                told(
                    seen,
                    &requests,
                    Said {
                        identity,
                        source,
                        dest,
                        code,
                        grpc_status,
                        bytes,
                        refusal,
                    },
                );
            }
        })
    }

    /// What the access log and the tracer need of `req`, when either is on
    /// for the pod.
    fn seen(&self, req: &mut Request<Incoming>) -> Option<Seen> {
        let requests = self.requests.as_ref()?;
        let telemetry = &requests.telemetry;
        let log = telemetry.log_for(Some(&requests.pod)).cloned();
        let span = telemetry.tracer.as_ref().and_then(|t| {
            let name = || format!("{} {}", req.method(), requests.pod.key());
            t.start_span(req.headers(), name, crate::telemetry::trace::Kind::Server)
        });
        Seen::of(req, log, span)
    }

    /// The answer to `req`, and the refusal when the mesh refused it.
    async fn decide_and_forward(
        &self,
        mut req: Request<Incoming>,
    ) -> (Response<Body>, Option<Refused>) {
        let denied = {
            let request = authorization::Request {
                method: req.method().as_str(),
                path: req.uri().path(),
                headers: req.headers(),
            };
            self.pod_side
                .decide_request(&self.peer, self.dest, &request)
                .err()
        };
        if let Some(refusal) = denied {
            // A policy's denial is worth a line each; a rate limit's are
            // many by nature (a flood), and counted: debug only.
            macro_rules! refused_line {
                ($level:ident) => {
                    tracing::$level!(
                        identity = %self.peer.identity,
                        source = ?self.peer.source,
                        dest = %self.dest,
                        method = %req.method(),
                        path = %req.uri().path(),
                        reason = refusal.reason,
                        detail = %refusal.detail,
                        policy = ?refusal.policy,
                        "request refused"
                    )
                };
            }
            if refusal.retry_after.is_some() {
                refused_line!(debug);
            } else {
                refused_line!(info);
            }
            self.metrics.refused(&refusal);
            return (
                refused(&req, &refusal),
                Some(Refused {
                    reason: refusal.reason,
                    policy: refusal.policy.clone(),
                }),
            );
        }
        // An upgrade (WebSocket...) allowed here: once the pod switches
        // protocols, the two upgraded streams are spliced.
        let upgrade = req
            .headers()
            .contains_key(http::header::UPGRADE)
            .then(|| hyper::upgrade::on(&mut req));
        match self.forward(req).await {
            Ok(mut resp) => {
                if let Some(client) = upgrade
                    && resp.status() == StatusCode::SWITCHING_PROTOCOLS
                {
                    let pod = hyper::upgrade::on(&mut resp);
                    let closed = self.closed.clone();
                    tokio::spawn(async move {
                        let (Ok(client), Ok(pod)) = tokio::join!(client, pod) else {
                            return;
                        };
                        let (mut client, mut pod) = (TokioIo::new(client), TokioIo::new(pod));
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut client, &mut pod) => {}
                            () = closed.cancelled() => {}
                        }
                    });
                }
                (resp.map(http_body_util::BodyExt::boxed), None)
            }
            Err(err) => {
                tracing::info!(dest = %self.dest, %err, "the pod did not answer a request");
                (
                    status(StatusCode::BAD_GATEWAY),
                    Some(Refused {
                        reason: "pod_unreachable",
                        policy: None,
                    }),
                )
            }
        }
    }

    /// Sends `req` to the pod over the current connection, or a new one
    /// when the pod closed it. A request the closing connection returned
    /// unsent, or that the pod refused unprocessed (HTTP/2: REFUSED_STREAM,
    /// or a stream past a GOAWAY's last one) with no body, goes again on a
    /// new connection.
    async fn forward(&self, req: Request<Incoming>) -> Result<Response<Incoming>, ForwardError> {
        let http2 = req.version() == http::Version::HTTP_2;
        let replay = hyper::body::Body::is_end_stream(req.body()).then(|| head_of(&req));
        let mut req = req.map(http_body_util::BodyExt::boxed);
        for _ in 0..3 {
            let (sent, used) = if http2 {
                let (mut send, used) = {
                    let mut slot = self.upstream.lock().await;
                    match self.open(&mut slot, true).await? {
                        (Upstream::Http2(send), used) => (send.clone(), used),
                        (Upstream::Http1(_), _) => return Err(ForwardError::ProtocolChanged),
                    }
                };
                (send.try_send_request(req).await, used)
            } else {
                // One request at a time on HTTP/1.1: the lock is held
                // until the response head arrives.
                let mut slot = self.upstream.lock().await;
                let (Upstream::Http1(send), used) = self.open(&mut slot, false).await? else {
                    return Err(ForwardError::ProtocolChanged);
                };
                if send.ready().await.is_err() {
                    // Closed between the check and the request: unsent.
                    slot.current = None;
                    continue;
                }
                (send.try_send_request(req).await, used)
            };
            let mut err = match sent {
                Ok(resp) => return Ok(resp),
                Err(err) => err,
            };
            req = match (err.take_message(), &replay) {
                (Some(unsent), _) => unsent,
                (None, Some(head)) if refused_unprocessed(err.error()) => head.request(),
                (None, _) => return Err(err.into_error().into()),
            };
            // The connection is closing (GOAWAY): the next try opens another.
            let mut slot = self.upstream.lock().await;
            if slot.opened == used {
                slot.current = None;
            }
            tracing::debug!(dest = %self.dest, error = %err.error(), "the pod's connection closed; sending again on another");
        }
        Err(ForwardError::PodConnectionLost)
    }

    /// The open connection to the pod in `slot` and its number, or a new
    /// one: the pod's first socket, then a new connection each time the pod
    /// closed the last.
    async fn open<'a>(
        &self,
        slot: &'a mut Slot,
        http2: bool,
    ) -> Result<(&'a mut Upstream, u64), ForwardError> {
        if slot.current.as_ref().is_some_and(Upstream::is_closed) {
            slot.current = None;
        }
        if slot.current.is_none() {
            let first = self.pod.lock().unwrap_or_else(|p| p.into_inner()).take();
            let pod = match first {
                Some(pod) => pod,
                None => {
                    let (stream, watch) = self.pod_side.reconnect(self.dest).await?;
                    Watched::new(stream, watch, self.client_watch.clone())
                        .counted(Arc::clone(&self.from_pod))
                }
            };
            let io = TokioIo::new(pod);
            slot.current = Some(if http2 {
                let (send, conn) =
                    hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
                tokio::spawn(conn);
                Upstream::Http2(send)
            } else {
                let (send, conn) = hyper::client::conn::http1::handshake(io).await?;
                tokio::spawn(conn.with_upgrades());
                Upstream::Http1(send)
            });
            slot.opened += 1;
        }
        let opened = slot.opened;
        Ok((slot.current.as_mut().expect("set above"), opened))
    }
}

/// What is needed to send a request without a body again.
struct Head {
    method: http::Method,
    uri: http::Uri,
    version: http::Version,
    headers: http::HeaderMap,
}

fn head_of<B>(req: &Request<B>) -> Head {
    Head {
        method: req.method().clone(),
        uri: req.uri().clone(),
        version: req.version(),
        headers: req.headers().clone(),
    }
}

impl Head {
    fn request(&self) -> Request<Body> {
        let mut req = Request::new(Empty::new().map_err(|never| match never {}).boxed());
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.uri.clone();
        *req.version_mut() = self.version;
        *req.headers_mut() = self.headers.clone();
        req
    }
}

/// Whether the pod's HTTP/2 server refused the request without processing
/// it (RFC 9113 section 8.7): REFUSED_STREAM, or a stream above the last one
/// its GOAWAY accepted. Such a request may be sent again (the router's
/// too).
pub(crate) fn refused_unprocessed(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(err);
    while let Some(e) = source {
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            return h2.reason() == Some(h2::Reason::REFUSED_STREAM)
                || (h2.is_go_away() && h2.is_remote());
        }
        source = e.source();
    }
    false
}

/// Why a request did not reach the pod (the client gets 502).
#[derive(Debug, thiserror::Error)]
enum ForwardError {
    #[error("the pod closed two connections in a row before taking the request")]
    PodConnectionLost,
    #[error("HTTP/1.1 and HTTP/2 requests on one connection")]
    ProtocolChanged,
    #[error("connecting to the pod again: {0}")]
    Reconnect(#[from] io::Error),
    #[error(transparent)]
    Http(#[from] hyper::Error),
}

/// The answer to a refused request: gRPC's form to a gRPC client, else 403
/// (429 with `Retry-After` for a rate limit).
fn refused<B>(req: &Request<B>, refusal: &Refusal) -> Response<Body> {
    let grpc = crate::answer::is_grpc(req.headers());
    let mut resp = match refusal.retry_after {
        None => crate::answer::own(
            grpc,
            StatusCode::FORBIDDEN,
            GRPC_PERMISSION_DENIED,
            "denied by an AuthorizationPolicy",
        ),
        Some(wait) => {
            let mut resp = crate::answer::mesh_error(
                grpc,
                StatusCode::TOO_MANY_REQUESTS,
                GRPC_RESOURCE_EXHAUSTED,
                "rate_limited",
            );
            // Whole seconds, at least 1, as `Retry-After` must.
            let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            resp.headers_mut()
                .insert(http::header::RETRY_AFTER, HeaderValue::from(seconds.max(1)));
            resp
        }
    };
    if let Some(value) = refusal
        .policy
        .as_deref()
        .and_then(|p| HeaderValue::from_str(p).ok())
    {
        resp.headers_mut().insert(DENIED_BY, value);
    }
    resp
}

fn status(code: StatusCode) -> Response<Body> {
    let mut resp = Response::new(Empty::new().map_err(|never| match never {}).boxed());
    *resp.status_mut() = code;
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An error that carries another as its source, as hyper's and
    /// hyper-util's carry h2's.
    #[derive(Debug)]
    struct Wrapped(h2::Error);

    impl std::fmt::Display for Wrapped {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("request failed")
        }
    }

    impl std::error::Error for Wrapped {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn only_a_refused_stream_counts_as_unprocessed_wherever_it_is_in_the_chain() {
        let refused = || h2::Error::from(h2::Reason::REFUSED_STREAM);
        assert!(refused_unprocessed(&refused()));
        assert!(refused_unprocessed(&Wrapped(refused())));
        // A stream the server reset for another reason may have been
        // processed: never sent twice.
        for reason in [
            h2::Reason::INTERNAL_ERROR,
            h2::Reason::CANCEL,
            h2::Reason::NO_ERROR,
        ] {
            assert!(
                !refused_unprocessed(&Wrapped(h2::Error::from(reason))),
                "{reason:?}"
            );
        }
        assert!(!refused_unprocessed(&std::io::Error::from(
            std::io::ErrorKind::ConnectionReset
        )));
    }

    #[test]
    fn a_bodiless_request_is_rebuilt_whole_for_a_second_try() {
        let original = Request::get("http://shop.example/items?x=1")
            .version(http::Version::HTTP_2)
            .header("x-user", "team-shop")
            .body(())
            .unwrap();
        let again = head_of(&original).request();
        assert_eq!(again.method(), original.method());
        assert_eq!(again.uri(), original.uri());
        assert_eq!(again.version(), http::Version::HTTP_2);
        assert_eq!(again.headers(), original.headers());
        assert!(hyper::body::Body::is_end_stream(again.body()));
    }

    fn refusal() -> Refusal {
        Refusal {
            retry_after: None,
            status: 403,
            reason: "policy_denied",
            detail: String::new(),
            policy: Some("shop/get-only".to_owned()),
        }
    }

    #[test]
    fn a_refused_request_names_the_policy_in_http_or_grpc_form() {
        let plain = Request::delete("/items/1").body(()).unwrap();
        let resp = refused(&plain, &refusal());
        assert_eq!(resp.status(), StatusCode::FORBIDDEN);
        assert_eq!(resp.headers()[DENIED_BY], "shop/get-only");
        let grpc = Request::post("/shop.Items/Delete")
            .header("content-type", "application/grpc+proto")
            .body(())
            .unwrap();
        let resp = refused(&grpc, &refusal());
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()["grpc-status"], "7");
        assert_eq!(resp.headers()["content-type"], "application/grpc");
        assert_eq!(resp.headers()[DENIED_BY], "shop/get-only");
    }
}
