//! Project tasks, run as `cargo xtask <task>`: `setup` installs what a fresh
//! machine lacks, `test` runs every check CI runs, `demo` runs the main job,
//! `fuzz` runs the fuzz targets.

mod fuzz;
mod layers;
mod layout;
mod run;
mod setup;
mod soak;
mod test;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "cargo xtask")]
struct Args {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Install the eBPF toolchain (nightly rust-src, bpf-linker) and the
    /// Debian packages the project uses. Idempotent.
    Setup,
    /// Build every binary (debug; `--release` for release).
    Build {
        #[arg(long)]
        release: bool,
    },
    /// setup, fmt, clippy, unit tests, then the lab tests as root. Fails if the
    /// lab tests did not run.
    Test,
    /// setup, build, then the lab demo (`lacewing demo`) as root.
    Demo,
    /// Regenerate deploy/crds from the Rust types.
    Manifests,
    /// Run every fuzz target (cargo-fuzz, nightly) from its seed corpus.
    Fuzz {
        /// How long each target runs.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Only this target.
        #[arg(long)]
        target: Option<String>,
    },
    /// Mixed traffic through the lab for N minutes while the mesh changes;
    /// fails on a failed request or on memory, files or sockhash entries
    /// that keep growing.
    Soak {
        #[arg(long, default_value_t = 30)]
        minutes: u32,
        /// Release binaries (as shipped) instead of the tests' debug ones.
        #[arg(long)]
        release: bool,
    },
    /// Profile which of the node daemon's code runs (lab benchmarks, root)
    /// and rewrite the order release builds lay its functions out in
    /// (mesh-userspace/node/code-layout.txt).
    CodeLayout,
    /// Benchmarks: `cargo xtask bench l4`, `tunnel`, `local` and `l7` (lab, root), `cargo xtask bench control-plane`.
    Bench {
        /// Which benchmark: l4, l7, tunnel, local or control-plane.
        name: String,
        /// Extra flags for the benchmark (`-- --sizes 100,1000`).
        #[arg(last = true)]
        args: Vec<String>,
    },
}

fn main() {
    let args = Args::parse();
    let result = match args.task {
        Task::Setup => setup::run(),
        Task::Build { release } => run::build_binaries(release),
        Task::Test => test::run(),
        Task::Demo => demo(),
        Task::Manifests => run::build_binaries(false).and_then(|()| {
            for dir in run::CRD_DIRS {
                run::cmd(
                    run::workspace_root().join("target/debug/lacewing"),
                    ["manifests", "--out", dir],
                )?;
            }
            Ok(())
        }),
        Task::Bench { name, args } => bench(&name, &args),
        Task::CodeLayout => setup::run().and_then(|()| layout::run()),
        Task::Soak { minutes, release } => soak::run(minutes, release),
        Task::Fuzz { seconds, target } => {
            setup::run().and_then(|()| fuzz::run(seconds, target.as_deref()))
        }
    };
    if let Err(err) = result {
        eprintln!("xtask: error: {err:#}");
        std::process::exit(1);
    }
}

fn demo() -> anyhow::Result<()> {
    setup::run()?;
    run::build_binaries(true)?;
    run::require_root("the demo")?;
    run::cmd(
        run::workspace_root().join("target/release/lacewing"),
        ["demo"],
    )
}

fn bench(name: &str, args: &[String]) -> anyhow::Result<()> {
    anyhow::ensure!(
        ["l4", "l7", "control-plane", "tunnel", "local", "upgrade"].contains(&name),
        "unknown benchmark `{name}`; there are: l4, l7, control-plane, tunnel, local, upgrade"
    );
    setup::run()?;
    run::build_binaries(true)?;
    if name != "control-plane" {
        run::require_root("this benchmark (it runs in the lab)")?;
        layout::report_freshness()?;
    }
    let mut all = vec!["bench".to_owned(), name.to_owned()];
    all.extend(args.iter().cloned());
    run::cmd(run::workspace_root().join("target/release/lacewing"), all)
}
