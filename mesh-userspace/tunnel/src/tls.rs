//! TLS for the tunnel: TLS 1.3 only, ALPN `h2`, ring's algorithms. Both ends
//! authenticate: the client presents the source workload's SVID, the server
//! presents its node certificate; both chains are checked against the mesh
//! trust bundle, and the names that matter are SPIFFE URIs, not DNS names.

use std::sync::Arc;

use rustls::{
    CertificateError, DigitallySignedStruct, Error, RootCertStore, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime, pem::PemObject as _},
    server::WebPkiClientVerifier,
};

use lacewing_core::pki;

pub const ALPN_H2: &[u8] = b"h2";

/// Why TLS material cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("no certificate in the PEM text")]
    NoCertificate,
    #[error("the private key cannot be read: {0}")]
    Key(String),
    #[error("the trust bundle has no usable root")]
    NoRoots,
    #[error("{0}")]
    Rustls(#[from] Error),
}

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

pub fn certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem.as_bytes())
        .filter_map(Result::ok)
        .collect();
    if certs.is_empty() {
        return Err(TlsError::NoCertificate);
    }
    Ok(certs)
}

pub fn key(pem: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| TlsError::Key(e.to_string()))
}

pub fn roots(bundle_pem: &str) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(certs(bundle_pem)?);
    if added == 0 {
        return Err(TlsError::NoRoots);
    }
    Ok(Arc::new(roots))
}

/// The trust bundle in force, shared by everything that verifies a peer:
/// replaced whole when the controller sends a new bundle (a CA rotation),
/// read afresh for each new handshake. Sessions already up keep theirs.
#[derive(Clone, Debug)]
pub struct Roots(Arc<std::sync::RwLock<Arc<RootCertStore>>>);

impl Roots {
    pub fn new(roots: Arc<RootCertStore>) -> Self {
        Self(Arc::new(std::sync::RwLock::new(roots)))
    }

    /// The roots for a handshake starting now.
    pub fn current(&self) -> Arc<RootCertStore> {
        Arc::clone(&self.0.read().unwrap_or_else(|p| p.into_inner()))
    }

    pub fn replace(&self, roots: Arc<RootCertStore>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = roots;
    }
}

/// Whether a server requires its clients' certificates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientCert {
    /// The tunnel: every peer proves a workload identity.
    Required,
    /// The controller: a node without a certificate yet may bootstrap one;
    /// every other call checks the certificate itself.
    Optional,
}

/// A server side of the mesh (:15008 with the node's certificate, :15012
/// with the controller's): TLS 1.3 only, ALPN `h2`; a client certificate
/// must chain to the trust bundle.
pub fn server_config(
    chain_pem: &str,
    key_pem: &str,
    roots: Arc<RootCertStore>,
    client: ClientCert,
) -> Result<rustls::ServerConfig, TlsError> {
    let provider = provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(roots, Arc::clone(&provider));
    let verifier = match client {
        ClientCert::Required => verifier,
        ClientCert::Optional => verifier.allow_unauthenticated(),
    }
    .build()
    .map_err(|e| Error::General(e.to_string()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs(chain_pem)?, key(key_pem)?)?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(config)
}

/// The client side: the source workload's SVID; the server must be the node
/// `expected` names (its SPIFFE URI), with a chain to the trust bundle.
pub fn client_config(
    svid: &pki::Svid,
    roots: Arc<RootCertStore>,
    expected: String,
) -> Result<rustls::ClientConfig, TlsError> {
    let provider = provider();
    let verifier = Arc::new(SpiffeServerVerifier {
        roots,
        expected,
        provider: Arc::clone(&provider),
    });
    let chain = svid
        .cert_chain_pem
        .iter()
        .map(|pem| certs(pem))
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .flatten()
        .collect();
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(chain, key(&svid.key_pem)?)?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(config)
}

/// Checks the server's chain against the trust bundle and its SPIFFE URI
/// against the node the client meant to reach (DNS names play no part).
#[derive(Debug)]
struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    expected: String,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        let sans = pki::uri_sans(end_entity);
        if !sans.contains(&self.expected) {
            return Err(Error::InvalidCertificate(CertificateError::Other(
                rustls::OtherError(Arc::new(IdentityMismatch {
                    expected: self.expected.clone(),
                    got: sans,
                })),
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        // Never reached: only TLS 1.3 is offered.
        Err(Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls13RequiredForQuic,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[derive(Debug, thiserror::Error)]
#[error("the peer is {got:?}, not {expected}")]
struct IdentityMismatch {
    expected: String,
    got: Vec<String>,
}

/// The workload identity (`spiffe://<td>/ns/<ns>/sa/<sa>`) a verified peer
/// certificate names, if it names one.
pub fn workload_identity(cert: &CertificateDer<'_>) -> Option<String> {
    pki::uri_sans(cert).into_iter().find(|uri| {
        matches!(
            uri.parse::<lacewing_core::identity::Identity>(),
            Ok(lacewing_core::identity::Identity::Workload { .. })
        )
    })
}

/// A short label for a failed handshake, for the metric.
pub fn failure_reason(err: &std::io::Error) -> &'static str {
    let Some(tls) = err.get_ref().and_then(|e| e.downcast_ref::<Error>()) else {
        return if err.kind() == std::io::ErrorKind::TimedOut {
            "timeout"
        } else {
            "io"
        };
    };
    match tls {
        Error::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. },
        ) => "expired",
        Error::InvalidCertificate(CertificateError::UnknownIssuer) => "unknown_issuer",
        Error::InvalidCertificate(CertificateError::BadSignature) => "bad_signature",
        Error::InvalidCertificate(_) => "bad_certificate",
        Error::NoCertificatesPresented => "no_client_certificate",
        Error::PeerIncompatible(_) => "incompatible",
        Error::NoApplicationProtocol => "no_alpn",
        _ => "other",
    }
}
