//! The text input of a push that carries a tokenizer: the model's token-id inputs found by
//! their standard names, the `tokenizer.json` read, its vocabulary held against the model's id
//! table, and the model run once at `max_tokens` so a position table too short for it is found
//! at push, not on a device. The gate then measures int8 on texts tokenized by it.

use outpost_runtime::accuracy::{self, GraphFacts};
use outpost_runtime::text::TextTokenizer;
use outpost_runtime::tract::TractModel;
use outpost_shared::release::{Blob, Dim, TextInput};
use outpost_shared::{DataType, Tensor, TensorSpec};

use super::PushRequest;
use crate::error::RegistryError;

/// The text input's name when the push does not give one.
pub const DEFAULT_TEXT_INPUT: &str = "text";

/// `max_tokens` when neither the push nor the tokenizer gives one (BERT's).
pub const DEFAULT_MAX_TOKENS: u32 = 512;

/// How many texts the gate measures a text model on (the rows of generated samples, so any
/// other input's generated rows match).
const GATE_TEXTS: u64 = accuracy::SAMPLE_ROWS;

/// The text input of `request` and its tokenizer; `None` without a tokenizer.
pub(super) fn text_input(
    request: &PushRequest,
    model: &TractModel,
    facts: &GraphFacts,
) -> Result<Option<(TextInput, TextTokenizer)>, RegistryError> {
    let Some(json) = &request.tokenizer else {
        return Ok(None);
    };
    let bad = |m: String| RegistryError::BadRequest(m);
    let inputs = &model.inputs;
    let ids = find_ids(inputs).map_err(bad)?;
    let named = |name: &str| {
        inputs
            .iter()
            .find(|i| i.name == name && i.datatype == DataType::Int64)
            .map(|i| i.name.clone())
    };
    let name = request
        .text
        .name
        .clone()
        .unwrap_or_else(|| DEFAULT_TEXT_INPUT.to_owned());
    let fixed = match ids.shape.get(1) {
        Some(Dim::Fixed(n)) => Some(u32::try_from(*n).unwrap_or(u32::MAX)),
        _ => None,
    };
    let declared = outpost_runtime::text::declared_max_tokens(json)
        .map_err(|e| bad(format!("tokenizer: {e}")))?;
    let max_tokens = request
        .text
        .max_tokens
        .or(declared)
        .or(fixed)
        .unwrap_or(DEFAULT_MAX_TOKENS);
    if let Some(n) = fixed
        && max_tokens > n
    {
        return Err(bad(format!(
            "max_tokens {max_tokens} is more than the {n} tokens the model's {:?} holds",
            ids.name
        )));
    }
    let spec = TextInput {
        name,
        input_ids: ids.name.clone(),
        attention_mask: named("attention_mask"),
        token_type_ids: named("token_type_ids"),
        max_tokens,
        truncate: request.text.truncate,
        tokenizer: Blob::describe(json),
    };
    // The manifest's own rules (the name is not a model input, the roles are INT64 2-D…).
    let check = outpost_shared::ModelVersion {
        version: 1,
        inputs: inputs.clone(),
        outputs: model.outputs.clone(),
        placement: request.placement.clone(),
        max_batch: None,
        variants: Vec::new(),
        text: Some(spec.clone()),
    };
    if let Err(reason) = check.validate_text() {
        return Err(bad(reason));
    }
    let tokenizer = TextTokenizer::load(json, &spec).map_err(|e| bad(format!("tokenizer: {e}")))?;
    if let Some(&rows) = facts.index_bounds.get(&ids.name)
        && tokenizer.vocabulary() as u64 > rows
    {
        return Err(bad(format!(
            "the tokenizer has {} tokens, but the model's {:?} table holds {rows}: it is not this model's tokenizer",
            tokenizer.vocabulary(),
            ids.name
        )));
    }
    probe(model, &spec, fixed.unwrap_or(max_tokens)).map_err(|e| {
        bad(format!(
            "the model does not run on {max_tokens} tokens ({e}); push with a max_tokens it takes"
        ))
    })?;
    Ok(Some((spec, tokenizer)))
}

/// The model's token-id input: `input_ids`, else its only INT64 `[batch, sequence]` input
/// that is not a mask or token types.
fn find_ids(inputs: &[TensorSpec]) -> Result<&TensorSpec, String> {
    let two_d_ints = |i: &&TensorSpec| i.datatype == DataType::Int64 && i.shape.len() == 2;
    if let Some(ids) = inputs
        .iter()
        .filter(two_d_ints)
        .find(|i| i.name == "input_ids")
    {
        return Ok(ids);
    }
    let candidates: Vec<&TensorSpec> = inputs
        .iter()
        .filter(two_d_ints)
        .filter(|i| i.name != "attention_mask" && i.name != "token_type_ids")
        .collect();
    match candidates.as_slice() {
        [one] => Ok(one),
        _ => Err(format!(
            "a tokenizer needs the model's token ids: an INT64 [batch, sequence] input named input_ids (the model takes {})",
            inputs
                .iter()
                .map(|i| format!("{} {}", i.name, i.datatype.as_str()))
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

/// Runs the model once on one text of `length` tokens (`max_tokens`, or the model's fixed
/// sequence); the other inputs zeros.
fn probe(model: &TractModel, spec: &TextInput, length: u32) -> Result<(), String> {
    let n = u64::from(length);
    let mut inputs = Vec::new();
    for input in &model.inputs {
        let value: i64 = if Some(&input.name) == spec.attention_mask.as_ref() {
            1
        } else {
            0
        };
        let t = if input.name == spec.input_ids
            || Some(&input.name) == spec.attention_mask.as_ref()
            || Some(&input.name) == spec.token_type_ids.as_ref()
        {
            let values = vec![value; length as usize];
            Tensor::from_values(input.name.clone(), vec![1, n], &values)
                .map_err(|e| e.to_string())?
        } else {
            // Another input the client sends beside the text: zeros of batch 1.
            outpost_runtime::engine::zero_inputs(std::slice::from_ref(input))
                .map_err(|e| e.to_string())?
                .into_iter()
                .next()
                .ok_or_else(|| format!("no zeros for input {:?}", input.name))?
        };
        inputs.push(t);
    }
    // A position table shorter than `length` makes tract's `Gather` panic; `TractModel::run`
    // turns that into an input error, which is this probe's answer.
    outpost_runtime::Engine::run(model, &inputs)
        .map(drop)
        .map_err(|e| e.to_string())
}

/// The gate's samples for a text model: texts of the tokenizer's own words, tokenized as
/// devices will, and generated values for any other input.
pub(super) fn gate_samples(
    tokenizer: &TextTokenizer,
    model: &TractModel,
    facts: &GraphFacts,
    seed: u64,
) -> Result<Vec<Tensor>, RegistryError> {
    let spec = tokenizer.spec();
    let texts = tokenizer.sample_texts(GATE_TEXTS as usize, seed);
    let strings: Vec<&[u8]> = texts.iter().map(|t| t.as_bytes()).collect();
    let tensor = Tensor::from_byte_strings(spec.name.clone(), vec![GATE_TEXTS], &strings)
        .map_err(|e| RegistryError::BadModel(e.to_string()))?;
    let ids = model
        .inputs
        .iter()
        .find(|i| i.name == spec.input_ids)
        .ok_or_else(|| RegistryError::BadModel("the token-id input is gone".into()))?;
    let mut encoded = tokenizer.encode(&tensor, ids).map_err(|e| {
        RegistryError::BadModel(format!(
            "the gate's texts do not tokenize within max_tokens {}: {e}",
            spec.max_tokens
        ))
    })?;
    let others: Vec<TensorSpec> = model
        .inputs
        .iter()
        .filter(|i| !encoded.inputs.iter().any(|t| t.name() == i.name))
        .cloned()
        .collect();
    if !others.is_empty() {
        let generated =
            accuracy::generate_samples(&others, facts, seed).map_err(RegistryError::BadModel)?;
        encoded.inputs.extend(generated);
    }
    Ok(encoded.inputs)
}
