//! Where an inference runs, by the version's placement: on the device, on the coordinator, or
//! both (cascade: the rows the local model is unsure of go to the cloud and are merged back in
//! order). When the cloud is unreachable, a model with a local engine is answered locally.
//!
//! Every failure becomes one [`RouteError`], by whose fault: the caller's (bad input), the
//! model's (failed), or the moment's (unavailable: no coordinator, a device that failed); the
//! API turns its kind into a status code in one place.

use std::time::Duration;

use outpost_runtime::RunError;
use outpost_runtime::memory::{self, MemoryBudget};
use outpost_shared::{Dim, ErrorKind, Placement, Tensor};

use crate::Context;
use crate::counters::Counters;
use crate::offload::OffloadError;
use crate::serving::Serving;

/// An answer and where its rows ran.
#[derive(Debug)]
pub struct Answer {
    /// The version that answered.
    pub version: u64,
    /// The outputs.
    pub outputs: Vec<Tensor>,
    /// Rows answered on the device.
    pub rows_local: u64,
    /// Rows answered by the coordinator.
    pub rows_cloud: u64,
    /// Why the cloud was skipped, when it was.
    pub note: Option<String>,
    /// The texts cut to the model's `max_tokens` (by position in the text input).
    pub truncated: Vec<usize>,
}

/// Why an inference failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum RouteError {
    /// The inputs are wrong: the caller can fix them (400).
    #[error("{0}")]
    BadInput(String),
    /// It cannot be answered now: no coordinator, or the device running the model failed; a
    /// later call may succeed (503).
    #[error("{0}")]
    Unavailable(String),
    /// The model (or the agent) failed on a valid request (500).
    #[error("{0}")]
    Failed(String),
    /// Every running slot and waiting place of the model is taken, or the device's working
    /// memory stayed taken by other calls (503 with `Retry-After`).
    #[error("{0}")]
    Busy(String),
    /// One row of the call needs more working memory than a call may take (413).
    #[error("{0}")]
    TooLarge(String),
}

/// How long a call waits for the device's working memory before it is answered busy.
const MEMORY_WAIT: Duration = Duration::from_secs(5);

/// The working memory local calls run within: the budget all share and what one may take.
#[derive(Debug, Clone)]
pub(crate) struct CallMemory<'a> {
    /// Shared by every call at once.
    pub(crate) budget: &'a MemoryBudget,
    /// The most one call may take, bytes.
    pub(crate) per_call: u64,
}

impl From<RunError> for RouteError {
    /// The one mapping of an engine's failure: the inputs 400, the model 500, the device 503.
    fn from(e: RunError) -> Self {
        match e {
            RunError::Input(m) => RouteError::BadInput(m),
            RunError::Model(m) => RouteError::Failed(m),
            RunError::Device(m) => RouteError::Unavailable(m),
            // A kind added later: not the caller's fault unless it says so.
            other => RouteError::Failed(other.to_string()),
        }
    }
}

pub(crate) fn rows(inputs: &[Tensor]) -> u64 {
    inputs
        .first()
        .and_then(|t| t.shape().first().copied())
        .unwrap_or(1)
}

/// Runs `inputs` on the version's local engine, off the async threads, once its working memory
/// (from the model's graph) is reserved in the device's budget.
pub(crate) async fn run_local(
    memory: &CallMemory<'_>,
    serving: &Serving,
    inputs: Vec<Tensor>,
) -> Result<Vec<Tensor>, RouteError> {
    let Some(engine) = serving.engine.clone() else {
        return Err(RouteError::Unavailable(
            "the model has no local engine".into(),
        ));
    };
    let (bytes, measured) = match &serving.graph {
        Some(Ok(graph)) => {
            graph.check_ids(&inputs)?;
            (graph.bytes_for(&inputs), true)
        }
        // Unmeasured: the inputs and what the engine copies of them.
        _ => (
            inputs
                .iter()
                .map(|t| t.data().len() as u64)
                .sum::<u64>()
                .saturating_mul(2),
            false,
        ),
    };
    if bytes > memory.per_call {
        return Err(RouteError::TooLarge(format!(
            "this call needs {} MiB of working memory, more than the {} MiB one call may take on this device, and the model's answers cannot be cut into row parts; send fewer rows or shorter inputs",
            bytes.div_ceil(1 << 20),
            memory.per_call >> 20
        )));
    }
    // Held until the engine is done: bounded running calls, bounded waiting ones.
    let _slot = serving
        .admission
        .enter()
        .await
        .map_err(|e| RouteError::Busy(e.to_string()))?;
    let _reserved = memory
        .budget
        .reserve(bytes, MEMORY_WAIT)
        .await
        .map_err(|e| RouteError::Busy(e.to_string()))?;
    // Only a measured call of a small model on the CPU (the GPU engine waits on its device).
    if measured
        && bytes <= INLINE_CALL_BYTES
        && serving.memory <= INLINE_MODEL_BYTES
        && engine.name() != "wgpu"
    {
        // Microseconds of work: the hop to a blocking thread and back would cost more.
        return engine.run(&inputs).map_err(RouteError::from);
    }
    let large = bytes >= GIVE_BACK_AFTER;
    tokio::task::spawn_blocking(move || {
        let answer = engine.run(&inputs);
        if large {
            // What the call built is freed: give it back, or the device stays at its peak.
            drop(inputs);
            outpost_heap::give_back();
        }
        answer
    })
    .await
    .map_err(|e| RouteError::Failed(format!("the engine failed: {e}")))?
    .map_err(RouteError::from)
}

/// A call (or part) estimated at this much working memory or more gives the memory it freed
/// back to the system when it ends (`outpost_heap::give_back`, milliseconds).
pub(crate) const GIVE_BACK_AFTER: u64 = 64 << 20;

/// A call runs on the async thread that received it, without the hop to a blocking thread,
/// when its working memory is at most this and its model is small ([`INLINE_MODEL_BYTES`]):
/// a ranker's few rows take tens of microseconds, less than the hop.
const INLINE_CALL_BYTES: u64 = outpost_runtime::tract::SMALL_CALL_BYTES;

/// The largest model (what its engine holds) whose small calls run inline: with weights this
/// small, a call within [`INLINE_CALL_BYTES`] is a few million multiply-adds at most.
const INLINE_MODEL_BYTES: u64 = 4 << 20;

pub(crate) fn cloud_error(e: OffloadError) -> RouteError {
    match e {
        OffloadError::Refused {
            kind: ErrorKind::InvalidInput,
            message,
        } => RouteError::BadInput(message),
        // The coordinator's model failed: as a local model failure, 500.
        OffloadError::Refused {
            kind: ErrorKind::Internal,
            message,
        } => RouteError::Failed(format!("the coordinator's model failed: {message}")),
        OffloadError::Unreachable(m) => RouteError::Unavailable(format!(
            "the model runs in the cloud and no coordinator is reachable: {m}"
        )),
        other => RouteError::Unavailable(other.to_string()),
    }
}

/// Runs `inputs` where the placement says: in one call when its working memory fits the
/// per-call bound, else in row parts that each fit, joined back in order.
pub(crate) async fn infer(
    ctx: &Context,
    model: &str,
    serving: &Serving,
    inputs: Vec<Tensor>,
) -> Result<Answer, RouteError> {
    let max_elements = ctx.config.profile().max_request_elements();
    let batched = batched(serving, &inputs);
    let batched_inputs: Vec<&Tensor> = inputs
        .iter()
        .zip(&batched)
        .filter(|(_, b)| **b)
        .map(|(t, _)| t)
        .collect();
    outpost_runtime::engine::check_rows(&batched_inputs)?;
    let n = batched_inputs
        .first()
        .and_then(|t| t.shape().first().copied())
        .unwrap_or(1);
    let per_part = rows_per_call(ctx, serving, &inputs)?;
    if n <= per_part {
        let (inputs, truncated) = tokenize(serving, inputs, max_elements).await?;
        let mut answer = route(ctx, model, serving, inputs).await?;
        answer.truncated = truncated;
        return Ok(answer);
    }
    Counters::count(&ctx.counters.split);
    tracing::debug!(model, rows = n, per_part, "running a call in row parts");
    let mut parts: Vec<Answer> = Vec::new();
    for (start, end) in memory::parts(n, per_part) {
        let part = inputs
            .iter()
            .zip(&batched)
            .map(|(t, &b)| if b { t.rows(start, end) } else { Ok(t.clone()) })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| RouteError::Failed(e.to_string()))?;
        let (part, truncated) = tokenize(serving, part, max_elements).await?;
        let mut answer = route(ctx, model, serving, part).await?;
        answer.truncated = truncated.into_iter().map(|i| i + start as usize).collect();
        parts.push(answer);
    }
    join(parts, n)
}

/// Which inputs carry the call's rows: the text input, and those whose first dimension is free.
fn batched(serving: &Serving, inputs: &[Tensor]) -> Vec<bool> {
    let text = serving.text.as_ref().map(|t| t.spec().name.clone());
    inputs
        .iter()
        .map(|t| {
            Some(t.name()) == text.as_deref()
                || serving
                    .version
                    .inputs
                    .iter()
                    .find(|s| s.name == t.name())
                    .is_some_and(|s| s.shape.first() == Some(&Dim::Dynamic))
        })
        .collect()
}

/// The most rows one call of the local engine may carry within the per-call bound: from the
/// model's cost per row at the call's sequence length (a text's longest, before it is
/// tokenized); no limit for a model without a local engine or whose graph cannot be measured
/// or cut.
fn rows_per_call(ctx: &Context, serving: &Serving, inputs: &[Tensor]) -> Result<u64, RouteError> {
    let Some(Ok(graph)) = &serving.graph else {
        return Ok(frame_rows(serving, inputs));
    };
    if !graph.splits() {
        return Ok(u64::MAX);
    }
    let sequence = match &serving.text {
        Some(t) if inputs.iter().any(|i| i.name() == t.spec().name) => {
            u64::from(t.spec().max_tokens)
        }
        _ => graph.sequence_of(inputs),
    };
    graph
        .cost(sequence)
        .rows_within(ctx.config.profile().call_memory_bytes())
        .map_err(|e| {
            Counters::count(&ctx.counters.too_large);
            RouteError::TooLarge(e.to_string())
        })
}

/// The most rows a call of a cloud-only model sends in one request: its inputs (a text's
/// token ids at the model's longest text) within half a QUIC frame, so a large call goes out
/// in parts the coordinator takes rather than as one it must refuse.
fn frame_rows(serving: &Serving, inputs: &[Tensor]) -> u64 {
    if serving.version.placement != Placement::Cloud {
        return u64::MAX;
    }
    let rows = rows(inputs).max(1);
    let per_row = match &serving.text {
        Some(t) if inputs.iter().any(|i| i.name() == t.spec().name) => {
            let spec = t.spec();
            let token_inputs = 1
                + u64::from(spec.attention_mask.is_some())
                + u64::from(spec.token_type_ids.is_some());
            u64::from(spec.max_tokens) * 8 * token_inputs
        }
        _ => inputs.iter().map(|t| t.data().len() as u64).sum::<u64>() / rows,
    };
    let half_frame = (outpost_shared::frame::MAX_FRAME_BYTES / 2) as u64;
    (half_frame / per_row.max(1)).max(1)
}

/// The answers of a call's row parts as one: outputs joined by rows, in order.
fn join(parts: Vec<Answer>, rows: u64) -> Result<Answer, RouteError> {
    let Some(first) = parts.first() else {
        return Err(RouteError::Failed("the call had no rows to run".into()));
    };
    let mut outputs = Vec::with_capacity(first.outputs.len());
    for (i, out) in first.outputs.iter().enumerate() {
        let pieces: Vec<Tensor> = parts
            .iter()
            .map(|p| {
                p.outputs
                    .get(i)
                    .filter(|o| o.name() == out.name())
                    .cloned()
                    .ok_or_else(|| {
                        RouteError::Failed(format!(
                            "the model answered {:?} for one part of the call and not another",
                            out.name()
                        ))
                    })
            })
            .collect::<Result<_, _>>()?;
        let joined = Tensor::concat_rows(&pieces)
            .map_err(|e| RouteError::Failed(format!("the parts of the answer do not join: {e}")))?;
        if joined.shape().first() != Some(&rows) {
            return Err(RouteError::Failed(format!(
                "the model answered {} rows of {:?} for {rows} rows",
                joined.shape().first().copied().unwrap_or(1),
                out.name()
            )));
        }
        outputs.push(joined);
    }
    Ok(Answer {
        version: first.version,
        rows_local: parts.iter().map(|p| p.rows_local).sum(),
        rows_cloud: parts.iter().map(|p| p.rows_cloud).sum(),
        note: parts.iter().find_map(|p| p.note.clone()),
        truncated: parts.iter().flat_map(|p| p.truncated.clone()).collect(),
        outputs,
    })
}

/// Replaces the text input, when the request carries it and the version takes text, by the
/// model's token-id inputs (off the async threads); returns the inputs and the texts cut.
async fn tokenize(
    serving: &Serving,
    mut inputs: Vec<Tensor>,
    max_elements: u64,
) -> Result<(Vec<Tensor>, Vec<usize>), RouteError> {
    let Some(tokenizer) = serving.text.clone() else {
        return Ok((inputs, Vec::new()));
    };
    let spec = tokenizer.spec();
    let Some(at) = inputs.iter().position(|t| t.name() == spec.name) else {
        return Ok((inputs, Vec::new()));
    };
    if let Some(both) = inputs.iter().find(|t| {
        t.name() == spec.input_ids
            || Some(t.name()) == spec.attention_mask.as_deref()
            || Some(t.name()) == spec.token_type_ids.as_deref()
    }) {
        return Err(RouteError::BadInput(format!(
            "send either the text {:?} or the token inputs ({:?}…), not both",
            spec.name,
            both.name()
        )));
    }
    let ids = serving
        .version
        .inputs
        .iter()
        .find(|i| i.name == spec.input_ids)
        .cloned()
        .ok_or_else(|| RouteError::Failed("the model lost its token-id input".into()))?;
    let text = inputs.remove(at);
    let encoded = tokio::task::spawn_blocking(move || tokenizer.encode(&text, &ids))
        .await
        .map_err(|e| RouteError::Failed(e.to_string()))?
        .map_err(|e| RouteError::BadInput(e.to_string()))?;
    let elements: u64 = encoded.inputs.iter().map(Tensor::len).sum();
    if elements > max_elements {
        return Err(RouteError::BadInput(format!(
            "the texts make {elements} token elements (padded to {} tokens), more than the {max_elements} one request may carry on this device (max_elements); send fewer or shorter texts",
            encoded.length
        )));
    }
    inputs.extend(encoded.inputs);
    Ok((inputs, encoded.truncated))
}

/// Runs token-level `inputs` where the placement says.
async fn route(
    ctx: &Context,
    model: &str,
    serving: &Serving,
    inputs: Vec<Tensor>,
) -> Result<Answer, RouteError> {
    let version = serving.version.version;
    let n = rows(&inputs);
    let counters = &ctx.counters;
    match &serving.version.placement {
        Placement::Local => {
            let outputs = run_local(&ctx.call_memory(), serving, inputs).await?;
            Counters::count(&counters.local);
            Ok(Answer {
                version,
                outputs,
                rows_local: n,
                rows_cloud: 0,
                note: None,
                truncated: Vec::new(),
            })
        }
        Placement::Cloud => {
            check(serving, &inputs)?;
            let (version, outputs) = ctx
                .offload
                .infer(model, Some(version), inputs)
                .await
                .map_err(cloud_error)?;
            Counters::count(&counters.offloaded);
            Ok(Answer {
                version,
                outputs,
                rows_local: 0,
                rows_cloud: n,
                note: None,
                truncated: Vec::new(),
            })
        }
        Placement::Cascade { output, threshold } => {
            let mut outputs = run_local(&ctx.call_memory(), serving, inputs.clone()).await?;
            Counters::count(&counters.local);
            // Rows go to the cloud by their place in the answer: it must have the call's rows.
            if let Some(out) = outputs.iter().find(|o| o.shape().first() != Some(&n)) {
                return Err(RouteError::Failed(format!(
                    "the cascade model answered {:?} with shape {:?} for {n} rows: a cascade's outputs must have a row per input row",
                    out.name(),
                    out.shape()
                )));
            }
            let unsure = unsure_rows(&outputs, output, *threshold).map_err(RouteError::Failed)?;
            if unsure.is_empty() {
                return Ok(Answer {
                    version,
                    outputs,
                    rows_local: n,
                    rows_cloud: 0,
                    note: None,
                    truncated: Vec::new(),
                });
            }
            let subset = inputs
                .iter()
                .map(|t| select_rows(t, &unsure))
                .collect::<Result<Vec<_>, _>>()
                .map_err(RouteError::Failed)?;
            match ctx.offload.infer(model, Some(version), subset).await {
                Ok((_, cloud)) => {
                    for out in &mut outputs {
                        if let Some(c) = cloud.iter().find(|c| c.name() == out.name()) {
                            *out = replace_rows(out, &unsure, c).map_err(RouteError::Failed)?;
                        }
                    }
                    Counters::count(&counters.offloaded);
                    let cloud_rows = unsure.len() as u64;
                    Ok(Answer {
                        version,
                        outputs,
                        rows_local: n - cloud_rows,
                        rows_cloud: cloud_rows,
                        note: None,
                        truncated: Vec::new(),
                    })
                }
                // Unsure answers are still answers: serve them, and say why the cloud was skipped.
                Err(e) => Ok(Answer {
                    version,
                    outputs,
                    rows_local: n,
                    rows_cloud: 0,
                    note: Some(e.to_string()),
                    truncated: Vec::new(),
                }),
            }
        }
    }
}

/// For a cloud-only model, check the inputs here so a bad request gets a 400 even offline.
fn check(serving: &Serving, inputs: &[Tensor]) -> Result<(), RouteError> {
    outpost_runtime::engine::check_inputs(&serving.version.inputs, inputs)?;
    Ok(())
}

/// The rows whose largest value on `output` is below `threshold`.
fn unsure_rows(outputs: &[Tensor], output: &str, threshold: f32) -> Result<Vec<usize>, String> {
    let t = outputs
        .iter()
        .find(|t| t.name() == output)
        .ok_or_else(|| format!("the model gave no output {output:?}"))?;
    let values = t.to_values::<f32>().map_err(|e| e.to_string())?;
    let n = t.shape().first().copied().unwrap_or(1) as usize;
    let width = values.len().checked_div(n).unwrap_or(0);
    Ok((0..n)
        .filter(|&r| {
            values
                .get(r * width..(r + 1) * width)
                .unwrap_or_default()
                .iter()
                .copied()
                .fold(f32::MIN, f32::max)
                < threshold
        })
        .collect())
}

fn row_bytes(t: &Tensor) -> Result<usize, String> {
    t.datatype()
        .element_size()
        .ok_or("BYTES tensors cannot be split by rows")?;
    let n = t.shape().first().copied().unwrap_or(1) as usize;
    Ok(t.data().len().checked_div(n).unwrap_or(0))
}

/// The given rows (outermost dimension) of `t`.
fn select_rows(t: &Tensor, rows: &[usize]) -> Result<Tensor, String> {
    let per_row = row_bytes(t)?;
    let mut data = Vec::with_capacity(per_row * rows.len());
    for &r in rows {
        let row = t
            .data()
            .get(r * per_row..(r + 1) * per_row)
            .ok_or_else(|| format!("{:?} has no row {r}", t.name()))?;
        data.extend_from_slice(row);
    }
    let mut shape = t.shape().to_vec();
    if let Some(first) = shape.first_mut() {
        *first = rows.len() as u64;
    }
    Tensor::from_bytes(t.name(), t.datatype(), shape, data).map_err(|e| e.to_string())
}

/// `t` with the given rows replaced by the rows of `with`, in order.
fn replace_rows(t: &Tensor, rows: &[usize], with: &Tensor) -> Result<Tensor, String> {
    let per_row = row_bytes(t)?;
    if with.datatype() != t.datatype() || with.data().len() != per_row * rows.len() {
        return Err(format!(
            "the cloud's {:?} does not fit the local one",
            t.name()
        ));
    }
    let mut data = t.data().to_vec();
    for (i, &r) in rows.iter().enumerate() {
        data.get_mut(r * per_row..(r + 1) * per_row)
            .ok_or_else(|| format!("{:?} has no row {r}", t.name()))?
            .copy_from_slice(&with.data()[i * per_row..(i + 1) * per_row]);
    }
    Tensor::from_bytes(t.name(), t.datatype(), t.shape().to_vec(), data).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_selected_and_merged_back_in_order() {
        let t = Tensor::from_values(
            "p",
            vec![4, 2],
            &[0.9f32, 0.1, 0.5, 0.5, 0.2, 0.8, 0.45, 0.55],
        )
        .unwrap();
        let unsure = unsure_rows(std::slice::from_ref(&t), "p", 0.6).unwrap();
        assert_eq!(unsure, vec![1, 3]);
        let picked = select_rows(&t, &unsure).unwrap();
        assert_eq!(
            picked.to_values::<f32>().unwrap(),
            vec![0.5, 0.5, 0.45, 0.55]
        );
        let cloud = Tensor::from_values("p", vec![2, 2], &[1.0f32, 0.0, 0.0, 1.0]).unwrap();
        let merged = replace_rows(&t, &unsure, &cloud).unwrap();
        assert_eq!(
            merged.to_values::<f32>().unwrap(),
            vec![0.9, 0.1, 1.0, 0.0, 0.2, 0.8, 0.0, 1.0]
        );
        let ids = Tensor::from_values("ids", vec![4], &[10i64, 11, 12, 13]).unwrap();
        assert_eq!(
            select_rows(&ids, &unsure)
                .unwrap()
                .to_values::<i64>()
                .unwrap(),
            vec![11, 13]
        );
        assert!(replace_rows(&t, &unsure, &ids).is_err());
    }
}
