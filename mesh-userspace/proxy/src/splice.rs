//! Copying through the daemon when a hop is spliced (same-node
//! acceleration, see `mesh_common::splice`). Writes an app or pod makes
//! toward the daemon are moved by the kernel straight into the daemon
//! socket's receive queue, where no TCP window stops the writer. So each
//! such socket is watched: when the daemon falls behind (its reads keep
//! coming back full, or the other side cannot take what it reads), the
//! writer is switched off through [`SplicedWriters`], and from then on TCP's
//! own flow control bounds what is queued.

use std::{
    future::Future as _,
    io,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    task::{Context, Poll},
};

use mesh_common::splice::SpliceKey;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::CancellationToken;

/// Reads that fill the whole buffer in a row before the writer is switched
/// off: the daemon is then this many buffers (of
/// [`lacewing_tunnel::COPY_BUFFER`]) behind it.
const FULL_READS_BEHIND: u32 = 8;

/// Where spliced writers are switched back to plain TCP (the node's
/// `LW_SPLICE_OFF` map).
pub trait SplicedWriters: Send + Sync {
    fn switch_off(&self, key: &SpliceKey);
}

/// One spliced writer the daemon reads from.
pub struct Watch {
    key: SpliceKey,
    off: Arc<dyn SplicedWriters>,
    full_reads: AtomicU32,
    tripped: AtomicBool,
}

impl Watch {
    /// The watch on the writer keyed `key` (see
    /// [`mesh_common::splice::writer_key`]), switched off through `off`.
    pub fn new(key: SpliceKey, off: Arc<dyn SplicedWriters>) -> Arc<Self> {
        Arc::new(Self {
            key,
            off,
            full_reads: AtomicU32::new(0),
            tripped: AtomicBool::new(false),
        })
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
/// A writer already read to its end needs neither: it writes nothing more,
/// and its moved bytes were read before its end (the usual order of a
/// request and its answer, the server closing first, costs no map writes).
pub struct Watched<S> {
    inner: S,
    reading: Option<Arc<Watch>>,
    writing: Option<Arc<Watch>>,
    /// A read returned the end of the stream: the writer half-closed.
    ended: bool,
    retry: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Bytes read from `inner` so far (what the copy passed on from it).
    read: u64,
    /// The same count, for a reader that hands the stream away (HTTP).
    shared: Option<Arc<std::sync::atomic::AtomicU64>>,
}

impl<S> Watched<S> {
    pub fn new(inner: S, reading: Option<Arc<Watch>>, writing: Option<Arc<Watch>>) -> Self {
        Self {
            inner,
            reading,
            writing,
            ended: false,
            retry: None,
            read: 0,
            shared: None,
        }
    }

    /// Also counts the bytes read into `counter`, which outlives the
    /// stream (an HTTP connection owns its stream to the end).
    pub fn counted(mut self, counter: Arc<std::sync::atomic::AtomicU64>) -> Self {
        self.shared = Some(counter);
        self
    }

    pub fn into_inner(self) -> S {
        self.inner
    }

    /// Bytes read from the stream so far, however the copy ended.
    pub fn bytes_read(&self) -> u64 {
        self.read
    }
}

/// A byte stream of any kind, behind one type: what the daemon's HTTP
/// servers serve and its HTTP clients dial. hyper's and h2's connections are
/// generic over their stream, and each stream type compiled them again (the
/// inbound server had three); one type took 190 KB off the daemon's code,
/// most of which stays resident. One virtual call per read or write is
/// nothing next to the syscall under it.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> Stream for S {}

/// A boxed [`Stream`].
pub type BoxedStream = Box<dyn Stream>;

/// Whether bytes wait to be read on a stream (without reading them).
pub trait Unread {
    fn poll_unread(&self, cx: &mut Context<'_>) -> bool;
}

/// An in-process pipe (the router's to a pod's per-request checks) is
/// never spliced: nothing is ever queued behind it.
impl Unread for tokio::io::DuplexStream {
    fn poll_unread(&self, _: &mut Context<'_>) -> bool {
        false
    }
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
        if let Poll::Ready(Ok(())) = &polled {
            let n = buf.filled().len() - before;
            self.read += n as u64;
            self.ended |= n == 0 && room > 0;
            if let Some(shared) = &self.shared {
                shared.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
            }
            if let Some(watch) = &self.reading {
                // Only a full-size buffer counts: a growing one fills up
                // on its way there.
                watch.read(n > 0 && n == room && room >= lacewing_tunnel::COPY_BUFFER);
            }
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
        if let Some(watch) = self.reading.as_ref().filter(|_| !self.ended) {
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

/// How a [`pipe`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Both sides finished.
    Done,
    /// One side failed (a reset): the caller resets the other.
    Reset,
    /// The registry closed the connection (policy, end of drain).
    Closed,
}

/// Copies both ways until both sides are done, passing half-closes on, or
/// until `closed` is cancelled. Buffers are bounded: a slow reader slows
/// the writer. What was carried is counted by the [`Watched`] sides (a
/// reset connection's bytes count too).
pub async fn pipe<A, B>(a: &mut A, b: &mut B, closed: &CancellationToken) -> End
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (mut a_read, mut a_write) = tokio::io::split(a);
    let (mut b_read, mut b_write) = tokio::io::split(b);
    // Either way failing ends both, as a reset ends a connection.
    let copy = async {
        tokio::try_join!(
            one_way(&mut a_read, &mut b_write),
            one_way(&mut b_read, &mut a_write)
        )
    };
    tokio::select! {
        copied = copy => match copied {
            Ok(_) => End::Done,
            Err(err) => {
                tracing::debug!(%err, "connection reset");
                End::Reset
            }
        },
        () = closed.cancelled() => End::Closed,
    }
}

/// A copy buffer's first size. A connection that carries a request and its
/// answer never needs more, and its buffers are neither zeroed nor held at
/// full size (two of 64 KiB zeroed per connection was 6 % of the daemon's
/// time at 5,000 new connections a second, and 128 KiB per open one).
const FIRST_BUFFER: usize = 4 << 10;

/// Copies `from` to `to` until `from` ends, then half-closes `to`. The
/// buffer doubles each time a read fills it, up to
/// [`lacewing_tunnel::COPY_BUFFER`] (a bulk transfer gets there in four
/// reads), and is read into without being zeroed first.
async fn one_way<R, W>(from: &mut R, to: &mut W) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut buf: Vec<u8> = Vec::with_capacity(FIRST_BUFFER);
    loop {
        buf.clear();
        let n = from.read_buf(&mut buf).await?;
        if n == 0 {
            return to.shutdown().await;
        }
        to.write_all(&buf).await?;
        to.flush().await?;
        let size = buf.capacity();
        if n == size && size < lacewing_tunnel::COPY_BUFFER {
            buf.reserve_exact(size.min(lacewing_tunnel::COPY_BUFFER - size));
        }
    }
}

/// Closes with RST: the other end sees the connection fail, not end.
pub fn reset(stream: tokio::net::TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    #[derive(Default)]
    struct Recorded(Mutex<Vec<SpliceKey>>);

    impl SplicedWriters for Recorded {
        fn switch_off(&self, key: &SpliceKey) {
            self.0.lock().unwrap().push(*key);
        }
    }

    #[tokio::test]
    async fn a_reset_connection_still_counts_what_it_carried() {
        let (mut app, a) = tokio::io::duplex(1 << 16);
        let (b, mut pod) = tokio::io::duplex(1 << 16);
        let closed = CancellationToken::new();
        let piping = tokio::spawn(async move {
            let (mut a, mut b) = (Watched::new(a, None, None), Watched::new(b, None, None));
            let end = pipe(&mut a, &mut b, &closed).await;
            (end, a.bytes_read(), b.bytes_read())
        });
        app.write_all(&[7; 1000]).await.unwrap();
        let mut got = [0u8; 1000];
        pod.read_exact(&mut got).await.unwrap();
        pod.write_all(b"ok").await.unwrap();
        let mut ok = [0u8; 2];
        app.read_exact(&mut ok).await.unwrap();
        // The pod's side goes away without a clean end.
        drop(pod);
        app.write_all(&[1; 10]).await.unwrap();
        let (end, a_to_b, b_to_a) = piping.await.unwrap();
        assert_eq!(end, End::Reset);
        assert!(a_to_b >= 1000, "{a_to_b}");
        assert_eq!(b_to_a, 2);
    }

    #[tokio::test]
    async fn a_writer_is_switched_off_once_the_daemon_falls_behind() {
        let off = Arc::new(Recorded::default());
        let key = SpliceKey {
            local_port: 4000,
            ..Default::default()
        };
        let watch = Watch::new(key, Arc::clone(&off) as Arc<dyn SplicedWriters>);
        let (mut writer, reader) = tokio::io::duplex(1 << 20);
        let mut watched = Watched::new(reader, Some(watch), None);
        let size = lacewing_tunnel::COPY_BUFFER;
        let mut buf = vec![0u8; size];
        // Short reads keep the count at zero.
        writer.write_all(&[1; 8]).await.unwrap();
        assert_eq!(watched.read(&mut buf).await.unwrap(), 8);
        // So do reads that fill a buffer still growing to full size.
        writer.write_all(&[3; 16 * 12]).await.unwrap();
        for _ in 0..12 {
            watched.read_exact(&mut buf[..16]).await.unwrap();
        }
        assert!(off.0.lock().unwrap().is_empty());
        // Eight reads in a row that fill a full-size buffer switch it off,
        // once.
        let writing = tokio::spawn(async move {
            writer.write_all(&vec![2; size * 12]).await.unwrap();
            writer
        });
        for _ in 0..12 {
            watched.read_exact(&mut buf).await.unwrap();
        }
        drop(writing.await.unwrap());
        assert_eq!(*off.0.lock().unwrap(), vec![key]);
    }

    // Half-closing toward a writer switches it off while it may still
    // write; not once it was read to its end.
    #[tokio::test]
    async fn a_half_close_switches_off_only_a_writer_that_has_not_ended() {
        let off = Arc::new(Recorded::default());
        let key = |port| SpliceKey {
            local_port: port,
            ..Default::default()
        };
        let watched = |port| {
            let watch = Watch::new(key(port), Arc::clone(&off) as Arc<dyn SplicedWriters>);
            let (writer, reader) = tokio::io::duplex(1 << 16);
            (writer, Watched::new(reader, Some(watch), None))
        };
        let (mut still_writing, mut open) = watched(4000);
        still_writing.write_all(b"GET").await.unwrap();
        let mut buf = [0u8; 16];
        assert_eq!(open.read(&mut buf).await.unwrap(), 3);
        open.shutdown().await.unwrap();
        assert_eq!(*off.0.lock().unwrap(), vec![key(4000)]);

        let (mut ended, mut done) = watched(4001);
        ended.write_all(b"GET").await.unwrap();
        ended.shutdown().await.unwrap();
        assert_eq!(done.read(&mut buf).await.unwrap(), 3);
        assert_eq!(done.read(&mut buf).await.unwrap(), 0);
        done.shutdown().await.unwrap();
        assert_eq!(*off.0.lock().unwrap(), vec![key(4000)]);
    }
}
