//! Workload identity: SPIFFE IDs, CSRs, the istiod CA client, the embedded dev CA, verification of
//! issued chains, and the manager that keeps every identity's certificate fresh. Knows nothing of xDS:
//! it publishes [`SecretSet`]s on a watch channel and `app.rs` turns them into SDS secrets.

pub mod csr;
pub mod dev_ca;
pub mod istiod;
pub mod manager;
pub mod pb;
pub mod rotation;
pub mod token;
pub mod verify;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

use serde::Serialize;

pub use manager::{IdentityManager, IdentitySpec};

/// `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(into = "String")]
pub struct SpiffeId {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid SPIFFE ID {input:?}: {reason}")]
pub struct SpiffeIdError {
    pub input: String,
    pub reason: &'static str,
}

fn valid_label(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

impl SpiffeId {
    pub fn new(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, SpiffeIdError> {
        Self::parse(&format!(
            "spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"
        ))
    }

    pub fn parse(s: &str) -> Result<Self, SpiffeIdError> {
        let err = |reason| SpiffeIdError {
            input: s.to_string(),
            reason,
        };
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| err("must start with spiffe://"))?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            [td, "ns", ns, "sa", sa] => {
                if !valid_label(td) || td.chars().any(|c| c.is_ascii_uppercase()) {
                    return Err(err(
                        "trust domain must be lowercase letters, digits, '-', '.', '_'",
                    ));
                }
                if !valid_label(ns) {
                    return Err(err(
                        "namespace must be non-empty letters, digits, '-', '.', '_'",
                    ));
                }
                if !valid_label(sa) {
                    return Err(err(
                        "service account must be non-empty letters, digits, '-', '.', '_'",
                    ));
                }
                Ok(SpiffeId {
                    trust_domain: td.to_string(),
                    namespace: ns.to_string(),
                    service_account: sa.to_string(),
                })
            }
            _ => Err(err(
                "must be spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>",
            )),
        }
    }

    /// Istio's AuthorizationPolicy principal: the URI without `spiffe://`.
    pub fn principal(&self) -> String {
        format!(
            "{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl From<SpiffeId> for String {
    fn from(s: SpiffeId) -> String {
        s.to_string()
    }
}

/// A private key in PKCS#8 PEM. Its `Debug` never shows the key, and it is not `Serialize`.
#[derive(Clone, PartialEq, Eq)]
pub struct PrivateKeyPem(String);

impl PrivateKeyPem {
    pub fn new(pem: String) -> Self {
        PrivateKeyPem(pem)
    }
    /// The PEM text: only for the SDS response to the local Envoy and for dev-CA test files.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for PrivateKeyPem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PrivateKeyPem([redacted])")
    }
}

/// Facts about one certificate, for `/debug/certs` (never key material).
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct CertInfo {
    pub serial: String,
    pub subject: String,
    pub issuer: String,
    pub sans: Vec<String>,
    #[serde(with = "crate::xds::stream::humantime_serde_compat")]
    pub not_before: SystemTime,
    #[serde(with = "crate::xds::stream::humantime_serde_compat")]
    pub not_after: SystemTime,
    /// SHA-256 of the DER, hex.
    pub sha256: String,
}

/// A verified certificate chain with its key.
#[derive(Clone, Debug)]
pub struct CertBundle {
    pub identity: SpiffeId,
    pub key: PrivateKeyPem,
    /// Leaf first, then intermediates (PEM).
    pub chain_pem: Vec<String>,
    /// Trust anchors returned with the chain (PEM, one per root).
    pub roots_pem: Vec<String>,
    pub leaf: CertInfo,
    /// Intermediates, leaf excluded.
    pub intermediates: Vec<CertInfo>,
    pub roots: Vec<CertInfo>,
}

impl CertBundle {
    pub fn not_before(&self) -> SystemTime {
        self.leaf.not_before
    }
    pub fn not_after(&self) -> SystemTime {
        self.leaf.not_after
    }
    /// Leaf + intermediates as one PEM blob (Envoy's `certificate_chain`).
    pub fn chain_blob(&self) -> String {
        self.chain_pem.concat()
    }
}

/// What the manager publishes: the current certificate of every identity that has one, and the
/// union of trust anchors.
#[derive(Clone, Debug, Default)]
pub struct SecretSet {
    /// The gateway's own identity (served as `default`).
    pub default_identity: Option<SpiffeId>,
    pub certs: BTreeMap<SpiffeId, Arc<CertBundle>>,
    /// Root PEMs (deduplicated, in stable order), served as `ROOTCA`.
    pub roots_pem: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_ids_parse_and_print() {
        let id = SpiffeId::parse("spiffe://cluster.local/ns/win/sa/app-1").unwrap();
        assert_eq!(id.namespace, "win");
        assert_eq!(id.principal(), "cluster.local/ns/win/sa/app-1");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/win/sa/app-1");
        for bad in [
            "cluster.local/ns/a/sa/b",
            "spiffe://cluster.local/ns/a",
            "spiffe://Cluster.local/ns/a/sa/b",
            "spiffe:///ns/a/sa/b",
            "spiffe://td/ns//sa/b",
            "spiffe://td/ns/a/sa/b/extra",
            "spiffe://td/ns/a b/sa/c",
        ] {
            assert!(SpiffeId::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn private_keys_never_print() {
        let k = PrivateKeyPem::new("-----BEGIN PRIVATE KEY-----\nabc".into());
        assert!(!format!("{k:?}").contains("abc"));
    }
}
