//! The `winmesh` binary as a user runs it: exit codes, error messages, serve + status.

use std::process::{Command, Stdio};

use std::time::{Duration, Instant};

fn winmesh() -> Command {
    Command::new(env!("CARGO_BIN_EXE_winmesh"))
}

/// A plain HTTP/1.1 GET on loopback; the whole response as text.
fn plain_get(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.path().join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn validate_accepts_a_good_file_and_rejects_a_bad_one_with_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let good = write(
        &dir,
        "good.yaml",
        "xds:\n  listen: 127.0.0.1:15010\n  mode: delta\n",
    );
    let out = winmesh().arg("validate").arg(&good).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let bad = write(
        &dir,
        "bad.yaml",
        "xds:\n  listen: 127.0.0.1:15010\n  mdoe: delta\n",
    );
    let out = winmesh().arg("validate").arg(&bad).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("xds.mdoe") && err.contains("line 3"), "{err}");

    let missing = dir.path().join("nope.yaml");
    let out = winmesh().arg("validate").arg(&missing).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn validate_checks_the_mesh_file_the_config_names_and_a_mesh_file_alone() {
    let dir = tempfile::tempdir().unwrap();
    write(&dir, "mesh.yaml", "services: [this is: not: valid");
    let cfg = write(&dir, "winmesh.yaml", "mesh:\n  file: mesh.yaml\n");
    let out = winmesh().arg("validate").arg(&cfg).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "a broken mesh file is not ok");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("invalid mesh file") && err.contains("mesh.yaml"),
        "{err}"
    );

    // One skipped object is reported as serve would log it.
    let mesh = write(
        &dir,
        "objects.yaml",
        "windows_services:\n  - {name: a, namespace: win, ports: [{name: http, port: 80, gateway_port: 15000}], backends: [10.0.0.1]}\n",
    );
    let out = winmesh()
        .args(["validate", "--mesh"])
        .arg(&mesh)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("windows_service win/a")
            && err.contains("gateway_port 15000 is already used by envoy.admin"),
        "{err}"
    );
    // With a config whose Envoy admin port is elsewhere, the same file is fine.
    let cfg2 = write(&dir, "other.yaml", "envoy:\n  admin: 127.0.0.1:19000\n");
    let out = winmesh()
        .args(["validate", "--mesh"])
        .arg(&mesh)
        .arg(&cfg2)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The gateway's own outbound port on Envoy's admin port.
    let clash = write(&dir, "clash.yaml", "gateway:\n  outbound_port: 15000\n");
    let out = winmesh().arg("validate").arg(&clash).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("gateway.outbound_port"));
}

#[test]
fn a_deeply_nested_config_is_refused_quickly_with_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let deep = write(
        &dir,
        "deep.yaml",
        &format!("xds: {}\n", "[".repeat(200_000)),
    );
    let out = winmesh().arg("validate").arg(&deep).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nesting deeper than"));
}

#[test]
fn serve_with_a_broken_config_exits_2_without_listening() {
    let dir = tempfile::tempdir().unwrap();
    let bad = write(&dir, "bad.yaml", "debug:\n  listen: 0.0.0.0:0\n");
    let out = winmesh()
        .args(["serve", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("debug.token_file"));
}

#[test]
fn bootstrap_prints_yaml_envoy_can_read() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(&dir, "c.yaml", "node:\n  id: gw-1\n");
    let out = winmesh()
        .args(["bootstrap", "--delta", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_yaml::from_slice(&out.stdout).unwrap();
    assert_eq!(v["node"]["id"], "gw-1");
    assert_eq!(
        v["dynamic_resources"]["ads_config"]["api_type"],
        "DELTA_GRPC"
    );
}

#[path = "support/ports.rs"]
mod ports;
use ports::free_port;

#[test]
fn serve_becomes_ready_and_status_talks_to_it() {
    let dir = tempfile::tempdir().unwrap();
    let (x, d) = (free_port(), free_port());
    let cfg = write(
        &dir,
        "c.yaml",
        &format!("xds:\n  listen: 127.0.0.1:{x}\ndebug:\n  listen: 127.0.0.1:{d}\n"),
    );
    let mut child = winmesh()
        .args(["serve", "--config"])
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let ready = loop {
        let out = winmesh()
            .args(["status", "--json", "--config"])
            .arg(&cfg)
            .output()
            .unwrap();
        if out.status.success() {
            break String::from_utf8_lossy(&out.stdout).to_string();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!(
                "status never succeeded: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(ready.contains("\"clients\""));
    let table = winmesh()
        .args(["status", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&table.stdout).starts_with("NAME"));
    // Counters a dashboard alerts on exist from the start, and the build is named.
    let metrics = plain_get(d, "/metrics");
    assert!(
        metrics.contains(&format!(
            "winmesh_build_info{{version=\"{}\",target_os=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION"),
            std::env::consts::OS
        )),
        "{metrics}"
    );
    assert!(
        metrics.contains("winmesh_xds_nacks_total{type=\"CDS\"} 0"),
        "{metrics}"
    );
    // The readiness check for exec probes: ready once the (empty) mesh config is published.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = winmesh()
            .args(["status", "--ready", "--config"])
            .arg(&cfg)
            .output()
            .unwrap();
        if out.status.success() {
            break;
        }
        assert_eq!(out.status.code(), Some(1));
        assert!(Instant::now() < deadline, "never ready");
        std::thread::sleep(Duration::from_millis(50));
    }
    // winmesh is ready but no Envoy answers on the admin address: not ready.
    let out = winmesh()
        .args(["status", "--ready", "--envoy", "--envoy-admin"])
        .arg(format!("127.0.0.1:{}", free_port()))
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Envoy admin"), "{err}");
    let _ = child.kill();
    let _ = child.wait();
    // Nothing listening any more: status (and the readiness check) fail with exit code 1.
    for args in [&["status"][..], &["status", "--ready"][..]] {
        let out = winmesh()
            .args(args)
            .arg("--config")
            .arg(&cfg)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}");
    }
}

#[test]
fn bootstrap_can_write_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(&dir, "c.yaml", "");
    let out_file = dir.path().join("b.yaml");
    let out = winmesh()
        .args(["bootstrap", "--config"])
        .arg(&cfg)
        .arg("--output")
        .arg(&out_file)
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: serde_json::Value =
        serde_yaml::from_str(&std::fs::read_to_string(&out_file).unwrap()).unwrap();
    assert_eq!(v["node"]["id"], "winmesh-gateway");
}

#[test]
fn dev_ca_issue_writes_certificates_for_a_test_party() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(
        &dir,
        "c.yaml",
        &format!(
            "ca:\n  mode: dev\n  state_dir: {}\n",
            dir.path().join("state").display()
        ),
    );
    let out_dir = dir.path().join("party");
    let out = winmesh()
        .args([
            "dev-ca",
            "issue",
            "--identity",
            "spiffe://cluster.local/ns/linux/sa/app",
            "--ttl",
            "1h",
            "--config",
        ])
        .arg(&cfg)
        .arg("--out")
        .arg(&out_dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let chain = std::fs::read_to_string(out_dir.join("cert-chain.pem")).unwrap();
    let root = std::fs::read_to_string(out_dir.join("root-cert.pem")).unwrap();
    assert_eq!(
        root,
        std::fs::read_to_string(dir.path().join("state/root-cert.pem")).unwrap(),
        "issued by the persisted dev root"
    );
    assert!(chain.contains("BEGIN CERTIFICATE") && !chain.contains("PRIVATE"));
    assert!(
        std::fs::read_to_string(out_dir.join("key.pem"))
            .unwrap()
            .contains("PRIVATE KEY")
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("created a new dev root CA"),
        "a new root is announced"
    );
    let out = winmesh()
        .args(["dev-ca", "issue", "--identity", "not-a-spiffe-id", "--out"])
        .arg(&out_dir)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    // Without --config: said out loud, never silently.
    let out = winmesh()
        .current_dir(dir.path())
        .args([
            "dev-ca",
            "issue",
            "--identity",
            "spiffe://cluster.local/ns/linux/sa/app",
            "--out",
        ])
        .arg(&out_dir)
        .output()
        .unwrap();
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no --config given") && err.contains(".state/dev-ca"),
        "{err}"
    );
}

#[cfg(unix)]
#[test]
fn bootstrap_output_with_a_token_is_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    write(&dir, "token", "s3cret\n");
    let cfg = write(
        &dir,
        "c.yaml",
        "xds:\n  listen: 127.0.0.1:15010\n  token_file: token\n",
    );
    let out_file = dir.path().join("bootstrap.yaml");
    std::fs::write(&out_file, "old").unwrap();
    std::fs::set_permissions(&out_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = winmesh()
        .args(["bootstrap", "--config"])
        .arg(&cfg)
        .arg("--output")
        .arg(&out_file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        std::fs::read_to_string(&out_file)
            .unwrap()
            .contains("s3cret")
    );
    let mode = std::fs::metadata(&out_file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
}

/// Runs `winmesh [global] serve` with `env` (`None` removes a variable) until it listens, stops it,
/// and returns what it logged to a pipe.
fn serve_logs(global: &[&str], env: &[(&str, Option<&str>)]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let (x, d) = (free_port(), free_port());
    let cfg = write(
        &dir,
        "c.yaml",
        &format!("xds:\n  listen: 127.0.0.1:{x}\ndebug:\n  listen: 127.0.0.1:{d}\n"),
    );
    let mut cmd = winmesh();
    cmd.args(global).args(["serve", "--config"]).arg(&cfg);
    for (k, v) in env {
        match v {
            Some(v) => cmd.env(k, v),
            None => cmd.env_remove(k),
        };
    }
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", d)).is_err() {
        assert!(Instant::now() < deadline, "winmesh never listened");
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `RUST_LOG` is honoured (as `WINMESH_LOG` is) and logs written to a pipe carry no colour codes.
#[test]
fn rust_log_is_honoured_and_piped_logs_have_no_ansi_colours() {
    let log = serve_logs(&[], &[("WINMESH_LOG", None), ("RUST_LOG", Some("debug"))]);
    assert!(log.contains("DEBUG"), "RUST_LOG=debug ignored: {log}");
    assert!(
        !log.contains('\x1b'),
        "colour codes in a piped log: {log:?}"
    );
}

/// `--log-format json` writes one JSON object per line, each with a level and a message.
#[test]
fn json_logs_are_one_object_per_line() {
    let log = serve_logs(
        &["--log-format", "json"],
        &[("WINMESH_LOG", None), ("RUST_LOG", None)],
    );
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty(), "nothing logged");
    for l in &lines {
        let v: serde_json::Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        assert!(v["level"].is_string(), "no level: {l}");
        assert!(v["fields"].is_object(), "no fields: {l}");
    }
    assert!(lines.iter().any(|l| l.contains("\"INFO\"")), "{log}");
}
