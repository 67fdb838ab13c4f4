//! Read-only debug HTTP server (loopback by default): `/healthz`, `/readyz`, `/metrics`,
//! `/debug/syncz`, `/debug/config_dump?node=ID` (or `?proxyID=ID`, as on istiod), and named JSON views that other modules register
//! (`/debug/certs`, `/debug/registryz`). With a token configured, everything but the health probes
//! requires `Authorization: Bearer <token>`. Nothing here can change state, and no view contains key
//! material.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::metrics::Metrics;
use crate::xds::SnapshotCache;
use crate::xds::clients::ClientRegistry;
use crate::xds::stream::SyncStatus;

/// A JSON view provider.
pub type View = Arc<dyn Fn() -> Value + Send + Sync>;

/// Readiness of each component; the process is ready when all are.
#[derive(Default)]
pub struct Readiness {
    parts: RwLock<BTreeMap<&'static str, Result<(), String>>>,
    /// Components whose readiness is computed on every request (e.g. certificate expiry).
    checks: RwLock<BTreeMap<&'static str, Check>>,
    /// Ready, but worth saying (e.g. serving persisted state during an API outage).
    notes: RwLock<BTreeMap<&'static str, String>>,
}

/// A readiness check evaluated when asked.
pub type Check = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

impl Readiness {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }
    /// Declares a component that is not ready yet.
    pub fn register(&self, name: &'static str, why: &str) {
        self.set(name, Err(why.to_string()));
    }
    pub fn set(&self, name: &'static str, state: Result<(), String>) {
        match self.parts.write() {
            Ok(mut p) => p.insert(name, state),
            Err(p) => p.into_inner().insert(name, state),
        };
    }
    /// Registers a component whose readiness `check` computes on every request.
    pub fn register_check(&self, name: &'static str, check: Check) {
        match self.checks.write() {
            Ok(mut c) => c.insert(name, check),
            Err(p) => p.into_inner().insert(name, check),
        };
    }
    /// Sets (or with `None` clears) a note shown next to a component in `/readyz`.
    pub fn note(&self, name: &'static str, note: Option<String>) {
        let mut n = match self.notes.write() {
            Ok(n) => n,
            Err(p) => p.into_inner(),
        };
        match note {
            Some(t) => n.insert(name, t),
            None => n.remove(name),
        };
    }
    pub fn notes(&self) -> BTreeMap<&'static str, String> {
        match self.notes.read() {
            Ok(n) => n.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }
    pub fn snapshot(&self) -> BTreeMap<&'static str, Result<(), String>> {
        let mut out = match self.parts.read() {
            Ok(p) => p.clone(),
            Err(p) => p.into_inner().clone(),
        };
        let checks: Vec<(&'static str, Check)> = match self.checks.read() {
            Ok(c) => c.iter().map(|(k, v)| (*k, v.clone())).collect(),
            Err(p) => p
                .into_inner()
                .iter()
                .map(|(k, v)| (*k, v.clone()))
                .collect(),
        };
        for (name, check) in checks {
            out.insert(name, check());
        }
        out
    }
    pub fn is_ready(&self) -> bool {
        self.snapshot().values().all(|r| r.is_ok())
    }
}

#[derive(Clone)]
pub struct DebugState {
    pub cache: SnapshotCache,
    pub clients: Arc<ClientRegistry>,
    pub metrics: Arc<Metrics>,
    pub readiness: Arc<Readiness>,
    pub token: Option<Arc<str>>,
    pub views: Arc<RwLock<BTreeMap<&'static str, View>>>,
}

impl DebugState {
    pub fn add_view(&self, name: &'static str, view: View) {
        match self.views.write() {
            Ok(mut v) => v.insert(name, view),
            Err(p) => p.into_inner().insert(name, view),
        };
    }
}

pub fn router(state: DebugState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/debug/syncz", get(syncz))
        .route("/debug/config_dump", get(config_dump))
        .route("/debug", get(index))
        .route("/debug/", get(index))
        .route("/debug/{view}", get(view))
        .with_state(state)
}

fn authorized(state: &DebugState, headers: &HeaderMap) -> Result<(), Box<Response>> {
    let Some(token) = &state.token else {
        return Ok(());
    };
    let got = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    let ok = got.len() == token.len()
        && got
            .bytes()
            .zip(token.bytes())
            .fold(0u8, |a, (x, y)| a | (x ^ y))
            == 0;
    if ok {
        Ok(())
    } else {
        Err(Box::new(
            (StatusCode::UNAUTHORIZED, "bearer token required\n").into_response(),
        ))
    }
}

async fn readyz(State(s): State<DebugState>) -> Response {
    let parts = s.readiness.snapshot();
    let notes = s.readiness.notes();
    let mut body = String::new();
    let mut ready = true;
    for (name, st) in &parts {
        match st {
            Ok(()) => match notes.get(name) {
                Some(n) => body.push_str(&format!("{name}: ready ({n})\n")),
                None => body.push_str(&format!("{name}: ready\n")),
            },
            Err(why) => {
                ready = false;
                body.push_str(&format!("{name}: not ready: {why}\n"));
            }
        }
    }
    body.push_str(&nack_lines(&s.clients.list()));
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, body).into_response()
}

/// NACKs in the readiness output. After a NACK Envoy keeps serving its last accepted config, so it
/// does not make the gateway unready here: taking the pod out of its Service would drop traffic that
/// still works, and a restarted winmesh cannot know what Envoy accepted before. Whether Envoy has
/// ever accepted a CDS and LDS config is Envoy's own state, checked by `winmesh status --ready
/// --envoy` from its stats, as istio-agent's probe does (pilot/cmd/pilot-agent/status/ready/probe.go).
fn nack_lines(clients: &[crate::xds::clients::ClientView]) -> String {
    let mut out = String::new();
    for c in clients {
        let node = crate::xds::peertext::printable(&c.node_id, 128);
        for t in c.types.iter().filter(|t| t.status == SyncStatus::Nacked) {
            let version = t
                .last_nack
                .as_ref()
                .map(|n| n.version.as_str())
                .unwrap_or_default();
            out.push_str(&format!(
                "xds: {node} NACKed {} version {version:?}; Envoy keeps its last accepted config (ready, not synced; see winmesh status)\n",
                t.short
            ));
        }
    }
    out
}

async fn metrics(State(s): State<DebugState>, headers: HeaderMap) -> Response {
    if let Err(r) = authorized(&s, &headers) {
        return *r;
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render(),
    )
        .into_response()
}

async fn syncz(State(s): State<DebugState>, headers: HeaderMap) -> Response {
    if let Err(r) = authorized(&s, &headers) {
        return *r;
    }
    axum::Json(json!({ "clients": s.clients.list() })).into_response()
}

#[derive(Deserialize)]
struct DumpQuery {
    /// `proxyID` is istiod's name for the same parameter; operators type it by habit.
    #[serde(alias = "proxyID")]
    node: Option<String>,
}

async fn config_dump(
    State(s): State<DebugState>,
    headers: HeaderMap,
    Query(q): Query<DumpQuery>,
) -> Response {
    if let Err(r) = authorized(&s, &headers) {
        return *r;
    }
    // Like istiod: a named proxy that is not connected is a 404, not the shared snapshot.
    if let Some(n) = &q.node
        && !s.clients.is_connected(n)
    {
        return (
            StatusCode::NOT_FOUND,
            axum::Json(json!({"error": format!("proxy not connected: {}", crate::xds::peertext::printable(n, 256))})),
        )
            .into_response();
    }
    let snap = match &q.node {
        Some(n) => s.cache.snapshot_for(n),
        None => s.cache.global(),
    };
    match snap {
        // Rendering a large dump is CPU work: off the async runtime, so xDS streams keep flowing.
        Some(snap) => json_off_runtime(move || crate::configdump::config_dump(&snap)).await,
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"error": "no configuration has been published yet"})),
        )
            .into_response(),
    }
}

/// Builds and serializes a JSON body on a blocking thread.
async fn json_off_runtime<F>(f: F) -> Response
where
    F: FnOnce() -> serde_json::Value + Send + 'static,
{
    match tokio::task::spawn_blocking(move || serde_json::to_vec(&f())).await {
        Ok(Ok(body)) => ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
        _ => (StatusCode::INTERNAL_SERVER_ERROR, "rendering failed\n").into_response(),
    }
}

/// The debug endpoints, like istiod's `/debug` index.
const ENDPOINTS: &[(&str, &str)] = &[
    ("/healthz", "liveness"),
    (
        "/readyz",
        "readiness, one line per part (mesh, config, identity)",
    ),
    ("/metrics", "Prometheus metrics"),
    (
        "/debug/syncz",
        "connected proxies and, per type, sent/ACKed versions and NACKs",
    ),
    (
        "/debug/config_dump",
        "the served config in Envoy's config_dump format; ?node=<id> for one proxy",
    ),
];

async fn index(State(s): State<DebugState>, headers: HeaderMap) -> Response {
    if let Err(r) = authorized(&s, &headers) {
        return *r;
    }
    let mut body = String::from("winmesh debug endpoints:\n");
    for (path, what) in ENDPOINTS {
        body.push_str(&format!("  {path:<22} {what}\n"));
    }
    let views: Vec<&'static str> = match s.views.read() {
        Ok(v) => v.keys().copied().collect(),
        Err(p) => p.into_inner().keys().copied().collect(),
    };
    for v in views {
        let what = match v {
            "registryz" => {
                "the mesh model served (services, Windows services, policies) and what was skipped"
            }
            "certs" => "certificates per identity: expiry, serial, chain (never keys)",
            _ => "",
        };
        body.push_str(&format!("  /debug/{v:<15} {what}\n"));
    }
    body.into_response()
}

async fn view(
    State(s): State<DebugState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Response {
    if let Err(r) = authorized(&s, &headers) {
        return *r;
    }
    let v = match s.views.read() {
        Ok(v) => v.get(name.as_str()).cloned(),
        Err(p) => p.into_inner().get(name.as_str()).cloned(),
    };
    match v {
        Some(f) => json_off_runtime(move || f()).await,
        None => (StatusCode::NOT_FOUND, format!("no debug view {name:?}\n")).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xds::clients::ClientView;
    use crate::xds::stream::{NackRecord, SubscribedNames, TypeStatus};

    fn client(short: &'static str, acked: Option<&str>) -> ClientView {
        ClientView {
            connection_id: 1,
            node_id: "gw~1".into(),
            cluster: String::new(),
            envoy_version: String::new(),
            peer: None,
            connected_since: std::time::SystemTime::now(),
            service: "ADS",
            mode: "SotW",
            types: vec![TypeStatus {
                type_url: "",
                short,
                subscribed: SubscribedNames {
                    wildcard: true,
                    names: Arc::default(),
                },
                wildcard: true,
                version_sent: Some("v2".into()),
                version_acked: acked.map(Into::into),
                nonce_sent: Some("2".into()),
                status: SyncStatus::Nacked,
                responses_sent: 2,
                nacks: 1,
                last_nack: Some(NackRecord {
                    version: "v2".into(),
                    message: "bad".into(),
                    code: 3,
                    at: std::time::SystemTime::now(),
                }),
            }],
        }
    }

    #[test]
    fn a_nack_is_named_in_the_readiness_output() {
        let text = nack_lines(&[client("LDS", Some("v1"))]);
        assert!(text.contains("gw~1 NACKed LDS version \"v2\""), "{text}");
        assert!(nack_lines(&[]).is_empty());
    }
}
