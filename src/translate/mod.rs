//! Pure functions from the mesh model and current certificates to Envoy resources. No I/O.
//! Generated config uses only fields and extensions that exist in stock Envoy 1.28 … 1.40 and none of
//! Istio's own filters.

pub mod common;
pub mod inbound;
pub mod outbound;
pub mod rbac;
pub mod secret;

use crate::assemble::Translated;
use crate::config::SecretsVia;
use crate::identity::SpiffeId;
use crate::model::Mesh;

/// What translation needs besides the model.
#[derive(Clone, Debug)]
pub struct Ctx {
    pub secrets_via: SecretsVia,
    /// The gateway's own identity (served as SDS `default`).
    pub default_identity: SpiffeId,
    /// Other trust domains whose workloads are accepted as mesh callers (Istio's trust-domain aliases).
    pub trust_domain_aliases: Vec<String>,
    /// TLS parameters of the gateway's mesh-facing (server) side, like MeshConfig `meshMTLS`.
    pub mesh_mtls: crate::config::MeshMtls,
    /// Identities that hold a certificate now (`None`: assume all do). Envoy keeps a listener
    /// warming until every secret it names exists, so one identity istiod has not signed (yet)
    /// would otherwise keep every service on a shared port down.
    pub certified: Option<std::collections::BTreeSet<SpiffeId>>,
}

impl Ctx {
    /// Whether `id` has a certificate (the gateway's own is always assumed: every listener
    /// needs it).
    pub fn has_cert(&self, id: &SpiffeId) -> bool {
        *id == self.default_identity || self.certified.as_ref().is_none_or(|c| c.contains(id))
    }

    /// SDS secret name of the certificate presented for an identity.
    pub fn sds_name_for(&self, id: Option<&SpiffeId>) -> String {
        match id {
            Some(id) if *id != self.default_identity => id.to_string(),
            _ => secret::DEFAULT.to_string(),
        }
    }
}

/// The whole mesh → Envoy resources (secrets excluded), plus warnings about things left out.
pub fn translate(mesh: &Mesh, ctx: &Ctx) -> (Translated, Vec<String>) {
    let mut out = Translated::default();
    let mut warnings = Vec::new();
    let mut authz = Vec::new();
    inbound::translate(mesh, ctx, &mut out, &mut authz);
    // A policy applies to every chain of its services: say each thing once.
    authz.sort();
    authz.dedup();
    warnings.extend(authz);
    outbound::translate(mesh, ctx, &mut out, &mut warnings);
    (out, warnings)
}

#[cfg(test)]
mod tests;
