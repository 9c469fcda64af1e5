//! The GPU engine's IR: a model as values and the steps that compute them, with the host copies
//! of its constants (weights, tables, small operands) until they are uploaded.
//!
//! [`crate::import`] builds it from ONNX, [`crate::fuse`] rewrites it, and every later stage
//! (shapes, memory, lowering) reads it. Values are numbered; a step reads values and writes one.
//! Shapes are not part of the graph: they follow from the input shapes of each call
//! ([`crate::shape`]), so one graph serves every batch size.

use outpost_shared::TensorSpec;

/// What a value holds on the GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum DType {
    F32,
    /// Ids (ONNX int32/int64, narrowed on the host): Gather indices and the views and copies
    /// of them; any arithmetic on them runs on activations ([`Step::CastIds`]: integers are
    /// exact to 2²⁴ in f32 and 2048 in f16, which masks are far below; the model checks the
    /// inputs that reach it, [`Graph::ids_cast_to_numbers`]).
    I32,
    /// Known on the host once the input shapes are (shape arithmetic: `Shape`, and what is
    /// computed from it and from integer constants): folded per input shape by
    /// [`crate::shape`], never on the GPU. A GPU step reads one through [`Step::Upload`].
    Host,
}

/// A tensor folded on the host ([`DType::Host`]).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct HostTensor {
    pub dims: Vec<usize>,
    pub data: HostData,
}

/// A host tensor's numbers: integers (and booleans, as 0 and 1) or floats.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum HostData {
    Int(Vec<i64>),
    Float(Vec<f32>),
}

impl HostData {
    pub(crate) fn len(&self) -> usize {
        match self {
            HostData::Int(v) => v.len(),
            HostData::Float(v) => v.len(),
        }
    }
}

/// The number kind a `Cast` makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NumberKind {
    Int,
    Float,
    /// 0 or 1.
    Bool,
}

/// Shape arithmetic, run on the host per input shape ([`crate::host`]). Inputs are host values
/// except `Shape`'s and `Size`'s, which read only their input's shape.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum HostOp {
    Const(HostTensor),
    /// The input's dimensions `[start, end)` (ONNX `Shape`, opset 15's slice included).
    Shape {
        start: i64,
        end: Option<i64>,
    },
    /// The input's element count.
    Size,
    /// `View::Reshape` and the other views, on host data; `ReshapeTo` reads input 1.
    View(View),
    /// Reshape to the shape in input 1.
    Reshape {
        allow_zero: bool,
    },
    Gather {
        axis: i64,
    },
    Concat {
        axis: i64,
    },
    Cast(NumberKind),
    Binary(BinaryOp),
    Unary(UnaryOp),
    /// `Where(condition, a, b)`, broadcasting.
    Where,
    /// `Range(start, limit, delta)`.
    Range,
    /// A tensor of the input's shape filled with this one value.
    ConstantOfShape(HostTensor),
    /// `Slice(data, starts, ends, axes?, steps?)`: `axes` and `steps` are present when the
    /// flags say so.
    Slice {
        axes: bool,
        steps: bool,
    },
    /// `Expand(data, shape)`.
    Expand,
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
    Reshape {
        shape: Vec<i64>,
        allow_zero: bool,
    },
    Flatten {
        axis: i64,
    },
    Squeeze {
        axes: Option<Vec<i64>>,
    },
    Unsqueeze {
        axes: Vec<i64>,
    },
    /// A reshape to the shape host value `shape` holds (exporters compute it from `Shape`).
    ReshapeTo {
        shape: usize,
        allow_zero: bool,
    },
}

/// What a Gather reads from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GatherSource {
    /// Table `n` of [`Graph::tables`].
    Table(usize),
    /// A computed value; its ids are folded on the host ([`Step::Upload`]), so each is checked
    /// against the value's shape when a plan is made.
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
    /// 1 where the value is 0, else 0 (`Not` on booleans held as f32).
    Not = 10,
    /// 1 where the value is not 0, else 0 (`Cast` to bool).
    NonZero = 11,
    /// Rounded toward zero (`Cast` to an integer kind).
    Trunc = 12,
    Floor = 13,
    Ceil = 14,
    Reciprocal = 15,
    Log = 16,
    Abs = 17,
}

impl UnaryOp {
    /// Every op, by code.
    #[cfg(test)]
    pub(crate) const ALL: [UnaryOp; 18] = [
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
        UnaryOp::Not,
        UnaryOp::NonZero,
        UnaryOp::Trunc,
        UnaryOp::Floor,
        UnaryOp::Ceil,
        UnaryOp::Reciprocal,
        UnaryOp::Log,
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
    /// Exact for integer exponents of negative bases, and a square is a product.
    Pow = 4,
    Max = 5,
    Min = 6,
    /// Comparisons and logic give 1 or 0 (booleans are f32 on the GPU).
    Equal = 7,
    Less = 8,
    Greater = 9,
    LessOrEqual = 10,
    GreaterOrEqual = 11,
    And = 12,
    Or = 13,
    Xor = 14,
}

impl BinaryOp {
    /// Every op, by code.
    #[cfg(test)]
    pub(crate) const ALL: [BinaryOp; 15] = [
        BinaryOp::Add,
        BinaryOp::Sub,
        BinaryOp::Mul,
        BinaryOp::Div,
        BinaryOp::Pow,
        BinaryOp::Max,
        BinaryOp::Min,
        BinaryOp::Equal,
        BinaryOp::Less,
        BinaryOp::Greater,
        BinaryOp::LessOrEqual,
        BinaryOp::GreaterOrEqual,
        BinaryOp::And,
        BinaryOp::Or,
        BinaryOp::Xor,
    ];

    /// Whether the op gives 1 or 0 (a comparison or logic).
    pub(crate) fn is_predicate(self) -> bool {
        matches!(
            self,
            BinaryOp::Equal
                | BinaryOp::Less
                | BinaryOp::Greater
                | BinaryOp::LessOrEqual
                | BinaryOp::GreaterOrEqual
                | BinaryOp::And
                | BinaryOp::Or
                | BinaryOp::Xor
        )
    }

    /// The code the binary kernel switches on (`kernels/binary.wgsl`).
    pub(crate) fn code(self) -> u32 {
        self as u32
    }
}

/// What a reduction computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReduceKind {
    Sum,
    Mean,
    Max,
    Min,
    SumSquare,
    /// The square root of the sum of squares.
    L2,
}

/// How a [`Step::Window`] picks its elements: a strided box of the input.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Window {
    /// ONNX `Slice`: `starts`, `ends` and the optional `axes` and `steps` are host values.
    Slice {
        starts: usize,
        ends: usize,
        axes: Option<usize>,
        steps: Option<usize>,
    },
    /// Part `index` of a `Split` along `axis`: `sizes` given, or `parts` equal parts (the
    /// last smaller when the axis does not divide).
    SplitPart {
        axis: i64,
        sizes: Option<Vec<i64>>,
        parts: usize,
        index: usize,
    },
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
        kind: ReduceKind,
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
    /// Shape arithmetic on the host ([`DType::Host`] out).
    Host {
        op: HostOp,
        inputs: Vec<usize>,
        out: usize,
    },
    /// A host value written to the GPU with each call, as `dtype` (f32 or i32 ids).
    Upload {
        x: usize,
        dtype: DType,
        out: usize,
    },
    /// A matrix product of two computed (or constant, not 2-D weight) operands, with numpy's
    /// batch broadcasting and 1-D promotion.
    BatchMatMul {
        a: usize,
        b: usize,
        out: usize,
    },
    /// `Where(condition, a, b)`, broadcasting; the condition is f32 (0 is false).
    Where {
        cond: usize,
        a: usize,
        b: usize,
        out: usize,
    },
    /// Normalised over the axes from `axis` on, times `scale`, plus `bias`.
    LayerNorm {
        x: usize,
        scale: usize,
        bias: Option<usize>,
        axis: i64,
        epsilon: f32,
        out: usize,
    },
    /// i32 ids as f32 numbers.
    CastIds {
        x: usize,
        out: usize,
    },
    /// `x` broadcast to the shape host value `shape` holds (ONNX `Expand`).
    Expand {
        x: usize,
        shape: usize,
        out: usize,
    },
    /// A strided box of `x` (`Slice`, a part of `Split`).
    Window {
        x: usize,
        window: Window,
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
            | Step::View { out, .. }
            | Step::Host { out, .. }
            | Step::Upload { out, .. }
            | Step::BatchMatMul { out, .. }
            | Step::Where { out, .. }
            | Step::LayerNorm { out, .. }
            | Step::CastIds { out, .. }
            | Step::Expand { out, .. }
            | Step::Window { out, .. } => *out,
        }
    }

    /// Every value the step refers to: the buffers it reads ([`Step::inputs`]) and the values
    /// whose shape or host data it reads (a rewrite must keep those computed too).
    pub(crate) fn refers_to(&self) -> Vec<usize> {
        let mut all = self.inputs();
        match self {
            Step::Host { inputs, .. } => all.extend(inputs),
            Step::Upload { x, .. } => all.push(*x),
            Step::Expand { shape, .. } => all.push(*shape),
            Step::View {
                view: View::ReshapeTo { shape, .. },
                ..
            } => all.push(*shape),
            Step::Window {
                window:
                    Window::Slice {
                        starts,
                        ends,
                        axes,
                        steps,
                    },
                ..
            } => all.extend(
                [Some(*starts), Some(*ends), *axes, *steps]
                    .into_iter()
                    .flatten(),
            ),
            _ => {}
        }
        all
    }

    /// The values whose buffers the step reads (constant weights and tables are not values;
    /// host values have no buffers).
    pub(crate) fn inputs(&self) -> Vec<usize> {
        match self {
            Step::MatMul { a, .. } => vec![*a],
            Step::Binary { a, b, .. } | Step::BatchMatMul { a, b, .. } => vec![*a, *b],
            Step::Where { cond, a, b, .. } => vec![*cond, *a, *b],
            Step::LayerNorm { x, scale, bias, .. } => {
                let mut v = vec![*x, *scale];
                v.extend(bias);
                v
            }
            Step::Host { .. } | Step::Upload { .. } => Vec::new(),
            Step::Unary { x, .. }
            | Step::Softmax { x, .. }
            | Step::Reduce { x, .. }
            | Step::Transpose { x, .. }
            | Step::View { x, .. }
            | Step::CastIds { x, .. }
            | Step::Expand { x, .. }
            | Step::Window { x, .. } => vec![*x],
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

    /// The model input whose ids value `v` holds, through views and copies of them.
    fn id_input(&self, mut v: usize) -> Option<usize> {
        // Each hop goes to an earlier value: at most one hop a step.
        for _ in 0..=self.steps.len() {
            match self.values.get(v)?.origin {
                Origin::Input(i) => return Some(i),
                Origin::Const(_) => return None,
                Origin::Step => {}
            }
            v = match self.steps.iter().find(|s| s.out() == v)? {
                Step::View { x, .. } | Step::Expand { x, .. } | Step::Window { x, .. } => *x,
                _ => return None,
            };
        }
        None
    }

    /// Per input: whether the GPU computes with its ids as numbers ([`Step::CastIds`]: an
    /// attention mask cast to floats, ids compared with a constant).
    pub(crate) fn ids_cast_to_numbers(&self) -> Vec<bool> {
        let mut cast = vec![false; self.inputs.len()];
        for step in &self.steps {
            if let Step::CastIds { x, .. } = step
                && let Some(i) = self.id_input(*x)
                && let Some(c) = cast.get_mut(i)
            {
                *c = true;
            }
        }
        cast
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
