//! The mesh CA as it is now: the certificate that signs and the trust
//! bundle, shared by the signer, the :15012 listener and every node's
//! `WatchTrustBundle` stream. In folder mode the CA folder is read again
//! when its files change (the steps of a rotation, see
//! `lacewing_core::trust`); a folder in a state no step leaves it in is
//! refused, logged and counted, and the controller keeps what it had.

use std::{path::PathBuf, sync::Arc, time::Duration};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio::sync::watch;

use lacewing_core::{pki, trust::Authority};

/// How often the CA folder is looked at.
const POLL: Duration = Duration::from_secs(1);

/// The authority now, and each one after it.
pub type Authorities = watch::Receiver<Arc<Authority>>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

/// The CA's metrics on :15014.
#[derive(Clone, Debug, Default)]
pub struct AuthorityMetrics {
    roots: Gauge,
    reloads: Family<ResultLabels, Counter>,
}

impl AuthorityMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "lacewing_ca_trust_bundle_roots",
            "Roots in the trust bundle the controller hands out (2 during a CA rotation)",
            m.roots.clone(),
        );
        registry.register(
            "lacewing_ca_reloads",
            "Loads of a changed CA folder, by result (a refused one keeps the previous CA)",
            m.reloads.clone(),
        );
        m
    }

    fn show(&self, authority: &Authority) {
        self.roots
            .set(i64::try_from(authority.roots()).unwrap_or(i64::MAX));
    }
}

/// An authority that never changes (a CA kept in a Kubernetes Secret is
/// read at start). The sender is kept while the controller runs: a
/// dropped one would end every node's bundle stream.
pub fn fixed(
    authority: Authority,
    metrics: &AuthorityMetrics,
) -> (watch::Sender<Arc<Authority>>, Authorities) {
    metrics.show(&authority);
    watch::channel(Arc::new(authority))
}

/// The authority in `dir`, read again whenever its files change.
pub fn watch_folder(
    dir: PathBuf,
    initial: Authority,
    metrics: AuthorityMetrics,
) -> (Authorities, tokio::task::JoinHandle<()>) {
    metrics.show(&initial);
    let (tx, rx) = watch::channel(Arc::new(initial));
    let task = tokio::spawn(async move {
        let mut seen = contents(&dir);
        let mut last_error = String::new();
        loop {
            tokio::time::sleep(POLL).await;
            let now = contents(&dir);
            if now == seen {
                continue;
            }
            match Authority::load(&dir) {
                Ok(authority) => {
                    seen = now;
                    last_error.clear();
                    metrics.show(&authority);
                    metrics
                        .reloads
                        .get_or_create(&ResultLabels { result: "ok" })
                        .inc();
                    tracing::info!(
                        signer = authority.signer.fingerprint(),
                        roots = authority.roots(),
                        "loaded the CA folder"
                    );
                    tx.send_replace(Arc::new(authority));
                }
                Err(err) => {
                    // A step writes its files one after another: looked
                    // at again next time, and reported once.
                    let text = err.to_string();
                    if text != last_error {
                        metrics
                            .reloads
                            .get_or_create(&ResultLabels { result: "refused" })
                            .inc();
                        tracing::warn!(dir = %dir.display(), %err, "the CA folder cannot be used; keeping the CA loaded before");
                        last_error = text;
                    }
                }
            }
        }
    });
    (rx, task)
}

/// The files that make the authority, as bytes (absent ones empty).
fn contents(dir: &std::path::Path) -> [Vec<u8>; 3] {
    [
        pki::CA_FILE,
        pki::CA_KEY_FILE,
        lacewing_core::trust::BUNDLE_FILE,
    ]
    .map(|f| std::fs::read(dir.join(f)).unwrap_or_default())
}
