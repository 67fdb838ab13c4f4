//! `winmesh serve`: start the servers, the identity manager and the mesh sources, assemble and publish
//! snapshots, run until a shutdown signal.

use std::sync::Arc;

use anyhow::Context;
use tokio::sync::watch;
use tracing::info;

use crate::assemble::{self, MeshResources, Translated};
use crate::config::{CaMode, Config};
use crate::identity::dev_ca::DevCa;
use crate::identity::istiod::{CaBackend, IstiodCa};
use crate::identity::manager::Clock;
use crate::identity::{IdentityManager, IdentitySpec, SecretSet, SpiffeId};
use crate::metrics::Metrics;

/// Builds the CA backend the config asks for.
pub fn ca_backend(cfg: &Config) -> anyhow::Result<Option<Arc<dyn CaBackend>>> {
    let Some(ca) = &cfg.ca else { return Ok(None) };
    Ok(Some(match ca.mode {
        CaMode::Dev => Arc::new(
            DevCa::load_or_create(&ca.state_dir, &cfg.identity.trust_domain)
                .context("ca.state_dir")?,
        ),
        CaMode::Istiod => Arc::new(IstiodCa {
            address: ca.address.clone(),
            server_name: ca.server_name.clone(),
            root_cert_file: ca.root_cert_file.clone(),
            cluster_id: ca.cluster_id.clone(),
            timeout: ca.timeout,
        }),
    }))
}

/// Starts the identity manager for the gateway identity and the configured extra identities.
pub fn start_identity(
    cfg: &Config,
    ca: Arc<dyn CaBackend>,
    metrics: Arc<Metrics>,
) -> anyhow::Result<(IdentityManager, watch::Receiver<SecretSet>)> {
    let id = cfg.identity.spiffe_id().context("identity")?;
    let (m, rx) = IdentityManager::start(
        ca,
        cfg.identity.ttl,
        IdentitySpec {
            id,
            token_file: cfg.identity.token_file.clone(),
        },
        metrics,
        Clock::new(),
    );
    let extra = cfg
        .identity
        .extra
        .iter()
        .map(|x| {
            Ok(IdentitySpec {
                id: SpiffeId::parse(&x.spiffe_id)?,
                token_file: x.token_file.clone(),
            })
        })
        .collect::<Result<Vec<_>, crate::identity::SpiffeIdError>>()
        .context("identity.extra")?;
    m.set_identities(extra);
    Ok((m, rx))
}

pub async fn run(cfg: Config) -> anyhow::Result<()> {
    let (running, writer) = crate::app::start(&cfg).await?;
    let metrics = running.metrics.clone();

    let (identity, secrets) = match ca_backend(&cfg)? {
        Some(ca) => {
            info!(ca = %ca.describe(), identity = %cfg.identity.spiffe_id()?, "starting identity manager");
            let (m, rx) = start_identity(&cfg, ca, metrics.clone())?;
            (Some(Arc::new(m)), rx)
        }
        None => {
            info!("no `ca` configured: serving no certificates");
            (None, watch::channel(SecretSet::default()).1)
        }
    };
    if let Some(m) = &identity {
        running
            .readiness
            .register("identity", "no certificate for the gateway identity yet");
        let view_m = m.clone();
        running
            .debug
            .add_view("certs", Arc::new(move || view_m.view()));
        let (readiness, m2, mut rx) = (running.readiness.clone(), m.clone(), secrets.clone());
        tokio::spawn(async move {
            loop {
                if m2.is_ready() {
                    readiness.set("identity", Ok(()));
                    return;
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        });
    }

    // Mesh resources: none configured yet means an empty (but synced) mesh.
    let (_mesh_tx, mesh_rx) =
        watch::channel::<MeshResources>(Some(Arc::new(Translated::default())));
    running
        .readiness
        .register("config", "no snapshot published yet");
    let readiness = running.readiness.clone();
    let cache = running.cache.clone();
    let mut notify = cache.subscribe();
    tokio::spawn(async move {
        while !cache.is_ready() {
            if notify.changed().await.is_err() {
                return;
            }
        }
        readiness.set("config", Ok(()));
    });
    let assembler = tokio::spawn(assemble::run(
        writer,
        mesh_rx,
        secrets,
        metrics,
        running.shutdown_signal(),
    ));

    crate::app::shutdown_signal().await;
    info!("shutting down");
    drop(identity);
    running.stop().await;
    let _ = assembler.await;
    Ok(())
}
