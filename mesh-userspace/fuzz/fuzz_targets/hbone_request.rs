//! The HBONE request as the tunnel server reads it: the CONNECT authority
//! (the destination pod's address) and the `Forwarded` header (the source
//! pod's). Input: the authority, a newline, the header value.
#![no_main]

use std::net::SocketAddr;

use lacewing_tunnel::{forwarded_for, parse_forwarded};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    let (authority, forwarded) = text.split_once('\n').unwrap_or((text, ""));
    if let Ok(authority) = authority.parse::<http::uri::Authority>() {
        let _ = authority.as_str().parse::<SocketAddr>();
    }
    if let Some(ip) = parse_forwarded(forwarded) {
        // What a node writes, the next reads back the same.
        assert_eq!(parse_forwarded(&forwarded_for(ip)), Some(ip));
    }
});
