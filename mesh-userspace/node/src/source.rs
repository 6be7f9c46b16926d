//! Where the node gets its services until the controller stream exists: a
//! file of Kubernetes YAML (Services and EndpointSlices), re-read when it
//! changes. A file that does not parse or validate is logged and counted, and
//! the last good configuration stays in force.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex, atomic::Ordering},
    time::Duration,
};

use super::{lb::LoadBalancer, metrics::Metrics};
use lacewing_core::model::k8s;
use lacewing_sys::http::Endpoint;

/// How often the file is checked for changes.
pub const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Applies `path` now and whenever its content changes.
pub async fn watch_file(
    path: PathBuf,
    lb: Arc<Mutex<LoadBalancer>>,
    metrics: Metrics,
    endpoint: Arc<Endpoint>,
) {
    let mut last: Option<Vec<u8>> = None;
    let mut stamp = None;
    let mut interval = tokio::time::interval(POLL_INTERVAL);
    loop {
        interval.tick().await;
        // Cheap check first: a large file is read only when it may have changed.
        let meta = tokio::fs::metadata(&path)
            .await
            .ok()
            .map(|m| (m.modified().ok(), m.len()));
        if meta.is_some() && meta == stamp {
            continue;
        }
        stamp = meta;
        let bytes = match tokio::fs::read(&path).await {
            Ok(bytes) => bytes,
            Err(err) => {
                if last.is_some() {
                    tracing::warn!(path = %path.display(), %err, "cannot read the services file; keeping the last configuration");
                }
                continue;
            }
        };
        if last.as_deref() == Some(bytes.as_slice()) {
            continue;
        }
        let result = apply(&bytes, &lb);
        match &result {
            Ok(report) => {
                tracing::info!(path = %path.display(), ?report, "services applied");
                endpoint.ready.store(true, Ordering::Release);
            }
            Err(err) => {
                tracing::error!(path = %path.display(), %err, "services rejected; keeping the last good configuration")
            }
        }
        metrics.applied(result.is_ok());
        last = Some(bytes);
    }
}

/// Why a services file is not applied (the previous one stays).
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("the file is not UTF-8: save it as UTF-8 YAML")]
    NotUtf8,
    #[error(transparent)]
    Parse(#[from] k8s::K8sError),
    #[error(transparent)]
    Apply(#[from] super::lb::ApplyError),
}

fn apply(bytes: &[u8], lb: &Mutex<LoadBalancer>) -> Result<super::lb::ApplyReport, FileError> {
    let text = std::str::from_utf8(bytes).map_err(|_| FileError::NotUtf8)?;
    let set = k8s::parse(text)?;
    let mut lb = lb.lock().unwrap_or_else(|p| p.into_inner());
    Ok(lb.apply(&set)?)
}
