//! Models built to probe the int8 accuracy gate, each with a known answer:
//!
//! - [`outlier_ranker`]: a score model whose middle weight (`mix.weight`) holds one large value
//!   a column, which per-channel int8 cannot hold next to its small ones (they round to zero),
//!   while its first weight (`exact.weight`) holds multiples of its column's int8 step and
//!   quantises without error. All-int8 misses the gate; keeping `mix.weight` in fp32 passes.
//! - [`encoder_outputs`]: an encoder-shaped model with a hidden state `[batch, tokens, 64]` and
//!   its mean over tokens, an embedding `[batch, 64]`. int8 keeps their directions (cosine
//!   ≈ 0.99999) while single elements move by more than a score's tolerance, as a real sentence
//!   encoder's do.
//! - [`label_outputs`]: the same with integer outputs beside the embedding, an ArgMax label and
//!   an id input passed through (as exported encoders pass `input_ids` on), which the gate
//!   judges as labels.

use prost::Message as _;
use tract_onnx::pb::tensor_proto::DataType;

use crate::graph::{Dim, GraphBuilder, ints_attr};

/// The weight of [`outlier_ranker`] that int8 cannot hold.
pub const OUTLIER_WEIGHT: &str = "mix.weight";

/// `x [batch, 64] → exact [64, 64] → mix [64, 16] → head [16, 1] → score [batch, 1]`.
pub fn outlier_ranker(seed: u64) -> Vec<u8> {
    let mut g = GraphBuilder::new(seed);
    let batch = Dim::Symbol("batch");
    let x = g.input("x", DataType::Float, &[batch, Dim::Fixed(64)]);
    let mut rng = crate::graph::Rng::new(seed ^ 0x5eed);
    // Multiples of 0.01 up to 1.27, with 1.27 in every column: the step is exactly 0.01.
    let exact: Vec<f32> = (0..64 * 64)
        .map(|i| {
            if i / 64 == i % 64 {
                1.27
            } else {
                rng.uniform(127.0).round() * 0.01
            }
        })
        .collect();
    let exact = g.floats("exact.weight", &[64, 64], &exact);
    // One 8.0 a column, the rest under half the step (8 / 127 / 2 ≈ 0.031): int8 zeroes them.
    let mix: Vec<f32> = (0..64 * 16)
        .map(|i| {
            let (row, col) = (i / 16, i % 16);
            if row == col * 4 {
                8.0
            } else {
                rng.uniform(0.03)
            }
        })
        .collect();
    let mix = g.floats(OUTLIER_WEIGHT, &[64, 16], &mix);
    let head = g.floats("head.weight", &[16, 1], &[0.25; 16]);
    let h = g.node("MatMul", &[&x, &exact], None, vec![]);
    let m = g.node("MatMul", &[&h, &mix], None, vec![]);
    g.node("MatMul", &[&m, &head], Some("score"), vec![]);
    g.output("score", DataType::Float, &[batch, Dim::Fixed(1)]);
    g.finish("outlier-ranker", "probes the int8 gate's fallback", &[])
        .encode_to_vec()
}

/// `tokens [batch, tokens, 64] → W [64, 64] → hidden [batch, tokens, 64]`, and its mean over
/// tokens, `embedding [batch, 64]`.
pub fn encoder_outputs(seed: u64) -> Vec<u8> {
    let mut g = GraphBuilder::new(seed);
    let (batch, tokens) = (Dim::Symbol("batch"), Dim::Symbol("tokens"));
    let x = g.input("tokens", DataType::Float, &[batch, tokens, Dim::Fixed(64)]);
    hidden_and_embedding(&mut g, &x);
    g.output("hidden", DataType::Float, &[batch, tokens, Dim::Fixed(64)]);
    g.output("embedding", DataType::Float, &[batch, Dim::Fixed(64)]);
    g.finish(
        "encoder-outputs",
        "probes the int8 gate's output kinds",
        &[],
    )
    .encode_to_vec()
}

/// `x [batch, tokens, 64]` through `encoder.weight` to `hidden`, and `embedding`, its mean over
/// tokens.
fn hidden_and_embedding(g: &mut GraphBuilder, x: &str) {
    let w = g.random("encoder.weight", &[64, 64], 4.0);
    g.node("MatMul", &[x, &w], Some("hidden"), vec![]);
    g.node(
        "ReduceMean",
        &["hidden"],
        Some("embedding"),
        vec![
            ints_attr("axes", &[1]),
            crate::graph::int_attr("keepdims", 0),
        ],
    );
}

/// An encoder that also answers integers, as exported encoders often do: the `ids` input passed
/// through, and the `label` (ArgMax) of its embedding. Probes the gate's label kind.
pub fn label_outputs(seed: u64) -> Vec<u8> {
    let mut g = GraphBuilder::new(seed);
    let (batch, tokens) = (Dim::Symbol("batch"), Dim::Symbol("tokens"));
    let x = g.input("tokens", DataType::Float, &[batch, tokens, Dim::Fixed(64)]);
    let ids = g.input("ids", DataType::Int64, &[batch, tokens]);
    hidden_and_embedding(&mut g, &x);
    g.node(
        "ArgMax",
        &["embedding"],
        Some("label"),
        vec![
            crate::graph::int_attr("axis", 1),
            crate::graph::int_attr("keepdims", 0),
        ],
    );
    g.node("Identity", &[&ids], Some("ids_out"), vec![]);
    g.output("embedding", DataType::Float, &[batch, Dim::Fixed(64)]);
    g.output("label", DataType::Int64, &[batch]);
    g.output("ids_out", DataType::Int64, &[batch, tokens]);
    g.finish("label-outputs", "probes the int8 gate's label kind", &[])
        .encode_to_vec()
}
