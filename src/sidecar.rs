//! A stock Envoy configured the way Istio configures a Linux sidecar, for the end-to-end tests and the
//! local demo. Client side: Istio SNI, a fixed ALPN per protocol, exact URI SAN check of the destination,
//! mesh root trust, and Istio's `x-envoy-peer-metadata*` headers. Server side: `tls_inspector`, an HTTP
//! chain for `istio-http/1.0|1.1|istio-h2`, a TCP chain for the rest, client certificate required, SAN
//! prefix of the trust domain, server ALPN `h2, http/1.1`, no plaintext chain (STRICT). Like a real
//! sidecar, a client that offers `istio-peer-exchange` is sent into a metadata-exchange chain (here: a
//! backend that answers with the exchange preamble), so a gateway that offered it would break.

use std::net::SocketAddr;
use std::path::Path;

use serde_json::{Value, json};

/// A mesh service the sidecar's app calls (through a plain local listener).
#[derive(Clone, Debug)]
pub struct Outbound {
    /// Listener name and stat prefix.
    pub name: String,
    /// Local plaintext listener the app uses (0 = any free port).
    pub listen: SocketAddr,
    /// Destination service FQDN and port (they form the SNI).
    pub host: String,
    pub port: u16,
    /// HTTP/2 (gRPC) instead of HTTP/1.1.
    pub http2: bool,
    /// Where the destination's endpoints are (the gateway's mesh-facing listener).
    pub endpoint: SocketAddr,
    /// URI SANs the destination may present (exact match).
    pub expected_sans: Vec<String>,
}

/// The sidecar's own app.
#[derive(Clone, Debug)]
pub struct Inbound {
    /// Mesh-facing mTLS listener.
    pub listen: SocketAddr,
    /// The local app (plain HTTP/1.1 or h2c).
    pub app: SocketAddr,
    pub app_http2: bool,
    /// Backend standing in for Istio's metadata-exchange filter (answers with its preamble).
    pub peer_exchange_trap: Option<SocketAddr>,
}

pub struct Sidecar<'a> {
    pub node_id: String,
    pub admin: SocketAddr,
    pub trust_domain: String,
    /// Directory with cert-chain.pem, key.pem and root-cert.pem (`winmesh dev-ca issue`).
    pub certs: &'a Path,
    pub outbound: Vec<Outbound>,
    pub inbound: Option<Inbound>,
}

fn sock(a: SocketAddr) -> Value {
    json!({"socket_address": {"address": a.ip().to_string(), "port_value": a.port()}})
}

fn file(p: &Path) -> Value {
    json!({"filename": p.display().to_string()})
}

fn h2_options() -> Value {
    json!({"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "explicit_http_config": {"http2_protocol_options": {}}
    }})
}

fn static_cluster(name: &str, ep: SocketAddr, h2: bool) -> Value {
    let mut c = json!({
        "name": name,
        "type": "STATIC",
        "connect_timeout": "5s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {"address": sock(ep)}}]}]},
    });
    if h2 {
        c["typed_extension_protocol_options"] = h2_options();
    }
    c
}

fn router() -> Value {
    json!({"name": "envoy.filters.http.router", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}})
}

impl Sidecar<'_> {
    fn tls_common(&self, alpn: &[&str], sans: Option<&[String]>) -> Value {
        let mut validation = json!({"trusted_ca": file(&self.certs.join("root-cert.pem"))});
        match sans {
            Some(list) => {
                validation["match_typed_subject_alt_names"] = json!(
                    list.iter()
                        .map(|s| json!({"san_type": "URI", "matcher": {"exact": s}}))
                        .collect::<Vec<_>>()
                );
            }
            None => {
                validation["match_typed_subject_alt_names"] = json!([{
                    "san_type": "URI", "matcher": {"prefix": format!("spiffe://{}/", self.trust_domain)}
                }]);
            }
        }
        json!({
            "tls_params": {"tls_minimum_protocol_version": "TLSv1_2", "tls_maximum_protocol_version": "TLSv1_3"},
            "tls_certificates": [{
                "certificate_chain": file(&self.certs.join("cert-chain.pem")),
                "private_key": file(&self.certs.join("key.pem")),
            }],
            "validation_context": validation,
            "alpn_protocols": alpn,
        })
    }

    /// The bootstrap as JSON (Envoy reads it as YAML too).
    pub fn bootstrap(&self) -> Value {
        let mut listeners = Vec::new();
        let mut clusters = Vec::new();
        for o in &self.outbound {
            let cluster = format!("outbound|{}||{}", o.port, o.host);
            let alpn: &[&str] = if o.http2 {
                &["istio-h2", "istio", "h2"]
            } else {
                &["istio-http/1.1", "istio", "http/1.1"]
            };
            let mut c = static_cluster(&cluster, o.endpoint, o.http2);
            c["transport_socket"] = json!({
                "name": "envoy.transport_sockets.tls",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                    "sni": format!("outbound_.{}_._.{}", o.port, o.host),
                    "common_tls_context": self.tls_common(alpn, Some(&o.expected_sans)),
                }
            });
            clusters.push(c);
            listeners.push(json!({
                "name": o.name,
                "address": sock(o.listen),
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                        "stat_prefix": o.name,
                        "codec_type": "AUTO",
                        "route_config": {"virtual_hosts": [{
                            "name": "all", "domains": ["*"],
                            "routes": [{"match": {"prefix": "/"}, "route": {"cluster": cluster, "timeout": "0s"}}],
                            // What a real sidecar client adds for telemetry.
                            "request_headers_to_add": [
                                {"header": {"key": "x-envoy-peer-metadata", "value": "ChsKDkFQUF9DT05UQUlORVJTEgkaB2xpbnV4YXBw"}},
                                {"header": {"key": "x-envoy-peer-metadata-id", "value": format!("sidecar~127.0.0.1~{}", self.node_id)}},
                            ],
                        }]},
                        "http_filters": [router()],
                    }
                }]}],
            }));
        }
        if let Some(i) = &self.inbound {
            clusters.push(static_cluster("inbound|app", i.app, i.app_http2));
            let tls = |alpn: &[&str]| {
                json!({
                    "name": "envoy.transport_sockets.tls",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                        "require_client_certificate": true,
                        "common_tls_context": self.tls_common(alpn, None),
                    }
                })
            };
            let mut chains = vec![
                json!({
                    "name": "inbound-http",
                    "filter_chain_match": {"transport_protocol": "tls",
                        "application_protocols": ["istio-http/1.0", "istio-http/1.1", "istio-h2"]},
                    "transport_socket": tls(&["h2", "http/1.1"]),
                    "filters": [{
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                            "stat_prefix": "inbound-http",
                            "codec_type": "AUTO",
                            "forward_client_cert_details": "APPEND_FORWARD",
                            "set_current_client_cert_details": {"subject": true, "dns": true, "uri": true},
                            "route_config": {"virtual_hosts": [{
                                "name": "inbound", "domains": ["*"],
                                "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "inbound|app", "timeout": "0s"}}],
                            }]},
                            "http_filters": [router()],
                        }
                    }],
                }),
                json!({
                    "name": "inbound-tcp",
                    "filter_chain_match": {"transport_protocol": "tls"},
                    "transport_socket": tls(&["h2", "http/1.1"]),
                    "filters": [{"name": "envoy.filters.network.tcp_proxy", "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                        "stat_prefix": "inbound-tcp", "cluster": "inbound|app"}}],
                }),
            ];
            if let Some(trap) = i.peer_exchange_trap {
                clusters.push(static_cluster("peer-exchange", trap, false));
                chains.push(json!({
                    "name": "inbound-peer-exchange",
                    "filter_chain_match": {"transport_protocol": "tls", "application_protocols": ["istio-peer-exchange"]},
                    "transport_socket": tls(&["istio-peer-exchange", "h2", "http/1.1"]),
                    "filters": [{"name": "envoy.filters.network.tcp_proxy", "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                        "stat_prefix": "peer-exchange", "cluster": "peer-exchange"}}],
                }));
            }
            listeners.push(json!({
                "name": "inbound",
                "address": sock(i.listen),
                "listener_filters": [{"name": "envoy.filters.listener.tls_inspector", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"}}],
                "filter_chains": chains,
            }));
        }
        json!({
            "node": {"id": self.node_id, "cluster": "linux-sidecar"},
            "admin": {"address": sock(self.admin)},
            "static_resources": {"listeners": listeners, "clusters": clusters},
        })
    }
}

/// Istio's metadata-exchange preamble magic (what a sidecar sends after negotiating
/// `istio-peer-exchange`).
pub const PEER_EXCHANGE_MAGIC: [u8; 4] = [0x3d, 0x23, 0x04, 0x67];
