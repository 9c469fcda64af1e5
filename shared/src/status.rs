//! What an agent says about itself on `outpost/v1/devices/{id}/status` (retained, with a last
//! will that marks it offline), and what the coordinator's fleet view reads.

use serde::{Deserialize, Serialize};

use crate::cbor::{self, CborError};

/// The largest status payload accepted.
pub const MAX_STATUS_BYTES: usize = 256 * 1024;

/// A device's state as it last reported it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceStatus {
    /// The device id (the one in its certificate).
    pub device_id: String,
    /// The agent's version.
    pub agent_version: String,
    /// Overall health.
    pub health: Health,
    /// When this status was made, in seconds since the Unix epoch.
    pub updated_at: u64,
    /// One entry per model the device knows.
    pub models: Vec<ModelStatus>,
    /// Running counters since the agent started.
    pub counters: Counters,
    /// The most recent error, in words.
    pub last_error: Option<String>,
    /// Why the agent is not connected to its MQTT broker, while it is not (it then hears of no
    /// new release).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broker_error: Option<String>,
}

/// A device's overall health.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// Starting: loading its cache, not yet serving.
    Starting,
    /// Serving every model it should.
    Ready,
    /// Serving, but something is wrong (see the models and `last_error`).
    Degraded,
    /// Gone: published as the last will, or on a clean shutdown.
    Offline,
}

/// One model on a device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelStatus {
    /// The model's name.
    pub model: String,
    /// The version serving now.
    pub active: Option<u64>,
    /// The version kept for rollback.
    pub previous: Option<u64>,
    /// The version being fetched or loaded, if any.
    pub pending: Option<u64>,
    /// Which engine runs it (`"tract"`, `"wgpu"`, `"cloud"`).
    pub engine: Option<String>,
    /// The GPU adapter running it, with its backend (`"NVIDIA H200 (Vulkan)"`), when on `wgpu`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter: Option<String>,
    /// Why a locally run model is not on the GPU (no adapter, an op without a kernel…).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_fallback: Option<String>,
    /// Why a model the CPU runs is on tract when the agent config names an ONNX Runtime library
    /// (it cannot load, or it refuses this model).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_fallback: Option<String>,
    /// Why the model is not as it should be (refused manifest, no space, engine fallback…).
    pub last_error: Option<String>,
    /// When the pending version's failed install is tried again, in milliseconds from the
    /// status's time; absent when no retry is waiting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_in_ms: Option<u64>,
    /// Seconds until the newest release accepted for the model expires (negative once it has:
    /// the model keeps serving, but no install happens until a fresh release comes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release_expires_in_s: Option<i64>,
    /// How the model has served lately (a sliding window), for rollouts gated on health;
    /// absent before its first call in the window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<ModelHealth>,
}

/// A model's service over the last `window_s` seconds on one device, as one version served it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelHealth {
    /// The version these figures are of.
    pub version: u64,
    /// The window's length, in seconds (shorter while the version has served less long).
    pub window_s: u32,
    /// Inference calls answered or failed.
    pub calls: u64,
    /// Calls the model or the device failed (500, or 503 for no coordinator); a caller's bad
    /// input and a full queue are not the model's errors and are not counted here.
    pub errors: u64,
    /// Rows asked for.
    pub rows: u64,
    /// Rows answered by the coordinator (all of a cloud model's, a cascade's unsure ones).
    pub rows_offloaded: u64,
    /// Median call latency, milliseconds (to within a quarter octave).
    pub p50_ms: f64,
    /// 99th-percentile call latency, milliseconds (to within a quarter octave).
    pub p99_ms: f64,
}

impl ModelHealth {
    /// Errors per call (0 with no calls).
    pub fn error_rate(&self) -> f64 {
        share(self.errors, self.calls)
    }

    /// Offloaded rows per row (0 with no rows).
    pub fn offload_share(&self) -> f64 {
        share(self.rows_offloaded, self.rows)
    }
}

/// `part` of `whole` as a share from 0 to 1 (0 when `whole` is 0).
pub fn share(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

/// Counters an agent keeps; unknown or missing fields read as zero, so agents and coordinators
/// of different versions understand each other.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Counters {
    /// Inferences answered on the device.
    pub inferences_local: u64,
    /// Inferences answered by the coordinator.
    pub inferences_offloaded: u64,
    /// Inferences that failed.
    pub inference_errors: u64,
    /// Manifests refused (bad signature, stale, expired, malformed).
    pub manifests_rejected: u64,
    /// Chunks fetched from a coordinator.
    pub chunks_fetched: u64,
    /// Bytes fetched from a coordinator.
    pub bytes_fetched: u64,
    /// Connections made to the MQTT broker (CONNACKs): more than one means the connection was
    /// lost and made again.
    pub broker_connects: u64,
}

impl DeviceStatus {
    /// The status an agent leaves behind as its last will: offline, nothing else known.
    pub fn offline(
        device_id: impl Into<String>,
        agent_version: impl Into<String>,
        now: u64,
    ) -> Self {
        DeviceStatus {
            device_id: device_id.into(),
            agent_version: agent_version.into(),
            health: Health::Offline,
            updated_at: now,
            models: Vec::new(),
            counters: Counters::default(),
            last_error: None,
            broker_error: None,
        }
    }

    /// The CBOR bytes published on the device's status topic.
    pub fn to_cbor(&self) -> Result<Vec<u8>, CborError> {
        cbor::encode("device status", self, MAX_STATUS_BYTES)
    }

    /// Reads a status from its CBOR bytes.
    pub fn from_cbor(bytes: &[u8]) -> Result<Self, CborError> {
        cbor::decode("device status", bytes, MAX_STATUS_BYTES)
    }
}

/// The `seq` of a last will: the last word of its session, newer than any status the session
/// published before it.
pub const WILL_SEQ: u64 = u64::MAX;

/// What a status signature covers: this context, then the session, the sequence number and the
/// status bytes.
const STATUS_CONTEXT: &[u8] = b"outpost device status v1\0";

/// Why a signed status could not be made or read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SignedStatusError {
    /// Not the CBOR of a signed status, or of a status inside it.
    #[error(transparent)]
    Cbor(#[from] CborError),
    /// The device key could not sign.
    #[error("signing the status: {0}")]
    Sign(String),
}

/// A device status as published: the status's CBOR signed by the device's key (ECDSA P-256),
/// with the device's certificate so the coordinator can check it against the fleet CA, and the
/// place of the status in the agent's output (`session`, a random number per run, and `seq`,
/// growing within it; [`WILL_SEQ`] for the last will), so a replayed status is older than the
/// one it would replace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedStatus {
    /// The [`DeviceStatus`], as CBOR.
    #[serde(with = "serde_bytes")]
    pub status: Vec<u8>,
    /// The agent run that published it.
    pub session: u64,
    /// Its place in the run.
    pub seq: u64,
    /// The device's certificate (DER).
    #[serde(with = "serde_bytes")]
    pub certificate: Vec<u8>,
    /// The ECDSA P-256 SHA-256 signature (ASN.1 DER) over [`SignedStatus::message`].
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

/// Where a status stands in its device's output, to tell a newer one from a replayed one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusOrder {
    /// The agent run.
    pub session: u64,
    /// The place in the run.
    pub seq: u64,
    /// When the status was made (seconds since the Unix epoch).
    pub updated_at: u64,
}

impl StatusOrder {
    /// Whether a status at `self` may replace one at `earlier`: later in the same run, or from
    /// another run and made no earlier (a restarted agent starts a new run).
    pub fn follows(&self, earlier: &StatusOrder) -> bool {
        if self.session == earlier.session {
            self.seq > earlier.seq
        } else {
            self.updated_at >= earlier.updated_at
        }
    }
}

/// The largest signed status accepted: a status, a certificate and a signature.
pub const MAX_SIGNED_STATUS_BYTES: usize = MAX_STATUS_BYTES + 16 * 1024;

impl SignedStatus {
    /// Signs `status` as number `seq` of `session` with `key`, the key of `certificate`.
    pub fn sign(
        status: &DeviceStatus,
        session: u64,
        seq: u64,
        certificate: &[u8],
        key: &ring::signature::EcdsaKeyPair,
    ) -> Result<Self, SignedStatusError> {
        let status = status.to_cbor()?;
        let message = Self::message_of(&status, session, seq);
        let signature = key
            .sign(&ring::rand::SystemRandom::new(), &message)
            .map_err(|_| SignedStatusError::Sign("ECDSA signing failed".into()))?;
        Ok(Self {
            status,
            session,
            seq,
            certificate: certificate.to_vec(),
            signature: signature.as_ref().to_vec(),
        })
    }

    fn message_of(status: &[u8], session: u64, seq: u64) -> Vec<u8> {
        let mut message = Vec::with_capacity(STATUS_CONTEXT.len() + 16 + status.len());
        message.extend_from_slice(STATUS_CONTEXT);
        message.extend_from_slice(&session.to_be_bytes());
        message.extend_from_slice(&seq.to_be_bytes());
        message.extend_from_slice(status);
        message
    }

    /// The bytes the signature covers.
    pub fn message(&self) -> Vec<u8> {
        Self::message_of(&self.status, self.session, self.seq)
    }

    /// The status inside (not checked: verify the signature first).
    pub fn device_status(&self) -> Result<DeviceStatus, CborError> {
        DeviceStatus::from_cbor(&self.status)
    }

    /// The CBOR bytes published on the device's status topic.
    pub fn to_cbor(&self) -> Result<Vec<u8>, CborError> {
        cbor::encode("signed device status", self, MAX_SIGNED_STATUS_BYTES)
    }

    /// Reads a signed status from its CBOR bytes.
    pub fn from_cbor(bytes: &[u8]) -> Result<Self, CborError> {
        cbor::decode("signed device status", bytes, MAX_SIGNED_STATUS_BYTES)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn health() -> impl Strategy<Value = Health> {
        prop_oneof![
            Just(Health::Starting),
            Just(Health::Ready),
            Just(Health::Degraded),
            Just(Health::Offline)
        ]
    }

    fn model() -> impl Strategy<Value = ModelStatus> {
        (
            "[a-z-]{1,20}",
            proptest::option::of(any::<u64>()),
            proptest::option::of(any::<u64>()),
            proptest::option::of(any::<u64>()),
            proptest::option::of("[a-z:]{0,20}"),
            proptest::option::of(".{0,40}"),
            proptest::option::of(".{0,20}"),
            proptest::option::of(".{0,40}"),
            proptest::option::of(any::<u64>()),
        )
            .prop_map(
                |(
                    model,
                    active,
                    previous,
                    pending,
                    engine,
                    last_error,
                    adapter,
                    gpu_fallback,
                    retry_in_ms,
                )| {
                    ModelStatus {
                        model,
                        active,
                        previous,
                        pending,
                        engine,
                        adapter,
                        gpu_fallback,
                        cpu_fallback: None,
                        last_error,
                        retry_in_ms,
                        release_expires_in_s: None,
                        health: None,
                    }
                },
            )
    }

    proptest! {
        #[test]
        fn round_trips(
            id in "[a-z0-9-]{1,30}",
            health in health(),
            models in proptest::collection::vec(model(), 0..5),
            counters in proptest::array::uniform7(any::<u64>()),
            last_error in proptest::option::of(".{0,60}"),
        ) {
            let [a, b, c, d, e, f, g] = counters;
            let status = DeviceStatus {
                device_id: id,
                agent_version: "0.1.0".into(),
                health,
                updated_at: 42,
                models,
                counters: Counters {
                    inferences_local: a, inferences_offloaded: b, inference_errors: c,
                    manifests_rejected: d, chunks_fetched: e, bytes_fetched: f,
                    broker_connects: g,
                },
                last_error,
                broker_error: None,
            };
            let bytes = status.to_cbor().unwrap();
            prop_assert_eq!(DeviceStatus::from_cbor(&bytes).unwrap(), status);
        }

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = DeviceStatus::from_cbor(&bytes);
        }
    }

    #[test]
    fn missing_counters_read_as_zero() {
        #[derive(Serialize)]
        struct Old {
            inferences_local: u64,
        }
        let bytes = cbor::encode(
            "old",
            &Old {
                inferences_local: 5,
            },
            1024,
        )
        .unwrap();
        let counters: Counters = cbor::decode("counters", &bytes, 1024).unwrap();
        assert_eq!(
            counters,
            Counters {
                inferences_local: 5,
                ..Counters::default()
            }
        );
    }

    #[test]
    fn offline_status_round_trips() {
        let s = DeviceStatus::offline("demo-0001", "0.1.0", 7);
        assert_eq!(s.health, Health::Offline);
        assert_eq!(DeviceStatus::from_cbor(&s.to_cbor().unwrap()).unwrap(), s);
    }
}
