//! Fixtures for the xDS state machine tests.

use std::sync::Arc;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::cluster::v3::cluster::{
    ClusterDiscoveryType, DiscoveryType, EdsClusterConfig,
};
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::{Filter, FilterChain, Listener, filter};
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, Rds, http_connection_manager::RouteSpecifier,
};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret;
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
use envoy_types::pb::google::rpc::Status;

use super::cache::{ResourceSnapshot, SnapshotBuilder};
use super::resources::TypeUrl;

pub fn eds_cluster(name: &str, tag: u32) -> Cluster {
    Cluster {
        name: name.into(),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
        eds_cluster_config: Some(EdsClusterConfig {
            eds_config: None,
            service_name: String::new(),
        }),
        per_connection_buffer_limit_bytes: Some(envoy_types::pb::google::protobuf::UInt32Value {
            value: tag,
        }),
        ..Default::default()
    }
}

pub fn cla(name: &str, tag: u32) -> ClusterLoadAssignment {
    ClusterLoadAssignment {
        cluster_name: name.into(),
        named_endpoints: [(format!("tag{tag}"), Default::default())].into(),
        ..Default::default()
    }
}

pub fn listener(name: &str, route: &str) -> Listener {
    let hcm = HttpConnectionManager {
        stat_prefix: name.into(),
        route_specifier: Some(RouteSpecifier::Rds(Rds {
            config_source: None,
            route_config_name: route.into(),
        })),
        ..Default::default()
    };
    Listener {
        name: name.into(),
        filter_chains: vec![FilterChain {
            filters: vec![Filter {
                name: "envoy.filters.network.http_connection_manager".into(),
                config_type: Some(filter::ConfigType::TypedConfig(
                    envoy_types::util::pack_any(hcm),
                )),
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// A route configuration; `to` is the cluster it routes to (encoded in the name of a virtual host so
/// the content changes when the target changes).
pub fn route(name: &str, to: &str) -> RouteConfiguration {
    RouteConfiguration {
        name: name.into(),
        virtual_hosts: vec![envoy_types::pb::envoy::config::route::v3::VirtualHost {
            name: to.into(),
            domains: vec!["*".into()],
            ..Default::default()
        }],
        ..Default::default()
    }
}

pub fn secret(name: &str, tag: u32) -> Secret {
    Secret {
        name: name.to_string(),
        r#type: Some(
            envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::secret::Type::GenericSecret(
                envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::GenericSecret {
                    secret: Some(envoy_types::pb::envoy::config::core::v3::DataSource {
                        specifier: Some(
                            envoy_types::pb::envoy::config::core::v3::data_source::Specifier::InlineString(
                                format!("v{tag}"),
                            ),
                        ),
                        watched_directory: None,
                    }),
                    secrets: Default::default(),
                },
            ),
        ),
    }
}

/// A mesh of clusters (EDS, each with a CLA), one listener `l` with route `r` pointing at `route_to`.
pub struct Fx {
    pub clusters: Vec<(String, u32)>,
    pub cla_tag: u32,
    pub route_to: String,
    pub secrets: Vec<(String, u32)>,
}

impl Fx {
    pub fn new(clusters: &[&str], route_to: &str) -> Fx {
        Fx {
            clusters: clusters.iter().map(|c| (c.to_string(), 0)).collect(),
            cla_tag: 0,
            route_to: route_to.into(),
            secrets: vec![],
        }
    }
    pub fn build(&self) -> Arc<ResourceSnapshot> {
        let mut b = SnapshotBuilder::new();
        for (c, tag) in &self.clusters {
            b.add(&eds_cluster(c, *tag)).unwrap();
            b.add(&cla(c, self.cla_tag)).unwrap();
        }
        b.add(&listener("l", "r")).unwrap();
        b.add(&route("r", &self.route_to)).unwrap();
        for (s, tag) in &self.secrets {
            b.add(&secret(s, *tag)).unwrap();
        }
        Arc::new(b.build())
    }
}

pub fn node() -> Node {
    Node {
        id: "gw~1".into(),
        cluster: "winmesh-gateway".into(),
        ..Default::default()
    }
}

pub fn names(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

pub fn req(t: TypeUrl, resource_names: &[&str], nonce: &str) -> DiscoveryRequest {
    DiscoveryRequest {
        type_url: t.as_str().into(),
        resource_names: names(resource_names),
        response_nonce: nonce.into(),
        ..Default::default()
    }
}

pub fn first_req(t: TypeUrl, resource_names: &[&str]) -> DiscoveryRequest {
    DiscoveryRequest {
        node: Some(node()),
        ..req(t, resource_names, "")
    }
}

pub fn nack(t: TypeUrl, resource_names: &[&str], nonce: &str, msg: &str) -> DiscoveryRequest {
    DiscoveryRequest {
        error_detail: Some(Status {
            code: 3,
            message: msg.into(),
            details: vec![],
        }),
        ..req(t, resource_names, nonce)
    }
}

pub fn dreq(t: TypeUrl, sub: &[&str], unsub: &[&str], nonce: &str) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        type_url: t.as_str().into(),
        resource_names_subscribe: names(sub),
        resource_names_unsubscribe: names(unsub),
        response_nonce: nonce.into(),
        ..Default::default()
    }
}

pub fn dnack(t: TypeUrl, nonce: &str, msg: &str) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        error_detail: Some(Status {
            code: 3,
            message: msg.into(),
            details: vec![],
        }),
        ..dreq(t, &[], &[], nonce)
    }
}
