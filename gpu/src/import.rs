//! ONNX → a list of GPU steps, or the reason (which op) the model cannot run on the GPU.
//!
//! The import reads the ONNX protobuf (tract-onnx's `pb` structs) rather than tract's optimised
//! graph: tract folds `DequantizeLinear(int8 initializer, scale)` into f32 constants, and the GPU
//! must hold the int8 weights themselves. ONNX op semantics are also a stabler vocabulary than
//! tract's internal ops. Shapes are not fixed here: every step computes its output shape from its
//! inputs' when a new input shape is first seen ([`crate::model`]), so one import serves every
//! batch size.

use std::collections::HashMap;

use outpost_runtime::quantize;
use outpost_shared::{DataType, Dim, TensorSpec};
use prost::Message;
use tract_onnx::pb;

use crate::kernels::{binary, unary};

/// Why a model does not run on the GPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImportError {
    /// An op (or a use of one) without a GPU kernel: the model runs on tract instead.
    Unsupported {
        /// The ONNX op type.
        op: String,
        /// The node's name (or its first output, when unnamed).
        node: String,
        /// What about it is not covered.
        reason: String,
    },
    /// The file is not a model this engine can read at all.
    Invalid(String),
    /// The GPU refused the model (out of memory, a lost device).
    Device(String),
}

impl std::fmt::Display for ImportError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ImportError::Unsupported { op, node, reason } => {
                write!(f, "op {op} (node {node:?}): {reason}")
            }
            ImportError::Invalid(m) | ImportError::Device(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for ImportError {}

/// What a value holds on the GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DType {
    F32,
    /// Ids (ONNX int32/int64, narrowed on the host): only Gather indices and shape-only ops.
    I32,
}

#[derive(Debug)]
pub(crate) struct Value {
    pub dtype: DType,
    pub origin: Origin,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Origin {
    Input(usize),
    Const(usize),
    Step,
}

/// An f32 constant the steps read (biases of unfused adds, operands of element-wise ops).
#[derive(Debug)]
pub(crate) struct HostConst {
    pub dims: Vec<usize>,
    pub data: Vec<f32>,
}

/// A matrix product's constant right operand, one output channel per row: `[n][k]`.
#[derive(Debug)]
pub(crate) struct MatWeight {
    pub k: usize,
    pub n: usize,
    pub data: WeightData,
    /// Added to each output channel (a fused `Add`, or Gemm's `C`).
    pub bias: Option<Vec<f32>>,
}

#[derive(Debug)]
pub(crate) enum WeightData {
    F32(Vec<f32>),
    /// int8 with one scale per output channel.
    Q8 {
        q: Vec<i8>,
        scale: Vec<f32>,
    },
}

/// A constant gathered from (an embedding table), row-major.
#[derive(Debug)]
pub(crate) struct Table {
    pub dims: Vec<usize>,
    pub data: TableData,
    /// The axis gathered along.
    pub axis: usize,
}

#[derive(Debug)]
pub(crate) enum TableData {
    F32(Vec<f32>),
    /// int8 with one scale per index along `axis`.
    Q8 {
        q: Vec<i8>,
        scale: Vec<f32>,
        axis: usize,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum View {
    Identity,
    Reshape { shape: Vec<i64>, allow_zero: bool },
    Flatten { axis: i64 },
    Squeeze { axes: Option<Vec<i64>> },
    Unsqueeze { axes: Vec<i64> },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GatherSource {
    Table(usize),
    Value(usize),
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Step {
    MatMul {
        a: usize,
        weight: usize,
        act: u32,
        out: usize,
    },
    Binary {
        op: u32,
        a: usize,
        b: usize,
        out: usize,
    },
    Unary {
        op: u32,
        x: usize,
        out: usize,
    },
    Softmax {
        x: usize,
        axis: i64,
        /// Opset < 13: the input is coerced to 2-D at `axis`.
        legacy: bool,
        out: usize,
    },
    Gather {
        data: GatherSource,
        ids: usize,
        axis: i64,
        out: usize,
    },
    Reduce {
        x: usize,
        /// `None`: every axis.
        axes: Option<Vec<i64>>,
        keep_dims: bool,
        mean: bool,
        out: usize,
    },
    Concat {
        xs: Vec<usize>,
        axis: i64,
        out: usize,
    },
    Transpose {
        x: usize,
        perm: Option<Vec<i64>>,
        out: usize,
    },
    View {
        x: usize,
        view: View,
        out: usize,
    },
}

impl Step {
    pub(crate) fn out(&self) -> usize {
        match self {
            Step::MatMul { out, .. }
            | Step::Binary { out, .. }
            | Step::Unary { out, .. }
            | Step::Softmax { out, .. }
            | Step::Gather { out, .. }
            | Step::Reduce { out, .. }
            | Step::Concat { out, .. }
            | Step::Transpose { out, .. }
            | Step::View { out, .. } => *out,
        }
    }

    pub(crate) fn inputs(&self) -> Vec<usize> {
        match self {
            Step::MatMul { a, .. } => vec![*a],
            Step::Binary { a, b, .. } => vec![*a, *b],
            Step::Unary { x, .. }
            | Step::Softmax { x, .. }
            | Step::Reduce { x, .. }
            | Step::Transpose { x, .. }
            | Step::View { x, .. } => vec![*x],
            Step::Gather { data, ids, .. } => match data {
                GatherSource::Value(v) => vec![*v, *ids],
                GatherSource::Table(_) => vec![*ids],
            },
            Step::Concat { xs, .. } => xs.clone(),
        }
    }
}

/// A model as GPU steps.
#[derive(Debug)]
pub(crate) struct Graph {
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
    pub values: Vec<Value>,
    pub input_values: Vec<usize>,
    pub output_values: Vec<usize>,
    pub consts: Vec<HostConst>,
    pub weights: Vec<MatWeight>,
    pub tables: Vec<Table>,
    pub steps: Vec<Step>,
    /// Per input: the sizes of the axes its ids index (every id must be within each).
    pub id_bounds: Vec<Vec<usize>>,
    /// Whether f32 weights were quantised here (the model had no int8 pattern).
    pub quantised_at_load: bool,
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
                let data = dequantize(&dims, &q, &scale, axis);
                (dims, data)
            }
            Ref::F32(dims, data) => (dims, data),
            Ref::Value(_) | Ref::Ints => (Vec::new(), Vec::new()),
        }
    }
}

struct Importer {
    opset: i64,
    graph: Graph,
    names: HashMap<String, usize>,
    f32s: HashMap<String, (Vec<usize>, Vec<f32>)>,
    ints: HashMap<String, Vec<i64>>,
    q8s: HashMap<String, Q8Parts>,
    int8s: HashMap<String, (Vec<usize>, Vec<i8>)>,
    /// Constants already made values (uploaded once however often used).
    const_values: HashMap<String, usize>,
    /// For I32 values: the input they view.
    id_root: HashMap<usize, usize>,
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
        graph: Graph {
            inputs: Vec::new(),
            outputs: Vec::new(),
            values: Vec::new(),
            input_values: Vec::new(),
            output_values: Vec::new(),
            consts: Vec::new(),
            weights: Vec::new(),
            tables: Vec::new(),
            steps: Vec::new(),
            id_bounds: Vec::new(),
            quantised_at_load: false,
        },
        names: HashMap::new(),
        f32s: HashMap::new(),
        ints: HashMap::new(),
        q8s: HashMap::new(),
        int8s: HashMap::new(),
        const_values: HashMap::new(),
        id_root: HashMap::new(),
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
        let v = match im.names.get(&info.name) {
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
        if spec.datatype != DataType::Fp32 || im.graph.values[v].dtype != DType::F32 {
            return Err(unsupported(
                "output",
                &info.name,
                format!(
                    "{} outputs (only FP32 comes back from the GPU)",
                    spec.datatype
                ),
            ));
        }
        im.graph.outputs.push(spec);
        im.graph.output_values.push(v);
    }
    fuse(&mut im.graph);
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

fn dims_of(t: &pb::TensorProto) -> Result<Vec<usize>, ImportError> {
    t.dims
        .iter()
        .map(|&d| usize::try_from(d))
        .collect::<Result<_, _>>()
        .map_err(|_| {
            ImportError::Invalid(format!("initializer {:?} has a negative dimension", t.name))
        })
}

fn count_of(name: &str, dims: &[usize]) -> Result<usize, ImportError> {
    dims.iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .ok_or_else(|| ImportError::Invalid(format!("initializer {name:?}: the shape overflows")))
}

/// The values of a constant tensor, by element type.
fn read_raw<const N: usize, T>(
    t: &pb::TensorProto,
    count: usize,
    from: impl Fn([u8; N]) -> T,
) -> Result<Vec<T>, ImportError> {
    if t.raw_data.len() != count * N {
        return Err(ImportError::Invalid(format!(
            "initializer {:?}: {} bytes of data for {count} elements",
            t.name,
            t.raw_data.len()
        )));
    }
    Ok(t.raw_data
        .chunks_exact(N)
        .map(|c| {
            let mut b = [0u8; N];
            b.copy_from_slice(c);
            from(b)
        })
        .collect())
}

fn typed_len_error(t: &pb::TensorProto, have: usize, count: usize) -> ImportError {
    ImportError::Invalid(format!(
        "initializer {:?}: {have} values for {count} elements",
        t.name
    ))
}

impl Importer {
    fn new_value(&mut self, name: &str, dtype: DType, origin: Origin) -> usize {
        let v = self.graph.values.len();
        self.graph.values.push(Value { dtype, origin });
        self.names.insert(name.to_owned(), v);
        v
    }

    fn is_constant(&self, name: &str) -> bool {
        self.f32s.contains_key(name)
            || self.ints.contains_key(name)
            || self.int8s.contains_key(name)
            || self.q8s.contains_key(name)
    }

    fn add_constant(&mut self, name: &str, t: &pb::TensorProto) -> Result<(), ImportError> {
        if t.data_location == Some(1) {
            return Err(ImportError::Invalid(format!(
                "initializer {name:?} keeps its data in an external file, which Outpost does not carry"
            )));
        }
        let dims = dims_of(t)?;
        let count = count_of(name, &dims)?;
        match t.data_type {
            onnx_type::FLOAT => {
                let data = if t.raw_data.is_empty() {
                    if t.float_data.len() != count {
                        return Err(typed_len_error(t, t.float_data.len(), count));
                    }
                    t.float_data.clone()
                } else {
                    read_raw(t, count, f32::from_le_bytes)?
                };
                self.f32s.insert(name.to_owned(), (dims, data));
            }
            onnx_type::INT64 | onnx_type::INT32 => {
                let data = if !t.raw_data.is_empty() && t.data_type == onnx_type::INT64 {
                    read_raw(t, count, i64::from_le_bytes)?
                } else if !t.raw_data.is_empty() {
                    read_raw(t, count, |b| i64::from(i32::from_le_bytes(b)))?
                } else if t.data_type == onnx_type::INT64 {
                    t.int64_data.clone()
                } else {
                    t.int32_data.iter().map(|&v| i64::from(v)).collect()
                };
                if data.len() != count {
                    return Err(typed_len_error(t, data.len(), count));
                }
                self.ints.insert(name.to_owned(), data);
            }
            onnx_type::INT8 => {
                let data: Vec<i8> = if t.raw_data.is_empty() {
                    t.int32_data.iter().map(|&v| v as i8).collect()
                } else {
                    t.raw_data.iter().map(|&b| b as i8).collect()
                };
                if data.len() != count {
                    return Err(typed_len_error(t, data.len(), count));
                }
                self.int8s.insert(name.to_owned(), (dims, data));
            }
            other => {
                // Kept out of the way: only an error if a GPU op reads it.
                tracing::debug!(
                    name,
                    data_type = other,
                    "constant of a type the GPU does not read"
                );
            }
        }
        Ok(())
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
        let v = self.graph.values.len();
        self.graph.values.push(Value {
            dtype: DType::F32,
            origin: Origin::Const(index),
        });
        self.const_values.insert(name.to_owned(), v);
        v
    }

    /// A node input that must be f32 data on the GPU (a constant becomes one).
    fn f32_input(&mut self, node: &pb::NodeProto, i: usize) -> Result<usize, ImportError> {
        let name = input_name(node, i)?;
        match self.reference(name, &node.op_type)? {
            Ref::Value(v) if self.graph.values[v].dtype == DType::F32 => Ok(v),
            Ref::Value(_) | Ref::Ints => Err(node_unsupported(
                node,
                format!("input {name:?} is an integer tensor; the GPU computes on f32 only"),
            )),
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
                Some(v) => Ok(Some(v.clone())),
                None => Err(node_unsupported(
                    node,
                    format!("input {name:?} must be a constant integer tensor"),
                )),
            },
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
        if dtype == DType::I32 {
            if let Step::View { x, .. } = step {
                if let Some(&root) = self.id_root.get(&x) {
                    self.id_root.insert(out, root);
                }
            }
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
        if used_outputs > 1 && op != "Dropout" {
            return Err(node_unsupported(node, "more than one output".into()));
        }
        match op {
            "Constant" => self.constant_node(node),
            "DequantizeLinear" => self.dequantize_node(node),
            "MatMul" => {
                let a = self.f32_input(node, 0)?;
                let weight = self.weight(node, 1, false, 1.0)?;
                self.push(node, DType::F32, |out| Step::MatMul {
                    a,
                    weight,
                    act: unary::NONE,
                    out,
                })
            }
            "Gemm" => self.gemm(node),
            "Einsum" | "EinSum" => self.einsum(node),
            "Add" | "Sub" | "Mul" | "Div" => {
                let code = match op {
                    "Add" => binary::ADD,
                    "Sub" => binary::SUB,
                    "Mul" => binary::MUL,
                    _ => binary::DIV,
                };
                let a = self.f32_input(node, 0)?;
                let b = self.f32_input(node, 1)?;
                self.push(node, DType::F32, |out| Step::Binary {
                    op: code,
                    a,
                    b,
                    out,
                })
            }
            "Relu" | "Sigmoid" | "Tanh" | "Erf" | "Neg" | "Exp" | "Sqrt" | "Abs" | "Gelu" => {
                let code = match op {
                    "Relu" => unary::RELU,
                    "Sigmoid" => unary::SIGMOID,
                    "Tanh" => unary::TANH,
                    "Erf" => unary::ERF,
                    "Neg" => unary::NEG,
                    "Exp" => unary::EXP,
                    "Sqrt" => unary::SQRT,
                    "Abs" => unary::ABS,
                    _ => match attr_string(node, "approximate").as_deref() {
                        None | Some("none") => unary::GELU,
                        Some("tanh") => unary::GELU_TANH,
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
            "ReduceMean" | "ReduceSum" => {
                let mean = op == "ReduceMean";
                let axes_in_input = if mean {
                    self.opset >= 18
                } else {
                    self.opset >= 13
                };
                let axes = if axes_in_input {
                    self.const_ints(node, 1)?
                } else {
                    attr_ints(node, "axes")
                };
                let noop = attr_int(node, "noop_with_empty_axes").unwrap_or(0) != 0;
                let keep_dims = attr_int(node, "keepdims").unwrap_or(1) != 0;
                let x = self.f32_input(node, 0)?;
                let axes = match axes {
                    Some(a) if !a.is_empty() => Some(a),
                    _ if noop => {
                        return self.push(node, DType::F32, |out| Step::View {
                            x,
                            view: View::Identity,
                            out,
                        });
                    }
                    _ => None,
                };
                self.push(node, DType::F32, |out| Step::Reduce {
                    x,
                    axes,
                    keep_dims,
                    mean,
                    out,
                })
            }
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
            "Reshape" | "Flatten" | "Squeeze" | "Unsqueeze" | "Identity" | "Dropout" | "Cast" => {
                self.view(node)
            }
            _ => Err(node_unsupported(node, "no GPU kernel for this op".into())),
        }
    }

    fn constant_node(&mut self, node: &pb::NodeProto) -> Result<(), ImportError> {
        let name = node.output.first().cloned().unwrap_or_default();
        for a in &node.attribute {
            match a.name.as_str() {
                "value" => {
                    if let Some(t) = &a.t {
                        return self.add_constant(&name, t);
                    }
                }
                "value_float" => {
                    self.f32s.insert(name, (vec![], vec![a.f]));
                    return Ok(());
                }
                "value_floats" => {
                    self.f32s
                        .insert(name, (vec![a.floats.len()], a.floats.clone()));
                    return Ok(());
                }
                "value_int" => {
                    self.ints.insert(name, vec![a.i]);
                    return Ok(());
                }
                "value_ints" => {
                    self.ints.insert(name, a.ints.clone());
                    return Ok(());
                }
                _ => {}
            }
        }
        Err(node_unsupported(
            node,
            "a constant of a kind the GPU does not read".into(),
        ))
    }

    fn dequantize_node(&mut self, node: &pb::NodeProto) -> Result<(), ImportError> {
        let x = input_name(node, 0)?;
        let Some((dims, q)) = self.int8s.get(x).cloned() else {
            return Err(node_unsupported(
                node,
                format!("input {x:?} must be an int8 initializer"),
            ));
        };
        let scale_name = input_name(node, 1)?;
        let Some((_, scale)) = self.f32s.get(scale_name).cloned() else {
            return Err(node_unsupported(
                node,
                format!("scale {scale_name:?} must be an f32 initializer"),
            ));
        };
        if let Some(zp) = node.input.get(2).filter(|n| !n.is_empty()) {
            let zero = self
                .int8s
                .get(zp)
                .is_some_and(|(_, z)| z.iter().all(|&v| v == 0))
                || self.ints.get(zp).is_some_and(|z| z.iter().all(|&v| v == 0));
            if !zero {
                return Err(node_unsupported(
                    node,
                    "a non-zero zero point (only symmetric int8)".into(),
                ));
            }
        }
        let axis = if scale.len() == 1 {
            0
        } else {
            let a = attr_int(node, "axis").unwrap_or(1);
            let rank = dims.len() as i64;
            let a = if a < 0 { a + rank } else { a };
            let ok = (0..rank).contains(&a) && dims[a as usize] == scale.len();
            if !ok {
                return Err(node_unsupported(
                    node,
                    "scale does not match the axis".into(),
                ));
            }
            a as usize
        };
        let scale = if scale.len() == 1 {
            // One scale for the tensor: spread it on axis 0 so every consumer sees per-channel.
            let rows = dims.first().copied().unwrap_or(1);
            vec![scale[0]; rows]
        } else {
            scale
        };
        let out = node.output.first().cloned().unwrap_or_default();
        self.q8s.insert(out, (dims, q, scale, axis));
        Ok(())
    }

    /// The constant right operand of a matrix product as `[n][k]`, quantised per output channel
    /// (kept int8 if it came int8; quantised here if the file has no int8 pattern), times
    /// `alpha`. `transposed`: the operand is `[n, k]` (Gemm's transB) instead of `[k, n]`.
    fn weight(
        &mut self,
        node: &pb::NodeProto,
        i: usize,
        transposed: bool,
        alpha: f32,
    ) -> Result<usize, ImportError> {
        let name = input_name(node, i)?;
        let (dims, data) = match self.reference(name, &node.op_type)? {
            Ref::Q8 {
                dims,
                q,
                scale,
                axis,
            } if dims.len() == 2 && axis == usize::from(!transposed) => {
                let (rows, cols) = (dims[0], dims[1]);
                let (k, n) = if transposed {
                    (cols, rows)
                } else {
                    (rows, cols)
                };
                let q = if transposed {
                    q
                } else {
                    transpose(&q, rows, cols)
                };
                let scale = scale.iter().map(|s| s * alpha).collect();
                return Ok(self.add_weight(k, n, WeightData::Q8 { q, scale }));
            }
            q8 @ Ref::Q8 { .. } => q8.dequantized(),
            Ref::F32(dims, data) => (dims, data),
            Ref::Value(_) | Ref::Ints => {
                return Err(node_unsupported(
                    node,
                    format!(
                        "right operand {name:?} is computed; only constant weights run on the GPU"
                    ),
                ));
            }
        };
        if dims.len() != 2 {
            return Err(node_unsupported(
                node,
                format!("weight {name:?} has rank {}, not 2", dims.len()),
            ));
        }
        let (rows, cols) = (dims[0], dims[1]);
        let (k, n) = if transposed {
            (cols, rows)
        } else {
            (rows, cols)
        };
        let nk: Vec<f32> = if transposed {
            data
        } else {
            transpose(&data, rows, cols)
        };
        let nk: Vec<f32> = nk.into_iter().map(|v| v * alpha).collect();
        if !self.quantised_file && nk.len() >= quantize::MIN_ELEMENTS {
            if let Some((q, scale)) = quantize::quantize_matrix(&nk, n, k, 0) {
                self.graph.quantised_at_load = true;
                return Ok(self.add_weight(k, n, WeightData::Q8 { q, scale }));
            }
        }
        Ok(self.add_weight(k, n, WeightData::F32(nk)))
    }

    fn add_weight(&mut self, k: usize, n: usize, data: WeightData) -> usize {
        self.graph.weights.push(MatWeight {
            k,
            n,
            data,
            bias: None,
        });
        self.graph.weights.len() - 1
    }

    fn gemm(&mut self, node: &pb::NodeProto) -> Result<(), ImportError> {
        if attr_int(node, "transA").unwrap_or(0) != 0 {
            return Err(node_unsupported(node, "transA = 1".into()));
        }
        let alpha = attr_float(node, "alpha").unwrap_or(1.0);
        let beta = attr_float(node, "beta").unwrap_or(1.0);
        let trans_b = attr_int(node, "transB").unwrap_or(0) != 0;
        let a = self.f32_input(node, 0)?;
        let weight = self.weight(node, 1, trans_b, alpha)?;
        if let Some(c) = node.input.get(2).filter(|n| !n.is_empty()) {
            let n = self.graph.weights[weight].n;
            let bias = match self.reference(c, "Gemm")? {
                Ref::F32(dims, data)
                    if data.len() == n && dims.iter().rev().skip(1).all(|&d| d == 1) =>
                {
                    data
                }
                Ref::F32(_, data) if data.len() == 1 => vec![data[0]; n],
                _ => {
                    return Err(node_unsupported(
                        node,
                        format!("C {c:?} must be a constant of {n} values (a bias)"),
                    ));
                }
            };
            self.graph.weights[weight].bias = Some(bias.into_iter().map(|v| v * beta).collect());
        }
        self.push(node, DType::F32, |out| Step::MatMul {
            a,
            weight,
            act: unary::NONE,
            out,
        })
    }

    /// EinSum equations that are a matrix product with a constant: `…k,kn->…n` or `…k,nk->…n`.
    fn einsum(&mut self, node: &pb::NodeProto) -> Result<(), ImportError> {
        let eq: String = attr_string(node, "equation")
            .unwrap_or_default()
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect();
        let not_matmul = || {
            node_unsupported(
                node,
                format!("equation {eq:?} is not a product with a constant matrix"),
            )
        };
        let (lhs, out) = eq.split_once("->").ok_or_else(not_matmul)?;
        let (a, b) = lhs.split_once(',').ok_or_else(not_matmul)?;
        let a = a.replace("...", "*");
        let out = out.replace("...", "*");
        let b: Vec<char> = b.chars().collect();
        let k = a.chars().last().ok_or_else(not_matmul)?;
        if b.len() != 2 || b[0] == b[1] || node.input.len() != 2 {
            return Err(not_matmul());
        }
        let (n, transposed) = if b[0] == k {
            (b[1], false)
        } else if b[1] == k {
            (b[0], true)
        } else {
            return Err(not_matmul());
        };
        let prefix = &a[..a.len() - k.len_utf8()];
        let expected = format!("{prefix}{n}");
        if out != expected || prefix.contains(k) || prefix.contains(n) {
            return Err(not_matmul());
        }
        let x = self.f32_input(node, 0)?;
        let weight = self.weight(node, 1, transposed, 1.0)?;
        self.push(node, DType::F32, |out| Step::MatMul {
            a: x,
            weight,
            act: unary::NONE,
            out,
        })
    }

    fn gather(&mut self, node: &pb::NodeProto) -> Result<(), ImportError> {
        let axis = attr_int(node, "axis").unwrap_or(0);
        let ids_name = input_name(node, 1)?;
        let ids = match self.reference(ids_name, "Gather")? {
            Ref::Value(v) if self.graph.values[v].dtype == DType::I32 => v,
            _ => {
                return Err(node_unsupported(
                    node,
                    format!("indices {ids_name:?} must be integer ids from an input"),
                ));
            }
        };
        let data_name = input_name(node, 0)?;
        let (data, dims) = match self.reference(data_name, "Gather")? {
            Ref::Q8 {
                dims,
                q,
                scale,
                axis: qa,
            } => {
                let t = self.add_table(dims.clone(), TableData::Q8 { q, scale, axis: qa });
                (GatherSource::Table(t), Some(dims))
            }
            Ref::F32(dims, data) => {
                let quantise = !self.quantised_file
                    && dims.len() == 2
                    && axis == 0
                    && data.len() >= quantize::MIN_ELEMENTS;
                let table = match quantise
                    .then(|| quantize::quantize_matrix(&data, dims[0], dims[1], 1))
                    .flatten()
                {
                    Some((q, scale)) => {
                        self.graph.quantised_at_load = true;
                        TableData::Q8 { q, scale, axis: 1 }
                    }
                    None => TableData::F32(data),
                };
                let t = self.add_table(dims.clone(), table);
                (GatherSource::Table(t), Some(dims))
            }
            Ref::Value(v) if self.graph.values[v].dtype == DType::F32 => {
                (GatherSource::Value(v), None)
            }
            _ => {
                return Err(node_unsupported(
                    node,
                    format!("data {data_name:?} must be f32"),
                ));
            }
        };
        if let Some(dims) = dims {
            let rank = dims.len() as i64;
            let a = if axis < 0 { axis + rank } else { axis };
            if !(0..rank).contains(&a) {
                return Err(node_unsupported(
                    node,
                    format!("axis {axis} out of range for rank {rank}"),
                ));
            }
            let Some(&root) = self.id_root.get(&ids) else {
                return Err(node_unsupported(
                    node,
                    "indices must come from a model input".into(),
                ));
            };
            self.graph.id_bounds[root].push(dims[a as usize]);
            if let GatherSource::Table(t) = data {
                self.graph.tables[t].axis = a as usize;
            }
        } else {
            return Err(node_unsupported(
                node,
                "gathering from a computed tensor (only constant tables)".into(),
            ));
        }
        self.push(node, DType::F32, |out| Step::Gather {
            data,
            ids,
            axis,
            out,
        })
    }

    fn add_table(&mut self, dims: Vec<usize>, data: TableData) -> usize {
        self.graph.tables.push(Table {
            dims,
            data,
            axis: 0,
        });
        self.graph.tables.len() - 1
    }

    fn view(&mut self, node: &pb::NodeProto) -> Result<(), ImportError> {
        let op = node.op_type.as_str();
        if op == "Dropout" && node.output.get(1).is_some_and(|m| !m.is_empty()) {
            return Err(node_unsupported(node, "the mask output".into()));
        }
        let name = input_name(node, 0)?;
        let x = match self.reference(name, op)? {
            Ref::Value(v) => v,
            _ => self.f32_input(node, 0)?,
        };
        let dtype = self.graph.values[x].dtype;
        let view = match op {
            "Reshape" => View::Reshape {
                shape: self
                    .const_ints(node, 1)?
                    .ok_or_else(|| node_unsupported(node, "no shape input".into()))?,
                allow_zero: attr_int(node, "allowzero").unwrap_or(0) != 0,
            },
            "Flatten" => View::Flatten {
                axis: attr_int(node, "axis").unwrap_or(1),
            },
            "Squeeze" => View::Squeeze {
                axes: if self.opset >= 13 {
                    self.const_ints(node, 1)?
                } else {
                    attr_ints(node, "axes")
                },
            },
            "Unsqueeze" => View::Unsqueeze {
                axes: if self.opset >= 13 {
                    self.const_ints(node, 1)?
                } else {
                    attr_ints(node, "axes")
                }
                .ok_or_else(|| node_unsupported(node, "no axes".into()))?,
            },
            "Cast" => {
                let to = attr_int(node, "to").unwrap_or(0) as i32;
                let same = match dtype {
                    DType::F32 => to == onnx_type::FLOAT,
                    DType::I32 => to == onnx_type::INT32 || to == onnx_type::INT64,
                };
                if !same {
                    return Err(node_unsupported(
                        node,
                        format!("a cast that changes the kind of number (to type {to})"),
                    ));
                }
                View::Identity
            }
            _ => View::Identity,
        };
        self.push(node, dtype, |out| Step::View { x, view, out })
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

fn transpose<T: Copy>(data: &[T], rows: usize, cols: usize) -> Vec<T> {
    let mut out = Vec::with_capacity(data.len());
    for c in 0..cols {
        for r in 0..rows {
            out.push(data[r * cols + c]);
        }
    }
    out
}

fn dequantize(dims: &[usize], q: &[i8], scale: &[f32], axis: usize) -> Vec<f32> {
    let inner: usize = dims.iter().skip(axis + 1).product();
    let len = dims.get(axis).copied().unwrap_or(1).max(1);
    q.iter()
        .enumerate()
        .map(|(i, &v)| f32::from(v) * scale[(i / inner.max(1)) % len])
        .collect()
}

/// Folds a bias `Add` and an activation into the matrix product before them, where nothing else
/// reads the intermediate values: one dispatch instead of three.
fn fuse(g: &mut Graph) {
    let mut uses = vec![0usize; g.values.len()];
    for s in &g.steps {
        for v in s.inputs() {
            uses[v] += 1;
        }
    }
    for &v in &g.output_values {
        uses[v] += 1;
    }
    let mut i = 0;
    while i + 1 < g.steps.len() {
        let Step::MatMul {
            a,
            weight,
            act,
            out,
        } = g.steps[i].clone()
        else {
            i += 1;
            continue;
        };
        let next = g.steps[i + 1].clone();
        if uses[out] != 1 {
            i += 1;
            continue;
        }
        match next {
            Step::Binary {
                op: binary::ADD,
                a: x,
                b: y,
                out: sum,
            } if act == unary::NONE && g.weights[weight].bias.is_none() => {
                let other = if x == out { y } else { x };
                let bias = match g.values[other].origin {
                    Origin::Const(c) => {
                        let c = &g.consts[c];
                        let n = g.weights[weight].n;
                        // A bias of rank 1: one of higher rank could add dimensions.
                        (c.data.len() == n && c.dims.len() <= 1).then(|| c.data.clone())
                    }
                    _ => None,
                };
                if let (Some(bias), true) = (bias, x == out || y == out) {
                    g.weights[weight].bias = Some(bias);
                    g.steps[i] = Step::MatMul {
                        a,
                        weight,
                        act,
                        out: sum,
                    };
                    g.steps.remove(i + 1);
                    continue;
                }
            }
            Step::Unary { op, x, out: y } if x == out && act == unary::NONE && op != unary::ERF => {
                g.steps[i] = Step::MatMul {
                    a,
                    weight,
                    act: op,
                    out: y,
                };
                g.steps.remove(i + 1);
                continue;
            }
            _ => {}
        }
        i += 1;
    }
}
