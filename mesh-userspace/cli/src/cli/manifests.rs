//! `lacewing manifests crds`: writes or checks the CRD YAML generated from
//! the Rust types (`cargo xtask manifests` writes `deploy/crds`).

use std::path::Path;

pub fn run(out: &Path, check: bool) -> anyhow::Result<i32> {
    let mut stale = Vec::new();
    for (file, yaml) in lacewing_core::api::crd_yaml()? {
        let path = out.join(file);
        if check {
            if std::fs::read_to_string(&path).ok().as_deref() != Some(yaml.as_str()) {
                stale.push(path.display().to_string());
            }
        } else {
            std::fs::create_dir_all(out)?;
            std::fs::write(&path, yaml)?;
            println!("wrote {}", path.display());
        }
    }
    if !stale.is_empty() {
        eprintln!(
            "stale generated CRDs (run `cargo xtask manifests` and commit): {}",
            stale.join(", ")
        );
        return Ok(1);
    }
    Ok(0)
}
