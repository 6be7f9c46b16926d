//! HTTP inside a connection to a pod that an AuthorizationPolicy with L7
//! conditions selects (methods, paths, headers): the destination's node
//! reads each request (HTTP/1.1 or HTTP/2, told apart by the preface),
//! decides it with the peer's proven identity, and either answers the
//! refusal itself or passes the request to the pod over the one connection
//! it holds to it. A refused request does not end the connection: the next
//! one on it is decided again.
//!
//! An upgrade the policies allow (WebSocket, or any `Upgrade:`) is passed
//! to the pod, and once it answers `101 Switching Protocols` the two
//! upgraded streams are spliced until either ends.
//!
//! A refusal is 403 with `x-lacewing-denied-by: <namespace>/<policy>`; to a
//! gRPC client (`content-type: application/grpc...`) it is gRPC's
//! PERMISSION_DENIED (HTTP 200, `grpc-status: 7`, no body), with the same
//! header. Each is logged and counted as a denied connection is.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Empty, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use lacewing_core::model::authorization;
use lacewing_tunnel::{Peer, Refusal, metrics::TunnelMetrics};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
    sync::OnceCell,
};
use tokio_util::sync::CancellationToken;

use crate::splice::{Unread, Watch, Watched};

/// Who decides each request (the inbound checks, for the proxy): the peer,
/// the destination and the request, to its refusal if refused.
pub trait DecideRequest: Send + Sync + 'static {
    fn decide_request(
        &self,
        peer: &Peer,
        dest: SocketAddr,
        request: &authorization::Request<'_>,
    ) -> Result<(), Refusal>;
}

/// The header that names the policy that refused a request.
pub const DENIED_BY: &str = "x-lacewing-denied-by";
/// gRPC's PERMISSION_DENIED.
const GRPC_PERMISSION_DENIED: &str = "7";

type Body = BoxBody<Bytes, hyper::Error>;

/// The one connection to the pod, speaking the protocol of the client's
/// first request.
enum Upstream {
    Http1(tokio::sync::Mutex<hyper::client::conn::http1::SendRequest<Incoming>>),
    Http2(hyper::client::conn::http2::SendRequest<Incoming>),
}

/// Where a pod's decided requests are counted (`direction="inbound"`).
#[derive(Clone)]
pub struct Requests {
    pub metrics: crate::metrics::RequestMetrics,
    pub pod: Arc<lacewing_core::model::workloads::Workload>,
}

/// What one connection's requests share.
struct Connection {
    /// Cancelled when the registry closes the connection; ends an upgraded
    /// stream too.
    closed: CancellationToken,
    decide: Arc<dyn DecideRequest>,
    metrics: TunnelMetrics,
    requests: Option<Requests>,
    peer: Peer,
    dest: SocketAddr,
    /// The pod's socket until the first allowed request opens the upstream.
    pod: Mutex<Option<Watched<TcpStream>>>,
    upstream: OnceCell<Upstream>,
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
    decide: Arc<dyn DecideRequest>,
    metrics: TunnelMetrics,
    requests: Option<Requests>,
    closed: &CancellationToken,
) -> (u64, u64)
where
    C: AsyncRead + AsyncWrite + Unread + Unpin + Send + 'static,
{
    let (from_client, from_pod) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let client = Watched::new(client, client_watch.clone(), pod_watch.clone())
        .counted(Arc::clone(&from_client));
    let pod = Watched::new(pod, pod_watch, client_watch).counted(Arc::clone(&from_pod));
    let connection = Arc::new(Connection {
        closed: closed.clone(),
        decide,
        metrics,
        requests,
        peer,
        dest,
        pod: Mutex::new(Some(pod)),
        upstream: OnceCell::new(),
    });
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
    (
        from_client.load(Ordering::Relaxed),
        from_pod.load(Ordering::Relaxed),
    )
}

impl Connection {
    /// One request, decided and answered; counted when its answer ends.
    async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        let started = std::time::Instant::now();
        let resp = self.decide_and_forward(req).await;
        let Some(requests) = self.requests.clone() else {
            return resp;
        };
        let identity = self.peer.identity.clone();
        let code = resp.status().as_u16();
        crate::metrics::observe(resp, move |grpc_status| {
            let labels =
                crate::metrics::RequestLabels::inbound(&identity, &requests.pod, code, grpc_status);
            requests.metrics.record(&labels, started.elapsed());
        })
    }

    async fn decide_and_forward(&self, mut req: Request<Incoming>) -> Response<Body> {
        let denied = {
            let request = authorization::Request {
                method: req.method().as_str(),
                path: req.uri().path(),
                headers: req.headers(),
            };
            self.decide
                .decide_request(&self.peer, self.dest, &request)
                .err()
        };
        if let Some(refusal) = denied {
            tracing::info!(
                identity = %self.peer.identity,
                source = ?self.peer.source,
                dest = %self.dest,
                method = %req.method(),
                path = %req.uri().path(),
                reason = refusal.reason,
                detail = %refusal.detail,
                policy = ?refusal.policy,
                "request refused"
            );
            self.metrics.refused(&refusal);
            return refused(&req, &refusal);
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
                resp.map(http_body_util::BodyExt::boxed)
            }
            Err(err) => {
                tracing::info!(dest = %self.dest, %err, "the pod did not answer a request");
                status(StatusCode::BAD_GATEWAY)
            }
        }
    }

    async fn forward(&self, req: Request<Incoming>) -> Result<Response<Incoming>, ForwardError> {
        let http2 = req.version() == http::Version::HTTP_2;
        let upstream = self
            .upstream
            .get_or_try_init(|| async {
                // Taken by the first request; gone if its handshake failed.
                let pod = self
                    .pod
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .take()
                    .ok_or(ForwardError::PodConnectionLost)?;
                let io = TokioIo::new(pod);
                if http2 {
                    let (send, conn) =
                        hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
                    tokio::spawn(conn);
                    Ok::<_, ForwardError>(Upstream::Http2(send))
                } else {
                    let (send, conn) = hyper::client::conn::http1::handshake(io).await?;
                    tokio::spawn(conn.with_upgrades());
                    Ok(Upstream::Http1(tokio::sync::Mutex::new(send)))
                }
            })
            .await?;
        Ok(match upstream {
            Upstream::Http2(send) => send.clone().send_request(req).await?,
            Upstream::Http1(send) => {
                let mut send = send.lock().await;
                send.ready().await?;
                send.send_request(req).await?
            }
        })
    }
}

/// Why a request did not reach the pod (the client gets 502).
#[derive(Debug, thiserror::Error)]
enum ForwardError {
    #[error("the connection to the pod failed earlier on this connection")]
    PodConnectionLost,
    #[error(transparent)]
    Http(#[from] hyper::Error),
}

/// The answer to a refused request: gRPC's form to a gRPC client, else 403.
fn refused<B>(req: &Request<B>, refusal: &Refusal) -> Response<Body> {
    let grpc = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    let mut resp = if grpc {
        let mut resp = status(StatusCode::OK);
        let headers = resp.headers_mut();
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        headers.insert(
            "grpc-status",
            HeaderValue::from_static(GRPC_PERMISSION_DENIED),
        );
        headers.insert(
            "grpc-message",
            HeaderValue::from_static("denied by an AuthorizationPolicy"),
        );
        resp
    } else {
        let mut resp = Response::new(
            Full::new(Bytes::from_static(b"denied by an AuthorizationPolicy\n"))
                .map_err(|never| match never {})
                .boxed(),
        );
        *resp.status_mut() = StatusCode::FORBIDDEN;
        resp
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

    fn refusal() -> Refusal {
        Refusal {
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
