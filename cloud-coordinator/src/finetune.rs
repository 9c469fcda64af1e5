//! Fine-tuning a model's head at the coordinator: `POST /v1/models/{name}/finetune` (body: the
//! labelled examples as JSON Lines) and `cloud-coordinator finetune`.
//!
//! The stable version's fp32 model ([`Registry::finetune_source`]) is cut at its head's input;
//! tract computes every example's features; a new head is trained on the training split
//! ([`outpost_runtime::finetune`]); the old and the new head are judged on the held-out split.
//! Only a head better by `min_gain` (accuracy for a classifier, AUC for a score, and a log-loss
//! no worse) is written back into the model, in the same tensors, and pushed like any model:
//! the usual int8 variant and accuracy gate, a signed release, by default as a canary under the
//! health gate. Since only the head's tensors changed, devices fetch only their chunks.

use std::collections::HashMap;
use std::time::Instant;

use outpost_runtime::finetune::{
    self, Evaluation, Head, HeadKind, Label, TrainOptions, feature_model, find_head,
    head::read_head, parse_examples, write_head,
};
use outpost_runtime::text::TextTokenizer;
use prost::Message as _;
use serde::{Deserialize, Serialize};

use crate::admin::encode;
use crate::error::RegistryError;
use crate::registry::{FinetuneSource, Published, Registry};

/// The most examples one fine-tune takes (the data file is bounded by
/// `[registry] max_upload_mb` too).
pub const MAX_EXAMPLES: usize = 200_000;

/// Examples through the feature model at once.
pub const FEATURE_BATCH: usize = 256;

/// The least gain of the headline figure (accuracy or AUC) that publishes, unless the call says
/// otherwise.
pub const DEFAULT_MIN_GAIN: f64 = 0.01;

/// A fine-tune's options, as the query string carries them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FinetuneQuery {
    /// The output whose head is retrained (the model's only output when `None`).
    pub output: Option<String>,
    /// The MatMul/Gemm node to retrain (the one before the output when `None`).
    pub layer: Option<String>,
    /// Share held out for the gate (0.2).
    pub holdout: Option<f64>,
    /// Seed of the split (2026).
    pub seed: Option<u64>,
    /// The least gain that publishes ([`DEFAULT_MIN_GAIN`]).
    pub min_gain: Option<f64>,
    /// Share of devices that get the new version first (10: a canary under the health gate;
    /// 100: stable at once).
    pub rollout: Option<u8>,
    /// Train and judge, publish nothing.
    pub dry_run: bool,
}

impl FinetuneQuery {
    /// The query string.
    pub fn to_query(&self) -> String {
        let mut q = format!("dry_run={}", self.dry_run);
        for (key, value) in [
            ("output", self.output.as_deref().map(encode)),
            ("layer", self.layer.as_deref().map(encode)),
            ("holdout", self.holdout.map(|v| v.to_string())),
            ("seed", self.seed.map(|v| v.to_string())),
            ("min_gain", self.min_gain.map(|v| v.to_string())),
            ("rollout", self.rollout.map(|v| v.to_string())),
        ] {
            if let Some(v) = value {
                q.push_str(&format!("&{key}={v}"));
            }
        }
        q
    }

    /// Reads a decoded query; the error names the key.
    pub fn parse(query: &HashMap<String, String>) -> Result<Self, String> {
        fn number<T: std::str::FromStr>(
            query: &HashMap<String, String>,
            key: &str,
            what: &str,
        ) -> Result<Option<T>, String> {
            query
                .get(key)
                .map(|v| v.parse().map_err(|_| format!("{key} {v:?} is not {what}")))
                .transpose()
        }
        let rollout: Option<u8> = number(query, "rollout", "a percentage from 1 to 100")?;
        if rollout.is_some_and(|p| p == 0 || p > 100) {
            return Err("rollout must be from 1 to 100".into());
        }
        Ok(Self {
            output: query.get("output").cloned(),
            layer: query.get("layer").cloned(),
            holdout: number(query, "holdout", "a share such as 0.2")?,
            seed: number(query, "seed", "a whole number")?,
            min_gain: number(query, "min_gain", "a share such as 0.01")?,
            rollout,
            dry_run: match query.get("dry_run").map(String::as_str) {
                None | Some("false") => false,
                Some("" | "true") => true,
                Some(v) => return Err(format!("dry_run {v:?} is not true or false")),
            },
        })
    }

    /// The share of devices the new version goes to first.
    pub fn rollout_percent(&self) -> u8 {
        self.rollout.unwrap_or(10)
    }
}

/// What a fine-tune did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FinetuneReport {
    /// The model.
    pub model: String,
    /// The stable version it started from.
    pub from_version: u64,
    /// The head retrained.
    pub head: Head,
    /// Examples read.
    pub examples: usize,
    /// Of which trained on.
    pub train: usize,
    /// Of which used for early stopping.
    pub validation: usize,
    /// Of which held out for the gate.
    pub holdout: usize,
    /// Seconds computing the features.
    pub features_s: f64,
    /// Examples per second through the feature model.
    pub examples_per_s: f64,
    /// Seconds training.
    pub train_s: f64,
    /// L-BFGS iterations.
    pub iterations: u64,
    /// The current head on the held-out examples.
    pub old: Evaluation,
    /// The new head on the held-out examples.
    pub new: Evaluation,
    /// The gain the headline figure needed.
    pub min_gain: f64,
    /// Whether the new head passed the gate.
    pub improved: bool,
    /// The version published (or, for a dry run, what would be), when the head passed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub published: Option<Published>,
    /// Why nothing was published, when the head did not pass (the admin API's refusals carry
    /// their reason as `error`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What a running fine-tune tells, in order: the admin API streams these as JSON Lines (one
/// object a line, `"event"` naming it) when the call sends `Accept: application/x-ndjson`, and
/// the last line is always [`FinetuneEvent::Done`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum FinetuneEvent {
    /// The examples were read and checked.
    Read {
        /// How many.
        examples: usize,
    },
    /// Features computed so far.
    Features {
        /// Examples through the feature model.
        done: usize,
        /// Of how many.
        total: usize,
        /// Examples a second so far.
        per_s: f64,
    },
    /// The head is being trained.
    Training {
        /// On how many examples.
        examples: usize,
    },
    /// The new head passed; the new version is being quantised, gated and signed.
    Publishing,
    /// The end.
    Done {
        /// The HTTP status the call ends with (as the answer without streaming would have).
        status: u16,
        /// The report, when it got as far as judging the head.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        report: Option<Box<FinetuneReport>>,
        /// Why it failed, when it did.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
}

/// The figure the gate reads, named.
fn headline(kind: HeadKind) -> &'static str {
    match kind {
        HeadKind::Classifier => "accuracy",
        HeadKind::Score => "AUC",
    }
}

/// One line: `accuracy 0.061 → 0.957, log-loss 5.120 → 0.140`.
pub fn describe(report: &FinetuneReport) -> String {
    format!(
        "{} {:.3} → {:.3}, log-loss {:.3} → {:.3} on {} held-out examples",
        headline(report.head.kind),
        report.old.headline().unwrap_or(f64::NAN),
        report.new.headline().unwrap_or(f64::NAN),
        report.old.log_loss,
        report.new.log_loss,
        report.holdout
    )
}

/// A head that passed: the new model file and what it was made from.
pub type Trained = (Vec<u8>, FinetuneSource);

/// Trains and judges a new head for `name` on `data`; returns the report and, when the head
/// passed, the new model and what it was made from. Publishes nothing.
pub fn train(
    registry: &Registry,
    name: &str,
    data: &[u8],
    query: &FinetuneQuery,
    threads: usize,
    progress: &mut dyn FnMut(FinetuneEvent),
) -> Result<(FinetuneReport, Option<Trained>), RegistryError> {
    let bad = RegistryError::BadRequest;
    let source = registry.finetune_source(name)?;
    let mut model = tract_onnx::pb::ModelProto::decode(source.model.as_slice())
        .map_err(|e| RegistryError::Storage(format!("the stored model does not decode: {e}")))?;
    let head = find_head(&model, query.output.as_deref(), query.layer.as_deref())
        .map_err(|e| bad(format!("{name} version {}: {e}", source.version)))?;
    let tokenizer = source
        .text
        .as_ref()
        .map(|(spec, json)| TextTokenizer::load(json, spec))
        .transpose()
        .map_err(|e| RegistryError::Storage(format!("the stored tokenizer: {e}")))?;
    let examples = parse_examples(
        data,
        &source.inputs,
        &head,
        MAX_EXAMPLES,
        tokenizer.as_ref(),
    )
    .map_err(|e| bad(e.to_string()))?;
    let options = TrainOptions {
        holdout: query.holdout.unwrap_or(TrainOptions::default().holdout),
        seed: query.seed.unwrap_or(TrainOptions::default().seed),
        ..TrainOptions::default()
    };
    let split = finetune::split(examples.len(), &options).map_err(|e| bad(e.to_string()))?;
    progress(FinetuneEvent::Read {
        examples: examples.len(),
    });
    let labels: Vec<Label> = examples.iter().map(|e| e.label).collect();
    let held_classes = |kind| match kind {
        HeadKind::Classifier => true,
        HeadKind::Score => {
            let positive = split
                .holdout
                .iter()
                .filter(|&&i| matches!(labels[i], Label::Target(t) if t >= 0.5))
                .count();
            positive > 0 && positive < split.holdout.len()
        }
    };
    if !held_classes(head.kind) {
        return Err(bad(
            "the held-out examples are all positive or all negative: AUC needs both (more data, or another --seed)".into(),
        ));
    }

    let cut = feature_model(&model, &head)
        .map_err(|e| bad(e.to_string()))?
        .encode_to_vec();
    let started = Instant::now();
    let mut features_progress = |done: usize, total: usize| {
        progress(FinetuneEvent::Features {
            done,
            total,
            per_s: done as f64 / started.elapsed().as_secs_f64().max(1e-9),
        });
    };
    let features = finetune::compute_features(
        &cut,
        &examples,
        FEATURE_BATCH,
        threads,
        &mut features_progress,
    )
    .map_err(|e| bad(e.to_string()))?;
    let features_s = started.elapsed().as_secs_f64();
    if features.width != head.inputs {
        return Err(bad(format!(
            "the head takes {} features, the graph gives {}",
            head.inputs, features.width
        )));
    }
    let (old_w, old_b) = read_head(&model, &head).map_err(|e| bad(e.to_string()))?;
    let judge = |w: &[f32], b: &[f32]| {
        finetune::evaluate(
            &features,
            &labels,
            &split.holdout,
            head.kind,
            head.outputs,
            (w, b),
        )
        .map_err(|e| RegistryError::Storage(e.to_string()))
    };
    let old = judge(&old_w, &old_b)?;
    progress(FinetuneEvent::Training {
        examples: split.train.len(),
    });
    let started = Instant::now();
    let trained = finetune::train_head(
        &features,
        &labels,
        &split,
        head.kind,
        head.outputs,
        head.bias.is_some(),
        (&old_w, &old_b),
        &options,
    )
    .map_err(|e| RegistryError::Storage(e.to_string()))?;
    let train_s = started.elapsed().as_secs_f64();
    let new = judge(&trained.weight, &trained.bias)?;
    let min_gain = query.min_gain.unwrap_or(DEFAULT_MIN_GAIN);
    let improved = match (old.headline(), new.headline()) {
        (Some(o), Some(n)) => n >= o + min_gain && new.log_loss <= old.log_loss,
        _ => false,
    };
    let mut report = FinetuneReport {
        model: name.to_owned(),
        from_version: source.version,
        head: head.clone(),
        examples: examples.len(),
        train: split.train.len(),
        validation: split.validation.len(),
        holdout: split.holdout.len(),
        features_s,
        examples_per_s: examples.len() as f64 / features_s.max(1e-9),
        train_s,
        iterations: trained.iterations,
        old,
        new,
        min_gain,
        improved,
        published: None,
        error: None,
    };
    if !improved {
        report.error = Some(format!(
            "the new head is not better by {min_gain} {}: {}; nothing was published",
            headline(head.kind),
            describe(&report)
        ));
        return Ok((report, None));
    }
    write_head(&mut model, &head, &trained.weight, &trained.bias)
        .map_err(|e| RegistryError::Storage(e.to_string()))?;
    Ok((report, Some((model.encode_to_vec(), source))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_query_round_trips_and_names_bad_values() {
        let q = FinetuneQuery {
            output: Some("intent probs".into()),
            holdout: Some(0.25),
            rollout: Some(100),
            dry_run: true,
            ..FinetuneQuery::default()
        };
        let text = q.to_query();
        let parsed = crate::admin::parse_query_for_tests(&text);
        assert_eq!(FinetuneQuery::parse(&parsed).unwrap(), q);
        let mut bad = HashMap::new();
        bad.insert("rollout".to_owned(), "0".to_owned());
        assert!(FinetuneQuery::parse(&bad).unwrap_err().contains("rollout"));
        bad.insert("rollout".to_owned(), "ten".to_owned());
        assert!(FinetuneQuery::parse(&bad).unwrap_err().contains("\"ten\""));
    }
}
