//! Model releases: what a model is, where its bytes are and where it runs, and the rules a
//! release must keep.
//!
//! A model's [`Manifest`] is its *release*: the stable [`ModelVersion`] and, optionally, a
//! [`Candidate`] version rolled out to a percentage of devices. Every publish of a release bumps
//! its `release` number, and model versions only ever increase (a rollback is a new, higher
//! version whose content is an earlier one's), so an old manifest can never be replayed.
//!
//! How a release is signed and verified lives in [`crate::signing`]; which devices run which
//! version, and which release may replace which, in [`crate::rollout`]. [`ManifestError`] is the
//! one error of all three.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::cbor::CborError;
use crate::chunk::{self, ChunkId, Digest};
use crate::signing::{KeyId, MANIFEST_FORMAT};
use crate::tensor::DataType;
use crate::topic::{self, NameKind, TopicError};

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
    /// The most rows (outermost dimension) one request may carry, set by the operator at push
    /// like Triton's `max_batch_size`; `None`: bounded only by the device's memory budget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_batch: Option<u64>,
    /// The stored forms of the model (at most one per target).
    pub variants: Vec<Variant>,
    /// The text input apps may send instead of token ids, when the push carried a tokenizer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<TextInput>,
}

/// A text input: a `BYTES` tensor of UTF-8 strings that the device tokenizes into the model's
/// token-id inputs with a HuggingFace `tokenizer.json`, stored as chunks and covered by the
/// release's signature like the model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TextInput {
    /// The name apps give the text (`"text"`); not one of the model's own inputs.
    pub name: String,
    /// The model's token-id input, i64 `[batch, sequence]`.
    pub input_ids: String,
    /// The model's attention-mask input (1 for a token, 0 for padding), if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_mask: Option<String>,
    /// The model's token-type input (all 0 for one text), if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_type_ids: Option<String>,
    /// The most tokens a text may have, with the tokenizer's special tokens.
    pub max_tokens: u32,
    /// Longer texts are cut to `max_tokens` (and the answer says so) instead of refused.
    pub truncate: bool,
    /// The `tokenizer.json` file.
    pub tokenizer: Blob,
}

/// A file other than a model that a version needs, as an ordered list of chunks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Blob {
    /// Total size in bytes.
    pub size: u64,
    /// SHA-256 of the whole file.
    pub digest: Digest,
    /// The chunks that make up the file, in order.
    pub chunks: Vec<ChunkRef>,
}

impl Blob {
    /// Describes `bytes`: size, digest and content-defined chunks.
    pub fn describe(bytes: &[u8]) -> Self {
        Blob {
            size: bytes.len() as u64,
            digest: Digest::of(bytes),
            chunks: chunk_refs(chunk::split(bytes)),
        }
    }
}

/// Chunk spans as references (chunks are at most [`chunk::MAX_CHUNK`] bytes, far below
/// `u32::MAX`).
fn chunk_refs(spans: Vec<chunk::ChunkSpan>) -> Vec<ChunkRef> {
    spans
        .into_iter()
        .map(|s| ChunkRef {
            id: s.id,
            size: u32::try_from(s.len).unwrap_or(u32::MAX),
        })
        .collect()
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
        let chunks = chunk_refs(match format {
            ModelFormat::Onnx => chunk::split_model(bytes),
        });
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
        if let Some(expires) = self.expires_at
            && expires <= self.created_at
        {
            return Err(invalid("it expires before it was created".to_owned()));
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
            let text_name = |v: &ModelVersion| v.text.as_ref().map(|t| t.name.clone());
            if c.version.inputs != self.stable.inputs
                || c.version.outputs != self.stable.outputs
                || text_name(&c.version) != text_name(&self.stable)
            {
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
        if let Some(text) = &self.text {
            text.validate(&self.inputs)?;
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

    /// Checks the text input against the inputs (what [`Manifest::validate`] checks of it),
    /// so a push can refuse it before anything is stored.
    pub fn validate_text(&self) -> Result<(), String> {
        match &self.text {
            Some(text) => text.validate(&self.inputs),
            None => Ok(()),
        }
    }

    /// The chunks of the files beside the model (the tokenizer), in order.
    pub fn extra_chunks(&self) -> impl Iterator<Item = &ChunkRef> {
        self.text.iter().flat_map(|t| t.tokenizer.chunks.iter())
    }

    /// The variant for `target`, if the version has one.
    pub fn variant(&self, target: Target) -> Option<&Variant> {
        self.variants.iter().find(|v| v.target == target)
    }
}

impl TextInput {
    /// The tokenizer's shortest useful `max_tokens`: room for a special token each side and one
    /// token of text.
    pub const MIN_TOKENS: u32 = 3;

    fn validate(&self, inputs: &[TensorSpec]) -> Result<(), String> {
        if self.name.is_empty() {
            return Err("the text input has no name".to_owned());
        }
        if inputs.iter().any(|i| i.name == self.name) {
            return Err(format!(
                "the text input {:?} has the name of one of the model's inputs",
                self.name
            ));
        }
        let roles = [
            ("token ids", Some(&self.input_ids)),
            ("attention mask", self.attention_mask.as_ref()),
            ("token types", self.token_type_ids.as_ref()),
        ];
        for (role, name) in roles {
            let Some(name) = name else { continue };
            let Some(spec) = inputs.iter().find(|i| &i.name == name) else {
                return Err(format!(
                    "the text input's {role} {name:?} is not one of the model's inputs"
                ));
            };
            if spec.datatype != DataType::Int64 || spec.shape.len() != 2 {
                return Err(format!(
                    "the text input's {role} {name:?} must be INT64 [batch, sequence]"
                ));
            }
        }
        if self.max_tokens < Self::MIN_TOKENS {
            return Err(format!(
                "the text input's max_tokens {} is under {}",
                self.max_tokens,
                Self::MIN_TOKENS
            ));
        }
        let total: u64 = self
            .tokenizer
            .chunks
            .iter()
            .map(|c| u64::from(c.size))
            .sum();
        if total != self.tokenizer.size {
            return Err(format!(
                "the tokenizer's chunks add up to {total} bytes, not {}",
                self.tokenizer.size
            ));
        }
        Ok(())
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
    /// The manifest carries no expiry: a release that never expires could be replayed forever.
    #[error("manifest of model {model:?} carries no expiry; releases must expire")]
    NoExpiry {
        /// The model.
        model: String,
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
    /// A detached signature (over something other than a manifest) does not match its bytes.
    #[error("the signature over the {purpose} does not match its bytes")]
    BadDetachedSignature {
        /// What was signed.
        purpose: &'static str,
    },
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::signing::tests::new_signer;
    use proptest::prelude::*;

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
                spec("item_ids", DataType::Int64, &[-1, -1]),
            ],
            outputs: vec![spec("score", DataType::Fp32, &[-1, 1])],
            placement: Placement::Cascade {
                output: "score".into(),
                threshold: 0.6,
            },
            max_batch: None,
            text: None,
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

    /// A text input over a `[batch, sequence]` id input.
    fn text_input() -> TextInput {
        TextInput {
            name: "text".into(),
            input_ids: "item_ids".into(),
            attention_mask: None,
            token_type_ids: None,
            max_tokens: 16,
            truncate: false,
            tokenizer: Blob::describe(b"{\"model\": {}}"),
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
            (
                |m| m.stable.text.as_mut().unwrap().name = "item_ids".into(),
                "has the name of one of the model's inputs",
            ),
            (
                |m| m.stable.text.as_mut().unwrap().input_ids = "tokens".into(),
                "token ids \"tokens\" is not one of the model's inputs",
            ),
            (
                |m| m.stable.text.as_mut().unwrap().input_ids = "user_features".into(),
                "must be INT64 [batch, sequence]",
            ),
            (
                |m| m.stable.text.as_mut().unwrap().max_tokens = 2,
                "max_tokens 2 is under 3",
            ),
            (
                |m| m.stable.text.as_mut().unwrap().tokenizer.size += 1,
                "the tokenizer's chunks add up",
            ),
            (
                |m| m.candidate.as_mut().unwrap().version.text = None,
                "inputs or outputs",
            ),
            (|m| m.stable.variants[0].size += 1, "add up to"),
            (
                |m| m.stable.outputs.push(m.stable.outputs[0].clone()),
                "listed twice",
            ),
        ];
        for (change, needle) in cases {
            let mut m = manifest();
            m.stable.text = Some(text_input());
            if let Some(c) = m.candidate.as_mut() {
                c.version.text = Some(text_input());
            }
            signer.sign(&m).unwrap();
            change(&mut m);
            let err = signer.sign(&m).unwrap_err();
            assert!(
                err.to_string().contains(needle),
                "expected {needle:?} in {err}"
            );
        }
    }

    proptest! {
        #[test]
        fn dims_round_trip(d in -1i64..10_000) {
            let dim = Dim::try_from(d).unwrap();
            prop_assert_eq!(i64::from(dim), d);
        }
    }
}
