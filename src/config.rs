//! The config file: YAML → validated [`Config`]. This is the one place that validates configuration;
//! every error names the offending field (and the line, where the parser knows it), and the CLI exits
//! with code 2 on any of them, so a broken file never starts a half-configured server.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Top-level config file.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Identity of the gateway Envoy as it appears in xDS (`node.id`, `node.cluster`).
    pub node: NodeConfig,
    /// The ADS/SDS gRPC server the local Envoy connects to.
    pub xds: XdsConfig,
    /// The read-only debug HTTP server.
    pub debug: DebugConfig,
    /// Settings used when generating the Envoy bootstrap.
    pub envoy: EnvoyConfig,
    /// The gateway's workload identity and any additional identities it presents.
    pub identity: IdentityConfig,
    /// Where certificates come from: `dev` (embedded CA) or `istiod`. Absent: no certificates.
    #[serde(deserialize_with = "de_ca", default)]
    pub ca: Option<CaConfig>,
    /// Where the mesh model comes from.
    pub mesh: MeshConfig,
    /// The gateway's listeners.
    pub gateway: GatewayConfig,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MeshConfig {
    /// Mesh file (docs/mesh-file.md), watched and reloaded on change. Relative to this config file.
    pub file: Option<PathBuf>,
    /// Safety-net poll of the mesh file's metadata (changes are normally noticed at once through OS
    /// file notifications).
    #[serde(with = "duration_str")]
    pub poll_interval: Duration,
    /// How long the mesh file must be unchanged before it is read, so a file still being written is
    /// never applied half-way.
    #[serde(with = "duration_str")]
    pub settle: Duration,
    /// Kubernetes cluster domain (`<name>.<ns>.svc.<domain_suffix>`).
    pub domain_suffix: String,
    /// Istio's root namespace (MeshConfig `rootNamespace`): a PeerAuthentication there is mesh-wide.
    pub root_namespace: String,
    /// Mirror the Linux side of the mesh from the Kubernetes API (docs/kubernetes.md).
    pub kubernetes: KubernetesConfig,
    /// TLS of the gateway's mesh-facing ports, as MeshConfig `meshMTLS` sets it for sidecars.
    pub mtls: MeshMtls,
}

/// The six cipher suites an Istio sidecar accepts for TLS 1.2 on inbound mTLS when MeshConfig
/// `meshMTLS.cipherSuites` is unset (istio/istio `pilot/pkg/security/authn/utils/utils.go`,
/// `SupportedCiphers`). TLS 1.3 suites are not configurable in Envoy.
pub const ISTIO_DEFAULT_CIPHER_SUITES: [&str; 6] = [
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES128-GCM-SHA256",
    "AES256-GCM-SHA384",
    "AES128-GCM-SHA256",
];

/// The equivalent of MeshConfig `meshMTLS` for the gateway's mesh-facing ports.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MeshMtls {
    /// `TLSV1_2` (Istio's default) or `TLSV1_3`.
    pub min_protocol_version: TlsVersion,
    /// TLS 1.2 cipher suites; default Istio's six.
    pub cipher_suites: Vec<String>,
    /// ECDH curves; empty = Envoy's default (Istio sets none; see docs/security.md).
    pub ecdh_curves: Vec<String>,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
pub enum TlsVersion {
    #[serde(rename = "TLSV1_2")]
    Tls12,
    #[serde(rename = "TLSV1_3")]
    Tls13,
}

impl Default for MeshMtls {
    fn default() -> Self {
        MeshMtls {
            min_protocol_version: TlsVersion::Tls12,
            cipher_suites: ISTIO_DEFAULT_CIPHER_SUITES
                .iter()
                .map(|s| s.to_string())
                .collect(),
            ecdh_curves: vec![],
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct KubernetesConfig {
    /// Watch Services, EndpointSlices, Pods and PeerAuthentications and mirror them into the mesh.
    pub enabled: bool,
    /// Kubeconfig to use (relative to this config file); default: the pod's service account, then
    /// `$KUBECONFIG` / `~/.kube/config`.
    pub kubeconfig: Option<PathBuf>,
    /// Quiet period after a change before the mirror is rebuilt (istiod uses 100ms).
    #[serde(with = "duration_str")]
    pub debounce: Duration,
    /// Longest a rebuild waits under constant churn.
    #[serde(with = "duration_str")]
    pub debounce_max: Duration,
    /// How long to wait for the first complete listing before serving the mesh file alone (only
    /// when no persisted state exists).
    #[serde(with = "duration_str")]
    pub sync_timeout: Duration,
    /// Where the last complete mirrored objects are persisted (relative to this config file), so a
    /// restart during an API outage serves them instead of less. Empty string: do not persist.
    pub state_file: Option<PathBuf>,
    /// Windows services from opted-in Kubernetes Services (docs/kubernetes.md).
    pub windows: KubeWindowsConfig,
}

impl Default for KubernetesConfig {
    fn default() -> Self {
        KubernetesConfig {
            enabled: false,
            kubeconfig: None,
            debounce: Duration::from_millis(100),
            debounce_max: Duration::from_secs(1),
            sync_timeout: Duration::from_secs(30),
            state_file: Some(PathBuf::from(".state/kubernetes-mirror.json")),
            windows: KubeWindowsConfig::default(),
        }
    }
}

/// What a caller whose source address is no known Windows pod gets on the shared outbound port.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum UnknownCallers {
    /// The gateway's own identity (the only choice without pod addresses, e.g. in local mode).
    Gateway,
    /// Connection refused: only the Windows pods of opted-in services may call into the mesh.
    Refuse,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct KubeWindowsConfig {
    /// Turn Services labelled `winmesh.io/expose: "true"` into Windows services.
    pub enabled: bool,
    /// The mesh-facing gateway port every such service shares (SNI tells them apart); the
    /// mesh-facing Services point their target ports at it.
    pub gateway_port: u16,
    /// This gateway's node (`spec.nodeName` via the downward API). Empty: `$NODE_NAME`; unset
    /// there too: every backend counts as local (single-node and local testing).
    pub node_name: String,
    /// Default for services without the `winmesh.io/cross-node` annotation: fail over to pods on
    /// other nodes (the plaintext hop then leaves the node) when none on this node is healthy.
    pub cross_node: bool,
    /// Callers on the shared outbound port that are not a known Windows pod of this node.
    pub unknown_callers: UnknownCallers,
    /// Mint each Windows app's istiod token with the TokenRequest API (audience `istio-ca`)
    /// instead of reading token files.
    pub mint_tokens: bool,
    /// Lifetime asked for minted tokens (Kubernetes' minimum is 10 minutes).
    #[serde(with = "duration_str")]
    pub token_ttl: Duration,
    /// Writing the mesh-facing Services and EndpointSlices (one elected winmesh does it).
    pub publish: PublishConfig,
}

impl Default for KubeWindowsConfig {
    fn default() -> Self {
        KubeWindowsConfig {
            enabled: true,
            gateway_port: 15443,
            node_name: String::new(),
            cross_node: false,
            unknown_callers: UnknownCallers::Gateway,
            mint_tokens: false,
            token_ttl: Duration::from_secs(3600),
            publish: PublishConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PublishConfig {
    pub enabled: bool,
    /// Namespace of the gateway pods and of the election Lease. Empty: `$POD_NAMESPACE`, else
    /// `identity.namespace`.
    pub namespace: String,
    /// Labels selecting the gateway pods (in `namespace`) that the mesh-facing EndpointSlices list.
    pub gateway_selector: BTreeMap<String, String>,
    /// Name of the Lease (coordination.k8s.io/v1) that elects the one writer.
    pub lease_name: String,
    /// This winmesh's name in the election. Empty: `$POD_NAME`, else the host name.
    pub identity: String,
    #[serde(with = "duration_str")]
    pub lease_duration: Duration,
}

impl Default for PublishConfig {
    fn default() -> Self {
        PublishConfig {
            enabled: false,
            namespace: String::new(),
            gateway_selector: [(
                "app.kubernetes.io/name".to_string(),
                "winmesh-gateway".to_string(),
            )]
            .into(),
            lease_name: "winmesh-publisher".into(),
            identity: String::new(),
            lease_duration: Duration::from_secs(15),
        }
    }
}

impl Default for MeshConfig {
    fn default() -> Self {
        MeshConfig {
            file: None,
            poll_interval: Duration::from_secs(1),
            settle: Duration::from_millis(50),
            domain_suffix: "cluster.local".into(),
            root_namespace: "istio-system".into(),
            kubernetes: KubernetesConfig::default(),
            mtls: MeshMtls::default(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    /// Address of the mesh-facing (Istio mTLS, always STRICT) listeners; reachable by Linux pods.
    pub inbound_address: IpAddr,
    /// Address of the Windows-facing listeners (HTTP proxy and local TCP ports). These are plaintext:
    /// keep them on loopback or restrict them with NetworkPolicy.
    pub outbound_address: IpAddr,
    /// Port of the Windows-facing HTTP listener.
    pub outbound_port: u16,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            inbound_address: IpAddr::from([0, 0, 0, 0]),
            outbound_address: IpAddr::from([127, 0, 0, 1]),
            outbound_port: 15001,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct IdentityConfig {
    /// Trust domain of the mesh (Istio's `trustDomain`).
    pub trust_domain: String,
    /// Istio's `trustDomainAliases`: callers from these trust domains are accepted too.
    pub trust_domain_aliases: Vec<String>,
    /// Namespace of the gateway's service account.
    pub namespace: String,
    /// The gateway's service account; its identity is `spiffe://<trust_domain>/ns/<namespace>/sa/<sa>`.
    pub service_account: String,
    /// Service-account token with audience `istio-ca` (re-read on every CA call). Required with `ca: istiod`.
    pub token_file: Option<PathBuf>,
    /// Requested certificate lifetime, e.g. `24h`.
    #[serde(with = "duration_str")]
    pub ttl: Duration,
    /// Additional identities (e.g. one per Windows workload), each served under its SPIFFE ID.
    pub extra: Vec<ExtraIdentity>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ExtraIdentity {
    /// `spiffe://<trust-domain>/ns/<ns>/sa/<sa>`.
    pub spiffe_id: String,
    /// Token for this service account (audience `istio-ca`). Required with `ca: istiod`.
    pub token_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum CaMode {
    /// Embedded development CA (local demo and tests).
    Dev,
    /// istiod's CA, exactly as istio-agent uses it.
    Istiod,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CaConfig {
    pub mode: CaMode,
    /// dev: directory that keeps the dev root across restarts.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// istiod: CA address (TLS gRPC).
    #[serde(default = "default_ca_address")]
    pub address: String,
    /// istiod: name verified in istiod's serving certificate.
    #[serde(default = "default_ca_server_name")]
    pub server_name: String,
    /// istiod: mesh root certificate (the `istio-ca-root-cert` ConfigMap's `root-cert.pem`).
    #[serde(default = "default_root_cert_file")]
    pub root_cert_file: PathBuf,
    /// istiod: value of the `clusterid` header.
    #[serde(default = "default_cluster_id")]
    pub cluster_id: String,
    /// istiod: connect and call timeout.
    #[serde(default = "default_ca_timeout", with = "duration_str")]
    pub timeout: Duration,
    /// istiod: the `CertSigner` sent with every request (istio-agent's `ISTIO_META_CERT_SIGNER`);
    /// empty = the default signer.
    #[serde(default)]
    pub cert_signer: String,
}

fn default_state_dir() -> PathBuf {
    PathBuf::from(".state/dev-ca")
}
fn default_ca_address() -> String {
    "istiod.istio-system.svc:15012".into()
}
fn default_ca_server_name() -> String {
    "istiod.istio-system.svc".into()
}
fn default_root_cert_file() -> PathBuf {
    PathBuf::from("/var/run/secrets/istio/root-cert.pem")
}
fn default_cluster_id() -> String {
    "Kubernetes".into()
}
fn default_ca_timeout() -> Duration {
    Duration::from_secs(10)
}

impl CaConfig {
    pub fn of(mode: CaMode) -> Self {
        CaConfig {
            mode,
            state_dir: default_state_dir(),
            address: default_ca_address(),
            server_name: default_ca_server_name(),
            root_cert_file: default_root_cert_file(),
            cluster_id: default_cluster_id(),
            timeout: default_ca_timeout(),
            cert_signer: String::new(),
        }
    }
}

/// `ca: dev` / `ca: istiod`, or a mapping with `mode:` and settings.
fn de_ca<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<CaConfig>, D::Error> {
    struct V;
    impl<'de> serde::de::Visitor<'de> for V {
        type Value = Option<CaConfig>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("`dev`, `istiod`, or a mapping with `mode`")
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
            match v {
                "dev" => Ok(Some(CaConfig::of(CaMode::Dev))),
                "istiod" => Ok(Some(CaConfig::of(CaMode::Istiod))),
                other => Err(E::invalid_value(serde::de::Unexpected::Str(other), &self)),
            }
        }
        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
            CaConfig::deserialize(serde::de::value::MapAccessDeserializer::new(map)).map(Some)
        }
    }
    d.deserialize_any(V)
}

mod duration_str {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(|e| {
            serde::de::Error::custom(format!("invalid duration {s:?}: {e} (use e.g. 24h, 90s)"))
        })
    }
}

impl Default for IdentityConfig {
    fn default() -> Self {
        IdentityConfig {
            trust_domain: "cluster.local".into(),
            trust_domain_aliases: vec![],
            namespace: "winmesh".into(),
            service_account: "winmesh-gateway".into(),
            token_file: None,
            ttl: Duration::from_secs(24 * 3600),
            extra: vec![],
        }
    }
}

impl IdentityConfig {
    /// The gateway's own SPIFFE ID.
    pub fn spiffe_id(&self) -> Result<crate::identity::SpiffeId, crate::identity::SpiffeIdError> {
        crate::identity::SpiffeId::new(&self.trust_domain, &self.namespace, &self.service_account)
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    /// Envoy node id (`--node-id` on `winmesh bootstrap` overrides it).
    pub id: String,
    /// Envoy node cluster.
    pub cluster: String,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum XdsMode {
    /// State of the world (`api_type: GRPC`).
    Sotw,
    /// Incremental (`api_type: DELTA_GRPC`).
    Delta,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SecretsVia {
    /// Secrets travel on the ADS stream.
    Ads,
    /// Secrets travel on a separate `SecretDiscoveryService` stream.
    Sds,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct XdsConfig {
    /// Listen address. Loopback by default: this port hands out private keys.
    pub listen: SocketAddr,
    /// Protocol variant written into the bootstrap.
    pub mode: XdsMode,
    /// Whether secrets are fetched over ADS or a separate SDS stream.
    pub secrets: SecretsVia,
    /// File holding a bearer token that every stream must present. Required when `listen` is not a
    /// loopback address.
    pub token_file: Option<PathBuf>,
    /// How many streams may receive their initial configuration at the same time.
    pub max_concurrent_initial_pushes: usize,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DebugConfig {
    /// Listen address of the debug HTTP server.
    pub listen: SocketAddr,
    /// File holding a bearer token required for `/debug/*` and `/metrics`. Required when `listen` is
    /// not a loopback address.
    pub token_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EnvoyConfig {
    /// Envoy admin listener (keep it on loopback).
    pub admin: SocketAddr,
    /// Address Envoy dials for ADS. Defaults to `xds.listen` (a wildcard listen becomes 127.0.0.1).
    pub xds_address: Option<SocketAddr>,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            id: "winmesh-gateway".into(),
            cluster: "winmesh-gateway".into(),
        }
    }
}

impl Default for XdsConfig {
    fn default() -> Self {
        XdsConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 15010)),
            mode: XdsMode::Sotw,
            secrets: SecretsVia::Ads,
            token_file: None,
            max_concurrent_initial_pushes: crate::xds::server::DEFAULT_INITIAL_PUSHES,
        }
    }
}

impl Default for DebugConfig {
    fn default() -> Self {
        DebugConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 15014)),
            token_file: None,
        }
    }
}

impl Default for EnvoyConfig {
    fn default() -> Self {
        EnvoyConfig {
            admin: SocketAddr::from(([127, 0, 0, 1], 15000)),
            xds_address: None,
        }
    }
}

/// The largest config file read.
pub const MAX_CONFIG_BYTES: usize = 1024 * 1024;

/// A config error: which field, what is wrong, and where in the file if known.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{file}: {field}: {message}{}", .line.map(|(l, c)| format!(" (line {l}, column {c})")).unwrap_or_default())]
pub struct ConfigError {
    pub file: String,
    /// Dotted path of the field, e.g. `xds.listen`.
    pub field: String,
    pub message: String,
    pub line: Option<(usize, usize)>,
}

impl Config {
    /// Makes relative paths relative to `base` (the config file's directory).
    fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        if let Some(p) = self.mesh.file.as_mut() {
            fix(p);
        }
        if let Some(p) = self.mesh.kubernetes.kubeconfig.as_mut() {
            fix(p);
        }
        if let Some(p) = self.mesh.kubernetes.state_file.as_mut() {
            if p.as_os_str().is_empty() {
                self.mesh.kubernetes.state_file = None;
            } else {
                fix(p);
            }
        }
        if let Some(p) = self.xds.token_file.as_mut() {
            fix(p);
        }
        if let Some(p) = self.debug.token_file.as_mut() {
            fix(p);
        }
        if let Some(p) = self.identity.token_file.as_mut() {
            fix(p);
        }
        for x in &mut self.identity.extra {
            if let Some(p) = x.token_file.as_mut() {
                fix(p);
            }
        }
        if let Some(ca) = self.ca.as_mut() {
            fix(&mut ca.state_dir);
            fix(&mut ca.root_cert_file);
        }
    }

    /// Reads, parses and validates a config file. Relative paths in it are relative to its directory.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: file.clone(),
            field: "(file)".into(),
            message: format!("cannot read: {e}"),
            line: None,
        })?;
        let mut cfg = Config::parse_unvalidated(&text, &file)?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        cfg.resolve_paths(&base);
        cfg.validate(&file)?;
        Ok(cfg)
    }

    /// Parses and validates YAML text; `file` is only used in error messages.
    pub fn parse(text: &str, file: &str) -> Result<Config, ConfigError> {
        let cfg = Config::parse_unvalidated(text, file)?;
        cfg.validate(file)?;
        Ok(cfg)
    }

    fn parse_unvalidated(text: &str, file: &str) -> Result<Config, ConfigError> {
        crate::yamlcheck::check(text, MAX_CONFIG_BYTES).map_err(|e| ConfigError {
            file: file.to_string(),
            field: "(file)".into(),
            message: e.to_string(),
            line: match e {
                crate::yamlcheck::Error::TooDeep { line, .. } => Some((line, 1)),
                crate::yamlcheck::Error::TooLarge { .. } => None,
            },
        })?;
        let cfg: Config = if text.trim().is_empty() {
            Config::default()
        } else {
            let de = serde_yaml::Deserializer::from_str(text);
            serde_path_to_error::deserialize(de).map_err(|e| {
                let path = e.path().to_string();
                let inner = e.into_inner();
                let line = inner.location().map(|l| (l.line(), l.column()));
                let mut message = inner.to_string();
                // serde_yaml appends " at line X column Y"; we report the location separately.
                if let Some(i) = message.find(" at line ") {
                    message.truncate(i);
                }
                // serde_yaml may also prefix the enclosing path ("xds: unknown field ..."); we report
                // the full path separately.
                if let Some((head, rest)) = message.split_once(": ")
                    && !head.contains(' ')
                    && path.starts_with(head)
                {
                    message = rest.to_string();
                }
                ConfigError {
                    file: file.to_string(),
                    field: if path == "." { "(root)".into() } else { path },
                    message,
                    line,
                }
            })?
        };
        Ok(cfg)
    }

    /// Ports this host already uses besides the gateway's listeners: Envoy's admin, the xDS and the
    /// debug server (port 0 = chosen by the OS, never a clash).
    pub fn reserved_ports(&self) -> Vec<(&'static str, SocketAddr)> {
        [
            ("envoy.admin", self.envoy.admin),
            ("xds.listen", self.xds.listen),
            ("debug.listen", self.debug.listen),
        ]
        .into_iter()
        .filter(|(_, a)| a.port() != 0)
        .collect()
    }

    fn validate(&self, file: &str) -> Result<(), ConfigError> {
        let err = |field: &str, message: String| ConfigError {
            file: file.to_string(),
            field: field.to_string(),
            message,
            line: None,
        };
        if self.node.id.trim().is_empty() {
            return Err(err("node.id", "must not be empty".into()));
        }
        if self.node.cluster.trim().is_empty() {
            return Err(err("node.cluster", "must not be empty".into()));
        }
        // The ADS/SDS port hands out private keys over plaintext gRPC, and a shared bearer token
        // can neither encrypt them nor bind a client to its node id: it is served on loopback
        // only, to the Envoy beside winmesh (same pod or host). docs/security.md.
        if !self.xds.listen.ip().is_loopback() {
            return Err(err(
                "xds.listen",
                format!(
                    "{} is not a loopback address: this port hands out private keys in plaintext \
                     and is served only to the Envoy beside winmesh (use 127.0.0.1)",
                    self.xds.listen
                ),
            ));
        }
        if !self.debug.listen.ip().is_loopback() && self.debug.token_file.is_none() {
            return Err(err(
                "debug.token_file",
                format!(
                    "required because debug.listen {} is not a loopback address",
                    self.debug.listen
                ),
            ));
        }
        if self.xds.listen.port() != 0 && self.xds.listen == self.debug.listen {
            return Err(err("debug.listen", "must differ from xds.listen".into()));
        }
        self.identity
            .spiffe_id()
            .map_err(|e| err("identity", e.to_string()))?;
        for (i, td) in self.identity.trust_domain_aliases.iter().enumerate() {
            let ok = !td.is_empty()
                && td.chars().all(|c| {
                    c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '.' | '_')
                });
            if !ok {
                return Err(err(
                    &format!("identity.trust_domain_aliases[{i}]"),
                    format!(
                        "{td:?} is not a trust domain (lowercase letters, digits, '-', '.', '_')"
                    ),
                ));
            }
        }
        if self.identity.ttl < Duration::from_secs(2)
            || self.identity.ttl > Duration::from_secs(90 * 86400)
        {
            return Err(err(
                "identity.ttl",
                "must be between 2s and 90d (istiod's maximum)".into(),
            ));
        }
        for (i, x) in self.identity.extra.iter().enumerate() {
            let id = crate::identity::SpiffeId::parse(&x.spiffe_id)
                .map_err(|e| err(&format!("identity.extra[{i}].spiffe_id"), e.to_string()))?;
            if id.trust_domain != self.identity.trust_domain {
                return Err(err(
                    &format!("identity.extra[{i}].spiffe_id"),
                    format!(
                        "trust domain {:?} differs from identity.trust_domain {:?}",
                        id.trust_domain, self.identity.trust_domain
                    ),
                ));
            }
        }
        if let Some(ca) = &self.ca
            && ca.mode == CaMode::Istiod
        {
            if self.identity.token_file.is_none() {
                return Err(err(
                    "identity.token_file",
                    "required with ca: istiod (istiod derives the identity from this token)".into(),
                ));
            }
            for (i, x) in self.identity.extra.iter().enumerate() {
                if x.token_file.is_none() {
                    return Err(err(
                        &format!("identity.extra[{i}].token_file"),
                        "required with ca: istiod".into(),
                    ));
                }
            }
            if ca
                .address
                .rsplit_once(':')
                .and_then(|(_, p)| p.parse::<u16>().ok())
                .is_none()
            {
                return Err(err(
                    "ca.address",
                    format!("{:?} must be host:port", ca.address),
                ));
            }
        }
        if self.xds.max_concurrent_initial_pushes == 0 {
            return Err(err(
                "xds.max_concurrent_initial_pushes",
                "must be at least 1".into(),
            ));
        }
        if self.gateway.outbound_port == 0 {
            return Err(err("gateway.outbound_port", "must be 1-65535".into()));
        }
        if self.mesh.poll_interval < Duration::from_millis(50) {
            return Err(err("mesh.poll_interval", "must be at least 50ms".into()));
        }
        for (i, c) in self.mesh.mtls.cipher_suites.iter().enumerate() {
            if c.is_empty()
                || !c
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(err(
                    &format!("mesh.mtls.cipher_suites[{i}]"),
                    format!("{c:?} is not a cipher suite name"),
                ));
            }
        }
        if self.mesh.settle > Duration::from_secs(60) {
            return Err(err("mesh.settle", "must be at most 60s".into()));
        }
        // Gateway listeners must not take a port that Envoy's admin, the xDS or the debug server use.
        for (what, addr) in self.reserved_ports() {
            let clash = addr.port() == self.gateway.outbound_port
                && (addr.ip() == self.gateway.outbound_address
                    || addr.ip().is_unspecified()
                    || self.gateway.outbound_address.is_unspecified());
            if clash {
                return Err(err(
                    "gateway.outbound_port",
                    format!(
                        "{} is already used by {what} ({addr})",
                        self.gateway.outbound_port
                    ),
                ));
            }
        }
        if self.mesh.domain_suffix.is_empty()
            || self.mesh.domain_suffix.starts_with('.')
            || self.mesh.domain_suffix.ends_with('.')
        {
            return Err(err(
                "mesh.domain_suffix",
                format!("{:?} is not a DNS suffix", self.mesh.domain_suffix),
            ));
        }
        let ns = &self.mesh.root_namespace;
        if ns.is_empty()
            || ns.len() > 63
            || ns.starts_with('-')
            || ns.ends_with('-')
            || !ns
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        {
            return Err(err(
                "mesh.root_namespace",
                format!("{ns:?} is not a Kubernetes namespace name"),
            ));
        }
        let k = &self.mesh.kubernetes;
        if let Some(f) = &k.kubeconfig
            && !f.is_file()
        {
            return Err(err(
                "mesh.kubernetes.kubeconfig",
                format!("{} does not exist", f.display()),
            ));
        }
        if k.debounce > k.debounce_max {
            return Err(err(
                "mesh.kubernetes.debounce",
                "must not exceed mesh.kubernetes.debounce_max".into(),
            ));
        }
        let w = &k.windows;
        if w.gateway_port == 0 {
            return Err(err(
                "mesh.kubernetes.windows.gateway_port",
                "must be a port number".into(),
            ));
        }
        if k.enabled && w.enabled {
            for (what, port) in [
                ("the outbound HTTP port", self.gateway.outbound_port),
                ("the Envoy admin port", self.envoy.admin.port()),
                ("the xDS port", self.xds.listen.port()),
                ("the debug port", self.debug.listen.port()),
            ] {
                if port == w.gateway_port {
                    return Err(err(
                        "mesh.kubernetes.windows.gateway_port",
                        format!("{} is {what}", w.gateway_port),
                    ));
                }
            }
        }
        if w.token_ttl < Duration::from_secs(600) {
            return Err(err(
                "mesh.kubernetes.windows.token_ttl",
                "Kubernetes mints tokens for at least 10m".into(),
            ));
        }
        if w.publish.enabled && w.publish.gateway_selector.is_empty() {
            return Err(err(
                "mesh.kubernetes.windows.publish.gateway_selector",
                "must select the gateway pods (an empty selector would list every pod)".into(),
            ));
        }
        if w.publish.lease_duration < Duration::from_secs(2) {
            return Err(err(
                "mesh.kubernetes.windows.publish.lease_duration",
                "must be at least 2s".into(),
            ));
        }
        if let Some(f) = &self.mesh.file
            && !f.is_file()
        {
            return Err(err("mesh.file", format!("{} does not exist", f.display())));
        }
        for (field, path) in [
            ("xds.token_file", &self.xds.token_file),
            ("debug.token_file", &self.debug.token_file),
        ] {
            if let Some(p) = path {
                read_token(p).map_err(|m| err(field, m))?;
            }
        }
        Ok(())
    }

    /// Where Envoy should dial for ADS.
    pub fn xds_target(&self) -> SocketAddr {
        if let Some(a) = self.envoy.xds_address {
            return a;
        }
        let mut a = self.xds.listen;
        if a.ip().is_unspecified() {
            a.set_ip(match a.ip() {
                IpAddr::V4(_) => IpAddr::from([127, 0, 0, 1]),
                IpAddr::V6(_) => IpAddr::from([0u16, 0, 0, 0, 0, 0, 0, 1]),
            });
        }
        a
    }
}

/// Reads a bearer token file: trimmed, non-empty. The token itself never appears in errors.
pub fn read_token(path: &Path) -> Result<String, String> {
    let t = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let t = t.trim().to_string();
    if t.is_empty() {
        return Err(format!("{} is empty", path.display()));
    }
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_safe_defaults() {
        let c = Config::parse("", "c.yaml").unwrap();
        assert!(c.xds.listen.ip().is_loopback());
        assert!(c.debug.listen.ip().is_loopback());
        assert_eq!(c.xds.listen.port(), 15010);
        assert_eq!(c.debug.listen.port(), 15014);
        assert_eq!(c.xds_target(), c.xds.listen);
    }

    #[test]
    fn unknown_field_is_named_with_line() {
        let e = Config::parse("xds:\n  lisen: 127.0.0.1:1\n", "c.yaml").unwrap_err();
        assert_eq!(e.field, "xds.lisen");
        assert!(e.message.starts_with("unknown field `lisen`"), "{e}");
        assert_eq!(e.line.map(|l| l.0), Some(2));
    }

    #[test]
    fn bad_value_names_the_field() {
        let e = Config::parse("xds:\n  listen: nope\n", "c.yaml").unwrap_err();
        assert_eq!(e.field, "xds.listen");
        assert!(e.to_string().starts_with("c.yaml: xds.listen: "), "{e}");
        let e = Config::parse("xds:\n  mode: fast\n", "c.yaml").unwrap_err();
        assert_eq!(e.field, "xds.mode");
    }

    #[test]
    fn non_loopback_xds_is_refused_and_debug_requires_a_token() {
        for listen in ["0.0.0.0:15010", "10.1.2.3:15010", "[::]:15010"] {
            let e =
                Config::parse(&format!("xds:\n  listen: \"{listen}\"\n"), "c.yaml").unwrap_err();
            assert_eq!(e.field, "xds.listen", "{listen}");
            assert!(e.message.contains("private keys"), "{e}");
        }
        // Not even with a token: it would cross the network in clear, with every key.
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tok");
        std::fs::write(&p, "t").unwrap();
        let e = Config::parse(
            &format!(
                "xds:\n  listen: 0.0.0.0:15010\n  token_file: {}\n",
                p.display()
            ),
            "c.yaml",
        )
        .unwrap_err();
        assert_eq!(e.field, "xds.listen");
        let e = Config::parse("debug:\n  listen: 10.1.2.3:15014\n", "c.yaml").unwrap_err();
        assert_eq!(e.field, "debug.token_file");
    }

    #[test]
    fn token_file_must_exist_and_is_not_leaked() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tok");
        std::fs::write(&p, "  s3cret-token\n").unwrap();
        let text = format!(
            "xds:\n  listen: 127.0.0.1:15010\n  token_file: {}\n",
            p.display()
        );
        let c = Config::parse(&text, "c.yaml").unwrap();
        assert_eq!(c.xds_target(), SocketAddr::from(([127, 0, 0, 1], 15010)));
        assert_eq!(read_token(&p).unwrap(), "s3cret-token");
        std::fs::write(&p, "\n").unwrap();
        let e = Config::parse(&text, "c.yaml").unwrap_err();
        assert_eq!(e.field, "xds.token_file");
        assert!(!e.to_string().contains("s3cret"));
    }

    #[test]
    fn ca_short_and_long_forms() {
        let c = Config::parse("ca: dev\n", "c.yaml").unwrap();
        assert_eq!(c.ca.unwrap().mode, CaMode::Dev);
        let c = Config::parse(
            "identity:\n  token_file: /t\nca:\n  mode: istiod\n  address: 127.0.0.1:15012\n  timeout: 3s\n",
            "c.yaml",
        )
        .unwrap();
        let ca = c.ca.unwrap();
        assert_eq!(ca.server_name, "istiod.istio-system.svc");
        assert_eq!(ca.timeout, Duration::from_secs(3));
        let e = Config::parse("ca: vault\n", "c.yaml").unwrap_err();
        assert_eq!(e.field, "ca");
        let e = Config::parse("ca:\n  mode: istiod\n  adress: x:1\n", "c.yaml").unwrap_err();
        assert_eq!(e.field, "ca.adress");
        let e = Config::parse("ca: istiod\n", "c.yaml").unwrap_err();
        assert_eq!(e.field, "identity.token_file");
    }

    #[test]
    fn identity_fields_are_checked() {
        let e = Config::parse("identity:\n  ttl: forever\n", "c.yaml").unwrap_err();
        assert_eq!(e.field, "identity.ttl");
        let e = Config::parse("identity:\n  ttl: 1s\n", "c.yaml").unwrap_err();
        assert_eq!(e.field, "identity.ttl");
        let e = Config::parse("identity:\n  namespace: \"a b\"\n", "c.yaml").unwrap_err();
        assert_eq!(e.field, "identity");
        let e = Config::parse(
            "identity:\n  extra:\n    - spiffe_id: spiffe://other.td/ns/a/sa/b\n",
            "c.yaml",
        )
        .unwrap_err();
        assert_eq!(e.field, "identity.extra[0].spiffe_id");
        let c = Config::parse("identity:\n  ttl: 90m\n", "c.yaml").unwrap();
        assert_eq!(c.identity.ttl, Duration::from_secs(5400));
        assert_eq!(
            c.identity.spiffe_id().unwrap().to_string(),
            "spiffe://cluster.local/ns/winmesh/sa/winmesh-gateway"
        );
    }

    #[test]
    fn kubernetes_settings_are_checked() {
        let c = Config::parse("", "c.yaml").unwrap();
        assert!(!c.mesh.kubernetes.enabled);
        assert_eq!(c.mesh.kubernetes.debounce, Duration::from_millis(100));
        let c = Config::parse(
            "mesh:\n  kubernetes:\n    enabled: true\n    sync_timeout: 5s\n",
            "c.yaml",
        )
        .unwrap();
        assert!(c.mesh.kubernetes.enabled);
        assert_eq!(c.mesh.kubernetes.sync_timeout, Duration::from_secs(5));
        let e = Config::parse(
            "mesh:\n  kubernetes:\n    kubeconfig: /nonexistent/kubeconfig\n",
            "c.yaml",
        )
        .unwrap_err();
        assert_eq!(e.field, "mesh.kubernetes.kubeconfig");
        let e = Config::parse(
            "mesh:\n  kubernetes:\n    debounce: 5s\n    debounce_max: 1s\n",
            "c.yaml",
        )
        .unwrap_err();
        assert_eq!(e.field, "mesh.kubernetes.debounce");
        let e = Config::parse("mesh:\n  kubernetes:\n    enable: true\n", "c.yaml").unwrap_err();
        assert!(e.field.starts_with("mesh.kubernetes"), "{e:?}");
    }

    #[test]
    fn root_namespace_is_a_namespace_name() {
        let c = Config::parse("", "c.yaml").unwrap();
        assert_eq!(c.mesh.root_namespace, "istio-system");
        let c = Config::parse("mesh:\n  root_namespace: mesh-root\n", "c.yaml").unwrap();
        assert_eq!(c.mesh.root_namespace, "mesh-root");
        let e = Config::parse("mesh:\n  root_namespace: Istio_System\n", "c.yaml").unwrap_err();
        assert_eq!(e.field, "mesh.root_namespace");
    }

    #[test]
    fn same_port_twice_is_rejected() {
        let e = Config::parse(
            "xds:\n  listen: 127.0.0.1:9000\ndebug:\n  listen: 127.0.0.1:9000\n",
            "c.yaml",
        )
        .unwrap_err();
        assert_eq!(e.field, "debug.listen");
    }
}
