//! The QUIC service for agents: one bidirectional stream per request (`Hello`, `GetChunks`,
//! `Infer`), framed as length-prefixed CBOR. Only devices with a certificate from the fleet CA
//! get past the handshake; each connection is identified by the device id in its certificate.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outpost_shared::frame::{self, HEADER_BYTES, MAX_FRAME_BYTES, PROTOCOL_VERSION};
use outpost_shared::{ErrorKind, Request, Response};
use rustls::pki_types::CertificateDer;
use tokio::sync::watch;

use crate::gateway::Gateway;
use crate::metrics::Metrics;
use crate::registry::Registry;

/// What the QUIC service needs.
#[derive(Clone, Debug)]
pub struct Service {
    /// The registry (chunks).
    pub registry: Arc<Registry>,
    /// Offloaded calls: rate limits, then a backend or the worker pool.
    pub gateway: Gateway,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Open connections per device, held to [`MAX_CONNECTIONS_PER_DEVICE`].
    pub connections: Arc<DeviceConnections>,
    /// How long a stream may take to send its request (`quic.request_timeout_s`); a stalled one
    /// is answered with an error and dropped, freeing its slot.
    pub request_timeout: Duration,
    /// Revoked devices: refused, and their open connections closed.
    pub revocations: Arc<crate::revocation::Revocations>,
}

/// Connections one device may hold open at once. An agent needs one; past the cap the device's
/// oldest connection is closed for the new one, so a device that restarts (or crashes) again
/// and again is never locked out by its own dead connections waiting for their idle timeout,
/// and a device certificate copied onto many machines still holds no more than this many.
pub const MAX_CONNECTIONS_PER_DEVICE: usize = 4;

/// Streams one connection may have open at once (a QUIC transport limit: the peer cannot open
/// more until some finish).
pub const MAX_STREAMS_PER_CONNECTION: u32 = 64;

/// The open connections of each device, oldest first.
#[derive(Debug, Default)]
pub struct DeviceConnections {
    open: Mutex<HashMap<String, Vec<(u64, quinn::Connection)>>>,
    next: std::sync::atomic::AtomicU64,
}

impl DeviceConnections {
    /// Counts `connection` for `device`, closing the device's oldest connection when it already
    /// holds [`MAX_CONNECTIONS_PER_DEVICE`]; the slot ends when dropped.
    fn enter(self: &Arc<Self>, device: &str, connection: &quinn::Connection) -> ConnectionSlot {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut open) = self.open.lock() {
            let held = open.entry(device.to_owned()).or_default();
            while held.len() >= MAX_CONNECTIONS_PER_DEVICE {
                let (_, oldest) = held.remove(0);
                tracing::info!(device, remote = %oldest.remote_address(), "closing the device's oldest connection for its new one");
                oldest.close(
                    quinn::VarInt::from_u32(2),
                    format!(
                        "replaced: device {device} opened more than {MAX_CONNECTIONS_PER_DEVICE} connections"
                    )
                    .as_bytes(),
                );
            }
            held.push((id, connection.clone()));
        }
        ConnectionSlot {
            connections: Arc::clone(self),
            device: device.to_owned(),
            id,
        }
    }
}

/// One open connection of a device, counted until dropped.
struct ConnectionSlot {
    connections: Arc<DeviceConnections>,
    device: String,
    id: u64,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        if let Ok(mut open) = self.connections.open.lock()
            && let Some(held) = open.get_mut(&self.device)
        {
            held.retain(|(id, _)| *id != self.id);
            if held.is_empty() {
                open.remove(&self.device);
            }
        }
    }
}

/// Accepts connections until shutdown.
pub async fn serve(
    endpoint: quinn::Endpoint,
    service: Service,
    mut shutdown: watch::Receiver<bool>,
) {
    // Connection tasks live in this set, so shutdown ends them all (and what they hold).
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let incoming = tokio::select! {
            _ = shutdown.changed() => break,
            incoming = endpoint.accept() => incoming,
            Some(_) = connections.join_next() => continue,
        };
        let Some(incoming) = incoming else { break };
        let service = service.clone();
        connections.spawn(async move {
            let remote = incoming.remote_address();
            match incoming.await {
                Ok(connection) => serve_connection(connection, service).await,
                Err(e) => tracing::info!(%remote, error = %e, "refused a QUIC connection"),
            }
        });
    }
    endpoint.close(quinn::VarInt::from_u32(0), b"coordinator shutting down");
    connections.shutdown().await;
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), endpoint.wait_idle()).await;
}

fn device_of(connection: &quinn::Connection) -> Option<String> {
    let certs = connection
        .peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?;
    let first = certs.first()?;
    firmware_config::device_id_from_certificate(first)
        .ok()
        .map(|id| id.to_string())
}

async fn serve_connection(connection: quinn::Connection, service: Service) {
    let Some(device) = device_of(&connection) else {
        tracing::warn!(remote = %connection.remote_address(), "certificate names no device; closing");
        connection.close(quinn::VarInt::from_u32(1), b"certificate names no device");
        return;
    };
    if service.revocations.is_revoked(&device) {
        tracing::warn!(device, remote = %connection.remote_address(), "refused a revoked device");
        connection.close(quinn::VarInt::from_u32(4), b"revoked");
        return;
    }
    let mut revoked = service.revocations.changes();
    let _slot = service.connections.enter(&device, &connection);
    tracing::info!(device, remote = %connection.remote_address(), "device connected");
    service
        .metrics
        .connected_devices
        .fetch_add(1, Ordering::Relaxed);
    // Dropped, aborting its streams, when this connection's task ends or is aborted.
    let mut streams = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            accepted = connection.accept_bi() => accepted,
            Ok(()) = revoked.changed() => {
                if service.revocations.is_revoked(&device) {
                    tracing::warn!(device, "device revoked; closing its connection");
                    connection.close(quinn::VarInt::from_u32(4), b"revoked");
                    break;
                }
                continue;
            }
        };
        match accepted {
            Ok((send, recv)) => {
                while streams.try_join_next().is_some() {}
                let (service, device) = (service.clone(), device.clone());
                streams.spawn(async move {
                    if let Err(e) = serve_stream(send, recv, &service, &device).await {
                        tracing::debug!(device, error = %e, "stream ended early");
                    }
                });
            }
            Err(e) => {
                tracing::info!(device, reason = %e, "device disconnected");
                break;
            }
        }
    }
    service
        .metrics
        .connected_devices
        .fetch_sub(1, Ordering::Relaxed);
}

async fn serve_stream(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    service: &Service,
    device: &str,
) -> Result<(), String> {
    let limit = service.request_timeout;
    let request = match tokio::time::timeout(limit, read_request(&mut recv)).await {
        Ok(r) => r,
        Err(_) => Err(format!(
            "the request did not arrive within {} s (quic.request_timeout_s)",
            limit.as_secs()
        )),
    };
    let request = match request {
        Ok(r) => r,
        Err(message) => {
            write(
                &mut send,
                &Response::Error {
                    kind: ErrorKind::BadRequest,
                    message,
                },
            )
            .await?;
            return send.finish().map_err(|e| e.to_string());
        }
    };
    match request {
        Request::Hello { protocol, .. } => {
            let response = if protocol == PROTOCOL_VERSION {
                Response::Hello {
                    protocol: PROTOCOL_VERSION,
                    coordinator_version: env!("CARGO_PKG_VERSION").into(),
                }
            } else {
                Response::Error {
                    kind: ErrorKind::UnsupportedProtocol,
                    message: format!(
                        "protocol {protocol} is not supported; this coordinator speaks {PROTOCOL_VERSION}"
                    ),
                }
            };
            write(&mut send, &response).await?;
        }
        Request::Releases { models } => match service.registry.signed_manifests() {
            Ok(all) => {
                for (model, signed) in all {
                    if models.is_empty() || models.contains(&model) {
                        write(&mut send, &Response::Release { model, signed }).await?;
                    }
                }
            }
            Err(e) => {
                let response = Response::Error {
                    kind: ErrorKind::Internal,
                    message: format!("the registry: {e}"),
                };
                write(&mut send, &response).await?;
            }
        },
        Request::GetChunks { ids } if ids.len() > frame::MAX_CHUNKS_PER_REQUEST => {
            let response = Response::Error {
                kind: ErrorKind::BadRequest,
                message: format!(
                    "{} chunk ids in one request; at most {} are served per request",
                    ids.len(),
                    frame::MAX_CHUNKS_PER_REQUEST
                ),
            };
            write(&mut send, &response).await?;
        }
        Request::GetChunks { ids } => {
            for id in ids {
                let registry = service.registry.clone();
                let data = tokio::task::spawn_blocking(move || registry.chunk(&id))
                    .await
                    .map_err(|e| e.to_string())?;
                let response = match data {
                    Some(data) => {
                        service
                            .metrics
                            .chunks_served
                            .fetch_add(1, Ordering::Relaxed);
                        service
                            .metrics
                            .chunk_bytes_served
                            .fetch_add(data.len() as u64, Ordering::Relaxed);
                        Response::Chunk { id, data }
                    }
                    None => Response::ChunkMissing { id },
                };
                write(&mut send, &response).await?;
            }
        }
        Request::Infer {
            model,
            version,
            inputs,
            ..
        } => {
            let response = service.gateway.infer(device, model, version, inputs).await;
            write(&mut send, &response).await?;
        }
    }
    send.finish().map_err(|e| e.to_string())
}

async fn read_request(recv: &mut quinn::RecvStream) -> Result<Request, String> {
    let mut header = [0u8; HEADER_BYTES];
    recv.read_exact(&mut header)
        .await
        .map_err(|e| format!("could not read the frame header: {e}"))?;
    let len = frame::body_len(header, MAX_FRAME_BYTES).map_err(|e| e.to_string())?;
    // Read as it arrives, not into a buffer of the size the header claims: memory follows the
    // bytes the peer really sent (bounded by the connection's flow-control window).
    let body = recv
        .read_to_end(len)
        .await
        .map_err(|e| format!("could not read the frame body: {e}"))?;
    if body.len() != len {
        return Err(format!(
            "the frame header announced {len} bytes but the stream ended after {}",
            body.len()
        ));
    }
    frame::decode_body(&body, MAX_FRAME_BYTES).map_err(|e| e.to_string())
}

async fn write(send: &mut quinn::SendStream, response: &Response) -> Result<(), String> {
    let bytes = frame::encode(response, MAX_FRAME_BYTES).map_err(|e| e.to_string())?;
    send.write_all(&bytes).await.map_err(|e| e.to_string())
}
