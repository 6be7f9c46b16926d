//! AuthorizationPolicy as the nodes enforce it at L4: by source identity,
//! source namespace and destination port. Deny wins; when ALLOW policies
//! select a workload, a connection must match one of them; with no policy
//! selecting it, everything is allowed.
//!
//! Rules with L7 conditions (methods, paths, headers) cannot be decided at
//! L4: in an ALLOW policy such a rule matches nothing, in a DENY policy it
//! matches (fail closed), as Istio's ztunnel does.

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

    fn selects(&self, w: &Workload) -> bool {
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

/// Decides a connection from `source` to `dest` on `port`.
pub fn decide(
    policies: &[Policy],
    dest: &Workload,
    port: u16,
    source: &Source<'_>,
) -> Result<(), Denied> {
    let selecting: Vec<&Policy> = policies.iter().filter(|p| p.selects(dest)).collect();
    if let Some(p) = selecting.iter().find(|p| {
        p.spec.action == Action::Deny
            && p.spec
                .rules
                .iter()
                .any(|r| matches(r, port, source, Action::Deny))
    }) {
        return Err(Denied {
            policy: p.key(),
            reason: format!(
                "DENY policy {} matches {} to port {port}",
                p.key(),
                source.identity
            ),
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
                .any(|r| matches(r, port, source, Action::Allow))
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
    let l7 = |r: &Rule| {
        !r.when.is_empty()
            || r.to
                .iter()
                .any(|op| !op.methods.is_empty() || !op.paths.is_empty())
    };
    if rules().any(l7) {
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
        .map(|&port| decide(policies, dest, port, source).is_ok());
    let first = verdicts.next()?;
    verdicts.all(|v| v == first).then_some(first)
}

/// Whether `rule` matches; an L7 condition counts as a match only in a DENY.
fn matches(rule: &Rule, port: u16, source: &Source<'_>, action: Action) -> bool {
    let l7_matches = action == Action::Deny;
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
                && ((op.methods.is_empty() && op.paths.is_empty()) || l7_matches)
        });
    let when = rule.when.is_empty() || l7_matches;
    from && to && when
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
            labels: [("app".to_owned(), "web".to_owned())].into(),
        }
    }

    const CLIENT: &str = "spiffe://cluster.local/ns/shop/sa/client";
    const OTHER: &str = "spiffe://cluster.local/ns/other/sa/x";

    #[test]
    fn deny_wins_allow_narrows_and_no_policy_allows() {
        let src = Source { identity: CLIENT };
        assert!(decide(&[], &web(), 80, &src).is_ok());
        let deny = policy(
            "{action: Deny, rules: [{from: [{principals: [\"spiffe://cluster.local/ns/shop/sa/client\"]}], to: [{ports: [80]}]}]}",
        );
        let err = decide(std::slice::from_ref(&deny), &web(), 80, &src).unwrap_err();
        assert_eq!(err.policy, "shop/p");
        assert!(
            decide(std::slice::from_ref(&deny), &web(), 81, &src).is_ok(),
            "other port"
        );
        let allow_ns = policy("{action: Allow, rules: [{from: [{namespaces: [shop]}]}]}");
        assert!(decide(std::slice::from_ref(&allow_ns), &web(), 80, &src).is_ok());
        assert!(
            decide(
                std::slice::from_ref(&allow_ns),
                &web(),
                80,
                &Source { identity: OTHER }
            )
            .is_err()
        );
        // Deny wins over allow.
        assert!(decide(&[allow_ns, deny], &web(), 80, &src).is_err());
        // A selector that does not match leaves the workload alone.
        let elsewhere = policy("{selector: {matchLabels: {app: db}}, action: Deny, rules: [{}]}");
        assert!(decide(&[elsewhere], &web(), 80, &src).is_ok());
    }

    #[test]
    fn l7_conditions_fail_closed_at_l4() {
        let src = Source { identity: CLIENT };
        let allow_get = policy("{action: Allow, rules: [{to: [{methods: [GET]}]}]}");
        assert!(decide(&[allow_get], &web(), 80, &src).is_err());
        let deny_path = policy("{action: Deny, rules: [{to: [{paths: [/admin]}]}]}");
        assert!(decide(&[deny_path], &web(), 80, &src).is_err());
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
        assert!(decide(std::slice::from_ref(&deny_80), &web(), 81, &src).is_ok());
        // An allow on every named port and nothing else is still split.
        let allow_80 = policy("{action: Allow, rules: [{to: [{ports: [80]}]}]}");
        assert_eq!(verdict(&[allow_80], CLIENT), None);
        // Any L7 condition: the daemon decides.
        let allow_get = policy("{action: Allow, rules: [{to: [{methods: [GET]}]}]}");
        assert_eq!(verdict(&[allow_get], CLIENT), None);
    }
}
