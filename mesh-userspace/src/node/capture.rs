//! Capture of meshed pods on this node: for each one, listeners on
//! 127.0.0.1:15001 and [::1]:15001 inside the pod's network namespace (as
//! ztunnel's in-pod mode does) and its netns cookie in `LW_MESHED_NETNS`,
//! which turns on the kernel's redirect. Each accepted connection's original
//! destination is read from `LW_CAPTURED`.
//!
//! The pod's network namespace comes from the pod network (a CNI plugin):
//! a folder (`--pod-netns-dir`) with one file per pod address holding the
//! path of its namespace. In the lab, the lab writes it.

use std::{
    collections::BTreeMap,
    fs::File,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::AsFd as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use aya::maps::{HashMap as BpfHashMap, MapData};
use mesh_common::{
    capture::{CAPTURE_OUTBOUND, CapturedKey, MeshedNetns, OUTBOUND_PORT, OrigDst},
    family, names,
};
use tokio::net::TcpListener;

use super::{maps::open, outbound::Outbound, workloads::LocalWorkloads};
use crate::model::workloads::Workload;

/// How often the netns folder is looked at when nothing else changes.
const LOOK_EVERY: Duration = Duration::from_millis(500);

/// The capture maps, opened from their pins.
pub struct CaptureMaps {
    meshed: BpfHashMap<MapData, u64, MeshedNetns>,
    captured: BpfHashMap<MapData, CapturedKey, OrigDst>,
}

impl CaptureMaps {
    pub fn open(bpffs_root: &Path) -> Result<Self, aya::maps::MapError> {
        Ok(Self {
            meshed: open(bpffs_root, names::MAP_MESHED_NETNS)?.try_into()?,
            captured: open(bpffs_root, names::MAP_CAPTURED)?.try_into()?,
        })
    }
}

/// One captured pod: its netns cookie and its listeners' tasks.
struct Captured {
    cookie: u64,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Captured {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Keeps capture in line with the meshed pods on this node, forever.
pub async fn run(
    netns_dir: PathBuf,
    workloads: Arc<LocalWorkloads>,
    maps: CaptureMaps,
    outbound: Arc<Outbound>,
) {
    let maps = Arc::new(std::sync::Mutex::new(maps));
    let mut captured: BTreeMap<String, Captured> = BTreeMap::new();
    let mut changes = workloads.watch();
    loop {
        changes.borrow_and_update();
        let wanted: BTreeMap<String, (Workload, PathBuf)> = workloads
            .meshed()
            .into_iter()
            .filter_map(|w| {
                let path = netns_of(&netns_dir, &w.addresses)?;
                Some((w.key(), (w, path)))
            })
            .collect();
        captured.retain(|key, c| {
            let keep = wanted.contains_key(key);
            if !keep {
                let _ = lock(&maps).meshed.remove(&c.cookie);
                tracing::info!(pod = %key, "capture stopped");
            }
            keep
        });
        for (key, (workload, path)) in wanted {
            if captured.contains_key(&key) {
                continue;
            }
            match start(&workload, &path, &maps, &outbound) {
                Ok(c) => {
                    tracing::info!(pod = %key, netns = %path.display(), cookie = c.cookie, "capturing outbound TCP");
                    captured.insert(key, c);
                }
                Err(err) => {
                    tracing::warn!(pod = %key, netns = %path.display(), %err, "cannot capture");
                }
            }
        }
        tokio::select! {
            _ = changes.changed() => {}
            () = tokio::time::sleep(LOOK_EVERY) => {}
        }
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The netns path the pod network recorded for any of these addresses.
fn netns_of(dir: &Path, addresses: &[IpAddr]) -> Option<PathBuf> {
    addresses.iter().find_map(|a| {
        let text = std::fs::read_to_string(dir.join(a.to_string())).ok()?;
        let path = PathBuf::from(text.trim());
        path.exists().then_some(path)
    })
}

/// Opens the pod's listeners and turns its capture on.
fn start(
    workload: &Workload,
    netns_path: &Path,
    maps: &Arc<std::sync::Mutex<CaptureMaps>>,
    outbound: &Arc<Outbound>,
) -> std::io::Result<Captured> {
    let netns = Arc::new(File::open(netns_path)?);
    let (listeners, cookie) = crate::sys::in_netns(netns.as_fd(), || {
        let v4 = std::net::TcpListener::bind(SocketAddr::new(
            Ipv4Addr::LOCALHOST.into(),
            OUTBOUND_PORT,
        ))?;
        let cookie = crate::sys::netns_cookie(v4.as_fd())?;
        let mut listeners = vec![v4];
        // IPv6 only where the pod has it.
        if let Ok(v6) =
            std::net::TcpListener::bind(SocketAddr::new(Ipv6Addr::LOCALHOST.into(), OUTBOUND_PORT))
        {
            listeners.push(v6);
        }
        Ok((listeners, cookie))
    })?;
    let mut tasks = Vec::new();
    for listener in listeners {
        listener.set_nonblocking(true)?;
        let listener = TcpListener::from_std(listener)?;
        tasks.push(tokio::spawn(accept_loop(
            listener,
            cookie,
            workload.clone(),
            Arc::clone(&netns),
            Arc::clone(maps),
            Arc::clone(outbound),
        )));
    }
    lock(maps)
        .meshed
        .insert(
            cookie,
            MeshedNetns {
                flags: CAPTURE_OUTBOUND,
                _pad: 0,
            },
            0,
        )
        .map_err(std::io::Error::other)?;
    Ok(Captured { cookie, tasks })
}

async fn accept_loop(
    listener: TcpListener,
    cookie: u64,
    workload: Workload,
    netns: Arc<File>,
    maps: Arc<std::sync::Mutex<CaptureMaps>>,
    outbound: Arc<Outbound>,
) {
    loop {
        let (app, from) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                tracing::warn!(%err, pod = %workload.key(), "accepting a captured connection");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
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
        let (workload, netns, outbound) =
            (workload.clone(), Arc::clone(&netns), Arc::clone(&outbound));
        tokio::spawn(async move { outbound.handle(workload, netns, app, dest).await });
    }
}

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
