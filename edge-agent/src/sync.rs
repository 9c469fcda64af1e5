//! The agent's MQTT connection: the last will (an offline status, retained), the subscriptions
//! to its models' manifest topics on every (re)connect, manifests handed to the installer in the
//! order they come, the device status published retained. A lost connection is retried after a
//! jittered back-off (`outpost_runtime::Backoff`: 100 ms doubling to 5 s).

use std::sync::Arc;
use std::time::Duration;

use outpost_runtime::Backoff;
use outpost_shared::{Topic, topic};
use rumqttc::{AsyncClient, Event, EventLoop, LastWill, MqttOptions, Packet, QoS};
use tokio::sync::{mpsc, watch};

use crate::Context;

/// Reconnect delays: 100 ms after the first failure, doubling to 5 s, jittered.
const RECONNECT: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));

/// The TLS config of the agent's MQTT connection: the device's certificate, and the broker's
/// verified against `mqtt.ca` (or the fleet CA).
pub(crate) fn mqtt_tls(
    config: &firmware_config::AgentConfig,
    identity: outpost_runtime::tls::Identity,
) -> Result<rustls::ClientConfig, String> {
    let roots =
        outpost_runtime::tls::roots(config.broker_ca()).map_err(|e| format!("mqtt.ca: {e}"))?;
    outpost_runtime::tls::client_config(roots, identity, None).map_err(|e| e.to_string())
}

/// MQTT options for `broker` with the device's last will (offline status, retained), over TLS
/// with `tls`.
pub(crate) fn mqtt_options(
    ctx: &Context,
    broker: &firmware_config::HostPort,
    tls: Arc<rustls::ClientConfig>,
) -> MqttOptions {
    let id = ctx.config.device.id.to_string();
    let mut options = MqttOptions::new(
        format!("outpost-agent-{id}"),
        broker.host.clone(),
        broker.port,
    );
    options.set_keep_alive(Duration::from_secs(15));
    let limit = outpost_shared::signing::MAX_MANIFEST_BYTES + 64 * 1024;
    options.set_max_packet_size(limit, limit);
    options.set_transport(rumqttc::Transport::tls_with_config(
        rumqttc::TlsConfiguration::Rustls(tls),
    ));
    if let Some(will) = last_will(ctx) {
        options.set_last_will(will);
    }
    options
}

/// The last will of the signer's current session: the device offline, retained.
fn last_will(ctx: &Context) -> Option<LastWill> {
    let topic = Topic::device_status(ctx.config.device.id.as_str()).ok()?;
    match ctx.signer.will() {
        Ok(offline) => Some(LastWill::new(topic.name(), offline, QoS::AtLeastOnce, true)),
        Err(e) => {
            tracing::warn!(error = %e, "could not sign the last will");
            None
        }
    }
}

/// Bytes of manifests waiting for the installer at once: two of the largest a release may be
/// ([`outpost_shared::signing::MAX_MANIFEST_BYTES`]), or thousands of typical few-KiB ones.
/// Past it a manifest is dropped with a warning; its retained copy comes again on reconnect.
pub(crate) const MANIFEST_QUEUE_BYTES: usize = 2 * outpost_shared::signing::MAX_MANIFEST_BYTES;

/// Manifests waiting for the installer at once, whatever their size.
pub(crate) const MANIFEST_QUEUE_LEN: usize = 256;

/// A manifest on its way to the installer; its bytes count against the queue's until dropped.
#[derive(Debug)]
pub(crate) struct Queued {
    pub(crate) payload: Vec<u8>,
    _bytes: tokio::sync::OwnedSemaphorePermit,
}

/// The sending side of the manifest queue, bounded in count and in bytes.
#[derive(Debug, Clone)]
pub(crate) struct ManifestSender {
    tx: mpsc::Sender<Queued>,
    bytes: Arc<tokio::sync::Semaphore>,
}

/// The manifest queue between the MQTT loop and the installer.
pub(crate) fn manifest_queue() -> (ManifestSender, mpsc::Receiver<Queued>) {
    let (tx, rx) = mpsc::channel(MANIFEST_QUEUE_LEN);
    let bytes = Arc::new(tokio::sync::Semaphore::new(MANIFEST_QUEUE_BYTES));
    (ManifestSender { tx, bytes }, rx)
}

impl ManifestSender {
    /// Queues `payload`, or says why not: the queue holds as many manifests or bytes as it may.
    pub(crate) fn offer(&self, payload: &[u8]) -> Result<(), &'static str> {
        let n = u32::try_from(payload.len().max(1)).map_err(|_| "the manifest is too large")?;
        let permit = Arc::clone(&self.bytes)
            .try_acquire_many_owned(n)
            .map_err(|_| "the manifest queue holds its limit of bytes")?;
        self.tx
            .try_send(Queued {
                payload: payload.to_vec(),
                _bytes: permit,
            })
            .map_err(|_| "the manifest queue holds its limit of manifests")
    }
}

/// How long after a refused subscription it is asked for again.
const RESUBSCRIBE: Duration = Duration::from_secs(1);

/// Subscribes to the manifests of the models the device follows (every model's by default).
async fn subscribe(ctx: &Context, client: &AsyncClient) {
    let filters: Vec<String> = if ctx.config.sync.models.is_empty() {
        vec![topic::ALL_MANIFESTS.to_owned()]
    } else {
        ctx.config
            .sync
            .models
            .iter()
            .filter_map(|m| Topic::manifest(m).ok())
            .map(|t| t.name())
            .collect()
    };
    for filter in filters {
        if let Err(e) = client.subscribe(filter, QoS::AtLeastOnce).await {
            tracing::warn!(error = %e, "could not subscribe");
        }
    }
}

/// Polls the MQTT event loop: subscribes on every (re)connect, hands manifests to the installer.
/// A failed connection moves on to the next of the configured brokers (`[mqtt] broker`, then
/// `fallbacks`, round and round), with `tls` for each.
pub(crate) async fn run_mqtt(
    ctx: Arc<Context>,
    client: AsyncClient,
    mut events: EventLoop,
    tls: Arc<rustls::ClientConfig>,
    manifests: ManifestSender,
    mut shutdown: watch::Receiver<bool>,
) {
    events.network_options.set_tcp_nodelay(true);
    let brokers: Vec<firmware_config::HostPort> = ctx.config.mqtt.brokers().cloned().collect();
    let mut current = 0usize;
    let mut backoff = if ctx.config.mqtt.reconnect_jitter {
        RECONNECT
    } else {
        RECONNECT.without_jitter()
    };
    loop {
        let event = tokio::select! {
            _ = shutdown.changed() => return,
            event = events.poll() => event,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                crate::counters::Counters::count(&ctx.counters.broker_connects);
                // Forgotten only once the connection proves stable (a broker that accepts and
                // drops at once must not be retried at the shortest delay forever).
                backoff.connected();
                if let Ok(mut e) = ctx.broker_error.lock() {
                    *e = None;
                }
                // What was published while the connection was down: ask over QUIC too.
                ctx.poll_releases.notify_one();
                let (client, ctx) = (client.clone(), ctx.clone());
                // Subscribing and publishing wait on this loop: do them from another task.
                tokio::spawn(async move {
                    subscribe(&ctx, &client).await;
                    publish_status(&ctx, &client).await;
                });
            }
            // A broker may refuse a subscription for a while (a NATS cluster electing the
            // leader of its session store after losing a node): ask again, and over QUIC
            // meanwhile.
            Ok(Event::Incoming(Packet::SubAck(ack)))
                if ack
                    .return_codes
                    .iter()
                    .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure)) =>
            {
                tracing::warn!("the MQTT broker refused a subscription; subscribing again");
                ctx.poll_releases.notify_one();
                let (client, ctx) = (client.clone(), ctx.clone());
                tokio::spawn(async move {
                    tokio::time::sleep(RESUBSCRIBE).await;
                    subscribe(&ctx, &client).await;
                });
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                crash_point!("sync.manifest_received");
                if matches!(Topic::parse(&p.topic), Ok(Topic::Manifest { .. }))
                    && let Err(why) = manifests.offer(&p.payload)
                {
                    tracing::warn!(topic = %p.topic, bytes = p.payload.len(), why, "manifest dropped; the retained copy comes again on reconnect");
                }
            }
            Ok(_) => {}
            Err(e) => {
                let delay = backoff.fail();
                let broker = brokers[current].clone();
                // The next connection is a new session, with a last will of its own, to the
                // next broker of the list.
                ctx.signer.new_session();
                if brokers.len() > 1 {
                    current = (current + 1) % brokers.len();
                    events.mqtt_options = mqtt_options(&ctx, &brokers[current], tls.clone());
                } else if let Some(will) = last_will(&ctx) {
                    events.mqtt_options.set_last_will(will);
                }
                let why = format!("the MQTT broker {broker}: {e}");
                if let Ok(mut slot) = ctx.broker_error.lock() {
                    if slot.as_deref() != Some(why.as_str()) {
                        tracing::warn!(error = %e, %broker, "MQTT connection failed; retrying");
                    }
                    *slot = Some(why);
                }
                tracing::debug!(error = %e, failures = backoff.failures(), ?delay, "MQTT connection failed; retrying");
                tokio::select! {
                    _ = shutdown.changed() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

/// Publishes the status again for the models' recent service: every `[sync] health_interval_s`
/// when calls were served since the last time, and once more after, so the figures of a model
/// that stopped being called slide out. Calls are coalesced: at most one status per interval
/// comes from here, however many calls there are.
pub(crate) async fn publish_health(
    ctx: Arc<Context>,
    client: AsyncClient,
    mut shutdown: watch::Receiver<bool>,
) {
    let every = ctx.config.sync.health_interval();
    let mut showing = false;
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let models = ctx.models();
        ctx.health
            .retain(|m| models.iter().any(|(name, _)| name == m));
        let served = ctx.health.take_changed();
        if served || showing {
            publish_status(&ctx, &client).await;
            showing = served;
        }
    }
}

/// Asks the coordinator for the current releases over QUIC, at start, after every MQTT
/// (re)connect and every `sync.release_poll_s` (jittered by half either way), and queues them
/// for the installer exactly as if MQTT had delivered them: a release hidden from the broker, or
/// a broker that is down, does not keep a device from it.
pub(crate) async fn poll_releases(
    ctx: Arc<Context>,
    manifests: ManifestSender,
    mut shutdown: watch::Receiver<bool>,
) {
    let every = Duration::from_secs(ctx.config.sync.release_poll_s.max(1));
    loop {
        match ctx.offload.releases(ctx.config.sync.models.clone()).await {
            Ok(releases) => {
                tracing::debug!(count = releases.len(), "releases from the coordinator");
                for (model, signed) in releases {
                    if let Err(why) = manifests.offer(&signed) {
                        tracing::warn!(model, why, "release dropped; asked again at the next poll");
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "could not ask the coordinator for releases"),
        }
        let wait = every.mul_f64(outpost_runtime::backoff::jitter());
        tokio::select! {
            _ = shutdown.changed() => return,
            () = tokio::time::sleep(wait) => {}
            () = ctx.poll_releases.notified() => {}
        }
    }
}

/// Publishes the device's status, retained.
pub(crate) async fn publish_status(ctx: &Context, client: &AsyncClient) {
    let status = ctx.status();
    let Ok(topic) = Topic::device_status(&status.device_id) else {
        return;
    };
    match ctx.signer.sign(&status) {
        Ok(bytes) => {
            if let Err(e) = client
                .publish(topic.name(), QoS::AtLeastOnce, true, bytes)
                .await
            {
                tracing::debug!(error = %e, "could not publish status");
            }
        }
        Err(e) => tracing::warn!(error = %e, "could not sign the status"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_manifest_queue_is_bounded_in_bytes_and_count() {
        let (tx, mut rx) = manifest_queue();
        let big = vec![0u8; outpost_shared::signing::MAX_MANIFEST_BYTES - 1];
        tx.offer(&big).unwrap();
        tx.offer(&big).unwrap();
        let e = tx.offer(&big).unwrap_err();
        assert!(e.contains("bytes"), "{e}");
        // Taken and dropped by the installer: its bytes free.
        drop(rx.recv().await.unwrap());
        tx.offer(&big).unwrap();
        while rx.try_recv().is_ok() {}
        // Small ones: the count bounds them.
        for _ in 0..MANIFEST_QUEUE_LEN {
            tx.offer(b"m").unwrap();
        }
        let e = tx.offer(b"m").unwrap_err();
        assert!(e.contains("manifests"), "{e}");
    }
}
