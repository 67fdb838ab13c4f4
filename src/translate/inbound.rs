//! Linux → Windows: the gateway terminates Istio mTLS and forwards to Windows backends.
//!
//! One listener per gateway port. Each Windows service on that port gets a filter chain selected by the
//! SNI Istio clients send (`outbound_.<port>_._.<host>`), so one port serves many services, each with its
//! own certificate if configured. The chain requires a client certificate chaining to `ROOTCA` with a URI
//! SAN in the trust domain, offers ALPN `h2`, `http/1.1` (never `istio-peer-exchange`), and for HTTP runs
//! an HCM that strips Istio's peer-metadata headers, sets XFCC to the caller's SPIFFE ID, applies
//! AuthorizationPolicy, and routes to `inbound|<port>||<host>` (plain HTTP to the Windows backends). There
//! is no default chain: unknown SNI and plaintext are refused, never forwarded.

use std::collections::BTreeMap;

use envoy_types::pb::envoy::config::listener::v3::{FilterChain, FilterChainMatch, Listener};
use envoy_types::pb::envoy::config::route::v3::{
    Route, RouteAction, RouteConfiguration, RouteMatch, VirtualHost, route, route_action,
    route_match,
};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager,
    http_connection_manager::{
        CodecType, ForwardClientCertDetails, RouteSpecifier, SetCurrentClientCertDetails,
    },
};
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{
    TcpProxy, tcp_proxy::ClusterSpecifier,
};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::DownstreamTlsContext;
use envoy_types::pb::google::protobuf::BoolValue;

use super::Ctx;
use super::common::*;
use super::rbac;
use crate::assemble::Translated;
use crate::model::{AuthorizationPolicy, Mesh, WindowsPort, WindowsService};

/// Headers Istio clients add for telemetry; never forwarded to Windows apps.
pub const PEER_METADATA_HEADERS: [&str; 2] = ["x-envoy-peer-metadata", "x-envoy-peer-metadata-id"];

pub fn listener_name(port: u16) -> String {
    format!("winmesh_inbound_{port}")
}

/// Policies name service ports; the RBAC filter sees the gateway listener port.
fn gateway_port(svc: &WindowsService, port: u16) -> u32 {
    u32::from(
        svc.ports
            .iter()
            .find(|x| x.port == port)
            .map(|x| x.gateway_port)
            .unwrap_or(port),
    )
}

/// The policies for `svc`, with principals widened to the trust domain's aliases as Istio does.
fn policies(mesh: &Mesh, ctx: &Ctx, svc: &WindowsService) -> Vec<AuthorizationPolicy> {
    let tds: Vec<String> = std::iter::once(mesh.trust_domain.clone())
        .chain(ctx.trust_domain_aliases.iter().cloned())
        .collect();
    mesh.policies_for(svc)
        .map(|p| rbac::with_trust_domain_aliases(p, &tds))
        .collect()
}

fn http_chain_filters(
    mesh: &Mesh,
    ctx: &Ctx,
    svc: &WindowsService,
    p: &WindowsPort,
    cluster: &str,
    notes: &mut Vec<String>,
) -> Vec<envoy_types::pb::envoy::config::listener::v3::Filter> {
    let owned = policies(mesh, ctx, svc);
    let policies: Vec<&AuthorizationPolicy> = owned.iter().collect();
    let mut http_filters = rbac::http_filters(&policies, &|p| gateway_port(svc, p), notes);
    http_filters.push(router());
    let route_config = RouteConfiguration {
        name: cluster.to_string(),
        request_headers_to_remove: PEER_METADATA_HEADERS
            .iter()
            .map(|h| h.to_string())
            .collect(),
        virtual_hosts: vec![VirtualHost {
            name: cluster.to_string(),
            domains: vec!["*".into()],
            routes: vec![Route {
                name: "default".into(),
                r#match: Some(RouteMatch {
                    path_specifier: Some(route_match::PathSpecifier::Prefix("/".into())),
                    ..Default::default()
                }),
                action: Some(route::Action::Route(RouteAction {
                    cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(
                        cluster.into(),
                    )),
                    timeout: duration(0),
                    ..Default::default()
                })),
                ..Default::default()
            }],
            ..Default::default()
        }],
        validate_clusters: Some(BoolValue { value: false }),
        ..Default::default()
    };
    let hcm = HttpConnectionManager {
        stat_prefix: cluster.to_string(),
        codec_type: CodecType::Auto as i32,
        route_specifier: Some(RouteSpecifier::RouteConfig(route_config)),
        http_filters,
        // RFC 3986 normalization before RBAC sees the path (Istio's default `BASE`), so `/a/../admin`
        // cannot slip past a policy on `/admin/*`; merging slashes closes `//admin` the same way.
        normalize_path: Some(BoolValue { value: true }),
        merge_slashes: true,
        // Replace any XFCC the caller sent with the verified client identity.
        forward_client_cert_details: ForwardClientCertDetails::SanitizeSet as i32,
        set_current_client_cert_details: Some(SetCurrentClientCertDetails {
            uri: true,
            ..Default::default()
        }),
        ..Default::default()
    };
    let _ = p;
    vec![network_filter(
        "envoy.filters.network.http_connection_manager",
        hcm,
    )]
}

fn tcp_chain_filters(
    mesh: &Mesh,
    ctx: &Ctx,
    svc: &WindowsService,
    cluster: &str,
    notes: &mut Vec<String>,
) -> Vec<envoy_types::pb::envoy::config::listener::v3::Filter> {
    let owned = policies(mesh, ctx, svc);
    let policies: Vec<&AuthorizationPolicy> = owned.iter().collect();
    let mut filters = rbac::network_filters(&policies, cluster, &|p| gateway_port(svc, p), notes);
    filters.push(network_filter(
        "envoy.filters.network.tcp_proxy",
        TcpProxy {
            stat_prefix: cluster.into(),
            cluster_specifier: Some(ClusterSpecifier::Cluster(cluster.into())),
            ..Default::default()
        },
    ));
    filters
}

/// MeshConfig `meshMTLS` on a server-side context, as Istio's inbound builder applies it: minimum
/// version (default TLS 1.2), maximum TLS 1.3, the cipher suites (default Istio's six), and ECDH curves
/// only when set.
fn apply_mesh_mtls(
    common: &mut envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::CommonTlsContext,
    m: &crate::config::MeshMtls,
) {
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::tls_parameters::TlsProtocol;
    let params = common.tls_params.get_or_insert_with(Default::default);
    params.tls_minimum_protocol_version = match m.min_protocol_version {
        crate::config::TlsVersion::Tls12 => TlsProtocol::TlSv12 as i32,
        crate::config::TlsVersion::Tls13 => TlsProtocol::TlSv13 as i32,
    };
    params.tls_maximum_protocol_version = TlsProtocol::TlSv13 as i32;
    params.cipher_suites = m.cipher_suites.clone();
    params.ecdh_curves = m.ecdh_curves.clone();
}

pub fn translate(mesh: &Mesh, ctx: &Ctx, out: &mut Translated, notes: &mut Vec<String>) {
    // gateway port → chains
    let mut by_port: BTreeMap<u16, Vec<FilterChain>> = BTreeMap::new();
    for svc in &mesh.windows_services {
        // An identity istiod has not signed (yet) must not hold the shared port's listener back:
        // meanwhile the gateway presents its own, which Istio clients accept for these services
        // (the gateway pods are their endpoints, so istiod lists the gateway's account too).
        let cert = match svc.identity.as_ref() {
            Some(id) if !ctx.has_cert(id) => {
                notes.push(format!(
                    "{}: no certificate for {id} yet; presenting the gateway's own identity meanwhile",
                    svc.host
                ));
                ctx.sds_name_for(None)
            }
            id => ctx.sds_name_for(id),
        };
        for p in &svc.ports {
            let cluster = inbound_cluster_name(p.port, &svc.host);
            let http = !p.protocol.is_tcp();
            // An Istio sidecar's inbound chains offer `h2, http/1.1` on HTTP and TCP chains alike
            // (istio/istio pilot/pkg/security/authn/utils/utils.go), never `istio-peer-exchange`.
            let alpn: &[&str] = &["h2", "http/1.1"];
            let mut common = common_tls(
                &cert,
                std::iter::once(&mesh.trust_domain)
                    .chain(ctx.trust_domain_aliases.iter())
                    .map(|td| uri_san(prefix(&format!("spiffe://{td}/"))))
                    .collect(),
                alpn,
                ctx.secrets_via,
            );
            apply_mesh_mtls(&mut common, &ctx.mesh_mtls);
            let tls = DownstreamTlsContext {
                require_client_certificate: Some(BoolValue { value: true }),
                common_tls_context: Some(common),
                ..Default::default()
            };
            let filters = if http {
                http_chain_filters(mesh, ctx, svc, p, &cluster, notes)
            } else {
                tcp_chain_filters(mesh, ctx, svc, &cluster, notes)
            };
            by_port
                .entry(p.gateway_port)
                .or_default()
                .push(FilterChain {
                    name: cluster.clone(),
                    filter_chain_match: Some(FilterChainMatch {
                        server_names: vec![istio_sni(p.port, &svc.host)],
                        transport_protocol: "tls".into(),
                        ..Default::default()
                    }),
                    filters,
                    transport_socket: Some(transport_socket("envoy.transport_sockets.tls", tls)),
                    ..Default::default()
                });
            // HTTP/2 to the Windows app for HTTP/2 and gRPC ports (h2c inside the node).
            out.clusters
                .push(eds_cluster(&cluster, p.protocol.is_http2()));
            let eps: Vec<Ep> = svc
                .backends
                .iter()
                .map(|b| Ep {
                    ip: b.address,
                    port: b.port_for(p),
                    tls_mode_istio: false,
                    // Another node's pod: failover only (the plaintext hop leaves the node).
                    priority: u32::from(b.remote),
                })
                .collect();
            out.endpoints.push(cla(&cluster, &eps));
        }
    }
    for (port, chains) in by_port {
        out.listeners.push(Listener {
            name: listener_name(port),
            address: Some(socket_address(mesh.gateway.inbound_address, port)),
            listener_filters: vec![tls_inspector()],
            filter_chains: chains,
            ..Default::default()
        });
    }
}
