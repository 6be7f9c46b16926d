//! The same-node fast path's maps (see `mesh_common::fastpath`), kept in
//! line with the meshed pods here and the policies: each meshed pod's
//! addresses with its identity's number (`LW_LOCAL_PODS`), and for every
//! pair of (identity of a meshed pod here, meshed pod here) the verdict L4
//! policy gives it on every port, when that verdict is the same on all
//! ports and no L7 rule applies (`LW_PAIR_POLICY`). Pairs without a verdict
//! go through the daemon, which decides per connection.

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
    /// The number of `identity`, given on first use (from 1).
    pub fn number(&self, identity: &str) -> u32 {
        let mut numbers = self.numbers.lock().unwrap_or_else(|p| p.into_inner());
        let next = u32::try_from(numbers.len() + 1).unwrap_or(u32::MAX);
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
    let mut out = Desired::default();
    let sources: BTreeSet<String> = meshed.iter().map(|w| w.identity(trust_domain)).collect();
    for dest in &meshed {
        let identity = numbers.number(&dest.identity(trust_domain));
        for ip in &dest.addresses {
            out.pods
                .insert(addr_key(*ip), LocalPod { identity, _pad: 0 });
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
