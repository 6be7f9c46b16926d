//! The tunnel's client side: one HTTP/2 connection per (source identity and
//! its current certificate, destination node, worker thread), shared by
//! every stream between them on that worker; a closed one is replaced on
//! next use. After a certificate renewal new streams open a new connection;
//! the old one lives until its streams end, so rotation drops nothing.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use http_body_util::Empty;
use hyper::{Method, Request, StatusCode, client::conn::http2::SendRequest, upgrade::Upgraded};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;

use super::{forwarded_for, metrics::TunnelMetrics, tls};
use lacewing_core::pki::Svid;

#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("connecting to {0}: {1}")]
    Connect(SocketAddr, std::io::Error),
    #[error("TLS with {0}: {1}")]
    Handshake(SocketAddr, std::io::Error),
    #[error("HTTP/2 with {0}: {1}")]
    Http(SocketAddr, hyper::Error),
    #[error("{0} refused the stream to {1}: {2}")]
    Refused(SocketAddr, SocketAddr, StatusCode),
    #[error("{0}")]
    Tls(#[from] tls::TlsError),
}

/// Where a stream goes.
#[derive(Clone, Debug)]
pub struct Destination {
    /// The destination node's tunnel address (`<node ip>:15008`).
    pub node: SocketAddr,
    /// The SPIFFE identity the node's certificate must carry.
    pub node_identity: String,
    /// The pod address the stream is for.
    pub pod: SocketAddr,
}

/// Source identity, its certificate's serial, destination node, and the
/// worker thread (each keeps its own connections: a stream and its
/// connection are carried on one thread).
type Key = (String, String, SocketAddr, usize);

pub struct Pool {
    connections: Mutex<HashMap<Key, SendRequest<Empty<Bytes>>>>,
    /// One connect at a time per key: streams that find no connection wait
    /// for the one being made instead of each making their own (a burst
    /// of handshakes after a peer's GOAWAY, or on first use).
    connecting: Mutex<HashMap<Key, Arc<tokio::sync::Mutex<()>>>>,
    /// `SO_MARK` for the pool's sockets (the daemon's bypass mark).
    mark: Option<u32>,
    /// Where connections made are counted, if anywhere.
    metrics: Option<TunnelMetrics>,
}

impl Pool {
    pub fn new(mark: Option<u32>) -> Self {
        Self {
            connections: Mutex::default(),
            connecting: Mutex::default(),
            mark,
            metrics: None,
        }
    }

    /// Counts each connection it makes (`direction="outbound"`).
    pub fn counted(mut self, metrics: TunnelMetrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Open connections (one per source identity, destination node and
    /// worker).
    pub fn connections(&self) -> usize {
        self.connections
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|s| !s.is_closed())
            .count()
    }

    /// Opens a stream from `source` (a pod carrying `svid`'s identity) to
    /// `dest`, over a pooled connection or a new one. A pooled connection
    /// the peer is closing (GOAWAY: its daemon drains or hands over to a
    /// successor) takes no new stream: the stream is opened again once on a
    /// new connection. No byte of the client's has been sent by then, so
    /// this is safe whether or not the peer saw the first attempt.
    pub async fn open(
        &self,
        svid: &Svid,
        serial: &str,
        roots: Arc<rustls::RootCertStore>,
        source: IpAddr,
        dest: &Destination,
    ) -> Result<Upgraded, TunnelError> {
        let key = (
            svid.identity.clone(),
            serial.to_owned(),
            dest.node,
            lacewing_sys::workers::current(),
        );
        if let Some(sender) = self.pooled(&key) {
            // (The new connection below replaces it in the pool.)
            match request(sender, source, dest).await {
                Err(Attempt::Unsent(err)) => {
                    tracing::debug!(node = %dest.node, %err, "pooled tunnel connection is closing; opening a new one");
                }
                done => return done.map_err(|e| e.into_error(dest.node)),
            }
        }
        let turn = Arc::clone(
            self.connecting
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(key.clone())
                .or_default(),
        );
        let sender = {
            let _turn = turn.lock().await;
            // Made by the stream before us while we waited.
            match self.pooled(&key) {
                Some(sender) if sender.is_ready() => sender,
                _ => {
                    let sender = connect(svid, roots, dest, self.mark).await?;
                    if let Some(m) = &self.metrics {
                        m.connection_opened("outbound");
                    }
                    let mut conns = self.connections.lock().unwrap_or_else(|p| p.into_inner());
                    // Connections of an older certificate of this identity
                    // are no longer handed out (on this worker; another
                    // worker drops its own when it next connects).
                    conns.retain(|k, s| {
                        !(s.is_closed() || (k.0 == key.0 && k.2 == key.2 && k.3 == key.3))
                    });
                    conns.insert(key, sender.clone());
                    sender
                }
            }
        };
        drop(turn);
        // Turns nobody waits for go (serials rotate: keys come and go).
        self.connecting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, turn| Arc::strong_count(turn) > 1);
        request(sender, source, dest)
            .await
            .map_err(|e| e.into_error(dest.node))
    }

    fn pooled(&self, key: &Key) -> Option<SendRequest<Empty<Bytes>>> {
        self.connections
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .filter(|s| !s.is_closed())
            .cloned()
    }
}

/// How one attempt at a stream failed.
enum Attempt {
    /// Before the peer answered: the connection was closing or closed.
    Unsent(hyper::Error),
    /// The peer answered: it refused, or the upgrade failed.
    Failed(TunnelError),
}

impl Attempt {
    fn into_error(self, node: SocketAddr) -> TunnelError {
        match self {
            Self::Unsent(e) => TunnelError::Http(node, e),
            Self::Failed(e) => e,
        }
    }
}

/// One CONNECT for `dest.pod` on `sender`'s connection.
async fn request(
    mut sender: SendRequest<Empty<Bytes>>,
    source: IpAddr,
    dest: &Destination,
) -> Result<Upgraded, Attempt> {
    sender.ready().await.map_err(Attempt::Unsent)?;
    let req = Request::builder()
        .method(Method::CONNECT)
        .uri(dest.pod.to_string())
        .header("forwarded", forwarded_for(source))
        .body(Empty::new())
        .expect("a CONNECT request is well-formed");
    let resp = sender.send_request(req).await.map_err(Attempt::Unsent)?;
    if resp.status() != StatusCode::OK {
        return Err(Attempt::Failed(TunnelError::Refused(
            dest.node,
            dest.pod,
            resp.status(),
        )));
    }
    hyper::upgrade::on(resp)
        .await
        .map_err(|e| Attempt::Failed(TunnelError::Http(dest.node, e)))
}

/// A new mutual-TLS HTTP/2 connection to the destination node.
async fn connect(
    svid: &Svid,
    roots: Arc<rustls::RootCertStore>,
    dest: &Destination,
    mark: Option<u32>,
) -> Result<SendRequest<Empty<Bytes>>, TunnelError> {
    let config = tls::client_config(svid, roots, dest.node_identity.clone())?;
    let tcp = lacewing_sys::net::connect_marked(dest.node, mark)
        .await
        .map_err(|e| TunnelError::Connect(dest.node, e))?;
    let tls = TlsConnector::from(Arc::new(config))
        .connect(ServerName::IpAddress(dest.node.ip().into()), tcp)
        .await
        .map_err(|e| TunnelError::Handshake(dest.node, e))?;
    let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .initial_stream_window_size(super::STREAM_WINDOW)
        .max_local_error_reset_streams(super::MAX_LOCAL_ERROR_RESETS)
        .initial_connection_window_size(super::CONNECTION_WINDOW)
        .max_frame_size(super::MAX_FRAME)
        .handshake(TokioIo::new(tls))
        .await
        .map_err(|e| TunnelError::Http(dest.node, e))?;
    let node = dest.node;
    tokio::spawn(async move {
        if let Err(err) = conn.await {
            tracing::debug!(%node, %err, "tunnel connection ended");
        }
    });
    Ok(sender)
}
