//! The HTTP/2 side of the four xDS streaming methods, with a response body that allocates per
//! message.
//!
//! tonic's generated server encodes responses through `EncodeBody`, which keeps one `BytesMut` per
//! stream and hands every message out as a slice of it (tonic 0.14, `codec/encode.rs`). That
//! allocation never shrinks: a stream that once carried a 1 MB EDS response keeps about 1–2 MB alive
//! until it ends, which at 1,000 Envoy streams is gigabytes held for nothing. Here each response is
//! framed into a buffer of exactly its size (5-byte gRPC prefix + message) that is freed as soon as
//! HTTP/2 has written it. Requests are still decoded by tonic's `Streaming`, and the handlers are the
//! generated traits' own methods, so authorization, peer addresses and errors behave as before.
//! Any other path falls through to the generated service (which answers UNIMPLEMENTED).

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use http_body::Frame;
use tonic::body::Body;
use tonic::codec::{Codec, Streaming};
use tonic::codegen::http;
use tonic::server::NamedService;
use tonic::{Code, Status};

use super::server::XdsServer;
use super::wire::aggregated_discovery_service_server::AggregatedDiscoveryService;
use super::wire::sds::secret_discovery_service_server::SecretDiscoveryService;

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send + 'static>>;

const ADS_SOTW: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources";
const ADS_DELTA: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";
const SDS_SOTW: &str = "/envoy.service.secret.v3.SecretDiscoveryService/StreamSecrets";
const SDS_DELTA: &str = "/envoy.service.secret.v3.SecretDiscoveryService/DeltaSecrets";

/// Wraps a generated service `S`; the xDS methods it names are served with per-message buffers.
#[derive(Clone)]
pub struct LeanStreams<S> {
    inner: S,
    server: XdsServer,
    max_decode: usize,
}

impl<S> LeanStreams<S> {
    pub fn new(inner: S, server: XdsServer, max_decode: usize) -> Self {
        LeanStreams {
            inner,
            server,
            max_decode,
        }
    }
}

impl<S: NamedService> NamedService for LeanStreams<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> tonic::codegen::Service<http::Request<Body>> for LeanStreams<S>
where
    S: tonic::codegen::Service<
            http::Request<Body>,
            Response = http::Response<Body>,
            Error = Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<http::Response<Body>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let path = req.uri().path().to_string();
        let (server, max) = (self.server.clone(), self.max_decode);
        match path.as_str() {
            ADS_SOTW => Box::pin(async move {
                let req = request(req, max);
                Ok(respond(server.stream_aggregated_resources(req).await))
            }),
            ADS_DELTA => Box::pin(async move {
                let req = request(req, max);
                Ok(respond(server.delta_aggregated_resources(req).await))
            }),
            SDS_SOTW => Box::pin(async move {
                let req = request(req, max);
                Ok(respond(server.stream_secrets(req).await))
            }),
            SDS_DELTA => Box::pin(async move {
                let req = request(req, max);
                Ok(respond(server.delta_secrets(req).await))
            }),
            _ => Box::pin(self.inner.call(req)),
        }
    }
}

/// The request as the generated code would hand it to the handler: headers become metadata, the
/// connection's extensions (peer address) are kept, the body is decoded message by message.
fn request<M>(req: http::Request<Body>, max_decode: usize) -> tonic::Request<Streaming<M>>
where
    M: prost::Message + Default + Send + 'static,
{
    let (parts, body) = req.into_parts();
    let mut codec = tonic_prost::ProstCodec::<(), M>::default();
    let stream = Streaming::new_request(codec.decoder(), body, None, Some(max_decode));
    tonic::Request::from_http(http::Request::from_parts(parts, stream))
}

type Messages<M> = Pin<Box<dyn Stream<Item = Result<M, Status>> + Send + 'static>>;

fn respond<M>(r: Result<tonic::Response<Messages<M>>, Status>) -> http::Response<Body>
where
    M: prost::Message + Send + 'static,
{
    let messages = match r {
        Ok(resp) => resp.into_inner(),
        // A refused stream (e.g. a missing token) is a trailers-only response, as tonic sends it.
        Err(status) => return status.into_http(),
    };
    let frames = futures::stream::unfold(Some(messages), |state| async move {
        let mut messages = state?;
        let frame = match messages.next().await {
            Some(Ok(m)) => match frame(&m) {
                Ok(bytes) => return Some((Ok(Frame::data(bytes)), Some(messages))),
                Err(status) => trailers(&status),
            },
            Some(Err(status)) => trailers(&status),
            None => trailers(&Status::new(Code::Ok, "")),
        };
        Some((Ok::<_, Status>(frame), None))
    });
    let mut resp = http::Response::new(Body::new(http_body_util::StreamBody::new(frames)));
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    resp
}

/// One length-prefixed gRPC message (uncompressed), in a buffer of exactly its size.
fn frame<M: prost::Message>(m: &M) -> Result<Bytes, Status> {
    let len = m.encoded_len();
    let prefix = u32::try_from(len).map_err(|_| {
        Status::resource_exhausted(format!(
            "response of {len} bytes exceeds gRPC's 4 GiB limit"
        ))
    })?;
    let mut buf = Vec::with_capacity(5 + len);
    buf.push(0);
    buf.extend_from_slice(&prefix.to_be_bytes());
    m.encode_raw(&mut buf);
    Ok(Bytes::from(buf))
}

fn trailers(status: &Status) -> Frame<Bytes> {
    let mut h = http::HeaderMap::new();
    if status.add_header(&mut h).is_err() {
        h.insert("grpc-status", http::HeaderValue::from_static("13"));
    }
    Frame::trailers(h)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xds::wire::{WireAny, WireDiscoveryResponse};

    #[test]
    fn a_frame_is_exactly_prefix_and_message() {
        let m = WireDiscoveryResponse {
            version_info: "v1".into(),
            resources: vec![WireAny {
                type_url: Bytes::from_static(b"t"),
                value: Bytes::from(vec![7u8; 1000]),
            }],
            ..Default::default()
        };
        let f = frame(&m).unwrap();
        let len = prost::Message::encoded_len(&m);
        assert_eq!(f.len(), 5 + len);
        assert_eq!(f[0], 0, "uncompressed");
        assert_eq!(u32::from_be_bytes([f[1], f[2], f[3], f[4]]) as usize, len);
        let back: WireDiscoveryResponse = prost::Message::decode(&f[5..]).unwrap();
        assert_eq!(back, m);
    }

    #[tokio::test]
    async fn a_stream_ends_with_the_status_in_trailers() {
        use http_body_util::BodyExt;
        let items: Vec<Result<WireDiscoveryResponse, Status>> = vec![
            Ok(WireDiscoveryResponse::default()),
            Err(Status::invalid_argument("no node")),
        ];
        let resp = respond(Ok(tonic::Response::new(
            Box::pin(futures::stream::iter(items)) as Messages<WireDiscoveryResponse>,
        )));
        assert_eq!(resp.headers()["content-type"], "application/grpc");
        let mut body = resp.into_body();
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap().len(), 5);
        let last = body.frame().await.unwrap().unwrap();
        let t = last.into_trailers().unwrap();
        assert_eq!(t["grpc-status"], "3");
        assert!(body.frame().await.is_none());
    }
}
