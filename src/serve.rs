//! `winmesh serve`: start the servers, the identity manager and the mesh sources, assemble and publish
//! snapshots, run until a shutdown signal.

use std::sync::Arc;

use anyhow::Context;
use tokio::sync::watch;
use tracing::info;

use crate::assemble::{self, MeshResources};
use crate::config::{CaMode, Config};
use crate::discovery::MeshState;
use crate::discovery::file::{FileSettings, FileSource};
use crate::identity::dev_ca::DevCa;
use crate::identity::istiod::{CaBackend, IstiodCa};
use crate::identity::manager::Clock;
use crate::identity::{IdentityManager, IdentitySpec, SecretSet, SpiffeId};
use crate::metrics::Metrics;
use crate::translate::{Ctx, translate};

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
            cert_signer: ca.cert_signer.clone(),
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
            minter: None,
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
                minter: None,
            })
        })
        .collect::<Result<Vec<_>, crate::identity::SpiffeIdError>>()
        .context("identity.extra")?;
    m.set_identities(extra);
    Ok((m, rx))
}

/// A fully running winmesh: servers, identity manager, mesh source and translation.
pub struct Server {
    pub running: crate::app::Running,
    pub identity: Option<Arc<IdentityManager>>,
    pub mesh_state: watch::Receiver<MeshState>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Server {
    pub async fn stop(self) {
        drop(self.identity);
        let Server { running, tasks, .. } = self;
        running.stop().await;
        for t in tasks {
            t.abort();
            let _ = t.await;
        }
    }
}

/// What `/debug/registryz` shows: the state translated last and its warnings. Rendered to JSON on
/// request only; the model itself is shared (`Arc`), never copied for the view.
#[derive(Default)]
pub struct RegistryView {
    state: MeshState,
    warnings: Vec<String>,
}

impl RegistryView {
    pub fn render(&self) -> serde_json::Value {
        let st = &self.state;
        match &st.mesh {
            Some(mesh) => serde_json::json!({
                "generation": st.generation,
                "updated": humantime::format_rfc3339_seconds(st.updated).to_string(),
                "error": st.error,
                "persisted": st.persisted,
                "rejected": st.rejected,
                "translation_warnings": self.warnings,
                "mesh": mesh,
            }),
            None => serde_json::json!({ "error": st.error, "mesh": null }),
        }
    }
}

/// Keeps the translated resources and the identity set in line with the mesh state.
#[allow(clippy::too_many_arguments)]
async fn translate_loop(
    mut states: watch::Receiver<MeshState>,
    ctx: Ctx,
    mesh_tx: watch::Sender<MeshResources>,
    identity: Option<Arc<IdentityManager>>,
    config_extra: Vec<IdentitySpec>,
    // istiod needs a token per identity; the dev CA does not.
    needs_tokens: bool,
    // Mints tokens for identities without a configured token file (cluster mode).
    minter: Option<Arc<crate::discovery::tokens::KubeTokens>>,
    registry: Arc<std::sync::RwLock<RegistryView>>,
    readiness: Arc<crate::debug::Readiness>,
    metrics: Arc<Metrics>,
    // Which identities hold a certificate: a change re-translates (see `Ctx::certified`).
    mut secrets: Option<watch::Receiver<SecretSet>>,
) {
    let certified_now = |s: &mut Option<watch::Receiver<SecretSet>>| {
        s.as_mut().map(|rx| {
            rx.borrow_and_update()
                .certs
                .keys()
                .cloned()
                .collect::<std::collections::BTreeSet<SpiffeId>>()
        })
    };
    let mut ctx = ctx;
    let mut logged: Vec<String> = Vec::new();
    loop {
        ctx.certified = certified_now(&mut secrets);
        let st = states.borrow_and_update().clone();
        if let Some(mesh) = &st.mesh {
            // CPU work off the async runtime: streams keep being served during a large translation.
            let (m, c) = (mesh.clone(), ctx.clone());
            let Ok((translated, mut warnings)) =
                tokio::task::spawn_blocking(move || translate(&m, &c)).await
            else {
                tracing::error!("translation task failed; keeping the last translated config");
                if states.changed().await.is_err() {
                    return;
                }
                continue;
            };
            // Say once (per change) what an AuthorizationPolicy could not enforce as written.
            let authz: Vec<String> = warnings
                .iter()
                .filter(|w| w.starts_with(crate::translate::rbac::NOTE_PREFIX))
                .cloned()
                .collect();
            for w in authz.iter().filter(|w| !logged.contains(w)) {
                tracing::warn!(policy_note = %w, "authorization policy not enforced as written (fail-closed)");
            }
            metrics.set(
                "winmesh_authz_conditions_not_enforced",
                "AuthorizationPolicy conditions or actions the gateway enforces fail-closed instead of as written.",
                &[],
                authz.len() as f64,
            );
            logged = authz;
            if let Some(m) = &identity {
                let mut specs = config_extra.clone();
                for id in mesh.identities() {
                    if !specs.iter().any(|s| s.id == id) {
                        // Minted through TokenRequest when configured (cluster mode).
                        let minter = minter
                            .as_ref()
                            .filter(|_| needs_tokens && id != ctx.default_identity)
                            .map(|t| t.minter(&id.namespace, &id.service_account));
                        if needs_tokens && id != ctx.default_identity && minter.is_none() {
                            let w = format!(
                                "identity {id} (used by a Windows service) has no token: add it to identity.extra with a token_file, or set mesh.kubernetes.windows.mint_tokens; until then its listener waits for a certificate"
                            );
                            tracing::warn!("{w}");
                            warnings.push(w);
                        }
                        specs.push(IdentitySpec {
                            id,
                            token_file: None,
                            minter,
                        });
                    }
                }
                m.set_identities(specs);
            }
            metrics.set(
                "winmesh_translation_warnings",
                "Things left out of, or unusable in, the generated config.",
                &[],
                warnings.len() as f64,
            );
            if let Ok(mut r) = registry.write() {
                *r = RegistryView {
                    state: st.clone(),
                    warnings,
                };
            }
            mesh_tx.send_replace(Some(Arc::new(translated)));
            readiness.set("mesh", Ok(()));
            readiness.note("mesh", st.persisted.clone());
        } else if let Ok(mut r) = registry.write() {
            *r = RegistryView {
                state: st.clone(),
                warnings: Vec::new(),
            };
        }
        // Wait for a new mesh state, or for an identity to gain or lose its certificate
        // (renewals of existing ones change nothing here).
        loop {
            let secrets_changed = async {
                match secrets.as_mut() {
                    Some(rx) => rx.changed().await.is_ok(),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                r = states.changed() => {
                    if r.is_err() {
                        return;
                    }
                    break;
                }
                ok = secrets_changed => {
                    if !ok {
                        secrets = None;
                        continue;
                    }
                    let now = secrets.as_ref().map(|rx| {
                        rx.borrow().certs.keys().cloned().collect::<std::collections::BTreeSet<_>>()
                    });
                    if now != ctx.certified {
                        break;
                    }
                }
            }
        }
    }
}

/// Starts everything `winmesh serve` runs.
pub async fn start(cfg: Config) -> anyhow::Result<Server> {
    let (running, writer) = crate::app::start(&cfg).await?;
    let metrics = running.metrics.clone();
    let mut tasks = Vec::new();

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
        // Computed on every /readyz: an expired certificate makes the gateway unready at once.
        let check_m = m.clone();
        running
            .readiness
            .register_check("identity", Arc::new(move || check_m.readiness()));
        let view_m = m.clone();
        running
            .debug
            .add_view("certs", Arc::new(move || view_m.view()));
    }

    // Mesh: the file source (or an empty mesh) → translation → assembler.
    running.readiness.register("mesh", "mesh not loaded yet");
    let settings = FileSettings::from_config(&cfg);
    let (file_tx, file_rx) = watch::channel(MeshState::default());
    match &cfg.mesh.file {
        Some(path) => {
            let src = FileSource {
                path: path.clone(),
                settings,
                poll: cfg.mesh.poll_interval,
                settle: cfg.mesh.settle,
                metrics: metrics.clone(),
            };
            tasks.push(tokio::spawn(src.run(file_tx, running.shutdown_signal())));
        }
        None => {
            let mesh = crate::discovery::file::parse("", &settings)
                .map_err(anyhow::Error::msg)?
                .0;
            file_tx.send_replace(MeshState {
                mesh: Some(Arc::new(mesh)),
                generation: 1,
                ..Default::default()
            });
            tasks.push(tokio::spawn(async move {
                // Keep the sender alive for the server's lifetime.
                std::future::pending::<()>().await;
                drop(file_tx);
            }));
        }
    }
    // With Kubernetes, the file's state and the mirror are combined into the state translated.
    let mut token_minter = None;
    let state_rx = if cfg.mesh.kubernetes.enabled {
        let k = &cfg.mesh.kubernetes;
        let client = crate::discovery::kube::client(k.kubeconfig.as_deref())
            .await
            .map_err(anyhow::Error::msg)?;
        let (kube_tx, kube_rx) = watch::channel(crate::discovery::kube::KubeState::default());
        let source = crate::discovery::kube::KubeSource {
            client,
            settings: crate::discovery::kube::MirrorSettings::from_config(&cfg),
            debounce: k.debounce,
            debounce_max: k.debounce_max,
            metrics: metrics.clone(),
            state_file: k.state_file.clone().filter(|p| !p.as_os_str().is_empty()),
            persisted_grace: k.sync_timeout.min(std::time::Duration::from_secs(2)),
        };
        info!("mirroring the mesh from the Kubernetes API");
        let publish_client = source.client.clone();
        if k.windows.enabled && k.windows.mint_tokens {
            token_minter = Some(crate::discovery::tokens::KubeTokens::new(
                source.client.clone(),
                k.windows.token_ttl,
                metrics.clone(),
            ));
        }
        tasks.push(tokio::spawn(source.run(kube_tx, running.shutdown_signal())));
        let p = &k.windows.publish;
        if k.windows.enabled && p.enabled {
            let status = Arc::new(std::sync::RwLock::new(
                crate::discovery::publish::PublishStatus::default(),
            ));
            let identity = Some(p.identity.clone())
                .filter(|i| !i.is_empty())
                .or_else(|| std::env::var("POD_NAME").ok())
                .or_else(|| std::env::var("HOSTNAME").ok())
                .or_else(|| std::env::var("COMPUTERNAME").ok())
                .filter(|i| !i.is_empty())
                .unwrap_or_else(|| format!("winmesh-{}", std::process::id()));
            let publisher = crate::discovery::publish::Publisher {
                client: publish_client,
                namespace: crate::discovery::kube::publish_namespace(&cfg),
                lease_name: p.lease_name.clone(),
                identity,
                lease_duration: p.lease_duration,
                metrics: metrics.clone(),
                status: status.clone(),
            };
            running.debug.add_view(
                "publisherz",
                Arc::new(move || {
                    status
                        .read()
                        .map(|s| serde_json::to_value(&*s).unwrap_or_default())
                        .unwrap_or_default()
                }),
            );
            tasks.push(tokio::spawn(
                publisher.run(kube_rx.clone(), running.shutdown_signal()),
            ));
        }
        let (tx, rx) = watch::channel(MeshState::default());
        tasks.push(tokio::spawn(crate::discovery::kube::combine(
            file_rx,
            kube_rx,
            tx,
            k.sync_timeout,
            running.shutdown_signal(),
        )));
        rx
    } else {
        file_rx
    };
    let ctx = Ctx {
        certified: None,
        mesh_mtls: cfg.mesh.mtls.clone(),
        secrets_via: cfg.xds.secrets,
        default_identity: cfg.identity.spiffe_id()?,
        trust_domain_aliases: cfg.identity.trust_domain_aliases.clone(),
    };
    let config_extra = cfg
        .identity
        .extra
        .iter()
        .map(|x| {
            Ok(IdentitySpec {
                id: SpiffeId::parse(&x.spiffe_id)?,
                token_file: x.token_file.clone(),
                minter: None,
            })
        })
        .collect::<Result<Vec<_>, crate::identity::SpiffeIdError>>()?;
    let registry = Arc::new(std::sync::RwLock::new(RegistryView::default()));
    let reg_view = registry.clone();
    running.debug.add_view(
        "registryz",
        Arc::new(move || reg_view.read().map(|v| v.render()).unwrap_or_default()),
    );
    let (mesh_tx, mesh_rx) = watch::channel::<MeshResources>(None);
    tasks.push(tokio::spawn(translate_loop(
        state_rx.clone(),
        ctx,
        mesh_tx,
        identity.clone(),
        config_extra,
        cfg.ca.as_ref().is_some_and(|c| c.mode == CaMode::Istiod),
        token_minter,
        registry,
        running.readiness.clone(),
        metrics.clone(),
        identity.as_ref().map(|_| secrets.clone()),
    )));

    running
        .readiness
        .register("config", "no snapshot published yet");
    let readiness = running.readiness.clone();
    let cache = running.cache.clone();
    let mut notify = cache.subscribe();
    tasks.push(tokio::spawn(async move {
        while !cache.is_ready() {
            if notify.changed().await.is_err() {
                return;
            }
        }
        readiness.set("config", Ok(()));
    }));
    tasks.push(tokio::spawn(assemble::run(
        writer,
        mesh_rx,
        secrets,
        metrics,
        running.shutdown_signal(),
    )));
    Ok(Server {
        running,
        identity,
        mesh_state: state_rx,
        tasks,
    })
}

pub async fn run(cfg: Config) -> anyhow::Result<()> {
    let server = start(cfg).await?;
    crate::app::shutdown_signal().await;
    info!("shutting down");
    server.stop().await;
    Ok(())
}
