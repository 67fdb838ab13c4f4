//! A fake Kubernetes API server on loopback: enough of list and watch (JSON lines, resource versions,
//! replay from a resource version) for winmesh's Kubernetes mirror, with objects a test changes live;
//! and the writes winmesh makes: server-side apply (PATCH `application/apply-patch+yaml`, a field
//! manager required; maps merged, lists replaced, as apply does for fields one manager owns), get,
//! create, replace with resourceVersion preconditions (409 on conflict, as Lease elections rely on),
//! delete, and TokenRequest (`serviceaccounts/<sa>/token`) minting tokens a fake istiod can accept.

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::sync::broadcast;

pub const SERVICES: &str = "/api/v1/services";
pub const PODS: &str = "/api/v1/pods";
pub const ENDPOINT_SLICES: &str = "/apis/discovery.k8s.io/v1/endpointslices";
pub const PEER_AUTHENTICATIONS: &str = "/apis/security.istio.io/v1/peerauthentications";
pub const AUTHORIZATION_POLICIES: &str = "/apis/security.istio.io/v1/authorizationpolicies";
pub const LEASES: &str = "/apis/coordination.k8s.io/v1/leases";
/// What an Istio older than 1.22 serves (and newer ones alongside v1).
pub const AUTHORIZATION_POLICIES_V1BETA1: &str =
    "/apis/security.istio.io/v1beta1/authorizationpolicies";

/// Collections by (API prefix, plural): the namespaced form `<prefix>/namespaces/<ns>/<plural>`
/// maps onto the cluster-wide collection the mirror watches.
const COLLECTIONS: [(&str, &str, &str); 7] = [
    (
        "/apis/security.istio.io/v1beta1",
        "authorizationpolicies",
        AUTHORIZATION_POLICIES_V1BETA1,
    ),
    ("/api/v1", "services", SERVICES),
    ("/api/v1", "pods", PODS),
    (
        "/apis/discovery.k8s.io/v1",
        "endpointslices",
        ENDPOINT_SLICES,
    ),
    (
        "/apis/security.istio.io/v1",
        "peerauthentications",
        PEER_AUTHENTICATIONS,
    ),
    (
        "/apis/security.istio.io/v1",
        "authorizationpolicies",
        AUTHORIZATION_POLICIES,
    ),
    ("/apis/coordination.k8s.io/v1", "leases", LEASES),
];

/// A request to one object: its collection, namespace and name (and subresource).
struct ObjectPath {
    collection: String,
    namespace: String,
    name: Option<String>,
    sub: Option<String>,
}

fn object_path(path: &str) -> Option<ObjectPath> {
    for (prefix, plural, collection) in COLLECTIONS {
        let Some(rest) = path
            .strip_prefix(prefix)
            .and_then(|r| r.strip_prefix("/namespaces/"))
        else {
            continue;
        };
        let parts: Vec<&str> = rest.split('/').collect();
        if parts.len() >= 2 && parts[1] == plural {
            return Some(ObjectPath {
                collection: collection.to_string(),
                namespace: parts[0].to_string(),
                name: parts.get(2).map(|s| s.to_string()),
                sub: parts.get(3).map(|s| s.to_string()),
            });
        }
    }
    // TokenRequest: /api/v1/namespaces/<ns>/serviceaccounts/<sa>/token
    let rest = path.strip_prefix("/api/v1/namespaces/")?;
    let parts: Vec<&str> = rest.split('/').collect();
    (parts.len() == 4 && parts[1] == "serviceaccounts" && parts[3] == "token").then(|| ObjectPath {
        collection: "serviceaccounts".into(),
        namespace: parts[0].to_string(),
        name: Some(parts[2].to_string()),
        sub: Some("token".into()),
    })
}

fn merge_json(into: &mut Value, from: &Value) {
    match (into, from) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                match a.get_mut(k) {
                    Some(existing) if existing.is_object() && v.is_object() => {
                        merge_json(existing, v)
                    }
                    _ => {
                        a.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (a, b) => *a = b.clone(),
    }
}

fn status(code: StatusCode, reason: &str, message: &str) -> Response {
    let body = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
        "message": message, "reason": reason, "code": code.as_u16()});
    (code, axum::Json(body)).into_response()
}

/// A token a TokenRequest minted.
#[derive(Clone, Debug)]
pub struct MintedToken {
    pub namespace: String,
    pub service_account: String,
    pub audiences: Vec<String>,
    pub expiration_seconds: i64,
    pub token: String,
}

struct Inner {
    rv: u64,
    objects: BTreeMap<(String, String), Value>,
    /// (resource version, collection path, event) of every change, for watch replay.
    history: Vec<(u64, String, Value)>,
    /// Collections that answer 404, as when a CRD is not installed.
    missing: BTreeSet<String>,
    /// Collections that answer 403, as when RBAC does not allow reading them.
    forbidden: BTreeSet<String>,
    /// Every User-Agent seen.
    user_agents: BTreeSet<String>,
    /// Writes by (method, collection, namespace/name, field manager).
    writes: Vec<(String, String, String, Option<String>)>,
    minted: Vec<MintedToken>,
    /// Service accounts whose TokenRequests are refused (403).
    deny_tokens: BTreeSet<String>,
    uid: u64,
}

#[derive(Clone)]
struct Shared {
    inner: Arc<Mutex<Inner>>,
    events: broadcast::Sender<(u64, String, Value)>,
    /// Set when the server goes away: open watches end and kept-alive connections get errors.
    down: tokio::sync::watch::Sender<bool>,
}

pub struct FakeKube {
    pub addr: SocketAddr,
    shared: Shared,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeKube {
    fn drop(&mut self) {
        self.shared.down.send_replace(true);
        self.task.abort();
    }
}

fn key(obj: &Value) -> String {
    format!(
        "{}/{}",
        obj["metadata"]["namespace"].as_str().unwrap_or(""),
        obj["metadata"]["name"].as_str().unwrap_or("")
    )
}

impl FakeKube {
    /// `missing`: collection paths that answer 404.
    pub async fn start(missing: &[&str]) -> FakeKube {
        Self::start_at("127.0.0.1:0".parse().unwrap(), missing).await
    }

    /// Like `start`, on a given address (to bring "the same" API server back after an outage).
    pub async fn start_at(bind: SocketAddr, missing: &[&str]) -> FakeKube {
        let (events, _) = broadcast::channel(1024);
        let shared = Shared {
            inner: Arc::new(Mutex::new(Inner {
                rv: 1,
                objects: BTreeMap::new(),
                history: vec![],
                missing: missing.iter().map(|s| s.to_string()).collect(),
                forbidden: BTreeSet::new(),
                user_agents: BTreeSet::new(),
                writes: vec![],
                minted: vec![],
                deny_tokens: BTreeSet::new(),
                uid: 0,
            })),
            events,
            down: tokio::sync::watch::channel(false).0,
        };
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind(bind).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeKube { addr, shared, task }
    }

    /// The User-Agent headers clients sent.
    pub fn user_agents(&self) -> Vec<String> {
        self.shared
            .inner
            .lock()
            .unwrap()
            .user_agents
            .iter()
            .cloned()
            .collect()
    }

    /// Makes collection `path` answer 403 Forbidden (or stop doing so).
    pub fn forbid(&self, path: &str, on: bool) {
        let mut g = self.shared.inner.lock().unwrap();
        if on {
            g.forbidden.insert(path.to_string());
        } else {
            g.forbidden.remove(path);
        }
    }

    /// The object `namespace/name` of collection `path`, if it exists.
    pub fn get(&self, path: &str, namespace: &str, name: &str) -> Option<Value> {
        self.shared
            .inner
            .lock()
            .unwrap()
            .objects
            .get(&(path.to_string(), format!("{namespace}/{name}")))
            .cloned()
    }

    /// Every object of collection `path`.
    pub fn list(&self, path: &str) -> Vec<Value> {
        self.shared
            .inner
            .lock()
            .unwrap()
            .objects
            .iter()
            .filter(|((p, _), _)| p == path)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Writes clients made: (method, collection, namespace/name, field manager).
    pub fn writes(&self) -> Vec<(String, String, String, Option<String>)> {
        self.shared.inner.lock().unwrap().writes.clone()
    }

    /// Tokens minted through TokenRequest so far.
    pub fn minted(&self) -> Vec<MintedToken> {
        self.shared.inner.lock().unwrap().minted.clone()
    }

    /// TokenReview as the API server answers it for istiod: the identity of a token this server
    /// minted for audience `istio-ca`.
    pub fn token_review(
        &self,
    ) -> impl Fn(&str) -> Option<(String, String)> + Send + Sync + 'static {
        let shared = self.shared.clone();
        move |token: &str| {
            let g = shared.inner.lock().unwrap();
            g.minted
                .iter()
                .find(|m| m.token == token && m.audiences.iter().any(|a| a == "istio-ca"))
                .map(|m| (m.namespace.clone(), m.service_account.clone()))
        }
    }

    /// Refuses (403) TokenRequests for `namespace/sa`, or stops doing so.
    pub fn deny_tokens(&self, namespace: &str, sa: &str, on: bool) {
        let mut g = self.shared.inner.lock().unwrap();
        let k = format!("{namespace}/{sa}");
        if on {
            g.deny_tokens.insert(k);
        } else {
            g.deny_tokens.remove(&k);
        }
    }

    /// Creates or replaces an object in collection `path`.
    pub fn apply(&self, path: &str, obj: Value) {
        store(&self.shared, path, obj);
    }

    pub fn delete(&self, path: &str, namespace: &str, name: &str) {
        remove(&self.shared, path, namespace, name);
    }
}

/// Stores an object (a new resource version, a uid on creation) and announces it; returns it.
fn store(shared: &Shared, path: &str, mut obj: Value) -> Value {
    {
        let mut g = shared.inner.lock().unwrap();
        g.rv += 1;
        let rv = g.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        if obj["metadata"]["creationTimestamp"].is_null() {
            obj["metadata"]["creationTimestamp"] = json!("2026-01-01T00:00:00Z");
        }
        if obj["metadata"]["uid"].is_null() {
            g.uid += 1;
            obj["metadata"]["uid"] = json!(format!("uid-{}", g.uid));
        }
        let k = (path.to_string(), key(&obj));
        let kind = if g.objects.contains_key(&k) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        g.objects.insert(k, obj.clone());
        let ev = json!({"type": kind, "object": obj});
        g.history.push((rv, path.to_string(), ev.clone()));
        let _ = shared.events.send((rv, path.to_string(), ev));
    }
    obj
}

fn remove(shared: &Shared, path: &str, namespace: &str, name: &str) -> Option<Value> {
    let mut g = shared.inner.lock().unwrap();
    let mut obj = g
        .objects
        .remove(&(path.to_string(), format!("{namespace}/{name}")))?;
    g.rv += 1;
    let rv = g.rv;
    obj["metadata"]["resourceVersion"] = json!(rv.to_string());
    let ev = json!({"type": "DELETED", "object": obj.clone()});
    g.history.push((rv, path.to_string(), ev.clone()));
    let _ = shared.events.send((rv, path.to_string(), ev));
    Some(obj)
}

impl FakeKube {
    /// A kubeconfig that points at this server (plain HTTP, no credentials).
    pub fn write_kubeconfig(&self, path: &Path) {
        std::fs::write(
            path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{}\n\
                 contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n\
                 current-context: fake\nusers:\n- name: fake\n  user: {{}}\n",
                self.addr
            ),
        )
        .unwrap();
    }
}

fn query_param<'a>(uri: &'a Uri, name: &str) -> Option<&'a str> {
    uri.query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == name).then_some(v)
    })
}

/// Requests to one object: get, create (POST to the collection), replace, apply, delete, and
/// TokenRequest.
fn handle_object(
    s: &Shared,
    method: &Method,
    headers: &axum::http::HeaderMap,
    uri: &Uri,
    o: ObjectPath,
    body: &[u8],
) -> Response {
    let manager = query_param(uri, "fieldManager").map(str::to_string);
    let parsed: Option<Value> = serde_json::from_slice(body)
        .ok()
        .or_else(|| serde_yaml::from_slice(body).ok());
    let record = |name: &str| {
        s.inner.lock().unwrap().writes.push((
            method.to_string(),
            o.collection.clone(),
            format!("{}/{name}", o.namespace),
            manager.clone(),
        ));
    };
    if o.sub.as_deref() == Some("token") && *method == Method::POST {
        let sa = o.name.clone().unwrap_or_default();
        record(&sa);
        let mut g = s.inner.lock().unwrap();
        if g.deny_tokens.contains(&format!("{}/{sa}", o.namespace)) {
            drop(g);
            return status(
                StatusCode::FORBIDDEN,
                "Forbidden",
                &format!(
                    "cannot create serviceaccounts/token for {}/{sa}",
                    o.namespace
                ),
            );
        }
        let req = parsed.unwrap_or(Value::Null);
        let audiences: Vec<String> = req["spec"]["audiences"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        let expiration_seconds = req["spec"]["expirationSeconds"].as_i64().unwrap_or(3600);
        g.uid += 1;
        let token = format!("minted-{}-{sa}-{}", o.namespace, g.uid);
        g.minted.push(MintedToken {
            namespace: o.namespace.clone(),
            service_account: sa.clone(),
            audiences: audiences.clone(),
            expiration_seconds,
            token: token.clone(),
        });
        let answer = json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
            "metadata": {"name": sa, "namespace": o.namespace},
            "spec": {"audiences": audiences, "expirationSeconds": expiration_seconds},
            "status": {"token": token, "expirationTimestamp": "2030-01-01T00:00:00Z"}});
        return (StatusCode::CREATED, axum::Json(answer)).into_response();
    }
    if o.collection == "serviceaccounts" {
        return status(StatusCode::NOT_FOUND, "NotFound", "not served by the fake");
    }
    let existing = |name: &str| {
        s.inner
            .lock()
            .unwrap()
            .objects
            .get(&(o.collection.clone(), format!("{}/{name}", o.namespace)))
            .cloned()
    };
    match (method.clone(), o.name.clone()) {
        (Method::GET, Some(name)) => match existing(&name) {
            Some(v) => axum::Json(v).into_response(),
            None => status(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!("{name} not found"),
            ),
        },
        (Method::POST, None) => {
            let Some(mut obj) = parsed else {
                return status(StatusCode::BAD_REQUEST, "BadRequest", "no object");
            };
            let name = obj["metadata"]["name"].as_str().unwrap_or("").to_string();
            if existing(&name).is_some() {
                return status(
                    StatusCode::CONFLICT,
                    "AlreadyExists",
                    &format!("{name} exists"),
                );
            }
            record(&name);
            obj["metadata"]["namespace"] = json!(o.namespace);
            (
                StatusCode::CREATED,
                axum::Json(store(s, &o.collection, obj)),
            )
                .into_response()
        }
        (Method::PUT, Some(name)) => {
            let Some(mut obj) = parsed else {
                return status(StatusCode::BAD_REQUEST, "BadRequest", "no object");
            };
            let Some(current) = existing(&name) else {
                return status(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    &format!("{name} not found"),
                );
            };
            // Optimistic concurrency: a replace names the version it read.
            if obj["metadata"]["resourceVersion"] != current["metadata"]["resourceVersion"] {
                return status(
                    StatusCode::CONFLICT,
                    "Conflict",
                    "the object has been modified; please apply your changes to the latest version",
                );
            }
            record(&name);
            obj["metadata"]["uid"] = current["metadata"]["uid"].clone();
            obj["metadata"]["creationTimestamp"] = current["metadata"]["creationTimestamp"].clone();
            obj["metadata"]["namespace"] = json!(o.namespace);
            axum::Json(store(s, &o.collection, obj)).into_response()
        }
        (Method::PATCH, Some(name)) => {
            let apply = headers
                .get(axum::http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|c| c.starts_with("application/apply-patch"));
            if !apply {
                return status(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "UnsupportedMediaType",
                    "the fake supports server-side apply only",
                );
            }
            let Some(manager) = manager.clone() else {
                return status(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    "PATCH, fieldManager: Required value: is required for apply patch",
                );
            };
            let Some(patch) = parsed else {
                return status(StatusCode::BAD_REQUEST, "BadRequest", "not an object");
            };
            if patch["metadata"]["name"].as_str() != Some(name.as_str()) {
                return status(StatusCode::BAD_REQUEST, "BadRequest", "name does not match");
            }
            record(&name);
            let mut obj = existing(&name).unwrap_or_else(|| json!({}));
            merge_json(&mut obj, &patch);
            // Lists the manager applies are its own: replaced, not merged.
            for (field, v) in patch.as_object().into_iter().flatten() {
                if let Some(m) = v.as_object() {
                    for (k, inner) in m {
                        if inner.is_array() {
                            obj[field][k] = inner.clone();
                        }
                    }
                }
            }
            obj["metadata"]["namespace"] = json!(o.namespace);
            let managers = obj["metadata"]["managedFields"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            if !managers.iter().any(|m| m["manager"] == json!(manager)) {
                let mut m = managers;
                m.push(json!({"manager": manager, "operation": "Apply"}));
                obj["metadata"]["managedFields"] = json!(m);
            }
            axum::Json(store(s, &o.collection, obj)).into_response()
        }
        (Method::DELETE, Some(name)) => match remove(s, &o.collection, &o.namespace, &name) {
            Some(v) => {
                record(&name);
                axum::Json(v).into_response()
            }
            None => status(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!("{name} not found"),
            ),
        },
        _ => status(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "not supported",
        ),
    }
}

async fn handle(
    State(s): State<Shared>,
    method: Method,
    headers: axum::http::HeaderMap,
    uri: Uri,
    body: Bytes,
) -> Response {
    if let Some(ua) = headers
        .get(axum::http::header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
    {
        s.inner.lock().unwrap().user_agents.insert(ua.to_string());
    }
    let path = uri.path().to_string();
    let known = [
        SERVICES,
        PODS,
        ENDPOINT_SLICES,
        PEER_AUTHENTICATIONS,
        AUTHORIZATION_POLICIES,
        AUTHORIZATION_POLICIES_V1BETA1,
        LEASES,
    ];
    if *s.down.borrow() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [("connection", "close")],
            "down",
        )
            .into_response();
    }
    let (missing, forbidden) = {
        let g = s.inner.lock().unwrap();
        (g.missing.contains(&path), g.forbidden.contains(&path))
    };
    if forbidden {
        let status = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
            "message": format!("forbidden: cannot list {path}"), "reason": "Forbidden", "code": 403});
        return (StatusCode::FORBIDDEN, axum::Json(status)).into_response();
    }
    if let Some(o) = object_path(&path).filter(|o| o.name.is_some() || method != Method::GET) {
        let missing = s.inner.lock().unwrap().missing.contains(&o.collection);
        if missing {
            return status(
                StatusCode::NOT_FOUND,
                "NotFound",
                "the server could not find the requested resource",
            );
        }
        return handle_object(&s, &method, &headers, &uri, o, &body);
    }
    if !known.contains(&path.as_str()) || missing {
        let status = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
            "message": "the server could not find the requested resource", "reason": "NotFound",
            "code": 404});
        return (StatusCode::NOT_FOUND, axum::Json(status)).into_response();
    }
    let watching = matches!(query_param(&uri, "watch"), Some("true" | "1"));
    if !watching {
        let g = s.inner.lock().unwrap();
        let items: Vec<Value> = g
            .objects
            .iter()
            .filter(|((p, _), _)| *p == path)
            .map(|(_, v)| v.clone())
            .collect();
        let list = json!({"kind": "List", "apiVersion": "v1",
            "metadata": {"resourceVersion": g.rv.to_string()}, "items": items});
        return axum::Json(list).into_response();
    }
    let from: u64 = query_param(&uri, "resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    // Subscribe and read the history under one lock: nothing falls between them.
    let (replay, rx) = {
        let g = s.inner.lock().unwrap();
        let rx = s.events.subscribe();
        let replay: Vec<(u64, Value)> = g
            .history
            .iter()
            .filter(|(rv, p, _)| *rv > from && *p == path)
            .map(|(rv, _, ev)| (*rv, ev.clone()))
            .collect();
        (replay, rx)
    };
    let last = replay.last().map(|(rv, _)| *rv).unwrap_or(from);
    let line = |ev: &Value| Ok::<_, Infallible>(Bytes::from(format!("{ev}\n")));
    let head = futures::stream::iter(replay.iter().map(|(_, ev)| line(ev)).collect::<Vec<_>>());
    let live = futures::stream::unfold((rx, path, last), |(mut rx, path, last)| async move {
        loop {
            match rx.recv().await {
                Ok((rv, p, ev)) if p == path && rv > last => {
                    return Some((Ok(Bytes::from(format!("{ev}\n"))), (rx, path, rv)));
                }
                Ok(_) => continue,
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    use futures::StreamExt;
    let mut down = s.down.subscribe();
    let gone = async move {
        let _ = down.wait_for(|d| *d).await;
    };
    let stream = head
        .chain(live)
        .map(|r| r.map_err(|e: Infallible| std::io::Error::other(e.to_string())))
        .take_until(gone)
        .chain(futures::stream::once(async {
            Err::<Bytes, std::io::Error>(std::io::Error::other("API server went away"))
        }));
    Response::builder()
        .header("content-type", "application/json")
        .body(Body::from_stream(stream))
        .unwrap()
}
