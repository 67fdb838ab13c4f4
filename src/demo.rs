//! `winmesh demo`: the whole picture on loopback. winmesh in local mode (dev CA, the example mesh
//! file), the stock Envoy gateway it drives, a demo Windows app behind the gateway, and a demo Linux
//! app behind an Envoy configured as an Istio sidecar. It checks both directions, prints commands to
//! try, and stops every process on Ctrl-C (`--check` stops after the checks).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use axum::http::HeaderMap;
use tokio::process::{Child, Command};

use crate::bootstrap::{BootstrapOptions, bootstrap_yaml};
use crate::config::Config;
use crate::identity::SpiffeId;
use crate::identity::dev_ca::DevCa;
use crate::sidecar::{Inbound, Outbound, Sidecar};
use crate::status::http_get_host;

const LINUX_ID: &str = "spiffe://cluster.local/ns/linux/sa/linuxapp";
const LINUX_APP: u16 = 18081;
const SIDECAR_ADMIN: u16 = 15100;
const SIDECAR_OUT: u16 = 15101;

pub struct DemoOptions {
    pub config: PathBuf,
    pub envoy: PathBuf,
    pub check_only: bool,
}

/// A demo app: answers every request with who it is and who called it (from XFCC).
async fn app(name: &'static str, addr: SocketAddr) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("demo app {name} cannot listen on {addr}"))?;
    let router = axum::Router::new().fallback(move |h: HeaderMap| async move {
        let caller = h
            .get("x-forwarded-client-cert")
            .and_then(|v| v.to_str().ok())
            .and_then(|x| x.split(';').find_map(|p| p.strip_prefix("URI=")))
            .unwrap_or("(no client certificate)")
            .to_string();
        format!("hello from the {name}; mesh caller: {caller}\n")
    });
    Ok(tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    }))
}

fn spawn_envoy(bin: &Path, config: &Path, log: &Path) -> anyhow::Result<Child> {
    Command::new(bin)
        .arg("-c")
        .arg(config)
        .args([
            "--disable-hot-restart",
            "--concurrency",
            "1",
            "-l",
            "warning",
            "--log-path",
        ])
        .arg(log)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start Envoy {}", bin.display()))
}

async fn wait_for_body(
    what: &str,
    addr: SocketAddr,
    host: &str,
    want: &str,
    logs: &[&Path],
) -> anyhow::Result<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = String::new();
    while Instant::now() < deadline {
        match http_get_host(addr, "/", host, None).await {
            Ok((200, body)) if body.contains(want) => return Ok(body),
            Ok((code, body)) => last = format!("{code} {}", body.trim()),
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut tails = String::new();
    for l in logs {
        let text = std::fs::read_to_string(l).unwrap_or_default();
        tails.push_str(&format!(
            "\n--- {} ---\n{}",
            l.display(),
            &text[text.len().saturating_sub(3000)..]
        ));
    }
    bail!("{what} did not work within 30s (last answer: {last}){tails}")
}

pub async fn run(opts: DemoOptions) -> anyhow::Result<()> {
    let cfg = Config::load(&opts.config).map_err(|e| anyhow::anyhow!("{e}"))?;
    let ca_cfg = cfg.ca.clone().context("the demo config needs `ca: dev`")?;
    let state = ca_cfg
        .state_dir
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(".state"))
        .join("demo");
    std::fs::create_dir_all(&state)
        .with_context(|| format!("cannot create {}", state.display()))?;

    let server = crate::serve::start(cfg.clone()).await?;
    let mesh = {
        let mut rx = server.mesh_state.clone();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(m) = rx.borrow().mesh.clone() {
                break m;
            }
            if Instant::now() > deadline {
                bail!("the mesh file did not load: {:?}", rx.borrow().error);
            }
            let _ = tokio::time::timeout(Duration::from_millis(200), rx.changed()).await;
        }
    };
    let win = mesh
        .windows_services
        .first()
        .context("the demo mesh needs a Windows service")?;
    let win_port = win
        .ports
        .first()
        .context("the Windows service needs a port")?;
    let linux = mesh
        .services
        .first()
        .context("the demo mesh needs a Linux service")?;
    let linux_port = linux
        .ports
        .first()
        .context("the Linux service needs a port")?;
    let sidecar_in = linux
        .endpoints
        .first()
        .map(|e| {
            e.ports
                .get(&linux_port.name)
                .copied()
                .unwrap_or(linux_port.target_port)
        })
        .context("the Linux service needs an endpoint")?;
    let loopback = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));

    let _apps = (
        app("Windows app", loopback(win_port.target_port)).await?,
        app("Linux app", loopback(LINUX_APP)).await?,
    );

    // The gateway: a stock Envoy with winmesh's bootstrap.
    let gw_cfg = state.join("gateway-bootstrap.yaml");
    std::fs::write(&gw_cfg, bootstrap_yaml(&cfg, &BootstrapOptions::default()))?;
    let gw_log = state.join("gateway-envoy.log");
    let _gateway = spawn_envoy(&opts.envoy, &gw_cfg, &gw_log)?;

    // The Linux side: certificates from the same mesh CA, a sidecar configured as Istio does.
    let ca = DevCa::load_or_create(&ca_cfg.state_dir, &cfg.identity.trust_domain)?;
    let certs = state.join("linux-certs");
    ca.issue_to_dir(
        &SpiffeId::parse(LINUX_ID)?,
        Duration::from_secs(24 * 3600),
        &certs,
    )?;
    let win_identity = win
        .identity
        .clone()
        .map(|i| i.to_string())
        .unwrap_or(cfg.identity.spiffe_id()?.to_string());
    let sidecar = Sidecar {
        node_id: "linuxapp.linux".into(),
        admin: loopback(SIDECAR_ADMIN),
        trust_domain: cfg.identity.trust_domain.clone(),
        certs: &certs,
        outbound: vec![Outbound {
            name: "to-winapp".into(),
            listen: loopback(SIDECAR_OUT),
            host: win.host.clone(),
            port: win_port.port,
            http2: false,
            endpoint: SocketAddr::new(cfg.gateway.inbound_address, win_port.gateway_port),
            expected_sans: vec![win_identity],
        }],
        inbound: Some(Inbound {
            listen: loopback(sidecar_in),
            app: loopback(LINUX_APP),
            app_http2: false,
            peer_exchange_trap: None,
        }),
    };
    let sc_cfg = state.join("linux-sidecar-bootstrap.yaml");
    std::fs::write(&sc_cfg, serde_yaml::to_string(&sidecar.bootstrap())?)?;
    let sc_log = state.join("linux-sidecar-envoy.log");
    let _sidecar = spawn_envoy(&opts.envoy, &sc_cfg, &sc_log)?;

    let logs = [gw_log.as_path(), sc_log.as_path()];
    let l2w = wait_for_body(
        "Linux → Windows",
        loopback(SIDECAR_OUT),
        "winapp",
        "Windows app",
        &logs,
    )
    .await?;
    let w2l_host = format!("{}.{}:{}", linux.name, linux.namespace, linux_port.port);
    let out = SocketAddr::new(cfg.gateway.outbound_address, cfg.gateway.outbound_port);
    let w2l = wait_for_body("Windows → Linux", out, &w2l_host, "Linux app", &logs).await?;

    let debug = cfg.debug.listen;
    // The binary that runs this demo: `winmesh` is usually not on PATH after `make demo`.
    let exe = std::env::current_exe()
        .ok()
        .and_then(|p| {
            let cwd = std::env::current_dir().ok()?;
            Some(
                p.strip_prefix(&cwd)
                    .map(|r| std::path::Path::new(".").join(r))
                    .unwrap_or(p),
            )
        })
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "winmesh".into());
    let admin = cfg.envoy.admin;
    println!(
        "\nwinmesh demo is up: both directions work over Istio mTLS.\n\
         \n  Linux → Windows (the Linux app calls the Windows app through its Istio sidecar):\n    curl -s http://127.0.0.1:{SIDECAR_OUT}/\n    → {}\
         \n  Windows → Linux (a Windows app uses the gateway as its HTTP proxy):\n    curl -s -x http://{out} http://{w2l_host}/\n    → {}\
         \n  Plaintext to the gateway's mesh port is refused:\n    curl -sv http://{}:{}/\n\
         \n  What winmesh serves and knows:\n    curl -s http://{debug}/debug/syncz\n    curl -s http://{debug}/debug/certs\n    curl -s http://{debug}/debug/registryz\n    curl -s 'http://{debug}/debug/config_dump?node={}'\n    {exe} status --config {}\n    {exe} proxy-config clusters --envoy-admin {admin}\n\
         \n  Edit {} and watch the change apply live. Logs: {}\n",
        l2w.trim(),
        w2l.trim(),
        cfg.gateway.inbound_address,
        win_port.gateway_port,
        cfg.node.id,
        opts.config.display(),
        cfg.mesh
            .file
            .as_deref()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        state.display(),
    );
    if !opts.check_only {
        println!("Press Ctrl-C to stop everything.");
        crate::app::shutdown_signal().await;
        println!("stopping");
    }
    server.stop().await;
    // `_gateway` and `_sidecar` are killed when dropped.
    Ok(())
}
