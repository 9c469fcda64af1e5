//! The embedded MQTT broker: rumqttd behind a TLS front of our own.
//!
//! rumqttd routes messages well but cannot guard its door: its TLS handshake runs inside its
//! accept loop (one client that opens a socket and sends nothing stops every new connection), it
//! reads a tenant from the certificate's organisation (ours has spaces, which it refuses), and it
//! has no revocation and no topic rules. So rumqttd listens on a loopback port of its own and
//! takes only connections that carry a secret made at start, and the front, on the configured
//! address, does the rest for every client:
//!
//! - TLS 1.3 with a client certificate that chains to the fleet CA, the handshake and the MQTT
//!   CONNECT each within [`HANDSHAKE_TIMEOUT`], at most `[mqtt] max_connections` at once;
//! - the identity from the certificate: the coordinator (its own certificate) or a device (the
//!   device id its certificate names); anything else is refused;
//! - the CONNECT rewritten: the client id is prefixed with the identity (no client can take over
//!   another identity's session) and the login is the front's secret;
//! - every packet a device sends checked against its rules before it is forwarded: it may publish
//!   only its own status topic (its last will too), subscribe only to manifest topics. A packet
//!   against the rules closes the connection. The coordinator's own client has no rules.
//!
//! What the broker sends back is copied through unread.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::BytesMut;
use outpost_shared::{Topic, topic};
use rumqttc::mqttbytes::v4::{Login, Packet};
use rumqttc::mqttbytes::{self, Error as MqttError};
use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};

use crate::error::CoordinatorError;
use crate::metrics::Metrics;

/// How long a client has for its TLS handshake, and then for its MQTT CONNECT.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The largest MQTT packet either side may send: a signed release and some room.
pub const MAX_PACKET_BYTES: usize = outpost_shared::signing::MAX_MANIFEST_BYTES + 64 * 1024;

/// The user name the front logs in to rumqttd with (its password is the secret made at start).
const FRONT_USER: &str = "outpost-front";

/// Who is on the other end of a connection, from its certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Identity {
    /// The coordinator's own client.
    Coordinator,
    /// A device of the fleet.
    Device(String),
}

impl Identity {
    fn name(&self) -> &str {
        match self {
            Identity::Coordinator => "coordinator",
            Identity::Device(id) => id,
        }
    }

    /// Why `packet` from this client may not pass, if it may not.
    fn refuses(&self, packet: &Packet) -> Option<String> {
        let Identity::Device(device) = self else {
            return None;
        };
        match packet {
            Packet::Publish(p) if !is_status_of(&p.topic, device) => Some(format!(
                "device {device} may publish only its own status, not {:?}",
                p.topic
            )),
            Packet::Subscribe(s) => {
                s.filters
                    .iter()
                    .find(|f| !is_manifest_filter(&f.path))
                    .map(|f| {
                        format!(
                            "device {device} may subscribe only to releases, not {:?}",
                            f.path
                        )
                    })
            }
            Packet::Connect(_) => Some("a second CONNECT".into()),
            _ => None,
        }
    }
}

fn is_status_of(name: &str, device: &str) -> bool {
    matches!(Topic::parse(name), Ok(Topic::DeviceStatus { device: d }) if d == device)
}

fn is_manifest_filter(filter: &str) -> bool {
    filter == topic::ALL_MANIFESTS || matches!(Topic::parse(filter), Ok(Topic::Manifest { .. }))
}

/// What the front needs.
#[derive(Debug, Clone)]
pub struct FrontSettings {
    /// The TLS server config (client certificates required, verified against the fleet CA).
    pub tls: Arc<rustls::ServerConfig>,
    /// The coordinator's own certificate: a client presenting it is the coordinator.
    pub coordinator_certificate: CertificateDer<'static>,
    /// Connections at once.
    pub max_connections: usize,
    /// Revoked devices: refused, and their open connections closed.
    pub revocations: Arc<crate::revocation::Revocations>,
}

/// Binds the embedded broker's address (before the fleet is loaded: a dev fleet names it).
pub async fn bind(listen: SocketAddr) -> Result<TcpListener, CoordinatorError> {
    TcpListener::bind(listen).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::AddrInUse => CoordinatorError::AddressInUse {
            what: "the embedded MQTT broker",
            addr: listen,
            hint: " (another MQTT broker? set [mqtt] external = \"HOST:PORT\" to use it, or [mqtt] listen to move the embedded one)",
        },
        _ => CoordinatorError::Network(format!("embedded MQTT broker on {listen}: {e}")),
    })
}

/// Starts the embedded broker: the front on `listener`, rumqttd behind it on a loopback port
/// of its own (returned). Runs until `shutdown` (the front; the rumqttd thread cannot be stopped
/// and ends with the process).
pub async fn start(
    listener: TcpListener,
    settings: FrontSettings,
    metrics: Arc<Metrics>,
    shutdown: watch::Receiver<bool>,
) -> Result<(tokio::task::JoinHandle<()>, SocketAddr), CoordinatorError> {
    let secret = secret()?;
    let inner = start_rumqttd(&secret, settings.max_connections)?;
    wait_listening(inner, &secret).await?;
    let front = Arc::new(Front {
        acceptor: tokio_rustls::TlsAcceptor::from(Arc::clone(&settings.tls)),
        coordinator: settings.coordinator_certificate,
        inner,
        secret,
        metrics,
        revocations: settings.revocations,
    });
    let slots = Arc::new(Semaphore::new(settings.max_connections));
    Ok((
        tokio::spawn(accept_loop(listener, front, slots, shutdown)),
        inner,
    ))
}

/// A random secret for the front's login to rumqttd.
fn secret() -> Result<String, CoordinatorError> {
    let mut bytes = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| CoordinatorError::Network("no randomness for the broker's secret".into()))?;
    Ok(outpost_shared::hex::encode(&bytes))
}

/// rumqttd's config: one MQTT 3.1.1 listener on `listen` taking the logins in `auth` (none:
/// anyone), room for `max_connections`, `connection_timeout_ms` for a CONNECT and
/// `next_connection_delay_ms` between accepts; every packet up to [`MAX_PACKET_BYTES`].
pub fn router_config(
    listen: SocketAddr,
    auth: Option<std::collections::HashMap<String, String>>,
    max_connections: usize,
    connection_timeout_ms: u16,
    next_connection_delay_ms: u64,
) -> rumqttd::Config {
    let settings = rumqttd::ServerSettings {
        name: "v4".into(),
        listen,
        tls: None,
        next_connection_delay_ms,
        connections: rumqttd::ConnectionSettings {
            connection_timeout_ms,
            max_payload_size: MAX_PACKET_BYTES,
            max_inflight_count: 100,
            auth,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    rumqttd::Config {
        id: 0,
        router: rumqttd::RouterConfig {
            max_connections: max_connections + 10,
            max_outgoing_packet_count: 200,
            max_segment_size: 100 * 1024 * 1024,
            max_segment_count: 10,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some(std::collections::HashMap::from([(
            "v4".to_owned(),
            settings,
        )])),
        v5: None,
        ws: None,
        cluster: None,
        console: None,
        bridge: None,
        prometheus: None,
        metrics: None,
    }
}

/// Starts rumqttd on a free loopback port on its own thread, taking only the front's login.
/// rumqttd cannot report a port-0 address, so the port is chosen (and checked free) here.
fn start_rumqttd(secret: &str, max_connections: usize) -> Result<SocketAddr, CoordinatorError> {
    let probe = std::net::TcpListener::bind(("127.0.0.1", 0))
        .map_err(|e| CoordinatorError::Network(format!("the MQTT router's port: {e}")))?;
    let addr = probe
        .local_addr()
        .map_err(|e| CoordinatorError::Network(e.to_string()))?;
    drop(probe);
    let auth = std::collections::HashMap::from([(FRONT_USER.to_owned(), secret.to_owned())]);
    let config = router_config(addr, Some(auth), max_connections, 10_000, 0);
    std::thread::Builder::new()
        .name("mqtt-router".into())
        .spawn(move || {
            let mut broker = rumqttd::Broker::new(config);
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "the embedded MQTT broker stopped");
            }
        })
        .map_err(|e| {
            CoordinatorError::Network(format!("cannot start the MQTT broker thread: {e}"))
        })?;
    Ok(addr)
}

/// Waits (up to 10 s) until rumqttd takes the front's login on `addr`: a CONNECT, its CONNACK,
/// a DISCONNECT (a bare probe of the port would make rumqttd log an error).
async fn wait_listening(addr: SocketAddr, secret: &str) -> Result<(), CoordinatorError> {
    let mut connect = rumqttc::mqttbytes::v4::Connect::new("outpost-front-probe");
    connect.login = Some(Login {
        username: FRONT_USER.into(),
        password: secret.to_owned(),
    });
    let mut hello = BytesMut::new();
    connect
        .write(&mut hello)
        .map_err(|e| CoordinatorError::Network(format!("the MQTT router's probe: {e:?}")))?;
    for _ in 0..500 {
        if let Ok(mut stream) = TcpStream::connect(addr).await {
            let mut ack = [0u8; 4];
            let answered = async {
                stream.write_all(&hello).await?;
                stream.read_exact(&mut ack).await?;
                stream.write_all(&[0xE0, 0x00]).await
            };
            if tokio::time::timeout(Duration::from_secs(2), answered)
                .await
                .is_ok_and(|r| r.is_ok())
                && ack[0] == 0x20
            {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Err(CoordinatorError::Network(format!(
        "the embedded MQTT broker did not start on {addr}"
    )))
}

/// How a client's connection ended, other than cleanly.
#[derive(Debug)]
enum Ended {
    /// Refused: no valid certificate, no CONNECT in time, or a packet against its rules
    /// (counted in `outpost_mqtt_refused_total`).
    Refused(String),
    /// Cut: the network, either peer going away.
    Broken(String),
}

struct Front {
    acceptor: tokio_rustls::TlsAcceptor,
    coordinator: CertificateDer<'static>,
    inner: SocketAddr,
    secret: String,
    metrics: Arc<Metrics>,
    revocations: Arc<crate::revocation::Revocations>,
}

/// The first wait after a failed `accept` (out of descriptors, say), and the longest.
const ACCEPT_BACKOFF: outpost_runtime::Backoff =
    outpost_runtime::Backoff::new(Duration::from_millis(10), Duration::from_secs(1));

async fn accept_loop(
    listener: TcpListener,
    front: Arc<Front>,
    slots: Arc<Semaphore>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff = ACCEPT_BACKOFF;
    // Connection tasks live in this set, so shutdown ends them all, and what they hold (the
    // revocation list's database among it) is let go before the coordinator says it stopped.
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            _ = shutdown.changed() => break,
            accepted = listener.accept() => accepted,
            Some(_) = connections.join_next() => continue,
        };
        let (stream, remote) = match accepted {
            Ok(a) => {
                backoff.succeed();
                a
            }
            Err(e) => {
                let delay = backoff.fail();
                tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "MQTT accept failed");
                tokio::time::sleep(delay).await;
                continue;
            }
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            front.metrics.mqtt_refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%remote, "the MQTT broker holds its limit of connections ([mqtt] max_connections); closing a new one");
            continue;
        };
        let front = Arc::clone(&front);
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            match front.serve(stream, shutdown).await {
                Ok(()) => {}
                Err(Ended::Refused(why)) => {
                    front.metrics.mqtt_refused.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%remote, why, "MQTT client refused");
                }
                Err(Ended::Broken(why)) => {
                    tracing::debug!(%remote, why, "MQTT connection ended");
                }
            }
            drop(slot);
        });
    }
    connections.shutdown().await;
}

impl Front {
    /// One client: TLS, identity, CONNECT, then packets both ways until either side ends.
    async fn serve(
        &self,
        stream: TcpStream,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), Ended> {
        let _ = stream.set_nodelay(true);
        let (tls, identity, from_client, connect) =
            self.admit(stream).await.map_err(Ended::Refused)?;
        let mut broker = TcpStream::connect(self.inner)
            .await
            .map_err(|e| Ended::Broken(format!("the MQTT router: {e}")))?;
        let _ = broker.set_nodelay(true);
        broker
            .write_all(&connect)
            .await
            .map_err(|e| Ended::Broken(format!("the MQTT router: {e}")))?;
        tracing::debug!(identity = identity.name(), "MQTT client connected");

        let mut from_client = from_client;
        let (mut broker_read, mut broker_write) = broker.into_split();
        let (mut client_read, mut client_write) = tokio::io::split(tls);
        let upstream = async {
            loop {
                let Some((packet, raw)) = next_packet(&mut client_read, &mut from_client)
                    .await
                    .map_err(Ended::Broken)?
                else {
                    return Ok(());
                };
                if let Some(why) = identity.refuses(&packet) {
                    return Err(Ended::Refused(why));
                }
                broker_write
                    .write_all(&raw)
                    .await
                    .map_err(|e| Ended::Broken(format!("the MQTT router: {e}")))?;
            }
        };
        let downstream = async {
            tokio::io::copy(&mut broker_read, &mut client_write)
                .await
                .map(|_| ())
                .map_err(|e| Ended::Broken(format!("to the client: {e}")))
        };
        let mut revocations = self.revocations.changes();
        let revoked = async {
            loop {
                if revocations.changed().await.is_err() {
                    return std::future::pending().await;
                }
                if let Identity::Device(device) = &identity
                    && self.revocations.is_revoked(device)
                {
                    return Err(Ended::Refused(format!("device {device} was revoked")));
                }
            }
        };
        let ended = tokio::select! {
            r = upstream => r,
            r = downstream => r,
            r = revoked => r,
            _ = shutdown.changed() => Ok(()),
        };
        let _ = client_write.shutdown().await;
        ended
    }

    /// The TLS handshake, the identity and the CONNECT (checked and rewritten, as bytes for
    /// the router), each in time; why not, otherwise.
    async fn admit(
        &self,
        stream: TcpStream,
    ) -> Result<
        (
            tokio_rustls::server::TlsStream<TcpStream>,
            Identity,
            BytesMut,
            BytesMut,
        ),
        String,
    > {
        let mut tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, self.acceptor.accept(stream))
            .await
            .map_err(|_| format!("no TLS handshake within {} s", HANDSHAKE_TIMEOUT.as_secs()))?
            .map_err(|e| format!("TLS: {e}"))?;
        let identity = {
            let (_, session) = tls.get_ref();
            let leaf = session
                .peer_certificates()
                .and_then(|c| c.first())
                .ok_or("no client certificate")?;
            self.identity(leaf)?
        };
        let mut from_client = BytesMut::with_capacity(4096);
        let connect =
            tokio::time::timeout(HANDSHAKE_TIMEOUT, next_packet(&mut tls, &mut from_client))
                .await
                .map_err(|_| {
                    format!("no MQTT CONNECT within {} s", HANDSHAKE_TIMEOUT.as_secs())
                })??;
        let Some((Packet::Connect(mut connect), _)) = connect else {
            return Err("the first packet is not a CONNECT".into());
        };
        if let (Identity::Device(device), Some(will)) = (&identity, &connect.last_will)
            && !is_status_of(&will.topic, device)
        {
            return Err(format!(
                "device {device}'s last will names {:?}, not its own status",
                will.topic
            ));
        }
        if connect.client_id.is_empty() || connect.client_id.contains(['+', '#', '$', '/', ':']) {
            // MQTT 3.1.1 (3.2.2.3): CONNACK with return code 2, identifier rejected, then close.
            let _ = tls.write_all(&CONNACK_IDENTIFIER_REJECTED).await;
            let _ = tls.flush().await;
            return Err(format!(
                "client id {:?} is empty or holds one of + # $ / :",
                connect.client_id
            ));
        }
        // Namespaced by identity: no client can take over another identity's session.
        connect.client_id = format!("{}:{}", identity.name(), connect.client_id);
        connect.login = Some(Login {
            username: FRONT_USER.into(),
            password: self.secret.clone(),
        });
        let mut rewritten = BytesMut::new();
        connect
            .write(&mut rewritten)
            .map_err(|e| format!("re-encoding the CONNECT: {e:?}"))?;
        Ok((tls, identity, from_client, rewritten))
    }

    fn identity(&self, leaf: &CertificateDer<'_>) -> Result<Identity, String> {
        if leaf.as_ref() == self.coordinator.as_ref() {
            return Ok(Identity::Coordinator);
        }
        let device = firmware_config::device_id_from_certificate(leaf)
            .map_err(|e| format!("the certificate names no device: {e}"))?;
        if self.revocations.is_revoked(device.as_str()) {
            return Err(format!("device {device} is revoked"));
        }
        Ok(Identity::Device(device.to_string()))
    }
}

/// A CONNACK refusing the client id (MQTT 3.1.1 return code 2, "identifier rejected").
const CONNACK_IDENTIFIER_REJECTED: [u8; 4] = [0x20, 0x02, 0x00, 0x02];

/// Reads from `stream` into `buffer` until one whole packet is there; returns it parsed, with
/// its bytes as they came, or `None` when the stream ends between packets.
async fn next_packet<R: tokio::io::AsyncRead + Unpin>(
    stream: &mut R,
    buffer: &mut BytesMut,
) -> Result<Option<(Packet, BytesMut)>, String> {
    loop {
        match mqttbytes::check(buffer.iter(), MAX_PACKET_BYTES) {
            Ok(header) => {
                let raw = buffer.split_to(header.frame_length());
                let packet = Packet::read(&mut raw.clone(), MAX_PACKET_BYTES)
                    .map_err(|e| format!("a malformed packet: {e:?}"))?;
                return Ok(Some((packet, raw)));
            }
            Err(MqttError::InsufficientBytes(_)) => {}
            Err(e) => return Err(format!("a malformed packet: {e:?}")),
        }
        buffer.reserve(4096);
        let read = stream
            .read_buf(buffer)
            .await
            .map_err(|e| format!("from the client: {e}"))?;
        if read == 0 {
            return if buffer.is_empty() {
                Ok(None)
            } else {
                Err("the connection ended inside a packet".into())
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_publish_their_own_status_and_subscribe_to_releases_only() {
        let device = Identity::Device("dev-0001".into());
        let publish = |topic: &str| {
            Packet::Publish(rumqttc::mqttbytes::v4::Publish::new(
                topic,
                rumqttc::QoS::AtLeastOnce,
                vec![],
            ))
        };
        let subscribe = |filter: &str| {
            Packet::Subscribe(rumqttc::mqttbytes::v4::Subscribe::new(
                filter,
                rumqttc::QoS::AtLeastOnce,
            ))
        };
        assert_eq!(
            device.refuses(&publish("outpost/v1/devices/dev-0001/status")),
            None
        );
        assert!(
            device
                .refuses(&publish("outpost/v1/devices/dev-0002/status"))
                .is_some()
        );
        assert!(
            device
                .refuses(&publish("outpost/v1/models/m/manifest"))
                .is_some()
        );
        assert_eq!(device.refuses(&subscribe(topic::ALL_MANIFESTS)), None);
        assert_eq!(
            device.refuses(&subscribe("outpost/v1/models/m/manifest")),
            None
        );
        assert!(device.refuses(&subscribe("outpost/v1/#")).is_some());
        assert!(
            device
                .refuses(&subscribe(topic::ALL_DEVICE_STATUS))
                .is_some()
        );
        assert_eq!(
            Identity::Coordinator.refuses(&publish("outpost/v1/models/m/manifest")),
            None
        );
    }
}
