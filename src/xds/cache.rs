//! Snapshot cache: one writer publishes immutable [`ResourceSnapshot`]s, any number of xDS streams read
//! them. Each resource is encoded once when the snapshot is built; streams share the encoded bytes.
//!
//! A snapshot targets every proxy (`publish`) or one node id (`publish_for_node`, which wins over the
//! global one for that node). Readers take a short read lock to clone an `Arc`; they are woken through a
//! `watch` channel carrying the cache generation.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use bytes::Bytes;
use dashmap::DashMap;
use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret;
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use super::resources::TypeUrl;

/// An Envoy resource message winmesh can serve.
pub trait XdsMessage: prost::Message + Sized {
    const TYPE: TypeUrl;
    fn resource_name(&self) -> &str;
    /// Names of resources of type `TYPE.warms()` that Envoy waits for after this resource changes.
    fn warm_dependencies(&self) -> Vec<String> {
        Vec::new()
    }
}

impl XdsMessage for Cluster {
    const TYPE: TypeUrl = TypeUrl::Cluster;
    fn resource_name(&self) -> &str {
        &self.name
    }
    fn warm_dependencies(&self) -> Vec<String> {
        use envoy_types::pb::envoy::config::cluster::v3::cluster::{
            ClusterDiscoveryType, DiscoveryType,
        };
        let is_eds = matches!(self.cluster_discovery_type,
            Some(ClusterDiscoveryType::Type(t)) if t == DiscoveryType::Eds as i32);
        if !is_eds {
            return Vec::new();
        }
        let service = self
            .eds_cluster_config
            .as_ref()
            .map(|c| c.service_name.as_str())
            .filter(|s| !s.is_empty())
            .unwrap_or(&self.name);
        vec![service.to_string()]
    }
}
impl XdsMessage for ClusterLoadAssignment {
    const TYPE: TypeUrl = TypeUrl::Endpoint;
    fn resource_name(&self) -> &str {
        &self.cluster_name
    }
}
impl XdsMessage for Listener {
    const TYPE: TypeUrl = TypeUrl::Listener;
    fn resource_name(&self) -> &str {
        &self.name
    }
    fn warm_dependencies(&self) -> Vec<String> {
        use envoy_types::pb::envoy::config::listener::v3::filter::ConfigType;
        use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
            HttpConnectionManager, http_connection_manager::RouteSpecifier,
        };
        use prost::{Message, Name};
        let hcm_url = HttpConnectionManager::type_url();
        let mut out = Vec::new();
        for chain in self
            .filter_chains
            .iter()
            .chain(self.default_filter_chain.iter())
        {
            for f in &chain.filters {
                if let Some(ConfigType::TypedConfig(any)) = &f.config_type
                    && any.type_url == hcm_url
                    && let Ok(hcm) = HttpConnectionManager::decode(any.value.as_slice())
                    && let Some(RouteSpecifier::Rds(rds)) = hcm.route_specifier
                    && !out.contains(&rds.route_config_name)
                {
                    out.push(rds.route_config_name);
                }
            }
        }
        out
    }
}
impl XdsMessage for RouteConfiguration {
    const TYPE: TypeUrl = TypeUrl::Route;
    fn resource_name(&self) -> &str {
        &self.name
    }
}
impl XdsMessage for Secret {
    const TYPE: TypeUrl = TypeUrl::Secret;
    fn resource_name(&self) -> &str {
        &self.name
    }
}

/// One encoded resource. Cheap to clone (`Arc` + `Bytes`). Its `Debug` never shows the payload
/// (secrets carry private keys).
pub struct Resource {
    pub type_url: TypeUrl,
    pub name: String,
    /// Content version: the first 16 hex digits of the SHA-256 of `body`. Stable across restarts, so a
    /// reconnecting delta client that already has this content is not sent it again.
    pub version: String,
    /// The serialized message, shared by every stream that sends it.
    pub body: Bytes,
    /// When this content first appeared in a published snapshot.
    pub last_updated: SystemTime,
    /// Resources Envoy re-fetches (warms) after this one changes: a cluster's EDS name, a listener's
    /// RDS route configuration names.
    pub warm_deps: Vec<String>,
}

impl std::fmt::Debug for Resource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resource")
            .field("type_url", &self.type_url)
            .field("name", &self.name)
            .field("version", &self.version)
            .field("bytes", &self.body.len())
            .finish()
    }
}

impl Resource {
    pub fn encode<M: XdsMessage>(msg: &M) -> Resource {
        let body = Bytes::from(msg.encode_to_vec());
        Resource {
            type_url: M::TYPE,
            name: msg.resource_name().to_string(),
            version: content_version(&body),
            body,
            last_updated: SystemTime::now(),
            warm_deps: msg.warm_dependencies(),
        }
    }
}

/// Short stable digest of (name, version) pairs, in the order given (callers pass sorted pairs).
pub(crate) fn digest_pairs<'a>(pairs: impl Iterator<Item = (&'a str, &'a str)>) -> String {
    let mut h = Sha256::new();
    for (name, version) in pairs {
        h.update(name.as_bytes());
        h.update([0]);
        h.update(version.as_bytes());
        h.update([0]);
    }
    h.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn content_version(body: &[u8]) -> String {
    let digest = Sha256::digest(body);
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SnapshotError {
    #[error("duplicate {type_url} resource name {name:?}")]
    Duplicate { type_url: TypeUrl, name: String },
    #[error("{type_url} resource with an empty name")]
    EmptyName { type_url: TypeUrl },
}

/// Builds a [`ResourceSnapshot`]. Rejects empty and duplicate names, so no response ever carries one
/// name twice.
#[derive(Default, Debug)]
pub struct SnapshotBuilder {
    types: [Content; 5],
}

impl SnapshotBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn add<M: XdsMessage>(&mut self, msg: &M) -> Result<&mut Self, SnapshotError> {
        self.add_resource(Resource::encode(msg))
    }

    pub fn add_resource(&mut self, r: Resource) -> Result<&mut Self, SnapshotError> {
        self.add_shared(Arc::new(r))
    }

    /// Adds an already encoded resource (shared with an earlier snapshot).
    pub fn add_shared(&mut self, r: Arc<Resource>) -> Result<&mut Self, SnapshotError> {
        if r.name.is_empty() {
            return Err(SnapshotError::EmptyName {
                type_url: r.type_url,
            });
        }
        let map = &mut self.types[r.type_url.index()];
        if map.contains_key(&r.name) {
            return Err(SnapshotError::Duplicate {
                type_url: r.type_url,
                name: r.name.clone(),
            });
        }
        map.insert(r.name.clone(), r);
        Ok(self)
    }

    /// Adds every message, skipping (and returning) the ones that are rejected, so one bad resource never
    /// blocks the rest.
    pub fn add_all<'a, M: XdsMessage + 'a>(
        &mut self,
        msgs: impl IntoIterator<Item = &'a M>,
    ) -> Vec<SnapshotError> {
        msgs.into_iter().filter_map(|m| self.add(m).err()).collect()
    }

    pub fn build(self) -> ResourceSnapshot {
        ResourceSnapshot::from_types(self.types)
    }
}

/// One type's resources by name. Shared (`Arc`) between a snapshot and every stream that sent or
/// holds exactly that set, so a stream's bookkeeping costs a pointer, not a copy.
pub type Content = BTreeMap<String, Arc<Resource>>;

/// An immutable set of resources of every type, as served to one or all proxies.
#[derive(Debug, Default)]
pub struct ResourceSnapshot {
    types: [Arc<Content>; 5],
    /// Per-type version used as SotW `version_info`: a hash over (name, version) pairs.
    type_versions: [String; 5],
    /// Per-type id of the *set of names*: equal ids mean equal name sets (a stream whose
    /// subscription covered every name of one snapshot covers the next one too).
    name_sets: [u64; 5],
    /// Cache generation that published this snapshot (0 before publishing).
    generation: u64,
}

static NAME_SET_IDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

impl ResourceSnapshot {
    fn from_types(types: [Content; 5]) -> Self {
        let type_versions = std::array::from_fn(|i| {
            digest_pairs(
                types[i]
                    .iter()
                    .map(|(n, r)| (n.as_str(), r.version.as_str())),
            )
        });
        ResourceSnapshot {
            types: types.map(Arc::new),
            type_versions,
            name_sets: std::array::from_fn(|_| NAME_SET_IDS.fetch_add(1, Ordering::Relaxed)),
            generation: 0,
        }
    }

    pub fn resources(&self, t: TypeUrl) -> &Content {
        &self.types[t.index()]
    }

    /// The same map, shareable.
    pub fn shared(&self, t: TypeUrl) -> &Arc<Content> {
        &self.types[t.index()]
    }

    /// Id of this type's set of names (see `name_sets`).
    pub fn name_set(&self, t: TypeUrl) -> u64 {
        self.name_sets[t.index()]
    }

    pub fn get(&self, t: TypeUrl, name: &str) -> Option<&Arc<Resource>> {
        self.types[t.index()].get(name)
    }

    pub fn type_version(&self, t: TypeUrl) -> &str {
        &self.type_versions[t.index()]
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn len(&self) -> usize {
        self.types.iter().map(|m| m.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Shares what did not change since `prev`: resources with the same content keep their
    /// allocation (and `last_updated`), a type whose content did not change at all keeps the very
    /// same map, and an unchanged set of names keeps its id.
    fn inherit(&mut self, prev: &ResourceSnapshot) {
        for t in TypeUrl::PUSH_ORDER {
            let i = t.index();
            if self.type_versions[i] == prev.type_versions[i] {
                self.types[i] = prev.types[i].clone();
                self.name_sets[i] = prev.name_sets[i];
                continue;
            }
            let prev_map = &prev.types[i];
            let same_names = prev_map.len() == self.types[i].len()
                && prev_map
                    .keys()
                    .zip(self.types[i].keys())
                    .all(|(a, b)| a == b);
            let map = Arc::make_mut(&mut self.types[i]);
            for (name, r) in map.iter_mut() {
                if let Some(old) = prev_map.get(name)
                    && old.version == r.version
                {
                    *r = old.clone();
                }
            }
            if same_names {
                self.name_sets[i] = prev.name_sets[i];
            }
        }
    }
}

struct Inner {
    global: RwLock<Option<Arc<ResourceSnapshot>>>,
    per_node: DashMap<String, Arc<ResourceSnapshot>>,
    notify: watch::Sender<u64>,
    published: AtomicBool,
}

/// Read side of the cache. Clone freely.
#[derive(Clone)]
pub struct SnapshotCache {
    inner: Arc<Inner>,
}

/// Write side of the cache. There is exactly one (it is not `Clone`).
pub struct SnapshotWriter {
    inner: Arc<Inner>,
    generation: u64,
}

/// Creates a cache and its single writer.
pub fn snapshot_cache() -> (SnapshotCache, SnapshotWriter) {
    let (notify, _) = watch::channel(0);
    let inner = Arc::new(Inner {
        global: RwLock::new(None),
        per_node: DashMap::new(),
        notify,
        published: AtomicBool::new(false),
    });
    (
        SnapshotCache {
            inner: inner.clone(),
        },
        SnapshotWriter {
            inner,
            generation: 0,
        },
    )
}

impl SnapshotCache {
    /// The snapshot served to `node_id`, or `None` until one has been published: streams never answer
    /// from an empty cache, so a restarted winmesh cannot wipe a proxy's config.
    pub fn snapshot_for(&self, node_id: &str) -> Option<Arc<ResourceSnapshot>> {
        if let Some(s) = self.inner.per_node.get(node_id) {
            return Some(s.clone());
        }
        self.global()
    }

    pub fn global(&self) -> Option<Arc<ResourceSnapshot>> {
        match self.inner.global.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Woken whenever any snapshot is published.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.notify.subscribe()
    }

    /// True once a global snapshot has been published.
    pub fn is_ready(&self) -> bool {
        self.inner.published.load(Ordering::Acquire)
    }

    /// Node ids that have their own snapshot.
    pub fn node_overrides(&self) -> Vec<String> {
        self.inner
            .per_node
            .iter()
            .map(|e| e.key().clone())
            .collect()
    }
}

impl SnapshotWriter {
    /// Publishes the snapshot for every proxy without a per-node override.
    pub fn publish(&mut self, snapshot: ResourceSnapshot) -> Arc<ResourceSnapshot> {
        let prev = SnapshotCache {
            inner: self.inner.clone(),
        }
        .global();
        let snap = self.stamp(snapshot, prev.as_deref());
        // Update the cache before notifying streams, so a woken stream reads the new snapshot.
        match self.inner.global.write() {
            Ok(mut g) => *g = Some(snap.clone()),
            Err(poisoned) => *poisoned.into_inner() = Some(snap.clone()),
        }
        self.inner.published.store(true, Ordering::Release);
        self.inner.notify.send_replace(self.generation);
        snap
    }

    /// Publishes a snapshot for one node id only.
    pub fn publish_for_node(
        &mut self,
        node_id: &str,
        snapshot: ResourceSnapshot,
    ) -> Arc<ResourceSnapshot> {
        let prev = self.inner.per_node.get(node_id).map(|s| s.clone());
        let snap = self.stamp(snapshot, prev.as_deref());
        self.inner
            .per_node
            .insert(node_id.to_string(), snap.clone());
        self.inner.notify.send_replace(self.generation);
        snap
    }

    /// Removes a node's override; the node falls back to the global snapshot.
    pub fn clear_node(&mut self, node_id: &str) {
        if self.inner.per_node.remove(node_id).is_some() {
            self.generation += 1;
            self.inner.notify.send_replace(self.generation);
        }
    }

    pub fn cache(&self) -> SnapshotCache {
        SnapshotCache {
            inner: self.inner.clone(),
        }
    }

    fn stamp(
        &mut self,
        mut snapshot: ResourceSnapshot,
        prev: Option<&ResourceSnapshot>,
    ) -> Arc<ResourceSnapshot> {
        self.generation += 1;
        snapshot.generation = self.generation;
        if let Some(prev) = prev {
            snapshot.inherit(prev);
        }
        Arc::new(snapshot)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn cluster(name: &str) -> Cluster {
        Cluster {
            name: name.to_string(),
            ..Default::default()
        }
    }

    #[test]
    fn builder_rejects_duplicates_and_empty_names() {
        let mut b = SnapshotBuilder::new();
        b.add(&cluster("a")).unwrap();
        assert_eq!(
            b.add(&cluster("a")).unwrap_err(),
            SnapshotError::Duplicate {
                type_url: TypeUrl::Cluster,
                name: "a".into()
            }
        );
        assert!(matches!(
            b.add(&cluster("")),
            Err(SnapshotError::EmptyName { .. })
        ));
        let errs = b.add_all([&cluster("b"), &cluster("b"), &cluster("c")]);
        assert_eq!(errs.len(), 1);
        let s = b.build();
        assert_eq!(s.resources(TypeUrl::Cluster).len(), 3);
    }

    #[test]
    fn debug_output_never_contains_payloads() {
        use envoy_types::pb::envoy::config::core::v3::{DataSource, data_source::Specifier};
        use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
            TlsCertificate, secret,
        };
        let s = Secret {
            name: "default".into(),
            r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
                private_key: Some(DataSource {
                    specifier: Some(Specifier::InlineString(
                        "-----BEGIN PRIVATE KEY----- TOPSECRET".into(),
                    )),
                    watched_directory: None,
                }),
                ..Default::default()
            })),
        };
        let mut b = SnapshotBuilder::new();
        b.add(&s).unwrap();
        let builder_text = format!("{b:?}");
        let text = format!("{builder_text} {:?}", b.build());
        assert!(
            !text.contains("TOPSECRET") && !text.contains("PRIVATE"),
            "{text}"
        );
        assert!(text.contains("default"));
    }

    #[test]
    fn versions_are_content_hashes() {
        let a1 = Resource::encode(&cluster("a"));
        let a2 = Resource::encode(&cluster("a"));
        let b = Resource::encode(&cluster("b"));
        assert_eq!(a1.version, a2.version);
        assert_ne!(a1.version, b.version);
        assert_eq!(a1.version.len(), 16);
    }

    #[test]
    fn type_version_changes_only_with_content() {
        let build = |names: &[&str]| {
            let mut b = SnapshotBuilder::new();
            for n in names {
                b.add(&cluster(n)).unwrap();
            }
            b.build()
        };
        let s1 = build(&["a", "b"]);
        let s2 = build(&["b", "a"]);
        let s3 = build(&["a"]);
        assert_eq!(
            s1.type_version(TypeUrl::Cluster),
            s2.type_version(TypeUrl::Cluster)
        );
        assert_ne!(
            s1.type_version(TypeUrl::Cluster),
            s3.type_version(TypeUrl::Cluster)
        );
    }

    #[test]
    fn cache_is_empty_until_published_and_per_node_wins() {
        let (cache, mut writer) = snapshot_cache();
        let mut rx = cache.subscribe();
        assert!(cache.snapshot_for("n1").is_none());
        assert!(!cache.is_ready());

        let mut b = SnapshotBuilder::new();
        b.add(&cluster("global")).unwrap();
        writer.publish(b.build());
        assert!(cache.is_ready());
        assert!(rx.has_changed().unwrap());
        rx.borrow_and_update();
        let g = cache.snapshot_for("n1").unwrap();
        assert!(g.get(TypeUrl::Cluster, "global").is_some());

        let mut b = SnapshotBuilder::new();
        b.add(&cluster("mine")).unwrap();
        writer.publish_for_node("n1", b.build());
        assert!(rx.has_changed().unwrap());
        assert!(
            cache
                .snapshot_for("n1")
                .unwrap()
                .get(TypeUrl::Cluster, "mine")
                .is_some()
        );
        assert!(
            cache
                .snapshot_for("n2")
                .unwrap()
                .get(TypeUrl::Cluster, "global")
                .is_some()
        );
        writer.clear_node("n1");
        assert!(
            cache
                .snapshot_for("n1")
                .unwrap()
                .get(TypeUrl::Cluster, "global")
                .is_some()
        );
    }

    #[test]
    fn unchanged_resources_keep_their_bytes_and_timestamp() {
        let (cache, mut writer) = snapshot_cache();
        let mut b = SnapshotBuilder::new();
        b.add(&cluster("a")).unwrap();
        writer.publish(b.build());
        let first = cache.global().unwrap();
        let mut b = SnapshotBuilder::new();
        b.add(&cluster("a")).unwrap();
        b.add(&cluster("b")).unwrap();
        writer.publish(b.build());
        let second = cache.global().unwrap();
        let (a1, a2) = (
            first.get(TypeUrl::Cluster, "a").unwrap(),
            second.get(TypeUrl::Cluster, "a").unwrap(),
        );
        // The very same allocation: unchanged resources are shared, not re-encoded per snapshot.
        assert!(Arc::ptr_eq(a1, a2));
        assert!(second.generation() > first.generation());
    }
}
