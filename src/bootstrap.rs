//! Config → Envoy bootstrap, and the config sources generated resources use to point back at winmesh,
//! derived from the same config so the two can never drift apart.
//!
//! The bootstrap must work on a stock Envoy on Windows (1.28 … 1.40): ADS over TCP (no pipes or UDS),
//! admin on loopback, no hot restart, no file access logs.

use std::net::SocketAddr;

use envoy_types::pb::envoy::config::core::v3::{
    AggregatedConfigSource, ApiVersion, ConfigSource, config_source::ConfigSourceSpecifier,
};
use envoy_types::pb::envoy::config::core::v3::{ApiConfigSource, GrpcService, api_config_source};
use serde_json::{Value, json};

use crate::config::{Config, SecretsVia, XdsMode};

/// Name of the static cluster through which Envoy reaches winmesh.
pub const XDS_CLUSTER: &str = "winmesh-xds";

/// Options for `winmesh bootstrap`.
#[derive(Debug, Clone, Default)]
pub struct BootstrapOptions {
    pub node_id: Option<String>,
    pub mode: Option<XdsMode>,
    /// Bearer token for the xDS server, if it requires one.
    pub token: Option<String>,
}

fn socket(addr: SocketAddr) -> Value {
    json!({"socket_address": {"address": addr.ip().to_string(), "port_value": addr.port()}})
}

/// The bootstrap as a JSON value (serialize it as YAML or JSON).
pub fn bootstrap(cfg: &Config, opts: &BootstrapOptions) -> Value {
    let mode = opts.mode.unwrap_or(cfg.xds.mode);
    let api_type = match mode {
        XdsMode::Sotw => "GRPC",
        XdsMode::Delta => "DELTA_GRPC",
    };
    let mut grpc_service = json!({"envoy_grpc": {"cluster_name": XDS_CLUSTER}});
    if let Some(token) = &opts.token {
        grpc_service["initial_metadata"] =
            json!([{"key": "authorization", "value": format!("Bearer {token}")}]);
    }
    json!({
        "node": {
            "id": opts.node_id.clone().unwrap_or_else(|| cfg.node.id.clone()),
            "cluster": cfg.node.cluster,
        },
        "admin": {"address": socket(cfg.envoy.admin)},
        "dynamic_resources": {
            "ads_config": {
                "api_type": api_type,
                "transport_api_version": "V3",
                "set_node_on_first_message_only": true,
                "grpc_services": [grpc_service],
            },
            // Wait for winmesh rather than becoming ready with no config.
            "cds_config": {"ads": {}, "resource_api_version": "V3", "initial_fetch_timeout": "0s"},
            "lds_config": {"ads": {}, "resource_api_version": "V3", "initial_fetch_timeout": "0s"},
        },
        "static_resources": {
            "clusters": [{
                "name": XDS_CLUSTER,
                "type": "STATIC",
                "connect_timeout": "1s",
                "typed_extension_protocol_options": {
                    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                        "explicit_http_config": {"http2_protocol_options": {
                            "connection_keepalive": {"interval": "30s", "timeout": "5s"}
                        }},
                    }
                },
                "load_assignment": {
                    "cluster_name": XDS_CLUSTER,
                    "endpoints": [{"lb_endpoints": [{"endpoint": {"address": socket(cfg.xds_target())}}]}],
                },
            }],
        },
    })
}

/// The bootstrap rendered as YAML.
pub fn bootstrap_yaml(cfg: &Config, opts: &BootstrapOptions) -> String {
    // Serializing a serde_json::Value to YAML cannot fail (string keys only).
    serde_yaml::to_string(&bootstrap(cfg, opts)).unwrap_or_default()
}

/// Config source for `sds_config` in generated listeners and clusters: over ADS or a separate SDS
/// stream to the same winmesh, waiting indefinitely for the first secret (`initial_fetch_timeout: 0s`),
/// as Istio does.
pub fn secret_config_source(via: SecretsVia) -> ConfigSource {
    let zero = Some(envoy_types::pb::google::protobuf::Duration {
        seconds: 0,
        nanos: 0,
    });
    let specifier = match via {
        SecretsVia::Ads => ConfigSourceSpecifier::Ads(AggregatedConfigSource {}),
        SecretsVia::Sds => ConfigSourceSpecifier::ApiConfigSource(ApiConfigSource {
            api_type: api_config_source::ApiType::Grpc as i32,
            transport_api_version: ApiVersion::V3 as i32,
            grpc_services: vec![GrpcService {
                target_specifier: Some(
                    envoy_types::pb::envoy::config::core::v3::grpc_service::TargetSpecifier::EnvoyGrpc(
                        envoy_types::pb::envoy::config::core::v3::grpc_service::EnvoyGrpc {
                            cluster_name: XDS_CLUSTER.into(),
                            ..Default::default()
                        },
                    ),
                ),
                ..Default::default()
            }],
            set_node_on_first_message_only: true,
            ..Default::default()
        }),
    };
    ConfigSource {
        resource_api_version: ApiVersion::V3 as i32,
        initial_fetch_timeout: zero,
        config_source_specifier: Some(specifier),
        ..Default::default()
    }
}

/// Config source for RDS/EDS in generated resources: always the ADS stream.
pub fn ads_config_source() -> ConfigSource {
    ConfigSource {
        resource_api_version: ApiVersion::V3 as i32,
        config_source_specifier: Some(ConfigSourceSpecifier::Ads(AggregatedConfigSource {})),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bootstrap_points_at_winmesh_over_tcp_loopback() {
        let cfg = Config::default();
        let b = bootstrap(&cfg, &BootstrapOptions::default());
        assert_eq!(b["node"]["id"], "winmesh-gateway");
        assert_eq!(b["dynamic_resources"]["ads_config"]["api_type"], "GRPC");
        let ep = &b["static_resources"]["clusters"][0]["load_assignment"]["endpoints"][0]
            ["lb_endpoints"][0]["endpoint"]["address"]["socket_address"];
        assert_eq!(ep["address"], "127.0.0.1");
        assert_eq!(ep["port_value"], 15010);
        assert_eq!(b["admin"]["address"]["socket_address"]["address"], "127.0.0.1");
        let text = bootstrap_yaml(&cfg, &BootstrapOptions::default());
        // Nothing that fails on Windows: no pipes, no unix sockets, no file paths.
        for bad in ["pipe", "/dev/", "access_log_path", "hot_restart"] {
            assert!(!text.contains(bad), "{bad} in bootstrap");
        }
    }

    #[test]
    fn options_override_node_and_mode_and_add_token() {
        let cfg = Config::default();
        let b = bootstrap(
            &cfg,
            &BootstrapOptions {
                node_id: Some("gw-7".into()),
                mode: Some(XdsMode::Delta),
                token: Some("t0k".into()),
            },
        );
        assert_eq!(b["node"]["id"], "gw-7");
        assert_eq!(b["dynamic_resources"]["ads_config"]["api_type"], "DELTA_GRPC");
        assert_eq!(
            b["dynamic_resources"]["ads_config"]["grpc_services"][0]["initial_metadata"][0]["value"],
            "Bearer t0k"
        );
    }

    #[test]
    fn secret_sources_wait_forever() {
        for via in [SecretsVia::Ads, SecretsVia::Sds] {
            let s = secret_config_source(via);
            assert_eq!(s.initial_fetch_timeout.unwrap().seconds, 0);
        }
        assert!(matches!(
            secret_config_source(SecretsVia::Ads).config_source_specifier,
            Some(ConfigSourceSpecifier::Ads(_))
        ));
        assert!(matches!(
            secret_config_source(SecretsVia::Sds).config_source_specifier,
            Some(ConfigSourceSpecifier::ApiConfigSource(_))
        ));
    }
}
