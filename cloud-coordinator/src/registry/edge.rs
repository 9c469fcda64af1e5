//! The edge variant of a push: the model quantised to int8 and measured against the original
//! on samples (the operator's, or generated) by the accuracy gate, each output judged by its
//! kind. When the all-int8 variant misses the tolerance the gate quantises less rather than
//! give up: it ranks the int8 weights by how far each alone moves the gate, keeps the most
//! sensitive in fp32 one by one until the variant passes, and reports which and what they cost.
//! Past `[registry] int8_max_kept_share` of the weights it refuses the push, with the figures.

use std::collections::HashMap;

use serde::Deserialize;

use super::{EdgeReport, Fallback, KeptWeight, PushRequest, Registry};
use crate::error::RegistryError;
use outpost_runtime::accuracy::{self, AccuracyReport, GraphFacts, OutputKind, Tolerance};
use outpost_runtime::quantize::{self, Quantized};
use outpost_runtime::text::TextTokenizer;
use outpost_runtime::tract::{TractModel, TractOptions};
use outpost_shared::{Placement, Tensor};

impl Registry {
    /// Quantises the edge model to int8 and runs the accuracy gate; `None` when the model has
    /// no weight worth quantising (it then ships as fp32).
    pub(super) fn int8_variant(
        &self,
        request: &PushRequest,
        fp32: &TractModel,
        text: Option<&TextTokenizer>,
    ) -> Result<Option<(Vec<u8>, EdgeReport)>, RegistryError> {
        let quantized = quantize::quantize_int8(&request.model)
            .map_err(|e| RegistryError::BadModel(format!("int8: {e}; push with quantize=none")))?;
        if quantized.report.tensors == 0 {
            tracing::info!(
                model = request.name,
                "no weight with {} or more elements to quantise; the edge variant stays fp32",
                quantize::MIN_ELEMENTS
            );
            return Ok(None);
        }
        let facts = GraphFacts::read(&request.model).map_err(RegistryError::BadModel)?;
        let (samples, source) = match (&request.samples, text) {
            (Some(file), _) => (parse_samples(file)?, Source::Operator),
            (None, Some(tokenizer)) => (
                super::text::gate_samples(tokenizer, fp32, &facts, SAMPLE_SEED)?,
                Source::Texts,
            ),
            (None, None) => (
                accuracy::generate_samples(&fp32.inputs, &facts, SAMPLE_SEED)
                    .map_err(RegistryError::BadModel)?,
                Source::Signature,
            ),
        };
        let gate = Gate {
            fp32,
            samples,
            source,
            kinds: output_kinds(request, &facts, fp32)?,
            tolerance: request.int8.apply(&self.tolerance),
        };
        let report = gate.measure(&quantized.bytes)?;
        let missed = report.violations(&gate.tolerance);
        if missed.is_empty() {
            tracing::info!(
                model = request.name,
                fp32_bytes = quantized.report.fp32_bytes,
                int8_bytes = quantized.report.int8_bytes,
                accuracy = %report,
                "int8 edge variant passed the accuracy gate"
            );
            let edge = EdgeReport {
                quantize: quantized.report,
                accuracy: report,
                fallback: None,
            };
            return Ok(Some((quantized.bytes, edge)));
        }
        let max_kept_share = request.int8.max_kept_share.unwrap_or(self.max_kept_share);
        let (kept, edge) =
            gate.keep_fp32_until_pass(request, &quantized, &report, missed, max_kept_share)?;
        tracing::info!(
            model = request.name,
            kept = ?edge.quantize.kept_fp32,
            int8_bytes = edge.quantize.int8_bytes,
            accuracy = %edge.accuracy,
            "int8 edge variant passed the accuracy gate with weights kept in fp32"
        );
        Ok(Some((kept, edge)))
    }
}

/// Where the gate's samples come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// The push's sample file.
    Operator,
    /// Texts of the tokenizer's words, tokenized (a push with a tokenizer).
    Texts,
    /// Generated from the signature and the graph's index ranges.
    Signature,
}

/// The accuracy gate of one push: the fp32 model, the samples, what each output is and the
/// tolerance.
struct Gate<'a> {
    fp32: &'a TractModel,
    samples: Vec<Tensor>,
    source: Source,
    kinds: HashMap<String, OutputKind>,
    tolerance: Tolerance,
}

impl Gate<'_> {
    /// The figures of the int8 file `bytes` against the fp32 model.
    fn measure(&self, bytes: &[u8]) -> Result<AccuracyReport, RegistryError> {
        let int8 = TractModel::load_with(bytes, CHECK_ONLY).map_err(|e| {
            RegistryError::BadModel(format!(
                "the int8 variant does not load ({e}); push with quantize=none"
            ))
        })?;
        let source = match self.source {
            Source::Operator => "the operator's samples",
            Source::Texts => "texts from the tokenizer's vocabulary",
            Source::Signature => "generated from the signature",
        };
        accuracy::compare(self.fp32, &int8, &self.samples, &self.kinds, source).map_err(|e| {
            if self.source == Source::Operator {
                RegistryError::BadRequest(format!("sample file: {e}"))
            } else {
                RegistryError::BadModel(format!(
                    "accuracy gate: {e}; give sample inputs (samples) or push with quantize=none"
                ))
            }
        })
    }

    /// The fallback: ranks the weights of `all_int8` by the gate's distance with each alone
    /// quantised, then keeps them in fp32, most sensitive first, until the variant passes or
    /// `max_kept_share` of the weights would be kept (refused).
    fn keep_fp32_until_pass(
        &self,
        request: &PushRequest,
        all_int8: &Quantized,
        all_int8_report: &AccuracyReport,
        missed: Vec<String>,
        max_kept_share: f64,
    ) -> Result<(Vec<u8>, EdgeReport), RegistryError> {
        let quantize = |keep: &[String]| {
            quantize::quantize_int8_keeping(&request.model, keep)
                .map_err(|e| RegistryError::BadModel(format!("int8: {e}; push with quantize=none")))
        };
        let weights = &all_int8.weights;
        let total: u64 = weights.iter().map(|(_, n)| n).sum();
        tracing::info!(
            model = request.name,
            missed = ?missed,
            weights = weights.len(),
            "the int8 variant misses the accuracy gate; ranking its weights to keep the most sensitive in fp32"
        );
        let mut ranked = Vec::with_capacity(weights.len());
        for (i, (name, elements)) in weights.iter().enumerate() {
            let others: Vec<String> = weights
                .iter()
                .filter(|(n, _)| n != name)
                .map(|(n, _)| n.clone())
                .collect();
            let distance = self
                .measure(&quantize(&others)?.bytes)?
                .distance(&self.tolerance);
            // NaN sorts as the most sensitive.
            let distance = if distance.is_nan() {
                f64::INFINITY
            } else {
                distance
            };
            ranked.push((i, name.clone(), *elements, distance));
        }
        let ranking_runs = ranked.len();
        ranked.sort_by(|a, b| b.3.total_cmp(&a.3).then(a.0.cmp(&b.0)));

        let mut keep = Vec::new();
        let mut kept = Vec::new();
        let mut kept_elements = 0u64;
        let mut last = (all_int8_report.clone(), missed.clone());
        for (_, name, elements, distance) in ranked {
            if (kept_elements + elements) as f64 > max_kept_share * total as f64 {
                break;
            }
            keep.push(name.clone());
            kept.push(KeptWeight {
                name,
                elements,
                distance_alone: distance.is_finite().then_some(distance),
            });
            kept_elements += elements;
            let candidate = quantize(&keep)?;
            let report = self.measure(&candidate.bytes)?;
            let violations = report.violations(&self.tolerance);
            if violations.is_empty() {
                let fallback = Fallback {
                    missed,
                    kept,
                    kept_share: kept_elements as f64 / total.max(1) as f64,
                    extra_bytes: candidate
                        .report
                        .int8_bytes
                        .saturating_sub(all_int8.report.int8_bytes),
                    all_int8_bytes: all_int8.report.int8_bytes,
                    gate_runs: ranking_runs + keep.len(),
                };
                let edge = EdgeReport {
                    quantize: candidate.report,
                    accuracy: report,
                    fallback: Some(fallback),
                };
                return Ok((candidate.bytes, edge));
            }
            last = (report, violations);
        }
        let kept_names: Vec<&str> = kept.iter().map(|k| k.name.as_str()).collect();
        Err(RegistryError::BadModel(format!(
            "the int8 variant fails the accuracy gate: {}. Measured: {all_int8_report}. Keeping the most sensitive weights in fp32 did not pass within {:.0} % of the weights ([registry] int8_max_kept_share {max_kept_share}; kept {}: {}). Push with quantize=none, or raise the tolerance (int8_* in [registry] of the coordinator's config, or in the push)",
            missed.join("; "),
            max_kept_share * 100.0,
            if kept_names.is_empty() {
                "none".to_owned()
            } else {
                kept_names.join(", ")
            },
            last.1.join("; "),
        )))
    }
}

/// What each output is: the push's word first, then the graph's (a Softmax's output, or the
/// cascade's, is a classifier); the rest is read from the output's shape when measured.
fn output_kinds(
    request: &PushRequest,
    facts: &GraphFacts,
    fp32: &TractModel,
) -> Result<HashMap<String, OutputKind>, RegistryError> {
    let mut kinds = facts.kinds();
    if let Placement::Cascade { output, .. } = &request.placement {
        kinds.insert(output.clone(), OutputKind::Classifier);
    }
    for (name, kind) in &request.output_kinds {
        if !fp32.outputs.iter().any(|o| &o.name == name) {
            let names: Vec<&str> = fp32.outputs.iter().map(|o| o.name.as_str()).collect();
            return Err(RegistryError::BadRequest(format!(
                "output_kinds names {name:?}, which is not an output of the model (its outputs: {})",
                names.join(", ")
            )));
        }
        kinds.insert(name.clone(), *kind);
    }
    Ok(kinds)
}

/// Models loaded at push run a few times (the gate) and are dropped: no per-shape plans, whose
/// optimisation would only compete with the push for the CPU.
pub(super) const CHECK_ONLY: TractOptions = TractOptions {
    threads: 1,
    shape_plans: 0,
};

/// The seed of generated gate samples: the same model is always measured on the same inputs.
const SAMPLE_SEED: u64 = 0x6f75_7470_6f73_7431;

/// The operator's sample inputs: an Open Inference Protocol request body.
fn parse_samples(file: &[u8]) -> Result<Vec<outpost_shared::Tensor>, RegistryError> {
    #[derive(Deserialize)]
    struct SampleFile {
        inputs: Vec<outpost_shared::JsonTensor>,
    }
    let bad = |e: String| {
        RegistryError::BadRequest(format!(
            "sample file: {e} (expected an inference request body: {{\"inputs\": [...]}})"
        ))
    };
    let parsed: SampleFile = serde_json::from_slice(file).map_err(|e| bad(e.to_string()))?;
    parsed
        .inputs
        .iter()
        .map(outpost_shared::Tensor::from_json)
        .collect::<Result<_, _>>()
        .map_err(|e| bad(e.to_string()))
}
