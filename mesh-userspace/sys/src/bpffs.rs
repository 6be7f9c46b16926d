//! The BPF filesystem, where maps and links are pinned so they outlive the
//! process that made them and stay readable by `bpftool`.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use crate::cgroup;
use crate::os;

/// Where bpffs is mounted on every Linux distribution.
pub const MOUNT_POINT: &str = "/sys/fs/bpf";

/// The node daemon's pin root by default (`/sys/fs/bpf/lacewing`).
pub fn default_root() -> PathBuf {
    Path::new(MOUNT_POINT).join("lacewing")
}

/// Errors about bpffs, each saying what to do.
#[derive(Debug, thiserror::Error)]
pub enum BpffsError {
    #[error(
        "bpffs is not mounted at {MOUNT_POINT} and mounting it failed ({0}): run as root, or `mount -t bpf bpf {MOUNT_POINT}`"
    )]
    Mount(io::Error),
    #[error("reading /proc/self/mountinfo: {0}")]
    Mountinfo(io::Error),
}

/// Mounts bpffs at [`MOUNT_POINT`] unless it is mounted already (a new machine
/// often has no bpffs until someone mounts it).
pub fn ensure_mounted() -> Result<(), BpffsError> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").map_err(BpffsError::Mountinfo)?;
    if cgroup::is_mounted_at(&mountinfo, Path::new(MOUNT_POINT), "bpf") {
        return Ok(());
    }
    fs::create_dir_all(MOUNT_POINT).map_err(BpffsError::Mount)?;
    os::mount_bpffs(Path::new(MOUNT_POINT)).map_err(BpffsError::Mount)
}
