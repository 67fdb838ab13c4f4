//! The mesh file: a YAML description of the model, watched and reloaded atomically.
//!
//! A file that cannot be parsed as a whole (YAML syntax, unknown top-level field) keeps the last good
//! model in service and reports the error. Inside a good file, each object is validated on its own: a
//! bad service, Windows service or policy is skipped, logged and counted, and every other object is
//! served. The file is polled (content hash), which also works on Windows where rename notifications
//! from other directories are unreliable.

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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDoc {
    #[serde(default)]
    services: Vec<serde_yaml::Value>,
    #[serde(default)]
    windows_services: Vec<serde_yaml::Value>,
    #[serde(default)]
    peer_authentications: Vec<serde_yaml::Value>,
    #[serde(default)]
    authorization_policies: Vec<serde_yaml::Value>,
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
    #[serde(default = "unset")]
    mode: MtlsMode,
    #[serde(default, alias = "portLevelMtls")]
    port_level_mtls: BTreeMap<u16, PortMode>,
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
    #[serde(default)]
    namespaces: Vec<String>,
    #[serde(default, alias = "notNamespaces")]
    not_namespaces: Vec<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct OperationDoc {
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
struct RuleDoc {
    #[serde(default)]
    from: Vec<FromDoc>,
    #[serde(default)]
    to: Vec<ToDoc>,
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
    rules: Vec<RuleDoc>,
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
}

fn dns_label(s: &str) -> bool {
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

fn service(d: ServiceDoc, s: &FileSettings) -> Result<Service, String> {
    check_name("name", &d.name)?;
    check_name("namespace", &d.namespace)?;
    if d.ports.is_empty() {
        return Err("ports: at least one port is required".into());
    }
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
            return Err(format!(
                "ports[{}]: UDP cannot be carried over Istio mTLS",
                p.name
            ));
        }
        if let Some(lp) = p.local_port {
            check_port("local_port", lp)?;
        }
        ports.push(ServicePort {
            target_port: p.target_port.unwrap_or(p.port),
            name: p.name,
            port: p.port,
            protocol,
            local_port: p.local_port,
        });
    }
    let mut endpoints = Vec::new();
    for (i, e) in d.endpoints.into_iter().enumerate() {
        for name in e.ports.keys() {
            if !ports.iter().any(|p| &p.name == name) {
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
            ports: e.ports,
            tls_mode: e.tls_mode.unwrap_or(TlsMode::Istio),
            service_account: e.service_account,
            node: e.node,
            ready: e.ready,
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
        backends: d.backends,
        identity,
        outbound_port: d.outbound_port,
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

fn policy(d: AuthzDoc) -> Result<AuthorizationPolicy, String> {
    check_name("name", &d.name)?;
    check_name("namespace", &d.namespace)?;
    let mut rules = Vec::new();
    for (i, r) in d.rules.into_iter().enumerate() {
        let mut from = Vec::new();
        for f in r.from {
            let s = f.source;
            for p in s.principals.iter().chain(s.not_principals.iter()) {
                check_principal(p).map_err(|e| format!("rules[{i}].from: {e}"))?;
            }
            from.push(Source {
                principals: s.principals,
                not_principals: s.not_principals,
                namespaces: s.namespaces,
                not_namespaces: s.not_namespaces,
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
                methods: o.methods,
                not_methods: o.not_methods,
                paths: o.paths,
                not_paths: o.not_paths,
                ports,
                not_ports,
            });
        }
        rules.push(Rule { from, to });
    }
    Ok(AuthorizationPolicy {
        name: d.name,
        namespace: d.namespace,
        services: d.services,
        action: d.action,
        rules,
    })
}

/// Parses a mesh file. `Err` = the file as a whole is unusable; `Ok` carries the model and the objects
/// that were skipped.
pub fn parse(text: &str, s: &FileSettings) -> Result<(Mesh, Vec<ObjectError>), String> {
    let doc: FileDoc = if text.trim().is_empty() {
        FileDoc {
            services: vec![],
            windows_services: vec![],
            peer_authentications: vec![],
            authorization_policies: vec![],
        }
    } else {
        let de = serde_yaml::Deserializer::from_str(text);
        serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            format!("{path}: {}", e.into_inner())
        })?
    };
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
    for (i, v) in doc.services.iter().enumerate() {
        match decode::<ServiceDoc>(v).and_then(|d| service(d, s)) {
            Ok(svc) => {
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
    for (i, v) in doc.windows_services.iter().enumerate() {
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
    for (i, v) in doc.peer_authentications.iter().enumerate() {
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
                if mesh
                    .peer_authentications
                    .iter()
                    .any(|p| p.namespace == d.namespace)
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
    for (i, v) in doc.authorization_policies.iter().enumerate() {
        match decode::<AuthzDoc>(v).and_then(policy) {
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
    Ok((mesh, errors))
}

/// Watches a mesh file and publishes [`MeshState`]s.
pub struct FileSource {
    pub path: PathBuf,
    pub settings: FileSettings,
    pub poll: Duration,
    pub metrics: Arc<Metrics>,
}

impl FileSource {
    /// Loads once (synchronously usable at startup), returning the state to publish.
    pub fn load(&self, prev: &MeshState) -> MeshState {
        let mut next = MeshState {
            mesh: prev.mesh.clone(),
            rejected: prev.rejected.clone(),
            error: None,
            updated: SystemTime::now(),
            generation: prev.generation + 1,
        };
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) => {
                next.error = Some(format!("cannot read {}: {e}", self.path.display()));
                return next;
            }
        };
        match parse(&text, &self.settings) {
            Ok((mesh, rejected)) => {
                next.mesh = Some(Arc::new(mesh));
                next.rejected = rejected;
            }
            Err(e) => next.error = Some(format!("{}: {e}", self.path.display())),
        }
        next
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

    /// Polls the file until `shutdown`, publishing a new state whenever its content changes.
    pub async fn run(self, tx: watch::Sender<MeshState>, mut shutdown: watch::Receiver<bool>) {
        let mut last_hash: Option<Vec<u8>> = None;
        let mut last_read_error: Option<String> = None;
        loop {
            match std::fs::read(&self.path) {
                Ok(bytes) => {
                    last_read_error = None;
                    let h = Sha256::digest(&bytes).to_vec();
                    if last_hash.as_ref() != Some(&h) {
                        last_hash = Some(h);
                        let st = self.load(&tx.borrow());
                        self.report(&st);
                        tx.send_replace(st);
                    }
                }
                Err(e) => {
                    let msg = format!("cannot read {}: {e}", self.path.display());
                    if last_read_error.as_ref() != Some(&msg) {
                        last_read_error = Some(msg.clone());
                        last_hash = None;
                        let mut st = tx.borrow().clone();
                        st.error = Some(msg);
                        st.generation += 1;
                        self.report(&st);
                        tx.send_replace(st);
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(self.poll) => {}
                _ = shutdown.changed() => return,
            }
        }
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
