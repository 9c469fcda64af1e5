//! The device's status, as it publishes it on MQTT and answers `/v1/status`: built from one
//! snapshot of the serving table and the counters, so the versions it reports belong together.

use outpost_shared::{DeviceStatus, Health, ModelStatus};

use crate::counters::Counters;
use crate::health::HealthWindows;
use crate::serving::Models;

/// Seconds since the Unix epoch (0 if the clock is before it).
pub(crate) fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The status of device `device_id` serving `models`, at `updated_at`, with each model's recent
/// service from `health`.
pub(crate) fn device_status(
    device_id: &str,
    models: &Models,
    counters: &Counters,
    health: &HealthWindows,
    updated_at: u64,
) -> DeviceStatus {
    let measured_at = std::time::Instant::now();
    let last_error = models.last_error().map(str::to_owned);
    let models: Vec<ModelStatus> = models
        .iter()
        .map(|(name, slot)| {
            let expires_in = slot.release_expires_at.map(|at| {
                i64::try_from(at).unwrap_or(i64::MAX) - i64::try_from(updated_at).unwrap_or(0)
            });
            // Expired: it keeps serving, and says that nothing installs until a fresh release.
            let expired = expires_in.filter(|s| *s <= 0).map(|s| {
                format!(
                    "the newest release expired {} s ago: serving what it has, installing nothing until a fresh release comes (is the coordinator reachable?)",
                    -s
                )
            });
            (name, slot, expires_in, expired)
        })
        .map(|(name, slot, expires_in, expired)| ModelStatus {
            release_expires_in_s: expires_in,
            health: health.of(name, measured_at),
            model: name.clone(),
            active: slot.active.as_ref().map(|s| s.version.version),
            previous: slot.stored_previous,
            pending: slot.pending,
            engine: slot.active.as_ref().map(|s| s.engine_name().to_owned()),
            adapter: slot.active.as_ref().and_then(|s| s.adapter.clone()),
            gpu_fallback: slot.active.as_ref().and_then(|s| s.gpu_fallback.clone()),
            cpu_fallback: slot.active.as_ref().and_then(|s| s.cpu_fallback.clone()),
            last_error: slot.last_error.clone().or(expired),
            retry_in_ms: slot.retry_at.map(|at| {
                u64::try_from(
                    at.saturating_duration_since(std::time::Instant::now())
                        .as_millis(),
                )
                .unwrap_or(u64::MAX)
            }),
        })
        .collect();
    let degraded = models.iter().any(|m| m.last_error.is_some());
    DeviceStatus {
        device_id: device_id.to_owned(),
        agent_version: env!("CARGO_PKG_VERSION").into(),
        health: if degraded {
            Health::Degraded
        } else {
            Health::Ready
        },
        updated_at,
        models,
        counters: counters.snapshot(),
        last_error,
        broker_error: None,
    }
}

/// Signs what the device says about itself with its key: every status, and the last will, so
/// that the coordinator believes only what this device's certificate vouches for. Each MQTT
/// connection is a new session (a random number); statuses count up within it, and the will,
/// made at connect, is its last word ([`outpost_shared::status::WILL_SEQ`]).
pub(crate) struct StatusSigner {
    key: ring::signature::EcdsaKeyPair,
    certificate: Vec<u8>,
    device_id: String,
    session: std::sync::atomic::AtomicU64,
    seq: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for StatusSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatusSigner")
            .field("device_id", &self.device_id)
            .finish_non_exhaustive()
    }
}

impl StatusSigner {
    /// A signer with the device's `identity` (its certificate and key).
    pub(crate) fn new(
        config: &firmware_config::AgentConfig,
        identity: &outpost_runtime::tls::Identity,
    ) -> Result<Self, String> {
        let certificate = identity
            .leaf()
            .map(|c| c.as_ref().to_vec())
            .ok_or("the device certificate file holds no certificate")?;
        let rustls::pki_types::PrivateKeyDer::Pkcs8(pkcs8) = &identity.key else {
            return Err("the device key is not PKCS#8".into());
        };
        let key = ring::signature::EcdsaKeyPair::from_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
            pkcs8.secret_pkcs8_der(),
            &ring::rand::SystemRandom::new(),
        )
        .map_err(|e| format!("the device key is not an ECDSA P-256 key: {e}"))?;
        let signer = Self {
            key,
            certificate,
            device_id: config.device.id.to_string(),
            session: std::sync::atomic::AtomicU64::new(0),
            seq: std::sync::atomic::AtomicU64::new(0),
        };
        signer.new_session();
        Ok(signer)
    }

    /// Starts a new session (for a new MQTT connection); its number.
    pub(crate) fn new_session(&self) -> u64 {
        let mut bytes = [0u8; 8];
        let random = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes);
        // Without randomness, the clock still tells runs apart.
        let session = match random {
            Ok(()) => u64::from_be_bytes(bytes),
            Err(_) => now().rotate_left(32) ^ u64::from(std::process::id()),
        };
        self.seq.store(0, std::sync::atomic::Ordering::SeqCst);
        self.session
            .store(session, std::sync::atomic::Ordering::SeqCst);
        session
    }

    /// `status`, signed as the next of the session, as the bytes to publish.
    pub(crate) fn sign(&self, status: &DeviceStatus) -> Result<Vec<u8>, String> {
        let seq = self.seq.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.sign_as(status, seq)
    }

    /// The session's last will: the device offline, signed as the session's last word.
    pub(crate) fn will(&self) -> Result<Vec<u8>, String> {
        let offline = DeviceStatus::offline(&self.device_id, env!("CARGO_PKG_VERSION"), now());
        self.sign_as(&offline, outpost_shared::status::WILL_SEQ)
    }

    fn sign_as(&self, status: &DeviceStatus, seq: u64) -> Result<Vec<u8>, String> {
        let session = self.session.load(std::sync::atomic::Ordering::SeqCst);
        outpost_shared::SignedStatus::sign(status, session, seq, &self.certificate, &self.key)
            .and_then(|s| Ok(s.to_cbor()?))
            .map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use outpost_shared::{ModelVersion, Placement};

    use super::*;
    use crate::serving::{Serving, ServingTable};

    #[test]
    fn a_refused_release_degrades_the_device_and_says_why() {
        let (mut table, _) = ServingTable::new(u64::MAX);
        let version = ModelVersion {
            version: 4,
            inputs: vec![],
            outputs: vec![],
            placement: Placement::Cloud,
            max_batch: None,
            text: None,
            variants: vec![],
        };
        table.serve_cached("m", Serving::cloud_only(&version), None);
        let counters = Counters::default();
        Counters::count(&counters.local);
        let ready = device_status(
            "dev-0001",
            &table.snapshot(),
            &counters,
            &HealthWindows::default(),
            7,
        );
        assert_eq!(ready.health, Health::Ready);
        assert_eq!(ready.updated_at, 7);
        assert_eq!(ready.counters.inferences_local, 1);
        let m = &ready.models[0];
        assert_eq!((m.active, m.engine.as_deref()), (Some(4), Some("cloud")));
        table.refuse(Some("m"), "too big".into());
        let refused = device_status(
            "dev-0001",
            &table.snapshot(),
            &counters,
            &HealthWindows::default(),
            8,
        );
        assert_eq!(refused.health, Health::Degraded);
        assert_eq!(refused.models[0].last_error.as_deref(), Some("too big"));
        assert_eq!(refused.models[0].active, Some(4));
        assert_eq!(refused.last_error.as_deref(), Some("too big"));
    }
}
