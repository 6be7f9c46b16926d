//! The node's mutual-TLS channel to the controller, with its own
//! certificate: what the configuration stream and the certificate requests
//! both open.

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use super::config::Controller;

/// Why the controller cannot be reached.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("reading this node's credentials: {0} (check --tls-dir)")]
    Credentials(#[source] lacewing_core::pki::PkiError),
    #[error("the controller address {url} is not a URI: {source}")]
    Address {
        url: String,
        source: tonic::codegen::http::uri::InvalidUri,
    },
    #[error("connecting to {url}: {source}{cause} (is the controller running and reachable?)")]
    Connect {
        url: String,
        source: tonic::transport::Error,
        cause: String,
    },
}

/// A mutual-TLS channel to the controller, with this node's certificate.
pub async fn connect(controller: &Controller) -> Result<Channel, ChannelError> {
    // Read on every attempt: rotated credentials are picked up on reconnect.
    let (ca, cert, key) = lacewing_core::pki::read_credentials(&controller.tls_dir)
        .map_err(ChannelError::Credentials)?;
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .identity(Identity::from_pem(cert, key))
        .domain_name(controller.server_name.clone());
    open(&controller.url, tls).await
}

/// A channel to `url` with `tls` (the bootstrap's trusts the published root
/// and presents no certificate yet).
pub async fn open(url: &str, tls: ClientTlsConfig) -> Result<Channel, ChannelError> {
    let connect_error = |source: tonic::transport::Error| ChannelError::Connect {
        url: url.to_owned(),
        cause: std::error::Error::source(&source)
            .map(|s| format!(": {s}"))
            .unwrap_or_default(),
        source,
    };
    Channel::from_shared(url.to_owned())
        .map_err(|source| ChannelError::Address {
            url: url.to_owned(),
            source,
        })?
        .tls_config(tls)
        .map_err(connect_error)?
        .connect()
        .await
        .map_err(connect_error)
}
