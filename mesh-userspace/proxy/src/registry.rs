//! Every connection the proxy carries, registered while it lives, so that
//! the daemon can act on established connections, not just new ones:
//! - **policy re-check**: when the AuthorizationPolicies change, each
//!   connection delivered to a pod here is decided again, and those the new
//!   policy refuses are closed (reset) with their reason;
//! - **drain**: on SIGTERM the daemon stops accepting, waits until the
//!   registry is empty (or its drain timeout passes), then closes the rest.
//!
//! A connection holds a [`Registered`] guard; dropping it (the connection
//! ended) takes it out. Closing cancels the guard's token, which the
//! connection's copy loop selects on.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use lacewing_tunnel::{Peer, Refusal};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Which way a connection goes through this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Delivered to a pod on this node (from the tunnel or a meshed pod
    /// here): this node's policies decide it, and are re-checked.
    Inbound,
    /// From a pod here to elsewhere: the destination decides it.
    Outbound,
}

#[derive(Debug)]
struct Entry {
    peer: Peer,
    dest: SocketAddr,
    direction: Direction,
    close: CancellationToken,
    /// Its requests are decided one by one (it was opened under an L7
    /// policy); otherwise its bytes are carried as they are.
    per_request: bool,
}

#[derive(Debug, Default)]
struct Live {
    next: u64,
    entries: HashMap<u64, Entry>,
}

/// The registry of live connections.
#[derive(Debug)]
pub struct Registry {
    live: Mutex<Live>,
    /// The number of live connections, for those who wait for zero.
    count: watch::Sender<usize>,
    /// Connections registered so far: inbound, outbound.
    opened: [AtomicU64; 2],
}

impl Default for Registry {
    fn default() -> Self {
        Self {
            live: Mutex::default(),
            count: watch::channel(0).0,
            opened: [AtomicU64::new(0), AtomicU64::new(0)],
        }
    }
}

impl Direction {
    /// The `direction` label of metrics.
    pub const fn label(self) -> &'static str {
        match self {
            Self::Inbound => "inbound",
            Self::Outbound => "outbound",
        }
    }

    const fn index(self) -> usize {
        match self {
            Self::Inbound => 0,
            Self::Outbound => 1,
        }
    }

    pub const ALL: [Self; 2] = [Self::Inbound, Self::Outbound];
}

/// A connection's place in the registry: held for as long as it lives.
#[derive(Debug)]
pub struct Registered {
    id: u64,
    registry: Arc<Registry>,
    /// Cancelled when the registry closes this connection.
    pub closed: CancellationToken,
}

impl Drop for Registered {
    fn drop(&mut self) {
        let mut live = self.registry.lock();
        live.entries.remove(&self.id);
        let n = live.entries.len();
        drop(live);
        self.registry.count.send_replace(n);
    }
}

/// A connection the registry closed, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Closed {
    pub peer: Peer,
    pub dest: SocketAddr,
    pub refusal: Refusal,
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, Live> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a connection from `peer` to `dest`.
    pub fn register(
        self: &Arc<Self>,
        peer: Peer,
        dest: SocketAddr,
        direction: Direction,
    ) -> Registered {
        let close = CancellationToken::new();
        self.opened[direction.index()].fetch_add(1, Ordering::Relaxed);
        let mut live = self.lock();
        live.next += 1;
        let id = live.next;
        live.entries.insert(
            id,
            Entry {
                peer,
                dest,
                direction,
                close: close.clone(),
                per_request: false,
            },
        );
        let n = live.entries.len();
        drop(live);
        self.count.send_replace(n);
        Registered {
            id,
            registry: Arc::clone(self),
            closed: close,
        }
    }

    /// Marks a connection as one whose requests are decided one by one.
    pub fn set_per_request(&self, registered: &Registered) {
        if let Some(e) = self.lock().entries.get_mut(&registered.id) {
            e.per_request = true;
        }
    }

    /// Decides every inbound connection again with `decide` (which also
    /// says whether its requests must now be decided one by one) and closes
    /// those it refuses; returns what it closed. A connection carried as
    /// bytes whose pod an L7 policy now selects is closed too (not counted
    /// as a refusal): its client reconnects, and the new connection's
    /// requests are decided.
    pub fn recheck(
        &self,
        decide: impl Fn(&Peer, SocketAddr) -> Result<bool, Refusal>,
    ) -> Vec<Closed> {
        let live = self.lock();
        let mut closed = Vec::new();
        for entry in live.entries.values() {
            if entry.direction != Direction::Inbound || entry.close.is_cancelled() {
                continue;
            }
            match decide(&entry.peer, entry.dest) {
                Err(refusal) => {
                    entry.close.cancel();
                    closed.push(Closed {
                        peer: entry.peer.clone(),
                        dest: entry.dest,
                        refusal,
                    });
                }
                Ok(true) if !entry.per_request => {
                    tracing::info!(identity = %entry.peer.identity, dest = %entry.dest, "connection closed: an L7 policy now decides its requests");
                    entry.close.cancel();
                }
                Ok(_) => {}
            }
        }
        closed
    }

    /// Closes every live connection (the end of a drain); returns how many.
    pub fn close_all(&self) -> usize {
        let live = self.lock();
        for entry in live.entries.values() {
            entry.close.cancel();
        }
        live.entries.len()
    }

    /// Connections registered so far in `direction`.
    pub fn opened(&self, direction: Direction) -> u64 {
        self.opened[direction.index()].load(Ordering::Relaxed)
    }

    /// Live connections now.
    pub fn len(&self) -> usize {
        *self.count.borrow()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Resolves once no connection is live.
    pub async fn until_empty(&self) {
        let mut count = self.count.subscribe();
        // The sender lives in self, so this cannot fail while we borrow it.
        let _ = count.wait_for(|n| *n == 0).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(identity: &str) -> Peer {
        Peer {
            identity: identity.to_owned(),
            source: Some("10.244.0.5".parse().unwrap()),
        }
    }

    #[tokio::test]
    async fn a_recheck_closes_only_inbound_connections_the_decision_refuses() {
        let registry = Arc::new(Registry::default());
        let dest: SocketAddr = "10.244.1.9:80".parse().unwrap();
        let denied = registry.register(peer("a"), dest, Direction::Inbound);
        let allowed = registry.register(peer("b"), dest, Direction::Inbound);
        let outbound = registry.register(peer("a"), dest, Direction::Outbound);
        assert_eq!(registry.len(), 3);
        let closed = registry.recheck(|peer, _| {
            if peer.identity == "a" {
                Err(Refusal::new(403, "policy_denied", "deny a"))
            } else {
                Ok(false)
            }
        });
        assert_eq!(closed.len(), 1);
        assert_eq!(closed[0].peer.identity, "a");
        assert!(denied.closed.is_cancelled());
        assert!(!allowed.closed.is_cancelled());
        assert!(!outbound.closed.is_cancelled());
        // Closed once: a second pass does not count it again.
        assert!(
            registry
                .recheck(|_, _| Err(Refusal::new(403, "x", "")))
                .len()
                == 1
        );
    }

    #[tokio::test]
    async fn a_connection_carried_as_bytes_is_closed_when_its_requests_must_be_decided() {
        let registry = Arc::new(Registry::default());
        let dest: SocketAddr = "10.244.1.9:80".parse().unwrap();
        let bytes = registry.register(peer("a"), dest, Direction::Inbound);
        let requests = registry.register(peer("a"), dest, Direction::Inbound);
        registry.set_per_request(&requests);
        // An L7 policy now selects the pod: not a refusal, but the
        // connection that is not read as requests must go.
        let closed = registry.recheck(|_, _| Ok(true));
        assert!(closed.is_empty());
        assert!(bytes.closed.is_cancelled());
        assert!(!requests.closed.is_cancelled());
    }

    #[tokio::test]
    async fn until_empty_waits_for_the_last_connection() {
        let registry = Arc::new(Registry::default());
        let dest: SocketAddr = "10.244.1.9:80".parse().unwrap();
        let first = registry.register(peer("a"), dest, Direction::Outbound);
        let second = registry.register(peer("a"), dest, Direction::Inbound);
        let waiter = tokio::spawn({
            let registry = Arc::clone(&registry);
            async move { registry.until_empty().await }
        });
        drop(first);
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "one connection is still live");
        assert_eq!(registry.close_all(), 1);
        assert!(second.closed.is_cancelled());
        drop(second);
        waiter.await.unwrap();
        assert!(registry.is_empty());
    }
}
