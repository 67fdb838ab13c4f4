//! `make bench` (second half): winmesh end to end, as a user runs it. Starts the release `winmesh
//! serve` binary with a mesh file, connects K synthetic ADS clients (SotW or delta; each subscribes
//! and ACKs like Envoy: CDS and LDS wildcard, then EDS for every EDS cluster and RDS for every route
//! configuration the listeners name), then rewrites one endpoint in the mesh file ≥ 20 times and
//! times file change → every client holding the new endpoint.
//!
//! Reports, per row: time until all clients synced, update latency p50/p99/max over all clients and
//! changes, bytes and responses per stream per update, and winmesh's RSS at rest and per stream.
//! `WINMESH_BENCH_ROWS` picks rows (e.g. `sotw:1000:100:10`) instead of the default set.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, http_connection_manager::RouteSpecifier,
};
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DiscoveryRequest, Resource as DeltaResource,
};
use envoy_types::pb::google::protobuf::Any;
use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

const CDS: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
const EDS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
const LDS: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
const RDS: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    Sotw,
    Delta,
}

#[derive(Clone, Copy, Debug)]
struct Row {
    mode: Mode,
    streams: usize,
    services: usize,
    endpoints: usize,
}

/// The address the changed endpoint gets in change `k` (never used by the generated mesh).
fn marker(k: usize) -> String {
    format!("10.254.{}.{}", k / 250, k % 250 + 1)
}

/// N Linux services with one HTTP port and E endpoints each, N/10 Windows services. `k` > 0 moves
/// the first endpoint of svc-0 to `marker(k)`.
fn mesh_yaml(n: usize, e: usize, k: usize) -> String {
    let mut s = String::from("services:\n");
    for i in 0..n {
        let _ = write!(
            s,
            "  - name: svc-{i}\n    namespace: ns-{}\n    ports: [{{name: http, port: 8080}}]\n    endpoints:\n",
            i % 50
        );
        for j in 0..e {
            let addr = if i == 0 && j == 0 && k > 0 {
                marker(k)
            } else {
                format!("10.{}.{}.{}", i / 250 % 250, i % 250, j + 1)
            };
            let _ = writeln!(s, "      - {{address: {addr}, service_account: sa-{i}}}");
        }
    }
    s.push_str("windows_services:\n");
    for i in 0..(n / 10).max(1) {
        let _ = writeln!(
            s,
            "  - {{name: win-{i}, namespace: win, ports: [{{name: http, port: 8080, gateway_port: 15443}}], backends: [192.168.0.{}]}}",
            i % 250 + 1
        );
    }
    s
}

fn free_port() -> u16 {
    // Below the ephemeral range, so no outgoing connection takes it before winmesh binds it.
    let start = 20_000 + (std::process::id() % 5_000) as u16;
    (start..30_000)
        .find(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
        .expect("a free port")
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn cpu_ticks(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let rest = s.rsplit_once(')')?.1.to_string();
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0)
}

struct Server {
    child: Child,
    addr: String,
    mesh: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write mesh");
    std::fs::rename(&tmp, path).expect("rename mesh");
}

fn start_server(row: &Row) -> Server {
    let dir = tempfile::tempdir().expect("tempdir");
    let mesh = dir.path().join("mesh.yaml");
    write_atomically(&mesh, &mesh_yaml(row.services, row.endpoints, 0));
    let port = free_port();
    let cfg = dir.path().join("winmesh.yaml");
    std::fs::write(
        &cfg,
        format!(
            "xds:\n  listen: 127.0.0.1:{port}\ndebug:\n  listen: 127.0.0.1:0\nmesh:\n  file: {}\n",
            mesh.display()
        ),
    )
    .expect("config");
    let child = Command::new(env!("CARGO_BIN_EXE_winmesh"))
        .args(["serve", "--config"])
        .arg(&cfg)
        .env("WINMESH_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start winmesh");
    let addr = format!("127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(&addr).is_err() {
        assert!(
            Instant::now() < deadline,
            "winmesh did not listen on {addr}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Server {
        child,
        addr,
        mesh,
        _dir: dir,
    }
}

/// What every client reports.
#[derive(Default)]
struct Shared {
    synced: AtomicUsize,
    /// Per change: nanoseconds since the bench epoch at which each client saw the marker.
    seen: std::sync::Mutex<Vec<Vec<u64>>>,
    bytes: AtomicU64,
    responses: AtomicU64,
    /// Counting starts once everything synced (bytes/responses per update).
    counting: std::sync::atomic::AtomicBool,
    resets: AtomicUsize,
}

fn eds_names(resources: &[Any]) -> BTreeSet<String> {
    resources
        .iter()
        .filter_map(|a| Cluster::decode(a.value.as_slice()).ok())
        .filter(|c| c.eds_cluster_config.is_some())
        .map(|c| {
            let s = c
                .eds_cluster_config
                .map(|e| e.service_name)
                .unwrap_or_default();
            if s.is_empty() { c.name } else { s }
        })
        .collect()
}

fn rds_names(resources: &[Any]) -> BTreeSet<String> {
    let hcm = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
    let mut out = BTreeSet::new();
    for a in resources {
        let Ok(l) = Listener::decode(a.value.as_slice()) else {
            continue;
        };
        for chain in l.filter_chains.iter().chain(l.default_filter_chain.iter()) {
            for f in &chain.filters {
                use envoy_types::pb::envoy::config::listener::v3::filter::ConfigType;
                if let Some(ConfigType::TypedConfig(any)) = &f.config_type
                    && any.type_url == hcm
                    && let Ok(h) = HttpConnectionManager::decode(any.value.as_slice())
                    && let Some(RouteSpecifier::Rds(r)) = h.route_specifier
                {
                    out.insert(r.route_config_name);
                }
            }
        }
    }
    out
}

/// True if this encoded ClusterLoadAssignment is `cluster` and holds `addr`. Reads the first field
/// (cluster_name, field 1, encoded first by prost) without decoding the rest.
fn cla_has(body: &[u8], cluster: &str, addr: &str) -> bool {
    let n = cluster.len();
    n < 128
        && body.len() > n + 2
        && body[0] == 0x0a
        && body[1] as usize == n
        && &body[2..2 + n] == cluster.as_bytes()
        && body.windows(addr.len()).any(|w| w == addr.as_bytes())
}

struct Watch {
    /// (change number, its marker) the clients look for.
    want: watch::Receiver<(usize, String)>,
    epoch: Instant,
    cluster: String,
}

impl Watch {
    fn check<'a>(&mut self, shared: &Shared, mut bodies: impl Iterator<Item = &'a [u8]>) {
        let (k, addr) = self.want.borrow().clone();
        if k == 0 {
            return;
        }
        if bodies.any(|b| cla_has(b, &self.cluster, &addr)) {
            let t = self.epoch.elapsed().as_nanos() as u64;
            if let Ok(mut seen) = shared.seen.lock()
                && let Some(v) = seen.get_mut(k - 1)
            {
                v.push(t);
            }
        }
    }
}

fn node(i: usize) -> Node {
    Node {
        id: format!("bench-{i}"),
        cluster: "bench".into(),
        ..Default::default()
    }
}

async fn sotw_client(
    i: usize,
    addr: String,
    shared: Arc<Shared>,
    mut w: Watch,
    eds_expected: usize,
) -> Result<(), String> {
    let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{addr}"))
        .await
        .map_err(|e| e.to_string())?
        .max_decoding_message_size(256 << 20);
    let (tx, rx) = mpsc::channel(16);
    let req = |t: &str, names: Vec<String>, version: &str, nonce: &str| DiscoveryRequest {
        node: Some(node(i)),
        type_url: t.into(),
        resource_names: names,
        version_info: version.into(),
        response_nonce: nonce.into(),
        ..Default::default()
    };
    let _ = tx.send(req(CDS, vec![], "", "")).await;
    let _ = tx.send(req(LDS, vec![], "", "")).await;
    let mut resp = client
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await
        .map_err(|e| e.to_string())?
        .into_inner();
    let (mut eds, mut rds) = (BTreeSet::new(), BTreeSet::new());
    let (mut eds_nonce, mut rds_nonce) = (String::new(), String::new());
    let (mut have_eds, mut have_lds, mut have_rds, mut synced) = (0usize, false, false, false);
    while let Some(r) = resp.message().await.map_err(|e| e.to_string())? {
        if shared.counting.load(Ordering::Relaxed) {
            shared
                .bytes
                .fetch_add(r.encoded_len() as u64, Ordering::Relaxed);
            shared.responses.fetch_add(1, Ordering::Relaxed);
        }
        match r.type_url.as_str() {
            CDS => {
                let names = eds_names(&r.resources);
                let _ = tx.send(req(CDS, vec![], &r.version_info, &r.nonce)).await;
                if names != eds {
                    eds = names;
                    let _ = tx
                        .send(req(EDS, eds.iter().cloned().collect(), "", &eds_nonce))
                        .await;
                }
            }
            EDS => {
                have_eds = r.resources.len().max(have_eds);
                w.check(&shared, r.resources.iter().map(|a| a.value.as_slice()));
                eds_nonce = r.nonce.clone();
                let _ = tx
                    .send(req(
                        EDS,
                        eds.iter().cloned().collect(),
                        &r.version_info,
                        &r.nonce,
                    ))
                    .await;
            }
            LDS => {
                have_lds = true;
                let names = rds_names(&r.resources);
                let _ = tx.send(req(LDS, vec![], &r.version_info, &r.nonce)).await;
                if names != rds {
                    rds = names;
                    let _ = tx
                        .send(req(RDS, rds.iter().cloned().collect(), "", &rds_nonce))
                        .await;
                }
                have_rds |= rds.is_empty();
            }
            RDS => {
                have_rds = true;
                rds_nonce = r.nonce.clone();
                let _ = tx
                    .send(req(
                        RDS,
                        rds.iter().cloned().collect(),
                        &r.version_info,
                        &r.nonce,
                    ))
                    .await;
            }
            _ => {}
        }
        if !synced && have_eds >= eds_expected && have_lds && have_rds {
            synced = true;
            shared.synced.fetch_add(1, Ordering::SeqCst);
        }
    }
    Ok(())
}

async fn delta_client(
    i: usize,
    addr: String,
    shared: Arc<Shared>,
    mut w: Watch,
    eds_expected: usize,
) -> Result<(), String> {
    let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{addr}"))
        .await
        .map_err(|e| e.to_string())?
        .max_decoding_message_size(256 << 20);
    let (tx, rx) = mpsc::channel(16);
    let req = |t: &str, sub: Vec<String>, nonce: &str| DeltaDiscoveryRequest {
        node: Some(node(i)),
        type_url: t.into(),
        resource_names_subscribe: sub,
        response_nonce: nonce.into(),
        ..Default::default()
    };
    let _ = tx.send(req(CDS, vec![], "")).await;
    let _ = tx.send(req(LDS, vec![], "")).await;
    let mut resp = client
        .delta_aggregated_resources(ReceiverStream::new(rx))
        .await
        .map_err(|e| e.to_string())?
        .into_inner();
    let (mut eds, mut rds) = (BTreeSet::new(), BTreeSet::new());
    let (mut eds_have, mut have_lds, mut have_rds, mut synced) =
        (BTreeSet::new(), false, false, false);
    let (mut eds_sent, mut rds_sent) = (false, false);
    while let Some(r) = resp.message().await.map_err(|e| e.to_string())? {
        if shared.counting.load(Ordering::Relaxed) {
            shared
                .bytes
                .fetch_add(r.encoded_len() as u64, Ordering::Relaxed);
            shared.responses.fetch_add(1, Ordering::Relaxed);
        }
        let bodies = |rs: &[DeltaResource]| -> Vec<Any> {
            rs.iter().filter_map(|x| x.resource.clone()).collect()
        };
        match r.type_url.as_str() {
            CDS => {
                let names = eds_names(&bodies(&r.resources));
                let new: Vec<String> = names.difference(&eds).cloned().collect();
                eds.extend(names);
                let _ = tx.send(req(CDS, vec![], &r.nonce)).await;
                if !new.is_empty() || !eds_sent {
                    eds_sent = true;
                    let _ = tx.send(req(EDS, new, "")).await;
                }
            }
            EDS => {
                for x in &r.resources {
                    eds_have.insert(x.name.clone());
                }
                w.check(
                    &shared,
                    r.resources
                        .iter()
                        .filter_map(|x| x.resource.as_ref())
                        .map(|a| a.value.as_slice()),
                );
                let _ = tx.send(req(EDS, vec![], &r.nonce)).await;
            }
            LDS => {
                have_lds = true;
                let names = rds_names(&bodies(&r.resources));
                let new: Vec<String> = names.difference(&rds).cloned().collect();
                rds.extend(names);
                let _ = tx.send(req(LDS, vec![], &r.nonce)).await;
                if !new.is_empty() || !rds_sent {
                    rds_sent = true;
                    let _ = tx.send(req(RDS, new, "")).await;
                }
                have_rds |= rds.is_empty();
            }
            RDS => {
                have_rds = true;
                let _ = tx.send(req(RDS, vec![], &r.nonce)).await;
            }
            _ => {}
        }
        if !synced && eds_have.len() >= eds_expected && have_lds && have_rds {
            synced = true;
            shared.synced.fetch_add(1, Ordering::SeqCst);
        }
    }
    Ok(())
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn run_row(rt: &tokio::runtime::Runtime, row: Row, changes: usize) -> String {
    let server = start_server(&row);
    let pid = server.child.id();
    // At rest: winmesh has loaded and translated the mesh (it listens after the first snapshot).
    std::thread::sleep(Duration::from_millis(500));
    let rss_rest = rss_kib(pid);
    let shared = Arc::new(Shared::default());
    shared
        .seen
        .lock()
        .map(|mut s| *s = vec![Vec::new(); changes])
        .ok();
    let (want_tx, want_rx) = watch::channel((0usize, String::new()));
    let epoch = Instant::now();
    let eds_expected = row.services;
    let mut tasks = Vec::new();
    let t0 = Instant::now();
    for i in 0..row.streams {
        let w = Watch {
            want: want_rx.clone(),
            epoch,
            cluster: "outbound|8080||svc-0.ns-0.svc.cluster.local".into(),
        };
        let (addr, shared) = (server.addr.clone(), shared.clone());
        tasks.push(rt.spawn(async move {
            let r = match row.mode {
                Mode::Sotw => sotw_client(i, addr, shared.clone(), w, eds_expected).await,
                Mode::Delta => delta_client(i, addr, shared.clone(), w, eds_expected).await,
            };
            if let Err(e) = r {
                if !e.contains("h2 protocol error: error reading a body from connection") {
                    eprintln!("stream {i}: {e}");
                }
                shared.resets.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    while shared.synced.load(Ordering::SeqCst) < row.streams {
        if Instant::now() > deadline || shared.resets.load(Ordering::SeqCst) > 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let sync_all = t0.elapsed();
    let synced = shared.synced.load(Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(300));
    let rss_streams = rss_kib(pid);
    shared.counting.store(true, Ordering::SeqCst);
    let cpu0 = cpu_ticks(pid);
    let mut lat = Vec::new();
    let mut missed = 0usize;
    for k in 1..=changes {
        let text = mesh_yaml(row.services, row.endpoints, k);
        let start = epoch.elapsed().as_nanos() as u64;
        want_tx.send_replace((k, marker(k)));
        write_atomically(&server.mesh, &text);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let n = shared
                .seen
                .lock()
                .map(|s| s[k - 1].len())
                .unwrap_or_default();
            if n >= synced || Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        if let Ok(s) = shared.seen.lock() {
            missed += synced.saturating_sub(s[k - 1].len());
            lat.extend(
                s[k - 1]
                    .iter()
                    .map(|t| t.saturating_sub(start) as f64 / 1e6),
            );
        }
        // Let the ACKs land before the next change (a change per ~100 ms, as a busy cluster).
        std::thread::sleep(Duration::from_millis(100));
    }
    let cpu = cpu_ticks(pid).saturating_sub(cpu0);
    shared.counting.store(false, Ordering::SeqCst);
    lat.sort_by(|a, b| a.total_cmp(b));
    let per_update = (synced.max(1) * changes) as f64;
    let line = format!(
        "| {:?} | {} | {}×{} | {}/{} in {:.2} s | {:.1} / {:.1} / {:.1} ms{} | {:.1} kB / {:.2} | {:.0} MB | {:.0} kB | {:.0} ms | {} |",
        row.mode,
        row.streams,
        row.services,
        row.endpoints,
        synced,
        row.streams,
        sync_all.as_secs_f64(),
        pct(&lat, 0.5),
        pct(&lat, 0.99),
        lat.last().copied().unwrap_or(f64::NAN),
        if missed > 0 {
            format!(" ({missed} missed)")
        } else {
            String::new()
        },
        shared.bytes.load(Ordering::Relaxed) as f64 / per_update / 1000.0,
        shared.responses.load(Ordering::Relaxed) as f64 / per_update,
        rss_rest as f64 / 1024.0,
        rss_streams.saturating_sub(rss_rest) as f64 / row.streams as f64,
        cpu as f64 * 10.0 / changes as f64,
        shared.resets.load(Ordering::SeqCst),
    );
    for t in tasks {
        t.abort();
    }
    drop(server);
    line
}

fn parse_rows(s: &str) -> Vec<Row> {
    s.split(',')
        .filter_map(|r| {
            let f: Vec<&str> = r.trim().split(':').collect();
            let mode = match *f.first()? {
                "sotw" => Mode::Sotw,
                "delta" => Mode::Delta,
                _ => return None,
            };
            Some(Row {
                mode,
                streams: f.get(1)?.parse().ok()?,
                services: f.get(2)?.parse().ok()?,
                endpoints: f.get(3)?.parse().ok()?,
            })
        })
        .collect()
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let rows = match std::env::var("WINMESH_BENCH_ROWS") {
        Ok(s) => parse_rows(&s),
        Err(_) => {
            let mut v = Vec::new();
            for mode in [Mode::Sotw, Mode::Delta] {
                for streams in [10, 100, 1000] {
                    v.push(Row {
                        mode,
                        streams,
                        services: 1000,
                        endpoints: 10,
                    });
                }
            }
            for mode in [Mode::Sotw, Mode::Delta] {
                v.push(Row {
                    mode,
                    streams: 1,
                    services: 10_000,
                    endpoints: 10,
                });
            }
            v
        }
    };
    let changes: usize = std::env::var("WINMESH_BENCH_CHANGES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    println!(
        "| mode | streams | services×endpoints | all synced | mesh-file change → every stream has it, p50 / p99 / max | per stream per update: bytes / responses | winmesh RSS at rest | RSS per stream | winmesh CPU per change | streams reset |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for row in rows {
        println!("{}", run_row(&rt, row, changes));
    }
}
