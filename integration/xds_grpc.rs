//! The xDS server over real gRPC on loopback, driven by envoy-types' own generated client (which also
//! proves winmesh's shared-bytes response messages decode as Envoy's). Covers bad input: a stream
//! with no node, an unknown type URL, a request above tonic's default 4 MiB limit, authentication.

use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use winmesh::app::{self, Running};
use winmesh::config::Config;
use winmesh::xds::{SnapshotBuilder, SnapshotWriter, TypeUrl};

const T: Duration = Duration::from_secs(10);

async fn start(token: Option<&str>) -> (Running, SnapshotWriter, Option<tempfile::TempDir>) {
    let mut cfg = Config::default();
    cfg.xds.listen = "127.0.0.1:0".parse().unwrap();
    cfg.debug.listen = "127.0.0.1:0".parse().unwrap();
    let dir = token.map(|t| {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("token"), t).unwrap();
        cfg.xds.token_file = Some(d.path().join("token"));
        d
    });
    let (running, mut writer) = app::start(&cfg).await.unwrap();
    let mut b = SnapshotBuilder::new();
    for name in ["a", "b"] {
        b.add(&Cluster {
            name: name.into(),
            ..Default::default()
        })
        .unwrap();
    }
    b.add(&Secret {
        name: "default".into(),
        r#type: None,
    })
    .unwrap();
    writer.publish(b.build());
    (running, writer, dir)
}

fn node() -> Node {
    Node {
        id: "test-node".into(),
        ..Default::default()
    }
}

async fn client(r: &Running) -> AggregatedDiscoveryServiceClient<tonic::transport::Channel> {
    AggregatedDiscoveryServiceClient::connect(format!("http://{}", r.xds_addr))
        .await
        .unwrap()
        .max_decoding_message_size(64 << 20)
}

/// Opens a SotW ADS stream, sends `first`, returns the sender and the response stream.
async fn sotw(
    r: &Running,
    first: DiscoveryRequest,
) -> (
    mpsc::Sender<DiscoveryRequest>,
    Result<tonic::Streaming<DiscoveryResponse>, tonic::Status>,
) {
    let (tx, rx) = mpsc::channel(4);
    tx.send(first).await.unwrap();
    let resp = client(r)
        .await
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await
        .map(|r| r.into_inner());
    (tx, resp)
}

async fn next<T>(s: &mut tonic::Streaming<T>) -> Result<Option<T>, tonic::Status> {
    tokio::time::timeout(T, s.message())
        .await
        .expect("timely answer")
}

#[tokio::test]
async fn missing_node_closes_only_that_stream() {
    let (r, _w, _d) = start(None).await;
    let (_tx, resp) = sotw(
        &r,
        DiscoveryRequest {
            type_url: TypeUrl::Cluster.as_str().into(),
            ..Default::default()
        },
    )
    .await;
    let err = next(&mut resp.unwrap()).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("node"), "{}", err.message());
    assert_eq!(
        r.metrics.value(
            "winmesh_xds_stream_errors_total",
            &[("reason", "missing_node")]
        ),
        Some(1.0)
    );
    // The server goes on serving other streams.
    let (_tx, resp) = sotw(
        &r,
        DiscoveryRequest {
            node: Some(node()),
            type_url: TypeUrl::Cluster.as_str().into(),
            ..Default::default()
        },
    )
    .await;
    let msg = next(&mut resp.unwrap()).await.unwrap().unwrap();
    let names: Vec<String> = msg
        .resources
        .iter()
        .map(|a| Cluster::decode(a.value.as_slice()).unwrap().name)
        .collect();
    assert_eq!(names, vec!["a", "b"]);
    assert_eq!(msg.type_url, TypeUrl::Cluster.as_str());
    assert!(!msg.nonce.is_empty() && !msg.version_info.is_empty());
    r.stop().await;
}

#[tokio::test]
async fn unknown_type_url_is_an_invalid_argument() {
    let (r, _w, _d) = start(None).await;
    let (_tx, resp) = sotw(
        &r,
        DiscoveryRequest {
            node: Some(node()),
            type_url: "type.googleapis.com/envoy.config.cluster.v2.Cluster".into(),
            ..Default::default()
        },
    )
    .await;
    let err = next(&mut resp.unwrap()).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("v2.Cluster"));
    assert_eq!(
        r.metrics.value(
            "winmesh_xds_stream_errors_total",
            &[("reason", "unknown_type_url")]
        ),
        Some(1.0)
    );
    // An ADS request without a type URL is rejected too.
    let (_tx, resp) = sotw(
        &r,
        DiscoveryRequest {
            node: Some(node()),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(
        next(&mut resp.unwrap()).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    r.stop().await;
}

#[tokio::test]
async fn delta_request_above_four_mib_is_accepted() {
    let (r, _w, _d) = start(None).await;
    // ~6 MiB of initial_resource_versions, as a large mesh reconnecting would send.
    let initial: std::collections::HashMap<String, String> = (0..60_000)
        .map(|i| {
            (
                format!("outbound|8080||service-{i:06}.namespace.svc.cluster.local"),
                "0123456789abcdef0123456789abcdef".to_string(),
            )
        })
        .collect();
    let req = DeltaDiscoveryRequest {
        node: Some(node()),
        type_url: TypeUrl::Cluster.as_str().into(),
        initial_resource_versions: initial,
        ..Default::default()
    };
    assert!(req.encoded_len() > 5 << 20, "{}", req.encoded_len());
    let (tx, rx) = mpsc::channel(4);
    tx.send(req).await.unwrap();
    let mut s = client(&r)
        .await
        .delta_aggregated_resources(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let resp: DeltaDiscoveryResponse = next(&mut s).await.unwrap().unwrap();
    let mut names: Vec<&str> = resp.resources.iter().map(|r| r.name.as_str()).collect();
    names.sort();
    assert_eq!(names, vec!["a", "b"]);
    // Every name the client claimed to have that does not exist is removed.
    assert_eq!(resp.removed_resources.len(), 60_000);
    r.stop().await;
}

#[tokio::test]
async fn sds_stream_serves_secrets() {
    let (r, _w, _d) = start(None).await;
    let (tx, rx) = mpsc::channel(4);
    tx.send(DiscoveryRequest {
        node: Some(node()),
        type_url: TypeUrl::Secret.as_str().into(),
        resource_names: vec!["default".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let mut s = SecretDiscoveryServiceClient::connect(format!("http://{}", r.xds_addr))
        .await
        .unwrap()
        .stream_secrets(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let resp = next(&mut s).await.unwrap().unwrap();
    assert_eq!(
        Secret::decode(resp.resources[0].value.as_slice())
            .unwrap()
            .name,
        "default"
    );
    r.stop().await;
}

#[tokio::test]
async fn a_token_protected_server_refuses_streams_without_it() {
    let (r, _w, _d) = start(Some("s3cret")).await;
    let (_tx, resp) = sotw(
        &r,
        DiscoveryRequest {
            node: Some(node()),
            type_url: TypeUrl::Cluster.as_str().into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(resp.unwrap_err().code(), Code::Unauthenticated);

    let (tx, rx) = mpsc::channel(4);
    tx.send(DiscoveryRequest {
        node: Some(node()),
        type_url: TypeUrl::Cluster.as_str().into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut req = tonic::Request::new(ReceiverStream::new(rx));
    req.metadata_mut()
        .insert("authorization", "Bearer s3cret".parse().unwrap());
    let mut s = client(&r)
        .await
        .stream_aggregated_resources(req)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next(&mut s).await.unwrap().unwrap().resources.len(), 2);
    r.stop().await;
}

#[tokio::test]
async fn an_oversized_request_fails_its_stream_only() {
    let (cache, mut writer) = winmesh::xds::snapshot_cache();
    let mut b = SnapshotBuilder::new();
    b.add(&Cluster {
        name: "a".into(),
        ..Default::default()
    })
    .unwrap();
    writer.publish(b.build());
    let metrics = std::sync::Arc::new(winmesh::metrics::Metrics::new());
    let server = winmesh::xds::server::XdsServer::new(
        cache,
        winmesh::xds::clients::ClientRegistry::new(),
        metrics.clone(),
        None,
    )
    .with_max_decode(64 * 1024);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(winmesh::xds::server::serve(
        listener,
        server,
        std::future::pending(),
    ));
    let mut c = AggregatedDiscoveryServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let (tx, rx) = mpsc::channel(4);
    tx.send(DeltaDiscoveryRequest {
        node: Some(node()),
        type_url: TypeUrl::Cluster.as_str().into(),
        resource_names_subscribe: (0..10_000).map(|i| format!("cluster-{i:05}")).collect(),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut s = c
        .delta_aggregated_resources(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let err = next(&mut s).await.unwrap_err();
    assert!(
        matches!(
            err.code(),
            Code::OutOfRange | Code::ResourceExhausted | Code::Internal
        ),
        "{err:?}"
    );
    assert_eq!(
        metrics.value(
            "winmesh_xds_stream_errors_total",
            &[("reason", "bad_request")]
        ),
        Some(1.0)
    );
    // A normal stream on the same server still works.
    let (tx, rx) = mpsc::channel(4);
    tx.send(DiscoveryRequest {
        node: Some(node()),
        type_url: TypeUrl::Cluster.as_str().into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut s = c
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next(&mut s).await.unwrap().unwrap().resources.len(), 1);
    task.abort();
}

/// Connect storms: with a limit of one, a second proxy waits until the first one's initial push is
/// complete (everything ACKed), then gets its configuration.
#[tokio::test]
async fn initial_pushes_are_admitted_in_turn() {
    let (cache, mut writer) = winmesh::xds::snapshot_cache();
    let mut b = SnapshotBuilder::new();
    b.add(&Cluster {
        name: "a".into(),
        ..Default::default()
    })
    .unwrap();
    writer.publish(b.build());
    let server = winmesh::xds::server::XdsServer::new(
        cache,
        winmesh::xds::clients::ClientRegistry::new(),
        std::sync::Arc::new(winmesh::metrics::Metrics::new()),
        None,
    )
    .with_initial_push_limit(1);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(winmesh::xds::server::serve(
        listener,
        server,
        std::future::pending(),
    ));
    let cds = |nonce: &str| DiscoveryRequest {
        node: Some(node()),
        type_url: TypeUrl::Cluster.as_str().into(),
        response_nonce: nonce.into(),
        ..Default::default()
    };
    let mut c = AggregatedDiscoveryServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let (tx1, rx1) = mpsc::channel(4);
    tx1.send(cds("")).await.unwrap();
    let mut s1 = c
        .stream_aggregated_resources(ReceiverStream::new(rx1))
        .await
        .unwrap()
        .into_inner();
    let first = next(&mut s1).await.unwrap().unwrap();

    let (tx2, rx2) = mpsc::channel(4);
    tx2.send(cds("")).await.unwrap();
    let mut s2 = c
        .stream_aggregated_resources(ReceiverStream::new(rx2))
        .await
        .unwrap()
        .into_inner();
    // The second stream is not served while the first has an un-ACKed initial push.
    assert!(
        tokio::time::timeout(Duration::from_millis(500), s2.message())
            .await
            .is_err(),
        "second stream served before the first finished its initial push"
    );
    tx1.send(cds(&first.nonce)).await.unwrap();
    let second = next(&mut s2).await.unwrap().unwrap();
    assert_eq!(second.resources.len(), 1);
    task.abort();
}
