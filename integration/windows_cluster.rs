//! Windows services from the cluster, end to end on loopback: an opted-in app Service in the fake
//! API server, the elected winmesh publishing the mesh-facing Service and EndpointSlice, what istiod
//! would compute from them for a Linux sidecar (endpoints, tlsMode, SANs), an Istio-faithful sidecar
//! Envoy configured with exactly that, and the real gateway Envoy driven by winmesh. No mesh file
//! entry for the Windows app.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use support::fake_kube::{
    AUTHORIZATION_POLICIES, AUTHORIZATION_POLICIES_V1BETA1, ENDPOINT_SLICES, FakeKube, LEASES,
    PODS, SERVICES,
};
use support::tls::{MeshClient, SanCheck};
use support::{Backend, Envoy, free_port, wait_for};
use winmesh::bootstrap::{BootstrapOptions, bootstrap_yaml};
use winmesh::discovery::kube::{KubeObjects, MirrorSettings, build};
use winmesh::identity::SpiffeId;
use winmesh::identity::dev_ca::DevCa;
use winmesh::sidecar::{Inbound, Outbound, Sidecar};

const T: Duration = Duration::from_secs(30);
const WIN_ID: &str = "spiffe://cluster.local/ns/win/sa/winapp";
const GW_ID: &str = "spiffe://cluster.local/ns/winmesh/sa/gw";
const LINUX_ID: &str = "spiffe://cluster.local/ns/linux/sa/linuxapp";
const WIN_HOST: &str = "winapp.win.svc.cluster.local";

fn app_service(labels: Value, annotations: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "winapp-backend", "namespace": "win", "labels": labels,
                     "annotations": annotations},
        "spec": {"selector": {"app": "winapp"},
                 "ports": [{"name": "http", "port": 8080, "targetPort": "web"}]}})
}

fn opted_in(annotations: Value) -> Value {
    let mut a = json!({"winmesh.io/mesh-service": "winapp"});
    if let (Some(a), Some(extra)) = (a.as_object_mut(), annotations.as_object()) {
        a.extend(extra.clone());
    }
    app_service(json!({"winmesh.io/expose": "true"}), a)
}

/// The app Service's slice: each (pod, node, ready, port).
fn app_slice(eps: &[(&str, &str, bool, u16)]) -> Value {
    let port = eps.first().map_or(80, |e| e.3);
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "winapp-backend-x1", "namespace": "win",
                     "labels": {"kubernetes.io/service-name": "winapp-backend"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
        "endpoints": eps.iter().map(|(pod, node, ready, _)| json!({
            "addresses": ["127.0.0.1"], "conditions": {"ready": ready}, "nodeName": node,
            "targetRef": {"kind": "Pod", "name": pod, "namespace": "win"}})).collect::<Vec<_>>()})
}

fn windows_pod(name: &str, node: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "win", "labels": {"app": "winapp"}},
        "spec": {"serviceAccountName": "winapp", "nodeName": node, "containers": [],
                 "nodeSelector": {"kubernetes.io/os": "windows"}},
        "status": {"phase": "Running", "podIP": "127.0.0.1"}})
}

/// winapp's pod `winapp-a` on node win-1 and its app Service's slice (app port `port`).
fn winapp_pod(kube: &FakeKube, port: u16) {
    kube.apply(PODS, windows_pod("winapp-a", "win-1"));
    kube.apply(
        ENDPOINT_SLICES,
        app_slice(&[("winapp-a", "win-1", true, port)]),
    );
}

/// [`winapp_pod`], and the app Service opted in as `winapp`.
fn winapp_opted_in(kube: &FakeKube, port: u16) {
    winapp_pod(kube, port);
    kube.apply(SERVICES, opted_in(json!({})));
}

/// An Istio-faithful sidecar for the Linux app (certificates for LINUX_ID from the world's CA).
async fn linux_sidecar(w: &World, outbound: Vec<Outbound>, inbound: Option<Inbound>) -> Envoy {
    let certs = w.dir.path().join("linux-certs");
    w.ca.issue_to_dir(
        &SpiffeId::parse(LINUX_ID).unwrap(),
        Duration::from_secs(3600),
        &certs,
    )
    .unwrap();
    let sc = Sidecar {
        node_id: "linuxapp.linux".into(),
        admin: "127.0.0.1:0".parse().unwrap(),
        trust_domain: "cluster.local".into(),
        certs: &certs,
        outbound,
        inbound,
    };
    let bin = support::envoy_bin().unwrap();
    Envoy::start(&bin, &serde_yaml::to_string(&sc.bootstrap()).unwrap()).await
}

fn gateway_pod() -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "winmesh-gateway-abcde", "namespace": "winmesh",
                     "labels": {"app.kubernetes.io/name": "winmesh-gateway",
                                "security.istio.io/tlsMode": "istio"}},
        "spec": {"serviceAccountName": "gw", "nodeName": "win-1", "containers": []},
        "status": {"phase": "Running", "podIP": "127.0.0.1",
                   "conditions": [{"type": "Ready", "status": "True"}]}})
}

/// A Linux mesh service behind the sidecar's inbound port.
fn linux_objects(kube: &FakeKube, sc_in: u16) {
    kube.apply(
        SERVICES,
        json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "linuxapp", "namespace": "linux"},
            "spec": {"ports": [{"name": "http", "port": 8080, "targetPort": 8080}]}}),
    );
    kube.apply(
        PODS,
        json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "linuxapp-1", "namespace": "linux",
                         "labels": {"app": "linuxapp", "security.istio.io/tlsMode": "istio"}},
            "spec": {"serviceAccountName": "linuxapp", "nodeName": "linux-1", "containers": []},
            "status": {"phase": "Running", "podIP": "127.0.0.1"}}),
    );
    kube.apply(
        ENDPOINT_SLICES,
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "linuxapp-1", "namespace": "linux",
                         "labels": {"kubernetes.io/service-name": "linuxapp"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": sc_in, "protocol": "TCP"}],
            "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": true},
                           "targetRef": {"kind": "Pod", "name": "linuxapp-1", "namespace": "linux"}}]}),
    );
}

fn objects(kube: &FakeKube) -> KubeObjects {
    fn all<T: serde::de::DeserializeOwned>(kube: &FakeKube, path: &str) -> Vec<Arc<T>> {
        kube.list(path)
            .into_iter()
            .map(|v| Arc::new(serde_json::from_value(v).expect("object")))
            .collect()
    }
    KubeObjects {
        services: all(kube, SERVICES),
        endpoint_slices: all(kube, ENDPOINT_SLICES),
        pods: all(kube, PODS),
        ..Default::default()
    }
}

/// What istiod gives a Linux sidecar for `host`: endpoints (address, port for `port_name`,
/// tlsMode) and the SANs to expect. Computed with istiod's rules as winmesh's mirror implements
/// them for Linux services (targetRef Pod → service account, namespace and tlsMode label; the
/// Service's `alpha.istio.io/kubernetes-serviceaccounts`), with no Windows-specific knowledge.
fn istiod_view(
    kube: &FakeKube,
    host: &str,
    port_name: &str,
) -> (Vec<(SocketAddr, bool)>, Vec<String>) {
    let mut settings = MirrorSettings::new("cluster.local");
    settings.windows.enabled = false;
    let m = build(&objects(kube), &settings);
    let Some(svc) = m.services.iter().find(|s| s.host == host) else {
        return (vec![], vec![]);
    };
    let port = svc
        .ports
        .iter()
        .find(|p| p.name == port_name)
        .expect("port");
    let eps = svc
        .endpoints
        .iter()
        .filter(|e| e.ready)
        .filter_map(|e| {
            Some((
                SocketAddr::new(e.address, e.port_for(port)?),
                e.tls_mode == winmesh::model::TlsMode::Istio,
            ))
        })
        .collect();
    (eps, svc.expected_sans("cluster.local"))
}

struct World {
    dir: tempfile::TempDir,
    kube: FakeKube,
    server: winmesh::serve::Server,
    gateway: Envoy,
    gw_port: u16,
    gw_out: SocketAddr,
    ca: DevCa,
}

impl World {
    async fn diag(&self) -> String {
        let get = |p: &'static str| async move {
            winmesh::status::http_get(self.server.running.debug_addr, p, None)
                .await
                .map(|(_, b)| b)
                .unwrap_or_default()
        };
        format!(
            "registryz: {}\npublisherz: {}\nservices: {:?}\nslices: {:?}\nGATEWAY {}",
            get("/debug/registryz").await,
            get("/debug/publisherz").await,
            self.kube.list(SERVICES),
            self.kube.list(ENDPOINT_SLICES),
            self.gateway.diagnostics().await
        )
    }

    fn mesh_client(&self, id: &str) -> MeshClient {
        support::mesh_client(&self.ca, id)
    }

    /// One call to winapp over the mesh port as an Istio client would make it, accepting only
    /// `sans` from the gateway.
    async fn call(
        &self,
        c: &MeshClient,
        sans: Vec<String>,
        path: &str,
    ) -> Result<support::tls::Reply, String> {
        c.get(
            SocketAddr::from(([127, 0, 0, 1], self.gw_port)),
            &format!("outbound_.8080_._.{WIN_HOST}"),
            &["istio-http/1.1", "istio", "http/1.1"],
            SanCheck::Exact(sans),
            path,
        )
        .await
    }

    async fn until_status(&self, what: &str, c: &MeshClient, status: u16) -> support::tls::Reply {
        wait_for(
            what,
            T,
            || self.diag(),
            || async {
                self.call(c, vec![WIN_ID.into()], "/headers")
                    .await
                    .ok()
                    .filter(|r| r.status == status)
            },
        )
        .await
    }
}

async fn start_world(linux_sc_in: u16) -> Option<World> {
    start_world_missing(linux_sc_in, &[]).await
}

/// `missing`: collections the fake API server answers 404 for.
async fn start_world_missing(linux_sc_in: u16, missing: &[&str]) -> Option<World> {
    let bin = support::envoy_bin()?;
    support::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let kube = FakeKube::start(missing).await;
    kube.apply(PODS, gateway_pod());
    linux_objects(&kube, linux_sc_in);
    let kubeconfig = dir.path().join("kubeconfig");
    kube.write_kubeconfig(&kubeconfig);
    let mesh_file = dir.path().join("mesh.yaml");
    std::fs::write(&mesh_file, "").unwrap();
    let (gw_port, out_port) = (free_port(), free_port());
    let (server, cfg) = support::start_gateway_winmesh(
        dir.path(),
        &mesh_file,
        out_port,
        &format!(
            "  kubernetes:\n    enabled: true\n    kubeconfig: {}\n    debounce: 50ms\n    state_file: ''\n\
             \x20   windows:\n      gateway_port: {gw_port}\n      node_name: win-1\n\
             \x20     publish:\n        enabled: true\n        namespace: winmesh\n        identity: winmesh-win-1\n        lease_duration: 3s\n",
            kubeconfig.display()
        ),
    )
    .await;
    let gateway = Envoy::start(&bin, &bootstrap_yaml(&cfg, &BootstrapOptions::default())).await;
    let ca = DevCa::load_or_create(&dir.path().join("dev-ca"), "cluster.local").unwrap();
    Some(World {
        dir,
        kube,
        server,
        gateway,
        gw_port,
        gw_out: SocketAddr::from(([127, 0, 0, 1], out_port)),
        ca,
    })
}

/// Linux → Windows with Kubernetes objects only: publication, what istiod computes, the sidecar's
/// call, per-workload identity, pods moving between nodes, cross-node failover, policy CRDs, the
/// opt-in removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_windows_app_joins_the_mesh_from_kubernetes_objects_only() {
    let win_a = Backend::start("winapp-a").await;
    let win_c = Backend::start("winapp-c").await;
    let Some(w) = start_world(free_port()).await else {
        return;
    };
    let kube = &w.kube;
    winapp_opted_in(kube, win_a.addr.port());

    // The elected winmesh writes the mesh-facing Service and its EndpointSlice (apply, manager
    // `winmesh`), and holds the Lease.
    let slice = wait_for(
        "mesh-facing slice published",
        T,
        || w.diag(),
        || async {
            kube.get(ENDPOINT_SLICES, "win", "winapp-winmesh")
                .filter(|s| s["endpoints"].as_array().is_some_and(|a| a.len() == 1))
        },
    )
    .await;
    let svc = kube
        .get(SERVICES, "win", "winapp")
        .expect("mesh-facing Service");
    assert_eq!(
        svc["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "winmesh"
    );
    assert!(svc["spec"].get("selector").is_none(), "no selector: {svc}");
    assert_eq!(svc["spec"]["ports"][0]["targetPort"], w.gw_port);
    assert_eq!(svc["spec"]["ports"][0]["appProtocol"], "http");
    assert_eq!(
        svc["metadata"]["ownerReferences"][0]["name"], "winapp-backend",
        "deleting the app Service garbage-collects it"
    );
    assert_eq!(
        svc["metadata"]["annotations"]["alpha.istio.io/kubernetes-serviceaccounts"],
        "winapp"
    );
    assert_eq!(
        slice["metadata"]["labels"]["endpointslice.kubernetes.io/managed-by"],
        "winmesh.io/publisher"
    );
    assert_eq!(slice["metadata"]["ownerReferences"][0]["kind"], "Service");
    assert!(
        kube.writes()
            .iter()
            .filter(|(m, c, _, _)| m == "PATCH" && (c == SERVICES || c == ENDPOINT_SLICES))
            .all(|(_, _, _, manager)| manager.as_deref() == Some("winmesh")),
        "{:?}",
        kube.writes()
    );
    let lease = kube
        .get(LEASES, "winmesh", "winmesh-publisher")
        .expect("lease");
    assert_eq!(lease["spec"]["holderIdentity"], "winmesh-win-1");

    // What istiod gives a Linux sidecar for winapp: the gateway pod, with mTLS, accepting the
    // app's identity (from the annotation) and the gateway's (the endpoint pod's account).
    let (eps, sans) = istiod_view(kube, WIN_HOST, "http");
    assert_eq!(
        eps,
        vec![(SocketAddr::from(([127, 0, 0, 1], w.gw_port)), true)],
        "endpoints = the gateway pod on the mesh port, tlsMode istio"
    );
    assert_eq!(sans, vec![WIN_ID.to_string(), GW_ID.to_string()]);

    // A sidecar configured exactly so reaches the Windows pod; the app sees the caller's identity.
    let sidecar = linux_sidecar(
        &w,
        vec![Outbound {
            name: "to-winapp".into(),
            listen: "127.0.0.1:0".parse().unwrap(),
            host: WIN_HOST.into(),
            port: 8080,
            http2: false,
            endpoint: eps[0].0,
            expected_sans: sans.clone(),
        }],
        None,
    )
    .await;
    let to_win = wait_for(
        "sidecar listener",
        T,
        || sidecar.diagnostics(),
        || sidecar.listener_addr("to-winapp"),
    )
    .await;
    let url = format!("http://{to_win}/headers");
    let (_, body) = wait_for(
        "Linux → Windows through the sidecar",
        T,
        || w.diag(),
        || async { support::get_text(&url).await.filter(|(c, _)| *c == 200) },
    )
    .await;
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["backend"], "winapp-a");
    let xfcc = v["headers"]["x-forwarded-client-cert"]
        .as_str()
        .unwrap_or("");
    assert!(xfcc.contains(&format!("URI={LINUX_ID}")), "XFCC: {xfcc}");

    // The gateway presents the app's own identity for it (not the gateway's).
    let linux = w.mesh_client(LINUX_ID);
    let r = w
        .until_status("winapp presents its identity", &linux, 200)
        .await;
    assert!(r.body.contains("winapp-a"));
    assert!(
        w.call(&linux, vec![GW_ID.into()], "/").await.is_err(),
        "the gateway's own certificate is not what it presents for winapp"
    );

    // The pod moves to another node: by default this gateway does not cross nodes (503, and the
    // mesh-facing slice lists no gateway), and /debug/registryz says why.
    kube.apply(PODS, windows_pod("winapp-c", "win-2"));
    kube.apply(
        ENDPOINT_SLICES,
        app_slice(&[("winapp-c", "win-2", true, win_c.addr.port())]),
    );
    kube.delete(PODS, "win", "winapp-a");
    w.until_status("503 without a pod on this node", &linux, 503)
        .await;
    wait_for(
        "slice lists no gateway",
        T,
        || w.diag(),
        || async {
            kube.get(ENDPOINT_SLICES, "win", "winapp-winmesh")
                .filter(|s| s["endpoints"].as_array().is_some_and(|a| a.is_empty()))
        },
    )
    .await;
    let (_, reg) = winmesh::status::http_get(w.server.running.debug_addr, "/debug/registryz", None)
        .await
        .unwrap();
    assert!(reg.contains("ready on other nodes"), "{reg}");

    // Allowed to cross nodes: the other node's pod is used (failover priority), and the slice
    // lists the gateway again.
    kube.apply(SERVICES, opted_in(json!({"winmesh.io/cross-node": "true"})));
    let r = w.until_status("cross-node failover", &linux, 200).await;
    assert!(r.body.contains("winapp-c"), "{}", r.body);
    wait_for(
        "slice lists the gateway again",
        T,
        || w.diag(),
        || async {
            kube.get(ENDPOINT_SLICES, "win", "winapp-winmesh")
                .filter(|s| s["endpoints"].as_array().is_some_and(|a| a.len() == 1))
        },
    )
    .await;

    // AuthorizationPolicy CRDs for the Windows workload: a DENY by the pods' labels, then an
    // ALLOW by targetRefs naming another caller only.
    kube.apply(
        AUTHORIZATION_POLICIES,
        json!({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": "deny-linux", "namespace": "win"},
            "spec": {"selector": {"matchLabels": {"app": "winapp"}}, "action": "DENY",
                     "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/linux/sa/linuxapp"]}}]}]}}),
    );
    w.until_status("DENY policy enforced", &linux, 403).await;
    kube.delete(AUTHORIZATION_POLICIES, "win", "deny-linux");
    w.until_status("DENY policy removed", &linux, 200).await;
    kube.apply(
        AUTHORIZATION_POLICIES,
        json!({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": "allow-other", "namespace": "win"},
            "spec": {"targetRefs": [{"kind": "Service", "group": "", "name": "winapp-backend"}],
                     "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/other/sa/x"]}}]}]}}),
    );
    w.until_status("ALLOW policy leaves linuxapp out", &linux, 403)
        .await;
    let other = w.mesh_client("spiffe://cluster.local/ns/other/sa/x");
    let r = w
        .call(&other, vec![WIN_ID.into()], "/")
        .await
        .expect("other caller");
    assert_eq!(r.status, 200);

    // Opting out: winmesh deletes what it wrote; the gateway stops serving the host.
    kube.apply(SERVICES, app_service(json!({}), json!({})));
    wait_for(
        "mesh-facing objects deleted",
        T,
        || w.diag(),
        || async {
            (kube.get(SERVICES, "win", "winapp").is_none()
                && kube.get(ENDPOINT_SLICES, "win", "winapp-winmesh").is_none())
            .then_some(())
        },
    )
    .await;
    wait_for(
        "gateway no longer serves winapp",
        T,
        || w.diag(),
        || async {
            w.call(&other, vec![WIN_ID.into()], "/")
                .await
                .is_err()
                .then_some(())
        },
    )
    .await;
    assert!(
        kube.get(SERVICES, "win", "winapp-backend").is_some(),
        "the app Service is the user's"
    );
    sidecar.stop().await;
    w.gateway.stop().await;
    w.server.stop().await;
}

/// An Istio without `security.istio.io/v1` (before 1.22) serves AuthorizationPolicies as v1beta1:
/// they are enforced all the same (missing them would fail open).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1beta1_authorization_policies_are_enforced_too() {
    let win_a = Backend::start("winapp-a").await;
    let Some(w) = start_world_missing(free_port(), &[AUTHORIZATION_POLICIES]).await else {
        return;
    };
    let kube = &w.kube;
    winapp_pod(kube, win_a.addr.port());
    kube.apply(
        AUTHORIZATION_POLICIES_V1BETA1,
        json!({"apiVersion": "security.istio.io/v1beta1", "kind": "AuthorizationPolicy",
            "metadata": {"name": "deny-linux", "namespace": "win"},
            "spec": {"action": "DENY",
                     "rules": [{"from": [{"source": {"namespaces": ["linux"]}}]}]}}),
    );
    kube.apply(SERVICES, opted_in(json!({})));
    let linux = w.mesh_client(LINUX_ID);
    w.until_status("v1beta1 DENY enforced", &linux, 403).await;
    let other = w.mesh_client("spiffe://cluster.local/ns/other/sa/x");
    let r = w
        .call(&other, vec![WIN_ID.into()], "/")
        .await
        .expect("other caller");
    assert_eq!(r.status, 200);
    w.gateway.stop().await;
    w.server.stop().await;
}

/// A Service of the mesh-facing name that winmesh does not manage is never touched; labelled by
/// its owner, it is adopted (annotation and slice only, its selector and ports stay), which is the
/// zero-downtime migration path for an existing Windows Service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_service_is_never_taken_over_unless_handed_over() {
    let win_a = Backend::start("winapp-a").await;
    let Some(w) = start_world(free_port()).await else {
        return;
    };
    let kube = &w.kube;
    // The Windows Service Linux clients already call (selecting the Windows pods, plaintext).
    let existing = json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "winapp", "namespace": "win"},
        "spec": {"selector": {"app": "winapp"},
                 "ports": [{"name": "http", "port": 8080, "targetPort": "web"}]}});
    kube.apply(SERVICES, existing.clone());
    winapp_opted_in(kube, win_a.addr.port());
    // The gateway serves winapp at once (the mesh port does not depend on publication)…
    let linux = w.mesh_client(LINUX_ID);
    w.until_status("gateway serves winapp", &linux, 200).await;
    // …but the user's Service is left alone, and the conflict is reported.
    wait_for(
        "conflict reported",
        T,
        || w.diag(),
        || async {
            let (_, reg) =
                winmesh::status::http_get(w.server.running.debug_addr, "/debug/registryz", None)
                    .await
                    .ok()?;
            reg.contains("is not managed by winmesh").then_some(())
        },
    )
    .await;
    assert!(kube.get(ENDPOINT_SLICES, "win", "winapp-winmesh").is_none());
    assert!(
        !kube
            .writes()
            .iter()
            .any(|(_, c, n, _)| c == SERVICES && n == "win/winapp"),
        "never written: {:?}",
        kube.writes()
    );

    // Handed over: winmesh adds its slice and the SA annotation; the selector and ports stay.
    let mut handed = existing.clone();
    handed["metadata"]["labels"] = json!({"app.kubernetes.io/managed-by": "winmesh"});
    kube.apply(SERVICES, handed);
    wait_for(
        "adopted: slice written",
        T,
        || w.diag(),
        || async { kube.get(ENDPOINT_SLICES, "win", "winapp-winmesh") },
    )
    .await;
    let svc = wait_for(
        "adopted: annotation written",
        T,
        || w.diag(),
        || async {
            kube.get(SERVICES, "win", "winapp").filter(|s| {
                s["metadata"]["annotations"]["alpha.istio.io/kubernetes-serviceaccounts"]
                    == "winapp"
            })
        },
    )
    .await;
    assert_eq!(svc["spec"]["selector"]["app"], "winapp", "{svc}");
    assert_eq!(svc["spec"]["ports"][0]["targetPort"], "web", "{svc}");
    // Opting out again: the adopted Service stays (it is the user's), winmesh's slice goes.
    kube.apply(SERVICES, app_service(json!({}), json!({})));
    wait_for(
        "slice deleted",
        T,
        || w.diag(),
        || async {
            kube.get(ENDPOINT_SLICES, "win", "winapp-winmesh")
                .is_none()
                .then_some(())
        },
    )
    .await;
    assert!(kube.get(SERVICES, "win", "winapp").is_some());
    w.gateway.stop().await;
    w.server.stop().await;
}

/// Windows → Linux: a call from a Windows pod's address leaves with that app's identity; any other
/// address gets the gateway's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn windows_pods_call_linux_with_their_own_identity() {
    let win_a = Backend::start("winapp-a").await;
    let linux_app = Backend::start("linuxapp").await;
    let sc_in = free_port();
    let Some(w) = start_world(sc_in).await else {
        return;
    };
    let kube = &w.kube;
    winapp_opted_in(kube, win_a.addr.port());
    let sidecar = linux_sidecar(
        &w,
        vec![],
        Some(Inbound {
            listen: SocketAddr::from(([127, 0, 0, 1], sc_in)),
            app: linux_app.addr,
            app_http2: false,
            peer_exchange_trap: None,
        }),
    )
    .await;
    let caller = |from: [u8; 4]| async move {
        let c = reqwest::Client::builder()
            .local_address(std::net::IpAddr::from(from))
            .proxy(reqwest::Proxy::http(format!("http://{}", w.gw_out)).ok()?)
            .timeout(Duration::from_secs(5))
            .build()
            .ok()?;
        let r = c
            .get("http://linuxapp.linux:8080/headers")
            .send()
            .await
            .ok()?;
        if r.status() != 200 {
            return None;
        }
        let v: Value = serde_json::from_str(&r.text().await.ok()?).ok()?;
        v["headers"]["x-forwarded-client-cert"]
            .as_str()
            .map(str::to_string)
    };
    let diag = || async {
        format!(
            "{}\nSIDECAR {}",
            w.diag().await,
            sidecar.diagnostics().await
        )
    };
    // The Windows pod's address (127.0.0.1): winapp's identity.
    wait_for("a Windows pod calls as its app", T, diag, || async {
        caller([127, 0, 0, 1])
            .await
            .filter(|x| x.contains(&format!("URI={WIN_ID}")))
    })
    .await;
    // Another address (no known pod): the gateway's own identity, the documented default.
    let xfcc = wait_for("an unknown caller calls as the gateway", T, diag, || {
        caller([127, 0, 0, 2])
    })
    .await;
    assert!(xfcc.contains(&format!("URI={GW_ID}")), "{xfcc}");
    sidecar.stop().await;
    w.gateway.stop().await;
    w.server.stop().await;
}

fn locked_app(kube: &FakeKube, port: u16) {
    kube.apply(
        SERVICES,
        json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "locked-backend", "namespace": "win",
                         "labels": {"winmesh.io/expose": "true"},
                         "annotations": {"winmesh.io/mesh-service": "locked"}},
            "spec": {"selector": {"app": "locked"}, "ports": [{"name": "http", "port": 8080}]}}),
    );
    kube.apply(
        PODS,
        json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "locked-1", "namespace": "win", "labels": {"app": "locked"}},
            "spec": {"serviceAccountName": "locked", "nodeName": "win-1", "containers": []},
            "status": {"phase": "Running", "podIP": "127.0.0.1"}}),
    );
    kube.apply(
        ENDPOINT_SLICES,
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "locked-backend-1", "namespace": "win",
                         "labels": {"kubernetes.io/service-name": "locked-backend"}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": port}],
            "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": true}, "nodeName": "win-1",
                           "targetRef": {"kind": "Pod", "name": "locked-1", "namespace": "win"}}]}),
    );
}

/// Per-workload identity from istiod: winmesh mints each Windows app's token with TokenRequest
/// (audience `istio-ca`, short expiry), istiod authenticates it by review and signs the app's
/// SPIFFE ID, and the gateway presents it. A refused TokenRequest makes only that identity
/// Unavailable; once allowed, it recovers without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_workload_certificates_come_from_istiod_with_minted_tokens() {
    use support::fake_istiod::FakeIstiod;
    use winmesh::identity::istiod::{CaBackend, IstiodCa, SignRequest};
    let Some(bin) = support::envoy_bin() else {
        return;
    };
    support::init_tracing();
    let win_a = Backend::start("winapp-a").await;
    let locked = Backend::start("locked").await;
    let istiod = FakeIstiod::start(
        &[("tok-gw", GW_ID), ("tok-linux", LINUX_ID)],
        "istiod.istio-system.svc",
    )
    .await;
    let kube = FakeKube::start(&[]).await;
    let review = kube.token_review();
    istiod.set_token_review(Arc::new(move |t: &str| {
        review(t).map(|(namespace, service_account)| SpiffeId {
            trust_domain: "cluster.local".into(),
            namespace,
            service_account,
        })
    }));
    kube.deny_tokens("win", "locked", true);
    kube.apply(PODS, gateway_pod());
    winapp_opted_in(&kube, win_a.addr.port());
    locked_app(&kube, locked.addr.port());

    let dir = tempfile::tempdir().unwrap();
    kube.write_kubeconfig(&dir.path().join("kubeconfig"));
    std::fs::write(dir.path().join("istio-token"), "tok-gw\n").unwrap();
    std::fs::write(dir.path().join("root-cert.pem"), &istiod.root_pem).unwrap();
    std::fs::write(dir.path().join("mesh.yaml"), "").unwrap();
    let gw_port = free_port();
    let cfg_path = dir.path().join("winmesh.yaml");
    std::fs::write(
        &cfg_path,
        format!(
            "xds:\n  listen: 127.0.0.1:0\ndebug:\n  listen: 127.0.0.1:0\n\
             identity:\n  namespace: winmesh\n  service_account: gw\n  token_file: istio-token\n\
             ca:\n  mode: istiod\n  address: {}\n  root_cert_file: root-cert.pem\n  timeout: 2s\n\
             mesh:\n  file: mesh.yaml\n  kubernetes:\n    enabled: true\n    kubeconfig: kubeconfig\n    debounce: 50ms\n    state_file: ''\n\
             \x20   windows:\n      gateway_port: {gw_port}\n      node_name: win-1\n      mint_tokens: true\n      token_ttl: 10m\n\
             gateway:\n  inbound_address: 127.0.0.1\n  outbound_address: 127.0.0.1\n  outbound_port: {}\n",
            istiod.addr,
            free_port()
        ),
    )
    .unwrap();
    let mut cfg = winmesh::config::Config::load(&cfg_path).unwrap();
    let server = winmesh::serve::start(cfg.clone()).await.unwrap();
    cfg.xds.listen = server.running.xds_addr;
    let gateway = Envoy::start(&bin, &bootstrap_yaml(&cfg, &BootstrapOptions::default())).await;
    let debug = server.running.debug_addr;
    let certs = || async move {
        let (_, body) = winmesh::status::http_get(debug, "/debug/certs", None)
            .await
            .unwrap_or_default();
        serde_json::from_str::<Value>(&body).unwrap_or(Value::Null)
    };
    let state_of = |v: &Value, id: &str| -> String {
        v["identities"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|i| i["identity"] == id)
            .and_then(|i| i["state"].as_str())
            .unwrap_or("absent")
            .to_string()
    };
    let last = std::sync::Mutex::new(String::new());
    let last = &last;
    let diag = || async {
        let last_call = last.lock().unwrap().clone();
        let (_, reg) = winmesh::status::http_get(debug, "/debug/registryz", None)
            .await
            .unwrap_or_default();
        format!(
            "last call: {}\nstats: {:?}\ncerts: {}\nregistryz: {reg}\nlisteners: {:?}\nGATEWAY {}",
            last_call,
            gateway
                .admin_get("/stats?filter=listener_manager|ssl.handshake|downstream_cx|sds")
                .await,
            certs().await,
            gateway.admin_get("/listeners").await,
            gateway.diagnostics().await
        )
    };

    // A Linux caller with an istiod-issued certificate.
    std::fs::write(dir.path().join("linux-token"), "tok-linux").unwrap();
    let ca = IstiodCa {
        address: istiod.addr.to_string(),
        server_name: "istiod.istio-system.svc".into(),
        root_cert_file: dir.path().join("root-cert.pem"),
        cluster_id: "Kubernetes".into(),
        timeout: Duration::from_secs(5),
        cert_signer: String::new(),
    };
    let id = SpiffeId::parse(LINUX_ID).unwrap();
    let k = winmesh::identity::csr::generate(&id).unwrap();
    let chain = ca
        .sign(SignRequest {
            identity: id,
            csr_pem: k.csr_pem,
            ttl: Duration::from_secs(3600),
            token_file: Some(dir.path().join("linux-token")),
            minter: None,
            now: std::time::SystemTime::now(),
        })
        .await
        .unwrap();
    let linux = MeshClient {
        chain_pem: chain[..chain.len() - 1].concat(),
        key_pem: k.key.expose().to_string(),
        roots_pem: istiod.root_pem.clone(),
    };
    let call = |host: &'static str, san: &'static str| {
        let linux = &linux;
        async move {
            linux
                .get(
                    SocketAddr::from(([127, 0, 0, 1], gw_port)),
                    &format!("outbound_.8080_._.{host}"),
                    &["istio-http/1.1", "istio", "http/1.1"],
                    SanCheck::Exact(vec![san.into()]),
                    "/",
                )
                .await
        }
    };
    // winapp is served with its own istiod-signed identity.
    let r = wait_for(
        "winapp presents its istiod certificate",
        T,
        diag,
        || async {
            let r = call(WIN_HOST, WIN_ID).await;
            *last.lock().unwrap() = format!("{:?}", r.as_ref().map(|r| (r.status, &r.body)));
            r.ok().filter(|r| r.status == 200)
        },
    )
    .await;
    assert_eq!(r.body, "winapp-a");
    let minted = kube.minted();
    let m = minted
        .iter()
        .find(|m| m.service_account == "winapp")
        .expect("a token was minted for winapp");
    assert_eq!(
        (m.namespace.as_str(), m.audiences.clone()),
        ("win", vec!["istio-ca".to_string()])
    );
    assert_eq!(m.expiration_seconds, 600, "the configured short expiry");
    // The refused one is Unavailable, says why, and leaks no token; the others are unaffected.
    let v = wait_for("locked identity unavailable", T, diag, || async {
        let v = certs().await;
        state_of(&v, "spiffe://cluster.local/ns/win/sa/locked")
            .starts_with("Unavailable")
            .then_some(v)
    })
    .await;
    let text = v.to_string();
    assert!(text.contains("TokenRequest for win/locked"), "{text}");
    assert!(
        !text.contains("minted-"),
        "no token in debug output: {text}"
    );
    assert_eq!(state_of(&v, WIN_ID), "Available");
    assert_eq!(state_of(&v, GW_ID), "Available");
    // RBAC fixed: it recovers on its own (backoff, no restart).
    kube.deny_tokens("win", "locked", false);
    wait_for("locked recovers", T, diag, || async {
        call(
            "locked.win.svc.cluster.local",
            "spiffe://cluster.local/ns/win/sa/locked",
        )
        .await
        .ok()
        .filter(|r| r.status == 200)
    })
    .await;
    gateway.stop().await;
    server.stop().await;
}

/// Two winmesh (two Windows nodes) contend for the publisher Lease: exactly one leads and writes;
/// when it shuts down it gives the Lease up and the other takes over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_publisher_is_elected_and_another_takes_over() {
    use std::sync::RwLock;
    use winmesh::discovery::kube::{KubeMesh, KubeState};
    use winmesh::discovery::publish::{PublishStatus, Publisher};
    support::init_tracing();
    let kube = FakeKube::start(&[]).await;
    kube.apply(PODS, gateway_pod());
    winapp_opted_in(&kube, 8080);
    // The model both compute from the cluster (as their mirrors would).
    let mut settings = MirrorSettings::new("cluster.local");
    settings.publish = Some(winmesh::discovery::kube_windows::PublishSettings {
        namespace: "winmesh".into(),
        gateway_selector: [(
            "app.kubernetes.io/name".to_string(),
            "winmesh-gateway".to_string(),
        )]
        .into(),
    });
    let mesh: KubeMesh = build(&objects(&kube), &settings);
    assert_eq!(mesh.publications.len(), 1);
    let (_state_tx, state_rx) = tokio::sync::watch::channel(KubeState {
        mesh: Some(Arc::new(mesh)),
        ..Default::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let kc = dir.path().join("kubeconfig");
    kube.write_kubeconfig(&kc);
    let client = winmesh::discovery::kube::client(Some(&kc)).await.unwrap();
    let metrics = Arc::new(winmesh::metrics::Metrics::new());
    let start = |name: &str| {
        let status = Arc::new(RwLock::new(PublishStatus::default()));
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let p = Publisher {
            client: client.clone(),
            namespace: "winmesh".into(),
            lease_name: "winmesh-publisher".into(),
            identity: name.into(),
            lease_duration: Duration::from_secs(3),
            metrics: metrics.clone(),
            status: status.clone(),
        };
        let task = tokio::spawn(p.run(state_rx.clone(), stop_rx));
        (status, stop_tx, task)
    };
    let (a, stop_a, task_a) = start("winmesh-win-1");
    let (b, stop_b, task_b) = start("winmesh-win-2");
    let leader = |s: &Arc<RwLock<PublishStatus>>| s.read().unwrap().leader;
    wait_for(
        "one leader",
        T,
        || async { String::new() },
        || async { (leader(&a) ^ leader(&b)).then_some(()) },
    )
    .await;
    wait_for(
        "published",
        T,
        || async { String::new() },
        || async { kube.get(ENDPOINT_SLICES, "win", "winapp-winmesh") },
    )
    .await;
    // Several renewals later there is still exactly one leader, and the Lease names it.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(leader(&a) ^ leader(&b), "exactly one leader");
    // Keep both stop senders alive: dropping one would stop its publisher.
    let (first, first_stop, first_task, other, _other_stop, _other_task) = if leader(&a) {
        (a, stop_a, task_a, b, stop_b, task_b)
    } else {
        (b, stop_b, task_b, a, stop_a, task_a)
    };
    let holder =
        kube.get(LEASES, "winmesh", "winmesh-publisher").unwrap()["spec"]["holderIdentity"]
            .as_str()
            .unwrap()
            .to_string();
    assert_eq!(Some(holder), first.read().unwrap().holder.clone());
    // The leader shuts down: it releases the Lease, the other takes over well within its duration.
    first_stop.send_replace(true);
    let _ = first_task.await;
    let t0 = std::time::Instant::now();
    wait_for(
        "the other takes over",
        T,
        || async { String::new() },
        || async { leader(&other).then_some(()) },
    )
    .await;
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
}

/// A minted token is reused while more than half its lifetime is left: renewals and retries of one
/// identity do not mint a token per CSR; another service account gets its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minted_tokens_are_reused_for_half_their_life() {
    let kube = FakeKube::start(&[]).await;
    let dir = tempfile::tempdir().unwrap();
    let kc = dir.path().join("kubeconfig");
    kube.write_kubeconfig(&kc);
    let client = winmesh::discovery::kube::client(Some(&kc)).await.unwrap();
    let tokens = winmesh::discovery::tokens::KubeTokens::new(
        client,
        Duration::from_secs(600),
        Arc::new(winmesh::metrics::Metrics::new()),
    );
    let a = tokens.minter("win", "winapp");
    let first = a.0.token().await.unwrap();
    assert_eq!(a.0.token().await.unwrap(), first);
    assert_eq!(kube.minted().len(), 1);
    let b = tokens.minter("win", "other");
    assert_ne!(b.0.token().await.unwrap(), first);
    assert_eq!(kube.minted().len(), 2);
}
