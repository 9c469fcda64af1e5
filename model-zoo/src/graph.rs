//! A small ONNX graph builder over tract's protobuf structs, and the seeded generator that fills
//! the weights. Public so tests elsewhere (the GPU engine's single-op graphs) build models the
//! same way. Initializers are stored as little-endian `raw_data` in the order they are made,
//! so the same seed always gives the same bytes.

use tract_onnx::pb::{
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, StringStringEntryProto,
    TensorProto, TensorShapeProto, TypeProto, ValueInfoProto,
    attribute_proto::AttributeType,
    tensor_proto::DataType,
    tensor_shape_proto::{Dimension, dimension::Value as DimValue},
    type_proto::{Tensor as TensorType, Value as TypeValue},
};

/// The ONNX opset the demo models use.
pub const OPSET: i64 = 13;

/// SplitMix64: tiny, fast, and the same on every platform.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[-limit, limit)`.
    pub fn uniform(&mut self, limit: f32) -> f32 {
        // 24 random bits give every representable step of an f32 in [0, 1).
        let unit = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
        (unit * 2.0 - 1.0) * limit
    }
}

/// A tensor dimension in a model's signature.
#[derive(Debug, Clone, Copy)]
pub enum Dim {
    Fixed(usize),
    Symbol(&'static str),
}

/// Builds an ONNX graph node by node; [`GraphBuilder::finish`] makes the model.
#[derive(Debug)]
pub struct GraphBuilder {
    rng: Rng,
    nodes: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
    inputs: Vec<ValueInfoProto>,
    outputs: Vec<ValueInfoProto>,
    next_id: usize,
    opset: i64,
}

impl GraphBuilder {
    pub fn new(seed: u64) -> Self {
        GraphBuilder {
            rng: Rng::new(seed),
            nodes: Vec::new(),
            initializers: Vec::new(),
            inputs: Vec::new(),
            outputs: Vec::new(),
            next_id: 0,
            opset: OPSET,
        }
    }

    /// Declares a later opset than [`OPSET`] (the text models are written at 14, as exporters of
    /// BERT-class models write them).
    pub fn with_opset(mut self, opset: i64) -> Self {
        self.opset = opset;
        self
    }

    /// The generator that fills the weights, for values drawn another way than [`Self::random`].
    pub fn rng(&mut self) -> &mut Rng {
        &mut self.rng
    }

    /// A fresh name, `{prefix}_{n}`, for a constant or a value that must not clash.
    pub fn fresh(&mut self, prefix: &str) -> String {
        self.next_id += 1;
        format!("{prefix}_{}", self.next_id)
    }

    /// Renames the value `from` (a node's output) to `to`, and every use of it.
    pub fn rename_value(&mut self, from: &str, to: &str) {
        for node in &mut self.nodes {
            for name in node.input.iter_mut().chain(node.output.iter_mut()) {
                if name == from {
                    *name = to.to_owned();
                }
            }
        }
    }

    /// A scalar i64 initializer (a `Gather` index, a `Range` bound).
    pub fn int_scalar(&mut self, name: &str, value: i64) -> String {
        self.initializer(name, DataType::Int64, &[], value.to_le_bytes().to_vec())
    }

    /// A scalar f32 initializer.
    pub fn float_scalar(&mut self, name: &str, value: f32) -> String {
        self.floats(name, &[], &[value])
    }

    pub fn input(&mut self, name: &str, elem: DataType, dims: &[Dim]) -> String {
        self.inputs.push(value_info(name, elem, dims));
        name.to_owned()
    }

    pub fn output(&mut self, name: &str, elem: DataType, dims: &[Dim]) {
        self.outputs.push(value_info(name, elem, dims));
    }

    /// An f32 initializer drawn uniformly from `[-limit, limit)`.
    pub fn random(&mut self, name: &str, dims: &[usize], limit: f32) -> String {
        let count: usize = dims.iter().product();
        let mut raw = Vec::with_capacity(count * 4);
        for _ in 0..count {
            raw.extend_from_slice(&self.rng.uniform(limit).to_le_bytes());
        }
        self.initializer(name, DataType::Float, dims, raw)
    }

    /// An output whose shape is left to shape inference.
    pub fn output_any(&mut self, name: &str, elem: DataType) {
        let mut info = value_info(name, elem, &[]);
        if let Some(TypeValue::TensorType(t)) = info.r#type.as_mut().and_then(|t| t.value.as_mut())
        {
            t.shape = None;
        }
        self.outputs.push(info);
    }

    /// An f32 initializer with the given values.
    pub fn floats(&mut self, name: &str, dims: &[usize], values: &[f32]) -> String {
        let raw = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.initializer(name, DataType::Float, dims, raw)
    }

    /// An i64 initializer (axes and the like).
    pub fn ints(&mut self, name: &str, values: &[i64]) -> String {
        let raw = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.initializer(name, DataType::Int64, &[values.len()], raw)
    }

    fn initializer(
        &mut self,
        name: &str,
        elem: DataType,
        dims: &[usize],
        raw_data: Vec<u8>,
    ) -> String {
        self.initializers.push(TensorProto {
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type: elem as i32,
            name: name.to_owned(),
            raw_data,
            ..TensorProto::default()
        });
        name.to_owned()
    }

    /// Adds a node; returns its (single) output's name, `out` or a fresh one.
    pub fn node(
        &mut self,
        op: &str,
        inputs: &[&str],
        out: Option<&str>,
        attributes: Vec<AttributeProto>,
    ) -> String {
        self.next_id += 1;
        let output = out.map_or_else(
            || format!("{}_{}", op.to_lowercase(), self.next_id),
            str::to_owned,
        );
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|s| (*s).to_owned()).collect(),
            output: vec![output.clone()],
            name: format!("{op}_{}", self.next_id),
            op_type: op.to_owned(),
            attribute: attributes,
            ..NodeProto::default()
        });
        output
    }

    /// A node with several named outputs (`Split`).
    pub fn node_with_outputs(
        &mut self,
        op: &str,
        inputs: &[&str],
        outputs: &[&str],
        attributes: Vec<AttributeProto>,
    ) {
        self.next_id += 1;
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|s| (*s).to_owned()).collect(),
            output: outputs.iter().map(|s| (*s).to_owned()).collect(),
            name: format!("{op}_{}", self.next_id),
            op_type: op.to_owned(),
            attribute: attributes,
            ..NodeProto::default()
        });
    }

    /// `x · W + b` with Glorot-uniform `W` of shape `[fan_in, fan_out]` (output channels last),
    /// then `activation` if any.
    pub fn dense(
        &mut self,
        x: &str,
        name: &str,
        fan_in: usize,
        fan_out: usize,
        activation: Option<&str>,
        gain: f32,
    ) -> String {
        let limit = gain * (6.0 / (fan_in + fan_out) as f32).sqrt();
        let w = self.random(&format!("{name}.weight"), &[fan_in, fan_out], limit);
        let b = self.random(&format!("{name}.bias"), &[fan_out], 0.01);
        let xw = self.node("MatMul", &[x, &w], None, vec![]);
        let y = self.node("Add", &[&xw, &b], None, vec![]);
        match activation {
            Some(op) => self.node(op, &[&y], None, vec![]),
            None => y,
        }
    }

    pub fn finish(self, name: &str, doc: &str, metadata: &[(&str, String)]) -> ModelProto {
        ModelProto {
            ir_version: 8,
            opset_import: vec![OperatorSetIdProto {
                domain: String::new(),
                version: self.opset,
            }],
            producer_name: "outpost-model-zoo".to_owned(),
            producer_version: env!("CARGO_PKG_VERSION").to_owned(),
            model_version: 1,
            doc_string: doc.to_owned(),
            graph: Some(GraphProto {
                node: self.nodes,
                name: name.to_owned(),
                initializer: self.initializers,
                input: self.inputs,
                output: self.outputs,
                ..GraphProto::default()
            }),
            metadata_props: metadata
                .iter()
                .map(|(k, v)| StringStringEntryProto {
                    key: (*k).to_owned(),
                    value: v.clone(),
                })
                .collect(),
            ..ModelProto::default()
        }
    }
}

pub fn int_attr(name: &str, value: i64) -> AttributeProto {
    AttributeProto {
        name: name.to_owned(),
        r#type: AttributeType::Int as i32,
        i: value,
        ..AttributeProto::default()
    }
}

pub fn ints_attr(name: &str, values: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.to_owned(),
        r#type: AttributeType::Ints as i32,
        ints: values.to_vec(),
        ..AttributeProto::default()
    }
}

/// A float attribute.
pub fn float_attr(name: &str, value: f32) -> AttributeProto {
    AttributeProto {
        name: name.to_owned(),
        r#type: AttributeType::Float as i32,
        f: value,
        ..AttributeProto::default()
    }
}

/// A string attribute.
pub fn string_attr(name: &str, value: &str) -> AttributeProto {
    AttributeProto {
        name: name.to_owned(),
        r#type: AttributeType::String as i32,
        s: value.as_bytes().to_vec(),
        ..AttributeProto::default()
    }
}

fn value_info(name: &str, elem: DataType, dims: &[Dim]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|d| Dimension {
            value: Some(match d {
                Dim::Fixed(n) => DimValue::DimValue(*n as i64),
                Dim::Symbol(s) => DimValue::DimParam((*s).to_owned()),
            }),
            ..Dimension::default()
        })
        .collect();
    ValueInfoProto {
        name: name.to_owned(),
        r#type: Some(TypeProto {
            value: Some(TypeValue::TensorType(TensorType {
                elem_type: elem as i32,
                shape: Some(TensorShapeProto { dim }),
            })),
            ..TypeProto::default()
        }),
        ..ValueInfoProto::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rng_is_deterministic_and_bounded() {
        let (mut a, mut b) = (Rng::new(7), Rng::new(7));
        for _ in 0..1000 {
            let x = a.uniform(0.5);
            assert_eq!(x, b.uniform(0.5));
            assert!((-0.5..0.5).contains(&x));
        }
        assert_ne!(Rng::new(1).next_u64(), Rng::new(2).next_u64());
    }
}
