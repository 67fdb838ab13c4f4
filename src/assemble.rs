//! The single owner of the [`SnapshotWriter`]: combines the latest mesh resources and certificates
//! into one snapshot and publishes it. Changes that arrive during a build coalesce into the next.

use tokio::sync::watch;
use tracing::{debug, warn};

use crate::identity::SecretSet;
use crate::metrics::Metrics;
use crate::xds::{SnapshotBuilder, SnapshotWriter};

/// Mesh resources (everything but secrets), already translated. `None` until the mesh sources synced.
pub type MeshResources = Option<std::sync::Arc<Translated>>;

/// Output of translation: Envoy resources plus the identities they present (which need certificates).
#[derive(Debug, Default, Clone)]
pub struct Translated {
    pub listeners: Vec<envoy_types::pb::envoy::config::listener::v3::Listener>,
    pub routes: Vec<envoy_types::pb::envoy::config::route::v3::RouteConfiguration>,
    pub clusters: Vec<envoy_types::pb::envoy::config::cluster::v3::Cluster>,
    pub endpoints: Vec<envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment>,
}

/// Builds the snapshot for the current inputs. Rejected resources are logged and counted; the rest ship.
pub fn build(
    mesh: &Translated,
    secrets: &SecretSet,
    metrics: &Metrics,
) -> crate::xds::ResourceSnapshot {
    let mut b = SnapshotBuilder::new();
    let mut errors = Vec::new();
    errors.extend(b.add_all(mesh.clusters.iter()));
    errors.extend(b.add_all(mesh.endpoints.iter()));
    errors.extend(b.add_all(mesh.listeners.iter()));
    errors.extend(b.add_all(mesh.routes.iter()));
    errors.extend(b.add_all(crate::translate::secret::secrets(secrets).iter()));
    for e in errors {
        warn!(error = %e, "resource skipped");
        metrics.inc(
            "winmesh_resources_rejected_total",
            "Generated resources skipped because they were invalid.",
            &[],
            1.0,
        );
    }
    b.build()
}

/// Publishes whenever the mesh or the secrets change, until `shutdown`. Waits for the mesh to be
/// synced (`Some`) before the first publish, so a restart never serves an empty config.
pub async fn run(
    mut writer: SnapshotWriter,
    mut mesh: watch::Receiver<MeshResources>,
    mut secrets: watch::Receiver<SecretSet>,
    metrics: std::sync::Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    // Without a CA nobody ever sends secrets: a closed secrets channel only means "no changes".
    let mut secrets_open = true;
    loop {
        let current = mesh.borrow_and_update().clone();
        let set = secrets.borrow_and_update().clone();
        if let Some(m) = current {
            let snap = build(&m, &set, &metrics);
            let counts: Vec<(crate::xds::TypeUrl, usize)> = crate::xds::TypeUrl::PUSH_ORDER
                .iter()
                .map(|t| (*t, snap.resources(*t).len()))
                .collect();
            let snap = writer.publish(snap);
            for (t, n) in counts {
                metrics.set(
                    "winmesh_snapshot_resources",
                    "Resources in the published snapshot.",
                    &[("type", t.short())],
                    n as f64,
                );
            }
            metrics.inc(
                "winmesh_snapshot_publishes_total",
                "Snapshots published.",
                &[],
                1.0,
            );
            debug!(generation = snap.generation(), "snapshot published");
        }
        tokio::select! {
            r = mesh.changed() => if r.is_err() { return; },
            r = secrets.changed(), if secrets_open => if r.is_err() {
                secrets_open = false;
                continue;
            },
            _ = shutdown.changed() => return,
        }
        // No fixed delay: the watch channels keep only the newest value, so changes that arrive
        // while a snapshot is being built coalesce into the next one, and a quiet system pushes a
        // single change at once. (Sources debounce themselves where that is their contract: the
        // Kubernetes mirror like istiod, the mesh file by its settle period.)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Without a CA the secrets sender is gone before the mesh arrives: the mesh is still published.
    #[tokio::test]
    async fn a_closed_secrets_channel_does_not_stop_publishing() {
        let (cache, writer) = crate::xds::cache::snapshot_cache();
        let (mesh_tx, mesh_rx) = watch::channel::<MeshResources>(None);
        let secrets_rx = watch::channel(SecretSet::default()).1;
        let (_stop_tx, stop_rx) = watch::channel(false);
        let metrics = std::sync::Arc::new(Metrics::new());
        let task = tokio::spawn(run(writer, mesh_rx, secrets_rx, metrics, stop_rx));
        // Let the assembler see the closed channel first.
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!cache.is_ready());
        mesh_tx.send_replace(Some(std::sync::Arc::new(Translated::default())));
        let mut notify = cache.subscribe();
        tokio::time::timeout(Duration::from_secs(5), async {
            while !cache.is_ready() {
                if notify.changed().await.is_err() {
                    break;
                }
            }
        })
        .await
        .expect("snapshot published");
        assert!(cache.is_ready());
        task.abort();
    }

    /// A change on a quiet system is published at once: no fixed delay on the push path (the old
    /// assembler slept 50 ms after every change). Paused time makes any sleep visible.
    #[tokio::test(start_paused = true)]
    async fn a_single_change_is_published_without_delay() {
        let (cache, writer) = crate::xds::cache::snapshot_cache();
        let (mesh_tx, mesh_rx) = watch::channel::<MeshResources>(None);
        let (_secrets_tx, secrets_rx) = watch::channel(SecretSet::default());
        let (_stop_tx, stop_rx) = watch::channel(false);
        let metrics = std::sync::Arc::new(Metrics::new());
        let mut notify = cache.subscribe();
        let task = tokio::spawn(run(writer, mesh_rx, secrets_rx, metrics, stop_rx));
        mesh_tx.send_replace(Some(std::sync::Arc::new(Translated::default())));
        notify.changed().await.expect("first snapshot");
        let t0 = tokio::time::Instant::now();
        let changed = Translated {
            clusters: vec![envoy_types::pb::envoy::config::cluster::v3::Cluster {
                name: "a".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        mesh_tx.send_replace(Some(std::sync::Arc::new(changed)));
        notify.changed().await.expect("second snapshot");
        assert_eq!(t0.elapsed(), Duration::ZERO, "the push waited on a timer");
        task.abort();
    }
}
