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

use super::cache::{Content, Resource, ResourceSnapshot};
use super::resources::TypeUrl;
use super::sotw::{remember_node, resolve_type};
use super::stream::{
    Desired, NackRecord, NodeInfo, RequestKind, StreamError, Subscription, SyncStatus, TypeStatus,
};
use super::wire::{WireAny, WireControlPlane, WireDeltaDiscoveryResponse, WireResource};

/// Name → version a client holds (or has ACKed): a shared map of resources plus a small overlay of
/// names whose state differs from it. After a complete response the base is the very map the
/// stream wanted (usually the snapshot's own), so a stream's bookkeeping is a pointer.
#[derive(Debug, Clone, Default)]
struct Held {
    base: Arc<Content>,
    /// `Some(version)`: held at that version; `None`: not held although `base` has it.
    overlay: BTreeMap<String, Option<String>>,
}

impl Held {
    fn claimed(versions: &HashMap<String, String>) -> Held {
        Held {
            base: Arc::default(),
            overlay: versions
                .iter()
                .map(|(n, v)| (n.clone(), Some(v.clone())))
                .collect(),
        }
    }

    fn version(&self, name: &str) -> Option<&str> {
        match self.overlay.get(name) {
            Some(o) => o.as_deref(),
            None => self.base.get(name).map(|r| r.version.as_str()),
        }
    }

    /// Whether this exact content of `r` is held.
    fn holds(&self, name: &str, r: &Arc<Resource>) -> bool {
        match self.overlay.get(name) {
            Some(o) => o.as_deref() == Some(r.version.as_str()),
            None => self
                .base
                .get(name)
                .is_some_and(|b| Arc::ptr_eq(b, r) || b.version == r.version),
        }
    }

    fn contains(&self, name: &str) -> bool {
        self.version(name).is_some()
    }

    /// Marks `name` as not held; returns whether it was.
    fn forget(&mut self, name: &str) -> bool {
        if !self.contains(name) {
            return false;
        }
        if self.base.contains_key(name) {
            self.overlay.insert(name.to_string(), None);
        } else {
            self.overlay.remove(name);
        }
        true
    }

    fn set(&mut self, name: &str, version: &str) {
        self.overlay
            .insert(name.to_string(), Some(version.to_string()));
    }

    /// Held names in order.
    fn names(&self) -> impl Iterator<Item = &str> {
        let base = self
            .base
            .keys()
            .filter(|k| !self.overlay.contains_key(*k))
            .map(|k| k.as_str());
        let extra = self
            .overlay
            .iter()
            .filter(|(_, v)| v.is_some())
            .map(|(k, _)| k.as_str());
        base.chain(extra)
    }

    /// True if exactly `m` is held (nothing more, nothing less, same versions).
    fn is(&self, m: &Arc<Content>) -> bool {
        self.overlay.is_empty() && Arc::ptr_eq(&self.base, m)
    }

    fn digest(&self) -> String {
        if self.overlay.is_empty() {
            return super::cache::digest_pairs(
                self.base
                    .iter()
                    .map(|(n, r)| (n.as_str(), r.version.as_str())),
            );
        }
        let sorted: BTreeMap<&str, &str> = self
            .names()
            .filter_map(|n| self.version(n).map(|v| (n, v)))
            .collect();
        super::cache::digest_pairs(sorted.into_iter())
    }
}

#[derive(Debug)]
struct Pending {
    nonce: String,
    sent_at: Instant,
    updated: Vec<(String, String)>,
    removed: Vec<String>,
    /// What the client holds once it applies this response.
    after: Held,
    /// `acked` equalled what the client held when this was sent (no NACK in between), so an ACK
    /// makes `acked` exactly `after`.
    in_step: bool,
    version: String,
}

#[derive(Debug, Default)]
struct TypeState {
    requested: bool,
    sub: Subscription,
    /// What the client holds, updated when a response is sent. A NACKed update stays here, so it is
    /// not re-sent until its content changes.
    known: Held,
    /// Subscribed names already reported as absent.
    reported_missing: BTreeSet<String>,
    /// A subscribe arrived: answer even if there is nothing new.
    must_answer: bool,
    pending: Option<Pending>,
    /// What the proxy has ACKed.
    acked: Held,
    /// `acked` equals `known` as of the last send (false after a NACK until an ACK catches up).
    in_step: bool,
    sent_version: Option<String>,
    acked_version: Option<String>,
    last_nonce: Option<String>,
    last_nack: Option<NackRecord>,
    responses: u64,
    nacks: u64,
    /// What the subscription selects from the snapshot.
    desired: Desired,
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
        for t in TypeUrl::PUSH_ORDER {
            self.refresh(t);
        }
    }

    fn refresh(&mut self, t: TypeUrl) {
        let Some(snap) = &self.snapshot else {
            return;
        };
        let st = &mut self.types[t.index()];
        if st.requested {
            st.desired.refresh(snap, t, &st.sub);
        }
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
            st.known = Held::claimed(&req.initial_resource_versions);
            st.acked = st.known.clone();
            st.in_step = true;
            st.desired.invalidate();
            if !req.initial_resource_versions.is_empty() {
                let v = st.known.digest();
                st.sent_version = Some(v.clone());
                st.acked_version = Some(v);
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
                st.known.forget(n);
            }
            st.reported_missing.remove(n);
        }
        for n in &req.resource_names_unsubscribe {
            if n != "*" && !st.sub.wants(n) {
                st.known.forget(n);
                st.reported_missing.remove(n);
            }
        }
        if first || !req.resource_names_subscribe.is_empty() {
            st.must_answer = true;
        }
        self.refresh(t);
        let st = &mut self.types[t.index()];

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
            st.in_step = false;
            let message = super::peertext::printable(&err.message, super::peertext::MAX_NACK_TEXT);
            st.last_nack = Some(NackRecord {
                version: p.nonce.clone(),
                message: message.clone(),
                code: err.code,
                at: SystemTime::now(),
            });
            return Ok((t, RequestKind::Nack { latency, message }));
        }
        if p.in_step {
            st.acked = p.after;
            st.acked_version = Some(p.version);
        } else {
            // After a NACK the proxy runs less than we sent: apply just this response.
            for (n, v) in &p.updated {
                st.acked.set(n, v);
            }
            for n in &p.removed {
                st.acked.forget(n);
            }
            if same_held(&st.acked, &p.after) {
                st.acked = p.after;
                st.in_step = true;
            }
            st.acked_version = Some(st.acked.digest());
        }
        Ok((t, RequestKind::Ack { latency }))
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
            let desired = &st.desired.content;
            if st.acked.is(desired) {
                return true;
            }
            let covered = desired.iter().all(|(n, r)| st.acked.holds(n, r));
            if t.is_full_state() {
                covered && st.acked.names().all(|k| desired.contains_key(k))
            } else {
                covered
            }
        })
    }

    /// Resources to update and names to remove for type `t` right now.
    fn changes(&self, t: TypeUrl) -> (Vec<Arc<Resource>>, Vec<String>, Vec<String>) {
        let st = &self.types[t.index()];
        let desired = &st.desired.content;
        let in_sync = st.known.is(desired);
        let updates: Vec<Arc<Resource>> = if in_sync {
            Vec::new()
        } else {
            desired
                .iter()
                .filter(|(n, r)| !st.known.holds(n, r))
                .map(|(_, r)| r.clone())
                .collect()
        };
        // Removing a cluster (or the endpoints of a cluster that is being kept) while listeners or routes
        // may still use it would fail requests: hold removals until routing converged.
        let hold_removals = in_sync
            || (matches!(t, TypeUrl::Cluster | TypeUrl::Endpoint) && !self.routing_converged());
        let mut removed: Vec<String> = if hold_removals {
            Vec::new()
        } else {
            st.known
                .names()
                .filter(|k| !desired.contains_key(*k))
                // A secret that is still subscribed is awaited, never reported removed (see below),
                // even when the client held it from before a restart.
                .filter(|k| t != TypeUrl::Secret || !st.sub.wants(k))
                .map(str::to_string)
                .collect()
        };
        removed.sort();
        // Subscribed names that do not exist: tell the client once, keep the subscription. Not for
        // secrets: "does not exist" lets Envoy finish warming a listener or cluster without its
        // certificate, whereas an unanswered secret keeps it waiting (`initial_fetch_timeout: 0s`)
        // until the certificate is issued, as istio-agent's SDS server does.
        let all_exist = self
            .snapshot
            .as_ref()
            .is_some_and(|s| st.desired.covers_all(s, t, &st.sub));
        if t == TypeUrl::Secret || all_exist {
            return (updates, removed, Vec::new());
        }
        let missing: Vec<String> = st
            .sub
            .names
            .iter()
            .filter(|n| {
                !desired.contains_key(*n)
                    && !st.known.contains(n)
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
            // What the client holds after this response: everything desired, plus what it keeps
            // because its removal is held back (or it is an awaited secret).
            let mut after = Held {
                base: st.desired.content.clone(),
                overlay: BTreeMap::new(),
            };
            let gone: BTreeSet<&str> = removed.iter().map(String::as_str).collect();
            for n in st.known.names() {
                if !st.desired.content.contains_key(n)
                    && !gone.contains(n)
                    && let Some(v) = st.known.version(n)
                {
                    after.set(n, v);
                }
            }
            let version = if after.is(snap.shared(t)) {
                snap.type_version(t).to_string()
            } else {
                after.digest()
            };
            st.known = after.clone();
            st.reported_missing.extend(missing);
            st.pending = Some(Pending {
                nonce: nonce.clone(),
                sent_at: now,
                updated: updates
                    .iter()
                    .map(|r| (r.name.clone(), r.version.clone()))
                    .collect(),
                removed: removed.clone(),
                after,
                in_step: st.in_step,
                version: version.clone(),
            });
            st.sent_version = Some(version);
            st.last_nonce = Some(nonce.clone());
            st.responses += 1;
            // Re-warming: updated clusters wait for fresh endpoints, updated listeners for routes.
            if let Some(w) = t.warms() {
                let deps: Vec<String> = updates.iter().flat_map(|r| r.warm_deps.clone()).collect();
                let ws = &mut self.types[w.index()];
                for d in deps {
                    if ws.known.forget(&d) {
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
                    version_sent: st.sent_version.clone(),
                    version_acked: st.acked_version.clone(),
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

/// Same names at the same versions.
fn same_held(a: &Held, b: &Held) -> bool {
    let pairs = |h: &Held| -> BTreeMap<String, String> {
        h.names()
            .filter_map(|n| h.version(n).map(|v| (n.to_string(), v.to_string())))
            .collect()
    };
    pairs(a) == pairs(b)
}

#[cfg(test)]
mod sharing_tests {
    use super::*;
    use crate::xds::testutil::{Fx, dreq, node};

    /// After a complete response, what the client holds and has ACKed is the snapshot's own map.
    #[test]
    fn a_synced_stream_shares_the_snapshot_maps() {
        let snap = Fx::new(&["a", "b"], "a").build();
        let mut s = DeltaStream::new_ads("winmesh");
        s.set_snapshot(snap.clone());
        let mut first = dreq(TypeUrl::Cluster, &[], &[], "");
        first.node = Some(node());
        s.handle_request(&first, Instant::now()).unwrap();
        let (_, r) = s.next_response(Instant::now()).unwrap();
        s.handle_request(&dreq(TypeUrl::Cluster, &[], &[], &r.nonce), Instant::now())
            .unwrap();
        let st = &s.types[TypeUrl::Cluster.index()];
        assert!(st.known.is(snap.shared(TypeUrl::Cluster)));
        assert!(st.acked.is(snap.shared(TypeUrl::Cluster)));
        assert_eq!(
            st.sent_version.as_deref(),
            Some(snap.type_version(TypeUrl::Cluster))
        );
    }
}
