//! The tunnel's server side (:15008): mutual TLS 1.3, then HTTP/2; each
//! CONNECT stream is authorized and connected by the node (a [`Connector`])
//! and spliced to the destination. A bad stream is refused alone; a bad
//! handshake closes one connection; nothing stops the listener.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use futures::future::BoxFuture;
use http_body_util::Empty;
use hyper::{Method, Request, Response, StatusCode, body::Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use super::{Peer, Refusal, metrics::TunnelMetrics, parse_forwarded, tls};
use crate::node::{inbound::Delivery, splice::Watched};

/// How long a client has to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Authorizes a stream and connects to its destination.
pub type Connector =
    Arc<dyn Fn(Peer, SocketAddr) -> BoxFuture<'static, Result<Delivery, Refusal>> + Send + Sync>;

/// Serves the tunnel on `listener` until the task is dropped. `tls` is read
/// for every handshake, so a renewed node certificate takes effect at once.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<std::sync::RwLock<Arc<rustls::ServerConfig>>>,
    connector: Connector,
    metrics: TunnelMetrics,
) {
    loop {
        let (tcp, from) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                tracing::warn!(%err, "accepting on the tunnel port");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let config = Arc::clone(&tls.read().unwrap_or_else(|p| p.into_inner()));
        let connector = Arc::clone(&connector);
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            let accepted =
                tokio::time::timeout(HANDSHAKE_TIMEOUT, TlsAcceptor::from(config).accept(tcp))
                    .await
                    .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()));
            let stream = match accepted {
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
            if let Err(err) = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .initial_stream_window_size(super::STREAM_WINDOW)
                .initial_connection_window_size(super::CONNECTION_WINDOW)
                .max_concurrent_streams(super::MAX_STREAMS)
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(%from, %err, "tunnel connection ended");
            }
        });
    }
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
    let upstream = match connector(peer.clone(), dest).await {
        Ok(upstream) => upstream,
        Err(refusal) => {
            tracing::info!(identity = %peer.identity, source = ?peer.source, %dest, reason = refusal.reason, detail = %refusal.detail, policy = ?refusal.policy, "tunnel stream refused");
            metrics.refused(&refusal);
            return Ok(status(refusal.status));
        }
    };
    metrics.opened("inbound");
    tokio::spawn(async move {
        let (to_dest, to_source) = match hyper::upgrade::on(req).await {
            Ok(upgraded) => {
                // The pod's spliced writes are watched: its replies must not
                // outrun the tunnel.
                let tunnel = Watched::new(TokioIo::new(upgraded), None, upstream.watch.clone());
                let pod = Watched::new(upstream.stream, upstream.watch, None);
                splice(tunnel, pod).await
            }
            Err(err) => {
                tracing::debug!(%err, "tunnel stream upgrade failed");
                (0, 0)
            }
        };
        metrics.closed("inbound", to_dest, to_source);
    });
    Ok(status(200))
}

/// Copies both ways until both sides are done, passing half-closes on; on
/// an error (a reset) both sides are dropped at once, which resets the
/// other end too. Returns the bytes carried (to the destination, to the
/// source). Buffers are bounded: a slow reader slows the writer.
pub async fn splice<A, B>(mut a: A, mut b: B) -> (u64, u64)
where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    B: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    match tokio::io::copy_bidirectional_with_sizes(
        &mut a,
        &mut b,
        super::COPY_BUFFER,
        super::COPY_BUFFER,
    )
    .await
    {
        Ok(counts) => counts,
        Err(err) => {
            tracing::debug!(%err, "stream reset");
            (0, 0)
        }
    }
}
