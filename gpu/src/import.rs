//! ONNX → the GPU graph ([`crate::graph`]), or the reason (which op) the model cannot run on
//! the GPU. This file reads the model and its nodes; `constants` reads constant tensors (and
//! the int8 `DequantizeLinear` pattern), `ops` the ops that need more than a step each.
//!
//! The import reads the ONNX protobuf (tract-onnx's `pb` structs) rather than tract's optimised
//! graph: tract folds `DequantizeLinear(int8 initializer, scale)` into f32 constants, and the GPU
//! must hold the int8 weights themselves. ONNX op semantics are also a stabler vocabulary than
//! tract's internal ops. Shapes are not fixed here: every step computes its output shape from its
//! inputs' when a new input shape is first seen ([`crate::shape`]), so one import serves every
//! batch size.

use std::collections::HashMap;

use outpost_runtime::quantize;
use outpost_shared::{DataType, Dim, TensorSpec};
use prost::Message;
use tract_onnx::pb;

use crate::graph::{BinaryOp, DType, Graph, HostConst, Origin, Step, UnaryOp};

mod constants;
mod host;
mod ops;
mod tensor;

/// Why a model does not run on the GPU (at import, or while its weights are uploaded).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ImportError {
    /// An op (or a use of one) without a GPU kernel, or weights too large for the adapter's
    /// bindings: the model runs on tract instead.
    #[error("op {op} (node {node:?}): {reason}")]
    Unsupported {
        /// The ONNX op type.
        op: String,
        /// The node's name (or its first output, when unnamed).
        node: String,
        /// What about it is not covered.
        reason: String,
    },
    /// The file is not a model this engine can read at all.
    #[error("{0}")]
    Invalid(String),
    /// The GPU refused the model (out of memory, a lost device).
    #[error("{0}")]
    Device(String),
}

/// ONNX tensor element types.
mod onnx_type {
    pub(super) const FLOAT: i32 = 1;
    pub(super) const INT8: i32 = 3;
    pub(super) const INT32: i32 = 6;
    pub(super) const INT64: i32 = 7;
}

/// A node input as the import sees it.
enum Ref {
    Value(usize),
    F32(Vec<usize>, Vec<f32>),
    Ints,
    /// `DequantizeLinear(int8, scale, axis)` of constants.
    Q8 {
        dims: Vec<usize>,
        q: Vec<i8>,
        scale: Vec<f32>,
        axis: usize,
    },
}

/// A dequantised constant: dims, int8 values, scales, the scales' axis.
type Q8Parts = (Vec<usize>, Vec<i8>, Vec<f32>, usize);

impl Ref {
    /// A `Q8` as f32 (dims, values), for a use that cannot take int8; other kinds as they are
    /// (only called on `Q8`).
    fn dequantized(self) -> (Vec<usize>, Vec<f32>) {
        match self {
            Ref::Q8 {
                dims,
                q,
                scale,
                axis,
            } => {
                let data = constants::dequantize(&dims, &q, &scale, axis);
                (dims, data)
            }
            Ref::F32(dims, data) => (dims, data),
            Ref::Value(_) | Ref::Ints => (Vec::new(), Vec::new()),
        }
    }
}

/// One import under way: the graph so far, and every name seen, by what it is.
struct Importer {
    opset: i64,
    graph: Graph,
    names: HashMap<String, usize>,
    f32s: HashMap<String, (Vec<usize>, Vec<f32>)>,
    /// Integer constants: dims, values.
    ints: HashMap<String, (Vec<usize>, Vec<i64>)>,
    q8s: HashMap<String, Q8Parts>,
    int8s: HashMap<String, (Vec<usize>, Vec<i8>)>,
    /// Constants already made values (uploaded once however often used).
    const_values: HashMap<String, usize>,
    /// For I32 values: the input they view.
    id_root: HashMap<usize, usize>,
    /// Constants made host values (`Step::Host` of a `HostOp::Const`), by name.
    host_consts: HashMap<String, usize>,
    /// Host values made GPU values ([`Step::Upload`]), and i32 ids made f32 ([`Step::CastIds`]),
    /// once each.
    bridges: HashMap<(usize, DType), usize>,
    /// f32 GPU values that hold integers (ids made f32, integer constants, casts to an integer
    /// kind, and integer arithmetic on them): a division of two truncates, as ONNX's does.
    int_values: std::collections::HashSet<usize>,
    /// Whether the file carries the int8 pattern (else weights are quantised here).
    quantised_file: bool,
}

/// Imports an ONNX model.
pub(crate) fn import(bytes: &[u8]) -> Result<Graph, ImportError> {
    let model = pb::ModelProto::decode(bytes)
        .map_err(|e| ImportError::Invalid(format!("not an ONNX model: {e}")))?;
    let opset = model
        .opset_import
        .iter()
        .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
        .map_or(1, |o| o.version);
    let quantised_file = model
        .metadata_props
        .iter()
        .any(|p| p.key == quantize::METADATA_KEY);
    let graph = model
        .graph
        .ok_or_else(|| ImportError::Invalid("the model has no graph".into()))?;
    let mut im = Importer {
        opset,
        graph: Graph::default(),
        names: HashMap::new(),
        f32s: HashMap::new(),
        ints: HashMap::new(),
        q8s: HashMap::new(),
        int8s: HashMap::new(),
        const_values: HashMap::new(),
        id_root: HashMap::new(),
        host_consts: HashMap::new(),
        bridges: HashMap::new(),
        int_values: std::collections::HashSet::new(),
        quantised_file,
    };
    for t in &graph.initializer {
        im.add_constant(&t.name, t)?;
    }
    for info in &graph.input {
        if im.is_constant(&info.name) {
            continue;
        }
        let spec = spec_of(info)?;
        if info
            .r#type
            .as_ref()
            .and_then(|t| t.value.as_ref())
            .is_some_and(|v| matches!(v, pb::type_proto::Value::TensorType(t) if t.shape.is_none()))
        {
            return Err(ImportError::Invalid(format!(
                "input {:?} has no shape",
                info.name
            )));
        }
        let dtype = match spec.datatype {
            DataType::Fp32 => DType::F32,
            DataType::Int64 | DataType::Int32 => DType::I32,
            other => {
                return Err(unsupported(
                    "input",
                    &info.name,
                    format!("{other} inputs have no GPU representation"),
                ));
            }
        };
        let index = im.graph.inputs.len();
        let v = im.new_value(&info.name, dtype, Origin::Input(index));
        if dtype == DType::I32 {
            im.id_root.insert(v, index);
        }
        im.graph.inputs.push(spec);
        im.graph.input_values.push(v);
        im.graph.id_bounds.push(Vec::new());
    }
    for node in &graph.node {
        im.node(node)?;
    }
    for info in &graph.output {
        let spec = spec_of(info)?;
        // Ids come back as i32 and are widened on the host (an exported encoder passes its
        // input_ids and attention_mask through as outputs).
        let integer = matches!(spec.datatype, DataType::Int64 | DataType::Int32);
        let v = match im.names.get(&info.name) {
            Some(&v) if im.graph.values[v].dtype == DType::Host => im.upload(v, DType::F32),
            Some(&v) => v,
            None => match im.reference(&info.name, "output")? {
                Ref::Value(v) => v,
                Ref::F32(dims, data) => im.const_value(&info.name, dims, data),
                _ => {
                    return Err(unsupported(
                        "output",
                        &info.name,
                        "a constant integer output".into(),
                    ));
                }
            },
        };
        let dtype = im.graph.values[v].dtype;
        if !(spec.datatype == DataType::Fp32 && dtype == DType::F32
            || integer && dtype == DType::I32)
        {
            return Err(unsupported(
                "output",
                &info.name,
                format!(
                    "{} outputs computed on the GPU (FP32 comes back, and ids passed through as INT64 or INT32)",
                    spec.datatype
                ),
            ));
        }
        im.graph.outputs.push(spec);
        im.graph.output_values.push(v);
    }
    Ok(im.graph)
}

fn unsupported(op: &str, node: &str, reason: String) -> ImportError {
    ImportError::Unsupported {
        op: op.to_owned(),
        node: node.to_owned(),
        reason,
    }
}

fn spec_of(info: &pb::ValueInfoProto) -> Result<TensorSpec, ImportError> {
    let invalid = |why: &str| ImportError::Invalid(format!("graph value {:?}: {why}", info.name));
    let Some(pb::type_proto::Value::TensorType(t)) =
        info.r#type.as_ref().and_then(|t| t.value.as_ref())
    else {
        return Err(invalid("not a tensor"));
    };
    let datatype = match t.elem_type {
        1 => DataType::Fp32,
        2 => DataType::Uint8,
        3 => DataType::Int8,
        6 => DataType::Int32,
        7 => DataType::Int64,
        9 => DataType::Bool,
        10 => DataType::Fp16,
        11 => DataType::Fp64,
        other => return Err(invalid(&format!("element type {other} is not carried"))),
    };
    // An output may leave its shape to inference; an input must have one.
    let Some(shape) = t.shape.as_ref() else {
        return Ok(TensorSpec {
            name: info.name.clone(),
            datatype,
            shape: Vec::new(),
        });
    };
    let shape = shape
        .dim
        .iter()
        .map(|d| match d.value {
            Some(pb::tensor_shape_proto::dimension::Value::DimValue(n)) if n > 0 => {
                Dim::Fixed(n as u64)
            }
            _ => Dim::Dynamic,
        })
        .collect();
    Ok(TensorSpec {
        name: info.name.clone(),
        datatype,
        shape,
    })
}

impl Importer {
    fn new_value(&mut self, name: &str, dtype: DType, origin: Origin) -> usize {
        let v = self.graph.add_value(dtype, origin);
        self.names.insert(name.to_owned(), v);
        v
    }

    fn reference(&self, name: &str, op: &str) -> Result<Ref, ImportError> {
        if let Some(&v) = self.names.get(name) {
            return Ok(Ref::Value(v));
        }
        if let Some((dims, data)) = self.f32s.get(name) {
            return Ok(Ref::F32(dims.clone(), data.clone()));
        }
        if self.ints.contains_key(name) {
            return Ok(Ref::Ints);
        }
        if let Some((dims, q, scale, axis)) = self.q8s.get(name) {
            return Ok(Ref::Q8 {
                dims: dims.clone(),
                q: q.clone(),
                scale: scale.clone(),
                axis: *axis,
            });
        }
        Err(unsupported(
            op,
            name,
            format!(
                "input {name:?} is not produced by any GPU step (unknown value or unsupported type)"
            ),
        ))
    }

    fn const_value(&mut self, name: &str, dims: Vec<usize>, data: Vec<f32>) -> usize {
        if let Some(&v) = self.const_values.get(name) {
            return v;
        }
        let index = self.graph.consts.len();
        self.graph.consts.push(HostConst { dims, data });
        let v = self.graph.add_value(DType::F32, Origin::Const(index));
        self.const_values.insert(name.to_owned(), v);
        v
    }

    /// A host value written to the GPU as `dtype` with each call (once per value and type).
    pub(super) fn upload(&mut self, x: usize, dtype: DType) -> usize {
        if let Some(&v) = self.bridges.get(&(x, dtype)) {
            return v;
        }
        let out = self.graph.add_value(dtype, Origin::Step);
        self.graph.steps.push(Step::Upload { x, dtype, out });
        self.bridges.insert((x, dtype), out);
        out
    }

    /// A node input that must be f32 data on the GPU: a constant becomes one, ids become f32
    /// numbers, a host value is uploaded.
    fn f32_input(&mut self, node: &pb::NodeProto, i: usize) -> Result<usize, ImportError> {
        let name = input_name(node, i)?;
        match self.reference(name, &node.op_type)? {
            Ref::Value(v) => Ok(match self.graph.values[v].dtype {
                DType::F32 => v,
                DType::Host => self.upload(v, DType::F32),
                DType::I32 => {
                    if let Some(&f) = self.bridges.get(&(v, DType::F32)) {
                        return Ok(f);
                    }
                    let out = self.graph.add_value(DType::F32, Origin::Step);
                    self.graph.steps.push(Step::CastIds { x: v, out });
                    self.bridges.insert((v, DType::F32), out);
                    self.int_values.insert(out);
                    out
                }
            }),
            Ref::Ints => {
                let (dims, data) = self.ints[name].clone();
                let data = data.iter().map(|&v| v as f32).collect();
                let v = self.const_value(name, dims, data);
                self.int_values.insert(v);
                Ok(v)
            }
            Ref::F32(dims, data) => Ok(self.const_value(name, dims, data)),
            q8 @ Ref::Q8 { .. } => {
                let (dims, data) = q8.dequantized();
                Ok(self.const_value(name, dims, data))
            }
        }
    }

    fn const_ints(&self, node: &pb::NodeProto, i: usize) -> Result<Option<Vec<i64>>, ImportError> {
        match node.input.get(i).filter(|n| !n.is_empty()) {
            None => Ok(None),
            Some(name) => match self.ints.get(name) {
                Some((_, v)) => Ok(Some(v.clone())),
                None => Err(node_unsupported(
                    node,
                    format!("input {name:?} must be a constant integer tensor"),
                )),
            },
        }
    }

    /// Marks `node`'s output as an f32 value holding integers.
    pub(super) fn mark_int(&mut self, node: &pb::NodeProto) {
        if let Some(&v) = node.output.first().and_then(|o| self.names.get(o)) {
            self.int_values.insert(v);
        }
    }

    fn push(
        &mut self,
        node: &pb::NodeProto,
        dtype: DType,
        step: impl FnOnce(usize) -> Step,
    ) -> Result<(), ImportError> {
        let out_name = node
            .output
            .first()
            .ok_or_else(|| node_unsupported(node, "the node has no output".into()))?;
        let out = self.new_value(out_name, dtype, Origin::Step);
        let step = step(out);
        if dtype == DType::I32
            && let Step::View { x, .. } = step
            && let Some(&root) = self.id_root.get(&x)
        {
            self.id_root.insert(out, root);
        }
        self.graph.steps.push(step);
        Ok(())
    }

    fn node(&mut self, node: &pb::NodeProto) -> Result<(), ImportError> {
        if !node.domain.is_empty() && node.domain != "ai.onnx" {
            return Err(node_unsupported(
                node,
                format!("domain {:?} has no GPU kernels", node.domain),
            ));
        }
        let used_outputs = node.output.iter().filter(|o| !o.is_empty()).count();
        let op = node.op_type.as_str();
        if op == "Split" {
            return self.split(node);
        }
        if used_outputs > 1 && op != "Dropout" && op != "LayerNormalization" {
            return Err(node_unsupported(node, "more than one output".into()));
        }
        if self.try_host_node(node)? {
            return Ok(());
        }
        if let Some(code) = host::binary_op(op) {
            if node.input.len() != 2 {
                return Err(node_unsupported(
                    node,
                    format!("{} inputs (the GPU takes two)", node.input.len()),
                ));
            }
            let a = self.f32_input(node, 0)?;
            let b = self.f32_input(node, 1)?;
            let integers = self.int_values.contains(&a) && self.int_values.contains(&b);
            if integers && code == BinaryOp::Div {
                // Integer division truncates.
                let q = self.graph.add_value(DType::F32, Origin::Step);
                self.graph.steps.push(Step::Binary {
                    op: code,
                    a,
                    b,
                    out: q,
                });
                self.push(node, DType::F32, |out| Step::Unary {
                    op: UnaryOp::Trunc,
                    x: q,
                    out,
                })?;
            } else {
                self.push(node, DType::F32, |out| Step::Binary {
                    op: code,
                    a,
                    b,
                    out,
                })?;
            }
            let predicate = code.is_predicate();
            if (integers && code != BinaryOp::Pow) || predicate {
                self.mark_int(node);
            }
            return Ok(());
        }
        match op {
            "Constant" => self.constant_node(node),
            "DequantizeLinear" => self.dequantize_node(node),
            "MatMul" if !self.is_weight(node, 1) => self.batch_matmul(node),
            "MatMul" => {
                let a = self.f32_input(node, 0)?;
                let weight = self.weight(node, 1, false, 1.0)?;
                self.push(node, DType::F32, |out| Step::MatMul {
                    a,
                    weight,
                    act: UnaryOp::Identity,
                    out,
                })
            }
            "Gemm" => self.gemm(node),
            "Einsum" | "EinSum" => self.einsum(node),
            "Relu" | "Sigmoid" | "Tanh" | "Erf" | "Neg" | "Exp" | "Sqrt" | "Abs" | "Gelu"
            | "Not" | "Floor" | "Ceil" | "Reciprocal" | "Log" => {
                let code = match op {
                    "Not" => UnaryOp::Not,
                    "Floor" => UnaryOp::Floor,
                    "Ceil" => UnaryOp::Ceil,
                    "Reciprocal" => UnaryOp::Reciprocal,
                    "Log" => UnaryOp::Log,
                    "Relu" => UnaryOp::Relu,
                    "Sigmoid" => UnaryOp::Sigmoid,
                    "Tanh" => UnaryOp::Tanh,
                    "Erf" => UnaryOp::Erf,
                    "Neg" => UnaryOp::Neg,
                    "Exp" => UnaryOp::Exp,
                    "Sqrt" => UnaryOp::Sqrt,
                    "Abs" => UnaryOp::Abs,
                    _ => match attr_string(node, "approximate").as_deref() {
                        None | Some("none") => UnaryOp::Gelu,
                        Some("tanh") => UnaryOp::GeluTanh,
                        Some(other) => {
                            return Err(node_unsupported(node, format!("approximate = {other:?}")));
                        }
                    },
                };
                let x = self.f32_input(node, 0)?;
                self.push(node, DType::F32, |out| Step::Unary { op: code, x, out })
            }
            "Softmax" => {
                let legacy = self.opset < 13;
                let axis = attr_int(node, "axis").unwrap_or(if legacy { 1 } else { -1 });
                let x = self.f32_input(node, 0)?;
                self.push(node, DType::F32, |out| Step::Softmax {
                    x,
                    axis,
                    legacy,
                    out,
                })
            }
            "Gather" => self.gather(node),
            "ReduceMean" | "ReduceSum" | "ReduceMax" | "ReduceMin" | "ReduceSumSquare"
            | "ReduceL2" => self.reduce(node),
            "Where" => self.where_node(node),
            "LayerNormalization" => self.layer_norm(node),
            "Clip" => self.clip(node),
            "Expand" => self.expand(node),
            "Slice" => self.slice(node),
            "Cast" => self.cast(node),
            "Shape" | "Size" | "Range" | "ConstantOfShape" => Err(node_unsupported(
                node,
                "its inputs are computed on the GPU (only shape arithmetic is folded)".into(),
            )),
            "Concat" => {
                let axis = attr_int(node, "axis")
                    .ok_or_else(|| node_unsupported(node, "no axis attribute".into()))?;
                if node.input.is_empty() {
                    return Err(node_unsupported(node, "no inputs".into()));
                }
                let xs = (0..node.input.len())
                    .map(|i| self.f32_input(node, i))
                    .collect::<Result<Vec<_>, _>>()?;
                self.push(node, DType::F32, |out| Step::Concat { xs, axis, out })
            }
            "Transpose" => {
                let perm = attr_ints(node, "perm");
                let x = self.f32_input(node, 0)?;
                self.push(node, DType::F32, |out| Step::Transpose { x, perm, out })
            }
            "Reshape" | "Flatten" | "Squeeze" | "Unsqueeze" | "Identity" | "Dropout" => {
                self.view(node)
            }
            _ => Err(node_unsupported(node, "no GPU kernel for this op".into())),
        }
    }
}

fn node_unsupported(node: &pb::NodeProto, reason: String) -> ImportError {
    let name = if node.name.is_empty() {
        node.output.first().cloned().unwrap_or_default()
    } else {
        node.name.clone()
    };
    unsupported(&node.op_type, &name, reason)
}

fn input_name(node: &pb::NodeProto, i: usize) -> Result<&str, ImportError> {
    node.input
        .get(i)
        .map(String::as_str)
        .filter(|n| !n.is_empty())
        .ok_or_else(|| node_unsupported(node, format!("input {i} is missing")))
}

fn attr<'a>(node: &'a pb::NodeProto, name: &str) -> Option<&'a pb::AttributeProto> {
    node.attribute.iter().find(|a| a.name == name)
}

fn attr_int(node: &pb::NodeProto, name: &str) -> Option<i64> {
    attr(node, name).map(|a| a.i)
}

fn attr_float(node: &pb::NodeProto, name: &str) -> Option<f32> {
    attr(node, name).map(|a| a.f)
}

fn attr_ints(node: &pb::NodeProto, name: &str) -> Option<Vec<i64>> {
    attr(node, name).map(|a| a.ints.clone())
}

fn attr_string(node: &pb::NodeProto, name: &str) -> Option<String> {
    attr(node, name).map(|a| String::from_utf8_lossy(&a.s).into_owned())
}
