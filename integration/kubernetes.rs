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
    assert_eq!(
        kube.user_agents(),
        [format!("winmesh/{}", env!("CARGO_PKG_VERSION"))],
        "every API request says it is winmesh"
    );
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
            "xds:\n  listen: 127.0.0.1:0\ndebug:\n  listen: 127.0.0.1:0\nmesh:\n  file: {}\n  kubernetes:\n    enabled: true\n    kubeconfig: {}\n    sync_timeout: 1s\n    state_file: \"\"\n",
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

/// winmesh with the mirror on a fixed xDS port, so a restarted winmesh is the one Envoy reconnects to.
fn mirror_config(dir: &std::path::Path, kube: SocketAddr, xds: u16, out_port: u16) -> Config {
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: http://{kube}\n\
             contexts:\n- name: c\n  context:\n    cluster: c\n    user: u\ncurrent-context: c\nusers:\n- name: u\n  user: {{}}\n"
        ),
    )
    .unwrap();
    std::fs::write(dir.join("mesh.yaml"), "services: []\n").unwrap();
    let cfg = dir.join("winmesh.yaml");
    std::fs::write(
        &cfg,
        format!(
            "xds:\n  listen: 127.0.0.1:{xds}\ndebug:\n  listen: 127.0.0.1:0\nidentity:\n  namespace: winmesh\n  service_account: gw\n\
             ca:\n  mode: dev\n  state_dir: dev-ca\nmesh:\n  file: mesh.yaml\n  kubernetes:\n    enabled: true\n    kubeconfig: kubeconfig\n    debounce: 50ms\n    sync_timeout: 3s\n\
             gateway:\n  inbound_address: 127.0.0.1\n  outbound_address: 127.0.0.1\n  outbound_port: {out_port}\n"
        ),
    )
    .unwrap();
    Config::load(&cfg).unwrap()
}

fn labelled_pod(ns: &str, name: &str) -> Value {
    // A sidecar label: an Istio client sends mTLS unless PeerAuthentication says DISABLE.
    let mut p = pod(ns, name);
    p["metadata"]["labels"]["security.istio.io/tlsMode"] = json!("istio");
    p
}

fn disable(ns: &str) -> Value {
    json!({"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
        "metadata": {"name": "default", "namespace": ns},
        "spec": {"mtls": {"mode": "DISABLE"}}})
}

/// `web.shop:8080` through the gateway's Windows-facing proxy.
async fn web_via(gw_out: SocketAddr) -> Option<(u16, String)> {
    let r = reqwest::Client::new()
        .get(format!("http://{gw_out}/"))
        .header("host", "web.shop:8080")
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .ok()?;
    let code = r.status().as_u16();
    Some((code, r.text().await.unwrap_or_default()))
}

/// Where both persisted-state tests start: the fake API server with `web.shop` (its pod is labelled
/// for a sidecar but the app has none, so it only answers because PeerAuthentication DISABLE makes
/// the gateway send plaintext), winmesh on a fixed xDS port, the gateway Envoy, the route working and
/// the mirror persisted.
struct Persisted {
    kube: FakeKube,
    _app: Backend,
    _dir: tempfile::TempDir,
    cfg: Config,
    server: winmesh::serve::Server,
    gateway: Envoy,
    gw_out: SocketAddr,
}

async fn persisted_world(bin: &std::path::Path) -> Persisted {
    support::init_tracing();
    let app = Backend::start("web-a").await;
    let kube = FakeKube::start(&[]).await;
    kube.apply(SERVICES, service("shop", "web", 8080));
    kube.apply(PODS, labelled_pod("shop", "web-1"));
    kube.apply(
        ENDPOINT_SLICES,
        slice("shop", "web", "web-1", app.addr.port()),
    );
    kube.apply(PEER_AUTHENTICATIONS, disable("shop"));
    let dir = tempfile::tempdir().unwrap();
    let (xds, out_port) = (free_port(), free_port());
    let cfg = mirror_config(dir.path(), kube.addr, xds, out_port);
    let server = winmesh::serve::start(cfg.clone()).await.expect("serve");
    let gateway = Envoy::start(bin, &bootstrap_yaml(&cfg, &BootstrapOptions::default())).await;
    let gw_out = SocketAddr::from(([127, 0, 0, 1], out_port));
    wait_for(
        "mirrored service reachable in plaintext",
        T,
        || gateway.diagnostics(),
        || async {
            web_via(gw_out)
                .await
                .filter(|(c, b)| *c == 200 && b == "web-a")
        },
    )
    .await;
    let state_file = dir.path().join(".state/kubernetes-mirror.json");
    wait_for(
        "state persisted",
        T,
        || async { String::new() },
        || async { state_file.is_file().then_some(()) },
    )
    .await;
    Persisted {
        kube,
        _app: app,
        _dir: dir,
        cfg,
        server,
        gateway,
        gw_out,
    }
}

/// Restarted while the API server is down, winmesh serves the persisted mirror instead of the mesh
/// file alone: Envoy keeps every cluster and route, and the outage is visible. When the API returns,
/// its objects replace the persisted ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_during_an_api_outage_serves_the_persisted_mirror() {
    let Some(bin) = support::envoy_bin() else {
        return;
    };
    let Persisted {
        kube,
        _app,
        _dir,
        cfg,
        server,
        gateway,
        gw_out,
    } = persisted_world(&bin).await;
    let kube_addr = kube.addr;
    let get = || web_via(gw_out);
    let clusters_before = gateway.clusters().await;
    // winmesh restarts while the API server is down.
    server.stop().await;
    drop(kube);
    let server = winmesh::serve::start(cfg.clone())
        .await
        .expect("serve again");
    let debug = server.running.debug_addr;
    let reg = wait_for(
        "persisted state served",
        T,
        || gateway.diagnostics(),
        || async {
            let (_, r) = winmesh::status::http_get(debug, "/debug/registryz", None)
                .await
                .ok()?;
            let v: Value = serde_json::from_str(&r).ok()?;
            v["persisted"].is_string().then_some(v)
        },
    )
    .await;
    assert!(
        reg["persisted"].as_str().unwrap().contains("services"),
        "{reg}"
    );
    // Ready (the gateway works), and saying what it serves.
    let ready = wait_for(
        "ready while serving persisted state",
        T,
        || gateway.diagnostics(),
        || async {
            let (code, body) = winmesh::status::http_get(debug, "/readyz", None)
                .await
                .ok()?;
            (code == 200).then_some(body)
        },
    )
    .await;
    assert!(
        ready.contains("serving persisted Kubernetes state"),
        "{ready}"
    );
    // Past the sync timeout, Envoy still has everything and the route still works (plaintext:
    // the persisted PeerAuthentication DISABLE is still in force).
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(gateway.clusters().await, clusters_before);
    assert_eq!(get().await, Some((200, "web-a".to_string())));
    // The API server returns with a changed world: its objects win, the note goes away.
    let app_b = Backend::start("web-b").await;
    let kube = FakeKube::start_at(kube_addr, &[]).await;
    kube.apply(SERVICES, service("shop", "web", 8080));
    kube.apply(PODS, labelled_pod("shop", "web-1"));
    kube.apply(
        ENDPOINT_SLICES,
        slice("shop", "web", "web-1", app_b.addr.port()),
    );
    kube.apply(PEER_AUTHENTICATIONS, disable("shop"));
    wait_for(
        "live state replaces the persisted one",
        Duration::from_secs(60),
        || gateway.diagnostics(),
        || async { get().await.filter(|(_, b)| b == "web-b") },
    )
    .await;
    // Every kind relists (each watch on its own backoff): the persisted state is no longer used.
    wait_for(
        "every kind listed again",
        Duration::from_secs(90),
        || async {
            winmesh::status::http_get(debug, "/debug/registryz", None)
                .await
                .map(|x| x.1)
                .unwrap_or_default()
        },
        || async {
            let (_, r) = winmesh::status::http_get(debug, "/debug/registryz", None)
                .await
                .ok()?;
            let v: Value = serde_json::from_str(&r).ok()?;
            v["persisted"].is_null().then_some(())
        },
    )
    .await;
    gateway.stop().await;
    server.stop().await;
}

/// One kind that cannot be listed (PeerAuthentication → 403 after a restart) keeps its last known
/// objects: a DISABLE namespace keeps getting plaintext instead of mTLS it cannot answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forbidden_kind_keeps_its_last_known_objects() {
    let Some(bin) = support::envoy_bin() else {
        return;
    };
    let Persisted {
        kube,
        _app,
        _dir,
        cfg,
        server,
        gateway,
        gw_out,
    } = persisted_world(&bin).await;
    let get = || web_via(gw_out);
    server.stop().await;
    kube.forbid(PEER_AUTHENTICATIONS, true);
    let server = winmesh::serve::start(cfg.clone())
        .await
        .expect("serve again");
    let debug = server.running.debug_addr;
    let reg = wait_for(
        "PeerAuthentications kept from the persisted state",
        T,
        || gateway.diagnostics(),
        || async {
            let (_, r) = winmesh::status::http_get(debug, "/debug/registryz", None)
                .await
                .ok()?;
            let v: Value = serde_json::from_str(&r).ok()?;
            v["persisted"]
                .as_str()
                .is_some_and(|p| p.contains("peerauthentications"))
                .then_some(v)
        },
    )
    .await;
    assert_eq!(
        reg["mesh"]["peer_authentications"][0]["mode"], "DISABLE",
        "{reg}"
    );
    assert!(
        reg["error"]
            .as_str()
            .unwrap_or("")
            .contains("peerauthentications"),
        "{reg}"
    );
    // Requests keep working for longer than the old behaviour took to send mTLS.
    for _ in 0..10 {
        assert_eq!(get().await.map(|x| x.0), Some(200));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    gateway.stop().await;
    server.stop().await;
}
