//! Certificate rotation through a real Envoy: with a lifetime of a few seconds the gateway certificate
//! rotates repeatedly while mTLS traffic flows through an Envoy listener that takes its certificate and
//! trust bundle over SDS. No request may fail, and Envoy's `/certs` shows each new serial.

mod support;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use support::tls::{MeshClient, SanCheck};
use support::{Envoy, wait_for};
use tokio::sync::watch;
use winmesh::assemble::{self, MeshResources, Translated};
use winmesh::bootstrap::{BootstrapOptions, bootstrap_yaml};
use winmesh::config::{Config, SecretsVia, XdsMode};
use winmesh::identity::dev_ca::DevCa;
use winmesh::identity::manager::Clock;
use winmesh::identity::{IdentityManager, IdentitySpec, SpiffeId};

const GW: &str = "spiffe://cluster.local/ns/win/sa/gw";
const T: Duration = Duration::from_secs(30);

fn envoy_serials(certs: &serde_json::Value) -> BTreeSet<String> {
    certs["certificates"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|c| c["cert_chain"].as_array().cloned().unwrap_or_default())
        .filter_map(|c| {
            c["serial_number"]
                .as_str()
                .map(|s| s.trim_start_matches('0').to_lowercase())
        })
        .collect()
}

async fn rotation(mode: XdsMode, via: SecretsVia) {
    support::init_tracing();
    let Some(bin) = support::envoy_bin() else {
        return;
    };
    let mut cfg = Config::default();
    cfg.xds.listen = "127.0.0.1:0".parse().unwrap();
    cfg.debug.listen = "127.0.0.1:0".parse().unwrap();
    let (running, writer) = winmesh::app::start(&cfg).await.unwrap();
    cfg.xds.listen = running.xds_addr;

    let ca = Arc::new(DevCa::new_root("cluster.local").unwrap());
    let (ids, secrets) = IdentityManager::start(
        ca.clone(),
        Duration::from_secs(3),
        IdentitySpec {
            id: SpiffeId::parse(GW).unwrap(),
            token_file: None,
            minter: None,
        },
        running.metrics.clone(),
        Clock::new(),
    );
    let listener = support::fixtures::mtls_listener("https", "default", via, "secure");
    let (_mesh_tx, mesh_rx) = watch::channel::<MeshResources>(Some(Arc::new(Translated {
        listeners: vec![listener],
        ..Default::default()
    })));
    let assembler = tokio::spawn(assemble::run(
        writer,
        mesh_rx,
        secrets.clone(),
        running.metrics.clone(),
        running.shutdown_signal(),
    ));
    running.debug.add_view("certs", {
        let ids = Arc::new(ids);
        Arc::new(move || ids.view())
    });

    let boot = bootstrap_yaml(
        &cfg,
        &BootstrapOptions {
            node_id: None,
            mode: Some(mode),
            token: None,
        },
    );
    let envoy = Envoy::start(&bin, &boot).await;
    let addr = wait_for(
        "https listener",
        T,
        || envoy.diagnostics(),
        || envoy.listener_addr("https"),
    )
    .await;

    let (client_key, client_chain) = ca
        .issue(
            &SpiffeId::parse("spiffe://cluster.local/ns/linux/sa/client").unwrap(),
            Duration::from_secs(3600),
        )
        .unwrap();
    let client = MeshClient {
        chain_pem: client_chain[..client_chain.len() - 1].concat(),
        key_pem: client_key.expose().to_string(),
        roots_pem: ca.roots_pem(),
    };
    let san = SanCheck::Exact(vec![GW.to_string()]);
    wait_for(
        "first mTLS request",
        T,
        || envoy.diagnostics(),
        || {
            let (c, san) = (client.clone(), san.clone());
            async move {
                c.get(addr, "gw", &["http/1.1"], san, "/")
                    .await
                    .ok()
                    .filter(|r| r.status == 200)
            }
        },
    )
    .await;

    // Traffic while certificates rotate; stop after three new serials reached Envoy's /certs.
    let mut envoy_seen = BTreeSet::new();
    let mut client_seen = BTreeSet::new();
    let (mut ok, mut failed, mut last_err) = (0u32, 0u32, String::new());
    let deadline = tokio::time::Instant::now() + T;
    while envoy_seen.len() < 4 && tokio::time::Instant::now() < deadline {
        match client
            .get(addr, "gw", &["http/1.1"], san.clone(), "/")
            .await
        {
            Ok(r) if r.status == 200 && r.body == "secure" => {
                ok += 1;
                client_seen.insert(r.server_serial.trim_start_matches('0').to_lowercase());
            }
            Ok(r) => {
                failed += 1;
                last_err = format!("{} {}", r.status, r.body);
            }
            Err(e) => {
                failed += 1;
                last_err = e;
            }
        }
        if let Some(c) = envoy.admin_json("/certs").await {
            envoy_seen.extend(envoy_serials(&c));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        failed,
        0,
        "{failed} of {} requests failed during rotation; last: {last_err}",
        ok + failed
    );
    assert!(
        envoy_seen.len() >= 4,
        "Envoy's /certs showed only {envoy_seen:?}\n{}",
        envoy.diagnostics().await
    );
    assert!(
        client_seen.len() >= 3,
        "clients saw serials {client_seen:?}"
    );
    // What clients saw on the wire is what Envoy reports (both are samples of a moving target, so
    // require a solid overlap rather than equality).
    let common = client_seen.intersection(&envoy_seen).count();
    assert!(common >= 2, "{client_seen:?} vs {envoy_seen:?}");
    // The debug view shows the gateway identity, never its key.
    let (_, certs) = winmesh::status::http_get(running.debug_addr, "/debug/certs", None)
        .await
        .unwrap();
    assert!(certs.contains(GW) && certs.contains("Available"));
    assert!(!certs.contains("PRIVATE KEY"));
    let (_, dump) = winmesh::status::http_get(running.debug_addr, "/debug/config_dump", None)
        .await
        .unwrap();
    assert!(
        dump.contains("[redacted]") && !dump.contains("PRIVATE KEY"),
        "config_dump leaks keys"
    );

    envoy.stop().await;
    running.stop().await;
    let _ = assembler.await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_under_traffic_sotw_secrets_over_ads() {
    rotation(XdsMode::Sotw, SecretsVia::Ads).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_under_traffic_delta_secrets_over_sds() {
    rotation(XdsMode::Delta, SecretsVia::Sds).await;
}

/// Listeners wait for their certificates: until the CA has issued one, Envoy is not LIVE (its
/// listeners keep warming); once the certificate exists, it serves. Checked in every protocol mode,
/// because delta's "does not exist" answer would let Envoy go live without certificates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listeners_wait_for_certificates_in_every_mode() {
    support::init_tracing();
    let Some(bin) = support::envoy_bin() else {
        return;
    };
    for (mode, via) in [
        (XdsMode::Sotw, SecretsVia::Ads),
        (XdsMode::Sotw, SecretsVia::Sds),
        (XdsMode::Delta, SecretsVia::Ads),
        (XdsMode::Delta, SecretsVia::Sds),
    ] {
        let mut cfg = Config::default();
        cfg.xds.listen = "127.0.0.1:0".parse().unwrap();
        cfg.debug.listen = "127.0.0.1:0".parse().unwrap();
        let (running, writer) = winmesh::app::start(&cfg).await.unwrap();
        cfg.xds.listen = running.xds_addr;
        let (sec_tx, sec_rx) = watch::channel(winmesh::identity::SecretSet::default());
        let listener = support::fixtures::mtls_listener("https", "default", via, "secure");
        let (_mesh_tx, mesh_rx) = watch::channel::<MeshResources>(Some(Arc::new(Translated {
            listeners: vec![listener],
            ..Default::default()
        })));
        let assembler = tokio::spawn(assemble::run(
            writer,
            mesh_rx,
            sec_rx,
            running.metrics.clone(),
            running.shutdown_signal(),
        ));
        let boot = bootstrap_yaml(
            &cfg,
            &BootstrapOptions {
                node_id: None,
                mode: Some(mode),
                token: None,
            },
        );
        let envoy = Envoy::start(&bin, &boot).await;
        // Give Envoy time to fetch everything it can; it must still be waiting for the certificate.
        wait_for(
            "SDS requested",
            T,
            || envoy.diagnostics(),
            || async {
                let (_, z) = winmesh::status::http_get(running.debug_addr, "/debug/syncz", None)
                    .await
                    .ok()?;
                z.contains("\"default\"").then_some(())
            },
        )
        .await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(
            !envoy.is_live().await,
            "{mode:?}/{via:?}: Envoy went live without a certificate"
        );
        assert_eq!(envoy.stat("listener_manager.lds.update_rejected").await, 0);

        let ca = Arc::new(DevCa::new_root("cluster.local").unwrap());
        let (ids, mut rx) = IdentityManager::start(
            ca.clone(),
            Duration::from_secs(3600),
            IdentitySpec {
                id: SpiffeId::parse(GW).unwrap(),
                token_file: None,
                minter: None,
            },
            running.metrics.clone(),
            Clock::new(),
        );
        tokio::time::timeout(T, rx.changed())
            .await
            .unwrap()
            .unwrap();
        sec_tx.send_replace(rx.borrow().clone());
        wait_for(
            "Envoy LIVE once the certificate exists",
            T,
            || envoy.diagnostics(),
            || async { envoy.is_live().await.then_some(()) },
        )
        .await;
        let addr = wait_for(
            "https listener",
            T,
            || envoy.diagnostics(),
            || envoy.listener_addr("https"),
        )
        .await;
        let (key, chain) = ca
            .issue(
                &SpiffeId::parse("spiffe://cluster.local/ns/linux/sa/client").unwrap(),
                Duration::from_secs(3600),
            )
            .unwrap();
        let client = MeshClient {
            chain_pem: chain[..chain.len() - 1].concat(),
            key_pem: key.expose().to_string(),
            roots_pem: ca.roots_pem(),
        };
        let r = wait_for(
            "served with the new certificate",
            T,
            || envoy.diagnostics(),
            || {
                let c = client.clone();
                async move {
                    c.get(
                        addr,
                        "gw",
                        &["http/1.1"],
                        SanCheck::Exact(vec![GW.into()]),
                        "/",
                    )
                    .await
                    .ok()
                }
            },
        )
        .await;
        assert_eq!(
            (r.status, r.body.as_str()),
            (200, "secure"),
            "{mode:?}/{via:?}"
        );
        drop(ids);
        envoy.stop().await;
        running.stop().await;
        let _ = assembler.await;
    }
}
