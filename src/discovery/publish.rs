//! Publishing the mesh-facing Services: one winmesh (elected with a `coordination.k8s.io/v1` Lease,
//! since one runs per Windows node) server-side applies, with field manager `winmesh`, the Service
//! and EndpointSlice that make istiod route Linux clients of a Windows app to the gateways
//! (`kube_windows::publications` computes them), and deletes what it wrote for app Services that no
//! longer opt in. It acts only on a complete, live view of the cluster: while any watched kind is
//! failing or served from persisted state, nothing is written or deleted.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::Service as KService;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use serde::Serialize;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{info, warn};

use super::kube::KubeState;
use super::kube_windows::{FIELD_MANAGER, Publication, Stale};
use crate::metrics::Metrics;

/// What `/debug/publisherz` shows.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PublishStatus {
    pub identity: String,
    pub leader: bool,
    /// The Lease's holder as last read.
    pub holder: Option<String>,
    /// `namespace/name` of each mesh-facing Service applied, with how many gateways its slice lists.
    pub published: BTreeMap<String, usize>,
    /// Why the last sync did nothing, or what failed.
    pub last_error: Option<String>,
}

pub struct Publisher {
    pub client: kube::Client,
    pub namespace: String,
    pub lease_name: String,
    pub identity: String,
    pub lease_duration: Duration,
    pub metrics: Arc<Metrics>,
    pub status: Arc<RwLock<PublishStatus>>,
}

/// Re-apply everything this often even without changes (repairs objects edited by hand).
const REFRESH: Duration = Duration::from_secs(60);

fn api_code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}

impl Publisher {
    fn set_status(&self, f: impl FnOnce(&mut PublishStatus)) {
        if let Ok(mut s) = self.status.write() {
            f(&mut s);
        }
    }

    /// One election round: take or renew the Lease if it is free, expired or ours. Returns whether
    /// this winmesh holds it now.
    async fn elect(&self) -> Result<bool, String> {
        let api: Api<Lease> = Api::namespaced(self.client.clone(), &self.namespace);
        let now = MicroTime(k8s_openapi::jiff::Timestamp::now());
        let secs = i32::try_from(self.lease_duration.as_secs()).unwrap_or(i32::MAX);
        let current = api
            .get_opt(&self.lease_name)
            .await
            .map_err(|e| format!("reading Lease {}/{}: {e}", self.namespace, self.lease_name))?;
        let Some(mut lease) = current else {
            let lease = Lease {
                metadata: kube::core::ObjectMeta {
                    name: Some(self.lease_name.clone()),
                    namespace: Some(self.namespace.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(secs),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match api.create(&PostParams::default(), &lease).await {
                Ok(_) => {
                    self.set_status(|s| s.holder = Some(self.identity.clone()));
                    Ok(true)
                }
                Err(e) if api_code(&e) == Some(409) => Ok(false),
                Err(e) => Err(format!("creating Lease: {e}")),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        self.set_status(|s| s.holder = holder.clone());
        let mine = holder.as_deref() == Some(self.identity.as_str());
        let expired = match (&spec.renew_time, spec.lease_duration_seconds) {
            (Some(t), Some(d)) => {
                let until = t.0 + k8s_openapi::jiff::SignedDuration::from_secs(i64::from(d));
                until < now.0
            }
            _ => true,
        };
        if !(mine || holder.is_none() || expired) {
            return Ok(false);
        }
        let transitions = spec.lease_transitions.unwrap_or(0);
        lease.spec = Some(LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(secs),
            acquire_time: if mine {
                spec.acquire_time.clone()
            } else {
                Some(now.clone())
            },
            renew_time: Some(now),
            lease_transitions: Some(if mine { transitions } else { transitions + 1 }),
            ..spec
        });
        // The resourceVersion read above makes this a compare-and-swap: of two winmesh that saw
        // the Lease expire, one wins and the other gets 409.
        match api
            .replace(&self.lease_name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => {
                if !mine {
                    info!(identity = %self.identity, "elected to publish mesh-facing Services");
                }
                self.set_status(|s| s.holder = Some(self.identity.clone()));
                Ok(true)
            }
            Err(e) if api_code(&e) == Some(409) => Ok(false),
            Err(e) => Err(format!("renewing Lease: {e}")),
        }
    }

    /// Gives the Lease up (on shutdown), so another winmesh takes over at once.
    async fn release(&self) {
        let api: Api<Lease> = Api::namespaced(self.client.clone(), &self.namespace);
        let Ok(Some(mut lease)) = api.get_opt(&self.lease_name).await else {
            return;
        };
        let Some(spec) = lease.spec.as_mut() else {
            return;
        };
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        if let Err(e) = api
            .replace(&self.lease_name, &PostParams::default(), &lease)
            .await
        {
            warn!(error = %e, "could not release the publisher Lease");
        }
    }

    fn count(&self, kind: &str, result: &str) {
        self.metrics.inc(
            "winmesh_publisher_writes_total",
            "Writes of mesh-facing Services and EndpointSlices, by kind and result.",
            &[("kind", kind), ("result", result)],
            1.0,
        );
    }

    async fn apply(&self, p: &Publication) -> Result<(), String> {
        let params = PatchParams::apply(FIELD_MANAGER).force();
        let services: Api<KService> = Api::namespaced(self.client.clone(), &p.namespace);
        let svc = services
            .patch(&p.mesh_name, &params, &Patch::Apply(&p.service))
            .await
            .map_err(|e| {
                self.count("service", "error");
                format!("applying Service {}/{}: {e}", p.namespace, p.mesh_name)
            })?;
        self.count("service", "ok");
        let mut slice = p.slice.clone();
        if let Some(uid) = svc.metadata.uid {
            slice["metadata"]["ownerReferences"] = serde_json::json!([{
                "apiVersion": "v1", "kind": "Service", "name": p.mesh_name, "uid": uid,
                "controller": true, "blockOwnerDeletion": true}]);
        }
        let slices: Api<EndpointSlice> = Api::namespaced(self.client.clone(), &p.namespace);
        slices
            .patch(&p.slice_name, &params, &Patch::Apply(&slice))
            .await
            .map_err(|e| {
                self.count("endpointslice", "error");
                format!(
                    "applying EndpointSlice {}/{}: {e}",
                    p.namespace, p.slice_name
                )
            })?;
        self.count("endpointslice", "ok");
        Ok(())
    }

    async fn delete(&self, s: &Stale) -> Result<(), String> {
        let dp = DeleteParams::default();
        let (kind, ns, name, r) = match s {
            Stale::Service { namespace, name } => {
                let api: Api<KService> = Api::namespaced(self.client.clone(), namespace);
                (
                    "service",
                    namespace,
                    name,
                    api.delete(name, &dp).await.map(|_| ()),
                )
            }
            Stale::EndpointSlice { namespace, name } => {
                let api: Api<EndpointSlice> = Api::namespaced(self.client.clone(), namespace);
                (
                    "endpointslice",
                    namespace,
                    name,
                    api.delete(name, &dp).await.map(|_| ()),
                )
            }
        };
        match r {
            Ok(()) => {
                info!(kind, object = %format!("{ns}/{name}"), "deleted: its app Service no longer opts in");
                self.count(kind, "deleted");
                Ok(())
            }
            Err(e) if api_code(&e) == Some(404) => Ok(()),
            Err(e) => {
                self.count(kind, "error");
                Err(format!("deleting {kind} {ns}/{name}: {e}"))
            }
        }
    }

    /// Applies what changed since the last sync (everything after `applied` is cleared).
    async fn sync(&self, st: &KubeState, applied: &mut BTreeMap<String, Publication>) {
        let Some(mesh) = st.mesh.as_deref() else {
            return;
        };
        if st.persisted.is_some() || !st.errors.is_empty() {
            self.set_status(|s| {
                s.last_error =
                    Some("waiting for a complete, live view of the cluster before writing".into())
            });
            return;
        }
        let mut errors = Vec::new();
        for p in &mesh.publications {
            let key = format!("{}/{}", p.namespace, p.mesh_name);
            if applied.get(&key) == Some(p) {
                continue;
            }
            match self.apply(p).await {
                Ok(()) => {
                    applied.insert(key, p.clone());
                }
                Err(e) => {
                    warn!(error = %e, "publishing a mesh-facing Service failed; retrying");
                    errors.push(e);
                }
            }
        }
        applied.retain(|k, _| {
            mesh.publications
                .iter()
                .any(|p| format!("{}/{}", p.namespace, p.mesh_name) == *k)
        });
        for s in &mesh.stale {
            if let Err(e) = self.delete(s).await {
                warn!(error = %e, "deleting a stale mesh-facing object failed; retrying");
                errors.push(e);
            }
        }
        let published: BTreeMap<String, usize> = mesh
            .publications
            .iter()
            .map(|p| {
                (
                    format!("{}/{}", p.namespace, p.mesh_name),
                    p.slice["endpoints"].as_array().map_or(0, |a| a.len()),
                )
            })
            .collect();
        self.set_status(|s| {
            s.published = published;
            s.last_error = (!errors.is_empty()).then(|| errors.join("; "));
        });
    }

    pub async fn run(
        self,
        mut kube: watch::Receiver<KubeState>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        self.set_status(|s| s.identity = self.identity.clone());
        let mut tick = tokio::time::interval(self.lease_duration / 3);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Leadership lasts a lease duration from the last successful renewal (minus a margin), so
        // a winmesh cut off from the API stops writing before another can take over.
        let mut held_until: Option<Instant> = None;
        let mut applied: BTreeMap<String, Publication> = BTreeMap::new();
        let mut refreshed = Instant::now();
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    let started = Instant::now();
                    match self.elect().await {
                        Ok(true) => held_until = Some(started + self.lease_duration * 2 / 3),
                        Ok(false) => held_until = None,
                        Err(e) => {
                            warn!(error = %e, "publisher election failed");
                            self.set_status(|s| s.last_error = Some(e));
                        }
                    }
                    if refreshed.elapsed() >= REFRESH {
                        applied.clear();
                        refreshed = Instant::now();
                    }
                }
                r = kube.changed() => if r.is_err() { return },
                _ = shutdown.changed() => {
                    if held_until.is_some() {
                        self.release().await;
                    }
                    return;
                }
            }
            let leader = held_until.is_some_and(|t| Instant::now() < t);
            self.metrics.set(
                "winmesh_publisher_leader",
                "1 while this winmesh is the elected publisher of mesh-facing Services.",
                &[],
                if leader { 1.0 } else { 0.0 },
            );
            self.set_status(|s| s.leader = leader);
            if leader {
                let st = kube.borrow_and_update().clone();
                self.sync(&st, &mut applied).await;
            } else {
                applied.clear();
            }
        }
    }
}
