//! Sans-IO state machine for one state-of-the-world ADS (or SDS) stream.
//!
//! Feed it requests (`handle_request`) and snapshots (`set_snapshot`); ask it what to send next
//! (`next_response`). It never does I/O and takes time as an argument, so every protocol rule is unit
//! tested without a network. Rules (see shared/docs/xds-protocol.md):
//! - NACK = `error_detail` on the outstanding nonce; it is recorded and nothing is re-sent until the
//!   content changes.
//! - A stale nonce never counts as ACK/NACK, but its subscription changes are applied.
//! - At most one un-ACKed response per type; newer snapshots coalesce while waiting.
//! - Newly named resources are answered even if unchanged; names that do not exist yet are remembered.
//! - CDS/LDS responses are the full set; EDS/RDS/SDS may be partial.
//! - After a CDS (LDS) response, EDS (RDS) is re-sent even if unchanged, because Envoy re-warms.
//! - Make-before-break: LDS/RDS wait until clusters and endpoints settled; clusters that disappeared are
//!   kept until the proxy ACKed listeners and routes that no longer need them.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;

use super::cache::{Content, Resource, ResourceSnapshot};
use super::resources::TypeUrl;
use super::stream::{
    Desired, NackRecord, NodeInfo, RequestKind, StreamError, Subscription, SyncStatus, TypeStatus,
};
use super::wire::{WireAny, WireControlPlane, WireDiscoveryResponse};

#[derive(Debug)]
struct Sent {
    version: String,
    nonce: String,
    /// Everything the proxy holds from us once it applies this response (for partial types the
    /// unchanged resources sent earlier too). Usually the snapshot's own map, shared.
    content: Arc<Content>,
}

#[derive(Debug, Default)]
struct TypeState {
    requested: bool,
    sub: Subscription,
    /// Last response sent (outstanding or answered). Not re-sent while content is unchanged.
    last_sent: Option<Sent>,
    /// Nonce and send time of the outstanding (un-ACKed) response.
    pending: Option<(String, Instant)>,
    /// What the proxy runs: the content of the last ACKed response.
    acked: Arc<Content>,
    acked_version: Option<String>,
    /// Respond with the full set even if the content did not change (new names, first request,
    /// re-warming).
    force: bool,
    last_nack: Option<NackRecord>,
    responses: u64,
    nacks: u64,
    /// What the subscription selects from the current snapshot (before make-before-break
    /// retention).
    desired: Desired,
}

/// One SotW stream.
#[derive(Debug)]
pub struct SotwStream {
    /// `Some(Secret)` for a dedicated SDS stream; `None` for ADS.
    only: Option<TypeUrl>,
    node: Option<NodeInfo>,
    types: [TypeState; 5],
    snapshot: Option<Arc<ResourceSnapshot>>,
    nonce_seq: u64,
    control_plane: String,
}

impl SotwStream {
    pub fn new_ads(control_plane: &str) -> Self {
        Self::new(None, control_plane)
    }

    pub fn new_sds(control_plane: &str) -> Self {
        Self::new(Some(TypeUrl::Secret), control_plane)
    }

    fn new(only: Option<TypeUrl>, control_plane: &str) -> Self {
        SotwStream {
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

    /// Brings `desired` of type `t` up to date with the snapshot and the subscription.
    fn refresh(&mut self, t: TypeUrl) {
        let Some(snap) = &self.snapshot else {
            return;
        };
        let st = &mut self.types[t.index()];
        if st.requested {
            st.desired.refresh(snap, t, &st.sub);
        }
    }

    /// Applies one request. Returns the type it was for and what it meant.
    pub fn handle_request(
        &mut self,
        req: &DiscoveryRequest,
        now: Instant,
    ) -> Result<(TypeUrl, RequestKind), StreamError> {
        remember_node(&mut self.node, req.node.as_ref())?;
        super::stream::check_names(req.resource_names.len(), req.resource_names.iter())?;
        let t = resolve_type(&req.type_url, self.only)?;
        let st = &mut self.types[t.index()];
        let first = !st.requested;
        st.requested = true;
        let added = st.sub.replace(t, &req.resource_names);
        if first || added {
            st.force = true;
        }
        if first {
            st.desired.invalidate();
        }
        self.refresh(t);
        let st = &mut self.types[t.index()];

        if req.response_nonce.is_empty() {
            return Ok((t, RequestKind::Initial));
        }
        let Some((nonce, sent_at)) = st.pending.clone() else {
            return Ok((t, RequestKind::Stale));
        };
        if nonce != req.response_nonce {
            return Ok((t, RequestKind::Stale));
        }
        st.pending = None;
        let latency = now.saturating_duration_since(sent_at);
        let Some(sent) = st.last_sent.as_ref() else {
            return Ok((t, RequestKind::Stale));
        };
        if let Some(err) = &req.error_detail {
            st.nacks += 1;
            let message = super::peertext::printable(&err.message, super::peertext::MAX_NACK_TEXT);
            st.last_nack = Some(NackRecord {
                version: sent.version.clone(),
                message: message.clone(),
                code: err.code,
                at: SystemTime::now(),
            });
            // Keep `last_sent` so the rejected content is not re-sent; `acked` stays what the proxy runs.
            return Ok((t, RequestKind::Nack { latency, message }));
        }
        // For partial types the sent content already includes what was sent before and is
        // still desired, so it is exactly what the proxy now runs.
        st.acked = sent.content.clone();
        st.acked_version = Some(sent.version.clone());
        Ok((t, RequestKind::Ack { latency }))
    }

    /// The resources this stream should be running for type `t` now.
    fn desired(&self, t: TypeUrl) -> Arc<Content> {
        let st = &self.types[t.index()];
        // Make-before-break: a cluster that disappeared stays while the proxy still runs listeners or
        // routes that may point at it.
        if t == TypeUrl::Cluster
            && !Arc::ptr_eq(&st.acked, &st.desired.content)
            && !self.routing_converged()
            && let Some(snap) = &self.snapshot
        {
            let kept: Vec<(&String, &Arc<Resource>)> = st
                .acked
                .iter()
                .filter(|(name, _)| {
                    !st.desired.content.contains_key(*name)
                        && !snap.resources(t).contains_key(*name)
                        && st.sub.wants(name)
                })
                .collect();
            if !kept.is_empty() {
                let mut out = (*st.desired.content).clone();
                for (name, r) in kept {
                    out.insert(name.clone(), r.clone());
                }
                return Arc::new(out);
            }
        }
        st.desired.content.clone()
    }

    /// True when the proxy has ACKed the current listeners and routes.
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
            if Arc::ptr_eq(desired, &st.acked) {
                return true;
            }
            let covered = desired.iter().all(|(n, r)| {
                st.acked
                    .get(n)
                    .is_some_and(|a| Arc::ptr_eq(a, r) || a.version == r.version)
            });
            if t.is_full_state() {
                covered && st.acked.len() == desired.len()
            } else {
                covered
            }
        })
    }

    fn is_dirty(&self, t: TypeUrl, desired: &Arc<Content>) -> bool {
        let st = &self.types[t.index()];
        if st.force {
            return true;
        }
        let Some(sent) = &st.last_sent else {
            return true;
        };
        if Arc::ptr_eq(&sent.content, desired) {
            return false;
        }
        if t.is_full_state() {
            !same_content(&sent.content, desired)
        } else {
            desired.iter().any(|(n, r)| {
                sent.content
                    .get(n)
                    .is_none_or(|s| !Arc::ptr_eq(s, r) && s.version != r.version)
            })
        }
    }

    /// Clusters and endpoints have nothing outstanding and nothing left to send.
    fn clusters_settled(&self) -> bool {
        [TypeUrl::Cluster, TypeUrl::Endpoint].into_iter().all(|t| {
            let st = &self.types[t.index()];
            !st.requested || (st.pending.is_none() && !self.is_dirty(t, &self.desired(t)))
        })
    }

    /// The next response to send, in make-before-break order, or `None` if nothing is due.
    pub fn next_response(&mut self, now: Instant) -> Option<(TypeUrl, WireDiscoveryResponse)> {
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
            let desired = self.desired(t);
            if !self.is_dirty(t, &desired) {
                continue;
            }
            let st = &mut self.types[t.index()];
            let full = std::mem::take(&mut st.force) || t.is_full_state();
            if !t.is_full_state() && desired.is_empty() {
                // Nothing to say: partial types cannot express removal, and named resources that do
                // not exist yet are sent when they appear.
                if let Some(s) = st.last_sent.as_mut() {
                    s.content = desired;
                }
                continue;
            }
            // EDS, RDS and SDS may be partial (as istiod sends incremental EDS): after the first
            // full response, only what the proxy does not run yet. A subscription that added names,
            // or a re-warm after CDS/LDS, gets the full set.
            let body: Vec<&Arc<Resource>> = if full || st.last_sent.is_none() {
                desired.values().collect()
            } else {
                desired
                    .iter()
                    .filter(|(n, r)| {
                        st.acked
                            .get(*n)
                            .is_none_or(|a| !Arc::ptr_eq(a, r) && a.version != r.version)
                    })
                    .map(|(_, r)| r)
                    .collect()
            };
            if body.is_empty() && !full {
                // Back to what the proxy already runs (e.g. after a NACKed change was reverted).
                let version = st.acked_version.clone().unwrap_or_default();
                st.last_sent = Some(Sent {
                    version,
                    nonce: String::new(),
                    content: desired,
                });
                continue;
            }
            self.nonce_seq += 1;
            let nonce = self.nonce_seq.to_string();
            let version = if Arc::ptr_eq(&desired, snap.shared(t)) {
                snap.type_version(t).to_string()
            } else {
                content_version(&desired)
            };
            let resp = WireDiscoveryResponse {
                version_info: version.clone(),
                resources: body
                    .into_iter()
                    .map(|r| WireAny {
                        type_url: bytes::Bytes::from_static(t.as_str().as_bytes()),
                        value: r.body.clone(),
                    })
                    .collect(),
                type_url: t.as_str().to_string(),
                nonce: nonce.clone(),
                control_plane: Some(WireControlPlane {
                    identifier: self.control_plane.clone(),
                }),
            };
            st.pending = Some((nonce.clone(), now));
            st.responses += 1;
            st.last_sent = Some(Sent {
                version,
                nonce,
                content: desired,
            });
            if let Some(w) = t.warms() {
                let ws = &mut self.types[w.index()];
                if ws.requested {
                    ws.force = true;
                }
            }
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
                let status = match (&st.last_sent, &st.last_nack) {
                    (None, _) => SyncStatus::NotSent,
                    (Some(s), Some(n)) if n.version == s.version && st.pending.is_none() => {
                        SyncStatus::Nacked
                    }
                    _ if st.pending.is_some() || self.is_dirty(t, &self.desired(t)) => {
                        SyncStatus::Stale
                    }
                    _ => SyncStatus::Synced,
                };
                TypeStatus {
                    type_url: t.as_str(),
                    short: t.short(),
                    subscribed: st.sub.listed(),
                    wildcard: st.sub.wildcard,
                    version_sent: st.last_sent.as_ref().map(|s| s.version.clone()),
                    version_acked: st.acked_version.clone(),
                    nonce_sent: st
                        .last_sent
                        .as_ref()
                        .map(|s| s.nonce.clone())
                        .filter(|n| !n.is_empty()),
                    status,
                    responses_sent: st.responses,
                    nacks: st.nacks,
                    last_nack: st.last_nack.clone(),
                }
            })
            .collect()
    }
}

/// The first request of a stream must carry the node; later ones may omit it
/// (`set_node_on_first_message_only`).
pub(crate) fn remember_node(
    node: &mut Option<NodeInfo>,
    from_request: Option<&envoy_types::pb::envoy::config::core::v3::Node>,
) -> Result<(), StreamError> {
    if node.is_none() {
        let n = from_request.ok_or(StreamError::MissingNode)?;
        if n.id.is_empty() {
            return Err(StreamError::EmptyNodeId);
        }
        if !super::peertext::valid_name(&n.id) || !super::peertext::valid_name(&n.cluster) {
            return Err(StreamError::BadNodeId);
        }
        *node = Some(NodeInfo::from_node(n));
    }
    Ok(())
}

pub(crate) fn resolve_type(type_url: &str, only: Option<TypeUrl>) -> Result<TypeUrl, StreamError> {
    if type_url.is_empty() {
        return only.ok_or(StreamError::MissingTypeUrl);
    }
    let shown = || super::peertext::printable(type_url, 128);
    let t = TypeUrl::parse(type_url).ok_or_else(|| StreamError::UnknownTypeUrl(shown()))?;
    match only {
        Some(o) if o != t => Err(StreamError::WrongTypeUrl {
            got: shown(),
            expected: o,
        }),
        _ => Ok(t),
    }
}

fn same_content(a: &Content, b: &Content) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b.iter())
            .all(|((an, ar), (bn, br))| an == bn && ar.version == br.version)
}

fn content_version(c: &Content) -> String {
    super::cache::digest_pairs(c.iter().map(|(n, r)| (n.as_str(), r.version.as_str())))
}

#[cfg(test)]
mod sharing_tests {
    use super::*;
    use crate::xds::testutil::{Fx, first_req, req};

    /// A synced stream holds pointers to the snapshot's maps, not copies: what it sent, what was
    /// ACKed and what it wants are the same allocation (memory per stream stays flat in the mesh size).
    #[test]
    fn a_synced_stream_shares_the_snapshot_maps() {
        let snap = Fx::new(&["a", "b", "c"], "a").build();
        let mut s = SotwStream::new_ads("winmesh");
        s.set_snapshot(snap.clone());
        s.handle_request(&first_req(TypeUrl::Cluster, &[]), Instant::now())
            .unwrap();
        let (_, cds) = s.next_response(Instant::now()).unwrap();
        s.handle_request(
            &req(TypeUrl::Endpoint, &["a", "b", "c"], ""),
            Instant::now(),
        )
        .unwrap();
        s.handle_request(&req(TypeUrl::Cluster, &[], &cds.nonce), Instant::now())
            .unwrap();
        let (_, eds) = s.next_response(Instant::now()).unwrap();
        s.handle_request(
            &req(TypeUrl::Endpoint, &["a", "b", "c"], &eds.nonce),
            Instant::now(),
        )
        .unwrap();
        for t in [TypeUrl::Cluster, TypeUrl::Endpoint] {
            let st = &s.types[t.index()];
            let sent = &st.last_sent.as_ref().unwrap().content;
            assert!(Arc::ptr_eq(sent, snap.shared(t)), "{t} sent is shared");
            assert!(
                Arc::ptr_eq(&st.acked, snap.shared(t)),
                "{t} acked is shared"
            );
            assert!(
                Arc::ptr_eq(&st.desired.content, snap.shared(t)),
                "{t} desired is shared"
            );
        }
    }
}
