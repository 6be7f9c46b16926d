//! The plain HTTP endpoint of a daemon (the node's :15020, the controller's
//! :15014): `/metrics` (Prometheus text, OpenMetrics when asked), `/healthz`
//! (the process is up), `/readyz`, and an optional JSON `/status`.

use std::{
    convert::Infallible,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use http_body_util::Full;
use hyper::{
    Request, Response, StatusCode, body::Bytes, header::CONTENT_TYPE, service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::admission::{Admission, Admitted};

/// OpenMetrics, for scrapers that ask for it (Prometheus does).
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The classic Prometheus text format, for everything else (curl, promtool).
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// What the endpoint serves.
pub struct Endpoint {
    pub registry: Registry,
    /// The node: datapath attached and first configuration applied; the
    /// controller: serving.
    pub ready: AtomicBool,
    /// JSON for `/status`, if the daemon has one.
    pub status: Option<Box<dyn Fn() -> String + Send + Sync>>,
    /// JSON for `/routes` (the node's HTTP routes), if the daemon has one.
    pub routes: Option<Box<dyn Fn() -> String + Send + Sync>>,
}

/// Serves `endpoint` on `listener` (once `accepting` resolves) until the
/// task is dropped.
pub fn serve(
    listener: TcpListener,
    endpoint: Arc<Endpoint>,
    accepting: impl Future<Output = ()> + Send + 'static,
    admission: Admission,
) -> tokio::task::JoinHandle<()> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
    }
    serve_with(
        listener,
        Arc::new(move |req: &Request<()>| route(&endpoint, req)),
        accepting,
        admission,
    )
}

/// What answers one request of a plain HTTP endpoint (the request's head:
/// these endpoints take no bodies; a change is a `POST` with a query).
pub type Handler = Arc<dyn Fn(&Request<()>) -> Response<Full<Bytes>> + Send + Sync>;

/// Serves HTTP/1.1 on `listener` with `handler` until the task is dropped,
/// accepting from when `accepting` resolves (a daemon taking over a
/// listener waits for its predecessor to stop). `admission` caps what one
/// source may hold; a client has its handshake timeout to send each
/// request's head (an idle keep-alive connection too), which may be at most
/// its header limit (past it: 431).
pub fn serve_with(
    listener: TcpListener,
    handler: Handler,
    accepting: impl Future<Output = ()> + Send + 'static,
    admission: Admission,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        accepting.await;
        let limits = admission.limits().clone();
        loop {
            let Admitted {
                stream,
                slot,
                handshake,
                ..
            } = admission.accept(&listener).await;
            // Plain HTTP has no handshake: the header timeout bounds a
            // client that sends nothing.
            drop(handshake);
            let handler = Arc::clone(&handler);
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                    let handler = Arc::clone(&handler);
                    async move {
                        let (parts, _) = req.into_parts();
                        Ok::<_, Infallible>(handler(&Request::from_parts(parts, ())))
                    }
                });
                // One bad client closes its own connection, nothing else.
                if let Err(err) = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(limits.handshake_timeout)
                    .max_header_size(limits.max_header_bytes as usize)
                    .serve_connection(TokioIo::new(stream), service)
                    .await
                {
                    tracing::debug!(%err, "plain HTTP connection ended with an error");
                }
                drop(slot);
            });
        }
    })
}

/// The value of `name` in a request's query (`?level=debug`),
/// percent-decoded (`+` is a space).
pub fn query_param(req: &Request<()>, name: &str) -> Option<String> {
    query_params(req, name).into_iter().next()
}

/// Every value of `name` in a request's query, in order, percent-decoded.
pub fn query_params(req: &Request<()>, name: &str) -> Vec<String> {
    req.uri()
        .query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (k == name).then(|| percent_decode(v))
        })
        .collect()
}

/// `%XX` escapes and `+` (a space, as forms send it) decoded; a broken
/// escape is kept as it is.
pub fn percent_decode(text: &str) -> String {
    percent_encoding::percent_decode_str(&text.replace('+', " "))
        .decode_utf8_lossy()
        .into_owned()
}

/// `text` with everything but unreserved characters (RFC 3986) escaped,
/// for a query.
pub fn percent_encode(text: &str) -> String {
    const RESERVED: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'.')
        .remove(b'_')
        .remove(b'~');
    percent_encoding::utf8_percent_encode(text, RESERVED).to_string()
}

fn route<B>(endpoint: &Endpoint, req: &Request<B>) -> Response<Full<Bytes>> {
    match req.uri().path() {
        "/metrics" => {
            let mut text = String::new();
            let openmetrics = req
                .headers()
                .get(hyper::header::ACCEPT)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.contains("application/openmetrics-text"));
            match prometheus_client::encoding::text::encode(&mut text, &endpoint.registry) {
                Ok(()) if openmetrics => reply(StatusCode::OK, OPENMETRICS, text),
                Ok(()) => reply(StatusCode::OK, PROMETHEUS_TEXT, to_prometheus_text(&text)),
                Err(_) => reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    "encoding metrics failed\n".into(),
                ),
            }
        }
        "/healthz" => reply(StatusCode::OK, "text/plain", "ok\n".into()),
        "/routes" if endpoint.routes.is_some() => {
            let json = endpoint.routes.as_ref().map(|f| f()).unwrap_or_default();
            reply(StatusCode::OK, "application/json", json)
        }
        "/status" if endpoint.status.is_some() => {
            let json = endpoint.status.as_ref().map(|f| f()).unwrap_or_default();
            reply(StatusCode::OK, "application/json", json)
        }
        "/readyz" if endpoint.ready.load(Ordering::Acquire) => {
            reply(StatusCode::OK, "text/plain", "ready\n".into())
        }
        "/readyz" => reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "not ready\n".into(),
        ),
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "try /metrics, /healthz, /readyz or /status\n".into(),
        ),
    }
}

/// OpenMetrics names a counter family `x` and its sample `x_total`; the
/// classic text format names both `x_total` and has no `# EOF`.
fn to_prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

/// A response of `status` with `body`.
pub fn reply(
    status: StatusCode,
    content_type: &'static str,
    body: String,
) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::to_prometheus_text;

    #[test]
    fn query_values_are_percent_decoded() {
        let v = "GET /a b:c,d";
        assert_eq!(super::percent_decode(&super::percent_encode(v)), v);
        assert_eq!(super::percent_decode("a+b%2Fc%3a%zz%"), "a b/c:%zz%");
        let req = hyper::Request::get("/x?header=a%3Ab&header=c%3Ad&level=info")
            .body(())
            .unwrap();
        assert_eq!(super::query_params(&req, "header"), ["a:b", "c:d"]);
        assert_eq!(super::query_param(&req, "level").as_deref(), Some("info"));
    }

    #[test]
    fn counters_get_their_total_name_in_the_classic_format() {
        let om = "# HELP x_connections Connects.\n# TYPE x_connections counter\nx_connections_total{a=\"b\"} 3\n# HELP x_up Up.\n# TYPE x_up gauge\nx_up 1\n# EOF\n";
        assert_eq!(
            to_prometheus_text(om),
            "# HELP x_connections_total Connects.\n# TYPE x_connections_total counter\nx_connections_total{a=\"b\"} 3\n# HELP x_up Up.\n# TYPE x_up gauge\nx_up 1\n"
        );
    }
}
