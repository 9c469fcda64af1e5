//! The coordinator against a real Mosquitto broker (Debian `mosquitto`, started here on a free
//! loopback port with TCP_NODELAY and stopped when the test ends): push, then a plain subscriber
//! receives the retained manifest and it verifies with the fleet key.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cloud_coordinator::Coordinator;
use firmware_config::{AgentConfig, CoordinatorConfig, HostPort};
use outpost_shared::{ManifestVerifier, Topic};
use outpost_test_support::coordinator::{placed, push};
use outpost_test_support::mqtt::MqttObserver;
use outpost_test_support::ports::free_tcp_port;
use outpost_test_support::process::ChildGuard;

/// A Mosquitto broker on a loopback port, stopped on drop.
struct Mosquitto {
    _child: ChildGuard,
    port: u16,
    _dir: tempfile::TempDir,
}

fn mosquitto_binary() -> &'static str {
    [
        "/usr/sbin/mosquitto",
        "/usr/bin/mosquitto",
        "/usr/local/sbin/mosquitto",
    ]
    .into_iter()
    .find(|p| std::path::Path::new(p).exists())
    .expect("mosquitto is not installed (Debian package `mosquitto`; .ci/run installs it)")
}

fn start_mosquitto() -> Mosquitto {
    let port = free_tcp_port();
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nset_tcp_nodelay true\nlog_dest stdout\n"),
    )
    .unwrap();
    let child = ChildGuard::spawn(
        Command::new(mosquitto_binary())
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "mosquitto did not start listening on {port}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Mosquitto {
        _child: child,
        port,
        _dir: dir,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_is_announced_through_mosquitto() {
    let broker = start_mosquitto();
    let dir = tempfile::tempdir().unwrap();
    let mut config = CoordinatorConfig::default();
    config.storage.data_dir = dir.path().join("coordinator");
    config.quic.listen = "127.0.0.1:0".parse().unwrap();
    config.admin.listen = "127.0.0.1:0".parse().unwrap();
    config.mqtt.external = Some(HostPort {
        host: "127.0.0.1".into(),
        port: broker.port,
    });
    let handle = Coordinator::start(config).await.unwrap();
    assert!(!handle.embedded_broker);

    // Published (the server's 201), not a dry run.
    let bytes = model_zoo::DemoModel::MusicTwoTower.bytes(model_zoo::DEFAULT_SEED);
    let published = push(&handle, "music-two-tower", &placed("local"), &bytes).await;
    assert!(!published.dry_run, "{published:?}");

    // A subscriber that connects after the push still gets the release (retained).
    let topic = Topic::manifest("music-two-tower").unwrap().name();
    let mut observer = MqttObserver::new(
        &HostPort {
            host: "127.0.0.1".into(),
            port: broker.port,
        },
        "mosquitto-test",
    );
    observer.subscribe(&topic).await;
    let payload = observer.next_message(&topic).await;
    let agent = AgentConfig::load(handle.dev_agent_config.as_ref().unwrap()).unwrap();
    let manifest = ManifestVerifier::new(agent.fleet.manifest_keys)
        .verify_cbor(&payload, now())
        .unwrap();
    assert_eq!(manifest.model, "music-two-tower");
    // The edge variant is the (deterministic) int8 quantisation of the pushed file.
    let int8 = outpost_runtime::quantize::quantize_int8(&bytes)
        .unwrap()
        .bytes;
    assert_eq!(
        manifest.stable.variants[0].digest,
        outpost_shared::Digest::of(&int8)
    );
    handle.shutdown().await;
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}
