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
use outpost_test_support::eventually::eventually;
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

/// Mosquitto with the config `firmware-config provision` wrote into `fleet`
/// (`mosquitto.conf`: TLS 1.3, fleet client certificates, `mosquitto.acl`), listening on `port`.
fn start_mosquitto(fleet: &std::path::Path, port: u16) -> Mosquitto {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("mosquitto.conf");
    // Started as root, Mosquitto changes to user `mosquitto`, which cannot read the fleet's
    // keys (mode 0600): a test run as root keeps it root.
    let user = if outpost_test_support::process::running_as_root() {
        "user root\n"
    } else {
        ""
    };
    let provisioned = std::fs::read_to_string(fleet.join("mosquitto.conf")).unwrap();
    assert!(
        provisioned.contains(&format!("listener {port} 127.0.0.1")),
        "{provisioned}"
    );
    std::fs::write(
        &conf,
        format!("{user}persistence false\nlog_dest stdout\n{provisioned}"),
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
async fn push_sync_and_status_through_mosquitto_with_the_provisioned_rules() {
    let dir = tempfile::tempdir().unwrap();
    let (port, quic) = (
        free_tcp_port(),
        outpost_test_support::ports::free_udp_port(),
    );
    let broker_addr = HostPort {
        host: "127.0.0.1".into(),
        port,
    };
    let plan = firmware_config::FleetPlan::numbered(
        "mosq",
        2,
        vec![format!("127.0.0.1:{quic}").parse().unwrap()],
        broker_addr.clone(),
    )
    .unwrap();
    let fleet = dir.path().join("fleet");
    firmware_config::provision(&plan, &fleet).unwrap();
    let broker = start_mosquitto(&fleet, port);
    let mut config = CoordinatorConfig::load(&fleet.join("coordinator.toml")).unwrap();
    config.storage.data_dir = dir.path().join("coordinator");
    config.quic.listen = format!("127.0.0.1:{quic}").parse().unwrap();
    config.admin.listen = "127.0.0.1:0".parse().unwrap();
    config.mqtt.external = Some(broker_addr.clone());
    let handle = Coordinator::start(config).await.unwrap();
    assert!(!handle.embedded_broker);
    assert_eq!(broker.port, port);
    let device =
        |n: u32| AgentConfig::load(&fleet.join(format!("devices/mosq-000{n}/agent.toml"))).unwrap();

    // Push, sync and status through the broker.
    let bytes = model_zoo::DemoModel::MusicTwoTower.bytes(model_zoo::DEFAULT_SEED);
    let published = push(&handle, "music-two-tower", &placed("local"), &bytes).await;
    assert!(!published.dry_run, "{published:?}");
    let mut agent_config = device(1);
    agent_config.api.listen = "127.0.0.1:0".parse().unwrap();
    agent_config.storage.data_dir = Some(dir.path().join("agent"));
    let agent = edge_agent::Agent::start(agent_config).await.unwrap();
    eventually("the agent serves the release", || {
        agent.active_version("music-two-tower") == Some(1)
    })
    .await;
    let admin = cloud_coordinator::AdminClient::of(&handle);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !admin
        .fleet()
        .await
        .unwrap()
        .iter()
        .any(|d| d.device_id == "mosq-0001")
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no status reached the coordinator"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A device's subscriber that connects after the push gets the release (retained).
    let topic = Topic::manifest("music-two-tower").unwrap().name();
    let second = ClientIdentity::device(&device(2));
    let mut observer = MqttObserver::new(&broker_addr, "mosquitto-test", &second);
    observer.subscribe(&topic).await;
    let payload = observer.next_message(&topic).await;
    let manifest = ManifestVerifier::new(device(1).fleet.manifest_keys.clone())
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

    // Device 2 tries what its rules forbid: the broker drops it before anyone sees it.
    let status_1 = Topic::device_status("mosq-0001").unwrap().name();
    let mut snooper = MqttObserver::new(&broker_addr, "snooper", &second);
    snooper.subscribe("outpost/v1/devices/+/status").await;
    let read = snooper
        .message_within(&status_1, Duration::from_secs(2))
        .await;
    assert!(
        read.is_none(),
        "a device read another device's status ({:?} bytes)",
        read.map(|r| r.len())
    );
    let mut watcher = MqttObserver::new(
        &broker_addr,
        "watcher",
        &ClientIdentity::coordinator(&fleet),
    );
    watcher.subscribe(&status_1).await;
    // (its retained status comes first)
    let _ = watcher
        .message_within(&status_1, Duration::from_secs(2))
        .await;
    let forger = observer.into_publisher();
    forger
        .publish(
            &status_1,
            rumqttc::QoS::AtLeastOnce,
            true,
            b"forged".to_vec(),
        )
        .await
        .unwrap();
    forger
        .publish(&topic, rumqttc::QoS::AtLeastOnce, true, Vec::new())
        .await
        .unwrap();
    let written = watcher
        .message_within(&status_1, Duration::from_secs(2))
        .await;
    assert!(
        written.is_none(),
        "a device wrote another device's status: {written:?}"
    );
    let mut late = MqttObserver::new(&broker_addr, "late", &second);
    late.subscribe(&topic).await;
    assert!(
        late.next_message(&topic).await == payload,
        "a device cleared a release"
    );
    let metrics = admin.metrics().await.unwrap();
    for counter in [
        "outpost_releases_reasserted_total 0",
        "outpost_status_rejected_total 0",
    ] {
        assert!(
            metrics.contains(counter),
            "the broker let it through: {metrics}"
        );
    }

    // Outsiders: no certificate, or another fleet's.
    let other = tempfile::tempdir().unwrap();
    let plan = firmware_config::FleetPlan::numbered(
        "other",
        1,
        vec!["127.0.0.1:1".parse().unwrap()],
        broker_addr.clone(),
    )
    .unwrap();
    firmware_config::provision(&plan, other.path()).unwrap();
    let stranger = AgentConfig::load(&other.path().join("devices/other-0001/agent.toml")).unwrap();
    let mut stranger_identity = ClientIdentity::device(&stranger);
    // It trusts our broker's CA, so only its own certificate is in question.
    stranger_identity.ca = fleet.join("ca.crt");
    let mut outsider = MqttObserver::new(&broker_addr, "stranger", &stranger_identity);
    assert!(
        outsider.connected().await.is_err(),
        "another fleet's device got in"
    );
    // And anonymous plain MQTT.
    let (_client, mut events) =
        rumqttc::AsyncClient::new(rumqttc::MqttOptions::new("anonymous", "127.0.0.1", port), 4);
    let anonymous = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match events.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => return true,
                Ok(_) => {}
                Err(_) => return false,
            }
        }
    })
    .await
    .unwrap_or(false);
    assert!(!anonymous, "an anonymous plain client got in");
    agent.shutdown().await;
    handle.shutdown().await;
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}
