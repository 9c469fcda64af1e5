//! Small models that probe how an engine carries element types, each with a known answer.

use prost::Message as _;
use tract_onnx::pb::tensor_proto::DataType;

use crate::graph::{Dim, GraphBuilder, int_attr};

/// FP16 in and out, as `--fp16` exports are, plus a shape the model computes: input
/// `x: FP16 [batch, width]`, outputs `y = 2x` (FP16, summed in f32) and `shape` (INT64
/// `[batch, width]`).
pub fn fp16_doubler(width: usize) -> Vec<u8> {
    let mut g = GraphBuilder::new(1);
    let dims = [Dim::Symbol("batch"), Dim::Fixed(width)];
    let x = g.input("x", DataType::Float16, &dims);
    let float = int_attr("to", DataType::Float as i64);
    let wide = g.node("Cast", &[&x], None, vec![float]);
    let doubled = g.node("Add", &[&wide, &wide], None, vec![]);
    let half = int_attr("to", DataType::Float16 as i64);
    g.node("Cast", &[&doubled], Some("y"), vec![half]);
    g.node("Shape", &[&x], Some("shape"), vec![]);
    g.output("y", DataType::Float16, &dims);
    g.output("shape", DataType::Int64, &[Dim::Fixed(2)]);
    g.finish("fp16-doubler", "fp16 in and out, and a shape", &[])
        .encode_to_vec()
}

/// An answer that is not a row per input row: input `x: FP32 [batch, 4]`, output
/// `probs: FP32 [1, 4]`, the mean over the rows. What a cascade cannot use (it sends rows to the
/// cloud by their place in the answer).
pub fn pooled_rows() -> Vec<u8> {
    let mut g = GraphBuilder::new(1);
    let x = g.input("x", DataType::Float, &[Dim::Symbol("batch"), Dim::Fixed(4)]);
    let axes = crate::graph::ints_attr("axes", &[0]);
    g.node(
        "ReduceMean",
        &[&x],
        Some("probs"),
        vec![axes, int_attr("keepdims", 1)],
    );
    g.output("probs", DataType::Float, &[Dim::Fixed(1), Dim::Fixed(4)]);
    g.finish("pooled-rows", "one answer for all rows", &[])
        .encode_to_vec()
}
