//! An MQTT observer: a plain client of any broker (the embedded one, Mosquitto) that subscribes
//! to topics, hands over the messages published on them, and publishes what a test forges.

use std::time::Duration;

use firmware_config::HostPort;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};

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
    /// A client of `broker` named `id` (packets up to 8 MiB, as manifests can be); it connects on
    /// the first wait.
    pub fn new(broker: &HostPort, id: &str) -> Self {
        let mut options = MqttOptions::new(id, broker.host.clone(), broker.port);
        options.set_max_packet_size(8 << 20, 8 << 20);
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

    /// Keeps the connection going on a task of its own; the client that remains publishes.
    pub fn into_publisher(self) -> AsyncClient {
        let mut events = self.events;
        tokio::spawn(async move { while events.poll().await.is_ok() {} });
        self.client
    }
}
