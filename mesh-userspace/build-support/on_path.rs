// Shared by the build scripts of lacewing-core and lacewing-node (a build
// script cannot depend on a crate of its own workspace without a cycle of
// builds): `include!`d, not compiled alone.

/// Whether `tool` is on PATH or in cargo's bin folder.
fn on_path(tool: &str) -> bool {
    let cargo_bin = std::env::var_os("CARGO_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| std::path::PathBuf::from(home).join(".cargo")))
        .map(|home| home.join("bin"));
    std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain(cargo_bin)
        .any(|dir| dir.join(tool).is_file())
}
