//! Windows → Linux: the gateway originates Istio mTLS exactly like a sidecar client.
//!
//! Windows apps use one HTTP listener (as their HTTP proxy, or addressed directly with the service's
//! Host header). Virtual hosts carry Istio-style domains (`name`, `name.ns`, `name.ns.svc`, the FQDN, each
//! also with `:port`) and route to `outbound|<port>||<fqdn>` EDS clusters. Endpoints carry `tlsMode`
//! metadata and clusters use `transport_socket_matches`, as Istio's auto-mTLS does: `tlsMode: istio`
//! endpoints get Istio mTLS (SNI `outbound_.<port>_._.<fqdn>`, a fixed ALPN per protocol, the gateway
//! certificate, `ROOTCA` + the exact SANs of the destination's service accounts); others get plaintext.
//! An endpoint whose effective PeerAuthentication is DISABLE (its namespace's, by its port, else the
//! mesh-wide one in the root namespace) gets plaintext. TCP services can have a local TCP port.

use std::collections::{BTreeMap, BTreeSet};

use envoy_types::pb::envoy::config::cluster::v3::cluster::TransportSocketMatch;
use envoy_types::pb::envoy::config::core::v3::CidrRange;
use envoy_types::pb::envoy::config::core::v3::Metadata;
use envoy_types::pb::envoy::config::listener::v3::{FilterChain, FilterChainMatch, Listener};
use envoy_types::pb::envoy::config::route::v3::{
    RetryPolicy, Route, RouteAction, RouteConfiguration, RouteMatch, VirtualHost, retry_policy,
    route, route_action, route_match,
};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, Rds,
    http_connection_manager::{CodecType, RouteSpecifier},
};
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{
    TcpProxy, tcp_proxy::ClusterSpecifier,
};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::UpstreamTlsContext;
use envoy_types::pb::google::protobuf::{
    BoolValue, ListValue, Struct, UInt32Value, Value, value::Kind,
};
use tracing::warn;

use super::Ctx;
use super::common::*;
use crate::assemble::Translated;
use crate::bootstrap::ads_config_source;
use crate::model::{Mesh, Service, ServicePort, TlsMode};

/// The shared Windows-facing HTTP listener; its route configuration has the same name.
pub const HTTP_LISTENER: &str = "winmesh_outbound_http";

pub fn tcp_listener_name(local_port: u16) -> String {
    format!("winmesh_outbound_tcp_{local_port}")
}

/// Listener (and route configuration) of a Windows service's own outbound port.
pub fn caller_listener_name(namespace: &str, name: &str) -> String {
    format!("winmesh_outbound_http_{namespace}_{name}")
}

/// Route configuration (and HCM stat prefix) for calls on the shared outbound port from the pods
/// of one identity, matched by source address.
pub fn source_route_name(id: &crate::identity::SpiffeId) -> String {
    format!(
        "winmesh_outbound_http_sa_{}_{}",
        id.namespace, id.service_account
    )
}

/// Who the gateway is when it calls Linux services: itself (the shared HTTP port and the local TCP
/// ports), a Windows service with its own identity and outbound port, or the Windows pods of one
/// identity calling on the shared port (told apart by their source addresses).
struct Caller {
    /// SDS name of the client certificate.
    cert: String,
    /// Appended to cluster names (empty for the gateway itself).
    cluster_suffix: String,
    /// Route configuration name (and listener name, for a caller with its own port).
    listener: String,
    /// Its own listener port; `None`: a filter chain of the shared outbound listener.
    port: Option<u16>,
    /// Source addresses that select this caller on the shared listener.
    sources: Vec<std::net::IpAddr>,
    /// Local TCP ports belong to the gateway's own identity.
    tcp_ports: bool,
}

impl Caller {
    fn gateway(mesh: &Mesh) -> Caller {
        Caller {
            cert: super::secret::DEFAULT.into(),
            cluster_suffix: String::new(),
            listener: HTTP_LISTENER.into(),
            port: Some(mesh.gateway.outbound_port),
            sources: vec![],
            tcp_ports: true,
        }
    }

    fn windows_services(mesh: &Mesh) -> Vec<Caller> {
        mesh.windows_services
            .iter()
            .filter_map(|w| {
                let (id, port) = (w.identity.as_ref()?, w.outbound_port?);
                Some(Caller {
                    cert: id.to_string(),
                    cluster_suffix: format!("|as-{}.{}", w.name, w.namespace),
                    listener: caller_listener_name(&w.namespace, &w.name),
                    port: Some(port),
                    sources: vec![],
                    tcp_ports: false,
                })
            })
            .collect()
    }

    /// One caller per identity of the Windows pods on this node (services from Kubernetes). An
    /// address claimed by two identities (a pod behind two services that present different
    /// accounts) stays with the first, by SPIFFE ID, and is reported.
    fn by_source<'m>(
        mesh: &'m Mesh,
        ctx: &Ctx,
        warnings: &mut Vec<String>,
    ) -> Vec<(Caller, &'m crate::identity::SpiffeId)> {
        let mut by_id: BTreeMap<&crate::identity::SpiffeId, BTreeSet<std::net::IpAddr>> =
            BTreeMap::new();
        for w in &mesh.windows_services {
            let (Some(id), Some(o)) = (w.identity.as_ref(), w.origin.as_ref()) else {
                continue;
            };
            by_id.entry(id).or_default().extend(o.local_pod_ips.iter());
        }
        let mut owner: BTreeMap<std::net::IpAddr, &crate::identity::SpiffeId> = BTreeMap::new();
        let mut out = Vec::new();
        for (id, ips) in by_id {
            let mut sources = Vec::new();
            for ip in ips {
                match owner.get(&ip) {
                    Some(first) => warnings.push(format!(
                        "Windows pod {ip} backs services presenting {first} and {id}; its calls \
                         leave as {first}"
                    )),
                    None => {
                        owner.insert(ip, id);
                        sources.push(ip);
                    }
                }
            }
            if sources.is_empty() {
                continue;
            }
            out.push((
                Caller {
                    cert: ctx.sds_name_for(Some(id)),
                    cluster_suffix: format!("|sa-{}.{}", id.service_account, id.namespace),
                    listener: source_route_name(id),
                    port: None,
                    sources,
                    tcp_ports: false,
                },
                id,
            ));
        }
        out
    }
}

fn mtls_socket_match(
    svc: &Service,
    p: &ServicePort,
    mesh: &Mesh,
    ctx: &Ctx,
    caller: &Caller,
) -> TransportSocketMatch {
    let sans = svc
        .expected_sans(&mesh.trust_domain)
        .iter()
        .map(|s| uri_san(exact(s)))
        .collect();
    let tls = UpstreamTlsContext {
        sni: istio_sni(p.port, &svc.host),
        common_tls_context: Some(common_tls(
            &caller.cert,
            sans,
            p.protocol.istio_client_alpn(),
            ctx.secrets_via,
        )),
        ..Default::default()
    };
    TransportSocketMatch {
        name: "tlsMode-istio".into(),
        r#match: Some(Struct {
            fields: [(
                "tlsMode".to_string(),
                Value {
                    kind: Some(Kind::StringValue("istio".into())),
                },
            )]
            .into(),
        }),
        transport_socket: Some(transport_socket("envoy.transport_sockets.tls", tls)),
    }
}

fn cluster_for(
    svc: &Service,
    p: &ServicePort,
    mesh: &Mesh,
    ctx: &Ctx,
    caller: &Caller,
    out: &mut Translated,
) -> String {
    let name = format!(
        "{}{}",
        outbound_cluster_name(p.port, &svc.host),
        caller.cluster_suffix
    );
    let mut c = eds_cluster(&name, p.protocol.is_http2());
    c.transport_socket_matches = vec![
        mtls_socket_match(svc, p, mesh, ctx, caller),
        TransportSocketMatch {
            name: "tlsMode-disabled".into(),
            r#match: Some(Struct::default()),
            transport_socket: Some(raw_buffer()),
        },
    ];
    // As Istio's endpoint builder does: an endpoint whose effective PeerAuthentication (by its own
    // port) is DISABLE loses its tlsMode label, so the plaintext socket match applies to it.
    let mut plaintext_ports = BTreeSet::new();
    let eps: Vec<Ep> = svc
        .endpoints
        .iter()
        .filter(|e| e.ready)
        .filter_map(|e| e.port_for(p).map(|port| (e, port)))
        .map(|(e, port)| {
            let disabled = mesh.endpoint_gets_plaintext(svc, e, port);
            if disabled {
                plaintext_ports.insert(port);
            }
            Ep {
                ip: e.address,
                port,
                tls_mode_istio: e.tls_mode == TlsMode::Istio && !disabled,
                priority: 0,
            }
        })
        .collect();
    // Envoy applies an endpoint's new metadata to new connections only; pooled ones keep their old
    // transport. Recording the PeerAuthentication outcome on the cluster makes a policy change
    // replace the cluster, and with it the connection pools, so STRICT ⇄ DISABLE takes effect at once.
    if !plaintext_ports.is_empty() {
        let ports = plaintext_ports
            .iter()
            .map(|p| Value {
                kind: Some(Kind::NumberValue(f64::from(*p))),
            })
            .collect();
        c.metadata = Some(Metadata {
            filter_metadata: [(
                "winmesh".to_string(),
                Struct {
                    fields: [(
                        "peer_authentication_disabled_ports".to_string(),
                        Value {
                            kind: Some(Kind::ListValue(ListValue { values: ports })),
                        },
                    )]
                    .into(),
                },
            )]
            .into(),
            ..Default::default()
        });
    }
    out.clusters.push(c);
    out.endpoints.push(cla(&name, &eps));
    name
}

/// Istio's default retry policy for outbound HTTP routes.
fn istio_retry() -> RetryPolicy {
    RetryPolicy {
        retry_on: "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes".into(),
        num_retries: Some(UInt32Value { value: 2 }),
        retry_host_predicate: vec![retry_policy::RetryHostPredicate {
            name: "envoy.retry_host_predicates.previous_hosts".into(),
            config_type: Some(retry_policy::retry_host_predicate::ConfigType::TypedConfig(
                envoy_types::util::pack_any(
                    envoy_types::pb::envoy::extensions::retry::host::previous_hosts::v3::PreviousHostsPredicate::default(),
                ),
            )),
        }],
        host_selection_retry_max_attempts: 5,
        retriable_status_codes: vec![503],
        ..Default::default()
    }
}

pub fn translate(mesh: &Mesh, ctx: &Ctx, out: &mut Translated, warnings: &mut Vec<String>) {
    shared_and_callers(mesh, ctx, out, warnings);
    for w in warnings.iter() {
        warn!("{w}");
    }
}

fn shared_and_callers(mesh: &Mesh, ctx: &Ctx, out: &mut Translated, warnings: &mut Vec<String>) {
    let gateway = Caller::gateway(mesh);
    let mut shared = vec![translate_for(mesh, ctx, &gateway, out, warnings)];
    for caller in Caller::windows_services(mesh) {
        // Host-name warnings are the same for every caller: report them once.
        translate_for(mesh, ctx, &caller, out, &mut Vec::new());
    }
    let by_source = Caller::by_source(mesh, ctx, warnings);
    for (caller, id) in &by_source {
        if ctx.has_cert(id) {
            shared.push(translate_for(mesh, ctx, caller, out, &mut Vec::new()));
        } else {
            // Its pods must not call as someone else: 503 until the certificate exists.
            warnings.push(format!(
                "no certificate for {id} yet: calls from its Windows pods get 503 meanwhile"
            ));
            shared.push(Some(unavailable_chain(caller, id)));
        }
    }
    // The shared outbound listener: a chain per identity selected by the caller's address (Envoy
    // picks the most specific source match), and the gateway's own chain for everyone else,
    // unless unknown callers are refused (then only known Windows pods get a chain at all).
    let mut chains: Vec<FilterChain> = shared.into_iter().flatten().collect();
    if mesh.gateway.refuse_unknown_callers {
        chains.retain(|c| c.filter_chain_match.is_some());
    }
    // Envoy takes no listener without chains: with no caller to accept, the port stays closed.
    if chains.is_empty() {
        return;
    }
    out.listeners.push(Listener {
        name: HTTP_LISTENER.into(),
        address: Some(socket_address(
            mesh.gateway.outbound_address,
            mesh.gateway.outbound_port,
        )),
        filter_chains: chains,
        ..Default::default()
    });
}

fn source_match(sources: &[std::net::IpAddr]) -> Option<FilterChainMatch> {
    (!sources.is_empty()).then(|| FilterChainMatch {
        source_prefix_ranges: sources
            .iter()
            .map(|ip| CidrRange {
                address_prefix: ip.to_string(),
                prefix_len: Some(UInt32Value {
                    value: if ip.is_ipv4() { 32 } else { 128 },
                }),
            })
            .collect(),
        ..Default::default()
    })
}

/// A source-matched chain that answers 503 (its identity has no certificate yet).
fn unavailable_chain(caller: &Caller, id: &crate::identity::SpiffeId) -> FilterChain {
    use envoy_types::pb::envoy::config::core::v3::{DataSource, data_source};
    use envoy_types::pb::envoy::config::route::v3::DirectResponseAction;
    let hcm = HttpConnectionManager {
        stat_prefix: caller.listener.clone(),
        codec_type: CodecType::Auto as i32,
        route_specifier: Some(RouteSpecifier::RouteConfig(RouteConfiguration {
            name: caller.listener.clone(),
            virtual_hosts: vec![VirtualHost {
                name: "unavailable".into(),
                domains: vec!["*".into()],
                routes: vec![Route {
                    r#match: Some(RouteMatch {
                        path_specifier: Some(route_match::PathSpecifier::Prefix("/".into())),
                        ..Default::default()
                    }),
                    action: Some(route::Action::DirectResponse(DirectResponseAction {
                        status: 503,
                        body: Some(DataSource {
                            specifier: Some(data_source::Specifier::InlineString(format!(
                                "winmesh: no certificate for {id} yet\n"
                            ))),
                            ..Default::default()
                        }),
                        body_format: None,
                    })),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        })),
        http_filters: vec![router()],
        ..Default::default()
    };
    FilterChain {
        name: caller.listener.clone(),
        filter_chain_match: source_match(&caller.sources),
        filters: vec![network_filter(
            "envoy.filters.network.http_connection_manager",
            hcm,
        )],
        ..Default::default()
    }
}

/// The clusters and route configuration of one caller, and its own listener if it has a port.
/// For the shared outbound listener, returns the filter chain instead.
fn translate_for(
    mesh: &Mesh,
    ctx: &Ctx,
    caller: &Caller,
    out: &mut Translated,
    warnings: &mut Vec<String>,
) -> Option<FilterChain> {
    // Short names (`name`, `name:port`) only where unambiguous across namespaces.
    let mut name_count: BTreeMap<&str, usize> = BTreeMap::new();
    for s in &mesh.services {
        *name_count.entry(s.name.as_str()).or_default() += 1;
    }
    let mut used: BTreeSet<String> = BTreeSet::new();
    let mut vhosts = Vec::new();
    for svc in &mesh.services {
        let http_ports: Vec<&ServicePort> =
            svc.ports.iter().filter(|p| !p.protocol.is_tcp()).collect();
        // Port-less names go to port 80 if the service has it, else to its lowest HTTP port.
        let bare_port = http_ports
            .iter()
            .find(|p| p.port == 80)
            .or_else(|| http_ports.iter().min_by_key(|p| p.port))
            .map(|p| p.port);
        for p in &svc.ports {
            let cluster = cluster_for(svc, p, mesh, ctx, caller, out);
            if let Some(lp) = p.local_port.filter(|_| caller.tcp_ports) {
                out.listeners.push(Listener {
                    name: tcp_listener_name(lp),
                    address: Some(socket_address(mesh.gateway.outbound_address, lp)),
                    filter_chains: vec![FilterChain {
                        filters: vec![network_filter(
                            "envoy.filters.network.tcp_proxy",
                            TcpProxy {
                                stat_prefix: cluster.clone(),
                                cluster_specifier: Some(ClusterSpecifier::Cluster(cluster.clone())),
                                ..Default::default()
                            },
                        )],
                        ..Default::default()
                    }],
                    ..Default::default()
                });
            }
            if p.protocol.is_tcp() {
                continue;
            }
            let mut names = vec![
                svc.host.clone(),
                format!("{}.{}.svc", svc.name, svc.namespace),
                format!("{}.{}", svc.name, svc.namespace),
            ];
            if name_count.get(svc.name.as_str()) == Some(&1) {
                names.push(svc.name.clone());
            }
            let mut domains: Vec<String> =
                names.iter().map(|n| format!("{n}:{}", p.port)).collect();
            if bare_port == Some(p.port) {
                domains.extend(names.iter().cloned());
            }
            let before = domains.len();
            domains.retain(|d| used.insert(d.clone()));
            if domains.len() < before {
                warnings.push(format!(
                    "{}: some host names are already used by another service and were left out",
                    cluster
                ));
            }
            if domains.is_empty() {
                continue;
            }
            vhosts.push(VirtualHost {
                name: format!("{}:{}", svc.host, p.port),
                domains,
                routes: vec![Route {
                    name: "default".into(),
                    r#match: Some(RouteMatch {
                        path_specifier: Some(route_match::PathSpecifier::Prefix("/".into())),
                        ..Default::default()
                    }),
                    action: Some(route::Action::Route(RouteAction {
                        cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(cluster)),
                        timeout: duration(0),
                        retry_policy: Some(istio_retry()),
                        ..Default::default()
                    })),
                    ..Default::default()
                }],
                ..Default::default()
            });
        }
    }
    out.routes.push(RouteConfiguration {
        name: caller.listener.clone(),
        virtual_hosts: vhosts,
        validate_clusters: Some(BoolValue { value: false }),
        ..Default::default()
    });
    let hcm = HttpConnectionManager {
        stat_prefix: caller.listener.clone(),
        codec_type: CodecType::Auto as i32,
        route_specifier: Some(RouteSpecifier::Rds(Rds {
            config_source: Some(ads_config_source()),
            route_config_name: caller.listener.clone(),
        })),
        http_filters: vec![router()],
        ..Default::default()
    };
    let chain = FilterChain {
        // Named when selected by source (the gateway's own chain keeps the unnamed default).
        name: if caller.sources.is_empty() {
            String::new()
        } else {
            caller.listener.clone()
        },
        filter_chain_match: source_match(&caller.sources),
        filters: vec![network_filter(
            "envoy.filters.network.http_connection_manager",
            hcm,
        )],
        ..Default::default()
    };
    match caller.port {
        Some(port) if port != mesh.gateway.outbound_port => {
            out.listeners.push(Listener {
                name: caller.listener.clone(),
                address: Some(socket_address(mesh.gateway.outbound_address, port)),
                filter_chains: vec![chain],
                ..Default::default()
            });
            None
        }
        _ => Some(chain),
    }
}
