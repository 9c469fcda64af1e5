//! The WGSL compute kernels (`kernels/*.wgsl`), one pipeline each, compiled once per
//! [`crate::GpuContext`]: which kernels exist, and each one's source as compiled.
//!
//! Every kernel reads its sizes from a small `u32` parameter buffer (binding 0), so one compiled
//! pipeline serves every batch size: a new input shape only writes new parameters. Threads are
//! laid out 64 to a workgroup over a 2-D grid (a 1-D grid stops at 65 535 workgroups); each
//! thread finds its linear index with `linear_index` (`common.wgsl`) and returns past the end.
//!
//! Activations — every float value the graph computes, and the graph constants kernels read
//! as values — are held as `act`: `f32`, or `f16` when the context runs f16 activations
//! ([`Precision`]). Kernels read them widened to f32 and compute in f32 (sums, maxima and
//! LayerNorm statistics included); only what is stored is rounded, saturating at f16's largest
//! finite value (an exporter's `-3.4e38` mask constant becomes -65504, not -inf, so `0 × mask`
//! stays 0). Weights, biases, int8 scales and ids keep their own types.
//!
//! WGSL has no 64-bit integers (ids arrive as `i32`, converted and range-checked on the host)
//! and no `erf` ([`ERF_MAX_ERROR`]).

/// Prepended to every kernel: the parameter buffer, the thread index, the element-wise functions.
const COMMON: &str = include_str!("kernels/common.wgsl");
/// Shared by the matrix products: the 4 × 4 tile, bias and activation.
const MATMUL_COMMON: &str = include_str!("kernels/matmul_common.wgsl");
/// A template: four f32 of a row, instantiated per array read (`NAME`, `SRC`).
const MATMUL_ROW_OF_FOUR: &str = include_str!("kernels/matmul_row_of_four.wgsl");
/// Shared by the gathers: where an output element sits in the table.
const GATHER_COMMON: &str = include_str!("kernels/gather_common.wgsl");
/// Shared by the kernels that give a workgroup a row: the row, and workgroup sums and maxima.
const ROWS_COMMON: &str = include_str!("kernels/rows_common.wgsl");
/// Shared by the reductions: each element's term and the total's last touch, by mode.
const REDUCE_COMMON: &str = include_str!("kernels/reduce_common.wgsl");

/// First in every kernel with f32 activations: `act` and the store's conversion.
const F32_ACTIVATIONS: &str = "alias act = f32;
fn to_act(v: f32) -> act { return v; }
";
/// First in every kernel with f16 activations (`enable` must precede every declaration). The
/// store saturates: f16 overflows to infinity past 65504.
const F16_ACTIVATIONS: &str = "enable f16;
alias act = f16;
fn to_act(v: f32) -> act { return act(clamp(v, -65504.0, 65504.0)); }
";

/// How activations are held: the element type every kernel's `act` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Precision {
    F32,
    /// Needs the adapter's `shader-f16` (f16 arithmetic and 16-bit storage).
    F16,
}

impl Precision {
    /// Bytes of one activation element.
    pub(crate) fn bytes(self) -> usize {
        match self {
            Precision::F32 => 4,
            Precision::F16 => 2,
        }
    }

    /// The largest integer magnitude an activation holds exactly (every integer up to it).
    pub(crate) fn exact_integers(self) -> i64 {
        match self {
            Precision::F32 => 1 << 24,
            Precision::F16 => 1 << 11,
        }
    }

    /// f32 values as activation bytes, padded to whole words (buffer writes and bindings are
    /// sized in 4 bytes). f16 saturates at ±65504, as the kernels' stores do, and a non-zero
    /// value keeps its sign and stays non-zero: below f16's smallest normal number it becomes
    /// that number (GPUs may flush f16 subnormals to zero), so an epsilon such as pooling's
    /// `Clip(count, 1e-9)` still keeps a division off zero.
    pub(crate) fn encode(self, values: impl Iterator<Item = f32>) -> Vec<u8> {
        let half = |v: f32| {
            let smallest = half::f16::MIN_POSITIVE.to_f32();
            let v = if v != 0.0 && v.abs() < smallest {
                smallest.copysign(v)
            } else {
                v.clamp(-65504.0, 65504.0)
            };
            half::f16::from_f32(v).to_le_bytes()
        };
        let mut bytes: Vec<u8> = match self {
            Precision::F32 => values.flat_map(f32::to_le_bytes).collect(),
            Precision::F16 => values.flat_map(half).collect(),
        };
        bytes.resize(bytes.len().div_ceil(4) * 4, 0);
        bytes
    }

    /// `count` activation elements (little end first) as f32 bytes.
    pub(crate) fn decode(self, bytes: &[u8], count: usize) -> Vec<u8> {
        match self {
            Precision::F32 => bytes[..count * 4].to_vec(),
            Precision::F16 => bytes[..count * 2]
                .chunks_exact(2)
                .flat_map(|b| {
                    half::f16::from_le_bytes([b[0], b[1]])
                        .to_f32()
                        .to_le_bytes()
                })
                .collect(),
        }
    }
}

/// The kernels, in [`Kernel::ALL`] order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Kernel {
    Unary,
    Binary,
    Softmax,
    Reduce,
    GatherF32,
    GatherQ8,
    Concat,
    Strided,
    StridedAct,
    MatMulF32,
    MatMulQ8,
    QuantizeRows,
    MatMulDot4,
    BatchMatMul,
    Where,
    LayerNorm,
    CastIds,
    SoftmaxRows,
    ReduceRows,
}

impl Kernel {
    pub(crate) const ALL: [Kernel; 19] = [
        Kernel::Unary,
        Kernel::Binary,
        Kernel::Softmax,
        Kernel::Reduce,
        Kernel::GatherF32,
        Kernel::GatherQ8,
        Kernel::Concat,
        Kernel::Strided,
        Kernel::StridedAct,
        Kernel::MatMulF32,
        Kernel::MatMulQ8,
        Kernel::QuantizeRows,
        Kernel::MatMulDot4,
        Kernel::BatchMatMul,
        Kernel::Where,
        Kernel::LayerNorm,
        Kernel::CastIds,
        Kernel::SoftmaxRows,
        Kernel::ReduceRows,
    ];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Kernel::Unary => "unary",
            Kernel::Binary => "binary",
            Kernel::Softmax => "softmax",
            Kernel::Reduce => "reduce",
            Kernel::GatherF32 => "gather_f32",
            Kernel::GatherQ8 => "gather_q8",
            Kernel::Concat => "concat",
            Kernel::Strided => "strided_copy",
            Kernel::StridedAct => "strided_copy_act",
            Kernel::MatMulF32 => "matmul_f32",
            Kernel::MatMulQ8 => "matmul_q8",
            Kernel::QuantizeRows => "quantize_rows",
            Kernel::MatMulDot4 => "matmul_dot4",
            Kernel::BatchMatMul => "matmul_batched",
            Kernel::Where => "where",
            Kernel::LayerNorm => "layer_norm",
            Kernel::CastIds => "cast_ids",
            Kernel::SoftmaxRows => "softmax_rows",
            Kernel::ReduceRows => "reduce_rows",
        }
    }

    /// Whether the kernel needs `dot4I8Packed` (WGSL's packed 4×8-bit integer dot product).
    pub(crate) fn needs_dot4(self) -> bool {
        self == Kernel::MatMulDot4
    }

    /// The kernel's own file.
    fn body(self) -> &'static str {
        match self {
            Kernel::Unary => include_str!("kernels/unary.wgsl"),
            Kernel::Binary => include_str!("kernels/binary.wgsl"),
            Kernel::Softmax => include_str!("kernels/softmax.wgsl"),
            Kernel::Reduce => include_str!("kernels/reduce.wgsl"),
            Kernel::GatherF32 => include_str!("kernels/gather_f32.wgsl"),
            Kernel::GatherQ8 => include_str!("kernels/gather_q8.wgsl"),
            Kernel::Concat => include_str!("kernels/concat.wgsl"),
            Kernel::Strided | Kernel::StridedAct => include_str!("kernels/strided_copy.wgsl"),
            Kernel::MatMulF32 => include_str!("kernels/matmul_f32.wgsl"),
            Kernel::MatMulQ8 => include_str!("kernels/matmul_q8.wgsl"),
            Kernel::QuantizeRows => include_str!("kernels/quantize_rows.wgsl"),
            Kernel::MatMulDot4 => include_str!("kernels/matmul_dot4.wgsl"),
            Kernel::BatchMatMul => include_str!("kernels/matmul_batched.wgsl"),
            Kernel::Where => include_str!("kernels/where.wgsl"),
            Kernel::LayerNorm => include_str!("kernels/layer_norm.wgsl"),
            Kernel::CastIds => include_str!("kernels/cast_ids.wgsl"),
            Kernel::SoftmaxRows => include_str!("kernels/softmax_rows.wgsl"),
            Kernel::ReduceRows => include_str!("kernels/reduce_rows.wgsl"),
        }
    }

    /// The complete WGSL module: the activations' type, the common prelude, the shared pieces
    /// the kernel uses, then its own file (WGSL lets module-scope declarations come in any
    /// order, `enable` excepted).
    pub(crate) fn source(self, precision: Precision) -> String {
        let row_of_four = |name: &str, array: &str| {
            MATMUL_ROW_OF_FOUR
                .replace("NAME", name)
                .replace("SRC", array)
        };
        let shared = match self {
            Kernel::GatherF32 | Kernel::GatherQ8 => vec![GATHER_COMMON.to_owned()],
            Kernel::MatMulF32 => vec![
                MATMUL_COMMON.to_owned(),
                row_of_four("four_a", "a"),
                row_of_four("four_w", "w"),
            ],
            Kernel::MatMulQ8 => vec![MATMUL_COMMON.to_owned(), row_of_four("four_a", "a")],
            Kernel::MatMulDot4 => vec![MATMUL_COMMON.to_owned()],
            Kernel::SoftmaxRows | Kernel::LayerNorm => vec![ROWS_COMMON.to_owned()],
            Kernel::ReduceRows => vec![ROWS_COMMON.to_owned(), REDUCE_COMMON.to_owned()],
            Kernel::Reduce => vec![REDUCE_COMMON.to_owned()],
            Kernel::Unary
            | Kernel::Binary
            | Kernel::Softmax
            | Kernel::Concat
            | Kernel::Strided
            | Kernel::StridedAct
            | Kernel::QuantizeRows
            | Kernel::BatchMatMul
            | Kernel::Where
            | Kernel::CastIds => Vec::new(),
        };
        let mut source = String::from(match precision {
            Precision::F32 => F32_ACTIVATIONS,
            Precision::F16 => F16_ACTIVATIONS,
        });
        source.push_str(COMMON);
        for part in shared {
            source.push('\n');
            source.push_str(&part);
        }
        source.push('\n');
        let body = match self {
            Kernel::Strided => self.body().replace("ELEM", "u32"),
            Kernel::StridedAct => self.body().replace("ELEM", "act"),
            _ => self.body().to_owned(),
        };
        source.push_str(&body);
        source
    }
}

/// Threads per workgroup, for every kernel (the row kernels give each row one workgroup).
pub(crate) const WORKGROUP: u32 = 64;

/// The largest absolute error of the shaders' `erf` (and so `Gelu`), which WGSL lacks: the
/// Abramowitz & Stegun 7.1.26 approximation is within 1.5e-7 in exact arithmetic; f32
/// evaluation adds the rest, and WGSL lets `exp` be off by 3 ulp or more (4.8e-7 in all was
/// measured on lavapipe). The tests check it against an f64 reference over [-6, 6].
pub const ERF_MAX_ERROR: f32 = 1e-6;

/// The most dimensions a broadcast or a transpose handles.
pub(crate) const MAX_RANK: usize = 6;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::{BinaryOp, UnaryOp};

    #[test]
    fn every_kernel_is_one_complete_module() {
        for precision in [Precision::F32, Precision::F16] {
            for kernel in Kernel::ALL {
                let source = kernel.source(precision);
                assert_eq!(source.matches("fn main(").count(), 1, "{}", kernel.name());
                assert!(
                    !source.contains("NAME") && !source.contains("SRC") && !source.contains("ELEM"),
                    "{}: a template left unfilled",
                    kernel.name()
                );
                assert!(source.contains("var<storage, read> p: array<u32>"));
                // Activations are `act` everywhere; f32 arrays are weights, biases and scales.
                assert_eq!(
                    source.starts_with("enable f16;"),
                    precision == Precision::F16,
                    "{}",
                    kernel.name()
                );
            }
        }
        assert!(
            Kernel::MatMulF32
                .source(Precision::F32)
                .contains("fn four_w(")
        );
        assert!(
            !Kernel::MatMulQ8
                .source(Precision::F32)
                .contains("fn four_w(")
        );
        assert!(
            Kernel::StridedAct
                .source(Precision::F16)
                .contains("x: array<act>")
        );
        assert!(
            Kernel::Strided
                .source(Precision::F16)
                .contains("x: array<u32>")
        );
    }

    #[test]
    fn f16_activations_round_trip_and_saturate() {
        let values = [
            0.0f32, 1.0, -2.5, 1e-3, 70_000.0, -3.4e38, 65_504.0, 1e-9, -1e-12,
        ];
        let bytes = Precision::F16.encode(values.iter().copied());
        // Nine halves padded to five words.
        assert_eq!(bytes.len(), 20);
        let back: Vec<f32> = bytemuck::pod_collect_to_vec(&Precision::F16.decode(&bytes, 9));
        assert_eq!(
            &back[..4],
            &[0.0, 1.0, -2.5, half::f16::from_f32(1e-3).to_f32()]
        );
        assert_eq!(
            &back[4..7],
            &[65_504.0, -65_504.0, 65_504.0],
            "saturated, not infinite"
        );
        let smallest = half::f16::MIN_POSITIVE.to_f32();
        assert_eq!(&back[7..], &[smallest, -smallest], "epsilons stay non-zero");
        let f32_bytes = Precision::F32.encode(values.iter().copied());
        assert_eq!(Precision::F32.decode(&f32_bytes, 9), f32_bytes);
    }

    #[test]
    fn the_shaders_switch_on_the_op_codes() {
        let common = COMMON;
        // The last op is the switch's default.
        for op in &UnaryOp::ALL[..UnaryOp::ALL.len() - 1] {
            assert!(common.contains(&format!("case {}u:", op.code())), "{op:?}");
        }
        assert_eq!(UnaryOp::Identity.code(), 0, "`apply` returns v for 0");
        let binary = Kernel::Binary.body();
        for op in &BinaryOp::ALL[..BinaryOp::ALL.len() - 1] {
            assert!(binary.contains(&format!("case {}u:", op.code())), "{op:?}");
        }
    }
}
