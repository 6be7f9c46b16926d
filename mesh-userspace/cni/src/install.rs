//! The install step the chart runs beside the node daemon: the plugin's
//! binary into the host's CNI bin folder, its entry at the end of the
//! primary configuration, kept there while the primary CNI rewrites its
//! file, and both taken out when the last installer on the node stops.
//!
//! "Last" matters because a rolling upgrade starts the new pod before the
//! old one stops: each installer registers itself (a file named by its pid
//! in a folder beside the daemon's socket) and only the one that finds no
//! other live registration removes the plugin. An entry left without its
//! binary would fail every pod on the node, so the two go together.

use std::{
    fs,
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use serde_json::{Value, json};

use crate::conflist::{self, ConflistError, Ensured, PLUGIN_TYPE};

/// How often the configuration folder is looked at.
const LOOK_EVERY: Duration = Duration::from_secs(1);

/// Where the install step puts things.
#[derive(Debug, Clone)]
pub struct Options {
    /// The host's CNI bin folder (`/opt/cni/bin` on most distributions).
    pub bin_dir: PathBuf,
    /// The host's CNI configuration folder (`/etc/cni/net.d`).
    pub conf_dir: PathBuf,
    /// The daemon's hand-over socket, written into the entry.
    pub socket: PathBuf,
    /// The plugin's log file, written into the entry.
    pub log_file: PathBuf,
}

impl Options {
    /// The entry chained after the primary plugin.
    pub fn entry(&self) -> Value {
        json!({
            "type": PLUGIN_TYPE,
            "socket": self.socket,
            "logFile": self.log_file,
        })
    }

    /// Where installers register (beside the socket, on the host's run folder).
    fn registry(&self) -> PathBuf {
        self.socket.with_file_name("cni-installers")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Conflist(#[from] ConflistError),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> InstallError + '_ {
    move |source| InstallError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Copies `source` (this executable) to the bin folder, whole: a runtime
/// starting the plugin meanwhile runs the old binary or the new one.
pub fn install_binary(source: &Path, bin_dir: &Path) -> Result<PathBuf, InstallError> {
    use std::os::unix::fs::PermissionsExt as _;
    fs::create_dir_all(bin_dir).map_err(io(bin_dir))?;
    let target = bin_dir.join(PLUGIN_TYPE);
    let tmp = bin_dir.join(format!(".{PLUGIN_TYPE}.{}.tmp", std::process::id()));
    fs::copy(source, &tmp).map_err(io(&tmp))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755)).map_err(io(&tmp))?;
    fs::rename(&tmp, &target).map_err(io(&target))?;
    Ok(target)
}

/// Takes the entry out of the configuration and the binary out of the bin
/// folder. Returns whether the configuration had our entry.
pub fn uninstall(opts: &Options) -> Result<bool, InstallError> {
    // The entry first: a runtime never meets an entry without its binary.
    let had = conflist::restore(&opts.conf_dir)?;
    let bin = opts.bin_dir.join(PLUGIN_TYPE);
    match fs::remove_file(&bin) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(&bin)(e)),
    }
    Ok(had)
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// Installs, then keeps the entry in place until SIGTERM or SIGINT; then
/// removes the plugin if no other installer on the node is registered.
/// With `once`, installs and returns.
pub fn run(opts: &Options, source: &Path, once: bool) -> Result<(), InstallError> {
    install_binary(source, &opts.bin_dir)?;
    let report = |r: Result<Ensured, ConflistError>| match r {
        Ok(Ensured::Added(file)) => {
            eprintln!("lacewing-cni chained at the end of {}", file.display());
            Ok(())
        }
        Ok(Ensured::Present(_)) => Ok(()),
        // The primary CNI has not written its file yet: wait for it.
        Err(ConflistError::NoConfig(dir)) if !once => {
            eprintln!(
                "no CNI configuration in {} yet; waiting for the primary CNI",
                dir.display()
            );
            Ok(())
        }
        Err(e) => Err(e),
    };
    if once {
        return report(conflist::ensure(&opts.conf_dir, &opts.entry())).map_err(Into::into);
    }
    let me = register(&opts.registry())?;
    // SAFETY: the handler only stores to an atomic, which is
    // async-signal-safe.
    unsafe {
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
    }
    let mut waiting_reported = false;
    while !STOP.load(Ordering::SeqCst) {
        match conflist::ensure(&opts.conf_dir, &opts.entry()) {
            Err(ConflistError::NoConfig(_)) if waiting_reported => {}
            Err(ConflistError::NoConfig(dir)) => {
                waiting_reported = true;
                report(Err(ConflistError::NoConfig(dir)))?;
            }
            // A half-written or foreign file is reported and looked at
            // again: the primary CNI may be writing it now.
            Err(e) => eprintln!("{e}"),
            ok => report(ok)?,
        }
        let until = std::time::Instant::now() + LOOK_EVERY;
        while !STOP.load(Ordering::SeqCst) && std::time::Instant::now() < until {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let _ = fs::remove_file(&me);
    if others_alive(&opts.registry()) {
        eprintln!("another lacewing-cni installer runs on this node: the plugin stays");
        return Ok(());
    }
    let had = uninstall(opts)?;
    eprintln!("lacewing-cni removed (configuration restored: {had})");
    Ok(())
}

/// Registers this installer; returns its file.
fn register(dir: &Path) -> Result<PathBuf, InstallError> {
    fs::create_dir_all(dir).map_err(io(dir))?;
    let me = dir.join(std::process::id().to_string());
    fs::write(&me, b"").map_err(io(&me))?;
    Ok(me)
}

/// Whether another registered installer still runs (registrations of
/// processes that are gone, after a crash, are removed).
fn others_alive(dir: &Path) -> bool {
    let Ok(entries) = fs::read_dir(dir) else {
        return false;
    };
    let mut alive = false;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if Path::new("/proc").join(pid.to_string()).exists() {
            alive = true;
        } else {
            let _ = fs::remove_file(entry.path());
        }
    }
    alive
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_last_installer_finds_no_other() {
        let dir = std::env::temp_dir().join(format!("lacewing-cni-reg-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let me = register(&dir).unwrap();
        // A crashed installer's registration: no such process.
        fs::write(dir.join("4194303999"), b"").unwrap();
        fs::remove_file(&me).unwrap();
        assert!(!others_alive(&dir), "a dead registration does not count");
        assert!(!dir.join("4194303999").exists(), "and is cleaned up");
        // A live one (this process, registered by another installer).
        register(&dir).unwrap();
        assert!(others_alive(&dir));
        let _ = fs::remove_dir_all(&dir);
    }
}
