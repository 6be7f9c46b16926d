//! Loading the embedded eBPF object, pinning its maps and links, attaching the
//! programs at the node's cgroup (sock_ops at the daemon's own and, through
//! capture, each captured pod's: [`crate::sockops`]), and detaching them
//! again.
//!
//! Pins: `<bpffs-root>/maps/<MAP>` (`<MAP>_v<N>` past a map's first layout
//! version) and `<bpffs-root>/links/<program>` (`lw_sockops_<kind>_<inode>`
//! for sock_ops). Maps are pinned by path
//! through the loader, so a restarted or upgraded daemon reuses the maps of
//! the one before it instead of starting empty, and its programs replace the
//! running ones inside their links (`BPF_LINK_UPDATE`): no connect runs with
//! no program, or with two.
//!
//! When a map's layout version changed, the new map is built beside the old
//! one and the links are switched only once the daemon filled it
//! ([`Datapath::switch_over`]); then the old pins are removed.

use std::{
    fs::{self, File},
    io,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
    sync::Arc,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::SockHash,
    programs::{
        CgroupAttachMode, CgroupSockAddr, SkMsg, SockOps,
        links::{FdLink, LinkError, PinnedLink},
        sk_msg::SkMsgLink,
    },
};
use mesh_common::names;

use super::{
    config::NodeConfig,
    maps,
    sockops::{Kind, SockOpsLinks},
};
use lacewing_sys::bpffs;

/// The kernel object built from `mesh-ebpf` by build.rs.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lacewing"));

/// What went wrong while loading or unloading, with what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{0}")]
    Bpffs(#[from] bpffs::BpffsError),
    #[error("preparing pin folder {path}: {source}")]
    PinDir { path: PathBuf, source: io::Error },
    #[error(
        "loading the eBPF object: {0} (is the kernel built with BPF and BTF, and are we root?)"
    )]
    Load(#[from] aya::EbpfError),
    #[error("the eBPF object has no program `{0}`: rebuild lacewing-node")]
    MissingProgram(&'static str),
    #[error("the eBPF object has no map `{0}`: rebuild lacewing-node")]
    MissingMap(&'static str),
    #[error("program `{name}`: {source}")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("program `{name}`: {source}")]
    Link {
        name: &'static str,
        source: LinkError,
    },
    #[error("opening cgroup {path}: {source}")]
    Cgroup { path: PathBuf, source: io::Error },
    #[error("pinning link of `{name}` at {path}: {source}")]
    PinLink {
        name: &'static str,
        path: PathBuf,
        source: aya::pin::PinError,
    },
    #[error("map `{name}`: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("removing pins under {path}: {source}")]
    Unpin { path: PathBuf, source: io::Error },
    #[error("replacing the program of link {path}: {source}")]
    Update { path: PathBuf, source: io::Error },
    #[error("{0}")]
    SockOps(#[from] crate::sockops::SockOpsError),
}

/// The loaded and attached programs. Hold it for as long as the node runs.
#[derive(Debug)]
pub struct Datapath {
    /// The pinned links keep the programs attached; the object itself (its
    /// parsed BTF and instructions) is let go once they are.
    links: Vec<PinnedLink>,
    /// sk_msg is attached to the `LW_SPLICE` map, not through a link; the
    /// attachment lives as long as the (pinned) map unless detached.
    splice: SkMsgLink,
    root: PathBuf,
    /// Across a layout change: the links to switch to our programs once our
    /// new maps are filled, and the old maps' pins to remove then.
    switch: Option<Switch>,
    /// sock_ops, one link per cgroup the mesh serves.
    sock_ops: Arc<SockOpsLinks>,
    /// A predecessor's sock_ops link at the node's root, until capture
    /// attached the pods' own.
    legacy_sock_ops: Option<PinnedLink>,
}

/// Links still running the previous layout's programs, each with ours.
#[derive(Debug)]
struct Switch {
    links: Vec<(PathBuf, std::os::fd::OwnedFd, std::os::fd::OwnedFd)>,
    old_pins: Vec<PathBuf>,
}

/// Where links are pinned below a bpffs root.
pub fn links_dir(root: &Path) -> PathBuf {
    root.join("links")
}

/// Loads the object with its maps taken from (or pinned at) `root`: the
/// Loads program `$name` (of aya type `$kind`) into the kernel; the
/// program. A macro: aya's program types share these methods but no trait.
macro_rules! load_program {
    ($ebpf:expr, $kind:ty, $name:expr) => {{
        let name: &'static str = $name;
        let program: &mut $kind = $ebpf
            .program_mut(name)
            .ok_or(LoadError::MissingProgram(name))?
            .try_into()
            .map_err(|source| LoadError::Program { name, source })?;
        program
            .load()
            .map_err(|source| LoadError::Program { name, source })?;
        program
    }};
}

/// Loads cgroup program `$name` (of aya type `$kind`). Where a link of
/// that name is pinned already (a running or killed daemon's), our program
/// replaces its program in it, now or, with `$switch`, at the switch-over;
/// else the program is attached at `$cgroup` with a new link, pinned. The
/// pinned link. A macro: the cgroup program types share these methods but
/// no trait.
macro_rules! attach_cgroup {
    ($ebpf:expr, $kind:ty, $name:expr, $cgroup:expr, $root:expr, $switch:expr) => {{
        let name: &'static str = $name;
        let program = load_program!($ebpf, $kind, name);
        let path = links_dir($root).join(name);
        match adopt_link(&path, name, program.fd(), $switch)? {
            Some(pinned) => pinned,
            None => {
                // With BPF links the kernel always attaches in multi mode (other
                // tools' programs at the same cgroup keep working) and rejects any
                // explicit attach flag, so the mode here must be `Single` (flags 0).
                let link_id = program
                    .attach($cgroup, CgroupAttachMode::Single)
                    .map_err(|source| LoadError::Program { name, source })?;
                let link: FdLink = program
                    .take_link(link_id)
                    .map_err(|source| LoadError::Program { name, source })?
                    .try_into()
                    .map_err(|source| LoadError::Link { name, source })?;
                pin_link(link, name, $root)?
            }
        }
    }};
}

/// The link pinned at `path`, now running `program` (or, with `switch`,
/// to run it at the switch-over); `None` if no link is pinned there.
fn adopt_link(
    path: &Path,
    name: &'static str,
    program: Result<&aya::programs::ProgramFd, aya::programs::ProgramError>,
    switch: Option<&mut Switch>,
) -> Result<Option<PinnedLink>, LoadError> {
    let link = match lacewing_sys::os::bpf_obj_get(path) {
        Ok(fd) => fd,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(LoadError::Update {
                path: path.to_owned(),
                source,
            });
        }
    };
    let program = program.map_err(|source| LoadError::Program { name, source })?;
    adopt_pinned(path, link, program.as_fd(), switch)?;
    PinnedLink::from_pin(path)
        .map(Some)
        .map_err(|source| LoadError::Link { name, source })
}

/// Runs `program` in the pinned `link` (at `path`) now, or with `switch`
/// at the switch-over.
fn adopt_pinned(
    path: &Path,
    link: std::os::fd::OwnedFd,
    program: std::os::fd::BorrowedFd<'_>,
    switch: Option<&mut Switch>,
) -> Result<(), LoadError> {
    let update_err = |source| LoadError::Update {
        path: path.to_owned(),
        source,
    };
    match switch {
        Some(switch) => {
            let program = program.try_clone_to_owned().map_err(update_err)?;
            switch.links.push((path.to_owned(), link, program));
        }
        None => {
            lacewing_sys::os::bpf_link_update(link.as_fd(), program).map_err(update_err)?;
        }
    }
    Ok(())
}

/// programs are not loaded into the kernel until asked.
fn load_object(root: &Path) -> Result<Ebpf, LoadError> {
    let pin_paths: Vec<(&str, PathBuf)> = names::ALL_MAPS
        .iter()
        .map(|&name| (name, maps::pin_path(root, name)))
        .collect();
    let mut loader = EbpfLoader::new();
    for (name, path) in &pin_paths {
        loader.map_pin_path(name, path.as_path());
    }
    Ok(loader.load(EBPF_OBJECT)?)
}

/// The sk_lookup program, loaded on the pinned maps of `root` (the node's
/// datapath must be loaded), to attach to meshed pods' namespaces.
pub fn load_sk_lookup(root: &Path) -> Result<Ebpf, LoadError> {
    let mut ebpf = load_object(root)?;
    load_program!(ebpf, aya::programs::SkLookup, names::SK_LOOKUP_PROGRAM);
    Ok(ebpf)
}

/// Loads the sk_msg program and attaches it to `LW_SPLICE` (replacing the
/// one a kept datapath left there).
fn attach_sk_msg(ebpf: &mut Ebpf) -> Result<SkMsgLink, LoadError> {
    let map_err = |source| LoadError::Map {
        name: names::MAP_SPLICE,
        source,
    };
    let map = ebpf
        .map(names::MAP_SPLICE)
        .ok_or(LoadError::MissingMap(names::MAP_SPLICE))?;
    let sockets: SockHash<_, mesh_common::splice::SpliceKey> =
        SockHash::try_from(map).map_err(map_err)?;
    let fd = sockets
        .fd()
        .try_clone()
        .map_err(|e| map_err(aya::maps::MapError::from(e)))?;
    let name = names::SK_MSG_PROGRAM;
    let program = load_program!(ebpf, SkMsg, name);
    let id = program
        .attach(&fd)
        .map_err(|source| LoadError::Program { name, source })?;
    program
        .take_link(id)
        .map_err(|source| LoadError::Program { name, source })
}

/// Pins `link` as `links/<name>`. A pin left by a daemon that was killed is
/// replaced, which detaches that older link only after ours is attached.
fn pin_link(link: FdLink, name: &'static str, root: &Path) -> Result<PinnedLink, LoadError> {
    let path = links_dir(root).join(name);
    remove_if_exists(&path).map_err(|source| LoadError::Unpin {
        path: path.clone(),
        source,
    })?;
    link.pin(&path).map_err(|source| LoadError::PinLink {
        name,
        path: path.clone(),
        source,
    })
}

impl Datapath {
    pub fn load_and_attach(config: &NodeConfig) -> Result<Self, LoadError> {
        bpffs::ensure_mounted()?;
        let root = config.bpffs_root.clone();
        for dir in [maps::maps_dir(&root), links_dir(&root)] {
            fs::create_dir_all(&dir).map_err(|source| LoadError::PinDir {
                path: dir.clone(),
                source,
            })?;
        }
        let mut ebpf = load_object(&root)?;

        let cgroup = File::open(&config.cgroup_root).map_err(|source| LoadError::Cgroup {
            path: config.cgroup_root.clone(),
            source,
        })?;
        // Maps of another layout version: the programs attached now use
        // them until ours are filled.
        let old_pins = maps::other_layouts(&root);
        let mut switch = (!old_pins.is_empty()).then(|| Switch {
            links: Vec::new(),
            old_pins,
        });
        let mut links = Vec::new();
        for &names::SockAddrProgram { name, .. } in names::SOCK_ADDR_PROGRAMS {
            links.push(attach_cgroup!(
                ebpf,
                CgroupSockAddr,
                name,
                &cgroup,
                &root,
                switch.as_mut()
            ));
        }
        // sock_ops: at the daemon's cgroup here, at each captured pod's by
        // capture (see `sockops`). A predecessor's link at the node's root
        // (before per-cgroup links) keeps running, with our program, until
        // capture has attached the pods' links: `retire_root_sock_ops`.
        let name = names::SOCK_OPS_PROGRAM;
        let program = load_program!(ebpf, SockOps, name);
        let program_fd = program
            .fd()
            .map_err(|source| LoadError::Program { name, source })?
            .as_fd()
            .try_clone_to_owned()
            .map_err(|source| crate::sockops::SockOpsError {
                path: links_dir(&root),
                source,
            })?;
        let legacy_sock_ops = adopt_link(
            &links_dir(&root).join(name),
            name,
            program.fd(),
            switch.as_mut(),
        )?;
        let (sock_ops, adopted) = SockOpsLinks::adopt(program_fd, links_dir(&root))?;
        for (path, link) in adopted {
            adopt_pinned(&path, link, sock_ops.program(), switch.as_mut())?;
        }
        let daemon_cgroup = crate::sockops::own_cgroup(
            &config.cgroup_root,
            config.daemon_cgroup.as_deref(),
            config.pod_uid.as_deref(),
        )
        .map_err(|source| LoadError::Cgroup {
            path: config.cgroup_root.clone(),
            source,
        })?;
        sock_ops.attach(Kind::Daemon, &daemon_cgroup)?;
        // The sk_msg program is replaced at attach, not at the switch-over:
        // the senders an older layout's program switched off stay off.
        let carry = |switch: Option<&Switch>| -> Result<usize, LoadError> {
            let Some(switch) = switch else { return Ok(0) };
            maps::carry_splice_off(&root, &switch.old_pins).map_err(|source| LoadError::Map {
                name: names::MAP_SPLICE_OFF,
                source,
            })
        };
        carry(switch.as_ref())?;
        let splice = attach_sk_msg(&mut ebpf)?;
        let carried = carry(switch.as_ref())?;
        tracing::debug!(cgroup = %config.cgroup_root.display(), daemon_cgroup = %daemon_cgroup.display(), programs = links.len() + 2, switch = switch.is_some(), carried, "attached");
        Ok(Self {
            links,
            splice,
            root,
            switch,
            sock_ops: Arc::new(sock_ops),
            legacy_sock_ops,
        })
    }

    /// The sock_ops links, for capture to attach each pod's.
    pub fn sock_ops(&self) -> Arc<SockOpsLinks> {
        Arc::clone(&self.sock_ops)
    }

    /// Whether a predecessor's sock_ops link at the node's root runs.
    pub fn has_root_sock_ops(&self) -> bool {
        self.legacy_sock_ops.is_some()
    }

    /// Detaches a predecessor's sock_ops link at the node's root, once
    /// capture attached the pods' links (until then it serves them).
    pub fn retire_root_sock_ops(&mut self) -> Result<(), LoadError> {
        if let Some(link) = self.legacy_sock_ops.take() {
            let link = link.unpin().map_err(|source| LoadError::Unpin {
                path: links_dir(&self.root),
                source,
            })?;
            drop(link);
            tracing::info!("sock_ops runs only at the daemon's and the captured pods' cgroups now");
        }
        Ok(())
    }

    /// Whether maps of another layout are in use until [`Self::switch_over`].
    pub fn switch_pending(&self) -> bool {
        self.switch.is_some()
    }

    /// Across a layout change, once this daemon filled its new maps: every
    /// link runs our programs (on our maps) from now on, and the old maps'
    /// pins are removed (the old programs' last users let them go). How
    /// many links were switched.
    pub fn switch_over(&mut self) -> Result<usize, LoadError> {
        // Pods the daemon we took over from captured while we prepared got
        // links with its program: ours from now on.
        self.sock_ops.update_all()?;
        let Some(switch) = self.switch.take() else {
            return Ok(0);
        };
        for (path, link, program) in &switch.links {
            match lacewing_sys::os::bpf_link_update(link.as_fd(), program.as_fd()) {
                Ok(()) => {}
                // A pod's cgroup released meanwhile: its link is detached
                // and runs nothing any more (its pin is gone with capture).
                Err(err) if err.raw_os_error() == Some(libc::ENOLINK) => {
                    tracing::debug!(link = %path.display(), "link detached meanwhile");
                }
                Err(source) => {
                    return Err(LoadError::Update {
                        path: path.clone(),
                        source,
                    });
                }
            }
        }
        for path in &switch.old_pins {
            remove_if_exists(path).map_err(|source| LoadError::Unpin {
                path: path.clone(),
                source,
            })?;
        }
        tracing::info!(
            links = switch.links.len(),
            old_maps = switch.old_pins.len(),
            "switched the programs over to this layout's maps; the old maps' pins are removed"
        );
        Ok(switch.links.len())
    }

    /// Exits leaving programs attached and maps pinned: the kernel keeps
    /// balancing until the next daemon replaces the pins.
    pub fn keep(self) {
        // Not detached on drop: the map keeps the program attached.
        std::mem::forget(self.splice);
        for link in self.links.into_iter().chain(self.legacy_sock_ops) {
            // Dropping a pinned link closes our descriptor; the pin keeps it.
            drop(FdLink::from(link));
        }
    }

    /// Detaches every program and removes every pin this daemon made.
    pub fn detach(self) -> Result<(), LoadError> {
        let Self {
            links,
            splice,
            root,
            switch: _,
            sock_ops,
            legacy_sock_ops,
        } = self;
        drop(splice);
        sock_ops.detach_all()?;
        for link in links.into_iter().chain(legacy_sock_ops) {
            // Unpinning returns the last reference; dropping it detaches.
            let link = link.unpin().map_err(|source| LoadError::Unpin {
                path: links_dir(&root),
                source,
            })?;
            drop(link);
        }
        for name in names::ALL_MAPS {
            let path = maps::pin_path(&root, name);
            remove_if_exists(&path).map_err(|source| LoadError::Unpin { path, source })?;
        }
        for dir in [maps::maps_dir(&root), links_dir(&root), root.clone()] {
            match fs::remove_dir(&dir) {
                Ok(()) => {}
                Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                // Someone else's pins in the same root: leave them and the folder.
                Err(err) if err.raw_os_error() == Some(libc::ENOTEMPTY) => {}
                Err(source) => return Err(LoadError::Unpin { path: dir, source }),
            }
        }
        tracing::info!(root = %root.display(), "detached; pins removed");
        Ok(())
    }
}

fn remove_if_exists(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    /// Every name userspace looks up is in the compiled object, so a rename on
    /// one side fails here instead of at load time on a node.
    #[test]
    fn embedded_object_has_every_named_program_and_map() {
        let obj = aya_obj_names(super::EBPF_OBJECT);
        let programs = mesh_common::names::SOCK_ADDR_PROGRAMS
            .iter()
            .map(|p| &p.name);
        for (name, _) in mesh_common::names::MAP_LAYOUTS {
            assert!(
                mesh_common::names::ALL_MAPS.contains(name),
                "{name} has a layout version but is no map"
            );
        }
        for name in mesh_common::names::ALL_MAPS {
            assert!(
                mesh_common::names::MAP_LAYOUTS
                    .iter()
                    .any(|(n, _)| n == name),
                "map {name} has no layout version in MAP_LAYOUTS"
            );
        }
        for name in programs.chain(mesh_common::names::ALL_MAPS) {
            assert!(
                obj.iter().any(|n| n == name),
                "object lacks `{name}`; it has {obj:?}"
            );
        }
    }

    /// Symbol names in the ELF, read with a tiny parser to avoid loading (which
    /// needs root) in a unit test.
    fn aya_obj_names(elf: &[u8]) -> Vec<String> {
        // Symbols are NUL-terminated strings in .strtab; listing every printable
        // run is enough to check presence.
        elf.split(|&b| b == 0)
            .filter(|s| !s.is_empty() && s.iter().all(|b| b.is_ascii_graphic()))
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect()
    }
}
