//! A fake Kubernetes API server on loopback: enough of list and watch (JSON lines, resource versions,
//! replay from a resource version) for winmesh's Kubernetes mirror, with objects a test changes live.

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::sync::broadcast;

pub const SERVICES: &str = "/api/v1/services";
pub const PODS: &str = "/api/v1/pods";
pub const ENDPOINT_SLICES: &str = "/apis/discovery.k8s.io/v1/endpointslices";
pub const PEER_AUTHENTICATIONS: &str = "/apis/security.istio.io/v1/peerauthentications";

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

    /// Creates or replaces an object in collection `path`.
    pub fn apply(&self, path: &str, mut obj: Value) {
        let mut g = self.shared.inner.lock().unwrap();
        g.rv += 1;
        let rv = g.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        if obj["metadata"]["creationTimestamp"].is_null() {
            obj["metadata"]["creationTimestamp"] = json!("2026-01-01T00:00:00Z");
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
        let _ = self.shared.events.send((rv, path.to_string(), ev));
    }

    pub fn delete(&self, path: &str, namespace: &str, name: &str) {
        let mut g = self.shared.inner.lock().unwrap();
        g.rv += 1;
        let rv = g.rv;
        let Some(mut obj) = g
            .objects
            .remove(&(path.to_string(), format!("{namespace}/{name}")))
        else {
            return;
        };
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        let ev = json!({"type": "DELETED", "object": obj});
        g.history.push((rv, path.to_string(), ev.clone()));
        let _ = self.shared.events.send((rv, path.to_string(), ev));
    }

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

async fn handle(State(s): State<Shared>, headers: axum::http::HeaderMap, uri: Uri) -> Response {
    if let Some(ua) = headers
        .get(axum::http::header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
    {
        s.inner.lock().unwrap().user_agents.insert(ua.to_string());
    }
    let path = uri.path().to_string();
    let known = [SERVICES, PODS, ENDPOINT_SLICES, PEER_AUTHENTICATIONS];
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
