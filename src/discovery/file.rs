//! The mesh file: a YAML description of the model, watched and reloaded atomically.
//!
//! A file that cannot be parsed as a whole (YAML syntax, unknown top-level field, too large or too
//! deeply nested) keeps the last good model in service and reports the error. Inside a good file,
//! each object is validated on its own: a bad service, Windows service or policy is skipped, logged
//! and counted, and every other object is served.
//!
//! An incomplete write must never be published (an empty file, a shell `>` redirect caught half way,
//! a copy cut at a line boundary are all valid YAML). Three rules, documented in docs/mesh-file.md:
//! the file is read only after it has been quiet for `mesh.settle` (see [`super::watch`]); a content
//! change seen during the read discards the read; and a reload may not drop a top-level section that
//! held objects in the last applied file: emptying a section takes an explicit `section: []`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Deserialize;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tracing::{info, warn};

use super::{MeshState, ObjectError};
use crate::identity::SpiffeId;
use crate::metrics::Metrics;
use crate::model::*;

/// The largest mesh file read (the size check happens before parsing).
pub const MAX_FILE_BYTES: usize = 256 * 1024 * 1024;

/// Top-level sections: `None` = absent (or a bare `key:`, which is what a file cut just after the key
/// looks like), `Some(vec![])` = explicitly empty.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileDoc {
    #[serde(default)]
    services: Option<Vec<serde_yaml::Value>>,
    #[serde(default)]
    windows_services: Option<Vec<serde_yaml::Value>>,
    #[serde(default)]
    peer_authentications: Option<Vec<serde_yaml::Value>>,
    #[serde(default)]
    authorization_policies: Option<Vec<serde_yaml::Value>>,
}

/// How many entries each top-level section had (`None` = absent), for the reload rule.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Sections(pub [Option<usize>; 4]);

impl Sections {
    pub const NAMES: [&'static str; 4] = [
        "services",
        "windows_services",
        "peer_authentications",
        "authorization_policies",
    ];

    fn of(d: &FileDoc) -> Sections {
        Sections([
            d.services.as_ref().map(Vec::len),
            d.windows_services.as_ref().map(Vec::len),
            d.peer_authentications.as_ref().map(Vec::len),
            d.authorization_policies.as_ref().map(Vec::len),
        ])
    }

    /// The reload rule: a section that held objects before may only disappear explicitly.
    pub fn check_reload(&self, prev: &Sections) -> Result<(), String> {
        for (i, name) in Self::NAMES.iter().enumerate() {
            if let (Some(n), None) = (prev.0[i], self.0[i])
                && n > 0
            {
                return Err(format!(
                    "{name}: missing, but the last applied file had {n}; the file looks incomplete \
                     (still being written?), so it was not applied. To remove them all, write \
                     `{name}: []`"
                ));
            }
        }
        Ok(())
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PortDoc {
    name: String,
    port: u16,
    #[serde(default, alias = "appProtocol")]
    app_protocol: Option<String>,
    #[serde(default, alias = "targetPort")]
    target_port: Option<u16>,
    #[serde(default)]
    local_port: Option<u16>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EndpointDoc {
    address: IpAddr,
    #[serde(default)]
    ports: BTreeMap<String, u16>,
    #[serde(default)]
    service_account: Option<String>,
    #[serde(default)]
    tls_mode: Option<TlsMode>,
    #[serde(default)]
    node: Option<String>,
    #[serde(default = "yes")]
    ready: bool,
    /// The workload's labels (matched by workload-selector PeerAuthentications).
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

fn yes() -> bool {
    true
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceDoc {
    name: String,
    namespace: String,
    ports: Vec<PortDoc>,
    #[serde(default)]
    service_accounts: Vec<String>,
    #[serde(default)]
    endpoints: Vec<EndpointDoc>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WinPortDoc {
    name: String,
    port: u16,
    #[serde(default, alias = "appProtocol")]
    app_protocol: Option<String>,
    #[serde(default)]
    gateway_port: Option<u16>,
    #[serde(default, alias = "targetPort")]
    target_port: Option<u16>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WindowsServiceDoc {
    name: String,
    namespace: String,
    #[serde(default)]
    host: Option<String>,
    #[serde(default)]
    identity: Option<String>,
    #[serde(default)]
    outbound_port: Option<u16>,
    ports: Vec<WinPortDoc>,
    backends: Vec<IpAddr>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PortMode {
    mode: MtlsMode,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PeerAuthDoc {
    namespace: String,
    /// Istio's `selector`: a workload-selector policy for the endpoints whose labels match.
    #[serde(default)]
    selector: Option<SelectorDoc>,
    #[serde(default = "unset")]
    mode: MtlsMode,
    #[serde(default, alias = "portLevelMtls")]
    port_level_mtls: BTreeMap<u16, PortMode>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SelectorDoc {
    #[serde(default, alias = "matchLabels")]
    match_labels: BTreeMap<String, String>,
}

fn unset() -> MtlsMode {
    MtlsMode::Unset
}

/// Istio ports are strings in YAML; accept numbers too.
#[derive(Deserialize)]
#[serde(untagged)]
enum PortValue {
    N(u16),
    S(String),
}

impl PortValue {
    fn get(&self) -> Result<u16, String> {
        match self {
            PortValue::N(n) => Ok(*n),
            PortValue::S(s) => s.parse().map_err(|_| format!("invalid port {s:?}")),
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct SourceDoc {
    #[serde(default)]
    principals: Vec<String>,
    #[serde(default, alias = "notPrincipals")]
    not_principals: Vec<String>,
    #[serde(default, alias = "requestPrincipals")]
    request_principals: Vec<String>,
    #[serde(default, alias = "notRequestPrincipals")]
    not_request_principals: Vec<String>,
    #[serde(default)]
    namespaces: Vec<String>,
    #[serde(default, alias = "notNamespaces")]
    not_namespaces: Vec<String>,
    #[serde(default, alias = "ipBlocks")]
    ip_blocks: Vec<String>,
    #[serde(default, alias = "notIpBlocks")]
    not_ip_blocks: Vec<String>,
    #[serde(default, alias = "remoteIpBlocks")]
    remote_ip_blocks: Vec<String>,
    #[serde(default, alias = "notRemoteIpBlocks")]
    not_remote_ip_blocks: Vec<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct OperationDoc {
    #[serde(default)]
    hosts: Vec<String>,
    #[serde(default, alias = "notHosts")]
    not_hosts: Vec<String>,
    #[serde(default)]
    methods: Vec<String>,
    #[serde(default, alias = "notMethods")]
    not_methods: Vec<String>,
    #[serde(default)]
    paths: Vec<String>,
    #[serde(default, alias = "notPaths")]
    not_paths: Vec<String>,
    #[serde(default)]
    ports: Vec<PortValue>,
    #[serde(default, alias = "notPorts")]
    not_ports: Vec<PortValue>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FromDoc {
    source: SourceDoc,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ToDoc {
    operation: OperationDoc,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConditionDoc {
    key: String,
    #[serde(default)]
    values: Vec<String>,
    #[serde(default, alias = "notValues")]
    not_values: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleDoc {
    #[serde(default)]
    from: Vec<FromDoc>,
    #[serde(default)]
    to: Vec<ToDoc>,
    #[serde(default)]
    when: Vec<ConditionDoc>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProviderDoc {
    name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthzDoc {
    name: String,
    namespace: String,
    /// Windows service names this policy applies to (Istio's workload selector); empty = namespace-wide.
    #[serde(default)]
    services: Vec<String>,
    #[serde(default = "allow")]
    action: Action,
    #[serde(default)]
    provider: Option<ProviderDoc>,
    #[serde(default)]
    rules: Vec<RuleDoc>,
}

/// Just where a policy applies and what it does, read leniently: when the rest of a policy is
/// malformed, this is enough to enforce it fail-closed instead of dropping it.
#[derive(Deserialize)]
struct AuthzEnvelope {
    name: String,
    namespace: String,
    #[serde(default)]
    services: Vec<String>,
    #[serde(default = "allow")]
    action: Action,
}

fn allow() -> Action {
    Action::Allow
}

/// Settings the file source needs from the config.
#[derive(Clone, Debug)]
pub struct FileSettings {
    pub trust_domain: String,
    pub domain_suffix: String,
    /// Istio's root namespace (mesh-wide PeerAuthentication lives there).
    pub root_namespace: String,
    pub gateway: GatewaySettings,
    /// Ports winmesh and Envoy already use on this host (Envoy admin, xDS, debug): a gateway
    /// listener on one of them would fail to bind ("Address already in use").
    pub reserved: Vec<Reserved>,
}

/// A port in use by something other than the gateway's listeners.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reserved {
    pub address: IpAddr,
    pub port: u16,
    /// What uses it, e.g. `envoy.admin`.
    pub what: &'static str,
}

impl FileSettings {
    /// The settings unit tests share: trust domain and suffix `cluster.local`, mesh-facing side on
    /// `0.0.0.0`, Windows-facing on `127.0.0.1:15001`, nothing reserved.
    #[cfg(test)]
    pub(crate) fn for_tests() -> FileSettings {
        FileSettings {
            trust_domain: "cluster.local".into(),
            domain_suffix: "cluster.local".into(),
            root_namespace: "istio-system".into(),
            gateway: GatewaySettings {
                inbound_address: std::net::Ipv4Addr::UNSPECIFIED.into(),
                outbound_address: std::net::Ipv4Addr::LOCALHOST.into(),
                outbound_port: 15001,
                refuse_unknown_callers: false,
            },
            reserved: vec![],
        }
    }

    /// The settings `winmesh serve` uses for a config (also what `winmesh validate` checks against).
    pub fn from_config(cfg: &crate::config::Config) -> FileSettings {
        FileSettings {
            trust_domain: cfg.identity.trust_domain.clone(),
            domain_suffix: cfg.mesh.domain_suffix.clone(),
            root_namespace: cfg.mesh.root_namespace.clone(),
            gateway: GatewaySettings {
                inbound_address: cfg.gateway.inbound_address,
                outbound_address: cfg.gateway.outbound_address,
                outbound_port: cfg.gateway.outbound_port,
                refuse_unknown_callers: cfg.mesh.kubernetes.enabled
                    && cfg.mesh.kubernetes.windows.unknown_callers
                        == crate::config::UnknownCallers::Refuse,
            },
            reserved: cfg
                .reserved_ports()
                .into_iter()
                .map(|(what, a)| Reserved {
                    address: a.ip(),
                    port: a.port(),
                    what,
                })
                .collect(),
        }
    }

    /// If a gateway listener on `address:port` would clash with a reserved port, what holds it.
    pub fn reserved_by(&self, address: IpAddr, port: u16) -> Option<&'static str> {
        self.reserved
            .iter()
            .find(|r| {
                r.port == port
                    && (r.address == address
                        || r.address.is_unspecified()
                        || address.is_unspecified())
            })
            .map(|r| r.what)
    }
}

/// A DNS label as Kubernetes names need it (RFC 1123).
pub(crate) fn dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn object_name(v: &serde_yaml::Value, index: usize) -> String {
    let ns = v.get("namespace").and_then(|x| x.as_str());
    let name = v.get("name").and_then(|x| x.as_str());
    match (ns, name) {
        (Some(ns), Some(n)) => format!("{ns}/{n}"),
        (None, Some(n)) => n.to_string(),
        (Some(ns), None) => format!("{ns}/#{index}"),
        _ => format!("#{index}"),
    }
}

fn decode<T: DeserializeOwned>(v: &serde_yaml::Value) -> Result<T, String> {
    serde_path_to_error::deserialize(v.clone()).map_err(|e| {
        let path = e.path().to_string();
        let msg = e.into_inner().to_string();
        if path == "." {
            msg
        } else {
            format!("{path}: {msg}")
        }
    })
}

fn check_name(what: &str, s: &str) -> Result<(), String> {
    if dns_label(s) {
        Ok(())
    } else {
        Err(format!(
            "{what} {s:?} is not a DNS label (lowercase letters, digits, '-')"
        ))
    }
}

fn check_port(what: &str, p: u16) -> Result<(), String> {
    if p == 0 {
        Err(format!("{what} must be 1-65535"))
    } else {
        Ok(())
    }
}

fn service(d: ServiceDoc, s: &FileSettings, notes: &mut Vec<String>) -> Result<Service, String> {
    check_name("name", &d.name)?;
    check_name("namespace", &d.namespace)?;
    if d.ports.is_empty() {
        return Err("ports: at least one port is required".into());
    }
    let udp_names: BTreeSet<String> = d
        .ports
        .iter()
        .filter(|p| Protocol::detect(&p.name, p.app_protocol.as_deref()) == Protocol::Udp)
        .map(|p| p.name.clone())
        .collect();
    let left_out = |n: &str| udp_names.contains(n);
    let mut ports = Vec::new();
    let mut seen = BTreeSet::new();
    for p in d.ports {
        check_port(&format!("ports[{}].port", p.name), p.port)?;
        if p.name.is_empty() {
            return Err("ports: every port needs a name".into());
        }
        if !seen.insert(p.port) {
            return Err(format!("ports: port {} listed twice", p.port));
        }
        let protocol = Protocol::detect(&p.name, p.app_protocol.as_deref());
        if protocol == Protocol::Udp {
            // One rule for both sources (as istiod, which builds nothing for UDP ports): the port
            // is left out and reported, the service's other ports are served.
            notes.push(format!(
                "ports[{}]: UDP cannot be carried over Istio mTLS; port left out",
                p.name
            ));
            continue;
        }
        if let Some(lp) = p.local_port {
            check_port("local_port", lp)?;
            if let Some(what) = s.reserved_by(s.gateway.outbound_address, lp) {
                return Err(format!(
                    "ports[{}]: local_port {lp} is already used by {what}",
                    p.name
                ));
            }
        }
        ports.push(ServicePort {
            target_port: p.target_port.unwrap_or(p.port),
            name: p.name,
            port: p.port,
            protocol,
            local_port: p.local_port,
        });
    }
    if ports.is_empty() {
        return Err("ports: no port left that the gateway can carry".into());
    }
    let mut endpoints = Vec::new();
    for (i, e) in d.endpoints.into_iter().enumerate() {
        for name in e.ports.keys() {
            if !ports.iter().any(|p| &p.name == name) && !left_out(name) {
                return Err(format!(
                    "endpoints[{i}].ports: no service port named {name:?}"
                ));
            }
        }
        if let Some(sa) = &e.service_account
            && !sa.starts_with("spiffe://")
        {
            check_name(&format!("endpoints[{i}].service_account"), sa)?;
        }
        endpoints.push(Endpoint {
            address: e.address,
            ports: e.ports.into_iter().filter(|(n, _)| !left_out(n)).collect(),
            tls_mode: e.tls_mode.unwrap_or(TlsMode::Istio),
            service_account: e.service_account,
            namespace: None,
            labels: e.labels,
            node: e.node,
            ready: e.ready,
            listed_ports_only: false,
            terminating_serving: false,
        });
    }
    for sa in &d.service_accounts {
        if sa.starts_with("spiffe://") {
            SpiffeId::parse(sa).map_err(|e| format!("service_accounts: {e}"))?;
        } else {
            check_name("service_accounts", sa)?;
        }
    }
    Ok(Service {
        host: format!("{}.{}.svc.{}", d.name, d.namespace, s.domain_suffix),
        name: d.name,
        namespace: d.namespace,
        ports,
        extra_service_accounts: d.service_accounts,
        endpoints,
    })
}

fn windows_service(d: WindowsServiceDoc, s: &FileSettings) -> Result<WindowsService, String> {
    check_name("name", &d.name)?;
    check_name("namespace", &d.namespace)?;
    if d.ports.is_empty() {
        return Err("ports: at least one port is required".into());
    }
    if d.backends.is_empty() {
        return Err("backends: at least one Windows backend address is required".into());
    }
    let host = d
        .host
        .unwrap_or_else(|| format!("{}.{}.svc.{}", d.name, d.namespace, s.domain_suffix));
    if host.is_empty()
        || !host
            .split('.')
            .all(|l| !l.is_empty() && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
    {
        return Err(format!("host {host:?} is not a valid DNS name"));
    }
    let identity = d
        .identity
        .map(|i| SpiffeId::parse(&i).map_err(|e| format!("identity: {e}")))
        .transpose()?;
    if let Some(id) = &identity
        && id.trust_domain != s.trust_domain
    {
        return Err(format!(
            "identity: trust domain {:?} is not the mesh's {:?}",
            id.trust_domain, s.trust_domain
        ));
    }
    if let Some(op) = d.outbound_port {
        check_port("outbound_port", op)?;
        if let Some(what) = s.reserved_by(s.gateway.outbound_address, op) {
            return Err(format!("outbound_port {op} is already used by {what}"));
        }
        if identity.is_none() {
            return Err(
                "outbound_port: needs `identity` (the shared outbound port already presents the \
                 gateway's own identity)"
                    .into(),
            );
        }
        if op == s.gateway.outbound_port {
            return Err(format!(
                "outbound_port {op} is the shared outbound HTTP port"
            ));
        }
    }
    let mut ports = Vec::new();
    let mut seen = BTreeSet::new();
    for p in d.ports {
        check_port(&format!("ports[{}].port", p.name), p.port)?;
        let protocol = Protocol::detect(&p.name, p.app_protocol.as_deref());
        if protocol == Protocol::Udp {
            return Err(format!(
                "ports[{}]: UDP cannot be carried over Istio mTLS",
                p.name
            ));
        }
        let gateway_port = p.gateway_port.unwrap_or(p.port);
        check_port("gateway_port", gateway_port)?;
        if let Some(what) = s.reserved_by(s.gateway.inbound_address, gateway_port) {
            return Err(format!(
                "ports[{}]: gateway_port {gateway_port} is already used by {what}",
                p.name
            ));
        }
        if gateway_port == s.gateway.outbound_port && s.gateway.addresses_overlap() {
            return Err(format!(
                "ports[{}]: gateway_port {gateway_port} is the outbound HTTP port",
                p.name
            ));
        }
        if Some(gateway_port) == d.outbound_port && s.gateway.addresses_overlap() {
            return Err(format!(
                "ports[{}]: gateway_port {gateway_port} is this service's outbound_port",
                p.name
            ));
        }
        if !seen.insert(p.port) {
            return Err(format!("ports: port {} listed twice", p.port));
        }
        ports.push(WindowsPort {
            target_port: p.target_port.unwrap_or(p.port),
            name: p.name,
            port: p.port,
            protocol,
            gateway_port,
        });
    }
    Ok(WindowsService {
        name: d.name,
        namespace: d.namespace,
        host,
        ports,
        backends: d.backends.into_iter().map(WindowsBackend::local).collect(),
        identity,
        outbound_port: d.outbound_port,
        origin: None,
    })
}

fn check_principal(p: &str) -> Result<(), String> {
    let inner = p.trim_start_matches('*').trim_end_matches('*');
    if p.is_empty()
        || inner.contains('*')
        || (p.starts_with('*') && p.ends_with('*') && p.len() > 1)
    {
        return Err(format!(
            "{p:?}: '*' is only allowed alone, as a prefix or as a suffix"
        ));
    }
    if p.starts_with("spiffe://") {
        return Err(format!(
            "{p:?}: principals are written without spiffe:// (e.g. cluster.local/ns/x/sa/y)"
        ));
    }
    Ok(())
}

fn rules(docs: Vec<RuleDoc>) -> Result<Vec<Rule>, String> {
    let mut rules = Vec::new();
    for (i, r) in docs.into_iter().enumerate() {
        let mut from = Vec::new();
        for f in r.from {
            let s = f.source;
            for p in s.principals.iter().chain(s.not_principals.iter()) {
                check_principal(p).map_err(|e| format!("rules[{i}].from: {e}"))?;
            }
            from.push(Source {
                principals: s.principals,
                not_principals: s.not_principals,
                request_principals: s.request_principals,
                not_request_principals: s.not_request_principals,
                namespaces: s.namespaces,
                not_namespaces: s.not_namespaces,
                ip_blocks: s.ip_blocks,
                not_ip_blocks: s.not_ip_blocks,
                remote_ip_blocks: s.remote_ip_blocks,
                not_remote_ip_blocks: s.not_remote_ip_blocks,
            });
        }
        let mut to = Vec::new();
        for t in r.to {
            let o = t.operation;
            let ports = o
                .ports
                .iter()
                .map(PortValue::get)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("rules[{i}].to: {e}"))?;
            let not_ports = o
                .not_ports
                .iter()
                .map(PortValue::get)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("rules[{i}].to: {e}"))?;
            for p in o.paths.iter().chain(o.not_paths.iter()) {
                check_principal(p).map_err(|e| format!("rules[{i}].to.paths: {e}"))?;
            }
            to.push(Operation {
                hosts: o.hosts,
                not_hosts: o.not_hosts,
                methods: o.methods,
                not_methods: o.not_methods,
                paths: o.paths,
                not_paths: o.not_paths,
                ports,
                not_ports,
            });
        }
        let when = r
            .when
            .into_iter()
            .map(|c| Condition {
                key: c.key,
                values: c.values,
                not_values: c.not_values,
            })
            .collect();
        rules.push(Rule { from, to, when });
    }
    Ok(rules)
}

fn policy(d: AuthzDoc) -> Result<AuthorizationPolicy, String> {
    check_name("name", &d.name)?;
    check_name("namespace", &d.namespace)?;
    let rules = rules(d.rules)?;
    if d.action == Action::Custom && d.provider.is_none() {
        return Err("provider: a CUSTOM policy needs provider.name".into());
    }
    Ok(AuthorizationPolicy {
        name: d.name,
        namespace: d.namespace,
        services: d.services,
        selector: None,
        target_services: vec![],
        action: d.action,
        provider: d.provider.map(|p| p.name),
        rules,
    })
}

/// The `rules` and `provider` of an Istio AuthorizationPolicy `spec` (a Kubernetes object), read
/// with the mesh file's rules (same field names, same checks).
pub(crate) fn policy_rules(
    spec: &serde_json::Value,
) -> Result<(Vec<Rule>, Option<String>), String> {
    #[derive(Deserialize)]
    struct SpecRules {
        #[serde(default)]
        rules: Vec<RuleDoc>,
        #[serde(default)]
        provider: Option<ProviderDoc>,
    }
    let v = serde_json::json!({
        "rules": spec.get("rules").cloned().unwrap_or(serde_json::Value::Null),
        "provider": spec.get("provider").cloned().unwrap_or(serde_json::Value::Null),
    });
    let mut v = v;
    if v["rules"].is_null() {
        v["rules"] = serde_json::json!([]);
    }
    let d: SpecRules = serde_json::from_value(v).map_err(|e| format!("spec.rules: {e}"))?;
    Ok((rules(d.rules)?, d.provider.map(|p| p.name)))
}

/// A policy whose rules could not be read, enforced fail-closed: an ALLOW policy that allows nothing
/// (other ALLOW policies still allow what they allow), a DENY or CUSTOM policy that denies everything
/// on the services it selects. An AUDIT policy changes nothing about access anyway.
fn fail_closed_policy(e: AuthzEnvelope) -> AuthorizationPolicy {
    fail_closed(AuthorizationPolicy {
        name: e.name,
        namespace: e.namespace,
        services: e.services,
        selector: None,
        target_services: vec![],
        action: e.action,
        provider: None,
        rules: vec![],
    })
}

/// `p` (where it applies and its action) enforced fail-closed, whatever its rules said.
pub(crate) fn fail_closed(p: AuthorizationPolicy) -> AuthorizationPolicy {
    let rules = match p.action {
        Action::Allow | Action::Audit => vec![],
        Action::Deny | Action::Custom => vec![Rule::default()],
    };
    AuthorizationPolicy {
        action: if p.action == Action::Custom {
            Action::Deny
        } else {
            p.action
        },
        provider: None,
        rules,
        ..p
    }
}

/// Parses a mesh file. `Err` = the file as a whole is unusable; `Ok` carries the model and the objects
/// that were skipped.
pub fn parse(text: &str, s: &FileSettings) -> Result<(Mesh, Vec<ObjectError>), String> {
    parse_sections(text, s).map(|(m, e, _)| (m, e))
}

/// Like [`parse`], also returning which sections the file has (for the reload rule).
pub fn parse_sections(
    text: &str,
    s: &FileSettings,
) -> Result<(Mesh, Vec<ObjectError>, Sections), String> {
    crate::yamlcheck::check(text, MAX_FILE_BYTES).map_err(|e| e.to_string())?;
    // A document with nothing but comments is YAML null: no sections at all.
    let value: serde_yaml::Value = serde_yaml::from_str(text).map_err(|e| e.to_string())?;
    let doc: FileDoc = if value.is_null() {
        FileDoc::default()
    } else {
        serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            format!("{path}: {}", e.into_inner())
        })?
    };
    let sections = Sections::of(&doc);
    let FileDoc {
        services,
        windows_services,
        peer_authentications,
        authorization_policies,
    } = doc;
    let (services, windows_services, peer_authentications, authorization_policies) = (
        services.unwrap_or_default(),
        windows_services.unwrap_or_default(),
        peer_authentications.unwrap_or_default(),
        authorization_policies.unwrap_or_default(),
    );
    let mut errors = Vec::new();
    let mut mesh = Mesh {
        trust_domain: s.trust_domain.clone(),
        root_namespace: s.root_namespace.clone(),
        gateway: s.gateway.clone(),
        services: vec![],
        windows_services: vec![],
        peer_authentications: vec![],
        authorization_policies: vec![],
    };
    let mut reject = |kind, v: &serde_yaml::Value, i, message: String| {
        errors.push(ObjectError {
            kind,
            name: object_name(v, i),
            message,
        })
    };

    let mut local_ports: BTreeMap<u16, String> = BTreeMap::new();
    for (i, v) in services.iter().enumerate() {
        let mut notes = Vec::new();
        match decode::<ServiceDoc>(v).and_then(|d| service(d, s, &mut notes)) {
            Ok(svc) => {
                for n in notes {
                    reject("service", v, i, n);
                }
                if mesh.services.iter().any(|x| x.host == svc.host) {
                    reject("service", v, i, format!("duplicate service {}", svc.host));
                    continue;
                }
                let clash = svc
                    .ports
                    .iter()
                    .filter_map(|p| p.local_port)
                    .find_map(|lp| {
                        local_ports
                            .get(&lp)
                            .map(|o| format!("local_port {lp} is already used by {o}"))
                            .or_else(|| {
                                (lp == s.gateway.outbound_port)
                                    .then(|| format!("local_port {lp} is the outbound HTTP port"))
                            })
                    });
                if let Some(m) = clash {
                    reject("service", v, i, m);
                    continue;
                }
                for p in &svc.ports {
                    if let Some(lp) = p.local_port {
                        local_ports.insert(lp, svc.host.clone());
                    }
                }
                mesh.services.push(svc);
            }
            Err(m) => reject("service", v, i, m),
        }
    }
    for (i, v) in windows_services.iter().enumerate() {
        match decode::<WindowsServiceDoc>(v).and_then(|d| windows_service(d, s)) {
            Ok(w) => {
                if mesh
                    .windows_services
                    .iter()
                    .any(|x| x.host == w.host || (x.name == w.name && x.namespace == w.namespace))
                {
                    reject(
                        "windows_service",
                        v,
                        i,
                        format!("duplicate Windows service {}", w.host),
                    );
                    continue;
                }
                if let Some(lp) = w.ports.iter().find(|p| {
                    local_ports.contains_key(&p.gateway_port) && s.gateway.addresses_overlap()
                }) {
                    reject(
                        "windows_service",
                        v,
                        i,
                        format!(
                            "gateway_port {} is used by a local TCP port",
                            lp.gateway_port
                        ),
                    );
                    continue;
                }
                // Windows-facing ports share the outbound address: each is used once.
                if let Some(op) = w.outbound_port {
                    let taken = local_ports.get(&op).cloned().or_else(|| {
                        mesh.windows_services
                            .iter()
                            .find(|x| {
                                x.outbound_port == Some(op)
                                    || (s.gateway.addresses_overlap()
                                        && x.ports.iter().any(|p| p.gateway_port == op))
                            })
                            .map(|x| x.host.clone())
                    });
                    if let Some(other) = taken {
                        reject(
                            "windows_service",
                            v,
                            i,
                            format!("outbound_port {op} is already used by {other}"),
                        );
                        continue;
                    }
                }
                if s.gateway.addresses_overlap()
                    && let Some(p) = w.ports.iter().find(|p| {
                        mesh.windows_services
                            .iter()
                            .any(|x| x.outbound_port == Some(p.gateway_port))
                    })
                {
                    reject(
                        "windows_service",
                        v,
                        i,
                        format!(
                            "gateway_port {} is another Windows service's outbound_port",
                            p.gateway_port
                        ),
                    );
                    continue;
                }
                // One gateway port carries one protocol family (an HTTP or a TCP filter chain per SNI is
                // fine, but the same SNI must not appear twice).
                mesh.windows_services.push(w);
            }
            Err(m) => reject("windows_service", v, i, m),
        }
    }
    for (i, v) in peer_authentications.iter().enumerate() {
        match decode::<PeerAuthDoc>(v) {
            Ok(d) => {
                if let Err(m) = check_name("namespace", &d.namespace) {
                    reject("peer_authentication", v, i, m);
                    continue;
                }
                if d.namespace == s.root_namespace && !d.port_level_mtls.is_empty() {
                    reject(
                        "peer_authentication",
                        v,
                        i,
                        format!(
                            "port_level_mtls: the mesh-wide PeerAuthentication (root namespace {}) \
                             cannot have port-level modes",
                            s.root_namespace
                        ),
                    );
                    continue;
                }
                let selector = d.selector.map(|x| x.match_labels).unwrap_or_default();
                if selector.is_empty()
                    && mesh
                        .peer_authentications
                        .iter()
                        .any(|p| p.namespace == d.namespace && p.selector.is_empty())
                {
                    reject(
                        "peer_authentication",
                        v,
                        i,
                        format!(
                            "a PeerAuthentication for namespace {} already exists",
                            d.namespace
                        ),
                    );
                    continue;
                }
                mesh.peer_authentications.push(PeerAuthentication {
                    namespace: d.namespace,
                    selector,
                    mode: d.mode,
                    port_modes: d
                        .port_level_mtls
                        .into_iter()
                        .map(|(k, v)| (k, v.mode))
                        .collect(),
                });
            }
            Err(m) => reject("peer_authentication", v, i, m),
        }
    }
    for (i, v) in authorization_policies.iter().enumerate() {
        let parsed = decode::<AuthzDoc>(v).and_then(policy).or_else(|m| {
            // Dropping a broken policy would widen access (a DENY that vanishes, or the only ALLOW
            // policy of a service). Enforce it fail-closed and report it.
            match decode::<AuthzEnvelope>(v) {
                Ok(env) if dns_label(&env.name) && dns_label(&env.namespace) => {
                    let p = fail_closed_policy(env);
                    let how = if p.rules.is_empty() {
                        "enforced as an ALLOW policy that allows nothing"
                    } else {
                        "enforced as a DENY of every request"
                    };
                    reject("authorization_policy", v, i, format!("{m} ({how})"));
                    Ok(p)
                }
                _ => Err(m),
            }
        });
        match parsed {
            Ok(p) => {
                if mesh
                    .authorization_policies
                    .iter()
                    .any(|x| x.name == p.name && x.namespace == p.namespace)
                {
                    reject("authorization_policy", v, i, "duplicate policy".into());
                    continue;
                }
                mesh.authorization_policies.push(p);
            }
            Err(m) => reject("authorization_policy", v, i, m),
        }
    }
    Ok((mesh, errors, sections))
}

/// Watches a mesh file and publishes [`MeshState`]s.
pub struct FileSource {
    pub path: PathBuf,
    pub settings: FileSettings,
    /// The safety-net poll (metadata only); OS notifications normally notice changes first.
    pub poll: Duration,
    /// How long the file must be quiet before it is read.
    pub settle: Duration,
    pub metrics: Arc<Metrics>,
}

/// The outcome of reading the file once.
pub struct Loaded {
    pub state: MeshState,
    /// The sections of the file, when it was applied.
    pub sections: Option<Sections>,
}

impl FileSource {
    /// Applies `text` on top of `prev` (the state in service) with the reload rule against
    /// `prev_sections` (the sections of the last applied file; `None` before the first load).
    pub fn apply(&self, text: &str, prev: &MeshState, prev_sections: Option<&Sections>) -> Loaded {
        let mut next = MeshState {
            mesh: prev.mesh.clone(),
            rejected: prev.rejected.clone(),
            error: None,
            persisted: None,
            updated: SystemTime::now(),
            generation: prev.generation + 1,
        };
        let parsed = parse_sections(text, &self.settings).and_then(|(mesh, rejected, sections)| {
            if let Some(p) = prev_sections {
                sections.check_reload(p)?;
            }
            Ok((mesh, rejected, sections))
        });
        match parsed {
            Ok((mesh, rejected, sections)) => {
                next.mesh = Some(Arc::new(mesh));
                next.rejected = rejected;
                Loaded {
                    state: next,
                    sections: Some(sections),
                }
            }
            Err(e) => {
                next.error = Some(format!("{}: {e}", self.path.display()));
                Loaded {
                    state: next,
                    sections: None,
                }
            }
        }
    }

    /// Reads and applies the file once (no quiet period): what `winmesh validate` and tests use.
    pub fn load(&self, prev: &MeshState) -> MeshState {
        match std::fs::read_to_string(&self.path) {
            Ok(text) => self.apply(&text, prev, None).state,
            Err(e) => {
                let mut next = prev.clone();
                next.generation += 1;
                next.error = Some(format!("cannot read {}: {e}", self.path.display()));
                next
            }
        }
    }

    fn report(&self, st: &MeshState) {
        let m = &self.metrics;
        m.inc(
            "winmesh_mesh_reloads_total",
            "Mesh file loads.",
            &[("result", if st.error.is_some() { "error" } else { "ok" })],
            1.0,
        );
        m.set(
            "winmesh_mesh_file_error",
            "1 if the last mesh file load failed (the previous model stays in service).",
            &[],
            if st.error.is_some() { 1.0 } else { 0.0 },
        );
        if let Some(e) = &st.error {
            warn!(error = %e, "mesh file not applied; keeping the last good model");
        } else {
            m.set(
                "winmesh_mesh_objects_rejected",
                "Objects skipped in the current mesh file.",
                &[],
                st.rejected.len() as f64,
            );
            for r in &st.rejected {
                warn!(kind = r.kind, object = %r.name, error = %r.message, "mesh object skipped");
            }
            if let Some(mesh) = &st.mesh {
                if mesh.services.is_empty()
                    && mesh.windows_services.is_empty()
                    && mesh.peer_authentications.is_empty()
                    && mesh.authorization_policies.is_empty()
                {
                    warn!(file = %self.path.display(), "the mesh file defines nothing");
                }
                info!(
                    services = mesh.services.len(),
                    windows_services = mesh.windows_services.len(),
                    policies = mesh.authorization_policies.len(),
                    rejected = st.rejected.len(),
                    "mesh file loaded"
                );
            }
        }
    }

    /// Watches the file until `shutdown`, publishing a new state whenever its content changes. Reads
    /// and parsing run on a blocking thread, so a large file never stalls the xDS streams.
    pub async fn run(self, tx: watch::Sender<MeshState>, mut shutdown: watch::Receiver<bool>) {
        let this = Arc::new(self);
        let mut watch = super::watch::FileWatch::new(&this.path, this.settle, this.poll);
        if !watch.notifications() {
            info!(file = %this.path.display(), poll = ?this.poll, "mesh file: polling only");
        }
        watch.initial().await;
        let mut last_hash: Option<Vec<u8>> = None;
        let mut last_read_error: Option<String> = None;
        let mut sections: Option<Sections> = None;
        loop {
            let me = this.clone();
            let read = tokio::task::spawn_blocking(move || std::fs::read(&me.path)).await;
            let read = match read {
                Ok(r) => r,
                Err(e) => Err(std::io::Error::other(e.to_string())),
            };
            // A change during the read means the bytes may be torn: wait for quiet and read again.
            if watch.moved_since_settled() {
                tokio::select! {
                    _ = watch.changed() => continue,
                    _ = shutdown.changed() => return,
                }
            }
            match read {
                Ok(bytes) => {
                    last_read_error = None;
                    let h = Sha256::digest(&bytes).to_vec();
                    if last_hash.as_ref() != Some(&h) {
                        last_hash = Some(h);
                        let me = this.clone();
                        let prev = tx.borrow().clone();
                        let prev_sections = sections.clone();
                        let loaded = tokio::task::spawn_blocking(move || {
                            let text = String::from_utf8_lossy(&bytes);
                            me.apply(&text, &prev, prev_sections.as_ref())
                        })
                        .await;
                        match loaded {
                            Ok(l) => {
                                if l.sections.is_some() {
                                    sections = l.sections;
                                } else {
                                    // Not applied: the same content must be reconsidered if it
                                    // comes back after another change.
                                    last_hash = None;
                                }
                                publish(&this, &tx, l.state);
                            }
                            Err(e) => warn!(error = %e, "mesh file load task failed"),
                        }
                    }
                }
                Err(e) => {
                    let msg = format!("cannot read {}: {e}", this.path.display());
                    if last_read_error.as_ref() != Some(&msg) {
                        last_read_error = Some(msg.clone());
                        last_hash = None;
                        let mut st = tx.borrow().clone();
                        st.error = Some(msg);
                        st.generation += 1;
                        publish(&this, &tx, st);
                    }
                }
            }
            tokio::select! {
                _ = watch.changed() => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}

fn publish(src: &FileSource, tx: &watch::Sender<MeshState>, st: MeshState) {
    src.report(&st);
    tx.send_replace(st);
}

/// Everything `serve` would report for a mesh file, one line each: the file-level error, or each
/// skipped object. Empty = valid.
pub fn check_file(path: &Path, s: &FileSettings) -> Vec<String> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => return vec![format!("{}: cannot read: {e}", path.display())],
    };
    match parse(&text, s) {
        Err(e) => vec![format!("{}: {e}", path.display())],
        Ok((_, rejected)) => rejected
            .iter()
            .map(|r| format!("{}: {r}", path.display()))
            .collect(),
    }
}

/// A path relative to the config file's directory, unless absolute.
pub fn resolve(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> FileSettings {
        FileSettings {
            trust_domain: "cluster.local".into(),
            domain_suffix: "cluster.local".into(),
            root_namespace: "istio-system".into(),
            gateway: GatewaySettings {
                inbound_address: "0.0.0.0".parse().expect("ip"),
                outbound_address: "127.0.0.1".parse().expect("ip"),
                outbound_port: 15001,
                refuse_unknown_callers: false,
            },
            reserved: vec![
                Reserved {
                    address: "127.0.0.1".parse().expect("ip"),
                    port: 15000,
                    what: "envoy.admin",
                },
                Reserved {
                    address: "127.0.0.1".parse().expect("ip"),
                    port: 15010,
                    what: "xds.listen",
                },
            ],
        }
    }

    const FULL: &str = "\
services:
  - name: linuxapp
    namespace: linux
    ports: [{name: http, port: 8080}]
    endpoints: [{address: 10.0.0.1}]
windows_services:
  - name: winapp
    namespace: win
    ports: [{name: http, port: 8080, gateway_port: 15443}]
    backends: [10.1.0.1]
authorization_policies:
  - name: deny-all
    namespace: win
    action: DENY
    rules: [{}]
";

    fn source() -> FileSource {
        FileSource {
            path: PathBuf::from("mesh.yaml"),
            settings: settings(),
            poll: Duration::from_secs(1),
            settle: Duration::from_millis(10),
            metrics: Arc::new(Metrics::new()),
        }
    }

    /// Applies FULL, then `next` as a reload.
    fn reload(next: &str) -> MeshState {
        let src = source();
        let first = src.apply(FULL, &MeshState::default(), None);
        assert!(first.state.error.is_none(), "{:?}", first.state.error);
        src.apply(next, &first.state, first.sections.as_ref()).state
    }

    fn counts(st: &MeshState) -> (usize, usize, usize) {
        let m = st.mesh.as_ref().expect("mesh");
        (
            m.services.len(),
            m.windows_services.len(),
            m.authorization_policies.len(),
        )
    }

    #[test]
    fn an_empty_or_comment_only_reload_is_refused_and_the_mesh_kept() {
        for text in ["", "   \n", "# nothing yet\n", "---\n", "~\n"] {
            let st = reload(text);
            let e = st.error.as_deref().unwrap_or_default();
            assert!(e.contains("services: missing"), "{text:?}: {e}");
            assert!(e.contains("`services: []`"), "{e}");
            assert_eq!(counts(&st), (1, 1, 1), "{text:?}");
        }
    }

    #[test]
    fn a_file_cut_at_a_line_boundary_is_refused() {
        // Cut just before `windows_services:`, and just after a section key.
        let cut = &FULL[..FULL.find("windows_services:").expect("section")];
        let st = reload(cut);
        assert!(
            st.error
                .as_deref()
                .is_some_and(|e| e.contains("windows_services: missing")),
            "{:?}",
            st.error
        );
        assert_eq!(counts(&st), (1, 1, 1));
        let cut = &FULL[..FULL.find("  - name: deny-all").expect("entry")];
        let st = reload(cut);
        assert!(
            st.error
                .as_deref()
                .is_some_and(|e| e.contains("authorization_policies: missing")),
            "a bare key is not an explicit empty list: {:?}",
            st.error
        );
        assert_eq!(counts(&st), (1, 1, 1), "the DENY policy stays in force");
    }

    #[test]
    fn emptying_a_section_explicitly_is_applied() {
        let text = FULL.replace(
            &FULL[FULL.find("authorization_policies:").expect("section")..],
            "authorization_policies: []\n",
        );
        let st = reload(&text);
        assert_eq!(st.error, None);
        assert_eq!(counts(&st), (1, 1, 0));
        let st = reload("services: []\nwindows_services: []\nauthorization_policies: []\n");
        assert_eq!(st.error, None);
        assert_eq!(counts(&st), (0, 0, 0));
    }

    #[test]
    fn the_first_load_of_an_empty_file_serves_an_empty_mesh() {
        let st = source().apply("", &MeshState::default(), None).state;
        assert_eq!(st.error, None);
        assert_eq!(counts(&st), (0, 0, 0));
    }

    #[test]
    fn a_section_that_was_absent_may_stay_absent() {
        let src = source();
        let first = src.apply("services: []\n", &MeshState::default(), None);
        let st = src.apply("", &first.state, first.sections.as_ref()).state;
        assert_eq!(st.error, None, "nothing is lost");
    }

    #[test]
    fn deep_nesting_and_size_are_refused_before_parsing() {
        let text = format!("services: {}\n", "[".repeat(100_000));
        let st = reload(&text);
        assert!(
            st.error
                .as_deref()
                .is_some_and(|e| e.contains("nesting deeper than 64 levels at line 1")),
            "{:?}",
            st.error
        );
        assert_eq!(counts(&st), (1, 1, 1));
    }

    #[test]
    fn gateway_ports_on_reserved_ports_are_rejected() {
        let text = "\
windows_services:
  - {name: a, namespace: win, ports: [{name: http, port: 80, gateway_port: 15000}], backends: [10.1.0.1]}
  - {name: b, namespace: win, identity: spiffe://cluster.local/ns/win/sa/b, outbound_port: 15010,
     ports: [{name: http, port: 80, gateway_port: 15443}], backends: [10.1.0.1]}
services:
  - {name: c, namespace: linux, ports: [{name: tcp, port: 5432, local_port: 15000}]}
";
        let (mesh, rejected) = parse(text, &settings()).expect("file");
        assert!(mesh.windows_services.is_empty() && mesh.services.is_empty());
        let msgs: Vec<String> = rejected.iter().map(|r| r.to_string()).collect();
        assert_eq!(msgs.len(), 3, "{msgs:?}");
        assert!(
            msgs[0].contains("local_port 15000 is already used by envoy.admin"),
            "{msgs:?}"
        );
        assert!(
            msgs[1].contains("gateway_port 15000 is already used by envoy.admin"),
            "{msgs:?}"
        );
        assert!(
            msgs[2].contains("outbound_port 15010 is already used by xds.listen"),
            "{msgs:?}"
        );
    }

    #[test]
    fn check_file_reports_what_serve_would() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("mesh.yaml");
        std::fs::write(&p, "services: [this is: not: valid").expect("write");
        let e = check_file(&p, &settings());
        assert_eq!(e.len(), 1);
        assert!(e[0].starts_with(&p.display().to_string()), "{e:?}");
        std::fs::write(
            &p,
            "services:\n  - {name: Bad, namespace: x, ports: [{name: http, port: 80}]}\n",
        )
        .expect("write");
        let e = check_file(&p, &settings());
        assert_eq!(e.len(), 1);
        assert!(
            e[0].contains("service x/Bad: name \"Bad\" is not a DNS label"),
            "{e:?}"
        );
        std::fs::write(&p, FULL).expect("write");
        assert!(check_file(&p, &settings()).is_empty());
    }

    /// The watch loop end to end: a truncation while serving is refused, the completed file applied.
    #[tokio::test]
    async fn a_truncation_while_serving_is_never_published() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("mesh.yaml");
        std::fs::write(&p, FULL).expect("write");
        let mut src = source();
        src.path = p.clone();
        src.settle = Duration::from_millis(20);
        src.poll = Duration::from_millis(100);
        let metrics = src.metrics.clone();
        let (tx, mut rx) = watch::channel(MeshState::default());
        let (_stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(src.run(tx, stop_rx));
        let wait = |rx: &mut watch::Receiver<MeshState>, after: u64| {
            let mut rx = rx.clone();
            async move {
                tokio::time::timeout(Duration::from_secs(10), async {
                    loop {
                        if rx.borrow_and_update().generation > after {
                            return rx.borrow().clone();
                        }
                        rx.changed().await.expect("source alive");
                    }
                })
                .await
                .expect("state published")
            }
        };
        let st = wait(&mut rx, 0).await;
        assert_eq!(counts(&st), (1, 1, 1));
        // `: > mesh.yaml`
        std::fs::write(&p, "").expect("truncate");
        let st = wait(&mut rx, st.generation).await;
        assert!(st.error.is_some());
        assert_eq!(counts(&st), (1, 1, 1));
        assert!(metrics.render().contains("winmesh_mesh_file_error 1"));
        // The writer finishes: applied.
        std::fs::write(&p, FULL.replace("10.0.0.1", "10.0.0.2")).expect("write");
        let st = wait(&mut rx, st.generation).await;
        assert_eq!(st.error, None);
        let m = st.mesh.expect("mesh");
        assert_eq!(m.services[0].endpoints[0].address.to_string(), "10.0.0.2");
        assert!(metrics.render().contains("winmesh_mesh_file_error 0"));
        task.abort();
        rx.borrow_and_update();
    }
}
