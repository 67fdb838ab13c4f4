//! The manifests as a user applies them: each overlay rendered (integration/kustomize_lite.py, the
//! renderer `make manifests` checks against `kubectl kustomize`), checked for the properties that
//! make them safe, and the cluster overlay run: its objects in the fake API server, pods as the
//! DaemonSet and Deployment controllers would create them, winmesh started from the rendered
//! ConfigMap, the real gateway Envoy, and Istio mTLS calls the rendered AuthorizationPolicy admits
//! and refuses. (The fake serves the kinds winmesh reads and writes; Namespaces, RBAC, workloads
//! and NetworkPolicies are checked here as data, not applied.)

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value, json};
use support::fake_kube::{AUTHORIZATION_POLICIES, ENDPOINT_SLICES, FakeKube, PODS, SERVICES};
use support::tls::{MeshClient, SanCheck};
use support::{Backend, Envoy, free_port, wait_for};
use winmesh::bootstrap::{BootstrapOptions, bootstrap_yaml};
use winmesh::identity::dev_ca::DevCa;

const T: Duration = Duration::from_secs(30);

fn render(overlay: &str) -> Vec<Value> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = std::env::var("WINMESH_PYTHON").unwrap_or_else(|_| "python3".into());
    let out = std::process::Command::new(&python)
        .arg(root.join("integration/kustomize_lite.py"))
        .arg(root.join("manifests/overlays").join(overlay))
        .output()
        .unwrap_or_else(|e| panic!("{python}: {e} (set WINMESH_PYTHON to a python with PyYAML)"));
    assert!(
        out.status.success(),
        "rendering {overlay}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

fn find<'a>(objs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objs.iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

fn config_of(objs: &[Value]) -> (Value, String) {
    let cm = find(objs, "ConfigMap", "winmesh-config");
    let cfg: Value = serde_yaml::from_str(cm["data"]["winmesh.yaml"].as_str().unwrap()).unwrap();
    (cfg, cm["data"]["mesh.yaml"].as_str().unwrap().to_string())
}

#[test]
fn every_overlay_is_safe_as_written() {
    for overlay in ["cluster", "mesh-file"] {
        let objs = render(overlay);
        let (cfg, mesh) = config_of(&objs);
        // The config and mesh file are valid as they stand (`winmesh validate`, exit 0).
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("winmesh.yaml"),
            serde_yaml::to_string(&cfg).unwrap(),
        )
        .unwrap();
        std::fs::write(dir.path().join("mesh.yaml"), &mesh).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_winmesh"))
            .arg("validate")
            .arg(dir.path().join("winmesh.yaml"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{overlay}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // What hands out keys and debug data binds loopback only.
        for field in [
            &cfg["xds"]["listen"],
            &cfg["debug"]["listen"],
            &cfg["envoy"]["admin"],
        ] {
            let a: SocketAddr = field.as_str().unwrap().parse().unwrap();
            assert!(a.ip().is_loopback(), "{overlay}: {a}");
        }
        // Windows paths: the pod is a Windows container.
        for p in [&cfg["identity"]["token_file"], &cfg["ca"]["root_cert_file"]] {
            assert!(p.as_str().unwrap().starts_with("C:\\"), "{overlay}: {p}");
        }
        // One gateway per Windows node, with the istio-ca token and the mesh root.
        let ds = find(&objs, "DaemonSet", "winmesh-gateway");
        let pod = &ds["spec"]["template"]["spec"];
        assert_eq!(pod["nodeSelector"]["kubernetes.io/os"], "windows");
        assert!(pod["nodeSelector"]["node.kubernetes.io/windows-build"].is_string());
        assert!(pod["tolerations"].as_array().is_some_and(|t| !t.is_empty()));
        let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
        assert!(
            (40..=60).contains(&grace),
            "drain within Istio's 45 s cap: {grace}"
        );
        let vols = pod["volumes"].as_array().unwrap();
        assert!(vols.iter().any(|v| {
            v["projected"]["sources"][0]["serviceAccountToken"]["audience"] == "istio-ca"
        }));
        assert!(
            vols.iter()
                .any(|v| v["configMap"]["name"] == "istio-ca-root-cert")
        );
        let envoy = pod["containers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "envoy")
            .unwrap();
        assert!(
            envoy["lifecycle"]["preStop"].is_object(),
            "a drain before stop"
        );
        let cmd = envoy["command"].to_string();
        assert!(cmd.contains("--drain-time-s"), "{cmd}");
        // Least privilege: nothing bound cluster-wide can write.
        for crb in objs.iter().filter(|o| o["kind"] == "ClusterRoleBinding") {
            let role = find(
                &objs,
                "ClusterRole",
                crb["roleRef"]["name"].as_str().unwrap(),
            );
            for rule in role["rules"].as_array().unwrap() {
                for verb in rule["verbs"].as_array().unwrap() {
                    assert!(
                        ["get", "list", "watch"].contains(&verb.as_str().unwrap()),
                        "{overlay}: cluster-wide {verb} in {}",
                        role["metadata"]["name"]
                    );
                }
            }
        }
    }
    // Cluster mode: the outbound proxy refuses unknown callers itself, and a NetworkPolicy admits
    // only Windows app pods to it (where the CNI enforces it).
    let objs = render("cluster");
    let (cfg, _) = config_of(&objs);
    let w = &cfg["mesh"]["kubernetes"]["windows"];
    assert_eq!(w["unknown_callers"], "refuse");
    assert_eq!(w["publish"]["enabled"], true);
    let out_port = cfg["gateway"]["outbound_port"].as_u64().unwrap();
    let np = find(&objs, "NetworkPolicy", "winmesh-gateway-ingress");
    assert_eq!(
        np["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/name"],
        "winmesh-gateway"
    );
    for rule in np["spec"]["ingress"].as_array().unwrap() {
        let admits = rule["ports"]
            .as_array()
            .is_none_or(|ps| ps.iter().any(|p| p["port"] == json!(out_port)));
        assert!(
            !admits || rule["from"].as_array().is_some_and(|f| !f.is_empty()),
            "a rule admits anyone to the outbound port: {rule}"
        );
    }
    // Token minting and publishing are granted per app namespace only.
    for name in ["winmesh-publisher", "winmesh-token-minter"] {
        let rb = find(&objs, "RoleBinding", name);
        assert_eq!(rb["metadata"]["namespace"], "win");
    }
}

/// A pod as its controller would create it from `template`, running on `node` at 127.0.0.1.
fn pod_from(template: &Value, namespace: &str, name: &str, node: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace,
                     "labels": template["metadata"]["labels"]},
        "spec": {"serviceAccountName": template["spec"]["serviceAccountName"], "nodeName": node,
                 "containers": []},
        "status": {"phase": "Running", "podIP": "127.0.0.1",
                   "conditions": [{"type": "Ready", "status": "True"}]}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_overlay_runs_as_rendered() {
    let Some(bin) = support::envoy_bin() else {
        return;
    };
    support::init_tracing();
    let objs = render("cluster");
    let app = Backend::start("winapp").await;
    let kube = FakeKube::start(&[]).await;
    for o in &objs {
        match o["kind"].as_str() {
            Some("Service") => kube.apply(SERVICES, o.clone()),
            Some("AuthorizationPolicy") => kube.apply(AUTHORIZATION_POLICIES, o.clone()),
            _ => {}
        }
    }
    let ds = find(&objs, "DaemonSet", "winmesh-gateway");
    kube.apply(
        PODS,
        pod_from(
            &ds["spec"]["template"],
            "winmesh-system",
            "winmesh-gateway-x1",
            "win-1",
        ),
    );
    let dep = find(&objs, "Deployment", "winapp");
    kube.apply(
        PODS,
        pod_from(&dep["spec"]["template"], "win", "winapp-1", "win-1"),
    );
    // The EndpointSlice controller's slice for the app Service.
    kube.apply(
        ENDPOINT_SLICES,
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "winapp-backend-abc", "namespace": "win",
                         "labels": {"kubernetes.io/service-name": "winapp-backend"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": app.addr.port(), "protocol": "TCP"}],
            "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": true},
                "nodeName": "win-1",
                "targetRef": {"kind": "Pod", "name": "winapp-1", "namespace": "win"}}]}),
    );

    // winmesh from the rendered ConfigMap; only what cannot exist on a Linux test host changes:
    // loopback ports, the fake API server, a dev CA for istiod, this host's paths.
    let dir = tempfile::tempdir().unwrap();
    let (mut cfg, mesh) = config_of(&objs);
    let kubeconfig = dir.path().join("kubeconfig");
    kube.write_kubeconfig(&kubeconfig);
    let gw_port = free_port();
    cfg["xds"]["listen"] = json!("127.0.0.1:0");
    cfg["debug"]["listen"] = json!("127.0.0.1:0");
    cfg["envoy"]["admin"] = json!(format!("127.0.0.1:{}", free_port()));
    cfg["ca"] = json!({"mode": "dev", "state_dir": dir.path().join("dev-ca")});
    cfg["identity"]
        .as_object_mut()
        .unwrap()
        .remove("token_file");
    let k = &mut cfg["mesh"]["kubernetes"];
    k["kubeconfig"] = json!(kubeconfig);
    k["state_file"] = json!("");
    k["debounce"] = json!("50ms");
    k["windows"]["gateway_port"] = json!(gw_port);
    k["windows"]["node_name"] = json!("win-1");
    k["windows"]["publish"]["identity"] = json!("winmesh-gateway-x1");
    cfg["gateway"]["inbound_address"] = json!("127.0.0.1");
    cfg["gateway"]["outbound_address"] = json!("127.0.0.1");
    cfg["gateway"]["outbound_port"] = json!(free_port());
    std::fs::write(dir.path().join("mesh.yaml"), &mesh).unwrap();
    let cfg_path = dir.path().join("winmesh.yaml");
    std::fs::write(&cfg_path, serde_yaml::to_string(&cfg).unwrap()).unwrap();
    let mut config = winmesh::config::Config::load(&cfg_path).unwrap();
    let server = winmesh::serve::start(config.clone()).await.unwrap();
    config.xds.listen = server.running.xds_addr;
    let gateway = Envoy::start(&bin, &bootstrap_yaml(&config, &BootstrapOptions::default())).await;
    let diag = || async {
        let (_, reg) =
            winmesh::status::http_get(server.running.debug_addr, "/debug/registryz", None)
                .await
                .unwrap_or_default();
        format!("{reg}\n{}", gateway.diagnostics().await)
    };

    // The publisher writes the mesh-facing Service the example's comment promises.
    wait_for("winapp published", T, diag, || async {
        kube.get(SERVICES, "win", "winapp")
            .filter(|s| s["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "winmesh")
    })
    .await;
    // Istio mTLS to winapp as Linux callers: the rendered policy admits namespace shop only.
    let ca = DevCa::load_or_create(&dir.path().join("dev-ca"), "cluster.local").unwrap();
    let client = |id: &str| support::mesh_client(&ca, id);
    let call = |c: MeshClient| async move {
        c.get(
            SocketAddr::from(([127, 0, 0, 1], gw_port)),
            "outbound_.8080_._.winapp.win.svc.cluster.local",
            &["istio-http/1.1", "istio", "http/1.1"],
            SanCheck::Exact(vec!["spiffe://cluster.local/ns/win/sa/winapp".into()]),
            "/",
        )
        .await
        .ok()
    };
    let r = wait_for("shop reaches winapp", T, diag, || async {
        call(client("spiffe://cluster.local/ns/shop/sa/web"))
            .await
            .filter(|r| r.status == 200)
    })
    .await;
    assert_eq!(r.body, "winapp");
    let r = call(client("spiffe://cluster.local/ns/other/sa/web"))
        .await
        .expect("a TLS answer");
    assert_eq!(
        r.status, 403,
        "the rendered AuthorizationPolicy admits namespace shop only"
    );
    gateway.stop().await;
    server.stop().await;
}
