//! The same-node fast path's maps (see `mesh_common::fastpath`), kept in
//! line with the meshed pods here and the policies: each meshed pod's
//! addresses with its identity's number (`LW_LOCAL_PODS`), and for every
//! pair of (identity of a meshed pod here, meshed pod here) the verdict L4
//! policy gives it on every port, when that verdict is the same on all
//! ports and no L7 rule or rate limit applies (`LW_PAIR_POLICY`). Pairs
//! without a verdict go through the daemon, which decides per connection.

use std::{
    collections::{BTreeSet, HashMap},
    path::Path,
    sync::{Arc, Mutex},
};

use aya::maps::{HashMap as BpfHashMap, MapData, MapError};
use mesh_common::{
    capture::AddrKey,
    fastpath::{LocalPod, PairKey, VERDICT_ALLOW, VERDICT_DENY},
    names,
};

use super::{
    maps::{addr_key, open},
    workloads::LocalWorkloads,
};
use lacewing_core::model::authorization::{self, Source};

/// Numbers for workload identities, the kernel's short name for them. A
/// number is never reused while the daemon runs.
#[derive(Debug, Default)]
pub struct IdentityNumbers {
    numbers: Mutex<HashMap<String, u32>>,
}

impl IdentityNumbers {
    /// The numbers given so far, for a successor (the kernel's maps hold
    /// them: a daemon taking over must give every identity the same one).
    pub fn export(&self) -> serde_json::Value {
        serde_json::to_value(&*self.numbers.lock().unwrap_or_else(|p| p.into_inner()))
            .unwrap_or_default()
    }

    /// Numbers from a predecessor ([`Self::export`]), before any is given.
    pub fn import(&self, numbers: &serde_json::Value) {
        let Ok(numbers) = serde_json::from_value::<HashMap<String, u32>>(numbers.clone()) else {
            return;
        };
        *self.numbers.lock().unwrap_or_else(|p| p.into_inner()) = numbers;
    }

    /// The number of `identity`, given on first use (from 1).
    pub fn number(&self, identity: &str) -> u32 {
        let mut numbers = self.numbers.lock().unwrap_or_else(|p| p.into_inner());
        let next = numbers.values().max().map_or(1, |n| n.saturating_add(1));
        *numbers.entry(identity.to_owned()).or_insert(next)
    }
}

/// What the two maps should hold.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Desired {
    pub pods: HashMap<AddrKey, LocalPod>,
    pub pairs: HashMap<PairKey, u32>,
}

/// The maps' content for the meshed pods here and the policies now.
pub fn desired(
    workloads: &LocalWorkloads,
    numbers: &IdentityNumbers,
    trust_domain: &str,
) -> Desired {
    let meshed = workloads.meshed();
    let policies = workloads.policies();
    let routes = workloads.routes();
    let mut out = Desired::default();
    let sources: BTreeSet<String> = meshed.iter().map(|w| w.identity(trust_domain)).collect();
    for dest in &meshed {
        let identity = numbers.number(&dest.identity(trust_domain));
        for ip in &dest.addresses {
            out.pods
                .insert(addr_key(*ip), LocalPod { identity, _pad: 0 });
        }
        // A rate limit counts every connection or request: none may bypass
        // the daemon.
        if dest.addresses.iter().any(|ip| routes.limits_address(*ip)) {
            continue;
        }
        for source in &sources {
            let Some(allowed) =
                authorization::any_port_verdict(&policies, dest, &Source { identity: source })
            else {
                continue;
            };
            let src_identity = numbers.number(source);
            let verdict = if allowed { VERDICT_ALLOW } else { VERDICT_DENY };
            for ip in &dest.addresses {
                out.pairs.insert(
                    PairKey {
                        dest: addr_key(*ip),
                        src_identity,
                    },
                    verdict,
                );
            }
        }
    }
    out
}

/// The pinned fast-path maps.
pub struct FastPathMaps {
    pods: BpfHashMap<MapData, AddrKey, LocalPod>,
    pairs: BpfHashMap<MapData, PairKey, u32>,
}

impl FastPathMaps {
    pub fn open(root: &Path) -> Result<Self, MapError> {
        Ok(Self {
            pods: BpfHashMap::try_from(open(root, names::MAP_LOCAL_PODS)?)?,
            pairs: BpfHashMap::try_from(open(root, names::MAP_PAIR_POLICY)?)?,
        })
    }

    /// The kernel's verdict for `src_identity` to the pod at `dest`: allow,
    /// deny, or none (the daemon decides).
    pub fn verdict(&self, dest: std::net::IpAddr, src_identity: u32) -> Option<bool> {
        let v = self
            .pairs
            .get(
                &PairKey {
                    dest: addr_key(dest),
                    src_identity,
                },
                0,
            )
            .ok()?;
        Some(v == VERDICT_ALLOW)
    }

    /// Makes the maps hold `want`, writing only what differs. New verdicts
    /// land before stale ones go, so a pair never falls back to the daemon
    /// in between for nothing; a failed write is retried on the next change.
    pub fn sync(&mut self, want: &Desired) -> Result<(), MapError> {
        let pods: HashMap<AddrKey, LocalPod> = self.pods.iter().filter_map(Result::ok).collect();
        let pairs: HashMap<PairKey, u32> = self.pairs.iter().filter_map(Result::ok).collect();
        for (k, v) in &want.pods {
            if pods.get(k) != Some(v) {
                self.pods.insert(k, v, 0)?;
            }
        }
        for (k, v) in &want.pairs {
            if pairs.get(k) != Some(v) {
                self.pairs.insert(k, v, 0)?;
            }
        }
        for k in pairs.keys().filter(|k| !want.pairs.contains_key(k)) {
            self.pairs.remove(k)?;
        }
        for k in pods.keys().filter(|k| !want.pods.contains_key(k)) {
            self.pods.remove(k)?;
        }
        Ok(())
    }
}

/// Keeps the maps in line with the workloads and policies, forever.
pub async fn run(
    workloads: Arc<LocalWorkloads>,
    mut maps: FastPathMaps,
    numbers: Arc<IdentityNumbers>,
    trust_domain: String,
) {
    let mut changes = workloads.watch();
    loop {
        changes.borrow_and_update();
        let want = desired(&workloads, &numbers, &trust_domain);
        match maps.sync(&want) {
            Ok(()) => tracing::debug!(
                pods = want.pods.len(),
                verdicts = want.pairs.len(),
                "fast path maps updated"
            ),
            Err(err) => tracing::warn!(%err, "updating the fast path maps"),
        }
        if changes.changed().await.is_err() {
            return;
        }
    }
}

/// Closes (resets) the connections `pod` opened straight to another meshed
/// pod of this node that the policies in force now refuse: the kernel's
/// fast path let them through at connect, so they never reached the daemon
/// and the registry's re-check cannot see them. Each is found in the pod's
/// network namespace (`netns`) by the kernel's socket diagnostics, decided
/// as the daemon decides a new connection, logged and counted as a denial.
/// Connections through the daemon are not here: the kernel pointed them at
/// the in-pod listener (loopback), and the registry re-checks them.
pub fn close_denied(
    pod: &lacewing_core::model::workloads::Workload,
    netns: &std::fs::File,
    proxy: &lacewing_proxy::Proxy,
) -> std::io::Result<usize> {
    use lacewing_sys::diag::{self, TCP_ESTABLISHED, TCP_LISTEN};
    use std::os::fd::AsFd as _;
    let inbound = &proxy.inbound;
    let sockets = lacewing_sys::os::in_netns(netns.as_fd(), || {
        diag::tcp_sockets(&[TCP_ESTABLISHED, TCP_LISTEN])
    })?;
    // A connection the pod accepted is decided by its client's node (the
    // client's policies name the client): only the pod's own are checked.
    let listening: BTreeSet<u16> = sockets
        .iter()
        .filter(|s| s.state == TCP_LISTEN)
        .map(|s| s.local.port())
        .collect();
    let identity = pod.identity(&inbound.trust_domain);
    let mut closed = 0;
    for socket in sockets.iter().filter(|s| s.state == TCP_ESTABLISHED) {
        let (local, remote) = (canonical(socket.local), canonical(socket.remote));
        if listening.contains(&local.port())
            || pod.addresses.contains(&remote.ip())
            || !inbound.state.local(remote.ip()).is_some_and(|w| w.meshed)
        {
            continue;
        }
        let peer = lacewing_tunnel::Peer {
            identity: identity.clone(),
            source: Some(local.ip()),
        };
        let Err(refusal) = inbound.authorize(&peer, remote) else {
            continue;
        };
        match lacewing_sys::os::in_netns(netns.as_fd(), || diag::destroy(socket)) {
            Ok(()) => {
                tracing::info!(
                    %identity,
                    source = %local,
                    dest = %remote,
                    reason = refusal.reason,
                    policy = ?refusal.policy,
                    path = "kernel",
                    "established connection closed: the policy now denies it"
                );
                proxy.metrics.refused(&refusal);
                closed += 1;
            }
            Err(err) => {
                tracing::warn!(source = %local, dest = %remote, %err, "cannot close a connection the policy now denies");
            }
        }
    }
    Ok(closed)
}

/// An IPv4-mapped IPv6 address as the IPv4 address it is.
fn canonical(addr: std::net::SocketAddr) -> std::net::SocketAddr {
    std::net::SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

#[cfg(test)]
mod tests {
    /// A successor given the numbers keeps every identity's and gives a new
    /// identity one no predecessor gave.
    #[test]
    fn numbers_carried_over_stay_and_new_ones_follow_them() {
        let old = super::IdentityNumbers::default();
        assert_eq!(old.number("spiffe://a"), 1);
        assert_eq!(old.number("spiffe://b"), 2);
        let new = super::IdentityNumbers::default();
        new.import(&old.export());
        assert_eq!(new.number("spiffe://b"), 2);
        assert_eq!(new.number("spiffe://c"), 3);
        assert_eq!(new.number("spiffe://a"), 1);
        new.import(&serde_json::json!("not numbers"));
        assert_eq!(new.number("spiffe://c"), 3, "a bad import changes nothing");
    }
}
