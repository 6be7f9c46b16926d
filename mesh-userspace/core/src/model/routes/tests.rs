use http::{HeaderMap, Method};

use super::*;

fn route(ns: &str, name: &str, yaml: &str) -> Vec<Rule> {
    let spec: HttpRouteSpec = serde_yaml::from_str(yaml).unwrap();
    compile(
        &RouteId {
            namespace: ns.to_owned(),
            name: name.to_owned(),
        },
        &spec,
    )
    .unwrap()
}

fn error(yaml: &str) -> String {
    let spec: HttpRouteSpec = serde_yaml::from_str(yaml).unwrap();
    compile(
        &RouteId {
            namespace: "shop".to_owned(),
            name: "r".to_owned(),
        },
        &spec,
    )
    .unwrap_err()
    .to_string()
}

/// The rule chosen for a request, as `route#rule`, or "404".
fn chosen(
    table: &ServiceRoutes,
    ns: &str,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
) -> String {
    let (path, query) = target
        .split_once('?')
        .map_or((target, None), |(p, q)| (p, Some(q)));
    let mut map = HeaderMap::new();
    for (k, v) in headers {
        map.append(
            HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    let method = Method::from_bytes(method.as_bytes()).unwrap();
    let req = RequestView {
        method: &method,
        path,
        query,
        headers: &map,
    };
    table
        .select(80, ns, &req)
        .map_or("404".to_owned(), |(r, _)| {
            format!("{}#{}", r.route.name, r.index)
        })
}

#[test]
fn a_prefix_matches_whole_segments() {
    let mut t = ServiceRoutes::default();
    t.add(
        route(
            "shop",
            "r",
            "rules: [{matches: [{path: {type: PathPrefix, value: /v2/}}]}]",
        ),
        None,
        None,
        0,
    );
    for (path, want) in [
        ("/v2", "r#0"),
        ("/v2/", "r#0"),
        ("/v2/items", "r#0"),
        ("/v2example", "404"),
        ("/v1", "404"),
    ] {
        assert_eq!(chosen(&t, "shop", "GET", path, &[]), want, "{path}");
    }
}

#[test]
fn precedence_follows_gateway_api() {
    let mut t = ServiceRoutes::default();
    // Added in an order unlike the precedence, across three routes.
    t.add(
        route(
            "shop",
            "b-route",
            r#"
rules:
- matches: [{path: {value: /}}]
- matches: [{path: {value: /api}}]
- matches: [{path: {value: /api}, method: POST}]
- matches: [{path: {value: /api}, headers: [{name: x-tier, value: gold}]}]
- matches: [{path: {value: /api}, headers: [{name: x-tier, value: gold}, {name: x-b, value: "1"}]}]
- matches: [{path: {value: /api}, queryParams: [{name: v, value: "2"}]}]
- matches: [{path: {type: Exact, value: /api/items}}]
- matches: [{path: {type: RegularExpression, value: "/api/items/[0-9]+"}}]
"#,
        ),
        None,
        None,
        10,
    );
    // Same match as b-route's rule 1, older: it wins the tie.
    t.add(
        route(
            "shop",
            "z-old",
            "rules: [{matches: [{path: {value: /api/v1}}]}, {matches: [{path: {value: /api}}]}]",
        ),
        None,
        None,
        5,
    );
    // Same match and same age as b-route's: alphabetical wins.
    t.add(
        route(
            "shop",
            "a-route",
            "rules: [{matches: [{path: {value: /api/items/x}}]}]",
        ),
        None,
        None,
        10,
    );
    type Case<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)], &'a str);
    let cases: [Case<'_>; 10] = [
        ("GET", "/api/items", &[], "b-route#6"),
        ("GET", "/api/items/42", &[], "b-route#7"),
        ("GET", "/api/items/x/1", &[], "a-route#0"),
        ("GET", "/api/v1/a", &[], "z-old#0"),
        ("POST", "/api/a", &[("x-tier", "gold")], "b-route#2"),
        (
            "GET",
            "/api/a",
            &[("x-tier", "gold"), ("x-b", "1")],
            "b-route#4",
        ),
        ("GET", "/api/a", &[("X-Tier", "gold")], "b-route#3"),
        ("GET", "/api/a?v=2&v=3", &[], "b-route#5"),
        ("GET", "/api/a?v=3&v=2", &[], "z-old#1"),
        ("GET", "/other", &[], "b-route#0"),
    ];
    for (method, target, headers, want) in cases {
        assert_eq!(
            chosen(&t, "shop", method, target, headers),
            want,
            "{method} {target} {headers:?}"
        );
    }
}

#[test]
fn a_regular_expression_matches_the_whole_value() {
    let mut t = ServiceRoutes::default();
    t.add(
        route(
            "shop",
            "r",
            "rules: [{matches: [{path: {type: RegularExpression, value: '/v[0-9]'}, headers: [{type: RegularExpression, name: user, value: 'a.*'}]}]}]",
        ),
        None,
        None,
        0,
    );
    assert_eq!(
        chosen(&t, "shop", "GET", "/v1", &[("user", "alice")]),
        "r#0"
    );
    assert_eq!(
        chosen(&t, "shop", "GET", "/v1/x", &[("user", "alice")]),
        "404"
    );
    assert_eq!(
        chosen(&t, "shop", "GET", "/v1", &[("user", "bob-alice")]),
        "404"
    );
}

#[test]
fn a_consumer_route_applies_only_to_its_namespace_and_replaces_the_producers_there() {
    let mut t = ServiceRoutes::default();
    t.add(route("shop", "producer", "rules: [{}]"), None, None, 0);
    t.add(
        route(
            "front",
            "consumer",
            "rules: [{matches: [{path: {value: /only}}]}]",
        ),
        None,
        Some("front".to_owned()),
        1,
    );
    assert_eq!(chosen(&t, "shop", "GET", "/x", &[]), "producer#0");
    assert_eq!(chosen(&t, "other", "GET", "/only", &[]), "producer#0");
    assert_eq!(chosen(&t, "front", "GET", "/only", &[]), "consumer#0");
    // For the consumer's namespace the producer route is gone: 404.
    assert_eq!(chosen(&t, "front", "GET", "/x", &[]), "404");
}

#[test]
fn a_route_bound_to_a_port_applies_to_that_port_only() {
    let mut t = ServiceRoutes::default();
    t.add(route("shop", "r", "rules: [{}]"), Some(8080), None, 0);
    assert!(t.applies(8080, "shop"));
    assert!(!t.applies(80, "shop"));
    assert_eq!(
        chosen(&t, "shop", "GET", "/", &[]),
        "404",
        "port 80 has no route"
    );
}

#[test]
fn bad_routes_say_what_to_fix() {
    assert_eq!(
        error("rules: [{matches: [{path: {type: RegularExpression, value: '/v[0-9'}}]}]")
            .lines()
            .next()
            .unwrap(),
        "rules[0]: path match `/v[0-9` is not a valid regular expression: regex parse error:"
    );
    assert_eq!(
        error("rules: [{}, {filters: [{type: ExtensionRef}]}]"),
        "rules[1]: filter type `ExtensionRef` is not supported (Lacewing supports RequestHeaderModifier, ResponseHeaderModifier, RequestRedirect, URLRewrite, RequestMirror)"
    );
    assert_eq!(
        error("rules: [{backendRefs: [{kind: ServiceImport, name: web}]}]"),
        "rules[0]: backendRef web is a ServiceImport; only Services can be backends"
    );
    assert_eq!(
        error("rules: [{filters: [{type: RequestRedirect, requestRedirect: {statusCode: 304}}]}]"),
        "rules[0]: redirect statusCode `304` is not one of 301, 302, 303, 307, 308"
    );
    assert_eq!(
        error("rules: [{timeouts: {request: 1s, backendRequest: 2s}}]"),
        "rules[0]: timeouts.backendRequest (2s) must not be longer than timeouts.request (1s)"
    );
    assert_eq!(
        error("rules: [{timeouts: {request: 1.5s}}]"),
        "rules[0]: timeouts.request `1.5s` is not a Gateway API duration such as 500ms, 10s or 1m30s"
    );
    assert_eq!(
        error(
            "rules: [{matches: [{path: {type: Exact, value: /a}}], filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /b}}}]}]"
        ),
        "rules[0]: ReplacePrefixMatch needs every match of the rule to be a PathPrefix"
    );
}

#[test]
fn gateway_durations() {
    assert_eq!(
        crate::duration::gateway("500ms"),
        Some(Duration::from_millis(500))
    );
    assert_eq!(
        crate::duration::gateway("1m30s"),
        Some(Duration::from_secs(90))
    );
    assert_eq!(
        crate::duration::gateway("1h"),
        Some(Duration::from_secs(3600))
    );
    assert_eq!(crate::duration::gateway("0s"), Some(Duration::ZERO));
    for bad in ["", "1", "s", "1.5s", "1d", "123456s", "1h1h1h1h1h"] {
        assert_eq!(crate::duration::gateway(bad), None, "{bad}");
    }
    // 0s disables a timeout.
    let rules = route(
        "shop",
        "r",
        "rules: [{timeouts: {request: 0s, backendRequest: 250ms}}]",
    );
    assert_eq!(
        rules[0].timeouts,
        Timeouts {
            request: None,
            backend_request: Some(Duration::from_millis(250))
        }
    );
}

#[test]
fn rewrites_and_redirects_build_what_gateway_api_says() {
    let rules = route("shop", "r", "rules: [{matches: [{path: {value: /old}}]}]");
    let m = &rules[0].matches[0];
    let prefix =
        |with: &str, path: &str| rewrite_path(path, &PathRewrite::Prefix(with.to_owned()), m);
    assert_eq!(prefix("/new", "/old/a"), "/new/a");
    assert_eq!(prefix("/new", "/old"), "/new");
    assert_eq!(prefix("/", "/old/a"), "/a");
    assert_eq!(prefix("/", "/old"), "/");
    assert_eq!(prefix("/new/", "/old/a"), "/new/a");
    let redirect = |yaml: &str| -> Redirect {
        let r = route(
            "shop",
            "r",
            &format!(
                "rules: [{{matches: [{{path: {{value: /old}}}}], filters: [{{type: RequestRedirect, requestRedirect: {yaml}}}]}}]"
            ),
        );
        match &r[0].filters[0] {
            Filter::Redirect(r) => r.clone(),
            other => panic!("{other:?}"),
        }
    };
    let r = redirect("{scheme: https}");
    assert_eq!(r.status, 302);
    assert_eq!(
        redirect_location(&r, m, "http", "web.shop", Some(8080), "/old/a", Some("x=1")),
        "https://web.shop/old/a?x=1"
    );
    let r = redirect(
        "{hostname: example.com, port: 8443, statusCode: 301, path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}}",
    );
    assert_eq!(
        redirect_location(&r, m, "http", "web.shop", None, "/old/a", None),
        "http://example.com:8443/new/a"
    );
    let r = redirect("{path: {type: ReplaceFullPath, replaceFullPath: /x}}");
    assert_eq!(
        redirect_location(&r, m, "http", "web.shop", Some(80), "/old/a", None),
        "http://web.shop/x"
    );
}

#[test]
fn header_modifiers_set_add_and_remove() {
    let mut headers = HeaderMap::new();
    headers.insert("x-keep", "1".parse().unwrap());
    headers.insert("x-set", "old".parse().unwrap());
    headers.insert("x-drop", "1".parse().unwrap());
    headers.insert("x-add", "a".parse().unwrap());
    let m: HeaderModifier = serde_yaml::from_str(
        "{set: [{name: X-Set, value: new}], add: [{name: x-add, value: b}], remove: [x-drop]}",
    )
    .unwrap();
    modify_headers(&mut headers, &m);
    assert_eq!(headers["x-set"], "new");
    assert_eq!(
        headers.get_all("x-add").iter().collect::<Vec<_>>(),
        ["a", "b"]
    );
    assert!(!headers.contains_key("x-drop"));
    assert_eq!(headers["x-keep"], "1");
}

#[test]
fn mirrors_and_weights_read_their_defaults() {
    let rules = route(
        "shop",
        "r",
        r#"
rules:
- backendRefs: [{name: web, port: 80, weight: 90}, {name: canary, port: 80, weight: 10}, {name: dark, namespace: lab}]
  filters:
  - {type: RequestMirror, requestMirror: {backendRef: {name: shadow, port: 80}, percent: 25}}
  - {type: RequestMirror, requestMirror: {backendRef: {name: shadow2}, fraction: {numerator: 1, denominator: 3}}}
  - {type: RequestMirror, requestMirror: {backendRef: {name: shadow3}}}
"#,
    );
    let weights: Vec<_> = rules[0]
        .backends
        .iter()
        .map(|b| (b.namespace.as_str(), b.name.as_str(), b.weight))
        .collect();
    assert_eq!(
        weights,
        [
            ("shop", "web", 90),
            ("shop", "canary", 10),
            ("lab", "dark", 1)
        ]
    );
    let fractions: Vec<_> = rules[0]
        .filters
        .iter()
        .map(|f| match f {
            Filter::Mirror { backend, fraction } => (backend.name.as_str(), *fraction),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        fractions,
        [
            ("shadow", (25, 100)),
            ("shadow2", (1, 3)),
            ("shadow3", (100, 100))
        ]
    );
}
