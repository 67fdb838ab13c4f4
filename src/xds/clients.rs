//! Registry of connected proxies, read by `/debug/syncz` and `winmesh status`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use dashmap::DashMap;
use serde::Serialize;

use super::stream::{NodeInfo, TypeStatus, humantime_serde_compat};

#[derive(Debug, Clone, Serialize)]
pub struct ClientView {
    pub connection_id: u64,
    pub node_id: String,
    pub cluster: String,
    pub envoy_version: String,
    pub peer: Option<String>,
    #[serde(with = "humantime_serde_compat")]
    pub connected_since: SystemTime,
    /// "ADS" or "SDS".
    pub service: &'static str,
    /// "SotW" or "Delta".
    pub mode: &'static str,
    pub types: Vec<TypeStatus>,
}

#[derive(Debug, Default)]
pub struct ClientRegistry {
    next_id: AtomicU64,
    clients: DashMap<u64, ClientView>,
}

/// Removes the client from the registry when its stream ends.
pub struct Registration {
    registry: Arc<ClientRegistry>,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry.clients.remove(&self.id);
    }
}

impl Registration {
    pub fn update(&self, types: Vec<TypeStatus>) {
        if let Some(mut c) = self.registry.clients.get_mut(&self.id) {
            c.types = types;
        }
    }
}

impl ClientRegistry {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn register(
        self: &Arc<Self>,
        node: &NodeInfo,
        peer: Option<SocketAddr>,
        service: &'static str,
        mode: &'static str,
    ) -> Registration {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        self.clients.insert(
            id,
            ClientView {
                connection_id: id,
                node_id: node.id.clone(),
                cluster: node.cluster.clone(),
                envoy_version: node.envoy_version.clone(),
                peer: peer.map(|p| p.to_string()),
                connected_since: SystemTime::now(),
                service,
                mode,
                types: Vec::new(),
            },
        );
        Registration {
            registry: self.clone(),
            id,
        }
    }

    /// All connected streams, oldest first.
    pub fn list(&self) -> Vec<ClientView> {
        let mut v: Vec<ClientView> = self.clients.iter().map(|c| c.value().clone()).collect();
        v.sort_by_key(|c| c.connection_id);
        v
    }

    /// Whether a stream of this node id is connected.
    pub fn is_connected(&self, node_id: &str) -> bool {
        self.clients.iter().any(|c| c.value().node_id == node_id)
    }

    pub fn len(&self) -> usize {
        self.clients.len()
    }

    pub fn is_empty(&self) -> bool {
        self.clients.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registration_is_removed_on_drop() {
        let r = ClientRegistry::new();
        let node = NodeInfo {
            id: "n".into(),
            ..Default::default()
        };
        let g = r.register(&node, None, "ADS", "SotW");
        assert_eq!(r.list()[0].node_id, "n");
        g.update(vec![]);
        drop(g);
        assert!(r.is_empty());
    }
}
