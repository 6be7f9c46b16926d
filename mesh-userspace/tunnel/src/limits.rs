//! The flags that set how much a daemon's listeners let a peer hold
//! ([`lacewing_sys::admission::Limits`]); the node and the controller take
//! the same ones.

use std::time::Duration;

use lacewing_core::duration;
use lacewing_sys::admission::Limits;

#[derive(Clone, Debug, clap::Args)]
pub struct LimitFlags {
    /// How long a peer has to finish its TLS handshake (on a plain HTTP
    /// port: to send a request's head).
    #[arg(long, env = "LACEWING_HANDSHAKE_TIMEOUT", default_value = "5s", value_parser = duration::parse)]
    pub handshake_timeout: Duration,
    /// TLS handshakes one listener carries at once; more are reset.
    #[arg(long, env = "LACEWING_MAX_HANDSHAKES", default_value_t = Limits::default().max_handshakes)]
    pub max_handshakes: usize,
    /// TLS handshakes one source address may have in progress on one
    /// listener; more are reset.
    #[arg(long, env = "LACEWING_MAX_HANDSHAKES_PER_SOURCE", default_value_t = Limits::default().max_handshakes_per_source)]
    pub max_handshakes_per_source: usize,
    /// Connections one source address may hold open on one listener (the
    /// in-pod ports excepted); more are reset.
    #[arg(long, env = "LACEWING_MAX_CONNECTIONS_PER_SOURCE", default_value_t = Limits::default().max_connections_per_source)]
    pub max_connections_per_source: usize,
    /// How long a tunnel or HTTP connection may carry no request before it
    /// is closed.
    #[arg(long, env = "LACEWING_IDLE_TIMEOUT", default_value = "5m", value_parser = duration::parse)]
    pub idle_timeout: Duration,
    /// The largest HTTP request head (HTTP/1) or header list (HTTP/2) the
    /// daemon's own ports accept.
    #[arg(long, env = "LACEWING_MAX_HEADER_BYTES", default_value_t = Limits::default().max_header_bytes)]
    pub max_header_bytes: u32,
}

impl LimitFlags {
    pub fn limits(&self) -> Limits {
        Limits {
            handshake_timeout: self.handshake_timeout,
            max_handshakes: self.max_handshakes,
            max_handshakes_per_source: self.max_handshakes_per_source,
            max_connections_per_source: self.max_connections_per_source,
            idle_timeout: self.idle_timeout,
            max_header_bytes: self.max_header_bytes,
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    #[derive(clap::Parser)]
    struct Flags {
        #[command(flatten)]
        limits: LimitFlags,
    }

    #[test]
    fn the_defaults_are_the_libraries_and_flags_override_them() {
        let flags = Flags::try_parse_from(["x"]).unwrap();
        assert_eq!(flags.limits.limits(), Limits::default());
        let flags =
            Flags::try_parse_from(["x", "--handshake-timeout", "2s", "--idle-timeout", "1m"])
                .unwrap();
        assert_eq!(
            flags.limits.limits().handshake_timeout,
            Duration::from_secs(2)
        );
        assert_eq!(flags.limits.limits().idle_timeout, Duration::from_secs(60));
        let err = Flags::try_parse_from(["x", "--handshake-timeout", "5"])
            .err()
            .unwrap();
        assert!(
            err.to_string().contains("not a duration") || err.to_string().contains("unit"),
            "{err}"
        );
    }
}
