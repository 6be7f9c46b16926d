//! The few system calls the standard library does not wrap, fenced in one place.
//!
//! Every `unsafe` block of the crate lives here, each with its `SAFETY:` note;
//! callers get safe functions with `io::Result`.
#![allow(unsafe_code)]

use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd, BorrowedFd, RawFd},
    path::Path,
    process::Command,
};

/// Whether the process runs with effective uid 0.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Sends `signal` to the process `pid`. `ESRCH` (already gone) is not an error.
pub fn kill(pid: u32, signal: i32) -> io::Result<()> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: kill takes plain integers; a pid we did not start is never passed
    // (callers read pids from the lab's own cgroups or from their own children).
    let rc = unsafe { libc::kill(pid, signal) };
    if rc == 0 {
        return Ok(());
    }
    match io::Error::last_os_error() {
        err if err.raw_os_error() == Some(libc::ESRCH) => Ok(()),
        err => Err(err),
    }
}

/// Whether a process with this pid exists.
pub fn process_exists(pid: u32) -> bool {
    Path::new("/proc").join(pid.to_string()).exists()
}

/// Makes `cmd`, once spawned, join the cgroup whose `cgroup.procs` is open as
/// `cgroup_procs`, then enter the network namespace open as `netns`, before it
/// execs. Both descriptors must stay open until `spawn` returns.
pub fn enter_before_exec(cmd: &mut Command, cgroup_procs: BorrowedFd<'_>, netns: BorrowedFd<'_>) {
    use std::os::unix::process::CommandExt as _;
    let cgroup_procs: RawFd = cgroup_procs.as_raw_fd();
    let netns: RawFd = netns.as_raw_fd();
    // SAFETY: the closure runs in the forked child before exec and only makes
    // async-signal-safe system calls (write, setns) on descriptors the parent
    // keeps open across the spawn; it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            // Writing "0" to cgroup.procs moves the writing process itself.
            if libc::write(cgroup_procs, b"0".as_ptr().cast(), 1) != 1 {
                return Err(io::Error::last_os_error());
            }
            if libc::setns(netns, libc::CLONE_NEWNET) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Mounts a bpffs at `target`.
pub fn mount_bpffs(target: &Path) -> io::Result<()> {
    let target = path_cstring(target)?;
    let fstype = c"bpf";
    // SAFETY: all pointers are valid NUL-terminated strings that outlive the call;
    // no data argument is passed.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Checks that the `bpf()` system call works by creating (and closing) a
/// one-entry array map, the smallest thing every kernel with BPF can do.
pub fn probe_bpf_syscall() -> io::Result<()> {
    // Layout of the BPF_MAP_CREATE part of `union bpf_attr` (first four u32s).
    #[repr(C)]
    struct MapCreateAttr {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        rest: [u8; 112],
    }
    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_MAP_TYPE_ARRAY: u32 = 2;
    let attr = MapCreateAttr {
        map_type: BPF_MAP_TYPE_ARRAY,
        key_size: 4,
        value_size: 4,
        max_entries: 1,
        rest: [0; 112],
    };
    // SAFETY: attr is a valid, zero-padded bpf_attr of the size we pass.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_CREATE,
            &attr as *const MapCreateAttr,
            size_of::<MapCreateAttr>() as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just returned to us by the kernel and nothing else owns it.
    unsafe { libc::close(fd as RawFd) };
    Ok(())
}

fn path_cstring(path: &Path) -> io::Result<CString> {
    use std::os::unix::ffi::OsStrExt as _;
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

/// This machine's (or pod's) host name, as the kernel has it.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "lacewing-controller".to_owned())
}

/// Sets `SO_MARK` on a socket (needs CAP_NET_ADMIN).
pub fn set_mark(fd: BorrowedFd<'_>, mark: u32) -> io::Result<()> {
    // SAFETY: fd is a valid open socket for the borrow's lifetime; the value
    // pointer and length describe one u32 that outlives the call.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_MARK,
            (&raw const mark).cast(),
            std::mem::size_of::<u32>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Runs `f` with the calling thread inside the network namespace `netns`
/// (an open `/run/netns/...` or `/proc/<pid>/ns/net`), then puts the thread
/// back where it was. Sockets `f` creates stay in that namespace.
///
/// No thread is started: `setns` moves only the calling thread, and it is
/// moved back before this returns, so the daemon's one runtime thread pays
/// two system calls per pass-through connection instead of a thread spawn
/// and a blocking join. `f` must not await or block (it is a plain closure).
pub fn in_netns<T>(netns: BorrowedFd<'_>, f: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
    thread_local! {
        // This thread's own namespace, to come back to: opened once per
        // thread (every call leaves the thread where it found it), not on
        // every pass-through connection.
        static HOME: io::Result<std::fs::File> = std::fs::File::open("/proc/thread-self/ns/net");
    }
    let home = HOME.with(|home| match home {
        Ok(file) => Ok(file.as_raw_fd()),
        Err(err) => Err(io::Error::new(err.kind(), err.to_string())),
    })?;
    // SAFETY: netns is an open namespace file for the borrow's lifetime;
    // setns changes only the calling thread.
    if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let result = f();
    // SAFETY: home is this thread's namespace file, open for the thread's life.
    if unsafe { libc::setns(home, libc::CLONE_NEWNET) } != 0 {
        // Going on in a pod's namespace would open every later socket of
        // this thread there: nothing safe is left to do.
        let err = io::Error::last_os_error();
        panic!("cannot return to the daemon's network namespace: {err}");
    }
    result
}

/// The network namespace cookie of a socket (`SO_NETNS_COOKIE`), the same
/// number `bpf_get_netns_cookie` returns in the kernel programs.
pub fn netns_cookie(fd: BorrowedFd<'_>) -> io::Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: fd is a valid socket; cookie and len describe a u64 buffer
    // that outlives the call.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    if rc == 0 {
        Ok(cookie)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A new, unconnected TCP socket (close-on-exec) of `family`, in the
/// caller's network namespace.
pub fn tcp_socket(ipv6: bool) -> io::Result<std::os::fd::OwnedFd> {
    let domain = if ipv6 { libc::AF_INET6 } else { libc::AF_INET };
    // SAFETY: plain socket creation; the fd is owned below.
    let fd = unsafe { libc::socket(domain, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just created and is owned by nobody else.
    Ok(unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) })
}

/// A netlink socket (close-on-exec) of `protocol` (`NETLINK_SOCK_DIAG`...),
/// bound to the caller's network namespace for its whole life.
pub fn netlink_socket(protocol: i32) -> io::Result<std::os::fd::OwnedFd> {
    // SAFETY: plain socket creation; the fd is owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            protocol,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just created and is owned by nobody else.
    Ok(unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) })
}

/// Every address of this network namespace's interfaces (`ip -j addr`).
pub fn local_addresses() -> io::Result<Vec<std::net::IpAddr>> {
    let out = Command::new("ip").args(["-j", "addr", "show"]).output()?;
    if !out.status.success() {
        return Err(io::Error::other(
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ));
    }
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(io::Error::other)?;
    Ok(json
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|link| link["addr_info"].as_array().cloned().unwrap_or_default())
        .filter_map(|a| a["local"].as_str()?.parse().ok())
        .collect())
}

/// Nanoseconds of `CLOCK_MONOTONIC`: the clock of the kernel's
/// `bpf_ktime_get_ns`, so userspace can age what BPF programs stamp.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the call.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    // CLOCK_MONOTONIC is always there on Linux; a failure leaves 0 (nothing
    // looks expired).
    if rc != 0 {
        return 0;
    }
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

/// Where this program's code is mapped: its file's executable mappings
/// (`/proc/self/maps`), as address ranges.
fn own_code_ranges() -> io::Result<Vec<(usize, usize)>> {
    let exe = std::fs::read_link("/proc/self/exe")?;
    let exe = exe.to_string_lossy();
    let maps = std::fs::read_to_string("/proc/self/maps")?;
    let mut ranges = Vec::new();
    for line in maps.lines() {
        // `start-end perms offset dev inode path`
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [range, perms, _, _, _, path] = fields[..] else {
            continue;
        };
        if path != exe || !perms.contains('x') {
            continue;
        }
        let Some((start, end)) = range.split_once('-') else {
            continue;
        };
        let parse = |hex| usize::from_str_radix(hex, 16).map_err(io::Error::other);
        ranges.push((parse(start)?, parse(end)?));
    }
    Ok(ranges)
}

const PAGE: usize = 4096;
static CODE_START: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
static CODE_END: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Traces which pages of this program's own code run, for `cargo xtask
/// code-layout`: every page of its code is made inaccessible, and the
/// first fault on each makes that page executable again. The pages that
/// ran are then the executable ranges of `/proc/<pid>/maps`, which that
/// task reads while the program runs. The daemon does this when
/// `LACEWING_CODE_PROFILE` is set; each page costs one fault the first
/// time it runs, and nothing after.
pub fn trace_own_code_pages() -> io::Result<()> {
    use std::sync::atomic::Ordering::Relaxed;
    let ranges = own_code_ranges()?;
    let (Some(start), Some(end)) = (
        ranges.iter().map(|r| r.0).min(),
        ranges.iter().map(|r| r.1).max(),
    ) else {
        return Err(io::Error::other("no executable mapping of /proc/self/exe"));
    };
    CODE_START.store(start, Relaxed);
    CODE_END.store(end, Relaxed);
    // SAFETY: a zeroed sigaction is valid; the handler has the SA_SIGINFO
    // signature and touches only atomics, its argument and mprotect.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_code_fault as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO;
        if libc::sigaction(libc::SIGSEGV, &action, std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    // The handler's own pages stay executable: it runs on the faults.
    let handler = on_code_fault as *const () as usize & !(PAGE - 1);
    let keep = handler..handler + 2 * PAGE;
    for (start, end) in ranges {
        // Each range, but for the handler's pages.
        for (from, to) in [(start, end.min(keep.start)), (start.max(keep.end), end)] {
            if from >= to {
                continue;
            }
            // SAFETY: pages of our own code mapping; any later execution
            // of them faults into `on_code_fault`, which restores them.
            if unsafe { libc::mprotect(from as *mut libc::c_void, to - from, libc::PROT_NONE) } != 0
            {
                return Err(io::Error::last_os_error());
            }
        }
    }
    Ok(())
}

/// SIGSEGV while tracing code pages: a fault in our code makes its page
/// executable again and returns, so the instruction runs; any other fault
/// restores the default action and returns, so it faults again and ends
/// the process as it would have. Calls nothing of ours: every other page
/// of our code may be the one that faulted.
#[inline(never)]
extern "C" fn on_code_fault(_signal: i32, info: *mut libc::siginfo_t, _context: *mut libc::c_void) {
    use std::sync::atomic::Ordering::Relaxed;
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers;
    // `si_addr` is at offset 16 on Linux (read directly: libc's accessor
    // is a function in our code).
    let addr = unsafe { info.cast::<u8>().add(16).cast::<usize>().read() };
    if addr < CODE_START.load(Relaxed) || addr >= CODE_END.load(Relaxed) {
        // SAFETY: restores the default action, async-signal-safe.
        unsafe { libc::signal(libc::SIGSEGV, libc::SIG_DFL) };
        return;
    }
    let page = addr & !(PAGE - 1);
    // SAFETY: a page of our own code mapping, made executable as it was.
    if unsafe {
        libc::mprotect(
            page as *mut libc::c_void,
            PAGE,
            libc::PROT_READ | libc::PROT_EXEC,
        )
    } != 0
    {
        // SAFETY: async-signal-safe exit; the page cannot run.
        unsafe { libc::_exit(70) };
    }
}

/// Raises this process's open-file limit as far as the kernel allows
/// (`fs.nr_open`, which root may use): every connection the node daemon
/// carries holds two sockets, and 1024 would cap a node at a few hundred.
/// Returns the new soft limit.
pub fn raise_fd_limit() -> io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid rlimit for the call to fill.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let ceiling = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(limit.rlim_max);
    for wanted in [ceiling.max(limit.rlim_max), limit.rlim_max] {
        let raised = libc::rlimit {
            rlim_cur: wanted,
            rlim_max: wanted,
        };
        // SAFETY: plain struct argument; failure leaves the limit as it was.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const raised) } == 0 {
            return Ok(wanted);
        }
    }
    Ok(limit.rlim_cur)
}

/// The `bpf()` system call with `attr`, a zeroed `union bpf_attr` of
/// 128 bytes holding one command's members (the kernel wants the rest zero);
/// its non-negative result.
fn sys_bpf(cmd: libc::c_long, attr: &mut [u64; 16]) -> io::Result<libc::c_long> {
    // SAFETY: attr is a bpf_attr of the size passed; any pointer in it
    // points at memory the caller keeps alive for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            std::mem::size_of_val(attr),
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// `BPF_OBJ_GET`: a descriptor for the object (map, program or link)
/// pinned at `path` on bpffs.
pub fn bpf_obj_get(path: &Path) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::unix::ffi::OsStrExt as _;
    const BPF_OBJ_GET: libc::c_long = 7;
    let name = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // The obj_pin/obj_get member: pathname (u64), bpf_fd, file_flags.
    let mut attr = [0u64; 16];
    attr[0] = name.as_ptr() as u64;
    let fd = sys_bpf(BPF_OBJ_GET, &mut attr)?;
    let fd = i32::try_from(fd).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?;
    // SAFETY: the kernel just returned this descriptor to us alone.
    Ok(unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) })
}

/// Two consecutive `u32` fields of `union bpf_attr`, as the `u64` they fill.
fn two_u32(first: u32, second: u32) -> u64 {
    let mut bytes = [0u8; 8];
    bytes[..4].copy_from_slice(&first.to_ne_bytes());
    bytes[4..].copy_from_slice(&second.to_ne_bytes());
    u64::from_ne_bytes(bytes)
}

/// `BPF_OBJ_PIN`: pins the object behind `fd` at `path` on bpffs.
pub fn bpf_obj_pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt as _;
    const BPF_OBJ_PIN: libc::c_long = 6;
    let name = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // The obj_pin member: pathname (u64), then bpf_fd (u32).
    let mut attr = [0u64; 16];
    attr[0] = name.as_ptr() as u64;
    attr[1] = u64::from(fd.as_raw_fd() as u32);
    sys_bpf(BPF_OBJ_PIN, &mut attr).map(|_| ())
}

/// `BPF_LINK_CREATE` for a cgroup hook: attaches `program` at the cgroup
/// open as `cgroup` with attach type `attach_type` (a `BPF_CGROUP_*`
/// value) and returns the link. Links attach in multi mode: other
/// programs at the same cgroup keep running.
pub fn bpf_link_create_cgroup(
    program: BorrowedFd<'_>,
    cgroup: BorrowedFd<'_>,
    attach_type: u32,
) -> io::Result<std::os::fd::OwnedFd> {
    const BPF_LINK_CREATE: libc::c_long = 28;
    // The link_create member: prog_fd, target_fd (u32 each, in the first
    // u64), then attach_type and flags (u32 each), zero flags.
    let mut attr = [0u64; 16];
    attr[0] = two_u32(program.as_raw_fd() as u32, cgroup.as_raw_fd() as u32);
    attr[1] = u64::from(attach_type);
    let fd = sys_bpf(BPF_LINK_CREATE, &mut attr)?;
    let fd = i32::try_from(fd).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?;
    // SAFETY: the kernel just returned this descriptor to us alone.
    Ok(unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) })
}

/// The id of the cgroup a cgroup link is attached at, from
/// `BPF_OBJ_GET_INFO_BY_FD`; 0 once the cgroup was removed and released
/// (the kernel then detaches the link, which stays as long as a pin or a
/// descriptor holds it).
pub fn bpf_link_cgroup_id(link: BorrowedFd<'_>) -> io::Result<u64> {
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    // struct bpf_link_info: type, id, prog_id (u32 each) and padding, then
    // the cgroup member: cgroup_id (u64), attach_type (u32).
    let mut info = [0u64; 8];
    let mut attr = [0u64; 16];
    attr[0] = two_u32(link.as_raw_fd() as u32, std::mem::size_of_val(&info) as u32);
    attr[1] = info.as_mut_ptr() as u64;
    sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(info[2])
}

/// `BPF_LINK_UPDATE`: swaps the program of an attached link for `program`
/// in one step. Every hook call runs either the old program or the new
/// one, never neither (as a detach and attach would allow) nor both.
pub fn bpf_link_update(link: BorrowedFd<'_>, program: BorrowedFd<'_>) -> io::Result<()> {
    const BPF_LINK_UPDATE: libc::c_long = 29;
    // The link_update member: link_fd, new_prog_fd (u32 each, in the
    // first u64), then flags and old_prog_fd, zero.
    let mut attr = [0u64; 16];
    attr[0] = two_u32(link.as_raw_fd() as u32, program.as_raw_fd() as u32);
    sys_bpf(BPF_LINK_UPDATE, &mut attr).map(|_| ())
}

/// Sets the nice value of every thread of this process (Linux keeps one
/// per thread; threads made later inherit their maker's) to `nice`, and
/// returns the main thread's before. A daemon taking over runs at a low
/// priority while it prepares, so the one still serving keeps the CPU.
pub fn set_process_nice(nice: i32) -> io::Result<i32> {
    let pid = std::process::id();
    // SAFETY: getpriority reads a number; errno is cleared first so that a
    // legitimate -1 is told from an error.
    let before = unsafe {
        *libc::__errno_location() = 0;
        libc::getpriority(libc::PRIO_PROCESS, pid)
    };
    if before == -1 && io::Error::last_os_error().raw_os_error() != Some(0) {
        return Err(io::Error::last_os_error());
    }
    for task in std::fs::read_dir("/proc/self/task")? {
        let Some(tid) = task?
            .file_name()
            .to_str()
            .and_then(|t| t.parse::<libc::id_t>().ok())
        else {
            continue;
        };
        // SAFETY: plain setpriority on one of our own threads.
        if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, nice) } != 0 {
            let err = io::Error::last_os_error();
            // A thread that ended meanwhile.
            if err.raw_os_error() != Some(libc::ESRCH) {
                return Err(err);
            }
        }
    }
    Ok(before)
}

/// Accepts one pending connection on the (non-blocking) listening socket
/// `listener` and resets it at once. Returns false when none was pending or
/// accepting failed. A daemon out of descriptors frees a reserved one and
/// calls this, so that the connection waiting in the queue gets a clear
/// refusal instead of hanging until the client times out.
pub fn accept_and_reset(listener: BorrowedFd<'_>) -> bool {
    use std::os::fd::FromRawFd as _;
    // SAFETY: accept4 with no address buffers on a descriptor we borrow; a
    // descriptor it returns is ours and owned below.
    let fd = unsafe {
        libc::accept4(
            listener.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
        )
    };
    if fd < 0 {
        return false;
    }
    // SAFETY: accept4 just returned this descriptor to us.
    let socket = socket2::Socket::from(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) });
    // Linger 0: close with a reset, so the client learns at once.
    let _ = socket.set_linger(Some(std::time::Duration::ZERO));
    true
}
