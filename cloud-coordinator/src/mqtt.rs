//! The coordinator's MQTT client (TLS, with its certificate), which publishes signed manifests
//! retained with QoS 1 and keeps the fleet view from device status. The embedded broker is in
//! [`crate::broker`].
//!
//! A fresh broker holds no retained messages, so every current release is published again each
//! time the client (re)connects.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use firmware_config::HostPort;
use outpost_runtime::Backoff;
use outpost_shared::{DeviceStatus, SignedStatus, StatusOrder, Topic, topic};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use tokio::sync::watch;

use crate::registry::Registry;

/// A device's last status, as its signature vouched for it, and where it stood in its output.
#[derive(Debug, Clone)]
pub struct Certified {
    /// The status.
    pub status: DeviceStatus,
    /// Its place, so a replayed older one is told apart.
    pub order: StatusOrder,
}

/// Devices by id, with their last certified status.
pub type FleetView = Arc<Mutex<BTreeMap<String, Certified>>>;

/// What the MQTT loop needs to judge device statuses.
#[derive(Debug, Clone)]
pub struct StatusCheck {
    /// Checks signatures and certificates.
    pub verifier: crate::trust::StatusVerifier,
    /// Counts what it ignores.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Devices the fleet view holds at most (`[mqtt] max_devices`).
    pub max_devices: usize,
    /// Revoked devices, whose statuses are ignored.
    pub revocations: Arc<crate::revocation::Revocations>,
}

/// The coordinator's MQTT client.
#[derive(Clone, Debug)]
pub struct Announcer {
    client: AsyncClient,
}

impl Announcer {
    /// Connects to the first of `brokers` over TLS with `tls` (retrying in the background, on
    /// the next broker of the list after each failure) and starts the event loop task.
    pub fn start(
        brokers: Vec<HostPort>,
        tls: rustls::ClientConfig,
        registry: Arc<Registry>,
        fleet: FleetView,
        check: StatusCheck,
        shutdown: watch::Receiver<bool>,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let link = Link {
            id: format!("outpost-coordinator-{}", std::process::id()),
            brokers,
            tls: Arc::new(tls),
        };
        let (client, mut events) = AsyncClient::new(link.options(0), 256);
        events.network_options.set_tcp_nodelay(true);
        let announcer = Announcer { client };
        let task = tokio::spawn(run_events(
            events,
            link,
            announcer.clone(),
            registry,
            fleet,
            check,
            shutdown,
        ));
        (announcer, task)
    }

    /// Publishes a model's signed manifest, retained, QoS 1.
    pub async fn announce(&self, model: &str, signed: Vec<u8>) -> Result<(), String> {
        let topic = Topic::manifest(model).map_err(|e| e.to_string())?.name();
        self.client
            .publish(topic, QoS::AtLeastOnce, true, signed)
            .await
            .map_err(|e| e.to_string())
    }
}

/// What the coordinator's MQTT connection is made of: its client id, the brokers in the order
/// they are tried (`[mqtt] external`, then `fallbacks`; or the embedded one) and its TLS.
struct Link {
    id: String,
    brokers: Vec<HostPort>,
    tls: Arc<rustls::ClientConfig>,
}

impl Link {
    /// The options to connect to broker `index` (of `brokers`, wrapping).
    fn options(&self, index: usize) -> MqttOptions {
        let broker = &self.brokers[index % self.brokers.len().max(1)];
        let mut options = MqttOptions::new(self.id.clone(), broker.host.clone(), broker.port);
        options.set_keep_alive(Duration::from_secs(15));
        let limit = outpost_shared::signing::MAX_MANIFEST_BYTES + 64 * 1024;
        options.set_max_packet_size(limit, limit);
        options.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(self.tls.clone()),
        ));
        options
    }
}

/// How long after a refused subscription it is asked for again.
const RESUBSCRIBE: Duration = Duration::from_secs(1);

/// The first wait after the broker connection fails, and the longest.
const RECONNECT_START: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(5);

async fn run_events(
    mut events: EventLoop,
    link: Link,
    announcer: Announcer,
    registry: Arc<Registry>,
    fleet: FleetView,
    check: StatusCheck,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff = Backoff::new(RECONNECT_START, RECONNECT_MAX);
    let mut current = 0usize;
    // Announcing tasks live here, so shutdown ends them (and the registry they hold).
    let mut announcing = tokio::task::JoinSet::new();
    loop {
        let event = tokio::select! {
            _ = shutdown.changed() => {
                let _ = announcer.client.try_disconnect();
                announcing.shutdown().await;
                return;
            }
            event = events.poll() => event,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                // Forgotten only once the connection proves stable (a broker that accepts and
                // drops at once must not be retried at the shortest delay forever).
                backoff.connected();
                tracing::info!("connected to the MQTT broker; announcing every release");
                // Publishing waits for the event loop; do it from another task.
                let (announcer, registry) = (announcer.clone(), registry.clone());
                while announcing.try_join_next().is_some() {}
                announcing.spawn(async move {
                    for filter in [topic::ALL_DEVICE_STATUS, topic::ALL_MANIFESTS] {
                        if let Err(e) = announcer.client.subscribe(filter, QoS::AtLeastOnce).await {
                            tracing::warn!(error = %e, filter, "could not subscribe");
                        }
                    }
                    // A replica on a shared store first takes over what the others published
                    // meanwhile, so it never announces an older release over a newer one.
                    let follower = registry.clone();
                    match tokio::task::spawn_blocking(move || follower.follow_shared()).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => tracing::warn!(error = %e, "could not read the shared store"),
                        Err(e) => tracing::warn!(error = %e, "reading the shared store failed"),
                    }
                    match registry.signed_manifests() {
                        Ok(all) => {
                            for (model, signed) in all {
                                if let Err(e) = announcer.announce(&model, signed).await {
                                    tracing::warn!(model, error = %e, "could not announce");
                                }
                            }
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "could not read the registry to announce")
                        }
                    }
                });
            }
            // A broker may refuse a subscription for a while (a NATS cluster electing the
            // leader of its session store after losing a node): ask again, or no status would
            // ever arrive on this connection.
            Ok(Event::Incoming(Packet::SubAck(ack)))
                if ack
                    .return_codes
                    .iter()
                    .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure)) =>
            {
                tracing::warn!(
                    retry_in_ms = RESUBSCRIBE.as_millis() as u64,
                    "the MQTT broker refused a subscription; subscribing again"
                );
                let announcer = announcer.clone();
                while announcing.try_join_next().is_some() {}
                announcing.spawn(async move {
                    tokio::time::sleep(RESUBSCRIBE).await;
                    for filter in [topic::ALL_DEVICE_STATUS, topic::ALL_MANIFESTS] {
                        if let Err(e) = announcer.client.subscribe(filter, QoS::AtLeastOnce).await {
                            tracing::warn!(error = %e, filter, "could not subscribe");
                        }
                    }
                });
            }
            Ok(Event::Incoming(Packet::Publish(p))) => match Topic::parse(&p.topic) {
                Ok(Topic::DeviceStatus { device }) => {
                    if let Err(why) = certify(&check, &fleet, &device, &p.payload) {
                        check
                            .metrics
                            .status_rejected
                            .fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(device, why, "device status ignored");
                    }
                }
                // The broker's copy of a release (retained) must be the current one: one that
                // was cleared or replaced is announced again, unless a replica on a shared
                // store published a newer one (taken over here within its poll interval).
                Ok(Topic::Manifest { model }) => match registry.signed_manifest(&model) {
                    Ok(Some(current))
                        if current != p.payload.as_ref()
                            && registry.is_newer_release(&model, &p.payload) =>
                    {
                        tracing::debug!(
                            model,
                            "the broker holds a newer release of another replica"
                        );
                    }
                    Ok(Some(current)) if current != p.payload.as_ref() => {
                        check
                            .metrics
                            .releases_reasserted
                            .fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(
                            model,
                            "the broker's release was cleared or replaced; announcing it again"
                        );
                        let announcer = announcer.clone();
                        while announcing.try_join_next().is_some() {}
                        announcing.spawn(async move {
                            if let Err(e) = announcer.announce(&model, current).await {
                                tracing::warn!(model, error = %e, "could not announce");
                            }
                        });
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(model, error = %e, "could not read the registry"),
                },
                _ => {}
            },
            Ok(_) => {}
            Err(e) => {
                let delay = backoff.fail();
                let broker = link.brokers.get(current).map(ToString::to_string);
                tracing::warn!(error = %e, broker, retry_in_ms = delay.as_millis() as u64, "MQTT connection failed");
                if link.brokers.len() > 1 {
                    current = (current + 1) % link.brokers.len();
                    events.mqtt_options = link.options(current);
                }
                tokio::select! {
                    _ = shutdown.changed() => {
                        announcing.shutdown().await;
                        return;
                    }
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

/// Takes `payload`, published on device `device`'s status topic, into the fleet view when its
/// signature, certificate and names hold and it is newer than the status held; why not,
/// otherwise (nothing changes then).
fn certify(
    check: &StatusCheck,
    fleet: &FleetView,
    device: &str,
    payload: &[u8],
) -> Result<(), String> {
    if payload.is_empty() {
        return Err("an empty status (a cleared topic) says nothing".into());
    }
    let signed =
        SignedStatus::from_cbor(payload).map_err(|e| format!("not a signed status: {e}"))?;
    let (status, order) = check.verifier.verify(device, &signed)?;
    if check.revocations.is_revoked(device) {
        return Err(format!("device {device} is revoked"));
    }
    let mut fleet = fleet
        .lock()
        .map_err(|_| "the fleet view is unavailable".to_owned())?;
    match fleet.get(device) {
        Some(held) if !order.follows(&held.order) => {
            return Err(format!(
                "older than the status held (session {:x} #{} at {}, held session {:x} #{} at {})",
                order.session,
                order.seq,
                order.updated_at,
                held.order.session,
                held.order.seq,
                held.order.updated_at
            ));
        }
        Some(_) => {}
        None if fleet.len() >= check.max_devices => {
            return Err(format!(
                "the fleet view is full ([mqtt] max_devices = {})",
                check.max_devices
            ));
        }
        None => {}
    }
    fleet.insert(device.to_owned(), Certified { status, order });
    Ok(())
}

/// Keeps every current release fresh: at start and then every quarter of the release TTL (at
/// most hourly), signs again the releases with less than half their time left and announces
/// them, until `shutdown`.
pub async fn keep_releases_fresh(
    registry: Arc<Registry>,
    announcer: Announcer,
    mut shutdown: watch::Receiver<bool>,
) {
    let every = Duration::from_secs((registry.release_ttl() / 4).clamp(1, 3600));
    loop {
        let registry_ = Arc::clone(&registry);
        match tokio::task::spawn_blocking(move || registry_.refresh()).await {
            Ok(Ok(refreshed)) => {
                for (model, signed) in refreshed {
                    tracing::info!(model, "release signed again before it expires");
                    if let Err(e) = announcer.announce(&model, signed).await {
                        tracing::warn!(model, error = %e, "could not announce the fresh release");
                    }
                }
            }
            Ok(Err(e)) => tracing::error!(error = %e, "could not sign releases again"),
            Err(e) => tracing::error!(error = %e, "the release refresh failed"),
        }
        tokio::select! {
            _ = shutdown.changed() => return,
            () = tokio::time::sleep(every) => {}
        }
    }
}
