//! The node-to-node tunnel, HBONE style: HTTP/2 CONNECT over mutual TLS 1.3
//! on :15008. One pooled, multiplexed connection per (source identity,
//! destination node) carries every stream between them; the CONNECT
//! authority is the destination pod's address and `Forwarded: for=` the
//! source pod's. The server checks the client's chain and SPIFFE identity,
//! lets the node authorize the stream, connects to the pod and splices.

pub mod client;
pub mod limits;
pub mod metrics;
pub mod server;
pub mod tls;

use std::net::IpAddr;

/// The HBONE port.
pub const PORT: u16 = 15008;

/// HTTP/2 flow-control windows: large enough that one stream can fill a
/// fast link, small enough to bound what a slow reader makes us buffer.
pub const STREAM_WINDOW: u32 = 4 << 20;
pub const CONNECTION_WINDOW: u32 = 16 << 20;
/// The largest HTTP/2 frame a peer may send us (ztunnel: 1 MiB; h2's
/// default 16 KiB): a bulk stream's data then crosses in fewer frames,
/// each a header and a flow-control update less.
pub const MAX_FRAME: u32 = 1 << 20;
/// Copy buffer per direction of a spliced stream.
pub const COPY_BUFFER: usize = 64 << 10;
/// Streams one tunnel connection may carry at once (hyper's default is 200,
/// which would stall the 201st connection between two pods' nodes). Flow
/// control still bounds what they buffer: `CONNECTION_WINDOW` in all.
pub const MAX_STREAMS: u32 = 1 << 16;
/// Streams h2 may reset on its own (a peer's frame for a stream we already
/// dropped, for one) before it ends the whole connection with
/// `ENHANCE_YOUR_CALM`. h2 counts these over the connection's life, 1,024
/// by default: a long-lived tunnel connection whose clients churn reached
/// it and took every stream on it down. Tunnel peers are nodes proven by
/// mutual TLS, so the count is effectively unbounded here.
pub const MAX_LOCAL_ERROR_RESETS: usize = 1 << 30;

/// Who opened a stream, as the destination node learns it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    /// The SPIFFE identity of the client certificate.
    pub identity: String,
    /// The source pod's address (`Forwarded: for=`), if given.
    pub source: Option<IpAddr>,
}

/// Why a stream is not carried: the HTTP status the client gets, a short
/// reason (a metric label), details for the log, and the policy that denied
/// it, if one did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub reason: &'static str,
    pub detail: String,
    pub policy: Option<String>,
    /// For a rate limit's refusal: when the client may try again.
    pub retry_after: Option<std::time::Duration>,
}

impl Refusal {
    pub fn new(status: u16, reason: &'static str, detail: impl Into<String>) -> Self {
        Self {
            status,
            reason,
            detail: detail.into(),
            policy: None,
            retry_after: None,
        }
    }
}

/// `for="<ip>"` or `for="[<ipv6>]"`, as RFC 7239 writes it.
pub fn forwarded_for(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => format!("for={v4}"),
        IpAddr::V6(v6) => format!("for=\"[{v6}]\""),
    }
}

/// The source address of a `Forwarded` header, if it has one.
pub fn parse_forwarded(header: &str) -> Option<IpAddr> {
    header.split([';', ',']).find_map(|part| {
        let value = part.trim().strip_prefix("for=")?;
        let value = value.trim_matches('"');
        let value = value
            .strip_prefix('[')
            .and_then(|v| v.strip_suffix(']'))
            .unwrap_or(value);
        value.parse().ok()
    })
}

#[cfg(test)]
mod tests;
