//! The controller's :15012 listener: admission (caps per source address,
//! the handshake timeout) and TLS 1.3 in front of tonic, which is handed
//! only connections that finished their handshake in time. A connection
//! that then sends nothing (not even HTTP/2's preface) within the same
//! timeout is closed: it would hold its place in its source's count for
//! good. Once it has spoken, HTTP/2 keep-alive finds dead peers, and an
//! idle live one (a node's configuration stream) stays.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use lacewing_sys::admission::{Admission, Admitted, Slot};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{mpsc, watch},
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

/// An authenticated connection; its place in its source's count is given
/// back when tonic drops it.
pub struct Guarded {
    inner: TlsStream<TcpStream>,
    _slot: Slot,
    /// Until the first bytes arrive: when the connection is given up.
    silent_until: Option<Pin<Box<tokio::time::Sleep>>>,
    admission: Admission,
}

impl Connected for Guarded {
    type ConnectInfo = <TlsStream<TcpStream> as Connected>::ConnectInfo;

    /// The TLS stream's: tonic reads the client's certificate from it.
    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

impl AsyncRead for Guarded {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let read = Pin::new(&mut this.inner).poll_read(cx, buf);
        let Some(deadline) = this.silent_until.as_mut() else {
            return read;
        };
        match read {
            Poll::Ready(Ok(())) if buf.filled().len() > before => {
                this.silent_until = None;
                Poll::Ready(Ok(()))
            }
            Poll::Pending if deadline.as_mut().poll(cx).is_ready() => {
                this.admission.timed_out("header");
                Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "no request after the TLS handshake",
                )))
            }
            other => other,
        }
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The connections on `listener` that were admitted and finished their TLS
/// handshake in time, for tonic's `serve_with_incoming`. Handshakes run
/// side by side, so a slow one holds up nobody else.
/// Each handshake uses the TLS configuration in force when it starts.
pub fn incoming(
    listener: TcpListener,
    tls: watch::Receiver<Arc<rustls::ServerConfig>>,
    admission: Admission,
) -> ReceiverStream<std::io::Result<Guarded>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let admitted = tokio::select! {
                admitted = admission.accept(&listener) => admitted,
                () = tx.closed() => break,
            };
            let acceptor = TlsAcceptor::from(Arc::clone(&tls.borrow()));
            let (tx, admission) = (tx.clone(), admission.clone());
            tokio::spawn(async move {
                let Admitted {
                    stream,
                    from,
                    slot,
                    handshake,
                } = admitted;
                match admission.handshake(acceptor.accept(stream)).await {
                    Ok(Ok(inner)) => {
                        drop(handshake);
                        let silent_until = Some(Box::pin(tokio::time::sleep(
                            admission.limits().handshake_timeout,
                        )));
                        let _ = tx
                            .send(Ok(Guarded {
                                inner,
                                _slot: slot,
                                silent_until,
                                admission,
                            }))
                            .await;
                    }
                    Ok(Err(err)) => tracing::info!(%from, %err, "controller handshake failed"),
                    Err(err) => tracing::info!(%from, %err, "controller handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}
