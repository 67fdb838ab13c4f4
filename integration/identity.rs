//! The istiod CA client and the identity manager against a fake istiod speaking the real proto over
//! TLS: chain layout with several roots, token re-read on every call, server-name verification,
//! `clusterid`, and every failure mode keeping the last good certificate.

mod support;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use support::fake_istiod::{FakeIstiod, Mode};
use support::wait_for;
use tokio::sync::watch;
use winmesh::identity::istiod::IstiodCa;
use winmesh::identity::manager::{Clock, State};
use winmesh::identity::{IdentityManager, IdentitySpec, SecretSet, SpiffeId};
use winmesh::metrics::Metrics;

const GW: &str = "spiffe://cluster.local/ns/win/sa/gw";
const T: Duration = Duration::from_secs(20);

struct Setup {
    istiod: FakeIstiod,
    dir: tempfile::TempDir,
    token: PathBuf,
}

async fn setup(server_name: &str) -> Setup {
    let istiod = FakeIstiod::start(&[("tok-gw", GW), ("tok-gw-2", GW)], server_name).await;
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("istio-token");
    std::fs::write(&token, "tok-gw\n").unwrap();
    std::fs::write(dir.path().join("root-cert.pem"), &istiod.root_pem).unwrap();
    Setup { istiod, dir, token }
}

fn ca(s: &Setup, cluster_id: &str) -> Arc<IstiodCa> {
    Arc::new(IstiodCa {
        address: s.istiod.addr.to_string(),
        server_name: "istiod.istio-system.svc".into(),
        root_cert_file: s.dir.path().join("root-cert.pem"),
        cluster_id: cluster_id.into(),
        timeout: Duration::from_secs(5),
        cert_signer: String::new(),
    })
}

fn gw(token: &std::path::Path) -> IdentitySpec {
    IdentitySpec {
        id: SpiffeId::parse(GW).unwrap(),
        token_file: Some(token.to_path_buf()),
        minter: None,
    }
}

fn start(
    s: &Setup,
    ttl: Duration,
    cluster_id: &str,
) -> (IdentityManager, watch::Receiver<SecretSet>, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::new());
    let (m, rx) = IdentityManager::start(
        ca(s, cluster_id),
        ttl,
        gw(&s.token),
        metrics.clone(),
        Clock::new(),
    );
    (m, rx, metrics)
}

async fn first_cert(rx: &mut watch::Receiver<SecretSet>) -> String {
    wait_for(
        "first certificate",
        T,
        || async { String::new() },
        || {
            let r = rx
                .borrow_and_update()
                .certs
                .values()
                .next()
                .map(|c| c.leaf.serial.clone());
            async move { r }
        },
    )
    .await
}

/// The next published secret set, or a test failure after 20 s.
async fn changed(rx: &mut watch::Receiver<SecretSet>) {
    tokio::time::timeout(T, rx.changed())
        .await
        .expect("no new certificate within 20 s")
        .expect("identity manager gone");
}

fn serial(rx: &watch::Receiver<SecretSet>) -> String {
    rx.borrow()
        .certs
        .values()
        .next()
        .unwrap()
        .leaf
        .serial
        .clone()
}

#[tokio::test]
async fn gets_a_verified_chain_with_a_multi_root_bundle() {
    let s = setup("istiod.istio-system.svc").await;
    let (m, mut rx, metrics) = start(&s, Duration::from_secs(3600), "Kubernetes");
    first_cert(&mut rx).await;
    let set = rx.borrow().clone();
    let c = &set.certs[&SpiffeId::parse(GW).unwrap()];
    assert_eq!(c.chain_pem.len(), 2, "leaf + intermediate");
    assert_eq!(set.roots_pem.len(), 2, "both roots of the bundle");
    assert!(c.leaf.sans.contains(&format!("URI:{GW}")));
    {
        let seen = s.istiod.seen.lock().unwrap();
        assert_eq!(seen.tokens, vec!["tok-gw"]);
        assert_eq!(seen.cluster_ids, vec!["Kubernetes"]);
        assert_eq!(seen.ttls, vec![3600]);
        assert_eq!(
            seen.cert_signers,
            vec![Some(String::new())],
            "istio-agent always sends metadata.CertSigner"
        );
    }
    assert_eq!(
        m.state(&SpiffeId::parse(GW).unwrap()),
        Some(State::Available)
    );
    assert_eq!(
        metrics.value("winmesh_ca_requests_total", &[("code", "OK")]),
        Some(1.0)
    );
    assert!(
        metrics
            .value("winmesh_cert_expiry_timestamp_seconds", &[("identity", GW)])
            .unwrap()
            > 1e9
    );
    let view = m.view().to_string();
    assert!(view.contains("Available") && view.contains("sha256"));
    assert!(!view.contains("PRIVATE"), "no key material in /debug/certs");
}

#[tokio::test]
async fn rotates_and_rereads_the_token_on_every_call() {
    let s = setup("istiod.istio-system.svc").await;
    let (_m, mut rx, _) = start(&s, Duration::from_secs(3), "Kubernetes");
    let first = first_cert(&mut rx).await;
    // The kubelet rotates the projected token.
    std::fs::write(&s.token, "tok-gw-2").unwrap();
    let mut serials = vec![first];
    for _ in 0..2 {
        changed(&mut rx).await;
        serials.push(serial(&rx));
    }
    serials.dedup();
    assert_eq!(serials.len(), 3, "two rotations: {serials:?}");
    let seen = s.istiod.seen.lock().unwrap();
    assert!(
        seen.tokens.iter().skip(1).all(|t| t == "tok-gw-2"),
        "{:?}",
        seen.tokens
    );
}

#[tokio::test]
async fn refuses_an_istiod_with_the_wrong_name() {
    let s = setup("istiod.other-namespace.svc").await;
    let (m, _rx, metrics) = start(&s, Duration::from_secs(3600), "Kubernetes");
    let id = SpiffeId::parse(GW).unwrap();
    let st = wait_for(
        "Unavailable",
        T,
        || async { String::new() },
        || {
            let st = m.state(&id);
            async move { matches!(st, Some(State::Unavailable(_))).then_some(st) }
        },
    )
    .await;
    assert!(format!("{st:?}").contains("cannot connect"), "{st:?}");
    assert_eq!(
        s.istiod.calls(),
        0,
        "no request may reach an unverified server"
    );
    assert!(
        metrics
            .value(
                "winmesh_ca_request_failures_total",
                &[("code", "Unavailable")]
            )
            .is_some()
    );
}

#[tokio::test]
async fn unknown_cluster_id_is_unauthenticated_and_not_hammered() {
    let s = setup("istiod.istio-system.svc").await;
    let (m, _rx, metrics) = start(&s, Duration::from_secs(3600), "remote-cluster");
    let id = SpiffeId::parse(GW).unwrap();
    wait_for(
        "Unavailable",
        T,
        || async { String::new() },
        || {
            let st = m.state(&id);
            async move { matches!(st, Some(State::Unavailable(_))).then_some(()) }
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        s.istiod.calls(),
        1,
        "Unauthenticated must not be retried quickly"
    );
    assert_eq!(
        metrics.value(
            "winmesh_ca_request_failures_total",
            &[("code", "Unauthenticated")]
        ),
        Some(1.0)
    );
    assert!(
        m.view()
            .to_string()
            .contains("Unavailable: Unauthenticated")
    );
}

#[tokio::test]
async fn an_unreadable_token_is_reported_without_calling_istiod() {
    let s = setup("istiod.istio-system.svc").await;
    std::fs::remove_file(&s.token).unwrap();
    let (m, _rx, _) = start(&s, Duration::from_secs(3600), "Kubernetes");
    let id = SpiffeId::parse(GW).unwrap();
    let st = wait_for(
        "Unavailable",
        T,
        || async { String::new() },
        || {
            let st = m.state(&id);
            async move { matches!(st, Some(State::Unavailable(_))).then_some(st) }
        },
    )
    .await;
    assert!(
        format!("{st:?}").contains("cannot read token file"),
        "{st:?}"
    );
    assert_eq!(s.istiod.calls(), 0);
}

/// Every bad answer keeps the previous certificate, shows the reason, and recovers afterwards.
#[tokio::test]
async fn bad_answers_never_replace_a_good_certificate() {
    let s = setup("istiod.istio-system.svc").await;
    let (m, mut rx, _) = start(&s, Duration::from_secs(2), "Kubernetes");
    let id = SpiffeId::parse(GW).unwrap();
    first_cert(&mut rx).await;
    for (mode, why) in [
        (Mode::Garbage, "not PEM|holds no certificate"),
        (Mode::WrongSan, "URI SANs"),
        (Mode::Expired, "expired"),
        (Mode::ShortChain, "need a leaf and a root"),
        (Mode::Unavailable, "Unavailable"),
        (Mode::Internal, "Internal"),
    ] {
        rx.borrow_and_update();
        let good = serial(&rx);
        s.istiod.set_mode(mode);
        let calls = s.istiod.calls();
        let err = wait_for(
            &format!("{mode:?} answer seen"),
            T,
            || async { String::new() },
            || {
                let v = m.view();
                let e = v["identities"][0]["last_error"].as_str().map(String::from);
                let n = s.istiod.calls();
                async move { e.filter(|_| n > calls) }
            },
        )
        .await;
        assert!(why.split('|').any(|w| err.contains(w)), "{mode:?}: {err}");
        assert_eq!(serial(&rx), good, "{mode:?} replaced the certificate");
        assert!(!rx.has_changed().unwrap(), "{mode:?} published something");
        s.istiod.set_mode(Mode::Normal);
        changed(&mut rx).await;
        assert_ne!(serial(&rx), good, "recovered after {mode:?}");
        assert_eq!(m.state(&id), Some(State::Available));
    }
}

/// With istiod, an identity a Windows service presents needs its own token; without one winmesh says
/// so in the log and in /debug/registryz instead of leaving a listener silently waiting.
#[tokio::test]
async fn an_identity_without_a_token_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("token"), "t").unwrap();
    std::fs::write(dir.path().join("root.pem"), "").unwrap();
    std::fs::write(
        dir.path().join("mesh.yaml"),
        "windows_services:\n  - name: w\n    namespace: win\n    identity: spiffe://cluster.local/ns/win/sa/w\n    ports: [{name: http, port: 8080}]\n    backends: [127.0.0.1]\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("winmesh.yaml"),
        "xds:\n  listen: 127.0.0.1:0\ndebug:\n  listen: 127.0.0.1:0\nidentity:\n  token_file: token\n\
         ca:\n  mode: istiod\n  address: 127.0.0.1:9\n  root_cert_file: root.pem\n  timeout: 1s\n\
         mesh:\n  file: mesh.yaml\n  poll_interval: 100ms\ngateway:\n  inbound_address: 127.0.0.1\n",
    )
    .unwrap();
    let cfg = winmesh::config::Config::load(&dir.path().join("winmesh.yaml")).unwrap();
    let server = winmesh::serve::start(cfg).await.unwrap();
    let reg = wait_for(
        "warning in registryz",
        T,
        || async { String::new() },
        || async {
            let (_, r) =
                winmesh::status::http_get(server.running.debug_addr, "/debug/registryz", None)
                    .await
                    .ok()?;
            r.contains("has no token").then_some(r)
        },
    )
    .await;
    assert!(reg.contains("spiffe://cluster.local/ns/win/sa/w"), "{reg}");
    // And winmesh is honest about readiness: no gateway certificate from an unreachable istiod.
    let (code, body) = winmesh::status::http_get(server.running.debug_addr, "/readyz", None)
        .await
        .unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("identity: not ready"), "{body}");
    server.stop().await;
}

/// A running winmesh whose istiod starts refusing renewals (UNAUTHENTICATED, as istiod answers a
/// token it no longer accepts): it retries before the certificate expires, and once it has expired
/// `/readyz` fails and `/debug/certs` says Unavailable, without waiting for another CA answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_certificate_makes_the_gateway_unready() {
    let s = setup("istiod.istio-system.svc").await;
    let cfg_path = s.dir.path().join("winmesh.yaml");
    std::fs::write(
        &cfg_path,
        format!(
            "xds:\n  listen: 127.0.0.1:0\ndebug:\n  listen: 127.0.0.1:0\n\
             identity:\n  namespace: win\n  service_account: gw\n  token_file: istio-token\n  ttl: 12s\n\
             ca:\n  mode: istiod\n  address: {}\n  root_cert_file: root-cert.pem\n  timeout: 2s\n\
             gateway:\n  inbound_address: 127.0.0.1\n",
            s.istiod.addr
        ),
    )
    .unwrap();
    let cfg = winmesh::config::Config::load(&cfg_path).unwrap();
    let server = winmesh::serve::start(cfg).await.unwrap();
    let debug = server.running.debug_addr;
    let get = |path: &'static str| async move {
        winmesh::status::http_get(debug, path, None)
            .await
            .unwrap_or((0, String::new()))
    };
    wait_for(
        "ready with a certificate",
        T,
        || async { String::new() },
        || async { (get("/readyz").await.0 == 200).then_some(()) },
    )
    .await;
    let (_, certs) = get("/debug/certs").await;
    let v: serde_json::Value = serde_json::from_str(&certs).unwrap();
    let not_after = v["identities"][0]["not_after"]
        .as_str()
        .unwrap()
        .to_string();
    s.istiod.set_mode(Mode::Unauthenticated);
    let calls_at_refusal = s.istiod.calls();
    // Still valid: ready, and retrying (not sleeping 150 s).
    let (code, body) = get("/readyz").await;
    assert_eq!(code, 200, "{body}");
    let (code, body) = wait_for(
        "unready once the certificate expired",
        Duration::from_secs(40),
        || async { String::new() },
        || async {
            let r = get("/readyz").await;
            (r.0 == 503).then_some(r)
        },
    )
    .await;
    assert_eq!(code, 503);
    assert!(
        body.contains("identity: not ready") && body.contains("expired"),
        "{body}"
    );
    assert!(
        s.istiod.calls() >= calls_at_refusal + 2,
        "renewal retried before expiry ({} → {})",
        calls_at_refusal,
        s.istiod.calls()
    );
    let (_, certs) = get("/debug/certs").await;
    let v: serde_json::Value = serde_json::from_str(&certs).unwrap();
    let state = v["identities"][0]["state"].as_str().unwrap();
    assert!(
        state.starts_with("Unavailable"),
        "{state} (not_after {not_after})"
    );
    // The CA comes back: a new certificate, ready again.
    s.istiod.set_mode(Mode::Normal);
    wait_for(
        "ready again after the CA recovered",
        Duration::from_secs(40),
        || async { String::new() },
        || async { (get("/readyz").await.0 == 200).then_some(()) },
    )
    .await;
    server.stop().await;
}

/// `ca.cert_signer` reaches istiod as `metadata.CertSigner`, as `ISTIO_META_CERT_SIGNER` does.
#[tokio::test]
async fn the_configured_cert_signer_is_sent() {
    let s = setup("istiod.istio-system.svc").await;
    let mut c = (*ca(&s, "Kubernetes")).clone();
    c.cert_signer = "clusterissuers.cert-manager.io/istio-ca".into();
    let (_m, mut rx) = IdentityManager::start(
        Arc::new(c),
        Duration::from_secs(3600),
        gw(&s.token),
        Arc::new(Metrics::new()),
        Clock::new(),
    );
    first_cert(&mut rx).await;
    assert_eq!(
        s.istiod.seen.lock().unwrap().cert_signers,
        vec![Some("clusterissuers.cert-manager.io/istio-ca".to_string())]
    );
}
