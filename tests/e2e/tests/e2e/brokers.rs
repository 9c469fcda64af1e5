//! The coordinator against real production brokers, each started here on a free loopback port
//! with the files `firmware-config provision` wrote (and stopped when the test ends): Mosquitto
//! (Debian `mosquitto`: `mosquitto.conf`, `mosquitto.acl`, `crl.pem`) and the MQTT listener of
//! a NATS server (Debian `nats-server`: `nats.conf`, `nats-users.conf`). TLS only with client
//! certificates of the fleet: push, sync and status work; a device reads releases but cannot
//! write another device's status or any release; outsiders (no certificate, another fleet's)
//! are refused; a device revoked at the coordinator (which holds the CA key here, so it signs
//! the brokers' files) is refused by the reloaded broker while the others carry on.

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

/// A production broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Mosquitto,
    Nats,
}

/// A broker on a loopback port, stopped on drop.
pub(crate) struct Broker {
    child: ChildGuard,
    kind: Kind,
    _dir: tempfile::TempDir,
}

fn installed(candidates: &[&'static str], package: &str) -> &'static str {
    candidates
        .iter()
        .copied()
        .find(|p| std::path::Path::new(p).exists())
        .unwrap_or_else(|| {
            panic!("{package} is not installed (Debian package `{package}`; .ci/run installs it)")
        })
}

/// `kind` with the config `firmware-config provision` wrote into `fleet`, listening on `port`.
pub(crate) fn start_broker(kind: Kind, fleet: &std::path::Path, port: u16) -> Broker {
    let dir = tempfile::tempdir().unwrap();
    let mut command = match kind {
        Kind::Mosquitto => {
            let conf = dir.path().join("mosquitto.conf");
            // Started as root, Mosquitto changes to user `mosquitto`, which cannot read the
            // fleet's keys (mode 0600): a test run as root keeps it root.
            let user = if outpost_test_support::process::running_as_root() {
                "user root\n"
            } else {
                ""
            };
            let provisioned = std::fs::read_to_string(fleet.join("mosquitto.conf")).unwrap();
            assert!(
                provisioned.contains(&format!("listener {port} 127.0.0.1"))
                    && provisioned.contains("crlfile"),
                "{provisioned}"
            );
            std::fs::write(
                &conf,
                format!("{user}persistence false\nlog_dest stdout\n{provisioned}"),
            )
            .unwrap();
            let mut command = Command::new(installed(
                &[
                    "/usr/sbin/mosquitto",
                    "/usr/bin/mosquitto",
                    "/usr/local/sbin/mosquitto",
                ],
                "mosquitto",
            ));
            command.arg("-c").arg(conf);
            command
        }
        Kind::Nats => {
            let provisioned = std::fs::read_to_string(fleet.join("nats.conf")).unwrap();
            assert!(
                provisioned.contains(&format!("listen: \"127.0.0.1:{port}\""))
                    && provisioned.contains("verify_and_map: true"),
                "{provisioned}"
            );
            let mut command = Command::new(installed(
                &[
                    "/usr/bin/nats-server",
                    "/usr/sbin/nats-server",
                    "/usr/local/bin/nats-server",
                ],
                "nats-server",
            ));
            command.arg("-c").arg(fleet.join("nats.conf"));
            command
        }
    };
    let child = ChildGuard::spawn(command.stdout(Stdio::null()).stderr(Stdio::null()));
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "{kind:?} did not start listening on {port}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Broker {
        child,
        kind,
        _dir: dir,
    }
}

impl Broker {
    /// Makes the broker read its files again, as an operator would after a revocation.
    fn reload(&self) {
        let pid = self.child.0.id().to_string();
        let status = match self.kind {
            Kind::Mosquitto => Command::new("kill").args(["-HUP", &pid]).status(),
            Kind::Nats => Command::new(installed(
                &[
                    "/usr/bin/nats-server",
                    "/usr/sbin/nats-server",
                    "/usr/local/bin/nats-server",
                ],
                "nats-server",
            ))
            .arg("--signal")
            .arg(format!("reload={pid}"))
            .status(),
        };
        assert!(
            status.unwrap().success(),
            "could not reload {:?}",
            self.kind
        );
    }
}

/// Waits until `device`'s status is in the coordinator's fleet view.
async fn in_fleet_view(admin: &cloud_coordinator::AdminClient, device: &str) {
    outpost_test_support::eventually::eventually_async(
        &format!("the status of {device} in the fleet view"),
        || async {
            admin
                .fleet()
                .await
                .unwrap()
                .iter()
                .any(|d| d.device_id == device)
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_sync_status_and_revocation_through_mosquitto_with_the_provisioned_files() {
    through_a_production_broker(Kind::Mosquitto).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_sync_status_and_revocation_through_nats_with_the_provisioned_files() {
    through_a_production_broker(Kind::Nats).await;
}

async fn through_a_production_broker(kind: Kind) {
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
    let broker = start_broker(kind, &fleet, port);
    let mut config = CoordinatorConfig::load(&fleet.join("coordinator.toml")).unwrap();
    config.storage.data_dir = dir.path().join("coordinator");
    config.quic.listen = format!("127.0.0.1:{quic}").parse().unwrap();
    config.admin.listen = "127.0.0.1:0".parse().unwrap();
    config.mqtt.external = Some(broker_addr.clone());
    let handle = Coordinator::start(config).await.unwrap();
    assert!(!handle.embedded_broker);
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
    in_fleet_view(&admin, "mosq-0001").await;

    // A device's subscriber that connects after the push gets the release (retained).
    let topic = Topic::manifest("music-two-tower").unwrap().name();
    let second = ClientIdentity::device(&device(2));
    let mut observer = MqttObserver::new(&broker_addr, "broker-test", &second);
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
    // Device 1's own statuses may come meanwhile; the forgery must not.
    let until = tokio::time::Instant::now() + Duration::from_secs(2);
    while let Some(written) = watcher
        .message_within(&status_1, until - tokio::time::Instant::now())
        .await
    {
        assert!(
            written != b"forged",
            "a device wrote another device's status"
        );
    }
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

    // Revocation: the coordinator holds the CA key here (beside ca.crt), so it signs crl.pem and
    // nats-users.conf again; once the broker reloads them, device 2 is refused and device 1
    // is not.
    let revoked = admin.revoke("mosq-0002").await.unwrap();
    let files = revoked.broker_files.unwrap_or_default();
    assert!(files.contains("signed again with 1 revoked"), "{files}");
    let listed = std::fs::read_to_string(fleet.join("revoked.txt")).unwrap();
    assert!(listed.lines().any(|l| l == "mosq-0002"), "{listed}");
    broker.reload();
    let mut refused = false;
    for attempt in 0..50 {
        let mut revoked_device =
            MqttObserver::new(&broker_addr, &format!("revoked-{attempt}"), &second);
        if revoked_device.connected().await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        refused,
        "{kind:?} still let a revoked device in after reloading"
    );
    let mut kept = MqttObserver::new(&broker_addr, "kept", &ClientIdentity::device(&device(1)));
    kept.subscribe(&topic).await;
    assert!(
        kept.next_message(&topic).await == payload,
        "a device that was not revoked lost the broker"
    );
    agent.shutdown().await;
    handle.shutdown().await;
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// An operator's own broker, whose certificate another CA issued (here: the coordinator
/// certificate of a second provisioned fleet, naming 127.0.0.1): the coordinator and an agent
/// that name that CA in `[mqtt] ca` connect, the agent's status reaches the fleet view and a
/// release pushed after it started arrives over MQTT; an agent that trusts only the fleet CA
/// refuses the broker and says so in its status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_certificate_from_another_ca_is_trusted_through_mqtt_ca() {
    let dir = tempfile::tempdir().unwrap();
    let (port, quic) = (
        free_tcp_port(),
        outpost_test_support::ports::free_udp_port(),
    );
    let broker_addr = HostPort {
        host: "127.0.0.1".into(),
        port,
    };
    let fleet = dir.path().join("fleet");
    let plan = firmware_config::FleetPlan::numbered(
        "opca",
        2,
        vec![format!("127.0.0.1:{quic}").parse().unwrap()],
        broker_addr.clone(),
    )
    .unwrap();
    firmware_config::provision(&plan, &fleet).unwrap();
    // The operator's PKI: a second fleet's coordinator certificate serves as the broker's.
    let pki = dir.path().join("operator-pki");
    let pki_plan = firmware_config::FleetPlan::numbered(
        "operator",
        0,
        vec!["127.0.0.1:1".parse().unwrap()],
        broker_addr.clone(),
    )
    .unwrap();
    firmware_config::provision(&pki_plan, &pki).unwrap();
    let conf = fleet.join("mosquitto.conf");
    let text = std::fs::read_to_string(&conf).unwrap();
    let text = text
        .replace(
            &format!("certfile {}", fleet.join("coordinator.crt").display()),
            &format!("certfile {}", pki.join("coordinator.crt").display()),
        )
        .replace(
            &format!("keyfile {}", fleet.join("coordinator.key").display()),
            &format!("keyfile {}", pki.join("coordinator.key").display()),
        );
    assert!(text.contains("operator-pki/coordinator.crt"), "{text}");
    std::fs::write(&conf, text).unwrap();
    let _broker = start_broker(Kind::Mosquitto, &fleet, port);
    let broker_ca = pki.join("ca.crt");

    let mut config = CoordinatorConfig::load(&fleet.join("coordinator.toml")).unwrap();
    config.storage.data_dir = dir.path().join("coordinator");
    config.quic.listen = format!("127.0.0.1:{quic}").parse().unwrap();
    config.admin.listen = "127.0.0.1:0".parse().unwrap();
    config.mqtt.external = Some(broker_addr.clone());
    config.mqtt.ca = Some(broker_ca.clone());
    let handle = Coordinator::start(config).await.unwrap();
    let admin = cloud_coordinator::AdminClient::of(&handle);

    let agent = |n: u32, ca: Option<std::path::PathBuf>| {
        let mut config =
            AgentConfig::load(&fleet.join(format!("devices/opca-000{n}/agent.toml"))).unwrap();
        config.api.listen = "127.0.0.1:0".parse().unwrap();
        config.storage.data_dir = Some(dir.path().join(format!("agent-{n}")));
        config.mqtt.ca = ca;
        config
    };
    let trusting = edge_agent::Agent::start(agent(1, Some(broker_ca)))
        .await
        .unwrap();
    let unaware = edge_agent::Agent::start(agent(2, None)).await.unwrap();
    in_fleet_view(&admin, "opca-0001").await;
    // Pushed after both started (past their first ask over QUIC; the next is minutes away):
    // the release comes over MQTT.
    let bytes = model_zoo::DemoModel::MusicTwoTower.bytes(model_zoo::DEFAULT_SEED);
    push(&handle, "music-two-tower", &placed("local"), &bytes).await;
    eventually("the trusting agent installs over MQTT", || {
        trusting.active_version("music-two-tower") == Some(1)
    })
    .await;
    assert_eq!(trusting.status().broker_error, None);
    eventually("the other agent reports the broker it refused", || {
        unaware.status().broker_error.is_some()
    })
    .await;
    let said = unaware.status().broker_error.unwrap_or_default();
    assert!(said.contains("MQTT broker"), "{said}");
    assert!(
        !admin
            .fleet()
            .await
            .unwrap()
            .iter()
            .any(|d| d.device_id == "opca-0002"),
        "an agent that refused the broker was seen through it"
    );
    trusting.shutdown().await;
    unaware.shutdown().await;
    handle.shutdown().await;
}

/// A three-node NATS cluster (`firmware-config nats-cluster` configs; JetStream replicated over
/// the nodes) as the fleet's broker, agents spread over the nodes, each listing the others in
/// `[mqtt] fallbacks`, and the coordinator on node 1 with the others as its fallbacks. Node 1 is
/// killed mid-rollout: its agent and the coordinator move to the other nodes, the next version
/// reaches every agent (over MQTT, or the QUIC ask an agent makes on reconnecting; the timed
/// poll is minutes away), and every status arrives. A first run found the coordinator deaf after
/// the failover: the cluster refused its subscription while electing, and nothing asked again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_cluster_loses_a_node_mid_rollout_and_no_agent_is_left_behind() {
    let dir = tempfile::tempdir().unwrap();
    let quic = outpost_test_support::ports::free_udp_port();
    let node = |port: u16| HostPort {
        host: "127.0.0.1".into(),
        port,
    };
    let nodes: Vec<firmware_config::provision::NatsNode> = (0..3)
        .map(|_| firmware_config::provision::NatsNode {
            mqtt: node(free_tcp_port()),
            route: node(free_tcp_port()),
        })
        .collect();
    let fleet = dir.path().join("fleet");
    let plan = firmware_config::FleetPlan::numbered(
        "clu",
        3,
        vec![format!("127.0.0.1:{quic}").parse().unwrap()],
        nodes[0].mqtt.clone(),
    )
    .unwrap();
    firmware_config::provision(&plan, &fleet).unwrap();
    let out = outpost_test_support::process::run(
        "firmware-config",
        &[
            "nats-cluster",
            "--fleet",
            fleet.to_str().unwrap(),
            "--mqtt",
            &nodes[0].mqtt.to_string(),
            "--mqtt",
            &nodes[1].mqtt.to_string(),
            "--mqtt",
            &nodes[2].mqtt.to_string(),
            "--route",
            &nodes[0].route.to_string(),
            "--route",
            &nodes[1].route.to_string(),
            "--route",
            &nodes[2].route.to_string(),
        ],
    );
    assert!(out.contains("nats-node-3.conf"), "{out}");
    let nats = installed(
        &[
            "/usr/bin/nats-server",
            "/usr/sbin/nats-server",
            "/usr/local/bin/nats-server",
        ],
        "nats-server",
    );
    let mut servers: Vec<Option<ChildGuard>> = (1..=3)
        .map(|n| {
            Some(ChildGuard::spawn(
                Command::new(nats)
                    .arg("-c")
                    .arg(fleet.join(format!("nats-node-{n}.conf")))
                    .stdout(Stdio::null())
                    .stderr(Stdio::null()),
            ))
        })
        .collect();
    for n in &nodes {
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", n.mqtt.port)).is_err() {
            assert!(Instant::now() < deadline, "node {} did not listen", n.mqtt);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    let mut config = CoordinatorConfig::load(&fleet.join("coordinator.toml")).unwrap();
    config.storage.data_dir = dir.path().join("coordinator");
    config.quic.listen = format!("127.0.0.1:{quic}").parse().unwrap();
    config.admin.listen = "127.0.0.1:0".parse().unwrap();
    config.mqtt.external = Some(nodes[0].mqtt.clone());
    config.mqtt.fallbacks = vec![nodes[1].mqtt.clone(), nodes[2].mqtt.clone()];
    let handle = Coordinator::start(config).await.unwrap();
    let admin = cloud_coordinator::AdminClient::of(&handle);
    let mut agents = Vec::new();
    for n in 0..3 {
        let mut config =
            AgentConfig::load(&fleet.join(format!("devices/clu-000{}/agent.toml", n + 1))).unwrap();
        config.api.listen = "127.0.0.1:0".parse().unwrap();
        config.storage.data_dir = Some(dir.path().join(format!("agent-{n}")));
        config.mqtt.broker = nodes[n].mqtt.clone();
        config.mqtt.fallbacks = (0..3)
            .filter(|m| *m != n)
            .map(|m| nodes[m].mqtt.clone())
            .collect();
        agents.push(edge_agent::Agent::start(config).await.unwrap());
    }
    let bytes = model_zoo::DemoModel::VideoRanker.bytes(model_zoo::DEFAULT_SEED);
    push(&handle, "video-ranker", &placed("local"), &bytes).await;
    for agent in &agents {
        eventually("every agent serves version 1", || {
            agent.active_version("video-ranker") == Some(1)
        })
        .await;
    }

    // Node 1 goes down (the coordinator's node and agent 1's), then version 2 is pushed.
    drop(servers[0].take());
    let bytes = model_zoo::DemoModel::VideoRanker.bytes(model_zoo::DEFAULT_SEED + 1);
    push(&handle, "video-ranker", &placed("local"), &bytes).await;
    for agent in &agents {
        eventually(
            "every agent serves version 2 after the node is gone",
            || agent.active_version("video-ranker") == Some(2),
        )
        .await;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let fleet_view = admin.fleet().await.unwrap();
        let on_two = fleet_view
            .iter()
            .filter(|d| {
                d.models
                    .iter()
                    .any(|m| m.model == "video-ranker" && m.active == Some(2))
            })
            .count();
        if on_two == 3 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "statuses of version 2 reached the coordinator from {on_two} of 3 devices"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for agent in agents {
        agent.shutdown().await;
    }
    handle.shutdown().await;
    drop(servers);
}
