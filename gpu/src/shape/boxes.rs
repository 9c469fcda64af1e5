//! The shapes of the steps that read their input in a pattern: a matrix product's batch,
//! M, K, N (numpy broadcasting, 1-D promotion), and the strided boxes `Slice`, `Split` and
//! `Expand` take of their input (dimensions, first element, per-dimension step). Shared by
//! shape inference, the lowering and the host folding.

use super::{Inferred, ShapeError, broadcast, host_ints, normalize_axis};
use crate::graph::Window;

/// A numpy matrix product's shapes: the broadcast batch dimensions, M, K, N, and the output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MatMulShape {
    pub batch: Vec<usize>,
    /// The batch dimensions each operand has (1 where it broadcasts), padded to `batch`'s rank.
    pub a_batch: Vec<usize>,
    pub b_batch: Vec<usize>,
    pub m: usize,
    pub k: usize,
    pub n: usize,
    pub out: Vec<usize>,
}

/// The shapes of `a · b` as ONNX `MatMul` (numpy `matmul`) takes them.
pub(crate) fn batch_matmul(a: &[usize], b: &[usize]) -> Result<MatMulShape, ShapeError> {
    if a.is_empty() || b.is_empty() {
        return Err(ShapeError("MatMul of a scalar".into()));
    }
    let (a2, a_vec) = if a.len() == 1 {
        (vec![1, a[0]], true)
    } else {
        (a.to_vec(), false)
    };
    let (b2, b_vec) = if b.len() == 1 {
        (vec![b[0], 1], true)
    } else {
        (b.to_vec(), false)
    };
    let (m, k) = (a2[a2.len() - 2], a2[a2.len() - 1]);
    let (kb, n) = (b2[b2.len() - 2], b2[b2.len() - 1]);
    if k != kb {
        return Err(ShapeError(format!("MatMul of {a:?} and {b:?}: {k} ≠ {kb}")));
    }
    let batch = broadcast(&a2[..a2.len() - 2], &b2[..b2.len() - 2])?;
    let pad = |s: &[usize]| {
        let mut p = vec![1; batch.len() - s.len()];
        p.extend(s);
        p
    };
    let mut out = batch.clone();
    if !a_vec {
        out.push(m);
    }
    if !b_vec {
        out.push(n);
    }
    Ok(MatMulShape {
        a_batch: pad(&a2[..a2.len() - 2]),
        b_batch: pad(&b2[..b2.len() - 2]),
        batch,
        m,
        k,
        n,
        out,
    })
}

/// A strided box of an input: its dimensions, its first element, and per dimension the step
/// between elements (negative for a reversed slice), all in elements of the input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StridedBox {
    pub dims: Vec<usize>,
    pub offset: i64,
    pub strides: Vec<i64>,
}

/// Row-major strides of `shape`.
fn contiguous(shape: &[usize]) -> Vec<i64> {
    let mut strides = vec![1i64; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1].saturating_mul(shape[i + 1] as i64);
    }
    strides
}

/// ONNX `Slice` on `shape`: starts and ends clamped as the operator defines (so `i64::MAX`
/// means "to the end"), negative steps walking backwards.
pub(crate) fn slice_box(
    shape: &[usize],
    starts: &[i64],
    ends: &[i64],
    axes: Option<&[i64]>,
    steps: Option<&[i64]>,
) -> Result<StridedBox, ShapeError> {
    let n = starts.len();
    let default_axes: Vec<i64> = (0..n as i64).collect();
    let axes = axes.unwrap_or(&default_axes);
    if ends.len() != n || axes.len() != n || steps.is_some_and(|s| s.len() != n) {
        return Err(ShapeError(format!(
            "Slice: {n} starts, {} ends, {} axes",
            ends.len(),
            axes.len()
        )));
    }
    let element = contiguous(shape);
    let mut b = StridedBox {
        dims: shape.to_vec(),
        offset: 0,
        strides: element.clone(),
    };
    let mut seen = Vec::new();
    for i in 0..n {
        let a = normalize_axis(axes[i], shape.len())?;
        if seen.contains(&a) {
            return Err(ShapeError(format!("Slice: axis {a} given twice")));
        }
        seen.push(a);
        let step = steps.map_or(1, |s| s[i]);
        if step == 0 {
            return Err(ShapeError("Slice: a step of 0".into()));
        }
        if shape[a] == 0 {
            continue;
        }
        let dim = shape[a] as i128;
        let fix = |v: i64| {
            let v = i128::from(v);
            if v < 0 { v + dim } else { v }
        };
        let (start, end) = if step > 0 {
            (fix(starts[i]).clamp(0, dim), fix(ends[i]).clamp(0, dim))
        } else {
            (
                fix(starts[i]).clamp(0, dim - 1),
                fix(ends[i]).clamp(-1, dim - 1),
            )
        };
        let step = i128::from(step);
        let count = if step > 0 {
            (end - start + step - 1).div_euclid(step).max(0)
        } else {
            (start - end - step - 1).div_euclid(-step).max(0)
        };
        b.dims[a] = count as usize;
        if count > 0 {
            b.offset += (start * i128::from(element[a])) as i64;
        }
        b.strides[a] = (step * i128::from(element[a])) as i64;
    }
    Ok(b)
}

/// Part `index` of `Split` along `axis` of `shape`.
pub(crate) fn split_box(
    shape: &[usize],
    axis: i64,
    sizes: Option<&[i64]>,
    parts: usize,
    index: usize,
) -> Result<StridedBox, ShapeError> {
    let a = normalize_axis(axis, shape.len())?;
    let dim = shape[a];
    let (start, len) = match sizes {
        Some(sizes) => {
            let total = sizes.iter().try_fold(0i64, |t, &s| t.checked_add(s));
            if sizes.iter().any(|&s| s < 0) || total != Some(dim as i64) || index >= sizes.len() {
                return Err(ShapeError(format!(
                    "Split: sizes {sizes:?} do not add up to {dim}"
                )));
            }
            let start: i64 = sizes[..index].iter().sum();
            (start as usize, sizes[index] as usize)
        }
        None => {
            let chunk = dim.div_ceil(parts.max(1));
            let start = (chunk * index).min(dim);
            (start, chunk.min(dim - start))
        }
    };
    let element = contiguous(shape);
    let mut dims = shape.to_vec();
    dims[a] = len;
    Ok(StridedBox {
        dims,
        offset: start as i64 * element[a],
        strides: element,
    })
}

/// The box a [`Window`] takes of an input of `shape`.
pub(crate) fn window_box(
    known: &Inferred,
    shape: &[usize],
    window: &Window,
) -> Result<StridedBox, ShapeError> {
    match window {
        Window::Slice {
            starts,
            ends,
            axes,
            steps,
        } => {
            let axes = axes
                .map(|a| host_ints(known, a, "Slice's axes"))
                .transpose()?;
            let steps = steps
                .map(|s| host_ints(known, s, "Slice's steps"))
                .transpose()?;
            slice_box(
                shape,
                host_ints(known, *starts, "Slice's starts")?,
                host_ints(known, *ends, "Slice's ends")?,
                axes,
                steps,
            )
        }
        Window::SplitPart {
            axis,
            sizes,
            parts,
            index,
        } => split_box(shape, *axis, sizes.as_deref(), *parts, *index),
    }
}
