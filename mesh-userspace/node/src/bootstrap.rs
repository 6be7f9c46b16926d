//! A node's first certificate, in a cluster: with no credentials in
//! `--tls-dir` (or a certificate past half its life), the daemon makes a key,
//! sends a CSR for its node identity with its projected ServiceAccount token
//! (`--bootstrap-token-file`), trusting the controller through the mesh's
//! root (`--ca-file`, published by the controller), and writes what it gets
//! to `--tls-dir`. The key never leaves the node.

use std::{path::Path, time::SystemTime};

use tonic::transport::{Certificate, ClientTlsConfig};

use super::config::{Bootstrap, Controller};
use lacewing_core::pki;
use lacewing_core::proto::ca_pb::{
    BootstrapNodeRequest, certificate_service_client::CertificateServiceClient,
};

/// Why the node could not get its first certificate.
#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error("reading {}: {source} (check --bootstrap-token-file and --ca-file)", path.display())]
    Read {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("making the node key: {0}")]
    Key(#[source] pki::PkiError),
    #[error(transparent)]
    Channel(#[from] super::channel::ChannelError),
    #[error(
        "the controller refused the bootstrap: {0} (is the token this node's ServiceAccount's?)"
    )]
    Refused(String),
    #[error("the controller sent no certificate")]
    Empty,
    #[error("writing the credentials to {}: {source}", dir.display())]
    Write {
        dir: std::path::PathBuf,
        source: pki::PkiError,
    },
}

/// Makes sure `controller.tls_dir` holds a usable node certificate.
pub async fn ensure_credentials(
    controller: &Controller,
    bootstrap: &Bootstrap,
    node: &str,
    trust_domain: &str,
) -> Result<(), BootstrapError> {
    if let Ok((_, cert, _)) = pki::read_credentials(&controller.tls_dir)
        && still_good(&cert)
    {
        return Ok(());
    }
    let read = |p: &Path| {
        std::fs::read_to_string(p).map_err(|source| BootstrapError::Read {
            path: p.to_owned(),
            source,
        })
    };
    let token = read(&bootstrap.token_file)?;
    let root = read(&bootstrap.ca_file)?;
    let identity = pki::node_identity(trust_domain, node);
    let (key, csr_pem) = pki::new_key_and_csr(&identity).map_err(BootstrapError::Key)?;
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&root))
        .domain_name(controller.server_name.clone());
    let channel = super::channel::open(&controller.url, tls).await?;
    let resp = CertificateServiceClient::new(channel)
        .bootstrap_node(BootstrapNodeRequest {
            node: node.to_owned(),
            token: token.trim().to_owned(),
            csr_pem,
        })
        .await
        .map_err(|s| BootstrapError::Refused(s.message().to_owned()))?
        .into_inner();
    let cert = resp.cert_chain_pem.first().ok_or(BootstrapError::Empty)?;
    pki::write_credentials(
        &controller.tls_dir,
        &resp.trust_bundle_pem,
        cert,
        &key.serialize_pem(),
    )
    .map_err(|source| BootstrapError::Write {
        dir: controller.tls_dir.clone(),
        source,
    })?;
    tracing::info!(%node, dir = %controller.tls_dir.display(), "node certificate bootstrapped");
    Ok(())
}

/// Not past half its lifetime (the running daemon renews it from then on).
fn still_good(cert_pem: &str) -> bool {
    pki::validity(cert_pem)
        .is_some_and(|(from, to)| SystemTime::now() < pki::renewal_time(from, to))
}
