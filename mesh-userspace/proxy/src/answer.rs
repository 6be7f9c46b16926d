//! The mesh's own answers to HTTP requests (a refusal, a failure, an
//! injected fault), for the source's router and the destination's L7
//! checks alike: gRPC's form to a gRPC client (HTTP 200 with `grpc-status`
//! and `grpc-message`, no body), HTTP's to others (the status, the message
//! as the body).

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Full, combinators::BoxBody};

/// The header on answers the mesh made itself, saying why.
pub const ERROR_HEADER: &str = "x-lacewing-error";

/// Whether a request comes from a gRPC client (`application/grpc...`).
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// The answer with `message`: `http_status` to an HTTP client, gRPC's
/// `grpc_code` to a gRPC one.
pub fn own<E>(
    grpc: bool,
    http_status: StatusCode,
    grpc_code: u16,
    message: &'static str,
) -> Response<BoxBody<Bytes, E>> {
    let body = |b: Bytes| Full::new(b).map_err(|never| match never {}).boxed();
    if grpc {
        let mut resp = Response::new(body(Bytes::new()));
        let headers = resp.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        headers.insert("grpc-status", HeaderValue::from(grpc_code));
        headers.insert("grpc-message", HeaderValue::from_static(message));
        resp
    } else {
        let mut resp = Response::new(body(Bytes::from(format!("{message}\n"))));
        *resp.status_mut() = http_status;
        resp
    }
}

/// As [`own`], for a failure the mesh names: `reason` is the message and
/// the [`ERROR_HEADER`].
pub fn mesh_error<E>(
    grpc: bool,
    http_status: StatusCode,
    grpc_code: u16,
    reason: &'static str,
) -> Response<BoxBody<Bytes, E>> {
    let mut resp = own(grpc, http_status, grpc_code, reason);
    resp.headers_mut()
        .insert(ERROR_HEADER, HeaderValue::from_static(reason));
    resp
}
