//! Workload certificates on the node: for every meshed pod scheduled here,
//! a key made here (it never leaves the node) and a certificate the
//! controller signed, renewed at half its lifetime. A new certificate
//! replaces the old one for new handshakes only: connections already
//! established keep the session they have, so rotation drops nothing.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use serde::Serialize;

use super::{config::Controller, metrics::Metrics, workloads::LocalWorkloads};
use lacewing_core::pki::{self, Svid};
use lacewing_core::proto::ca_pb::{
    CreateCertificateRequest, certificate_service_client::CertificateServiceClient,
};

/// How soon a failed request is tried again.
const RETRY: Duration = Duration::from_secs(1);
/// The longest the manager sleeps without looking (workload changes wake it).
const LOOK_EVERY: Duration = Duration::from_secs(5);

/// One identity's current certificate.
struct Held {
    svid: Arc<Svid>,
    serial: String,
    renew_at: SystemTime,
}

/// The certificates this node holds, by SPIFFE identity. (Peers are checked
/// against the node credentials' `ca.pem`: the one CA that signs these.)
pub struct Identities {
    held: Mutex<BTreeMap<String, Held>>,
    /// Bumped whenever a certificate is stored, for connections that wait
    /// for the first one of their pod.
    stored: tokio::sync::watch::Sender<u64>,
}

impl Default for Identities {
    fn default() -> Self {
        Self {
            held: Mutex::default(),
            stored: tokio::sync::watch::channel(0).0,
        }
    }
}

/// One certificate as `/status` shows it.
#[derive(Serialize)]
pub struct ShownCertificate {
    pub identity: String,
    pub serial: String,
    /// Seconds since the epoch.
    pub not_after: u64,
}

impl Identities {
    /// The current certificate of `identity` and its serial, if the node
    /// holds one.
    pub fn get(&self, identity: &str) -> Option<(Arc<Svid>, String)> {
        self.lock()
            .get(identity)
            .map(|h| (Arc::clone(&h.svid), h.serial.clone()))
    }

    /// Wakes whenever a certificate is stored.
    pub fn watch(&self) -> tokio::sync::watch::Receiver<u64> {
        self.stored.subscribe()
    }

    fn store(&self, identity: String, held: Held) {
        self.lock().insert(identity, held);
        self.stored.send_modify(|n| *n += 1);
    }

    pub fn shown(&self) -> Vec<ShownCertificate> {
        self.lock()
            .iter()
            .map(|(identity, h)| ShownCertificate {
                identity: identity.clone(),
                serial: h.serial.clone(),
                not_after: epoch_secs(h.svid.not_after),
            })
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Held>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Identities with no certificate or past their renewal time, and the
    /// earliest renewal time of the rest.
    fn due(
        &self,
        wanted: &BTreeMap<String, (String, String)>,
    ) -> (Vec<String>, Option<SystemTime>) {
        let now = SystemTime::now();
        let held = self.lock();
        let mut due = Vec::new();
        let mut next = None::<SystemTime>;
        for id in wanted.keys() {
            match held.get(id) {
                Some(h) if h.renew_at > now => {
                    next = Some(next.map_or(h.renew_at, |n| n.min(h.renew_at)));
                }
                _ => due.push(id.clone()),
            }
        }
        (due, next)
    }
}

fn epoch_secs(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// Keeps a certificate for every meshed local workload's identity, forever.
pub async fn run(
    controller: Controller,
    trust_domain: String,
    workloads: Arc<LocalWorkloads>,
    identities: Arc<Identities>,
    metrics: Metrics,
) {
    let mut changes = workloads.watch();
    loop {
        changes.borrow_and_update();
        let wanted = workloads.meshed_identities(&trust_domain);
        // Identities no pod here has any more are dropped.
        identities.lock().retain(|id, _| {
            let keep = wanted.contains_key(id);
            if !keep {
                metrics.certificate_dropped(id);
            }
            keep
        });
        let (due, _) = identities.due(&wanted);
        let mut failed = false;
        for id in due {
            let (namespace, pod) = &wanted[&id];
            match request(&controller, &id, namespace, pod).await {
                Ok(svid) => {
                    let issued = SystemTime::now();
                    let life = svid.not_after.duration_since(issued).unwrap_or_default();
                    let serial = serial_of(&svid.cert_chain_pem[0]);
                    tracing::info!(identity = %id, %serial, lifetime_s = life.as_secs(), "workload certificate issued");
                    metrics.certificate_issued(&id, epoch_secs(svid.not_after));
                    identities.store(
                        id,
                        Held {
                            svid: Arc::new(svid),
                            serial,
                            renew_at: issued + life / 2,
                        },
                    );
                }
                Err(err) => {
                    tracing::warn!(identity = %id, pod = %format!("{namespace}/{pod}"), %err, "workload certificate request failed");
                    metrics.certificate_failed();
                    failed = true;
                }
            }
        }
        let wait = if failed {
            RETRY
        } else {
            // The earliest renewal, counting the certificates just issued.
            let (_, next) = identities.due(&wanted);
            next.and_then(|n| n.duration_since(SystemTime::now()).ok())
                .unwrap_or(LOOK_EVERY)
                .min(LOOK_EVERY)
        };
        tokio::select! {
            _ = changes.changed() => {}
            () = tokio::time::sleep(wait) => {}
        }
    }
}

/// Why a workload certificate could not be had (the node retries).
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("making a key: {0}")]
    Key(#[from] pki::PkiError),
    #[error(transparent)]
    Controller(#[from] super::channel::ChannelError),
    #[error("the controller refused: {code}: {message}")]
    Refused { code: tonic::Code, message: String },
    #[error("the controller sent no certificate")]
    Empty,
    #[error("the controller sent an unreadable certificate")]
    Unreadable,
    #[error("the certificate the controller sent does not name {0}")]
    WrongIdentity(String),
}

/// Asks the controller to sign a new key for `identity`, carried by `pod`.
pub async fn request(
    controller: &Controller,
    identity: &str,
    namespace: &str,
    pod: &str,
) -> Result<Svid, RequestError> {
    let (key, csr_pem) = pki::new_key_and_csr(identity)?;
    let mut client = CertificateServiceClient::new(super::channel::connect(controller).await?);
    let resp = client
        .create_certificate(CreateCertificateRequest {
            namespace: namespace.to_owned(),
            pod: pod.to_owned(),
            csr_pem,
        })
        .await
        .map_err(|s| RequestError::Refused {
            code: s.code(),
            message: s.message().to_owned(),
        })?
        .into_inner();
    let leaf = resp.cert_chain_pem.first().ok_or(RequestError::Empty)?;
    let not_after = pki::not_after(leaf).ok_or(RequestError::Unreadable)?;
    if pki::uri_sans(&pki::pem_to_der(leaf).unwrap_or_default()) != [identity] {
        return Err(RequestError::WrongIdentity(identity.to_owned()));
    }
    Ok(Svid {
        identity: identity.to_owned(),
        cert_chain_pem: resp.cert_chain_pem,
        key_pem: key.serialize_pem(),
        not_after,
    })
}

fn serial_of(cert_pem: &str) -> String {
    pki::pem_to_der(cert_pem)
        .and_then(|der| {
            x509_parser::parse_x509_certificate(&der)
                .ok()
                .map(|(_, c)| c.raw_serial_as_string())
        })
        .unwrap_or_default()
}
