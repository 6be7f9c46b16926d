//! `cargo xtask code-layout`: profiles which of the node daemon's code runs
//! and writes `mesh-userspace/node/code-layout.txt`, the order in which
//! release builds lay out its functions (see the node's `build.rs`).
//!
//! The kernel maps a program's code in 64 KiB windows around each page that
//! runs, so code that runs spread across the whole file made most of the
//! file resident (7.9 of 10.6 MB). Laid out together, it is read in fewer
//! windows.
//!
//! How: the release binaries are copied aside and run in lab benchmarks
//! with `LACEWING_CODE_PROFILE` set, which makes each daemon trace its own
//! code pages (`lacewing_sys::os::trace_own_code_pages`: every page starts
//! inaccessible and becomes executable on its first fault). While the runs
//! last, this task reads the daemons' `/proc/<pid>/maps` every half second;
//! the executable ranges are the pages that ran. Every function on such a
//! page is listed (a page may hold code that did not run: the list is a
//! superset), in order of the first run that ran it, then by address.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::Context as _;

use crate::run;

const PAGE: u64 = 4096;

/// The runs profiled, in order: the tunnel first (what the daemon's memory
/// is measured in), then HTTP routing and policy.
const RUNS: &[&[&str]] = &[
    &["bench", "tunnel", "--seconds", "4", "--rounds", "1"],
    &["bench", "l7", "--seconds", "1"],
];

pub fn run() -> anyhow::Result<()> {
    run::require_root("profiling the daemon's code (it runs the lab)")?;
    run::build_binaries(true)?;
    let root = run::workspace_root();
    let dir = root.join("target/code-layout");
    fs::create_dir_all(&dir)?;
    for bin in [
        "lacewing",
        "lacewing-node",
        "lacewing-controller",
        "lacewing-cni",
    ] {
        fs::copy(root.join("target/release").join(bin), dir.join(bin))
            .with_context(|| format!("copying {bin}"))?;
    }
    let node = fs::canonicalize(dir.join("lacewing-node"))?;
    let mut first_run: BTreeMap<u64, usize> = BTreeMap::new();
    for (index, args) in RUNS.iter().enumerate() {
        let pages = profile(&dir.join("lacewing"), args, &node)?;
        anyhow::ensure!(
            !pages.is_empty(),
            "`lacewing {}` ran no traced daemon",
            args.join(" ")
        );
        println!("{}: {} pages of code ran", args.join(" "), pages.len());
        for page in pages {
            first_run.entry(page).or_insert(index);
        }
    }
    let functions = functions(&node)?;
    let mut listed: Vec<(usize, u64, &str)> = Vec::new();
    let mut bytes = 0;
    for f in &functions {
        let (first, last) = (f.addr / PAGE, (f.addr + f.size.max(1) - 1) / PAGE);
        if let Some(run) = (first..=last)
            .filter_map(|p| first_run.get(&(p * PAGE)))
            .min()
        {
            listed.push((*run, f.addr, &f.name));
            bytes += f.size;
        }
    }
    listed.sort();
    let mut seen = BTreeSet::new();
    let mut out = String::new();
    for (_, _, name) in listed {
        if seen.insert(name) {
            out.push_str(name);
            out.push('\n');
        }
    }
    let list = root.join("mesh-userspace/node/code-layout.txt");
    fs::write(&list, out)?;
    println!(
        "{}: {} of {} functions, {:.1} MB of code; rebuild to lay them out",
        list.display(),
        seen.len(),
        functions.len(),
        bytes as f64 / 1e6
    );
    Ok(())
}

/// Says how much of `code-layout.txt` the release daemon still has. Names
/// change as dependencies or the compiler do; a function the list no
/// longer names is laid out with the code that does not run, and the
/// daemon's resident memory grows back. Benchmarks print this first.
pub fn report_freshness() -> anyhow::Result<()> {
    let root = run::workspace_root();
    let list = fs::read_to_string(root.join("mesh-userspace/node/code-layout.txt"))?;
    let names: BTreeSet<String> = functions(&root.join("target/release/lacewing-node"))?
        .into_iter()
        .map(|f| f.name)
        .collect();
    let listed = list.lines().count();
    let found = list.lines().filter(|n| names.contains(*n)).count();
    println!("code layout: {found} of {listed} listed functions are in the daemon");
    if found * 10 < listed * 9 {
        println!("code layout: stale; run `cargo xtask code-layout` and rebuild");
    }
    Ok(())
}

/// Runs `lacewing <args>` with the daemons tracing their code and returns
/// the pages of `node` (addresses in the file) that ran in any of them.
fn profile(lacewing: &Path, args: &[&str], node: &Path) -> anyhow::Result<BTreeSet<u64>> {
    let mut child = Command::new(lacewing)
        .args(args)
        .env("LACEWING_CODE_PROFILE", "1")
        .stdout(Stdio::null())
        .current_dir(run::workspace_root())
        .spawn()
        .with_context(|| format!("starting {}", lacewing.display()))?;
    let mut pages = BTreeSet::new();
    let mut traced = false;
    loop {
        traced |= scan(node, &mut pages);
        if let Some(status) = child.try_wait()? {
            anyhow::ensure!(status.success(), "`lacewing {}`: {status}", args.join(" "));
            // Untraced daemons have all their code executable: the list
            // would be every function.
            anyhow::ensure!(
                traced,
                "no daemon of `lacewing {}` traced its code (LACEWING_CODE_PROFILE)",
                args.join(" ")
            );
            return Ok(pages);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Adds the executable pages of every running process of `node`; true if
/// one of them had code not yet run (it traces its code).
fn scan(node: &Path, pages: &mut BTreeSet<u64>) -> bool {
    let mut traced = false;
    let Ok(procs) = fs::read_dir("/proc") else {
        return traced;
    };
    for entry in procs.flatten() {
        let proc = entry.path();
        // Processes come and go while this reads: a read that fails is a
        // process that ended, and its pages were read the scan before.
        if fs::read_link(proc.join("exe")).ok().as_deref() != Some(node) {
            continue;
        }
        if let Ok(maps) = fs::read_to_string(proc.join("maps")) {
            traced |= executable_pages(&maps, node, pages);
        }
    }
    traced
}

/// The pages of `node` that `maps` (one process's `/proc/<pid>/maps`) has
/// executable, as addresses in the file: a position-independent program's
/// first mapping (offset 0) is where its address 0 is loaded. True if some
/// of its code is not yet executable (`---p`: traced and not run).
fn executable_pages(maps: &str, node: &Path, pages: &mut BTreeSet<u64>) -> bool {
    let node = node.to_string_lossy();
    let mut base = None;
    let mut traced = false;
    for line in maps.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [range, perms, offset, _, _, path] = fields[..] else {
            continue;
        };
        if path != node {
            continue;
        }
        let parse = |hex| u64::from_str_radix(hex, 16).ok();
        let Some((start, end)) = range
            .split_once('-')
            .and_then(|(s, e)| Some((parse(s)?, parse(e)?)))
        else {
            continue;
        };
        if parse(offset) == Some(0) && base.is_none() {
            base = Some(start);
        }
        traced |= perms.starts_with("---");
        if let (Some(base), true) = (base, perms.contains('x')) {
            pages.extend((start..end).step_by(PAGE as usize).map(|p| p - base));
        }
    }
    traced
}

struct Function {
    addr: u64,
    size: u64,
    name: String,
}

/// The functions of `binary`, from its symbol table (`nm`).
fn functions(binary: &Path) -> anyhow::Result<Vec<Function>> {
    let out = Command::new("nm")
        .args(["--defined-only", "--print-size"])
        .arg(binary)
        .output()
        .context("running nm (binutils)")?;
    anyhow::ensure!(
        out.status.success(),
        "nm: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut functions = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [addr, size, kind, name] = fields[..] else {
            continue;
        };
        if !matches!(kind, "t" | "T" | "w" | "W") {
            continue;
        }
        let (Ok(addr), Ok(size)) = (u64::from_str_radix(addr, 16), u64::from_str_radix(size, 16))
        else {
            continue;
        };
        functions.push(Function {
            addr,
            size,
            name: name.to_owned(),
        });
    }
    Ok(functions)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn executable_pages_are_file_addresses_of_the_node_only() {
        let maps = "\
5600000000-5600002000 r--p 00000000 fe:00 12 /t/lacewing-node
5600002000-5600003000 r-xp 00002000 fe:00 12 /t/lacewing-node
5600003000-5600005000 ---p 00003000 fe:00 12 /t/lacewing-node
5600005000-5600007000 r-xp 00005000 fe:00 12 /t/lacewing-node
7f0000000000-7f0000001000 r-xp 00000000 fe:00 13 /usr/lib/libc.so.6
";
        let mut pages = BTreeSet::new();
        assert!(executable_pages(
            maps,
            Path::new("/t/lacewing-node"),
            &mut pages
        ));
        assert_eq!(
            pages.iter().copied().collect::<Vec<_>>(),
            vec![0x2000, 0x5000, 0x6000]
        );
        let untraced = "5600002000-5600007000 r-xp 00002000 fe:00 12 /t/lacewing-node\n";
        assert!(!executable_pages(
            untraced,
            Path::new("/t/lacewing-node"),
            &mut pages
        ));
    }
}
