//! The xDS core against a real stock Envoy: initial config over SotW and delta, zero-loss cluster and
//! route changes under traffic, NACK handling, and reconvergence after restarting either side.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use support::fixtures::{self, mesh};
use support::{Backend, Envoy, Traffic, wait_for};
use winmesh::app::{self, Running};
use winmesh::bootstrap::{BootstrapOptions, bootstrap_yaml};
use winmesh::config::{Config, XdsMode};
use winmesh::xds::{SnapshotBuilder, SnapshotWriter};

const T: Duration = Duration::from_secs(30);

fn config(xds: SocketAddr) -> Config {
    let mut cfg = Config::default();
    cfg.xds.listen = xds;
    cfg.debug.listen = "127.0.0.1:0".parse().unwrap();
    cfg
}

async fn start_winmesh(xds: SocketAddr) -> (Running, SnapshotWriter, Config) {
    let cfg = config(xds);
    let (running, writer) = app::start(&cfg).await.expect("start winmesh");
    let mut cfg = cfg;
    cfg.xds.listen = running.xds_addr;
    (running, writer, cfg)
}

/// Stops winmesh and waits until Envoy noticed; returns the xDS address to restart on.
async fn stop_winmesh(running: Running, envoy: &Envoy) -> SocketAddr {
    let xds_addr = running.xds_addr;
    running.stop().await;
    wait_for(
        "envoy notices the control plane is gone",
        T,
        || envoy.diagnostics(),
        || async { (envoy.stat("control_plane.connected_state").await == 0).then_some(()) },
    )
    .await;
    xds_addr
}

async fn start_envoy(bin: &Path, cfg: &Config, mode: XdsMode) -> Envoy {
    let boot = bootstrap_yaml(
        cfg,
        &BootstrapOptions {
            node_id: Some(format!("gw-{mode:?}")),
            mode: Some(mode),
            token: None,
        },
    );
    Envoy::start(bin, &boot).await
}

async fn syncz(r: &Running) -> Value {
    let (code, body) = winmesh::status::http_get(r.debug_addr, "/debug/syncz", None)
        .await
        .expect("syncz");
    assert_eq!(code, 200);
    serde_json::from_str(&body).expect("syncz json")
}

fn type_status<'a>(v: &'a Value, short: &str) -> Option<&'a Value> {
    v["clients"][0]["types"]
        .as_array()?
        .iter()
        .find(|t| t["short"] == short)
}

async fn listener_url(envoy: &Envoy) -> String {
    let a = wait_for(
        "listener http bound",
        T,
        || envoy.diagnostics(),
        || envoy.listener_addr("http"),
    )
    .await;
    format!("http://{a}/")
}

async fn wait_body(envoy: &Envoy, url: &str, want: &str) {
    wait_for(
        &format!("{url} to answer {want}"),
        T,
        || envoy.diagnostics(),
        || async {
            match support::get_text(url).await {
                Some((200, b)) if b == want => Some(()),
                _ => None,
            }
        },
    )
    .await
}

async fn wait_synced(r: &Running, envoy: &Envoy, types: &[&str]) {
    wait_for(
        "all types SYNCED in /debug/syncz",
        T,
        || async { format!("{}\n{}", syncz(r).await, envoy.diagnostics().await) },
        || async {
            let v = syncz(r).await;
            types
                .iter()
                .all(|t| type_status(&v, t).is_some_and(|s| s["status"] == "SYNCED"))
                .then_some(())
        },
    )
    .await
}

fn bin() -> Option<PathBuf> {
    support::envoy_bin()
}

/// `winmesh status --ready --envoy` against this winmesh and this Envoy, as the pod's probe runs it.
fn ready_probe(running: &Running, envoy: &support::Envoy) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_winmesh"))
        .args(["status", "--ready", "--envoy", "--debug-addr"])
        .arg(running.debug_addr.to_string())
        .arg("--envoy-admin")
        .arg(envoy.admin.to_string())
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initial_config_arrives_over_sotw_and_delta() {
    support::init_tracing();
    let Some(bin) = bin() else { return };
    for mode in [XdsMode::Sotw, XdsMode::Delta] {
        let a = Backend::start("backend-a").await;
        let (running, mut writer, cfg) = start_winmesh("127.0.0.1:0".parse().unwrap()).await;
        writer.publish(mesh("a", &[("a", &[a.addr])]));
        let envoy = start_envoy(&bin, &cfg, mode).await;
        wait_for(
            "envoy LIVE",
            T,
            || envoy.diagnostics(),
            || async { envoy.is_live().await.then_some(()) },
        )
        .await;
        let url = listener_url(&envoy).await;
        wait_body(&envoy, &url, "backend-a").await;
        wait_synced(&running, &envoy, &["CDS", "EDS", "LDS", "RDS"]).await;
        // The probe command sees both winmesh and Envoy ready.
        let probe = ready_probe(&running, &envoy);
        assert!(
            probe.status.success(),
            "{}",
            String::from_utf8_lossy(&probe.stderr)
        );
        assert!(String::from_utf8_lossy(&probe.stdout).contains("envoy: LIVE"));
        assert!(
            String::from_utf8_lossy(&probe.stdout).contains("envoy: config accepted"),
            "{}",
            String::from_utf8_lossy(&probe.stdout)
        );
        let v = syncz(&running).await;
        let c = &v["clients"][0];
        assert_eq!(c["node_id"], format!("gw-{mode:?}"));
        assert_eq!(
            c["envoy_version"],
            support::envoy_version(&bin),
            "version from the node's build version"
        );
        assert_eq!(
            c["mode"],
            if mode == XdsMode::Sotw {
                "SotW"
            } else {
                "Delta"
            }
        );
        assert!(c["peer"].as_str().unwrap().starts_with("127.0.0.1:"));
        // The served config is inspectable in Envoy's ConfigDump shape.
        let (code, dump) = winmesh::status::http_get(
            running.debug_addr,
            &format!("/debug/config_dump?node=gw-{mode:?}"),
            None,
        )
        .await
        .unwrap();
        assert_eq!(code, 200);
        let dump: Value = serde_json::from_str(&dump).unwrap();
        assert_eq!(
            dump["configs"][0]["dynamic_active_clusters"][0]["cluster"]["name"],
            "a"
        );
        // istiod's parameter name selects the same node's view.
        let (code, by_proxy_id) = winmesh::status::http_get(
            running.debug_addr,
            &format!("/debug/config_dump?proxyID=gw-{mode:?}"),
            None,
        )
        .await
        .unwrap();
        assert_eq!(code, 200);
        let by_proxy_id: Value = serde_json::from_str(&by_proxy_id).unwrap();
        assert_eq!(by_proxy_id["configs"], dump["configs"]);
        // Like istiod: a proxy that is not connected is a 404, not the shared snapshot.
        let (code, body) = winmesh::status::http_get(
            running.debug_addr,
            "/debug/config_dump?proxyID=nobody",
            None,
        )
        .await
        .unwrap();
        assert_eq!(code, 404, "{body}");
        assert!(body.contains("proxy not connected: nobody"), "{body}");
        // The index lists every endpoint, including the registered views.
        let (code, index) = winmesh::status::http_get(running.debug_addr, "/debug/", None)
            .await
            .unwrap();
        assert_eq!(code, 200);
        for path in ["/debug/syncz", "/debug/config_dump", "/readyz", "/metrics"] {
            assert!(
                index.contains(path),
                "{path} missing from the index: {index}"
            );
        }
        // Metrics count the connected proxy and the pushes.
        let (_, metrics) = winmesh::status::http_get(running.debug_addr, "/metrics", None)
            .await
            .unwrap();
        assert!(
            metrics.contains("winmesh_xds_connected_proxies{service=\"ADS\"} 1"),
            "{metrics}"
        );
        assert!(metrics.contains("winmesh_xds_pushes_total{type=\"CDS\"}"));
        assert!(metrics.contains("winmesh_xds_push_to_ack_seconds_count{type=\"CDS\"}"));
        envoy.stop().await;
        running.stop().await;
    }
}

/// Adds and removes clusters and moves the route between them under steady traffic: zero failures.
async fn changes_under_traffic(mode: XdsMode) {
    support::init_tracing();
    let Some(bin) = bin() else { return };
    let (a, b, c) = (
        Backend::start("A").await,
        Backend::start("B").await,
        Backend::start("C").await,
    );
    let (running, mut writer, cfg) = start_winmesh("127.0.0.1:0".parse().unwrap()).await;
    writer.publish(mesh("a", &[("a", &[a.addr])]));
    let envoy = start_envoy(&bin, &cfg, mode).await;
    let url = listener_url(&envoy).await;
    wait_body(&envoy, &url, "A").await;

    let accept = Arc::new(Mutex::new(vec!["A".to_string()]));
    let traffic = Traffic::start_n(url.clone(), accept.clone(), 4);
    tokio::time::sleep(Duration::from_millis(300)).await;

    // 1. Add cluster b (unused yet).
    writer.publish(mesh("a", &[("a", &[a.addr]), ("b", &[b.addr])]));
    wait_for(
        "cluster b",
        T,
        || envoy.diagnostics(),
        || async {
            envoy
                .clusters()
                .await
                .contains(&"b".to_string())
                .then_some(())
        },
    )
    .await;
    // 2. Move the route to b and remove a in the same snapshot (make-before-break).
    accept.lock().unwrap().push("B".into());
    writer.publish(mesh("b", &[("b", &[b.addr])]));
    wait_body(&envoy, &url, "B").await;
    wait_for(
        "cluster a removed",
        T,
        || envoy.diagnostics(),
        || async { (!envoy.clusters().await.contains(&"a".to_string())).then_some(()) },
    )
    .await;
    accept.lock().unwrap().retain(|x| x == "B");
    tokio::time::sleep(Duration::from_millis(300)).await;
    // 3. Add c and move to it, then move endpoints of c to another backend.
    accept.lock().unwrap().push("C".into());
    writer.publish(mesh("c", &[("b", &[b.addr]), ("c", &[c.addr])]));
    wait_body(&envoy, &url, "C").await;
    accept.lock().unwrap().push("A".into());
    writer.publish(mesh("c", &[("c", &[a.addr])]));
    wait_body(&envoy, &url, "A").await;
    wait_for(
        "cluster b removed",
        T,
        || envoy.diagnostics(),
        || async { (envoy.clusters().await == vec!["c".to_string()]).then_some(()) },
    )
    .await;
    // 4. Flip the route between two clusters, each time removing the old one, many times.
    accept
        .lock()
        .unwrap()
        .extend(["B".to_string(), "C".to_string()]);
    for i in 0..10 {
        let (name, backend, want) = if i % 2 == 0 {
            ("x", b.addr, "B")
        } else {
            ("y", c.addr, "C")
        };
        writer.publish(mesh(name, &[(name, &[backend])]));
        wait_body(&envoy, &url, want).await;
        wait_for(
            "old cluster removed",
            T,
            || envoy.diagnostics(),
            || async { (envoy.clusters().await == vec![name.to_string()]).then_some(()) },
        )
        .await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    let (ok, failed, last) = traffic.stop().await;
    assert!(ok > 20, "too little traffic: {ok}");
    assert_eq!(
        failed,
        0,
        "{failed} failed requests (of {}), last: {last}",
        ok + failed
    );
    wait_synced(&running, &envoy, &["CDS", "EDS", "LDS", "RDS"]).await;
    envoy.stop().await;
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_under_traffic_lose_nothing_sotw() {
    changes_under_traffic(XdsMode::Sotw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_under_traffic_lose_nothing_delta() {
    changes_under_traffic(XdsMode::Delta).await;
}

async fn nack(mode: XdsMode) {
    support::init_tracing();
    let Some(bin) = bin() else { return };
    let a = Backend::start("A").await;
    let (running, mut writer, cfg) = start_winmesh("127.0.0.1:0".parse().unwrap()).await;
    writer.publish(mesh("a", &[("a", &[a.addr])]));
    let envoy = start_envoy(&bin, &cfg, mode).await;
    let url = listener_url(&envoy).await;
    wait_body(&envoy, &url, "A").await;
    wait_synced(&running, &envoy, &["CDS", "EDS", "LDS", "RDS"]).await;

    // Publish a cluster Envoy must reject.
    let mut b = SnapshotBuilder::new();
    b.add(&fixtures::http_listener("http", "r")).unwrap();
    b.add(&fixtures::route_to("r", "a")).unwrap();
    b.add(&fixtures::eds_cluster("a")).unwrap();
    b.add(&fixtures::cla("a", &[a.addr])).unwrap();
    b.add(&fixtures::invalid_cluster("bad")).unwrap();
    writer.publish(b.build());

    let nack = wait_for(
        "CDS NACKED in syncz",
        T,
        || envoy.diagnostics(),
        || async {
            let v = syncz(&running).await;
            let s = type_status(&v, "CDS")?.clone();
            (s["status"] == "NACKED").then_some(s)
        },
    )
    .await;
    let msg = nack["last_nack"]["message"]
        .as_str()
        .unwrap_or("")
        .to_string();
    // Envoy's own text (proto validation of connect_timeout).
    assert!(
        msg.to_lowercase().contains("duration"),
        "Envoy's own error text expected, got {msg:?}"
    );
    assert_eq!(envoy.stat("cluster_manager.cds.update_rejected").await, 1);

    // No resend loop: responses and rejections stay flat.
    let pushes = running
        .metrics
        .value("winmesh_xds_pushes_total", &[("type", "CDS")])
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        running
            .metrics
            .value("winmesh_xds_pushes_total", &[("type", "CDS")])
            .unwrap(),
        pushes
    );
    assert_eq!(envoy.stat("cluster_manager.cds.update_rejected").await, 1);
    assert_eq!(
        running
            .metrics
            .value("winmesh_xds_nacks_total", &[("type", "CDS")]),
        Some(1.0)
    );
    // Still ready (Envoy serves its last accepted config), and the probe output says why.
    let (code, ready) = winmesh::status::http_get(running.debug_addr, "/readyz", None)
        .await
        .unwrap();
    assert_eq!(code, 200, "{ready}");
    assert!(ready.contains("NACKed CDS"), "{ready}");
    assert!(ready.contains("last accepted config"), "{ready}");
    // Envoy's own counters (1 accepted, 1 rejected CDS update) keep the probe passing, as
    // istio-agent's probe would.
    let probe = ready_probe(&running, &envoy);
    assert!(
        probe.status.success(),
        "{}{}",
        String::from_utf8_lossy(&probe.stdout),
        String::from_utf8_lossy(&probe.stderr)
    );

    // The last good config keeps serving.
    assert_eq!(support::get_text(&url).await, Some((200, "A".to_string())));
    assert!(!envoy.clusters().await.contains(&"bad".to_string()));

    // `winmesh status` shows it too.
    let table = winmesh::status::render_table(&syncz(&running).await);
    assert!(table.contains("NACKED"), "{table}");

    // A fixed config is accepted and the status recovers.
    writer.publish(mesh("a", &[("a", &[a.addr])]));
    wait_synced(&running, &envoy, &["CDS", "EDS", "LDS", "RDS"]).await;
    envoy.stop().await;
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nack_is_recorded_not_resent_and_last_good_config_kept_sotw() {
    nack(XdsMode::Sotw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nack_is_recorded_not_resent_and_last_good_config_kept_delta() {
    nack(XdsMode::Delta).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_restart_reconverges() {
    support::init_tracing();
    let Some(bin) = bin() else { return };
    let a = Backend::start("A").await;
    let (running, mut writer, cfg) = start_winmesh("127.0.0.1:0".parse().unwrap()).await;
    writer.publish(mesh("a", &[("a", &[a.addr])]));
    for mode in [XdsMode::Sotw, XdsMode::Delta] {
        for _round in 0..2 {
            let envoy = start_envoy(&bin, &cfg, mode).await;
            let url = listener_url(&envoy).await;
            wait_body(&envoy, &url, "A").await;
            wait_synced(&running, &envoy, &["CDS", "EDS", "LDS", "RDS"]).await;
            envoy.stop().await;
            wait_for(
                "stream gone from syncz",
                T,
                || async { String::new() },
                || async { running.clients.is_empty().then_some(()) },
            )
            .await;
        }
    }
    running.stop().await;
}

async fn winmesh_restart(mode: XdsMode) {
    support::init_tracing();
    let Some(bin) = bin() else { return };
    let a = Backend::start("A").await;
    let b = Backend::start("B").await;
    let snapshot = || mesh("a", &[("a", &[a.addr]), ("b", &[b.addr])]);
    let (running, mut writer, cfg) = start_winmesh("127.0.0.1:0".parse().unwrap()).await;
    writer.publish(snapshot());
    let envoy = start_envoy(&bin, &cfg, mode).await;
    let url = listener_url(&envoy).await;
    wait_body(&envoy, &url, "A").await;
    wait_synced(&running, &envoy, &["CDS", "EDS", "LDS", "RDS"]).await;

    let churn_stats = [
        "cluster_manager.cluster_added",
        "cluster_manager.cluster_modified",
        "cluster_manager.cluster_removed",
        "listener_manager.listener_added",
        "listener_manager.listener_modified",
        "listener_manager.listener_removed",
    ];
    let mut before = vec![];
    for s in churn_stats {
        before.push(envoy.stat(s).await);
    }
    let accept = Arc::new(Mutex::new(vec!["A".to_string()]));
    let traffic = Traffic::start(url.clone(), accept);

    let xds_addr = stop_winmesh(running, &envoy).await;
    // Same port, same content: Envoy reconnects and nothing changes on it.
    let (running, mut writer, _) = start_winmesh(xds_addr).await;
    writer.publish(snapshot());
    wait_for(
        "envoy reconnected",
        T,
        || envoy.diagnostics(),
        || async { (envoy.stat("control_plane.connected_state").await == 1).then_some(()) },
    )
    .await;
    wait_synced(&running, &envoy, &["CDS", "EDS", "LDS", "RDS"]).await;
    let (ok, failed, last) = traffic.stop().await;
    assert_eq!(failed, 0, "requests failed while winmesh restarted: {last}");
    assert!(ok > 0);
    for (s, b) in churn_stats.iter().zip(before) {
        assert_eq!(
            envoy.stat(s).await,
            b,
            "{s} changed: config churn after winmesh restart"
        );
    }
    envoy.stop().await;
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn winmesh_restart_reconverges_without_churn_sotw() {
    winmesh_restart(XdsMode::Sotw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn winmesh_restart_reconverges_without_churn_delta() {
    winmesh_restart(XdsMode::Delta).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_bootstraps_pass_envoy_validation() {
    let Some(bin) = bin() else { return };
    let dir = tempfile::tempdir().unwrap();
    let cfg = Config::default();
    for (i, opts) in [
        BootstrapOptions::default(),
        BootstrapOptions {
            node_id: Some("n".into()),
            mode: Some(XdsMode::Delta),
            token: Some("tok".into()),
        },
    ]
    .into_iter()
    .enumerate()
    {
        let p = dir.path().join(format!("b{i}.yaml"));
        std::fs::write(&p, bootstrap_yaml(&cfg, &opts)).unwrap();
        let out = tokio::process::Command::new(&bin)
            .args(["--mode", "validate", "--disable-hot-restart", "-c"])
            .arg(&p)
            .output()
            .await
            .unwrap();
        assert!(
            out.status.success(),
            "envoy rejected bootstrap {i}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A cluster deleted while winmesh was down must leave Envoy after it reconnects: in delta mode Envoy
/// names it in `initial_resource_versions`, and only `removed_resources` takes it away.
async fn deleted_while_down(mode: XdsMode) {
    support::init_tracing();
    let Some(bin) = bin() else { return };
    let a = Backend::start("A").await;
    let b = Backend::start("B").await;
    let (running, mut writer, cfg) = start_winmesh("127.0.0.1:0".parse().unwrap()).await;
    writer.publish(mesh("a", &[("a", &[a.addr]), ("b", &[b.addr])]));
    let envoy = start_envoy(&bin, &cfg, mode).await;
    let url = listener_url(&envoy).await;
    wait_body(&envoy, &url, "A").await;
    wait_synced(&running, &envoy, &["CDS", "EDS", "LDS", "RDS"]).await;
    assert!(envoy.clusters().await.contains(&"b".to_string()));

    let xds_addr = stop_winmesh(running, &envoy).await;
    // While winmesh was down, b was deleted.
    let (running, mut writer, _) = start_winmesh(xds_addr).await;
    writer.publish(mesh("a", &[("a", &[a.addr])]));
    wait_for(
        "envoy dropped the cluster deleted while winmesh was down",
        T,
        || envoy.diagnostics(),
        || async {
            let c = envoy.clusters().await;
            (c.contains(&"a".to_string()) && !c.contains(&"b".to_string())).then_some(())
        },
    )
    .await;
    wait_synced(&running, &envoy, &["CDS", "EDS", "LDS", "RDS"]).await;
    wait_body(&envoy, &url, "A").await;
    envoy.stop().await;
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_while_down_is_removed_after_reconnect_delta() {
    deleted_while_down(XdsMode::Delta).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_while_down_is_removed_after_reconnect_sotw() {
    deleted_while_down(XdsMode::Sotw).await;
}
