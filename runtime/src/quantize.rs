//! Weight-only int8 quantisation of an ONNX model, as a graph rewrite tract runs unchanged.
//!
//! Each eligible f32 weight `W` (the weight of a MatMul or Gemm, or the table of an embedding
//! Gather) becomes an int8 initializer `W.int8` and an f32 per-output-channel scale `W.scale`, and
//! a `DequantizeLinear(W.int8, W.scale, axis)` node that produces `W` again, so every consumer is
//! untouched. Quantisation is symmetric (`q = round(w / s)`, `s = max|w| / 127` per channel, zero
//! point 0).
//!
//! Why this shape: `DequantizeLinear` over constants is folded into f32 constants before tract
//! loads the model ([`crate::dequantize`]; tract itself did not fold every one) and it then runs
//! at fp32 speed, while its integer ops (MatMulInteger, QLinearMatMul) run 30–50× slower
//! (see FINDINGS.md). The file is 4× smaller on the wire and on disk, and the int8 weights stay
//! visible to an engine that can use them directly (the GPU engine reads this exact pattern).
//!
//! Initializers keep their order, each quantised weight in place of the original, so a model
//! whose training changed one layer changes only the bytes of that layer: content-defined chunks
//! then make the update a small download (see `outpost_shared::chunk`).

use std::collections::{HashMap, HashSet};

use prost::Message as _;
use serde::{Deserialize, Serialize};
use tract_onnx::pb::{
    AttributeProto, ModelProto, NodeProto, StringStringEntryProto, TensorProto,
    attribute_proto::AttributeType, tensor_proto::DataType as PbType,
};

/// Weights with fewer elements stay f32: too small to matter for size, and the most sensitive.
pub const MIN_ELEMENTS: usize = 1024;

/// The metadata key a quantised model carries (value: [`SCHEME`]).
pub const METADATA_KEY: &str = "outpost.quantization";

/// The scheme, as written in the model's metadata.
pub const SCHEME: &str = "int8 weight-only, symmetric, per output channel (DequantizeLinear)";

/// The opset that introduced per-axis `DequantizeLinear`.
const MIN_OPSET: i64 = 13;

/// What quantisation did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuantizeReport {
    /// Weight tensors stored as int8.
    pub tensors: usize,
    /// Their elements.
    pub weights: u64,
    /// The f32 model's size in bytes.
    pub fp32_bytes: u64,
    /// The int8 model's size in bytes.
    pub int8_bytes: u64,
    /// Weights that could be int8 but were kept in fp32 (the gate's fallback), in the order they
    /// were kept.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kept_fp32: Vec<String>,
}

impl QuantizeReport {
    /// `int8_bytes / fp32_bytes`.
    pub fn ratio(&self) -> f64 {
        if self.fp32_bytes == 0 {
            return 1.0;
        }
        self.int8_bytes as f64 / self.fp32_bytes as f64
    }
}

/// A quantised model.
#[derive(Debug, Clone)]
pub struct Quantized {
    /// The ONNX file.
    pub bytes: Vec<u8>,
    /// What was done.
    pub report: QuantizeReport,
    /// The weights stored as int8, with their element counts, in file order.
    pub weights: Vec<(String, u64)>,
}

/// Why a model could not be quantised.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum QuantizeError {
    /// The bytes are not an ONNX model.
    #[error("not an ONNX model: {0}")]
    NotOnnx(String),
    /// The model's opset predates per-channel `DequantizeLinear`.
    #[error(
        "int8 quantisation needs ONNX opset {MIN_OPSET} or later for per-channel scales; the model uses opset {0}"
    )]
    Opset(i64),
    /// A weight holds NaN or infinity.
    #[error("weight {0:?} holds a NaN or infinite value")]
    NotFinite(String),
    /// The model is already quantised.
    #[error("the model is already quantised ({METADATA_KEY} is set)")]
    AlreadyQuantized,
}

/// Quantises the weights of `model` (an ONNX file) to int8.
pub fn quantize_int8(model: &[u8]) -> Result<Quantized, QuantizeError> {
    quantize_int8_keeping(model, &[])
}

/// Quantises the weights of `model` to int8 but those named in `keep`, which stay fp32 (and are
/// listed in the report's `kept_fp32`).
pub fn quantize_int8_keeping(model: &[u8], keep: &[String]) -> Result<Quantized, QuantizeError> {
    let mut proto = ModelProto::decode(model).map_err(|e| QuantizeError::NotOnnx(e.to_string()))?;
    if proto.metadata_props.iter().any(|p| p.key == METADATA_KEY) {
        return Err(QuantizeError::AlreadyQuantized);
    }
    let opset = proto
        .opset_import
        .iter()
        .filter(|o| o.domain.is_empty() || o.domain == "ai.onnx")
        .map(|o| o.version)
        .max()
        .unwrap_or(1);
    if opset < MIN_OPSET {
        return Err(QuantizeError::Opset(opset));
    }
    let graph = proto
        .graph
        .as_mut()
        .ok_or_else(|| QuantizeError::NotOnnx("the model has no graph".into()))?;

    let axes = weight_axes(&graph.node);
    let mut taken: HashSet<String> = graph
        .initializer
        .iter()
        .map(|t| t.name.clone())
        .chain(graph.node.iter().flat_map(|n| n.output.iter().cloned()))
        .chain(graph.input.iter().map(|i| i.name.clone()))
        .collect();
    let mut report = QuantizeReport {
        tensors: 0,
        weights: 0,
        fp32_bytes: model.len() as u64,
        int8_bytes: 0,
        kept_fp32: Vec::new(),
    };
    let mut weights = Vec::new();
    let mut dequantize = Vec::new();
    let mut quantized_names = HashSet::new();
    let mut initializers = Vec::with_capacity(graph.initializer.len() + 8);
    for tensor in std::mem::take(&mut graph.initializer) {
        let Some(&axis) = axes.get(tensor.name.as_str()) else {
            initializers.push(tensor);
            continue;
        };
        let Some(values) = f32_values(&tensor) else {
            initializers.push(tensor);
            continue;
        };
        if values.len() < MIN_ELEMENTS {
            initializers.push(tensor);
            continue;
        }
        if keep.contains(&tensor.name) {
            report.kept_fp32.push(tensor.name.clone());
            initializers.push(tensor);
            continue;
        }
        let (rows, cols) = (tensor.dims[0] as usize, tensor.dims[1] as usize);
        let (q, scales) = quantize_matrix(&values, rows, cols, axis)
            .ok_or_else(|| QuantizeError::NotFinite(tensor.name.clone()))?;
        let q_name = unique(&mut taken, &format!("{}.int8", tensor.name));
        let s_name = unique(&mut taken, &format!("{}.scale", tensor.name));
        dequantize.push(NodeProto {
            input: vec![q_name.clone(), s_name.clone()],
            output: vec![tensor.name.clone()],
            name: unique(&mut taken, &format!("{}.dequantize", tensor.name)),
            op_type: "DequantizeLinear".into(),
            attribute: vec![AttributeProto {
                name: "axis".into(),
                r#type: AttributeType::Int as i32,
                i: axis as i64,
                ..AttributeProto::default()
            }],
            ..NodeProto::default()
        });
        report.tensors += 1;
        report.weights += values.len() as u64;
        weights.push((tensor.name.clone(), values.len() as u64));
        quantized_names.insert(tensor.name.clone());
        initializers.push(TensorProto {
            dims: tensor.dims.clone(),
            data_type: PbType::Int8 as i32,
            name: q_name,
            raw_data: q.into_iter().map(|v| v as u8).collect(),
            ..TensorProto::default()
        });
        initializers.push(TensorProto {
            dims: vec![scales.len() as i64],
            data_type: PbType::Float as i32,
            name: s_name,
            raw_data: scales.iter().flat_map(|s| s.to_le_bytes()).collect(),
            ..TensorProto::default()
        });
    }
    graph.initializer = initializers;
    // An initializer listed as a graph input (IR < 4) is an overridable default; once quantised
    // it is a constant.
    graph.input.retain(|i| !quantized_names.contains(&i.name));
    dequantize.append(&mut graph.node);
    graph.node = dequantize;
    proto.metadata_props.push(StringStringEntryProto {
        key: METADATA_KEY.into(),
        value: SCHEME.into(),
    });
    let bytes = proto.encode_to_vec();
    report.int8_bytes = bytes.len() as u64;
    // In the order asked (the fallback's order: most sensitive first).
    report
        .kept_fp32
        .sort_by_key(|name| keep.iter().position(|k| k == name));
    Ok(Quantized {
        bytes,
        report,
        weights,
    })
}

/// The weights worth quantising, with the axis of their output channels: the right operand of
/// MatMul (`[in, out]`: axis 1), of Gemm (axis 0 when `transB`), and embedding tables gathered on
/// axis 0 (`[rows, width]`: each output channel is a column, axis 1). A weight wanted on two
/// different axes is left alone.
fn weight_axes(nodes: &[NodeProto]) -> HashMap<&str, usize> {
    let mut axes: HashMap<&str, Option<usize>> = HashMap::new();
    let int_attr = |node: &NodeProto, name: &str, default: i64| {
        node.attribute
            .iter()
            .find(|a| a.name == name)
            .map_or(default, |a| a.i)
    };
    for node in nodes {
        let (weight, axis) = match node.op_type.as_str() {
            "MatMul" => (node.input.get(1), 1),
            "Gemm" => (
                node.input.get(1),
                if int_attr(node, "transB", 0) == 1 {
                    0
                } else {
                    1
                },
            ),
            "Gather" if int_attr(node, "axis", 0) == 0 => (node.input.first(), 1),
            _ => continue,
        };
        let Some(weight) = weight else { continue };
        axes.entry(weight.as_str())
            .and_modify(|a| {
                if *a != Some(axis) {
                    *a = None;
                }
            })
            .or_insert(Some(axis));
    }
    axes.into_iter()
        .filter_map(|(k, v)| v.map(|v| (k, v)))
        .collect()
}

/// A rank-2 f32 tensor's values, when stored inline.
fn f32_values(tensor: &TensorProto) -> Option<Vec<f32>> {
    if tensor.dims.len() != 2 {
        return None;
    }
    let rows = usize::try_from(tensor.dims[0]).ok()?;
    let cols = usize::try_from(tensor.dims[1]).ok()?;
    let count = rows.checked_mul(cols)?;
    crate::dequantize::floats(tensor).filter(|values| values.len() == count)
}

/// Quantises a row-major `[rows, cols]` matrix per channel along `axis`; `None` when a value is
/// not finite.
pub fn quantize_matrix(
    values: &[f32],
    rows: usize,
    cols: usize,
    axis: usize,
) -> Option<(Vec<i8>, Vec<f32>)> {
    let channels = if axis == 0 { rows } else { cols };
    let channel = |i: usize| if axis == 0 { i / cols } else { i % cols };
    let mut max = vec![0f32; channels];
    for (i, &v) in values.iter().enumerate() {
        if !v.is_finite() {
            return None;
        }
        let m = &mut max[channel(i)];
        *m = m.max(v.abs());
    }
    let scales: Vec<f32> = max
        .iter()
        .map(|&m| if m > 0.0 { m / 127.0 } else { 1.0 })
        .collect();
    let q = values
        .iter()
        .enumerate()
        .map(|(i, &v)| (v / scales[channel(i)]).round().clamp(-127.0, 127.0) as i8)
        .collect();
    Some((q, scales))
}

fn unique(taken: &mut HashSet<String>, wanted: &str) -> String {
    let mut name = wanted.to_owned();
    let mut n = 1;
    while taken.contains(&name) {
        n += 1;
        name = format!("{wanted}.{n}");
    }
    taken.insert(name.clone());
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantize_matrix_is_per_channel_and_symmetric() {
        // 2 rows × 3 columns; channels are columns (axis 1).
        let w = [1.2, -0.5, 0.0, -2.0, 0.3, 0.0];
        let (q, s) = quantize_matrix(&w, 2, 3, 1).unwrap();
        assert_eq!(s, vec![2.0 / 127.0, 0.5 / 127.0, 1.0]);
        assert_eq!(q, vec![76, -127, 0, -127, 76, 0]);
        // The same matrix by rows (axis 0).
        let (q, s) = quantize_matrix(&w, 2, 3, 0).unwrap();
        assert_eq!(s, vec![1.2 / 127.0, 2.0 / 127.0]);
        assert_eq!(q, vec![127, -53, 0, -127, 19, 0]);
        assert!(quantize_matrix(&[f32::NAN, 1.0], 1, 2, 1).is_none());
    }

    #[test]
    fn dequantised_values_are_within_half_a_step() {
        let w: Vec<f32> = (0..64 * 5)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        let (q, s) = quantize_matrix(&w, 64, 5, 1).unwrap();
        for (i, (&v, &q)) in w.iter().zip(&q).enumerate() {
            let step = s[i % 5];
            assert!((v - f32::from(q) * step).abs() <= step / 2.0 + 1e-6);
        }
    }

    #[test]
    fn refuses_what_is_not_a_model() {
        assert!(matches!(
            quantize_int8(b"\xff\xff\xff not protobuf"),
            Err(QuantizeError::NotOnnx(_))
        ));
    }
}
