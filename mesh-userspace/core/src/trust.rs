//! The mesh's trust bundle and the rotation of its root, for a CA kept in a
//! folder (the controller's `--pki-dir`/ca):
//!
//! ```text
//!   ca.pem, ca-key.pem   the CA that signs now
//!   trust-bundle.pem     every root a peer may chain to (the signer's
//!                        certificate alone when the file is absent)
//!   next/                a root prepared to sign next (between steps 1 and 2)
//!   issued/<fingerprint> until when something a root signed stays valid
//! ```
//!
//! A rotation is three steps, each safe to run while the mesh serves:
//! [`prepare`] makes the next CA and adds its root to the bundle (every
//! node learns it before it signs anything); [`activate`] makes it the
//! signer (renewals move every certificate to it); [`finish`] removes the
//! old root once everything it signed has expired, never before.
//! The controller reloads the folder as it changes ([`Authority::load`]
//! refuses a folder in a state no step leaves it in, and the controller
//! then keeps what it had).

use std::{
    fs,
    path::{Path, PathBuf},
    time::SystemTime,
};

use crate::pki::{self, Ca, PkiError, io_err};

pub const BUNDLE_FILE: &str = "trust-bundle.pem";
pub const NEXT_DIR: &str = "next";
pub use crate::pki::{ISSUED_DIR, issued_until};

/// Why a step cannot be taken, and what to do.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error("{0}: no certificate in it")]
    EmptyBundle(PathBuf),
    #[error(
        "the signing CA ({fingerprint}) is not in {bundle}: add its certificate to the bundle, or nothing it signs will be trusted"
    )]
    SignerNotTrusted {
        fingerprint: String,
        bundle: PathBuf,
    },
    #[error(
        "a next root is already prepared ({0}): activate it, or remove that folder to start over"
    )]
    AlreadyPrepared(PathBuf),
    #[error("no root is prepared ({0} is missing): run `lacewing ca prepare` first")]
    NotPrepared(PathBuf),
    #[error(
        "the prepared root is not in the trust bundle yet: run `lacewing ca prepare` again after removing {0}"
    )]
    PreparedNotTrusted(PathBuf),
    #[error("a prepared root waits in {0}: activate it before finishing")]
    PreparedPending(PathBuf),
    #[error(
        "root {fingerprint} signed certificates valid for {left_s} s more (until {until_unix} in Unix time): finish after that"
    )]
    StillInUse {
        fingerprint: String,
        until_unix: u64,
        left_s: u64,
    },
}

/// The CA that signs and the bundle every peer is checked against.
pub struct Authority {
    pub signer: Ca,
    pub bundle_pem: String,
}

impl Authority {
    /// The folder's signer and bundle; refused when the bundle does not
    /// hold the signer (a step half done, or a hand edit gone wrong).
    pub fn load(dir: &Path) -> Result<Self, TrustError> {
        let signer = Ca::load(dir)?;
        let bundle_pem = match fs::read_to_string(dir.join(BUNDLE_FILE)) {
            Ok(pem) => pem,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => signer.pem().to_owned(),
            Err(e) => return Err(io_err(&dir.join(BUNDLE_FILE))(e).into()),
        };
        Self::new(signer, bundle_pem, &dir.join(BUNDLE_FILE))
    }

    /// `signer` with `bundle_pem`, which must hold it.
    pub fn new(signer: Ca, bundle_pem: String, bundle: &Path) -> Result<Self, TrustError> {
        let roots = fingerprints(&bundle_pem);
        if roots.is_empty() {
            return Err(TrustError::EmptyBundle(bundle.to_owned()));
        }
        if !roots.iter().any(|f| f == signer.fingerprint()) {
            return Err(TrustError::SignerNotTrusted {
                fingerprint: signer.fingerprint().to_owned(),
                bundle: bundle.to_owned(),
            });
        }
        Ok(Self { signer, bundle_pem })
    }

    /// How many roots the bundle holds.
    pub fn roots(&self) -> usize {
        fingerprints(&self.bundle_pem).len()
    }
}

/// The SHA-256 fingerprints of a bundle's certificates, in order.
pub fn fingerprints(bundle_pem: &str) -> Vec<String> {
    x509_parser::pem::Pem::iter_from_buffer(bundle_pem.as_bytes())
        .filter_map(Result::ok)
        .filter(|p| p.label == "CERTIFICATE")
        .map(|p| pki::fingerprint(&p.contents))
        .collect()
}

/// Step 1: a new CA in `next/`, its root added to the bundle. Returns its
/// fingerprint.
pub fn prepare(dir: &Path) -> Result<String, TrustError> {
    let next = dir.join(NEXT_DIR);
    if next.exists() {
        return Err(TrustError::AlreadyPrepared(next));
    }
    let current = Authority::load(dir)?;
    let (ca, key_pem) = Ca::generate()?;
    // The bundle first: a root trusted before anything exists that it
    // signed; the next CA is written after, to a folder the controller
    // does not read.
    let bundle = format!("{}{}", with_newline(&current.bundle_pem), ca.pem());
    pki::write_whole(&dir.join(BUNDLE_FILE), &bundle, 0o644)?;
    fs::create_dir_all(&next).map_err(io_err(&next))?;
    pki::write_private(&next.join(pki::CA_KEY_FILE), &key_pem)?;
    pki::write_whole(&next.join(pki::CA_FILE), ca.pem(), 0o644)?;
    Ok(ca.fingerprint().to_owned())
}

/// Step 2: the prepared CA signs from now on. Returns (old, new)
/// fingerprints.
pub fn activate(dir: &Path) -> Result<(String, String), TrustError> {
    let next = dir.join(NEXT_DIR);
    if !next.exists() {
        return Err(TrustError::NotPrepared(next));
    }
    let old = Authority::load(dir)?;
    let new = Ca::load(&next)?;
    if !fingerprints(&old.bundle_pem).contains(&new.fingerprint().to_owned()) {
        return Err(TrustError::PreparedNotTrusted(next));
    }
    // Key, then certificate: the controller checks that the two belong
    // together and waits (keeping the old signer) while they do not.
    let read = |name: &str| {
        let path = next.join(name);
        fs::read_to_string(&path).map_err(io_err(&path))
    };
    pki::write_private(&dir.join(pki::CA_KEY_FILE), &read(pki::CA_KEY_FILE)?)?;
    pki::write_whole(&dir.join(pki::CA_FILE), &read(pki::CA_FILE)?, 0o644)?;
    fs::remove_dir_all(&next).map_err(io_err(&next))?;
    Ok((
        old.signer.fingerprint().to_owned(),
        new.fingerprint().to_owned(),
    ))
}

/// Step 3: every root but the signer leaves the bundle, once all it signed
/// has expired (or at once with `force`, which breaks whoever still holds
/// such a certificate). Returns the fingerprints removed.
pub fn finish(dir: &Path, force: bool) -> Result<Vec<String>, TrustError> {
    let next = dir.join(NEXT_DIR);
    if next.exists() {
        return Err(TrustError::PreparedPending(next));
    }
    let current = Authority::load(dir)?;
    let signer = current.signer.fingerprint().to_owned();
    let now = SystemTime::now();
    let mut removed = Vec::new();
    for root in fingerprints(&current.bundle_pem) {
        if root == signer {
            continue;
        }
        if let Some(until) = issued_until(dir, &root)
            && until > now
            && !force
        {
            return Err(TrustError::StillInUse {
                left_s: until.duration_since(now).unwrap_or_default().as_secs() + 1,
                until_unix: unix(until),
                fingerprint: root,
            });
        }
        removed.push(root);
    }
    pki::write_whole(&dir.join(BUNDLE_FILE), current.signer.pem(), 0o644)?;
    Ok(removed)
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

fn with_newline(pem: &str) -> String {
    if pem.ends_with('\n') {
        pem.to_owned()
    } else {
        format!("{pem}\n")
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn temp(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("lacewing-trust-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn a_rotation_trusts_the_new_root_before_it_signs_and_drops_the_old_only_after_its_certificates_expired()
     {
        let dir = temp("rotate");
        let first = Ca::load_or_create(&dir).unwrap().fingerprint().to_owned();
        assert_eq!(Authority::load(&dir).unwrap().roots(), 1);
        // Something the first root signed, valid for two more seconds.
        Ca::load(&dir)
            .unwrap()
            .issue_node_for(
                &dir.join("n0"),
                pki::DEFAULT_TRUST_DOMAIN,
                "n0",
                Duration::from_secs(2),
            )
            .unwrap();
        assert!(matches!(finish(&dir, false), Ok(r) if r.is_empty()));

        let next = prepare(&dir).unwrap();
        assert!(matches!(prepare(&dir), Err(TrustError::AlreadyPrepared(_))));
        let a = Authority::load(&dir).unwrap();
        assert_eq!(fingerprints(&a.bundle_pem), [first.clone(), next.clone()]);
        assert_eq!(
            a.signer.fingerprint(),
            first,
            "the new root does not sign yet"
        );
        assert!(matches!(
            finish(&dir, false),
            Err(TrustError::PreparedPending(_))
        ));

        assert_eq!(activate(&dir).unwrap(), (first.clone(), next.clone()));
        assert!(matches!(activate(&dir), Err(TrustError::NotPrepared(_))));
        let a = Authority::load(&dir).unwrap();
        assert_eq!(a.signer.fingerprint(), next);
        assert_eq!(a.roots(), 2);

        // The node certificate from the first root is valid 2 s more.
        match finish(&dir, false) {
            Err(TrustError::StillInUse {
                fingerprint,
                left_s,
                ..
            }) => {
                assert_eq!(fingerprint, first);
                assert!((1..=3).contains(&left_s), "{left_s}");
            }
            other => panic!("finished early: {other:?}"),
        }
        assert_eq!(Authority::load(&dir).unwrap().roots(), 2);
        // Forced, it goes at once.
        assert_eq!(finish(&dir, true).unwrap(), [first]);
        let a = Authority::load(&dir).unwrap();
        assert_eq!(fingerprints(&a.bundle_pem), [next]);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_bundle_without_the_signer_is_refused() {
        let dir = temp("refuse");
        Ca::load_or_create(&dir).unwrap();
        let (other, _) = Ca::generate().unwrap();
        fs::write(dir.join(BUNDLE_FILE), other.pem()).unwrap();
        assert!(matches!(
            Authority::load(&dir),
            Err(TrustError::SignerNotTrusted { .. })
        ));
        // A key that is not the certificate's is refused too.
        let (_, stray_key) = Ca::generate().unwrap();
        fs::write(dir.join(pki::CA_KEY_FILE), stray_key).unwrap();
        assert!(matches!(
            Authority::load(&dir),
            Err(TrustError::Pki(PkiError::BadCa(_)))
        ));
        let _ = fs::remove_dir_all(&dir);
    }
}
