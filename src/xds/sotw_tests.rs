//! One test per SotW rule of shared/docs/xds-protocol.md, driving the sans-IO machine directly.

use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret;
use prost::Message;

use super::resources::TypeUrl::{self, *};
use super::sotw::SotwStream;
use super::stream::{RequestKind, StreamError, SyncStatus};
use super::testutil::*;
use super::wire::WireDiscoveryResponse;

fn resp_names(r: &WireDiscoveryResponse) -> Vec<String> {
    r.resources
        .iter()
        .map(
            |a| match TypeUrl::parse(std::str::from_utf8(&a.type_url).unwrap()).unwrap() {
                Cluster => Cluster::decode(a.value.clone()).unwrap().name,
                Endpoint => {
                    ClusterLoadAssignment::decode(a.value.clone())
                        .unwrap()
                        .cluster_name
                }
                Listener => Listener::decode(a.value.clone()).unwrap().name,
                Route => RouteConfiguration::decode(a.value.clone()).unwrap().name,
                Secret => Secret::decode(a.value.clone()).unwrap().name,
            },
        )
        .collect()
}

fn drain(s: &mut SotwStream) -> Vec<(TypeUrl, WireDiscoveryResponse)> {
    let mut out = vec![];
    while let Some(r) = s.next_response(Instant::now()) {
        out.push(r);
        assert!(out.len() < 50, "response loop");
    }
    out
}

fn one(s: &mut SotwStream, t: TypeUrl) -> WireDiscoveryResponse {
    let mut v = drain(s);
    assert_eq!(
        v.len(),
        1,
        "expected exactly one response, got {:?}",
        v.iter().map(|x| x.0).collect::<Vec<_>>()
    );
    let (got, r) = v.remove(0);
    assert_eq!(got, t);
    r
}

/// Drains and returns the response of type `t` (there must be one) plus the others.
fn take(
    s: &mut SotwStream,
    t: TypeUrl,
) -> (WireDiscoveryResponse, Vec<(TypeUrl, WireDiscoveryResponse)>) {
    let v = drain(s);
    let mut seen = std::collections::HashSet::new();
    assert!(
        v.iter().all(|x| seen.insert(x.0)),
        "one un-ACKed response per type"
    );
    let (mine, rest): (Vec<_>, Vec<_>) = v.into_iter().partition(|x| x.0 == t);
    let r = mine
        .into_iter()
        .next()
        .unwrap_or_else(|| panic!("no {t} response"));
    (r.1, rest)
}

fn ack(s: &mut SotwStream, t: TypeUrl, names: &[&str], r: &WireDiscoveryResponse) -> RequestKind {
    s.handle_request(&req(t, names, &r.nonce), Instant::now())
        .unwrap()
        .1
}

/// Connects a stream the way Envoy does and brings it to a synced state.
fn synced(fx: &Fx, clusters: &[&str]) -> SotwStream {
    let mut s = SotwStream::new_ads("winmesh");
    s.set_snapshot(fx.build());
    s.handle_request(&first_req(Cluster, &[]), Instant::now())
        .unwrap();
    let cds = one(&mut s, Cluster);
    s.handle_request(&req(Endpoint, clusters, ""), Instant::now())
        .unwrap();
    ack(&mut s, Cluster, &[], &cds);
    let eds = one(&mut s, Endpoint);
    ack(&mut s, Endpoint, clusters, &eds);
    s.handle_request(&req(Listener, &[], ""), Instant::now())
        .unwrap();
    let lds = one(&mut s, Listener);
    s.handle_request(&req(Route, &["r"], ""), Instant::now())
        .unwrap();
    ack(&mut s, Listener, &[], &lds);
    let rds = one(&mut s, Route);
    ack(&mut s, Route, &["r"], &rds);
    assert!(drain(&mut s).is_empty());
    assert!(
        s.status().iter().all(|t| t.status == SyncStatus::Synced),
        "{:?}",
        s.status()
    );
    s
}

#[test]
fn first_request_needs_node_and_type() {
    let mut s = SotwStream::new_ads("winmesh");
    assert_eq!(
        s.handle_request(&req(Cluster, &[], ""), Instant::now()),
        Err(StreamError::MissingNode)
    );
    let mut no_type = first_req(Cluster, &[]);
    no_type.type_url.clear();
    assert_eq!(
        s.handle_request(&no_type, Instant::now()),
        Err(StreamError::MissingTypeUrl)
    );
    let mut bad = first_req(Cluster, &[]);
    bad.type_url = "type.googleapis.com/envoy.config.cluster.v2.Cluster".into();
    assert!(matches!(
        s.handle_request(&bad, Instant::now()),
        Err(StreamError::UnknownTypeUrl(_))
    ));
    // Node is remembered from the first message only (set_node_on_first_message_only).
    s.handle_request(&first_req(Cluster, &[]), Instant::now())
        .unwrap();
    s.handle_request(&req(Listener, &[], ""), Instant::now())
        .unwrap();
    assert_eq!(s.node().unwrap().id, "gw~1");
}

#[test]
fn sds_stream_defaults_to_secrets_and_refuses_other_types() {
    let mut s = SotwStream::new_sds("winmesh");
    let mut fx = Fx::new(&["a"], "a");
    fx.secrets = vec![("default".into(), 1)];
    s.set_snapshot(fx.build());
    let mut r = first_req(Secret, &["default"]);
    r.type_url.clear();
    s.handle_request(&r, Instant::now()).unwrap();
    let resp = one(&mut s, Secret);
    assert_eq!(resp_names(&resp), vec!["default"]);
    assert!(matches!(
        s.handle_request(&req(Cluster, &[], ""), Instant::now()),
        Err(StreamError::WrongTypeUrl { .. })
    ));
}

#[test]
fn nothing_is_sent_before_a_snapshot_exists() {
    let mut s = SotwStream::new_ads("winmesh");
    s.handle_request(&first_req(Cluster, &[]), Instant::now())
        .unwrap();
    assert!(drain(&mut s).is_empty());
    s.set_snapshot(Fx::new(&["a"], "a").build());
    assert_eq!(resp_names(&one(&mut s, Cluster)), vec!["a"]);
}

#[test]
fn nack_is_recorded_and_not_resent() {
    let mut fx = Fx::new(&["a"], "a");
    let mut s = synced(&fx, &["a"]);
    fx.clusters[0].1 = 7;
    s.set_snapshot(fx.build());
    let (cds, rest) = take(&mut s, Cluster);
    assert_eq!(rest.len(), 1, "EDS re-warm follows the CDS push");
    let kind = s
        .handle_request(
            &nack(Cluster, &[], &cds.nonce, "bad cluster a"),
            Instant::now(),
        )
        .unwrap()
        .1;
    assert!(matches!(kind, RequestKind::Nack { ref message, .. } if message == "bad cluster a"));
    // No resend loop: nothing is due until the content changes again. (EDS was re-warmed by the push.)
    let after: Vec<_> = drain(&mut s).into_iter().map(|x| x.0).collect();
    assert!(!after.contains(&Cluster), "{after:?}");
    for _ in 0..3 {
        // Envoy repeats its NACK on every later request of the type; still no resend.
        s.handle_request(
            &nack(Cluster, &[], &cds.nonce, "bad cluster a"),
            Instant::now(),
        )
        .unwrap();
        assert!(drain(&mut s).iter().all(|x| x.0 != Cluster));
    }
    let st = s.status().into_iter().find(|t| t.short == "CDS").unwrap();
    assert_eq!(st.status, SyncStatus::Nacked);
    assert_eq!(st.nacks, 1);
    assert_eq!(st.last_nack.as_ref().unwrap().message, "bad cluster a");
    assert_ne!(
        st.version_acked, st.version_sent,
        "acked stays what the proxy runs"
    );
    // A real change is sent and its ACK makes the type SYNCED again, keeping the NACK history.
    fx.clusters[0].1 = 8;
    s.set_snapshot(fx.build());
    let (cds2, _) = take(&mut s, Cluster);
    ack(&mut s, Cluster, &[], &cds2);
    let st = s.status().into_iter().find(|t| t.short == "CDS").unwrap();
    assert_eq!(st.status, SyncStatus::Synced);
    assert_eq!(st.version_acked, st.version_sent);
    assert!(st.last_nack.is_some());
}

#[test]
fn stale_nonce_applies_subscription_but_is_not_an_ack() {
    let fx = Fx::new(&["a", "b"], "a");
    let mut s = synced(&fx, &["a"]);
    // Push an EDS update so a response is outstanding.
    let mut fx2 = Fx::new(&["a", "b"], "a");
    fx2.cla_tag = 1;
    s.set_snapshot(fx2.build());
    let eds = one(&mut s, Endpoint);
    // A request with an old nonce that adds "b".
    let kind = s
        .handle_request(&req(Endpoint, &["a", "b"], "stale-1"), Instant::now())
        .unwrap()
        .1;
    assert_eq!(kind, RequestKind::Stale);
    // Still one outstanding response: the stale request did not ACK it.
    assert!(drain(&mut s).is_empty());
    let st = s.status().into_iter().find(|t| t.short == "EDS").unwrap();
    assert_eq!(st.status, SyncStatus::Stale);
    assert!(st.subscribed.contains("b"));
    // Once the outstanding response is ACKed, the new name is answered.
    ack(&mut s, Endpoint, &["a", "b"], &eds);
    let r = one(&mut s, Endpoint);
    assert!(resp_names(&r).contains(&"b".to_string()));
}

#[test]
fn eds_is_answered_after_a_cds_push_even_if_unchanged() {
    let mut fx = Fx::new(&["a"], "a");
    let mut s = synced(&fx, &["a"]);
    fx.clusters[0].1 = 1; // cluster changes, endpoints do not
    s.set_snapshot(fx.build());
    let v = drain(&mut s);
    let types: Vec<_> = v.iter().map(|x| x.0).collect();
    assert_eq!(
        types,
        vec![Cluster, Endpoint],
        "EDS must follow CDS for warming"
    );
    assert_eq!(resp_names(&v[1].1), vec!["a"]);
}

#[test]
fn eds_is_not_held_until_every_cluster_is_requested() {
    let fx = Fx::new(&["a", "b", "c"], "a");
    let mut s = SotwStream::new_ads("winmesh");
    s.set_snapshot(fx.build());
    s.handle_request(&first_req(Endpoint, &["b"]), Instant::now())
        .unwrap();
    assert_eq!(resp_names(&one(&mut s, Endpoint)), vec!["b"]);
}

#[test]
fn missing_names_are_remembered_and_sent_when_they_appear() {
    let fx = Fx::new(&["a"], "a");
    let mut s = synced(&fx, &["a"]);
    s.handle_request(&req(Endpoint, &["a", "later"], ""), Instant::now())
        .unwrap();
    // "a" is re-sent? No: only a newly named resource forces a response, and "later" does not exist.
    let v = drain(&mut s);
    assert!(
        v.iter()
            .all(|(_, r)| !resp_names(r).contains(&"later".to_string()))
    );
    for (t, r) in &v {
        ack(&mut s, *t, &["a", "later"], r);
    }
    let fx2 = Fx::new(&["a", "later"], "a");
    s.set_snapshot(fx2.build());
    let v = drain(&mut s);
    let eds = v.iter().find(|x| x.0 == Endpoint).expect("EDS sent");
    assert!(resp_names(&eds.1).contains(&"later".to_string()));
}

#[test]
fn newly_named_resources_are_answered_even_if_unchanged() {
    let fx = Fx::new(&["a", "b"], "a");
    let mut s = synced(&fx, &["a"]);
    s.handle_request(&req(Endpoint, &["a", "b"], ""), Instant::now())
        .unwrap();
    let r = one(&mut s, Endpoint);
    assert_eq!(resp_names(&r), vec!["a", "b"]);
    ack(&mut s, Endpoint, &["a", "b"], &r);
    // Unsubscribe b, then subscribe again: b must be sent again although nothing changed.
    s.handle_request(&req(Endpoint, &["a"], &r.nonce), Instant::now())
        .unwrap();
    assert!(drain(&mut s).is_empty(), "removing a name needs no answer");
    s.handle_request(&req(Endpoint, &["a", "b"], &r.nonce), Instant::now())
        .unwrap();
    assert!(resp_names(&one(&mut s, Endpoint)).contains(&"b".to_string()));
}

#[test]
fn legacy_wildcard_then_explicit_names() {
    let fx = Fx::new(&["a", "b"], "a");
    let mut s = SotwStream::new_ads("winmesh");
    s.set_snapshot(fx.build());
    s.handle_request(&first_req(Cluster, &[]), Instant::now())
        .unwrap();
    let r = one(&mut s, Cluster);
    assert_eq!(resp_names(&r), vec!["a", "b"]);
    s.handle_request(&req(Cluster, &["b"], &r.nonce), Instant::now())
        .unwrap();
    let r = one(&mut s, Cluster);
    assert_eq!(resp_names(&r), vec!["b"]);
}

#[test]
fn lds_and_cds_are_full_state_and_removals_show() {
    let fx = Fx::new(&["a", "b"], "a");
    let mut s = synced(&fx, &["a", "b"]);
    s.set_snapshot(Fx::new(&["a"], "a").build());
    let (r, _) = take(&mut s, Cluster);
    assert_eq!(
        resp_names(&r),
        vec!["a"],
        "full state: b is removed by omission"
    );
    // Envoy validates that a SotW response never names a resource twice.
    let mut n = resp_names(&r);
    n.dedup();
    assert_eq!(n.len(), r.resources.len());
}

#[test]
fn make_before_break_when_a_route_moves_between_clusters() {
    let mut s = synced(&Fx::new(&["a"], "a"), &["a"]);
    // Route moves from a to b; a disappears.
    s.set_snapshot(Fx::new(&["b"], "b").build());
    let cds = one(&mut s, Cluster);
    assert_eq!(
        resp_names(&cds),
        vec!["a", "b"],
        "a kept until routes stop using it"
    );
    // Envoy requests EDS for the new cluster before ACKing CDS.
    s.handle_request(&req(Endpoint, &["a", "b"], ""), Instant::now())
        .unwrap();
    let eds = one(&mut s, Endpoint);
    assert!(resp_names(&eds).contains(&"b".to_string()));
    // Routes wait while CDS is un-ACKed.
    assert!(drain(&mut s).is_empty());
    ack(&mut s, Cluster, &[], &cds);
    assert!(drain(&mut s).is_empty(), "routes also wait for endpoints");
    ack(&mut s, Endpoint, &["a", "b"], &eds);
    let rds = one(&mut s, Route);
    ack(&mut s, Route, &["r"], &rds);
    // Only now is the old cluster removed.
    let (cds2, rest) = take(&mut s, Cluster);
    assert_eq!(resp_names(&cds2), vec!["b"]);
    ack(&mut s, Cluster, &[], &cds2);
    // EDS is re-sent after the CDS push; then everything is synced.
    for (t, r) in rest {
        assert_eq!(t, Endpoint);
        ack(&mut s, t, &["b"], &r);
    }
    assert!(
        s.status().iter().all(|t| t.status == SyncStatus::Synced),
        "{:?}",
        s.status()
    );
}

#[test]
fn a_nacked_route_keeps_old_clusters() {
    let mut s = synced(&Fx::new(&["a"], "a"), &["a"]);
    s.set_snapshot(Fx::new(&["b"], "b").build());
    let cds = one(&mut s, Cluster);
    s.handle_request(&req(Endpoint, &["a", "b"], ""), Instant::now())
        .unwrap();
    let eds = one(&mut s, Endpoint);
    ack(&mut s, Cluster, &[], &cds);
    ack(&mut s, Endpoint, &["a", "b"], &eds);
    let rds = one(&mut s, Route);
    s.handle_request(&nack(Route, &["r"], &rds.nonce, "no"), Instant::now())
        .unwrap();
    // The proxy still routes to a: the cluster must stay.
    assert!(drain(&mut s).iter().all(|x| x.0 != Cluster));
}

#[test]
fn one_unacked_response_per_type_and_snapshots_coalesce() {
    let mut fx = Fx::new(&["a"], "a");
    let mut s = synced(&fx, &["a"]);
    fx.cla_tag = 1;
    s.set_snapshot(fx.build());
    let first = one(&mut s, Endpoint);
    for tag in 2..6 {
        fx.cla_tag = tag;
        s.set_snapshot(fx.build());
        assert!(drain(&mut s).is_empty(), "must wait for the ACK");
    }
    let t0 = Instant::now();
    let kind = s
        .handle_request(
            &req(Endpoint, &["a"], &first.nonce),
            t0 + Duration::from_millis(5),
        )
        .unwrap()
        .1;
    assert!(matches!(kind, RequestKind::Ack { .. }));
    let latest = one(&mut s, Endpoint);
    let cla = ClusterLoadAssignment::decode(latest.resources[0].value.clone()).unwrap();
    assert!(
        cla.named_endpoints.contains_key("tag5"),
        "only the newest snapshot is sent"
    );
}

#[test]
fn ack_stops_the_conversation() {
    let fx = Fx::new(&["a", "b"], "a");
    let mut s = synced(&fx, &["a", "b"]);
    // Re-publishing identical content sends nothing.
    s.set_snapshot(fx.build());
    assert!(drain(&mut s).is_empty());
}

#[test]
fn responses_share_resource_bytes_with_the_snapshot() {
    let fx = Fx::new(&["a"], "a");
    let snap = fx.build();
    let mut s1 = SotwStream::new_ads("winmesh");
    let mut s2 = SotwStream::new_ads("winmesh");
    for s in [&mut s1, &mut s2] {
        s.set_snapshot(snap.clone());
        s.handle_request(&first_req(Cluster, &[]), Instant::now())
            .unwrap();
    }
    let r1 = one(&mut s1, Cluster);
    let r2 = one(&mut s2, Cluster);
    let body = &snap.get(Cluster, "a").unwrap().body;
    assert_eq!(r1.resources[0].value.as_ptr(), body.as_ptr());
    assert_eq!(r2.resources[0].value.as_ptr(), body.as_ptr());
}

#[test]
fn reconnect_with_same_snapshot_gives_same_versions() {
    let fx = Fx::new(&["a", "b"], "a");
    let mut s1 = SotwStream::new_ads("winmesh");
    s1.set_snapshot(fx.build());
    s1.handle_request(&first_req(Cluster, &[]), Instant::now())
        .unwrap();
    let v1 = one(&mut s1, Cluster).version_info;
    let mut s2 = SotwStream::new_ads("winmesh");
    s2.set_snapshot(fx.build());
    s2.handle_request(&first_req(Cluster, &[]), Instant::now())
        .unwrap();
    assert_eq!(one(&mut s2, Cluster).version_info, v1);
}

#[test]
fn missing_secrets_are_awaited() {
    let mut fx = Fx::new(&["a"], "a");
    let mut s = SotwStream::new_sds("winmesh");
    s.set_snapshot(fx.build());
    s.handle_request(&first_req(Secret, &["default"]), Instant::now())
        .unwrap();
    assert!(
        drain(&mut s).is_empty(),
        "no answer until the certificate exists"
    );
    fx.secrets = vec![("default".into(), 1)];
    s.set_snapshot(fx.build());
    assert_eq!(resp_names(&one(&mut s, Secret)), vec!["default"]);
}

#[test]
fn node_ids_that_could_forge_logs_or_flood_views_are_refused() {
    for bad in ["a\nb", &"x".repeat(super::peertext::MAX_NODE_ID + 1)] {
        let mut s = SotwStream::new_ads("winmesh");
        let mut r = first_req(Cluster, &[]);
        if let Some(n) = r.node.as_mut() {
            n.id = bad.to_string();
        }
        assert_eq!(
            s.handle_request(&r, Instant::now()),
            Err(StreamError::BadNodeId)
        );
    }
}

#[test]
fn subscription_sets_are_bounded() {
    let mut s = SotwStream::new_ads("winmesh");
    let long = "n".repeat(super::stream::MAX_NAME + 1);
    assert_eq!(
        s.handle_request(&first_req(Endpoint, &[&long]), Instant::now()),
        Err(StreamError::TooManyNames)
    );
}

#[test]
fn nack_texts_are_kept_printable_and_capped() {
    let fx = Fx::new(&["a"], "a");
    let mut s = SotwStream::new_ads("winmesh");
    s.set_snapshot(fx.build());
    s.handle_request(&first_req(Cluster, &[]), Instant::now())
        .unwrap();
    let v = drain(&mut s);
    let forged = format!(
        "bad cluster\n2026-12-02T00:00:00Z ERROR winmesh: FORGED{}",
        "y".repeat(10_000)
    );
    let (_, kind) = s
        .handle_request(&nack(Cluster, &[], &v[0].1.nonce, &forged), Instant::now())
        .unwrap();
    let RequestKind::Nack { message, .. } = kind else {
        panic!("{kind:?}")
    };
    assert!(!message.contains('\n'), "{message}");
    assert!(message.contains("\\n2026"));
    assert!(message.chars().count() < super::peertext::MAX_NACK_TEXT + 32);
    let st = s.status();
    let rec = st[0].last_nack.as_ref().expect("recorded");
    assert_eq!(rec.message, message);
}

/// EDS (like RDS and SDS) may be partial in SotW: after the full first response, an endpoint change
/// sends only the assignment that changed, as istiod's incremental EDS does. A CDS change re-sends
/// the full EDS set, because Envoy re-warms the clusters it updated.
#[test]
fn an_endpoint_change_sends_only_the_changed_assignment() {
    let snap = |tag_a: u32, cluster_tag: u32| {
        let mut b = super::SnapshotBuilder::new();
        b.add(&eds_cluster("a", cluster_tag)).unwrap();
        b.add(&eds_cluster("b", 0)).unwrap();
        b.add(&cla("a", tag_a)).unwrap();
        b.add(&cla("b", 0)).unwrap();
        std::sync::Arc::new(b.build())
    };
    let mut s = SotwStream::new_ads("winmesh");
    s.set_snapshot(snap(0, 0));
    s.handle_request(&first_req(Cluster, &[]), Instant::now())
        .unwrap();
    let cds = one(&mut s, Cluster);
    s.handle_request(&req(Endpoint, &["a", "b"], ""), Instant::now())
        .unwrap();
    ack(&mut s, Cluster, &[], &cds);
    let eds = one(&mut s, Endpoint);
    assert_eq!(resp_names(&eds), ["a", "b"]);
    ack(&mut s, Endpoint, &["a", "b"], &eds);

    s.set_snapshot(snap(1, 0));
    let partial = one(&mut s, Endpoint);
    assert_eq!(resp_names(&partial), ["a"], "only the changed assignment");
    assert_ne!(partial.version_info, eds.version_info);
    assert!(matches!(
        ack(&mut s, Endpoint, &["a", "b"], &partial),
        RequestKind::Ack { .. }
    ));
    assert!(drain(&mut s).is_empty());
    assert!(s.status().iter().all(|t| t.status == SyncStatus::Synced));

    // A cluster change: CDS, then the full EDS set for re-warming.
    s.set_snapshot(snap(1, 7));
    let (_, rest) = take(&mut s, Cluster);
    let eds2 = &rest
        .iter()
        .find(|x| x.0 == Endpoint)
        .expect("EDS re-sent")
        .1;
    assert_eq!(resp_names(eds2), ["a", "b"]);
}

/// A NACKed partial update is not re-sent on its own; the next change offers it again together
/// with the new one, measured against what the proxy runs (its last ACK).
#[test]
fn after_a_nack_the_next_partial_update_covers_what_the_proxy_lacks() {
    let snap = |tag_a: u32, tag_b: u32| {
        let mut b = super::SnapshotBuilder::new();
        b.add(&cla("a", tag_a)).unwrap();
        b.add(&cla("b", tag_b)).unwrap();
        std::sync::Arc::new(b.build())
    };
    let mut s = SotwStream::new_ads("winmesh");
    s.set_snapshot(snap(0, 0));
    s.handle_request(&first_req(Endpoint, &["a", "b"]), Instant::now())
        .unwrap();
    let full = one(&mut s, Endpoint);
    ack(&mut s, Endpoint, &["a", "b"], &full);
    s.set_snapshot(snap(1, 0));
    let bad = one(&mut s, Endpoint);
    assert_eq!(resp_names(&bad), ["a"]);
    s.handle_request(
        &nack(Endpoint, &["a", "b"], &bad.nonce, "no"),
        Instant::now(),
    )
    .unwrap();
    assert!(drain(&mut s).is_empty(), "a NACKed update is not re-sent");
    s.set_snapshot(snap(1, 2));
    let next = one(&mut s, Endpoint);
    assert_eq!(resp_names(&next), ["a", "b"]);
}

#[test]
fn an_empty_full_state_set_is_still_answered() {
    // Envoy's ADS init waits for a CDS response before it asks for listeners: an empty cluster
    // set must be sent (and acknowledged), never swallowed as "nothing changed".
    let mut s = SotwStream::new_ads("winmesh");
    s.set_snapshot(Fx::new(&[], "none").build());
    s.handle_request(&first_req(Cluster, &[]), Instant::now())
        .unwrap();
    let cds = one(&mut s, Cluster);
    assert!(cds.resources.is_empty());
    assert!(!cds.nonce.is_empty());
    ack(&mut s, Cluster, &[], &cds);
    s.handle_request(&req(Listener, &[], ""), Instant::now())
        .unwrap();
    assert_eq!(resp_names(&one(&mut s, Listener)), vec!["l"]);

    // And a set that becomes empty removes everything by omission.
    let mut s = synced(&Fx::new(&["a"], "a"), &["a"]);
    s.set_snapshot(Fx::new(&[], "a").build());
    let (r, _) = take(&mut s, Cluster);
    assert!(r.resources.is_empty(), "all clusters removed");
}
