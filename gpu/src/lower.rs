//! Lowering: each step of the graph, at the shapes of one call, to kernel dispatches — which
//! kernel, its `u32` parameters, the buffers it binds (by role, resolved to real buffers by
//! [`crate::model`]) and how many threads it runs. Pure: it reads the weights' and tables'
//! layout on the GPU, not the buffers, so it runs without an adapter.
//!
//! A size the kernels' 32-bit indices cannot hold, or a rank beyond [`MAX_RANK`], is the
//! inputs' fault ([`RunError::Input`]: send fewer rows); a step the kernels cannot take at all
//! is the model's ([`RunError::Model`]).

use outpost_runtime::engine::RunError;

use crate::graph::{DType, GatherSource, Graph, ReduceKind, Step, UnaryOp};
use crate::kernels::{Kernel, MAX_RANK, Precision, WORKGROUP};
use crate::memory::{MemoryPlan, Place};
use crate::shape::{
    Inferred, StridedBox, batch_matmul, broadcast_strides, normalize_axis, permutation, product,
    reduce_runs, window_box,
};

/// The most batch dimensions a [`Step::BatchMatMul`] broadcasts.
const MAX_BATCH_RANK: usize = 4;

/// Rows at least this long get a workgroup each (softmax, reductions along the last axis).
const ROW_KERNEL_FROM: usize = 64;

/// The largest K for `dot4I8Packed` sums: 127 · 127 · K must stay within an i32.
const DOT4_MAX_K: usize = 131_072;

/// A matrix product's weight as uploaded: split in blocks of output channels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct WeightLayout {
    pub k: usize,
    pub n: usize,
    /// K in words of four int8.
    pub k4: usize,
    /// int8 (with one scale per channel) rather than f32.
    pub q8: bool,
    /// (first output channel, channels) of each block.
    pub blocks: Vec<(usize, usize)>,
    pub has_bias: bool,
}

/// A gathered table as uploaded: split in blocks of rows along axis 0 when it is too large
/// for one binding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TableLayout {
    pub dims: Vec<usize>,
    /// (first row along axis 0, rows) of each block.
    pub blocks: Vec<(usize, usize)>,
    /// int8 scales: (stride, channels) of the quantisation axis.
    pub scale: Option<(usize, usize)>,
}

/// A buffer a dispatch binds, by what it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Binding {
    /// Activation buffer `n` of the memory plan.
    Activation(usize),
    Const(usize),
    /// (weight, block).
    WeightBlock(usize, usize),
    WeightScale(usize),
    WeightBias(usize),
    /// (table, block).
    TableBlock(usize, usize),
    TableScale(usize),
}

/// One kernel launch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Dispatch {
    pub kernel: Kernel,
    /// The parameter buffer (binding 0), as the kernel's file describes it.
    pub params: Vec<u32>,
    pub bindings: Vec<(u32, Binding)>,
    pub threads: usize,
}

/// What the lowering knows of the uploaded model and the adapter.
pub(crate) struct Lowering<'a> {
    pub weights: &'a [WeightLayout],
    pub tables: &'a [TableLayout],
    /// Whether the adapter runs `dot4I8Packed`.
    pub dot4: bool,
    /// How activations are held (sizes the reductions' intermediates).
    pub precision: Precision,
}

/// A size as the kernels' 32-bit index.
fn u32_of(n: usize, what: &str) -> Result<u32, RunError> {
    u32::try_from(n).map_err(|_| {
        RunError::Input(format!(
            "{what} ({n}) does not fit the GPU's 32-bit indices"
        ))
    })
}

/// The 2-D grid of workgroups for `threads` (a dimension holds at most `max_groups`), or
/// `None` when there is nothing to run.
pub(crate) fn workgroups(threads: usize, max_groups: u32) -> Result<Option<(u32, u32)>, RunError> {
    if threads == 0 {
        return Ok(None);
    }
    let max_groups = max_groups.max(1);
    let groups = u32_of(threads.div_ceil(WORKGROUP as usize), "the thread count")?;
    let x = groups.min(max_groups);
    let y = groups.div_ceil(x);
    if y > max_groups {
        return Err(RunError::Input(format!(
            "{threads} threads exceed the GPU's dispatch limit"
        )));
    }
    Ok(Some((x, y)))
}

impl Lowering<'_> {
    /// Whether a product with `weight` runs on `dot4I8Packed` (activations quantised first).
    fn uses_dot4(&self, weight: usize) -> bool {
        let w = &self.weights[weight];
        self.dot4 && w.q8 && w.k <= DOT4_MAX_K
    }

    /// The scratch buffers (bytes) each step's dispatches need, per step.
    pub(crate) fn scratch_bytes(&self, g: &Graph, shapes: &[Vec<usize>]) -> Vec<Vec<usize>> {
        g.steps
            .iter()
            .map(|step| self.step_scratch_bytes(step, shapes))
            .collect()
    }

    fn step_scratch_bytes(&self, step: &Step, shapes: &[Vec<usize>]) -> Vec<usize> {
        match step {
            Step::MatMul { a, weight, .. } if self.uses_dot4(*weight) => {
                let w = &self.weights[*weight];
                let m = product(&shapes[*a]) / w.k.max(1);
                // The quantised rows and their scales.
                vec![m * w.k4 * 4, m * 4]
            }
            Step::Reduce { x, axes, .. } => {
                let runs = reduce_runs(&shapes[*x], axes.as_deref()).unwrap_or_default();
                // Every run but the last writes an intermediate.
                let mut shape = shapes[*x].clone();
                let mut out = Vec::new();
                for (i, (start, len)) in runs.iter().enumerate() {
                    for d in &mut shape[*start..start + len] {
                        *d = 1;
                    }
                    if i + 1 < runs.len() {
                        out.push(product(&shape) * self.precision.bytes());
                    }
                }
                out
            }
            _ => Vec::new(),
        }
    }

    /// The dispatches of every step, in order.
    pub(crate) fn lower(
        &self,
        g: &Graph,
        known: &Inferred,
        memory: &MemoryPlan,
    ) -> Result<Vec<Dispatch>, RunError> {
        let place = |v: usize| match memory.places.get(v).copied().flatten() {
            Some(Place::Buffer(b)) => Ok(Binding::Activation(b)),
            Some(Place::Const(c)) => Ok(Binding::Const(c)),
            None => Err(RunError::Model(format!("value {v} has no storage"))),
        };
        let mut dispatches = Vec::new();
        for (j, step) in g.steps.iter().enumerate() {
            let scratch: Vec<Binding> = memory
                .scratch
                .get(j)
                .map(|s| s.iter().map(|&b| Binding::Activation(b)).collect())
                .unwrap_or_default();
            self.step(g, step, known, &place, &scratch, &mut dispatches)?;
        }
        Ok(dispatches)
    }

    fn step(
        &self,
        g: &Graph,
        step: &Step,
        known: &Inferred,
        place: &dyn Fn(usize) -> Result<Binding, RunError>,
        scratch: &[Binding],
        out: &mut Vec<Dispatch>,
    ) -> Result<(), RunError> {
        let at = place;
        let shapes = &known.shapes;
        match step {
            Step::MatMul {
                a,
                weight,
                act,
                out: y,
            } => {
                let w = &self.weights[*weight];
                let m = product(&shapes[*a]) / w.k.max(1);
                let (mu, ku, nu, k4) = (
                    u32_of(m, "rows")?,
                    u32_of(w.k, "K")?,
                    u32_of(w.n, "N")?,
                    u32_of(w.k4, "K")?,
                );
                let has_bias = u32::from(w.has_bias);
                let dot4 = self.uses_dot4(*weight);
                if dot4 {
                    out.push(Dispatch {
                        kernel: Kernel::QuantizeRows,
                        params: vec![mu, ku, k4],
                        bindings: vec![(1, at(*a)?), (2, scratch[0]), (3, scratch[1])],
                        threads: m,
                    });
                }
                for (b, &(n0, nb)) in w.blocks.iter().enumerate() {
                    let params = vec![
                        mu,
                        ku,
                        u32_of(nb, "N")?,
                        u32_of(n0, "N")?,
                        nu,
                        act.code(),
                        has_bias,
                        k4,
                    ];
                    let (kernel, bindings) = if dot4 {
                        (
                            Kernel::MatMulDot4,
                            vec![
                                (1, scratch[0]),
                                (2, Binding::WeightBlock(*weight, b)),
                                (3, Binding::WeightBias(*weight)),
                                (4, at(*y)?),
                                (5, Binding::WeightScale(*weight)),
                                (6, scratch[1]),
                            ],
                        )
                    } else if w.q8 {
                        (
                            Kernel::MatMulQ8,
                            vec![
                                (1, at(*a)?),
                                (2, Binding::WeightBlock(*weight, b)),
                                (3, Binding::WeightBias(*weight)),
                                (4, at(*y)?),
                                (5, Binding::WeightScale(*weight)),
                            ],
                        )
                    } else {
                        (
                            Kernel::MatMulF32,
                            vec![
                                (1, at(*a)?),
                                (2, Binding::WeightBlock(*weight, b)),
                                (3, Binding::WeightBias(*weight)),
                                (4, at(*y)?),
                            ],
                        )
                    };
                    out.push(Dispatch {
                        kernel,
                        params,
                        bindings,
                        threads: m * nb,
                    });
                }
            }
            Step::Binary { op, a, b, out: y } => {
                let shape = &shapes[*y];
                let rank = shape.len();
                if rank > MAX_RANK {
                    return Err(RunError::Input(format!(
                        "rank {rank} broadcasts are not supported on the GPU"
                    )));
                }
                let mut params = vec![u32_of(product(shape), "elements")?, op.code(), rank as u32];
                let mut dims = [1u32; MAX_RANK];
                for (i, &d) in shape.iter().enumerate() {
                    dims[i] = u32_of(d, "a dimension")?;
                }
                params.extend(dims);
                params.extend(broadcast_strides(&shapes[*a], shape));
                params.extend(broadcast_strides(&shapes[*b], shape));
                out.push(Dispatch {
                    kernel: Kernel::Binary,
                    params,
                    bindings: vec![(1, at(*a)?), (2, at(*b)?), (3, at(*y)?)],
                    threads: product(shape),
                });
            }
            Step::Unary { op, x, out: y } => {
                let n = product(&shapes[*x]);
                out.push(Dispatch {
                    kernel: Kernel::Unary,
                    params: vec![u32_of(n, "elements")?, op.code()],
                    bindings: vec![(1, at(*x)?), (2, at(*y)?)],
                    threads: n,
                });
            }
            Step::Softmax {
                x,
                axis,
                legacy,
                out: y,
            } => {
                let s = &shapes[*x];
                let a = normalize_axis(*axis, s.len())?;
                let (len, inner) = if *legacy {
                    (product(&s[a..]), 1)
                } else {
                    (s[a], product(&s[a + 1..]))
                };
                let rows = product(&s[..a]) * inner;
                if inner == 1 && len >= ROW_KERNEL_FROM {
                    out.push(Dispatch {
                        kernel: Kernel::SoftmaxRows,
                        params: vec![u32_of(rows, "rows")?, u32_of(len, "axis")?],
                        bindings: vec![(1, at(*x)?), (2, at(*y)?)],
                        threads: rows * WORKGROUP as usize,
                    });
                    return Ok(());
                }
                out.push(Dispatch {
                    kernel: Kernel::Softmax,
                    params: vec![
                        u32_of(rows, "rows")?,
                        u32_of(len, "axis")?,
                        u32_of(inner, "inner")?,
                    ],
                    bindings: vec![(1, at(*x)?), (2, at(*y)?)],
                    threads: if len == 0 { 0 } else { rows },
                });
            }
            Step::Reduce {
                x,
                axes,
                kind,
                out: y,
                ..
            } => {
                let runs = reduce_runs(&shapes[*x], axes.as_deref())?;
                let mut shape = shapes[*x].clone();
                let mut from = at(*x)?;
                if runs.is_empty() {
                    // Nothing to reduce (every axis of a scalar): the element itself.
                    let n = product(&shape);
                    let op = match kind {
                        ReduceKind::SumSquare => {
                            return Err(RunError::Model(
                                "ReduceSumSquare of a scalar is not lowered".into(),
                            ));
                        }
                        ReduceKind::L2 => UnaryOp::Abs,
                        _ => UnaryOp::Identity,
                    };
                    out.push(Dispatch {
                        kernel: Kernel::Unary,
                        params: vec![u32_of(n, "elements")?, op.code()],
                        bindings: vec![(1, from), (2, at(*y)?)],
                        threads: n,
                    });
                }
                for (i, &(start, len)) in runs.iter().enumerate() {
                    let outer = product(&shape[..start]);
                    let r = product(&shape[start..start + len]);
                    let inner = product(&shape[start + len..]);
                    let last = i + 1 == runs.len();
                    let to = if last { at(*y)? } else { scratch[i] };
                    let mode = reduce_mode(*kind, i == 0);
                    if inner == 1 && r >= ROW_KERNEL_FROM {
                        out.push(Dispatch {
                            kernel: Kernel::ReduceRows,
                            params: vec![u32_of(outer, "rows")?, u32_of(r, "axis")?, mode],
                            bindings: vec![(1, from), (2, to)],
                            threads: outer * WORKGROUP as usize,
                        });
                    } else {
                        out.push(Dispatch {
                            kernel: Kernel::Reduce,
                            params: vec![
                                u32_of(outer * inner, "rows")?,
                                u32_of(r, "axis")?,
                                u32_of(inner, "inner")?,
                                mode,
                            ],
                            bindings: vec![(1, from), (2, to)],
                            threads: outer * inner,
                        });
                    }
                    for d in &mut shape[start..start + len] {
                        *d = 1;
                    }
                    from = to;
                }
            }
            Step::Gather {
                data,
                ids,
                axis,
                out: y,
            } => {
                let t = match data {
                    GatherSource::Table(t) => t,
                    GatherSource::Value(v) => {
                        // One block: the whole value, its ids checked against its shape.
                        let dims = &shapes[*v];
                        let a = normalize_axis(*axis, dims.len())?;
                        let rows = dims[a];
                        let inner = product(&dims[a + 1..]);
                        let n_ids = product(&shapes[*ids]);
                        let count = product(&dims[..a]) * n_ids * inner;
                        out.push(Dispatch {
                            kernel: Kernel::GatherF32,
                            params: vec![
                                u32_of(count, "elements")?,
                                u32_of(n_ids, "ids")?,
                                u32_of(inner, "inner")?,
                                u32_of(rows, "rows")?,
                                0,
                                u32_of(rows, "rows")?,
                                1,
                                1,
                            ],
                            bindings: vec![(1, at(*v)?), (2, at(*ids)?), (3, at(*y)?)],
                            threads: count,
                        });
                        return Ok(());
                    }
                };
                let table = &self.tables[*t];
                let a = normalize_axis(*axis, table.dims.len())?;
                let outer = product(&table.dims[..a]);
                let rows = table.dims[a];
                let inner = product(&table.dims[a + 1..]);
                let n_ids = product(&shapes[*ids]);
                let count = outer * n_ids * inner;
                let (stride, channels) = table.scale.unwrap_or((1, 1));
                for (b, &(r0, rc)) in table.blocks.iter().enumerate() {
                    // A split table is split along axis 0, which is the gathered axis.
                    let (r0, rc) = if table.blocks.len() == 1 {
                        (0, rows)
                    } else {
                        (r0, rc)
                    };
                    let params = vec![
                        u32_of(count, "elements")?,
                        u32_of(n_ids, "ids")?,
                        u32_of(inner, "inner")?,
                        u32_of(rows, "rows")?,
                        u32_of(r0, "rows")?,
                        u32_of(rc, "rows")?,
                        u32_of(stride, "stride")?,
                        u32_of(channels, "channels")?,
                    ];
                    let mut bindings = vec![
                        (1, Binding::TableBlock(*t, b)),
                        (2, at(*ids)?),
                        (3, at(*y)?),
                    ];
                    let kernel = if table.scale.is_some() {
                        bindings.push((4, Binding::TableScale(*t)));
                        Kernel::GatherQ8
                    } else {
                        Kernel::GatherF32
                    };
                    out.push(Dispatch {
                        kernel,
                        params,
                        bindings,
                        threads: count,
                    });
                }
            }
            Step::Concat { xs, axis, out: y } => {
                let shape = &shapes[*y];
                let a = normalize_axis(*axis, shape.len())?;
                let outer = product(&shape[..a]);
                let inner = product(&shape[a + 1..]);
                let mut offset = 0;
                for &x in xs {
                    let chunk = shapes[x][a] * inner;
                    out.push(Dispatch {
                        kernel: Kernel::Concat,
                        params: vec![
                            u32_of(outer * chunk, "elements")?,
                            u32_of(chunk.max(1), "chunk")?,
                            u32_of(shape[a] * inner, "row")?,
                            u32_of(offset, "offset")?,
                        ],
                        bindings: vec![(1, at(x)?), (2, at(*y)?)],
                        threads: outer * chunk,
                    });
                    offset += chunk;
                }
            }
            Step::Transpose { x, perm, out: y } => {
                let s = &shapes[*x];
                if s.len() > MAX_RANK {
                    return Err(RunError::Input(format!(
                        "rank {} transposes are not supported on the GPU",
                        s.len()
                    )));
                }
                let perm = permutation(perm.as_deref(), s.len())?;
                let mut strides = vec![1usize; s.len()];
                for i in (0..s.len().saturating_sub(1)).rev() {
                    strides[i] = strides[i + 1] * s[i + 1];
                }
                let shape = &shapes[*y];
                let mut params = vec![u32_of(product(shape), "elements")?, s.len() as u32];
                let mut dims = [1u32; MAX_RANK];
                let mut st = [0u32; MAX_RANK];
                for (i, &p) in perm.iter().enumerate() {
                    dims[i] = u32_of(shape[i], "a dimension")?;
                    st[i] = u32_of(strides[p], "a stride")?;
                }
                params.extend(dims);
                params.extend(st);
                params.push(0);
                out.push(Dispatch {
                    kernel: copy_kernel(g, *y),
                    params,
                    bindings: vec![(1, at(*x)?), (2, at(*y)?)],
                    threads: product(shape),
                });
            }
            Step::Expand { x, out: y, .. } => {
                let shape = &shapes[*y];
                if shape.len() > MAX_RANK {
                    return Err(RunError::Input(format!(
                        "rank {} broadcasts are not supported on the GPU",
                        shape.len()
                    )));
                }
                let b = StridedBox {
                    dims: shape.clone(),
                    offset: 0,
                    strides: broadcast_strides(&shapes[*x], shape)[..shape.len()]
                        .iter()
                        .map(|&s| i64::from(s))
                        .collect(),
                };
                out.push(strided(&b, copy_kernel(g, *y), at(*x)?, at(*y)?)?);
            }
            Step::Window { x, window, out: y } => {
                let b = window_box(known, &shapes[*x], window)?;
                out.push(strided(&b, copy_kernel(g, *y), at(*x)?, at(*y)?)?);
            }
            Step::BatchMatMul { a, b, out: y } => {
                let mm = batch_matmul(&shapes[*a], &shapes[*b])?;
                let rank = mm.batch.len();
                if rank > MAX_BATCH_RANK {
                    return Err(RunError::Input(format!(
                        "a matrix product with {rank} batch dimensions (the GPU takes {MAX_BATCH_RANK})"
                    )));
                }
                let count = product(&mm.out);
                let mut params = vec![
                    u32_of(count, "elements")?,
                    u32_of(mm.m, "M")?,
                    u32_of(mm.k, "K")?,
                    u32_of(mm.n, "N")?,
                    rank as u32,
                ];
                let mut dims = [1u32; MAX_BATCH_RANK];
                for (i, &d) in mm.batch.iter().enumerate() {
                    dims[i] = u32_of(d, "a dimension")?;
                }
                params.extend(dims);
                params.extend(matrix_strides(&mm.a_batch, &mm.batch)?);
                params.extend(matrix_strides(&mm.b_batch, &mm.batch)?);
                out.push(Dispatch {
                    kernel: Kernel::BatchMatMul,
                    params,
                    bindings: vec![(1, at(*a)?), (2, at(*b)?), (3, at(*y)?)],
                    threads: count,
                });
            }
            Step::Where { cond, a, b, out: y } => {
                let shape = &shapes[*y];
                let rank = shape.len();
                if rank > MAX_RANK {
                    return Err(RunError::Input(format!(
                        "rank {rank} broadcasts are not supported on the GPU"
                    )));
                }
                let mut params = vec![u32_of(product(shape), "elements")?, rank as u32];
                let mut dims = [1u32; MAX_RANK];
                for (i, &d) in shape.iter().enumerate() {
                    dims[i] = u32_of(d, "a dimension")?;
                }
                params.extend(dims);
                for v in [cond, a, b] {
                    params.extend(broadcast_strides(&shapes[*v], shape));
                }
                out.push(Dispatch {
                    kernel: Kernel::Where,
                    params,
                    bindings: vec![(1, at(*cond)?), (2, at(*a)?), (3, at(*b)?), (4, at(*y)?)],
                    threads: product(shape),
                });
            }
            Step::LayerNorm {
                x,
                scale,
                bias,
                axis,
                epsilon,
                out: y,
            } => {
                let s = &shapes[*x];
                let a = normalize_axis(*axis, s.len())?;
                let rows = product(&s[..a]);
                let len = product(&s[a..]);
                let bias_len = bias.map_or(0, |b| product(&shapes[b]));
                out.push(Dispatch {
                    kernel: Kernel::LayerNorm,
                    params: vec![
                        u32_of(rows, "rows")?,
                        u32_of(len, "a row")?,
                        epsilon.to_bits(),
                        u32_of(product(&shapes[*scale]), "scale")?,
                        u32_of(bias_len, "bias")?,
                    ],
                    bindings: vec![
                        (1, at(*x)?),
                        (2, at(*scale)?),
                        (3, at(bias.unwrap_or(*scale))?),
                        (4, at(*y)?),
                    ],
                    threads: if len == 0 {
                        0
                    } else {
                        rows * WORKGROUP as usize
                    },
                });
            }
            Step::CastIds { x, out: y } => {
                let n = product(&shapes[*x]);
                out.push(Dispatch {
                    kernel: Kernel::CastIds,
                    params: vec![u32_of(n, "elements")?],
                    bindings: vec![(1, at(*x)?), (2, at(*y)?)],
                    threads: n,
                });
            }
            Step::View { .. } | Step::Host { .. } | Step::Upload { .. } => {}
        }
        Ok(())
    }
}

/// The reduce kernels' mode for one dispatch of a reduction, `first` of its runs of axes or not
/// (`reduce.wgsl`).
fn reduce_mode(kind: ReduceKind, first: bool) -> u32 {
    match kind {
        ReduceKind::Sum => 0,
        ReduceKind::Mean => 1,
        ReduceKind::Max => 2,
        ReduceKind::Min => 3,
        ReduceKind::SumSquare if first => 4,
        ReduceKind::SumSquare => 0,
        // The norm of each run's norms is the whole norm, and no intermediate holds a sum of
        // squares (which f16 activations would saturate long before the norm does).
        ReduceKind::L2 => 6,
    }
}

/// Per batch dimension of `batch`, the step in whole matrices of an operand whose batch
/// dimensions are `operand` (0 where it broadcasts), padded to [`MAX_BATCH_RANK`].
fn matrix_strides(operand: &[usize], batch: &[usize]) -> Result<[u32; MAX_BATCH_RANK], RunError> {
    let mut out = [0u32; MAX_BATCH_RANK];
    let mut stride = 1usize;
    for i in (0..operand.len()).rev() {
        if operand[i] != 1 || batch[i] == 1 {
            out[i] = if operand[i] == 1 {
                0
            } else {
                u32_of(stride, "a batch stride")?
            };
        }
        stride = stride.saturating_mul(operand[i]);
    }
    Ok(out)
}

/// The strided copy for value `v`'s elements: ids are words, activations `act`.
fn copy_kernel(g: &Graph, v: usize) -> Kernel {
    match g.values.get(v).map(|value| value.dtype) {
        Some(DType::F32) => Kernel::StridedAct,
        _ => Kernel::Strided,
    }
}

/// A strided copy of `b` from `x` into `y` with `kernel` (`strided_copy.wgsl`).
fn strided(b: &StridedBox, kernel: Kernel, x: Binding, y: Binding) -> Result<Dispatch, RunError> {
    let rank = b.dims.len();
    if rank > MAX_RANK {
        return Err(RunError::Input(format!(
            "rank {rank} copies are not supported on the GPU"
        )));
    }
    let i32_of = |v: i64, what: &str| {
        i32::try_from(v).map(|v| v as u32).map_err(|_| {
            RunError::Input(format!(
                "{what} ({v}) does not fit the GPU's 32-bit indices"
            ))
        })
    };
    let count = product(&b.dims);
    let mut params = vec![u32_of(count, "elements")?, rank as u32];
    let mut dims = [1u32; MAX_RANK];
    let mut st = [0u32; MAX_RANK];
    for i in 0..rank {
        dims[i] = u32_of(b.dims[i], "a dimension")?;
        st[i] = i32_of(b.strides[i], "a stride")?;
    }
    params.extend(dims);
    params.extend(st);
    params.push(i32_of(b.offset, "an offset")?);
    Ok(Dispatch {
        kernel,
        params,
        bindings: vec![(1, x), (2, y)],
        threads: count,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::{BinaryOp, DType, View};
    use crate::memory::plan_memory;
    use crate::shape::infer_all;

    fn lowered(g: &Graph, lowering: &Lowering<'_>, inputs: &[Vec<usize>]) -> Vec<Dispatch> {
        let known = infer_all(g, inputs).unwrap();
        let memory = plan_memory(
            g,
            &known.shapes,
            &lowering.scratch_bytes(g, &known.shapes),
            lowering.precision,
        );
        lowering.lower(g, &known, &memory).unwrap()
    }

    fn dense(g: &mut Graph) {
        let x = g.test_input(DType::F32);
        let weight = g.test_weight(8, 6);
        let y = g.test_step(|out| Step::MatMul {
            a: x,
            weight,
            act: UnaryOp::Relu,
            out,
        });
        g.output_values.push(y);
    }

    fn split_q8() -> WeightLayout {
        WeightLayout {
            k: 8,
            n: 6,
            k4: 2,
            q8: true,
            blocks: vec![(0, 4), (4, 2)],
            has_bias: true,
        }
    }

    #[test]
    fn a_product_runs_one_dispatch_per_weight_block() {
        let mut g = Graph::default();
        dense(&mut g);
        let weights = [split_q8()];
        let unpacked = Lowering {
            weights: &weights,
            tables: &[],
            dot4: false,
            precision: Precision::F32,
        };
        let d = lowered(&g, &unpacked, &[vec![3, 8]]);
        assert_eq!(d.len(), 2);
        assert!(d.iter().all(|d| d.kernel == Kernel::MatMulQ8));
        let relu = UnaryOp::Relu.code();
        assert_eq!(d[0].params, vec![3, 8, 4, 0, 6, relu, 1, 2]);
        assert_eq!(d[1].params, vec![3, 8, 2, 4, 6, relu, 1, 2]);
        assert_eq!((d[0].threads, d[1].threads), (12, 6));
        assert!(d[1].bindings.contains(&(2, Binding::WeightBlock(0, 1))));

        // With dot4, the rows are quantised first into two scratch buffers.
        let packed = Lowering {
            dot4: true,
            ..unpacked
        };
        let d = lowered(&g, &packed, &[vec![3, 8]]);
        let kernels: Vec<Kernel> = d.iter().map(|d| d.kernel).collect();
        assert_eq!(
            kernels,
            [Kernel::QuantizeRows, Kernel::MatMulDot4, Kernel::MatMulDot4]
        );
        assert_eq!(d[0].params, vec![3, 8, 2]);
        let quantised = d[0].bindings[1].1;
        assert_eq!(d[1].bindings[0], (1, quantised));
    }

    #[test]
    fn element_wise_steps_carry_their_op_codes_and_strides() {
        let mut g = Graph::default();
        let a = g.test_input(DType::F32);
        let b = g.test_input(DType::F32);
        let y = g.test_step(|out| Step::Binary {
            op: BinaryOp::Div,
            a,
            b,
            out,
        });
        let v = g.test_step(|out| Step::View {
            x: y,
            view: View::Identity,
            out,
        });
        g.output_values.push(v);
        let none = Lowering {
            weights: &[],
            tables: &[],
            dot4: false,
            precision: Precision::F32,
        };
        let d = lowered(&g, &none, &[vec![4, 1, 3], vec![5, 1]]);
        assert_eq!(d.len(), 1, "a view dispatches nothing");
        assert_eq!(d[0].kernel, Kernel::Binary);
        let p = &d[0].params;
        assert_eq!(&p[..3], &[60, BinaryOp::Div.code(), 3]);
        assert_eq!(&p[3..9], &[4, 5, 3, 1, 1, 1]);
        assert_eq!(
            &p[9..15],
            &[3, 0, 1, 0, 0, 0],
            "a: [4, 1, 3] read as [4, 5, 3]"
        );
        assert_eq!(
            &p[15..21],
            &[0, 1, 0, 0, 0, 0],
            "b: [5, 1] read as [4, 5, 3]"
        );
    }

    #[test]
    fn large_dispatches_spread_over_two_dimensions() {
        assert_eq!(workgroups(0, 65_535), Ok(None));
        assert_eq!(workgroups(65, 65_535), Ok(Some((2, 1))));
        assert_eq!(workgroups(64 * 10, 4), Ok(Some((4, 3))));
        assert!(matches!(
            workgroups(64 * 17, 4),
            Err(RunError::Input(m)) if m.contains("dispatch limit")
        ));
    }
}
