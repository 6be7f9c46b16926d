//! Route matching and filters: an HTTPRoute spec (YAML) compiled to rules,
//! then a request matched against each rule and the filters of the rule it
//! matches applied (path rewrite, redirect, header changes).
//!
//! Input: the spec, a line `%%`, then the request: `METHOD /path?query`
//! and `name: value` header lines.
#![no_main]

use http::Method;
use lacewing_core::{
    api::http_route::HttpRouteSpec,
    model::routes::{self, Filter, RequestView, RouteId},
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    let Some((spec, request)) = text.split_once("\n%%\n") else {
        return;
    };
    let Ok(spec) = serde_yaml::from_str::<HttpRouteSpec>(spec) else {
        return;
    };
    let id = RouteId {
        namespace: "shop".into(),
        name: "fuzz".into(),
    };
    let Ok(rules) = routes::compile(&id, &spec) else {
        return;
    };
    let (method, target, headers) = lacewing_fuzz::request(request);
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return;
    };
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    let view = RequestView {
        method: &method,
        path,
        query,
        headers: &headers,
    };
    for rule in &rules {
        let Some(matched) = rule.matches.iter().find(|m| m.matches(&view)) else {
            continue;
        };
        let mut headers = headers.clone();
        for filter in &rule.filters {
            match filter {
                Filter::RequestHeaders(m) | Filter::ResponseHeaders(m) => {
                    routes::modify_headers(&mut headers, m);
                }
                Filter::Rewrite {
                    path: Some(rewrite),
                    ..
                } => {
                    let rewritten = routes::rewrite_path(path, rewrite, matched);
                    assert!(rewritten.starts_with('/'), "{rewritten:?} from {path:?}");
                }
                Filter::Redirect(r) => {
                    let location = routes::redirect_location(
                        r,
                        matched,
                        "http",
                        "web.shop",
                        Some(80),
                        path,
                        query,
                    );
                    assert!(location.contains("://"), "{location:?}");
                }
                _ => {}
            }
        }
        break;
    }
});
