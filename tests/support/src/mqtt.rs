//! An MQTT observer: a client of any broker (the embedded one, Mosquitto) that subscribes to
//! topics, hands over the messages published on them, and publishes what a test forges. Every
//! broker takes TLS only, with a certificate of the fleet: an observer is a device or the
//! coordinator of a provisioned (or dev) fleet ([`ClientIdentity`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use firmware_config::{AgentConfig, HostPort};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};

/// The files an MQTT client proves itself with: the CA the broker's certificate must chain to,
/// and a certificate of the fleet with its key.
#[derive(Debug, Clone)]
pub struct ClientIdentity {
    /// The broker's CA.
    pub ca: PathBuf,
    /// The client's certificate.
    pub certificate: PathBuf,
    /// Its key.
    pub key: PathBuf,
}

impl ClientIdentity {
    /// The device an agent config names.
    pub fn device(config: &AgentConfig) -> Self {
        Self {
            ca: config.broker_ca().to_owned(),
            certificate: config.device.certificate.clone(),
            key: config.device.key.clone(),
        }
    }

    /// The coordinator of the fleet provisioned in `fleet_dir` (`firmware-config provision`
    /// output, or a coordinator's dev fleet).
    pub fn coordinator(fleet_dir: &Path) -> Self {
        Self {
            ca: fleet_dir.join("ca.crt"),
            certificate: fleet_dir.join("coordinator.crt"),
            key: fleet_dir.join("coordinator.key"),
        }
    }

    /// The coordinator of an in-process coordinator's fleet (its dev fleet).
    pub fn coordinator_of(handle: &cloud_coordinator::CoordinatorHandle) -> Self {
        let config = handle
            .fleet_config
            .as_ref()
            .expect("the coordinator runs without a dev fleet: pass its fleet folder");
        Self::coordinator(config.parent().unwrap())
    }

    /// MQTT options for client `id` of `broker`, over TLS as this identity.
    pub fn options(&self, id: &str, broker: &HostPort) -> MqttOptions {
        let roots = outpost_runtime::tls::roots(&self.ca).unwrap();
        let identity = outpost_runtime::tls::Identity::load(&self.certificate, &self.key).unwrap();
        let tls = outpost_runtime::tls::client_config(roots, identity, None).unwrap();
        let mut options = MqttOptions::new(id, broker.host.clone(), broker.port);
        options.set_max_packet_size(8 << 20, 8 << 20);
        options.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(Arc::new(tls)),
        ));
        options
    }
}

/// How long an observer waits for a message.
pub const MESSAGE_WAIT: Duration = Duration::from_secs(10);

/// A connected MQTT client and its event loop, polled by the test.
pub struct MqttObserver {
    client: AsyncClient,
    events: EventLoop,
}

impl std::fmt::Debug for MqttObserver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttObserver").finish_non_exhaustive()
    }
}

impl MqttObserver {
    /// A client of `broker` named `id`, connecting as `identity` (packets up to 8 MiB, as
    /// manifests can be); it connects on the first wait.
    pub fn new(broker: &HostPort, id: &str, identity: &ClientIdentity) -> Self {
        let options = identity.options(id, broker);
        let (client, mut events) = AsyncClient::new(options, 16);
        events.network_options.set_tcp_nodelay(true);
        MqttObserver { client, events }
    }

    /// Subscribes to `topic` (QoS 1): a retained message there comes first.
    pub async fn subscribe(&self, topic: &str) {
        self.client
            .subscribe(topic, QoS::AtLeastOnce)
            .await
            .unwrap();
    }

    /// The payload of the next message on `topic`; fails the test after [`MESSAGE_WAIT`].
    pub async fn next_message(&mut self, topic: &str) -> Vec<u8> {
        self.next_message_where(topic, |_| true).await
    }

    /// The payload of the next message on `topic` that `wanted` accepts; fails the test after
    /// [`MESSAGE_WAIT`].
    pub async fn next_message_where(
        &mut self,
        topic: &str,
        wanted: impl Fn(&[u8]) -> bool,
    ) -> Vec<u8> {
        let deadline = tokio::time::Instant::now() + MESSAGE_WAIT;
        loop {
            let Ok(event) = tokio::time::timeout_at(deadline, self.events.poll()).await else {
                panic!("no message on {topic} within {MESSAGE_WAIT:?}");
            };
            if let Ok(Event::Incoming(Packet::Publish(p))) = event
                && p.topic == topic
                && wanted(&p.payload)
            {
                return p.payload.to_vec();
            }
        }
    }

    /// The payload of the next message on `topic` within `wait`, if one comes (for what must
    /// not arrive).
    pub async fn message_within(&mut self, topic: &str, wait: Duration) -> Option<Vec<u8>> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let Ok(event) = tokio::time::timeout_at(deadline, self.events.poll()).await else {
                return None;
            };
            if let Ok(Event::Incoming(Packet::Publish(p))) = event
                && p.topic == topic
            {
                return Some(p.payload.to_vec());
            }
        }
    }

    /// Polls until the broker acknowledges the connection (within [`MESSAGE_WAIT`]); why not,
    /// when it refuses or closes it.
    pub async fn connected(&mut self) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + MESSAGE_WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.events.poll()).await {
                Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => return Ok(()),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(e.to_string()),
                Err(_) => return Err("no CONNACK".into()),
            }
        }
    }

    /// Keeps the connection going on a task of its own; the client that remains publishes.
    pub fn into_publisher(self) -> AsyncClient {
        let mut events = self.events;
        tokio::spawn(async move { while events.poll().await.is_ok() {} });
        self.client
    }
}
