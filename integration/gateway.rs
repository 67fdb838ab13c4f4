//! End to end on loopback with real Envoys: a "Linux sidecar" configured as Istio configures one, the
//! gateway Envoy driven by winmesh (mesh file, dev CA), a plain HTTP app standing in for the Windows
//! service, and a plain HTTP app behind the Linux sidecar.

mod support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use support::tls::{MeshClient, SanCheck};
use support::{Backend, Envoy, Traffic, free_port, wait_for};
use winmesh::bootstrap::{BootstrapOptions, bootstrap_yaml};
use winmesh::identity::SpiffeId;
use winmesh::identity::dev_ca::DevCa;
use winmesh::sidecar::{Inbound, Outbound, PEER_EXCHANGE_MAGIC, Sidecar};

const T: Duration = Duration::from_secs(30);
const GW_ID: &str = "spiffe://cluster.local/ns/winmesh/sa/gw";
const WIN_ID: &str = "spiffe://cluster.local/ns/win/sa/winapp";
const LINUX_ID: &str = "spiffe://cluster.local/ns/linux/sa/linuxapp";
const WIN_HOST: &str = "winapp.win.svc.cluster.local";

struct World {
    dir: tempfile::TempDir,
    server: winmesh::serve::Server,
    gateway: Envoy,
    sidecar: Envoy,
    /// Gateway mesh-facing port for winapp:8080.
    gw_http: SocketAddr,
    /// Gateway mesh-facing port for winapp-grpc:9090.
    gw_grpc: SocketAddr,
    /// Gateway Windows-facing HTTP listener.
    gw_out: SocketAddr,
    /// Gateway local TCP port for linuxapp-tcp.
    gw_tcp: SocketAddr,
    /// Sidecar listeners the Linux app uses to reach winapp (HTTP/1.1) and winapp-grpc (HTTP/2).
    sc_to_win: SocketAddr,
    sc_to_win_grpc: SocketAddr,
    sc_inbound: SocketAddr,
    ca: DevCa,
    mesh_file: PathBuf,
    win_b: Backend,
    _apps: Vec<Backend>,
    _trap: tokio::task::JoinHandle<()>,
}

fn mesh_yaml(
    w_http: u16,
    w_grpc: u16,
    win: &Backend,
    win_grpc: &Backend,
    sc_in: u16,
    tcp_local: u16,
    extra: &str,
) -> String {
    format!(
        r#"
services:
  - name: linuxapp
    namespace: linux
    ports:
      - {{name: http, port: 8080}}
      - {{name: grpc, port: 9090}}
    endpoints:
      - address: 127.0.0.1
        ports: {{http: {sc_in}, grpc: {sc_in}}}
        service_account: linuxapp
  - name: linuxapp-tcp
    namespace: linux
    ports:
      - {{name: tcp, port: 9000, local_port: {tcp_local}}}
    endpoints:
      - address: 127.0.0.1
        ports: {{tcp: {sc_in}}}
        service_account: linuxapp
windows_services:
  - name: winapp
    namespace: win
    identity: {WIN_ID}
    ports:
      - {{name: http, port: 8080, gateway_port: {w_http}, target_port: {}}}
    backends: [127.0.0.1]
  - name: winapp-grpc
    namespace: win
    ports:
      - {{name: grpc, port: 9090, gateway_port: {w_grpc}, target_port: {}}}
    backends: [127.0.0.1]
{extra}"#,
        win.addr.port(),
        win_grpc.addr.port(),
    )
}

/// Serves Istio's metadata-exchange preamble and then nothing: what a client that negotiated
/// `istio-peer-exchange` with a real sidecar gets.
async fn peer_exchange_trap() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                use tokio::io::AsyncWriteExt;
                let _ = s.write_all(&PEER_EXCHANGE_MAGIC).await;
                let _ = s.write_all(&[0, 0, 0, 8, 1, 2, 3, 4, 5, 6, 7, 8]).await;
                tokio::time::sleep(Duration::from_secs(60)).await;
            });
        }
    });
    (addr, task)
}

impl World {
    async fn start() -> Option<World> {
        support::init_tracing();
        let bin = support::envoy_bin()?;
        let dir = tempfile::tempdir().unwrap();
        let win = Backend::start("winapp").await;
        let win_b = Backend::start("winapp-b").await;
        let win_grpc = Backend::start("winapp-grpc").await;
        let linux = Backend::start("linuxapp").await;
        let (trap, trap_task) = peer_exchange_trap().await;
        let (w_http, w_grpc, out_port, sc_in, tcp_local) = (
            free_port(),
            free_port(),
            free_port(),
            free_port(),
            free_port(),
        );

        let mesh_file = dir.path().join("mesh.yaml");
        std::fs::write(
            &mesh_file,
            mesh_yaml(w_http, w_grpc, &win, &win_grpc, sc_in, tcp_local, ""),
        )
        .unwrap();
        let state = dir.path().join("dev-ca");
        let (server, cfg) =
            support::start_gateway_winmesh(dir.path(), &mesh_file, out_port, "").await;
        let gateway = Envoy::start(&bin, &bootstrap_yaml(&cfg, &BootstrapOptions::default())).await;

        // The Linux side: certificates from the same mesh CA, Istio sidecar configuration.
        let ca = DevCa::load_or_create(&state, "cluster.local").unwrap();
        let certs = dir.path().join("linux-certs");
        ca.issue_to_dir(
            &SpiffeId::parse(LINUX_ID).unwrap(),
            Duration::from_secs(3600),
            &certs,
        )
        .unwrap();
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let sc = Sidecar {
            node_id: "linuxapp.linux".into(),
            admin: any,
            trust_domain: "cluster.local".into(),
            certs: &certs,
            outbound: vec![
                Outbound {
                    name: "to-winapp".into(),
                    listen: any,
                    host: WIN_HOST.into(),
                    port: 8080,
                    http2: false,
                    endpoint: SocketAddr::from(([127, 0, 0, 1], w_http)),
                    expected_sans: vec![WIN_ID.into()],
                },
                Outbound {
                    name: "to-winapp-grpc".into(),
                    listen: any,
                    host: "winapp-grpc.win.svc.cluster.local".into(),
                    port: 9090,
                    http2: true,
                    endpoint: SocketAddr::from(([127, 0, 0, 1], w_grpc)),
                    expected_sans: vec![GW_ID.into()],
                },
            ],
            inbound: Some(Inbound {
                listen: SocketAddr::from(([127, 0, 0, 1], sc_in)),
                app: linux.addr,
                app_http2: false,
                peer_exchange_trap: Some(trap),
            }),
        };
        // `ENVOY_SIDECAR_BIN` runs the Istio sidecar on another Envoy release than the gateway
        // (`make compat` pairs a 1.40 gateway with older sidecars: key-exchange fallback).
        let sidecar_bin = std::env::var_os("ENVOY_SIDECAR_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| bin.clone());
        let sidecar = Envoy::start(
            &sidecar_bin,
            &serde_yaml::to_string(&sc.bootstrap()).unwrap(),
        )
        .await;

        let gw_http = SocketAddr::from(([127, 0, 0, 1], w_http));
        let gw_grpc = SocketAddr::from(([127, 0, 0, 1], w_grpc));
        let gw_out = SocketAddr::from(([127, 0, 0, 1], out_port));
        let gw_tcp = SocketAddr::from(([127, 0, 0, 1], tcp_local));
        for name in [
            winmesh::translate::inbound::listener_name(w_http),
            winmesh::translate::inbound::listener_name(w_grpc),
            winmesh::translate::outbound::HTTP_LISTENER.to_string(),
            winmesh::translate::outbound::tcp_listener_name(tcp_local),
        ] {
            wait_for(
                &format!("gateway listener {name}"),
                T,
                || gateway.diagnostics(),
                || gateway.listener_addr(&name),
            )
            .await;
        }
        let sc_to_win = wait_for(
            "sidecar listener",
            T,
            || sidecar.diagnostics(),
            || sidecar.listener_addr("to-winapp"),
        )
        .await;
        let sc_to_win_grpc = wait_for(
            "sidecar listener",
            T,
            || sidecar.diagnostics(),
            || sidecar.listener_addr("to-winapp-grpc"),
        )
        .await;
        wait_for(
            "gateway LIVE",
            T,
            || gateway.diagnostics(),
            || async { gateway.is_live().await.then_some(()) },
        )
        .await;
        Some(World {
            dir,
            server,
            gateway,
            sidecar,
            gw_http,
            gw_grpc,
            gw_out,
            gw_tcp,
            sc_to_win,
            sc_to_win_grpc,
            sc_inbound: SocketAddr::from(([127, 0, 0, 1], sc_in)),
            ca,
            mesh_file,
            win_b,
            _apps: vec![win, win_grpc, linux],
            _trap: trap_task,
        })
    }

    async fn diag(&self) -> String {
        let (_, reg) =
            winmesh::status::http_get(self.server.running.debug_addr, "/debug/registryz", None)
                .await
                .unwrap_or_default();
        format!(
            "registryz: {reg}\nGATEWAY {}\nSIDECAR {}",
            self.gateway.diagnostics().await,
            self.sidecar.diagnostics().await
        )
    }

    /// A mesh client presenting `id` (issued by `ca`), as a Linux sidecar would connect to winapp.
    fn client(&self, ca: &DevCa, id: &str) -> MeshClient {
        let (key, chain) = ca
            .issue(&SpiffeId::parse(id).unwrap(), Duration::from_secs(3600))
            .unwrap();
        MeshClient {
            chain_pem: chain[..chain.len() - 1].concat(),
            key_pem: key.expose().to_string(),
            roots_pem: self.ca.roots_pem(),
        }
    }

    async fn call_winapp(&self, c: &MeshClient, path: &str) -> Result<support::tls::Reply, String> {
        c.get(
            self.gw_http,
            &format!("outbound_.8080_._.{WIN_HOST}"),
            &["istio-http/1.1", "istio", "http/1.1"],
            SanCheck::Exact(vec![WIN_ID.into()]),
            path,
        )
        .await
    }

    /// Waits until `c` gets a 200 from winapp over the mesh port.
    async fn until_winapp_answers(&self, c: &MeshClient) {
        wait_for(
            "winapp answers over Istio mTLS",
            T,
            || self.diag(),
            || async {
                self.call_winapp(c, "/")
                    .await
                    .ok()
                    .filter(|r| r.status == 200)
            },
        )
        .await;
    }

    /// Waits until the Linux app's sidecar `url` (Linux → Windows) answers 200.
    async fn until_sidecar_reaches_winapp(&self, url: &str) {
        wait_for(
            "Linux → Windows through the sidecar",
            T,
            || self.diag(),
            || async { support::get_text(url).await.filter(|(c, _)| *c == 200) },
        )
        .await;
    }

    async fn call_winapp_with(
        &self,
        c: &MeshClient,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<support::tls::Reply, String> {
        c.get_with(
            self.gw_http,
            &format!("outbound_.8080_._.{WIN_HOST}"),
            &["istio-http/1.1", "istio", "http/1.1"],
            SanCheck::Exact(vec![WIN_ID.into()]),
            path,
            headers,
        )
        .await
    }

    /// winapp's own backend, for re-rendering the mesh file with it.
    fn winapp_backend(&self) -> Backend {
        FakePort(self._apps[0].addr.port()).backend()
    }

    fn edit_mesh(&self, extra: &str, win_backend: &Backend) {
        let text = std::fs::read_to_string(&self.mesh_file).unwrap();
        // Rebuild from the parts we know: ports are in the current file.
        let port_of = |key: &str| -> u16 {
            let i = text.find(key).unwrap() + key.len();
            text[i..]
                .split(|c: char| !c.is_ascii_digit())
                .next()
                .unwrap()
                .parse()
                .unwrap()
        };
        let sc_in = port_of("ports: {http: ");
        let tcp_local = port_of("local_port: ");
        let grpc_target = {
            let i = text.find("gateway_port: ").unwrap();
            let rest = &text[i + 14..];
            let j = rest.find("gateway_port: ").unwrap();
            let after = &rest[j..];
            let k = after.find("target_port: ").unwrap() + 13;
            after[k..]
                .split(|c: char| !c.is_ascii_digit())
                .next()
                .unwrap()
                .parse::<u16>()
                .unwrap()
        };
        let text = mesh_yaml(
            self.gw_http.port(),
            self.gw_grpc.port(),
            win_backend,
            &FakePort(grpc_target).backend(),
            sc_in,
            tcp_local,
            extra,
        );
        let tmp = self.dir.path().join("mesh.yaml.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &self.mesh_file).unwrap();
    }

    async fn stop(self) {
        self.gateway.stop().await;
        self.sidecar.stop().await;
        self.server.stop().await;
    }
}

/// Stand-in used when re-rendering the mesh file with a known port.
struct FakePort(u16);
impl FakePort {
    fn backend(&self) -> Backend {
        Backend {
            addr: SocketAddr::from(([127, 0, 0, 1], self.0)),
            name: String::new(),
            task: tokio::spawn(async {}),
        }
    }
}

fn headers(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_directions_carry_istio_identities() {
    let Some(w) = World::start().await else {
        return;
    };
    // Linux → Windows: the Linux app calls its sidecar, which speaks Istio mTLS to the gateway.
    let url = format!("http://{}/headers", w.sc_to_win);
    let (code, body) = wait_for(
        "Linux → Windows",
        T,
        || w.diag(),
        || async { support::get_text(&url).await.filter(|(c, _)| *c == 200) },
    )
    .await;
    assert_eq!(code, 200);
    let v = headers(&body);
    assert_eq!(v["backend"], "winapp");
    let xfcc = v["headers"]["x-forwarded-client-cert"]
        .as_str()
        .unwrap_or("");
    assert!(xfcc.contains(&format!("URI={LINUX_ID}")), "XFCC: {xfcc:?}");
    assert!(
        v["headers"].get("x-envoy-peer-metadata").is_none(),
        "peer metadata leaked to the app"
    );
    assert!(v["headers"].get("x-envoy-peer-metadata-id").is_none());

    // Windows → Linux, with the gateway as HTTP proxy and with a direct Host header.
    let proxy = reqwest::Client::builder()
        .proxy(reqwest::Proxy::http(format!("http://{}", w.gw_out)).unwrap())
        .build()
        .unwrap();
    let r = wait_for(
        "Windows → Linux",
        T,
        || w.diag(),
        || async {
            let r = proxy
                .get("http://linuxapp.linux:8080/headers")
                .send()
                .await
                .ok()?;
            (r.status() == 200).then_some(r)
        },
    )
    .await;
    let v = headers(&r.text().await.unwrap());
    assert_eq!(v["backend"], "linuxapp");
    let xfcc = v["headers"]["x-forwarded-client-cert"]
        .as_str()
        .unwrap_or("");
    assert!(
        xfcc.contains(&format!("URI={GW_ID}")),
        "the Linux side must see the gateway identity: {xfcc:?}"
    );
    for host in [
        "linuxapp.linux.svc.cluster.local:8080",
        "linuxapp.linux.svc:8080",
        "linuxapp:8080",
        "linuxapp.linux",
    ] {
        let r = reqwest::Client::new()
            .get(format!("http://{}/", w.gw_out))
            .header("host", host)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "Host {host}");
        assert_eq!(r.text().await.unwrap(), "linuxapp");
    }
    // An unknown host is not forwarded anywhere.
    let r = reqwest::Client::new()
        .get(format!("http://{}/", w.gw_out))
        .header("host", "nope.default:80")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    // A local TCP port reaches a TCP service over Istio mTLS (ALPN "istio", the sidecar's TCP chain).
    let (code, body) = support::get_text(&format!("http://{}/", w.gw_tcp))
        .await
        .expect("tcp service");
    assert_eq!((code, body.as_str()), (200, "linuxapp"));
    // No istio-peer-exchange was ever negotiated (the trap chain was never used).
    assert_eq!(
        w.sidecar
            .stat("tcp.peer-exchange.downstream_cx_total")
            .await,
        0
    );
    // Key exchange: Istio sets no ECDH curves for mesh mTLS, so each side offers its Envoy's
    // defaults (1.40: X25519MLKEM768, X25519, P-256). Whatever the pair of releases, the sidecar
    // negotiated a group it knows; against a pre-1.40 sidecar that is X25519.
    let curves = w
        .sidecar
        .admin_get("/stats?filter=ssl.curves")
        .await
        .unwrap_or_default();
    let used: Vec<&str> = curves
        .lines()
        .filter(|l| !l.trim_end().ends_with(": 0"))
        .collect();
    assert!(!used.is_empty(), "no TLS handshakes counted: {curves}");
    let sidecar_version = support::envoy_version(
        &std::env::var_os("ENVOY_SIDECAR_BIN")
            .map(PathBuf::from)
            .or_else(support::envoy_bin)
            .unwrap(),
    );
    let minor: u32 = sidecar_version
        .split('.')
        .nth(1)
        .and_then(|m| m.parse().ok())
        .unwrap_or(0);
    if minor < 40 {
        assert!(
            used.iter().all(|l| l.contains("ssl.curves.X25519:")),
            "a {sidecar_version} sidecar falls back to X25519: {used:?}"
        );
    }
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_works_both_ways() {
    let Some(w) = World::start().await else {
        return;
    };
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let url = format!("http://{}/version", w.sc_to_win_grpc);
    let body = wait_for(
        "Linux → Windows over HTTP/2",
        T,
        || w.diag(),
        || async {
            let r = h2.get(&url).send().await.ok()?;
            if r.status() != 200 {
                return None;
            }
            r.text().await.ok()
        },
    )
    .await;
    assert_eq!(
        body, "HTTP/2.0",
        "the Windows gRPC backend must be reached with HTTP/2"
    );
    assert!(
        w.gateway
            .stat("http.inbound|9090||winapp-grpc.win.svc.cluster.local.downstream_cx_http2_total")
            .await
            > 0
    );

    // Windows → Linux gRPC port: HTTP/2 over Istio mTLS with ALPN istio-h2.
    // (With HTTP/2 the authority comes from the URL, so go through the gateway as an HTTP proxy.)
    let h2_proxy = reqwest::Client::builder()
        .http2_prior_knowledge()
        .proxy(reqwest::Proxy::http(format!("http://{}", w.gw_out)).unwrap())
        .build()
        .unwrap();
    let r = h2_proxy
        .get("http://linuxapp.linux:9090/")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "linuxapp");
    assert!(
        w.sidecar
            .stat("http.inbound-http.downstream_cx_http2_total")
            .await
            > 0,
        "{}",
        w.diag().await
    );
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mesh_port_refuses_plaintext_strangers_and_unknown_sni() {
    let Some(w) = World::start().await else {
        return;
    };
    let linux = w.client(&w.ca, LINUX_ID);
    wait_for(
        "mTLS works",
        T,
        || w.diag(),
        || async {
            w.call_winapp(&linux, "/")
                .await
                .ok()
                .filter(|r| r.status == 200)
        },
    )
    .await;
    let r = w.call_winapp(&linux, "/").await.unwrap();
    assert_eq!(
        r.alpn.as_deref(),
        Some("http/1.1"),
        "server ALPN h2/http1.1, never istio*"
    );

    // TLS 1.2 with a suite an Istio sidecar refuses (not among its six defaults): refused. One of
    // the six: accepted.
    let sni = format!("outbound_.8080_._.{WIN_HOST}");
    let alpn = ["istio-http/1.1", "istio", "http/1.1"];
    let chacha = linux
        .handshake_tls12(
            w.gw_http,
            &sni,
            &alpn,
            &[rustls::crypto::ring::cipher_suite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256],
        )
        .await;
    assert!(
        chacha.is_err(),
        "CHACHA20 over TLS 1.2 accepted: {chacha:?}"
    );
    let gcm = linux
        .handshake_tls12(
            w.gw_http,
            &sni,
            &alpn,
            &[rustls::crypto::ring::cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256],
        )
        .await;
    assert_eq!(
        gcm.as_deref(),
        Ok("TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256")
    );

    // Plaintext HTTP to the mesh port: no response, connection closed.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(w.gw_http).await.unwrap();
        let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: winapp\r\n\r\n").await;
        let mut buf = vec![0u8; 256];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("closed promptly")
            .unwrap_or(0);
        assert!(
            !String::from_utf8_lossy(&buf[..n]).contains("HTTP/1.1 200"),
            "plaintext was served"
        );
        assert_eq!(n, 0, "plaintext must get nothing back");
    }
    // Unknown SNI: refused.
    let e = linux
        .get(
            w.gw_http,
            "outbound_.8080_._.other.win.svc.cluster.local",
            &["istio"],
            SanCheck::Prefix("spiffe://".into()),
            "/",
        )
        .await;
    assert!(e.is_err(), "unknown SNI was served: {e:?}");
    // A client certificate from another CA.
    let stranger_ca = DevCa::new_root("cluster.local").unwrap();
    let stranger = w.client(&stranger_ca, LINUX_ID);
    let e = w.call_winapp(&stranger, "/").await;
    assert!(
        e.is_err() || e.as_ref().is_ok_and(|r| r.status != 200),
        "foreign CA accepted: {e:?}"
    );
    // The mesh CA, but another trust domain.
    let foreign_td = w.client(&w.ca, "spiffe://evil.example/ns/linux/sa/linuxapp");
    let e = w.call_winapp(&foreign_td, "/").await;
    assert!(
        e.is_err() || e.as_ref().is_ok_and(|r| r.status != 200),
        "other trust domain accepted: {e:?}"
    );
    // And the peer-exchange ALPN is not what the gateway negotiates.
    let r = linux
        .get(
            w.gw_http,
            &format!("outbound_.8080_._.{WIN_HOST}"),
            &["istio-peer-exchange", "istio"],
            SanCheck::Exact(vec![WIN_ID.into()]),
            "/",
        )
        .await
        .unwrap();
    assert_ne!(r.alpn.as_deref(), Some("istio-peer-exchange"));
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_policies_deny_and_allow() {
    let Some(w) = World::start().await else {
        return;
    };
    let linux = w.client(&w.ca, LINUX_ID);
    let other = w.client(&w.ca, "spiffe://cluster.local/ns/linux/sa/other");
    w.until_winapp_answers(&linux).await;
    let win = w.winapp_backend();

    // DENY the Linux app: 403.
    w.edit_mesh(
        "authorization_policies:\n  - name: deny-linuxapp\n    namespace: win\n    action: DENY\n    rules:\n      - from:\n          - source:\n              principals: [cluster.local/ns/linux/sa/linuxapp]\n",
        &win,
    );
    let r = wait_for(
        "DENY → 403",
        T,
        || w.diag(),
        || async {
            w.call_winapp(&linux, "/")
                .await
                .ok()
                .filter(|r| r.status == 403)
        },
    )
    .await;
    assert!(r.body.contains("RBAC"), "{}", r.body);
    assert_eq!(
        w.call_winapp(&other, "/").await.unwrap().status,
        200,
        "DENY hits only its principal"
    );

    // ALLOW only `other` (and only GET on /api/*): linuxapp is refused, other is admitted.
    w.edit_mesh(
        "authorization_policies:\n  - name: only-other\n    namespace: win\n    services: [winapp]\n    action: ALLOW\n    rules:\n      - from:\n          - source:\n              principals: [cluster.local/ns/linux/sa/other]\n        to:\n          - operation:\n              methods: [GET]\n              paths: [\"/api/*\"]\n",
        &win,
    );
    wait_for(
        "ALLOW applied",
        T,
        || w.diag(),
        || async {
            w.call_winapp(&linux, "/api/x")
                .await
                .ok()
                .filter(|r| r.status == 403)
        },
    )
    .await;
    assert_eq!(w.call_winapp(&other, "/api/x").await.unwrap().status, 200);
    assert_eq!(
        w.call_winapp(&other, "/private").await.unwrap().status,
        403,
        "path outside the rule"
    );
    // Path tricks do not get around a path rule: the path is normalized before RBAC.
    for sneaky in ["/api/../private", "/api/%2e%2e/private", "//private"] {
        assert_eq!(
            w.call_winapp(&other, sneaky).await.unwrap().status,
            403,
            "{sneaky}"
        );
    }
    assert_eq!(w.call_winapp(&other, "/api/./x").await.unwrap().status, 200);

    // A policy in Istio's root namespace is mesh-wide: it protects Windows services in every
    // namespace, together with the namespace's own policies.
    w.edit_mesh(
        "authorization_policies:\n  - name: mesh-deny-other\n    namespace: istio-system\n    action: DENY\n    rules:\n      - from:\n          - source:\n              principals: [cluster.local/ns/linux/sa/other]\n",
        &win,
    );
    wait_for(
        "mesh-wide DENY applied",
        T,
        || w.diag(),
        || async {
            w.call_winapp(&other, "/api/x")
                .await
                .ok()
                .filter(|r| r.status == 403)
        },
    )
    .await;
    assert_eq!(w.call_winapp(&linux, "/").await.unwrap().status, 200);
    w.stop().await;
}

/// Each kind of AuthorizationPolicy condition against the real gateway, and the fail-closed rule for
/// what it cannot enforce: an ALLOW with a JWT condition allows nobody (it used to be dropped, which
/// allowed everybody), a DENY with request principals denies everybody, a DENY on ipBlocks denies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_conditions_are_enforced_and_never_fail_open() {
    let Some(w) = World::start().await else {
        return;
    };
    let linux = w.client(&w.ca, LINUX_ID);
    let other = w.client(&w.ca, "spiffe://cluster.local/ns/linux/sa/other");
    w.until_winapp_answers(&linux).await;
    let win = w.winapp_backend();
    let status = |c: &MeshClient, headers: &'static [(&'static str, &'static str)]| {
        let c = MeshClient {
            chain_pem: c.chain_pem.clone(),
            key_pem: c.key_pem.clone(),
            roots_pem: c.roots_pem.clone(),
        };
        let w = &w;
        async move {
            w.call_winapp_with(&c, "/", headers)
                .await
                .map(|r| r.status)
                .unwrap_or(0)
        }
    };
    let apply = |policies: &str, what: &str, probe_status: u16| {
        w.edit_mesh(&format!("authorization_policies:\n{policies}"), &win);
        let what = what.to_string();
        let linux = &linux;
        let w = &w;
        async move {
            wait_for(
                &what,
                T,
                || w.diag(),
                || async {
                    let (_, reg) = winmesh::status::http_get(
                        w.server.running.debug_addr,
                        "/debug/registryz",
                        None,
                    )
                    .await
                    .ok()?;
                    let applied = reg.contains(&what);
                    let s = w.call_winapp(linux, "/").await.ok()?.status;
                    (applied && s == probe_status).then_some(())
                },
            )
            .await
        }
    };

    // ALLOW linuxapp only with header x-tenant: blue.
    apply(
        "  - name: tenant-blue\n    namespace: win\n    rules:\n      - from: [{source: {principals: [cluster.local/ns/linux/sa/linuxapp]}}]\n        when: [{key: \"request.headers[x-tenant]\", values: [blue]}]\n",
        "tenant-blue",
        403,
    )
    .await;
    assert_eq!(status(&linux, &[("x-tenant", "blue")]).await, 200);
    assert_eq!(status(&linux, &[("x-tenant", "red")]).await, 403);
    assert_eq!(status(&other, &[("x-tenant", "blue")]).await, 403);

    // ALLOW with a JWT claim the gateway cannot validate: nobody is allowed (fail-closed).
    apply(
        "  - name: jwt-only\n    namespace: win\n    rules:\n      - when: [{key: \"request.auth.claims[iss]\", values: [\"https://idp\"]}]\n",
        "jwt-only",
        403,
    )
    .await;
    assert_eq!(status(&other, &[]).await, 403);
    let (_, reg) = winmesh::status::http_get(w.server.running.debug_addr, "/debug/registryz", None)
        .await
        .unwrap();
    assert!(reg.contains("needs JWT validation"), "{reg}");
    assert!(
        w.server
            .running
            .metrics
            .value("winmesh_authz_conditions_not_enforced", &[])
            .unwrap_or(0.0)
            >= 1.0
    );

    // DENY callers from 127.0.0.0/8 (the Linux sidecar's address here): denied.
    apply(
        "  - name: deny-loopback\n    namespace: win\n    action: DENY\n    rules:\n      - from: [{source: {ipBlocks: [127.0.0.0/8]}}]\n",
        "deny-loopback",
        403,
    )
    .await;
    assert_eq!(status(&other, &[]).await, 403);
    // notIpBlocks of the same range: allowed again.
    apply(
        "  - name: deny-not-loopback\n    namespace: win\n    action: DENY\n    rules:\n      - from: [{source: {notIpBlocks: [127.0.0.0/8]}}]\n",
        "deny-not-loopback",
        200,
    )
    .await;

    // DENY on request principals, which need JWT validation: denies everybody (more, never less).
    apply(
        "  - name: deny-jwt\n    namespace: win\n    action: DENY\n    rules:\n      - from: [{source: {requestPrincipals: [\"*\"]}}]\n",
        "deny-jwt",
        403,
    )
    .await;

    // DENY by connection.sni, destination.port and source.namespace in `when`.
    apply(
        "  - name: deny-sni\n    namespace: win\n    action: DENY\n    rules:\n      - when: [{key: connection.sni, values: [\"outbound_.8080_._.winapp.*\"]}, {key: source.namespace, values: [linux]}, {key: destination.port, values: [\"8080\"]}]\n",
        "deny-sni",
        403,
    )
    .await;
    apply(
        "  - name: deny-other-sni\n    namespace: win\n    action: DENY\n    rules:\n      - when: [{key: connection.sni, values: [\"outbound_.9999_.*\"]}]\n",
        "deny-other-sni",
        200,
    )
    .await;

    // CUSTOM without an extension provider: enforced as DENY of its rules.
    apply(
        "  - name: ext-authz\n    namespace: win\n    action: CUSTOM\n    provider: {name: opa}\n    rules:\n      - from: [{source: {principals: [cluster.local/ns/linux/sa/linuxapp]}}]\n",
        "ext-authz",
        403,
    )
    .await;
    assert_eq!(status(&other, &[]).await, 200);
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_file_edits_apply_live_without_failing_requests() {
    let Some(w) = World::start().await else {
        return;
    };
    let url = format!("http://{}/", w.sc_to_win);
    w.until_sidecar_reaches_winapp(&url).await;
    let accept = Arc::new(Mutex::new(vec!["winapp".to_string()]));
    let traffic = Traffic::start_n(url.clone(), accept.clone(), 2);
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Move winapp's endpoints to another backend.
    accept.lock().unwrap().push("winapp-b".into());
    w.edit_mesh("", &w.win_b);
    wait_for(
        "endpoints moved",
        T,
        || w.diag(),
        || async {
            support::get_text(&url)
                .await
                .filter(|(_, b)| b == "winapp-b")
        },
    )
    .await;
    // Add a service and a policy; existing traffic keeps flowing.
    let new_win = Backend::start("winapp-new").await;
    let new_port = free_port();
    w.edit_mesh(
        &format!(
            "  - name: winapp-new\n    namespace: win\n    ports:\n      - {{name: http, port: 8080, gateway_port: {new_port}, target_port: {}}}\n    backends: [127.0.0.1]\n\
             authorization_policies:\n  - name: allow-all-linux\n    namespace: win\n    action: ALLOW\n    rules:\n      - from:\n          - source:\n              namespaces: [linux]\n",
            new_win.addr.port()
        ),
        &w.win_b,
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (ok, failed, last) = traffic.stop().await;
    assert_eq!(
        failed,
        0,
        "{failed} of {} requests failed during live edits; last: {last}\n{}",
        ok + failed,
        w.diag().await
    );
    assert!(ok > 20);
    // The new Windows service answers on its new gateway port, by its own SNI.
    let linux = w.client(&w.ca, LINUX_ID);
    let new_addr = SocketAddr::from(([127, 0, 0, 1], new_port));
    let r = wait_for(
        "new Windows service reachable",
        T,
        || w.diag(),
        || async {
            linux
                .get(
                    new_addr,
                    "outbound_.8080_._.winapp-new.win.svc.cluster.local",
                    &["istio-http/1.1", "istio", "http/1.1"],
                    SanCheck::Exact(vec![GW_ID.into()]),
                    "/",
                )
                .await
                .ok()
                .filter(|r| r.status == 200)
        },
    )
    .await;
    assert_eq!(r.body, "winapp-new");
    // The edited file is what winmesh serves now.
    let (_, reg) = winmesh::status::http_get(w.server.running.debug_addr, "/debug/registryz", None)
        .await
        .unwrap();
    assert!(reg.contains("allow-all-linux"), "{reg}");
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_mesh_file_keeps_serving_the_last_good_model() {
    let Some(w) = World::start().await else {
        return;
    };
    let url = format!("http://{}/", w.sc_to_win);
    w.until_sidecar_reaches_winapp(&url).await;
    std::fs::write(&w.mesh_file, "services: [this is: not: valid").unwrap();
    let reg = wait_for(
        "error visible in registryz",
        T,
        || w.diag(),
        || async {
            let (_, reg) =
                winmesh::status::http_get(w.server.running.debug_addr, "/debug/registryz", None)
                    .await
                    .ok()?;
            let v: Value = serde_json::from_str(&reg).ok()?;
            v["error"].is_string().then_some(v)
        },
    )
    .await;
    assert!(
        reg["mesh"]["windows_services"]
            .as_array()
            .is_some_and(|a| a.len() == 2),
        "last good model kept"
    );
    assert_eq!(support::get_text(&url).await.map(|x| x.0), Some(200));
    assert_eq!(
        w.server
            .running
            .metrics
            .value("winmesh_mesh_file_error", &[]),
        Some(1.0)
    );
    let _ = w.sc_inbound;
    w.stop().await;
}

/// Everyday incomplete writes while serving (issue: outage safety): an empty file, an empty file renamed
/// into place, a copy cut at a line boundary, and a slow non-atomic write. None may reach Envoy:
/// Linux → Windows traffic keeps flowing with zero failures, and the error is visible.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incomplete_mesh_file_writes_never_reach_envoy() {
    let Some(w) = World::start().await else {
        return;
    };
    let url = format!("http://{}/", w.sc_to_win);
    w.until_sidecar_reaches_winapp(&url).await;
    let good = std::fs::read_to_string(&w.mesh_file).unwrap();
    let accept = Arc::new(Mutex::new(vec!["winapp".to_string()]));
    let traffic = Traffic::start(url.clone(), accept);
    let metrics = w.server.running.metrics.clone();
    let refused = || async {
        wait_for(
            "the incomplete file is refused",
            T,
            || async { String::new() },
            || async { (metrics.value("winmesh_mesh_file_error", &[]) == Some(1.0)).then_some(()) },
        )
        .await;
        // Give a wrongly applied mesh time to reach Envoy before the next step.
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let restore = || async {
        std::fs::write(&w.mesh_file, &good).unwrap();
        wait_for(
            "the complete file is back",
            T,
            || async { String::new() },
            || async { (metrics.value("winmesh_mesh_file_error", &[]) == Some(0.0)).then_some(()) },
        )
        .await;
    };
    // `: > mesh.yaml`
    std::fs::write(&w.mesh_file, "").unwrap();
    refused().await;
    restore().await;
    // An empty file renamed into place (atomic, but empty).
    let tmp = w.mesh_file.with_extension("tmp");
    std::fs::write(&tmp, "").unwrap();
    std::fs::rename(&tmp, &w.mesh_file).unwrap();
    refused().await;
    restore().await;
    // A copy cut just before `windows_services:`.
    let cut = &good[..good.find("windows_services:").unwrap()];
    std::fs::write(&w.mesh_file, cut).unwrap();
    refused().await;
    restore().await;
    // A slow non-atomic write: truncated, half written, a short pause, then the rest.
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&w.mesh_file).unwrap();
        let half = good.len() / 2;
        f.write_all(&good.as_bytes()[..half]).unwrap();
        f.flush().unwrap();
        tokio::time::sleep(Duration::from_millis(15)).await;
        f.write_all(&good.as_bytes()[half..]).unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (ok, failed, last) = traffic.stop().await;
    assert_eq!(
        failed,
        0,
        "{failed} of {} requests failed during incomplete writes; last: {last}\n{}",
        ok + failed,
        w.diag().await
    );
    assert!(ok > 10);
    assert_eq!(metrics.value("winmesh_mesh_file_error", &[]), Some(0.0));
    w.stop().await;
}

/// Windows → Linux auto-mTLS as an Istio client does it: endpoints without `tlsMode: istio` get
/// plaintext; a mesh-wide PeerAuthentication DISABLE (root namespace) makes labelled endpoints
/// plaintext too, and a namespace policy overrides the mesh-wide one. The Linux app here has no
/// sidecar, so a request only succeeds when the gateway really sends plaintext.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn windows_to_linux_plaintext_follows_tls_mode_and_peer_authentication() {
    support::init_tracing();
    let Some(bin) = support::envoy_bin() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let plain = Backend::start("plainapp").await;
    let out_port = free_port();
    let mesh = |policies: &str| {
        format!(
            "services:
  - name: unlabeled
    namespace: legacy
    ports: [{{name: http, port: 8080}}]
    endpoints: [{{address: 127.0.0.1, ports: {{http: {p}}}, tls_mode: disabled}}]
  - name: labeled
    namespace: legacy
    ports: [{{name: http, port: 8081}}]
    endpoints: [{{address: 127.0.0.1, ports: {{http: {p}}}, service_account: legacy}}]
peer_authentications:
{policies}",
            p = plain.addr.port()
        )
    };
    let mesh_file = dir.path().join("mesh.yaml");
    let write_mesh = |text: String| {
        let tmp = dir.path().join("mesh.yaml.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &mesh_file).unwrap();
    };
    write_mesh(mesh("  - {namespace: istio-system, mode: DISABLE}\n"));
    let (server, cfg) = support::start_gateway_winmesh(dir.path(), &mesh_file, out_port, "").await;
    let gateway = Envoy::start(&bin, &bootstrap_yaml(&cfg, &BootstrapOptions::default())).await;
    let gw_out = SocketAddr::from(([127, 0, 0, 1], out_port));
    let get = |host: &'static str| async move {
        let r = reqwest::Client::new()
            .get(format!("http://{gw_out}/"))
            .header("host", host)
            .send()
            .await
            .ok()?;
        let code = r.status().as_u16();
        Some((code, r.text().await.unwrap_or_default()))
    };

    // Mesh-wide DISABLE: both endpoints get plaintext.
    for host in ["unlabeled.legacy:8080", "labeled.legacy:8081"] {
        let (_, body) = wait_for(
            &format!("plaintext to {host}"),
            T,
            || gateway.diagnostics(),
            || async { get(host).await.filter(|(c, _)| *c == 200) },
        )
        .await;
        assert_eq!(body, "plainapp");
    }

    // STRICT in the destination namespace overrides the mesh-wide DISABLE: the labelled endpoint now
    // gets Istio mTLS, which a sidecar-less app cannot answer; the unlabelled one stays plaintext.
    write_mesh(mesh(
        "  - {namespace: istio-system, mode: DISABLE}\n  - {namespace: legacy, mode: STRICT}\n",
    ));
    wait_for(
        "labelled endpoint switched to mTLS",
        T,
        || gateway.diagnostics(),
        || async { get("labeled.legacy:8081").await.filter(|(c, _)| *c == 503) },
    )
    .await;
    // The gateway really attempted TLS towards the plain app (handshake errors on that cluster).
    let tls_errors = gateway
        .stat("cluster.outbound|8081||labeled.legacy.svc.cluster.local.ssl.connection_error")
        .await;
    assert!(tls_errors > 0, "{}", gateway.diagnostics().await);
    let (code, body) = get("unlabeled.legacy:8080").await.expect("unlabeled");
    assert_eq!((code, body.as_str()), (200, "plainapp"));

    gateway.stop().await;
    server.stop().await;
}

/// A Windows app with its own identity and outbound port calls Linux as itself: the Linux side sees
/// that app's SPIFFE ID, while the shared port keeps presenting the gateway's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_windows_app_calls_linux_with_its_own_identity() {
    let Some(w) = World::start().await else {
        return;
    };
    const CLIENT_ID: &str = "spiffe://cluster.local/ns/win/sa/winclient";
    let (own_port, its_gateway_port) = (free_port(), free_port());
    let win = w.winapp_backend();
    w.edit_mesh(
        &format!(
            "  - name: winclient\n    namespace: win\n    identity: {CLIENT_ID}\n    outbound_port: {own_port}\n    ports:\n      - {{name: http, port: 80, gateway_port: {its_gateway_port}}}\n    backends: [127.0.0.1]\n"
        ),
        &win,
    );
    let via = |port: u16| {
        reqwest::Client::builder()
            .proxy(reqwest::Proxy::http(format!("http://127.0.0.1:{port}")).unwrap())
            .build()
            .unwrap()
    };
    let caller_of = |body: &str| -> String {
        headers(body)["headers"]["x-forwarded-client-cert"]
            .as_str()
            .unwrap_or("")
            .to_string()
    };
    let own = via(own_port);
    let body = wait_for(
        "Windows app's own outbound port",
        T,
        || w.diag(),
        || async {
            let r = own
                .get("http://linuxapp.linux:8080/headers")
                .send()
                .await
                .ok()?;
            if r.status() != 200 {
                return None;
            }
            r.text().await.ok()
        },
    )
    .await;
    let xfcc = caller_of(&body);
    assert!(xfcc.contains(&format!("URI={CLIENT_ID}")), "{xfcc:?}");
    assert!(!xfcc.contains(GW_ID), "{xfcc:?}");
    // The shared port is unchanged.
    let shared = via(w.gw_out.port())
        .get("http://linuxapp.linux:8080/headers")
        .send()
        .await
        .unwrap();
    assert_eq!(shared.status(), 200);
    let xfcc = caller_of(&shared.text().await.unwrap());
    assert!(xfcc.contains(&format!("URI={GW_ID}")), "{xfcc:?}");
    w.stop().await;
}

/// `winmesh proxy-config` reads the gateway Envoy's admin endpoint like `istioctl proxy-config`:
/// which identity each cluster presents and accepts, chains per SNI, endpoint health and tlsMode,
/// certificates by identity; never a private key. The same from a saved dump.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_config_shows_what_envoy_applied() {
    let Some(w) = World::start().await else {
        return;
    };
    w.until_sidecar_reaches_winapp(&format!("http://{}/", w.sc_to_win))
        .await;
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_winmesh"))
            .arg("proxy-config")
            .args(args)
            .arg("--envoy-admin")
            .arg(w.gateway.admin.to_string())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let clusters = run(&["clusters"]);
    let line = clusters
        .lines()
        .find(|l| l.starts_with("outbound|8080||linuxapp.linux.svc.cluster.local "))
        .unwrap_or_else(|| panic!("{clusters}"));
    assert!(
        line.contains("default"),
        "presents the gateway's certificate: {line}"
    );
    assert!(
        line.contains(LINUX_ID),
        "accepts the Linux app's SAN: {line}"
    );
    assert!(line.contains("auto-mTLS sni=outbound_.8080_._.linuxapp.linux.svc.cluster.local"));
    let listeners = run(&["listeners"]);
    assert!(
        listeners
            .lines()
            .any(|l| l.contains(&winmesh::translate::inbound::listener_name(
                w.gw_http.port()
            )) && l.contains("active")
                && l.contains(&format!("sni=outbound_.8080_._.{WIN_HOST}"))),
        "{listeners}"
    );
    let eps = run(&[
        "endpoints",
        "--name",
        "outbound|8080||linuxapp.linux.svc.cluster.local",
    ]);
    let ep = eps.lines().nth(1).unwrap_or_else(|| panic!("{eps}"));
    assert!(ep.contains("HEALTHY") && ep.contains("istio"), "{eps}");
    let routes = run(&[
        "routes",
        "--name",
        winmesh::translate::outbound::HTTP_LISTENER,
    ]);
    assert!(
        routes.contains("outbound|8080||linuxapp.linux.svc.cluster.local"),
        "{routes}"
    );
    let secrets = run(&["secrets"]);
    assert!(
        secrets.contains(WIN_ID) && secrets.contains(GW_ID),
        "{secrets}"
    );
    assert!(
        secrets
            .lines()
            .filter(|l| l.starts_with("default "))
            .all(|l| l.contains("true"))
    );
    let json = run(&["secrets", "-o", "json"]);
    assert!(
        !json.contains("PRIVATE KEY") && !json.contains("private_key\": {\"inline"),
        "{json}"
    );
    let v: Value = serde_json::from_str(&json).unwrap();
    assert!(
        v.as_array()
            .is_some_and(|a| a.iter().any(|r| r["identity"] == WIN_ID))
    );
    // From a saved dump: the same rows, no Envoy needed.
    let dump = w.gateway.admin_get("/config_dump").await.unwrap();
    let file = w.dir.path().join("dump.json");
    std::fs::write(&file, dump).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_winmesh"))
        .args(["proxy-config", "clusters", "-o", "yaml", "--file"])
        .arg(&file)
        .output()
        .unwrap();
    let yaml = String::from_utf8(out.stdout).unwrap();
    assert!(yaml.contains("presents: default"), "{yaml}");
    w.stop().await;
}
