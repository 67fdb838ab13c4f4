//! Sans-IO state machine for one incremental (delta) ADS or SDS stream.
//!
//! Same shape as [`super::sotw::SotwStream`]. Delta-specific rules:
//! - `initial_resource_versions` on reconnect: unchanged resources are not re-sent, and names the client
//!   holds that no longer exist are sent in `removed_resources`.
//! - `resource_names_subscribe` is always answered, even with a stale nonce and even if unchanged.
//! - Subscribed names that do not exist are reported once in `removed_resources`; the subscription is
//!   kept and the resource is sent the moment it appears.
//! - Re-warming: after a cluster (listener) update, the endpoints (routes) it depends on are re-sent.
//! - Make-before-break: cluster removals wait until the proxy ACKed listeners and routes.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryRequest;

use super::cache::{Resource, ResourceSnapshot};
use super::resources::TypeUrl;
use super::sotw::{remember_node, resolve_type};
use super::stream::{
    NackRecord, NodeInfo, RequestKind, StreamError, Subscription, SyncStatus, TypeStatus,
};
use super::wire::{WireAny, WireControlPlane, WireDeltaDiscoveryResponse, WireResource};

#[derive(Debug)]
struct Pending {
    nonce: String,
    sent_at: Instant,
    updated: Vec<(String, String)>,
    removed: Vec<String>,
}

#[derive(Debug, Default)]
struct TypeState {
    requested: bool,
    sub: Subscription,
    /// What the client holds (name → version), updated when a response is sent. A NACKed update stays
    /// here, so it is not re-sent until its content changes.
    known: HashMap<String, String>,
    /// Subscribed names already reported as absent.
    reported_missing: BTreeSet<String>,
    /// A subscribe arrived: answer even if there is nothing new.
    must_answer: bool,
    pending: Option<Pending>,
    /// What the proxy has ACKed.
    acked: BTreeMap<String, String>,
    last_nonce: Option<String>,
    last_nack: Option<NackRecord>,
    responses: u64,
    nacks: u64,
}

/// One delta stream.
#[derive(Debug)]
pub struct DeltaStream {
    only: Option<TypeUrl>,
    node: Option<NodeInfo>,
    types: [TypeState; 5],
    snapshot: Option<Arc<ResourceSnapshot>>,
    nonce_seq: u64,
    control_plane: String,
}

impl DeltaStream {
    pub fn new_ads(control_plane: &str) -> Self {
        Self::new(None, control_plane)
    }

    pub fn new_sds(control_plane: &str) -> Self {
        Self::new(Some(TypeUrl::Secret), control_plane)
    }

    fn new(only: Option<TypeUrl>, control_plane: &str) -> Self {
        DeltaStream {
            only,
            node: None,
            types: Default::default(),
            snapshot: None,
            nonce_seq: 0,
            control_plane: control_plane.to_string(),
        }
    }

    pub fn node(&self) -> Option<&NodeInfo> {
        self.node.as_ref()
    }

    pub fn set_snapshot(&mut self, snapshot: Arc<ResourceSnapshot>) {
        self.snapshot = Some(snapshot);
    }

    pub fn handle_request(
        &mut self,
        req: &DeltaDiscoveryRequest,
        now: Instant,
    ) -> Result<(TypeUrl, RequestKind), StreamError> {
        remember_node(&mut self.node, req.node.as_ref())?;
        super::stream::check_names(
            req.resource_names_subscribe.len() + req.initial_resource_versions.len(),
            req.resource_names_subscribe
                .iter()
                .chain(req.resource_names_unsubscribe.iter())
                .chain(req.initial_resource_versions.keys()),
        )?;
        let t = resolve_type(&req.type_url, self.only)?;
        let st = &mut self.types[t.index()];
        let first = !st.requested;
        st.requested = true;
        if first {
            // Only the first request of a type on a stream may carry what the client already has. The
            // client runs those versions, so they also count as ACKed: otherwise make-before-break
            // would wait for ACKs of listeners and routes that are unchanged and never re-sent, and
            // resources deleted while the client was away would never be removed (istio#41494).
            for (name, version) in &req.initial_resource_versions {
                st.known.insert(name.clone(), version.clone());
                st.acked.insert(name.clone(), version.clone());
            }
        }
        st.sub.apply_delta(
            t,
            first,
            &req.resource_names_subscribe,
            &req.resource_names_unsubscribe,
        );
        // Subscriptions accumulate on a delta stream: bound the set, not only each request.
        if st.sub.names.len() > super::stream::MAX_SUBSCRIBED {
            return Err(StreamError::TooManyNames);
        }
        for n in &req.resource_names_subscribe {
            // Re-send on (re)subscribe, unless the client just told us which version it has.
            if !(first && req.initial_resource_versions.contains_key(n)) {
                st.known.remove(n);
            }
            st.reported_missing.remove(n);
        }
        for n in &req.resource_names_unsubscribe {
            if n != "*" && !st.sub.wants(n) {
                st.known.remove(n);
                st.reported_missing.remove(n);
            }
        }
        if first || !req.resource_names_subscribe.is_empty() {
            st.must_answer = true;
        }

        if req.response_nonce.is_empty() {
            return Ok((t, RequestKind::Initial));
        }
        match &st.pending {
            Some(p) if p.nonce == req.response_nonce => {}
            _ => return Ok((t, RequestKind::Stale)),
        }
        let Some(p) = st.pending.take() else {
            return Ok((t, RequestKind::Stale));
        };
        let latency = now.saturating_duration_since(p.sent_at);
        if let Some(err) = &req.error_detail {
            st.nacks += 1;
            st.last_nack = Some(NackRecord {
                version: p.nonce.clone(),
                message: super::peertext::printable(&err.message, super::peertext::MAX_NACK_TEXT),
                code: err.code,
                at: SystemTime::now(),
            });
            return Ok((
                t,
                RequestKind::Nack {
                    latency,
                    message: super::peertext::printable(
                        &err.message,
                        super::peertext::MAX_NACK_TEXT,
                    ),
                },
            ));
        }
        for (n, v) in p.updated {
            st.acked.insert(n, v);
        }
        for n in p.removed {
            st.acked.remove(&n);
        }
        Ok((t, RequestKind::Ack { latency }))
    }

    fn desired(&self, t: TypeUrl) -> BTreeMap<String, Arc<Resource>> {
        let mut out = BTreeMap::new();
        let Some(snap) = &self.snapshot else {
            return out;
        };
        let st = &self.types[t.index()];
        if st.sub.wildcard {
            out.extend(
                snap.resources(t)
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone())),
            );
        }
        for n in &st.sub.names {
            if let Some(r) = snap.get(t, n) {
                out.insert(n.clone(), r.clone());
            }
        }
        out
    }

    fn routing_converged(&self) -> bool {
        [TypeUrl::Listener, TypeUrl::Route].into_iter().all(|t| {
            let st = &self.types[t.index()];
            if !st.requested {
                return true;
            }
            if st.pending.is_some() {
                return false;
            }
            let desired = self.desired(t);
            let covered = desired
                .iter()
                .all(|(n, r)| st.acked.get(n).is_some_and(|v| *v == r.version));
            if t.is_full_state() {
                covered && st.acked.keys().all(|k| desired.contains_key(k))
            } else {
                covered
            }
        })
    }

    /// Resources to update and names to remove for type `t` right now.
    fn changes(&self, t: TypeUrl) -> (Vec<Arc<Resource>>, Vec<String>, Vec<String>) {
        let st = &self.types[t.index()];
        let desired = self.desired(t);
        let updates: Vec<Arc<Resource>> = desired
            .values()
            .filter(|r| st.known.get(&r.name) != Some(&r.version))
            .cloned()
            .collect();
        // Removing a cluster (or the endpoints of a cluster that is being kept) while listeners or routes
        // may still use it would fail requests: hold removals until routing converged.
        let hold_removals =
            matches!(t, TypeUrl::Cluster | TypeUrl::Endpoint) && !self.routing_converged();
        let mut removed: Vec<String> = if hold_removals {
            Vec::new()
        } else {
            let mut v: Vec<String> = st
                .known
                .keys()
                .filter(|k| !desired.contains_key(*k))
                // A secret that is still subscribed is awaited, never reported removed (see below),
                // even when the client held it from before a restart.
                .filter(|k| t != TypeUrl::Secret || !st.sub.wants(k))
                .cloned()
                .collect();
            v.sort();
            v
        };
        // Subscribed names that do not exist: tell the client once, keep the subscription. Not for
        // secrets: "does not exist" lets Envoy finish warming a listener or cluster without its
        // certificate, whereas an unanswered secret keeps it waiting (`initial_fetch_timeout: 0s`)
        // until the certificate is issued, as istio-agent's SDS server does.
        if t == TypeUrl::Secret {
            return (updates, removed, Vec::new());
        }
        let missing: Vec<String> = st
            .sub
            .names
            .iter()
            .filter(|n| {
                !desired.contains_key(*n)
                    && !st.known.contains_key(*n)
                    && !st.reported_missing.contains(*n)
            })
            .cloned()
            .collect();
        removed.extend(missing.iter().cloned());
        (updates, removed, missing)
    }

    fn has_work(&self, t: TypeUrl) -> bool {
        let st = &self.types[t.index()];
        if !st.requested {
            return false;
        }
        // A subscription is always answered, except to say a secret does not exist (see `changes`).
        if st.must_answer && t != TypeUrl::Secret {
            return true;
        }
        let (u, r, _) = self.changes(t);
        !u.is_empty() || !r.is_empty()
    }

    fn clusters_settled(&self) -> bool {
        [TypeUrl::Cluster, TypeUrl::Endpoint].into_iter().all(|t| {
            let st = &self.types[t.index()];
            !st.requested || (st.pending.is_none() && !self.has_work(t))
        })
    }

    pub fn next_response(&mut self, now: Instant) -> Option<(TypeUrl, WireDeltaDiscoveryResponse)> {
        let snap = self.snapshot.clone()?;
        for t in TypeUrl::PUSH_ORDER {
            if self.only.is_some_and(|o| o != t) {
                continue;
            }
            {
                let st = &self.types[t.index()];
                if !st.requested || st.pending.is_some() {
                    continue;
                }
            }
            if t.waits_for_clusters() && !self.clusters_settled() {
                continue;
            }
            if !self.has_work(t) {
                continue;
            }
            let (updates, removed, missing) = self.changes(t);
            self.nonce_seq += 1;
            let nonce = self.nonce_seq.to_string();
            let st = &mut self.types[t.index()];
            st.must_answer = false;
            for r in &updates {
                st.known.insert(r.name.clone(), r.version.clone());
            }
            for n in &removed {
                st.known.remove(n);
            }
            st.reported_missing.extend(missing);
            st.pending = Some(Pending {
                nonce: nonce.clone(),
                sent_at: now,
                updated: updates
                    .iter()
                    .map(|r| (r.name.clone(), r.version.clone()))
                    .collect(),
                removed: removed.clone(),
            });
            st.last_nonce = Some(nonce.clone());
            st.responses += 1;
            // Re-warming: updated clusters wait for fresh endpoints, updated listeners for routes.
            if let Some(w) = t.warms() {
                let deps: Vec<String> = updates.iter().flat_map(|r| r.warm_deps.clone()).collect();
                let ws = &mut self.types[w.index()];
                for d in deps {
                    if ws.known.remove(&d).is_some() {
                        ws.reported_missing.remove(&d);
                    }
                }
            }
            let resp = WireDeltaDiscoveryResponse {
                system_version_info: snap.generation().to_string(),
                resources: updates
                    .iter()
                    .map(|r| WireResource {
                        version: r.version.clone(),
                        name: r.name.clone(),
                        resource: Some(WireAny {
                            type_url: bytes::Bytes::from_static(t.as_str().as_bytes()),
                            value: r.body.clone(),
                        }),
                    })
                    .collect(),
                type_url: t.as_str().to_string(),
                nonce,
                removed_resources: removed,
                control_plane: Some(WireControlPlane {
                    identifier: self.control_plane.clone(),
                }),
            };
            return Some((t, resp));
        }
        None
    }

    /// True once something was sent and nothing is outstanding (the initial push is done).
    pub fn idle(&self) -> bool {
        self.types.iter().any(|t| t.responses > 0) && self.types.iter().all(|t| t.pending.is_none())
    }

    pub fn status(&self) -> Vec<TypeStatus> {
        TypeUrl::PUSH_ORDER
            .into_iter()
            .filter(|t| self.only.is_none_or(|o| o == *t))
            .filter(|t| self.types[t.index()].requested)
            .map(|t| {
                let st = &self.types[t.index()];
                let sent_version = digest_versions(st.known.iter());
                let acked_version = digest_versions(st.acked.iter());
                let status = if st.responses == 0 {
                    SyncStatus::NotSent
                } else if st.pending.is_none()
                    && st
                        .last_nack
                        .as_ref()
                        .is_some_and(|n| Some(&n.version) == st.last_nonce.as_ref())
                {
                    SyncStatus::Nacked
                } else if st.pending.is_some() || self.has_work(t) {
                    SyncStatus::Stale
                } else {
                    SyncStatus::Synced
                };
                TypeStatus {
                    type_url: t.as_str(),
                    short: t.short(),
                    subscribed: st.sub.listed(),
                    wildcard: st.sub.wildcard,
                    version_sent: Some(sent_version),
                    version_acked: Some(acked_version),
                    nonce_sent: st.last_nonce.clone(),
                    status,
                    responses_sent: st.responses,
                    nacks: st.nacks,
                    last_nack: st.last_nack.clone(),
                }
            })
            .collect()
    }
}

/// A short digest of a name → version map, so delta streams show comparable versions in syncz.
fn digest_versions<'a>(it: impl Iterator<Item = (&'a String, &'a String)>) -> String {
    let sorted: BTreeMap<&String, &String> = it.collect();
    super::cache::digest_pairs(sorted.into_iter().map(|(n, v)| (n.as_str(), v.as_str())))
}
