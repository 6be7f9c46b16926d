//! Where `lw_sockops` runs: at the cgroups of the sockets the mesh cares
//! about, the daemon's own and each captured pod's, not at the node's root.
//!
//! The kernel calls a cgroup sock_ops program for its default callbacks
//! (timeout and window init, ECN, connect, established) on every TCP socket
//! below where it is attached: 9 calls for a connection with both ends on
//! the node, whatever the program then does. Only the state callbacks are
//! asked for per socket. So a pod the mesh does not serve pays nothing only
//! if the program is not attached above it. The sockets sock_ops handles
//! are all in those cgroups: a captured pod's app sockets and its accepted
//! sockets from the node (pod cgroup), the capture listeners' accepted
//! sockets and the delivery connections (the daemon's, made or listened on
//! by the daemon; an accepted socket keeps its listener's cgroup).
//!
//! One link per cgroup, pinned as `links/lw_sockops_<kind>_<cgroup inode>`
//! (`kind`: `pod` or `daemon`). A daemon taking over adopts them as it
//! adopts the other links: the pods' and its predecessors' daemon cgroups,
//! whose listeners (and their accepted sockets) it inherits. A pod's link
//! goes when capture stops for the pod; any link goes at the next daemon
//! start once the kernel released its cgroup (the cgroup was removed and
//! its last socket closed). A pod that left the mesh while no daemon ran
//! keeps its link until then: its sockets run a program that finds
//! nothing to do, as every socket did before links per cgroup.

use std::{
    collections::BTreeMap,
    fs::{self, File},
    io,
    os::{
        fd::{AsFd as _, OwnedFd},
        unix::fs::MetadataExt as _,
    },
    path::{Path, PathBuf},
    sync::Mutex,
};

use mesh_common::names;

/// A sock_ops link that could not be made, adopted or removed.
#[derive(Debug, thiserror::Error)]
#[error("sock_ops link {path}: {source}")]
pub struct SockOpsError {
    /// The pin or the cgroup concerned.
    pub path: PathBuf,
    pub source: io::Error,
}

/// `BPF_CGROUP_SOCK_OPS`, the attach type of a cgroup sock_ops link.
const ATTACH_SOCK_OPS: u32 = 3;

/// Which cgroup a link serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Pod,
    Daemon,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Pod => "pod",
            Kind::Daemon => "daemon",
        }
    }
}

/// The sock_ops links of this node, by cgroup.
#[derive(Debug)]
pub struct SockOpsLinks {
    /// The loaded `lw_sockops`.
    program: OwnedFd,
    links: PathBuf,
    /// Pinned links by (kind, cgroup inode).
    pinned: Mutex<BTreeMap<(Kind, u64), PathBuf>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl SockOpsLinks {
    /// With `program` loaded: the links pinned in the folder `links`, to
    /// adopt (each with its descriptor; the caller runs our program in
    /// them), less those whose cgroup the kernel released, which are
    /// removed.
    pub(crate) fn adopt(
        program: OwnedFd,
        links: PathBuf,
    ) -> Result<(Self, Vec<(PathBuf, OwnedFd)>), SockOpsError> {
        let mut pinned = BTreeMap::new();
        let mut adopted = Vec::new();
        for (key, path, link) in pinned_links(&links)? {
            let released =
                lacewing_sys::os::bpf_link_cgroup_id(link.as_fd()).map_err(|source| {
                    SockOpsError {
                        path: path.clone(),
                        source,
                    }
                })? == 0;
            if released {
                remove_pin(&path)?;
                tracing::debug!(pin = %path.display(), "sock_ops link of a released cgroup removed");
                continue;
            }
            pinned.insert(key, path.clone());
            adopted.push((path, link));
        }
        let links = Self {
            program,
            links,
            pinned: Mutex::new(pinned),
        };
        Ok((links, adopted))
    }

    /// The loaded program.
    pub(crate) fn program(&self) -> std::os::fd::BorrowedFd<'_> {
        self.program.as_fd()
    }

    /// Attaches the program at `cgroup` unless a link is pinned for it
    /// already (ours, or a predecessor's we adopted); returns the cgroup's
    /// inode, the link's key.
    pub fn attach(&self, kind: Kind, cgroup: &Path) -> Result<u64, SockOpsError> {
        let err = |source| SockOpsError {
            path: cgroup.to_owned(),
            source,
        };
        let dir = File::open(cgroup).map_err(err)?;
        let inode = dir.metadata().map_err(err)?.ino();
        let mut pinned = lock(&self.pinned);
        if pinned.contains_key(&(kind, inode)) {
            return Ok(inode);
        }
        let path = self.links.join(pin_name(kind, inode));
        let link = lacewing_sys::os::bpf_link_create_cgroup(
            self.program.as_fd(),
            dir.as_fd(),
            ATTACH_SOCK_OPS,
        )
        .map_err(err)?;
        match lacewing_sys::os::bpf_obj_pin(link.as_fd(), &path) {
            Ok(()) => {}
            // Another daemon (one handing over) pinned one a moment ago: the
            // cgroup has its link; ours goes with its descriptor.
            Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {}
            Err(source) => return Err(SockOpsError { path, source }),
        }
        pinned.insert((kind, inode), path);
        Ok(inode)
    }

    /// Detaches the link of `kind` at the cgroup with `inode` (removes its
    /// pin; the kernel detaches it as the last reference goes).
    pub fn release(&self, kind: Kind, inode: u64) {
        if let Some(path) = lock(&self.pinned).remove(&(kind, inode))
            && let Err(err) = remove_pin(&path)
        {
            tracing::warn!(%err, "cannot remove a sock_ops link");
        }
    }

    /// Runs our program in every link now (after a takeover: links pinned
    /// by the daemon we took over from while we prepared).
    pub(crate) fn update_all(&self) -> Result<(), SockOpsError> {
        let mut pinned = lock(&self.pinned);
        for (key, path, link) in pinned_links(&self.links)? {
            match lacewing_sys::os::bpf_link_update(link.as_fd(), self.program.as_fd()) {
                Ok(()) => {
                    pinned.insert(key, path);
                }
                // Its cgroup was released meanwhile: the link is detached.
                Err(err) if err.raw_os_error() == Some(libc::ENOLINK) => {
                    pinned.remove(&key);
                    remove_pin(&path)?;
                }
                Err(source) => return Err(SockOpsError { path, source }),
            }
        }
        Ok(())
    }

    /// Removes every sock_ops pin (the links detach).
    pub(crate) fn detach_all(&self) -> Result<(), SockOpsError> {
        for (_, path) in std::mem::take(&mut *lock(&self.pinned)) {
            remove_pin(&path)?;
        }
        Ok(())
    }
}

/// A pinned sock_ops link: its key (kind, cgroup inode), pin and descriptor.
type Pinned = ((Kind, u64), PathBuf, OwnedFd);

/// The sock_ops links pinned in the folder `links`.
fn pinned_links(links: &Path) -> Result<Vec<Pinned>, SockOpsError> {
    let entries = fs::read_dir(links).map_err(|source| SockOpsError {
        path: links.to_owned(),
        source,
    })?;
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let Some(key) = entry.file_name().to_str().and_then(parse_pin) else {
            continue;
        };
        let path = entry.path();
        let link = lacewing_sys::os::bpf_obj_get(&path).map_err(|source| SockOpsError {
            path: path.clone(),
            source,
        })?;
        out.push((key, path, link));
    }
    Ok(out)
}

fn pin_name(kind: Kind, inode: u64) -> String {
    format!("{}_{}_{inode}", names::SOCK_OPS_PROGRAM, kind.as_str())
}

/// The (kind, inode) a pin name stands for.
fn parse_pin(name: &str) -> Option<(Kind, u64)> {
    let rest = name
        .strip_prefix(names::SOCK_OPS_PROGRAM)?
        .strip_prefix('_')?;
    let (kind, inode) = rest.split_once('_')?;
    let kind = [Kind::Pod, Kind::Daemon]
        .into_iter()
        .find(|k| k.as_str() == kind)?;
    Some((kind, inode.parse().ok()?))
}

fn remove_pin(path: &Path) -> Result<(), SockOpsError> {
    match fs::remove_file(path) {
        Err(err) if err.kind() != io::ErrorKind::NotFound => Err(SockOpsError {
            path: path.to_owned(),
            source: err,
        }),
        _ => Ok(()),
    }
}

/// This daemon's own cgroup: `--daemon-cgroup`, else the pod-level cgroup
/// of `POD_UID` below `cgroup_root` (in a container with its own cgroup
/// namespace, `/proc/self/cgroup` reads `/`), else `/proc/self/cgroup`
/// read against the cgroup v2 mount.
pub fn own_cgroup(
    cgroup_root: &Path,
    flag: Option<&Path>,
    pod_uid: Option<&str>,
) -> io::Result<PathBuf> {
    use lacewing_sys::cgroup;
    if let Some(path) = flag {
        return Ok(path.to_owned());
    }
    if let Some(uid) = pod_uid.filter(|u| !u.is_empty()) {
        return cgroup::find_pod(cgroup_root, uid)?.ok_or_else(|| {
            io::Error::other(format!(
                "no cgroup of this daemon's pod (POD_UID {uid}) below {}; pass --daemon-cgroup",
                cgroup_root.display()
            ))
        });
    }
    let mount = cgroup::cgroup2_mount()?
        .ok_or_else(|| io::Error::other("no cgroup v2 filesystem is mounted"))?;
    cgroup::own(&mount)?.ok_or_else(|| {
        io::Error::other(
            "this daemon's cgroup cannot be read in its cgroup namespace; set POD_UID (the chart does) or pass --daemon-cgroup",
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_names_round_trip_and_other_links_are_not_ours() {
        // bpffs refuses names with a dot (EPERM: reserved).
        assert_eq!(pin_name(Kind::Pod, 4242), "lw_sockops_pod_4242");
        assert_eq!(parse_pin("lw_sockops_pod_4242"), Some((Kind::Pod, 4242)));
        assert_eq!(
            parse_pin(&pin_name(Kind::Daemon, 7)),
            Some((Kind::Daemon, 7))
        );
        // The root link of a daemon before per-cgroup links, and others.
        assert_eq!(parse_pin("lw_sockops"), None);
        assert_eq!(parse_pin("lw_connect4"), None);
        assert_eq!(parse_pin("lw_sockops_pod_x"), None);
    }
}
