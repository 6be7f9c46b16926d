//! The daemon's side of same-node acceleration (see `mesh_common::splice`).
//! Writes an app or pod makes toward the daemon are moved by the kernel
//! straight into the daemon socket's receive queue, where no TCP window
//! stops the writer. So the daemon watches each such socket: when it falls
//! behind (its reads keep coming back full, or the other side cannot take
//! what it reads), it switches that writer off (`LW_SPLICE_OFF`), and from
//! then on TCP's own flow control bounds what is queued.

use std::{
    io,
    net::{IpAddr, SocketAddr},
    path::Path,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    task::{Context, Poll},
};

use aya::maps::{HashMap as BpfHashMap, MapData, MapError, SockHash};
use mesh_common::{family, names, splice::SpliceKey};
use prometheus_client::metrics::counter::Counter;
use std::future::Future as _;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::maps::open;

/// Reads that fill the whole buffer in a row before the writer is switched
/// off: the daemon is then this many buffers (of `tunnel::COPY_BUFFER`)
/// behind it.
const FULL_READS_BEHIND: u32 = 8;

/// `LW_SPLICE_OFF` and `LW_SPLICE`, and a count of the writers the daemon
/// switched off.
pub struct SpliceOff {
    maps: Mutex<OffMaps>,
    pub switched_off: Counter,
}

/// `LW_SPLICE_OFF` and `LW_SPLICE`, written together.
struct OffMaps {
    off: BpfHashMap<MapData, SpliceKey, u8>,
    writers: SockHash<MapData, SpliceKey>,
}

impl SpliceOff {
    pub fn open(root: &Path) -> Result<Self, MapError> {
        Ok(Self {
            maps: Mutex::new(OffMaps {
                off: BpfHashMap::try_from(open(root, names::MAP_SPLICE_OFF)?)?,
                writers: SockHash::try_from(open(root, names::MAP_SPLICE)?)?,
            }),
            switched_off: Counter::default(),
        })
    }

    /// Switches the writer off, then takes it out of `LW_SPLICE`: its
    /// writes then skip the sk_msg program too (plain TCP, full speed).
    /// Nothing is ever moved into a writer, so leaving loses nothing.
    fn switch_off(&self, key: &SpliceKey) {
        let mut maps = self.maps.lock().unwrap_or_else(|p| p.into_inner());
        let OffMaps { off, writers } = &mut *maps;
        match off.insert(key, 1, 0) {
            Ok(()) => {
                self.switched_off.inc();
                // Already gone if it half-closed or closed.
                let _ = writers.remove(key);
            }
            Err(err) => tracing::warn!(%err, "switching a spliced writer off"),
        }
    }
}

/// The key the kernel gives the writer at the other end of the daemon's
/// socket (`local`, `peer` as the daemon sees them). Loopback hops carry
/// the namespace's cookie (`netns`).
fn writer_key(local: SocketAddr, peer: SocketAddr, netns: u64) -> SpliceKey {
    let ((fam, writer), (_, daemon)) = (words(peer.ip()), words(local.ip()));
    SpliceKey {
        netns_cookie: if peer.ip().is_loopback() || peer.ip().to_canonical().is_loopback() {
            netns
        } else {
            0
        },
        local: writer,
        remote: daemon,
        local_port: peer.port(),
        remote_port: local.port(),
        family: fam as u8,
        _pad: [0; 3],
    }
}

/// An address as the kernel's context words (network order, read natively),
/// IPv4-mapped IPv6 as IPv4.
fn words(ip: IpAddr) -> (u16, [u32; 4]) {
    match ip.to_canonical() {
        IpAddr::V4(v4) => (family::INET, [u32::from_ne_bytes(v4.octets()), 0, 0, 0]),
        IpAddr::V6(v6) => {
            let o = v6.octets();
            let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            (family::INET6, [w(0), w(4), w(8), w(12)])
        }
    }
}

/// One spliced writer the daemon reads from.
pub struct Watch {
    key: SpliceKey,
    off: Arc<SpliceOff>,
    full_reads: AtomicU32,
    tripped: AtomicBool,
}

impl Watch {
    /// The watch on the writer at the other end of the daemon's `socket`
    /// (`netns`: the namespace's cookie, for loopback hops); none without
    /// acceleration maps or when the socket has no addresses any more.
    pub fn on(
        off: Option<&Arc<SpliceOff>>,
        socket: &tokio::net::TcpStream,
        netns: u64,
    ) -> Option<Arc<Self>> {
        let (local, peer) = (socket.local_addr().ok()?, socket.peer_addr().ok()?);
        Some(Arc::new(Self {
            key: writer_key(local, peer, netns),
            off: Arc::clone(off?),
            full_reads: AtomicU32::new(0),
            tripped: AtomicBool::new(false),
        }))
    }

    fn trip(&self, why: &'static str) {
        if !self.tripped.swap(true, Ordering::Relaxed) {
            tracing::debug!(
                why,
                port = self.key.local_port,
                "spliced writer switched off"
            );
            self.off.switch_off(&self.key);
        }
    }

    fn read(&self, filled_whole_buffer: bool) {
        if !filled_whole_buffer {
            self.full_reads.store(0, Ordering::Relaxed);
        } else if self.full_reads.fetch_add(1, Ordering::Relaxed) + 1 >= FULL_READS_BEHIND {
            self.trip("reads keep filling the buffer");
        }
    }
}

/// A stream the daemon copies through: `reading` watches the writer whose
/// bytes arrive on it; `writing` is tripped when this stream cannot take
/// bytes read from that writer's socket.
///
/// Half-closing a socket that receives spliced writes first switches the
/// writer off and waits until what was moved to it is read: once the
/// writer's FIN closes the socket (it then goes to TIME_WAIT), the kernel
/// drops moved bytes not yet read, though it keeps those TCP delivered.
pub struct Watched<S> {
    inner: S,
    reading: Option<Arc<Watch>>,
    writing: Option<Arc<Watch>>,
    retry: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S> Watched<S> {
    pub fn new(inner: S, reading: Option<Arc<Watch>>, writing: Option<Arc<Watch>>) -> Self {
        Self {
            inner,
            reading,
            writing,
            retry: None,
        }
    }

    pub fn into_inner(self) -> S {
        self.inner
    }
}

/// Whether bytes wait to be read on a stream (without reading them).
pub trait Unread {
    fn poll_unread(&self, cx: &mut Context<'_>) -> bool;
}

impl Unread for tokio::net::TcpStream {
    fn poll_unread(&self, cx: &mut Context<'_>) -> bool {
        let mut byte = [0u8; 1];
        let mut buf = ReadBuf::new(&mut byte);
        matches!(self.poll_peek(cx, &mut buf), Poll::Ready(Ok(n)) if n > 0)
    }
}

impl Unread for &mut tokio::net::TcpStream {
    fn poll_unread(&self, cx: &mut Context<'_>) -> bool {
        (**self).poll_unread(cx)
    }
}

/// A tunnel stream never receives spliced writes.
impl<T> Unread for hyper_util::rt::TokioIo<T> {
    fn poll_unread(&self, _: &mut Context<'_>) -> bool {
        false
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let room = buf.remaining();
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let (Poll::Ready(Ok(())), Some(watch)) = (&polled, &self.reading) {
            let n = buf.filled().len() - before;
            watch.read(n > 0 && n == room);
        }
        polled
    }
}

impl<S: AsyncWrite + Unread + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, data);
        if let (Poll::Pending, Some(watch)) = (&polled, &self.writing) {
            watch.trip("the other side is not taking bytes");
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(watch) = &self.reading {
            watch.trip("half-close");
            // Bytes moved before the switch are still queued: let the
            // other direction read them first, looking again shortly.
            while self.inner.poll_unread(cx) {
                let retry = self.retry.get_or_insert_with(|| {
                    Box::pin(tokio::time::sleep(std::time::Duration::from_millis(1)))
                });
                if retry.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                self.retry = None;
            }
        }
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writer_keys_match_what_the_kernel_sees() {
        // The daemon's in-pod socket: 127.0.0.1:15001, peer 127.0.0.1:40000.
        let k = writer_key(
            "127.0.0.1:15001".parse().unwrap(),
            "127.0.0.1:40000".parse().unwrap(),
            77,
        );
        assert_eq!(k.netns_cookie, 77);
        assert_eq!(k.local[0].to_ne_bytes(), [127, 0, 0, 1]);
        assert_eq!((k.local_port, k.remote_port), (40000, 15001));
        assert_eq!(k.family, family::INET as u8);
        // A delivery: node 10.244.1.1:50000 to pod 10.244.1.10:9000.
        let k = writer_key(
            "10.244.1.1:50000".parse().unwrap(),
            "10.244.1.10:9000".parse().unwrap(),
            77,
        );
        assert_eq!(k.netns_cookie, 0, "not a loopback hop");
        assert_eq!(k.local[0].to_ne_bytes(), [10, 244, 1, 10]);
        assert_eq!(k.remote[0].to_ne_bytes(), [10, 244, 1, 1]);
        // IPv4-mapped peers are keyed as IPv4, as the kernel program does.
        let mapped = writer_key(
            "[::ffff:10.244.1.1]:50000".parse().unwrap(),
            "[::ffff:10.244.1.10]:9000".parse().unwrap(),
            0,
        );
        assert_eq!(mapped, k);
    }
}
