//! The admin endpoint, on loopback only (`127.0.0.1:15000`, as Envoy's and
//! ztunnel's): what the daemon holds and does, for `lacewing` and for an
//! operator on the node.
//!
//! - `GET /config_dump`: the workloads here, every meshed peer, the
//!   AuthorizationPolicies, HTTP routes (with ejected endpoints), the
//!   TrafficPolicies, the kernel's services, and the certificates held with
//!   their expiry;
//! - `GET /logging` shows the log filter, `POST /logging?level=debug` (or
//!   any `RUST_LOG` filter) changes it at once;
//! - `GET /explain?source=IP&destination=IP:port[&method=GET&path=/x&header=k:v]`:
//!   this node's part of what a connection from `source` to `destination`
//!   would meet ([`crate::explain`]).

use std::{
    sync::{Arc, Mutex},
    time::SystemTime,
};

use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Bytes};
use lacewing_sys::http::{query_param, reply};
use serde_json::json;

use crate::{identity::Identities, lb::LoadBalancer, workloads::LocalWorkloads};

/// What the admin endpoint reads.
pub struct Admin {
    pub node: String,
    pub trust_domain: String,
    pub workloads: Arc<LocalWorkloads>,
    pub identities: Arc<Identities>,
    pub lb: Arc<Mutex<LoadBalancer>>,
    pub outliers: Arc<lacewing_proxy::router::resilience::Outliers>,
    pub breakers: Arc<lacewing_proxy::router::resilience::Breakers>,
    pub log_level: lacewing_sys::telemetry::LogLevel,
    /// The fast path's identity numbers and maps' root (when capturing).
    pub fast_path: Option<(Arc<crate::fastpath::IdentityNumbers>, std::path::PathBuf)>,
}

impl Admin {
    /// Serves on `listener` (once `accepting` resolves) until the task is
    /// dropped.
    pub fn serve(
        self: Arc<Self>,
        listener: tokio::net::TcpListener,
        accepting: impl Future<Output = ()> + Send + 'static,
        admission: lacewing_sys::admission::Admission,
    ) -> tokio::task::JoinHandle<()> {
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(%addr, "admin endpoint: /config_dump, /logging, /explain");
        }
        lacewing_sys::http::serve_with(
            listener,
            Arc::new(move |req: &Request<()>| self.answer(req)),
            accepting,
            admission,
        )
    }

    fn answer(&self, req: &Request<()>) -> Response<Full<Bytes>> {
        match (req.method(), req.uri().path()) {
            (&Method::GET, "/config_dump") => json_reply(&self.config_dump()),
            (&Method::GET, "/logging") => reply(
                StatusCode::OK,
                "text/plain",
                format!("{}\n", self.log_level.current()),
            ),
            (&Method::POST, "/logging") => match query_param(req, "level") {
                None => reply(
                    StatusCode::BAD_REQUEST,
                    "text/plain",
                    "POST /logging?level=<filter>, as level=debug or level=info,lacewing_proxy=debug\n"
                        .into(),
                ),
                Some(level) => match self.log_level.set(&level) {
                    Ok(()) => {
                        tracing::info!(filter = %level, "log filter changed from the admin endpoint");
                        reply(StatusCode::OK, "text/plain", format!("{}\n", self.log_level.current()))
                    }
                    Err(err) => reply(StatusCode::BAD_REQUEST, "text/plain", format!("{err}\n")),
                },
            },
            (&Method::GET, "/explain") => match crate::explain::Query::from_request(req) {
                Ok(query) => json_reply(&crate::explain::explain(&self.view(), &query)),
                Err(err) => reply(StatusCode::BAD_REQUEST, "text/plain", format!("{err}\n")),
            },
            _ => reply(
                StatusCode::NOT_FOUND,
                "text/plain",
                "try GET /config_dump, GET or POST /logging, GET /explain?source=IP&destination=IP:port\n"
                    .into(),
            ),
        }
    }

    /// What `explain` reads.
    fn view(&self) -> crate::explain::View<'_> {
        crate::explain::View {
            node: &self.node,
            trust_domain: &self.trust_domain,
            workloads: &self.workloads,
            lb: &self.lb,
            outliers: &self.outliers,
            breakers: &self.breakers,
            fast_path: self
                .fast_path
                .as_ref()
                .map(|(numbers, root)| (numbers.as_ref(), root.as_path())),
        }
    }

    fn config_dump(&self) -> serde_json::Value {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let certificates: Vec<_> = self
            .identities
            .shown()
            .into_iter()
            .map(|c| {
                json!({
                    "identity": c.identity,
                    "serial": c.serial,
                    "not_after": c.not_after,
                    "expires_in_s": c.not_after.saturating_sub(now),
                })
            })
            .collect();
        let services: Vec<_> = match self.lb.lock().map(|lb| lb.describe()) {
            Ok(Ok(views)) => views
                .into_iter()
                .map(|v| {
                    json!({
                        "name": v.name,
                        "frontend": v.frontend.to_string(),
                        "protocol": format!("{:?}", v.protocol),
                        "algorithm": v.algorithm,
                        "affinity_timeout_s": v.affinity_timeout_s,
                        "backends": v.backends,
                    })
                })
                .collect(),
            _ => Vec::new(),
        };
        let mut dump = self.workloads.dump(&self.trust_domain);
        dump["node"] = json!(self.node);
        dump["services"] = json!(services);
        dump["routes"] = serde_json::to_value(
            self.workloads
                .routes()
                .describe(&crate::ejected(&self.outliers)),
        )
        .unwrap_or_default();
        dump["certificates"] = json!(certificates);
        dump
    }
}

fn json_reply(value: &impl serde::Serialize) -> Response<Full<Bytes>> {
    reply(
        StatusCode::OK,
        "application/json",
        serde_json::to_string_pretty(value).unwrap_or_default(),
    )
}
