//! Policy evaluation: an AuthorizationPolicy spec (YAML) and a request from
//! a source identity, decided for a workload. Input: the spec, a line `%%`,
//! the source identity, then `METHOD /path`, then `name: value` headers.
#![no_main]

use lacewing_core::{
    api::authorization::AuthorizationPolicySpec,
    model::{
        authorization::{self, Policy, Request, Source},
        workloads::Workload,
    },
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    let Some((spec, rest)) = text.split_once("\n%%\n") else {
        return;
    };
    let Ok(spec) = serde_yaml::from_str::<AuthorizationPolicySpec>(spec) else {
        return;
    };
    let policies = [Policy {
        namespace: "shop".into(),
        name: "fuzz".into(),
        spec,
    }];
    let dest = Workload {
        namespace: "shop".into(),
        name: "web-0".into(),
        uid: "u".into(),
        node: "n1".into(),
        service_account: "web".into(),
        addresses: vec!["10.0.0.1".parse().unwrap()],
        meshed: true,
        labels: [("app".to_owned(), "web".to_owned())].into(),
        strict: true,
        access_log: false,
    };
    let (identity, request) = rest.split_once('\n').unwrap_or((rest, ""));
    let (method, path, headers) = lacewing_fuzz::request(request);
    let source = Source { identity };
    let request = Request {
        method,
        path,
        headers: &headers,
    };
    let connection = authorization::decide(&policies, &dest, 8080, &source, None);
    let each = authorization::decide(&policies, &dest, 8080, &source, Some(&request));
    // A connection denied outright has no request that gets through.
    if connection.is_err() && !authorization::needs_requests(&policies, &dest) {
        assert!(each.is_err());
    }
});
