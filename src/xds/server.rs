//! Thin tonic services around the sans-IO stream machines: `AggregatedDiscoveryService` (SotW and
//! delta) and `SecretDiscoveryService` (SotW and delta). Each stream runs one task that feeds requests
//! and snapshot notifications into its machine and writes whatever the machine says is due.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};

use super::cache::{ResourceSnapshot, SnapshotCache};
use super::clients::ClientRegistry;
use super::delta::DeltaStream;
use super::grpc::LeanStreams;
use super::resources::TypeUrl;
use super::sotw::SotwStream;
use super::stream::{NodeInfo, RequestKind, StreamError, TypeStatus};
use super::wire::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use super::wire::sds::secret_discovery_service_server::{
    SecretDiscoveryService, SecretDiscoveryServiceServer,
};
use super::wire::{WireDeltaDiscoveryResponse, WireDiscoveryResponse};
use crate::metrics::Metrics;

/// Largest request accepted (tonic defaults to 4 MiB; delta `initial_resource_versions` of a large
/// mesh exceed that).
pub const MAX_DECODE_BYTES: usize = 16 * 1024 * 1024;

/// Shared state of the xDS services.
#[derive(Clone)]
pub struct XdsServer {
    cache: SnapshotCache,
    clients: Arc<ClientRegistry>,
    metrics: Arc<Metrics>,
    /// If set, every stream must carry `authorization: Bearer <token>`.
    token: Option<Arc<str>>,
    control_plane_id: Arc<str>,
    /// Streams end when this turns true, so a graceful server shutdown does not wait for proxies.
    shutdown: tokio::sync::watch::Receiver<bool>,
    max_decode: usize,
    /// Limits how many streams may be in their initial push at once (connect storms).
    admission: Arc<tokio::sync::Semaphore>,
}

/// Default number of streams that may receive their initial configuration at the same time.
pub const DEFAULT_INITIAL_PUSHES: usize = 100;

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

impl XdsServer {
    pub fn new(
        cache: SnapshotCache,
        clients: Arc<ClientRegistry>,
        metrics: Arc<Metrics>,
        token: Option<String>,
    ) -> Self {
        // Counters exist at zero from the start, so `rate()` and alerts see the first NACK.
        for t in TypeUrl::PUSH_ORDER {
            metrics.inc(
                "winmesh_xds_nacks_total",
                "xDS responses rejected by proxies.",
                &[("type", t.short())],
                0.0,
            );
        }
        XdsServer {
            cache,
            clients,
            metrics,
            token: token.map(Into::into),
            control_plane_id: format!("winmesh/{}", env!("CARGO_PKG_VERSION")).into(),
            shutdown: tokio::sync::watch::channel(false).1,
            max_decode: MAX_DECODE_BYTES,
            admission: Arc::new(tokio::sync::Semaphore::new(DEFAULT_INITIAL_PUSHES)),
        }
    }

    /// At most `n` streams receive their initial push concurrently; the others wait their turn, so a
    /// storm of reconnecting proxies does not make every push slow (istio#35263).
    pub fn with_initial_push_limit(mut self, n: usize) -> Self {
        self.admission = Arc::new(tokio::sync::Semaphore::new(n.max(1)));
        self
    }

    /// Overrides the request size limit (default [`MAX_DECODE_BYTES`]).
    pub fn with_max_decode(mut self, bytes: usize) -> Self {
        self.max_decode = bytes;
        self
    }

    /// Ends every stream when `shutdown` turns true.
    pub fn with_shutdown(mut self, shutdown: tokio::sync::watch::Receiver<bool>) -> Self {
        self.shutdown = shutdown;
        self
    }

    /// The ADS service with the raised decode limit and per-message response buffers.
    pub fn ads_service(&self) -> LeanStreams<AggregatedDiscoveryServiceServer<XdsServer>> {
        let inner = AggregatedDiscoveryServiceServer::new(self.clone())
            .max_decoding_message_size(self.max_decode)
            .max_encoding_message_size(usize::MAX);
        LeanStreams::new(inner, self.clone(), self.max_decode)
    }

    /// The SDS service with the raised decode limit and per-message response buffers.
    pub fn sds_service(&self) -> LeanStreams<SecretDiscoveryServiceServer<XdsServer>> {
        let inner = SecretDiscoveryServiceServer::new(self.clone())
            .max_decoding_message_size(self.max_decode)
            .max_encoding_message_size(usize::MAX);
        LeanStreams::new(inner, self.clone(), self.max_decode)
    }

    fn authorize<T>(&self, req: &Request<T>) -> Result<(), Status> {
        let Some(expected) = &self.token else {
            return Ok(());
        };
        let got = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if constant_time_eq(got.as_bytes(), expected.as_bytes()) {
            Ok(())
        } else {
            self.metrics.inc(
                "winmesh_xds_stream_errors_total",
                "xDS streams closed because of a protocol or authentication error.",
                &[("reason", "unauthenticated")],
                1.0,
            );
            warn!(peer = ?req.remote_addr(), "xDS stream rejected: missing or wrong bearer token");
            Err(Status::unauthenticated("missing or wrong bearer token"))
        }
    }

    fn spawn<M: Machine>(
        &self,
        machine: M,
        inbound: Streaming<M::Req>,
        peer: Option<SocketAddr>,
    ) -> BoxStream<M::Resp> {
        let (tx, rx) = mpsc::channel(8);
        let this = self.clone();
        tokio::spawn(async move { this.run(machine, inbound, tx, peer).await });
        Box::pin(ReceiverStream::new(rx))
    }

    async fn run<M: Machine>(
        self,
        mut machine: M,
        mut inbound: Streaming<M::Req>,
        tx: mpsc::Sender<Result<M::Resp, Status>>,
        peer: Option<SocketAddr>,
    ) {
        let mut notify = self.cache.subscribe();
        let shutdown = until_true(self.shutdown.clone());
        tokio::pin!(shutdown);
        let mut registration = None;
        let mut current: Option<Arc<ResourceSnapshot>> = None;
        // `None` before admission, `Some(Some(permit))` during the initial push, `Some(None)` after.
        let mut admitted: Option<Option<tokio::sync::OwnedSemaphorePermit>> = None;
        let m = &self.metrics;
        'stream: loop {
            tokio::select! {
                msg = inbound.message() => match msg {
                    Ok(Some(req)) => match machine.handle(&req, Instant::now()) {
                        Ok((t, kind)) => self.record(&machine, t, &kind),
                        Err(e) => {
                            self.stream_error(&e, peer);
                            let _ = tx.send(Err(to_status(&e))).await;
                            break 'stream;
                        }
                    },
                    Ok(None) => break 'stream,
                    Err(status) => {
                        use tonic::Code;
                        match status.code() {
                            // Undecodable or oversized requests: the peer's fault, worth a warning.
                            Code::Internal | Code::OutOfRange | Code::ResourceExhausted | Code::InvalidArgument => {
                                warn!(?peer, %status, "closing xDS stream: bad request");
                                m.inc(
                                    "winmesh_xds_stream_errors_total",
                                    "xDS streams closed because of a protocol or authentication error.",
                                    &[("reason", "bad_request")],
                                    1.0,
                                );
                                let _ = tx.send(Err(status)).await;
                            }
                            _ => debug!(?peer, %status, "xDS stream ended"),
                        }
                        break 'stream;
                    }
                },
                changed = notify.changed() => {
                    if changed.is_err() {
                        break 'stream;
                    }
                }
                _ = tx.closed() => break 'stream,
                _ = &mut shutdown => break 'stream,
            }
            let Some(node) = machine.node().cloned() else {
                continue;
            };
            if registration.is_none() {
                info!(node = %node.id, envoy = %node.envoy_version, ?peer, service = M::SERVICE,
                      mode = M::MODE, "proxy connected");
                m.add(
                    "winmesh_xds_connected_proxies",
                    "Connected xDS streams.",
                    &[("service", M::SERVICE)],
                    1.0,
                );
                registration = Some(self.clients.register(&node, peer, M::SERVICE, M::MODE));
            }
            notify.borrow_and_update();
            if admitted.is_none() {
                let permit = tokio::select! {
                    p = self.admission.clone().acquire_owned() => p.ok(),
                    _ = &mut shutdown => break 'stream,
                    _ = tx.closed() => break 'stream,
                };
                admitted = Some(permit);
            }
            if let Some(snap) = self.cache.snapshot_for(&node.id)
                && !current.as_ref().is_some_and(|c| Arc::ptr_eq(c, &snap))
            {
                machine.set_snapshot(snap.clone());
                current = Some(snap);
            }
            while let Some((t, resp)) = machine.next(Instant::now()) {
                let size = M::encoded_len(&resp) as f64;
                m.inc(
                    "winmesh_xds_pushes_total",
                    "xDS responses sent.",
                    &[("type", t.short())],
                    1.0,
                );
                m.inc(
                    "winmesh_xds_push_bytes_total",
                    "Bytes of xDS responses sent.",
                    &[("type", t.short())],
                    size,
                );
                if tx.send(Ok(resp)).await.is_err() {
                    break 'stream;
                }
            }
            if let Some(r) = &registration {
                r.update(machine.status());
            }
            if machine.idle()
                && let Some(slot) = admitted.as_mut()
                && slot.take().is_some()
            {
                debug!(node = %node.id, "initial push complete");
            }
        }
        if let Some(node) = machine.node() {
            info!(node = %node.id, ?peer, service = M::SERVICE, "proxy disconnected");
        }
        if registration.take().is_some() {
            m.add(
                "winmesh_xds_connected_proxies",
                "Connected xDS streams.",
                &[("service", M::SERVICE)],
                -1.0,
            );
        }
    }

    fn record<M: Machine>(&self, machine: &M, t: TypeUrl, kind: &RequestKind) {
        let m = &self.metrics;
        let node = machine.node().map(|n| n.id.as_str()).unwrap_or("");
        match kind {
            RequestKind::Ack { latency } => m.observe(
                "winmesh_xds_push_to_ack_seconds",
                "Time from sending an xDS response to its ACK or NACK.",
                &[("type", t.short())],
                latency.as_secs_f64(),
            ),
            RequestKind::Nack { latency, message } => {
                // `message` was made printable (escaped, capped) when the NACK was recorded.
                let shown = super::peertext::printable(message, super::peertext::MAX_LOGGED);
                warn!(node, r#type = t.short(), error = %shown, "proxy rejected config (NACK); keeping last good config");
                m.inc(
                    "winmesh_xds_nacks_total",
                    "xDS responses rejected by proxies.",
                    &[("type", t.short())],
                    1.0,
                );
                m.observe(
                    "winmesh_xds_push_to_ack_seconds",
                    "Time from sending an xDS response to its ACK or NACK.",
                    &[("type", t.short())],
                    latency.as_secs_f64(),
                );
            }
            RequestKind::Stale => m.inc(
                "winmesh_xds_expired_nonce_total",
                "Requests carrying a nonce other than the outstanding one.",
                &[("type", t.short())],
                1.0,
            ),
            RequestKind::Initial => {
                debug!(node, r#type = t.short(), "subscription request")
            }
        }
    }

    fn stream_error(&self, e: &StreamError, peer: Option<SocketAddr>) {
        let reason = match e {
            StreamError::MissingNode | StreamError::EmptyNodeId => "missing_node",
            StreamError::BadNodeId => "bad_node",
            StreamError::TooManyNames => "too_many_names",
            StreamError::MissingTypeUrl => "missing_type_url",
            StreamError::UnknownTypeUrl(_) => "unknown_type_url",
            StreamError::WrongTypeUrl { .. } => "wrong_type_url",
        };
        warn!(?peer, error = %e, "closing xDS stream");
        self.metrics.inc(
            "winmesh_xds_stream_errors_total",
            "xDS streams closed because of a protocol or authentication error.",
            &[("reason", reason)],
            1.0,
        );
    }
}

/// Resolves once the flag is true (never, if its sender is gone while false).
async fn until_true(mut rx: tokio::sync::watch::Receiver<bool>) {
    loop {
        if *rx.borrow_and_update() {
            return;
        }
        if rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// The only place a stream error becomes a gRPC status.
fn to_status(e: &StreamError) -> Status {
    Status::invalid_argument(e.to_string())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// What the stream loop needs from a state machine.
trait Machine: Send + 'static {
    type Req: prost::Message + Default + Send + 'static;
    type Resp: prost::Message + Send + 'static;
    const SERVICE: &'static str;
    const MODE: &'static str;
    fn handle(
        &mut self,
        req: &Self::Req,
        now: Instant,
    ) -> Result<(TypeUrl, RequestKind), StreamError>;
    fn next(&mut self, now: Instant) -> Option<(TypeUrl, Self::Resp)>;
    fn set_snapshot(&mut self, s: Arc<ResourceSnapshot>);
    fn node(&self) -> Option<&NodeInfo>;
    fn status(&self) -> Vec<TypeStatus>;
    fn idle(&self) -> bool;
    fn encoded_len(r: &Self::Resp) -> usize {
        prost::Message::encoded_len(r)
    }
}

struct Sotw<const SDS: bool>(SotwStream);
struct Delta<const SDS: bool>(DeltaStream);

impl<const SDS: bool> Machine for Sotw<SDS> {
    type Req = DiscoveryRequest;
    type Resp = WireDiscoveryResponse;
    const SERVICE: &'static str = if SDS { "SDS" } else { "ADS" };
    const MODE: &'static str = "SotW";
    fn handle(
        &mut self,
        req: &DiscoveryRequest,
        now: Instant,
    ) -> Result<(TypeUrl, RequestKind), StreamError> {
        self.0.handle_request(req, now)
    }
    fn next(&mut self, now: Instant) -> Option<(TypeUrl, WireDiscoveryResponse)> {
        self.0.next_response(now)
    }
    fn set_snapshot(&mut self, s: Arc<ResourceSnapshot>) {
        self.0.set_snapshot(s)
    }
    fn node(&self) -> Option<&NodeInfo> {
        self.0.node()
    }
    fn status(&self) -> Vec<TypeStatus> {
        self.0.status()
    }
    fn idle(&self) -> bool {
        self.0.idle()
    }
}

impl<const SDS: bool> Machine for Delta<SDS> {
    type Req = DeltaDiscoveryRequest;
    type Resp = WireDeltaDiscoveryResponse;
    const SERVICE: &'static str = if SDS { "SDS" } else { "ADS" };
    const MODE: &'static str = "Delta";
    fn handle(
        &mut self,
        req: &DeltaDiscoveryRequest,
        now: Instant,
    ) -> Result<(TypeUrl, RequestKind), StreamError> {
        self.0.handle_request(req, now)
    }
    fn next(&mut self, now: Instant) -> Option<(TypeUrl, WireDeltaDiscoveryResponse)> {
        self.0.next_response(now)
    }
    fn set_snapshot(&mut self, s: Arc<ResourceSnapshot>) {
        self.0.set_snapshot(s)
    }
    fn node(&self) -> Option<&NodeInfo> {
        self.0.node()
    }
    fn status(&self) -> Vec<TypeStatus> {
        self.0.status()
    }
    fn idle(&self) -> bool {
        self.0.idle()
    }
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for XdsServer {
    type StreamAggregatedResourcesStream = BoxStream<WireDiscoveryResponse>;
    type DeltaAggregatedResourcesStream = BoxStream<WireDeltaDiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        self.authorize(&request)?;
        let peer = request.remote_addr();
        let m = Sotw::<false>(SotwStream::new_ads(&self.control_plane_id));
        Ok(Response::new(self.spawn(m, request.into_inner(), peer)))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        self.authorize(&request)?;
        let peer = request.remote_addr();
        let m = Delta::<false>(DeltaStream::new_ads(&self.control_plane_id));
        Ok(Response::new(self.spawn(m, request.into_inner(), peer)))
    }
}

#[tonic::async_trait]
impl SecretDiscoveryService for XdsServer {
    type StreamSecretsStream = BoxStream<WireDiscoveryResponse>;
    type DeltaSecretsStream = BoxStream<WireDeltaDiscoveryResponse>;

    async fn stream_secrets(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamSecretsStream>, Status> {
        self.authorize(&request)?;
        let peer = request.remote_addr();
        let m = Sotw::<true>(SotwStream::new_sds(&self.control_plane_id));
        Ok(Response::new(self.spawn(m, request.into_inner(), peer)))
    }

    async fn delta_secrets(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaSecretsStream>, Status> {
        self.authorize(&request)?;
        let peer = request.remote_addr();
        let m = Delta::<true>(DeltaStream::new_sds(&self.control_plane_id));
        Ok(Response::new(self.spawn(m, request.into_inner(), peer)))
    }
}

/// Serves ADS and SDS on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    server: XdsServer,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    // tonic's own `tcp_nodelay`/`tcp_keepalive` settings do not apply to an incoming stream we
    // hand it, so each accepted connection is configured here.
    let incoming = futures::stream::unfold(listener, |l| async move {
        let r = l.accept().await.map(|(s, _)| configure_accepted(s));
        Some((r, l))
    });
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(10)))
        .add_service(server.ads_service())
        .add_service(server.sds_service())
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}

/// Backlog of the xDS listener: a thousand proxies reconnecting at once must not be reset.
pub const LISTEN_BACKLOG: u32 = 4096;

/// TCP_NODELAY (a push is one burst of small HTTP/2 frames; Nagle delayed the first config by tens
/// of milliseconds) and TCP keepalive (a proxy that vanished without a FIN is noticed) on an
/// accepted xDS connection.
pub fn configure_accepted(s: tokio::net::TcpStream) -> tokio::net::TcpStream {
    if let Err(e) = s.set_nodelay(true) {
        debug!(error = %e, "cannot set TCP_NODELAY");
    }
    let ka = socket2::TcpKeepalive::new()
        .with_time(std::time::Duration::from_secs(30))
        .with_interval(std::time::Duration::from_secs(10));
    if let Err(e) = socket2::SockRef::from(&s).set_tcp_keepalive(&ka) {
        debug!(error = %e, "cannot set TCP keepalive");
    }
    s
}

/// Binds the xDS listener with [`LISTEN_BACKLOG`].
pub fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // On Windows SO_REUSEADDR would let another process bind the same port: Unix only.
    #[cfg(unix)]
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

#[cfg(test)]
mod accept_tests {
    use super::*;

    #[test]
    fn nack_counters_exist_at_zero_from_the_start() {
        let metrics = Arc::new(Metrics::new());
        let (cache, _w) = crate::xds::cache::snapshot_cache();
        let _s = XdsServer::new(
            cache,
            Arc::new(ClientRegistry::default()),
            metrics.clone(),
            None,
        );
        for t in TypeUrl::PUSH_ORDER {
            assert_eq!(
                metrics.value("winmesh_xds_nacks_total", &[("type", t.short())]),
                Some(0.0)
            );
        }
        assert!(
            metrics
                .render()
                .contains("winmesh_xds_nacks_total{type=\"LDS\"} 0")
        );
    }

    #[tokio::test]
    async fn accepted_connections_get_nodelay_and_keepalive() {
        let l = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = l.local_addr().unwrap();
        let client = tokio::spawn(tokio::net::TcpStream::connect(addr));
        let (s, _) = l.accept().await.unwrap();
        let s = configure_accepted(s);
        assert!(s.nodelay().unwrap());
        assert!(socket2::SockRef::from(&s).keepalive().unwrap());
        drop(client.await);
    }
}
