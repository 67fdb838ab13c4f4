//! The generic xDS server: resource types and push order, the snapshot cache, sans-IO SotW and delta
//! stream state machines, the tonic services and the registry of connected proxies. It knows Envoy's
//! protos but nothing of the mesh model, Kubernetes or certificates.

pub mod cache;
pub mod clients;
pub mod delta;
pub mod grpc;
pub mod peertext;
pub mod resources;
pub mod server;
pub mod sotw;
pub mod stream;
pub mod wire;

#[cfg(test)]
mod delta_tests;
#[cfg(test)]
mod sotw_tests;
#[cfg(test)]
pub(crate) mod testutil;

pub use cache::{
    Resource, ResourceSnapshot, SnapshotBuilder, SnapshotCache, SnapshotWriter, snapshot_cache,
};
pub use resources::TypeUrl;
