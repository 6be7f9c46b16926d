use super::*;

const YAML: &str = r#"
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: shop
  annotations:
    lacewing.io/backend-weights: "10.244.1.11=2"
spec:
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10, fd00:96::10]
  ports:
  - {name: http, port: 80, protocol: TCP, targetPort: 8080}
  - {name: dns, port: 53, protocol: UDP, targetPort: 5353}
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 30}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abc
  namespace: shop
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports:
- {name: http, port: 8080, protocol: TCP}
- {name: dns, port: 5353, protocol: UDP}
endpoints:
- addresses: [10.244.1.10]
  conditions: {ready: true}
- addresses: [10.244.1.11]
- addresses: [10.244.1.12]
  conditions: {ready: false}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: ignored}
"#;

#[test]
fn services_and_slices_become_frontends_with_ready_backends() {
    let set = parse(YAML).unwrap();
    let names: Vec<_> = set
        .services
        .iter()
        .map(|s| (s.name.as_str(), s.frontend.to_string(), s.protocol))
        .collect();
    assert_eq!(
        names,
        [
            ("shop/web:http", "10.96.0.10:80".to_string(), Protocol::Tcp),
            ("shop/web:dns", "10.96.0.10:53".to_string(), Protocol::Udp),
            (
                "shop/web:http",
                "[fd00:96::10]:80".to_string(),
                Protocol::Tcp
            ),
            (
                "shop/web:dns",
                "[fd00:96::10]:53".to_string(),
                Protocol::Udp
            ),
        ]
    );
    let http = &set.services[0];
    let backends: Vec<_> = http
        .backends
        .iter()
        .map(|b| (b.addr.to_string(), b.weight))
        .collect();
    assert_eq!(
        backends,
        [
            ("10.244.1.10:8080".to_string(), 1),
            ("10.244.1.11:8080".to_string(), 2)
        ]
    );
    assert_eq!(http.affinity_timeout_s, 30);
    assert!(
        set.services[2].backends.is_empty(),
        "no IPv6 slice: the IPv6 frontend refuses"
    );
    set.validate().unwrap();
}

#[test]
fn bad_annotations_say_what_to_fix() {
    let bad = YAML.replace("10.244.1.11=2", "10.244.1.11=0");
    let err = parse(&bad).unwrap_err().to_string();
    assert!(
        err.contains("shop/web") && err.contains("weights start at 1"),
        "{err}"
    );
    let bad = YAML.replace(
        "annotations:",
        "annotations:\n    lacewing.io/lb-algorithm: roundrobin",
    );
    let err = parse(&bad).unwrap_err().to_string();
    assert!(err.contains("not one of random, maglev"), "{err}");
    let err =
        parse("kind: Service\nmetadata: {name: x}\nspec: {clusterIP: nope, ports: [{port: 1}]}")
            .unwrap_err();
    assert!(
        err.to_string().contains("`nope` is not an IP address"),
        "{err}"
    );
}

const WEB: &str = "kind: Service\nmetadata: {name: web, namespace: shop}\nspec: {clusterIP: 10.96.0.10, ports: [{name: http, port: 80}]}\n";

#[test]
fn policies_and_routes_may_only_name_services_that_exist() {
    let ok = format!(
        "{WEB}---\napiVersion: lacewing.io/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: tp, namespace: shop}}\nspec: {{targetRef: {{name: web}}}}\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: r, namespace: shop}}\nspec: {{parentRefs: [{{kind: Service, name: web}}]}}\n"
    );
    assert_eq!(parse(&ok).unwrap().services.len(), 1);

    let missing = ok.replace("targetRef: {name: web}", "targetRef: {name: nope}");
    let err = parse(&missing).unwrap_err().to_string();
    assert!(
        err.contains("document 1")
            && err.contains("TrafficPolicy shop/tp names Service shop/nope, which does not exist"),
        "{err}"
    );

    let route = ok.replace(
        "parentRefs: [{kind: Service, name: web}]}",
        "parentRefs: [{kind: Service, name: web}], rules: [{backendRefs: [{name: gone, port: 80}]}]}",
    );
    let err = parse(&route).unwrap_err().to_string();
    assert!(
        err.contains("HTTPRoute shop/r names Service shop/gone"),
        "{err}"
    );
}

#[test]
fn fields_no_node_acts_on_yet_are_rejected_as_unsupported_naming_them() {
    let cases = [(
        "apiVersion: lacewing.io/v1alpha1\nkind: MeshConfig\nmetadata: {name: default}\nspec: {trustDomain: example.org, mtlsMode: Strict}\n",
        "MeshConfig default: spec.trustDomain not enforced by the data path yet; it is not applied until that field is removed (Accepted: False, reason Unsupported)",
    )];
    for (doc, expected) in cases {
        let err = parse(&format!("{WEB}---\n{doc}")).unwrap_err().to_string();
        assert!(err.contains(expected), "{err}");
    }
    // L7 conditions of an AuthorizationPolicy are enforced (per request, at
    // the destination): accepted.
    let l7 = "apiVersion: lacewing.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: get-only, namespace: shop}\nspec: {action: Allow, rules: [{to: [{ports: [80], methods: [GET], paths: [/api/*]}], when: [{header: x-env, values: [prod]}]}]}\n";
    assert!(parse(&format!("{WEB}---\n{l7}")).is_ok());
    // So are HTTPRoutes' rules (routed per request, at the source).
    let route = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r, namespace: shop}\nspec: {parentRefs: [{kind: Service, name: web}], rules: [{backendRefs: [{name: web, port: 80, weight: 90}]}]}\n";
    assert!(parse(&format!("{WEB}---\n{route}")).is_ok());
}

#[test]
fn traffic_policies_are_checked_one_per_port_and_set_the_kernel_s_algorithm() {
    let tp = |name: &str, spec: &str| {
        format!(
            "apiVersion: lacewing.io/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: {name}, namespace: shop}}\nspec: {{targetRef: {{name: web}}, {spec}}}\n"
        )
    };
    let err = parse(&format!(
        "{WEB}---\n{}",
        tp("bad", "retries: {attempts: 2, perTryTimeout: soon}")
    ))
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("TrafficPolicy shop/bad: spec.retries.perTryTimeout: `soon` is not a duration such as 500ms, 10s or 1m30s (Accepted: False, reason Invalid)"),
        "{err}"
    );
    let err = parse(&format!(
        "{WEB}---\n{}---\n{}",
        tp("b", "timeout: 1s"),
        tp("a", "timeout: 2s")
    ))
    .unwrap_err()
    .to_string();
    assert!(
        err.contains(
            "TrafficPolicy shop/b: TrafficPolicy shop/a already applies to the same Service port"
        ) && err.contains("reason Conflicted"),
        "{err}"
    );
    let set = parse(&format!(
        "{WEB}---\n{}",
        tp("maglev", "loadBalancer: {algorithm: Maglev, maglevTableSize: 251}, sessionAffinity: {clientIpTimeoutSeconds: 60}")
    ))
    .unwrap();
    let entry = &set.services[0];
    assert_eq!(
        (entry.algorithm, entry.affinity_timeout_s),
        (
            crate::model::services::Algorithm::Maglev { table_size: 251 },
            60
        )
    );
}

#[test]
fn http_fields_on_ports_that_are_not_http_are_refused_or_said() {
    let db = "kind: Service\nmetadata: {name: db, namespace: shop}\nspec: {clusterIP: 10.96.0.11, ports: [{name: tcp-pg, port: 5432}, {name: http-admin, port: 8080}]}\n";
    let tp = |port: &str| {
        format!(
            "apiVersion: lacewing.io/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: db, namespace: shop}}\nspec: {{targetRef: {{name: db{port}}}, fault: {{abort: {{percent: 10, httpStatus: 503}}}}}}\n"
        )
    };
    let err = parse(&format!("{db}---\n{}", tp(", port: 5432")))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("TrafficPolicy shop/db: its timeout, retries, circuitBreaker, outlierDetection, fault and HTTP balancing act on HTTP requests; Service shop/db port 5432 does not speak HTTP (appProtocol or port name): remove those fields or target an HTTP port (Accepted: False, reason NotHTTP)"),
        "{err}"
    );
    // Both ports: accepted, and its condition says where the fault skips.
    let mut objects = Objects::default();
    objects
        .add_yaml("", &format!("{db}---\n{}", tp("")))
        .unwrap();
    let t = translate_all(&[&objects]).unwrap();
    assert_eq!(t.declared.traffic.len(), 1);
    let accepted = &t.verdicts[0].conditions[0];
    assert_eq!(
        (accepted.status.as_str(), accepted.reason.as_str()),
        ("True", "Accepted")
    );
    assert!(accepted.message.ends_with("port 5432 does not speak HTTP (appProtocol or port name), where only its other fields apply"), "{}", accepted.message);
}

#[test]
fn a_policy_with_a_bad_identity_or_shape_is_rejected() {
    let authz = format!(
        "{WEB}---\napiVersion: lacewing.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: deny-all, namespace: shop}}\nspec: {{action: Deny, rules: [{{from: [{{principals: [\"spiffe://cluster.local/ns/shop\"]}}]}}]}}\n"
    );
    let err = parse(&authz).unwrap_err().to_string();
    assert!(
        err.contains("AuthorizationPolicy shop/deny-all") && err.contains("InvalidPrincipal"),
        "{err}"
    );
    let good = authz.replace(
        "spiffe://cluster.local/ns/shop\"",
        "spiffe://cluster.local/ns/shop/sa/web\"",
    );
    assert!(parse(&good).is_ok());
    let bad_shape = format!(
        "{WEB}---\nkind: TrafficPolicy\nmetadata: {{name: tp, namespace: shop}}\nspec: {{targetRef: {{name: web}}, retries: {{attempts: lots}}}}\n"
    );
    let err = parse(&bad_shape).unwrap_err().to_string();
    assert!(
        err.contains("document 1") && err.contains("\"lots\", expected u32"),
        "{err}"
    );
}

const PODS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {lacewing.io/mesh: enabled}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: web, namespace: shop}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, uid: u1, labels: {app: web}}
spec: {nodeName: n1, serviceAccountName: web}
status: {phase: Running, podIP: 10.244.1.10, podIPs: [{ip: 10.244.1.10}, {ip: "fd00:244:1::10"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: opted-out, namespace: shop, labels: {lacewing.io/mesh: disabled}}
spec: {nodeName: n1}
status: {phase: Running, podIP: 10.244.1.11}
---
apiVersion: v1
kind: Pod
metadata: {name: other, namespace: default}
spec: {nodeName: n0}
status: {phase: Running, podIP: 10.244.0.10}
---
apiVersion: v1
kind: Pod
metadata: {name: pending, namespace: shop}
spec: {}
---
apiVersion: v1
kind: Pod
metadata: {name: done, namespace: shop}
spec: {nodeName: n1}
status: {phase: Succeeded, podIP: 10.244.1.12}
"#;

fn workloads(text: &str) -> Result<Vec<crate::model::workloads::Workload>, K8sError> {
    let mut objects = Objects::default();
    objects.add_yaml("pods.yaml", text)?;
    Ok(translate_all(&[&objects])?.strict()?.workloads)
}

#[test]
fn pods_become_workloads_meshed_by_their_namespace() {
    let w = workloads(PODS).unwrap();
    let names: Vec<(&str, &str, bool)> = w
        .iter()
        .map(|w| (w.name.as_str(), w.node.as_str(), w.meshed))
        .collect();
    // Unscheduled and finished pods are not workloads.
    assert_eq!(
        names,
        [
            ("web-1", "n1", true),
            ("opted-out", "n1", false),
            ("other", "n0", false)
        ]
    );
    assert_eq!(w[0].addresses.len(), 2);
    assert_eq!(
        w[0].identity("cluster.local"),
        "spiffe://cluster.local/ns/shop/sa/web"
    );
    assert_eq!(w[1].service_account, "default");
}

#[test]
fn the_mesh_config_switches_access_logs_per_namespace_and_keeps_the_mesh_wide_mtls_mode() {
    let with = |spec: &str| {
        workloads(&format!(
            "{PODS}---\napiVersion: lacewing.io/v1alpha1\nkind: MeshConfig\nmetadata: {{name: default}}\nspec: {spec}\n"
        ))
        .unwrap()
        .into_iter()
        .map(|w| (w.name, w.strict, w.access_log))
        .collect::<Vec<_>>()
    };
    // A namespace's entry that names only accessLogging keeps the
    // mesh-wide mTLS mode; pods outside the mesh are never logged.
    assert_eq!(
        with("{mtlsMode: Strict, namespaces: [{namespace: shop, accessLogging: true}]}"),
        [
            ("web-1".to_owned(), true, true),
            ("opted-out".to_owned(), false, false),
            ("other".to_owned(), false, false)
        ]
    );
    assert_eq!(
        with(
            "{mtlsMode: Permissive, accessLogging: true, namespaces: [{namespace: shop, accessLogging: false}]}"
        )[0],
        ("web-1".to_owned(), false, false)
    );
    assert_eq!(
        with("{accessLogging: true, namespaces: [{namespace: shop, mtlsMode: Permissive}]}")[0],
        ("web-1".to_owned(), false, true)
    );
}

#[test]
fn a_pod_running_as_a_missing_service_account_is_rejected() {
    let text = PODS.replace("serviceAccountName: web", "serviceAccountName: ghost");
    let err = workloads(&text).unwrap_err().to_string();
    assert!(
        err.contains("pods.yaml: document 2")
            && err.contains("Pod shop/web-1 runs as ServiceAccount ghost, which does not exist"),
        "{err}"
    );
}

/// The Kubernetes source's typed objects, as the API serves them.
fn typed(text: &str) -> Objects {
    let mut objects = Objects::default();
    for doc in serde_yaml::Deserializer::from_str(text) {
        let value = serde_yaml::Value::deserialize(doc).unwrap();
        let kind: Kind = serde_yaml::from_value(value.clone()).unwrap();
        let object = match kind.kind.as_deref() {
            Some("Service") => Typed::Service(serde_yaml::from_value(value).unwrap()),
            Some("EndpointSlice") => Typed::EndpointSlice(serde_yaml::from_value(value).unwrap()),
            _ => continue,
        };
        objects.add_typed("typed", object).unwrap();
    }
    objects
}

#[test]
fn typed_objects_read_as_their_yaml_does() {
    let from_yaml = parse(YAML).unwrap();
    let from_typed = translate_all(&[&typed(YAML)]).unwrap().strict().unwrap();
    assert_eq!(from_typed.services, from_yaml);
}

#[test]
fn typed_objects_out_of_the_models_range_say_which_field() {
    let mut service: corev1::Service = serde_yaml::from_str(
        "metadata: {name: web, namespace: shop}\nspec: {clusterIP: 10.96.0.10, ports: [{port: 70000}]}",
    )
    .unwrap();
    let err = Objects::default()
        .add_typed("Service shop/web", Typed::Service(service.clone()))
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "Service shop/web: spec.ports[].port 70000 is not a port number from 1 to 65535"
    );
    service.spec.as_mut().unwrap().ports = None;
    let slice: discoveryv1::EndpointSlice = serde_yaml::from_str(
        "metadata: {name: web-1, namespace: shop}\naddressType: IPv4\nendpoints: [{addresses: [10.0.0.300]}]",
    )
    .unwrap();
    let err = Objects::default()
        .add_typed("EndpointSlice shop/web-1", Typed::EndpointSlice(slice))
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "EndpointSlice shop/web-1: endpoints[].addresses: `10.0.0.300` is not an IP address"
    );
}

#[test]
fn a_route_no_node_could_apply_is_refused_with_gateway_api_reasons() {
    let route = |rules: &str| {
        let yaml = format!(
            "{WEB}---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: r, namespace: shop}}\nspec: {{parentRefs: [{{kind: Service, name: web}}], rules: [{rules}]}}\n"
        );
        let mut objects = Objects::default();
        objects.add_yaml("routes.yaml", &yaml).unwrap();
        let translation = translate_all(&[&objects]).unwrap();
        let conditions = &translation.verdicts[0].conditions;
        conditions
            .iter()
            .map(|c| format!("{}={} {}: {}", c.type_, c.status, c.reason, c.message))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        route("{matches: [{path: {type: RegularExpression, value: '/v[0-9'}}]}")[0]
            .lines()
            .next()
            .unwrap(),
        "Accepted=False UnsupportedValue: HTTPRoute shop/r: rules[0]: path match `/v[0-9` is not a valid regular expression: regex parse error:"
    );
    assert_eq!(
        route("{backendRefs: [{group: multicluster.x-k8s.io, kind: ServiceImport, name: web}]}"),
        [
            "Accepted=True Accepted: ",
            "ResolvedRefs=False InvalidKind: HTTPRoute shop/r: rules[0]: backendRef web is a ServiceImport; only Services can be backends",
        ]
    );
    // A route the nodes apply: accepted, its references resolved.
    assert_eq!(
        route("{backendRefs: [{name: web, port: 80, weight: 90}]}"),
        [
            "Accepted=True Accepted: ",
            "ResolvedRefs=True ResolvedRefs: "
        ]
    );
}
