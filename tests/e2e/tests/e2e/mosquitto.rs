//! The coordinator against a real Mosquitto broker (Debian `mosquitto`, started here on a free
//! loopback port with TCP_NODELAY and stopped when the test ends), TLS only with client
//! certificates of a provisioned fleet: push, then a device's subscriber receives the retained
//! manifest and it verifies with the fleet key; a client without a fleet certificate gets nothing.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cloud_coordinator::Coordinator;
use firmware_config::{AgentConfig, CoordinatorConfig, HostPort};
use outpost_shared::{ManifestVerifier, Topic};
use outpost_test_support::coordinator::{placed, push};
use outpost_test_support::mqtt::{ClientIdentity, MqttObserver};
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

/// Mosquitto on a free loopback port, TLS 1.3 only: the server certificate is the fleet's
/// coordinator certificate (`fleet/coordinator.{crt,key}`), and every client must present a
/// certificate from the fleet CA (its common name is its user name).
fn start_mosquitto(fleet: &std::path::Path, port: u16) -> Mosquitto {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("mosquitto.conf");
    let file = |name: &str| fleet.join(name).display().to_string();
    // Started as root, Mosquitto changes to user `mosquitto`, which cannot read the fleet's
    // keys (mode 0600): a test run as root keeps it root.
    let user = if outpost_test_support::process::running_as_root() {
        "user root\n"
    } else {
        ""
    };
    std::fs::write(
        &conf,
        format!(
            "{user}listener {port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\nuse_identity_as_username true\ntls_version tlsv1.3\nallow_anonymous false\npersistence false\nset_tcp_nodelay true\nlog_dest stdout\n",
            file("ca.crt"),
            file("coordinator.crt"),
            file("coordinator.key"),
        ),
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
    let dir = tempfile::tempdir().unwrap();
    let port = free_tcp_port();
    let broker_addr = HostPort {
        host: "127.0.0.1".into(),
        port,
    };
    let plan = firmware_config::FleetPlan::numbered(
        "mosq",
        1,
        vec!["127.0.0.1:1".parse().unwrap()],
        broker_addr.clone(),
    )
    .unwrap();
    let fleet = dir.path().join("fleet");
    firmware_config::provision(&plan, &fleet).unwrap();
    let broker = start_mosquitto(&fleet, port);
    let mut config = CoordinatorConfig::load(&fleet.join("coordinator.toml")).unwrap();
    config.storage.data_dir = dir.path().join("coordinator");
    config.quic.listen = "127.0.0.1:0".parse().unwrap();
    config.admin.listen = "127.0.0.1:0".parse().unwrap();
    config.mqtt.external = Some(broker_addr.clone());
    let handle = Coordinator::start(config).await.unwrap();
    assert!(!handle.embedded_broker);
    assert_eq!(broker.port, port);

    // Published (the server's 201), not a dry run.
    let bytes = model_zoo::DemoModel::MusicTwoTower.bytes(model_zoo::DEFAULT_SEED);
    let published = push(&handle, "music-two-tower", &placed("local"), &bytes).await;
    assert!(!published.dry_run, "{published:?}");

    // A device's subscriber that connects after the push still gets the release (retained).
    let topic = Topic::manifest("music-two-tower").unwrap().name();
    let agent = AgentConfig::load(&fleet.join("devices/mosq-0001/agent.toml")).unwrap();
    let mut observer = MqttObserver::new(
        &broker_addr,
        "mosquitto-test",
        &ClientIdentity::device(&agent),
    );
    observer.subscribe(&topic).await;
    let payload = observer.next_message(&topic).await;
    let manifest = ManifestVerifier::new(agent.fleet.manifest_keys.clone())
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
