//! The node's own certificate: the server certificate of its tunnel port and
//! its client certificate to the controller. The daemon renews it at half
//! its lifetime, asking the controller with the current one; the new one
//! goes into the tunnel's TLS configuration (every new handshake reads it)
//! and into `--tls-dir` (the controller channel reads that on every
//! reconnect, and so does the next daemon). Connections already up keep
//! their session: nothing is dropped.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};

use lacewing_core::{
    pki,
    proto::ca_pb::{RenewNodeRequest, certificate_service_client::CertificateServiceClient},
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
        m
    }
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
    pub tunnel: TunnelTls,
    pub metrics: NodeCertMetrics,
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
        self.metrics
            .expiry
            .set(i64::try_from(expiry).unwrap_or(i64::MAX));
        Ok(pki::renewal_time(from, to)
            .duration_since(SystemTime::now())
            .unwrap_or_default())
    }

    fn retry_after(&self) -> Duration {
        self.validity()
            .ok()
            .and_then(|(from, to)| to.duration_since(from).ok())
            .map_or(Duration::from_secs(10), |life| life / 10)
            .clamp(Duration::from_secs(1), Duration::from_secs(60))
    }

    fn count(&self, result: &'static str) {
        self.metrics
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
        let key = key.serialize_pem();
        let config = tls::server_config(
            &chain,
            &key,
            tls::roots(&resp.trust_bundle_pem)?,
            tls::ClientCert::Required,
        )?;
        *self.tunnel.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(config);
        pki::write_credentials(self.dir(), &resp.trust_bundle_pem, &chain, &key)?;
        // The loop's next look at the files exports the new expiry.
        pki::not_after(&chain).ok_or_else(|| RenewError::NoValidity(self.dir().to_owned()))
    }
}
