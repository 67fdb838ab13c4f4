//! A test istiod CA: the real `IstioCertificateService` proto over TLS, with a serving certificate for
//! `istiod.istio-system.svc`. Like istiod it authenticates the bearer token (the identity comes from
//! the token only), rejects unknown `clusterid`s and TTLs above 90 days, and answers
//! `[leaf, intermediate, root bundle]` where the bundle holds two roots. It can be told to fail.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tonic::transport::{Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status};
use winmesh::identity::SpiffeId;
use winmesh::identity::dev_ca::DevCa;
use winmesh::identity::pb::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer,
};
use winmesh::identity::pb::{IstioCertificateRequest, IstioCertificateResponse};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Normal,
    Unavailable,
    Internal,
    Unauthenticated,
    /// Two elements that are not certificates.
    Garbage,
    /// A valid chain for another identity.
    WrongSan,
    /// A chain that expired already.
    Expired,
    /// Only the leaf, no root.
    ShortChain,
}

#[derive(Default, Debug)]
pub struct Seen {
    pub calls: usize,
    pub tokens: Vec<String>,
    pub cluster_ids: Vec<String>,
    pub ttls: Vec<i64>,
    /// `metadata.CertSigner` of each request (`None`: no metadata, or no such field).
    pub cert_signers: Vec<Option<String>>,
}

pub struct FakeIstiod {
    pub addr: SocketAddr,
    review: Arc<Mutex<Option<TokenReview>>>,
    /// Mesh root bundle (both roots) for clients to trust.
    pub root_pem: String,
    pub mode: Arc<Mutex<Mode>>,
    pub seen: Arc<Mutex<Seen>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeIstiod {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Stands in for istiod's TokenReview: a token not in the fixed map is asked about here.
pub type TokenReview = Arc<dyn Fn(&str) -> Option<SpiffeId> + Send + Sync>;

struct Svc {
    ca: DevCa,
    tokens: HashMap<String, SpiffeId>,
    review: Arc<Mutex<Option<TokenReview>>>,
    cluster_id: String,
    mode: Arc<Mutex<Mode>>,
    seen: Arc<Mutex<Seen>>,
}

#[tonic::async_trait]
impl IstioCertificateService for Svc {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let md = request.metadata();
        let token = md
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("")
            .to_string();
        let cluster = md
            .get("clusterid")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let req = request.into_inner();
        {
            let mut s = self.seen.lock().unwrap();
            s.calls += 1;
            s.tokens.push(token.clone());
            s.cluster_ids.push(cluster.clone());
            s.ttls.push(req.validity_duration);
            s.cert_signers.push(
                req.metadata
                    .as_ref()
                    .and_then(|m| m.fields.get("CertSigner"))
                    .and_then(|v| match &v.kind {
                        Some(prost_types::value::Kind::StringValue(x)) => Some(x.clone()),
                        _ => None,
                    }),
            );
        }
        let mode = *self.mode.lock().unwrap();
        match mode {
            Mode::Unavailable => return Err(Status::unavailable("istiod is restarting")),
            Mode::Internal => return Err(Status::internal("CA not ready")),
            Mode::Unauthenticated => return Err(Status::unauthenticated("authenticate failure")),
            _ => {}
        }
        if !cluster.is_empty() && cluster != self.cluster_id {
            return Err(Status::unauthenticated(format!(
                "client claims to be in cluster {cluster:?}, but we only know about local cluster {:?}",
                self.cluster_id
            )));
        }
        let reviewed = self.review.lock().unwrap().as_ref().and_then(|r| r(&token));
        let Some(id) = self.tokens.get(&token).cloned().or(reviewed) else {
            return Err(Status::unauthenticated(
                "authenticate failure [token invalid]",
            ));
        };
        let id = &id;
        if req.validity_duration <= 0 || req.validity_duration > 90 * 86400 {
            return Err(Status::invalid_argument(
                "requested TTL is greater than the max allowed TTL",
            ));
        }
        let ttl = Duration::from_secs(req.validity_duration as u64);
        let now = SystemTime::now();
        let sign = |id: &SpiffeId, ttl, now| {
            self.ca
                .sign_csr(&req.csr, id, ttl, now)
                .map_err(|e| Status::invalid_argument(e.to_string()))
        };
        let chain = match mode {
            Mode::Garbage => vec!["not a certificate".into(), "neither".into()],
            Mode::WrongSan => sign(
                &SpiffeId::parse("spiffe://cluster.local/ns/evil/sa/mallory").unwrap(),
                ttl,
                now,
            )?,
            Mode::Expired => sign(id, Duration::from_secs(10), now - Duration::from_secs(3600))?,
            Mode::ShortChain => sign(id, ttl, now)?[..1].to_vec(),
            _ => sign(id, ttl, now)?,
        };
        Ok(Response::new(IstioCertificateResponse {
            cert_chain: chain,
        }))
    }
}

impl FakeIstiod {
    /// `tokens` maps bearer tokens to the identity istiod would derive from them.
    pub async fn start(tokens: &[(&str, &str)], server_name: &str) -> FakeIstiod {
        let root = DevCa::new_root("cluster.local").unwrap();
        let second_root = DevCa::new_root("cluster.local").unwrap();
        let ca = root
            .intermediate("istiod intermediate")
            .unwrap()
            .with_extra_root(second_root.cert_pem());
        let (key, chain) = ca
            .issue_server(server_name, Duration::from_secs(3600))
            .unwrap();
        let root_pem = ca.roots_pem();
        let mode = Arc::new(Mutex::new(Mode::Normal));
        let seen = Arc::new(Mutex::new(Seen::default()));
        let review: Arc<Mutex<Option<TokenReview>>> = Arc::new(Mutex::new(None));
        let svc = Svc {
            review: review.clone(),
            ca,
            tokens: tokens
                .iter()
                .map(|(t, id)| (t.to_string(), SpiffeId::parse(id).unwrap()))
                .collect(),
            cluster_id: "Kubernetes".into(),
            mode: mode.clone(),
            seen: seen.clone(),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let tls = ServerTlsConfig::new().identity(Identity::from_pem(chain, key.expose()));
        let task = tokio::spawn(async move {
            let _ = Server::builder()
                .tls_config(tls)
                .unwrap()
                .add_service(IstioCertificateServiceServer::new(svc))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await;
        });
        FakeIstiod {
            addr,
            review,
            root_pem,
            mode,
            seen,
            task,
        }
    }

    /// Tokens outside the fixed map are reviewed by `r` (as istiod asks the API server).
    pub fn set_token_review(&self, r: TokenReview) {
        *self.review.lock().unwrap() = Some(r);
    }

    pub fn set_mode(&self, m: Mode) {
        *self.mode.lock().unwrap() = m;
    }

    pub fn calls(&self) -> usize {
        self.seen.lock().unwrap().calls
    }
}
