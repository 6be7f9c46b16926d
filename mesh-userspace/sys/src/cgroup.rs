//! cgroup v2: finding the mount point and managing the lab's cgroup trees.
//!
//! The mount point differs between machines (`/sys/fs/cgroup` on most
//! distributions, `/sys/fs/cgroup/unified` on hybrid setups), so it is always
//! read from `/proc/self/mountinfo`, never assumed.

use std::{
    fs, io,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use crate::os;

/// Where cgroup v2 is mounted, read from `/proc/self/mountinfo`.
pub fn cgroup2_mount() -> io::Result<Option<PathBuf>> {
    Ok(find_mount(
        &fs::read_to_string("/proc/self/mountinfo")?,
        "cgroup2",
    ))
}

/// The mount point of the first filesystem of type `fstype` in a mountinfo text.
pub fn find_mount(mountinfo: &str, fstype: &str) -> Option<PathBuf> {
    mounts(mountinfo)
        .find(|(_, ty)| *ty == fstype)
        .map(|(point, _)| point)
}

/// Whether a filesystem of type `fstype` is mounted exactly at `point`.
pub fn is_mounted_at(mountinfo: &str, point: &Path, fstype: &str) -> bool {
    mounts(mountinfo).any(|(p, ty)| ty == fstype && p == point)
}

/// (mount point, filesystem type) pairs. mountinfo lines are
/// `id parent maj:min root point options [optional...] - fstype source super`.
fn mounts(mountinfo: &str) -> impl Iterator<Item = (PathBuf, &str)> {
    mountinfo.lines().filter_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let point = left.split_whitespace().nth(4)?;
        let fstype = right.split_whitespace().next()?;
        Some((PathBuf::from(unescape_octal(point)), fstype))
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_octal(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'\\' && i + 4 <= bytes.len())
            .then(|| std::str::from_utf8(&bytes[i + 1..i + 4]).ok())
            .flatten()
            .and_then(|octal| u8::from_str_radix(octal, 8).ok());
        if let Some(byte) = escaped {
            out.push(byte);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The pod UID a cgroup path names: `pod<uid>` with the UID's dashes, or
/// underscores as the systemd driver writes it
/// (`kubepods-besteffort-pod1b4e..._...slice`).
pub fn pod_uid(path: &str) -> Option<String> {
    path.split('/').find_map(|segment| {
        // `kubepods` itself contains "pod": every occurrence is tried.
        segment.match_indices("pod").find_map(|(at, _)| {
            let tail = segment.get(at + 3..at + 3 + 36)?;
            let uid = tail.replace('_', "-");
            let shaped = uid.char_indices().all(|(i, c)| {
                if matches!(i, 8 | 13 | 18 | 23) {
                    c == '-'
                } else {
                    c.is_ascii_hexdigit()
                }
            });
            shaped.then_some(uid)
        })
    })
}

/// The cgroup of the pod with UID `uid` at or below `root`: the directory
/// whose name carries `pod<uid>` (kubelet's pod-level cgroup, with either
/// cgroup driver's spelling). The search goes at most `MAX_DEPTH` levels
/// down, as deep as kubelet nests pods below the root
/// (`kubepods.slice/kubepods-burstable.slice/...pod<uid>.slice`).
pub fn find_pod(root: &Path, uid: &str) -> io::Result<Option<PathBuf>> {
    const MAX_DEPTH: usize = 4;
    let mut level = vec![root.to_path_buf()];
    for _ in 0..MAX_DEPTH {
        let mut next = Vec::new();
        for dir in level {
            let entries = match fs::read_dir(&dir) {
                Ok(entries) => entries,
                // A cgroup removed while we look.
                Err(err) if err.kind() == io::ErrorKind::NotFound => continue,
                Err(err) => return Err(err),
            };
            for entry in entries.flatten() {
                if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                let name = entry.file_name();
                if name.to_str().and_then(pod_uid).as_deref() == Some(uid) {
                    return Ok(Some(entry.path()));
                }
                next.push(entry.path());
            }
        }
        level = next;
    }
    Ok(None)
}

/// This process's own cgroup v2 directory under `mount`, from
/// `/proc/self/cgroup` (`0::/path`; `/` is the root cgroup, `mount`
/// itself). In a cgroup namespace the path is relative to the namespace's
/// root: a container's own cgroup reads `/` there, which only the caller
/// can tell apart (by knowing it runs in a pod); a path above the
/// namespace's root (`/../..`) is `None`.
pub fn own(mount: &Path) -> io::Result<Option<PathBuf>> {
    let text = fs::read_to_string("/proc/self/cgroup")?;
    Ok(own_in(&text, mount))
}

fn own_in(proc_self_cgroup: &str, mount: &Path) -> Option<PathBuf> {
    let path = proc_self_cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))?
        .trim();
    if path.starts_with("/..") || !path.starts_with('/') {
        return None;
    }
    Some(mount.join(path.trim_start_matches('/')))
}

/// Every process id in `dir` and the cgroups below it.
pub fn pids_below(dir: &Path) -> io::Result<Vec<u32>> {
    let mut pids = Vec::new();
    for cgroup in subtree(dir)? {
        let procs = match fs::read_to_string(cgroup.join("cgroup.procs")) {
            Ok(procs) => procs,
            Err(err) if err.kind() == io::ErrorKind::NotFound => continue,
            Err(err) => return Err(err),
        };
        pids.extend(procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
    }
    Ok(pids)
}

/// Kills every process in the cgroup tree at `dir` (processes the lab started:
/// nothing else is ever placed in a lab cgroup), waits until the tree is empty,
/// then removes it bottom-up. A missing tree is not an error.
pub fn remove_tree(dir: &Path) -> io::Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let pids = pids_below(dir)?;
        if pids.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            return Err(io::Error::other(format!(
                "processes {pids:?} in {} did not exit after SIGKILL",
                dir.display()
            )));
        }
        for pid in pids {
            os::kill(pid, libc::SIGKILL)?;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut dirs = subtree(dir)?;
    // Deepest first: a cgroup can only be removed once its children are gone.
    dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
    for d in dirs {
        match fs::remove_dir(&d) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => {
                return Err(io::Error::new(
                    err.kind(),
                    format!("removing cgroup {}: {err}", d.display()),
                ));
            }
        }
    }
    Ok(())
}

/// `dir` and every directory below it (cgroupfs holds only cgroups as dirs).
fn subtree(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = match fs::read_dir(&d) {
            Ok(entries) => entries,
            Err(err) if err.kind() == io::ErrorKind::NotFound => continue,
            Err(err) => return Err(err),
        };
        for entry in entries {
            let entry = entry?;
            if entry.file_type()?.is_dir() {
                stack.push(entry.path());
            }
        }
        out.push(d);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
25 30 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
33 25 0:28 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
34 33 0:29 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw
40 25 0:35 / /sys/fs/bpf rw,nosuid,nodev,noexec,relatime shared:15 - bpf bpf rw,mode=700
41 25 0:36 / /mnt/with\\040space rw shared:16 - cgroup2 none rw
";

    #[test]
    fn finds_the_cgroup2_mount_whatever_its_path() {
        assert_eq!(
            find_mount(MOUNTINFO, "cgroup2"),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(find_mount(MOUNTINFO, "nfs"), None);
    }

    #[test]
    fn knows_bpffs_is_mounted_at_its_usual_place() {
        assert!(is_mounted_at(MOUNTINFO, Path::new("/sys/fs/bpf"), "bpf"));
        assert!(!is_mounted_at(MOUNTINFO, Path::new("/sys/fs/bpf"), "tmpfs"));
    }

    #[test]
    fn unescapes_octal_in_mount_points() {
        let points: Vec<_> = mounts(MOUNTINFO).map(|(p, _)| p).collect();
        assert!(
            points.contains(&PathBuf::from("/mnt/with space")),
            "{points:?}"
        );
    }
    #[test]
    fn pod_uids_are_read_from_both_cgroup_drivers() {
        assert_eq!(
            pod_uid("/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1b4e28ba_2fa1_11d2_883f_0016d3cca427.slice/cri-containerd-abc.scope").as_deref(),
            Some("1b4e28ba-2fa1-11d2-883f-0016d3cca427")
        );
        assert_eq!(
            pod_uid("/kubepods/burstable/pod1b4e28ba-2fa1-11d2-883f-0016d3cca427/0123abcd")
                .as_deref(),
            Some("1b4e28ba-2fa1-11d2-883f-0016d3cca427")
        );
        assert_eq!(pod_uid("/system.slice/podman.service"), None);
        assert_eq!(pod_uid("/user.slice/pod-short"), None);
    }

    #[test]
    fn finds_a_pods_cgroup_by_uid_below_the_root() {
        let root = std::env::temp_dir().join(format!("lw-cgroup-find-{}", std::process::id()));
        let uid = "1b4e28ba-2fa1-11d2-883f-0016d3cca427";
        let pod = root.join(
            "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1b4e28ba_2fa1_11d2_883f_0016d3cca427.slice",
        );
        fs::create_dir_all(pod.join("cri-containerd-abc.scope")).unwrap();
        fs::create_dir_all(root.join("system.slice/other.service")).unwrap();
        assert_eq!(find_pod(&root, uid).unwrap(), Some(pod));
        assert_eq!(
            find_pod(&root, "00000000-0000-0000-0000-000000000000").unwrap(),
            None
        );
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn own_cgroup_is_read_from_the_unified_line_and_none_in_a_namespace() {
        let mount = Path::new("/sys/fs/cgroup");
        assert_eq!(
            own_in("0::/lw-0a1b2c/n0/lacewing-node\n", mount),
            Some(PathBuf::from("/sys/fs/cgroup/lw-0a1b2c/n0/lacewing-node"))
        );
        assert_eq!(own_in("0::/\n", mount), Some(mount.to_path_buf()));
        assert_eq!(own_in("0::/../../kubepods.slice\n", mount), None);
    }
}
