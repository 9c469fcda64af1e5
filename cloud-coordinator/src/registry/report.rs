//! What the registry reports to operators (the admin API's wire types, which the
//! [`AdminClient`](crate::AdminClient) reads back): a push request, a published version with its
//! variants, int8 figures and the delta against the stable version, and model summaries.

use std::collections::HashSet;

use outpost_runtime::accuracy::{AccuracyReport, OutputKind, Tolerance};
use outpost_runtime::quantize::QuantizeReport;
use outpost_shared::{ChunkId, ModelVersion, Placement, Target, TensorSpec, Variant};
use serde::{Deserialize, Serialize};

/// What an operator asks to publish.
#[derive(Debug, Clone)]
pub struct PushRequest {
    /// The model's name.
    pub name: String,
    /// The model file (runs on devices, or in the cloud for `cloud` placement).
    pub model: Vec<u8>,
    /// An optional bigger model with the same signature, run by the coordinator.
    pub cloud_model: Option<Vec<u8>>,
    /// Where inference runs.
    pub placement: Placement,
    /// The share of devices that get this version first (100: everyone, at once).
    pub rollout_percent: u8,
    /// The most rows one request may carry (see [`outpost_shared::ModelVersion::max_batch`]).
    pub max_batch: Option<u64>,
    /// Weight quantisation of the edge variant; `None`: int8 whenever devices run the model.
    pub quantize: Option<Quantize>,
    /// Inputs for the accuracy gate, as an Open Inference Protocol request body
    /// (`{"inputs": [...]}`); generated from the signature when absent.
    pub samples: Option<Vec<u8>>,
    /// A HuggingFace `tokenizer.json`: devices then take text for the model's token ids.
    pub tokenizer: Option<Vec<u8>>,
    /// The text input the tokenizer serves.
    pub text: TextOptions,
    /// What outputs are, for the accuracy gate; the others' kind is read from the graph and
    /// their shape ([`OutputKind`]).
    pub output_kinds: Vec<(String, OutputKind)>,
    /// This push's overrides of the gate's tolerance (`[registry] int8_*`).
    pub int8: Int8Overrides,
    /// Measure and report, but store and publish nothing.
    pub dry_run: bool,
    /// When the version goes out as a candidate: the health gate that widens, promotes or
    /// aborts its rollout (`None`: it stays where the operator puts it).
    pub gate: Option<firmware_config::RolloutSection>,
    /// The devices known now (those with a status): a candidate's cohort salt is chosen so
    /// that at most `rollout_percent` percent of them fall in it
    /// ([`outpost_shared::rollout::choose_salt`]).
    pub known_devices: Vec<String>,
    /// The `[[backend]]` that serves its offloaded calls (checked against the config by the
    /// admin API); `None`: the worker pool, or a backend whose `models` list it.
    pub backend: Option<String>,
}

/// How a pushed tokenizer's text input is described; `None` fields are found from the model.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TextOptions {
    /// The name apps give the text (default `text`).
    pub name: Option<String>,
    /// The most tokens a text may have (default: the tokenizer's own truncation length, else
    /// 512); the push checks that the model runs at it.
    pub max_tokens: Option<u32>,
    /// Cut longer texts instead of refusing them.
    pub truncate: bool,
}

/// Weight quantisation of the edge variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quantize {
    /// Keep fp32 weights.
    None,
    /// Weight-only int8, per output channel, behind the accuracy gate.
    Int8,
}

/// One push's overrides of the int8 gate's tolerance; `None` keeps `[registry]`'s.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Int8Overrides {
    /// `int8_max_abs_error` (scores).
    pub max_abs_error: Option<f64>,
    /// `int8_max_prob_error` (classifiers).
    pub max_prob_error: Option<f64>,
    /// `int8_min_cosine` (embeddings).
    pub min_cosine: Option<f64>,
    /// `int8_min_top1_agreement` (classifiers).
    pub min_top1_agreement: Option<f64>,
    /// `int8_max_kept_share` (the fallback).
    pub max_kept_share: Option<f64>,
}

impl Int8Overrides {
    /// Each override with its key, as the push query and `[registry]` name it.
    pub fn entries(&self) -> [(&'static str, Option<f64>); 5] {
        [
            ("int8_max_abs_error", self.max_abs_error),
            ("int8_max_prob_error", self.max_prob_error),
            ("int8_min_cosine", self.min_cosine),
            ("int8_min_top1_agreement", self.min_top1_agreement),
            ("int8_max_kept_share", self.max_kept_share),
        ]
    }

    /// The override named `key`, to set.
    pub fn entry_mut(&mut self, key: &str) -> Option<&mut Option<f64>> {
        match key {
            "int8_max_abs_error" => Some(&mut self.max_abs_error),
            "int8_max_prob_error" => Some(&mut self.max_prob_error),
            "int8_min_cosine" => Some(&mut self.min_cosine),
            "int8_min_top1_agreement" => Some(&mut self.min_top1_agreement),
            "int8_max_kept_share" => Some(&mut self.max_kept_share),
            _ => None,
        }
    }

    /// `defaults` with these overrides.
    pub fn apply(&self, defaults: &Tolerance) -> Tolerance {
        Tolerance {
            max_abs_error: self.max_abs_error.unwrap_or(defaults.max_abs_error),
            max_prob_error: self.max_prob_error.unwrap_or(defaults.max_prob_error),
            min_cosine: self.min_cosine.unwrap_or(defaults.min_cosine),
            min_top1_agreement: self
                .min_top1_agreement
                .unwrap_or(defaults.min_top1_agreement),
        }
    }
}

/// What making the int8 edge variant did: kept per version, shown by `GET /v1/models`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EdgeReport {
    /// Sizes and what was quantised.
    pub quantize: QuantizeReport,
    /// The accuracy gate's figures against the fp32 model (of the variant shipped).
    pub accuracy: AccuracyReport,
    /// When the all-int8 variant missed the tolerance: the weights kept in fp32 so that it
    /// passes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<Fallback>,
}

/// How the gate quantised less: the all-int8 variant missed the tolerance, so the weights that
/// hurt most when quantised alone were kept in fp32, one by one, until it passed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Fallback {
    /// What the all-int8 variant missed.
    pub missed: Vec<String>,
    /// The weights kept in fp32, most sensitive first.
    pub kept: Vec<KeptWeight>,
    /// The share (0–1) of the quantisable weights, by element count, kept in fp32.
    pub kept_share: f64,
    /// What keeping them costs: bytes over the all-int8 variant.
    pub extra_bytes: u64,
    /// The all-int8 variant's size in bytes.
    pub all_int8_bytes: u64,
    /// Gate runs it took (one a weight to rank them, one a weight kept).
    pub gate_runs: usize,
}

/// A weight the fallback kept in fp32.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeptWeight {
    /// The initializer.
    pub name: String,
    /// Its elements.
    pub elements: u64,
    /// How far the gate was towards its tolerance with this weight alone quantised (1: at the
    /// tolerance); `None` when that made the model produce NaN or infinity.
    pub distance_alone: Option<f64>,
}

/// How much of a variant devices that run the stable version lack.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Delta {
    /// The variant.
    pub target: Target,
    /// The stable version it is compared with (none: a new model).
    pub against_version: Option<u64>,
    /// Its chunks.
    pub chunks: usize,
    /// Chunks the stable version's variant does not have.
    pub new_chunks: usize,
    /// Its size in bytes.
    pub bytes: u64,
    /// Bytes in those new chunks: what an up-to-date device downloads.
    pub new_bytes: u64,
}

/// Whether a published version went to every device or to a rollout cohort first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    /// Every device runs it.
    Stable,
    /// A share of the devices runs it, the others the stable version.
    Candidate,
}

impl Stage {
    /// `stable` or `candidate`, as the admin API writes it.
    pub const fn as_str(self) -> &'static str {
        match self {
            Stage::Stable => "stable",
            Stage::Candidate => "candidate",
        }
    }
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The answer to a push or rollback.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Published {
    /// The model.
    pub model: String,
    /// The new model version.
    pub version: u64,
    /// The release number of the new manifest.
    pub release: u64,
    /// Whether the version is stable or a candidate.
    pub stage: Stage,
    /// True when nothing was stored or announced (`dry_run`).
    pub dry_run: bool,
    /// Each variant's target and size.
    pub variants: Vec<VariantSummary>,
    /// Chunks stored by this push that were not stored before (would be, for a dry run).
    pub new_chunks: usize,
    /// Each variant against the stable version's.
    pub delta: Vec<Delta>,
    /// The int8 edge variant's sizes and accuracy, when one was made.
    pub edge: Option<EdgeReport>,
}

/// A variant in listings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VariantSummary {
    /// Its target.
    pub target: Target,
    /// Its size in bytes.
    pub size: u64,
    /// How many chunks.
    pub chunks: usize,
}

/// What a push or rollback gives: the answer, and the signed manifest to announce (none for a
/// dry run).
pub type Outcome = (Published, Option<Vec<u8>>);

/// A model in `GET /v1/models`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelSummary {
    /// The model.
    pub name: String,
    /// Current release number.
    pub release: u64,
    /// The stable version.
    pub stable: u64,
    /// The candidate version and its rollout share.
    pub candidate: Option<(u64, u8)>,
    /// Kept versions, oldest first.
    pub versions: Vec<u64>,
    /// The signature.
    pub inputs: Vec<TensorSpec>,
    /// The outputs.
    pub outputs: Vec<TensorSpec>,
    /// The stable version's placement.
    pub placement: Placement,
    /// The stable version's text input, when it was pushed with a tokenizer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<outpost_shared::TextInput>,
    /// The stable version's variants.
    pub variants: Vec<VariantSummary>,
    /// The stable version's int8 figures, when its edge variant is int8.
    pub edge: Option<EdgeReport>,
    /// The last steps of its rollouts, oldest first.
    #[serde(default)]
    pub rollout_history: Vec<super::RolloutEvent>,
    /// The health gate of the candidate's rollout, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gate: Option<firmware_config::RolloutSection>,
    /// The `[[backend]]` it was pushed to (`push --backend`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    /// Its offloaded calls since this coordinator started.
    #[serde(default)]
    pub offloaded: OffloadCounts,
}

/// Offloaded calls of one model since the coordinator started, by how they ended, and its
/// rate.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OffloadCounts {
    /// Answered.
    pub ok: u64,
    /// Failed (the model, its backend, or the inputs).
    pub error: u64,
    /// Refused `Busy`: the worker pool's queue or every backend replica was full.
    pub busy: u64,
    /// Refused `Busy` by a `[gateway]` rate limit.
    pub rate_limited: u64,
    /// Calls (however they ended) in the last 60 seconds: the model's offload rate.
    #[serde(default)]
    pub last_minute: u64,
}

/// `variant` against the stable version's variant for the same place (any edge variant stands
/// for another: devices hold one of them).
pub(super) fn delta(variant: &Variant, stable: Option<&ModelVersion>) -> Delta {
    let edge = |t: Target| matches!(t, Target::EdgeInt8 | Target::EdgeFp32);
    let old = stable.and_then(|s| {
        s.variant(variant.target)
            .map(|v| (s.version, v))
            .or_else(|| {
                s.variants
                    .iter()
                    .find(|v| edge(v.target) && edge(variant.target))
                    .map(|v| (s.version, v))
            })
    });
    let held: HashSet<ChunkId> = old
        .map(|(_, v)| v.chunks.iter().map(|c| c.id).collect())
        .unwrap_or_default();
    let mut seen = HashSet::new();
    let fresh: Vec<_> = variant
        .chunks
        .iter()
        .filter(|c| !held.contains(&c.id) && seen.insert(c.id))
        .collect();
    Delta {
        target: variant.target,
        against_version: old.map(|(v, _)| v),
        chunks: variant.chunks.len(),
        new_chunks: fresh.len(),
        bytes: variant.size,
        new_bytes: fresh.iter().map(|c| u64::from(c.size)).sum(),
    }
}

pub(super) fn summary(v: &Variant) -> VariantSummary {
    VariantSummary {
        target: v.target,
        size: v.size,
        chunks: v.chunks.len(),
    }
}
