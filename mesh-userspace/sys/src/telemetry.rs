//! Logging setup shared by the binaries: `tracing` to stderr, filtered by
//! `RUST_LOG` (default `info`), as text or as JSON lines. The filter can be
//! changed while the daemon runs (the node's admin port does) through the
//! [`LogLevel`] handle [`init`] returns.

use tracing_subscriber::{
    EnvFilter, fmt, layer::SubscriberExt as _, reload, util::SubscriberInitExt as _,
};

/// Log line format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// Changes the running process's log filter.
#[derive(Clone)]
pub struct LogLevel {
    handle: reload::Handle<EnvFilter, tracing_subscriber::Registry>,
}

impl std::fmt::Debug for LogLevel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogLevel")
            .field("filter", &self.current())
            .finish()
    }
}

/// A filter that does not parse.
#[derive(Debug, thiserror::Error)]
#[error(
    "`{filter}` is not a log filter ({reason}); use a level (error, warn, info, debug, trace) or RUST_LOG's syntax, as `info,lacewing_proxy=debug`"
)]
pub struct BadFilter {
    pub filter: String,
    pub reason: String,
}

impl LogLevel {
    /// The filter in force, in `RUST_LOG` syntax.
    pub fn current(&self) -> String {
        self.handle
            .with_current(|f| f.to_string())
            .unwrap_or_default()
    }

    /// Replaces the filter (`debug`, `info,lacewing_proxy=trace`, ...);
    /// a filter that does not parse changes nothing.
    pub fn set(&self, filter: &str) -> Result<(), BadFilter> {
        let parsed = EnvFilter::try_new(filter).map_err(|e| BadFilter {
            filter: filter.to_owned(),
            reason: e.to_string(),
        })?;
        self.handle.reload(parsed).map_err(|e| BadFilter {
            filter: filter.to_owned(),
            reason: e.to_string(),
        })
    }
}

/// Installs the global subscriber. Call once, first thing in `main`.
pub fn init(format: LogFormat) -> LogLevel {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Text => registry
            .with(fmt::layer().with_writer(std::io::stderr))
            .init(),
        LogFormat::Json => registry
            .with(fmt::layer().json().with_writer(std::io::stderr))
            .init(),
    }
    LogLevel { handle }
}
