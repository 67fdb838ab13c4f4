//! `make demo` works: `winmesh demo --check` brings up the whole loopback mesh from examples/ and
//! verifies both directions over Istio mTLS.

mod support;

#[test]
fn the_demo_brings_up_both_directions() {
    let Some(envoy) = support::envoy_bin() else {
        return;
    };
    let root = env!("CARGO_MANIFEST_DIR");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_winmesh"))
        .current_dir(root)
        .args([
            "demo",
            "--check",
            "--config",
            "examples/winmesh.yaml",
            "--envoy",
        ])
        .arg(&envoy)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{stderr}");
    assert!(
        stdout.contains("mesh caller: spiffe://cluster.local/ns/linux/sa/linuxapp"),
        "{stdout}"
    );
    assert!(
        stdout.contains("mesh caller: spiffe://cluster.local/ns/winmesh/sa/winmesh-gateway"),
        "{stdout}"
    );
    // The commands it prints run as printed: the winmesh binary by a path that exists (it is not
    // on PATH after `make demo`), never a bare `winmesh`.
    let mut printed = 0;
    for line in stdout.lines().map(str::trim) {
        if let Some((bin, _)) = line.split_once(" status --config ") {
            printed += 1;
            let path = std::path::Path::new(root).join(bin);
            assert!(path.is_file(), "{bin} printed, not a file: {stdout}");
            assert_ne!(bin, "winmesh");
        }
    }
    assert_eq!(printed, 1, "{stdout}");
    assert!(
        stdout.contains(" proxy-config clusters --envoy-admin "),
        "{stdout}"
    );
}
