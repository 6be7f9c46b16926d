//! Finding and removing lab resources by their prefix: the one teardown path,
//! used by `Lab`'s drop, by `lacewing lab down`, and by the stale-lab sweep.

use std::{
    collections::BTreeSet,
    fs, io,
    path::{Path, PathBuf},
};

use super::{netns, state, topology::LabId};
use lacewing_sys::bpffs;
use lacewing_sys::cgroup;

/// Every lab id that still has any resource on this machine: a namespace, a
/// cgroup, a bpffs folder or a record.
pub fn all_ids() -> io::Result<BTreeSet<LabId>> {
    let mut ids: BTreeSet<LabId> = netns::list_all()?
        .iter()
        .filter_map(|n| LabId::from_resource_name(n))
        .collect();
    let mut dirs = vec![
        PathBuf::from(state::STATE_ROOT),
        PathBuf::from(bpffs::MOUNT_POINT),
    ];
    dirs.extend(cgroup::cgroup2_mount()?);
    for dir in dirs {
        ids.extend(
            names_in(&dir)?
                .iter()
                .filter_map(|n| LabId::from_resource_name(n)),
        );
    }
    Ok(ids)
}

/// Where lab `id`'s cgroup lives under the cgroup v2 mount.
pub fn cgroup_dir(cgroup2: &Path, id: LabId) -> PathBuf {
    cgroup2.join(id.prefix())
}

/// Where lab `id` pins BPF objects.
pub fn bpffs_dir(id: LabId) -> PathBuf {
    Path::new(bpffs::MOUNT_POINT).join(id.prefix())
}

/// The steps of a teardown that failed (the others were done).
#[derive(Debug, thiserror::Error)]
#[error("removing lab {lab}: {}; run `lacewing lab down --all` again, or remove what is named by hand", steps.join("; "))]
pub struct TeardownError {
    pub lab: String,
    pub steps: Vec<String>,
}

/// Removes everything lab `id` has: its processes (killed by the pids in its
/// cgroups), cgroups, pins, namespaces and record. Idempotent, and it goes on
/// past a failing step so one error does not leave the rest behind; the errors
/// are returned together.
pub fn teardown(id: LabId) -> Result<(), TeardownError> {
    let mut errors = Vec::new();
    match cgroup::cgroup2_mount() {
        Ok(Some(cg2)) => {
            if let Err(err) = cgroup::remove_tree(&cgroup_dir(&cg2, id)) {
                errors.push(format!("cgroups: {err}"));
            }
        }
        Ok(None) => {}
        Err(err) => errors.push(format!("finding cgroup v2: {err}")),
    }
    if let Err(err) = remove_dir_all_if_exists(&bpffs_dir(id)) {
        errors.push(format!("bpffs pins in {}: {err}", bpffs_dir(id).display()));
    }
    match netns::list(id) {
        Ok(names) => {
            if let Err(err) = netns::delete(&names) {
                errors.push(format!("network namespaces: {err}"));
            }
        }
        Err(err) => errors.push(format!("listing network namespaces: {err}")),
    }
    if let Err(err) = remove_dir_all_if_exists(&state::dir(id)) {
        errors.push(format!("record {}: {err}", state::dir(id).display()));
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(TeardownError {
            lab: id.prefix(),
            steps: errors,
        })
    }
}

/// Removes labs whose owning process is gone (a test killed mid-run), and
/// leftovers with no record at all. Labs left up on purpose (no owner) and labs
/// of live processes are kept. Returns the ids removed.
pub fn stale() -> io::Result<Vec<LabId>> {
    let mut removed = Vec::new();
    for id in all_ids()? {
        let orphan = match state::read(id) {
            Ok(record) => record
                .owner_pid
                .is_some_and(|pid| !lacewing_sys::os::process_exists(pid)),
            // A lab writes its record before anything else, so resources with
            // no record are what a crashed teardown left.
            Err(err) if err.kind() == io::ErrorKind::NotFound => true,
            Err(_) => false,
        };
        if orphan && teardown(id).is_ok() {
            removed.push(id);
        }
    }
    Ok(removed)
}

/// What of lab `id` is still on the machine, one line per resource; empty when
/// the lab is fully gone.
pub fn leftovers(id: LabId) -> io::Result<Vec<String>> {
    let mut left: Vec<String> = netns::list(id)?
        .into_iter()
        .map(|n| format!("netns {n}"))
        .collect();
    if let Some(cg2) = cgroup::cgroup2_mount()? {
        let dir = cgroup_dir(&cg2, id);
        if dir.exists() {
            left.push(format!("cgroup {}", dir.display()));
        }
    }
    for dir in [bpffs_dir(id), state::dir(id)] {
        if dir.exists() {
            left.push(format!("folder {}", dir.display()));
        }
    }
    Ok(left)
}

fn names_in(dir: &Path) -> io::Result<Vec<String>> {
    match fs::read_dir(dir) {
        Ok(entries) => entries
            .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect(),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(err) => Err(err),
    }
}

fn remove_dir_all_if_exists(dir: &Path) -> io::Result<()> {
    match fs::remove_dir_all(dir) {
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}
