//! Compiles proto/ with protox (pure Rust, no system `protoc`), so every target, Windows included,
//! builds with nothing but cargo.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(
        [
            "istio/ca.proto",
            "winmesh/xds_wire.proto",
            "winmesh/sds_wire.proto",
        ],
        ["proto"],
    )?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .bytes(".envoy.service.discovery.v3.WireAny")
        .extern_path(
            ".envoy.service.discovery.v3.DiscoveryRequest",
            "::envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest",
        )
        .extern_path(
            ".envoy.service.discovery.v3.DeltaDiscoveryRequest",
            "::envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryRequest",
        )
        .compile_fds(fds)?;
    Ok(())
}
