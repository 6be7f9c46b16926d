//! Capture of meshed pods on this node: for each one, listeners on
//! 127.0.0.1:15001 and [::1]:15001 inside the pod's network namespace (as
//! ztunnel's in-pod mode does) and its netns cookie in `LW_MESHED_NETNS`,
//! which turns on the kernel's redirect. Each accepted connection's original
//! destination is read from `LW_CAPTURED`.
//!
//! Each meshed pod also gets listeners on 127.0.0.1:15006 and [::1]:15006
//! and the sk_lookup program attached to its namespace; a STRICT pod's
//! addresses are in `LW_INBOUND`, so plain-text connections to it land on
//! those listeners and are reset. A mode change only edits `LW_INBOUND`.
//!
//! The listeners are opened through [`Listeners`] under the role
//! `pod/<namespace>/<name>`: a daemon taking over a node gets its
//! predecessor's (the same sockets, with what waits in their queues) and
//! accepts on them once the predecessor stopped.
//!
//! The pod's network namespace comes from the CNI plugin's hand-over
//! ([`super::cni`]: `--cni-socket`), from a running process of the pod
//! found at start, or from a folder (`--pod-netns-dir`) with one file per
//! pod address holding the path of its namespace and, on a second line,
//! the pod's UID (the lab writes one for the pods it wires before the
//! daemons start).
//!
//! Before a pod is captured, `lw_sockops` is attached at its cgroup (the
//! directory naming its UID below the cgroup root, as kubelet names it):
//! the kernel runs sock_ops only for the sockets of pods the mesh serves
//! ([`super::sockops`]).

use std::{
    collections::BTreeMap,
    fs::File,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::AsFd as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use std::os::fd::AsRawFd as _;

use aya::maps::{HashMap as BpfHashMap, MapData, SockHash};
use mesh_common::{
    capture::{
        AddrKey, CAPTURE_OUTBOUND, CapturedKey, INBOUND_PORT, MeshedNetns, OUTBOUND_PORT, OrigDst,
    },
    family, names,
};
use tokio::net::TcpListener;

use lacewing_proxy::{Proxy, outbound::Captured as CapturedConn};
use lacewing_sys::{
    admission::{Admission, Admitted},
    handoff::{Held, Listeners},
};
use tokio_util::sync::CancellationToken;

use super::{
    cni::{PodNetns, PodNets, inode},
    fastpath::IdentityNumbers,
    maps::{addr_key, open},
    sockops::{Kind, SockOpsLinks},
    workloads::LocalWorkloads,
};
use lacewing_core::model::workloads::Workload;

/// How often the netns folder is looked at when nothing else changes.
const LOOK_EVERY: Duration = Duration::from_millis(500);

/// Why capture cannot start.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("opening the capture maps under the bpffs root: {0} (is the datapath loaded?)")]
    Maps(#[from] aya::maps::MapError),
    #[error("loading the sk_lookup program: {0}")]
    SkLookup(#[from] crate::loader::LoadError),
    #[error("listing the node's addresses: {0}")]
    Addresses(std::io::Error),
}

/// The capture maps, opened from their pins, and the sk_lookup program.
pub struct CaptureMaps {
    meshed: BpfHashMap<MapData, u64, MeshedNetns>,
    captured: BpfHashMap<MapData, CapturedKey, OrigDst>,
    inbound: SockHash<MapData, AddrKey>,
    node_addrs: BpfHashMap<MapData, AddrKey, u32>,
    sk_lookup: aya::Ebpf,
    sock_ops: Arc<SockOpsLinks>,
    /// Where the pods' cgroups are looked for.
    cgroup_root: PathBuf,
}

impl CaptureMaps {
    pub fn open(
        bpffs_root: &Path,
        sock_ops: Arc<SockOpsLinks>,
        cgroup_root: &Path,
    ) -> Result<Self, CaptureError> {
        let mut maps = Self {
            meshed: open(bpffs_root, names::MAP_MESHED_NETNS).and_then(TryInto::try_into)?,
            captured: open(bpffs_root, names::MAP_CAPTURED).and_then(TryInto::try_into)?,
            inbound: open(bpffs_root, names::MAP_INBOUND).and_then(TryInto::try_into)?,
            node_addrs: open(bpffs_root, names::MAP_NODE_ADDRS).and_then(TryInto::try_into)?,
            sk_lookup: super::loader::load_sk_lookup(bpffs_root)?,
            sock_ops,
            cgroup_root: cgroup_root.to_owned(),
        };
        // The node's own connections to its pods (tunnel streams, probes)
        // are never steered.
        for ip in lacewing_sys::os::local_addresses().map_err(CaptureError::Addresses)? {
            let _ = maps.node_addrs.insert(addr_key(ip), 1, 0);
        }
        Ok(maps)
    }

    fn sk_lookup(&mut self) -> &mut aya::programs::SkLookup {
        self.sk_lookup
            .program_mut(names::SK_LOOKUP_PROGRAM)
            .and_then(|p| p.try_into().ok())
            .expect("loaded by CaptureMaps::open")
    }
}

/// One captured pod: its netns cookie, its listeners' tasks, its plain-text
/// listeners (for `LW_INBOUND`), its sk_lookup link, and whether it is
/// STRICT now.
struct Captured {
    workload: Arc<Workload>,
    netns: Arc<File>,
    cookie: u64,
    strict: bool,
    addresses: Vec<IpAddr>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    plain: Vec<std::net::TcpListener>,
    /// The listeners, held for the next handoff while the pod is captured.
    _held: Vec<Held>,
    link: Option<aya::programs::sk_lookup::SkLookupLinkId>,
    /// The inode of the pod's cgroup, where sock_ops is attached for it.
    cgroup: Option<u64>,
}

impl Captured {
    /// Turns STRICT on or off: the pod's addresses in `LW_INBOUND`, or not.
    fn set_strict(&mut self, strict: bool, maps: &mut CaptureMaps) -> std::io::Result<()> {
        for ip in &self.addresses {
            let key = addr_key(*ip);
            if !strict {
                let _ = maps.inbound.remove(&key);
                continue;
            }
            let Some(listener) = self
                .plain
                .iter()
                .find(|l| l.local_addr().is_ok_and(|a| a.is_ipv4() == ip.is_ipv4()))
            else {
                continue;
            };
            maps.inbound
                .insert(key, listener.as_raw_fd(), 0)
                .map_err(std::io::Error::other)?;
        }
        self.strict = strict;
        Ok(())
    }
}

impl Drop for Captured {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// What capture runs with besides its maps.
pub struct CaptureParts {
    pub netns_dir: Option<PathBuf>,
    /// Pods the CNI plugin handed over, and those found running.
    pub pods: Arc<PodNets>,
    pub workloads: Arc<LocalWorkloads>,
    pub proxy: Arc<Proxy>,
    pub numbers: Arc<IdentityNumbers>,
    pub captured_pods: prometheus_client::metrics::gauge::Gauge,
    pub listeners: Arc<Listeners>,
    /// The workloads version capture has caught up with (a daemon taking
    /// over says it is ready only after).
    pub reconciled: tokio::sync::watch::Sender<u64>,
    pub admission: PodAdmission,
}

/// The admission of every pod's capture listeners, one per kind, shared by
/// the pods: no cap per source (a pod's connections are its own), but
/// accept errors and the file limit handled.
#[derive(Clone)]
pub struct PodAdmission {
    pub outbound: Admission,
    pub plaintext: Admission,
}

/// Keeps capture in line with the meshed pods on this node, until `drain`
/// is cancelled: then every pod's listeners close (new connections are
/// refused, or in an upgrade accepted by the successor), while the
/// connections already accepted go on.
pub async fn run(maps: CaptureMaps, parts: CaptureParts, drain: CancellationToken) {
    let CaptureParts {
        netns_dir,
        pods,
        workloads,
        proxy,
        numbers,
        captured_pods,
        listeners,
        reconciled,
        admission,
    } = parts;
    let maps = Arc::new(std::sync::Mutex::new(maps));
    let mut captured: BTreeMap<String, Captured> = BTreeMap::new();
    let mut changes = workloads.watch();
    let mut handed = pods.watch();
    let mut rechecked = None;
    loop {
        let version = *changes.borrow_and_update();
        handed.borrow_and_update();
        let meshed = workloads.meshed();
        let without: Vec<&Workload> = meshed
            .iter()
            .filter(|w| netns_of(&pods, netns_dir.as_deref(), w).is_none())
            .collect();
        if !without.is_empty() {
            pods.find_running(&without);
        }
        let wanted: BTreeMap<String, (Workload, PodNetns)> = meshed
            .into_iter()
            .filter_map(|w| {
                let netns = netns_of(&pods, netns_dir.as_deref(), &w)?;
                Some((w.key(), (w, netns)))
            })
            .collect();
        captured.retain(|key, c| {
            // A pod whose sandbox was made again has a new namespace.
            let keep = wanted
                .get(key)
                .is_some_and(|(_, netns)| same_file(&netns.file, &c.netns));
            if !keep {
                stop(c, &mut lock(&maps));
                tracing::info!(pod = %key, "capture stopped");
            }
            keep
        });
        for (key, c) in &mut captured {
            let strict = wanted[key].0.strict;
            if c.strict != strict {
                match c.set_strict(strict, &mut lock(&maps)) {
                    Ok(()) => tracing::info!(pod = %key, strict, "inbound mode changed"),
                    Err(err) => tracing::warn!(pod = %key, %err, "cannot change the inbound mode"),
                }
            }
        }
        for (key, (workload, netns)) in wanted {
            if captured.contains_key(&key) {
                continue;
            }
            let identity = numbers.number(&workload.identity(&proxy.outbound.trust_domain));
            match start(
                &workload, identity, &netns, &maps, &proxy, &listeners, &admission,
            ) {
                Ok(c) => {
                    tracing::info!(pod = %key, netns = %netns.origin, cookie = c.cookie, strict = c.strict, "capturing outbound TCP");
                    captured.insert(key, c);
                }
                Err(err) => {
                    tracing::warn!(pod = %key, netns = %netns.origin, %err, "cannot capture");
                }
            }
        }
        captured_pods.set(i64::try_from(captured.len()).unwrap_or(i64::MAX));
        pods.set_captured(
            captured
                .iter()
                .map(|(key, c)| (key.clone(), inode(&c.netns)))
                .collect(),
        );
        reconciled.send_replace(version);
        if rechecked != Some(version) {
            // Policies may have changed: what the fast path let through
            // is decided again (a few netlink calls per pod).
            rechecked = Some(version);
            for (key, c) in &captured {
                if let Err(err) = super::fastpath::close_denied(&c.workload, &c.netns, &proxy) {
                    tracing::warn!(pod = %key, %err, "cannot re-check the pod's fast-path connections");
                }
            }
        }
        tokio::select! {
            _ = changes.changed() => {}
            _ = handed.changed() => {}
            () = tokio::time::sleep(LOOK_EVERY) => {}
            () = drain.cancelled() => break,
        }
    }
    // The listeners close with their tasks; capture stays on in the kernel
    // until the datapath is detached, so new connections are refused at
    // once instead of waiting in a backlog nobody accepts.
    let count = captured.len();
    captured.clear();
    captured_pods.set(0);
    pods.set_captured(Default::default());
    tracing::info!(pods = count, "capture listeners closed for the drain");
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The pod's network namespace: handed over or found running, else the
/// path the pod network recorded in `dir` for any of its addresses.
fn netns_of(pods: &PodNets, dir: Option<&Path>, w: &Workload) -> Option<PodNetns> {
    if let Some(netns) = pods.netns(w) {
        return Some(netns);
    }
    let dir = dir?;
    w.addresses.iter().find_map(|a| {
        let text = std::fs::read_to_string(dir.join(a.to_string())).ok()?;
        let mut lines = text.lines().map(str::trim);
        let path = PathBuf::from(lines.next()?);
        let file = File::open(&path).ok()?;
        Some(PodNetns {
            file: Arc::new(file),
            origin: path.display().to_string(),
            uid: lines.next().unwrap_or_default().to_owned(),
        })
    })
}

/// Whether two handles are the same namespace (nsfs: one device).
fn same_file(a: &File, b: &File) -> bool {
    inode(a) != 0 && inode(a) == inode(b)
}

/// Turns a pod's capture off (its listeners close with the tasks).
fn stop(c: &mut Captured, maps: &mut CaptureMaps) {
    let _ = maps.meshed.remove(&c.cookie);
    let _ = c.set_strict(false, maps);
    if let Some(link) = c.link.take() {
        let _ = maps.sk_lookup().detach(link);
    }
    if let Some(inode) = c.cgroup.take() {
        maps.sock_ops.release(Kind::Pod, inode);
    }
}

/// A pod's sock_ops link while its capture starts: released on drop
/// unless kept.
struct PodLink {
    maps: Arc<std::sync::Mutex<CaptureMaps>>,
    inode: Option<u64>,
}

impl PodLink {
    /// The cgroup's inode, for `Captured` to release at `stop`.
    fn keep(mut self) -> Option<u64> {
        self.inode.take()
    }
}

impl Drop for PodLink {
    fn drop(&mut self) {
        if let Some(inode) = self.inode.take() {
            lock(&self.maps).sock_ops.release(Kind::Pod, inode);
        }
    }
}

/// Attaches sock_ops at the pod's cgroup, found by its UID below the
/// cgroup root: before its netns is meshed, so each captured connection's
/// handshake is seen. The cgroup's inode.
fn attach_sock_ops(uid: &str, maps: &CaptureMaps) -> std::io::Result<u64> {
    if uid.is_empty() {
        return Err(std::io::Error::other(
            "the pod's UID is unknown, so its cgroup cannot be found (the CNI runtime sends K8S_POD_UID; a pod folder file gives it on its second line)",
        ));
    }
    let dir = lacewing_sys::cgroup::find_pod(&maps.cgroup_root, uid)?.ok_or_else(|| {
        std::io::Error::other(format!(
            "no cgroup of pod UID {uid} below {}",
            maps.cgroup_root.display()
        ))
    })?;
    maps.sock_ops
        .attach(Kind::Pod, &dir)
        .map_err(std::io::Error::other)
}

/// Attaches sock_ops at the pod's cgroup, then opens its listeners and
/// turns its capture on.
fn start(
    workload: &Workload,
    identity: u32,
    netns: &PodNetns,
    maps: &Arc<std::sync::Mutex<CaptureMaps>>,
    proxy: &Arc<Proxy>,
    handoff: &Arc<Listeners>,
    admission: &PodAdmission,
) -> std::io::Result<Captured> {
    let uid = if netns.uid.is_empty() {
        &workload.uid
    } else {
        &netns.uid
    };
    // Released again if the pod cannot be captured after all.
    let pod_link = PodLink {
        maps: Arc::clone(maps),
        inode: Some(attach_sock_ops(uid, &lock(maps))?),
    };
    let netns = Arc::clone(&netns.file);
    let strict = workload.strict;
    let role = format!("pod/{}", workload.key());
    let mut held = Vec::new();
    let (listeners, plain, cookie) = lacewing_sys::os::in_netns(netns.as_fd(), || {
        let cookie = lacewing_sys::os::netns_cookie(lacewing_sys::os::tcp_socket(false)?.as_fd())?;
        let mut listen = |addr| -> std::io::Result<std::net::TcpListener> {
            let (listener, h) = handoff.listen(&role, addr)?;
            if lacewing_sys::os::netns_cookie(listener.as_fd())? == cookie {
                held.push(h);
                return Ok(listener);
            }
            // Inherited from a pod of the same name in another namespace
            // (it was recreated meanwhile): not this pod's.
            drop((listener, h));
            let listener = lacewing_sys::net::listen(addr)?;
            held.push(handoff.hold(&role, listener.as_fd())?);
            Ok(listener)
        };
        let mut both = |port| {
            let v4 = listen(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port))?;
            let mut listeners = vec![v4];
            // IPv6 only where the pod has it.
            if let Ok(v6) = listen(SocketAddr::new(Ipv6Addr::LOCALHOST.into(), port)) {
                listeners.push(v6);
            }
            std::io::Result::Ok(listeners)
        };
        let listeners = both(OUTBOUND_PORT)?;
        let plain = both(INBOUND_PORT)?;
        Ok((listeners, plain, cookie))
    })?;
    let link = Some(
        lock(maps)
            .sk_lookup()
            .attach(netns.as_fd())
            .map_err(std::io::Error::other)?,
    );
    let mut tasks = Vec::new();
    let mut kept = Vec::new();
    for listener in plain {
        kept.push(listener.try_clone()?);
        listener.set_nonblocking(true)?;
        let listener = TcpListener::from_std(listener)?;
        tasks.push(tokio::spawn(refuse_plain_text(
            PodListener {
                listener,
                handoff: Arc::clone(handoff),
                admission: admission.plaintext.clone(),
            },
            workload.key(),
            proxy.metrics.clone(),
        )));
    }
    let shared = Arc::new(workload.clone());
    for listener in listeners {
        listener.set_nonblocking(true)?;
        let listener = TcpListener::from_std(listener)?;
        tasks.push(tokio::spawn(accept_loop(
            PodListener {
                listener,
                handoff: Arc::clone(handoff),
                admission: admission.outbound.clone(),
            },
            cookie,
            Arc::clone(&shared),
            Arc::clone(&netns),
            Arc::clone(maps),
            Arc::clone(proxy),
        )));
    }
    lock(maps)
        .meshed
        .insert(
            cookie,
            MeshedNetns {
                flags: CAPTURE_OUTBOUND,
                identity,
            },
            0,
        )
        .map_err(std::io::Error::other)?;
    let mut captured = Captured {
        workload: Arc::clone(&shared),
        netns,
        cookie,
        strict: false,
        addresses: workload.addresses.clone(),
        tasks,
        plain: kept,
        _held: held,
        link,
        cgroup: pod_link.keep(),
    };
    if let Err(err) = captured.set_strict(strict, &mut lock(maps)) {
        stop(&mut captured, &mut lock(maps));
        return Err(err);
    }
    Ok(captured)
}

/// One of a pod's listeners: it accepts (through its admission) once the
/// daemon is accepting (a successor waits for its predecessor to stop).
struct PodListener {
    listener: TcpListener,
    handoff: Arc<Listeners>,
    admission: Admission,
}

impl PodListener {
    /// Waits, once, until the daemon accepts; the gate never closes again,
    /// so the accept loop does not ask per connection.
    async fn until_accepting(&self) {
        self.handoff.until_accepting().await;
    }

    async fn accept(&self) -> Admitted {
        self.admission.accept(&self.listener).await
    }
}

/// STRICT: plain-text connections steered here are reset and counted.
async fn refuse_plain_text(
    listener: PodListener,
    pod: String,
    metrics: lacewing_tunnel::metrics::TunnelMetrics,
) {
    listener.until_accepting().await;
    loop {
        let Admitted {
            stream: conn, from, ..
        } = listener.accept().await;
        tracing::info!(%pod, %from, "refused a plain-text connection (STRICT)");
        metrics.refused(&lacewing_tunnel::Refusal::new(0, "plaintext_strict", ""));
        let _ = conn.set_zero_linger();
    }
}

async fn accept_loop(
    listener: PodListener,
    cookie: u64,
    workload: Arc<Workload>,
    netns: Arc<File>,
    maps: Arc<std::sync::Mutex<CaptureMaps>>,
    proxy: Arc<Proxy>,
) {
    listener.until_accepting().await;
    loop {
        // No handshake on a plain in-pod port; the slot lives as long as
        // the connection.
        let Admitted {
            stream: app,
            from,
            slot,
            ..
        } = listener.accept().await;
        let key = CapturedKey {
            netns_cookie: cookie,
            port: from.port(),
            family: if from.is_ipv4() {
                family::INET as u8
            } else {
                family::INET6 as u8
            },
            _pad: [0; 5],
        };
        let orig = {
            let mut maps = lock(&maps);
            let orig = maps.captured.get(&key, 0).ok();
            let _ = maps.captured.remove(&key);
            orig
        };
        let Some(orig) = orig else {
            tracing::debug!(pod = %workload.key(), %from, "a connection to the capture port that was not captured");
            continue;
        };
        let dest = SocketAddr::new(address(&orig), orig.port);
        let source = Arc::clone(&workload);
        let netns = Arc::clone(&netns);
        let proxy = Arc::clone(&proxy);
        // Carried from here on by one worker thread.
        lacewing_sys::workers::spawn_with(app, move |app| async move {
            let conn = CapturedConn {
                source,
                netns,
                netns_cookie: cookie,
                app,
                dest,
            };
            proxy.outbound.handle(conn).await;
            drop(slot);
        });
    }
}

/// The original destination's address. (An IPv4-mapped destination was
/// already recorded as IPv4 by the connect6 hook.)
fn address(orig: &OrigDst) -> IpAddr {
    if orig.family == family::INET as u8 {
        IpAddr::V4(Ipv4Addr::new(
            orig.addr[0],
            orig.addr[1],
            orig.addr[2],
            orig.addr[3],
        ))
    } else {
        IpAddr::V6(Ipv6Addr::from(orig.addr))
    }
}
