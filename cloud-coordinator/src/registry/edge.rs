//! The edge variant of a push: the model quantised to int8 and measured against the original
//! on samples (the operator's, or generated) by the accuracy gate; refused past the tolerance.

use serde::Deserialize;

use super::{EdgeReport, PushRequest, Registry};
use crate::error::RegistryError;
use outpost_runtime::accuracy::{self, GraphFacts};
use outpost_runtime::quantize;
use outpost_runtime::tract::{TractModel, TractOptions};
use outpost_shared::Placement;

impl Registry {
    /// Quantises the edge model to int8 and runs the accuracy gate; `None` when the model has
    /// no weight worth quantising (it then ships as fp32).
    pub(super) fn int8_variant(
        &self,
        request: &PushRequest,
        fp32: &TractModel,
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
        let int8 = TractModel::load_with(&quantized.bytes, CHECK_ONLY).map_err(|e| {
            RegistryError::BadModel(format!(
                "the int8 variant does not load ({e}); push with quantize=none"
            ))
        })?;
        let facts = GraphFacts::read(&request.model).map_err(RegistryError::BadModel)?;
        let mut classifiers = facts.softmax_outputs.clone();
        if let Placement::Cascade { output, .. } = &request.placement {
            classifiers.insert(output.clone());
        }
        let report = match &request.samples {
            Some(file) => {
                let samples = parse_samples(file)?;
                accuracy::compare(
                    fp32,
                    &int8,
                    &samples,
                    &classifiers,
                    "the operator's samples",
                )
                .map_err(|e| RegistryError::BadRequest(format!("sample file: {e}")))?
            }
            None => {
                let samples = accuracy::generate_samples(&fp32.inputs, &facts, SAMPLE_SEED)
                    .map_err(RegistryError::BadModel)?;
                accuracy::compare(fp32, &int8, &samples, &classifiers, "generated from the signature")
                    .map_err(|e| {
                        RegistryError::BadModel(format!(
                            "accuracy gate: {e}; give sample inputs (samples) or push with quantize=none"
                        ))
                    })?
            }
        };
        let violations = report.violations(&self.tolerance);
        if !violations.is_empty() {
            return Err(RegistryError::BadModel(format!(
                "the int8 variant fails the accuracy gate: {}. Measured: {report}. Push with quantize=none, or raise the tolerance in [registry] of the coordinator's config",
                violations.join("; ")
            )));
        }
        tracing::info!(
            model = request.name,
            fp32_bytes = quantized.report.fp32_bytes,
            int8_bytes = quantized.report.int8_bytes,
            accuracy = %report,
            "int8 edge variant passed the accuracy gate"
        );
        Ok(Some((
            quantized.bytes,
            EdgeReport {
                quantize: quantized.report,
                accuracy: report,
            },
        )))
    }
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
