//! The coordinator against a real Mosquitto broker (Debian `mosquitto`, started here on a free
//! loopback port with TCP_NODELAY and stopped by PID): push, then a plain subscriber receives the
//! retained manifest and it verifies with the fleet key.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cloud_coordinator::Coordinator;
use firmware_config::{AgentConfig, CoordinatorConfig, HostPort};
use outpost_shared::{ManifestVerifier, Topic};

struct Mosquitto {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nset_tcp_nodelay true\nlog_dest stdout\n"),
    )
    .unwrap();
    let child = Command::new(mosquitto_binary())
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "mosquitto did not start listening on {port}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Mosquitto {
        child,
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

    let bytes = model_zoo::DemoModel::MusicTwoTower.bytes(model_zoo::DEFAULT_SEED);
    let status = push(
        handle.admin_addr,
        &handle.admin_token,
        "music-two-tower",
        &bytes,
    )
    .await;
    assert!(status.starts_with("HTTP/1.1 201"), "{status}");

    // A subscriber that connects after the push still gets the release (retained).
    let topic = Topic::manifest("music-two-tower").unwrap().name();
    let mut options = rumqttc::MqttOptions::new("mosquitto-test", "127.0.0.1", broker.port);
    options.set_max_packet_size(8 << 20, 8 << 20);
    let (client, mut events) = rumqttc::AsyncClient::new(options, 16);
    events.network_options.set_tcp_nodelay(true);
    client
        .subscribe(&topic, rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let payload = loop {
        let event = tokio::time::timeout_at(deadline, events.poll())
            .await
            .expect("no manifest within 10 s");
        if let Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) = event {
            if p.topic == topic {
                break p.payload.to_vec();
            }
        }
    };
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

async fn push(addr: std::net::SocketAddr, token: &str, name: &str, body: &[u8]) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /v1/models/{name} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(body).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}
