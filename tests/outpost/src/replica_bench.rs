//! `outpost bench --replicas-only`: two coordinators on one shared store (a folder), side by side
//! in one run. A model is pushed to the first; the figures are how long the second takes to take
//! the release over, and a fresh agent's first sync (every chunk) from the second, the replica,
//! against the same from the first, the coordinator it was pushed to.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use cloud_coordinator::registry::Quantize;
use cloud_coordinator::{AdminClient, Coordinator, CoordinatorHandle, PushOptions};
use firmware_config::{CoordinatorConfig, HostPort, SharedStoreSection};
use model_zoo::{DEFAULT_SEED, DemoModel};
use outpost_shared::Placement;

use crate::bench::{loopback_config, wait_until_serving};
use crate::quickstart::DevFleet;

fn shared(store: &Path) -> SharedStoreSection {
    SharedStoreSection {
        url: format!("file://{}", store.display()),
        poll_ms: 100,
        timeout_ms: 10_000,
        endpoint: None,
        region: "us-east-1".into(),
        manifest_keys: Vec::new(),
    }
}

fn host_port(coordinator: &CoordinatorHandle) -> HostPort {
    HostPort {
        host: "127.0.0.1".into(),
        port: coordinator.quic_addr.port(),
    }
}

/// Runs `rounds` rounds; `report` gets the result lines.
pub async fn run(rounds: usize, report: &mut impl FnMut(&str)) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let store = dir.path().join("store");
    let mut first = loopback_config(dir.path())?;
    first.registry.shared = Some(shared(&store));
    let first = Coordinator::start(first).await?;
    // The replica serves the same fleet (the first's dev fleet), its own data, its own broker.
    let fleet_config = first
        .fleet_config
        .clone()
        .context("the first coordinator is not in dev mode")?;
    let mut second = CoordinatorConfig::load(&fleet_config)?;
    second.storage.data_dir = dir.path().join("replica");
    second.quic.listen = "127.0.0.1:0".parse()?;
    second.admin.listen = "127.0.0.1:0".parse()?;
    second.mqtt.listen = Some("127.0.0.1:0".parse()?);
    second.mqtt.external = None;
    second.registry.shared = Some(shared(&store));
    let second = Coordinator::start(second).await?;
    let fleet = DevFleet::of(&first)?;
    let admin = AdminClient::of(&first);
    let replica_admin = AdminClient::of(&second);

    report(&format!(
        "{:>5}  {:>8}  {:>12}  {:>22}  {:>22}",
        "round", "MiB", "taken over", "first sync from first", "first sync from replica"
    ));
    for round in 0..rounds.max(1) {
        let model = DemoModel::VideoRankerXl.bytes(DEFAULT_SEED + round as u64);
        let version = round as u64 + 1;
        let options = PushOptions::default()
            .placement(Placement::Local)
            .quantize(Quantize::None);
        admin
            .push("replica-bench", model.clone(), &options)
            .await
            .map_err(|e| anyhow::anyhow!("pushing failed: {e}"))?;
        let pushed = Instant::now();
        let deadline = pushed + Duration::from_secs(60);
        loop {
            let models = replica_admin
                .models()
                .await
                .map_err(|e| anyhow::anyhow!("listing the replica's models: {e}"))?;
            if models
                .iter()
                .any(|m| m.name == "replica-bench" && m.stable == version)
            {
                break;
            }
            if Instant::now() > deadline {
                bail!("the replica did not take version {version} over within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let taken_over = pushed.elapsed();
        let mut syncs = Vec::new();
        for (n, coordinator) in [(1, &first), (2, &second)] {
            let n = 100 * (round as u32 + 1) + n;
            let address = host_port(coordinator);
            let started = Instant::now();
            let agent = fleet
                .start_agent_with(n, 0, dir.path(), |config| {
                    config.coordinator.addresses = vec![address];
                })
                .await?;
            wait_until_serving(std::slice::from_ref(&agent), "replica-bench", version).await?;
            syncs.push(started.elapsed());
            agent.shutdown().await;
        }
        let mib = model.len() as f64 / (1024.0 * 1024.0);
        let rate = |d: Duration| {
            format!(
                "{:7.1} ms {:6.1} MiB/s",
                d.as_secs_f64() * 1e3,
                mib / d.as_secs_f64()
            )
        };
        report(&format!(
            "{:>5}  {mib:>8.1}  {:>9.1} ms  {:>22}  {:>22}",
            round + 1,
            taken_over.as_secs_f64() * 1e3,
            rate(syncs[0]),
            rate(syncs[1])
        ));
    }
    second.shutdown().await;
    first.shutdown().await;
    Ok(())
}
