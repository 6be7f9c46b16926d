//! `lacewing ca`: the steps of a CA rotation on the controller's CA folder
//! (folder mode), and where a rotation stands. The controller reloads the
//! folder within a second of each step; see docs/architecture.md
//! "Rotating the CA".

use std::path::{Path, PathBuf};

use clap::Subcommand;
use lacewing_core::trust::{self, Authority};

#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Step 1: make the next CA and add its root to the trust bundle. Wait
    /// until every node reports 2 roots (lacewing_node_trust_bundle_roots)
    /// before step 2.
    Prepare(Folder),
    /// Step 2: the prepared CA signs from now on; certificates move to it
    /// as they are renewed.
    Activate(Folder),
    /// Step 3: remove the old root from the bundle, once everything it
    /// signed has expired (refused before then, and says how long is left).
    Finish {
        #[command(flatten)]
        folder: Folder,
        /// Remove it now, even though certificates it signed are still
        /// valid: their holders can no longer connect.
        #[arg(long)]
        force: bool,
    },
    /// The signing CA, the roots in the bundle, and until when each root's
    /// certificates are valid.
    Show(Folder),
}

#[derive(Debug, clap::Args)]
pub struct Folder {
    /// The controller's --pki-dir (the CA is in its `ca/` folder).
    #[arg(
        long,
        env = "LACEWING_PKI_DIR",
        default_value = "/var/lib/lacewing/pki"
    )]
    pki_dir: PathBuf,
}

impl Folder {
    fn ca(&self) -> PathBuf {
        self.pki_dir.join("ca")
    }
}

pub fn run(cmd: CaCommand) -> anyhow::Result<i32> {
    match cmd {
        CaCommand::Prepare(f) => {
            let root = trust::prepare(&f.ca())?;
            println!("prepared root {root}: in the trust bundle now, signing nothing yet");
            println!("next: when every node has 2 roots, `lacewing ca activate`");
        }
        CaCommand::Activate(f) => {
            let (old, new) = trust::activate(&f.ca())?;
            println!("root {new} signs from now on; {old} stays trusted");
            println!("next: `lacewing ca finish` once every certificate {old} signed has expired");
        }
        CaCommand::Finish { folder, force } => {
            let removed = trust::finish(&folder.ca(), force)?;
            if removed.is_empty() {
                println!("nothing to remove: the bundle holds the signing root only");
            }
            for root in removed {
                println!("removed root {root} from the trust bundle");
            }
        }
        CaCommand::Show(f) => show(&f.ca())?,
    }
    Ok(0)
}

fn show(dir: &Path) -> anyhow::Result<()> {
    let authority = Authority::load(dir)?;
    let signer = authority.signer.fingerprint();
    let now = std::time::SystemTime::now();
    println!("{:<66} {:<8} CERTIFICATES VALID", "ROOT", "SIGNS");
    for root in trust::fingerprints(&authority.bundle_pem) {
        let valid = match trust::issued_until(dir, &root) {
            Some(until) => match until.duration_since(now) {
                Ok(left) => format!("{} s more", left.as_secs() + 1),
                Err(_) => "none (all expired)".to_owned(),
            },
            None => "none issued here".to_owned(),
        };
        let signs = if root == signer { "yes" } else { "no" };
        println!("{root:<66} {signs:<8} {valid}");
    }
    if dir.join(trust::NEXT_DIR).exists() {
        println!(
            "a prepared root waits in {}",
            dir.join(trust::NEXT_DIR).display()
        );
    }
    Ok(())
}
