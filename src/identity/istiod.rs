//! Client for istiod's CA (`istio.v1.auth.IstioCertificateService/CreateCertificate`), as istio-agent
//! calls it: TLS trusting the mesh root from a file and verifying istiod's name
//! (`istiod.istio-system.svc`), `authorization: Bearer <token>` re-read from its file on every call, and
//! the `clusterid` header.

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::future::BoxFuture;
use tonic::Code;
use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

use super::SpiffeId;
use super::pb::IstioCertificateRequest;
use super::pb::istio_certificate_service_client::IstioCertificateServiceClient;

/// A failed signing attempt: the gRPC code (or the local equivalent) and why.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("{code:?}: {message}")]
pub struct CaError {
    pub code: Code,
    pub message: String,
}

impl CaError {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        CaError {
            code,
            message: message.into(),
        }
    }
}

/// One certificate request.
#[derive(Debug, Clone)]
pub struct SignRequest {
    pub identity: SpiffeId,
    pub csr_pem: String,
    pub ttl: Duration,
    /// Token proving the identity (istiod); unused by the dev CA.
    pub token_file: Option<PathBuf>,
    /// Mints the token instead (TokenRequest); takes precedence over `token_file`.
    pub minter: Option<super::token::Minter>,
    pub now: std::time::SystemTime,
}

/// Something that signs CSRs and answers with istiod's `cert_chain` layout.
pub trait CaBackend: Send + Sync + 'static {
    fn sign(&self, req: SignRequest) -> BoxFuture<'_, Result<Vec<String>, CaError>>;
    /// Short description for logs and `/debug/certs`.
    fn describe(&self) -> String;
}

/// `{"CertSigner": signer}` as a protobuf Struct.
pub fn cert_signer_metadata(signer: &str) -> prost_types::Struct {
    prost_types::Struct {
        fields: [(
            "CertSigner".to_string(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::StringValue(signer.to_string())),
            },
        )]
        .into(),
    }
}

/// The istiod CA client.
#[derive(Debug, Clone)]
pub struct IstiodCa {
    pub address: String,
    pub server_name: String,
    pub root_cert_file: PathBuf,
    pub cluster_id: String,
    pub timeout: Duration,
    /// Sent as `metadata.CertSigner`, as istio-agent sends `ISTIO_META_CERT_SIGNER` (or ""): istiod's
    /// Kubernetes RA picks the signer by it.
    pub cert_signer: String,
}

fn read(path: &Path, what: &str) -> Result<String, CaError> {
    std::fs::read_to_string(path).map_err(|e| {
        CaError::new(
            Code::FailedPrecondition,
            format!("cannot read {what} {}: {e}", path.display()),
        )
    })
}

impl IstiodCa {
    async fn token(req: &SignRequest) -> Result<String, CaError> {
        if let Some(m) = &req.minter {
            let t = m.0.token().await?;
            if t.trim().is_empty() {
                return Err(CaError::new(
                    Code::FailedPrecondition,
                    format!("the token minted for {} is empty", m.0.subject()),
                ));
            }
            return Ok(t.trim().to_string());
        }
        let token_file = req.token_file.as_deref().ok_or_else(|| {
            CaError::new(
                Code::FailedPrecondition,
                format!("no token file configured for {}", req.identity),
            )
        })?;
        // Re-read on every call: the kubelet rotates projected tokens.
        let token = read(token_file, "token file")?;
        let token = token.trim();
        if token.is_empty() {
            return Err(CaError::new(
                Code::FailedPrecondition,
                format!("token file {} is empty", token_file.display()),
            ));
        }
        Ok(token.to_string())
    }

    async fn call(&self, req: SignRequest) -> Result<Vec<String>, CaError> {
        let token = Self::token(&req).await?;
        let token = token.as_str();
        let root = read(&self.root_cert_file, "mesh root certificate")?;
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(root))
            .domain_name(self.server_name.clone());
        let channel = Channel::from_shared(format!("https://{}", self.address))
            .map_err(|e| {
                CaError::new(
                    Code::InvalidArgument,
                    format!("bad CA address {}: {e}", self.address),
                )
            })?
            .tls_config(tls)
            .map_err(|e| CaError::new(Code::FailedPrecondition, format!("TLS setup: {e}")))?
            .connect_timeout(self.timeout)
            .timeout(self.timeout)
            .connect()
            .await
            .map_err(|e| {
                CaError::new(
                    Code::Unavailable,
                    format!("cannot connect to {}: {}", self.address, error_chain(&e)),
                )
            })?;
        let mut client = IstioCertificateServiceClient::new(channel);
        let mut request = tonic::Request::new(IstioCertificateRequest {
            csr: req.csr_pem,
            validity_duration: req.ttl.as_secs() as i64,
            // istio-agent always sends this struct (security/pkg/nodeagent/caclient/providers/
            // citadel/client.go: `metadata = {"CertSigner": <ISTIO_META_CERT_SIGNER or "">}`).
            metadata: Some(cert_signer_metadata(&self.cert_signer)),
        });
        let bearer: MetadataValue<_> = format!("Bearer {token}").parse().map_err(|_| {
            CaError::new(
                Code::FailedPrecondition,
                "token contains characters not allowed in a header",
            )
        })?;
        request.metadata_mut().insert("authorization", bearer);
        let cluster: MetadataValue<_> = self.cluster_id.parse().map_err(|_| {
            CaError::new(
                Code::InvalidArgument,
                "cluster id is not a valid header value",
            )
        })?;
        request.metadata_mut().insert("clusterid", cluster);
        let resp = client
            .create_certificate(request)
            .await
            .map_err(|s| CaError::new(s.code(), s.message().to_string()))?;
        Ok(resp.into_inner().cert_chain)
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

impl CaBackend for IstiodCa {
    fn sign(&self, req: SignRequest) -> BoxFuture<'_, Result<Vec<String>, CaError>> {
        Box::pin(self.call(req))
    }
    fn describe(&self) -> String {
        format!(
            "istiod CA at {} (server name {})",
            self.address, self.server_name
        )
    }
}

impl CaBackend for super::dev_ca::DevCa {
    fn sign(&self, req: SignRequest) -> BoxFuture<'_, Result<Vec<String>, CaError>> {
        let r = self
            .sign_csr(&req.csr_pem, &req.identity, req.ttl, req.now)
            .map_err(|e| CaError::new(Code::InvalidArgument, e.to_string()));
        Box::pin(async move { r })
    }
    fn describe(&self) -> String {
        "embedded dev CA".into()
    }
}
