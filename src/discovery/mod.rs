//! Sources of mesh state. Each produces a [`MeshState`] (the model plus what was rejected) on a watch
//! channel: the mesh file (`file`) and the Kubernetes mirror (`kube`), combined by `kube::combine`.

pub mod file;
pub mod kube;
pub mod kube_windows;
pub mod publish;
pub mod tokens;
pub mod watch;

use std::sync::Arc;
use std::time::SystemTime;

use serde::Serialize;

use crate::model::Mesh;

/// One rejected object: which, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ObjectError {
    /// `service`, `windows_service`, `peer_authentication`, `authorization_policy`.
    pub kind: &'static str,
    /// `namespace/name`, or `#index` when the object has no usable name.
    pub name: String,
    pub message: String,
}

impl std::fmt::Display for ObjectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.kind, self.name, self.message)
    }
}

/// What a source currently says.
#[derive(Clone, Debug, Serialize)]
pub struct MeshState {
    /// The last good model (`None` until the source has loaded once).
    pub mesh: Option<Arc<Mesh>>,
    /// Objects skipped in the last good load.
    pub rejected: Vec<ObjectError>,
    /// Why the latest attempt was not applied (the previous model stays in service).
    pub error: Option<String>,
    /// Set while part of the model comes from state persisted by an earlier run (API outage).
    pub persisted: Option<String>,
    #[serde(with = "crate::xds::stream::humantime_serde_compat")]
    pub updated: SystemTime,
    pub generation: u64,
}

impl Default for MeshState {
    fn default() -> Self {
        MeshState {
            mesh: None,
            rejected: vec![],
            error: None,
            persisted: None,
            updated: SystemTime::now(),
            generation: 0,
        }
    }
}
