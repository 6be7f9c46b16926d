//! The userspace crates' layering, enforced: which workspace crate may
//! depend on which (read from `cargo metadata`), so an import loop like the
//! node using the controller's types cannot come back. The picture is in
//! docs/architecture.md.

use std::collections::BTreeMap;

use anyhow::{Context as _, bail};

use crate::run;

/// Each userspace crate with the lacewing crates it may use (anything
/// else of ours is a violation, so a new crate must be placed here), and the
/// outside crates it must not use (the kernel's, the Kubernetes client).
const LAYERS: &[(&str, &[&str], &[&str])] = &[
    ("lacewing-core", &[], &["aya", "tokio"]),
    ("lacewing-sys", &[], &[]),
    // The plugin binary the runtime starts per pod: small, on its own.
    ("lacewing-cni", &[], &["aya", "tokio", "kube"]),
    (
        "lacewing-tunnel",
        &["lacewing-core", "lacewing-sys"],
        &["aya"],
    ),
    (
        "lacewing-proxy",
        &["lacewing-core", "lacewing-tunnel"],
        &["aya", "kube"],
    ),
    (
        "lacewing-node",
        &[
            "lacewing-core",
            "lacewing-sys",
            "lacewing-tunnel",
            "lacewing-proxy",
            "lacewing-cni",
        ],
        &["kube"],
    ),
    (
        "lacewing-controller",
        &["lacewing-core", "lacewing-sys", "lacewing-tunnel"],
        &["aya"],
    ),
    (
        "lacewing",
        &[
            "lacewing-core",
            "lacewing-sys",
            "lacewing-tunnel",
            "lacewing-proxy",
            "lacewing-node",
            "lacewing-controller",
        ],
        &[],
    ),
];

/// Each workspace package's normal (not dev, not build) dependencies.
fn dependencies() -> anyhow::Result<BTreeMap<String, Vec<String>>> {
    let out = std::process::Command::new("cargo")
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .current_dir(run::workspace_root())
        .output()
        .context("running cargo metadata")?;
    anyhow::ensure!(
        out.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let mut deps = BTreeMap::new();
    for package in meta["packages"].as_array().into_iter().flatten() {
        let name = package["name"].as_str().unwrap_or_default().to_owned();
        let normal = package["dependencies"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|d| d["kind"].is_null())
            .filter_map(|d| d["name"].as_str().map(str::to_owned))
            .collect();
        deps.insert(name, normal);
    }
    Ok(deps)
}

/// The forbidden edges in `deps`, as `from -> to`.
fn violations(deps: &BTreeMap<String, Vec<String>>) -> Vec<String> {
    let mut found = Vec::new();
    for (from, allowed, forbidden) in LAYERS {
        for to in deps.get(*from).into_iter().flatten() {
            let ours = to.as_str() == "lacewing" || to.starts_with("lacewing-");
            if (ours && !allowed.contains(&to.as_str())) || forbidden.contains(&to.as_str()) {
                found.push(format!("{from} -> {to}"));
            }
        }
    }
    found
}

pub fn check() -> anyhow::Result<()> {
    let deps = dependencies()?;
    for (crate_name, _, _) in LAYERS {
        if !deps.contains_key(*crate_name) {
            bail!(
                "the layering check names {crate_name}, which is not in the workspace: update xtask/src/layers.rs"
            );
        }
    }
    let found = violations(&deps);
    if !found.is_empty() {
        bail!(
            "the userspace layering is broken: {} (see the layers in docs/architecture.md; move the shared part down into lacewing-core or a seam)",
            found.join(", ")
        );
    }
    eprintln!("xtask: layering ok ({} crates checked)", LAYERS.len());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_and_controller_may_not_use_each_other() {
        let deps: BTreeMap<String, Vec<String>> = [
            (
                "lacewing-node",
                vec!["lacewing-core", "lacewing-controller"],
            ),
            ("lacewing-controller", vec!["lacewing-core"]),
            ("lacewing", vec!["lacewing-node", "lacewing-controller"]),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.into_iter().map(str::to_owned).collect()))
        .collect();
        assert_eq!(
            violations(&deps),
            vec!["lacewing-node -> lacewing-controller"]
        );
    }
}
