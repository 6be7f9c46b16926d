//! Certificates for the control plane: a CA kept in a folder, the
//! controller's server certificate, and node certificates whose SPIFFE URI
//! names the node (`spiffe://<trust-domain>/lacewing/node/<name>`). The
//! controller lets a node subscribe only under the name its certificate holds.
//!
//! In the lab the lab provisions each node's certificate (as a cluster's
//! bootstrap would mount it from a Secret).
//!
//! Workload certificates (X.509 SVIDs): the node generates an ECDSA P-256
//! key, sends a CSR naming `spiffe://<td>/ns/<ns>/sa/<sa>`, and the same CA
//! signs it once the controller has checked the pod runs on that node.

use std::{
    fs, io,
    net::IpAddr,
    path::{Path, PathBuf},
};

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};

/// The trust domain until `MeshConfig` sets another.
pub use crate::identity::DEFAULT_TRUST_DOMAIN;
/// The name nodes check on the controller's certificate.
pub const CONTROLLER_SERVER_NAME: &str = "lacewing-controller";

/// Files of a credential folder.
pub const CA_FILE: &str = "ca.pem";
pub const CERT_FILE: &str = "cert.pem";
pub const KEY_FILE: &str = "key.pem";
pub const CA_KEY_FILE: &str = "ca-key.pem";

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("certificate: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("certificate request: {0}")]
    BadRequest(String),
    #[error("the CA: {0}")]
    BadCa(String),
    #[error(
        "{0}: key.pem is not the key of cert.pem (or one of them is not PEM): write them again as a pair"
    )]
    Mismatch(PathBuf),
}

/// A workload's key and certificate, as the node keeps them.
pub struct Svid {
    pub identity: String,
    pub cert_chain_pem: Vec<String>,
    pub key_pem: String,
    pub not_after: std::time::SystemTime,
}

/// The private key stays out of logs and panics.
impl std::fmt::Debug for Svid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Svid")
            .field("identity", &self.identity)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// A new ECDSA P-256 key and a CSR for `identity` signed with it.
pub fn new_key_and_csr(identity: &str) -> Result<(KeyPair, String), PkiError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.subject_alt_names = vec![SanType::URI(identity.try_into()?)];
    let csr = params.serialize_request(&key)?;
    Ok((key, csr.pem()?))
}

/// The DER of the first certificate in a PEM text.
pub fn pem_to_der(cert_pem: &str) -> Option<Vec<u8>> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes()).ok()?;
    Some(pem.contents)
}

/// The end of validity of a PEM certificate.
pub fn not_after(cert_pem: &str) -> Option<std::time::SystemTime> {
    validity(cert_pem).map(|(_, not_after)| not_after)
}

/// When a PEM certificate becomes valid and when it expires.
pub fn validity(cert_pem: &str) -> Option<(std::time::SystemTime, std::time::SystemTime)> {
    let der = pem_to_der(cert_pem)?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der).ok()?;
    let at = |t: x509_parser::time::ASN1Time| {
        Some(
            std::time::UNIX_EPOCH
                + std::time::Duration::from_secs(u64::try_from(t.timestamp()).ok()?),
        )
    };
    Some((
        at(cert.validity().not_before)?,
        at(cert.validity().not_after)?,
    ))
}

/// How far before it is issued a certificate's validity starts, for clocks
/// that run a little behind.
pub const CLOCK_SKEW: std::time::Duration = std::time::Duration::from_secs(60);

/// When a certificate valid from `not_before` to `not_after` is renewed:
/// half way through the life it was issued for (its validity starts
/// [`CLOCK_SKEW`] before it was issued).
pub fn renewal_time(
    not_before: std::time::SystemTime,
    not_after: std::time::SystemTime,
) -> std::time::SystemTime {
    let issued = (not_before + CLOCK_SKEW).min(not_after);
    issued + not_after.duration_since(issued).unwrap_or_default() / 2
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Lifetime of a node certificate (from a bootstrap, a renewal, or issued
/// by hand into a folder): the controller signs for this long by default
/// (`--node-cert-ttl`), and a node renews at half its lifetime.
pub const NODE_CERT_TTL: std::time::Duration = std::time::Duration::from_secs(30 * 24 * 3600);

/// Lifetime of the control-plane CA made on first start: long enough to
/// outlive many rotations of what it signs, short enough that a key leaked
/// years ago stops working (rotate it before; see docs/architecture.md).
pub const CA_LIFETIME: std::time::Duration = std::time::Duration::from_secs(10 * 365 * 24 * 3600);

/// Lifetime of the controller's server certificate, issued again at every
/// start of the controller.
pub const CONTROLLER_CERT_TTL: std::time::Duration =
    std::time::Duration::from_secs(365 * 24 * 3600);

/// The SPIFFE identity of a node.
pub fn node_identity(trust_domain: &str, node: &str) -> String {
    crate::identity::Identity::node(trust_domain, node).to_string()
}

/// The node name in a node identity, if it is one.
pub fn node_of_identity(trust_domain: &str, identity: &str) -> Option<String> {
    match identity.parse::<crate::identity::Identity>().ok()? {
        crate::identity::Identity::Node {
            trust_domain: td,
            node,
        } if td == trust_domain => Some(node),
        _ => None,
    }
}

/// The URI SANs of a DER certificate.
pub fn uri_sans(der: &[u8]) -> Vec<String> {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(uri) => Some((*uri).to_owned()),
            _ => None,
        })
        .collect()
}

/// A CA: its key, its certificate, and (for a CA kept in a folder) where
/// it notes how long what it signs stays valid, so a rotation knows when
/// its root may leave the trust bundle ([`crate::trust`]).
pub struct Ca {
    cert: Certificate,
    key: KeyPair,
    pem: String,
    fingerprint: String,
    record: Option<PathBuf>,
}

impl Ca {
    /// The CA in `dir` (ca.pem, ca-key.pem), made on first use (key mode
    /// 0600, certificate valid for [`CA_LIFETIME`]).
    pub fn load_or_create(dir: &Path) -> Result<Self, PkiError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let key_path = dir.join(CA_KEY_FILE);
        if !key_path.exists() {
            let (ca, key_pem) = Self::generate()?;
            write_whole(&dir.join(CA_FILE), ca.pem(), 0o644)?;
            write_private(&key_path, &key_pem)?;
        }
        Self::load(dir)
    }

    /// The CA in `dir`, which must hold one.
    pub fn load(dir: &Path) -> Result<Self, PkiError> {
        let read = |name: &str| {
            let path = dir.join(name);
            fs::read_to_string(&path).map_err(io_err(&path))
        };
        let mut ca = Self::from_pem(&read(CA_FILE)?, &read(CA_KEY_FILE)?)?;
        ca.record = Some(dir.join(ISSUED_DIR));
        Ok(ca)
    }

    /// A CA from its key and certificate (PEM), as kept in a Secret. The
    /// key must be the certificate's.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let key = KeyPair::from_pem(key_pem)?;
        let der = pem_to_der(cert_pem)
            .ok_or_else(|| PkiError::BadCa("the CA certificate is not PEM".into()))?;
        if !key_matches(&der, &key) {
            return Err(PkiError::BadCa(
                "the CA key is not the key of the CA certificate".into(),
            ));
        }
        // The stored certificate's own subject and key, so what it signs
        // names it as issuer and verifies against it.
        let cert = CertificateParams::from_ca_cert_pem(cert_pem)?.self_signed(&key)?;
        Ok(Self {
            cert,
            key,
            pem: cert_pem.to_owned(),
            fingerprint: fingerprint(&der),
            record: None,
        })
    }

    /// A new CA: it, and its key's PEM to keep.
    pub fn generate() -> Result<(Self, String), PkiError> {
        let key = KeyPair::generate()?;
        let key_pem = key.serialize_pem();
        let pem = new_ca_cert(&key)?;
        Ok((Self::from_pem(&pem, &key_pem)?, key_pem))
    }

    /// The SHA-256 of the CA certificate, hex: how a rotation names roots.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// Notes that a certificate this CA signed is valid until `not_after`
    /// (a CA kept in a folder only).
    fn note_issued(&self, not_after: time::OffsetDateTime) -> Result<(), PkiError> {
        match &self.record {
            Some(dir) => note_in(dir, &self.fingerprint, not_after),
            None => Ok(()),
        }
    }

    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// Issues a certificate into `dir` (ca.pem, cert.pem, key.pem) for
    /// these uses, valid for `ttl` (from a minute ago, for clock skew).
    pub fn issue(
        &self,
        dir: &Path,
        sans: Vec<SanType>,
        uses: Vec<ExtendedKeyUsagePurpose>,
        ttl: std::time::Duration,
    ) -> Result<(), PkiError> {
        self.issue_noted(dir, sans, uses, ttl, true)
    }

    /// [`Ca::issue`], noting the certificate's validity or not.
    fn issue_noted(
        &self,
        dir: &Path,
        sans: Vec<SanType>,
        uses: Vec<ExtendedKeyUsagePurpose>,
        ttl: std::time::Duration,
        note: bool,
    ) -> Result<(), PkiError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - CLOCK_SKEW;
        params.not_after = now + ttl;
        params.serial_number = Some(random_serial());
        params.subject_alt_names = sans;
        params
            .distinguished_name
            .push(DnType::OrganizationName, "lacewing");
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = uses;
        let key = KeyPair::generate()?;
        let not_after = params.not_after;
        let cert = params.signed_by(&key, &self.cert, &self.key)?;
        if note {
            self.note_issued(not_after)?;
        }
        write_credentials(dir, &self.pem, &cert.pem(), &key.serialize_pem())
    }

    /// Signs a CSR for `identity` (a workload's or a node's), valid for
    /// `ttl` (from a minute ago, for clock skew). The CSR must ask for
    /// exactly that identity with an ECDSA P-256 key; the certificate serves
    /// both ends of a TLS connection.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        identity: &str,
        ttl: std::time::Duration,
    ) -> Result<String, PkiError> {
        let bad = |m: String| PkiError::BadRequest(m);
        let mut csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| bad(format!("not a PEM PKCS#10 request: {e}")))?;
        if csr.public_key.algorithm() != &rcgen::PKCS_ECDSA_P256_SHA256 {
            return Err(bad("the key must be ECDSA P-256".into()));
        }
        let asked: Vec<String> = csr
            .params
            .subject_alt_names
            .iter()
            .map(|s| match s {
                SanType::URI(u) => u.as_str().to_owned(),
                other => format!("{other:?}"),
            })
            .collect();
        if asked != [identity] {
            return Err(bad(format!(
                "it asks for {asked:?}; the identity it may have is {identity}"
            )));
        }
        let now = time::OffsetDateTime::now_utc();
        let p = &mut csr.params;
        p.not_before = now - CLOCK_SKEW;
        p.not_after = now + ttl;
        p.serial_number = Some(random_serial());
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name
            .push(DnType::OrganizationName, "lacewing");
        let not_after = p.not_after;
        let cert = csr.signed_by(&self.cert, &self.key)?.pem();
        self.note_issued(not_after)?;
        Ok(cert)
    }

    /// A node's certificate, naming it in a SPIFFE URI: a client of the
    /// controller, and the server of its tunnel port; valid for
    /// [`NODE_CERT_TTL`].
    pub fn issue_node(&self, dir: &Path, trust_domain: &str, node: &str) -> Result<(), PkiError> {
        self.issue_node_for(dir, trust_domain, node, NODE_CERT_TTL)
    }

    /// [`Ca::issue_node`] valid for `ttl`.
    pub fn issue_node_for(
        &self,
        dir: &Path,
        trust_domain: &str,
        node: &str,
        ttl: std::time::Duration,
    ) -> Result<(), PkiError> {
        let uri = node_identity(trust_domain, node).try_into()?;
        self.issue(
            dir,
            vec![SanType::URI(uri)],
            vec![
                ExtendedKeyUsagePurpose::ClientAuth,
                ExtendedKeyUsagePurpose::ServerAuth,
            ],
            ttl,
        )
    }

    /// The controller's server certificate, valid for
    /// [`CONTROLLER_CERT_TTL`]. Not noted for a rotation: the controller
    /// issues it again from whichever CA signs, within a second of a
    /// change, and serves no other.
    pub fn issue_controller(&self, dir: &Path, ips: &[IpAddr]) -> Result<(), PkiError> {
        let mut sans = vec![SanType::DnsName(CONTROLLER_SERVER_NAME.try_into()?)];
        sans.extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        self.issue_noted(
            dir,
            sans,
            vec![ExtendedKeyUsagePurpose::ServerAuth],
            CONTROLLER_CERT_TTL,
            false,
        )
    }
}

/// 16 random bytes, the high bit clear (serials are positive integers).
fn random_serial() -> rcgen::SerialNumber {
    let mut bytes = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .expect("the system's random source works");
    bytes[0] &= 0x7f;
    rcgen::SerialNumber::from_slice(&bytes)
}

/// A new CA certificate for `key` (PEM), valid for [`CA_LIFETIME`] from a
/// minute ago. Its name carries the start of its key's fingerprint, so the
/// roots of a rotation (old and new side by side) are told apart.
fn new_ca_cert(key: &KeyPair) -> Result<String, rcgen::Error> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(DnType::OrganizationName, "lacewing");
    let tag = &fingerprint(&key.public_key_der())[..8];
    params
        .distinguished_name
        .push(DnType::CommonName, format!("{CA_COMMON_NAME} {tag}"));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - CLOCK_SKEW;
    params.not_after = now + CA_LIFETIME;
    params.serial_number = Some(random_serial());
    Ok(params.self_signed(key)?.pem())
}

/// The common name of every Lacewing CA, before its tag.
pub const CA_COMMON_NAME: &str = "Lacewing control-plane CA";

/// SHA-256 of `der`, hex.
pub fn fingerprint(der: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, der)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Where a CA kept in a folder notes, per root fingerprint, until when the
/// latest certificate it signed is valid (see [`crate::trust`]).
pub const ISSUED_DIR: &str = "issued";

/// Until when what `root` signed is valid, as noted when it signed.
pub fn issued_until(dir: &Path, root: &str) -> Option<std::time::SystemTime> {
    let text = fs::read_to_string(dir.join(ISSUED_DIR).join(root)).ok()?;
    Some(std::time::UNIX_EPOCH + std::time::Duration::from_secs(text.trim().parse().ok()?))
}

/// Notes in `issued` that `root` signed something valid until
/// `not_after`, if that is later than what is noted.
fn note_in(issued: &Path, root: &str, not_after: time::OffsetDateTime) -> Result<(), PkiError> {
    // One note at a time in this process: two signings side by side must
    // not both read the old value and leave the earlier time written.
    static NOTING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = NOTING.lock().unwrap_or_else(|p| p.into_inner());
    let until = u64::try_from(not_after.unix_timestamp()).unwrap_or(0);
    let path = issued.join(root);
    let noted = fs::read_to_string(&path)
        .ok()
        .and_then(|t| t.trim().parse::<u64>().ok());
    if noted.is_some_and(|n| n >= until) {
        return Ok(());
    }
    fs::create_dir_all(issued).map_err(io_err(issued))?;
    write_whole(&path, &format!("{until}\n"), 0o644)
}

/// A private key's file: readable by its owner only.
pub(crate) fn write_private(path: &Path, pem: &str) -> Result<(), PkiError> {
    write_whole(path, pem, 0o600)
}

/// Writes `path` whole or not at all (a temporary file renamed over it):
/// a reader never sees it empty or half written. The temporary file's name
/// is this writer's own, so writers side by side do not take each other's.
pub(crate) fn write_whole(path: &Path, pem: &str, mode: u32) -> Result<(), PkiError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut name = path.file_name().unwrap_or_default().to_owned();
    name.push(format!(".{}.{n}.tmp", std::process::id()));
    let tmp = path.with_file_name(name);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    io::Write::write_all(&mut f, pem.as_bytes()).map_err(io_err(&tmp))?;
    fs::rename(&tmp, path).map_err(|e| {
        let _ = fs::remove_file(&tmp);
        io_err(path)(e)
    })
}

/// Writes a credential folder: ca.pem, cert.pem, key.pem (mode 0600), each
/// file whole or not at all (a daemon may be reading the folder).
pub fn write_credentials(dir: &Path, ca: &str, cert: &str, key: &str) -> Result<(), PkiError> {
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    write_whole(&dir.join(CA_FILE), ca, 0o644)?;
    write_whole(&dir.join(CERT_FILE), cert, 0o644)?;
    write_private(&dir.join(KEY_FILE), key)
}

/// Whether `key` is the key of the certificate `cert_der`.
fn key_matches(cert_der: &[u8], key: &KeyPair) -> bool {
    x509_parser::parse_x509_certificate(cert_der)
        .is_ok_and(|(_, cert)| cert.public_key().raw == key.public_key_der())
}

/// Reads a credential folder: (ca.pem, cert.pem, key.pem), a certificate
/// and key that belong together. The files are replaced one at a time
/// ([`write_credentials`]): a reader between two renames could get a new
/// certificate with the old key, so a mismatched pair is read again (for
/// up to a second) before it is an error.
pub fn read_credentials(dir: &Path) -> Result<(String, String, String), PkiError> {
    let read = |name: &str| {
        let path = dir.join(name);
        fs::read_to_string(&path).map_err(io_err(&path))
    };
    for _ in 0..100 {
        let (ca, cert, key) = (read(CA_FILE)?, read(CERT_FILE)?, read(KEY_FILE)?);
        let pair = KeyPair::from_pem(&key)
            .ok()
            .zip(pem_to_der(&cert))
            .is_some_and(|(k, der)| key_matches(&der, &k));
        if pair {
            return Ok((ca, cert, key));
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    Err(PkiError::Mismatch(dir.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ca_and_node_certificates_carry_stated_lifetimes_and_subjects() {
        let dir = std::env::temp_dir().join(format!("lacewing-pki-life-{}", std::process::id()));
        let ca = Ca::load_or_create(&dir.join("ca")).unwrap();
        let days = |(from, to): (std::time::SystemTime, std::time::SystemTime)| {
            to.duration_since(from).unwrap().as_secs() / 86_400
        };
        assert_eq!(days(validity(ca.pem()).unwrap()), 3650);
        let der = pem_der(ca.pem());
        let (_, parsed) = x509_parser::parse_x509_certificate(&der).unwrap();
        let tag = &fingerprint(parsed.public_key().raw)[..8];
        assert_eq!(
            parsed.subject().to_string(),
            format!("CN=Lacewing control-plane CA {tag}, O=lacewing")
        );
        // Loaded again: the same certificate.
        assert_eq!(Ca::load_or_create(&dir.join("ca")).unwrap().pem(), ca.pem());
        ca.issue_node(&dir.join("n0"), DEFAULT_TRUST_DOMAIN, "n0")
            .unwrap();
        let (_, cert, _) = read_credentials(&dir.join("n0")).unwrap();
        assert_eq!(days(validity(&cert).unwrap()), 30);
        ca.issue_node_for(
            &dir.join("n1"),
            DEFAULT_TRUST_DOMAIN,
            "n1",
            std::time::Duration::from_secs(60),
        )
        .unwrap();
        let (_, cert, _) = read_credentials(&dir.join("n1")).unwrap();
        let (from, to) = validity(&cert).unwrap();
        // From a minute ago, for clock skew; renewed half way through
        // the minute it was issued for.
        assert_eq!(to.duration_since(from).unwrap().as_secs(), 120);
        assert_eq!(
            renewal_time(from, to),
            from + std::time::Duration::from_secs(90)
        );
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn node_certificates_name_their_node_and_chain_to_the_ca() {
        let dir = std::env::temp_dir().join(format!("lacewing-pki-test-{}", std::process::id()));
        let ca = Ca::load_or_create(&dir.join("ca")).unwrap();
        ca.issue_node(&dir.join("n0"), DEFAULT_TRUST_DOMAIN, "n0")
            .unwrap();
        let (_, cert, _) = read_credentials(&dir.join("n0")).unwrap();
        let der = pem_der(&cert);
        let sans = uri_sans(&der);
        assert_eq!(sans, ["spiffe://cluster.local/lacewing/node/n0"]);
        assert_eq!(
            node_of_identity(DEFAULT_TRUST_DOMAIN, &sans[0]).as_deref(),
            Some("n0")
        );
        assert_eq!(node_of_identity("other.domain", &sans[0]), None);
        assert_eq!(
            node_of_identity(DEFAULT_TRUST_DOMAIN, "spiffe://cluster.local/ns/a/sa/b"),
            None
        );
        // The CA survives a restart: same certificate, same key.
        let again = Ca::load_or_create(&dir.join("ca")).unwrap();
        assert_eq!(again.pem(), ca.pem());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn workload_requests_are_signed_only_for_the_identity_they_name() {
        let dir = std::env::temp_dir().join(format!("lacewing-svid-test-{}", std::process::id()));
        let ca = Ca::load_or_create(&dir).unwrap();
        let id = "spiffe://cluster.local/ns/shop/sa/web";
        let (_key, csr) = new_key_and_csr(id).unwrap();
        let ttl = std::time::Duration::from_secs(3600);
        let cert = ca.sign_csr(&csr, id, ttl).unwrap();
        assert_eq!(uri_sans(&pem_der(&cert)), [id]);
        let left = not_after(&cert)
            .unwrap()
            .duration_since(std::time::SystemTime::now())
            .unwrap();
        assert!(
            left > ttl - std::time::Duration::from_secs(5) && left <= ttl,
            "{left:?}"
        );
        // Two signatures of one request get different serials.
        let again = ca.sign_csr(&csr, id, ttl).unwrap();
        let serial = |pem: &str| {
            let der = pem_der(pem);
            let (_, c) = x509_parser::parse_x509_certificate(&der).unwrap();
            c.serial.clone()
        };
        assert_ne!(serial(&cert), serial(&again));
        let err = ca
            .sign_csr(&csr, "spiffe://cluster.local/ns/shop/sa/admin", ttl)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("the identity it may have is spiffe://cluster.local/ns/shop/sa/admin"),
            "{err}"
        );
        assert!(ca.sign_csr("junk", id, ttl).is_err());
        fs::remove_dir_all(&dir).unwrap();
    }

    fn pem_der(pem: &str) -> Vec<u8> {
        let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
        p.contents
    }
}
