//! Pods handed over by the CNI plugin (`lacewing-cni`), and pods found
//! running when the daemon starts.
//!
//! [`PodNets`] keeps each pod's network namespace handle (opened when the
//! plugin hands the pod over, so the namespace outlives nothing of ours),
//! the addresses the primary plugin gave it, and what capture last did.
//! [`serve`] answers the plugin on a root-only Unix socket: an `add` is
//! answered once capture has opened the pod's listeners (or once the pod is
//! known not to be meshed), so the pod's first connection is captured.
//!
//! Pods that were running before this daemon (a first install, a restart)
//! are found as Istio's node agent finds them: a process whose cgroup path
//! names the pod's UID (`pod<uid>`, as the kubelet names pod cgroups with
//! either cgroup driver), and that process's `/proc/<pid>/ns/net`.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::File,
    io,
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use lacewing_cni::handover::{Answer, MAX_LINE, Pod, Request};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    sync::watch,
};
use tokio_util::sync::CancellationToken;

use crate::workloads::LocalWorkloads;
use lacewing_core::model::workloads::Workload;
use lacewing_sys::cgroup;

/// How long an `add` waits for the control plane to know the pod and for
/// capture to open its listeners.
const ADD_WAIT: Duration = Duration::from_secs(10);
/// How long a `del` waits for capture to stop.
const DEL_WAIT: Duration = Duration::from_secs(5);
/// How long a plugin may take to send its request.
const READ_WAIT: Duration = Duration::from_secs(5);
/// How often a meshed pod with no namespace is looked for in `/proc` again
/// (its process may start after the first look, when no plugin handed it
/// over: the plugin was not chained yet).
const SEARCH_AGAIN: Duration = Duration::from_secs(30);

/// A pod's network namespace, as capture opens it.
#[derive(Clone, Debug)]
pub struct PodNetns {
    pub file: Arc<File>,
    /// Where it came from, for logs.
    pub origin: String,
    /// The pod's UID when the source knows it (the plugin's `K8S_POD_UID`,
    /// the cgroup a running pod was found by): its cgroup is found by it.
    pub uid: String,
}

#[derive(Debug)]
struct Handed {
    container_id: String,
    netns: PodNetns,
}

/// The pods' namespaces this daemon holds, and which pods capture serves.
#[derive(Debug)]
pub struct PodNets {
    handed: Mutex<BTreeMap<String, Handed>>,
    /// Found through `/proc`, by pod UID.
    found: Mutex<BTreeMap<String, PodNetns>>,
    /// UIDs looked for in `/proc`, and when.
    searched: Mutex<BTreeMap<String, std::time::Instant>>,
    /// Bumped on each hand-over, so capture looks again.
    changes: watch::Sender<u64>,
    /// The pods capture serves now, by `namespace/name`, with the inode of
    /// the namespace each is captured in.
    captured: watch::Sender<BTreeMap<String, u64>>,
}

impl Default for PodNets {
    fn default() -> Self {
        Self {
            handed: Mutex::default(),
            found: Mutex::default(),
            searched: Mutex::default(),
            changes: watch::channel(0).0,
            captured: watch::channel(BTreeMap::new()).0,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl PodNets {
    /// The namespace of `w`: handed over by the plugin, else found running.
    pub fn netns(&self, w: &Workload) -> Option<PodNetns> {
        if let Some(h) = lock(&self.handed).get(&w.key()) {
            return Some(h.netns.clone());
        }
        if w.uid.is_empty() {
            return None;
        }
        lock(&self.found).get(&w.uid).cloned()
    }

    /// Looks through `/proc` for the pods among `wanted` (meshed here,
    /// with no namespace yet) that were not looked for lately.
    pub fn find_running(&self, wanted: &[&Workload]) {
        let now = std::time::Instant::now();
        let uids: BTreeSet<String> = {
            let mut searched = lock(&self.searched);
            searched.retain(|_, at| now.duration_since(*at) < SEARCH_AGAIN);
            wanted
                .iter()
                .filter(|w| !w.uid.is_empty())
                .filter(|w| searched.insert(w.uid.clone(), now).is_none())
                .map(|w| w.uid.clone())
                .collect()
        };
        if uids.is_empty() {
            return;
        }
        match find_in_proc(Path::new("/proc"), &uids) {
            Ok(found) => {
                for (uid, netns) in found {
                    tracing::info!(uid = %uid, netns = %netns.origin, "found a running pod");
                    lock(&self.found).insert(uid, netns);
                }
            }
            Err(err) => tracing::warn!(%err, "cannot look for running pods in /proc"),
        }
    }

    /// Wakes on every hand-over.
    pub fn watch(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// What capture serves now, with each pod's namespace inode (called by
    /// capture after each pass).
    pub fn set_captured(&self, keys: BTreeMap<String, u64>) {
        self.captured.send_if_modified(|now| {
            let changed = *now != keys;
            *now = keys;
            changed
        });
    }

    fn add(&self, pod: &Pod) -> io::Result<()> {
        if pod.netns.is_empty() {
            return Err(io::Error::other("CNI_NETNS is empty"));
        }
        let file = File::open(&pod.netns)
            .map_err(|e| io::Error::new(e.kind(), format!("opening {}: {e}", pod.netns)))?;
        lock(&self.handed).insert(
            pod.key(),
            Handed {
                container_id: pod.container_id.clone(),
                netns: PodNetns {
                    file: Arc::new(file),
                    origin: pod.netns.clone(),
                    uid: pod.uid.clone(),
                },
            },
        );
        self.changes.send_modify(|v| *v += 1);
        Ok(())
    }

    /// Forgets the pod, unless a newer sandbox of the same name was
    /// handed over since (the kubelet may delete an old one late).
    fn del(&self, pod: &Pod) {
        let mut handed = lock(&self.handed);
        if handed
            .get(&pod.key())
            .is_some_and(|h| h.container_id == pod.container_id || pod.container_id.is_empty())
        {
            handed.remove(&pod.key());
        }
        drop(handed);
        if !pod.uid.is_empty() {
            lock(&self.found).remove(&pod.uid);
        }
        self.changes.send_modify(|v| *v += 1);
    }
}

/// Binds the hand-over socket: its folder root-only, the socket too.
/// A stale socket (a daemon that is gone, or the one this daemon takes
/// over from) is replaced.
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Answers the plugin until `stop`, and keeps the meshed-namespaces file
/// beside the socket current (the plugin's rule when no one answers).
pub async fn serve(
    listener: UnixListener,
    socket: PathBuf,
    pods: Arc<PodNets>,
    workloads: Arc<LocalWorkloads>,
    stop: CancellationToken,
) {
    tokio::spawn(write_meshed_namespaces(
        lacewing_cni::plugin::meshed_namespaces_file(&socket),
        Arc::clone(&workloads),
        stop.clone(),
    ));
    loop {
        let stream = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(err) => {
                    tracing::warn!(%err, "CNI socket accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let (pods, workloads) = (Arc::clone(&pods), Arc::clone(&workloads));
        tokio::spawn(async move {
            if let Err(err) = answer(stream, &pods, &workloads).await {
                tracing::warn!(%err, "CNI hand-over failed");
            }
        });
    }
}

async fn answer(stream: UnixStream, pods: &PodNets, workloads: &LocalWorkloads) -> io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    tokio::time::timeout(
        READ_WAIT,
        BufReader::new(read.take(MAX_LINE)).read_line(&mut line),
    )
    .await
    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no request in time"))??;
    let answer = match serde_json::from_str::<Request>(&line) {
        Ok(request) => handle(&request, pods, workloads).await,
        Err(err) => Answer::Error {
            message: format!("unreadable request: {err}"),
        },
    };
    let mut out = serde_json::to_vec(&answer).expect("an answer serializes");
    out.push(b'\n');
    write.write_all(&out).await
}

async fn handle(request: &Request, pods: &PodNets, workloads: &LocalWorkloads) -> Answer {
    let pod = request.pod();
    let key = pod.key();
    let answer = match request {
        Request::Add(pod) => {
            if let Err(err) = pods.add(pod) {
                return Answer::Error {
                    message: err.to_string(),
                };
            }
            workloads.hand_addresses(&key, pod.ips.clone());
            added(&key, pods, workloads).await
        }
        Request::Del(pod) => {
            pods.del(pod);
            workloads.forget_addresses(&key);
            let mut captured = pods.captured.subscribe();
            let _ =
                tokio::time::timeout(DEL_WAIT, captured.wait_for(|c| !c.contains_key(&key))).await;
            Answer::Released
        }
        Request::Check(_) => match workloads.by_key(&key) {
            Some(w) if w.meshed && pods.captured.borrow().contains_key(&key) => Answer::Captured,
            Some(w) if w.meshed => Answer::Error {
                message: format!("{key} is meshed but not captured on this node"),
            },
            _ => Answer::NotMeshed,
        },
    };
    tracing::info!(pod = %key, container = %pod.container_id, request = ?op(request), ?answer, "CNI");
    answer
}

fn op(request: &Request) -> &'static str {
    match request {
        Request::Add(_) => "add",
        Request::Del(_) => "del",
        Request::Check(_) => "check",
    }
}

/// Waits until the control plane knows the pod and, if it is meshed,
/// capture serves it in the namespace just handed over (a pod of the same
/// name may still be captured in its previous sandbox's).
async fn added(key: &str, pods: &PodNets, workloads: &LocalWorkloads) -> Answer {
    let deadline = tokio::time::Instant::now() + ADD_WAIT;
    let mut versions = workloads.watch();
    let mut captured = pods.captured.subscribe();
    let handed = lock(&pods.handed).get(key).map(|h| inode(&h.netns.file));
    loop {
        match workloads.by_key(key) {
            Some(w) if !w.meshed => return Answer::NotMeshed,
            Some(_)
                if handed.is_some() && captured.borrow_and_update().get(key).copied() == handed =>
            {
                return Answer::Captured;
            }
            _ => {}
        }
        tokio::select! {
            _ = versions.changed() => {}
            _ = captured.changed() => {}
            () = tokio::time::sleep_until(deadline) => {
                return match workloads.by_key(key) {
                    Some(_) => Answer::Error {
                        message: format!("capture of {key} did not start within {}s; see the node daemon's log", ADD_WAIT.as_secs()),
                    },
                    // Captured as soon as the control plane sends it; until
                    // then the pod's traffic is not the mesh's.
                    None => Answer::NotMeshed,
                };
            }
        }
    }
}

/// Writes the namespaces of meshed workloads to `file` on every change.
async fn write_meshed_namespaces(
    file: PathBuf,
    workloads: Arc<LocalWorkloads>,
    stop: CancellationToken,
) {
    let mut versions = workloads.watch();
    let mut written = None;
    loop {
        let namespaces = workloads.meshed_namespaces();
        if written.as_ref() != Some(&namespaces) {
            let text: String = namespaces.iter().map(|n| format!("{n}\n")).collect();
            let tmp = file.with_extension(format!("{}.tmp", std::process::id()));
            match std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, &file)) {
                Ok(()) => written = Some(namespaces),
                Err(err) => {
                    tracing::warn!(file = %file.display(), %err, "cannot write the meshed namespaces")
                }
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            changed = versions.changed() => if changed.is_err() { return },
        }
    }
}

/// A namespace handle's inode, which names the namespace (0 if unreadable).
pub fn inode(f: &File) -> u64 {
    f.metadata().map(|m| m.ino()).unwrap_or_default()
}

/// Each of `uids` with a process running under `proc`, and that process's
/// network namespace. Processes in this daemon's own namespace (pods on
/// the host network) are passed over.
fn find_in_proc(proc: &Path, uids: &BTreeSet<String>) -> io::Result<BTreeMap<String, PodNetns>> {
    let own = std::fs::metadata(proc.join("self/ns/net"))?.ino();
    let mut found = BTreeMap::new();
    for entry in std::fs::read_dir(proc)?.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        // Processes may end while we look: anything unreadable is skipped.
        let Ok(cgroup) = std::fs::read_to_string(entry.path().join("cgroup")) else {
            continue;
        };
        let Some(uid) = cgroup
            .lines()
            .find_map(|l| cgroup::pod_uid(l.rsplit(':').next()?))
        else {
            continue;
        };
        if !uids.contains(&uid) || found.contains_key(&uid) {
            continue;
        }
        let path = entry.path().join("ns/net");
        let Ok(file) = File::open(&path) else {
            continue;
        };
        if file.metadata().map(|m| m.ino()).ok() == Some(own) {
            continue;
        }
        found.insert(
            uid.clone(),
            PodNetns {
                file: Arc::new(file),
                origin: format!("{} (pid {pid})", path.display()),
                uid,
            },
        );
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_uid_no_process_has_is_found_nowhere() {
        let uids = BTreeSet::from(["1b4e28ba-2fa1-11d2-883f-0016d3cca427".to_owned()]);
        assert!(find_in_proc(Path::new("/proc"), &uids).unwrap().is_empty());
    }
}
