//! The tunnel's server side (:15008): mutual TLS 1.3, then HTTP/2; each
//! CONNECT stream is authorized and connected by the caller's [`Connector`],
//! which also carries it to the destination. A bad stream is refused alone;
//! a bad handshake closes one connection; nothing stops the listener but a
//! drain, which sends GOAWAY on every connection and lets open streams end.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use futures::future::BoxFuture;
use http_body_util::Empty;
use hyper::{Method, Request, Response, StatusCode, body::Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    net::TcpListener,
};
use tokio_rustls::TlsAcceptor;

use tokio_util::sync::CancellationToken;

use super::{Peer, Refusal, metrics::TunnelMetrics, parse_forwarded, tls};

/// How long a client has to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The stream a CONNECT opened, once upgraded, as the connector gets it.
pub type TunnelStream = TokioIo<hyper::upgrade::Upgraded>;

/// Carries an accepted stream to its destination; resolves with the bytes
/// moved (to the destination, to the source) when both sides are done.
pub type Carry = Box<dyn FnOnce(TunnelStream) -> BoxFuture<'static, (u64, u64)> + Send>;

/// Authorizes a stream and connects to its destination; the [`Carry`] then
/// moves its bytes.
pub type Connector =
    Arc<dyn Fn(Peer, SocketAddr) -> BoxFuture<'static, Result<Carry, Refusal>> + Send + Sync>;

/// Serves the tunnel on `listener` until `drain` is cancelled: then it
/// stops accepting, sends GOAWAY on every connection and returns once their
/// open streams have ended (the caller bounds how long it waits). `tls` is
/// read for every handshake, so a renewed node certificate takes effect at
/// once.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<std::sync::RwLock<Arc<rustls::ServerConfig>>>,
    connector: Connector,
    metrics: TunnelMetrics,
    drain: CancellationToken,
) {
    let connections = tokio_util::task::TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = drain.cancelled() => break,
        };
        let (tcp, from) = match accepted {
            Ok(accepted) => accepted,
            Err(err) => {
                tracing::warn!(%err, "accepting on the tunnel port");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let drain = drain.clone();
        let config = Arc::clone(&tls.read().unwrap_or_else(|p| p.into_inner()));
        let connector = Arc::clone(&connector);
        let metrics = metrics.clone();
        connections.spawn(async move {
            let _ = tcp.set_nodelay(true);
            let accepted =
                tokio::time::timeout(HANDSHAKE_TIMEOUT, TlsAcceptor::from(config).accept(tcp))
                    .await
                    .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()));
            let mut stream = match accepted {
                Ok(stream) => stream,
                Err(err) => {
                    let reason = tls::failure_reason(&err);
                    tracing::info!(%from, %err, reason, "tunnel handshake failed");
                    metrics
                        .handshake_failures
                        .get_or_create(&super::metrics::ReasonLabels {
                            reason: reason.to_owned(),
                        })
                        .inc();
                    return;
                }
            };
            let identity = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(tls::workload_identity);
            let Some(identity) = identity else {
                tracing::info!(%from, "tunnel client certificate names no workload identity");
                metrics
                    .handshake_failures
                    .get_or_create(&super::metrics::ReasonLabels {
                        reason: "no_workload_identity".to_owned(),
                    })
                    .inc();
                return;
            };
            let service = hyper::service::service_fn(move |req| {
                stream_request(
                    req,
                    identity.clone(),
                    Arc::clone(&connector),
                    metrics.clone(),
                )
            });
            let ended = {
                let connection = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .initial_stream_window_size(super::STREAM_WINDOW)
                    .initial_connection_window_size(super::CONNECTION_WINDOW)
                    .max_concurrent_streams(super::MAX_STREAMS)
                    .max_local_error_reset_streams(super::MAX_LOCAL_ERROR_RESETS)
                    .serve_connection(TokioIo::new(&mut stream), service);
                tokio::pin!(connection);
                tokio::select! {
                    ended = connection.as_mut() => ended,
                    () = drain.cancelled() => {
                        // GOAWAY: the client opens no new stream here; the
                        // open ones go on until they end.
                        connection.as_mut().graceful_shutdown();
                        connection.await
                    }
                }
            };
            if let Err(err) = ended {
                tracing::debug!(%from, %err, "tunnel connection ended");
            }
            linger(&mut stream).await;
        });
    }
    // Closed at once: in an upgrade the successor accepts on the same
    // socket from now on.
    drop(listener);
    connections.close();
    tracing::info!(
        connections = connections.len(),
        "tunnel draining: GOAWAY sent, no new connections"
    );
    connections.wait().await;
}

/// How long a closed tunnel connection waits for its peer to close too.
const LINGER: Duration = Duration::from_secs(2);

/// Closes our side of an ended connection, then reads (and drops) what the
/// peer still sends until it closes too, for at most [`LINGER`]. Closing a
/// socket with unread bytes (a late WINDOW_UPDATE, the peer's GOAWAY) makes
/// Linux answer with a reset, and a reset makes the peer discard what it has
/// received but not yet read: the tail of the last stream would be lost.
async fn linger<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S) {
    let _ = stream.shutdown().await;
    let mut scratch = [0u8; 4096];
    let _ = tokio::time::timeout(LINGER, async {
        while matches!(stream.read(&mut scratch).await, Ok(n) if n > 0) {}
    })
    .await;
}

fn status(code: u16) -> Response<Empty<Bytes>> {
    let mut resp = Response::new(Empty::new());
    *resp.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::FORBIDDEN);
    resp
}

/// One CONNECT: authorize and connect, answer, then splice in a task.
async fn stream_request(
    req: Request<Incoming>,
    identity: String,
    connector: Connector,
    metrics: TunnelMetrics,
) -> Result<Response<Empty<Bytes>>, std::convert::Infallible> {
    if req.method() != Method::CONNECT {
        return Ok(status(405));
    }
    let Some(dest) = req
        .uri()
        .authority()
        .and_then(|a| a.as_str().parse::<SocketAddr>().ok())
    else {
        return Ok(status(400));
    };
    let peer = Peer {
        identity,
        source: req
            .headers()
            .get("forwarded")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_forwarded),
    };
    let carry = match connector(peer.clone(), dest).await {
        Ok(carry) => carry,
        Err(refusal) => {
            tracing::info!(identity = %peer.identity, source = ?peer.source, %dest, reason = refusal.reason, detail = %refusal.detail, policy = ?refusal.policy, "tunnel stream refused");
            metrics.refused(&refusal);
            return Ok(status(refusal.status));
        }
    };
    metrics.opened("inbound");
    tokio::spawn(async move {
        let (to_dest, to_source) = match hyper::upgrade::on(req).await {
            Ok(upgraded) => carry(TokioIo::new(upgraded)).await,
            Err(err) => {
                tracing::debug!(%err, "tunnel stream upgrade failed");
                (0, 0)
            }
        };
        metrics.closed("inbound", to_dest, to_source);
    });
    Ok(status(200))
}
