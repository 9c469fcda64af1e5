//! The GPU engine's IR: a model as values and the steps that compute them, with the host copies
//! of its constants (weights, tables, small operands) until they are uploaded.
//!
//! [`crate::import`] builds it from ONNX, [`crate::fuse`] rewrites it, and every later stage
//! (shapes, memory, lowering) reads it. Values are numbered; a step reads values and writes one.
//! Shapes are not part of the graph: they follow from the input shapes of each call
//! ([`crate::shape`]), so one graph serves every batch size.

use outpost_shared::TensorSpec;

/// What a value holds on the GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DType {
    F32,
    /// Ids (ONNX int32/int64, narrowed on the host): only Gather indices and shape-only ops.
    I32,
}

/// One value of the graph.
#[derive(Debug)]
pub(crate) struct Value {
    pub dtype: DType,
    pub origin: Origin,
}

/// Where a value comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Origin {
    /// Model input `n`, written by each call.
    Input(usize),
    /// Constant `n` of [`Graph::consts`], uploaded once.
    Const(usize),
    /// The output of a step.
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

/// A step that only renames its input's elements: the output shares the input's buffer.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum View {
    Identity,
    Reshape { shape: Vec<i64>, allow_zero: bool },
    Flatten { axis: i64 },
    Squeeze { axes: Option<Vec<i64>> },
    Unsqueeze { axes: Vec<i64> },
}

/// What a Gather reads from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GatherSource {
    /// Table `n` of [`Graph::tables`].
    Table(usize),
    /// A computed value (refused at import: only constant tables run on the GPU).
    Value(usize),
}

/// Element-wise functions; also the activation fused into a matrix product
/// ([`UnaryOp::Identity`] when there is none).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub(crate) enum UnaryOp {
    Identity = 0,
    Relu = 1,
    Sigmoid = 2,
    Tanh = 3,
    Erf = 4,
    /// `Gelu` with `approximate = "none"`.
    Gelu = 5,
    /// `Gelu` with `approximate = "tanh"`.
    GeluTanh = 6,
    Neg = 7,
    Exp = 8,
    Sqrt = 9,
    Abs = 10,
}

impl UnaryOp {
    /// Every op, by code.
    #[cfg(test)]
    pub(crate) const ALL: [UnaryOp; 11] = [
        UnaryOp::Identity,
        UnaryOp::Relu,
        UnaryOp::Sigmoid,
        UnaryOp::Tanh,
        UnaryOp::Erf,
        UnaryOp::Gelu,
        UnaryOp::GeluTanh,
        UnaryOp::Neg,
        UnaryOp::Exp,
        UnaryOp::Sqrt,
        UnaryOp::Abs,
    ];

    /// The code the shaders' `apply` switches on (`kernels/common.wgsl`).
    pub(crate) fn code(self) -> u32 {
        self as u32
    }
}

/// Element-wise binary operations (broadcasting).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub(crate) enum BinaryOp {
    Add = 0,
    Sub = 1,
    Mul = 2,
    Div = 3,
}

impl BinaryOp {
    /// Every op, by code.
    #[cfg(test)]
    pub(crate) const ALL: [BinaryOp; 4] =
        [BinaryOp::Add, BinaryOp::Sub, BinaryOp::Mul, BinaryOp::Div];

    /// The code the binary kernel switches on (`kernels/binary.wgsl`).
    pub(crate) fn code(self) -> u32 {
        self as u32
    }
}

/// One operation of the model; fields name values by number.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Step {
    MatMul {
        a: usize,
        /// [`Graph::weights`] index.
        weight: usize,
        act: UnaryOp,
        out: usize,
    },
    Binary {
        op: BinaryOp,
        a: usize,
        b: usize,
        out: usize,
    },
    Unary {
        op: UnaryOp,
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
    /// The value the step writes.
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

    /// The values the step reads (constant weights and tables are not values).
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
#[derive(Debug, Default)]
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

impl Graph {
    /// A new value.
    pub(crate) fn add_value(&mut self, dtype: DType, origin: Origin) -> usize {
        self.values.push(Value { dtype, origin });
        self.values.len() - 1
    }
}

/// Graphs written by hand for the pure stages' tests.
#[cfg(test)]
pub(crate) mod build {
    use super::*;

    impl Graph {
        /// A model input of that type (its spec is not needed by the stages under test).
        pub(crate) fn test_input(&mut self, dtype: DType) -> usize {
            let index = self.input_values.len();
            let v = self.add_value(dtype, Origin::Input(index));
            self.input_values.push(v);
            self.id_bounds.push(Vec::new());
            v
        }

        /// An f32 constant value.
        pub(crate) fn test_const(&mut self, dims: &[usize], data: Vec<f32>) -> usize {
            self.consts.push(HostConst {
                dims: dims.to_vec(),
                data,
            });
            self.add_value(DType::F32, Origin::Const(self.consts.len() - 1))
        }

        /// A `[n][k]` f32 weight of zeros.
        pub(crate) fn test_weight(&mut self, k: usize, n: usize) -> usize {
            self.weights.push(MatWeight {
                k,
                n,
                data: WeightData::F32(vec![0.0; k * n]),
                bias: None,
            });
            self.weights.len() - 1
        }

        /// A step writing a new f32 value; returns the value.
        pub(crate) fn test_step(&mut self, step: impl FnOnce(usize) -> Step) -> usize {
            let out = self.add_value(DType::F32, Origin::Step);
            self.steps.push(step(out));
            out
        }
    }
}
