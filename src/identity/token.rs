//! Where the token that proves an identity to istiod comes from: a file (the projected
//! service-account token istio-agent reads) or minted on demand for a service account with the
//! Kubernetes TokenRequest API (`discovery::tokens`), for Windows apps whose pods cannot run an
//! agent. Tokens never appear in logs, errors or debug output.

use std::fmt;
use std::sync::Arc;

use futures::future::BoxFuture;

use super::istiod::CaError;

/// Something that hands out a current token for one service account.
pub trait MintToken: Send + Sync + 'static {
    fn token(&self) -> BoxFuture<'_, Result<String, CaError>>;
    /// `namespace/service-account`, for comparison and logs.
    fn subject(&self) -> String;
}

/// A shareable [`MintToken`]; equal when it mints for the same subject.
#[derive(Clone)]
pub struct Minter(pub Arc<dyn MintToken>);

impl fmt::Debug for Minter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Minter({})", self.0.subject())
    }
}

impl PartialEq for Minter {
    fn eq(&self, other: &Self) -> bool {
        self.0.subject() == other.0.subject()
    }
}

impl Eq for Minter {}
