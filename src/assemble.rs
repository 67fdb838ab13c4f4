//! The single owner of the [`SnapshotWriter`]: combines the latest mesh resources and certificates
//! into one snapshot and publishes it. Changes that arrive during a build coalesce into the next.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::watch;
use tracing::{debug, warn};

use crate::identity::SecretSet;
use crate::metrics::Metrics;
#[cfg(test)]
use crate::xds::cache::Resource;
use crate::xds::cache::XdsMessage;
use crate::xds::{ResourceSnapshot, SnapshotBuilder, SnapshotWriter, TypeUrl};

/// Mesh resources (everything but secrets), already translated. `None` until the mesh sources synced.
pub type MeshResources = Option<Arc<Translated>>;

/// Output of translation: Envoy resources plus the identities they present (which need certificates).
#[derive(Debug, Default, Clone)]
pub struct Translated {
    pub listeners: Vec<envoy_types::pb::envoy::config::listener::v3::Listener>,
    pub routes: Vec<envoy_types::pb::envoy::config::route::v3::RouteConfiguration>,
    pub clusters: Vec<envoy_types::pb::envoy::config::cluster::v3::Cluster>,
    pub endpoints: Vec<envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment>,
}

/// What the previous build encoded: the translated input and the snapshot made from it. The next
/// build re-encodes only the messages that differ from it (content-addressed reuse: an unchanged
/// message keeps its encoded bytes, digest and `last_updated` without being serialized again).
#[derive(Clone, Default)]
pub struct Previous {
    mesh: Option<Arc<Translated>>,
    snapshot: Option<Arc<ResourceSnapshot>>,
}

/// How a build went: resources serialized anew versus shared with the previous snapshot.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BuildStats {
    pub encoded: usize,
    pub reused: usize,
}

/// Builds the snapshot for the current inputs from scratch. Rejected resources are logged and
/// counted; the rest ship.
pub fn build(mesh: &Translated, secrets: &SecretSet, metrics: &Metrics) -> ResourceSnapshot {
    build_after(&Previous::default(), mesh, secrets, metrics).0
}

/// Builds the snapshot, sharing every resource whose message equals the one `prev` encoded.
pub fn build_after(
    prev: &Previous,
    mesh: &Translated,
    secrets: &SecretSet,
    metrics: &Metrics,
) -> (ResourceSnapshot, BuildStats) {
    let mut b = SnapshotBuilder::new();
    let mut errors = Vec::new();
    let mut stats = BuildStats::default();
    let old = prev.mesh.as_deref();
    let snap = prev.snapshot.as_deref();
    add_type(
        &mut b,
        &mesh.clusters,
        old.map(|o| &o.clusters[..]),
        snap,
        &mut errors,
        &mut stats,
    );
    add_type(
        &mut b,
        &mesh.endpoints,
        old.map(|o| &o.endpoints[..]),
        snap,
        &mut errors,
        &mut stats,
    );
    add_type(
        &mut b,
        &mesh.listeners,
        old.map(|o| &o.listeners[..]),
        snap,
        &mut errors,
        &mut stats,
    );
    add_type(
        &mut b,
        &mesh.routes,
        old.map(|o| &o.routes[..]),
        snap,
        &mut errors,
        &mut stats,
    );
    // Secrets are few and carry their own rotation; they are always encoded.
    let secrets = crate::translate::secret::secrets(secrets);
    stats.encoded += secrets.len();
    errors.extend(b.add_all(secrets.iter()));
    for e in errors {
        warn!(error = %e, "resource skipped");
        metrics.inc(
            "winmesh_resources_rejected_total",
            "Generated resources skipped because they were invalid.",
            &[],
            1.0,
        );
    }
    (b.build(), stats)
}

fn add_type<M: XdsMessage + PartialEq>(
    b: &mut SnapshotBuilder,
    new: &[M],
    old: Option<&[M]>,
    prev: Option<&ResourceSnapshot>,
    errors: &mut Vec<crate::xds::cache::SnapshotError>,
    stats: &mut BuildStats,
) {
    // The previous message of each name; a name that appeared twice is ambiguous (only the first
    // was served) and is re-encoded.
    let mut by_name: HashMap<&str, Option<&M>> = HashMap::new();
    if prev.is_some() {
        for m in old.unwrap_or_default() {
            by_name
                .entry(m.resource_name())
                .and_modify(|e| *e = None)
                .or_insert(Some(m));
        }
    }
    for m in new {
        let shared = prev
            .and_then(|p| p.get(M::TYPE, m.resource_name()))
            .filter(|_| matches!(by_name.get(m.resource_name()), Some(Some(o)) if *o == m));
        let added = match shared {
            Some(r) => {
                stats.reused += 1;
                b.add_shared(r.clone()).map(|_| ())
            }
            None => {
                stats.encoded += 1;
                b.add(m).map(|_| ())
            }
        };
        if let Err(e) = added {
            errors.push(e);
        }
    }
}

/// Publishes whenever the mesh or the secrets change, until `shutdown`. Waits for the mesh to be
/// synced (`Some`) before the first publish, so a restart never serves an empty config. Building
/// and publishing run on a blocking thread: streams keep being served while 10k services encode.
pub async fn run(
    writer: SnapshotWriter,
    mut mesh: watch::Receiver<MeshResources>,
    mut secrets: watch::Receiver<SecretSet>,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    // Without a CA nobody ever sends secrets: a closed secrets channel only means "no changes".
    let mut secrets_open = true;
    let mut writer = Some(writer);
    let mut prev = Previous::default();
    loop {
        let current = mesh.borrow_and_update().clone();
        let set = secrets.borrow_and_update().clone();
        if let Some(m) = current
            && let Some(w) = writer.take()
        {
            let (p, met) = (prev.clone(), metrics.clone());
            let job = tokio::task::spawn_blocking(move || {
                let mut w = w;
                let (snap, stats) = build_after(&p, &m, &set, &met);
                let counts: Vec<(TypeUrl, usize)> = TypeUrl::PUSH_ORDER
                    .iter()
                    .map(|t| (*t, snap.resources(*t).len()))
                    .collect();
                let snap = w.publish(snap);
                (w, m, snap, stats, counts)
            });
            let Ok((w, m, snap, stats, counts)) = job.await else {
                // A panic while building is a bug; the last published snapshot keeps being served.
                tracing::error!("snapshot build failed; keeping the last published snapshot");
                return;
            };
            writer = Some(w);
            prev = Previous {
                mesh: Some(m),
                snapshot: Some(snap.clone()),
            };
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
            metrics.inc(
                "winmesh_resources_encoded_total",
                "Resources serialized anew; unchanged ones are shared with the previous snapshot.",
                &[],
                stats.encoded as f64,
            );
            debug!(
                generation = snap.generation(),
                encoded = stats.encoded,
                reused = stats.reused,
                "snapshot published"
            );
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
    use crate::xds::testutil::{cla, eds_cluster};
    use std::time::Duration;

    fn mesh(n: usize, changed: Option<usize>) -> Translated {
        Translated {
            clusters: (0..n).map(|i| eds_cluster(&format!("c{i}"), 0)).collect(),
            endpoints: (0..n)
                .map(|i| cla(&format!("c{i}"), u32::from(changed == Some(i))))
                .collect(),
            ..Default::default()
        }
    }

    fn previous(m: Translated) -> Previous {
        let m = Arc::new(m);
        let snap = build(&m, &SecretSet::default(), &Metrics::new());
        Previous {
            mesh: Some(m),
            snapshot: Some(Arc::new(snap)),
        }
    }

    #[test]
    fn only_changed_messages_are_encoded_again() {
        let metrics = Metrics::new();
        let prev = previous(mesh(100, None));
        let (same, stats) = build_after(&prev, &mesh(100, None), &SecretSet::default(), &metrics);
        assert_eq!(
            stats,
            BuildStats {
                encoded: 0,
                reused: 200
            }
        );
        let old = prev.snapshot.as_deref().unwrap();
        assert!(Arc::ptr_eq(
            same.get(TypeUrl::Endpoint, "c7").unwrap(),
            old.get(TypeUrl::Endpoint, "c7").unwrap()
        ));
        assert_eq!(
            same.type_version(TypeUrl::Endpoint),
            old.type_version(TypeUrl::Endpoint)
        );

        let (next, stats) =
            build_after(&prev, &mesh(100, Some(7)), &SecretSet::default(), &metrics);
        assert_eq!(
            stats,
            BuildStats {
                encoded: 1,
                reused: 199
            }
        );
        let fresh = Resource::encode(&cla("c7", 1));
        assert_eq!(next.get(TypeUrl::Endpoint, "c7").unwrap().body, fresh.body);
        assert_ne!(
            next.type_version(TypeUrl::Endpoint),
            old.type_version(TypeUrl::Endpoint)
        );
    }

    #[test]
    fn a_name_that_was_duplicated_is_encoded_again() {
        // The first of two same-named messages was served; equality with the second must not
        // make the build reuse the first one's bytes.
        let mut m = mesh(1, None);
        m.endpoints.push(cla("c0", 5));
        let prev = previous(m);
        let (next, stats) = build_after(
            &prev,
            &Translated {
                clusters: vec![eds_cluster("c0", 0)],
                endpoints: vec![cla("c0", 5)],
                ..Default::default()
            },
            &SecretSet::default(),
            &Metrics::new(),
        );
        assert_eq!(
            stats,
            BuildStats {
                encoded: 1,
                reused: 1
            }
        );
        assert_eq!(
            next.get(TypeUrl::Endpoint, "c0").unwrap().body,
            Resource::encode(&cla("c0", 5)).body
        );
    }

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
