//! The node's TLS material: its own certificate (the server certificate of
//! its tunnel port and its client certificate to the controller) and the
//! mesh's trust bundle. The daemon renews the certificate at half its
//! lifetime, asking the controller with the current one, and follows the
//! bundle the controller streams (a CA rotation adds a root, later removes
//! one). Each change goes into the tunnel's TLS configuration and the roots
//! the tunnel client checks servers with (every new handshake reads them),
//! and into `--tls-dir` (the controller channel reads that on every
//! reconnect, and so does the next daemon). Connections already up keep
//! their session: nothing is dropped.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex, RwLock},
    time::{Duration, SystemTime},
};

use lacewing_core::{
    pki,
    proto::ca_pb::{
        RenewNodeRequest, WatchTrustBundleRequest,
        certificate_service_client::CertificateServiceClient,
    },
    trust,
};
use lacewing_tunnel::tls;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use super::{channel, config::Controller};

/// The tunnel server's TLS configuration, shared with the tunnel.
pub type TunnelTls = Arc<RwLock<Arc<rustls::ServerConfig>>>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

/// The node certificate's metrics.
#[derive(Clone, Debug, Default)]
pub struct NodeCertMetrics {
    expiry: Gauge,
    renewals: Family<ResultLabels, Counter>,
    roots: Gauge,
}

impl NodeCertMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "lacewing_node_certificate_expiry_timestamp_seconds",
            "When the node's own certificate (tunnel server, controller client) expires",
            m.expiry.clone(),
        );
        registry.register(
            "lacewing_node_certificate_renewals",
            "Renewals of the node's own certificate, by result",
            m.renewals.clone(),
        );
        registry.register(
            "lacewing_node_trust_bundle_roots",
            "Roots in the trust bundle the node checks peers against (2 during a CA rotation)",
            m.roots.clone(),
        );
        m
    }
}

/// The node's certificate, key and trust bundle, and what is built from
/// them; one writer changes them at a time.
pub struct NodeTls {
    dir: PathBuf,
    tunnel: TunnelTls,
    roots: tls::Roots,
    material: Mutex<Material>,
    metrics: NodeCertMetrics,
}

struct Material {
    chain: String,
    key: String,
    bundle: String,
}

impl NodeTls {
    /// What `--tls-dir` holds now.
    pub fn load(dir: &Path, metrics: NodeCertMetrics) -> Result<Self, RenewError> {
        let (bundle, chain, key) = pki::read_credentials(dir)?;
        let roots = tls::roots(&bundle)?;
        let config =
            tls::server_config(&chain, &key, Arc::clone(&roots), tls::ClientCert::Required)?;
        metrics.roots.set(count(&bundle));
        Ok(Self {
            dir: dir.to_owned(),
            tunnel: Arc::new(RwLock::new(Arc::new(config))),
            roots: tls::Roots::new(roots),
            material: Mutex::new(Material { chain, key, bundle }),
            metrics,
        })
    }

    /// The tunnel server's configuration, as it changes.
    pub fn tunnel(&self) -> TunnelTls {
        Arc::clone(&self.tunnel)
    }

    /// The roots tunnel clients check servers with, as they change.
    pub fn roots(&self) -> tls::Roots {
        self.roots.clone()
    }

    /// A renewed certificate and key (the bundle stays the one streamed).
    fn set_certificate(&self, chain: String, key: String) -> Result<(), RenewError> {
        let mut m = self.material.lock().unwrap_or_else(|p| p.into_inner());
        self.install(&chain, &key, &m.bundle)?;
        (m.chain, m.key) = (chain, key);
        Ok(())
    }

    /// A new trust bundle; false when it is the one in use.
    fn set_bundle(&self, bundle: String) -> Result<bool, RenewError> {
        let mut m = self.material.lock().unwrap_or_else(|p| p.into_inner());
        if m.bundle == bundle {
            return Ok(false);
        }
        self.install(&m.chain, &m.key, &bundle)?;
        self.metrics.roots.set(count(&bundle));
        m.bundle = bundle;
        Ok(true)
    }

    /// Builds everything from the material first (a bad piece changes
    /// nothing), then swaps it in and writes the folder.
    fn install(&self, chain: &str, key: &str, bundle: &str) -> Result<(), RenewError> {
        let roots = tls::roots(bundle)?;
        let config = tls::server_config(chain, key, Arc::clone(&roots), tls::ClientCert::Required)?;
        *self.tunnel.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(config);
        self.roots.replace(roots);
        pki::write_credentials(&self.dir, bundle, chain, key)?;
        Ok(())
    }

    /// Follows the controller's trust bundle for ever, reconnecting after
    /// a second (doubling to 30 s) when the stream breaks.
    pub async fn follow_bundle(self: Arc<Self>, controller: Controller) {
        let mut backoff = Duration::from_secs(1);
        loop {
            match self.bundle_stream(&controller).await {
                Ok(()) => backoff = Duration::from_secs(1),
                Err(err) => {
                    tracing::warn!(%err, retry_in = ?backoff, "the trust bundle stream broke");
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(30));
        }
    }

    async fn bundle_stream(&self, controller: &Controller) -> Result<(), RenewError> {
        let channel = channel::connect(controller).await?;
        let mut bundles = CertificateServiceClient::new(channel)
            .watch_trust_bundle(WatchTrustBundleRequest {})
            .await
            .map_err(|status| RenewError::Refused(Box::new(status)))?
            .into_inner();
        while let Some(bundle) = bundles
            .message()
            .await
            .map_err(|status| RenewError::Refused(Box::new(status)))?
        {
            let roots = trust::fingerprints(&bundle.pem);
            match self.set_bundle(bundle.pem) {
                Ok(true) => tracing::info!(?roots, "trust bundle changed"),
                Ok(false) => {}
                // The controller checks what it hands out; a bundle that
                // still cannot be used leaves the one in use.
                Err(err) => tracing::warn!(%err, "refused a trust bundle from the controller"),
            }
        }
        Ok(())
    }
}

fn count(bundle: &str) -> i64 {
    i64::try_from(trust::fingerprints(bundle).len()).unwrap_or(i64::MAX)
}

/// Why a renewal failed (it is tried again soon).
#[derive(Debug, thiserror::Error)]
pub enum RenewError {
    #[error("{0}")]
    Pki(#[from] pki::PkiError),
    #[error("{0}")]
    Channel(#[from] channel::ChannelError),
    #[error("the controller refused: {0}")]
    Refused(Box<tonic::Status>),
    #[error("the new certificate cannot serve the tunnel: {0}")]
    Tls(#[from] tls::TlsError),
    #[error("the certificate in {0} has no readable validity")]
    NoValidity(PathBuf),
}

/// The node's own certificate, renewed.
pub struct NodeCert {
    pub controller: Controller,
    pub trust_domain: String,
    pub node: String,
    pub tls: Arc<NodeTls>,
}

impl NodeCert {
    /// Renews at half life, for ever; a failure is retried after a tenth of
    /// the lifetime (between 1 s and 1 min).
    pub async fn run(self) {
        loop {
            let wait = match self.next_renewal() {
                Ok(wait) => wait,
                Err(err) => {
                    tracing::warn!(%err, "cannot read the node certificate");
                    Duration::from_secs(10)
                }
            };
            tokio::time::sleep(wait).await;
            match self.renew().await {
                Ok(not_after) => {
                    self.count("ok");
                    tracing::info!(
                        expires_in_s = not_after
                            .duration_since(SystemTime::now())
                            .unwrap_or_default()
                            .as_secs(),
                        "node certificate renewed"
                    );
                }
                Err(err) => {
                    self.count("error");
                    let retry = self.retry_after();
                    tracing::warn!(%err, retry_in = ?retry, "renewing the node certificate failed");
                    tokio::time::sleep(retry).await;
                }
            }
        }
    }

    fn dir(&self) -> &Path {
        &self.controller.tls_dir
    }

    fn validity(&self) -> Result<(SystemTime, SystemTime), RenewError> {
        let (_, cert, _) = pki::read_credentials(self.dir())?;
        pki::validity(&cert).ok_or_else(|| RenewError::NoValidity(self.dir().to_owned()))
    }

    /// How long until the current certificate is half way through its
    /// life; exports its expiry.
    fn next_renewal(&self) -> Result<Duration, RenewError> {
        let (from, to) = self.validity()?;
        let expiry = to
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        self.tls
            .metrics
            .expiry
            .set(i64::try_from(expiry).unwrap_or(i64::MAX));
        Ok(pki::renewal_time(from, to)
            .duration_since(SystemTime::now())
            .unwrap_or_default())
    }

    /// A tenth of the certificate's life, and never more than a third of
    /// what is left of it (a node whose certificate expires cannot ask
    /// for another), between 1 s and 1 min.
    fn retry_after(&self) -> Duration {
        let Ok((from, to)) = self.validity() else {
            return Duration::from_secs(10);
        };
        let life = to.duration_since(from).unwrap_or_default() / 10;
        let left = to.duration_since(SystemTime::now()).unwrap_or_default() / 3;
        life.min(left)
            .clamp(Duration::from_secs(1), Duration::from_secs(60))
    }

    fn count(&self, result: &'static str) {
        self.tls
            .metrics
            .renewals
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    /// A new key and certificate: asked for with the current one, then
    /// served by the tunnel and written for the controller channel.
    async fn renew(&self) -> Result<SystemTime, RenewError> {
        let identity = pki::node_identity(&self.trust_domain, &self.node);
        let (key, csr_pem) = pki::new_key_and_csr(&identity)?;
        let channel = channel::connect(&self.controller).await?;
        let resp = CertificateServiceClient::new(channel)
            .renew_node(RenewNodeRequest { csr_pem })
            .await
            .map_err(|status| RenewError::Refused(Box::new(status)))?
            .into_inner();
        let chain = resp.cert_chain_pem.concat();
        let not_after =
            pki::not_after(&chain).ok_or_else(|| RenewError::NoValidity(self.dir().to_owned()))?;
        self.tls.set_certificate(chain, key.serialize_pem())?;
        // The loop's next look at the files exports the new expiry.
        Ok(not_after)
    }
}
