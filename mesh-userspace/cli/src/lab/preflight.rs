//! What the lab needs from the machine, checked before anything is created.

use std::path::{Path, PathBuf};

use lacewing_sys::bpffs;
use lacewing_sys::cgroup;
use lacewing_sys::os;

/// The machine facts a lab is built on.
#[derive(Debug)]
pub struct Host {
    /// Where cgroup v2 is mounted.
    pub cgroup2: PathBuf,
}

/// Checks everything at once and lists every missing piece with what to do,
/// so one run tells the user all there is to fix.
pub fn check() -> Result<Host, Vec<String>> {
    let mut missing = Vec::new();
    if !os::is_root() {
        missing.push(
            "root: the lab creates network namespaces, cgroups and BPF programs; run it as root (sudo)"
                .to_owned(),
        );
        // Without root the other probes fail for that reason alone.
        return Err(missing);
    }
    let cgroup2 = match cgroup::cgroup2_mount() {
        Ok(Some(path)) => Some(path),
        Ok(None) => {
            missing.push(
                "cgroup v2: no cgroup2 filesystem is mounted; mount one (`mount -t cgroup2 none /sys/fs/cgroup`)"
                    .to_owned(),
            );
            None
        }
        Err(err) => {
            missing.push(format!(
                "cgroup v2: reading /proc/self/mountinfo failed: {err}"
            ));
            None
        }
    };
    if let Err(err) = bpffs::ensure_mounted() {
        missing.push(format!("bpffs: {err}"));
    }
    if let Err(err) = os::probe_bpf_syscall() {
        missing.push(format!(
            "the bpf() system call: creating a test map failed ({err}); the kernel needs CONFIG_BPF_SYSCALL and the process CAP_BPF"
        ));
    }
    if !std::path::Path::new("/proc/self/ns/net").exists() {
        missing.push("network namespaces: /proc/self/ns/net is missing (CONFIG_NET_NS)".to_owned());
    }
    if which("ip").is_none() {
        missing.push(
            "iproute2: the `ip` command is not installed; run `cargo xtask setup`".to_owned(),
        );
    }
    for plugin in ["ptp", "host-local", "loopback"] {
        if !Path::new(super::cni::REFERENCE_PLUGINS)
            .join(plugin)
            .is_file()
        {
            missing.push(format!(
                "the CNI reference plugins: no {}/{plugin}; run `cargo xtask setup` (Debian's containernetworking-plugins)",
                super::cni::REFERENCE_PLUGINS
            ));
        }
    }
    match (cgroup2, missing.is_empty()) {
        (Some(cgroup2), true) => Ok(Host { cgroup2 }),
        _ => Err(missing),
    }
}

/// The full path of `tool` on `PATH`.
pub fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(tool))
        .find(|candidate| candidate.is_file())
}
