//! The folder source: a directory of multi-document Kubernetes YAML, re-read
//! when any file in it changes. A bad file (reported with its name and the
//! document's index) keeps the previous good snapshot in force.

use std::{
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use tokio::sync::watch;

use super::snapshot::{Publisher, Snapshots, SourceError};
use lacewing_core::model::{
    Declared,
    k8s::{Objects, translate_all},
};

/// How often the folder is checked for changes (names, sizes and times only:
/// a few stat calls per file).
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Starts watching `dir`.
pub fn watch(dir: PathBuf) -> (Snapshots, watch::Receiver<String>) {
    let (publisher, snap_rx, err_rx) = Publisher::new();
    tokio::spawn(async move {
        let mut cache = FileCache::default();
        let mut seen = None;
        let mut interval = tokio::time::interval(POLL_INTERVAL);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            let stamp = fingerprint(&dir);
            if seen.as_ref() == Some(&stamp) {
                continue;
            }
            seen = Some(stamp.clone());
            publisher.publish(cache.load(&stamp), "folder");
        }
    });
    (snap_rx, err_rx)
}

/// Parsed files, re-parsed only when their size or time changes.
#[derive(Default)]
struct FileCache {
    files: std::collections::BTreeMap<PathBuf, (u64, Option<SystemTime>, Objects)>,
}

impl FileCache {
    fn load(
        &mut self,
        stamp: &[(PathBuf, u64, Option<SystemTime>)],
    ) -> Result<Declared, SourceError> {
        self.files
            .retain(|path, _| stamp.iter().any(|(p, _, _)| p == path));
        for (path, len, modified) in stamp {
            if let Some((l, m, _)) = self.files.get(path)
                && l == len
                && m == modified
            {
                continue;
            }
            let name = path.display().to_string();
            let text = std::fs::read_to_string(path).map_err(|source| SourceError::Read {
                file: name.clone(),
                source,
            })?;
            let mut objects = Objects::default();
            // A bad file leaves the cache without it, so it is read again
            // (and reported again) until it is fixed.
            self.files.remove(path);
            objects
                .add_yaml(&name, &text)
                .map_err(|source| SourceError::File { file: name, source })?;
            self.files.insert(path.clone(), (*len, *modified, objects));
        }
        let parts: Vec<&Objects> = self.files.values().map(|(_, _, o)| o).collect();
        Ok(translate_all(&parts).and_then(|t| t.strict())?)
    }
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    files
}

/// Names, sizes and modification times: cheap to compare every tick.
fn fingerprint(dir: &Path) -> Vec<(PathBuf, u64, Option<SystemTime>)> {
    yaml_files(dir)
        .into_iter()
        .map(|p| {
            let meta = std::fs::metadata(&p).ok();
            let len = meta.as_ref().map_or(0, |m| m.len());
            let modified = meta.and_then(|m| m.modified().ok());
            (p, len, modified)
        })
        .collect()
}
