//! Wiring only: binds the listeners, builds the cache, registry, metrics and readiness, starts the
//! xDS and debug servers, and stops them on shutdown.

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use anyhow::Context;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::info;

use crate::config::{Config, read_token};
use crate::debug::{DebugState, Readiness};
use crate::metrics::Metrics;
use crate::xds::clients::ClientRegistry;
use crate::xds::server::{XdsServer, serve};
use crate::xds::{SnapshotCache, SnapshotWriter, snapshot_cache};

/// A running winmesh: its bound addresses and handles to its state.
pub struct Running {
    pub xds_addr: SocketAddr,
    pub debug_addr: SocketAddr,
    pub cache: SnapshotCache,
    pub clients: Arc<ClientRegistry>,
    pub metrics: Arc<Metrics>,
    pub readiness: Arc<Readiness>,
    pub debug: DebugState,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Running {
    /// Stops the servers and waits for them.
    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
    }

    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }
}

/// Binds and starts the xDS and debug servers. The returned writer is the only way to publish config.
pub async fn start(cfg: &Config) -> anyhow::Result<(Running, SnapshotWriter)> {
    let xds_token = cfg
        .xds
        .token_file
        .as_deref()
        .map(read_token)
        .transpose()
        .map_err(anyhow::Error::msg)
        .context("xds.token_file")?;
    let debug_token = cfg
        .debug
        .token_file
        .as_deref()
        .map(read_token)
        .transpose()
        .map_err(anyhow::Error::msg)
        .context("debug.token_file")?;

    let xds_listener = crate::xds::server::bind(cfg.xds.listen)
        .with_context(|| format!("cannot listen on xds.listen {}", cfg.xds.listen))?;
    let debug_listener = tokio::net::TcpListener::bind(cfg.debug.listen)
        .await
        .with_context(|| format!("cannot listen on debug.listen {}", cfg.debug.listen))?;
    let xds_addr = xds_listener.local_addr()?;
    let debug_addr = debug_listener.local_addr()?;

    let (cache, writer) = snapshot_cache();
    let clients = ClientRegistry::new();
    let metrics = Arc::new(Metrics::new());
    metrics.set(
        "winmesh_build_info",
        "Always 1; the labels say which winmesh build runs.",
        &[
            ("version", env!("CARGO_PKG_VERSION")),
            ("target_os", std::env::consts::OS),
        ],
        1.0,
    );
    let readiness = Readiness::new();
    let (shutdown, _) = watch::channel(false);

    let xds = XdsServer::new(cache.clone(), clients.clone(), metrics.clone(), xds_token)
        .with_shutdown(shutdown.subscribe())
        .with_initial_push_limit(cfg.xds.max_concurrent_initial_pushes);
    let mut rx = shutdown.subscribe();
    let xds_task = tokio::spawn(async move {
        let stop = async move {
            let _ = rx.wait_for(|v| *v).await;
        };
        if let Err(e) = serve(xds_listener, xds, stop).await {
            tracing::error!(error = %e, "xDS server failed");
        }
    });

    let debug = DebugState {
        cache: cache.clone(),
        clients: clients.clone(),
        metrics: metrics.clone(),
        readiness: readiness.clone(),
        token: debug_token.map(Into::into),
        views: Arc::new(RwLock::new(Default::default())),
    };
    let router = crate::debug::router(debug.clone());
    let mut rx = shutdown.subscribe();
    let debug_task = tokio::spawn(async move {
        let stop = async move {
            let _ = rx.wait_for(|v| *v).await;
        };
        if let Err(e) = axum::serve(debug_listener, router)
            .with_graceful_shutdown(stop)
            .await
        {
            tracing::error!(error = %e, "debug server failed");
        }
    });
    info!(xds = %xds_addr, debug = %debug_addr, "winmesh listening");
    Ok((
        Running {
            xds_addr,
            debug_addr,
            cache,
            clients,
            metrics,
            readiness,
            debug,
            shutdown,
            tasks: vec![xds_task, debug_task],
        },
        writer,
    ))
}

/// Resolves on Ctrl-C (all platforms; also Ctrl-Break and console close on Windows) or SIGTERM (Unix).
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(windows)]
    {
        use tokio::signal::windows;
        match (
            windows::ctrl_break(),
            windows::ctrl_close(),
            windows::ctrl_shutdown(),
        ) {
            (Ok(mut brk), Ok(mut close), Ok(mut shut)) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = brk.recv() => {}
                    _ = close.recv() => {}
                    _ = shut.recv() => {}
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(any(unix, windows)))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
