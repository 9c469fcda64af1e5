//! Resilience: an agent whose coordinator goes away and comes back on the same address finds it
//! again without a restart, and a dead first coordinator in the list fails over to the next.

use std::time::Duration;

use cloud_coordinator::{Coordinator, CoordinatorHandle};
use edge_agent::Agent;
use model_zoo::{DEFAULT_SEED, DemoModel};
use outpost_test_support::agent::{agent_config, chunk_files, infer, model_status, music_request};
use outpost_test_support::coordinator::{coordinator_config, placed, push, start_coordinator};
use outpost_test_support::eventually::eventually;

/// A coordinator in a temp folder that serves `music-two-tower` from the cloud.
async fn coordinator_with_cloud_music() -> (tempfile::TempDir, CoordinatorHandle) {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = start_coordinator(dir.path()).await;
    push(
        &coordinator,
        "music-two-tower",
        &placed("cloud"),
        &DemoModel::MusicTwoTower.bytes(DEFAULT_SEED),
    )
    .await;
    (dir, coordinator)
}

/// A coordinator that goes away and comes back on the same address is found again without
/// restarting the agent: cloud calls answer again and new releases are fetched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_reconnects_to_a_restarted_coordinator() {
    let (dir, coordinator) = coordinator_with_cloud_music().await;
    let agent = Agent::start(agent_config(&coordinator, dir.path()))
        .await
        .unwrap();
    eventually("the cloud model", || {
        agent.active_version("music-two-tower") == Some(1)
    })
    .await;
    let music = music_request();
    let (status, reply) = infer(&agent, "music-two-tower", &music).await;
    assert_eq!(status, 200, "{reply}");

    // Down: the cloud-only model answers 503 with the reason.
    let (quic, mqtt) = (coordinator.quic_addr, coordinator.mqtt.clone());
    coordinator.shutdown().await;
    let (status, reply) = infer(&agent, "music-two-tower", &music).await;
    assert_eq!(status, 503, "{reply}");

    // Back on the same QUIC and MQTT addresses and data: the agent reconnects to both (its
    // MQTT connection ended with the first coordinator's broker).
    let mut config = coordinator_config(dir.path());
    config.quic.listen = quic;
    config.mqtt.listen = Some(format!("{}:{}", mqtt.host, mqtt.port).parse().unwrap());
    let again = Coordinator::start(config).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (status, reply) = infer(&agent, "music-two-tower", &music).await;
        if status == 200 {
            break;
        }
        assert_eq!(status, 503, "{reply}");
        assert!(
            tokio::time::Instant::now() < deadline,
            "the agent did not reconnect: {reply}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    push(
        &again,
        "video-ranker",
        &placed("local"),
        &DemoModel::VideoRanker.bytes(DEFAULT_SEED),
    )
    .await;
    eventually("a release of the restarted coordinator", || {
        agent.active_version("video-ranker") == Some(1)
    })
    .await;
    agent.shutdown().await;
    again.shutdown().await;
}

/// Coordinators are tried in the configured order: a dead first one does not stop the agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_first_coordinator_fails_over_to_the_next() {
    let (dir, coordinator) = coordinator_with_cloud_music().await;
    let dead = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut config = agent_config(&coordinator, dir.path());
    let live = config.coordinator.addresses[0].clone();
    config.coordinator.addresses = vec![
        firmware_config::HostPort {
            host: "127.0.0.1".into(),
            port: dead,
        },
        live,
    ];
    let agent = Agent::start(config).await.unwrap();
    eventually("the cloud model", || {
        agent.active_version("music-two-tower") == Some(1)
    })
    .await;
    let music = music_request();
    let (status, reply) = infer(&agent, "music-two-tower", &music).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["parameters"]["rows_cloud"], 1);
    agent.shutdown().await;
    coordinator.shutdown().await;
}

/// Moves every chunk file out of the coordinator's store (into memory) and returns them, to put
/// back later.
fn take_chunks(dir: &std::path::Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let taken: Vec<_> = chunk_files(&dir.join("coordinator/chunks"))
        .into_iter()
        .map(|path| {
            let bytes = std::fs::read(&path).unwrap();
            std::fs::remove_file(&path).unwrap();
            (path, bytes)
        })
        .collect();
    assert!(!taken.is_empty(), "the coordinator stored no chunks");
    taken
}

/// An install that fails for a reason that passes (here the coordinator lacks the chunks) is
/// tried again by itself, with back-off, and the status says it is pending, why, and when the
/// next try is; once the chunks are back, the agent converges without another push.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_install_is_tried_again_until_it_converges() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = start_coordinator(dir.path()).await;
    push(
        &coordinator,
        "video-ranker",
        &placed("local"),
        &DemoModel::VideoRanker.bytes(DEFAULT_SEED),
    )
    .await;
    let taken = take_chunks(dir.path());

    let mut config = agent_config(&coordinator, dir.path());
    config.sync.install_retry_max_s = 1;
    let agent = Agent::start(config).await.unwrap();
    eventually("the install to wait for a retry", || {
        agent
            .status()
            .models
            .iter()
            .any(|m| m.model == "video-ranker" && m.retry_in_ms.is_some())
    })
    .await;
    let model = model_status(&agent, "video-ranker");
    assert_eq!(model.pending, Some(1));
    assert_eq!(model.active, None);
    assert!(
        model
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("lacks")),
        "{model:?}"
    );
    assert!(model.retry_in_ms.is_some_and(|ms| ms <= 1500), "{model:?}");
    // A retry is not a refusal.
    assert_eq!(agent.status().counters.manifests_rejected, 0);

    for (path, bytes) in taken {
        std::fs::write(path, bytes).unwrap();
    }
    eventually("the agent to serve version 1 without a new push", || {
        agent.active_version("video-ranker") == Some(1)
    })
    .await;
    let model = model_status(&agent, "video-ranker");
    assert_eq!((model.pending, model.retry_in_ms), (None, None));
    assert!(model.last_error.is_none(), "{model:?}");
    agent.shutdown().await;
    coordinator.shutdown().await;
}

/// A broker the agent cannot reach (down, or blocked on the network): releases still come over
/// QUIC, at the agent's `sync.release_poll_s`, and install as if MQTT had brought them; the
/// status says the broker is unreachable, and the model serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn releases_reach_an_agent_whose_broker_is_unreachable() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = start_coordinator(dir.path()).await;
    let mut config = agent_config(&coordinator, dir.path());
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    config.mqtt.broker.port = closed.local_addr().unwrap().port();
    drop(closed);
    config.sync.release_poll_s = 1;
    let agent = Agent::start(config).await.unwrap();
    push(
        &coordinator,
        "video-ranker",
        &placed("local"),
        &DemoModel::VideoRanker.bytes(DEFAULT_SEED),
    )
    .await;
    eventually("the release over QUIC", || {
        agent.active_version("video-ranker") == Some(1)
    })
    .await;
    let status = agent.status();
    let broker = status.broker_error.unwrap_or_default();
    assert!(broker.contains("MQTT broker"), "{broker:?}");
    let (code, reply) = infer(
        &agent,
        "video-ranker",
        &outpost_test_support::agent::ranker_request(2).0,
    )
    .await;
    assert_eq!(code, 200, "{reply}");
    agent.shutdown().await;
    coordinator.shutdown().await;
}
