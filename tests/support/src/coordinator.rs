//! Coordinator fixtures: a dev-mode coordinator (throwaway fleet, embedded broker) on free
//! loopback ports with its data in a test's folder, and pushes through its typed admin client.

use std::path::Path;

use cloud_coordinator::admin::{PlacementArg, Published};
use cloud_coordinator::{AdminClient, Coordinator, CoordinatorHandle, PushOptions};
use firmware_config::CoordinatorConfig;

/// A dev-mode coordinator's config: QUIC, admin API and embedded broker on port 0 of loopback,
/// data in `dir/coordinator`.
pub fn coordinator_config(dir: &Path) -> CoordinatorConfig {
    let mut config = CoordinatorConfig::default();
    config.storage.data_dir = dir.join("coordinator");
    config.quic.listen = "127.0.0.1:0".parse().unwrap();
    config.admin.listen = "127.0.0.1:0".parse().unwrap();
    config.mqtt.listen = Some("127.0.0.1:0".parse().unwrap());
    config
}

/// Starts a coordinator as [`coordinator_config`] says.
pub async fn start_coordinator(dir: &Path) -> CoordinatorHandle {
    Coordinator::start(coordinator_config(dir)).await.unwrap()
}

/// Push options with the placement written as the CLI takes it (`local`, `cloud`,
/// `cascade:OUTPUT:THRESHOLD`).
pub fn placed(placement: &str) -> PushOptions {
    PushOptions::default().placement(placement.parse::<PlacementArg>().unwrap().0)
}

/// Pushes `model` as `name` and checks it was published (not a dry run); fails the test with
/// the coordinator's reason otherwise.
pub async fn push(
    coordinator: &CoordinatorHandle,
    name: &str,
    options: &PushOptions,
    model: &[u8],
) -> Published {
    let published = AdminClient::of(coordinator)
        .push(name, model.to_vec(), options)
        .await
        .unwrap_or_else(|e| panic!("push {name}: {e}"));
    assert!(!published.dry_run, "push {name}: {published:?}");
    published
}
