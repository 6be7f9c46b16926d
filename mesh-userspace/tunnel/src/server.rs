//! The tunnel's server side (:15008): mutual TLS 1.3, then HTTP/2; each
//! CONNECT stream is authorized and connected by the caller's [`Connector`],
//! which also carries it to the destination. A bad stream is refused alone;
//! a bad handshake closes one connection; nothing stops the listener but a
//! drain, which sends GOAWAY on every connection and lets open streams end.

use std::{
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use futures::future::BoxFuture;
use http_body_util::Empty;
use hyper::{Method, Request, Response, StatusCode, body::Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use lacewing_sys::admission::{Admission, Admitted};
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf},
    net::TcpListener,
    sync::Notify,
};
use tokio_rustls::TlsAcceptor;

use tokio_util::sync::CancellationToken;

use super::{Peer, Refusal, metrics::TunnelMetrics, parse_forwarded, tls};

/// The stream a CONNECT opened, once upgraded, as the connector gets it.
pub type TunnelStream = TokioIo<hyper::upgrade::Upgraded>;

/// Carries an accepted stream to its destination; resolves with the bytes
/// moved (to the destination, to the source) when both sides are done.
pub type Carry = Box<dyn FnOnce(TunnelStream) -> BoxFuture<'static, (u64, u64)> + Send>;

/// Authorizes a stream and connects to its destination; the [`Carry`] then
/// moves its bytes.
pub type Connector =
    Arc<dyn Fn(Peer, SocketAddr) -> BoxFuture<'static, Result<Carry, Refusal>> + Send + Sync>;

/// How often an idle tunnel connection is pinged, and how long the peer
/// has to answer before the connection is closed as dead.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves the tunnel on `listener` until `drain` is cancelled: then it
/// stops accepting, sends GOAWAY on every connection and returns once their
/// open streams have ended (the caller bounds how long it waits). `tls` is
/// read for every handshake, so a renewed node certificate takes effect at
/// once. `admission` caps what one source may hold and times handshakes
/// out; a connection that opens no stream within the handshake timeout
/// after its handshake, or carries none for the idle timeout, is closed.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<std::sync::RwLock<Arc<rustls::ServerConfig>>>,
    connector: Connector,
    metrics: TunnelMetrics,
    admission: Admission,
    drain: CancellationToken,
) {
    let connections = tokio_util::task::TaskTracker::new();
    loop {
        let admitted = tokio::select! {
            admitted = admission.accept(&listener) => admitted,
            () = drain.cancelled() => break,
        };
        let drain = drain.clone();
        let config = Arc::clone(&tls.read().unwrap_or_else(|p| p.into_inner()));
        let connector = Arc::clone(&connector);
        let metrics = metrics.clone();
        let admission = admission.clone();
        let Admitted {
            stream: tcp,
            from,
            slot,
            handshake,
        } = admitted;
        let tracker = connections.clone();
        // The handshake and every stream of the connection on one worker.
        lacewing_sys::workers::spawn_with(tcp, move |tcp| {
            tracker.track_future(async move {
                let _slot = slot;
                let _ = tcp.set_nodelay(true);
                let accepted = admission
                    .handshake(TlsAcceptor::from(config).accept(tcp))
                    .await
                    .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()));
                let stream = match accepted {
                    Ok(stream) => stream,
                    Err(err) => {
                        let reason = tls::failure_reason(&err);
                        tracing::info!(%from, %err, reason, "tunnel handshake failed");
                        metrics.handshake_failed(reason);
                        return;
                    }
                };
                drop(handshake);
                let identity = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(tls::workload_identity);
                let Some(identity) = identity else {
                    tracing::info!(%from, "tunnel client certificate names no workload identity");
                    metrics.handshake_failed("no_workload_identity");
                    return;
                };
                metrics.connection_opened("inbound");
                connection(stream, from, identity, connector, metrics, admission, drain).await;
            })
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

/// Serves HTTP/2 on one authenticated connection until it ends, is idle too
/// long, or the drain starts. A peer that speaks anything else here (HTTP/1.1
/// after the handshake, say) gets `505` and the connection closes.
async fn connection(
    mut stream: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    from: SocketAddr,
    identity: String,
    connector: Connector,
    metrics: TunnelMetrics,
    admission: Admission,
    drain: CancellationToken,
) {
    let limits = admission.limits().clone();
    let preface =
        match tokio::time::timeout(limits.handshake_timeout, read_preface(&mut stream)).await {
            Ok(Ok(Some(preface))) => preface,
            Ok(Ok(None)) => {
                tracing::info!(%from, "tunnel client does not speak HTTP/2");
                metrics.refused(&Refusal::new(505, "not_http2", ""));
                let _ = stream.write_all(&not_http2()).await;
                linger(&mut stream).await;
                return;
            }
            Ok(Err(err)) => {
                tracing::debug!(%from, %err, "tunnel connection ended before its preface");
                return;
            }
            Err(_) => {
                admission.timed_out("header");
                linger(&mut stream).await;
                return;
            }
        };
    let activity = Arc::new(Activity::default());
    let service = {
        let activity = Arc::clone(&activity);
        hyper::service::service_fn(move |req| {
            stream_request(
                req,
                identity.clone(),
                Arc::clone(&connector),
                metrics.clone(),
                Activity::open(&activity),
            )
        })
    };
    let ended = {
        let connection = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .max_header_list_size(limits.max_header_bytes)
            .initial_stream_window_size(super::STREAM_WINDOW)
            .initial_connection_window_size(super::CONNECTION_WINDOW)
            .max_frame_size(super::MAX_FRAME)
            .max_concurrent_streams(super::MAX_STREAMS)
            .max_local_error_reset_streams(super::MAX_LOCAL_ERROR_RESETS)
            .serve_connection(
                TokioIo::new(Replayed {
                    head: preface,
                    at: 0,
                    inner: &mut stream,
                }),
                service,
            );
        tokio::pin!(connection);
        tokio::select! {
            ended = connection.as_mut() => ended,
            phase = activity.idle(limits.handshake_timeout, limits.idle_timeout) => {
                tracing::debug!(%from, phase, "closing an idle tunnel connection");
                admission.timed_out(phase);
                connection.as_mut().graceful_shutdown();
                connection.await
            }
            () = drain.cancelled() => {
                // GOAWAY: the client opens no new stream here; the open
                // ones go on until they end.
                connection.as_mut().graceful_shutdown();
                connection.await
            }
        }
    };
    if let Err(err) = ended {
        tracing::debug!(%from, %err, "tunnel connection ended");
    }
    linger(&mut stream).await;
}

/// What a client that is not speaking HTTP/2 gets.
fn not_http2() -> Vec<u8> {
    const BODY: &str = ":15008 speaks HTTP/2 CONNECT (HBONE) only\n";
    format!(
        "HTTP/1.1 505 HTTP Version Not Supported\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{BODY}",
        BODY.len()
    )
    .into_bytes()
}

/// The client connection preface of HTTP/2 (RFC 9113, section 3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Reads the client's first bytes: the HTTP/2 preface (returned, to be
/// replayed to the HTTP/2 server), or `None` as soon as they differ from it.
async fn read_preface<S: AsyncRead + Unpin>(stream: &mut S) -> std::io::Result<Option<[u8; 24]>> {
    let mut head = [0u8; 24];
    let mut got = 0;
    while got < head.len() {
        let n = stream.read(&mut head[got..]).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        got += n;
        if head[..got] != PREFACE[..got] {
            return Ok(None);
        }
    }
    Ok(Some(head))
}

/// A stream whose first bytes, already read, are read again.
struct Replayed<'a, S> {
    head: [u8; 24],
    at: usize,
    inner: &'a mut S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Replayed<'_, S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.at < self.head.len() {
            let n = buf.remaining().min(self.head.len() - self.at);
            let at = self.at;
            buf.put_slice(&self.head[at..at + n]);
            self.at += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut *self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Replayed<'_, S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut *self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut *self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.inner).poll_shutdown(cx)
    }
}

/// The open streams of one tunnel connection, for its idle timeout.
#[derive(Default)]
struct Activity {
    open: AtomicUsize,
    /// Whether any stream was ever opened (before the first, the shorter
    /// header timeout applies).
    used: AtomicBool,
    changed: Notify,
}

/// One open stream; closes it in [`Activity`] on drop.
struct Open(Arc<Activity>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
        self.0.changed.notify_waiters();
    }
}

impl Activity {
    fn open(this: &Arc<Self>) -> Open {
        this.used.store(true, Ordering::Release);
        this.open.fetch_add(1, Ordering::AcqRel);
        this.changed.notify_waiters();
        Open(Arc::clone(this))
    }

    /// Resolves when the connection has had no open stream for `idle` (or,
    /// before its first stream, for `header`), with the phase that timed
    /// out.
    async fn idle(&self, header: Duration, idle: Duration) -> &'static str {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.open.load(Ordering::Acquire) > 0 {
                changed.await;
                continue;
            }
            let (limit, phase) = if self.used.load(Ordering::Acquire) {
                (idle, "idle")
            } else {
                (header, "header")
            };
            tokio::select! {
                () = tokio::time::sleep(limit) => return phase,
                () = changed => {}
            }
        }
    }
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
    open: Open,
) -> Result<Response<Empty<Bytes>>, std::convert::Infallible> {
    if req.method() != Method::CONNECT {
        metrics.refused(&Refusal::new(405, "not_connect", ""));
        return Ok(status(405));
    }
    let Some(dest) = req
        .uri()
        .authority()
        .and_then(|a| a.as_str().parse::<SocketAddr>().ok())
    else {
        metrics.refused(&Refusal::new(400, "bad_authority", ""));
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
        drop(open);
    });
    Ok(status(200))
}

#[cfg(test)]
mod activity_tests {
    use super::*;

    #[tokio::test]
    async fn a_connection_whose_last_stream_ended_is_idle_after_the_idle_time() {
        let activity = Arc::new(Activity::default());
        let open = Activity::open(&activity);
        let idle = activity.idle(Duration::from_millis(50), Duration::from_millis(200));
        tokio::pin!(idle);
        assert!(
            tokio::time::timeout(Duration::from_millis(300), idle.as_mut())
                .await
                .is_err(),
            "idle while a stream is open"
        );
        drop(open);
        let started = std::time::Instant::now();
        assert_eq!(idle.await, "idle");
        assert!(started.elapsed() >= Duration::from_millis(200));
        let fresh = Activity::default();
        assert_eq!(
            fresh
                .idle(Duration::from_millis(50), Duration::from_millis(200))
                .await,
            "header"
        );
    }
}
