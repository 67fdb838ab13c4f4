//! Istio AuthorizationPolicy → Envoy RBAC, with Istio's semantics: DENY policies are evaluated first
//! (any match denies); then, if any ALLOW policy applies, a request must match one of them; with no
//! policy everything is allowed. An ALLOW policy without rules allows nothing.
//!
//! Principals are URI SANs without `spiffe://`; `*` may stand alone, as a prefix or as a suffix.
//! Namespaces match the `/ns/<ns>/` segment of the caller's SPIFFE ID. For TCP, rules with HTTP-only
//! fields (methods, paths) never match in ALLOW policies, and in DENY policies those fields are
//! ignored so the rule denies more, never less (Istio's behaviour).

use std::collections::HashMap;

use envoy_types::pb::envoy::config::rbac::v3::{
    Permission, Policy, Principal, Rbac, permission, principal, rbac,
};
use envoy_types::pb::envoy::config::route::v3::{HeaderMatcher, header_matcher};
use envoy_types::pb::envoy::r#type::matcher::v3::{
    PathMatcher, RegexMatcher, StringMatcher, path_matcher, string_matcher::MatchPattern,
};
use prost::Message;

use super::common::{exact, prefix, suffix};
use crate::model::{Action, AuthorizationPolicy, Operation, Rule, Source};

fn any_principal() -> Principal {
    Principal {
        identifier: Some(principal::Identifier::Any(true)),
    }
}

fn any_permission() -> Permission {
    Permission {
        rule: Some(permission::Rule::Any(true)),
    }
}

fn authenticated(m: StringMatcher) -> Principal {
    Principal {
        identifier: Some(principal::Identifier::Authenticated(
            principal::Authenticated {
                principal_name: Some(m),
            },
        )),
    }
}

fn or_ids(ids: Vec<Principal>) -> Principal {
    Principal {
        identifier: Some(principal::Identifier::OrIds(principal::Set { ids })),
    }
}

fn and_ids(ids: Vec<Principal>) -> Principal {
    if ids.is_empty() {
        return any_principal();
    }
    Principal {
        identifier: Some(principal::Identifier::AndIds(principal::Set { ids })),
    }
}

fn not_id(p: Principal) -> Principal {
    Principal {
        identifier: Some(principal::Identifier::NotId(Box::new(p))),
    }
}

fn or_rules(rules: Vec<Permission>) -> Permission {
    Permission {
        rule: Some(permission::Rule::OrRules(permission::Set { rules })),
    }
}

fn and_rules(rules: Vec<Permission>) -> Permission {
    if rules.is_empty() {
        return any_permission();
    }
    Permission {
        rule: Some(permission::Rule::AndRules(permission::Set { rules })),
    }
}

fn not_rule(p: Permission) -> Permission {
    Permission {
        rule: Some(permission::Rule::NotRule(Box::new(p))),
    }
}

/// `*`, `prefix*`, `*suffix` or exact, applied after `base` (e.g. `spiffe://`).
fn wildcard(base: &str, v: &str) -> StringMatcher {
    if v == "*" {
        prefix(base)
    } else if let Some(p) = v.strip_suffix('*') {
        prefix(&format!("{base}{p}"))
    } else if let Some(s) = v.strip_prefix('*') {
        suffix(s)
    } else {
        exact(&format!("{base}{v}"))
    }
}

fn regex_escape(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            if "\\.+*?()|[]{}^$".contains(c) {
                vec!['\\', c]
            } else {
                vec![c]
            }
        })
        .collect()
}

fn namespace_matcher(ns: &str) -> StringMatcher {
    let body = if ns == "*" {
        "[^/]+".to_string()
    } else if let Some(p) = ns.strip_suffix('*') {
        format!("{}[^/]*", regex_escape(p))
    } else if let Some(s) = ns.strip_prefix('*') {
        format!("[^/]*{}", regex_escape(s))
    } else {
        regex_escape(ns)
    };
    StringMatcher {
        match_pattern: Some(MatchPattern::SafeRegex(RegexMatcher {
            regex: format!("spiffe://[^/]+/ns/{body}/sa/[^/]+"),
            ..Default::default()
        })),
        ignore_case: false,
    }
}

fn source_principal(s: &Source) -> Principal {
    let mut ids = Vec::new();
    if !s.principals.is_empty() {
        ids.push(or_ids(
            s.principals
                .iter()
                .map(|p| authenticated(wildcard("spiffe://", p)))
                .collect(),
        ));
    }
    if !s.not_principals.is_empty() {
        ids.push(not_id(or_ids(
            s.not_principals
                .iter()
                .map(|p| authenticated(wildcard("spiffe://", p)))
                .collect(),
        )));
    }
    if !s.namespaces.is_empty() {
        ids.push(or_ids(
            s.namespaces
                .iter()
                .map(|n| authenticated(namespace_matcher(n)))
                .collect(),
        ));
    }
    if !s.not_namespaces.is_empty() {
        ids.push(not_id(or_ids(
            s.not_namespaces
                .iter()
                .map(|n| authenticated(namespace_matcher(n)))
                .collect(),
        )));
    }
    and_ids(ids)
}

fn method(m: &str) -> Permission {
    Permission {
        rule: Some(permission::Rule::Header(HeaderMatcher {
            name: ":method".into(),
            header_match_specifier: Some(header_matcher::HeaderMatchSpecifier::StringMatch(exact(
                m,
            ))),
            ..Default::default()
        })),
    }
}

fn path(p: &str) -> Permission {
    let m = if p == "*" {
        prefix("/")
    } else if let Some(x) = p.strip_suffix('*') {
        prefix(x)
    } else if let Some(x) = p.strip_prefix('*') {
        suffix(x)
    } else {
        exact(p)
    };
    Permission {
        rule: Some(permission::Rule::UrlPath(PathMatcher {
            rule: Some(path_matcher::Rule::Path(m)),
        })),
    }
}

fn port(p: u32) -> Permission {
    Permission {
        rule: Some(permission::Rule::DestinationPort(p)),
    }
}

/// `map_port` turns a service port named in a policy into the gateway listener port.
fn operation_permission(o: &Operation, http: bool, map_port: &dyn Fn(u16) -> u32) -> Permission {
    let mut rules = Vec::new();
    if http {
        if !o.methods.is_empty() {
            rules.push(or_rules(o.methods.iter().map(|m| method(m)).collect()));
        }
        if !o.not_methods.is_empty() {
            rules.push(not_rule(or_rules(
                o.not_methods.iter().map(|m| method(m)).collect(),
            )));
        }
        if !o.paths.is_empty() {
            rules.push(or_rules(o.paths.iter().map(|p| path(p)).collect()));
        }
        if !o.not_paths.is_empty() {
            rules.push(not_rule(or_rules(
                o.not_paths.iter().map(|p| path(p)).collect(),
            )));
        }
    }
    if !o.ports.is_empty() {
        rules.push(or_rules(
            o.ports.iter().map(|p| port(map_port(*p))).collect(),
        ));
    }
    if !o.not_ports.is_empty() {
        rules.push(not_rule(or_rules(
            o.not_ports.iter().map(|p| port(map_port(*p))).collect(),
        )));
    }
    and_rules(rules)
}

fn rule_policy(
    r: &Rule,
    action: Action,
    http: bool,
    map_port: &dyn Fn(u16) -> u32,
) -> Option<Policy> {
    if !http && action == Action::Allow && r.to.iter().any(|o| o.has_http_fields()) {
        // An ALLOW rule that needs HTTP attributes can never match a TCP connection.
        return None;
    }
    let principals = if r.from.is_empty() {
        vec![any_principal()]
    } else {
        r.from.iter().map(source_principal).collect()
    };
    let permissions = if r.to.is_empty() {
        vec![any_permission()]
    } else {
        r.to.iter()
            .map(|o| operation_permission(o, http, map_port))
            .collect()
    };
    Some(Policy {
        permissions,
        principals,
        ..Default::default()
    })
}

/// Istio's trust-domain handling of principals (`<td>/ns/<ns>/sa/<sa>`): a principal naming the local
/// trust domain, one of its aliases, or `cluster.local` (which always means "the local trust domain")
/// matches callers from the local trust domain and every alias. Principals with a wildcard trust
/// domain, other trust domains, or another shape are kept as written. `trust_domains` is the local
/// trust domain followed by its aliases.
pub fn expand_principals(principals: &[String], trust_domains: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for p in principals {
        let parts: Vec<&str> = p.split('/').collect();
        let enforced = parts.len() == 5 && !parts[0].contains('*');
        if enforced && (parts[0] == "cluster.local" || trust_domains.iter().any(|t| t == parts[0]))
        {
            let rest = &p[parts[0].len()..];
            for td in trust_domains {
                let np = format!("{td}{rest}");
                if !out.contains(&np) {
                    out.push(np);
                }
            }
        } else if !out.contains(p) {
            out.push(p.clone());
        }
    }
    out
}

/// A copy of `p` with every `principals` / `notPrincipals` list widened by [`expand_principals`].
pub fn with_trust_domain_aliases(
    p: &AuthorizationPolicy,
    trust_domains: &[String],
) -> AuthorizationPolicy {
    let mut p = p.clone();
    for rule in &mut p.rules {
        for src in &mut rule.from {
            src.principals = expand_principals(&src.principals, trust_domains);
            src.not_principals = expand_principals(&src.not_principals, trust_domains);
        }
    }
    p
}

/// RBAC configs for a service, DENY first then ALLOW (`None` where no policy of that action exists).
pub fn rbac_configs(
    policies: &[&AuthorizationPolicy],
    http: bool,
    map_port: &dyn Fn(u16) -> u32,
) -> (Option<Rbac>, Option<Rbac>) {
    let build = |action: Action| -> Option<Rbac> {
        let ps: Vec<&&AuthorizationPolicy> =
            policies.iter().filter(|p| p.action == action).collect();
        if ps.is_empty() {
            return None;
        }
        let mut map = HashMap::new();
        for p in ps {
            for (i, r) in p.rules.iter().enumerate() {
                if let Some(pol) = rule_policy(r, action, http, map_port) {
                    map.insert(
                        format!("ns[{}]-policy[{}]-rule[{i}]", p.namespace, p.name),
                        pol,
                    );
                }
            }
        }
        Some(Rbac {
            action: match action {
                Action::Allow => rbac::Action::Allow as i32,
                Action::Deny => rbac::Action::Deny as i32,
            },
            policies: map,
            ..Default::default()
        })
    };
    (build(Action::Deny), build(Action::Allow))
}

/// Encodes `r` with its `policies` map (field 2) in sorted key order. prost encodes maps in `HashMap`
/// order, which differs between runs; content versions hash these bytes, so they must be stable.
fn encode_rbac_sorted(r: &Rbac) -> Vec<u8> {
    use prost::encoding::{WireType, encode_key, encode_varint};
    let mut base = r.clone();
    base.policies.clear();
    let mut buf = base.encode_to_vec();
    let mut entries: Vec<(&String, &Policy)> = r.policies.iter().collect();
    entries.sort_by(|a, b| a.0.cmp(b.0));
    for (k, v) in entries {
        let mut entry = Vec::new();
        prost::encoding::string::encode(1, k, &mut entry);
        prost::encoding::message::encode(2, v, &mut entry);
        encode_key(2, WireType::LengthDelimited, &mut buf);
        encode_varint(entry.len() as u64, &mut buf);
        buf.extend_from_slice(&entry);
    }
    buf
}

/// Packs a filter config whose field 1 is the RBAC `rules`, with the rules encoded deterministically.
fn pack_with_rules<M: prost::Message + prost::Name>(
    without_rules: &M,
    rules: &Rbac,
) -> envoy_types::pb::google::protobuf::Any {
    use prost::encoding::{WireType, encode_key, encode_varint};
    let mut value = without_rules.encode_to_vec();
    let r = encode_rbac_sorted(rules);
    encode_key(1, WireType::LengthDelimited, &mut value);
    encode_varint(r.len() as u64, &mut value);
    value.extend_from_slice(&r);
    envoy_types::pb::google::protobuf::Any {
        type_url: M::type_url(),
        value,
    }
}

/// HTTP RBAC filters (DENY then ALLOW) for an inbound HCM. Denied requests get 403.
pub fn http_filters(
    policies: &[&AuthorizationPolicy],
    map_port: &dyn Fn(u16) -> u32,
) -> Vec<
    envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::HttpFilter,
> {
    use envoy_types::pb::envoy::extensions::filters::http::rbac::v3::Rbac as HttpRbac;
    use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
        HttpFilter, http_filter,
    };
    let (deny, allow) = rbac_configs(policies, true, map_port);
    [deny, allow]
        .into_iter()
        .flatten()
        .map(|rules| HttpFilter {
            name: "envoy.filters.http.rbac".into(),
            config_type: Some(http_filter::ConfigType::TypedConfig(pack_with_rules(
                &HttpRbac::default(),
                &rules,
            ))),
            ..Default::default()
        })
        .collect()
}

/// Network RBAC filters (DENY then ALLOW) for an inbound TCP chain. Denied connections are closed.
pub fn network_filters(
    policies: &[&AuthorizationPolicy],
    stat_prefix: &str,
    map_port: &dyn Fn(u16) -> u32,
) -> Vec<envoy_types::pb::envoy::config::listener::v3::Filter> {
    use envoy_types::pb::envoy::extensions::filters::network::rbac::v3::Rbac as NetRbac;
    let (deny, allow) = rbac_configs(policies, false, map_port);
    [deny, allow]
        .into_iter()
        .flatten()
        .map(
            |rules| envoy_types::pb::envoy::config::listener::v3::Filter {
                name: "envoy.filters.network.rbac".into(),
                config_type: Some(
                    envoy_types::pb::envoy::config::listener::v3::filter::ConfigType::TypedConfig(
                        pack_with_rules(
                            &NetRbac {
                                stat_prefix: stat_prefix.into(),
                                ..Default::default()
                            },
                            &rules,
                        ),
                    ),
                ),
            },
        )
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn principals_follow_istio_trust_domain_aliases() {
        let tds = ["new.td".to_string(), "old.td".to_string()];
        let got = expand_principals(
            &[
                "old.td/ns/a/sa/x".into(),
                "cluster.local/ns/b/sa/y".into(),
                "*/ns/c/sa/z".into(),
                "other.td/ns/d/sa/w".into(),
                "new.td/ns/a/sa/x".into(),
                "*".into(),
                "prefix*".into(),
            ],
            &tds,
        );
        assert_eq!(
            got,
            [
                "new.td/ns/a/sa/x",
                "old.td/ns/a/sa/x",
                "new.td/ns/b/sa/y",
                "old.td/ns/b/sa/y",
                "*/ns/c/sa/z",
                "other.td/ns/d/sa/w",
                "*",
                "prefix*",
            ]
        );
        // No aliases, local trust domain cluster.local: unchanged.
        let one = ["cluster.local".to_string()];
        assert_eq!(
            expand_principals(&["cluster.local/ns/a/sa/b".into()], &one),
            ["cluster.local/ns/a/sa/b"]
        );
        // `cluster.local` in a policy means the local trust domain, whatever it is called.
        let custom = ["example.org".to_string()];
        assert_eq!(
            expand_principals(&["cluster.local/ns/a/sa/b".into()], &custom),
            ["example.org/ns/a/sa/b"]
        );
    }

    fn pol(action: Action, rules: Vec<Rule>) -> AuthorizationPolicy {
        AuthorizationPolicy {
            name: "p".into(),
            namespace: "win".into(),
            services: vec![],
            action,
            rules,
        }
    }

    fn id(p: u16) -> u32 {
        u32::from(p)
    }

    #[test]
    fn principals_translate_to_spiffe_matchers() {
        assert_eq!(
            wildcard("spiffe://", "cluster.local/ns/a/sa/b"),
            exact("spiffe://cluster.local/ns/a/sa/b")
        );
        assert_eq!(
            wildcard("spiffe://", "cluster.local/ns/a/*"),
            prefix("spiffe://cluster.local/ns/a/")
        );
        assert_eq!(wildcard("spiffe://", "*/sa/b"), suffix("/sa/b"));
        assert_eq!(wildcard("spiffe://", "*"), prefix("spiffe://"));
        let Some(MatchPattern::SafeRegex(r)) = namespace_matcher("linux").match_pattern else {
            panic!()
        };
        assert_eq!(r.regex, "spiffe://[^/]+/ns/linux/sa/[^/]+");
    }

    #[test]
    fn no_policies_no_filters_and_allow_without_rules_allows_nothing() {
        assert!(http_filters(&[], &id).is_empty());
        let p = pol(Action::Allow, vec![]);
        let (deny, allow) = rbac_configs(&[&p], true, &id);
        assert!(deny.is_none());
        let allow = allow.unwrap();
        assert_eq!(allow.action, rbac::Action::Allow as i32);
        assert!(
            allow.policies.is_empty(),
            "ALLOW with no rules matches nothing"
        );
    }

    #[test]
    fn deny_comes_before_allow() {
        let d = pol(
            Action::Deny,
            vec![Rule {
                from: vec![Source {
                    principals: vec!["cluster.local/ns/x/sa/bad".into()],
                    ..Default::default()
                }],
                to: vec![],
            }],
        );
        let a = pol(Action::Allow, vec![Rule::default()]);
        let f = http_filters(&[&a, &d], &id);
        assert_eq!(f.len(), 2);
        let decode = |f: &envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::HttpFilter| {
            let Some(envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_filter::ConfigType::TypedConfig(any)) = &f.config_type else { panic!() };
            <envoy_types::pb::envoy::extensions::filters::http::rbac::v3::Rbac as prost::Message>::decode(any.value.as_slice()).unwrap()
        };
        assert_eq!(
            decode(&f[0]).rules.unwrap().action,
            rbac::Action::Deny as i32
        );
        assert_eq!(
            decode(&f[1]).rules.unwrap().action,
            rbac::Action::Allow as i32
        );
    }

    #[test]
    fn tcp_drops_http_only_allow_rules_and_widens_deny_rules() {
        let op = Operation {
            methods: vec!["GET".into()],
            ..Default::default()
        };
        let rule = Rule {
            from: vec![],
            to: vec![op],
        };
        let (_, allow) = rbac_configs(&[&pol(Action::Allow, vec![rule.clone()])], false, &id);
        assert!(
            allow.unwrap().policies.is_empty(),
            "HTTP-only ALLOW rule cannot match TCP"
        );
        let (deny, _) = rbac_configs(&[&pol(Action::Deny, vec![rule])], false, &id);
        let deny = deny.unwrap();
        let p = deny.policies.values().next().unwrap();
        assert_eq!(
            p.permissions,
            vec![any_permission()],
            "methods ignored: denies the whole rule's sources"
        );
    }

    #[test]
    fn sorted_encoding_decodes_to_the_same_config() {
        let rules: Vec<Rule> = (0..8)
            .map(|i| Rule {
                from: vec![Source {
                    principals: vec![format!("cluster.local/ns/n{i}/sa/x")],
                    ..Default::default()
                }],
                to: vec![],
            })
            .collect();
        let p = pol(Action::Allow, rules);
        let (_, allow) = rbac_configs(&[&p], true, &id);
        let allow = allow.unwrap();
        let bytes = encode_rbac_sorted(&allow);
        assert_eq!(Rbac::decode(bytes.as_slice()).unwrap(), allow);
        let f = http_filters(&[&p], &id);
        let Some(envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_filter::ConfigType::TypedConfig(any)) = &f[0].config_type else { panic!() };
        let decoded = envoy_types::pb::envoy::extensions::filters::http::rbac::v3::Rbac::decode(
            any.value.as_slice(),
        )
        .unwrap();
        assert_eq!(decoded.rules.unwrap(), allow);
        for _ in 0..10 {
            let (_, again) = rbac_configs(&[&p], true, &id);
            assert_eq!(encode_rbac_sorted(&again.unwrap()), bytes);
        }
    }

    #[test]
    fn operation_fields_are_anded_values_ored_and_ports_mapped() {
        let op = Operation {
            methods: vec!["GET".into(), "HEAD".into()],
            paths: vec!["/api/*".into()],
            ports: vec![8080],
            ..Default::default()
        };
        let p = operation_permission(&op, true, &|p| u32::from(p) + 10000);
        let Some(permission::Rule::AndRules(set)) = p.rule else {
            panic!()
        };
        assert_eq!(set.rules.len(), 3);
        assert_eq!(set.rules[2], or_rules(vec![port(18080)]));
    }
}
