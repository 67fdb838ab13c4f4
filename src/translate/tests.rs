//! Unit tests of the generated Envoy resources (golden files and real-Envoy validation live in
//! integration/golden.rs).

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::{address, socket_address};
use envoy_types::pb::envoy::config::endpoint::v3::lb_endpoint;
use envoy_types::pb::envoy::config::listener::v3::{Listener, filter};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager,
    http_connection_manager::{ForwardClientCertDetails, RouteSpecifier},
};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    DownstreamTlsContext, UpstreamTlsContext, common_tls_context::ValidationContextType,
};
use envoy_types::pb::envoy::r#type::matcher::v3::string_matcher::MatchPattern;
use prost::Message;

use super::*;
use crate::discovery::file::{FileSettings, parse};
use crate::model::MtlsMode;

fn settings() -> FileSettings {
    FileSettings::for_tests()
}

const MESH: &str = r#"
services:
  - name: reviews
    namespace: default
    ports:
      - {name: http, port: 9080}
      - {name: grpc-api, port: 9090}
      - {name: tcp-db, port: 5432, local_port: 25432}
    service_accounts: [bookinfo-reviews-v2]
    endpoints:
      - {address: 10.0.0.1, service_account: bookinfo-reviews}
      - {address: 10.0.0.2, service_account: bookinfo-reviews, tls_mode: disabled}
      - {address: 10.0.0.3, service_account: bookinfo-reviews, ready: false}
  - name: legacy
    namespace: plain
    ports: [{name: http, port: 80}]
    endpoints: [{address: 10.0.1.1}]
  - name: reviews
    namespace: other
    ports: [{name: http, port: 9080}]
windows_services:
  - name: winapp
    namespace: win
    identity: spiffe://cluster.local/ns/win/sa/winapp
    ports:
      - {name: http, port: 8080, gateway_port: 15443, target_port: 80}
      - {name: tcp, port: 9000}
    backends: [192.168.1.10, 192.168.1.11]
peer_authentications:
  - {namespace: plain, mode: DISABLE}
authorization_policies:
  - name: deny-bad
    namespace: win
    action: DENY
    rules: [{from: [{source: {principals: [cluster.local/ns/x/sa/bad]}}]}]
"#;

fn translated() -> Translated {
    let (mesh, errs) = parse(MESH, &settings()).unwrap();
    assert!(errs.is_empty(), "{errs:?}");
    let ctx = Ctx {
        certified: None,
        mesh_mtls: Default::default(),
        secrets_via: crate::config::SecretsVia::Ads,
        trust_domain_aliases: vec![],
        default_identity: SpiffeId::parse("spiffe://cluster.local/ns/winmesh/sa/gw").unwrap(),
    };
    translate(&mesh, &ctx).0
}

fn listener<'a>(t: &'a Translated, name: &str) -> &'a Listener {
    t.listeners
        .iter()
        .find(|l| l.name == name)
        .unwrap_or_else(|| panic!("no listener {name}"))
}

fn cluster<'a>(t: &'a Translated, name: &str) -> &'a Cluster {
    t.clusters
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no cluster {name}"))
}

fn hcm(l: &Listener, chain: usize) -> HttpConnectionManager {
    let Some(filter::ConfigType::TypedConfig(any)) =
        &l.filter_chains[chain].filters.last().unwrap().config_type
    else {
        panic!("typed config")
    };
    HttpConnectionManager::decode(any.value.as_slice()).unwrap()
}

#[test]
fn inbound_chain_is_istio_server_side() {
    let t = translated();
    let l = listener(&t, "winmesh_inbound_15443");
    assert_eq!(
        l.listener_filters[0].name,
        "envoy.filters.listener.tls_inspector"
    );
    assert!(
        l.default_filter_chain.is_none(),
        "no default chain: unknown SNI and plaintext are refused"
    );
    assert_eq!(l.filter_chains.len(), 1);
    let fc = &l.filter_chains[0];
    let m = fc.filter_chain_match.as_ref().unwrap();
    assert_eq!(
        m.server_names,
        vec!["outbound_.8080_._.winapp.win.svc.cluster.local"]
    );
    assert_eq!(m.transport_protocol, "tls");
    let Some(envoy_types::pb::envoy::config::core::v3::transport_socket::ConfigType::TypedConfig(
        any,
    )) = &fc.transport_socket.as_ref().unwrap().config_type
    else {
        panic!()
    };
    let tls = DownstreamTlsContext::decode(any.value.as_slice()).unwrap();
    assert!(tls.require_client_certificate.unwrap().value);
    let common = tls.common_tls_context.unwrap();
    assert_eq!(common.alpn_protocols, vec!["h2", "http/1.1"]);
    // Istio's inbound TLS parameters: 1.2–1.3 and its six TLS 1.2 suites, no curves of its own.
    let params = common.tls_params.clone().unwrap();
    assert_eq!(params.tls_minimum_protocol_version, 3, "TLSv1_2");
    assert_eq!(params.tls_maximum_protocol_version, 4, "TLSv1_3");
    assert_eq!(
        params.cipher_suites,
        crate::config::ISTIO_DEFAULT_CIPHER_SUITES.to_vec()
    );
    assert!(params.ecdh_curves.is_empty());
    assert_eq!(
        common.tls_certificate_sds_secret_configs[0].name,
        "spiffe://cluster.local/ns/win/sa/winapp"
    );
    let Some(ValidationContextType::CombinedValidationContext(v)) = common.validation_context_type
    else {
        panic!()
    };
    assert_eq!(
        v.validation_context_sds_secret_config.unwrap().name,
        "ROOTCA"
    );
    let san = &v
        .default_validation_context
        .unwrap()
        .match_typed_subject_alt_names[0];
    assert_eq!(
        san.matcher.as_ref().unwrap().match_pattern,
        Some(MatchPattern::Prefix("spiffe://cluster.local/".into()))
    );
    let h = hcm(l, 0);
    assert_eq!(
        h.forward_client_cert_details,
        ForwardClientCertDetails::SanitizeSet as i32
    );
    assert!(h.set_current_client_cert_details.unwrap().uri);
    let names: Vec<&str> = h.http_filters.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(
        names,
        vec!["envoy.filters.http.rbac", "envoy.filters.http.router"]
    );
    let Some(RouteSpecifier::RouteConfig(rc)) = h.route_specifier else {
        panic!()
    };
    assert_eq!(
        rc.request_headers_to_remove,
        vec!["x-envoy-peer-metadata", "x-envoy-peer-metadata-id"]
    );
    // TCP port: tcp_proxy (RBAC first), no ALPN offered.
    let l = listener(&t, "winmesh_inbound_9000");
    let names: Vec<&str> = l.filter_chains[0]
        .filters
        .iter()
        .map(|f| f.name.as_str())
        .collect();
    assert_eq!(
        names,
        vec![
            "envoy.filters.network.rbac",
            "envoy.filters.network.tcp_proxy"
        ]
    );
    // Windows backends, plain, on the target port.
    let cla = t
        .endpoints
        .iter()
        .find(|c| c.cluster_name == "inbound|8080||winapp.win.svc.cluster.local")
        .unwrap();
    assert_eq!(cla.endpoints[0].lb_endpoints.len(), 2);
    assert!(
        cluster(&t, "inbound|8080||winapp.win.svc.cluster.local")
            .transport_socket
            .is_none()
    );
}

fn upstream_tls(c: &Cluster) -> UpstreamTlsContext {
    let m = &c.transport_socket_matches[0];
    assert_eq!(
        m.r#match.as_ref().unwrap().fields["tlsMode"].kind,
        Some(envoy_types::pb::google::protobuf::value::Kind::StringValue(
            "istio".into()
        ))
    );
    let Some(envoy_types::pb::envoy::config::core::v3::transport_socket::ConfigType::TypedConfig(
        any,
    )) = &m.transport_socket.as_ref().unwrap().config_type
    else {
        panic!()
    };
    UpstreamTlsContext::decode(any.value.as_slice()).unwrap()
}

#[test]
fn outbound_clusters_are_istio_client_side() {
    let t = translated();
    let c = cluster(&t, "outbound|9080||reviews.default.svc.cluster.local");
    assert_eq!(c.transport_socket_matches.len(), 2);
    assert_eq!(
        c.transport_socket_matches[1]
            .transport_socket
            .as_ref()
            .unwrap()
            .name,
        "envoy.transport_sockets.raw_buffer"
    );
    let tls = upstream_tls(c);
    assert_eq!(
        tls.sni,
        "outbound_.9080_._.reviews.default.svc.cluster.local"
    );
    let common = tls.common_tls_context.unwrap();
    assert_eq!(
        common.alpn_protocols,
        vec!["istio-http/1.1", "istio", "http/1.1"]
    );
    assert_eq!(common.tls_certificate_sds_secret_configs[0].name, "default");
    let Some(ValidationContextType::CombinedValidationContext(v)) = common.validation_context_type
    else {
        panic!()
    };
    let sans: Vec<_> = v
        .default_validation_context
        .unwrap()
        .match_typed_subject_alt_names
        .into_iter()
        .map(|m| m.matcher.unwrap().match_pattern.unwrap())
        .collect();
    assert_eq!(
        sans,
        vec![
            MatchPattern::Exact("spiffe://cluster.local/ns/default/sa/bookinfo-reviews".into()),
            MatchPattern::Exact("spiffe://cluster.local/ns/default/sa/bookinfo-reviews-v2".into()),
        ]
    );
    assert_eq!(
        upstream_tls(cluster(
            &t,
            "outbound|9090||reviews.default.svc.cluster.local"
        ))
        .common_tls_context
        .unwrap()
        .alpn_protocols,
        vec!["istio-h2", "istio", "h2"]
    );
    assert!(
        cluster(&t, "outbound|9090||reviews.default.svc.cluster.local")
            .typed_extension_protocol_options
            .contains_key("envoy.extensions.upstreams.http.v3.HttpProtocolOptions")
    );
    assert_eq!(
        upstream_tls(cluster(
            &t,
            "outbound|5432||reviews.default.svc.cluster.local"
        ))
        .common_tls_context
        .unwrap()
        .alpn_protocols,
        vec!["istio"]
    );
    // Endpoints: tlsMode metadata only for sidecar endpoints; not-ready ones left out.
    let cla = t
        .endpoints
        .iter()
        .find(|c| c.cluster_name == "outbound|9080||reviews.default.svc.cluster.local")
        .unwrap();
    let eps = &cla.endpoints[0].lb_endpoints;
    assert_eq!(eps.len(), 2);
    assert!(
        eps[0]
            .metadata
            .as_ref()
            .unwrap()
            .filter_metadata
            .contains_key("envoy.transport_socket_match")
    );
    assert!(eps[1].metadata.is_none());
    // PeerAuthentication DISABLE in the destination namespace: its endpoints lose the tlsMode label (as
    // in Istio's endpoint builder), so the plaintext socket match applies.
    let legacy = "outbound|80||legacy.plain.svc.cluster.local";
    assert_eq!(cluster(&t, legacy).transport_socket_matches.len(), 2);
    let legacy_cla = t
        .endpoints
        .iter()
        .find(|c| c.cluster_name == legacy)
        .unwrap();
    assert_eq!(legacy_cla.endpoints[0].lb_endpoints.len(), 1);
    assert!(legacy_cla.endpoints[0].lb_endpoints[0].metadata.is_none());
    // The policy outcome is part of the cluster, so changing it replaces Envoy's connection pools;
    // clusters without a DISABLE outcome carry nothing extra.
    let marker = cluster(&t, legacy)
        .metadata
        .as_ref()
        .unwrap()
        .filter_metadata["winmesh"]
        .fields["peer_authentication_disabled_ports"]
        .clone();
    assert_eq!(
        format!("{marker:?}").matches("NumberValue(80.0)").count(),
        1
    );
    assert!(
        cluster(&t, "outbound|9080||reviews.default.svc.cluster.local")
            .metadata
            .is_none()
    );
    // The TCP port has a local listener.
    assert!(
        t.listeners
            .iter()
            .any(|l| l.name == "winmesh_outbound_tcp_25432")
    );
    // Never istio-peer-exchange anywhere.
    let all = format!("{:?}", t);
    assert!(!all.contains("istio-peer-exchange"));
}

#[test]
fn outbound_routes_have_istio_domains_without_duplicates() {
    let t = translated();
    let rc = t
        .routes
        .iter()
        .find(|r| r.name == "winmesh_outbound_http")
        .unwrap();
    let vh = rc
        .virtual_hosts
        .iter()
        .find(|v| v.name == "reviews.default.svc.cluster.local:9080")
        .unwrap();
    for d in [
        "reviews.default.svc.cluster.local:9080",
        "reviews.default.svc:9080",
        "reviews.default:9080",
        "reviews.default.svc.cluster.local",
        "reviews.default",
    ] {
        assert!(
            vh.domains.contains(&d.to_string()),
            "{d} missing from {:?}",
            vh.domains
        );
    }
    assert!(
        !vh.domains.contains(&"reviews".to_string()),
        "short name is ambiguous across namespaces"
    );
    let legacy = rc
        .virtual_hosts
        .iter()
        .find(|v| v.name == "legacy.plain.svc.cluster.local:80")
        .unwrap();
    assert!(
        legacy.domains.contains(&"legacy".to_string())
            && legacy.domains.contains(&"legacy:80".to_string())
    );
    let mut all: Vec<&String> = rc
        .virtual_hosts
        .iter()
        .flat_map(|v| v.domains.iter())
        .collect();
    let n = all.len();
    all.sort();
    all.dedup();
    assert_eq!(
        all.len(),
        n,
        "duplicate domains would make Envoy reject the route"
    );
    assert!(
        !rc.virtual_hosts.iter().any(|v| v.name.contains("5432")),
        "TCP ports get no virtual host"
    );
}

#[test]
fn bad_objects_are_skipped_and_named_the_rest_is_kept() {
    let text = r#"
services:
  - {name: good, namespace: a, ports: [{name: http, port: 80}]}
  - {name: good, namespace: a, ports: [{name: http, port: 81}]}
  - {name: typo, namespace: a, ports: [{name: http, port: 80}], endpoint: []}
  - {name: badport, namespace: a, ports: [{name: http, port: 0}]}
  - {name: big, namespace: a, ports: [{name: http, port: 70000}]}
  - {name: Upper, namespace: a, ports: [{name: http, port: 80}]}
  - {name: udp, namespace: a, ports: [{name: udp-dns, port: 53}]}
windows_services:
  - {name: w, namespace: win, ports: [{name: http, port: 80}], backends: [10.0.0.1]}
  - {name: badid, namespace: win, identity: "spiffe://other.td/ns/a/sa/b", ports: [{name: http, port: 81}], backends: [10.0.0.1]}
  - {name: nobackends, namespace: win, ports: [{name: http, port: 82}], backends: []}
authorization_policies:
  - {name: ok, namespace: win, rules: [{from: [{source: {principals: ["cluster.local/ns/a/*"]}}]}]}
  - {name: when, namespace: win, rules: [{when: [{key: "request.headers[x]", values: [y]}]}]}
  - {name: ipblocks, namespace: win, rules: [{from: [{source: {ipBlocks: [10.0.0.0/8]}}]}]}
  - {name: midstar, namespace: win, rules: [{from: [{source: {principals: ["a*b"]}}]}]}
  - {name: spiffe, namespace: win, rules: [{from: [{source: {principals: ["spiffe://cluster.local/ns/a/sa/b"]}}]}]}
"#;
    let (mesh, errs) = parse(text, &settings()).unwrap();
    assert_eq!(mesh.services.len(), 1);
    assert_eq!(mesh.windows_services.len(), 1);
    // `when` and `ipBlocks` are enforced; the malformed policies are kept fail-closed (an ALLOW
    // that allows nothing) and reported, never dropped (dropping one would widen access).
    let policies: Vec<(&str, usize)> = mesh
        .authorization_policies
        .iter()
        .map(|p| (p.name.as_str(), p.rules.len()))
        .collect();
    assert_eq!(
        policies,
        [
            ("ok", 1),
            ("when", 1),
            ("ipblocks", 1),
            ("midstar", 0),
            ("spiffe", 0)
        ]
    );
    let named: Vec<String> = errs
        .iter()
        .map(|e| format!("{} {}", e.kind, e.name))
        .collect();
    for want in [
        "service a/good",
        "service a/typo",
        "service a/badport",
        "service a/big",
        "service a/Upper",
        "service a/udp",
        "windows_service win/badid",
        "windows_service win/nobackends",
        "authorization_policy win/midstar",
        "authorization_policy win/spiffe",
    ] {
        assert!(
            named.contains(&want.to_string()),
            "{want} not reported in {named:?}"
        );
    }
    let typo = errs.iter().find(|e| e.name == "a/typo").unwrap();
    assert!(
        typo.message.contains("unknown field `endpoint`"),
        "{}",
        typo.message
    );
    let dup = errs.iter().find(|e| e.name == "a/good").unwrap();
    assert!(dup.message.contains("duplicate"));
    let mid = errs.iter().find(|e| e.name == "win/midstar").unwrap();
    assert!(mid.message.contains("allows nothing"), "{}", mid.message);
}

#[test]
fn a_malformed_deny_policy_denies_everything_instead_of_vanishing() {
    let text = r#"
windows_services:
  - {name: w, namespace: win, ports: [{name: http, port: 80}], backends: [10.0.0.1]}
authorization_policies:
  - {name: block, namespace: win, action: DENY, rules: [{from: [{source: {principals: ["a*b"]}}]}]}
  - {name: typo, namespace: win, action: DENY, rules: [{from: [{source: {principal: ["x"]}}]}]}
  - {name: ext, namespace: win, action: CUSTOM, rules: [{}]}
"#;
    let (mesh, errs) = parse(text, &settings()).unwrap();
    let got: Vec<(&str, crate::model::Action, usize)> = mesh
        .authorization_policies
        .iter()
        .map(|p| (p.name.as_str(), p.action, p.rules.len()))
        .collect();
    use crate::model::Action::Deny;
    assert_eq!(
        got,
        [("block", Deny, 1), ("typo", Deny, 1), ("ext", Deny, 1)]
    );
    assert!(
        mesh.authorization_policies
            .iter()
            .all(|p| p.rules[0] == Default::default())
    );
    assert_eq!(errs.len(), 3, "{errs:?}");
    assert!(
        errs.iter()
            .all(|e| e.message.contains("DENY of every request")),
        "{errs:?}"
    );
}

#[test]
fn a_broken_file_is_an_error_as_a_whole() {
    assert!(parse("services: [oops: : ]", &settings()).is_err());
    let e = parse("servics: []", &settings()).unwrap_err();
    assert!(e.contains("servics"), "{e}");
    let (m, errs) = parse("", &settings()).unwrap();
    assert!(m.services.is_empty() && errs.is_empty());
}

#[test]
fn peer_authentication_only_disable_means_plaintext() {
    let (mesh, _) = parse(
        "peer_authentications:\n  - {namespace: a, mode: STRICT, port_level_mtls: {8080: {mode: DISABLE}}}\n  - {namespace: b, mode: PERMISSIVE}\n  - {namespace: c, mode: DISABLE}\n",
        &settings(),
    )
    .unwrap();
    assert!(!mesh.client_sends_plaintext("a", 80));
    assert!(mesh.client_sends_plaintext("a", 8080));
    assert!(!mesh.client_sends_plaintext("b", 80));
    assert!(mesh.client_sends_plaintext("c", 80));
    assert!(!mesh.client_sends_plaintext("nobody", 80));
}

#[test]
fn peer_authentication_precedence_follows_istio() {
    let (mesh, errs) = parse(
        "peer_authentications:
  - {namespace: istio-system, mode: DISABLE}
  - {namespace: strict, mode: STRICT}
  - {namespace: inherits, mode: UNSET, port_level_mtls: {9000: {mode: STRICT}}}
  - {namespace: no-mode, port_level_mtls: {9000: {mode: UNSET}, 9001: {mode: PERMISSIVE}}}
",
        &settings(),
    )
    .unwrap();
    assert!(errs.is_empty(), "{errs:?}");
    // The root namespace's policy is the mesh-wide default.
    assert!(mesh.client_sends_plaintext("anywhere", 80));
    assert!(mesh.client_sends_plaintext("istio-system", 80));
    assert_eq!(mesh.effective_mtls("anywhere", 80), MtlsMode::Disable);
    // A namespace policy overrides it.
    assert!(!mesh.client_sends_plaintext("strict", 80));
    // UNSET (or no mode) inherits the mesh-wide mode; a port-level mode wins for its port.
    assert!(mesh.client_sends_plaintext("inherits", 80));
    assert!(!mesh.client_sends_plaintext("inherits", 9000));
    assert!(mesh.client_sends_plaintext("no-mode", 9000));
    assert!(!mesh.client_sends_plaintext("no-mode", 9001));

    // Without any policy the mesh is PERMISSIVE: the endpoint's tlsMode decides.
    let (empty, _) = parse("", &settings()).unwrap();
    assert_eq!(empty.effective_mtls("x", 80), MtlsMode::Permissive);

    // The root namespace is configurable.
    let mut custom = settings();
    custom.root_namespace = "mesh-root".into();
    let (m, _) = parse(
        "peer_authentications: [{namespace: istio-system, mode: DISABLE}, {namespace: mesh-root, mode: STRICT}]\n",
        &custom,
    )
    .unwrap();
    assert!(!m.client_sends_plaintext("anywhere", 80));
    assert!(m.client_sends_plaintext("istio-system", 80));
}

#[test]
fn root_namespace_authorization_policies_apply_mesh_wide() {
    let (mesh, errs) = parse(
        "windows_services:
  - {name: a, namespace: one, ports: [{name: http, port: 80}], backends: [10.0.0.1]}
  - {name: b, namespace: two, ports: [{name: http, port: 80}], backends: [10.0.0.2]}
authorization_policies:
  - {name: mesh-deny, namespace: istio-system, action: DENY, rules: [{}]}
  - {name: only-b, namespace: istio-system, services: [b], action: ALLOW, rules: [{}]}
  - {name: local, namespace: one, action: ALLOW, rules: [{}]}
  - {name: elsewhere, namespace: three, action: DENY, rules: [{}]}
",
        &settings(),
    )
    .unwrap();
    assert!(errs.is_empty(), "{errs:?}");
    let names = |svc: usize| -> Vec<&str> {
        mesh.policies_for(&mesh.windows_services[svc])
            .map(|p| p.name.as_str())
            .collect()
    };
    assert_eq!(names(0), ["mesh-deny", "local"]);
    assert_eq!(names(1), ["mesh-deny", "only-b"]);
}

#[test]
fn mesh_wide_peer_authentication_cannot_have_port_modes() {
    let (mesh, errs) = parse(
        "peer_authentications:
  - {namespace: istio-system, mode: STRICT, port_level_mtls: {8080: {mode: DISABLE}}}
  - {namespace: fine, mode: DISABLE}
",
        &settings(),
    )
    .unwrap();
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert_eq!(errs[0].kind, "peer_authentication");
    assert!(errs[0].message.contains("port_level_mtls"), "{}", errs[0]);
    // The other policy is still served.
    assert!(mesh.client_sends_plaintext("fine", 80));
    assert!(!mesh.client_sends_plaintext("elsewhere", 80));
}

#[test]
fn peer_authentication_ports_are_endpoint_ports() {
    // Istio keys portLevelMtls by the workload's port: service port 80 → targetPort 8080.
    let (mesh, errs) = parse(
        "services:
  - name: web
    namespace: a
    ports: [{name: http, port: 80, target_port: 8080}]
    endpoints: [{address: 10.0.0.1}, {address: 10.0.0.2, ports: {http: 9090}}]
peer_authentications:
  - {namespace: a, mode: STRICT, port_level_mtls: {8080: {mode: DISABLE}}}
",
        &settings(),
    )
    .unwrap();
    assert!(errs.is_empty(), "{errs:?}");
    let ctx = Ctx {
        certified: None,
        mesh_mtls: Default::default(),
        secrets_via: crate::config::SecretsVia::Ads,
        trust_domain_aliases: vec![],
        default_identity: SpiffeId::parse("spiffe://cluster.local/ns/winmesh/sa/gw").unwrap(),
    };
    let t = translate(&mesh, &ctx).0;
    let cla = t
        .endpoints
        .iter()
        .find(|c| c.cluster_name == "outbound|80||web.a.svc.cluster.local")
        .unwrap();
    let eps = &cla.endpoints[0].lb_endpoints;
    let by_port = |port: u32| {
        eps.iter()
            .find(|e| {
                let Some(lb_endpoint::HostIdentifier::Endpoint(ep)) = &e.host_identifier else {
                    return false;
                };
                matches!(
                    ep.address.as_ref().and_then(|a| a.address.as_ref()),
                    Some(address::Address::SocketAddress(sa))
                        if sa.port_specifier == Some(socket_address::PortSpecifier::PortValue(port))
                )
            })
            .unwrap()
    };
    assert!(
        by_port(8080).metadata.is_none(),
        "DISABLE on 8080 → plaintext"
    );
    assert!(
        by_port(9090).metadata.is_some(),
        "9090 is STRICT → Istio mTLS"
    );
}

#[test]
fn identical_input_gives_identical_bytes() {
    // Content versions are hashes of the encoded bytes: protobuf maps (RBAC policies) must encode in a
    // stable order or every re-translation would look like a change.
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/integration/golden/full-mesh.yaml"
    ))
    .unwrap();
    let (mesh, _) = parse(&text, &settings()).unwrap();
    let ctx = Ctx {
        certified: None,
        mesh_mtls: Default::default(),
        secrets_via: crate::config::SecretsVia::Ads,
        trust_domain_aliases: vec![],
        default_identity: SpiffeId::parse("spiffe://cluster.local/ns/winmesh/sa/gw").unwrap(),
    };
    let first: Vec<Vec<u8>> = translate(&mesh, &ctx)
        .0
        .listeners
        .iter()
        .map(|l| l.encode_to_vec())
        .collect();
    for _ in 0..20 {
        let again: Vec<Vec<u8>> = translate(&mesh, &ctx)
            .0
            .listeners
            .iter()
            .map(|l| l.encode_to_vec())
            .collect();
        assert_eq!(first, again);
    }
}

#[test]
fn a_gateway_port_may_not_reuse_the_windows_facing_ports() {
    // Inbound binds 0.0.0.0 in `settings()`, so it clashes with the outbound 127.0.0.1:15001.
    let (mesh, errs) = parse(
        "windows_services:\n  - {name: w, namespace: win, ports: [{name: http, port: 15001}], backends: [10.0.0.1]}\n",
        &settings(),
    )
    .unwrap();
    assert!(mesh.windows_services.is_empty());
    assert!(errs[0].message.contains("outbound HTTP port"), "{errs:?}");
    let (mesh, errs) = parse(
        "services:\n  - {name: s, namespace: a, ports: [{name: tcp, port: 5432, local_port: 25432}]}\nwindows_services:\n  - {name: w, namespace: win, ports: [{name: tcp, port: 25432}], backends: [10.0.0.1]}\n",
        &settings(),
    )
    .unwrap();
    assert_eq!(mesh.services.len(), 1);
    assert!(mesh.windows_services.is_empty(), "{errs:?}");
}

#[test]
fn trust_domain_aliases_are_accepted_callers() {
    let (mesh, _) = parse(MESH, &settings()).unwrap();
    let ctx = Ctx {
        certified: None,
        mesh_mtls: Default::default(),
        secrets_via: crate::config::SecretsVia::Ads,
        trust_domain_aliases: vec!["old.example".into()],
        default_identity: SpiffeId::parse("spiffe://cluster.local/ns/winmesh/sa/gw").unwrap(),
    };
    let (t, _) = translate(&mesh, &ctx);
    let l = listener(&t, "winmesh_inbound_15443");
    let Some(envoy_types::pb::envoy::config::core::v3::transport_socket::ConfigType::TypedConfig(
        any,
    )) = &l.filter_chains[0]
        .transport_socket
        .as_ref()
        .unwrap()
        .config_type
    else {
        panic!()
    };
    let tls = DownstreamTlsContext::decode(any.value.as_slice()).unwrap();
    let Some(ValidationContextType::CombinedValidationContext(v)) =
        tls.common_tls_context.unwrap().validation_context_type
    else {
        panic!()
    };
    let prefixes: Vec<_> = v
        .default_validation_context
        .unwrap()
        .match_typed_subject_alt_names
        .into_iter()
        .map(|m| m.matcher.unwrap().match_pattern.unwrap())
        .collect();
    assert_eq!(
        prefixes,
        vec![
            MatchPattern::Prefix("spiffe://cluster.local/".into()),
            MatchPattern::Prefix("spiffe://old.example/".into()),
        ]
    );
    // AuthorizationPolicy principals match the alias too, as in Istio (the DENY names
    // cluster.local/ns/x/sa/bad).
    let bytes = l.encode_to_vec();
    let has = |needle: &str| bytes.windows(needle.len()).any(|w| w == needle.as_bytes());
    assert!(has("spiffe://cluster.local/ns/x/sa/bad"));
    assert!(has("spiffe://old.example/ns/x/sa/bad"));
    let (t0, _) = translate(
        &mesh,
        &Ctx {
            certified: None,
            mesh_mtls: Default::default(),
            trust_domain_aliases: vec![],
            ..ctx
        },
    );
    let plain = listener(&t0, "winmesh_inbound_15443").encode_to_vec();
    assert!(
        !plain
            .windows(b"old.example".len())
            .any(|w| w == b"old.example"),
        "no alias configured, none generated"
    );
}

#[test]
fn a_windows_service_can_call_the_mesh_with_its_own_identity() {
    // MESH's Windows services are followed by its policies: add one more Windows service.
    let text = MESH.replacen(
        "peer_authentications:\n",
        "  - name: winclient\n    namespace: win\n    identity: spiffe://cluster.local/ns/win/sa/winclient\n    outbound_port: 15002\n    ports: [{name: http, port: 80, gateway_port: 15444}]\n    backends: [192.168.1.12]\npeer_authentications:\n",
        1,
    );
    let (mesh, errs) = parse(&text, &settings()).unwrap();
    assert!(errs.is_empty(), "{errs:?}");
    assert_eq!(mesh.windows_services[1].outbound_port, Some(15002));
    let ctx = Ctx {
        certified: None,
        mesh_mtls: Default::default(),
        secrets_via: crate::config::SecretsVia::Ads,
        trust_domain_aliases: vec![],
        default_identity: SpiffeId::parse("spiffe://cluster.local/ns/winmesh/sa/gw").unwrap(),
    };
    let (t, _) = translate(&mesh, &ctx);
    // Its own listener and routes, on its own port…
    let l = listener(&t, "winmesh_outbound_http_win_winclient");
    let Some(envoy_types::pb::envoy::config::core::v3::address::Address::SocketAddress(sa)) =
        l.address.as_ref().unwrap().address.as_ref()
    else {
        panic!()
    };
    assert_eq!(
        sa.port_specifier,
        Some(
            envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier::PortValue(
                15002
            )
        )
    );
    let rc = t
        .routes
        .iter()
        .find(|r| r.name == "winmesh_outbound_http_win_winclient")
        .unwrap();
    assert!(
        format!("{rc:?}")
            .contains("outbound|9080||reviews.default.svc.cluster.local|as-winclient.win")
    );
    // …leading to clusters that present its certificate, with the same SNI, ALPN and SANs.
    let own = upstream_tls(cluster(
        &t,
        "outbound|9080||reviews.default.svc.cluster.local|as-winclient.win",
    ));
    let shared = upstream_tls(cluster(
        &t,
        "outbound|9080||reviews.default.svc.cluster.local",
    ));
    assert_eq!(own.sni, shared.sni);
    let (own_c, shared_c) = (
        own.common_tls_context.unwrap(),
        shared.common_tls_context.unwrap(),
    );
    assert_eq!(own_c.alpn_protocols, shared_c.alpn_protocols);
    assert_eq!(
        own_c.validation_context_type,
        shared_c.validation_context_type
    );
    assert_eq!(
        own_c.tls_certificate_sds_secret_configs[0].name,
        "spiffe://cluster.local/ns/win/sa/winclient"
    );
    assert_eq!(
        shared_c.tls_certificate_sds_secret_configs[0].name,
        "default"
    );
    assert!(
        t.endpoints.iter().any(|c| c.cluster_name
            == "outbound|9080||reviews.default.svc.cluster.local|as-winclient.win")
    );
    // Local TCP ports stay with the gateway's identity: no duplicate listener.
    assert_eq!(
        t.listeners
            .iter()
            .filter(|l| l.name == "winmesh_outbound_tcp_25432")
            .count(),
        1
    );
}

#[test]
fn windows_outbound_ports_are_checked() {
    let win = |extra: &str| {
        format!(
            "services:\n  - {{name: db, namespace: a, ports: [{{name: tcp, port: 5432, local_port: 25432}}]}}\nwindows_services:\n  - {{name: one, namespace: w, identity: spiffe://cluster.local/ns/w/sa/one, outbound_port: 15002, ports: [{{name: http, port: 80, gateway_port: 15443}}], backends: [10.0.0.1]}}\n{extra}"
        )
    };
    let cases = [
        (
            "  - {name: two, namespace: w, outbound_port: 15003, ports: [{name: http, port: 80, gateway_port: 15444}], backends: [10.0.0.2]}\n",
            "needs `identity`",
        ),
        (
            "  - {name: two, namespace: w, identity: spiffe://cluster.local/ns/w/sa/two, outbound_port: 15001, ports: [{name: http, port: 80, gateway_port: 15444}], backends: [10.0.0.2]}\n",
            "shared outbound HTTP port",
        ),
        (
            "  - {name: two, namespace: w, identity: spiffe://cluster.local/ns/w/sa/two, outbound_port: 15002, ports: [{name: http, port: 80, gateway_port: 15444}], backends: [10.0.0.2]}\n",
            "already used by one.w",
        ),
        (
            "  - {name: two, namespace: w, identity: spiffe://cluster.local/ns/w/sa/two, outbound_port: 25432, ports: [{name: http, port: 80, gateway_port: 15444}], backends: [10.0.0.2]}\n",
            "already used by db.a",
        ),
    ];
    for (extra, want) in cases {
        let (mesh, errs) = parse(&win(extra), &settings()).unwrap();
        assert_eq!(errs.len(), 1, "{extra}: {errs:?}");
        assert!(errs[0].message.contains(want), "{}", errs[0]);
        assert_eq!(mesh.windows_services.len(), 1, "the good one stays");
    }
}

#[test]
fn tcp_chains_offer_istio_server_alpn_and_mesh_mtls_is_configurable() {
    let text = "windows_services:\n  - {name: db, namespace: win, ports: [{name: tcp-sql, port: 1433, gateway_port: 15433}], backends: [10.0.0.9]}\n";
    let (mesh, errs) = parse(text, &settings()).unwrap();
    assert!(errs.is_empty(), "{errs:?}");
    let mut ctx = Ctx {
        certified: None,
        mesh_mtls: crate::config::MeshMtls {
            min_protocol_version: crate::config::TlsVersion::Tls13,
            cipher_suites: vec!["ECDHE-ECDSA-AES256-GCM-SHA384".into()],
            ecdh_curves: vec!["P-256".into()],
        },
        secrets_via: crate::config::SecretsVia::Ads,
        default_identity: SpiffeId::parse("spiffe://cluster.local/ns/winmesh/sa/gw").unwrap(),
        trust_domain_aliases: vec![],
    };
    let (t, _) = translate(&mesh, &ctx);
    let l = listener(&t, "winmesh_inbound_15433");
    let Some(envoy_types::pb::envoy::config::core::v3::transport_socket::ConfigType::TypedConfig(
        any,
    )) = &l.filter_chains[0]
        .transport_socket
        .as_ref()
        .unwrap()
        .config_type
    else {
        panic!()
    };
    let common = DownstreamTlsContext::decode(any.value.as_slice())
        .unwrap()
        .common_tls_context
        .unwrap();
    assert_eq!(
        common.alpn_protocols,
        vec!["h2", "http/1.1"],
        "TCP chain too"
    );
    let params = common.tls_params.unwrap();
    assert_eq!(params.tls_minimum_protocol_version, 4);
    assert_eq!(params.cipher_suites, vec!["ECDHE-ECDSA-AES256-GCM-SHA384"]);
    assert_eq!(params.ecdh_curves, vec!["P-256"]);
    ctx.mesh_mtls = Default::default();
    let c = crate::config::Config::parse(
        "mesh:\n  mtls:\n    min_protocol_version: TLSV1_3\n    cipher_suites: [ECDHE-RSA-AES128-GCM-SHA256]\n",
        "t.yaml",
    )
    .unwrap();
    assert_eq!(
        c.mesh.mtls.min_protocol_version,
        crate::config::TlsVersion::Tls13
    );
    assert!(
        crate::config::Config::parse(
            "mesh:\n  mtls:\n    cipher_suites: [\"bad suite\"]\n",
            "t.yaml"
        )
        .is_err()
    );
}

/// The mesh file speaks workload-selector PeerAuthentication too: `selector.matchLabels` against
/// endpoint `labels`, with port-level modes, ahead of the namespace's policy.
#[test]
fn mesh_file_workload_selector_peer_authentication() {
    let text = "\
services:
  - name: db
    namespace: data
    ports: [{name: http, port: 80, target_port: 8080}]
    endpoints:
      - {address: 10.0.0.1, labels: {app: legacy}}
      - {address: 10.0.0.2, labels: {app: new}}
peer_authentications:
  - {namespace: data, mode: STRICT}
  - namespace: data
    selector: {matchLabels: {app: legacy}}
    port_level_mtls: {8080: {mode: DISABLE}}
";
    let (mesh, errs) = parse(text, &settings()).unwrap();
    assert!(errs.is_empty(), "{errs:?}");
    let svc = &mesh.services[0];
    assert!(mesh.endpoint_gets_plaintext(svc, &svc.endpoints[0], 8080));
    assert!(!mesh.endpoint_gets_plaintext(svc, &svc.endpoints[0], 9090));
    assert!(!mesh.endpoint_gets_plaintext(svc, &svc.endpoints[1], 8080));
}

fn ctx() -> Ctx {
    Ctx {
        certified: None,
        mesh_mtls: Default::default(),
        secrets_via: crate::config::SecretsVia::Ads,
        trust_domain_aliases: vec![],
        default_identity: SpiffeId::parse("spiffe://cluster.local/ns/winmesh/sa/gw").unwrap(),
    }
}

/// MESH with its Windows service as the Kubernetes mirror builds one: pods on this node (one
/// ready and local, one remote failover), their addresses calling out as the app.
fn cluster_mode_mesh(refuse: bool) -> crate::model::Mesh {
    use crate::model::{WindowsBackend, WindowsOrigin};
    let (mut mesh, _) = parse(MESH, &settings()).unwrap();
    mesh.gateway.refuse_unknown_callers = refuse;
    let w = &mut mesh.windows_services[0];
    w.backends = vec![
        WindowsBackend {
            address: "10.1.0.5".parse().unwrap(),
            ports: [("http".to_string(), 8081)].into(),
            remote: false,
        },
        WindowsBackend {
            address: "10.2.0.7".parse().unwrap(),
            ports: Default::default(),
            remote: true,
        },
    ];
    w.origin = Some(WindowsOrigin {
        app_service: "win/winapp-backend".into(),
        pod_labels: vec![],
        local_pod_ips: vec!["10.1.0.5".parse().unwrap(), "10.1.0.6".parse().unwrap()],
        ready_nodes: vec!["win-1".into(), "win-2".into()],
        service_accounts: vec!["winapp".into()],
        cross_node: true,
        status: None,
    });
    mesh
}

#[test]
fn windows_pods_call_the_mesh_as_their_app_chosen_by_source_address() {
    let (t, _) = translate(&cluster_mode_mesh(false), &ctx());
    let l = listener(&t, outbound::HTTP_LISTENER);
    assert_eq!(
        l.filter_chains.len(),
        2,
        "the app's pods, then everyone else"
    );
    let by_source = l
        .filter_chains
        .iter()
        .find(|c| c.filter_chain_match.is_some())
        .unwrap();
    let m = by_source.filter_chain_match.as_ref().unwrap();
    assert_eq!(
        m.source_prefix_ranges
            .iter()
            .map(|r| (
                r.address_prefix.as_str(),
                r.prefix_len.as_ref().unwrap().value
            ))
            .collect::<Vec<_>>(),
        vec![("10.1.0.5", 32), ("10.1.0.6", 32)]
    );
    let idx = l
        .filter_chains
        .iter()
        .position(|c| c.filter_chain_match.is_some())
        .unwrap();
    let Some(RouteSpecifier::Rds(rds)) = hcm(l, idx).route_specifier else {
        panic!("rds")
    };
    assert_eq!(rds.route_config_name, "winmesh_outbound_http_sa_win_winapp");
    let rc = t
        .routes
        .iter()
        .find(|r| r.name == rds.route_config_name)
        .unwrap();
    let own = "outbound|9080||reviews.default.svc.cluster.local|sa-winapp.win";
    assert!(format!("{rc:?}").contains(own));
    let tls = upstream_tls(cluster(&t, own));
    assert_eq!(
        tls.common_tls_context
            .unwrap()
            .tls_certificate_sds_secret_configs[0]
            .name,
        "spiffe://cluster.local/ns/win/sa/winapp",
        "its pods leave with the app's identity"
    );
    // The default chain still presents the gateway's identity.
    let Some(RouteSpecifier::Rds(rds)) = hcm(l, 1 - idx).route_specifier else {
        panic!("rds")
    };
    assert_eq!(rds.route_config_name, outbound::HTTP_LISTENER);

    // Refusing unknown callers: only the app's chain is left.
    let (t, _) = translate(&cluster_mode_mesh(true), &ctx());
    let l = listener(&t, outbound::HTTP_LISTENER);
    assert_eq!(l.filter_chains.len(), 1);
    assert!(l.filter_chains[0].filter_chain_match.is_some());
    // …and with no known pod at all, no listener (the port is closed) rather than one Envoy
    // would reject for having no chains.
    let mut m = cluster_mode_mesh(true);
    m.windows_services[0]
        .origin
        .as_mut()
        .unwrap()
        .local_pod_ips
        .clear();
    let (t, _) = translate(&m, &ctx());
    assert!(
        t.listeners
            .iter()
            .all(|l| l.name != outbound::HTTP_LISTENER)
    );
}

#[test]
fn other_nodes_backends_are_a_failover_priority() {
    let (t, _) = translate(&cluster_mode_mesh(false), &ctx());
    let cla = t
        .endpoints
        .iter()
        .find(|c| c.cluster_name == "inbound|8080||winapp.win.svc.cluster.local")
        .unwrap();
    let groups: Vec<(u32, Vec<String>)> = cla
        .endpoints
        .iter()
        .map(|g| {
            (
                g.priority,
                g.lb_endpoints
                    .iter()
                    .map(|e| {
                        let Some(lb_endpoint::HostIdentifier::Endpoint(ep)) = &e.host_identifier
                        else {
                            panic!()
                        };
                        let Some(address::Address::SocketAddress(sa)) =
                            ep.address.as_ref().unwrap().address.as_ref()
                        else {
                            panic!()
                        };
                        let Some(socket_address::PortSpecifier::PortValue(p)) = sa.port_specifier
                        else {
                            panic!()
                        };
                        format!("{}:{p}", sa.address)
                    })
                    .collect(),
            )
        })
        .collect();
    assert_eq!(
        groups,
        vec![
            (0, vec!["10.1.0.5:8081".to_string()]),
            (1, vec!["10.2.0.7:80".to_string()])
        ],
        "named target port resolved per pod; the other node's pod only as failover"
    );
}

#[test]
fn peer_authentication_never_opens_the_gateway_mesh_port_to_plaintext() {
    let mut mesh = cluster_mode_mesh(false);
    for ns in ["win", "istio-system"] {
        mesh.peer_authentications
            .push(crate::model::PeerAuthentication {
                namespace: ns.into(),
                selector: Default::default(),
                mode: MtlsMode::Disable,
                port_modes: Default::default(),
            });
    }
    let (t, _) = translate(&mesh, &ctx());
    let l = listener(&t, "winmesh_inbound_15443");
    for c in &l.filter_chains {
        let m = c.filter_chain_match.as_ref().unwrap();
        assert_eq!(m.transport_protocol, "tls");
        assert!(!m.server_names.is_empty());
        let ts = c.transport_socket.as_ref().unwrap();
        let Some(
            envoy_types::pb::envoy::config::core::v3::transport_socket::ConfigType::TypedConfig(
                any,
            ),
        ) = &ts.config_type
        else {
            panic!()
        };
        let tls = DownstreamTlsContext::decode(any.value.as_slice()).unwrap();
        assert_eq!(tls.require_client_certificate, Some(prost_types_bool(true)));
    }
    assert!(l.default_filter_chain.is_none());
}

fn prost_types_bool(v: bool) -> envoy_types::pb::google::protobuf::BoolValue {
    envoy_types::pb::google::protobuf::BoolValue { value: v }
}
