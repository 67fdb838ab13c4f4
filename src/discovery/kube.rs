//! Kubernetes source: mirrors what istiod reads for the Linux side of the mesh, so Windows → Linux
//! routes follow pods as they come and go.
//!
//! It watches Services, EndpointSlices, Pods and Istio's PeerAuthentication and builds the same
//! [`model`](crate::model) the mesh file produces: a Service's host is `<name>.<ns>.svc.<domain>`, port
//! protocols follow Istio's rules (`appProtocol`, then the port name's prefix), each ready endpoint
//! takes its service account, node and `tlsMode` (label `security.istio.io/tlsMode`) from its pod
//! (by `targetRef`, else by IP in the same namespace), and Istio's service-account annotations add to
//! the SANs a client expects. Windows services and AuthorizationPolicies stay in the mesh file: they
//! describe the gateway itself, not the mesh around it.
//!
//! This file has two halves: pure conversion (`build`, `merge`) and the watch loop (`KubeSource`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::{Pod, Service as KService};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Api;
use kube::core::{ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::{reflector, watcher};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{info, warn};

use super::kube_windows::{self, WindowsSettings};
use super::{MeshState, ObjectError};
use crate::metrics::Metrics;
use crate::model::{
    AuthorizationPolicy, Endpoint, Mesh, MtlsMode, PeerAuthentication, Protocol, Service,
    ServicePort, TlsMode, WindowsService,
};

/// Istio's sidecar-injection label that makes clients use mTLS towards a pod.
pub const TLS_MODE_LABEL: &str = "security.istio.io/tlsMode";
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
const KUBE_SAS_ANNOTATION: &str = "alpha.istio.io/kubernetes-serviceaccounts";
const CANONICAL_SAS_ANNOTATION: &str = "alpha.istio.io/canonical-serviceaccounts";

/// What the Kubernetes source contributes to the model.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KubeMesh {
    pub services: Vec<Service>,
    pub peer_authentications: Vec<PeerAuthentication>,
    /// From opted-in app Services (`kube_windows`).
    pub windows_services: Vec<WindowsService>,
    /// The mesh-facing Services and EndpointSlices to write (when publishing is configured).
    pub publications: Vec<kube_windows::Publication>,
    /// Objects winmesh wrote whose app Service no longer opts in.
    pub stale: Vec<kube_windows::Stale>,
    pub authorization_policies: Vec<AuthorizationPolicy>,
    /// Objects that could not be mirrored, and why.
    pub rejected: Vec<ObjectError>,
}

/// The objects the source currently knows.
#[derive(Clone, Debug, Default)]
pub struct KubeObjects {
    pub services: Vec<Arc<KService>>,
    pub endpoint_slices: Vec<Arc<EndpointSlice>>,
    pub pods: Vec<Arc<Pod>>,
    pub peer_authentications: Vec<Arc<DynamicObject>>,
    pub authorization_policies: Vec<Arc<DynamicObject>>,
}

/// The namespace of the gateway pods and the election Lease: configured, else `$POD_NAMESPACE`,
/// else `identity.namespace`.
pub fn publish_namespace(cfg: &crate::config::Config) -> String {
    let p = &cfg.mesh.kubernetes.windows.publish;
    Some(p.namespace.clone())
        .filter(|n| !n.is_empty())
        .or_else(|| std::env::var("POD_NAMESPACE").ok())
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| cfg.identity.namespace.clone())
}

/// What the mirror needs from the config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MirrorSettings {
    pub domain_suffix: String,
    pub windows: WindowsSettings,
    /// Where the gateway pods are, when this winmesh may publish mesh-facing Services.
    pub publish: Option<kube_windows::PublishSettings>,
}

impl MirrorSettings {
    /// From the config; an empty `node_name` falls back to `$NODE_NAME` (the downward API).
    pub fn from_config(cfg: &crate::config::Config) -> MirrorSettings {
        let w = &cfg.mesh.kubernetes.windows;
        let node_name = Some(w.node_name.clone())
            .filter(|n| !n.is_empty())
            .or_else(|| std::env::var("NODE_NAME").ok())
            .filter(|n| !n.is_empty());
        MirrorSettings {
            domain_suffix: cfg.mesh.domain_suffix.clone(),
            windows: WindowsSettings {
                enabled: w.enabled,
                gateway_port: w.gateway_port,
                node_name,
                cross_node: w.cross_node,
                trust_domain: cfg.identity.trust_domain.clone(),
            },
            publish: w.publish.enabled.then(|| kube_windows::PublishSettings {
                namespace: publish_namespace(cfg),
                gateway_selector: w.publish.gateway_selector.clone(),
            }),
        }
    }

    pub fn new(domain_suffix: &str) -> MirrorSettings {
        MirrorSettings {
            domain_suffix: domain_suffix.into(),
            windows: WindowsSettings::default(),
            publish: None,
        }
    }
}

fn key(meta: &kube::core::ObjectMeta) -> Option<(String, String)> {
    Some((meta.namespace.clone()?, meta.name.clone()?))
}

fn object_name(meta: &kube::core::ObjectMeta) -> String {
    format!(
        "{}/{}",
        meta.namespace.as_deref().unwrap_or("?"),
        meta.name.as_deref().unwrap_or("?")
    )
}

/// What an endpoint needs from its pod.
#[derive(Clone, Debug)]
struct PodInfo {
    namespace: String,
    service_account: String,
    labels: BTreeMap<String, String>,
    tls_mode: TlsMode,
    node: Option<String>,
}

fn pod_info(p: &Pod) -> PodInfo {
    let spec = p.spec.as_ref();
    PodInfo {
        namespace: p.metadata.namespace.clone().unwrap_or_default(),
        labels: p.metadata.labels.clone().unwrap_or_default(),
        // Kubernetes runs a pod without an explicit account as `default`.
        service_account: spec
            .and_then(|s| s.service_account_name.clone())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "default".into()),
        tls_mode: match p
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(TLS_MODE_LABEL))
        {
            Some(v) if v == "istio" => TlsMode::Istio,
            _ => TlsMode::Disabled,
        },
        node: spec.and_then(|s| s.node_name.clone()),
    }
}

struct PodIndex {
    by_name: HashMap<(String, String), PodInfo>,
    by_ip: HashMap<(String, IpAddr), PodInfo>,
}

impl PodIndex {
    fn new(pods: &[Arc<Pod>]) -> PodIndex {
        let mut by_name = HashMap::new();
        let mut by_ip = HashMap::new();
        for p in pods {
            let Some((ns, name)) = key(&p.metadata) else {
                continue;
            };
            let info = pod_info(p);
            let status = p.status.as_ref();
            // Host-network pods share the node's IP: they cannot be told apart by address.
            let host_network = p
                .spec
                .as_ref()
                .and_then(|s| s.host_network)
                .unwrap_or(false);
            // A finished pod may still report an IP that a new pod now owns.
            let finished = status
                .and_then(|s| s.phase.as_deref())
                .is_some_and(|p| p == "Succeeded" || p == "Failed");
            if !host_network && !finished {
                let ips = status
                    .and_then(|s| s.pod_ips.as_ref())
                    .map(|v| v.iter().map(|i| i.ip.clone()).collect::<Vec<_>>())
                    .or_else(|| status.and_then(|s| s.pod_ip.clone()).map(|i| vec![i]))
                    .unwrap_or_default();
                for ip in ips.iter().filter_map(|i| i.parse::<IpAddr>().ok()) {
                    by_ip.insert((ns.clone(), ip), info.clone());
                }
            }
            by_name.insert((ns, name), info);
        }
        PodIndex { by_name, by_ip }
    }
}

fn port_u16(p: i32, what: &str) -> Result<u16, String> {
    u16::try_from(p)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("{what} {p} is not a port number"))
}

/// A Kubernetes Service without its endpoints. `Ok(None)`: nothing to mirror (no TCP ports).
/// `notes`: ports left out, and why.
fn service(
    svc: &KService,
    domain_suffix: &str,
    notes: &mut Vec<String>,
) -> Result<Option<Service>, String> {
    let (namespace, name) = key(&svc.metadata).ok_or("no namespace or name")?;
    let spec = svc.spec.as_ref().ok_or("no spec")?;
    if spec.type_.as_deref() == Some("ExternalName") {
        return Err("ExternalName services are not mirrored (no endpoints to route to)".into());
    }
    let mut ports = Vec::new();
    for p in spec.ports.iter().flatten() {
        // The gateway carries TCP (and HTTP over it) only.
        if p.protocol.as_deref().is_some_and(|x| x != "TCP") {
            continue;
        }
        let port_name = p.name.clone().unwrap_or_default();
        let port = port_u16(p.port, "port")?;
        let target_port = match &p.target_port {
            Some(IntOrString::Int(t)) => port_u16(*t, "targetPort")?,
            // Named target ports are resolved per endpoint from the EndpointSlices.
            Some(IntOrString::String(_)) | None => port,
        };
        let protocol = Protocol::detect(&port_name, p.app_protocol.as_deref());
        if protocol == Protocol::Udp {
            // The mesh file's rule too: a TCP port Istio calls UDP (`udp-*`) is not carried.
            notes.push(format!(
                "ports[{port_name}]: UDP cannot be carried over Istio mTLS; port left out"
            ));
            continue;
        }
        ports.push(ServicePort {
            protocol,
            name: port_name,
            port,
            target_port,
            local_port: None,
        });
    }
    if ports.is_empty() {
        return Ok(None);
    }
    let annotations = svc.metadata.annotations.as_ref();
    let list = |key: &str| -> Vec<String> {
        annotations
            .and_then(|a| a.get(key))
            .map(|v| {
                v.split(',')
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut extra_service_accounts = list(KUBE_SAS_ANNOTATION);
    // Canonical accounts are full identities; only SPIFFE ones can match a URI SAN.
    extra_service_accounts.extend(
        list(CANONICAL_SAS_ANNOTATION)
            .into_iter()
            .filter(|s| s.starts_with("spiffe://")),
    );
    Ok(Some(Service {
        host: format!("{name}.{namespace}.svc.{domain_suffix}"),
        name,
        namespace,
        ports,
        extra_service_accounts,
        endpoints: vec![],
    }))
}

/// Endpoints of one Service from its EndpointSlices, deduplicated by address (an address listed
/// twice is ready if any listing says so), sorted by address.
/// `publish_not_ready`: the Service's `publishNotReadyAddresses`, which makes every listed address
/// count as ready (as Istio does).
fn endpoints(
    svc: &Service,
    slices: &[&EndpointSlice],
    pods: &PodIndex,
    publish_not_ready: bool,
    rejected: &mut Vec<ObjectError>,
) -> Vec<Endpoint> {
    let known_ports: BTreeSet<&str> = svc.ports.iter().map(|p| p.name.as_str()).collect();
    let mut out: BTreeMap<IpAddr, Endpoint> = BTreeMap::new();
    for slice in slices {
        if slice.address_type == "FQDN" {
            continue;
        }
        let ports: BTreeMap<String, u16> = slice
            .ports
            .iter()
            .flatten()
            .filter(|p| p.protocol.as_deref().is_none_or(|x| x == "TCP"))
            .filter_map(|p| {
                let name = p.name.clone().unwrap_or_default();
                let port = u16::try_from(p.port?).ok().filter(|p| *p != 0)?;
                known_ports.contains(name.as_str()).then_some((name, port))
            })
            .collect();
        for ep in &slice.endpoints {
            let Some(first) = ep.addresses.first() else {
                continue;
            };
            let Ok(address) = first.parse::<IpAddr>() else {
                rejected.push(ObjectError {
                    kind: "kubernetes_endpoint",
                    name: object_name(&slice.metadata),
                    message: format!("address {first:?} is not an IP address; endpoint skipped"),
                });
                continue;
            };
            // Kubernetes: a missing `ready` condition means ready.
            let ready =
                publish_not_ready || ep.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
            // As istiod's EndpointSlice controller: a `targetRef` Pod decides (identity, labels,
            // namespace); one that is not known yet leaves the endpoint out until it arrives (a
            // slice routinely comes before its Pod), rather than serving it as plaintext with no
            // SAN. Without a targetRef, the Pod is found by IP in the Service's namespace.
            let pod_ref = ep
                .target_ref
                .as_ref()
                .filter(|r| r.kind.as_deref() == Some("Pod"));
            let pod = match pod_ref {
                Some(r) => {
                    let ns = r.namespace.clone().unwrap_or_else(|| svc.namespace.clone());
                    match r.name.clone().and_then(|n| pods.by_name.get(&(ns, n))) {
                        Some(p) => Some(p),
                        None => continue,
                    }
                }
                None => pods.by_ip.get(&(svc.namespace.clone(), address)),
            };
            let endpoint = Endpoint {
                address,
                ports: ports.clone(),
                service_account: pod.map(|p| p.service_account.clone()),
                namespace: pod
                    .map(|p| p.namespace.clone())
                    .filter(|ns| *ns != svc.namespace),
                labels: pod.map(|p| p.labels.clone()).unwrap_or_default(),
                tls_mode: pod.map(|p| p.tls_mode).unwrap_or(TlsMode::Disabled),
                node: ep
                    .node_name
                    .clone()
                    .or_else(|| pod.and_then(|p| p.node.clone())),
                ready,
                // istiod builds endpoints per slice port: a port the slice lacks has none.
                listed_ports_only: true,
                terminating_serving: !ready
                    && ep
                        .conditions
                        .as_ref()
                        .is_some_and(|c| c.terminating == Some(true) && c.serving == Some(true)),
            };
            match out.get_mut(&address) {
                Some(existing) => {
                    existing.ready |= endpoint.ready;
                    existing.terminating_serving &= !existing.ready;
                    existing.terminating_serving |= endpoint.terminating_serving && !existing.ready;
                    for (k, v) in endpoint.ports {
                        existing.ports.entry(k).or_insert(v);
                    }
                }
                None => {
                    out.insert(address, endpoint);
                }
            }
        }
    }
    out.into_values().collect()
}

fn mtls_mode(v: Option<&serde_json::Value>) -> Result<MtlsMode, String> {
    match v.map(|m| m.as_str()) {
        None => Ok(MtlsMode::Unset),
        Some(Some("UNSET")) => Ok(MtlsMode::Unset),
        Some(Some("STRICT")) => Ok(MtlsMode::Strict),
        Some(Some("PERMISSIVE")) => Ok(MtlsMode::Permissive),
        Some(Some("DISABLE")) => Ok(MtlsMode::Disable),
        Some(other) => Err(format!("spec.mtls.mode: unknown mode {other:?}")),
    }
}

/// A PeerAuthentication: namespace-wide, or for the workloads its `selector.matchLabels` match, with
/// port-level modes keyed by workload port (Istio reads `portLevelMtls` only on selector policies).
fn peer_authentication(o: &DynamicObject) -> Result<PeerAuthentication, String> {
    let namespace = o.metadata.namespace.clone().ok_or("no namespace")?;
    let spec = o.data.get("spec");
    let mut selector = BTreeMap::new();
    if let Some(m) = spec
        .and_then(|s| s.get("selector"))
        .and_then(|s| s.get("matchLabels"))
    {
        let m = m
            .as_object()
            .ok_or("spec.selector.matchLabels: not a map")?;
        for (k, v) in m {
            let v = v
                .as_str()
                .ok_or_else(|| format!("spec.selector.matchLabels.{k}: not a string"))?;
            selector.insert(k.clone(), v.to_string());
        }
    }
    let mode = mtls_mode(spec.and_then(|s| s.get("mtls")).and_then(|m| m.get("mode")))?;
    let mut port_modes = BTreeMap::new();
    if !selector.is_empty()
        && let Some(levels) = spec
            .and_then(|s| s.get("portLevelMtls"))
            .and_then(|p| p.as_object())
    {
        for (port, v) in levels {
            let port: u16 = port
                .parse()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("spec.portLevelMtls: {port:?} is not a port"))?;
            port_modes.insert(port, mtls_mode(v.get("mode"))?);
        }
    }
    Ok(PeerAuthentication {
        namespace,
        selector,
        mode,
        port_modes,
    })
}

/// Builds the Kubernetes part of the model from the objects the source knows.
pub fn build(objects: &KubeObjects, settings: &MirrorSettings) -> KubeMesh {
    let domain_suffix = settings.domain_suffix.as_str();
    let mut out = KubeMesh::default();
    let pods = PodIndex::new(&objects.pods);
    let mut slices: HashMap<(String, String), Vec<&EndpointSlice>> = HashMap::new();
    for s in &objects.endpoint_slices {
        let svc = s
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL));
        if let (Some(ns), Some(svc)) = (s.metadata.namespace.clone(), svc) {
            slices.entry((ns, svc.clone())).or_default().push(s);
        }
    }
    let mut windows = Vec::new();
    for k in &objects.services {
        let mut notes = Vec::new();
        let built = service(k, domain_suffix, &mut notes);
        for message in notes {
            out.rejected.push(ObjectError {
                kind: "kubernetes_service",
                name: object_name(&k.metadata),
                message,
            });
        }
        match built {
            Ok(Some(mut svc)) => {
                let mine = slices
                    .get(&(svc.namespace.clone(), svc.name.clone()))
                    .map(|v| v.as_slice())
                    .unwrap_or(&[]);
                let publish_not_ready = k
                    .spec
                    .as_ref()
                    .and_then(|s| s.publish_not_ready_addresses)
                    .unwrap_or(false);
                svc.endpoints = endpoints(&svc, mine, &pods, publish_not_ready, &mut out.rejected);
                // A Windows app: served by the gateway, never mirrored as a Linux service (its
                // endpoints are plaintext Windows pods). With Windows services from the cluster
                // turned off, the label means nothing and the Service is an ordinary one.
                if settings.windows.enabled && kube_windows::is_opted_in(k) {
                    match kube_windows::windows_service(k, &svc, &settings.windows, domain_suffix) {
                        Ok(w) => {
                            windows.push((
                                k.metadata.creation_timestamp.as_ref().map(|t| t.0),
                                object_name(&k.metadata),
                                w,
                            ));
                        }
                        Err(message) => out.rejected.push(ObjectError {
                            kind: "kubernetes_windows_service",
                            name: object_name(&k.metadata),
                            message,
                        }),
                    }
                    continue;
                }
                out.services.push(svc);
            }
            Ok(None) => {}
            Err(message) => out.rejected.push(ObjectError {
                kind: "kubernetes_service",
                name: object_name(&k.metadata),
                message,
            }),
        }
    }
    out.services
        .sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    out.windows_services = kube_windows::dedup_claims(windows, &mut out.rejected);
    if let Some(p) = &settings.publish {
        let (publications, stale) =
            kube_windows::publications(&out.windows_services, objects, p, &mut out.rejected);
        out.publications = publications;
        out.stale = stale;
    }
    // The mesh-facing Services winmesh publishes point at the gateways: they are the Windows
    // services themselves, not Linux services to mirror back.
    let windows_hosts: BTreeSet<String> = out
        .windows_services
        .iter()
        .map(|w| w.host.clone())
        .collect();
    out.services.retain(|s| !windows_hosts.contains(&s.host));
    for o in &objects.authorization_policies {
        match kube_windows::authorization_policy(o) {
            Ok(Some(p)) => out.authorization_policies.push(p),
            Ok(None) => {}
            Err(e) => {
                let (fail_closed, message) = *e;
                out.rejected.push(ObjectError {
                    kind: "kubernetes_authorization_policy",
                    name: object_name(&o.metadata),
                    message,
                });
                out.authorization_policies.extend(fail_closed);
            }
        }
    }
    out.authorization_policies
        .sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));

    // Istio: with several namespace-wide policies in one namespace, the oldest wins.
    let mut pas: Vec<&Arc<DynamicObject>> = objects.peer_authentications.iter().collect();
    pas.sort_by(|a, b| {
        (
            a.metadata.creation_timestamp.as_ref().map(|t| t.0),
            &a.metadata.name,
        )
            .cmp(&(
                b.metadata.creation_timestamp.as_ref().map(|t| t.0),
                &b.metadata.name,
            ))
    });
    for o in pas {
        match peer_authentication(o) {
            Ok(pa) => {
                if let Some(first) = out
                    .peer_authentications
                    .iter()
                    .find(|p| p.namespace == pa.namespace && p.selector.is_empty())
                    .filter(|_| pa.selector.is_empty())
                {
                    out.rejected.push(ObjectError {
                        kind: "kubernetes_peer_authentication",
                        name: object_name(&o.metadata),
                        message: format!(
                            "an older namespace-wide policy in {} takes precedence",
                            first.namespace
                        ),
                    });
                    continue;
                }
                out.peer_authentications.push(pa);
            }
            Err(message) => out.rejected.push(ObjectError {
                kind: "kubernetes_peer_authentication",
                name: object_name(&o.metadata),
                message,
            }),
        }
    }
    // Stable by namespace; within one, oldest first (the first matching workload policy wins).
    out.peer_authentications
        .sort_by(|a, b| a.namespace.cmp(&b.namespace));
    out
}

/// The model served: the mesh file's, plus what Kubernetes says. The file wins where both speak: its
/// services and Windows services (by host), its PeerAuthentications (by namespace) and its
/// AuthorizationPolicies (by namespace and name) replace Kubernetes' own, and
/// Kubernetes Services whose host is a Windows service's (the mesh-facing Services that point at the
/// gateway) are not mirrored back as Linux services.
pub fn merge(file: &Mesh, kube: &KubeMesh) -> Mesh {
    let mut mesh = file.clone();
    let taken: BTreeSet<&str> = file
        .services
        .iter()
        .map(|s| s.host.as_str())
        .chain(file.windows_services.iter().map(|w| w.host.as_str()))
        .collect();
    mesh.services.extend(
        kube.services
            .iter()
            .filter(|s| !taken.contains(s.host.as_str()))
            .cloned(),
    );
    // Windows services: the file's win by host (a pin or override of one from the cluster).
    mesh.windows_services.extend(
        kube.windows_services
            .iter()
            .filter(|w| !taken.contains(w.host.as_str()))
            .cloned(),
    );
    let file_policies: BTreeSet<(&str, &str)> = file
        .authorization_policies
        .iter()
        .map(|p| (p.namespace.as_str(), p.name.as_str()))
        .collect();
    mesh.authorization_policies.extend(
        kube.authorization_policies
            .iter()
            .filter(|p| !file_policies.contains(&(p.namespace.as_str(), p.name.as_str())))
            .cloned(),
    );
    let file_ns: BTreeSet<&str> = file
        .peer_authentications
        .iter()
        .map(|p| p.namespace.as_str())
        .collect();
    mesh.peer_authentications.extend(
        kube.peer_authentications
            .iter()
            .filter(|p| !file_ns.contains(p.namespace.as_str()))
            .cloned(),
    );
    mesh
}

/// Kinds served from the persisted state because the API has not listed them (yet) in this process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PersistedUse {
    /// When the persisted objects were saved.
    pub saved: SystemTime,
    /// When this process started serving them.
    pub since: SystemTime,
    pub kinds: Vec<&'static str>,
}

impl PersistedUse {
    pub fn describe(&self) -> String {
        format!(
            "serving persisted Kubernetes state for {} (saved {}, served since {}): the API has not \
             listed them since winmesh started",
            self.kinds.join(", "),
            humantime::format_rfc3339_seconds(self.saved),
            humantime::format_rfc3339_seconds(self.since)
        )
    }
}

/// What the Kubernetes source currently says.
#[derive(Clone, Debug, Default)]
pub struct KubeState {
    /// `None` until every watched kind has been listed once (or is available from persisted state).
    pub mesh: Option<Arc<KubeMesh>>,
    /// Set while some kinds come from the persisted state.
    pub persisted: Option<PersistedUse>,
    /// The latest error per watched kind (cleared when that watch works again); the last good
    /// objects stay in service meanwhile.
    pub errors: BTreeMap<&'static str, String>,
    pub generation: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Services,
    EndpointSlices,
    Pods,
    PeerAuthentications,
    AuthorizationPolicies,
}

impl Kind {
    const ALL: [Kind; 5] = [
        Kind::Services,
        Kind::EndpointSlices,
        Kind::Pods,
        Kind::PeerAuthentications,
        Kind::AuthorizationPolicies,
    ];

    /// An Istio CRD: a 404 means it is not installed, so there are none.
    fn is_istio_crd(self) -> bool {
        matches!(
            self,
            Kind::PeerAuthentications | Kind::AuthorizationPolicies
        )
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Services => "services",
            Kind::EndpointSlices => "endpointslices",
            Kind::Pods => "pods",
            Kind::PeerAuthentications => "peerauthentications",
            Kind::AuthorizationPolicies => "authorizationpolicies",
        }
    }
}

enum Signal {
    Event {
        kind: Kind,
        init_done: bool,
    },
    Error {
        kind: Kind,
        message: String,
        /// The API answered 404: the kind does not exist (a CRD not installed), so there are none.
        not_found: bool,
    },
}

fn is_not_found(e: &watcher::Error) -> bool {
    match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => s.code == 404,
        watcher::Error::WatchError(s) => s.code == 404,
        _ => false,
    }
}

fn signals<K, S>(kind: Kind, stream: S) -> futures::stream::BoxStream<'static, Signal>
where
    S: futures::Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
{
    use futures::StreamExt;
    stream
        .map(move |r| match r {
            Ok(watcher::Event::InitDone) => Signal::Event {
                kind,
                init_done: true,
            },
            Ok(_) => Signal::Event {
                kind,
                init_done: false,
            },
            Err(e) => Signal::Error {
                kind,
                not_found: is_not_found(&e),
                message: e.to_string(),
            },
        })
        .boxed()
}

/// Istio's PeerAuthentication resource.
pub fn peer_authentication_resource() -> ApiResource {
    ApiResource::from_gvk(&GroupVersionKind::gvk(
        "security.istio.io",
        "v1",
        "PeerAuthentication",
    ))
}

/// Istio's AuthorizationPolicy resource.
pub fn authorization_policy_resource() -> ApiResource {
    ApiResource::from_gvk(&GroupVersionKind::gvk(
        "security.istio.io",
        "v1",
        "AuthorizationPolicy",
    ))
}

/// Builds a Kubernetes client: from `kubeconfig` if given, else the usual inference (in-cluster
/// service account, then `$KUBECONFIG` / `~/.kube/config`).
pub async fn client(kubeconfig: Option<&std::path::Path>) -> Result<kube::Client, String> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| format!("kubeconfig {}: {e}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| format!("kubeconfig {}: {e}", path.display()))?
        }
        None => kube::Config::infer()
            .await
            .map_err(|e| format!("no Kubernetes configuration found: {e}"))?,
    };
    let mut config = config;
    // Tell winmesh apart in audit logs and API priority-and-fairness rules, as istiod does with
    // `pilot-discovery/<version>`.
    config.headers.push((
        axum::http::header::USER_AGENT,
        axum::http::HeaderValue::from_static(USER_AGENT),
    ));
    kube::Client::try_from(config).map_err(|e| format!("Kubernetes client: {e}"))
}

/// The User-Agent of every request to the Kubernetes API.
pub const USER_AGENT: &str = concat!("winmesh/", env!("CARGO_PKG_VERSION"));

/// Watches the cluster and publishes [`KubeState`]s, debounced like istiod (a quiet period, with an
/// upper bound under constant churn).
pub struct KubeSource {
    pub client: kube::Client,
    pub settings: MirrorSettings,
    pub debounce: Duration,
    pub debounce_max: Duration,
    pub metrics: Arc<Metrics>,
    /// Where the objects in service are persisted (`None`: not persisted).
    pub state_file: Option<std::path::PathBuf>,
    /// How long to wait for the API before serving persisted objects of kinds not listed yet.
    pub persisted_grace: Duration,
}

/// What is persisted: the objects of every kind the mirror serves (pods trimmed to what it reads).
#[derive(serde::Serialize, serde::Deserialize)]
struct PersistedFile {
    version: u32,
    saved: String,
    services: Vec<KService>,
    endpoint_slices: Vec<EndpointSlice>,
    pods: Vec<Pod>,
    peer_authentications: Vec<DynamicObject>,
    #[serde(default)]
    authorization_policies: Vec<DynamicObject>,
}

const PERSIST_VERSION: u32 = 1;
/// Persisting is rate-limited: at most one write per this interval (the latest state is written).
const PERSIST_EVERY: Duration = Duration::from_secs(2);

/// Reads persisted objects; a missing file is normal, a bad one is reported and ignored.
pub fn load_persisted(path: &std::path::Path) -> Result<Option<(SystemTime, KubeObjects)>, String> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let f: PersistedFile = serde_json::from_slice(&bytes)
        .map_err(|e| format!("{}: not a winmesh state file: {e}", path.display()))?;
    if f.version != PERSIST_VERSION {
        return Err(format!(
            "{}: state file version {} (this winmesh reads {PERSIST_VERSION})",
            path.display(),
            f.version
        ));
    }
    let saved = humantime::parse_rfc3339(&f.saved)
        .map_err(|e| format!("{}: saved: {e}", path.display()))?;
    Ok(Some((
        saved,
        KubeObjects {
            services: f.services.into_iter().map(Arc::new).collect(),
            endpoint_slices: f.endpoint_slices.into_iter().map(Arc::new).collect(),
            pods: f.pods.into_iter().map(Arc::new).collect(),
            peer_authentications: f.peer_authentications.into_iter().map(Arc::new).collect(),
            authorization_policies: f.authorization_policies.into_iter().map(Arc::new).collect(),
        },
    )))
}

/// Writes the objects atomically (a temporary file in the same directory, then a rename).
pub fn save_persisted(path: &std::path::Path, objects: &KubeObjects) -> Result<(), String> {
    let f = PersistedFile {
        version: PERSIST_VERSION,
        saved: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
        services: objects.services.iter().map(|o| (**o).clone()).collect(),
        endpoint_slices: objects
            .endpoint_slices
            .iter()
            .map(|o| (**o).clone())
            .collect(),
        pods: objects
            .pods
            .iter()
            .map(|o| trim_pod((**o).clone()))
            .collect(),
        peer_authentications: objects
            .peer_authentications
            .iter()
            .map(|o| (**o).clone())
            .collect(),
        authorization_policies: objects
            .authorization_policies
            .iter()
            .map(|o| (**o).clone())
            .collect(),
    };
    let bytes = serde_json::to_vec(&f).map_err(|e| e.to_string())?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, &bytes).map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))
}

/// Keeps only what the mirror reads from a pod (name, namespace, labels, service account, node,
/// host networking, phase and IPs), so the cache and the state file stay small.
pub fn trim_pod(p: Pod) -> Pod {
    use k8s_openapi::api::core::v1::{PodSpec, PodStatus};
    let spec = p.spec.map(|s| PodSpec {
        service_account_name: s.service_account_name,
        node_name: s.node_name,
        host_network: s.host_network,
        containers: vec![],
        ..Default::default()
    });
    let status = p.status.map(|s| PodStatus {
        phase: s.phase,
        pod_ip: s.pod_ip,
        pod_ips: s.pod_ips,
        // Readiness of the gateway pods decides which ones the mesh-facing slices list.
        conditions: s
            .conditions
            .map(|c| c.into_iter().filter(|c| c.type_ == "Ready").collect()),
        ..Default::default()
    });
    Pod {
        metadata: kube::core::ObjectMeta {
            name: p.metadata.name,
            namespace: p.metadata.namespace,
            // A terminating gateway pod leaves the mesh-facing slices (drain).
            deletion_timestamp: p.metadata.deletion_timestamp,
            labels: p.metadata.labels,
            resource_version: p.metadata.resource_version,
            uid: p.metadata.uid,
            ..Default::default()
        },
        spec,
        status,
    }
}

impl KubeSource {
    pub async fn run(self, tx: watch::Sender<KubeState>, mut shutdown: watch::Receiver<bool>) {
        use futures::StreamExt;
        use kube::runtime::WatchStreamExt;

        let cfg = watcher::Config::default();
        let (services, w) = reflector::store::<KService>();
        let s1 =
            reflector(w, watcher(Api::all(self.client.clone()), cfg.clone())).default_backoff();
        let (slices, w) = reflector::store::<EndpointSlice>();
        let s2 =
            reflector(w, watcher(Api::all(self.client.clone()), cfg.clone())).default_backoff();
        let (pods, w) = reflector::store::<Pod>();
        // Pods are trimmed before they are cached: the mirror reads a handful of fields.
        let s3 = reflector(
            w,
            watcher(Api::all(self.client.clone()), cfg.clone())
                .modify(|p: &mut Pod| *p = trim_pod(std::mem::take(p))),
        )
        .default_backoff();
        let ar = self.served_version(peer_authentication_resource()).await;
        let w = reflector::store::Writer::<DynamicObject>::new(ar.clone());
        let pas = w.as_reader();
        let s4 = reflector(
            w,
            watcher(
                Api::<DynamicObject>::all_with(self.client.clone(), &ar),
                cfg,
            ),
        )
        .default_backoff();
        let ar = self.served_version(authorization_policy_resource()).await;
        let w = reflector::store::Writer::<DynamicObject>::new(ar.clone());
        let aps = w.as_reader();
        let s5 = reflector(
            w,
            watcher(
                Api::<DynamicObject>::all_with(self.client.clone(), &ar),
                watcher::Config::default(),
            ),
        )
        .default_backoff();
        let mut events = futures::stream::select_all([
            signals(Kind::Services, s1),
            signals(Kind::EndpointSlices, s2),
            signals(Kind::Pods, s3),
            signals(Kind::PeerAuthentications, s4),
            signals(Kind::AuthorizationPolicies, s5),
        ]);

        // The objects in service before this process started, for kinds the API does not list.
        let persisted = match self.state_file.as_deref().map(load_persisted) {
            Some(Ok(p)) => p,
            Some(Err(e)) => {
                warn!(error = %e, "ignoring the persisted Kubernetes state");
                self.count_persist_error("read");
                None
            }
            None => None,
        };
        if let Some((saved, o)) = &persisted {
            info!(saved = %humantime::format_rfc3339_seconds(*saved),
                  services = o.services.len(), "persisted Kubernetes state found");
        }
        let mut persisted_since: Option<SystemTime> = None;
        // Until this deadline passes (or the API fails), persisted objects wait for the API to list.
        let mut grace = persisted
            .is_some()
            .then(|| Instant::now() + self.persisted_grace);

        let mut listed: BTreeSet<&'static str> = BTreeSet::new();
        let mut errors: BTreeMap<&'static str, String> = BTreeMap::new();
        // (first unpublished change, latest change)
        let mut pending: Option<(Instant, Instant)> = None;
        let mut last: Option<(KubeMesh, Option<Vec<&'static str>>)> = None;
        // Objects waiting to be persisted, and when the next write may happen.
        let mut unsaved: Option<KubeObjects> = None;
        let mut next_save = Instant::now();
        loop {
            let deadline = pending
                .map(|(first, latest)| (latest + self.debounce).min(first + self.debounce_max));
            let save_at = unsaved.as_ref().map(|_| next_save);
            tokio::select! {
                sig = events.next() => {
                    let Some(sig) = sig else { return };
                    let now = Instant::now();
                    match sig {
                        Signal::Event { kind, init_done } => {
                            self.metrics.inc(
                                "winmesh_kubernetes_events_total",
                                "Watch events from the Kubernetes API, by kind.",
                                &[("kind", kind.name())],
                                1.0,
                            );
                            if init_done {
                                listed.insert(kind.name());
                            }
                            if errors.remove(kind.name()).is_some() {
                                info!(kind = kind.name(), "Kubernetes watch recovered");
                                self.publish_errors(&tx, &errors);
                            }
                            touch(&mut pending, now);
                        }
                        Signal::Error { kind, message, not_found } => {
                            self.metrics.inc(
                                "winmesh_kubernetes_watch_errors_total",
                                "Failed Kubernetes list/watch calls, by kind (retried with backoff).",
                                &[("kind", kind.name())],
                                1.0,
                            );
                            if errors.get(kind.name()) != Some(&message) {
                                warn!(kind = kind.name(), error = %message,
                                    "Kubernetes watch failed; keeping the last good objects");
                                errors.insert(kind.name(), message);
                                self.publish_errors(&tx, &errors);
                            }
                            // Without Istio's CRDs there are no PeerAuthentications to wait for.
                            // Any other failure (403, 5xx, unreachable) says nothing about them:
                            // the last known ones (persisted) stay in service.
                            let known = persisted.is_some();
                            if kind.is_istio_crd()
                                && !listed.contains(kind.name())
                                && (not_found || !known)
                            {
                                listed.insert(kind.name());
                            }
                            if known {
                                grace = None;
                            }
                            touch(&mut pending, now);
                        }
                    }
                }
                _ = sleep_until(grace), if grace.is_some() => {
                    grace = None;
                    touch(&mut pending, Instant::now());
                }
                _ = sleep_until(save_at), if save_at.is_some() => {
                    if let Some(objects) = unsaved.take() {
                        self.persist(objects).await;
                        next_save = Instant::now() + PERSIST_EVERY;
                    }
                }
                _ = sleep_until(deadline), if deadline.is_some() => {
                    pending = None;
                    // Per kind: what the API listed, else (after the grace period) what was persisted.
                    let fallback = persisted.as_ref().filter(|_| grace.is_none()).map(|(_, o)| o);
                    let mut from_persisted: Vec<&'static str> = Vec::new();
                    let mut pick = |kind: Kind, live: bool| -> Option<bool> {
                        if live {
                            Some(true)
                        } else if fallback.is_some() {
                            from_persisted.push(kind.name());
                            Some(false)
                        } else {
                            None
                        }
                    };
                    let use_live: Option<Vec<bool>> = Kind::ALL
                        .iter()
                        .map(|k| pick(*k, listed.contains(k.name())))
                        .collect();
                    let Some(use_live) = use_live else {
                        continue;
                    };
                    let fb = fallback.cloned().unwrap_or_default();
                    let objects = KubeObjects {
                        services: if use_live[0] { services.state() } else { fb.services },
                        endpoint_slices: if use_live[1] { slices.state() } else { fb.endpoint_slices },
                        pods: if use_live[2] { pods.state() } else { fb.pods },
                        peer_authentications: if use_live[3] {
                            pas.state()
                        } else {
                            fb.peer_authentications
                        },
                        authorization_policies: if use_live[4] {
                            aps.state()
                        } else {
                            fb.authorization_policies
                        },
                    };
                    // The rebuild is CPU work (seconds at 10k services): off the async runtime,
                    // so xDS streams keep being served meanwhile.
                    let settings = self.settings.clone();
                    let Ok((objects, mesh)) = tokio::task::spawn_blocking(move || {
                        let mesh = build(&objects, &settings);
                        (objects, mesh)
                    })
                    .await
                    else {
                        warn!("Kubernetes model rebuild failed; keeping the last good model");
                        continue;
                    };
                    let persisted_kinds = (!from_persisted.is_empty()).then_some(from_persisted);
                    let key = (mesh, persisted_kinds);
                    if last.as_ref() == Some(&key) {
                        continue;
                    }
                    let (mesh, persisted_kinds) = key.clone();
                    self.report(&mesh);
                    let persisted_use = match (&persisted_kinds, &persisted) {
                        (Some(kinds), Some((saved, _))) => {
                            let since = *persisted_since.get_or_insert_with(SystemTime::now);
                            warn!(kinds = ?kinds, "serving persisted Kubernetes state");
                            Some(PersistedUse { saved: *saved, since, kinds: kinds.clone() })
                        }
                        _ => {
                            if persisted_since.take().is_some() {
                                info!("Kubernetes API listed every kind; persisted state no longer used");
                            }
                            None
                        }
                    };
                    self.metrics.set(
                        "winmesh_kubernetes_persisted_kinds",
                        "Kinds served from persisted state because the API has not listed them.",
                        &[],
                        persisted_use.as_ref().map_or(0.0, |p| p.kinds.len() as f64),
                    );
                    // Only what came from the API is news worth writing down.
                    if self.state_file.is_some() && use_live.iter().any(|l| *l) {
                        unsaved = Some(objects);
                    }
                    last = Some(key);
                    tx.send_modify(|st| {
                        st.mesh = Some(Arc::new(mesh));
                        st.persisted = persisted_use;
                        st.errors = errors.clone();
                        st.generation += 1;
                    });
                }
                _ = shutdown.changed() => {
                    if let Some(objects) = unsaved.take() {
                        self.persist(objects).await;
                    }
                    return;
                }
            }
        }
    }

    /// Istio serves its security CRDs as `v1` since 1.22 and as `v1beta1` before (and alongside):
    /// when the API answers 404 for `v1`, watch `v1beta1`, so an older Istio's AuthorizationPolicies
    /// are not silently missed (that would fail open). Any other answer keeps `v1` (its watch then
    /// reports what is wrong).
    async fn served_version(&self, v1: ApiResource) -> ApiResource {
        let probe = |ar: ApiResource| async move {
            Api::<DynamicObject>::all_with(self.client.clone(), &ar)
                .list(&kube::api::ListParams::default().limit(1))
                .await
        };
        match probe(v1.clone()).await {
            Err(kube::Error::Api(s)) if s.code == 404 => {
                let beta =
                    ApiResource::from_gvk(&GroupVersionKind::gvk(&v1.group, "v1beta1", &v1.kind));
                match probe(beta.clone()).await {
                    Ok(_) => {
                        info!(kind = %v1.kind, "security.istio.io/v1 is not served; watching v1beta1");
                        beta
                    }
                    Err(_) => v1,
                }
            }
            _ => v1,
        }
    }

    async fn persist(&self, objects: KubeObjects) {
        let Some(path) = self.state_file.clone() else {
            return;
        };
        let r = tokio::task::spawn_blocking(move || save_persisted(&path, &objects)).await;
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                warn!(error = %e, "cannot persist the Kubernetes state");
                self.count_persist_error("write");
            }
            Err(e) => {
                warn!(error = %e, "persist task failed");
                self.count_persist_error("write");
            }
        }
    }

    fn count_persist_error(&self, op: &str) {
        self.metrics.inc(
            "winmesh_kubernetes_persist_errors_total",
            "Failures reading or writing the persisted Kubernetes state.",
            &[("op", op)],
            1.0,
        );
    }

    fn publish_errors(
        &self,
        tx: &watch::Sender<KubeState>,
        errors: &BTreeMap<&'static str, String>,
    ) {
        self.metrics.set(
            "winmesh_kubernetes_watch_failing",
            "Number of Kubernetes kinds whose watch is currently failing.",
            &[],
            errors.len() as f64,
        );
        tx.send_modify(|st| {
            st.errors = errors.clone();
            st.generation += 1;
        });
    }

    fn report(&self, mesh: &KubeMesh) {
        self.metrics.set(
            "winmesh_kubernetes_objects_rejected",
            "Kubernetes objects that could not be mirrored.",
            &[],
            mesh.rejected.len() as f64,
        );
        for r in &mesh.rejected {
            warn!(kind = r.kind, object = %r.name, error = %r.message, "Kubernetes object skipped");
        }
        info!(
            services = mesh.services.len(),
            endpoints = mesh
                .services
                .iter()
                .map(|s| s.endpoints.len())
                .sum::<usize>(),
            peer_authentications = mesh.peer_authentications.len(),
            "Kubernetes mirror updated"
        );
    }
}

/// Records a change at `now` in the debounce window (first unpublished change, latest change).
fn touch(pending: &mut Option<(Instant, Instant)>, now: Instant) {
    *pending = Some(pending.map_or((now, now), |(first, _)| (first, now)));
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Combines the mesh file's state and the Kubernetes mirror into the state that is translated. Until
/// the mirror has listed everything once, nothing is published, unless `sync_timeout` passes first:
/// then the file's part is served alone (so a Kubernetes outage at startup does not also keep
/// Linux → Windows traffic down) and the wait shows as an error.
pub async fn combine(
    mut file: watch::Receiver<MeshState>,
    mut kube: watch::Receiver<KubeState>,
    tx: watch::Sender<MeshState>,
    sync_timeout: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let timeout = tokio::time::sleep(sync_timeout);
    tokio::pin!(timeout);
    let mut timed_out = false;
    let mut generation = 0;
    loop {
        {
            let f = file.borrow_and_update().clone();
            let k = kube.borrow_and_update().clone();
            let empty = KubeMesh::default();
            let kube_mesh = k.mesh.as_deref().or(timed_out.then_some(&empty));
            let mut errors: Vec<String> = f.error.into_iter().collect();
            errors.extend(
                k.errors
                    .iter()
                    .map(|(kind, e)| format!("kubernetes {kind}: {e}")),
            );
            if k.mesh.is_none() && timed_out {
                errors.push(format!(
                    "Kubernetes not synced after {}; serving the mesh file alone",
                    humantime::format_duration(sync_timeout)
                ));
            }
            if let (Some(fm), Some(km)) = (f.mesh.as_deref(), kube_mesh) {
                generation += 1;
                let mut rejected = f.rejected.clone();
                rejected.extend(km.rejected.iter().cloned());
                tx.send_replace(MeshState {
                    mesh: Some(Arc::new(merge(fm, km))),
                    rejected,
                    error: (!errors.is_empty()).then(|| errors.join("; ")),
                    persisted: k.persisted.as_ref().map(PersistedUse::describe),
                    updated: SystemTime::now(),
                    generation,
                });
            } else if !errors.is_empty() {
                tx.send_modify(|st| st.error = Some(errors.join("; ")));
            }
        }
        tokio::select! {
            r = file.changed() => if r.is_err() { return },
            r = kube.changed() => if r.is_err() { return },
            _ = &mut timeout, if !timed_out => timed_out = true,
            _ = shutdown.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> Arc<T> {
        Arc::new(serde_json::from_value(v).expect("valid object"))
    }

    fn objects() -> KubeObjects {
        KubeObjects {
            services: vec![
                obj(serde_json::json!({
                    "metadata": {"name": "reviews", "namespace": "bookinfo",
                        "annotations": {KUBE_SAS_ANNOTATION: "extra-sa, other",
                                        CANONICAL_SAS_ANNOTATION: "spiffe://x.td/ns/a/sa/b,gcp@iam"}},
                    "spec": {"ports": [
                        {"name": "http", "port": 9080, "targetPort": 9080},
                        {"name": "grpc-api", "port": 9090, "targetPort": "grpc"},
                        {"name": "web", "port": 80, "targetPort": 8080, "appProtocol": "kubernetes.io/h2c"},
                        {"name": "dns", "port": 53, "protocol": "UDP"}
                    ]}
                })),
                obj(serde_json::json!({
                    "metadata": {"name": "ext", "namespace": "bookinfo"},
                    "spec": {"type": "ExternalName", "externalName": "example.com"}
                })),
                obj(serde_json::json!({
                    "metadata": {"name": "udp-only", "namespace": "bookinfo"},
                    "spec": {"ports": [{"name": "dns", "port": 53, "protocol": "UDP"}]}
                })),
            ],
            endpoint_slices: vec![
                obj(serde_json::json!({
                    "metadata": {"name": "reviews-abc", "namespace": "bookinfo",
                                 "labels": {SERVICE_NAME_LABEL: "reviews"}},
                    "addressType": "IPv4",
                    "ports": [{"name": "http", "port": 9080}, {"name": "grpc-api", "port": 7070},
                              {"name": "web", "port": 8080}],
                    "endpoints": [
                        {"addresses": ["10.0.0.2"], "conditions": {"ready": true},
                         "targetRef": {"kind": "Pod", "name": "reviews-v1", "namespace": "bookinfo"}},
                        {"addresses": ["10.0.0.3"], "conditions": {"ready": false},
                         "targetRef": {"kind": "Pod", "name": "reviews-v2", "namespace": "bookinfo"}},
                        {"addresses": ["10.0.0.4"], "nodeName": "node-b"},
                        {"addresses": ["not-an-ip"]}
                    ]
                })),
                obj(serde_json::json!({
                    "metadata": {"name": "reviews-def", "namespace": "bookinfo",
                                 "labels": {SERVICE_NAME_LABEL: "reviews"}},
                    "addressType": "IPv4",
                    "ports": [{"name": "http", "port": 9080}],
                    "endpoints": [{"addresses": ["10.0.0.3"], "conditions": {"ready": true}}]
                })),
                obj(serde_json::json!({
                    "metadata": {"name": "reviews-fqdn", "namespace": "bookinfo",
                                 "labels": {SERVICE_NAME_LABEL: "reviews"}},
                    "addressType": "FQDN",
                    "endpoints": [{"addresses": ["reviews.example.com"]}]
                })),
            ],
            pods: vec![
                obj(serde_json::json!({
                    "metadata": {"name": "reviews-v1", "namespace": "bookinfo",
                                 "labels": {TLS_MODE_LABEL: "istio"}},
                    "spec": {"serviceAccountName": "bookinfo-reviews", "nodeName": "node-a",
                             "containers": []},
                    "status": {"podIP": "10.0.0.2"}
                })),
                obj(serde_json::json!({
                    "metadata": {"name": "reviews-v2", "namespace": "bookinfo"},
                    "spec": {"containers": []},
                    "status": {"podIPs": [{"ip": "10.0.0.3"}]}
                })),
                obj(serde_json::json!({
                    "metadata": {"name": "by-ip", "namespace": "bookinfo",
                                 "labels": {TLS_MODE_LABEL: "istio"}},
                    "spec": {"serviceAccountName": "found-by-ip", "containers": []},
                    "status": {"podIP": "10.0.0.4"}
                })),
            ],
            peer_authentications: vec![],
            authorization_policies: vec![],
        }
    }

    fn pa(ns: &str, name: &str, created: &str, spec: serde_json::Value) -> Arc<DynamicObject> {
        obj(serde_json::json!({
            "apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
            "metadata": {"name": name, "namespace": ns, "creationTimestamp": created},
            "spec": spec
        }))
    }

    #[test]
    fn persisted_state_round_trips_with_trimmed_pods() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sub/state.json");
        let mut o = objects();
        o.pods[0] = obj(serde_json::json!({
            "metadata": {"name": "reviews-v1", "namespace": "bookinfo",
                         "labels": {TLS_MODE_LABEL: "istio"},
                         "annotations": {"big": "x".repeat(10_000)}},
            "spec": {"serviceAccountName": "bookinfo-reviews", "nodeName": "node-a",
                     "containers": [{"name": "app", "image": "app:1"}]},
            "status": {"podIP": "10.0.0.2", "phase": "Running",
                       "conditions": [{"type": "Ready", "status": "True"}]}
        }));
        save_persisted(&path, &o).expect("save");
        let (saved, back) = load_persisted(&path).expect("load").expect("present");
        assert!(saved <= SystemTime::now());
        assert_eq!(
            build(&back, &MirrorSettings::new("cluster.local")),
            build(&o, &MirrorSettings::new("cluster.local")),
            "the mirror builds the same model from what was persisted"
        );
        let text = std::fs::read_to_string(&path).expect("read");
        assert!(
            !text.contains("xxxxxxxx") && !text.contains("app:1"),
            "pods trimmed"
        );
        // A missing file is normal; a corrupt one is an error (reported, then ignored).
        assert!(
            load_persisted(&dir.path().join("none.json"))
                .expect("ok")
                .is_none()
        );
        std::fs::write(&path, "{not json").expect("write");
        assert!(load_persisted(&path).is_err());
    }

    #[test]
    fn services_follow_istio_rules() {
        let m = build(&objects(), &MirrorSettings::new("cluster.local"));
        assert_eq!(m.services.len(), 1, "{:?}", m.services);
        let s = &m.services[0];
        assert_eq!(s.host, "reviews.bookinfo.svc.cluster.local");
        let ports: Vec<(&str, u16, Protocol, u16)> = s
            .ports
            .iter()
            .map(|p| (p.name.as_str(), p.port, p.protocol, p.target_port))
            .collect();
        assert_eq!(
            ports,
            [
                ("http", 9080, Protocol::Http, 9080),
                ("grpc-api", 9090, Protocol::Grpc, 9090),
                ("web", 80, Protocol::Http2, 8080),
            ],
            "UDP ports are left out; appProtocol wins over the name"
        );
        assert_eq!(
            s.extra_service_accounts,
            ["extra-sa", "other", "spiffe://x.td/ns/a/sa/b"]
        );
        assert_eq!(m.rejected.len(), 2, "{:?}", m.rejected);
        let ext = m
            .rejected
            .iter()
            .find(|r| r.name == "bookinfo/ext")
            .expect("ext");
        assert!(ext.message.contains("ExternalName"));
        // A bad address is reported (logged and counted with the other skipped objects).
        let bad = m
            .rejected
            .iter()
            .find(|r| r.kind == "kubernetes_endpoint")
            .expect("bad address reported");
        assert_eq!(bad.name, "bookinfo/reviews-abc");
        assert!(bad.message.contains("\"not-an-ip\""));
    }

    #[test]
    fn endpoints_take_identity_and_tls_mode_from_their_pods() {
        let m = build(&objects(), &MirrorSettings::new("cluster.local"));
        let eps = &m.services[0].endpoints;
        let addrs: Vec<String> = eps.iter().map(|e| e.address.to_string()).collect();
        assert_eq!(addrs, ["10.0.0.2", "10.0.0.3", "10.0.0.4"]);
        // By targetRef: account, node and the injection label.
        assert_eq!(eps[0].service_account.as_deref(), Some("bookinfo-reviews"));
        assert_eq!(eps[0].tls_mode, TlsMode::Istio);
        assert_eq!(eps[0].node.as_deref(), Some("node-a"));
        assert!(eps[0].ready);
        // Named targetPort resolved from the slice.
        assert_eq!(eps[0].ports.get("grpc-api"), Some(&7070));
        // No injection label: plaintext; no account set: `default`; listed twice, ready in one.
        assert_eq!(eps[1].tls_mode, TlsMode::Disabled);
        assert_eq!(eps[1].service_account.as_deref(), Some("default"));
        assert!(eps[1].ready);
        // No targetRef: found by IP in the namespace; the slice's node wins.
        assert_eq!(eps[2].service_account.as_deref(), Some("found-by-ip"));
        assert_eq!(eps[2].tls_mode, TlsMode::Istio);
        assert_eq!(eps[2].node.as_deref(), Some("node-b"));
        assert_eq!(
            m.services[0].expected_sans("cluster.local"),
            [
                "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews",
                "spiffe://cluster.local/ns/bookinfo/sa/default",
                "spiffe://cluster.local/ns/bookinfo/sa/extra-sa",
                "spiffe://cluster.local/ns/bookinfo/sa/found-by-ip",
                "spiffe://cluster.local/ns/bookinfo/sa/other",
                "spiffe://x.td/ns/a/sa/b",
            ]
        );
    }

    #[test]
    fn publish_not_ready_addresses_counts_every_address_as_ready() {
        // Without the second slice, 10.0.0.3 is listed only as not ready.
        let mut o = objects();
        o.endpoint_slices.remove(1);
        let before = build(&o, &MirrorSettings::new("cluster.local"));
        assert!(!before.services[0].endpoints[1].ready);
        let mut svc = (*o.services[0]).clone();
        if let Some(spec) = svc.spec.as_mut() {
            spec.publish_not_ready_addresses = Some(true);
        }
        o.services[0] = Arc::new(svc);
        let m = build(&o, &MirrorSettings::new("cluster.local"));
        assert!(m.services[0].endpoints.iter().all(|e| e.ready));
    }

    #[test]
    fn an_endpoint_without_a_pod_is_plaintext_and_anonymous() {
        let mut o = objects();
        o.pods.clear();
        let m = build(&o, &MirrorSettings::new("cluster.local"));
        for e in &m.services[0].endpoints {
            assert_eq!(e.tls_mode, TlsMode::Disabled);
            assert_eq!(e.service_account, None);
        }
    }

    /// istiod's EndpointSlice rules: the targetRef Pod's namespace gives the SAN, an unknown
    /// targetRef Pod leaves the endpoint out (until the Pod arrives), and a port the slice does not
    /// list has no endpoints.
    #[test]
    fn endpoints_follow_istiod_endpoint_slice_rules() {
        let svc = obj::<KService>(serde_json::json!({
            "metadata": {"name": "api", "namespace": "shop"},
            "spec": {"ports": [{"name": "http", "port": 80}, {"name": "grpc", "port": 90}]}
        }));
        let slice = |name: &str, ports: serde_json::Value, pod_ns: &str, pod: &str, ip: &str| {
            obj::<EndpointSlice>(serde_json::json!({
                "metadata": {"name": name, "namespace": "shop",
                             "labels": {SERVICE_NAME_LABEL: "api"}},
                "addressType": "IPv4",
                "ports": ports,
                "endpoints": [{"addresses": [ip],
                               "targetRef": {"kind": "Pod", "name": pod, "namespace": pod_ns}}]
            }))
        };
        let pod = |ns: &str, name: &str, ip: &str| {
            obj::<Pod>(serde_json::json!({
                "metadata": {"name": name, "namespace": ns,
                             "labels": {TLS_MODE_LABEL: "istio", "app": "api"}},
                "spec": {"serviceAccountName": "api-sa", "containers": []},
                "status": {"podIP": ip}
            }))
        };
        let o = KubeObjects {
            services: vec![svc],
            endpoint_slices: vec![
                slice(
                    "a",
                    serde_json::json!([{"name": "http", "port": 8080}]),
                    "other",
                    "p1",
                    "10.0.0.1",
                ),
                slice(
                    "b",
                    serde_json::json!([{"name": "http", "port": 8080}]),
                    "shop",
                    "not-yet",
                    "10.0.0.2",
                ),
                slice("c", serde_json::json!([]), "shop", "p3", "10.0.0.3"),
            ],
            pods: vec![
                pod("other", "p1", "10.0.0.1"),
                pod("shop", "p3", "10.0.0.3"),
            ],
            peer_authentications: vec![],
            authorization_policies: vec![],
        };
        let m = build(&o, &MirrorSettings::new("cluster.local"));
        let s = &m.services[0];
        let addrs: Vec<String> = s.endpoints.iter().map(|e| e.address.to_string()).collect();
        assert_eq!(
            addrs,
            ["10.0.0.1", "10.0.0.3"],
            "the Pod not known yet is left out"
        );
        assert_eq!(
            s.expected_sans("cluster.local"),
            [
                "spiffe://cluster.local/ns/other/sa/api-sa",
                "spiffe://cluster.local/ns/shop/sa/api-sa"
            ],
            "SecureNamingSAN(pod): the Pod's namespace, not the Service's"
        );
        let (http, grpc) = (&s.ports[0], &s.ports[1]);
        assert_eq!(s.endpoints[0].port_for(http), Some(8080));
        assert_eq!(
            s.endpoints[0].port_for(grpc),
            None,
            "port missing from the slice"
        );
        assert_eq!(
            s.endpoints[1].port_for(http),
            None,
            "`ports: []`: no port at all"
        );
        assert_eq!(
            s.endpoints[0].labels.get("app").map(String::as_str),
            Some("api")
        );
    }

    #[test]
    fn a_tcp_port_named_udp_is_left_out_like_the_mesh_file_does() {
        let svc = obj::<KService>(serde_json::json!({
            "metadata": {"name": "dns", "namespace": "kube"},
            "spec": {"ports": [{"name": "udp-dns", "port": 53, "protocol": "TCP"},
                               {"name": "http-metrics", "port": 9153}]}
        }));
        let o = KubeObjects {
            services: vec![svc],
            ..Default::default()
        };
        let m = build(&o, &MirrorSettings::new("cluster.local"));
        let ports: Vec<&str> = m.services[0]
            .ports
            .iter()
            .map(|p| p.name.as_str())
            .collect();
        assert_eq!(ports, ["http-metrics"]);
        assert_eq!(m.rejected.len(), 1);
        assert!(
            m.rejected[0].message.contains("UDP cannot be carried"),
            "{:?}",
            m.rejected
        );
        let settings = crate::discovery::file::FileSettings::for_tests();
        let (file, errs) = crate::discovery::file::parse(
            "services:\n  - {name: dns, namespace: kube, ports: [{name: udp-dns, port: 53}, {name: http-metrics, port: 9153}]}\n",
            &settings,
        )
        .expect("file");
        let ports: Vec<&str> = file.services[0]
            .ports
            .iter()
            .map(|p| p.name.as_str())
            .collect();
        assert_eq!(ports, ["http-metrics"], "one rule for both sources");
        assert!(errs[0].message.contains("UDP cannot be carried"));
    }

    #[test]
    fn workload_selector_peer_authentication_takes_precedence() {
        let mut o = objects();
        o.peer_authentications = vec![
            pa(
                "istio-system",
                "default",
                "2026-01-01T00:00:00Z",
                serde_json::json!({"mtls": {"mode": "STRICT"}}),
            ),
            pa(
                "bookinfo",
                "ns",
                "2026-01-01T00:00:00Z",
                serde_json::json!({"mtls": {"mode": "STRICT"}}),
            ),
            pa(
                "bookinfo",
                "legacy-v1",
                "2026-01-02T00:00:00Z",
                serde_json::json!({"selector": {"matchLabels": {TLS_MODE_LABEL: "istio"}},
                                  "mtls": {"mode": "UNSET"},
                                  "portLevelMtls": {"9080": {"mode": "DISABLE"}}}),
            ),
        ];
        let k = build(&o, &MirrorSettings::new("cluster.local"));
        let mesh = merge(
            &crate::discovery::file::parse("", &crate::discovery::file::FileSettings::for_tests())
                .expect("empty")
                .0,
            &k,
        );
        let svc = &mesh.services[0];
        let labelled = &svc.endpoints[0]; // reviews-v1, label tlsMode=istio
        let unlabelled = &svc.endpoints[1]; // reviews-v2, no labels
        // Workload port 9080 on the selected pod: the workload policy's port-level DISABLE wins.
        assert!(mesh.endpoint_gets_plaintext(svc, labelled, 9080));
        // Another port: the workload mode is UNSET → the namespace's STRICT.
        assert!(!mesh.endpoint_gets_plaintext(svc, labelled, 7070));
        // A pod the selector does not match: the namespace policy.
        assert!(!mesh.endpoint_gets_plaintext(svc, unlabelled, 9080));
    }

    #[test]
    fn peer_authentications_namespace_wide_oldest_first() {
        let mut o = objects();
        o.peer_authentications = vec![
            pa(
                "istio-system",
                "default",
                "2026-01-01T00:00:00Z",
                serde_json::json!({"mtls": {"mode": "STRICT"}}),
            ),
            pa(
                "legacy",
                "newer",
                "2026-03-01T00:00:00Z",
                serde_json::json!({"mtls": {"mode": "STRICT"}}),
            ),
            pa(
                "legacy",
                "older",
                "2026-02-01T00:00:00Z",
                serde_json::json!({"mtls": {"mode": "DISABLE"},
                    "portLevelMtls": {"8080": {"mode": "STRICT"}}}),
            ),
            pa(
                "legacy",
                "one-workload",
                "2026-01-01T00:00:00Z",
                serde_json::json!({"selector": {"matchLabels": {"app": "x"}},
                    "mtls": {"mode": "PERMISSIVE"}}),
            ),
            pa(
                "inherit",
                "empty",
                "2026-01-01T00:00:00Z",
                serde_json::json!({}),
            ),
            pa(
                "bad",
                "typo",
                "2026-01-01T00:00:00Z",
                serde_json::json!({"mtls": {"mode": "STRICTER"}}),
            ),
        ];
        let m = build(&o, &MirrorSettings::new("cluster.local"));
        let modes: Vec<(&str, MtlsMode)> = m
            .peer_authentications
            .iter()
            .map(|p| (p.namespace.as_str(), p.mode))
            .collect();
        assert_eq!(
            modes,
            [
                ("inherit", MtlsMode::Unset),
                ("istio-system", MtlsMode::Strict),
                ("legacy", MtlsMode::Permissive),
                ("legacy", MtlsMode::Disable),
            ],
            "the workload-selector policy is mirrored too (oldest first within a namespace)"
        );
        assert_eq!(
            m.peer_authentications[2]
                .selector
                .get("app")
                .map(String::as_str),
            Some("x")
        );
        assert!(
            m.peer_authentications
                .iter()
                .all(|p| p.port_modes.is_empty()),
            "portLevelMtls without a selector is ignored, as in Istio"
        );
        let rejected: BTreeMap<&str, &str> = m
            .rejected
            .iter()
            .filter(|e| e.kind == "kubernetes_peer_authentication")
            .map(|e| (e.name.as_str(), e.message.as_str()))
            .collect();
        assert_eq!(rejected.len(), 2, "{rejected:?}");
        assert!(rejected["legacy/newer"].contains("older"));
        assert!(rejected["bad/typo"].contains("STRICTER"));
    }

    #[test]
    fn the_file_wins_where_both_speak() {
        let settings = crate::discovery::file::FileSettings::for_tests();
        let (file, errs) = crate::discovery::file::parse(
            "services:
  - name: reviews
    namespace: bookinfo
    ports: [{name: http, port: 9080}]
    endpoints: [{address: 10.9.9.9}]
windows_services:
  - {name: winapp, namespace: win, ports: [{name: http, port: 80}], backends: [10.1.1.1]}
peer_authentications:
  - {namespace: legacy, mode: STRICT}
",
            &settings,
        )
        .expect("mesh file");
        assert!(errs.is_empty(), "{errs:?}");
        let mut o = objects();
        o.services.push(obj(serde_json::json!({
            "metadata": {"name": "winapp", "namespace": "win"},
            "spec": {"ports": [{"name": "http", "port": 80}]}
        })));
        o.services.push(obj(serde_json::json!({
            "metadata": {"name": "ratings", "namespace": "bookinfo"},
            "spec": {"ports": [{"name": "http", "port": 9080}]}
        })));
        o.peer_authentications = vec![
            pa(
                "legacy",
                "p",
                "2026-01-01T00:00:00Z",
                serde_json::json!({"mtls": {"mode": "DISABLE"}}),
            ),
            pa(
                "other",
                "p",
                "2026-01-01T00:00:00Z",
                serde_json::json!({"mtls": {"mode": "DISABLE"}}),
            ),
        ];
        let kube = build(&o, &MirrorSettings::new("cluster.local"));
        let mesh = merge(&file, &kube);
        let hosts: Vec<&str> = mesh.services.iter().map(|s| s.host.as_str()).collect();
        assert_eq!(
            hosts,
            [
                "reviews.bookinfo.svc.cluster.local",
                "ratings.bookinfo.svc.cluster.local"
            ],
            "the file's reviews wins; the gateway-facing winapp Service is not mirrored"
        );
        assert_eq!(
            mesh.services[0].endpoints[0].address.to_string(),
            "10.9.9.9"
        );
        assert!(!mesh.client_sends_plaintext("legacy", 80));
        assert!(mesh.client_sends_plaintext("other", 80));
    }
}
