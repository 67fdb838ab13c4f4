//! `make bench`: translation, snapshot building and xDS push cost at 100 / 1k / 10k services, and the
//! memory a connected stream costs. Prints a Markdown table (the numbers in docs/benchmarks.md).

use std::fmt::Write;
use std::sync::Arc;
use std::time::Instant;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
use winmesh::assemble;
use winmesh::discovery::file::{FileSettings, parse};
use winmesh::identity::{SecretSet, SpiffeId};
use winmesh::metrics::Metrics;
use winmesh::model::GatewaySettings;
use winmesh::translate::{Ctx, translate};
use winmesh::xds::TypeUrl;
use winmesh::xds::delta::DeltaStream;
use winmesh::xds::sotw::SotwStream;

fn mesh_yaml(n: usize) -> String {
    let mut s = String::from("services:\n");
    for i in 0..n {
        let _ = write!(
            s,
            "  - name: svc-{i}\n    namespace: ns-{}\n    ports: [{{name: http, port: 8080}}, {{name: grpc, port: 9090}}]\n    endpoints:\n",
            i % 50
        );
        for e in 0..3 {
            let _ = writeln!(
                s,
                "      - {{address: 10.{}.{}.{e}, service_account: sa-{i}}}",
                (i / 250) % 250,
                i % 250
            );
        }
    }
    s.push_str("windows_services:\n");
    for i in 0..(n / 10).max(1) {
        let _ = writeln!(
            s,
            "  - {{name: win-{i}, namespace: win, ports: [{{name: http, port: 8080, gateway_port: 15443}}], backends: [192.168.0.{}]}}",
            i % 250 + 1
        );
    }
    s
}

fn rss_bytes() -> Option<u64> {
    #[cfg(target_os = "linux")]
    {
        let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
        let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
        Some(pages * 4096)
    }
    #[cfg(not(target_os = "linux"))]
    {
        None
    }
}

fn ms(d: std::time::Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn main() {
    let settings = FileSettings {
        trust_domain: "cluster.local".into(),
        domain_suffix: "cluster.local".into(),
        root_namespace: "istio-system".into(),
        gateway: GatewaySettings {
            inbound_address: "0.0.0.0".parse().unwrap(),
            outbound_address: "127.0.0.1".parse().unwrap(),
            outbound_port: 15001,
            refuse_unknown_callers: false,
        },
        reserved: vec![],
    };
    let ctx = Ctx {
        certified: None,
        mesh_mtls: Default::default(),
        secrets_via: winmesh::config::SecretsVia::Ads,
        trust_domain_aliases: vec![],
        default_identity: SpiffeId::parse("spiffe://cluster.local/ns/win/sa/gw").unwrap(),
    };
    let metrics = Metrics::new();
    println!(
        "| services | resources | parse | translate | build snapshot (encode + hash) | first SotW push (all types) | delta reconnect, nothing changed | snapshot bytes | RSS per extra SotW stream (after CDS) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for n in [100usize, 1_000, 10_000] {
        let text = mesh_yaml(n);
        let t = Instant::now();
        let (mesh, rejected) = parse(&text, &settings).unwrap();
        let parse_t = t.elapsed();
        assert!(rejected.is_empty());
        let t = Instant::now();
        let (tr, _) = translate(&mesh, &ctx);
        let translate_t = t.elapsed();
        let t = Instant::now();
        let snap = Arc::new(assemble::build(&tr, &SecretSet::default(), &metrics));
        let build_t = t.elapsed();
        let bytes: usize = TypeUrl::PUSH_ORDER
            .iter()
            .flat_map(|t| snap.resources(*t).values())
            .map(|r| r.body.len())
            .sum();

        // First push to one SotW stream: CDS, then EDS for every cluster, LDS, RDS.
        let node = Node {
            id: "gw".into(),
            ..Default::default()
        };
        let t = Instant::now();
        let mut s = SotwStream::new_ads("bench");
        s.set_snapshot(snap.clone());
        let req = |t: TypeUrl, names: Vec<String>, nonce: &str| DiscoveryRequest {
            node: Some(node.clone()),
            type_url: t.as_str().into(),
            resource_names: names,
            response_nonce: nonce.into(),
            ..Default::default()
        };
        s.handle_request(&req(TypeUrl::Cluster, vec![], ""), Instant::now())
            .unwrap();
        let cds = s.next_response(Instant::now()).unwrap().1;
        let eds_names: Vec<String> = snap.resources(TypeUrl::Endpoint).keys().cloned().collect();
        s.handle_request(&req(TypeUrl::Endpoint, eds_names, ""), Instant::now())
            .unwrap();
        s.handle_request(&req(TypeUrl::Cluster, vec![], &cds.nonce), Instant::now())
            .unwrap();
        let eds = s.next_response(Instant::now()).unwrap().1;
        s.handle_request(&req(TypeUrl::Endpoint, vec![], &eds.nonce), Instant::now())
            .unwrap();
        s.handle_request(&req(TypeUrl::Listener, vec![], ""), Instant::now())
            .unwrap();
        let lds = s.next_response(Instant::now());
        std::hint::black_box(&lds);
        let push_t = t.elapsed();

        // Delta reconnect where the proxy already has everything.
        let t = Instant::now();
        let mut d = DeltaStream::new_ads("bench");
        d.set_snapshot(snap.clone());
        d.handle_request(
            &DeltaDiscoveryRequest {
                node: Some(node.clone()),
                type_url: TypeUrl::Cluster.as_str().into(),
                initial_resource_versions: snap
                    .resources(TypeUrl::Cluster)
                    .iter()
                    .map(|(k, v)| (k.clone(), v.version.clone()))
                    .collect(),
                ..Default::default()
            },
            Instant::now(),
        )
        .unwrap();
        let r = d.next_response(Instant::now()).unwrap().1;
        assert!(r.resources.is_empty());
        let delta_t = t.elapsed();

        // Memory: 100 more streams, each having been sent the full CDS+EDS; the resource bytes are shared.
        let before = rss_bytes();
        let mut streams = Vec::new();
        for _ in 0..100 {
            let mut s = SotwStream::new_ads("bench");
            s.set_snapshot(snap.clone());
            s.handle_request(&req(TypeUrl::Cluster, vec![], ""), Instant::now())
                .unwrap();
            // The server encodes a response and drops it; what stays per stream is the machine's state.
            let r = s.next_response(Instant::now()).unwrap();
            std::hint::black_box(&r);
            drop(r);
            streams.push(s);
        }
        let per_stream = match (before, rss_bytes()) {
            (Some(a), Some(b)) => {
                format!("{:.1} KiB", (b.saturating_sub(a)) as f64 / 100.0 / 1024.0)
            }
            _ => "n/a".into(),
        };
        drop(streams);
        println!(
            "| {n} | {} | {} | {} | {} | {} | {} | {:.1} MiB | {per_stream} |",
            snap.len(),
            ms(parse_t),
            ms(translate_t),
            ms(build_t),
            ms(push_t),
            ms(delta_t),
            bytes as f64 / 1048576.0,
        );
    }

    // The Kubernetes mirror: rebuilding the model from N Services with 3 ready endpoints each (one
    // EndpointSlice, three Pods), then combining it with the mesh file.
    println!();
    println!(
        "| Kubernetes services | endpoints | rebuild from the watched objects | combine with the mesh file |"
    );
    println!("|---|---|---|---|");
    let (file_mesh, _) = parse(&mesh_yaml(10), &settings).unwrap();
    for n in [100usize, 1_000, 10_000] {
        let objects = kube_objects(n);
        let t = Instant::now();
        let km = winmesh::discovery::kube::build(
            &objects,
            &winmesh::discovery::kube::MirrorSettings::new("cluster.local"),
        );
        let build_t = t.elapsed();
        assert_eq!(km.services.len(), n);
        let t = Instant::now();
        let merged = winmesh::discovery::kube::merge(&file_mesh, &km);
        let merge_t = t.elapsed();
        std::hint::black_box(&merged);
        println!(
            "| {n} | {} | {} | {} |",
            km.services.iter().map(|s| s.endpoints.len()).sum::<usize>(),
            ms(build_t),
            ms(merge_t)
        );
    }
}

fn kube_objects(n: usize) -> winmesh::discovery::kube::KubeObjects {
    use serde_json::json;
    let mut o = winmesh::discovery::kube::KubeObjects::default();
    for i in 0..n {
        let ns = format!("ns{}", i % 50);
        let name = format!("svc{i}");
        o.services.push(Arc::new(
            serde_json::from_value(json!({
                "metadata": {"name": name, "namespace": ns},
                "spec": {"ports": [{"name": "http", "port": 8080}, {"name": "grpc", "port": 9090}]}
            }))
            .unwrap(),
        ));
        let mut endpoints = Vec::new();
        for j in 0..3 {
            let ip = format!("10.{}.{}.{}", (i >> 8) & 255, i & 255, j + 1);
            let pod = format!("{name}-{j}");
            endpoints.push(json!({"addresses": [ip], "conditions": {"ready": true},
                "targetRef": {"kind": "Pod", "name": pod, "namespace": ns}}));
            o.pods.push(Arc::new(
                serde_json::from_value(json!({
                    "metadata": {"name": pod, "namespace": ns,
                                 "labels": {"security.istio.io/tlsMode": "istio"}},
                    "spec": {"serviceAccountName": name, "containers": []},
                    "status": {"phase": "Running", "podIP": ip}
                }))
                .unwrap(),
            ));
        }
        o.endpoint_slices.push(Arc::new(
            serde_json::from_value(json!({
                "metadata": {"name": format!("{name}-abc"), "namespace": ns,
                             "labels": {"kubernetes.io/service-name": name}},
                "addressType": "IPv4",
                "ports": [{"name": "http", "port": 8080}, {"name": "grpc", "port": 9090}],
                "endpoints": endpoints
            }))
            .unwrap(),
        ));
    }
    o
}
