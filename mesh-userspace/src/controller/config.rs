//! `lacewing-controller` settings.

use std::{net::SocketAddr, path::PathBuf};

use clap::Parser;

use crate::telemetry::LogFormat;

/// The gRPC port nodes subscribe on.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:15012";

#[derive(Debug, Parser)]
#[command(
    name = "lacewing-controller",
    version,
    about = "Lacewing's control plane"
)]
pub struct ControllerArgs {
    /// A folder of Kubernetes YAML (Services, EndpointSlices, ...), watched.
    #[arg(long, env = "LACEWING_FOLDER")]
    pub folder: PathBuf,
    /// Where nodes subscribe (gRPC).
    #[arg(long, env = "LACEWING_LISTEN", default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,
    #[arg(long, value_enum, default_value_t)]
    pub log_format: LogFormat,
}

/// Validated settings.
#[derive(Clone, Debug)]
pub struct ControllerConfig {
    pub folder: PathBuf,
    pub listen: SocketAddr,
}

impl ControllerArgs {
    pub fn validate(self) -> Result<ControllerConfig, String> {
        if !self.folder.is_dir() {
            return Err(format!(
                "--folder {}: no such directory",
                self.folder.display()
            ));
        }
        Ok(ControllerConfig {
            folder: self.folder,
            listen: self.listen,
        })
    }
}
