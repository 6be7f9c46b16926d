//! AuthorizationPolicy as the nodes enforce it: by source identity, source
//! namespace and destination port for a connection, and also by method,
//! path and headers for each HTTP request. Deny wins; when ALLOW policies
//! select a workload, a connection (a request) must match one of them;
//! with no policy selecting it, everything is allowed.
//!
//! A rule with L7 conditions (methods, paths, `when` headers) is decided per
//! request, by the destination's node ([`needs_requests`] says when). For the
//! connection itself ([`decide`] with no request), such a rule in a DENY
//! policy does not match (its requests are checked one by one), and in an
//! ALLOW policy it matches on its L4 parts (its requests narrow it).

use crate::api::authorization::{Action, AuthorizationPolicySpec, Rule};

use super::workloads::Workload;

/// An accepted AuthorizationPolicy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub namespace: String,
    pub name: String,
    pub spec: AuthorizationPolicySpec,
}

impl Policy {
    /// `namespace/name`, as logs and metrics name it.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Whether its selector picks `w` (and it is in `w`'s namespace).
    pub fn selects(&self, w: &Workload) -> bool {
        self.namespace == w.namespace
            && self
                .spec
                .selector
                .match_labels
                .iter()
                .all(|(k, v)| w.labels.get(k) == Some(v))
    }
}

/// Who connects: the source's SPIFFE identity.
pub struct Source<'a> {
    pub identity: &'a str,
}

impl Source<'_> {
    /// The workload's namespace, from its typed identity.
    fn namespace(&self) -> Option<String> {
        self.identity
            .parse::<crate::identity::Identity>()
            .ok()?
            .namespace()
            .map(str::to_owned)
    }
}

/// Why a connection is denied: the policy that decided it.
#[derive(Debug, PartialEq, Eq)]
pub struct Denied {
    /// `namespace/name` of the deciding policy.
    pub policy: String,
    pub reason: String,
}

/// One HTTP request, as L7 conditions read it.
pub struct Request<'a> {
    pub method: &'a str,
    /// Without the query.
    pub path: &'a str,
    pub headers: &'a http::HeaderMap,
}

/// Whether any policy selecting `dest` has a rule with L7 conditions: then
/// the connection's HTTP requests are decided one by one.
pub fn needs_requests(policies: &[Policy], dest: &Workload) -> bool {
    policies
        .iter()
        .filter(|p| p.selects(dest))
        .flat_map(|p| &p.spec.rules)
        .any(has_l7)
}

fn has_l7(r: &Rule) -> bool {
    !r.when.is_empty()
        || r.to
            .iter()
            .any(|op| !op.methods.is_empty() || !op.paths.is_empty())
}

/// Decides a connection from `source` to `dest` on `port`, or, with
/// `request`, one of its HTTP requests.
pub fn decide(
    policies: &[Policy],
    dest: &Workload,
    port: u16,
    source: &Source<'_>,
    request: Option<&Request<'_>>,
) -> Result<(), Denied> {
    let selecting: Vec<&Policy> = policies.iter().filter(|p| p.selects(dest)).collect();
    if let Some(p) = selecting.iter().find(|p| {
        p.spec.action == Action::Deny
            && p.spec
                .rules
                .iter()
                .any(|r| matches(r, port, source, request, Action::Deny))
    }) {
        return Err(Denied {
            policy: p.key(),
            reason: match request {
                None => format!(
                    "DENY policy {} matches {} to port {port}",
                    p.key(),
                    source.identity
                ),
                Some(r) => format!(
                    "DENY policy {} matches {} {} {} to port {port}",
                    p.key(),
                    source.identity,
                    r.method,
                    r.path
                ),
            },
        });
    }
    let allows: Vec<&&Policy> = selecting
        .iter()
        .filter(|p| p.spec.action == Action::Allow)
        .collect();
    if allows.is_empty()
        || allows.iter().any(|p| {
            p.spec
                .rules
                .iter()
                .any(|r| matches(r, port, source, request, Action::Allow))
        })
    {
        return Ok(());
    }
    Err(Denied {
        policy: allows[0].key(),
        reason: format!(
            "no ALLOW policy selecting {}/{} matches {} to port {port}",
            dest.namespace, dest.name, source.identity
        ),
    })
}

/// The verdict for `source` to `dest` when it is the same on every port
/// and no L7 condition applies to `dest` (what the kernel's same-node fast
/// path may decide alone); `None` when only a per-connection decision can
/// tell. `Some(true)` allows, `Some(false)` denies.
pub fn any_port_verdict(policies: &[Policy], dest: &Workload, source: &Source<'_>) -> Option<bool> {
    let rules = || {
        policies
            .iter()
            .filter(|p| p.selects(dest))
            .flat_map(|p| &p.spec.rules)
    };
    if rules().any(has_l7) {
        return None;
    }
    let mut ports: Vec<u16> = rules()
        .flat_map(|r| &r.to)
        .flat_map(|op| op.ports.iter().copied())
        .collect();
    // One port no rule names stands for all such ports.
    ports.extend((1..=u16::MAX).find(|p| !ports.contains(p)));
    let mut verdicts = ports
        .iter()
        .map(|&port| decide(policies, dest, port, source, None).is_ok());
    let first = verdicts.next()?;
    verdicts.all(|v| v == first).then_some(first)
}

/// Whether `rule` matches. Without a request, an L7 condition matches in
/// an ALLOW (the requests narrow it) and not in a DENY (the requests are
/// denied one by one instead of the whole connection).
fn matches(
    rule: &Rule,
    port: u16,
    source: &Source<'_>,
    request: Option<&Request<'_>>,
    action: Action,
) -> bool {
    let l7 = |applies: &dyn Fn(&Request<'_>) -> bool| match request {
        Some(r) => applies(r),
        None => action == Action::Allow,
    };
    let from = rule.from.is_empty()
        || rule.from.iter().any(|f| {
            (f.principals.is_empty()
                || f.principals
                    .iter()
                    .any(|p| p == "*" || p == source.identity))
                && (f.namespaces.is_empty()
                    || source
                        .namespace()
                        .is_some_and(|ns| f.namespaces.contains(&ns)))
        });
    let to = rule.to.is_empty()
        || rule.to.iter().any(|op| {
            (op.ports.is_empty() || op.ports.contains(&port))
                && ((op.methods.is_empty() && op.paths.is_empty())
                    || l7(&|r| {
                        (op.methods.is_empty() || op.methods.iter().any(|m| m == r.method))
                            && (op.paths.is_empty()
                                || op.paths.iter().any(|p| pattern_matches(p, r.path)))
                    }))
        });
    let when = rule.when.is_empty()
        || l7(&|r| {
            rule.when.iter().all(|h| {
                r.headers
                    .get_all(h.header.as_str())
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .any(|v| h.values.iter().any(|want| pattern_matches(want, v)))
            })
        });
    from && to && when
}

/// Istio's string match: exact, `prefix*`, `*suffix`, or `*` for any.
fn pattern_matches(pattern: &str, value: &str) -> bool {
    if pattern == "*" {
        true
    } else if let Some(prefix) = pattern.strip_suffix('*') {
        value.starts_with(prefix)
    } else if let Some(suffix) = pattern.strip_prefix('*') {
        value.ends_with(suffix)
    } else {
        pattern == value
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(yaml: &str) -> Policy {
        Policy {
            namespace: "shop".into(),
            name: "p".into(),
            spec: serde_yaml::from_str(yaml).unwrap(),
        }
    }

    fn web() -> Workload {
        Workload {
            namespace: "shop".into(),
            name: "web-0".into(),
            uid: String::new(),
            node: "n1".into(),
            service_account: "web".into(),
            addresses: vec![],
            meshed: true,
            strict: false,
            access_log: false,
            labels: [("app".to_owned(), "web".to_owned())].into(),
        }
    }

    const CLIENT: &str = "spiffe://cluster.local/ns/shop/sa/client";
    const OTHER: &str = "spiffe://cluster.local/ns/other/sa/x";

    #[test]
    fn deny_wins_allow_narrows_and_no_policy_allows() {
        let src = Source { identity: CLIENT };
        assert!(decide(&[], &web(), 80, &src, None).is_ok());
        let deny = policy(
            "{action: Deny, rules: [{from: [{principals: [\"spiffe://cluster.local/ns/shop/sa/client\"]}], to: [{ports: [80]}]}]}",
        );
        let err = decide(std::slice::from_ref(&deny), &web(), 80, &src, None).unwrap_err();
        assert_eq!(err.policy, "shop/p");
        assert!(
            decide(std::slice::from_ref(&deny), &web(), 81, &src, None).is_ok(),
            "other port"
        );
        let allow_ns = policy("{action: Allow, rules: [{from: [{namespaces: [shop]}]}]}");
        assert!(decide(std::slice::from_ref(&allow_ns), &web(), 80, &src, None).is_ok());
        assert!(
            decide(
                std::slice::from_ref(&allow_ns),
                &web(),
                80,
                &Source { identity: OTHER },
                None
            )
            .is_err()
        );
        // Deny wins over allow.
        assert!(decide(&[allow_ns, deny], &web(), 80, &src, None).is_err());
        // A selector that does not match leaves the workload alone.
        let elsewhere = policy("{selector: {matchLabels: {app: db}}, action: Deny, rules: [{}]}");
        assert!(decide(&[elsewhere], &web(), 80, &src, None).is_ok());
    }

    fn request<'a>(method: &'a str, path: &'a str, headers: &'a http::HeaderMap) -> Request<'a> {
        Request {
            method,
            path,
            headers,
        }
    }

    #[test]
    fn l7_conditions_pass_the_connection_and_decide_each_request() {
        let src = Source { identity: CLIENT };
        let none = http::HeaderMap::new();
        let allow_get = policy(
            "{action: Allow, rules: [{to: [{methods: [GET, HEAD], paths: [/api/*, /health]}]}]}",
        );
        let deny_admin = policy(
            "{action: Deny, rules: [{to: [{paths: [/api/admin*]}], when: [{header: x-env, values: [prod, \"*-live\"]}]}]}",
        );
        let both = [allow_get.clone(), deny_admin.clone()];
        assert!(needs_requests(&both, &web()));
        // The connection passes: its requests are decided one by one.
        assert!(decide(&both, &web(), 80, &src, None).is_ok());
        let decided = |method, path, headers| {
            decide(
                &both,
                &web(),
                80,
                &src,
                Some(&request(method, path, headers)),
            )
            .map_err(|d| d.policy)
        };
        assert_eq!(decided("GET", "/api/items", &none), Ok(()));
        assert_eq!(decided("HEAD", "/health", &none), Ok(()));
        assert_eq!(
            decided("GET", "/healthz", &none),
            Err("shop/p".to_owned()),
            "exact path"
        );
        assert_eq!(
            decided("DELETE", "/api/items", &none),
            Err("shop/p".to_owned()),
            "allow narrows"
        );
        // Deny wins, when its header condition holds.
        assert_eq!(decided("GET", "/api/admin/x", &none), Ok(()));
        let mut prod = http::HeaderMap::new();
        prod.insert("x-env", "prod".parse().unwrap());
        let err = decide(
            &both,
            &web(),
            80,
            &src,
            Some(&request("GET", "/api/admin/x", &prod)),
        )
        .unwrap_err();
        assert_eq!(
            err.reason,
            "DENY policy shop/p matches spiffe://cluster.local/ns/shop/sa/client GET /api/admin/x to port 80"
        );
        let mut live = http::HeaderMap::new();
        live.insert("x-env", "eu-live".parse().unwrap());
        assert!(decided("GET", "/api/admin", &live).is_err(), "suffix match");
        // A DENY with only L7 conditions does not refuse the connection.
        assert!(decide(&[deny_admin], &web(), 80, &src, None).is_ok());
        // Without L7 conditions nothing needs requests.
        let l4 = policy("{action: Deny, rules: [{to: [{ports: [81]}]}]}");
        assert!(!needs_requests(&[l4], &web()));
    }

    #[test]
    fn the_kernel_decides_alone_only_what_no_port_or_l7_rule_splits() {
        let src = Source { identity: CLIENT };
        let verdict = |policies: &[Policy], identity| {
            any_port_verdict(policies, &web(), &Source { identity })
        };
        assert_eq!(verdict(&[], CLIENT), Some(true), "no policy allows");
        let deny_client = policy(
            "{action: Deny, rules: [{from: [{principals: [\"spiffe://cluster.local/ns/shop/sa/client\"]}]}]}",
        );
        assert_eq!(
            verdict(std::slice::from_ref(&deny_client), CLIENT),
            Some(false)
        );
        assert_eq!(
            verdict(std::slice::from_ref(&deny_client), OTHER),
            Some(true)
        );
        // A rule on one port splits the verdict by port: the daemon decides.
        let deny_80 = policy("{action: Deny, rules: [{to: [{ports: [80]}]}]}");
        assert_eq!(verdict(std::slice::from_ref(&deny_80), CLIENT), None);
        assert!(decide(std::slice::from_ref(&deny_80), &web(), 81, &src, None).is_ok());
        // An allow on every named port and nothing else is still split.
        let allow_80 = policy("{action: Allow, rules: [{to: [{ports: [80]}]}]}");
        assert_eq!(verdict(&[allow_80], CLIENT), None);
        // Any L7 condition: the daemon decides.
        let allow_get = policy("{action: Allow, rules: [{to: [{methods: [GET]}]}]}");
        assert_eq!(verdict(&[allow_get], CLIENT), None);
    }
}
