//! `winmesh serve`: start the servers, publish configuration, run until a shutdown signal.

use tracing::info;

use crate::config::Config;
use crate::xds::SnapshotBuilder;

pub async fn run(cfg: Config) -> anyhow::Result<()> {
    let (running, mut writer) = crate::app::start(&cfg).await?;
    running
        .readiness
        .register("config", "no snapshot published yet");
    // Without mesh sources configured, the correct configuration is the empty one.
    writer.publish(SnapshotBuilder::new().build());
    running.readiness.set("config", Ok(()));
    crate::app::shutdown_signal().await;
    info!("shutting down");
    running.stop().await;
    Ok(())
}
