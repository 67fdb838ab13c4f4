//! Test harness for real-Envoy tests: finds the stock Envoy binary, runs it with a generated bootstrap,
//! polls its admin API with deadlines, and provides plain HTTP backends and steady request loops.
//! Everything binds 127.0.0.1 on OS-assigned ports or ports from `ports::free_port` (below the
//! ephemeral range); every process is killed on drop.
#![allow(dead_code)]

pub mod fake_istiod;
pub mod fake_kube;
pub mod fixtures;
pub mod ports;
pub mod tls;

#[allow(unused_imports)] // not every test binary that includes this module picks ports
pub use ports::free_port;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::process::{Child, Command};

/// The Envoy binary: `ENVOY_BIN`, else the Makefile's virtualenv. In CI (`CI=true`) a missing Envoy is
/// a failure, never a skip.
pub fn envoy_bin() -> Option<PathBuf> {
    let candidate = std::env::var_os("ENVOY_BIN")
        .map(PathBuf::from)
        .or_else(|| {
            let root = Path::new(env!("CARGO_MANIFEST_DIR"));
            let venv = root.join(".venv/lib");
            std::fs::read_dir(&venv).ok()?.flatten().find_map(|d| {
                let p = d.path().join("site-packages/envoy/_bin/envoy");
                p.is_file().then_some(p)
            })
        });
    match candidate {
        Some(p) if p.is_file() => Some(p),
        _ => {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!(
                    "Envoy binary not found (set ENVOY_BIN or run `make envoy`); CI requires it"
                );
            }
            eprintln!("SKIP: Envoy binary not found (set ENVOY_BIN or run `make envoy`)");
            None
        }
    }
}

/// The Envoy version (e.g. "1.40.0") from `envoy --version`.
pub fn envoy_version(bin: &Path) -> String {
    let out = std::process::Command::new(bin)
        .arg("--version")
        .output()
        .expect("envoy --version");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    text.split("version:")
        .nth(1)
        .and_then(|v| v.split('/').nth(1))
        .map(|v| v.trim().to_string())
        .unwrap_or_else(|| panic!("cannot read the version from {text:?}"))
}

/// Skips the test (outside CI) when Envoy is not installed.
#[macro_export]
macro_rules! require_envoy {
    () => {
        match $crate::support::envoy_bin() {
            Some(p) => p,
            None => return,
        }
    };
}

pub fn init_tracing() {
    tls::install_provider();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("WINMESH_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

/// Polls `f` until it returns `Some`, or panics after `timeout` with `what` and the diagnostics.
pub async fn wait_for<T, F, Fut>(
    what: &str,
    timeout: Duration,
    diag: impl AsyncFnOnce() -> String,
    mut f: F,
) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if Instant::now() > deadline {
            let d = diag().await;
            panic!("timed out after {timeout:?} waiting for {what}\n--- diagnostics ---\n{d}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A running Envoy, killed on drop.
pub struct Envoy {
    child: Child,
    pub admin: SocketAddr,
    pub dir: tempfile::TempDir,
    pub log: PathBuf,
    http: reqwest::Client,
}

impl Envoy {
    /// Starts Envoy with `bootstrap_yaml` (its admin address is replaced by 127.0.0.1:0 and discovered
    /// through `--admin-address-path`).
    pub async fn start(bin: &Path, bootstrap_yaml: &str) -> Envoy {
        tls::install_provider();
        let dir = tempfile::tempdir().expect("tempdir");
        let mut boot: Value = serde_yaml::from_str(bootstrap_yaml).expect("bootstrap yaml");
        boot["admin"] = serde_json::json!({"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}});
        let cfg = dir.path().join("bootstrap.yaml");
        std::fs::write(&cfg, serde_yaml::to_string(&boot).expect("yaml")).expect("write bootstrap");
        let admin_path = dir.path().join("admin.txt");
        let log = dir.path().join("envoy.log");
        let child = Command::new(bin)
            .arg("-c")
            .arg(&cfg)
            .arg("--disable-hot-restart")
            .arg("--concurrency")
            .arg("1")
            .arg("-l")
            .arg(std::env::var("ENVOY_LOG_LEVEL").unwrap_or_else(|_| "warning".into()))
            .arg("--admin-address-path")
            .arg(&admin_path)
            .arg("--log-path")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn envoy");
        let deadline = Instant::now() + Duration::from_secs(20);
        let admin = loop {
            if let Ok(s) = std::fs::read_to_string(&admin_path)
                && let Ok(a) = s.trim().parse::<SocketAddr>()
            {
                break a;
            }
            if Instant::now() > deadline {
                let l = std::fs::read_to_string(&log).unwrap_or_default();
                panic!("envoy did not start its admin listener\n{l}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        Envoy {
            child,
            admin,
            dir,
            log,
            http: reqwest::Client::new(),
        }
    }

    pub async fn admin_get(&self, path: &str) -> Option<String> {
        let r = self
            .http
            .get(format!("http://{}{path}", self.admin))
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .ok()?;
        r.text().await.ok()
    }

    pub async fn admin_json(&self, path: &str) -> Option<Value> {
        serde_json::from_str(&self.admin_get(path).await?).ok()
    }

    /// A counter or gauge from `/stats`, 0 if absent.
    pub async fn stat(&self, name: &str) -> u64 {
        let text = self
            .admin_get(&format!("/stats?filter=^{}$", regex_escape(name)))
            .await
            .unwrap_or_default();
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }

    pub async fn is_live(&self) -> bool {
        self.admin_get("/ready")
            .await
            .is_some_and(|s| s.trim() == "LIVE")
    }

    /// Names of the dynamic active clusters.
    pub async fn clusters(&self) -> Vec<String> {
        let Some(v) = self
            .admin_json("/config_dump?resource=dynamic_active_clusters")
            .await
        else {
            return vec![];
        };
        let mut out: Vec<String> = v["configs"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| c["cluster"]["name"].as_str().map(String::from))
            .collect();
        out.sort();
        out
    }

    /// The bound address of a listener by name.
    pub async fn listener_addr(&self, name: &str) -> Option<SocketAddr> {
        let v = self.admin_json("/listeners?format=json").await?;
        v["listener_statuses"].as_array()?.iter().find_map(|l| {
            if l["name"] != name {
                return None;
            }
            let sa = &l["local_address"]["socket_address"];
            format!("{}:{}", sa["address"].as_str()?, sa["port_value"].as_u64()?)
                .parse()
                .ok()
        })
    }

    pub fn log_text(&self) -> String {
        let l = std::fs::read_to_string(&self.log).unwrap_or_default();
        let n = l.len();
        l[n.saturating_sub(8000)..].to_string()
    }

    pub async fn diagnostics(&self) -> String {
        let dump = self
            .admin_get("/config_dump?include_eds")
            .await
            .unwrap_or_default();
        let n = dump.len().min(6000);
        format!(
            "envoy log (tail):\n{}\nconfig_dump (head):\n{}",
            self.log_text(),
            &dump[..n]
        )
    }

    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

fn regex_escape(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            if "\\.+*?()|[]{}^$".contains(c) {
                vec!['\\', c]
            } else {
                vec![c]
            }
        })
        .collect()
}

/// A plain HTTP/1.1 backend on 127.0.0.1:0 that answers every request with its name, echoing the
/// request headers it saw as JSON under `/headers`.
pub struct Backend {
    pub addr: SocketAddr,
    pub name: String,
    pub task: tokio::task::JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Backend {
    pub async fn start(name: &str) -> Backend {
        use axum::routing::get;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let n = name.to_string();
        let n2 = name.to_string();
        let app = axum::Router::new()
            .route(
                "/version",
                get(|req: axum::extract::Request| async move { format!("{:?}", req.version()) }),
            )
            .route(
                "/headers",
                get(move |h: axum::http::HeaderMap| async move {
                    let m: serde_json::Map<String, Value> = h
                        .iter()
                        .map(|(k, v)| {
                            (
                                k.to_string(),
                                Value::String(v.to_str().unwrap_or("").into()),
                            )
                        })
                        .collect();
                    axum::Json(serde_json::json!({"backend": n2, "headers": m}))
                }),
            )
            .fallback(move || {
                let n = n.clone();
                async move { n }
            });
        tls::install_provider();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Backend {
            addr,
            name: name.into(),
            task,
        }
    }
}

/// Sends requests in a loop until stopped, counting successes and failures.
pub struct Traffic {
    pub ok: Arc<AtomicU64>,
    pub failed: Arc<AtomicU64>,
    pub last_error: Arc<std::sync::Mutex<String>>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Traffic {
    /// `url` is requested repeatedly; a response is a success if it is 200 and its body is one of
    /// `accept` (the backends that may legitimately answer at this point).
    pub fn start(url: String, accept: Arc<std::sync::Mutex<Vec<String>>>) -> Traffic {
        Self::start_n(url, accept, 1)
    }

    /// Like `start`, with `workers` concurrent request loops.
    pub fn start_n(
        url: String,
        accept: Arc<std::sync::Mutex<Vec<String>>>,
        workers: usize,
    ) -> Traffic {
        tls::install_provider();
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let last_error = Arc::new(std::sync::Mutex::new(String::new()));
        let mut tasks = Vec::new();
        for _ in 0..workers {
            let (o, f, s, le) = (ok.clone(), failed.clone(), stop.clone(), last_error.clone());
            let (url, accept) = (url.clone(), accept.clone());
            tasks.push(tokio::spawn(async move {
                let client = reqwest::Client::builder()
                    .timeout(Duration::from_secs(5))
                    .build()
                    .expect("client");
                // Bounded: at most 200k requests or until stopped.
                for _ in 0..200_000 {
                    if s.load(Ordering::Relaxed) {
                        break;
                    }
                    let res = client.get(&url).send().await;
                    let good = match res {
                        Ok(r) => {
                            let code = r.status();
                            let body = r.text().await.unwrap_or_default();
                            let allowed = accept.lock().map(|a| a.contains(&body)).unwrap_or(false);
                            if code == 200 && allowed {
                                true
                            } else {
                                if let Ok(mut l) = le.lock() {
                                    *l = format!("{code}: {body}");
                                }
                                false
                            }
                        }
                        Err(e) => {
                            if let Ok(mut l) = le.lock() {
                                *l = e.to_string();
                            }
                            false
                        }
                    };
                    if good {
                        o.fetch_add(1, Ordering::Relaxed);
                    } else {
                        f.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }
        let task = tokio::spawn(async move {
            for t in tasks {
                let _ = t.await;
            }
        });
        Traffic {
            ok,
            failed,
            last_error,
            stop,
            task,
        }
    }

    pub async fn stop(self) -> (u64, u64, String) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
        let e = self
            .last_error
            .lock()
            .map(|l| l.clone())
            .unwrap_or_default();
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
            e,
        )
    }
}

/// A port that was free a moment ago (for configs that must name a port before anything binds it).
/// A mesh client presenting `id`, issued by the dev CA `ca` and trusting its roots (a Linux
/// sidecar's view of the gateway's mesh port).
pub fn mesh_client(ca: &winmesh::identity::dev_ca::DevCa, id: &str) -> tls::MeshClient {
    let (key, chain) = ca
        .issue(
            &winmesh::identity::SpiffeId::parse(id).unwrap(),
            Duration::from_secs(3600),
        )
        .unwrap();
    tls::MeshClient {
        chain_pem: chain[..chain.len() - 1].concat(),
        key_pem: key.expose().to_string(),
        roots_pem: ca.roots_pem(),
    }
}

pub async fn get_text(url: &str) -> Option<(u16, String)> {
    tls::install_provider();
    let r = reqwest::Client::new()
        .get(url)
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .ok()?;
    let code = r.status().as_u16();
    Some((code, r.text().await.ok()?))
}

/// Starts winmesh for gateway tests on loopback: identity `spiffe://cluster.local/ns/winmesh/sa/gw` from
/// a dev CA kept in `dir`, `mesh_file` polled every 100 ms (`mesh_extra`: more lines under `mesh:`,
/// indented by two spaces), Windows-facing HTTP port `out_port`. Returns the server and its config with
/// `xds.listen` set to the bound address, ready for `winmesh bootstrap`.
pub async fn start_gateway_winmesh(
    dir: &Path,
    mesh_file: &Path,
    out_port: u16,
    mesh_extra: &str,
) -> (winmesh::serve::Server, winmesh::config::Config) {
    let cfg_text = format!(
        "xds:\n  listen: 127.0.0.1:0\ndebug:\n  listen: 127.0.0.1:0\nidentity:\n  namespace: winmesh\n  service_account: gw\n\
         ca:\n  mode: dev\n  state_dir: {}\nmesh:\n  file: {}\n  poll_interval: 100ms\n{mesh_extra}\
         gateway:\n  inbound_address: 127.0.0.1\n  outbound_address: 127.0.0.1\n  outbound_port: {out_port}\n",
        dir.join("dev-ca").display(),
        mesh_file.display()
    );
    let cfg_path = dir.join("winmesh.yaml");
    std::fs::write(&cfg_path, cfg_text).expect("write config");
    let mut cfg = winmesh::config::Config::load(&cfg_path).expect("config");
    let server = winmesh::serve::start(cfg.clone()).await.expect("serve");
    cfg.xds.listen = server.running.xds_addr;
    (server, cfg)
}
