//! Model releases: what a model is, where its bytes are, where it runs, and who signed it.
//!
//! A model's [`Manifest`] is its *release*: the stable [`ModelVersion`] and, optionally, a
//! [`Candidate`] version rolled out to a percentage of devices. Every publish of a release bumps
//! its `release` number, and model versions only ever increase (a rollback is a new, higher
//! version whose content is an earlier one's), so an old manifest can never be replayed.
//!
//! A release travels as a [`SignedManifest`]: the CBOR bytes of a payload (format version,
//! signing key id, manifest) and an ed25519 signature over exactly those bytes. The verifier
//! checks the signature over the bytes it received, so no re-encoding is ever trusted.

use std::fmt;
use std::str::FromStr;

use ring::signature::{ED25519, Ed25519KeyPair, KeyPair as _, UnparsedPublicKey};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::cbor::{self, CborError};
use crate::chunk::{self, ChunkId, Digest};
use crate::tensor::DataType;
use crate::topic::{self, NameKind, TopicError};

/// The payload format this code writes and reads.
pub const MANIFEST_FORMAT: u16 = 1;
/// The largest signed manifest accepted (a 1 GiB model has ~16k chunks ≈ 1.2 MB of chunk list).
pub const MAX_MANIFEST_BYTES: usize = 4 * 1024 * 1024;

/// A model's release: its stable version and an optional candidate being rolled out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// The model's name (see [`topic::validate_name`]).
    pub model: String,
    /// The release number: strictly increasing for each publish of this model's release.
    pub release: u64,
    /// When the release was made, in seconds since the Unix epoch.
    pub created_at: u64,
    /// After this time (Unix seconds) the release is no longer accepted.
    pub expires_at: Option<u64>,
    /// The version every device outside the candidate's cohort runs.
    pub stable: ModelVersion,
    /// A newer version rolled out to a share of devices.
    pub candidate: Option<Candidate>,
}

/// One version of a model: its signature, placement and the variants that hold its bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelVersion {
    /// The model version: strictly increasing per model, never reused.
    pub version: u64,
    /// The model's inputs.
    pub inputs: Vec<TensorSpec>,
    /// The model's outputs.
    pub outputs: Vec<TensorSpec>,
    /// Where inference runs.
    pub placement: Placement,
    /// The stored forms of the model (at most one per target).
    pub variants: Vec<Variant>,
}

/// A candidate version and the devices that get it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Candidate {
    /// The candidate version.
    pub version: ModelVersion,
    /// The share of devices, 0 to 100, that install the candidate.
    pub rollout_percent: u8,
    /// Salt of the cohort hash, so each rollout picks its own devices.
    pub salt: String,
}

/// A model input or output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorSpec {
    /// The tensor's name in the model.
    pub name: String,
    /// The element type.
    pub datatype: DataType,
    /// The shape; dynamic dimensions (such as the batch) are [`Dim::Dynamic`].
    pub shape: Vec<Dim>,
}

/// One dimension of a [`TensorSpec`]: fixed, or chosen per call. Encoded as an integer, -1 for
/// dynamic, as Open Inference Protocol metadata writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "i64", into = "i64")]
pub enum Dim {
    /// A fixed size.
    Fixed(u64),
    /// Any size, chosen per call.
    Dynamic,
}

impl TryFrom<i64> for Dim {
    type Error = String;

    fn try_from(value: i64) -> Result<Self, Self::Error> {
        match value {
            -1 => Ok(Dim::Dynamic),
            v => u64::try_from(v).map(Dim::Fixed).map_err(|_| {
                format!("dimension {v} is invalid (expected a size, or -1 for dynamic)")
            }),
        }
    }
}

impl From<Dim> for i64 {
    fn from(dim: Dim) -> i64 {
        match dim {
            Dim::Dynamic => -1,
            Dim::Fixed(n) => i64::try_from(n).unwrap_or(i64::MAX),
        }
    }
}

impl Dim {
    /// Whether `size` fits this dimension.
    pub fn accepts(self, size: u64) -> bool {
        match self {
            Dim::Dynamic => true,
            Dim::Fixed(n) => n == size,
        }
    }
}

/// Where a model's inference runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Placement {
    /// On the device.
    Local,
    /// On the coordinator (or the backend behind it).
    Cloud,
    /// On the device first; offloaded when the named output's top score is below `threshold`.
    Cascade {
        /// The output whose largest value is the local model's confidence.
        output: String,
        /// Offload when the confidence is below this.
        threshold: f32,
    },
}

/// What a variant is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Target {
    /// Devices, weights quantised to int8.
    EdgeInt8,
    /// Devices, full precision.
    EdgeFp32,
    /// The coordinator, full precision (possibly a bigger model).
    CloudFp32,
}

impl Target {
    /// The name used in manifests and on the command line.
    pub const fn as_str(self) -> &'static str {
        match self {
            Target::EdgeInt8 => "edge-int8",
            Target::EdgeFp32 => "edge-fp32",
            Target::CloudFp32 => "cloud-fp32",
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The file format of a variant's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelFormat {
    /// An ONNX model file.
    Onnx,
}

/// One stored form of a model version: its bytes, as an ordered list of chunks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Variant {
    /// What the variant is for.
    pub target: Target,
    /// The file format.
    pub format: ModelFormat,
    /// Total size in bytes.
    pub size: u64,
    /// SHA-256 of the whole file.
    pub digest: Digest,
    /// The chunks that make up the file, in order.
    pub chunks: Vec<ChunkRef>,
}

/// A chunk of a variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ChunkRef {
    /// The chunk's content digest.
    pub id: ChunkId,
    /// Its size in bytes.
    pub size: u32,
}

impl Variant {
    /// Describes `bytes` as a variant: size, digest and content-defined chunks.
    pub fn describe(target: Target, format: ModelFormat, bytes: &[u8]) -> Self {
        let chunks = chunk::split(bytes)
            .into_iter()
            // Chunks are at most MAX_CHUNK bytes, far below u32::MAX.
            .map(|s| ChunkRef {
                id: s.id,
                size: u32::try_from(s.len).unwrap_or(u32::MAX),
            })
            .collect();
        Variant {
            target,
            format,
            size: bytes.len() as u64,
            digest: Digest::of(bytes),
            chunks,
        }
    }
}

impl Manifest {
    /// The version a device runs: the candidate when the device is in its cohort, else stable.
    pub fn version_for(&self, device_id: &str) -> &ModelVersion {
        match &self.candidate {
            Some(c) if in_cohort(device_id, &c.salt, c.rollout_percent) => &c.version,
            _ => &self.stable,
        }
    }

    /// Checks the manifest's own rules (names, version order, sizes); signing and verifying
    /// both call this.
    pub fn validate(&self) -> Result<(), ManifestError> {
        let invalid = |reason: String| ManifestError::Invalid {
            model: self.model.clone(),
            reason,
        };
        topic::validate_name(NameKind::Model, &self.model)?;
        if self.stable.version == 0 {
            return Err(invalid("model versions start at 1".to_owned()));
        }
        if self.stable.version > self.release {
            return Err(invalid(format!(
                "stable version {} is newer than release {}",
                self.stable.version, self.release
            )));
        }
        if let Some(expires) = self.expires_at {
            if expires <= self.created_at {
                return Err(invalid("it expires before it was created".to_owned()));
            }
        }
        self.stable
            .validate()
            .map_err(|r| invalid(format!("stable version {}: {r}", self.stable.version)))?;
        if let Some(c) = &self.candidate {
            let v = c.version.version;
            if v <= self.stable.version || v > self.release {
                return Err(invalid(format!(
                    "candidate version {v} must be newer than stable version {} and not newer than release {}",
                    self.stable.version, self.release
                )));
            }
            if c.rollout_percent > 100 {
                return Err(invalid(format!(
                    "rollout of {}% is over 100%",
                    c.rollout_percent
                )));
            }
            if c.version.inputs != self.stable.inputs || c.version.outputs != self.stable.outputs {
                return Err(invalid(format!(
                    "candidate version {v} changes the model's inputs or outputs"
                )));
            }
            c.version
                .validate()
                .map_err(|r| invalid(format!("candidate version {v}: {r}")))?;
        }
        Ok(())
    }
}

impl ModelVersion {
    fn validate(&self) -> Result<(), String> {
        for (kind, specs) in [("input", &self.inputs), ("output", &self.outputs)] {
            if specs.is_empty() {
                return Err(format!("it has no {kind}s"));
            }
            for (i, spec) in specs.iter().enumerate() {
                if spec.name.is_empty() {
                    return Err(format!("{kind} {i} has no name"));
                }
                if specs[..i].iter().any(|s| s.name == spec.name) {
                    return Err(format!("{kind} {:?} is listed twice", spec.name));
                }
            }
        }
        if let Placement::Cascade { output, threshold } = &self.placement {
            if !self.outputs.iter().any(|o| &o.name == output) {
                return Err(format!(
                    "cascade output {output:?} is not one of the model's outputs"
                ));
            }
            if !(0.0..=1.0).contains(threshold) {
                return Err(format!("cascade threshold {threshold} is outside 0..=1"));
            }
        }
        if self.variants.is_empty() {
            return Err("it has no variants".to_owned());
        }
        for (i, v) in self.variants.iter().enumerate() {
            if self.variants[..i].iter().any(|w| w.target == v.target) {
                return Err(format!("variant {} is listed twice", v.target));
            }
            let total: u64 = v.chunks.iter().map(|c| u64::from(c.size)).sum();
            if total != v.size {
                return Err(format!(
                    "variant {}: chunks add up to {total} bytes, not {}",
                    v.target, v.size
                ));
            }
        }
        Ok(())
    }

    /// The variant for `target`, if the version has one.
    pub fn variant(&self, target: Target) -> Option<&Variant> {
        self.variants.iter().find(|v| v.target == target)
    }
}

/// Whether `device_id` falls in a rollout cohort of `percent` percent salted with `salt`:
/// `sha256(device_id, 0, salt)` read as a big-endian u64, modulo 100, is below `percent`.
pub fn in_cohort(device_id: &str, salt: &str, percent: u8) -> bool {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(device_id.as_bytes());
    ctx.update(&[0]);
    ctx.update(salt.as_bytes());
    let digest = ctx.finish();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest.as_ref()[..8]);
    u64::from_be_bytes(first) % 100 < u64::from(percent)
}

/// Checks that `next` moves forward from `current`, the last release accepted for the model:
/// a higher release number and a stable version that does not go back.
pub fn check_forward(current: Option<&Manifest>, next: &Manifest) -> Result<(), ManifestError> {
    let Some(current) = current else {
        return Ok(());
    };
    if current.model != next.model {
        return Err(ManifestError::Invalid {
            model: next.model.clone(),
            reason: format!("it was offered in place of model {:?}", current.model),
        });
    }
    if next.release <= current.release || next.stable.version < current.stable.version {
        return Err(ManifestError::Stale {
            model: next.model.clone(),
            current: current.release,
            offered: next.release,
        });
    }
    Ok(())
}

/// The id of a signing key: the first 8 bytes of the SHA-256 of its public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyId([u8; 8]);

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&crate::hex::encode(&self.0))
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}

impl Serialize for KeyId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for KeyId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let bytes = serde_bytes::ByteBuf::deserialize(deserializer)?;
        let raw: [u8; 8] = bytes.as_slice().try_into().map_err(|_| {
            serde::de::Error::custom(format!("key id must be 8 bytes, not {}", bytes.len()))
        })?;
        Ok(KeyId(raw))
    }
}

/// An ed25519 public key that verifies manifests; written as 64 hex digits in configs.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PublicKey([u8; 32]);

impl PublicKey {
    /// Wraps the 32 raw bytes of an ed25519 public key.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The raw key bytes.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The key's id, carried in every payload it signs.
    pub fn id(&self) -> KeyId {
        let digest = Digest::of(&self.0);
        let mut id = [0u8; 8];
        id.copy_from_slice(&digest.as_bytes()[..8]);
        KeyId(id)
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&crate::hex::encode(&self.0))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

/// Text that is not an ed25519 public key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{text:?} is not an ed25519 public key (64 hex digits)")]
pub struct BadPublicKey {
    /// The offending text, cut to 80 characters.
    pub text: String,
}

impl FromStr for PublicKey {
    type Err = BadPublicKey;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        crate::hex::decode_array(text)
            .map(Self)
            .ok_or_else(|| BadPublicKey {
                text: text.chars().take(80).collect(),
            })
    }
}

impl Serialize for PublicKey {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PublicKey {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// A manifest as published: the signed payload's bytes and the signature over them.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedManifest {
    /// CBOR of the signed payload (format, key id, manifest).
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
    /// ed25519 signature over `payload`.
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

impl fmt::Debug for SignedManifest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SignedManifest")
            .field("payload_bytes", &self.payload.len())
            .field("signature_bytes", &self.signature.len())
            .finish()
    }
}

impl SignedManifest {
    /// The CBOR bytes published on the model's manifest topic.
    pub fn to_cbor(&self) -> Result<Vec<u8>, ManifestError> {
        Ok(cbor::encode("signed manifest", self, MAX_MANIFEST_BYTES)?)
    }

    /// Reads a signed manifest from its CBOR bytes (not yet verified).
    pub fn from_cbor(bytes: &[u8]) -> Result<Self, ManifestError> {
        Ok(cbor::decode("signed manifest", bytes, MAX_MANIFEST_BYTES)?)
    }
}

#[derive(Serialize, Deserialize)]
struct SignedPayload {
    format: u16,
    key_id: KeyId,
    manifest: Manifest,
}

/// Signs manifests with the fleet's ed25519 key.
pub struct ManifestSigner {
    key: Ed25519KeyPair,
    public: PublicKey,
}

impl fmt::Debug for ManifestSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ManifestSigner")
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}

impl ManifestSigner {
    /// A signer from an ed25519 key in PKCS#8 DER (as `firmware-config provision` writes it).
    pub fn from_pkcs8(der: &[u8]) -> Result<Self, ManifestError> {
        let key = Ed25519KeyPair::from_pkcs8_maybe_unchecked(der)
            .map_err(|e| ManifestError::BadKey(format!("not an ed25519 PKCS#8 key: {e}")))?;
        let mut public = [0u8; 32];
        public.copy_from_slice(key.public_key().as_ref());
        Ok(Self {
            key,
            public: PublicKey(public),
        })
    }

    /// The public key that verifies this signer's manifests.
    pub fn public_key(&self) -> PublicKey {
        self.public
    }

    /// Validates and signs `manifest`.
    pub fn sign(&self, manifest: &Manifest) -> Result<SignedManifest, ManifestError> {
        manifest.validate()?;
        let payload = SignedPayload {
            format: MANIFEST_FORMAT,
            key_id: self.public.id(),
            manifest: manifest.clone(),
        };
        let payload = cbor::encode("manifest payload", &payload, MAX_MANIFEST_BYTES)?;
        let signature = self.key.sign(&payload).as_ref().to_vec();
        Ok(SignedManifest { payload, signature })
    }
}

/// Verifies signed manifests against the fleet's trusted keys.
#[derive(Debug, Clone)]
pub struct ManifestVerifier {
    keys: Vec<PublicKey>,
}

impl ManifestVerifier {
    /// A verifier that trusts exactly `keys` (more than one while keys rotate).
    pub fn new(keys: impl IntoIterator<Item = PublicKey>) -> Self {
        Self {
            keys: keys.into_iter().collect(),
        }
    }

    /// Checks format, key, signature, expiry (against `now`, Unix seconds) and the manifest's
    /// own rules, and returns the manifest. Anything unverifiable is an error.
    pub fn verify(&self, signed: &SignedManifest, now: u64) -> Result<Manifest, ManifestError> {
        let payload: SignedPayload =
            cbor::decode("manifest payload", &signed.payload, MAX_MANIFEST_BYTES)?;
        if payload.format != MANIFEST_FORMAT {
            return Err(ManifestError::UnsupportedFormat(payload.format));
        }
        let key = self
            .keys
            .iter()
            .find(|k| k.id() == payload.key_id)
            .ok_or(ManifestError::UnknownKey(payload.key_id))?;
        UnparsedPublicKey::new(&ED25519, key.as_bytes())
            .verify(&signed.payload, &signed.signature)
            .map_err(|_| ManifestError::BadSignature {
                model: payload.manifest.model.clone(),
            })?;
        let manifest = payload.manifest;
        if let Some(expires_at) = manifest.expires_at {
            if now >= expires_at {
                return Err(ManifestError::Expired {
                    model: manifest.model,
                    expires_at,
                    now,
                });
            }
        }
        manifest.validate()?;
        Ok(manifest)
    }

    /// [`SignedManifest::from_cbor`] then [`Self::verify`].
    pub fn verify_cbor(&self, bytes: &[u8], now: u64) -> Result<Manifest, ManifestError> {
        self.verify(&SignedManifest::from_cbor(bytes)?, now)
    }
}

/// Why a manifest was not signed or not accepted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ManifestError {
    /// The bytes are not a manifest.
    #[error(transparent)]
    Encoding(#[from] CborError),
    /// The model name is not valid.
    #[error(transparent)]
    Name(#[from] TopicError),
    /// The manifest breaks one of its rules.
    #[error("manifest of model {model:?} is invalid: {reason}")]
    Invalid {
        /// The model.
        model: String,
        /// The rule broken.
        reason: String,
    },
    /// The payload format is one this code does not know.
    #[error("manifest format {0} is not supported (this build reads format {MANIFEST_FORMAT})")]
    UnsupportedFormat(u16),
    /// The signing key is not one of the trusted keys.
    #[error("manifest is signed by key {0}, which is not a trusted fleet key")]
    UnknownKey(KeyId),
    /// The signature does not match the payload.
    #[error("manifest of model {model:?} has a bad signature")]
    BadSignature {
        /// The model the payload claims to be.
        model: String,
    },
    /// The manifest has expired.
    #[error("manifest of model {model:?} expired at {expires_at} (now {now})")]
    Expired {
        /// The model.
        model: String,
        /// Its expiry, Unix seconds.
        expires_at: u64,
        /// The time of the check, Unix seconds.
        now: u64,
    },
    /// The manifest is not newer than the one already accepted.
    #[error(
        "manifest of model {model:?} is release {offered}, not newer than release {current} already accepted"
    )]
    Stale {
        /// The model.
        model: String,
        /// The release already accepted.
        current: u64,
        /// The release offered.
        offered: u64,
    },
    /// A signing key could not be read.
    #[error("signing key: {0}")]
    BadKey(String),
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    pub(crate) fn new_signer() -> ManifestSigner {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new()).unwrap();
        ManifestSigner::from_pkcs8(pkcs8.as_ref()).unwrap()
    }

    fn spec(name: &str, datatype: DataType, shape: &[i64]) -> TensorSpec {
        TensorSpec {
            name: name.into(),
            datatype,
            shape: shape.iter().map(|&d| Dim::try_from(d).unwrap()).collect(),
        }
    }

    pub(crate) fn version(version: u64, content: &[u8]) -> ModelVersion {
        ModelVersion {
            version,
            inputs: vec![
                spec("user_features", DataType::Fp32, &[-1, 32]),
                spec("item_ids", DataType::Int64, &[-1]),
            ],
            outputs: vec![spec("score", DataType::Fp32, &[-1, 1])],
            placement: Placement::Cascade {
                output: "score".into(),
                threshold: 0.6,
            },
            variants: vec![
                Variant::describe(Target::EdgeInt8, ModelFormat::Onnx, content),
                Variant::describe(
                    Target::CloudFp32,
                    ModelFormat::Onnx,
                    &[content, content].concat(),
                ),
            ],
        }
    }

    pub(crate) fn manifest() -> Manifest {
        Manifest {
            model: "video-ranker".into(),
            release: 3,
            created_at: 1_700_000_000,
            expires_at: Some(1_800_000_000),
            stable: version(2, &[7u8; 200_000]),
            candidate: Some(Candidate {
                version: version(3, &[9u8; 1000]),
                rollout_percent: 10,
                salt: "r3".into(),
            }),
        }
    }

    const NOW: u64 = 1_750_000_000;

    #[test]
    fn signed_manifest_verifies() {
        let signer = new_signer();
        let signed = signer.sign(&manifest()).unwrap();
        let bytes = signed.to_cbor().unwrap();
        let verifier = ManifestVerifier::new([signer.public_key()]);
        assert_eq!(verifier.verify_cbor(&bytes, NOW).unwrap(), manifest());
    }

    #[test]
    fn every_changed_byte_is_refused() {
        let signer = new_signer();
        let verifier = ManifestVerifier::new([signer.public_key()]);
        let bytes = signer.sign(&manifest()).unwrap().to_cbor().unwrap();
        // Flip each byte of the encoding in turn (step 7 keeps the test fast; every region is hit).
        for i in (0..bytes.len()).step_by(7) {
            let mut tampered = bytes.clone();
            tampered[i] ^= 0x01;
            assert!(
                verifier.verify_cbor(&tampered, NOW).is_err(),
                "byte {i} changed and still accepted"
            );
        }
    }

    #[test]
    fn payload_change_is_a_bad_signature() {
        let signer = new_signer();
        let verifier = ManifestVerifier::new([signer.public_key()]);
        let mut signed = signer.sign(&manifest()).unwrap();
        let mut other = manifest();
        other.candidate.as_mut().unwrap().rollout_percent = 100;
        signed.payload = signer.sign(&other).unwrap().payload;
        let err = verifier.verify(&signed, NOW).unwrap_err();
        assert!(matches!(err, ManifestError::BadSignature { .. }), "{err}");
    }

    #[test]
    fn wrong_key_is_refused_by_id_and_by_signature() {
        let signer = new_signer();
        let other = new_signer();
        let signed = signer.sign(&manifest()).unwrap();
        let err = ManifestVerifier::new([other.public_key()])
            .verify(&signed, NOW)
            .unwrap_err();
        assert!(
            matches!(err, ManifestError::UnknownKey(id) if id == signer.public_key().id()),
            "{err}"
        );
        assert!(
            err.to_string()
                .contains(&signer.public_key().id().to_string())
        );
        // A signature by another key under the right key id.
        let forged = SignedManifest {
            payload: signed.payload.clone(),
            signature: other.sign(&manifest()).unwrap().signature,
        };
        let err = ManifestVerifier::new([signer.public_key()])
            .verify(&forged, NOW)
            .unwrap_err();
        assert!(matches!(err, ManifestError::BadSignature { .. }), "{err}");
        let err = ManifestVerifier::new([]).verify(&signed, NOW).unwrap_err();
        assert!(matches!(err, ManifestError::UnknownKey(_)), "{err}");
    }

    #[test]
    fn rotation_accepts_either_trusted_key() {
        let (old, new) = (new_signer(), new_signer());
        let verifier = ManifestVerifier::new([old.public_key(), new.public_key()]);
        assert!(
            verifier
                .verify(&old.sign(&manifest()).unwrap(), NOW)
                .is_ok()
        );
        assert!(
            verifier
                .verify(&new.sign(&manifest()).unwrap(), NOW)
                .is_ok()
        );
    }

    #[test]
    fn expired_manifest_is_refused() {
        let signer = new_signer();
        let verifier = ManifestVerifier::new([signer.public_key()]);
        let signed = signer.sign(&manifest()).unwrap();
        assert!(verifier.verify(&signed, 1_799_999_999).is_ok());
        let err = verifier.verify(&signed, 1_800_000_000).unwrap_err();
        assert!(
            matches!(
                err,
                ManifestError::Expired {
                    expires_at: 1_800_000_000,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn garbage_and_empty_messages_are_errors() {
        let verifier = ManifestVerifier::new([new_signer().public_key()]);
        for bytes in [&b""[..], b"offline", &[0xff; 64], &[0xa0]] {
            assert!(verifier.verify_cbor(bytes, NOW).is_err());
        }
    }

    #[test]
    fn invalid_manifests_are_not_signed() {
        let signer = new_signer();
        type Change = fn(&mut Manifest);
        let cases: Vec<(Change, &str)> = vec![
            (|m| m.model = "a/b".into(), "invalid"),
            (|m| m.stable.version = 0, "start at 1"),
            (|m| m.stable.version = 9, "newer than release"),
            (|m| m.expires_at = Some(1), "expires before"),
            (
                |m| m.candidate.as_mut().unwrap().version.version = 2,
                "must be newer",
            ),
            (
                |m| m.candidate.as_mut().unwrap().rollout_percent = 101,
                "over 100%",
            ),
            (
                |m| {
                    m.candidate
                        .as_mut()
                        .unwrap()
                        .version
                        .inputs
                        .pop()
                        .map(drop)
                        .unwrap_or(())
                },
                "inputs or outputs",
            ),
            (
                |m| {
                    m.stable.placement = Placement::Cascade {
                        output: "nope".into(),
                        threshold: 0.5,
                    }
                },
                "cascade output",
            ),
            (
                |m| {
                    m.stable.placement = Placement::Cascade {
                        output: "score".into(),
                        threshold: 1.5,
                    }
                },
                "outside 0..=1",
            ),
            (|m| m.stable.variants.clear(), "no variants"),
            (|m| m.stable.variants[0].size += 1, "add up to"),
            (
                |m| m.stable.outputs.push(m.stable.outputs[0].clone()),
                "listed twice",
            ),
        ];
        for (change, needle) in cases {
            let mut m = manifest();
            change(&mut m);
            let err = signer.sign(&m).unwrap_err();
            assert!(
                err.to_string().contains(needle),
                "expected {needle:?} in {err}"
            );
        }
    }

    #[test]
    fn releases_only_move_forward() {
        let m = manifest();
        assert!(check_forward(None, &m).is_ok());
        let mut next = m.clone();
        next.release += 1;
        assert!(check_forward(Some(&m), &next).is_ok());
        let err = check_forward(Some(&next), &m).unwrap_err();
        assert!(
            matches!(
                err,
                ManifestError::Stale {
                    current: 4,
                    offered: 3,
                    ..
                }
            ),
            "{err}"
        );
        assert!(
            check_forward(Some(&m), &m).is_err(),
            "a replay of the same release is refused"
        );
        let mut regressed = next.clone();
        regressed.release += 1;
        regressed.stable.version = 1;
        assert!(check_forward(Some(&next), &regressed).is_err());
    }

    #[test]
    fn cohort_is_stable_and_proportional() {
        let ids: Vec<String> = (0..2000).map(|i| format!("device-{i}")).collect();
        let share = |p| ids.iter().filter(|id| in_cohort(id, "salt-a", p)).count();
        assert_eq!(share(0), 0);
        assert_eq!(share(100), ids.len());
        let ten = share(10);
        assert!((120..=280).contains(&ten), "10% picked {ten} of 2000");
        // Growing a rollout only adds devices.
        assert!(
            ids.iter()
                .all(|id| !in_cohort(id, "salt-a", 10) || in_cohort(id, "salt-a", 50))
        );
        // Another salt picks other devices.
        let overlap = ids
            .iter()
            .filter(|id| in_cohort(id, "salt-a", 10) && in_cohort(id, "salt-b", 10))
            .count();
        assert!(overlap < ten / 2, "{overlap} of {ten} overlap");
        let m = manifest();
        let in_candidate = ids
            .iter()
            .filter(|id| m.version_for(id).version == 3)
            .count();
        assert_eq!(
            in_candidate,
            ids.iter().filter(|id| in_cohort(id, "r3", 10)).count()
        );
    }

    #[test]
    fn key_text_round_trips() {
        let key = new_signer().public_key();
        assert_eq!(key.to_string().parse::<PublicKey>().unwrap(), key);
        assert!("zz".parse::<PublicKey>().is_err());
    }

    proptest! {
        #[test]
        fn manifests_round_trip(release in 3u64..1000, percent in 0u8..=100, salt in "[a-z]{0,12}", created in 0u64..1_000_000) {
            let mut m = manifest();
            m.release = release;
            m.created_at = created;
            m.expires_at = None;
            let c = m.candidate.as_mut().unwrap();
            c.rollout_percent = percent;
            c.salt = salt;
            let signer = new_signer();
            let bytes = signer.sign(&m).unwrap().to_cbor().unwrap();
            prop_assert_eq!(ManifestVerifier::new([signer.public_key()]).verify_cbor(&bytes, NOW).unwrap(), m);
        }

        #[test]
        fn dims_round_trip(d in -1i64..10_000) {
            let dim = Dim::try_from(d).unwrap();
            prop_assert_eq!(i64::from(dim), d);
        }
    }
}
