//! Protocol facts in one place: the resource types winmesh serves, their type URLs, which of them are
//! "full state" in SotW, which support the legacy wildcard, and the make-before-break push order.
//!
//! Spec: envoyproxy/envoy `api/envoy/service/discovery/v3/discovery.proto` and
//! `docs/root/api-docs/xds_protocol.rst`.

use std::fmt;

/// The resource types served over ADS (and SDS for [`TypeUrl::Secret`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TypeUrl {
    Cluster,
    Endpoint,
    Secret,
    Listener,
    Route,
}

impl TypeUrl {
    /// Make-before-break order: clusters first (they warm), then their endpoints, then the secrets
    /// clusters and listeners wait for, then listeners and finally routes (routes are not warmed and must
    /// never point at a cluster the proxy lacks). The discriminant order above matches.
    pub const PUSH_ORDER: [TypeUrl; 5] = [
        TypeUrl::Cluster,
        TypeUrl::Endpoint,
        TypeUrl::Secret,
        TypeUrl::Listener,
        TypeUrl::Route,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            TypeUrl::Cluster => "type.googleapis.com/envoy.config.cluster.v3.Cluster",
            TypeUrl::Endpoint => {
                "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
            }
            TypeUrl::Secret => {
                "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
            }
            TypeUrl::Listener => "type.googleapis.com/envoy.config.listener.v3.Listener",
            TypeUrl::Route => "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
        }
    }

    pub fn parse(s: &str) -> Option<TypeUrl> {
        TypeUrl::PUSH_ORDER.into_iter().find(|t| t.as_str() == s)
    }

    /// Index into per-type arrays (`[T; 5]`).
    pub const fn index(self) -> usize {
        self as usize
    }

    /// Short name as used by Envoy stats and istioctl (CDS, EDS, ...).
    pub const fn short(self) -> &'static str {
        match self {
            TypeUrl::Cluster => "CDS",
            TypeUrl::Endpoint => "EDS",
            TypeUrl::Secret => "SDS",
            TypeUrl::Listener => "LDS",
            TypeUrl::Route => "RDS",
        }
    }

    /// In SotW, LDS and CDS responses carry the complete set: a name missing from a response is removed
    /// by Envoy. RDS, EDS and SDS responses may carry any subset.
    pub const fn is_full_state(self) -> bool {
        matches!(self, TypeUrl::Cluster | TypeUrl::Listener)
    }

    /// Only LDS and CDS have the legacy wildcard: an empty name list means "everything" until the client
    /// names something explicitly.
    pub const fn has_legacy_wildcard(self) -> bool {
        matches!(self, TypeUrl::Cluster | TypeUrl::Listener)
    }

    /// After a response of this type, Envoy (re)warms and waits for a fresh response of the returned type,
    /// even if that type's content did not change (CDS → EDS, LDS → RDS).
    pub const fn warms(self) -> Option<TypeUrl> {
        match self {
            TypeUrl::Cluster => Some(TypeUrl::Endpoint),
            TypeUrl::Listener => Some(TypeUrl::Route),
            _ => None,
        }
    }

    /// Types whose changes must wait until clusters and endpoints have settled on the proxy, so a listener
    /// or route never references a cluster that is still missing or warming.
    pub const fn waits_for_clusters(self) -> bool {
        matches!(self, TypeUrl::Listener | TypeUrl::Route)
    }
}

impl fmt::Display for TypeUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.short())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_urls_round_trip_and_order_matches_index() {
        for (i, t) in TypeUrl::PUSH_ORDER.into_iter().enumerate() {
            assert_eq!(TypeUrl::parse(t.as_str()), Some(t));
            assert_eq!(t.index(), i);
        }
        assert_eq!(
            TypeUrl::parse("type.googleapis.com/envoy.config.cluster.v2.Cluster"),
            None
        );
    }

    #[test]
    fn push_order_is_make_before_break() {
        let pos = |t: TypeUrl| TypeUrl::PUSH_ORDER.iter().position(|x| *x == t).unwrap();
        assert!(pos(TypeUrl::Cluster) < pos(TypeUrl::Endpoint));
        assert!(pos(TypeUrl::Endpoint) < pos(TypeUrl::Listener));
        assert!(pos(TypeUrl::Listener) < pos(TypeUrl::Route));
    }

    #[test]
    fn only_lds_and_cds_are_full_state_and_wildcard() {
        let full: Vec<_> = TypeUrl::PUSH_ORDER
            .into_iter()
            .filter(|t| t.is_full_state())
            .collect();
        assert_eq!(full, vec![TypeUrl::Cluster, TypeUrl::Listener]);
        let wild: Vec<_> = TypeUrl::PUSH_ORDER
            .into_iter()
            .filter(|t| t.has_legacy_wildcard())
            .collect();
        assert_eq!(wild, full);
    }
}
