//! Names of maps and programs, in one place.
//!
//! The kernel cuts object names to 15 bytes (`BPF_OBJ_NAME_LEN - 1`), so every
//! name here fits in 15 characters and stays readable in `bpftool map list`. The
//! kernel crate declares its statics and functions with these exact names (a
//! proc-macro attribute cannot take a const); userspace looks them up through
//! these consts, and a test checks the compiled object has each of them.

/// Per-CPU connection counter, keyed by destination port, family and protocol.
pub const MAP_CONN_BY_PORT: &str = "LW_CONN_BY_PORT";

/// cgroup `connect4` program: counts IPv4 connects.
pub const PROG_CONNECT4: &str = "lw_connect4";
/// cgroup `connect6` program: counts IPv6 connects.
pub const PROG_CONNECT6: &str = "lw_connect6";

/// Every map the node daemon pins, for loops that pin, unpin or list them.
pub const ALL_MAPS: &[&str] = &[MAP_CONN_BY_PORT];
/// Every cgroup `sock_addr` program with its attach point, for the loader.
pub const SOCK_ADDR_PROGRAMS: &[&str] = &[PROG_CONNECT4, PROG_CONNECT6];

/// Longest object name the kernel keeps.
pub const MAX_OBJ_NAME_LEN: usize = 15;

const _: () = {
    let mut i = 0;
    while i < ALL_MAPS.len() {
        assert!(ALL_MAPS[i].len() <= MAX_OBJ_NAME_LEN);
        i += 1;
    }
    let mut i = 0;
    while i < SOCK_ADDR_PROGRAMS.len() {
        assert!(SOCK_ADDR_PROGRAMS[i].len() <= MAX_OBJ_NAME_LEN);
        i += 1;
    }
};
