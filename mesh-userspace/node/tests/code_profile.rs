//! The daemon traced for `cargo xtask code-layout` (`LACEWING_CODE_PROFILE`)
//! still runs: every page of its code starts inaccessible and the fault
//! handler must make each one executable as it is first run.

use std::process::Command;

#[test]
fn traced_daemon_runs_its_code_to_the_end() {
    let out = Command::new(env!("CARGO_BIN_EXE_lacewing-node"))
        .arg("--version")
        .env("LACEWING_CODE_PROFILE", "1")
        .output()
        .expect("lacewing-node runs");
    assert!(
        out.status.success(),
        "{:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("lacewing-node {}\n", env!("CARGO_PKG_VERSION"))
    );
}
