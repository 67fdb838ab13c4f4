//! Golden tests of the generated Envoy resources, and validation of the same resources by a real Envoy
//! (`envoy --mode validate`; point ENVOY_BIN at another Envoy build to check other versions). Set
//! UPDATE_GOLDEN=1 to rewrite the golden files after an intended change.

mod support;

use std::path::{Path, PathBuf};

use prost::Message;
use serde_json::{Value, json};
use winmesh::assemble::Translated;
use winmesh::bootstrap::{BootstrapOptions, bootstrap};
use winmesh::config::{Config, SecretsVia};
use winmesh::configdump::to_json;
use winmesh::discovery::file::{FileSettings, parse};
use winmesh::identity::SpiffeId;
use winmesh::model::GatewaySettings;
use winmesh::translate::{Ctx, translate};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn translate_file(path: &Path, via: SecretsVia) -> Translated {
    let text = std::fs::read_to_string(path).unwrap();
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
    let (mesh, rejected) = parse(&text, &settings).unwrap();
    assert!(rejected.is_empty(), "{rejected:?}");
    let ctx = Ctx {
        certified: None,
        mesh_mtls: Default::default(),
        secrets_via: via,
        trust_domain_aliases: vec![],
        default_identity: SpiffeId::parse("spiffe://cluster.local/ns/winmesh/sa/winmesh-gateway")
            .unwrap(),
    };
    translate(&mesh, &ctx).0
}

fn json_of<M: Message + prost::Name>(m: &M) -> Value {
    let mut v = to_json(&M::full_name(), &m.encode_to_vec()).unwrap();
    if let Value::Object(o) = &mut v {
        o.remove("@type");
    }
    v
}

fn render(t: &Translated) -> Value {
    json!({
        "listeners": t.listeners.iter().map(json_of).collect::<Vec<_>>(),
        "routes": t.routes.iter().map(json_of).collect::<Vec<_>>(),
        "clusters": t.clusters.iter().map(json_of).collect::<Vec<_>>(),
        "endpoints": t.endpoints.iter().map(json_of).collect::<Vec<_>>(),
    })
}

fn golden(name: &str, actual: &Value) {
    let path = root().join("integration/golden").join(name);
    let text = serde_json::to_string_pretty(actual).unwrap() + "\n";
    if std::env::var("UPDATE_GOLDEN").is_ok() {
        std::fs::write(&path, &text).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&path)
        .unwrap_or_else(|_| panic!("{} missing; run with UPDATE_GOLDEN=1", path.display()));
    if want != text {
        let got = path.with_extension("actual.json");
        std::fs::write(&got, &text).unwrap();
        panic!(
            "{} differs from the generated resources (written to {}); if intended, run with UPDATE_GOLDEN=1",
            path.display(),
            got.display()
        );
    }
}

#[test]
fn example_mesh_matches_golden() {
    golden(
        "example-mesh.json",
        &render(&translate_file(
            &root().join("examples/mesh.yaml"),
            SecretsVia::Ads,
        )),
    );
}

#[test]
fn full_mesh_matches_golden() {
    golden(
        "full-mesh.json",
        &render(&translate_file(
            &root().join("integration/golden/full-mesh.yaml"),
            SecretsVia::Sds,
        )),
    );
}

/// Puts the generated listeners and clusters into a bootstrap next to winmesh's own, and asks Envoy to
/// validate it: proto constraints, extension configs, SDS/RDS/EDS sources.
fn envoy_validates(t: &Translated) {
    let Some(bin) = support::envoy_bin() else {
        return;
    };
    let mut boot = bootstrap(&Config::default(), &BootstrapOptions::default());
    let clusters = boot["static_resources"]["clusters"].as_array_mut().unwrap();
    clusters.extend(t.clusters.iter().map(json_of));
    boot["static_resources"]["listeners"] =
        json!(t.listeners.iter().map(json_of).collect::<Vec<_>>());
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("validate.json");
    std::fs::write(&p, serde_json::to_string_pretty(&boot).unwrap()).unwrap();
    let out = std::process::Command::new(&bin)
        .args([
            "--mode",
            "validate",
            "--disable-hot-restart",
            "-l",
            "error",
            "-c",
        ])
        .arg(&p)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "Envoy rejected the generated config:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Routes are not part of the static bootstrap's listeners (they come over RDS): validate them
    // inline in a throwaway listener so Envoy checks them too.
    for rc in &t.routes {
        let mut boot = bootstrap(&Config::default(), &BootstrapOptions::default());
        boot["static_resources"]["clusters"]
            .as_array_mut()
            .unwrap()
            .extend(t.clusters.iter().map(json_of));
        boot["static_resources"]["listeners"] = json!([{
            "name": "route-check",
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
            "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": "route-check",
                "route_config": json_of(rc),
                "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
            }}]}],
        }]);
        std::fs::write(&p, serde_json::to_string_pretty(&boot).unwrap()).unwrap();
        let out = std::process::Command::new(&bin)
            .args([
                "--mode",
                "validate",
                "--disable-hot-restart",
                "-l",
                "error",
                "-c",
            ])
            .arg(&p)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "Envoy rejected route {}: {}",
            rc.name,
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn envoy_accepts_the_example_mesh() {
    envoy_validates(&translate_file(
        &root().join("examples/mesh.yaml"),
        SecretsVia::Ads,
    ));
}

#[test]
fn envoy_accepts_the_full_mesh() {
    envoy_validates(&translate_file(
        &root().join("integration/golden/full-mesh.yaml"),
        SecretsVia::Sds,
    ));
}
