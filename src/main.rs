//! The `winmesh` command: parse the CLI, run, and map errors to exit codes (2 = bad configuration or
//! usage, 1 = runtime failure).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use winmesh::bootstrap::{BootstrapOptions, bootstrap_yaml};
use winmesh::config::{Config, XdsMode, read_token};

#[derive(Parser, Debug)]
#[command(
    name = "winmesh",
    version,
    about = "xDS control plane for a stock Envoy gateway bringing Windows workloads into an Istio mesh"
)]
struct Cli {
    /// Log line format on stderr: `text` (human-readable) or `json` (one JSON object per line, for
    /// log pipelines such as Fluent Bit or a Windows container log collector).
    #[arg(
        long,
        global = true,
        env = "WINMESH_LOG_FORMAT",
        default_value = "text"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run the control plane (ADS/SDS server and debug endpoint).
    Serve {
        /// Config file (YAML).
        #[arg(long, short, env = "WINMESH_CONFIG")]
        config: PathBuf,
    },
    /// Print an Envoy bootstrap (YAML) that points a stock Envoy at this winmesh.
    Bootstrap {
        /// Config file (YAML).
        #[arg(long, short, env = "WINMESH_CONFIG")]
        config: PathBuf,
        /// Envoy node id (defaults to node.id from the config).
        #[arg(long)]
        node_id: Option<String>,
        /// Use incremental xDS (DELTA_GRPC).
        #[arg(long, conflicts_with = "sotw")]
        delta: bool,
        /// Use state-of-the-world xDS (GRPC).
        #[arg(long)]
        sotw: bool,
        /// Write the bootstrap to this file instead of standard output.
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
    /// Check a config file and the mesh file it names, or (`--mesh`) a mesh file alone, with the
    /// errors `serve` would log (0 = valid, 2 = invalid).
    Validate {
        /// Config file (YAML). With `--mesh`, optional: its settings (trust domain, ports) apply.
        #[arg(required_unless_present = "mesh")]
        file: Option<PathBuf>,
        /// A mesh file to check (instead of the config's `mesh.file`).
        #[arg(long)]
        mesh: Option<PathBuf>,
    },
    /// Run the local demo: winmesh, the gateway Envoy, a demo Windows app and a demo Linux app behind an
    /// Istio-style sidecar, all on loopback.
    Demo {
        /// Config file of the demo.
        #[arg(long, short, default_value = "examples/winmesh.yaml")]
        config: PathBuf,
        /// The stock Envoy binary.
        #[arg(long, env = "ENVOY_BIN", default_value = "envoy")]
        envoy: PathBuf,
        /// Check both directions and exit instead of running until Ctrl-C.
        #[arg(long)]
        check: bool,
    },
    /// The embedded development CA.
    DevCa {
        #[command(subcommand)]
        cmd: DevCaCmd,
    },
    /// Show connected proxies and their sync state (like `istioctl proxy-status`).
    Status {
        /// Config file, to find the debug address and token.
        #[arg(long, short, env = "WINMESH_CONFIG")]
        config: Option<PathBuf>,
        /// Debug server address (overrides the config).
        #[arg(long)]
        debug_addr: Option<std::net::SocketAddr>,
        /// Print the raw JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Only check readiness (`/readyz`): exit 0 when ready, 1 otherwise. For exec probes, since
        /// the debug port listens on the pod's loopback, which kubelet's HTTP probes cannot reach.
        #[arg(long, conflicts_with = "json")]
        ready: bool,
        /// With `--ready`: also require the gateway Envoy's admin `/ready` to say LIVE (the admin
        /// address comes from `envoy.admin` in the config, or `--envoy-admin`).
        #[arg(long, requires = "ready")]
        envoy: bool,
        /// Envoy admin address for `--envoy` (overrides the config).
        #[arg(long, requires = "envoy")]
        envoy_admin: Option<std::net::SocketAddr>,
    },
    /// Show what the gateway Envoy has applied (like `istioctl proxy-config`), from its admin
    /// endpoint or a saved `/config_dump`.
    ProxyConfig {
        /// What to show.
        #[arg(value_enum)]
        kind: winmesh::proxyconfig::Kind,
        /// Only the resource (or, for endpoints, the cluster) of this name.
        #[arg(long)]
        name: Option<String>,
        /// Output format.
        #[arg(long, short, value_enum, default_value = "table")]
        output: winmesh::proxyconfig::Format,
        /// Config file, to find the Envoy admin address (`envoy.admin`).
        #[arg(long, short, env = "WINMESH_CONFIG")]
        config: Option<PathBuf>,
        /// Envoy admin address (overrides the config).
        #[arg(long, conflicts_with = "file")]
        envoy_admin: Option<std::net::SocketAddr>,
        /// A saved Envoy config dump (`curl localhost:15000/config_dump?include_eds`) instead.
        #[arg(long)]
        file: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
enum DevCaCmd {
    /// Issue a key and certificate for a test party (e.g. a demo Linux sidecar): writes
    /// cert-chain.pem, key.pem (owner-only) and root-cert.pem into --out.
    Issue {
        /// Config file: its `ca.state_dir` and `identity.trust_domain` locate the dev root.
        #[arg(long, short, env = "WINMESH_CONFIG")]
        config: Option<PathBuf>,
        /// SPIFFE ID to put in the certificate.
        #[arg(long)]
        identity: String,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// Lifetime, e.g. 24h.
        #[arg(long, default_value = "24h")]
        ttl: humantime::Duration,
    },
}

/// `winmesh validate`: the config (if given), then the mesh file (`--mesh`, else the config's).
fn validate(config: Option<&std::path::Path>, mesh: Option<&std::path::Path>) -> ExitCode {
    let cfg = match config {
        Some(path) => match load(path) {
            Ok(c) => {
                println!("{}: ok", path.display());
                c
            }
            Err(code) => return code,
        },
        None => Config::default(),
    };
    let Some(mesh) = mesh
        .map(std::path::Path::to_path_buf)
        .or(cfg.mesh.file.clone())
    else {
        return ExitCode::SUCCESS;
    };
    let settings = winmesh::discovery::file::FileSettings::from_config(&cfg);
    let errors = winmesh::discovery::file::check_file(&mesh, &settings);
    if errors.is_empty() {
        println!("{}: ok", mesh.display());
        return ExitCode::SUCCESS;
    }
    for e in &errors {
        eprintln!("winmesh: invalid mesh file: {e}");
    }
    ExitCode::from(2)
}

fn load(path: &std::path::Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        eprintln!("winmesh: invalid configuration: {e}");
        ExitCode::from(2)
    })
}

/// Logs to stderr. The filter comes from `WINMESH_LOG`, else the usual `RUST_LOG`, else `default`;
/// colour only when stderr is a terminal (not in `kubectl logs` or a Windows container's log file).
fn init_logging_with(default: &str, format: LogFormat) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_env("WINMESH_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder.json().with_ansi(false).init(),
    }
}

fn init_logging(format: LogFormat) {
    init_logging_with("info", format);
}

/// Warnings only, so the demo's own output stays readable.
fn init_logging_quiet(format: LogFormat) {
    init_logging_with("warn", format);
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Validate { file, mesh } => validate(file.as_deref(), mesh.as_deref()),
        Cmd::Bootstrap {
            config,
            node_id,
            delta,
            sotw,
            output,
        } => {
            let cfg = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let token = match cfg.xds.token_file.as_deref().map(read_token).transpose() {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("winmesh: invalid configuration: xds.token_file: {e}");
                    return ExitCode::from(2);
                }
            };
            let mode = if delta {
                Some(XdsMode::Delta)
            } else if sotw {
                Some(XdsMode::Sotw)
            } else {
                None
            };
            let text = bootstrap_yaml(
                &cfg,
                &BootstrapOptions {
                    node_id,
                    mode,
                    token,
                },
            );
            match output {
                // The bootstrap may carry the xDS bearer token: owner-only, replaced atomically.
                Some(path) => match winmesh::identity::dev_ca::write_private(&path, &text) {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        eprintln!("winmesh: cannot write {}: {e}", path.display());
                        ExitCode::FAILURE
                    }
                },
                None => {
                    print!("{text}");
                    ExitCode::SUCCESS
                }
            }
        }
        Cmd::Serve { config } => {
            let cfg = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            init_logging(cli.log_format);
            runtime(async move { winmesh::serve::run(cfg).await })
        }
        Cmd::DevCa {
            cmd:
                DevCaCmd::Issue {
                    config,
                    identity,
                    out,
                    ttl,
                },
        } => {
            let cfg = match config.as_deref().map(load).transpose() {
                Ok(c) => c.unwrap_or_default(),
                Err(code) => return code,
            };
            let id = match winmesh::identity::SpiffeId::parse(&identity) {
                Ok(id) => id,
                Err(e) => {
                    eprintln!("winmesh: --identity: {e}");
                    return ExitCode::from(2);
                }
            };
            let state_dir = cfg
                .ca
                .as_ref()
                .map(|c| c.state_dir.clone())
                .unwrap_or_else(|| {
                    winmesh::config::CaConfig::of(winmesh::config::CaMode::Dev).state_dir
                });
            let existed = state_dir.join("root-cert.pem").is_file();
            let result =
                winmesh::identity::dev_ca::DevCa::load_or_create(&state_dir, &id.trust_domain)
                    .and_then(|ca| ca.issue_to_dir(&id, ttl.into(), &out));
            match result {
                Ok(()) => {
                    // Never silently: a new root means nothing else trusts these certificates yet.
                    if !existed {
                        eprintln!(
                            "winmesh: created a new dev root CA in {}{}",
                            state_dir.display(),
                            if config.is_none() {
                                " (no --config given: pass the config of the winmesh whose dev CA should sign)"
                            } else {
                                ""
                            }
                        );
                    } else if config.is_none() {
                        eprintln!(
                            "winmesh: signed with the dev root CA in {} (no --config given)",
                            state_dir.display()
                        );
                    }
                    println!("issued {id} into {}", out.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("winmesh: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Demo {
            config,
            envoy,
            check,
        } => {
            init_logging_quiet(cli.log_format);
            runtime(async move {
                winmesh::demo::run(winmesh::demo::DemoOptions {
                    config,
                    envoy,
                    check_only: check,
                })
                .await
            })
        }
        Cmd::ProxyConfig {
            kind,
            name,
            output,
            config,
            envoy_admin,
            file,
        } => {
            use winmesh::proxyconfig::{Kind, admin_path, render, rows};
            let dump_and_health = match file {
                Some(path) => std::fs::read_to_string(&path)
                    .map_err(|e| format!("{}: {e}", path.display()))
                    .and_then(|t| {
                        serde_json::from_str::<serde_json::Value>(&t).map_err(|e| {
                            format!("{}: not an Envoy config dump: {e}", path.display())
                        })
                    })
                    .map(|d| (d, None)),
                None => {
                    let cfg = match config.as_deref().map(load).transpose() {
                        Ok(c) => c.unwrap_or_default(),
                        Err(code) => return code,
                    };
                    let admin = envoy_admin.unwrap_or(cfg.envoy.admin);
                    let fetched: anyhow::Result<_> = runtime_value(async move {
                        let (code, body) =
                            winmesh::status::http_get(admin, admin_path(kind), None).await?;
                        if code != 200 {
                            anyhow::bail!("Envoy admin {admin} answered {code}");
                        }
                        let dump: serde_json::Value = serde_json::from_str(&body)?;
                        let health = if kind == Kind::Endpoints {
                            let (_, h) =
                                winmesh::status::http_get(admin, "/clusters?format=json", None)
                                    .await?;
                            serde_json::from_str(&h).ok()
                        } else {
                            None
                        };
                        Ok((dump, health))
                    });
                    fetched.map_err(|e| format!("{e:#} (Envoy admin at {admin})"))
                }
            };
            match dump_and_health {
                Ok((dump, health)) => {
                    let r = rows(kind, &dump, health.as_ref(), name.as_deref());
                    print!("{}", render(kind, &r, output));
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("winmesh: proxy-config: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Cmd::Status {
            config,
            debug_addr,
            json,
            ready,
            envoy,
            envoy_admin,
        } => {
            let cfg = match config.as_deref().map(load).transpose() {
                Ok(c) => c.unwrap_or_default(),
                Err(code) => return code,
            };
            let token = match cfg.debug.token_file.as_deref().map(read_token).transpose() {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("winmesh: invalid configuration: debug.token_file: {e}");
                    return ExitCode::from(2);
                }
            };
            let addr = debug_addr.unwrap_or(cfg.debug.listen);
            if ready {
                let admin = envoy.then(|| envoy_admin.unwrap_or(cfg.envoy.admin));
                return runtime(async move {
                    let (code, body) =
                        winmesh::status::http_get(addr, "/readyz", token.as_deref()).await?;
                    print!("{body}");
                    if code != 200 {
                        anyhow::bail!("not ready ({code})");
                    }
                    if let Some(admin) = admin {
                        let (code, state) = winmesh::status::http_get(admin, "/ready", None)
                            .await
                            .map_err(|e| anyhow::anyhow!("Envoy admin {admin}: {e}"))?;
                        println!("envoy: {}", state.trim());
                        if code != 200 || state.trim() != "LIVE" {
                            anyhow::bail!("Envoy is not LIVE ({code} {})", state.trim());
                        }
                        let (code, stats) = winmesh::status::http_get(
                            admin,
                            winmesh::status::CONFIG_STATS_PATH,
                            None,
                        )
                        .await
                        .map_err(|e| anyhow::anyhow!("Envoy admin {admin}: {e}"))?;
                        if code != 200 {
                            anyhow::bail!("Envoy admin {admin} /stats answered {code}");
                        }
                        winmesh::status::envoy_config_status(&stats)
                            .map_err(|e| anyhow::anyhow!("Envoy: {e}"))?;
                        println!("envoy: config accepted (CDS and LDS)");
                    }
                    Ok(())
                });
            }
            runtime(async move {
                let (code, body) =
                    winmesh::status::http_get(addr, "/debug/syncz", token.as_deref()).await?;
                if code != 200 {
                    anyhow::bail!("{addr} answered {code}: {}", body.trim());
                }
                if json {
                    println!("{body}");
                } else {
                    let v: serde_json::Value = serde_json::from_str(&body)?;
                    print!("{}", winmesh::status::render_table(&v));
                    // What is served but not visible per proxy: degraded sources.
                    if let Ok((200, reg)) =
                        winmesh::status::http_get(addr, "/debug/registryz", token.as_deref()).await
                        && let Ok(r) = serde_json::from_str::<serde_json::Value>(&reg)
                    {
                        if let Some(p) = r["persisted"].as_str() {
                            println!("\nmesh: {p}");
                        }
                        if let Some(e) = r["error"].as_str() {
                            println!("mesh: {e}");
                        }
                    }
                }
                Ok(())
            })
        }
    }
}

fn runtime(f: impl std::future::Future<Output = anyhow::Result<()>>) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("winmesh: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(f) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("winmesh: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs `f` on a small runtime and returns its value (for commands that print what it returns).
fn runtime_value<T>(f: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("cannot start runtime: {e}"))?
        .block_on(f)
}
