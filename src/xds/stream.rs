//! Pieces shared by the SotW and delta stream state machines: the node a stream belongs to, what a
//! request did (ACK, NACK, stale, ...), NACK records, subscriptions with the legacy wildcard, and the
//! per-type status that `/debug/syncz` shows.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use envoy_types::pb::envoy::config::core::v3::Node;
use serde::Serialize;

use super::cache::{Content, ResourceSnapshot};
use super::resources::TypeUrl;

/// Which proxy a stream serves, taken from the first request.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct NodeInfo {
    pub id: String,
    pub cluster: String,
    /// Envoy version from `user_agent_build_version` (e.g. "1.40.0"), or empty.
    pub envoy_version: String,
}

impl NodeInfo {
    pub fn from_node(node: &Node) -> NodeInfo {
        use envoy_types::pb::envoy::config::core::v3::node::UserAgentVersionType;
        let envoy_version = match &node.user_agent_version_type {
            Some(UserAgentVersionType::UserAgentBuildVersion(b)) => b
                .version
                .as_ref()
                .map(|v| format!("{}.{}.{}", v.major_number, v.minor_number, v.patch))
                .unwrap_or_default(),
            Some(UserAgentVersionType::UserAgentVersion(v)) => super::peertext::printable(v, 64),
            None => String::new(),
        };
        NodeInfo {
            id: node.id.clone(),
            cluster: node.cluster.clone(),
            envoy_version,
        }
    }
}

/// Why a stream must be closed. Turned into a gRPC status in exactly one place (`server.rs`).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StreamError {
    #[error("the first request on a stream must carry the node")]
    MissingNode,
    #[error("the first request's node has an empty id")]
    EmptyNodeId,
    #[error("the node id or cluster is longer than {max} bytes or has control characters", max = super::peertext::MAX_NODE_ID)]
    BadNodeId,
    #[error("subscription too large: more than {max} names, or a name longer than {len} bytes", max = MAX_SUBSCRIBED, len = MAX_NAME)]
    TooManyNames,
    #[error("type_url is required on an aggregated stream")]
    MissingTypeUrl,
    #[error("unknown or unsupported type_url {0:?}")]
    UnknownTypeUrl(String),
    #[error("type_url {got:?} is not served on this stream (expected {expected})")]
    WrongTypeUrl { got: String, expected: TypeUrl },
}

/// Most resource names one stream may subscribe to per type (the largest mesh has far fewer).
pub const MAX_SUBSCRIBED: usize = 100_000;
/// Longest resource name accepted in a subscription.
pub const MAX_NAME: usize = 1024;

/// Refuses name lists beyond [`MAX_SUBSCRIBED`] names or with a name beyond [`MAX_NAME`] bytes.
pub fn check_names<'a>(
    count: usize,
    mut names: impl Iterator<Item = &'a String>,
) -> Result<(), StreamError> {
    if count > MAX_SUBSCRIBED || names.any(|n| n.len() > MAX_NAME) {
        return Err(StreamError::TooManyNames);
    }
    Ok(())
}

/// What a request meant, for metrics and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestKind {
    /// No nonce: the first request for a type (or after a reconnect).
    Initial,
    /// Nonce of the outstanding response and no error: the proxy applied it.
    Ack { latency: Duration },
    /// Nonce of the outstanding response with `error_detail`: the proxy rejected it.
    Nack { latency: Duration, message: String },
    /// A nonce that is not the outstanding one. Subscription changes in it were still applied.
    Stale,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct NackRecord {
    /// The version Envoy rejected.
    pub version: String,
    /// Envoy's own error text from `error_detail.message`.
    pub message: String,
    pub code: i32,
    #[serde(with = "humantime_serde_compat")]
    pub at: SystemTime,
}

pub(crate) mod humantime_serde_compat {
    use serde::Serializer;
    use std::time::SystemTime;
    pub fn serialize<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_rfc3339_millis(*t).to_string())
    }
}

/// istioctl proxy-status vocabulary.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum SyncStatus {
    Synced,
    Stale,
    NotSent,
    Nacked,
}

impl SyncStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            SyncStatus::Synced => "SYNCED",
            SyncStatus::Stale => "STALE",
            SyncStatus::NotSent => "NOT SENT",
            SyncStatus::Nacked => "NACKED",
        }
    }
}

/// Per-type view of a stream for `/debug/syncz`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct TypeStatus {
    #[serde(rename = "type")]
    pub type_url: &'static str,
    pub short: &'static str,
    pub subscribed: SubscribedNames,
    pub wildcard: bool,
    pub version_sent: Option<String>,
    pub version_acked: Option<String>,
    pub nonce_sent: Option<String>,
    pub status: SyncStatus,
    pub responses_sent: u64,
    pub nacks: u64,
    pub last_nack: Option<NackRecord>,
}

/// The names a stream subscribed to, as `/debug/syncz` lists them (`"*"` first for a wildcard).
/// Shares the subscription's set: recording a stream's status after every request copies nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscribedNames {
    pub wildcard: bool,
    pub names: Arc<BTreeSet<String>>,
}

impl SubscribedNames {
    pub fn contains(&self, name: &str) -> bool {
        (self.wildcard && name == "*") || self.names.contains(name)
    }

    pub fn len(&self) -> usize {
        self.names.len() + usize::from(self.wildcard)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Serialize for SubscribedNames {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        let mut seq = s.serialize_seq(Some(self.len()))?;
        if self.wildcard {
            seq.serialize_element("*")?;
        }
        for n in self.names.iter() {
            seq.serialize_element(n)?;
        }
        seq.end()
    }
}

/// A resource subscription with xDS wildcard rules.
#[derive(Debug, Default, Clone)]
pub struct Subscription {
    pub wildcard: bool,
    /// Explicitly named resources. Shared with status records; copied only when it changes.
    pub names: Arc<BTreeSet<String>>,
    /// Whether the client has ever named a resource explicitly (ends the legacy wildcard).
    named_ever: bool,
    /// Bumped on every change, so a stream recomputes what it wants only when this moves.
    pub epoch: u64,
}

impl Subscription {
    /// SotW: replace the subscription with the request's names. Returns true if anything was added
    /// (newly named resources, or wildcard turned on), which must be answered even if unchanged.
    /// An unchanged list (every ACK repeats it) costs lookups only, no copy.
    pub fn replace(&mut self, t: TypeUrl, names: &[String]) -> bool {
        let star = names.iter().any(|n| n == "*");
        let wildcard = if t.has_legacy_wildcard() && names.is_empty() && !self.named_ever {
            true
        } else {
            star
        };
        if !names.is_empty() {
            self.named_ever = true;
        }
        let count = names.iter().filter(|n| *n != "*").count();
        let same_names = count == self.names.len()
            && names
                .iter()
                .filter(|n| *n != "*")
                .all(|n| self.names.contains(n));
        let added = (wildcard && !self.wildcard)
            || (!same_names && names.iter().any(|n| n != "*" && !self.names.contains(n)));
        if !same_names {
            self.names = Arc::new(names.iter().filter(|n| *n != "*").cloned().collect());
        }
        if !same_names || wildcard != self.wildcard {
            self.epoch += 1;
        }
        self.wildcard = wildcard;
        added
    }

    /// Delta: apply subscribe/unsubscribe. `first` is true for the first request of this type on the
    /// stream, where an empty subscribe list means legacy wildcard for LDS/CDS.
    pub fn apply_delta(
        &mut self,
        t: TypeUrl,
        first: bool,
        subscribe: &[String],
        unsubscribe: &[String],
    ) {
        let before = (self.wildcard, self.names.len());
        let mut changed = false;
        if first && subscribe.is_empty() && t.has_legacy_wildcard() {
            self.wildcard = true;
        }
        for n in subscribe {
            if n == "*" {
                self.wildcard = true;
            } else if !self.names.contains(n) {
                Arc::make_mut(&mut self.names).insert(n.clone());
                changed = true;
            }
            self.named_ever = true;
        }
        for n in unsubscribe {
            if n == "*" {
                self.wildcard = false;
            } else if self.names.contains(n) {
                Arc::make_mut(&mut self.names).remove(n);
                changed = true;
            }
        }
        if changed || before != (self.wildcard, self.names.len()) {
            self.epoch += 1;
        }
    }

    pub fn wants(&self, name: &str) -> bool {
        self.wildcard || self.names.contains(name)
    }

    pub fn listed(&self) -> SubscribedNames {
        SubscribedNames {
            wildcard: self.wildcard,
            names: self.names.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn legacy_wildcard_until_first_name() {
        let mut s = Subscription::default();
        assert!(s.replace(TypeUrl::Cluster, &[]));
        assert!(s.wildcard);
        // ACKs with an empty list keep the wildcard.
        assert!(!s.replace(TypeUrl::Cluster, &[]));
        assert!(s.wildcard);
        // Naming something ends legacy wildcard mode...
        assert!(s.replace(TypeUrl::Cluster, &names(&["a"])));
        assert!(!s.wildcard);
        // ...and from then on an empty list means "nothing".
        s.replace(TypeUrl::Cluster, &[]);
        assert!(!s.wildcard);
        assert!(s.names.is_empty());
        // Explicit "*" is still a wildcard, alongside names.
        assert!(s.replace(TypeUrl::Cluster, &names(&["*", "b"])));
        assert!(s.wildcard && s.names.contains("b"));
    }

    #[test]
    fn no_legacy_wildcard_for_named_types() {
        let mut s = Subscription::default();
        assert!(!s.replace(TypeUrl::Endpoint, &[]));
        assert!(!s.wildcard);
        let mut s = Subscription::default();
        s.apply_delta(TypeUrl::Secret, true, &[], &[]);
        assert!(!s.wildcard);
    }

    #[test]
    fn replace_reports_only_additions() {
        let mut s = Subscription::default();
        assert!(s.replace(TypeUrl::Endpoint, &names(&["a", "b"])));
        assert!(!s.replace(TypeUrl::Endpoint, &names(&["a"])));
        assert!(s.replace(TypeUrl::Endpoint, &names(&["a", "c"])));
    }

    #[test]
    fn delta_wildcard_and_unsubscribe() {
        let mut s = Subscription::default();
        s.apply_delta(TypeUrl::Listener, true, &[], &[]);
        assert!(s.wildcard);
        s.apply_delta(TypeUrl::Listener, false, &names(&["x"]), &names(&["*"]));
        assert!(!s.wildcard && s.wants("x") && !s.wants("y"));
        s.apply_delta(TypeUrl::Listener, false, &[], &names(&["x"]));
        assert!(!s.wants("x"));
        // Non-first empty subscribe never turns wildcard on.
        s.apply_delta(TypeUrl::Listener, false, &[], &[]);
        assert!(!s.wildcard);
    }
}

/// One type's wanted resources for one stream. Rebuilt only when the snapshot or the subscription
/// changed, and usually the snapshot's own map, so both stream machines keep a pointer, not a copy.
#[derive(Debug, Default)]
pub(crate) struct Desired {
    pub content: Arc<Content>,
    /// (snapshot generation, subscription epoch) `content` was computed for.
    built_for: Option<(u64, u64)>,
    /// Name-set id of a snapshot whose names the subscription lists exactly (see
    /// `ResourceSnapshot::name_set`): the next snapshot with that id is covered without lookups.
    covers: Option<(u64, u64)>,
}

impl Desired {
    pub fn refresh(&mut self, snap: &ResourceSnapshot, t: TypeUrl, sub: &Subscription) {
        let key = (snap.generation(), sub.epoch);
        // Generation 0 is a snapshot that was never published (tests build them): not a stable key.
        if self.built_for == Some(key) && key.0 != 0 {
            return;
        }
        self.built_for = Some(key);
        self.content = select(snap, t, sub, &mut self.covers);
    }

    /// Forces the next `refresh` to recompute (a type's first request).
    pub fn invalidate(&mut self) {
        self.built_for = None;
    }

    /// True when the subscription names exactly the snapshot's resources of type `t`.
    pub fn covers_all(&self, snap: &ResourceSnapshot, t: TypeUrl, sub: &Subscription) -> bool {
        self.covers == Some((snap.name_set(t), sub.epoch))
    }
}

/// What `sub` selects of type `t` in `snap`. Shares the snapshot's map whenever the selection is
/// all of it (a wildcard, or names that list exactly the snapshot's names), which `covers`
/// remembers per name set so the common case costs no lookups at all.
fn select(
    snap: &ResourceSnapshot,
    t: TypeUrl,
    sub: &Subscription,
    covers: &mut Option<(u64, u64)>,
) -> Arc<Content> {
    let all = snap.shared(t);
    if sub.wildcard {
        return all.clone();
    }
    if sub.names.is_empty() {
        return Arc::default();
    }
    let key = (snap.name_set(t), sub.epoch);
    if *covers == Some(key) {
        return all.clone();
    }
    if sub.names.len() == all.len() && all.keys().all(|k| sub.names.contains(k)) {
        *covers = Some(key);
        return all.clone();
    }
    let mut out = Content::new();
    for n in sub.names.iter() {
        if let Some(r) = all.get(n) {
            out.insert(n.clone(), r.clone());
        }
    }
    Arc::new(out)
}
