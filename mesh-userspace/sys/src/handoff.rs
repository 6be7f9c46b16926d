//! Handing a daemon's listening sockets to its successor on the same host,
//! so an upgrade refuses no connection: the new process receives the very
//! sockets the old one listens on (`SCM_RIGHTS` over a Unix socket), and
//! connections waiting in their accept queues are accepted by the new one.
//!
//! [`Listeners`] is where a daemon opens its listeners (or takes the ones it
//! inherited) and where it holds them for the next handoff. [`serve`] is the
//! old daemon's side, [`connect`] the new one's:
//!
//! ```text
//!   new                                   old (serving <run-dir>/handoff.sock, root only)
//!   hello {protocol, version, layout}  ->
//!                                      <- batch {roles} + descriptors (SCM_RIGHTS), ...
//!                                      <- done {count, version, layout, state}
//!   (adopts the datapath, catches up, opens nothing new)
//!   ready                              ->
//!                                         stops accepting, closes its copies
//!                                      <- stopped
//!   accepts on every listener             drains, exits when its last connection ends
//! ```
//!
//! Between `ready` and `stopped` neither accepts; connections wait in the
//! accept queue, which both share.
#![allow(unsafe_code)]

use std::{
    collections::BTreeMap,
    io::{self, IoSlice, IoSliceMut},
    net::SocketAddr,
    os::{
        fd::{AsFd, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd, RawFd},
        unix::fs::PermissionsExt as _,
    },
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use nix::sys::socket::{
    self, AddressFamily, Backlog, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag,
    SockType, UnixAddr, sockopt,
};
use serde::{Deserialize, Serialize};

/// The handoff socket's name in the daemon's run directory.
pub const SOCKET_NAME: &str = "handoff.sock";

/// The version of the messages below.
const PROTOCOL: u32 = 1;

/// Descriptors per message: the kernel takes at most 253 (`SCM_MAX_FD`).
const BATCH: usize = 200;

/// How long the new daemon waits for each of the old one's answers.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the old daemon waits for the new one to say it is ready (it
/// loads the datapath and catches up with the controller meanwhile).
const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// What can go wrong in a handoff.
#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    #[error("the handoff socket {path}: {source}")]
    Socket { path: PathBuf, source: io::Error },
    #[error("the handoff peer runs as uid {0}, not root: refused")]
    NotRoot(u32),
    #[error("the handoff peer broke the protocol: {0}")]
    Protocol(String),
    #[error("the handoff connection: {0}")]
    Io(#[from] io::Error),
}

impl From<nix::Error> for HandoffError {
    fn from(e: nix::Error) -> Self {
        Self::Io(e.into())
    }
}

/// One message; descriptors travel with `Batch`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Message {
    Hello {
        protocol: u32,
        version: String,
        layout: u32,
    },
    Batch {
        roles: Vec<String>,
    },
    Done {
        count: usize,
        version: String,
        layout: u32,
        /// The daemon's own state worth carrying over (JSON it defines).
        state: serde_json::Value,
    },
    Ready,
    Stopped,
    Refused {
        reason: String,
    },
}

/// The listening sockets of a daemon, each under a role (`tunnel`,
/// `pod/<ns>/<name>`...): the ones it inherited and has not claimed yet, and
/// the ones it holds now (a duplicate each, released with its [`Held`]).
pub struct Listeners {
    inherited: Mutex<Vec<(String, OwnedFd)>>,
    held: Mutex<BTreeMap<u64, (String, OwnedFd)>>,
    next: AtomicU64,
    accepting: tokio::sync::watch::Sender<bool>,
}

impl Listeners {
    /// A daemon that inherited nothing: it accepts at once.
    pub fn fresh() -> Arc<Self> {
        Self::new(Vec::new(), true)
    }

    /// A daemon taking over: it accepts once [`Listeners::start_accepting`]
    /// is called (after the old daemon stopped).
    pub fn inheriting(inherited: Vec<(String, OwnedFd)>) -> Arc<Self> {
        Self::new(inherited, false)
    }

    fn new(inherited: Vec<(String, OwnedFd)>, accepting: bool) -> Arc<Self> {
        Arc::new(Self {
            inherited: Mutex::new(inherited),
            held: Mutex::default(),
            next: AtomicU64::new(0),
            accepting: tokio::sync::watch::channel(accepting).0,
        })
    }

    /// A listener on `addr` for `role`: the inherited one if there is one,
    /// else a new one (bound in the calling thread's network namespace),
    /// held for the next handoff until the [`Held`] is dropped.
    pub fn listen(
        self: &Arc<Self>,
        role: &str,
        addr: SocketAddr,
    ) -> io::Result<(std::net::TcpListener, Held)> {
        let listener = match self.take(role, addr) {
            Some(listener) => listener,
            None => crate::net::listen(addr)?,
        };
        let held = self.hold(role, listener.as_fd())?;
        Ok((listener, held))
    }

    /// The inherited listener of `role` bound to `addr`, if any.
    pub fn take(&self, role: &str, addr: SocketAddr) -> Option<std::net::TcpListener> {
        let mut inherited = lock(&self.inherited);
        let at = inherited.iter().position(|(r, fd)| {
            r == role
                && socket2::SockRef::from(fd)
                    .local_addr()
                    .ok()
                    .and_then(|a| a.as_socket())
                    == Some(addr)
        })?;
        Some(std::net::TcpListener::from(inherited.swap_remove(at).1))
    }

    /// Holds a duplicate of `listener` under `role` for the next handoff.
    pub fn hold(self: &Arc<Self>, role: &str, listener: BorrowedFd<'_>) -> io::Result<Held> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        lock(&self.held).insert(id, (role.to_owned(), listener.try_clone_to_owned()?));
        Ok(Held {
            listeners: Arc::downgrade(self),
            id,
        })
    }

    /// Closes the inherited listeners nothing claimed (pods gone meanwhile);
    /// how many.
    pub fn release_unclaimed(&self) -> usize {
        std::mem::take(&mut *lock(&self.inherited)).len()
    }

    /// Listeners held now.
    pub fn held(&self) -> usize {
        lock(&self.held).len()
    }

    /// Lets every accept loop waiting in [`Listeners::until_accepting`] go.
    pub fn start_accepting(&self) {
        self.accepting.send_replace(true);
    }

    /// Returns once this daemon may accept (at once for a fresh one).
    pub async fn until_accepting(&self) {
        let mut rx = self.accepting.subscribe();
        let _ = rx.wait_for(|accepting| *accepting).await;
    }

    fn duplicates(&self) -> io::Result<Vec<(String, OwnedFd)>> {
        lock(&self.held)
            .values()
            .map(|(role, fd)| Ok((role.clone(), fd.try_clone()?)))
            .collect()
    }
}

/// A listener held for the next handoff; dropping it (with the listener)
/// lets it go.
pub struct Held {
    listeners: Weak<Listeners>,
    id: u64,
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(listeners) = self.listeners.upgrade() {
            lock(&listeners.held).remove(&self.id);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn seqpacket() -> Result<OwnedFd, HandoffError> {
    Ok(socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?)
}

fn send(fd: BorrowedFd<'_>, message: &Message, fds: &[RawFd]) -> Result<(), HandoffError> {
    let bytes = serde_json::to_vec(message).map_err(io::Error::other)?;
    let rights = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &rights };
    socket::sendmsg::<()>(
        fd.as_raw_fd(),
        &[IoSlice::new(&bytes)],
        cmsgs,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )?;
    Ok(())
}

fn receive(fd: BorrowedFd<'_>) -> Result<(Message, Vec<OwnedFd>), HandoffError> {
    let mut buf = vec![0u8; 1 << 20];
    let mut space = nix::cmsg_space!([RawFd; BATCH]);
    let (len, fds) = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = socket::recvmsg::<()>(
            fd.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )?;
        let mut fds = Vec::new();
        for cmsg in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(raw) = cmsg {
                // SAFETY: the kernel installed these descriptors for us
                // alone with this message.
                fds.extend(
                    raw.into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
        }
        (msg.bytes, fds)
    };
    if len == 0 {
        return Err(HandoffError::Protocol(
            "the peer closed the connection".into(),
        ));
    }
    let message = serde_json::from_slice(&buf[..len])
        .map_err(|e| HandoffError::Protocol(format!("unreadable message: {e}")))?;
    Ok((message, fds))
}

fn set_timeout(fd: BorrowedFd<'_>, timeout: Duration) -> Result<(), HandoffError> {
    let tv = nix::sys::time::TimeVal::new(i64::try_from(timeout.as_secs()).unwrap_or(i64::MAX), 0);
    socket::setsockopt(&fd, sockopt::ReceiveTimeout, &tv)?;
    Ok(())
}

/// What the new daemon got from the old one.
pub struct Takeover {
    conn: OwnedFd,
    /// The listeners, each with its role.
    pub listeners: Vec<(String, OwnedFd)>,
    /// The old daemon's version and map layout.
    pub version: String,
    pub layout: u32,
    /// The old daemon's state it carried over.
    pub state: serde_json::Value,
}

impl std::fmt::Debug for Takeover {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Takeover")
            .field("listeners", &self.listeners.len())
            .field("version", &self.version)
            .field("layout", &self.layout)
            .finish_non_exhaustive()
    }
}

/// The new daemon's side: connects to the daemon serving `path` and takes
/// its listeners. `None` when no daemon serves it (none ever ran, or it
/// died: the socket file is left but refuses).
pub fn connect(path: &Path, version: &str, layout: u32) -> Result<Option<Takeover>, HandoffError> {
    let conn = seqpacket()?;
    let addr = UnixAddr::new(path)?;
    match socket::connect(conn.as_raw_fd(), &addr) {
        Ok(()) => {}
        Err(nix::Error::ENOENT | nix::Error::ECONNREFUSED) => return Ok(None),
        Err(e) => {
            return Err(HandoffError::Socket {
                path: path.to_owned(),
                source: e.into(),
            });
        }
    }
    set_timeout(conn.as_fd(), ANSWER_TIMEOUT)?;
    send(
        conn.as_fd(),
        &Message::Hello {
            protocol: PROTOCOL,
            version: version.to_owned(),
            layout,
        },
        &[],
    )?;
    let mut listeners = Vec::new();
    loop {
        match receive(conn.as_fd())? {
            (Message::Batch { roles }, fds) if roles.len() == fds.len() => {
                listeners.extend(roles.into_iter().zip(fds));
            }
            (
                Message::Done {
                    count,
                    version,
                    layout,
                    state,
                },
                _,
            ) if count == listeners.len() => {
                return Ok(Some(Takeover {
                    conn,
                    listeners,
                    version,
                    layout,
                    state,
                }));
            }
            (Message::Refused { reason }, _) => return Err(HandoffError::Protocol(reason)),
            (other, fds) => {
                return Err(HandoffError::Protocol(format!(
                    "unexpected {other:?} with {} descriptors",
                    fds.len()
                )));
            }
        }
    }
}

impl Takeover {
    /// Tells the old daemon this one is ready and waits until it stopped
    /// accepting (it then drains and exits on its own).
    pub async fn ready(self) -> Result<(), HandoffError> {
        let conn = self.conn;
        tokio::task::spawn_blocking(move || {
            send(conn.as_fd(), &Message::Ready, &[])?;
            match receive(conn.as_fd())?.0 {
                Message::Stopped => Ok(()),
                other => Err(HandoffError::Protocol(format!(
                    "expected stopped, got {other:?}"
                ))),
            }
        })
        .await
        .map_err(|e| HandoffError::Io(io::Error::other(e)))?
    }
}

/// A successor is ready: stop accepting, close every held listener, then
/// answer on `stopped`.
pub struct Handover {
    pub version: String,
    pub layout: u32,
    pub stopped: std::sync::mpsc::Sender<()>,
}

/// The old daemon's side: serves `path` (mode 0600, root peers only) on a
/// thread of its own. Each successor gets duplicates of every listener held
/// in `listeners` and `state()`; once it is ready, a [`Handover`] arrives
/// on the returned channel, and after it nothing more is served.
pub fn serve(
    path: &Path,
    listeners: Arc<Listeners>,
    version: String,
    layout: u32,
    state: Box<dyn Fn() -> serde_json::Value + Send>,
) -> Result<tokio::sync::mpsc::Receiver<Handover>, HandoffError> {
    let socket_err = |source: io::Error| HandoffError::Socket {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(socket_err)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(socket_err)?;
    }
    // A socket file left by a daemon that died refuses; ours replaces it.
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(socket_err(e)),
        _ => {}
    }
    let server = seqpacket()?;
    socket::bind(server.as_raw_fd(), &UnixAddr::new(path)?).map_err(|e| socket_err(e.into()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(socket_err)?;
    socket::listen(&server, Backlog::new(4)?)?;
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    std::thread::Builder::new()
        .name("handoff".into())
        .spawn(move || {
            loop {
                let conn = match socket::accept(server.as_raw_fd()) {
                    // SAFETY: accept returned a new descriptor we own.
                    Ok(fd) => unsafe { OwnedFd::from_raw_fd(fd) },
                    Err(err) => {
                        tracing::warn!(%err, "accepting on the handoff socket");
                        std::thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                };
                match hand_over(&conn, &listeners, &version, layout, &*state, &tx) {
                    Ok(()) => return,
                    Err(err) => tracing::warn!(%err, "handoff abandoned; serving on"),
                }
            }
        })
        .map_err(socket_err)?;
    Ok(rx)
}

fn hand_over(
    conn: &OwnedFd,
    listeners: &Listeners,
    version: &str,
    layout: u32,
    state: &dyn Fn() -> serde_json::Value,
    handovers: &tokio::sync::mpsc::Sender<Handover>,
) -> Result<(), HandoffError> {
    let uid = socket::getsockopt(conn, sockopt::PeerCredentials)?.uid();
    if uid != 0 {
        let _ = send(
            conn.as_fd(),
            &Message::Refused {
                reason: "only root may take over".into(),
            },
            &[],
        );
        // Read what the peer sent before closing: closing on unread data
        // would reset the connection before the peer reads the refusal.
        let _ =
            set_timeout(conn.as_fd(), Duration::from_secs(1)).and_then(|()| receive(conn.as_fd()));
        return Err(HandoffError::NotRoot(uid));
    }
    set_timeout(conn.as_fd(), ANSWER_TIMEOUT)?;
    let (peer_version, peer_layout) = match receive(conn.as_fd())?.0 {
        Message::Hello {
            protocol: PROTOCOL,
            version,
            layout,
        } => (version, layout),
        other => {
            let reason = format!("expected hello of protocol {PROTOCOL}, got {other:?}");
            let _ = send(
                conn.as_fd(),
                &Message::Refused {
                    reason: reason.clone(),
                },
                &[],
            );
            return Err(HandoffError::Protocol(reason));
        }
    };
    tracing::info!(version = %peer_version, layout = peer_layout, "a successor is taking over: handing it the listeners");
    let held = listeners.duplicates()?;
    for batch in held.chunks(BATCH) {
        let roles = batch.iter().map(|(r, _)| r.clone()).collect();
        let fds: Vec<RawFd> = batch.iter().map(|(_, fd)| fd.as_raw_fd()).collect();
        send(conn.as_fd(), &Message::Batch { roles }, &fds)?;
    }
    send(
        conn.as_fd(),
        &Message::Done {
            count: held.len(),
            version: version.to_owned(),
            layout,
            state: state(),
        },
        &[],
    )?;
    drop(held);
    set_timeout(conn.as_fd(), READY_TIMEOUT)?;
    match receive(conn.as_fd())?.0 {
        Message::Ready => {}
        other => {
            return Err(HandoffError::Protocol(format!(
                "expected ready, got {other:?}"
            )));
        }
    }
    let (stopped, done) = std::sync::mpsc::channel();
    handovers
        .blocking_send(Handover {
            version: peer_version,
            layout: peer_layout,
            stopped,
        })
        .map_err(|_| HandoffError::Protocol("the daemon is shutting down".into()))?;
    // However the stop went, the successor must not wait for us longer.
    let _ = done.recv_timeout(ANSWER_TIMEOUT / 2);
    send(conn.as_fd(), &Message::Stopped, &[])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A listener handed over is the same socket: a connection waiting in
    /// its queue before the handoff is accepted by the successor, and the
    /// successor's state and roles arrive intact.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_successor_gets_the_same_sockets_and_accepts_what_queued() {
        if !crate::os::is_root() {
            panic!("this test needs root (the handoff serves root peers only)");
        }
        let dir = std::env::temp_dir().join(format!("lw-handoff-{}", std::process::id()));
        let path = dir.join(SOCKET_NAME);
        let old = Listeners::fresh();
        let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let (listener, _held) = old.listen("tunnel", addr).unwrap();
        let bound = listener.local_addr().unwrap();
        let mut handovers = serve(
            &path,
            Arc::clone(&old),
            "old".into(),
            1,
            Box::new(|| serde_json::json!({"numbers": {"a": 1}})),
        )
        .unwrap();
        // Queued before the handoff; nobody accepts it yet.
        let queued = std::net::TcpStream::connect(bound).unwrap();
        let path2 = path.clone();
        let takeover = tokio::task::spawn_blocking(move || connect(&path2, "new", 2))
            .await
            .unwrap()
            .unwrap()
            .expect("a daemon serves the socket");
        assert_eq!((takeover.version.as_str(), takeover.layout), ("old", 1));
        assert_eq!(takeover.state["numbers"]["a"], 1);
        let new = Listeners::inheriting(
            takeover
                .listeners
                .iter()
                .map(|(r, fd)| (r.clone(), fd.try_clone().unwrap()))
                .collect(),
        );
        assert!(new.take("admin", bound).is_none(), "roles are kept apart");
        let (inherited, _new_held) = new.listen("tunnel", bound).unwrap();
        let stop = tokio::spawn(async move {
            let handover = handovers.recv().await.unwrap();
            assert_eq!((handover.version.as_str(), handover.layout), ("new", 2));
            drop(listener);
            drop(_held);
            handover.stopped.send(()).unwrap();
        });
        let Takeover {
            conn,
            listeners,
            version,
            layout,
            state,
        } = takeover;
        drop(listeners);
        Takeover {
            conn,
            listeners: Vec::new(),
            version,
            layout,
            state,
        }
        .ready()
        .await
        .unwrap();
        stop.await.unwrap();
        assert_eq!(old.held(), 0, "the old daemon let its listeners go");
        let (accepted, from) = inherited.accept().unwrap();
        assert_eq!(from, queued.local_addr().unwrap());
        drop(accepted);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
