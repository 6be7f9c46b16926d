//! What the fuzz targets share: reading a request from the text after a
//! target's `%%` line.

use http::{HeaderMap, HeaderName, HeaderValue};

/// `METHOD TARGET` from the first line (`GET /` when it has none), and
/// the `name: value` header lines after it (lines that are no header are
/// skipped, as a server would refuse them before any of our code ran).
pub fn request(text: &str) -> (&str, &str, HeaderMap) {
    let mut lines = text.lines();
    let (method, target) = lines
        .next()
        .and_then(|l| l.split_once(' '))
        .unwrap_or(("GET", "/"));
    let mut headers = HeaderMap::new();
    for line in lines {
        if let Some((name, value)) = line.split_once(':')
            && let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(name.trim().as_bytes()),
                HeaderValue::from_str(value.trim()),
            )
        {
            headers.append(name, value);
        }
    }
    (method, target, headers)
}
