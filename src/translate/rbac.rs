//! Istio AuthorizationPolicy → Envoy RBAC, with Istio's semantics: DENY policies are evaluated first
//! (any match denies); then, if any ALLOW policy applies, a request must match one of them; with no
//! policy everything is allowed. An ALLOW policy without rules allows nothing.
//!
//! Principals are URI SANs without `spiffe://`; `*` may stand alone, as a prefix or as a suffix.
//! Namespaces match the `/ns/<ns>/` segment of the caller's SPIFFE ID. For TCP, rules with HTTP-only
//! fields (methods, paths) never match in ALLOW policies, and in DENY policies those fields are
//! ignored so the rule denies more, never less (Istio's behaviour).

use std::collections::HashMap;

use envoy_types::pb::envoy::config::core::v3::CidrRange;
use envoy_types::pb::envoy::config::rbac::v3::{
    Permission, Policy, Principal, Rbac, permission, principal, rbac,
};
use envoy_types::pb::envoy::config::route::v3::{HeaderMatcher, header_matcher};
use envoy_types::pb::envoy::r#type::matcher::v3::{
    PathMatcher, RegexMatcher, StringMatcher, path_matcher, string_matcher::MatchPattern,
};
use prost::Message;

use super::common::{exact, prefix, suffix};
use crate::model::{Action, AuthorizationPolicy, Rule};

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

/// Every note about a policy not enforced as written starts with this (logs and the metric find them).
pub const NOTE_PREFIX: &str = "AuthorizationPolicy ";

/// Why a stock Envoy at the gateway cannot enforce a condition.
type Unenforceable = String;

fn cidr(v: &str) -> Result<CidrRange, String> {
    let (addr, len) = match v.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (v, None),
    };
    let ip: std::net::IpAddr = addr
        .parse()
        .map_err(|_| format!("{v:?} is not an IP address or CIDR block"))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let prefix_len = match len {
        Some(l) => l
            .parse::<u32>()
            .ok()
            .filter(|l| *l <= max)
            .ok_or_else(|| format!("{v:?}: bad prefix length"))?,
        None => max,
    };
    Ok(CidrRange {
        address_prefix: ip.to_string(),
        prefix_len: Some(envoy_types::pb::google::protobuf::UInt32Value { value: prefix_len }),
    })
}

/// Istio's string rule for hosts, SNI and headers: `*` alone, `prefix*`, `*suffix`, else exact.
fn istio_string(v: &str, ignore_case: bool) -> StringMatcher {
    let mut m = if let Some(p) = v.strip_suffix('*').filter(|_| v != "*") {
        prefix(p)
    } else if let Some(x) = v.strip_prefix('*') {
        suffix(x)
    } else {
        exact(v)
    };
    m.ignore_case = ignore_case;
    m
}

fn header_matcher(name: &str, v: &str, ignore_case: bool) -> HeaderMatcher {
    let spec = if v == "*" {
        header_matcher::HeaderMatchSpecifier::PresentMatch(true)
    } else {
        header_matcher::HeaderMatchSpecifier::StringMatch(istio_string(v, ignore_case))
    };
    HeaderMatcher {
        name: name.into(),
        header_match_specifier: Some(spec),
        ..Default::default()
    }
}

/// The Istio attributes of `from`, `to` and `when`, each enforced by a permission (about the request
/// or connection) or a principal (about the caller), as Istio's `authz/model` sorts them.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Attr {
    DestIp,
    DestPort,
    Sni,
    Host,
    Method,
    Path,
    SrcIp,
    RemoteIp,
    SrcNamespace,
    SrcPrincipal,
    RequestPrincipal,
    /// `request.auth.audiences`, `.presenter`, `.claims[...]`: JWT attributes.
    RequestAuth(String),
    Header(String),
    /// A key Istio does not know (istiod's webhook would have refused the policy).
    Unknown(String),
}

impl Attr {
    fn of_key(k: &str) -> Attr {
        match k {
            "destination.ip" => Attr::DestIp,
            "destination.port" => Attr::DestPort,
            "connection.sni" => Attr::Sni,
            "source.ip" => Attr::SrcIp,
            "remote.ip" => Attr::RemoteIp,
            "source.namespace" => Attr::SrcNamespace,
            "source.principal" => Attr::SrcPrincipal,
            "request.auth.principal" => Attr::RequestPrincipal,
            "request.auth.audiences" | "request.auth.presenter" => Attr::RequestAuth(k.into()),
            _ if k.starts_with("request.auth.claims[") => Attr::RequestAuth(k.into()),
            _ => match k
                .strip_prefix("request.headers[")
                .and_then(|r| r.strip_suffix(']'))
            {
                Some(h) if !h.is_empty() => Attr::Header(h.to_ascii_lowercase()),
                _ => Attr::Unknown(k.into()),
            },
        }
    }

    fn is_permission(&self) -> bool {
        matches!(
            self,
            Attr::DestIp
                | Attr::DestPort
                | Attr::Sni
                | Attr::Host
                | Attr::Method
                | Attr::Path
                | Attr::Unknown(_)
        )
    }

    fn name(&self) -> String {
        match self {
            Attr::DestIp => "destination.ip".into(),
            Attr::DestPort => "destination.port / ports".into(),
            Attr::Sni => "connection.sni".into(),
            Attr::Host => "hosts".into(),
            Attr::Method => "methods".into(),
            Attr::Path => "paths".into(),
            Attr::SrcIp => "source.ip / ipBlocks".into(),
            Attr::RemoteIp => "remote.ip / remoteIpBlocks".into(),
            Attr::SrcNamespace => "source.namespace / namespaces".into(),
            Attr::SrcPrincipal => "source.principal / principals".into(),
            Attr::RequestPrincipal => "request.auth.principal / requestPrincipals".into(),
            Attr::RequestAuth(k) | Attr::Unknown(k) => k.clone(),
            Attr::Header(h) => format!("request.headers[{h}]"),
        }
    }

    /// Why this attribute cannot be enforced here, if it cannot. Istio's generators refuse HTTP
    /// attributes on TCP chains; JWT attributes need request authentication, which a stock Envoy at
    /// the gateway does not do.
    fn unenforceable(&self, http: bool) -> Option<Unenforceable> {
        match self {
            Attr::RequestPrincipal | Attr::RequestAuth(_) => Some(format!(
                "{} needs JWT validation (RequestAuthentication), which the gateway does not do",
                self.name()
            )),
            Attr::Unknown(k) => Some(format!("{k:?} is not an Istio attribute")),
            Attr::Host | Attr::Method | Attr::Path | Attr::Header(_) if !http => {
                Some(format!("{} is HTTP-only and this port is TCP", self.name()))
            }
            _ => None,
        }
    }
}

/// One attribute with its values and not-values (a rule's AND term).
struct Term {
    attr: Attr,
    values: Vec<String>,
    not_values: Vec<String>,
}

fn term(attr: Attr, values: &[String], not_values: &[String]) -> Option<Term> {
    (!values.is_empty() || !not_values.is_empty()).then(|| Term {
        attr,
        values: values.to_vec(),
        not_values: not_values.to_vec(),
    })
}

fn ports_as_strings(p: &[u16]) -> Vec<String> {
    p.iter().map(u16::to_string).collect()
}

/// A permission for one value of a permission attribute.
fn permission_value(
    attr: &Attr,
    v: &str,
    map_port: &dyn Fn(u16) -> u32,
) -> Result<Permission, String> {
    let rule = match attr {
        Attr::DestIp => permission::Rule::DestinationIp(cidr(v)?),
        Attr::DestPort => {
            let p: u16 = v
                .parse()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("{v:?} is not a port"))?;
            permission::Rule::DestinationPort(map_port(p))
        }
        Attr::Sni => permission::Rule::RequestedServerName(istio_string(v, false)),
        // Istio matches hosts case-insensitively on `:authority`.
        Attr::Host => permission::Rule::Header(header_matcher(":authority", v, true)),
        Attr::Method => return Ok(method(v)),
        Attr::Path => return Ok(path(v)),
        other => return Err(format!("{} is not a permission", other.name())),
    };
    Ok(Permission { rule: Some(rule) })
}

/// A principal for one value of a principal attribute.
fn principal_value(attr: &Attr, v: &str) -> Result<Principal, String> {
    let id = match attr {
        Attr::SrcIp => principal::Identifier::DirectRemoteIp(cidr(v)?),
        Attr::RemoteIp => principal::Identifier::RemoteIp(cidr(v)?),
        Attr::SrcNamespace => return Ok(authenticated(namespace_matcher(v))),
        Attr::SrcPrincipal => return Ok(authenticated(wildcard("spiffe://", v))),
        Attr::Header(h) => principal::Identifier::Header(header_matcher(h, v, false)),
        other => return Err(format!("{} is not a principal", other.name())),
    };
    Ok(Principal {
        identifier: Some(id),
    })
}

/// What happens to a condition that cannot be enforced, by action, exactly as Istio's generator
/// (`authz/model`, `checkError`): in ALLOW the whole rule is dropped, so it matches nothing (a
/// smaller allow); in DENY (and CUSTOM enforced as DENY) only that condition is dropped, so the rule
/// matches more (a wider deny). Access never widens.
enum Outcome<T> {
    Built(Vec<T>),
    RuleDropped,
}

/// ANDs the terms of one `from` or `to` entry. `one` builds one value; values are ORed, not-values
/// are NOT(OR).
fn build_terms<T: Clone>(
    terms: &[Term],
    action: Action,
    http: bool,
    one: &dyn Fn(&Attr, &str) -> Result<T, String>,
    or: &dyn Fn(Vec<T>) -> T,
    not: &dyn Fn(T) -> T,
    notes: &mut Vec<String>,
) -> Outcome<T> {
    let mut and = Vec::new();
    for t in terms {
        if let Some(why) = t.attr.unenforceable(http) {
            if action == Action::Allow {
                notes.push(format!("{why}: the ALLOW rule matches nothing"));
                return Outcome::RuleDropped;
            }
            notes.push(format!(
                "{why}: the condition is left out, so the rule denies more"
            ));
            continue;
        }
        for (vals, negate) in [(&t.values, false), (&t.not_values, true)] {
            let mut built = Vec::new();
            for v in vals {
                match one(&t.attr, v) {
                    Ok(x) => built.push(x),
                    Err(e) if action == Action::Allow => {
                        notes.push(format!(
                            "{}: {e}: the ALLOW rule matches nothing",
                            t.attr.name()
                        ));
                        return Outcome::RuleDropped;
                    }
                    Err(e) => notes.push(format!(
                        "{}: {e}: the value is left out, so the rule denies more",
                        t.attr.name()
                    )),
                }
            }
            if !built.is_empty() {
                let o = or(built);
                and.push(if negate { not(o) } else { o });
            }
        }
    }
    Outcome::Built(and)
}

/// One Istio rule → an Envoy RBAC policy, or `None` when the rule matches nothing (an ALLOW rule
/// with a condition that cannot be enforced). `notes` says what was not enforced, and how.
fn rule_policy(
    r: &Rule,
    action: Action,
    http: bool,
    map_port: &dyn Fn(u16) -> u32,
    notes: &mut Vec<String>,
) -> Option<Policy> {
    // `when` conditions join every `from` (principal keys) or every `to` (permission keys).
    let when: Vec<(Attr, &crate::model::Condition)> =
        r.when.iter().map(|c| (Attr::of_key(&c.key), c)).collect();
    let base = |want_permission: bool| -> Vec<Term> {
        when.iter()
            .filter(|(a, _)| a.is_permission() == want_permission)
            .filter_map(|(a, c)| term(a.clone(), &c.values, &c.not_values))
            .collect()
    };
    let mut principal_lists: Vec<Vec<Term>> = r
        .from
        .iter()
        .map(|s| {
            let mut v: Vec<Term> = [
                term(Attr::SrcPrincipal, &s.principals, &s.not_principals),
                term(
                    Attr::RequestPrincipal,
                    &s.request_principals,
                    &s.not_request_principals,
                ),
                term(Attr::SrcNamespace, &s.namespaces, &s.not_namespaces),
                term(Attr::RemoteIp, &s.remote_ip_blocks, &s.not_remote_ip_blocks),
                term(Attr::SrcIp, &s.ip_blocks, &s.not_ip_blocks),
            ]
            .into_iter()
            .flatten()
            .collect();
            v.extend(base(false));
            v
        })
        .collect();
    if principal_lists.is_empty() {
        principal_lists.push(base(false));
    }
    let mut permission_lists: Vec<Vec<Term>> =
        r.to.iter()
            .map(|o| {
                let mut v: Vec<Term> = [
                    term(Attr::Host, &o.hosts, &o.not_hosts),
                    term(Attr::Method, &o.methods, &o.not_methods),
                    term(Attr::Path, &o.paths, &o.not_paths),
                    term(
                        Attr::DestPort,
                        &ports_as_strings(&o.ports),
                        &ports_as_strings(&o.not_ports),
                    ),
                ]
                .into_iter()
                .flatten()
                .collect();
                v.extend(base(true));
                v
            })
            .collect();
    if permission_lists.is_empty() {
        permission_lists.push(base(true));
    }
    let mut permissions = Vec::new();
    for terms in &permission_lists {
        match build_terms(
            terms,
            action,
            http,
            &|a, v| permission_value(a, v, map_port),
            &or_rules,
            &not_rule,
            notes,
        ) {
            Outcome::Built(and) => permissions.push(and_rules(and)),
            Outcome::RuleDropped => return None,
        }
    }
    let mut principals = Vec::new();
    for terms in &principal_lists {
        match build_terms(
            terms,
            action,
            http,
            &principal_value,
            &or_ids,
            &not_id,
            notes,
        ) {
            Outcome::Built(and) => principals.push(and_ids(and)),
            Outcome::RuleDropped => return None,
        }
    }
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

/// RBAC configs for a service, DENY first then ALLOW (`None` where no policy of that kind exists).
/// CUSTOM policies have no extension provider here, so, like istiod when a provider is missing,
/// their rules are enforced as DENY. AUDIT policies never change access. `notes` collects what
/// could not be enforced as written (for logs, `/debug/registryz` and a metric).
pub fn rbac_configs(
    policies: &[&AuthorizationPolicy],
    http: bool,
    map_port: &dyn Fn(u16) -> u32,
    notes: &mut Vec<String>,
) -> (Option<Rbac>, Option<Rbac>) {
    let mut build = |actions: &[Action], as_action: Action| -> Option<Rbac> {
        let ps: Vec<&&AuthorizationPolicy> = policies
            .iter()
            .filter(|p| actions.contains(&p.action))
            .collect();
        if ps.is_empty() {
            return None;
        }
        let mut map = HashMap::new();
        for p in ps {
            if p.action == Action::Custom {
                notes.push(format!(
                    "{NOTE_PREFIX}{}/{}: CUSTOM provider {:?} is not available at the gateway: its rules are enforced as DENY",
                    p.namespace,
                    p.name,
                    p.provider.as_deref().unwrap_or("")
                ));
            }
            for (i, r) in p.rules.iter().enumerate() {
                let mut rule_notes = Vec::new();
                let built = rule_policy(r, as_action, http, map_port, &mut rule_notes);
                notes.extend(rule_notes.into_iter().map(|n| {
                    format!(
                        "{NOTE_PREFIX}{}/{} rules[{i}] ({}): {n}",
                        p.namespace,
                        p.name,
                        if http { "HTTP" } else { "TCP" }
                    )
                }));
                if let Some(pol) = built {
                    map.insert(
                        format!("ns[{}]-policy[{}]-rule[{i}]", p.namespace, p.name),
                        pol,
                    );
                }
            }
        }
        Some(Rbac {
            action: match as_action {
                Action::Allow => rbac::Action::Allow as i32,
                _ => rbac::Action::Deny as i32,
            },
            policies: map,
            ..Default::default()
        })
    };
    let deny = build(&[Action::Deny, Action::Custom], Action::Deny);
    let allow = build(&[Action::Allow], Action::Allow);
    for p in policies.iter().filter(|p| p.action == Action::Audit) {
        notes.push(format!(
            "{NOTE_PREFIX}{}/{}: AUDIT only logs in Istio; it changes nothing about access here",
            p.namespace, p.name
        ));
    }
    (deny, allow)
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
    notes: &mut Vec<String>,
) -> Vec<
    envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::HttpFilter,
> {
    use envoy_types::pb::envoy::extensions::filters::http::rbac::v3::Rbac as HttpRbac;
    use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
        HttpFilter, http_filter,
    };
    let (deny, allow) = rbac_configs(policies, true, map_port, notes);
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
    notes: &mut Vec<String>,
) -> Vec<envoy_types::pb::envoy::config::listener::v3::Filter> {
    use envoy_types::pb::envoy::extensions::filters::network::rbac::v3::Rbac as NetRbac;
    let (deny, allow) = rbac_configs(policies, false, map_port, notes);
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
    use crate::model::{Condition, Operation, Source};

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
            selector: None,
            target_services: vec![],
            action,
            provider: None,
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
        assert!(http_filters(&[], &id, &mut vec![]).is_empty());
        let p = pol(Action::Allow, vec![]);
        let (deny, allow) = rbac_configs(&[&p], true, &id, &mut vec![]);
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
                ..Default::default()
            }],
        );
        let a = pol(Action::Allow, vec![Rule::default()]);
        let f = http_filters(&[&a, &d], &id, &mut vec![]);
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
            to: vec![op],
            ..Default::default()
        };
        let (_, allow) = rbac_configs(
            &[&pol(Action::Allow, vec![rule.clone()])],
            false,
            &id,
            &mut vec![],
        );
        assert!(
            allow.unwrap().policies.is_empty(),
            "HTTP-only ALLOW rule cannot match TCP"
        );
        let (deny, _) = rbac_configs(&[&pol(Action::Deny, vec![rule])], false, &id, &mut vec![]);
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
                ..Default::default()
            })
            .collect();
        let p = pol(Action::Allow, rules);
        let (_, allow) = rbac_configs(&[&p], true, &id, &mut vec![]);
        let allow = allow.unwrap();
        let bytes = encode_rbac_sorted(&allow);
        assert_eq!(Rbac::decode(bytes.as_slice()).unwrap(), allow);
        let f = http_filters(&[&p], &id, &mut vec![]);
        let Some(envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_filter::ConfigType::TypedConfig(any)) = &f[0].config_type else { panic!() };
        let decoded = envoy_types::pb::envoy::extensions::filters::http::rbac::v3::Rbac::decode(
            any.value.as_slice(),
        )
        .unwrap();
        assert_eq!(decoded.rules.unwrap(), allow);
        for _ in 0..10 {
            let (_, again) = rbac_configs(&[&p], true, &id, &mut vec![]);
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
        let r = Rule {
            to: vec![op],
            ..Default::default()
        };
        let p = rule_policy(
            &r,
            Action::Allow,
            true,
            &|p| u32::from(p) + 10000,
            &mut vec![],
        )
        .expect("enforceable");
        let Some(permission::Rule::AndRules(set)) = &p.permissions[0].rule else {
            panic!()
        };
        assert_eq!(set.rules.len(), 3);
        assert_eq!(
            set.rules[2],
            or_rules(vec![Permission {
                rule: Some(permission::Rule::DestinationPort(18080))
            }])
        );
    }

    fn cond(key: &str, values: &[&str], not_values: &[&str]) -> Condition {
        Condition {
            key: key.into(),
            values: values.iter().map(|v| v.to_string()).collect(),
            not_values: not_values.iter().map(|v| v.to_string()).collect(),
        }
    }

    fn one(r: Rule, action: Action, http: bool) -> (Option<Policy>, Vec<String>) {
        let mut notes = vec![];
        let p = rule_policy(&r, action, http, &id, &mut notes);
        (p, notes)
    }

    fn principal_ids(p: &Policy) -> Vec<Principal> {
        match &p.principals[0].identifier {
            Some(principal::Identifier::AndIds(s)) => s.ids.clone(),
            Some(principal::Identifier::Any(true)) => vec![],
            other => panic!("{other:?}"),
        }
    }

    fn permission_rules(p: &Policy) -> Vec<Permission> {
        match &p.permissions[0].rule {
            Some(permission::Rule::AndRules(s)) => s.rules.clone(),
            Some(permission::Rule::Any(true)) => vec![],
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn source_ip_blocks_and_remote_ip_blocks() {
        let r = Rule {
            from: vec![Source {
                ip_blocks: vec!["10.1.0.0/16".into(), "10.9.9.9".into()],
                not_remote_ip_blocks: vec!["192.168.0.0/24".into()],
                ..Default::default()
            }],
            ..Default::default()
        };
        let (p, notes) = one(r, Action::Deny, false);
        assert!(notes.is_empty(), "{notes:?}");
        let ids = principal_ids(&p.expect("built"));
        assert_eq!(ids.len(), 2);
        let cidr = |a: &str, l: u32| CidrRange {
            address_prefix: a.into(),
            prefix_len: Some(envoy_types::pb::google::protobuf::UInt32Value { value: l }),
        };
        assert_eq!(
            ids[1],
            or_ids(vec![
                Principal {
                    identifier: Some(principal::Identifier::DirectRemoteIp(cidr("10.1.0.0", 16)))
                },
                Principal {
                    identifier: Some(principal::Identifier::DirectRemoteIp(cidr("10.9.9.9", 32)))
                },
            ])
        );
        assert_eq!(
            ids[0],
            not_id(or_ids(vec![Principal {
                identifier: Some(principal::Identifier::RemoteIp(cidr("192.168.0.0", 24)))
            }]))
        );
    }

    #[test]
    fn when_conditions_join_principals_or_permissions_as_in_istio() {
        let r = Rule {
            when: vec![
                cond("request.headers[X-Tenant]", &["blue"], &[]),
                cond("source.ip", &["10.0.0.0/8"], &[]),
                cond("remote.ip", &[], &["1.2.3.4"]),
                cond("source.namespace", &["linux"], &[]),
                cond("source.principal", &["cluster.local/ns/linux/sa/a"], &[]),
                cond("destination.ip", &["127.0.0.1"], &[]),
                cond("destination.port", &["8080"], &[]),
                cond("connection.sni", &["outbound_.8080_._.*"], &[]),
            ],
            ..Default::default()
        };
        let (p, notes) = one(r, Action::Allow, true);
        assert!(notes.is_empty(), "{notes:?}");
        let p = p.expect("built");
        // Principal side: header, source.ip, remote.ip, namespace, principal.
        let ids = principal_ids(&p);
        assert_eq!(ids.len(), 5);
        assert_eq!(
            ids[0],
            or_ids(vec![Principal {
                identifier: Some(principal::Identifier::Header(HeaderMatcher {
                    name: "x-tenant".into(),
                    header_match_specifier: Some(
                        header_matcher::HeaderMatchSpecifier::StringMatch(exact("blue"))
                    ),
                    ..Default::default()
                }))
            }])
        );
        // Permission side: destination.ip, destination.port, connection.sni (prefix).
        let rules = permission_rules(&p);
        assert_eq!(rules.len(), 3);
        assert_eq!(
            rules[2],
            or_rules(vec![Permission {
                rule: Some(permission::Rule::RequestedServerName(prefix(
                    "outbound_.8080_._."
                )))
            }])
        );
    }

    #[test]
    fn hosts_match_authority_case_insensitively() {
        let r = Rule {
            to: vec![Operation {
                hosts: vec!["winapp.win.svc.cluster.local*".into()],
                not_hosts: vec!["*.evil".into()],
                ..Default::default()
            }],
            ..Default::default()
        };
        let (p, _) = one(r, Action::Allow, true);
        let rules = permission_rules(&p.expect("built"));
        let mut m = prefix("winapp.win.svc.cluster.local");
        m.ignore_case = true;
        assert_eq!(
            rules[0],
            or_rules(vec![Permission {
                rule: Some(permission::Rule::Header(HeaderMatcher {
                    name: ":authority".into(),
                    header_match_specifier: Some(
                        header_matcher::HeaderMatchSpecifier::StringMatch(m)
                    ),
                    ..Default::default()
                }))
            }])
        );
        assert!(matches!(rules[1].rule, Some(permission::Rule::NotRule(_))));
    }

    /// Every condition that cannot be enforced: an ALLOW rule matches nothing, a DENY rule is kept
    /// without that condition (it denies more). Never the other way round.
    #[test]
    fn unenforceable_conditions_never_widen_access() {
        let cases: Vec<(&str, Rule, bool)> = vec![
            (
                "request principals",
                Rule {
                    from: vec![Source {
                        request_principals: vec!["*".into()],
                        ..Default::default()
                    }],
                    ..Default::default()
                },
                true,
            ),
            (
                "JWT claim",
                Rule {
                    when: vec![cond("request.auth.claims[iss]", &["https://idp"], &[])],
                    ..Default::default()
                },
                true,
            ),
            (
                "an attribute Istio does not know",
                Rule {
                    when: vec![cond("source.color", &["blue"], &[])],
                    ..Default::default()
                },
                true,
            ),
            (
                "methods on TCP",
                Rule {
                    to: vec![Operation {
                        methods: vec!["GET".into()],
                        ..Default::default()
                    }],
                    ..Default::default()
                },
                false,
            ),
            (
                "paths on TCP",
                Rule {
                    to: vec![Operation {
                        not_paths: vec!["/admin".into()],
                        ..Default::default()
                    }],
                    ..Default::default()
                },
                false,
            ),
            (
                "hosts on TCP",
                Rule {
                    to: vec![Operation {
                        hosts: vec!["a".into()],
                        ..Default::default()
                    }],
                    ..Default::default()
                },
                false,
            ),
            (
                "a request header on TCP",
                Rule {
                    when: vec![cond("request.headers[x-a]", &["1"], &[])],
                    ..Default::default()
                },
                false,
            ),
            (
                "a bad IP block",
                Rule {
                    from: vec![Source {
                        ip_blocks: vec!["10.0.0.0/40".into()],
                        ..Default::default()
                    }],
                    ..Default::default()
                },
                true,
            ),
        ];
        for (what, rule, http) in cases {
            let (allow, notes) = one(rule.clone(), Action::Allow, http);
            assert!(allow.is_none(), "{what}: ALLOW must match nothing");
            assert!(
                notes.iter().any(|n| n.contains("matches nothing")),
                "{what}: {notes:?}"
            );
            let (deny, notes) = one(rule, Action::Deny, http);
            let deny = deny.unwrap_or_else(|| panic!("{what}: DENY must stay"));
            assert!(
                principal_ids(&deny).is_empty() && permission_rules(&deny).is_empty(),
                "{what}: the DENY rule applies without the condition: {deny:?}"
            );
            assert!(
                notes.iter().any(|n| n.contains("denies more")),
                "{what}: {notes:?}"
            );
        }
    }

    #[test]
    fn custom_is_enforced_as_deny_and_audit_changes_nothing() {
        let mut custom = pol(
            Action::Custom,
            vec![Rule {
                to: vec![Operation {
                    paths: vec!["/admin*".into()],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        );
        custom.provider = Some("opa".into());
        let audit = pol(Action::Audit, vec![Rule::default()]);
        let mut notes = vec![];
        let (deny, allow) = rbac_configs(&[&custom, &audit], true, &id, &mut notes);
        let deny = deny.expect("CUSTOM → DENY");
        assert_eq!(deny.action, rbac::Action::Deny as i32);
        assert_eq!(deny.policies.len(), 1);
        assert!(allow.is_none(), "AUDIT adds no ALLOW policy");
        assert!(
            notes.iter().any(|n| n.contains("CUSTOM provider \"opa\"")),
            "{notes:?}"
        );
        assert!(notes.iter().any(|n| n.contains("AUDIT")), "{notes:?}");
    }
}
