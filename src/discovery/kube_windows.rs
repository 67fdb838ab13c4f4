//! Windows services from the cluster: a Service labelled `winmesh.io/expose: "true"` (the *app
//! Service*, selecting the Windows pods as usual) becomes a Windows service of the gateway.
//!
//! - Its mesh-facing name is the annotation `winmesh.io/mesh-service` (default `<name>-mesh`); Linux
//!   clients call `<mesh-service>.<namespace>`, whose endpoints the elected winmesh publishes as
//!   the gateway pods (see `publish.rs`).
//! - Backends are the app Service's EndpointSlice endpoints, by readiness as istiod and kube-proxy
//!   read them, with named target ports resolved per slice. Pods on this gateway's node are used;
//!   pods on other nodes only as failover (Envoy priority 1), when `winmesh.io/cross-node: "true"`
//!   (or the configured default) allows it.
//! - The identity the gateway presents for it is the pods' service account.
//! - AuthorizationPolicies (`security.istio.io`) select it by its pods' labels or by `targetRefs`.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::Service as KService;
use kube::core::DynamicObject;

use super::ObjectError;
use crate::identity::SpiffeId;
use crate::model::{
    Action, AuthorizationPolicy, Service, WindowsBackend, WindowsOrigin, WindowsPort,
    WindowsService,
};

/// Opt-in label on the app Service.
pub const EXPOSE_LABEL: &str = "winmesh.io/expose";
/// Name of the mesh-facing Service (annotation on the app Service).
pub const MESH_SERVICE_ANNOTATION: &str = "winmesh.io/mesh-service";
/// `"true"`: fail over to the app's pods on other nodes (annotation on the app Service).
pub const CROSS_NODE_ANNOTATION: &str = "winmesh.io/cross-node";
/// Suffix of the default mesh-facing name.
pub const DEFAULT_MESH_SUFFIX: &str = "-mesh";

/// What the Windows half of the mirror needs from the config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WindowsSettings {
    pub enabled: bool,
    pub gateway_port: u16,
    /// This gateway's node; `None`: every backend counts as local.
    pub node_name: Option<String>,
    pub cross_node: bool,
    pub trust_domain: String,
}

impl Default for WindowsSettings {
    fn default() -> Self {
        WindowsSettings {
            enabled: true,
            gateway_port: 15443,
            node_name: None,
            cross_node: false,
            trust_domain: "cluster.local".into(),
        }
    }
}

/// Whether a Service opts in.
pub fn is_opted_in(svc: &KService) -> bool {
    svc.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(EXPOSE_LABEL))
        .is_some_and(|v| v == "true")
}

/// The mesh-facing Service name an app Service asks for.
pub fn mesh_name(svc: &KService) -> Result<String, String> {
    let name = svc.metadata.name.clone().unwrap_or_default();
    let wanted = svc
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(MESH_SERVICE_ANNOTATION))
        .map(|s| s.trim().to_string());
    let mesh = match wanted {
        Some(m) if m.is_empty() => {
            return Err(format!("{MESH_SERVICE_ANNOTATION}: empty"));
        }
        Some(m) => m,
        None => format!("{name}{DEFAULT_MESH_SUFFIX}"),
    };
    if !super::file::dns_label(&mesh) {
        return Err(format!(
            "{MESH_SERVICE_ANNOTATION}: {mesh:?} is not a Service name (a DNS label)"
        ));
    }
    if mesh == name {
        return Err(format!(
            "{MESH_SERVICE_ANNOTATION}: {mesh:?} is the app Service itself; the mesh-facing \
             Service must be another name (its endpoints are the gateways, not the Windows pods)"
        ));
    }
    Ok(mesh)
}

fn cross_node(svc: &KService, default: bool) -> Result<bool, String> {
    match svc
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(CROSS_NODE_ANNOTATION))
        .map(|s| s.as_str())
    {
        None => Ok(default),
        Some("true") => Ok(true),
        Some("false") => Ok(false),
        Some(other) => Err(format!(
            "{CROSS_NODE_ANNOTATION}: {other:?} is neither \"true\" nor \"false\""
        )),
    }
}

/// A Windows service from an opted-in app Service and its endpoints (already built by the Linux
/// half's rules: `Service` with the EndpointSlice endpoints and their pods).
pub fn windows_service(
    k: &KService,
    app: &Service,
    s: &WindowsSettings,
    domain_suffix: &str,
) -> Result<WindowsService, String> {
    let mesh = mesh_name(k)?;
    let cross = cross_node(k, s.cross_node)?;
    if app.ports.is_empty() {
        return Err("no TCP port to expose".into());
    }
    let ports: Vec<WindowsPort> = app
        .ports
        .iter()
        .map(|p| WindowsPort {
            name: p.name.clone(),
            port: p.port,
            protocol: p.protocol,
            gateway_port: s.gateway_port,
            target_port: p.target_port,
        })
        .collect();
    let local = |node: Option<&str>| match (&s.node_name, node) {
        (None, _) => true,
        (Some(mine), Some(n)) => mine == n,
        // An endpoint without a node is not known to be on this one.
        (Some(_), None) => false,
    };
    let mut backends = Vec::new();
    let mut local_pod_ips = Vec::new();
    let mut draining = Vec::new();
    let (mut ready_remote, mut not_ready) = (0usize, 0usize);
    for e in &app.endpoints {
        let here = local(e.node.as_deref());
        if here {
            local_pod_ips.push(e.address);
        }
        if !e.ready {
            not_ready += 1;
            if here && e.terminating_serving {
                draining.push(WindowsBackend {
                    address: e.address,
                    ports: e.ports.clone(),
                    remote: false,
                });
            }
            continue;
        }
        if !here {
            ready_remote += 1;
            if !cross {
                continue;
            }
        }
        backends.push(WindowsBackend {
            address: e.address,
            ports: e.ports.clone(),
            remote: !here,
        });
    }
    // No ready pod here: pods that are terminating but still serving finish the job (kube-proxy's
    // rule), before any other node's pod.
    let only_draining = !draining.is_empty() && !backends.iter().any(|b| !b.remote);
    if only_draining {
        backends.extend(draining);
    }
    let status = if only_draining {
        Some("only terminating pods that still serve are left on this node".to_string())
    } else if backends.iter().any(|b| !b.remote) {
        None
    } else if !backends.is_empty() {
        Some(format!(
            "no ready pod on this node; failing over to {} on other nodes",
            backends.len()
        ))
    } else {
        let node = s.node_name.as_deref().unwrap_or("?");
        Some(match (app.endpoints.len(), ready_remote) {
            (0, _) => {
                "no endpoints: the app Service selects no pod (the gateway answers 503)".into()
            }
            (_, 0) => format!("no ready endpoint ({not_ready} not ready; the gateway answers 503)"),
            (_, n) => format!(
                "no ready endpoint on node {node}; {n} ready on other nodes, not used without \
                 {CROSS_NODE_ANNOTATION}: \"true\" (the gateway answers 503)"
            ),
        })
    };
    // The identity: the pods' service account (Istio's SAN for the workload). Pods of one app
    // normally share one; during a change of account the first (by name) is presented, and the
    // mesh-facing Service names every one, so clients accept either.
    let accounts: BTreeSet<(String, String)> = app
        .endpoints
        .iter()
        .filter_map(|e| {
            let ns = e.namespace.clone().unwrap_or_else(|| app.namespace.clone());
            e.service_account.clone().map(|sa| (ns, sa))
        })
        .collect();
    let identity = accounts.iter().next().map(|(ns, sa)| SpiffeId {
        trust_domain: s.trust_domain.clone(),
        namespace: ns.clone(),
        service_account: sa.clone(),
    });
    let mut pod_labels: Vec<BTreeMap<String, String>> =
        app.endpoints.iter().map(|e| e.labels.clone()).collect();
    pod_labels.sort();
    pod_labels.dedup();
    local_pod_ips.sort();
    local_pod_ips.dedup();
    let ready_nodes: BTreeSet<String> = app
        .endpoints
        .iter()
        .filter(|e| e.ready)
        .filter_map(|e| e.node.clone())
        .collect();
    Ok(WindowsService {
        host: format!("{mesh}.{}.svc.{domain_suffix}", app.namespace),
        name: mesh,
        namespace: app.namespace.clone(),
        ports,
        backends,
        identity,
        outbound_port: None,
        origin: Some(WindowsOrigin {
            app_service: format!("{}/{}", app.namespace, app.name),
            pod_labels,
            local_pod_ips,
            ready_nodes: ready_nodes.into_iter().collect(),
            service_accounts: service_accounts(app),
            cross_node: cross,
            status,
        }),
    })
}

/// Every service account of an app's pods in its namespace (the mesh-facing Service's
/// `alpha.istio.io/kubernetes-serviceaccounts`, which istiod reads in the Service's namespace).
fn service_accounts(app: &Service) -> Vec<String> {
    let mut v: Vec<String> = app
        .endpoints
        .iter()
        .filter(|e| e.namespace.is_none())
        .filter_map(|e| e.service_account.clone())
        .collect();
    v.sort();
    v.dedup();
    v
}

/// Keeps one Windows service per mesh name and namespace: the oldest app Service claiming it (as
/// Istio resolves conflicts by creation time); the others are rejected.
pub fn dedup_claims(
    mut claims: Vec<(Option<k8s_openapi::jiff::Timestamp>, String, WindowsService)>,
    rejected: &mut Vec<ObjectError>,
) -> Vec<WindowsService> {
    claims.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
    let mut seen: BTreeMap<(String, String), String> = BTreeMap::new();
    let mut out = Vec::new();
    for (_, app, w) in claims {
        let k = (w.namespace.clone(), w.name.clone());
        if let Some(first) = seen.get(&k) {
            rejected.push(ObjectError {
                kind: "kubernetes_windows_service",
                name: app,
                message: format!(
                    "mesh-facing name {}/{} is already claimed by the older {first}",
                    w.namespace, w.name
                ),
            });
            continue;
        }
        seen.insert(k, app);
        out.push(w);
    }
    out.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    out
}

/// An AuthorizationPolicy (`security.istio.io` v1/v1beta1) as the model's policy. A policy that
/// targets only non-Service kinds (a Gateway, a ServiceEntry) is `Ok(None)`: it selects no Windows
/// workload. A malformed policy is enforced fail-closed (see `file::fail_closed_policy`) and
/// reported through `Err((policy, why))`.
pub fn authorization_policy(
    o: &DynamicObject,
) -> Result<Option<AuthorizationPolicy>, Box<(Option<AuthorizationPolicy>, String)>> {
    let namespace = o
        .metadata
        .namespace
        .clone()
        .ok_or_else(|| Box::new((None, "no namespace".to_string())))?;
    let name = o
        .metadata
        .name
        .clone()
        .ok_or_else(|| Box::new((None, "no name".to_string())))?;
    let empty = serde_json::json!({});
    let spec = o.data.get("spec").unwrap_or(&empty);
    // Where it applies: read first and leniently, so a broken rule still fails closed there.
    let selector = match spec.get("selector").and_then(|s| s.get("matchLabels")) {
        None => None,
        Some(m) => match m.as_object() {
            Some(m) => {
                let mut sel = BTreeMap::new();
                for (k, v) in m {
                    match v.as_str() {
                        Some(v) => {
                            sel.insert(k.clone(), v.to_string());
                        }
                        None => {
                            return Err(Box::new((
                                None,
                                format!("spec.selector.matchLabels.{k}: not a string"),
                            )));
                        }
                    }
                }
                // `selector: {}` selects every workload of the namespace, as no selector does.
                (!sel.is_empty()).then_some(sel)
            }
            None => {
                return Err(Box::new((
                    None,
                    "spec.selector.matchLabels: not a map".into(),
                )));
            }
        },
    };
    let mut refs: Vec<&serde_json::Value> = Vec::new();
    if let Some(r) = spec.get("targetRef") {
        refs.push(r);
    }
    if let Some(v) = spec.get("targetRefs") {
        match v.as_array() {
            Some(a) => refs.extend(a.iter()),
            None => return Err(Box::new((None, "spec.targetRefs: not a list".into()))),
        }
    }
    let mut target_services = Vec::new();
    for r in &refs {
        let kind = r.get("kind").and_then(|k| k.as_str()).unwrap_or("");
        let group = r.get("group").and_then(|k| k.as_str()).unwrap_or("");
        let Some(target) = r.get("name").and_then(|k| k.as_str()) else {
            return Err(Box::new((
                None,
                "spec.targetRefs: a reference without a name".into(),
            )));
        };
        // Istio binds a policy to a Service in its own namespace (the reference's namespace, if
        // given, must be the policy's).
        let ns = r
            .get("namespace")
            .and_then(|k| k.as_str())
            .unwrap_or(&namespace);
        if kind == "Service" && group.is_empty() && ns == namespace {
            target_services.push(format!("{namespace}/{target}"));
        }
    }
    if !refs.is_empty() && target_services.is_empty() {
        return Ok(None);
    }
    let action_text = spec
        .get("action")
        .and_then(|a| a.as_str())
        .unwrap_or("ALLOW");
    let action = match action_text {
        "ALLOW" => Action::Allow,
        "DENY" => Action::Deny,
        "AUDIT" => Action::Audit,
        "CUSTOM" => Action::Custom,
        // Unknown action: deny everything it selects.
        _ => Action::Deny,
    };
    let envelope = AuthorizationPolicy {
        name: name.clone(),
        namespace: namespace.clone(),
        services: vec![],
        selector: selector.clone(),
        target_services: target_services.clone(),
        action,
        provider: None,
        rules: vec![],
    };
    if !matches!(action_text, "ALLOW" | "DENY" | "AUDIT" | "CUSTOM") {
        return Err(Box::new((
            Some(super::file::fail_closed(envelope)),
            format!("spec.action: unknown action {action_text:?}; enforced as deny-all"),
        )));
    }
    match super::file::policy_rules(spec) {
        Ok((rules, provider)) => {
            if action == Action::Custom && provider.is_none() {
                return Err(Box::new((
                    Some(super::file::fail_closed(envelope)),
                    "spec.provider: a CUSTOM policy needs provider.name; enforced fail-closed"
                        .into(),
                )));
            }
            Ok(Some(AuthorizationPolicy {
                rules,
                provider,
                ..envelope
            }))
        }
        Err(e) => Err(Box::new((
            Some(super::file::fail_closed(envelope)),
            format!("{e}; enforced fail-closed"),
        ))),
    }
}

/// Label on everything winmesh writes.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY: &str = "winmesh";
/// The app Service (name, same namespace) a written object belongs to.
pub const APP_SERVICE_LABEL: &str = "winmesh.io/app-service";
/// `endpointslice.kubernetes.io/managed-by` of winmesh's slices (the EndpointSlice controller
/// leaves slices of other managers alone).
pub const SLICE_MANAGER: &str = "winmesh.io/publisher";
/// Server-side apply field manager.
pub const FIELD_MANAGER: &str = "winmesh";

/// Where the gateway pods are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublishSettings {
    pub namespace: String,
    pub gateway_selector: BTreeMap<String, String>,
}

/// One mesh-facing Service and its EndpointSlice, as server-side apply bodies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Publication {
    pub namespace: String,
    pub mesh_name: String,
    pub app_service: String,
    /// The Service to apply: the whole object when winmesh owns it, only the service-account
    /// annotation when the user handed an existing Service over (its ports and selector stay the
    /// user's, so a migration keeps working while both sets of endpoints exist).
    pub service: serde_json::Value,
    pub adopted: bool,
    /// The EndpointSlice (`<mesh-name>-winmesh`); its owner reference to the Service is added
    /// once the Service's uid is known.
    pub slice: serde_json::Value,
    pub slice_name: String,
}

/// Something winmesh wrote that is no longer wanted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Stale {
    Service { namespace: String, name: String },
    EndpointSlice { namespace: String, name: String },
}

/// A gateway pod the mesh-facing slices may list.
struct GatewayPod<'a> {
    name: &'a str,
    namespace: &'a str,
    uid: Option<&'a str>,
    ip: String,
    node: &'a str,
}

fn gateway_pods<'a>(
    pods: &'a [std::sync::Arc<k8s_openapi::api::core::v1::Pod>],
    p: &PublishSettings,
) -> Vec<GatewayPod<'a>> {
    let mut out: Vec<GatewayPod> = pods
        .iter()
        .filter(|pod| pod.metadata.namespace.as_deref() == Some(p.namespace.as_str()))
        .filter(|pod| pod.metadata.deletion_timestamp.is_none())
        .filter(|pod| {
            let labels = pod.metadata.labels.as_ref();
            p.gateway_selector
                .iter()
                .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
        })
        .filter_map(|pod| {
            let status = pod.status.as_ref()?;
            let ready = status.phase.as_deref() == Some("Running")
                && status
                    .conditions
                    .iter()
                    .flatten()
                    .any(|c| c.type_ == "Ready" && c.status == "True");
            // The slice is IPv4; a gateway without an IPv4 address is left out.
            let ip = status
                .pod_ips
                .iter()
                .flatten()
                .map(|i| i.ip.clone())
                .chain(status.pod_ip.clone())
                .find(|i| i.parse::<std::net::Ipv4Addr>().is_ok())?;
            Some(GatewayPod {
                name: pod.metadata.name.as_deref()?,
                namespace: pod.metadata.namespace.as_deref()?,
                uid: pod.metadata.uid.as_deref(),
                ip,
                node: pod.spec.as_ref()?.node_name.as_deref()?,
            })
            .filter(|_| ready)
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(b.name));
    out
}

/// Istio reads a port's protocol from `appProtocol`, then the name: keep what the app said.
fn app_protocol(p: crate::model::Protocol) -> Option<&'static str> {
    use crate::model::Protocol::*;
    Some(match p {
        Http => "http",
        Http2 => "http2",
        Grpc => "grpc",
        GrpcWeb => "grpc-web",
        Tcp => "tcp",
        Tls => "tls",
        Https => "https",
        Mongo => "mongo",
        Redis => "redis",
        Mysql => "mysql",
        Udp | Unsupported => return None,
    })
}

/// The mesh-facing objects for the Windows services, and what winmesh wrote before that is no
/// longer wanted. An existing Service of the mesh-facing name that winmesh does not manage is
/// never touched (reported); one labelled `app.kubernetes.io/managed-by: winmesh` by its owner is
/// adopted (annotation and EndpointSlice only).
pub fn publications(
    windows: &[WindowsService],
    objects: &super::kube::KubeObjects,
    p: &PublishSettings,
    rejected: &mut Vec<ObjectError>,
) -> (Vec<Publication>, Vec<Stale>) {
    let gateways = gateway_pods(&objects.pods, p);
    let services: BTreeMap<(String, String), &KService> = objects
        .services
        .iter()
        .filter_map(|k| {
            Some((
                (k.metadata.namespace.clone()?, k.metadata.name.clone()?),
                k.as_ref(),
            ))
        })
        .collect();
    let managed = |k: &KService| {
        k.metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(MANAGED_BY_LABEL))
            .is_some_and(|v| v == MANAGED_BY)
    };
    let mut out = Vec::new();
    for w in windows {
        let Some(o) = &w.origin else { continue };
        let app_name = o
            .app_service
            .split_once('/')
            .map(|(_, n)| n.to_string())
            .unwrap_or_default();
        let Some(app) = services.get(&(w.namespace.clone(), app_name.clone())) else {
            continue;
        };
        let existing = services.get(&(w.namespace.clone(), w.name.clone()));
        let app_uid = app.metadata.uid.clone().unwrap_or_default();
        let adopted = match existing {
            None => false,
            Some(e) if !managed(e) => {
                rejected.push(ObjectError {
                    kind: "kubernetes_publication",
                    name: format!("{}/{}", w.namespace, w.name),
                    message: format!(
                        "a Service {}/{} exists and is not managed by winmesh: left untouched,                          Linux clients are not routed to the gateway for it (label it                          {MANAGED_BY_LABEL}={MANAGED_BY} to hand it over, see docs/kubernetes.md)",
                        w.namespace, w.name
                    ),
                });
                continue;
            }
            // Owned when it names the app Service as its owner.
            Some(e) => !e
                .metadata
                .owner_references
                .iter()
                .flatten()
                .any(|r| r.kind == "Service" && r.name == app_name),
        };
        let labels = serde_json::json!({
            MANAGED_BY_LABEL: MANAGED_BY,
            APP_SERVICE_LABEL: app_name,
        });
        // istiod's SAN list for a host is the Service's accounts (this annotation, read in
        // pilot/pkg/serviceregistry/kube/conversion.go) joined with the accounts of its endpoints'
        // pods (here: the gateway's), expanded with trust-domain aliases
        // (pilot/pkg/model/push_context.go, addServiceAccounts). Clients then accept the app's
        // identity, which the gateway presents for it, and the gateway's own.
        let annotations = serde_json::json!({
            "alpha.istio.io/kubernetes-serviceaccounts": o.service_accounts.join(","),
        });
        let service = if adopted {
            serde_json::json!({
                "apiVersion": "v1", "kind": "Service",
                "metadata": {"name": w.name, "namespace": w.namespace,
                             "annotations": annotations},
            })
        } else {
            let ports: Vec<serde_json::Value> = w
                .ports
                .iter()
                .map(|pt| {
                    let mut v = serde_json::json!({"name": pt.name, "port": pt.port,
                        "protocol": "TCP", "targetPort": pt.gateway_port});
                    if let Some(ap) = app_protocol(pt.protocol) {
                        v["appProtocol"] = ap.into();
                    }
                    v
                })
                .collect();
            serde_json::json!({
                "apiVersion": "v1", "kind": "Service",
                "metadata": {"name": w.name, "namespace": w.namespace, "labels": labels,
                    "annotations": annotations,
                    // Deleting the app Service deletes this one (Kubernetes garbage collection).
                    "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": app_name,
                        "uid": app_uid, "blockOwnerDeletion": false}]},
                // No selector: the endpoints are the gateways, in the slice below.
                "spec": {"type": "ClusterIP", "ports": ports},
            })
        };
        // Gateways on the nodes where the app has a ready pod; with cross-node failover, every
        // ready gateway (each forwards to its own node's pods first).
        let listed: Vec<&GatewayPod> = gateways
            .iter()
            .filter(|g| o.cross_node || o.ready_nodes.iter().any(|n| n == g.node))
            .collect();
        let endpoints: Vec<serde_json::Value> = listed
            .iter()
            .map(|g| {
                let mut target = serde_json::json!({"kind": "Pod", "name": g.name,
                    "namespace": g.namespace});
                if let Some(uid) = g.uid {
                    target["uid"] = uid.into();
                }
                serde_json::json!({"addresses": [g.ip], "conditions": {"ready": true},
                    "nodeName": g.node, "targetRef": target})
            })
            .collect();
        let slice_ports: Vec<serde_json::Value> = w
            .ports
            .iter()
            .map(|pt| {
                let mut v = serde_json::json!({"name": pt.name, "port": pt.gateway_port,
                    "protocol": "TCP"});
                if let Some(ap) = app_protocol(pt.protocol) {
                    v["appProtocol"] = ap.into();
                }
                v
            })
            .collect();
        let slice_name = format!("{}-winmesh", w.name);
        let slice = serde_json::json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": slice_name, "namespace": w.namespace,
                "labels": {"kubernetes.io/service-name": w.name,
                           "endpointslice.kubernetes.io/managed-by": SLICE_MANAGER,
                           MANAGED_BY_LABEL: MANAGED_BY, APP_SERVICE_LABEL: app_name}},
            "addressType": "IPv4",
            "ports": slice_ports,
            "endpoints": endpoints,
        });
        out.push(Publication {
            namespace: w.namespace.clone(),
            mesh_name: w.name.clone(),
            app_service: app_name,
            service,
            adopted,
            slice,
            slice_name,
        });
    }
    // Stale: written by winmesh for an app Service that no longer exists or no longer opts in.
    // An app Service that still opts in but is malformed keeps its objects (bad input never
    // takes a working service away).
    let opted_in = |ns: &str, name: &str| {
        services
            .get(&(ns.to_string(), name.to_string()))
            .is_some_and(|k| is_opted_in(k))
    };
    let app_of = |labels: Option<&BTreeMap<String, String>>| {
        labels.and_then(|l| {
            (l.get(MANAGED_BY_LABEL).map(|v| v.as_str()) == Some(MANAGED_BY))
                .then(|| l.get(APP_SERVICE_LABEL).cloned())
                .flatten()
        })
    };
    let mut stale = Vec::new();
    for k in &objects.services {
        let (Some(ns), Some(name)) = (&k.metadata.namespace, &k.metadata.name) else {
            continue;
        };
        // Only Services winmesh created (owned by their app Service); adopted ones stay.
        let created = k
            .metadata
            .owner_references
            .iter()
            .flatten()
            .any(|r| r.kind == "Service");
        if let Some(app) = app_of(k.metadata.labels.as_ref())
            && created
            && !opted_in(ns, &app)
        {
            stale.push(Stale::Service {
                namespace: ns.clone(),
                name: name.clone(),
            });
        }
    }
    for sl in &objects.endpoint_slices {
        let (Some(ns), Some(name)) = (&sl.metadata.namespace, &sl.metadata.name) else {
            continue;
        };
        if let Some(app) = app_of(sl.metadata.labels.as_ref())
            && !opted_in(ns, &app)
        {
            stale.push(Stale::EndpointSlice {
                namespace: ns.clone(),
                name: name.clone(),
            });
        }
    }
    (out, stale)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use k8s_openapi::api::core::v1::Pod;
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    use serde_json::json;

    use std::net::IpAddr;

    use super::*;
    use crate::discovery::kube::{KubeObjects, MirrorSettings, build, merge};
    use crate::model::Mesh;

    fn obj<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> Arc<T> {
        Arc::new(serde_json::from_value(v).expect("valid object"))
    }

    fn app_service(name: &str, annotations: serde_json::Value, created: &str) -> Arc<KService> {
        obj(json!({
            "metadata": {"name": name, "namespace": "win", "creationTimestamp": created,
                         "labels": {EXPOSE_LABEL: "true"}, "annotations": annotations},
            "spec": {"selector": {"app": "shop"}, "ports": [
                {"name": "http", "port": 80, "targetPort": "web"},
                {"name": "grpc-api", "port": 9090, "targetPort": 9090},
                {"name": "udp-x", "port": 53}
            ]}
        }))
    }

    fn pod(name: &str, node: &str, sa: &str, ip: &str) -> Arc<Pod> {
        obj(json!({
            "metadata": {"name": name, "namespace": "win",
                         "labels": {"app": "shop", "version": name}},
            "spec": {"serviceAccountName": sa, "nodeName": node, "containers": []},
            "status": {"phase": "Running", "podIP": ip}
        }))
    }

    fn slice(svc: &str, eps: serde_json::Value) -> Arc<EndpointSlice> {
        obj(json!({
            "metadata": {"name": format!("{svc}-1"), "namespace": "win",
                         "labels": {"kubernetes.io/service-name": svc, EXPOSE_LABEL: "true"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080}, {"name": "grpc-api", "port": 9090}],
            "endpoints": eps
        }))
    }

    fn ep(ip: &str, pod: &str, node: &str, ready: bool) -> serde_json::Value {
        json!({"addresses": [ip], "conditions": {"ready": ready}, "nodeName": node,
               "targetRef": {"kind": "Pod", "name": pod, "namespace": "win"}})
    }

    fn settings(node: Option<&str>, cross: bool) -> MirrorSettings {
        let mut s = MirrorSettings::new("cluster.local");
        s.windows.node_name = node.map(str::to_string);
        s.windows.cross_node = cross;
        s
    }

    fn world() -> KubeObjects {
        KubeObjects {
            services: vec![app_service(
                "shop-backend",
                json!({MESH_SERVICE_ANNOTATION: "shop"}),
                "2026-01-01T00:00:00Z",
            )],
            endpoint_slices: vec![slice(
                "shop-backend",
                json!([
                    ep("10.1.0.5", "shop-a", "win-1", true),
                    ep("10.1.0.6", "shop-b", "win-1", false),
                    ep("10.2.0.7", "shop-c", "win-2", true)
                ]),
            )],
            pods: vec![
                pod("shop-a", "win-1", "shop-sa", "10.1.0.5"),
                pod("shop-b", "win-1", "shop-sa", "10.1.0.6"),
                pod("shop-c", "win-2", "shop-sa", "10.2.0.7"),
            ],
            ..Default::default()
        }
    }

    #[test]
    fn an_opted_in_service_becomes_a_windows_service_of_this_node() {
        let m = build(&world(), &settings(Some("win-1"), false));
        assert!(
            m.services.iter().all(|s| s.name != "shop-backend"),
            "the app Service is not mirrored as a Linux service"
        );
        assert_eq!(m.windows_services.len(), 1, "{:?}", m.rejected);
        let w = &m.windows_services[0];
        assert_eq!(w.name, "shop");
        assert_eq!(w.host, "shop.win.svc.cluster.local");
        // UDP left out; every port on the one shared gateway port; named target ports resolved.
        assert_eq!(
            w.ports
                .iter()
                .map(|p| (p.name.as_str(), p.port, p.gateway_port))
                .collect::<Vec<_>>(),
            vec![("http", 80, 15443), ("grpc-api", 9090, 15443)]
        );
        // Only the ready pod on this node; the other node's pod is not used by default.
        assert_eq!(
            w.backends,
            vec![WindowsBackend {
                address: "10.1.0.5".parse().unwrap(),
                ports: [("http".to_string(), 8080), ("grpc-api".to_string(), 9090)].into(),
                remote: false,
            }]
        );
        assert_eq!(w.backends[0].port_for(&w.ports[0]), 8080);
        assert_eq!(
            w.identity.as_ref().map(|i| i.to_string()).as_deref(),
            Some("spiffe://cluster.local/ns/win/sa/shop-sa")
        );
        let o = w.origin.as_ref().unwrap();
        assert_eq!(o.app_service, "win/shop-backend");
        assert_eq!(
            o.local_pod_ips,
            vec![
                "10.1.0.5".parse::<IpAddr>().unwrap(),
                "10.1.0.6".parse().unwrap()
            ],
            "every pod on this node calls out as the app, ready or not"
        );
        assert_eq!(o.status, None);
        assert_eq!(o.service_accounts, vec!["shop-sa".to_string()]);
        assert_eq!(
            o.ready_nodes,
            vec!["win-1".to_string(), "win-2".to_string()]
        );
    }

    #[test]
    fn other_nodes_pods_are_failover_only_and_only_when_allowed() {
        let mut o = world();
        // This node's only ready pod goes away.
        o.endpoint_slices = vec![slice(
            "shop-backend",
            json!([
                ep("10.1.0.6", "shop-b", "win-1", false),
                ep("10.2.0.7", "shop-c", "win-2", true)
            ]),
        )];
        let m = build(&o, &settings(Some("win-1"), false));
        let w = &m.windows_services[0];
        assert!(w.backends.is_empty());
        let status = w.origin.as_ref().unwrap().status.clone().unwrap();
        assert!(
            status.contains("1 ready on other nodes") && status.contains(CROSS_NODE_ANNOTATION),
            "{status}"
        );
        // Allowed by config, or by the annotation: priority 1.
        for (cross, ann) in [
            (true, json!({MESH_SERVICE_ANNOTATION: "shop"})),
            (
                false,
                json!({MESH_SERVICE_ANNOTATION: "shop", CROSS_NODE_ANNOTATION: "true"}),
            ),
        ] {
            o.services = vec![app_service("shop-backend", ann, "2026-01-01T00:00:00Z")];
            let m = build(&o, &settings(Some("win-1"), cross));
            let w = &m.windows_services[0];
            assert_eq!(w.backends.len(), 1);
            assert!(w.backends[0].remote);
            assert!(
                w.origin
                    .as_ref()
                    .unwrap()
                    .status
                    .as_ref()
                    .unwrap()
                    .contains("failing over")
            );
        }
        // Turned off, the label means nothing: an ordinary Service on the Linux side.
        let mut off = settings(Some("win-1"), false);
        off.windows.enabled = false;
        let m = build(&world(), &off);
        assert!(m.windows_services.is_empty());
        assert!(m.services.iter().any(|s| s.name == "shop-backend"));
        // Without a node name (local mode), every pod is local.
        let m = build(&world(), &settings(None, false));
        assert_eq!(m.windows_services[0].backends.len(), 2);
        assert!(m.windows_services[0].backends.iter().all(|b| !b.remote));
    }

    #[test]
    fn terminating_pods_that_still_serve_are_a_last_resort() {
        let terminating = |ip: &str, pod: &str| {
            json!({"addresses": [ip], "nodeName": "win-1",
                   "conditions": {"ready": false, "serving": true, "terminating": true},
                   "targetRef": {"kind": "Pod", "name": pod, "namespace": "win"}})
        };
        let mut o = world();
        // A ready pod here: the terminating one gets no new connections.
        o.endpoint_slices = vec![slice(
            "shop-backend",
            json!([
                ep("10.1.0.5", "shop-a", "win-1", true),
                terminating("10.1.0.6", "shop-b")
            ]),
        )];
        let m = build(&o, &settings(Some("win-1"), true));
        let addrs: Vec<String> = m.windows_services[0]
            .backends
            .iter()
            .map(|b| b.address.to_string())
            .collect();
        assert_eq!(addrs, vec!["10.1.0.5"]);
        // Only the terminating one left here: it serves, ahead of other nodes' pods.
        o.endpoint_slices = vec![slice(
            "shop-backend",
            json!([
                terminating("10.1.0.6", "shop-b"),
                ep("10.2.0.7", "shop-c", "win-2", true)
            ]),
        )];
        let m = build(&o, &settings(Some("win-1"), true));
        let w = &m.windows_services[0];
        let got: Vec<(String, bool)> = w
            .backends
            .iter()
            .map(|b| (b.address.to_string(), b.remote))
            .collect();
        assert_eq!(
            got,
            vec![
                ("10.2.0.7".to_string(), true),
                ("10.1.0.6".to_string(), false)
            ]
        );
        assert!(
            w.origin
                .as_ref()
                .unwrap()
                .status
                .as_ref()
                .unwrap()
                .contains("terminating")
        );
        // A terminating pod that no longer serves is never used.
        o.endpoint_slices = vec![slice(
            "shop-backend",
            json!([{"addresses": ["10.1.0.6"], "nodeName": "win-1",
                    "conditions": {"ready": false, "serving": false, "terminating": true},
                    "targetRef": {"kind": "Pod", "name": "shop-b", "namespace": "win"}}]),
        )];
        let m = build(&o, &settings(Some("win-1"), false));
        assert!(m.windows_services[0].backends.is_empty());
    }

    #[test]
    fn bad_or_conflicting_opt_ins_are_skipped_and_the_rest_served() {
        let mut o = world();
        o.services.push(app_service(
            "self",
            json!({MESH_SERVICE_ANNOTATION: "self"}),
            "2026-01-01T00:00:00Z",
        ));
        o.services.push(app_service(
            "bad-name",
            json!({MESH_SERVICE_ANNOTATION: "Not_A_Name"}),
            "2026-01-01T00:00:00Z",
        ));
        o.services.push(app_service(
            "bad-cross",
            json!({CROSS_NODE_ANNOTATION: "yes"}),
            "2026-01-01T00:00:00Z",
        ));
        // A younger app Service claiming the same mesh name loses.
        o.services.push(app_service(
            "shop-v2",
            json!({MESH_SERVICE_ANNOTATION: "shop"}),
            "2026-02-01T00:00:00Z",
        ));
        // Default mesh name: <name>-mesh.
        o.services
            .push(app_service("plain", json!({}), "2026-01-01T00:00:00Z"));
        let m = build(&o, &settings(Some("win-1"), false));
        let names: Vec<&str> = m.windows_services.iter().map(|w| w.name.as_str()).collect();
        assert_eq!(names, vec!["plain-mesh", "shop"]);
        let shop = m
            .windows_services
            .iter()
            .find(|w| w.name == "shop")
            .unwrap();
        assert_eq!(
            shop.origin.as_ref().unwrap().app_service,
            "win/shop-backend"
        );
        let plain = m
            .windows_services
            .iter()
            .find(|w| w.name == "plain-mesh")
            .unwrap();
        assert!(plain.backends.is_empty());
        assert!(
            plain
                .origin
                .as_ref()
                .unwrap()
                .status
                .as_ref()
                .unwrap()
                .contains("no endpoints")
        );
        let rejected: Vec<String> = m.rejected.iter().map(|r| r.to_string()).collect();
        for (name, why) in [
            ("win/self", "the app Service itself"),
            ("win/bad-name", "not a Service name"),
            ("win/bad-cross", "neither"),
            (
                "win/shop-v2",
                "already claimed by the older win/shop-backend",
            ),
        ] {
            assert!(
                rejected.iter().any(|r| r.contains(name) && r.contains(why)),
                "{name}: {rejected:#?}"
            );
        }
    }

    fn ap(name: &str, spec: serde_json::Value) -> Arc<DynamicObject> {
        obj(
            json!({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": name, "namespace": "win"}, "spec": spec}),
        )
    }

    #[test]
    fn authorization_policies_select_windows_services_as_istio_does() {
        let mut o = world();
        o.authorization_policies = vec![
            ap(
                "by-label",
                json!({"selector": {"matchLabels": {"app": "shop"}},
                "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/a/sa/b"]}}]}]}),
            ),
            ap(
                "other-app",
                json!({"selector": {"matchLabels": {"app": "billing"}},
                "action": "DENY", "rules": [{}]}),
            ),
            ap(
                "by-ref",
                json!({"targetRefs": [{"kind": "Service", "group": "", "name": "shop-backend"}],
                "action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/admin"]}}]}]}),
            ),
            ap(
                "to-gateway",
                json!({"targetRefs": [{"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "gw"}],
                "action": "DENY", "rules": [{}]}),
            ),
            ap("namespace-wide", json!({"action": "AUDIT", "rules": [{}]})),
            ap(
                "broken-deny",
                json!({"action": "DENY", "rules": [{"from": [{"source": {"principals": ["a*b"]}}]}]}),
            ),
            ap("broken-action", json!({"action": "MAYBE"})),
        ];
        let m = build(&o, &settings(Some("win-1"), false));
        let mesh = merge(&Mesh::empty_for_tests(), &m);
        let w = &mesh.windows_services[0];
        let applied: Vec<(&str, Action, usize)> = mesh
            .policies_for(w)
            .map(|p| (p.name.as_str(), p.action, p.rules.len()))
            .collect();
        assert_eq!(
            applied,
            vec![
                ("broken-action", Action::Deny, 1),
                ("broken-deny", Action::Deny, 1),
                ("by-label", Action::Allow, 1),
                ("by-ref", Action::Deny, 1),
                ("namespace-wide", Action::Audit, 1),
            ],
            "a Gateway-targeted or other-app policy does not apply; broken ones deny all"
        );
        let broken = mesh
            .authorization_policies
            .iter()
            .find(|p| p.name == "broken-deny")
            .unwrap();
        assert_eq!(
            broken.rules,
            vec![crate::model::Rule::default()],
            "deny-all"
        );
        let rejected: Vec<String> = m.rejected.iter().map(|r| r.to_string()).collect();
        assert!(
            rejected
                .iter()
                .any(|r| r.contains("win/broken-deny") && r.contains("fail-closed")),
            "{rejected:?}"
        );
        assert!(
            rejected
                .iter()
                .any(|r| r.contains("win/broken-action") && r.contains("deny-all")),
            "{rejected:?}"
        );
        // The file wins by namespace/name.
        let mut file = Mesh::empty_for_tests();
        file.authorization_policies.push(AuthorizationPolicy {
            name: "by-ref".into(),
            namespace: "win".into(),
            services: vec!["nothing".into()],
            selector: None,
            target_services: vec![],
            action: Action::Allow,
            provider: None,
            rules: vec![],
        });
        let mesh = merge(&file, &m);
        assert_eq!(
            mesh.authorization_policies
                .iter()
                .filter(|p| p.name == "by-ref")
                .count(),
            1
        );
    }

    #[test]
    fn the_file_wins_for_a_windows_service_host() {
        let m = build(&world(), &settings(Some("win-1"), false));
        let mut file = Mesh::empty_for_tests();
        let mut pinned = m.windows_services[0].clone();
        pinned.origin = None;
        pinned.backends = vec![WindowsBackend::local("192.168.9.9".parse().unwrap())];
        file.windows_services.push(pinned);
        let mesh = merge(&file, &m);
        assert_eq!(mesh.windows_services.len(), 1);
        assert_eq!(
            mesh.windows_services[0].backends[0].address.to_string(),
            "192.168.9.9"
        );
    }

    fn gateway(name: &str, node: &str, ready: bool, deleting: bool) -> Arc<Pod> {
        let mut v = json!({
            "metadata": {"name": name, "namespace": "winmesh", "uid": format!("uid-{name}"),
                         "labels": {"app.kubernetes.io/name": "winmesh-gateway"}},
            "spec": {"serviceAccountName": "gw", "nodeName": node, "containers": []},
            "status": {"phase": "Running", "podIP": format!("10.9.0.{}", name.len()),
                       "conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"}}]}
        });
        if deleting {
            v["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
        }
        obj(v)
    }

    fn publishing() -> MirrorSettings {
        let mut s = settings(Some("win-1"), false);
        s.publish = Some(PublishSettings {
            namespace: "winmesh".into(),
            gateway_selector: [(
                "app.kubernetes.io/name".to_string(),
                "winmesh-gateway".to_string(),
            )]
            .into(),
        });
        s
    }

    #[test]
    fn publications_list_ready_gateways_on_nodes_with_ready_pods() {
        let mut o = world();
        o.pods.extend([
            gateway("gw-a", "win-1", true, false),
            gateway("gw-bb", "win-2", true, false),
            gateway("gw-ccc", "win-3", true, false),
            gateway("gw-dddd", "win-1", false, false),
            gateway("gw-eeeee", "win-2", true, true),
        ]);
        let m = build(&o, &publishing());
        assert_eq!(m.publications.len(), 1, "{:?}", m.rejected);
        let p = &m.publications[0];
        assert!(!p.adopted);
        assert_eq!(p.service["spec"]["ports"][0]["targetPort"], 15443);
        assert_eq!(p.service["spec"]["ports"][0]["name"], "http");
        assert_eq!(p.service["spec"]["ports"][1]["appProtocol"], "grpc");
        assert!(p.service["spec"].get("selector").is_none());
        assert_eq!(
            p.service["metadata"]["annotations"]["alpha.istio.io/kubernetes-serviceaccounts"],
            "shop-sa"
        );
        // win-1 and win-2 have ready app pods; not-ready and terminating gateways are left out.
        let listed: Vec<&str> = p.slice["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["targetRef"]["name"].as_str().unwrap())
            .collect();
        assert_eq!(listed, vec!["gw-a", "gw-bb"]);
        assert_eq!(p.slice["ports"][0]["port"], 15443);
        assert_eq!(
            p.slice["metadata"]["labels"]["kubernetes.io/service-name"],
            "shop"
        );
        // Cross-node: every ready gateway.
        o.services = vec![app_service(
            "shop-backend",
            json!({MESH_SERVICE_ANNOTATION: "shop", CROSS_NODE_ANNOTATION: "true"}),
            "2026-01-01T00:00:00Z",
        )];
        let m = build(&o, &publishing());
        assert_eq!(
            m.publications[0].slice["endpoints"]
                .as_array()
                .unwrap()
                .len(),
            3
        );
    }

    fn mesh_service(labels: serde_json::Value, owners: serde_json::Value) -> Arc<KService> {
        obj(
            json!({"metadata": {"name": "shop", "namespace": "win", "labels": labels,
                                "ownerReferences": owners},
                    "spec": {"selector": {"app": "shop"}, "ports": [{"name": "http", "port": 80}]}}),
        )
    }

    #[test]
    fn publications_never_touch_what_winmesh_does_not_own() {
        let owned_by_app =
            json!([{"apiVersion": "v1", "kind": "Service", "name": "shop-backend", "uid": "u1"}]);
        let managed = json!({MANAGED_BY_LABEL: MANAGED_BY, APP_SERVICE_LABEL: "shop-backend"});
        // Someone else's Service: reported, not published.
        let mut o = world();
        o.services.push(mesh_service(json!({}), json!([])));
        let m = build(&o, &publishing());
        assert!(m.publications.is_empty());
        assert!(
            m.rejected
                .iter()
                .any(|r| r.message.contains("is not managed by winmesh"))
        );
        // Handed over (labelled by its owner, no owner reference): only the annotation.
        let mut o = world();
        o.services.push(mesh_service(
            json!({MANAGED_BY_LABEL: MANAGED_BY}),
            json!([]),
        ));
        let m = build(&o, &publishing());
        assert!(m.publications[0].adopted);
        assert!(m.publications[0].service.get("spec").is_none());
        assert!(
            m.publications[0].service["metadata"]
                .get("labels")
                .is_none()
        );
        // Stale only when the app no longer opts in; a malformed opt-in keeps its objects.
        let slice = obj::<EndpointSlice>(
            json!({"metadata": {"name": "shop-winmesh", "namespace": "win", "labels": managed.clone()},
            "addressType": "IPv4", "endpoints": []}),
        );
        let mut o = world();
        o.services
            .push(mesh_service(managed.clone(), owned_by_app.clone()));
        o.endpoint_slices.push(slice.clone());
        o.services[0] = app_service(
            "shop-backend",
            json!({CROSS_NODE_ANNOTATION: "maybe"}),
            "2026-01-01T00:00:00Z",
        );
        let m = build(&o, &publishing());
        assert!(m.stale.is_empty(), "{:?}", m.stale);
        o.services[0] = obj(
            json!({"metadata": {"name": "shop-backend", "namespace": "win"},
            "spec": {"selector": {"app": "shop"}, "ports": [{"name": "http", "port": 80}]}}),
        );
        let m = build(&o, &publishing());
        assert_eq!(
            m.stale,
            vec![
                Stale::Service {
                    namespace: "win".into(),
                    name: "shop".into()
                },
                Stale::EndpointSlice {
                    namespace: "win".into(),
                    name: "shop-winmesh".into()
                },
            ]
        );
        // An adopted Service is never deleted, only winmesh's slice.
        o.services[1] = mesh_service(managed, json!([]));
        let m = build(&o, &publishing());
        assert_eq!(
            m.stale,
            vec![Stale::EndpointSlice {
                namespace: "win".into(),
                name: "shop-winmesh".into()
            }]
        );
    }
}
