//! The mesh as plain data: Linux mesh services and their endpoints (as Istio sees them), Windows
//! services exposed through the gateway, PeerAuthentication and AuthorizationPolicy. No kube, no
//! protobuf, no tokio: discovery sources (the mesh file and the Kubernetes mirror) produce a [`Mesh`], and
//! `translate` turns it into Envoy resources.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::Serialize;

use crate::identity::SpiffeId;

/// A service port's protocol, by Istio's rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    Http,
    Http2,
    Grpc,
    GrpcWeb,
    Tcp,
    Tls,
    Https,
    Mongo,
    Redis,
    Mysql,
    Udp,
    /// Not declared: Istio sniffs it; winmesh treats it as HTTP/1.1 when it arrives over HTTP and as
    /// TCP on a local TCP port.
    Unsupported,
}

impl Protocol {
    /// Istio's rule: `appProtocol` first (`kubernetes.io/h2c` → HTTP2), else the port name's prefix
    /// before the first `-`.
    pub fn detect(port_name: &str, app_protocol: Option<&str>) -> Protocol {
        if let Some(ap) = app_protocol {
            match ap.to_ascii_lowercase().as_str() {
                "kubernetes.io/h2c" => return Protocol::Http2,
                "kubernetes.io/ws" | "kubernetes.io/wss" => return Protocol::Http,
                other => {
                    let p = Self::from_name(other);
                    if p != Protocol::Unsupported {
                        return p;
                    }
                }
            }
        }
        let prefix = port_name.split('-').next().unwrap_or("");
        Self::from_name(&prefix.to_ascii_lowercase())
    }

    fn from_name(s: &str) -> Protocol {
        match s {
            "http" => Protocol::Http,
            "http2" => Protocol::Http2,
            "grpc" => Protocol::Grpc,
            "grpc-web" => Protocol::GrpcWeb,
            "tcp" => Protocol::Tcp,
            "tls" => Protocol::Tls,
            "https" => Protocol::Https,
            "mongo" => Protocol::Mongo,
            "redis" => Protocol::Redis,
            "mysql" => Protocol::Mysql,
            "udp" => Protocol::Udp,
            _ => Protocol::Unsupported,
        }
    }

    pub fn is_http(self) -> bool {
        matches!(
            self,
            Protocol::Http | Protocol::Http2 | Protocol::Grpc | Protocol::GrpcWeb
        )
    }

    /// Upstream speaks HTTP/2 (h2c inside the node, `h2` ALPN over mTLS).
    pub fn is_http2(self) -> bool {
        matches!(self, Protocol::Http2 | Protocol::Grpc)
    }

    pub fn is_tcp(self) -> bool {
        matches!(
            self,
            Protocol::Tcp
                | Protocol::Tls
                | Protocol::Https
                | Protocol::Mongo
                | Protocol::Redis
                | Protocol::Mysql
        )
    }

    /// The fixed ALPN a stock Envoy offers to an Istio sidecar for this protocol (Istio's client picks it
    /// per request with a filter stock Envoy lacks). Never `istio-peer-exchange`.
    pub fn istio_client_alpn(self) -> &'static [&'static str] {
        if self.is_http2() {
            &["istio-h2", "istio", "h2"]
        } else if self.is_tcp() {
            &["istio"]
        } else {
            &["istio-http/1.1", "istio", "http/1.1"]
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServicePort {
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
    /// Port on the endpoints (Kubernetes targetPort); defaults to `port`.
    pub target_port: u16,
    /// Optional loopback TCP port on the gateway that forwards to this port (TCP services, or any
    /// service a Windows app wants to reach without an HTTP proxy).
    pub local_port: Option<u16>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// The endpoint runs an Istio sidecar (label `security.istio.io/tlsMode: istio`).
    Istio,
    /// No sidecar: plaintext.
    Disabled,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Endpoint {
    pub address: IpAddr,
    /// Port per service port name; missing names use the port's `target_port` (unless
    /// `listed_ports_only`).
    pub ports: BTreeMap<String, u16>,
    pub service_account: Option<String>,
    /// Namespace of the workload behind the endpoint when it is not the service's (a `targetRef` to
    /// a pod in another namespace): its SAN and PeerAuthentication are the pod's, as in istiod
    /// (`SecureNamingSAN(pod)`).
    pub namespace: Option<String>,
    /// The workload's labels (for workload-selector PeerAuthentication).
    pub labels: BTreeMap<String, String>,
    pub tls_mode: TlsMode,
    pub node: Option<String>,
    pub ready: bool,
    /// The endpoint serves only the ports named in `ports` (an EndpointSlice lists the ports its
    /// endpoints have; istiod builds no endpoint for a port the slice lacks).
    pub listed_ports_only: bool,
    /// Not ready because it is terminating, but still serving (EndpointSlice conditions
    /// `terminating` and `serving`): a last resort for the gateway's Windows backends, as kube-proxy
    /// uses such endpoints when no ready one is left.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub terminating_serving: bool,
}

impl Endpoint {
    /// The endpoint's port for a service port, or `None` if it does not serve that port.
    pub fn port_for(&self, p: &ServicePort) -> Option<u16> {
        match self.ports.get(&p.name) {
            Some(port) => Some(*port),
            None if self.listed_ports_only => None,
            None => Some(p.target_port),
        }
    }
}

/// A mesh service (typically on Linux, behind Istio sidecars).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Service {
    pub name: String,
    pub namespace: String,
    /// `<name>.<namespace>.svc.<domain>`.
    pub host: String,
    pub ports: Vec<ServicePort>,
    /// Service accounts named on the Service (Istio's `alpha.istio.io/kubernetes-serviceaccounts` and
    /// `canonical-serviceaccounts` annotations), in addition to the endpoints' accounts.
    pub extra_service_accounts: Vec<String>,
    pub endpoints: Vec<Endpoint>,
}

impl Service {
    /// SPIFFE IDs a client must accept from this service's endpoints (Istio's SAN list).
    pub fn expected_sans(&self, trust_domain: &str) -> Vec<String> {
        let qualify = |ns: &str, sa: &str| {
            if sa.starts_with("spiffe://") {
                sa.to_string()
            } else {
                format!("spiffe://{trust_domain}/ns/{ns}/sa/{sa}")
            }
        };
        let mut v: Vec<String> = self
            .endpoints
            .iter()
            .filter_map(|e| {
                let ns = e.namespace.as_deref().unwrap_or(&self.namespace);
                e.service_account.as_deref().map(|sa| qualify(ns, sa))
            })
            .chain(
                self.extra_service_accounts
                    .iter()
                    .map(|sa| qualify(&self.namespace, sa)),
            )
            .collect();
        v.sort();
        v.dedup();
        v
    }
}

/// A port a Windows service is reachable on from the mesh.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct WindowsPort {
    pub name: String,
    /// The service port Linux clients use (it appears in their SNI).
    pub port: u16,
    pub protocol: Protocol,
    /// The gateway listener port (the Kubernetes targetPort pointing at the gateway); defaults to `port`.
    pub gateway_port: u16,
    /// The Windows app's port on its backends; defaults to `port`.
    pub target_port: u16,
}

/// One Windows pod (or address) behind a Windows service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct WindowsBackend {
    pub address: IpAddr,
    /// The app's port per service port name (resolved named target ports, from the app Service's
    /// EndpointSlices); a missing name uses the port's `target_port`.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub ports: BTreeMap<String, u16>,
    /// On another node: used only when no backend on this node is healthy (Envoy priority 1), and
    /// only when the service allows crossing nodes.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub remote: bool,
}

impl WindowsBackend {
    pub fn local(address: IpAddr) -> WindowsBackend {
        WindowsBackend {
            address,
            ports: BTreeMap::new(),
            remote: false,
        }
    }

    pub fn port_for(&self, p: &WindowsPort) -> u16 {
        self.ports.get(&p.name).copied().unwrap_or(p.target_port)
    }
}

/// Where a Windows service came from, when not from the mesh file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct WindowsOrigin {
    /// The opted-in app Service (`namespace/name`) whose EndpointSlices give the backends.
    pub app_service: String,
    /// Labels of the app's pods (AuthorizationPolicy `selector`s match them).
    pub pod_labels: Vec<BTreeMap<String, String>>,
    /// Addresses of the app's pods on this node: their calls into the mesh leave with the
    /// service's identity (matched by source address on the shared outbound listener).
    pub local_pod_ips: Vec<IpAddr>,
    /// Nodes with a ready pod of the app (the mesh-facing EndpointSlice lists their gateways).
    pub ready_nodes: Vec<String>,
    /// Every service account of the app's pods (listed on the mesh-facing Service, as istiod's
    /// `alpha.istio.io/kubernetes-serviceaccounts`, so clients accept each).
    pub service_accounts: Vec<String>,
    /// Other nodes' pods may be used as failover.
    pub cross_node: bool,
    /// Why the service has no usable backend, if so (shown in `/debug/registryz`; the gateway
    /// answers 503 for it meanwhile).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
}

/// A Windows service exposed to the mesh through the gateway.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct WindowsService {
    pub name: String,
    pub namespace: String,
    /// The mesh-facing host name Linux clients use.
    pub host: String,
    pub ports: Vec<WindowsPort>,
    /// Windows backends (plain HTTP/TCP inside the node).
    pub backends: Vec<WindowsBackend>,
    /// Identity the gateway presents for this service; `None` = the gateway's own (`default`).
    pub identity: Option<SpiffeId>,
    /// A Windows-facing HTTP proxy port for this Windows app's own calls into the mesh: requests on it
    /// leave with this service's `identity` instead of the gateway's, so Linux AuthorizationPolicies
    /// can tell Windows apps apart.
    pub outbound_port: Option<u16>,
    /// Set for services mirrored from Kubernetes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub origin: Option<WindowsOrigin>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum MtlsMode {
    /// Inherit from the parent: a port from its namespace, a namespace from the mesh-wide policy.
    Unset,
    Strict,
    Permissive,
    Disable,
}

/// PeerAuthentication for a namespace (optionally per workload port). A policy in the mesh's root
/// namespace (Istio's `rootNamespace`, default `istio-system`) is the mesh-wide default.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PeerAuthentication {
    pub namespace: String,
    /// `selector.matchLabels`: empty = namespace-wide (or mesh-wide in the root namespace).
    pub selector: BTreeMap<String, String>,
    pub mode: MtlsMode,
    /// Keyed by the workload's (endpoint's) port, as Istio's `portLevelMtls` is.
    pub port_modes: BTreeMap<u16, MtlsMode>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Action {
    Allow,
    Deny,
    /// Istio logs matching requests and changes nothing about access.
    Audit,
    /// Delegates to an extension provider (ext_authz). winmesh has none, so, as istiod does when the
    /// provider is missing, the rules are enforced as DENY.
    Custom,
}

/// `from.source`: who the caller is. Principals are SPIFFE IDs without `spiffe://`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Source {
    pub principals: Vec<String>,
    pub not_principals: Vec<String>,
    pub request_principals: Vec<String>,
    pub not_request_principals: Vec<String>,
    pub namespaces: Vec<String>,
    pub not_namespaces: Vec<String>,
    /// The caller's address as the gateway sees it (CIDR or IP).
    pub ip_blocks: Vec<String>,
    pub not_ip_blocks: Vec<String>,
    /// The original client address (X-Forwarded-For / proxy protocol).
    pub remote_ip_blocks: Vec<String>,
    pub not_remote_ip_blocks: Vec<String>,
}

/// `to.operation`: what is asked for.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Operation {
    pub hosts: Vec<String>,
    pub not_hosts: Vec<String>,
    pub methods: Vec<String>,
    pub not_methods: Vec<String>,
    pub paths: Vec<String>,
    pub not_paths: Vec<String>,
    pub ports: Vec<u16>,
    pub not_ports: Vec<u16>,
}

impl Operation {
    pub fn has_http_fields(&self) -> bool {
        !(self.methods.is_empty()
            && self.not_methods.is_empty()
            && self.paths.is_empty()
            && self.not_paths.is_empty()
            && self.hosts.is_empty()
            && self.not_hosts.is_empty())
    }
}

/// A `when` condition: an Istio attribute (`request.headers[x-id]`, `source.ip`, ...) and values.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Condition {
    pub key: String,
    pub values: Vec<String>,
    pub not_values: Vec<String>,
}

/// A rule matches when any `from` source, any `to` operation and every `when` condition match
/// (an empty list = any).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Rule {
    pub from: Vec<Source>,
    pub to: Vec<Operation>,
    pub when: Vec<Condition>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AuthorizationPolicy {
    pub name: String,
    pub namespace: String,
    /// Windows service names in `namespace` it applies to; empty = every Windows service there
    /// (unless `selector` or `target_services` says otherwise).
    pub services: Vec<String>,
    /// A Kubernetes policy's `selector.matchLabels`: it applies to a Windows service when it
    /// matches the labels of any of the service's pods (applying a policy to more of a service
    /// than Istio would never widens access: an ALLOW restricts, a DENY denies).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub selector: Option<BTreeMap<String, String>>,
    /// A Kubernetes policy's `targetRefs` to Services (`namespace/name`): the app Services (or the
    /// mesh-facing Services) of the Windows services it applies to.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub target_services: Vec<String>,
    pub action: Action,
    /// `provider.name` of a CUSTOM policy.
    pub provider: Option<String>,
    pub rules: Vec<Rule>,
}

impl AuthorizationPolicy {
    /// Whether the policy selects `svc` (its namespace is checked by [`Mesh::policies_for`]).
    pub fn applies_to(&self, svc: &WindowsService) -> bool {
        if !self.target_services.is_empty() {
            let mesh_name = format!("{}/{}", svc.namespace, svc.name);
            return self.target_services.iter().any(|t| {
                *t == mesh_name || svc.origin.as_ref().is_some_and(|o| o.app_service == *t)
            });
        }
        if let Some(sel) = &self.selector {
            let labels = svc.origin.as_ref().map(|o| o.pod_labels.as_slice());
            return labels
                .unwrap_or(&[])
                .iter()
                .any(|l| sel.iter().all(|(k, v)| l.get(k) == Some(v)));
        }
        self.services.is_empty() || self.services.contains(&svc.name)
    }
}

/// Gateway listener addresses.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct GatewaySettings {
    /// Address the mesh-facing (inbound) listeners bind.
    pub inbound_address: IpAddr,
    /// Address of the Windows-facing listeners (HTTP proxy and local TCP ports).
    pub outbound_address: IpAddr,
    /// Port of the Windows-facing HTTP listener.
    pub outbound_port: u16,
    /// On the shared outbound port, refuse callers whose source address is no known Windows pod
    /// (instead of letting them call as the gateway).
    pub refuse_unknown_callers: bool,
}

impl GatewaySettings {
    /// Whether a port used on both the mesh-facing and the Windows-facing address would clash
    /// (same address, or either is a wildcard).
    pub fn addresses_overlap(&self) -> bool {
        self.inbound_address == self.outbound_address
            || self.inbound_address.is_unspecified()
            || self.outbound_address.is_unspecified()
    }
}

/// The whole mesh as winmesh serves it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Mesh {
    pub trust_domain: String,
    /// Istio's root namespace: a PeerAuthentication there applies mesh-wide.
    pub root_namespace: String,
    pub gateway: GatewaySettings,
    pub services: Vec<Service>,
    pub windows_services: Vec<WindowsService>,
    pub peer_authentications: Vec<PeerAuthentication>,
    pub authorization_policies: Vec<AuthorizationPolicy>,
}

impl Mesh {
    /// A mesh with nothing in it (trust domain `cluster.local`, root namespace `istio-system`).
    pub fn empty_for_tests() -> Mesh {
        Mesh {
            trust_domain: "cluster.local".into(),
            root_namespace: "istio-system".into(),
            gateway: GatewaySettings {
                inbound_address: IpAddr::from([127, 0, 0, 1]),
                outbound_address: IpAddr::from([127, 0, 0, 1]),
                outbound_port: 15001,
                refuse_unknown_callers: false,
            },
            services: vec![],
            windows_services: vec![],
            peer_authentications: vec![],
            authorization_policies: vec![],
        }
    }

    /// The effective PeerAuthentication mode of a workload in `namespace` listening on `port` (its
    /// endpoint port), for a workload without labels. See [`Mesh::effective_mtls_for`].
    pub fn effective_mtls(&self, namespace: &str, port: u16) -> MtlsMode {
        self.effective_mtls_for(namespace, &BTreeMap::new(), port)
    }

    /// Istio's precedence (`pilot/pkg/security/authn/policy_applier.go`, `ComposePeerAuthentication`):
    /// the oldest workload-selector policy in the workload's namespace whose `matchLabels` match its
    /// labels, with its port-level mode for the workload port first; then the namespace-wide policy
    /// (a mesh-file namespace policy may also carry port-level modes); then the mesh-wide policy in
    /// the root namespace. `UNSET` defers to the next; nothing set means PERMISSIVE.
    pub fn effective_mtls_for(
        &self,
        namespace: &str,
        labels: &BTreeMap<String, String>,
        port: u16,
    ) -> MtlsMode {
        let set = |m: MtlsMode| (m != MtlsMode::Unset).then_some(m);
        let with_port = |p: &PeerAuthentication| {
            p.port_modes
                .get(&port)
                .copied()
                .and_then(set)
                .or_else(|| set(p.mode))
        };
        let workload = self
            .peer_authentications
            .iter()
            .find(|p| {
                p.namespace == namespace
                    && !p.selector.is_empty()
                    && p.selector.iter().all(|(k, v)| labels.get(k) == Some(v))
            })
            .and_then(with_port);
        let wide = |ns: &str| {
            self.peer_authentications
                .iter()
                .find(|p| p.namespace == ns && p.selector.is_empty())
        };
        workload
            .or_else(|| wide(namespace).and_then(with_port))
            .or_else(|| wide(&self.root_namespace).and_then(|p| set(p.mode)))
            .unwrap_or(MtlsMode::Permissive)
    }

    /// Whether an Istio client sends plaintext to a workload in `namespace` on endpoint `port`: only an
    /// effective DISABLE does; STRICT and PERMISSIVE leave it to the endpoint's tlsMode.
    pub fn client_sends_plaintext(&self, namespace: &str, port: u16) -> bool {
        self.effective_mtls(namespace, port) == MtlsMode::Disable
    }

    /// The same for one endpoint of `svc`: its own namespace and labels decide.
    pub fn endpoint_gets_plaintext(&self, svc: &Service, e: &Endpoint, port: u16) -> bool {
        let ns = e.namespace.as_deref().unwrap_or(&svc.namespace);
        self.effective_mtls_for(ns, &e.labels, port) == MtlsMode::Disable
    }

    /// Policies that apply to a Windows service: those of its namespace, and, as in Istio, those of
    /// the root namespace, which apply mesh-wide (their `services` then name services in any
    /// namespace).
    pub fn policies_for<'a>(
        &'a self,
        svc: &'a WindowsService,
    ) -> impl Iterator<Item = &'a AuthorizationPolicy> + 'a {
        self.authorization_policies.iter().filter(move |p| {
            (p.namespace == svc.namespace || p.namespace == self.root_namespace)
                && p.applies_to(svc)
        })
    }

    /// Identities the gateway must hold certificates for (besides its own).
    pub fn identities(&self) -> Vec<SpiffeId> {
        let mut v: Vec<SpiffeId> = self
            .windows_services
            .iter()
            .filter_map(|w| w.identity.clone())
            .collect();
        v.sort();
        v.dedup();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol_by_istio_rules() {
        assert_eq!(Protocol::detect("http", None), Protocol::Http);
        assert_eq!(Protocol::detect("http-web", None), Protocol::Http);
        assert_eq!(Protocol::detect("grpc-api", None), Protocol::Grpc);
        assert_eq!(
            Protocol::detect("grpc-web", None),
            Protocol::Grpc,
            "prefix before the first '-'"
        );
        assert_eq!(Protocol::detect("tcp-db", None), Protocol::Tcp);
        assert_eq!(Protocol::detect("web", None), Protocol::Unsupported);
        assert_eq!(Protocol::detect("HTTP2", None), Protocol::Http2);
        assert_eq!(
            Protocol::detect("web", Some("kubernetes.io/h2c")),
            Protocol::Http2
        );
        assert_eq!(
            Protocol::detect("tcp", Some("http")),
            Protocol::Http,
            "appProtocol wins"
        );
        assert_eq!(
            Protocol::detect("http", Some("grpc-web")),
            Protocol::GrpcWeb
        );
        assert_eq!(
            Protocol::detect("http", Some("custom.io/thing")),
            Protocol::Http
        );
    }

    #[test]
    fn fixed_alpn_per_protocol_never_offers_peer_exchange() {
        assert_eq!(
            Protocol::Http.istio_client_alpn(),
            ["istio-http/1.1", "istio", "http/1.1"]
        );
        assert_eq!(
            Protocol::Grpc.istio_client_alpn(),
            ["istio-h2", "istio", "h2"]
        );
        assert_eq!(
            Protocol::Http2.istio_client_alpn(),
            ["istio-h2", "istio", "h2"]
        );
        assert_eq!(Protocol::Tcp.istio_client_alpn(), ["istio"]);
        assert_eq!(
            Protocol::Unsupported.istio_client_alpn(),
            ["istio-http/1.1", "istio", "http/1.1"]
        );
        for p in [
            Protocol::Http,
            Protocol::Grpc,
            Protocol::Tcp,
            Protocol::Mysql,
            Protocol::Unsupported,
        ] {
            assert!(!p.istio_client_alpn().contains(&"istio-peer-exchange"));
        }
    }

    #[test]
    fn expected_sans_combine_endpoints_and_annotations() {
        let ep = |sa: &str| Endpoint {
            address: "10.0.0.1".parse().unwrap(),
            ports: Default::default(),
            service_account: Some(sa.into()),
            namespace: None,
            labels: Default::default(),
            tls_mode: TlsMode::Istio,
            node: None,
            ready: true,
            listed_ports_only: false,
            terminating_serving: false,
        };
        let s = Service {
            name: "r".into(),
            namespace: "default".into(),
            host: "r.default.svc.cluster.local".into(),
            ports: vec![],
            extra_service_accounts: vec!["spiffe://cluster.local/ns/other/sa/x".into(), "b".into()],
            endpoints: vec![ep("a"), ep("b"), ep("a")],
        };
        assert_eq!(
            s.expected_sans("cluster.local"),
            vec![
                "spiffe://cluster.local/ns/default/sa/a",
                "spiffe://cluster.local/ns/default/sa/b",
                "spiffe://cluster.local/ns/other/sa/x"
            ]
        );
    }
}
