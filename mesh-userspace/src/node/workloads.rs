//! The workloads scheduled on this node, as the controller last sent them:
//! the pods this node captures and whose identities it may ask for. Shown
//! at `/status` on :15020 (like ztunnel's config dump).

use std::{collections::BTreeMap, sync::Mutex};

use serde::Serialize;

use crate::{
    model::workloads::Workload,
    proto::{self, pb},
};

#[derive(Debug)]
pub struct LocalWorkloads {
    state: Mutex<State>,
    /// The applied version, for those who wait for changes.
    version: tokio::sync::watch::Sender<u64>,
}

impl Default for LocalWorkloads {
    fn default() -> Self {
        Self {
            state: Mutex::default(),
            version: tokio::sync::watch::channel(0).0,
        }
    }
}

#[derive(Debug, Default)]
struct State {
    version: u64,
    workloads: BTreeMap<String, Workload>,
}

/// One workload as `/status` shows it.
#[derive(Serialize)]
struct Shown<'a> {
    namespace: &'a str,
    name: &'a str,
    service_account: &'a str,
    addresses: &'a [std::net::IpAddr],
    meshed: bool,
}

#[derive(Serialize)]
struct Status<'a> {
    node: &'a str,
    version: u64,
    workloads: Vec<Shown<'a>>,
    certificates: Vec<super::identity::ShownCertificate>,
}

impl LocalWorkloads {
    /// The workloads after `update`, or why it cannot be applied; nothing
    /// changes here until [`replace`](Self::replace).
    pub fn next(
        &self,
        update: &pb::ConfigUpdate,
        node: &str,
    ) -> Result<BTreeMap<String, Workload>, String> {
        let mut next = if update.base_version == 0 {
            BTreeMap::new()
        } else {
            self.lock().workloads.clone()
        };
        for key in &update.workload_removes {
            next.remove(key);
        }
        for w in &update.workload_upserts {
            let w = proto::workload_from(w, node).map_err(|e| e.to_string())?;
            next.insert(w.key(), w);
        }
        Ok(next)
    }

    pub fn replace(&self, version: u64, workloads: BTreeMap<String, Workload>) {
        *self.lock() = State { version, workloads };
        self.version.send_replace(version);
    }

    /// Wakes on every applied version.
    pub fn watch(&self) -> tokio::sync::watch::Receiver<u64> {
        self.version.subscribe()
    }

    /// The identities of the meshed workloads here, each with one pod that
    /// carries it (namespace, name): what the node asks certificates for.
    pub fn meshed_identities(&self, trust_domain: &str) -> BTreeMap<String, (String, String)> {
        self.lock()
            .workloads
            .values()
            .filter(|w| w.meshed)
            .map(|w| {
                (
                    w.identity(trust_domain),
                    (w.namespace.clone(), w.name.clone()),
                )
            })
            .collect()
    }

    /// `/status` JSON.
    pub fn status_json(
        &self,
        node: &str,
        certificates: Vec<super::identity::ShownCertificate>,
    ) -> String {
        let state = self.lock();
        let status = Status {
            node,
            version: state.version,
            workloads: state
                .workloads
                .values()
                .map(|w| Shown {
                    namespace: &w.namespace,
                    name: &w.name,
                    service_account: &w.service_account,
                    addresses: &w.addresses,
                    meshed: w.meshed,
                })
                .collect(),
            certificates,
        };
        serde_json::to_string_pretty(&status).unwrap_or_default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}
