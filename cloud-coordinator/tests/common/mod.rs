//! Helpers for the coordinator's tests: a coordinator on free loopback ports in a temp folder,
//! its typed admin client and a raw admin request (for queries the typed client cannot write),
//! a QUIC client with a device certificate, an MQTT subscriber.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use cloud_coordinator::admin::Published;
use cloud_coordinator::{AdminClient, Coordinator, CoordinatorHandle, PushOptions};
use firmware_config::{AgentConfig, CoordinatorConfig};
use outpost_runtime::http::{self, HttpClient, Method};
use outpost_shared::frame::{self, MAX_FRAME_BYTES, PROTOCOL_VERSION};
use outpost_shared::{Request, Response};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

pub struct TestCoordinator {
    pub handle: CoordinatorHandle,
    pub dir: tempfile::TempDir,
}

pub fn config(dir: &Path) -> CoordinatorConfig {
    let mut config = CoordinatorConfig::default();
    config.storage.data_dir = dir.join("coordinator");
    config.quic.listen = "127.0.0.1:0".parse().unwrap();
    config.admin.listen = "127.0.0.1:0".parse().unwrap();
    config.mqtt.listen = Some("127.0.0.1:0".parse().unwrap());
    config
}

pub async fn start_with(config: CoordinatorConfig, dir: tempfile::TempDir) -> TestCoordinator {
    let handle = Coordinator::start(config).await.unwrap();
    TestCoordinator { handle, dir }
}

pub async fn start() -> TestCoordinator {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    start_with(config, dir).await
}

impl TestCoordinator {
    pub fn agent(&self) -> AgentConfig {
        AgentConfig::load(self.handle.dev_agent_config.as_ref().unwrap()).unwrap()
    }

    /// The typed admin client.
    pub fn client(&self) -> AdminClient {
        AdminClient::of(&self.handle)
    }

    /// A raw admin request with the token, for what the typed client cannot send.
    pub async fn admin(&self, method: Method, path: &str, body: &[u8]) -> (u16, serde_json::Value) {
        admin(
            self.handle.admin_addr,
            method,
            path,
            &self.handle.admin_token,
            body,
        )
        .await
    }

    /// Pushes and publishes (not a dry run), or fails the test with the coordinator's reason.
    pub async fn push(&self, name: &str, options: &PushOptions, body: &[u8]) -> Published {
        let published = self
            .client()
            .push(name, body.to_vec(), options)
            .await
            .unwrap_or_else(|e| panic!("push failed: {e}"));
        assert!(!published.dry_run, "{published:?}");
        published
    }

    pub async fn quic(&self) -> quinn::Connection {
        connect(self.handle.quic_addr, &self.agent()).await.unwrap()
    }
}

/// An admin request as written, with `token`; returns the status and the JSON body (or the
/// text as a string).
pub async fn admin(
    addr: SocketAddr,
    method: Method,
    path: &str,
    token: &str,
    body: &[u8],
) -> (u16, serde_json::Value) {
    let request = http::Request::new(method, path)
        .bearer(token)
        .body(body.to_vec());
    let answer = HttpClient::new(addr).send(request).await.unwrap();
    let json = serde_json::from_slice(&answer.body)
        .unwrap_or_else(|_| serde_json::Value::String(answer.text()));
    (answer.status.as_u16(), json)
}

fn pem_der(path: &Path) -> Vec<u8> {
    pem::parse(std::fs::read_to_string(path).unwrap())
        .unwrap()
        .into_contents()
}

/// A QUIC client config trusting the fleet CA, with the device's certificate if given.
pub fn client_config(agent: &AgentConfig, with_certificate: bool) -> quinn::ClientConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from(pem_der(&agent.fleet.ca)))
        .unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots);
    let mut tls = if with_certificate {
        let cert = CertificateDer::from(pem_der(&agent.device.certificate));
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pem_der(&agent.device.key)));
        builder.with_client_auth_cert(vec![cert], key).unwrap()
    } else {
        builder.with_no_client_auth()
    };
    tls.alpn_protocols = vec![frame::ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    quinn::ClientConfig::new(Arc::new(crypto))
}

pub async fn connect_with(
    addr: SocketAddr,
    config: quinn::ClientConfig,
) -> Result<quinn::Connection, String> {
    let mut endpoint =
        quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).map_err(|e| e.to_string())?;
    endpoint.set_default_client_config(config);
    let connecting = endpoint
        .connect(addr, "localhost")
        .map_err(|e| e.to_string())?;
    tokio::time::timeout(Duration::from_secs(10), connecting)
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())
}

pub async fn connect(addr: SocketAddr, agent: &AgentConfig) -> Result<quinn::Connection, String> {
    connect_with(addr, client_config(agent, true)).await
}

/// Sends one request on a new stream; returns every response frame until the stream ends.
pub async fn request(
    connection: &quinn::Connection,
    request: &Request,
) -> Result<Vec<Response>, String> {
    let (mut send, mut recv) = connection.open_bi().await.map_err(|e| e.to_string())?;
    send.write_all(&frame::encode(request, MAX_FRAME_BYTES).unwrap())
        .await
        .map_err(|e| e.to_string())?;
    send.finish().map_err(|e| e.to_string())?;
    let bytes = tokio::time::timeout(Duration::from_secs(60), recv.read_to_end(256 << 20))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    let mut rest = &bytes[..];
    let mut out = Vec::new();
    while let Some((response, used)) =
        frame::decode::<Response>(rest, MAX_FRAME_BYTES).map_err(|e| e.to_string())?
    {
        out.push(response);
        rest = &rest[used..];
    }
    assert!(rest.is_empty(), "a partial frame at the end of the stream");
    Ok(out)
}

pub fn hello() -> Request {
    Request::Hello {
        protocol: PROTOCOL_VERSION,
        agent_version: "test".into(),
    }
}

/// MQTT options for client `id` of the coordinator's broker, over TLS: as the dev fleet's first
/// device, or as the coordinator itself (`as_coordinator`: it may publish anything).
pub fn mqtt_options(
    handle: &CoordinatorHandle,
    id: &str,
    as_coordinator: bool,
) -> rumqttc::MqttOptions {
    let fleet = handle.fleet_config.as_ref().unwrap().parent().unwrap();
    let (certificate, key) = if as_coordinator {
        (fleet.join("coordinator.crt"), fleet.join("coordinator.key"))
    } else {
        let agent = AgentConfig::load(handle.dev_agent_config.as_ref().unwrap()).unwrap();
        (agent.device.certificate, agent.device.key)
    };
    let roots = outpost_runtime::tls::roots(&fleet.join("ca.crt")).unwrap();
    let identity = outpost_runtime::tls::Identity::load(&certificate, &key).unwrap();
    let tls = outpost_runtime::tls::client_config(roots, identity, None).unwrap();
    let mut options = rumqttc::MqttOptions::new(id, handle.mqtt.host.clone(), handle.mqtt.port);
    options.set_max_packet_size(8 << 20, 8 << 20);
    options.set_transport(rumqttc::Transport::tls_with_config(
        rumqttc::TlsConfiguration::Rustls(Arc::new(tls)),
    ));
    options
}

/// An MQTT subscriber (the dev fleet's first device); returns the first message on `topic`
/// within 10 s.
pub async fn first_message(handle: &CoordinatorHandle, topic: &str) -> Vec<u8> {
    message_where(handle, topic, |_| true).await
}

/// An MQTT subscriber (the dev fleet's first device); returns the first message on `topic` that
/// `wanted` accepts, within 10 s.
pub async fn message_where(
    handle: &CoordinatorHandle,
    topic: &str,
    wanted: impl Fn(&[u8]) -> bool,
) -> Vec<u8> {
    let options = mqtt_options(handle, &format!("test-{}", rand_id()), false);
    let (client, mut events) = rumqttc::AsyncClient::new(options, 16);
    events.network_options.set_tcp_nodelay(true);
    client
        .subscribe(topic, rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let event = tokio::time::timeout_at(deadline, events.poll())
            .await
            .expect("no message within 10 s");
        if let Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) = event
            && p.topic == topic
            && wanted(&p.payload)
        {
            return p.payload.to_vec();
        }
    }
}

pub fn rand_id() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    u64::from(std::process::id()) << 20 | NEXT.fetch_add(1, Ordering::Relaxed)
}

pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}
