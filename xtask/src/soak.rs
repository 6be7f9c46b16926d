//! `cargo xtask soak --minutes N`: the lab under mixed traffic and change
//! for N minutes (`lacewing bench soak`), failing on a failed request or a
//! series that grows after warm-up.

use crate::{run, setup};

/// setup, build (debug, or release for a run that stands for production),
/// then the soak as root.
pub fn run(minutes: u32, release: bool) -> anyhow::Result<()> {
    setup::run()?;
    run::build_binaries(release)?;
    run_built(minutes, release)
}

/// The soak with binaries already built.
pub fn run_built(minutes: u32, release: bool) -> anyhow::Result<()> {
    run::require_root("the soak (it runs in the lab)")?;
    let profile = if release { "release" } else { "debug" };
    run::cmd(
        run::workspace_root()
            .join("target")
            .join(profile)
            .join("lacewing"),
        [
            "bench".to_owned(),
            "soak".to_owned(),
            "--minutes".to_owned(),
            minutes.to_string(),
        ],
    )
}
