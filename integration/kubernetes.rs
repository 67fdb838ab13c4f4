//! The Kubernetes mirror against a fake API server on loopback (list + watch), with the real gateway
//! Envoy: Windows → Linux routes follow Services and EndpointSlices as they change, without restarts.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{Value, json};
use support::fake_kube::{ENDPOINT_SLICES, FakeKube, PEER_AUTHENTICATIONS, PODS, SERVICES};
use support::{Backend, Envoy, free_port, wait_for};
use winmesh::bootstrap::{BootstrapOptions, bootstrap_yaml};
use winmesh::config::Config;

const T: Duration = Duration::from_secs(30);

fn service(ns: &str, name: &str, port: u16) -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"ports": [{"name": "http", "port": port, "targetPort": "web"}]}})
}

fn slice(ns: &str, svc: &str, pod: &str, port: u16) -> Value {
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{svc}-x1"), "namespace": ns,
                     "labels": {"kubernetes.io/service-name": svc}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
        "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": true},
                       "targetRef": {"kind": "Pod", "name": pod, "namespace": ns}}]})
}

fn pod(ns: &str, name: &str) -> Value {
    // No sidecar (no tlsMode label): the gateway must send plaintext, which the plain app answers.
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": {"app": "web"}},
        "spec": {"serviceAccountName": "web", "nodeName": "linux-1", "containers": []},
        "status": {"phase": "Running", "podIP": "127.0.0.1"}})
}

struct Mirror {
    _dir: tempfile::TempDir,
    server: winmesh::serve::Server,
    cfg: Config,
}

async fn start_winmesh(kube: &FakeKube, gateway_port: u16, extra_mesh: &str) -> Mirror {
    support::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    kube.write_kubeconfig(&kubeconfig);
    let mesh_file = dir.path().join("mesh.yaml");
    std::fs::write(&mesh_file, extra_mesh).unwrap();
    let (server, cfg) = support::start_gateway_winmesh(
        dir.path(),
        &mesh_file,
        gateway_port,
        &format!(
            "  kubernetes:\n    enabled: true\n    kubeconfig: {}\n    debounce: 50ms\n",
            kubeconfig.display()
        ),
    )
    .await;
    Mirror {
        _dir: dir,
        server,
        cfg,
    }
}

async fn registry(m: &Mirror) -> Value {
    let (_, body) =
        winmesh::status::http_get(m.server.running.debug_addr, "/debug/registryz", None)
            .await
            .unwrap_or_default();
    serde_json::from_str(&body).unwrap_or(Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn windows_to_linux_routes_follow_the_cluster() {
    let Some(bin) = support::envoy_bin() else {
        return;
    };
    let app_a = Backend::start("web-a").await;
    let app_b = Backend::start("web-b").await;
    let kube = FakeKube::start(&[]).await;
    kube.apply(SERVICES, service("shop", "web", 8080));
    kube.apply(PODS, pod("shop", "web-1"));
    kube.apply(
        ENDPOINT_SLICES,
        slice("shop", "web", "web-1", app_a.addr.port()),
    );
    kube.apply(
        PEER_AUTHENTICATIONS,
        json!({"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
            "metadata": {"name": "default", "namespace": "istio-system"},
            "spec": {"mtls": {"mode": "STRICT"}}}),
    );
    let out_port = free_port();
    let m = start_winmesh(&kube, out_port, "").await;
    let gateway = Envoy::start(&bin, &bootstrap_yaml(&m.cfg, &BootstrapOptions::default())).await;
    let gw_out = SocketAddr::from(([127, 0, 0, 1], out_port));
    let get = |host: &'static str| async move {
        let r = reqwest::Client::new()
            .get(format!("http://{gw_out}/"))
            .header("host", host)
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .ok()?;
        let code = r.status().as_u16();
        Some((code, r.text().await.unwrap_or_default()))
    };
    let diag = || async { format!("{}\n{}", registry(&m).await, gateway.diagnostics().await) };

    // The mirrored Service is routable by its Istio names; its pod has no sidecar: plaintext.
    let (_, body) = wait_for("mirrored service reachable", T, diag, || async {
        get("web.shop:8080").await.filter(|(c, _)| *c == 200)
    })
    .await;
    assert_eq!(body, "web-a");
    let reg = registry(&m).await;
    let svc = &reg["mesh"]["services"][0];
    assert_eq!(svc["host"], "web.shop.svc.cluster.local");
    assert_eq!(svc["endpoints"][0]["service_account"], "web");
    assert_eq!(svc["endpoints"][0]["tls_mode"], "disabled");
    assert_eq!(svc["endpoints"][0]["node"], "linux-1");
    assert_eq!(
        reg["mesh"]["peer_authentications"][0]["namespace"],
        "istio-system"
    );
    assert_eq!(reg["mesh"]["peer_authentications"][0]["mode"], "STRICT");

    // The pod moves (a new EndpointSlice version): traffic follows, no restart.
    kube.apply(
        ENDPOINT_SLICES,
        slice("shop", "web", "web-1", app_b.addr.port()),
    );
    wait_for("endpoints followed", T, diag, || async {
        get("web.shop:8080").await.filter(|(_, b)| b == "web-b")
    })
    .await;

    // A new Service appears and a deleted one disappears.
    kube.apply(SERVICES, service("shop", "cart", 9090));
    kube.apply(PODS, pod("shop", "cart-1"));
    kube.apply(
        ENDPOINT_SLICES,
        slice("shop", "cart", "cart-1", app_a.addr.port()),
    );
    wait_for("new service reachable", T, diag, || async {
        get("cart.shop.svc.cluster.local:9090")
            .await
            .filter(|(c, _)| *c == 200)
    })
    .await;
    kube.delete(SERVICES, "shop", "web");
    wait_for("deleted service gone", T, diag, || async {
        get("web.shop:8080").await.filter(|(c, _)| *c == 404)
    })
    .await;
    assert_eq!(
        get("cart.shop:9090").await.map(|(c, _)| c),
        Some(200),
        "the other service is untouched"
    );

    let (_, metrics) = winmesh::status::http_get(m.server.running.debug_addr, "/metrics", None)
        .await
        .unwrap();
    assert!(
        metrics.contains("winmesh_kubernetes_events_total{kind=\"endpointslices\"}"),
        "{metrics}"
    );
    gateway.stop().await;
    m.server.stop().await;
}

/// Without Istio's CRDs the mirror still syncs (and says why PeerAuthentications are missing); bad
/// objects are skipped and counted while the rest is served; the mesh file wins where both speak.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_without_istio_crds_and_with_bad_objects() {
    let kube = FakeKube::start(&[PEER_AUTHENTICATIONS]).await;
    kube.apply(SERVICES, service("shop", "web", 8080));
    kube.apply(
        SERVICES,
        json!({"metadata": {"name": "dns", "namespace": "shop"},
            "spec": {"type": "ExternalName", "externalName": "example.com"}}),
    );
    kube.apply(
        SERVICES,
        json!({"metadata": {"name": "winapp", "namespace": "win"},
            "spec": {"ports": [{"name": "http", "port": 80}]}}),
    );
    let m = start_winmesh(
        &kube,
        free_port(),
        "windows_services:\n  - {name: winapp, namespace: win, ports: [{name: http, port: 80, gateway_port: 15443}], backends: [127.0.0.1]}\n",
    )
    .await;
    let reg = wait_for(
        "mirror synced without CRDs",
        T,
        || async { registry(&m).await.to_string() },
        || async {
            let r = registry(&m).await;
            (r["mesh"]["services"].as_array().map(|a| a.len()) == Some(1)).then_some(r)
        },
    )
    .await;
    // The gateway-facing winapp Service is not mirrored back; ExternalName is skipped and reported.
    assert_eq!(
        reg["mesh"]["services"][0]["host"],
        "web.shop.svc.cluster.local"
    );
    assert_eq!(reg["mesh"]["windows_services"][0]["name"], "winapp");
    let rejected = reg["rejected"].as_array().unwrap();
    assert_eq!(rejected.len(), 1, "{reg}");
    assert_eq!(rejected[0]["name"], "shop/dns");
    let error = reg["error"].as_str().unwrap_or("");
    assert!(error.contains("peerauthentications"), "{reg}");
    let (_, metrics) = winmesh::status::http_get(m.server.running.debug_addr, "/metrics", None)
        .await
        .unwrap();
    assert!(
        metrics.contains("winmesh_kubernetes_objects_rejected 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("winmesh_kubernetes_watch_errors_total{kind=\"peerauthentications\"}")
    );
    m.server.stop().await;
}

/// An unreachable API server does not keep the mesh file's part down forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_cluster_serves_the_mesh_file_after_the_sync_timeout() {
    support::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    // A port nothing listens on.
    let dead = free_port();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: http://127.0.0.1:{dead}\n\
             contexts:\n- name: c\n  context:\n    cluster: c\n    user: u\ncurrent-context: c\nusers:\n- name: u\n  user: {{}}\n"
        ),
    )
    .unwrap();
    let mesh_file = dir.path().join("mesh.yaml");
    std::fs::write(
        &mesh_file,
        "services:\n  - {name: pinned, namespace: a, ports: [{name: http, port: 80}], endpoints: [{address: 10.0.0.1}]}\n",
    )
    .unwrap();
    let cfg = Config::parse(
        &format!(
            "xds:\n  listen: 127.0.0.1:0\ndebug:\n  listen: 127.0.0.1:0\nmesh:\n  file: {}\n  kubernetes:\n    enabled: true\n    kubeconfig: {}\n    sync_timeout: 1s\n",
            mesh_file.display(),
            kubeconfig.display()
        ),
        "test.yaml",
    )
    .unwrap();
    let server = winmesh::serve::start(cfg).await.expect("serve");
    let m = Mirror {
        _dir: dir,
        server,
        cfg: Config::parse("", "unused.yaml").unwrap(),
    };
    let reg = wait_for(
        "file part served after the timeout",
        T,
        || async { registry(&m).await.to_string() },
        || async {
            let r = registry(&m).await;
            (r["mesh"]["services"][0]["name"] == "pinned").then_some(r)
        },
    )
    .await;
    let error = reg["error"].as_str().unwrap_or("");
    assert!(error.contains("not synced"), "{reg}");
    m.server.stop().await;
}
