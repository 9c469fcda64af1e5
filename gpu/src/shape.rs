//! Shape inference, pure: every value's shape from the input shapes of a call, step by step,
//! and the shape arithmetic the lowering shares (axes, broadcast strides, reduction runs).
//! A shape that does not fit (a bad reshape, shapes that do not broadcast) is the caller's
//! inputs' fault: [`ShapeError`] becomes [`RunError::Input`].

use outpost_runtime::engine::RunError;

use crate::graph::{GatherSource, Graph, HostTensor, Origin, Step, View};
use crate::host::{self, Arg};
use crate::kernels::MAX_RANK;

mod boxes;
pub(crate) use boxes::{StridedBox, batch_matmul, slice_box, window_box};

/// Why these input shapes do not fit the model.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub(crate) struct ShapeError(pub(crate) String);

impl From<ShapeError> for RunError {
    fn from(e: ShapeError) -> Self {
        RunError::Input(e.0)
    }
}

/// The element count, saturating (any count that large is refused against the binding limit
/// before it is used).
pub(crate) fn product(dims: &[usize]) -> usize {
    dims.iter().fold(1usize, |n, &d| n.saturating_mul(d))
}

/// Every value's shape for one set of input shapes, and the data of the host values.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Inferred {
    pub shapes: Vec<Vec<usize>>,
    /// Per value: its data when it is folded on the host (and for [`Step::Upload`]s, the data
    /// they write).
    pub host: Vec<Option<HostTensor>>,
}

/// The shape of every value of `g` (indexed by value) for these input shapes, one per model
/// input in order.
#[cfg(test)]
pub(crate) fn infer_shapes(
    g: &Graph,
    input_shapes: &[Vec<usize>],
) -> Result<Vec<Vec<usize>>, ShapeError> {
    infer_all(g, input_shapes).map(|i| i.shapes)
}

/// Every value's shape and every host value's data for these input shapes.
pub(crate) fn infer_all(g: &Graph, input_shapes: &[Vec<usize>]) -> Result<Inferred, ShapeError> {
    let mut known = Inferred {
        shapes: vec![Vec::new(); g.values.len()],
        host: vec![None; g.values.len()],
    };
    for (i, &v) in g.input_values.iter().enumerate() {
        known.shapes[v] = input_shapes
            .get(i)
            .cloned()
            .ok_or_else(|| ShapeError(format!("no shape for input {i}")))?;
    }
    for (v, value) in g.values.iter().enumerate() {
        if let Origin::Const(c) = value.origin {
            known.shapes[v] = g.consts[c].dims.clone();
        }
    }
    for step in &g.steps {
        let out = step.out();
        match step {
            Step::Host { op, inputs, .. } => {
                let args: Vec<Arg<'_>> = inputs
                    .iter()
                    .map(|&v| Arg {
                        shape: &known.shapes[v],
                        host: known.host[v].as_ref(),
                    })
                    .collect();
                let t = host::eval(op, &args)?;
                known.shapes[out] = t.dims.clone();
                known.host[out] = Some(t);
            }
            Step::Upload { x, .. } => {
                known.shapes[out] = known.shapes[*x].clone();
                known.host[out] = known.host[*x].clone();
            }
            _ => {
                let shape = infer(g, step, &known)?;
                known.shapes[out] = shape;
            }
        }
    }
    Ok(known)
}

/// The integers of host value `v`, for a step that needs them.
pub(crate) fn host_ints<'a>(
    known: &'a Inferred,
    v: usize,
    what: &str,
) -> Result<&'a [i64], ShapeError> {
    known.host[v]
        .as_ref()
        .and_then(host::ints)
        .ok_or_else(|| ShapeError(format!("{what} is not integers known on the host")))
}

/// The output shape of one step, from the shapes known so far.
fn infer(g: &Graph, step: &Step, known: &Inferred) -> Result<Vec<usize>, ShapeError> {
    let shapes = &known.shapes;
    Ok(match step {
        Step::MatMul { a, weight, .. } => {
            let w = &g.weights[*weight];
            let s = &shapes[*a];
            match s.last() {
                Some(&k) if k == w.k => {
                    let mut out = s.clone();
                    if let Some(last) = out.last_mut() {
                        *last = w.n;
                    }
                    out
                }
                _ => {
                    return Err(ShapeError(format!(
                        "a matrix product takes [..., {}], got {s:?}",
                        w.k
                    )));
                }
            }
        }
        Step::BatchMatMul { a, b, .. } => batch_matmul(&shapes[*a], &shapes[*b])?.out,
        Step::Binary { a, b, .. } => broadcast(&shapes[*a], &shapes[*b])?,
        Step::Where { cond, a, b, .. } => {
            broadcast(&broadcast(&shapes[*cond], &shapes[*a])?, &shapes[*b])?
        }
        Step::Unary { x, .. } | Step::CastIds { x, .. } => shapes[*x].clone(),
        Step::LayerNorm {
            x,
            scale,
            bias,
            axis,
            ..
        } => {
            let s = &shapes[*x];
            let a = normalize_axis(*axis, s.len())?;
            let row = product(&s[a..]);
            for p in std::iter::once(scale).chain(bias.iter()) {
                let n = product(&shapes[*p]);
                if n != row && n != 1 {
                    return Err(ShapeError(format!(
                        "LayerNormalization over {:?}: a scale or bias of {:?}",
                        &s[a..],
                        shapes[*p]
                    )));
                }
            }
            s.clone()
        }
        Step::Softmax { x, axis, .. } => {
            normalize_axis(*axis, shapes[*x].len())?;
            shapes[*x].clone()
        }
        Step::Gather {
            data, ids, axis, ..
        } => {
            let dims = match data {
                GatherSource::Table(t) => &g.tables[*t].dims,
                GatherSource::Value(v) => &shapes[*v],
            };
            let a = normalize_axis(*axis, dims.len())?;
            // Ids folded on the host are checked here, once per shape.
            if let Some(t) = &known.host[*ids] {
                let rows = dims[a] as i64;
                if let Some(&bad) = host::ints(t)
                    .unwrap_or_default()
                    .iter()
                    .find(|&&id| id < -rows || id >= rows)
                {
                    return Err(ShapeError(format!(
                        "Gather: index {bad} is out of range for {rows} (a sequence longer than the model's positions?)"
                    )));
                }
            }
            let mut out = dims[..a].to_vec();
            out.extend(&shapes[*ids]);
            out.extend(&dims[a + 1..]);
            out
        }
        Step::Reduce {
            x, axes, keep_dims, ..
        } => {
            let s = &shapes[*x];
            let axes = reduce_axes(s.len(), axes.as_deref())?;
            s.iter()
                .enumerate()
                .filter_map(|(i, &d)| {
                    if !axes.contains(&i) {
                        Some(d)
                    } else if *keep_dims {
                        Some(1)
                    } else {
                        None
                    }
                })
                .collect()
        }
        Step::Concat { xs, axis, .. } => {
            let Some(&x0) = xs.first() else {
                return Err(ShapeError("Concat with no inputs".into()));
            };
            let first = &shapes[x0];
            let a = normalize_axis(*axis, first.len())?;
            let mut out = first.clone();
            out[a] = 0;
            for &x in xs {
                let s = &shapes[x];
                let same = s.len() == first.len()
                    && s.iter()
                        .zip(first)
                        .enumerate()
                        .all(|(i, (p, q))| i == a || p == q);
                if !same {
                    return Err(ShapeError(format!(
                        "Concat on axis {a}: shapes {first:?} and {s:?} do not fit"
                    )));
                }
                out[a] = out[a].saturating_add(s[a]);
            }
            out
        }
        Step::Transpose { x, perm, .. } => {
            let s = &shapes[*x];
            let perm = permutation(perm.as_deref(), s.len())?;
            perm.iter().map(|&p| s[p]).collect()
        }
        Step::View {
            x,
            view: View::ReshapeTo { shape, allow_zero },
            ..
        } => {
            let target = host_ints(known, *shape, "Reshape's shape")?.to_vec();
            view_shape(
                &View::Reshape {
                    shape: target,
                    allow_zero: *allow_zero,
                },
                &shapes[*x],
            )?
        }
        Step::View { x, view, .. } => view_shape(view, &shapes[*x])?,
        Step::Expand { x, shape, .. } => {
            let target: Vec<usize> = host_ints(known, *shape, "Expand's shape")?
                .iter()
                .map(|&d| d.max(0) as usize)
                .collect();
            broadcast(&shapes[*x], &target)?
        }
        Step::Window { x, window, .. } => window_box(known, &shapes[*x], window)?.dims,
        Step::Host { .. } | Step::Upload { .. } => {
            return Err(ShapeError("a host step outside the host pass".into()));
        }
    })
}

/// `axis` (negative: from the end) as an index into `rank` dimensions.
pub(crate) fn normalize_axis(axis: i64, rank: usize) -> Result<usize, ShapeError> {
    let r = rank as i64;
    let a = if axis < 0 { axis + r } else { axis };
    if (0..r).contains(&a) {
        Ok(a as usize)
    } else {
        Err(ShapeError(format!(
            "axis {axis} is out of range for rank {rank}"
        )))
    }
}

/// The numpy broadcast of two shapes.
pub(crate) fn broadcast(a: &[usize], b: &[usize]) -> Result<Vec<usize>, ShapeError> {
    let rank = a.len().max(b.len());
    (0..rank)
        .map(|i| {
            let da = if i + a.len() >= rank {
                a[i + a.len() - rank]
            } else {
                1
            };
            let db = if i + b.len() >= rank {
                b[i + b.len() - rank]
            } else {
                1
            };
            match (da, db) {
                (x, y) if x == y => Ok(x),
                (1, y) => Ok(y),
                (x, 1) => Ok(x),
                _ => Err(ShapeError(format!(
                    "shapes {a:?} and {b:?} do not broadcast"
                ))),
            }
        })
        .collect()
}

/// Strides of `operand` read as `shape` (0 along broadcast dimensions), padded to MAX_RANK.
pub(crate) fn broadcast_strides(operand: &[usize], shape: &[usize]) -> [u32; MAX_RANK] {
    let mut out = [0u32; MAX_RANK];
    let offset = shape.len() - operand.len();
    let mut stride = 1usize;
    for i in (0..operand.len()).rev() {
        if operand[i] != 1 || shape[i + offset] == 1 {
            out[i + offset] = if operand[i] == 1 { 0 } else { stride as u32 };
        }
        stride *= operand[i];
    }
    out
}

/// The reduced axes, sorted, each once (`None`: every axis).
fn reduce_axes(rank: usize, axes: Option<&[i64]>) -> Result<Vec<usize>, ShapeError> {
    let mut out = match axes {
        None => (0..rank).collect(),
        Some(a) => a
            .iter()
            .map(|&x| normalize_axis(x, rank))
            .collect::<Result<Vec<_>, _>>()?,
    };
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// The reduced axes as runs of consecutive axes: (first, length).
pub(crate) fn reduce_runs(
    shape: &[usize],
    axes: Option<&[i64]>,
) -> Result<Vec<(usize, usize)>, ShapeError> {
    let axes = reduce_axes(shape.len(), axes)?;
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for a in axes {
        match runs.last_mut() {
            Some((start, len)) if *start + *len == a => *len += 1,
            _ => runs.push((a, 1)),
        }
    }
    Ok(runs)
}

/// `perm` checked as a permutation of `rank` axes (`None`: reversed, as ONNX defaults).
pub(crate) fn permutation(perm: Option<&[i64]>, rank: usize) -> Result<Vec<usize>, ShapeError> {
    let perm: Vec<usize> = match perm {
        None => (0..rank).rev().collect(),
        Some(p) => p
            .iter()
            .map(|&x| normalize_axis(x, rank))
            .collect::<Result<_, _>>()?,
    };
    let mut seen = perm.clone();
    seen.sort_unstable();
    if seen != (0..rank).collect::<Vec<_>>() {
        return Err(ShapeError(format!(
            "{perm:?} is not a permutation of {rank} axes"
        )));
    }
    Ok(perm)
}

/// The shape a view gives `s`.
pub(crate) fn view_shape(view: &View, s: &[usize]) -> Result<Vec<usize>, ShapeError> {
    let count = product(s);
    Ok(match view {
        View::Identity => s.to_vec(),
        View::Reshape { shape, allow_zero } => {
            let mut out = Vec::with_capacity(shape.len());
            let mut infer = None;
            for (i, &d) in shape.iter().enumerate() {
                match d {
                    -1 if infer.is_none() => {
                        infer = Some(i);
                        out.push(1);
                    }
                    0 if !allow_zero => {
                        out.push(*s.get(i).ok_or_else(|| {
                            ShapeError("Reshape: 0 beyond the input's rank".into())
                        })?)
                    }
                    d if d >= 0 => out.push(d as usize),
                    _ => return Err(ShapeError(format!("Reshape: bad target {shape:?}"))),
                }
            }
            let known = product(&out);
            if let Some(i) = infer {
                if known == 0 || !count.is_multiple_of(known) {
                    return Err(ShapeError(format!("cannot reshape {s:?} to {shape:?}")));
                }
                out[i] = count / known;
            }
            if product(&out) != count {
                return Err(ShapeError(format!("cannot reshape {s:?} to {shape:?}")));
            }
            out
        }
        View::Flatten { axis } => {
            let r = s.len() as i64;
            let a = if *axis < 0 { axis + r } else { *axis };
            if !(0..=r).contains(&a) {
                return Err(ShapeError(format!("Flatten: axis {axis} for rank {r}")));
            }
            let a = a as usize;
            vec![product(&s[..a]), product(&s[a..])]
        }
        View::Squeeze { axes } => match axes {
            None => s.iter().copied().filter(|&d| d != 1).collect(),
            Some(axes) => {
                let axes = reduce_axes(s.len(), Some(axes))?;
                if let Some(&a) = axes.iter().find(|&&a| s[a] != 1) {
                    return Err(ShapeError(format!("Squeeze: axis {a} of {s:?} is not 1")));
                }
                s.iter()
                    .enumerate()
                    .filter(|(i, _)| !axes.contains(i))
                    .map(|(_, &d)| d)
                    .collect()
            }
        },
        View::Unsqueeze { axes } => {
            let rank = s.len() + axes.len();
            let axes = reduce_axes(rank, Some(axes))?;
            let mut rest = s.iter();
            (0..rank)
                .map(|i| {
                    if axes.contains(&i) {
                        1
                    } else {
                        rest.next().copied().unwrap_or(1)
                    }
                })
                .collect()
        }
        View::ReshapeTo { .. } => {
            return Err(ShapeError(
                "a reshape to a computed shape needs its host value".into(),
            ));
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::{BinaryOp, DType, Table, TableData, UnaryOp};

    #[test]
    fn broadcasting_follows_numpy() {
        assert_eq!(broadcast(&[4, 1, 3], &[5, 1]), Ok(vec![4, 5, 3]));
        assert!(broadcast(&[2, 3], &[4, 3]).is_err());
        assert_eq!(broadcast_strides(&[5, 1], &[4, 5, 3]), [0, 1, 0, 0, 0, 0]);
        assert_eq!(
            broadcast_strides(&[4, 5, 3], &[4, 5, 3]),
            [15, 3, 1, 0, 0, 0]
        );
    }

    #[test]
    fn views_compute_their_shapes() {
        let r = |shape: &[i64]| View::Reshape {
            shape: shape.to_vec(),
            allow_zero: false,
        };
        assert_eq!(view_shape(&r(&[0, -1]), &[2, 3, 4]), Ok(vec![2, 12]));
        assert!(view_shape(&r(&[5, -1]), &[2, 3]).is_err());
        assert_eq!(
            view_shape(&View::Flatten { axis: 1 }, &[2, 3, 4]),
            Ok(vec![2, 12])
        );
        assert_eq!(
            view_shape(
                &View::Squeeze {
                    axes: Some(vec![1])
                },
                &[2, 1, 4]
            ),
            Ok(vec![2, 4])
        );
        assert!(
            view_shape(
                &View::Squeeze {
                    axes: Some(vec![0])
                },
                &[2, 1]
            )
            .is_err()
        );
        assert_eq!(
            view_shape(&View::Unsqueeze { axes: vec![0, -1] }, &[3]),
            Ok(vec![1, 3, 1])
        );
    }

    #[test]
    fn reductions_group_consecutive_axes() {
        assert_eq!(reduce_runs(&[2, 3, 4, 5], Some(&[1, 2])), Ok(vec![(1, 2)]));
        assert_eq!(
            reduce_runs(&[2, 3, 4, 5], Some(&[0, -1])),
            Ok(vec![(0, 1), (3, 1)])
        );
        assert_eq!(reduce_runs(&[2, 3], None), Ok(vec![(0, 2)]));
    }

    #[test]
    fn steps_compute_their_shapes_from_the_inputs() {
        let mut g = Graph::default();
        let x = g.test_input(DType::F32);
        let ids = g.test_input(DType::I32);
        let weight = g.test_weight(4, 3);
        let row = g.test_const(&[3], vec![0.0; 3]);
        g.tables.push(Table {
            dims: vec![10, 3],
            data: TableData::F32(vec![0.0; 30]),
            axis: 0,
        });
        let h = g.test_step(|out| Step::MatMul {
            a: x,
            weight,
            act: UnaryOp::Identity,
            out,
        });
        let scaled = g.test_step(|out| Step::Binary {
            op: BinaryOp::Mul,
            a: h,
            b: row,
            out,
        });
        let e = g.test_step(|out| Step::Gather {
            data: GatherSource::Table(0),
            ids,
            axis: 0,
            out,
        });
        let both = g.test_step(|out| Step::Concat {
            xs: vec![scaled, e],
            axis: -1,
            out,
        });
        let mean = g.test_step(|out| Step::Reduce {
            x: both,
            axes: Some(vec![1]),
            keep_dims: false,
            kind: crate::graph::ReduceKind::Mean,
            out,
        });
        let t = g.test_step(|out| Step::Transpose {
            x: both,
            perm: None,
            out,
        });
        let shapes = infer_shapes(&g, &[vec![5, 4], vec![5]]).unwrap();
        assert_eq!(shapes[h], vec![5, 3]);
        assert_eq!(shapes[scaled], vec![5, 3], "[3] broadcasts over the rows");
        assert_eq!(shapes[e], vec![5, 3]);
        assert_eq!(shapes[both], vec![5, 6]);
        assert_eq!(shapes[mean], vec![5]);
        assert_eq!(shapes[t], vec![6, 5]);
        // Another batch size, the same graph.
        assert_eq!(
            infer_shapes(&g, &[vec![64, 4], vec![64]]).unwrap()[t],
            vec![6, 64]
        );
    }

    #[test]
    fn shapes_that_do_not_fit_are_the_inputs_fault() {
        let mut g = Graph::default();
        let x = g.test_input(DType::F32);
        let weight = g.test_weight(4, 3);
        g.test_step(|out| Step::MatMul {
            a: x,
            weight,
            act: UnaryOp::Identity,
            out,
        });
        let e = infer_shapes(&g, &[vec![2, 5]]).unwrap_err();
        assert!(e.0.contains("[..., 4]"), "{e}");
        assert!(matches!(RunError::from(e), RunError::Input(_)));

        let mut g = Graph::default();
        let a = g.test_input(DType::F32);
        let b = g.test_input(DType::F32);
        g.test_step(|out| Step::Concat {
            xs: vec![a, b],
            axis: 0,
            out,
        });
        assert_eq!(
            infer_shapes(&g, &[vec![2, 3], vec![4, 3]]).unwrap()[2],
            vec![6, 3]
        );
        assert!(infer_shapes(&g, &[vec![2, 3], vec![2, 4]]).is_err());
        assert!(infer_shapes(&g, &[vec![2, 3]]).is_err(), "a missing input");
    }

    #[test]
    fn softmax_and_transpose_check_their_axes() {
        let mut g = Graph::default();
        let x = g.test_input(DType::F32);
        let s = g.test_step(|out| Step::Softmax {
            x,
            axis: -1,
            legacy: false,
            out,
        });
        g.test_step(|out| Step::Transpose {
            x: s,
            perm: Some(vec![0, 2, 1]),
            out,
        });
        assert_eq!(
            infer_shapes(&g, &[vec![2, 3, 4]]).unwrap()[2],
            vec![2, 4, 3]
        );
        assert!(
            infer_shapes(&g, &[vec![2, 3]]).is_err(),
            "perm of 3 axes on rank 2"
        );
        assert!(permutation(Some(&[0, 0]), 2).is_err());
        assert_eq!(normalize_axis(-1, 3), Ok(2));
        assert!(normalize_axis(3, 3).is_err());
    }
}
