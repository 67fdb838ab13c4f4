//! Istio CA tokens for Windows apps, minted with the Kubernetes TokenRequest API
//! (`POST /api/v1/namespaces/<ns>/serviceaccounts/<sa>/token`, audience `istio-ca`, short expiry):
//! what the kubelet's projected token is for a pod with an istio-agent, for pods that cannot run
//! one. A token is reused while more than half its lifetime is left and minted again after that,
//! so every CSR carries a fresh one. Denied requests make only that identity Unavailable; the
//! identity manager retries them with its backoff.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::Api;
use kube::api::PostParams;
use tokio::time::Instant;
use tonic::Code;
use tracing::{info, warn};

use crate::identity::istiod::CaError;
use crate::identity::token::{MintToken, Minter};
use crate::metrics::Metrics;

/// istiod's default token audience (`TOKEN_AUDIENCES`).
pub const ISTIO_CA_AUDIENCE: &str = "istio-ca";

pub struct KubeTokens {
    pub client: kube::Client,
    pub ttl: Duration,
    pub metrics: Arc<Metrics>,
    cache: Mutex<HashMap<(String, String), (String, Instant)>>,
}

impl KubeTokens {
    pub fn new(client: kube::Client, ttl: Duration, metrics: Arc<Metrics>) -> Arc<KubeTokens> {
        Arc::new(KubeTokens {
            client,
            ttl,
            metrics,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// A minter for `namespace/service_account`.
    pub fn minter(self: &Arc<Self>, namespace: &str, service_account: &str) -> Minter {
        Minter(Arc::new(One {
            tokens: self.clone(),
            namespace: namespace.into(),
            service_account: service_account.into(),
        }))
    }

    fn count(&self, result: &str) {
        self.metrics.inc(
            "winmesh_tokens_minted_total",
            "TokenRequests for Windows apps' istiod tokens, by result.",
            &[("result", result)],
            1.0,
        );
    }

    async fn mint(&self, namespace: &str, sa: &str) -> Result<String, CaError> {
        let key = (namespace.to_string(), sa.to_string());
        let now = Instant::now();
        if let Ok(c) = self.cache.lock()
            && let Some((token, renew_at)) = c.get(&key)
            && now < *renew_at
        {
            return Ok(token.clone());
        }
        let api: Api<ServiceAccount> = Api::namespaced(self.client.clone(), namespace);
        let req = TokenRequest {
            spec: TokenRequestSpec {
                audiences: vec![ISTIO_CA_AUDIENCE.into()],
                expiration_seconds: Some(i64::try_from(self.ttl.as_secs()).unwrap_or(3600)),
                bound_object_ref: None,
            },
            ..Default::default()
        };
        let answer = api
            .create_token_request(sa, &PostParams::default(), &req)
            .await
            .map_err(|e| {
                self.count("error");
                let (code, why) = match &e {
                    // Unavailable, not PermissionDenied: the identity manager then retries with
                    // its exponential backoff, so a fixed RoleBinding takes effect in seconds.
                    kube::Error::Api(s) if s.code == 403 => (
                        Code::Unavailable,
                        "refused (winmesh needs `create` on serviceaccounts/token in this namespace)"
                            .to_string(),
                    ),
                    kube::Error::Api(s) if s.code == 404 => (
                        Code::Unavailable,
                        "the service account does not exist".to_string(),
                    ),
                    kube::Error::Api(s) => (Code::Unavailable, format!("API error {}", s.code)),
                    other => (Code::Unavailable, other.to_string()),
                };
                warn!(service_account = %format!("{namespace}/{sa}"), error = %why, "TokenRequest failed");
                CaError::new(code, format!("TokenRequest for {namespace}/{sa}: {why}"))
            })?;
        let token = answer
            .status
            .map(|s| s.token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                self.count("error");
                CaError::new(
                    Code::Unavailable,
                    format!("TokenRequest for {namespace}/{sa}: no token in the answer"),
                )
            })?;
        self.count("ok");
        info!(service_account = %format!("{namespace}/{sa}"), ttl = %humantime::format_duration(self.ttl), "minted an istio-ca token");
        if let Ok(mut c) = self.cache.lock() {
            c.insert(key, (token.clone(), now + self.ttl / 2));
        }
        Ok(token)
    }
}

struct One {
    tokens: Arc<KubeTokens>,
    namespace: String,
    service_account: String,
}

impl MintToken for One {
    fn token(&self) -> BoxFuture<'_, Result<String, CaError>> {
        Box::pin(self.tokens.mint(&self.namespace, &self.service_account))
    }

    fn subject(&self) -> String {
        format!("{}/{}", self.namespace, self.service_account)
    }
}
