//! Building blocks shared by inbound and outbound translation.

use std::net::IpAddr;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::cluster::v3::cluster::{
    ClusterDiscoveryType, DiscoveryType, EdsClusterConfig,
};
use envoy_types::pb::envoy::config::core::v3::{
    Address, Http2ProtocolOptions, Metadata, SocketAddress, TransportSocket, address,
    socket_address::PortSpecifier, transport_socket,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint::HostIdentifier,
};
use envoy_types::pb::envoy::config::listener::v3::{
    Filter, ListenerFilter, filter, listener_filter,
};
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::listener::tls_inspector::v3::TlsInspector;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpFilter, http_filter,
};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, CommonTlsContext, SdsSecretConfig, SubjectAltNameMatcher,
    TlsParameters, common_tls_context::CombinedCertificateValidationContext,
    subject_alt_name_matcher::SanType, tls_parameters::TlsProtocol,
};
use envoy_types::pb::envoy::extensions::upstreams::http::v3::HttpProtocolOptions;
use envoy_types::pb::envoy::extensions::upstreams::http::v3::http_protocol_options::{
    ExplicitHttpConfig, UpstreamProtocolOptions, explicit_http_config::ProtocolConfig,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{StringMatcher, string_matcher::MatchPattern};
use envoy_types::pb::google::protobuf::{Duration, Struct, Value, value::Kind};
use envoy_types::util::pack_any;
use prost::Name;

use crate::bootstrap::{ads_config_source, secret_config_source};
use crate::config::SecretsVia;

/// Key of the endpoint metadata Envoy's `transport_socket_matches` look at.
pub const TRANSPORT_SOCKET_MATCH: &str = "envoy.transport_socket_match";

pub fn socket_address(ip: IpAddr, port: u16) -> Address {
    Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: ip.to_string(),
            port_specifier: Some(PortSpecifier::PortValue(u32::from(port))),
            ..Default::default()
        })),
    }
}

pub fn duration(seconds: i64) -> Option<Duration> {
    Some(Duration { seconds, nanos: 0 })
}

pub fn exact(s: &str) -> StringMatcher {
    StringMatcher {
        match_pattern: Some(MatchPattern::Exact(s.into())),
        ignore_case: false,
    }
}

pub fn prefix(s: &str) -> StringMatcher {
    StringMatcher {
        match_pattern: Some(MatchPattern::Prefix(s.into())),
        ignore_case: false,
    }
}

pub fn suffix(s: &str) -> StringMatcher {
    StringMatcher {
        match_pattern: Some(MatchPattern::Suffix(s.into())),
        ignore_case: false,
    }
}

pub fn sds(name: &str, via: SecretsVia) -> SdsSecretConfig {
    SdsSecretConfig {
        name: name.into(),
        sds_config: Some(secret_config_source(via)),
    }
}

pub fn uri_san(m: StringMatcher) -> SubjectAltNameMatcher {
    SubjectAltNameMatcher {
        san_type: SanType::Uri as i32,
        matcher: Some(m),
        oid: String::new(),
    }
}

/// TLS 1.2–1.3 with a certificate from SDS and validation = `ROOTCA` from SDS + the given SAN matchers.
pub fn common_tls(
    cert: &str,
    sans: Vec<SubjectAltNameMatcher>,
    alpn: &[&str],
    via: SecretsVia,
) -> CommonTlsContext {
    CommonTlsContext {
        tls_params: Some(TlsParameters {
            tls_minimum_protocol_version: TlsProtocol::TlSv12 as i32,
            tls_maximum_protocol_version: TlsProtocol::TlSv13 as i32,
            ..Default::default()
        }),
        tls_certificate_sds_secret_configs: vec![sds(cert, via)],
        validation_context_type: Some(
            envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::common_tls_context::ValidationContextType::CombinedValidationContext(
                CombinedCertificateValidationContext {
                    default_validation_context: Some(CertificateValidationContext {
                        match_typed_subject_alt_names: sans,
                        ..Default::default()
                    }),
                    validation_context_sds_secret_config: Some(sds(super::secret::ROOTCA, via)),
                    ..Default::default()
                },
            ),
        ),
        alpn_protocols: alpn.iter().map(|a| a.to_string()).collect(),
        ..Default::default()
    }
}

pub fn transport_socket<M: prost::Message + Name>(name: &str, cfg: M) -> TransportSocket {
    TransportSocket {
        name: name.into(),
        config_type: Some(transport_socket::ConfigType::TypedConfig(pack_any(cfg))),
    }
}

pub fn raw_buffer() -> TransportSocket {
    transport_socket(
        "envoy.transport_sockets.raw_buffer",
        envoy_types::pb::envoy::extensions::transport_sockets::raw_buffer::v3::RawBuffer {},
    )
}

pub fn tls_inspector() -> ListenerFilter {
    ListenerFilter {
        name: "envoy.filters.listener.tls_inspector".into(),
        config_type: Some(listener_filter::ConfigType::TypedConfig(pack_any(
            TlsInspector::default(),
        ))),
        ..Default::default()
    }
}

pub fn router() -> HttpFilter {
    HttpFilter {
        name: "envoy.filters.http.router".into(),
        config_type: Some(http_filter::ConfigType::TypedConfig(pack_any(
            Router::default(),
        ))),
        ..Default::default()
    }
}

pub fn network_filter<M: prost::Message + Name>(name: &str, cfg: M) -> Filter {
    Filter {
        name: name.into(),
        config_type: Some(filter::ConfigType::TypedConfig(pack_any(cfg))),
    }
}

/// An EDS cluster (endpoints over ADS), HTTP/2 upstream if `h2`.
pub fn eds_cluster(name: &str, h2: bool) -> Cluster {
    let mut c = Cluster {
        name: name.into(),
        connect_timeout: duration(10),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
        eds_cluster_config: Some(EdsClusterConfig {
            eds_config: Some(ads_config_source()),
            service_name: String::new(),
        }),
        ..Default::default()
    };
    if h2 {
        let opts = HttpProtocolOptions {
            upstream_protocol_options: Some(UpstreamProtocolOptions::ExplicitHttpConfig(
                ExplicitHttpConfig {
                    protocol_config: Some(ProtocolConfig::Http2ProtocolOptions(
                        Http2ProtocolOptions::default(),
                    )),
                },
            )),
            ..Default::default()
        };
        c.typed_extension_protocol_options
            .insert(HttpProtocolOptions::full_name(), pack_any(opts));
    }
    c
}

/// One endpoint: address, port, and optional `tlsMode` metadata for transport socket matching.
pub struct Ep {
    pub ip: IpAddr,
    pub port: u16,
    pub tls_mode_istio: bool,
    /// Envoy priority: 0 is used while healthy; higher ones only as failover.
    pub priority: u32,
}

/// Endpoints grouped by priority (one `LocalityLbEndpoints` per priority in use; always at least
/// one, so an empty assignment still names its cluster's priority 0).
pub fn cla(name: &str, eps: &[Ep]) -> ClusterLoadAssignment {
    let mut priorities: Vec<u32> = eps.iter().map(|e| e.priority).collect();
    priorities.push(0);
    priorities.sort_unstable();
    priorities.dedup();
    ClusterLoadAssignment {
        cluster_name: name.into(),
        endpoints: priorities
            .into_iter()
            .filter(|pr| *pr == 0 || eps.iter().any(|e| e.priority == *pr))
            .map(|priority| LocalityLbEndpoints {
                priority,
                lb_endpoints: eps
                    .iter()
                    .filter(|e| e.priority == priority)
                    .map(|e| LbEndpoint {
                        host_identifier: Some(HostIdentifier::Endpoint(Endpoint {
                            address: Some(socket_address(e.ip, e.port)),
                            ..Default::default()
                        })),
                        metadata: e.tls_mode_istio.then(|| Metadata {
                            filter_metadata: [(
                                TRANSPORT_SOCKET_MATCH.to_string(),
                                Struct {
                                    fields: [(
                                        "tlsMode".to_string(),
                                        Value {
                                            kind: Some(Kind::StringValue("istio".into())),
                                        },
                                    )]
                                    .into(),
                                },
                            )]
                            .into(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

/// `outbound_.<port>_._.<host>`: the SNI Istio clients send.
pub fn istio_sni(port: u16, host: &str) -> String {
    format!("outbound_.{port}_._.{host}")
}

pub fn outbound_cluster_name(port: u16, host: &str) -> String {
    format!("outbound|{port}||{host}")
}

pub fn inbound_cluster_name(port: u16, host: &str) -> String {
    format!("inbound|{port}||{host}")
}
