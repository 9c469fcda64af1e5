//! What a fine-tune starts from: the stable version's fp32 model and the options it was pushed
//! with (see [`crate::finetune`]).

use outpost_shared::{Placement, Target, TensorSpec, TextInput, Variant};

use super::{Quantize, Registry};
use crate::error::RegistryError;

/// What a fine-tune starts from (see [`Registry::finetune_source`]).
#[derive(Debug, Clone)]
pub struct FinetuneSource {
    /// The stable version.
    pub version: u64,
    /// The fp32 model its edge variant was made from.
    pub model: Vec<u8>,
    /// Its separate cloud model, if it has one.
    pub cloud_model: Option<Vec<u8>>,
    /// Where it runs.
    pub placement: Placement,
    /// Its `max_batch`.
    pub max_batch: Option<u64>,
    /// How its edge variant was made.
    pub quantize: Quantize,
    /// Its inputs.
    pub inputs: Vec<TensorSpec>,
    /// Its text input and `tokenizer.json`, kept by the fine-tuned version.
    pub text: Option<(TextInput, Vec<u8>)>,
}

impl Registry {
    /// What a fine-tune of `model` starts from: its stable version and the fp32 file its
    /// edge variant was made from (the edge fp32 variant, or the cloud variant when the int8
    /// edge variant is exactly its quantisation), with the push options to publish it again.
    pub fn finetune_source(&self, model: &str) -> Result<FinetuneSource, RegistryError> {
        let record = self
            .record(model)?
            .ok_or_else(|| RegistryError::NotFound(format!("no model {model:?}")))?;
        let v = record.version(record.stable).ok_or_else(|| {
            RegistryError::Storage(format!("model {model} lost version {}", record.stable))
        })?;
        let assemble = |variant: &Variant| {
            self.chunks
                .assemble(variant)
                .map_err(|e| RegistryError::Storage(e.to_string()))
        };
        let (edge_fp32, edge_int8, cloud) = (
            v.variant(Target::EdgeFp32),
            v.variant(Target::EdgeInt8),
            v.variant(Target::CloudFp32),
        );
        let (bytes, cloud_model, quantize) = match (edge_fp32, edge_int8, cloud) {
            (Some(edge), _, cloud) => {
                let separate = cloud.filter(|c| c.digest != edge.digest);
                (
                    assemble(edge)?,
                    separate.map(assemble).transpose()?,
                    Quantize::None,
                )
            }
            (None, Some(int8), Some(cloud)) => {
                let bytes = assemble(cloud)?;
                let same = outpost_runtime::quantize::quantize_int8(&bytes)
                    .is_ok_and(|q| outpost_shared::chunk::Digest::of(&q.bytes) == int8.digest);
                if !same {
                    return Err(RegistryError::BadRequest(format!(
                        "{model} version {} keeps its int8 edge variant and a separate cloud model, not the fp32 file the edge variant was made from: push that file again and fine-tune it",
                        v.version
                    )));
                }
                (bytes, None, Quantize::Int8)
            }
            (None, Some(_), None) => {
                return Err(RegistryError::BadRequest(format!(
                    "{model} version {} keeps only its int8 edge variant (placement local), not the fp32 file it was made from: push that file again with placement cascade or --quantize none and fine-tune it",
                    v.version
                )));
            }
            (None, None, Some(cloud)) => (assemble(cloud)?, None, Quantize::None),
            (None, None, None) => {
                return Err(RegistryError::NotFound(format!(
                    "{model} version {} has no variant",
                    v.version
                )));
            }
        };
        Ok(FinetuneSource {
            version: v.version,
            model: bytes,
            cloud_model,
            placement: v.placement.clone(),
            max_batch: v.max_batch,
            quantize,
            inputs: v.inputs.clone(),
            text: v
                .text
                .as_ref()
                .map(|t| {
                    self.chunks
                        .assemble_blob(&t.tokenizer)
                        .map(|json| (t.clone(), json))
                        .map_err(|e| RegistryError::Storage(e.to_string()))
                })
                .transpose()?,
        })
    }
}
