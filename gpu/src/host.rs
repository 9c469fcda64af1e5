//! Shape arithmetic on the host, pure: what exporters compute from `Shape` (reshape targets,
//! position ids, masks of ones, slice bounds) folded once per input shape, so none of it runs
//! on the GPU ([`HostOp`], evaluated by [`crate::shape`] in step order).
//!
//! Integers are i64 as in ONNX (booleans are 0 and 1); an op that mixes integers and floats
//! computes in f32. Every result is held to [`MAX_HOST_ELEMENTS`]; a bad value (a reshape that
//! does not fit, an index out of range, a division by zero) is a [`ShapeError`] naming the op.

use crate::graph::{BinaryOp, HostData, HostOp, HostTensor, NumberKind, UnaryOp, View};
use crate::shape::{ShapeError, broadcast, normalize_axis, product, slice_box, view_shape};

/// The most elements a host value holds (4 MiB of f32): shape arithmetic is small; a
/// `ConstantOfShape` or `Range` past this is refused rather than allocated.
pub(crate) const MAX_HOST_ELEMENTS: usize = 1 << 20;

/// One input of a host op: its shape, and its data when it is a host value.
#[derive(Clone, Copy)]
pub(crate) struct Arg<'a> {
    pub shape: &'a [usize],
    pub host: Option<&'a HostTensor>,
}

fn fail(op: &HostOp, why: impl std::fmt::Display) -> ShapeError {
    ShapeError(format!("shape arithmetic ({}): {why}", op_name(op)))
}

fn op_name(op: &HostOp) -> &'static str {
    match op {
        HostOp::Const(_) => "Constant",
        HostOp::Shape { .. } => "Shape",
        HostOp::Size => "Size",
        HostOp::View(_) | HostOp::Reshape { .. } => "a reshape",
        HostOp::Gather { .. } => "Gather",
        HostOp::Concat { .. } => "Concat",
        HostOp::Cast(_) => "Cast",
        HostOp::Binary(_) => "an element-wise op",
        HostOp::Unary(_) => "an element-wise function",
        HostOp::Where => "Where",
        HostOp::Range => "Range",
        HostOp::ConstantOfShape(_) => "ConstantOfShape",
        HostOp::Slice { .. } => "Slice",
        HostOp::Expand => "Expand",
    }
}

fn sized(op: &HostOp, dims: Vec<usize>, data: HostData) -> Result<HostTensor, ShapeError> {
    if product(&dims) != data.len() {
        return Err(fail(
            op,
            format!("{} values for shape {dims:?}", data.len()),
        ));
    }
    Ok(HostTensor { dims, data })
}

fn check_count(op: &HostOp, dims: &[usize]) -> Result<usize, ShapeError> {
    let n = product(dims);
    if n > MAX_HOST_ELEMENTS {
        return Err(fail(
            op,
            format!("{dims:?} is {n} elements, past the host's {MAX_HOST_ELEMENTS}"),
        ));
    }
    Ok(n)
}

/// The integers of a host value (floats are refused: a shape is integers).
pub(crate) fn ints(t: &HostTensor) -> Option<&[i64]> {
    match &t.data {
        HostData::Int(v) => Some(v),
        HostData::Float(_) => None,
    }
}

fn floats(d: &HostData) -> Vec<f32> {
    match d {
        HostData::Int(v) => v.iter().map(|&x| x as f32).collect(),
        HostData::Float(v) => v.clone(),
    }
}

/// For each element of `out` (row-major), the element of `input` that broadcasts to it.
fn broadcast_map(out: &[usize], input: &[usize]) -> Vec<usize> {
    let offset = out.len() - input.len();
    let mut strides = vec![0usize; out.len()];
    let mut stride = 1;
    for i in (0..input.len()).rev() {
        strides[i + offset] = if input[i] == 1 { 0 } else { stride };
        stride *= input[i];
    }
    let n = product(out);
    let mut map = Vec::with_capacity(n);
    let mut index = vec![0usize; out.len()];
    for _ in 0..n {
        map.push(index.iter().zip(&strides).map(|(i, s)| i * s).sum());
        for d in (0..out.len()).rev() {
            index[d] += 1;
            if index[d] < out[d] {
                break;
            }
            index[d] = 0;
        }
    }
    map
}

fn pick(d: &HostData, map: &[usize]) -> HostData {
    match d {
        HostData::Int(v) => HostData::Int(map.iter().map(|&i| v[i]).collect()),
        HostData::Float(v) => HostData::Float(map.iter().map(|&i| v[i]).collect()),
    }
}

/// Runs `op` on `args`.
pub(crate) fn eval(op: &HostOp, args: &[Arg<'_>]) -> Result<HostTensor, ShapeError> {
    let data = |i: usize| -> Result<&HostTensor, ShapeError> {
        args.get(i)
            .and_then(|a| a.host)
            .ok_or_else(|| fail(op, format!("input {i} is not known on the host")))
    };
    let int_data = |i: usize| -> Result<&[i64], ShapeError> {
        ints(data(i)?).ok_or_else(|| fail(op, format!("input {i} must be integers")))
    };
    Ok(match op {
        HostOp::Const(t) => t.clone(),
        HostOp::Shape { start, end } => {
            let shape = args.first().ok_or_else(|| fail(op, "no input"))?.shape;
            let rank = shape.len() as i64;
            let clamp = |v: i64| (if v < 0 { v + rank } else { v }).clamp(0, rank) as usize;
            let (s, e) = (clamp(*start), clamp(end.unwrap_or(rank)));
            let dims: Vec<i64> = shape[s..e.max(s)].iter().map(|&d| d as i64).collect();
            HostTensor {
                dims: vec![dims.len()],
                data: HostData::Int(dims),
            }
        }
        HostOp::Size => {
            let shape = args.first().ok_or_else(|| fail(op, "no input"))?.shape;
            HostTensor {
                dims: Vec::new(),
                data: HostData::Int(vec![product(shape) as i64]),
            }
        }
        HostOp::View(view) => {
            let t = data(0)?;
            HostTensor {
                dims: view_shape(view, &t.dims)?,
                data: t.data.clone(),
            }
        }
        HostOp::Reshape { allow_zero } => {
            let t = data(0)?;
            let view = View::Reshape {
                shape: int_data(1)?.to_vec(),
                allow_zero: *allow_zero,
            };
            HostTensor {
                dims: view_shape(&view, &t.dims)?,
                data: t.data.clone(),
            }
        }
        HostOp::Gather { axis } => {
            let t = data(0)?;
            let ids = data(1)?;
            let ids_v = int_data(1)?;
            let a = normalize_axis(*axis, t.dims.len())?;
            let rows = t.dims[a];
            let outer = product(&t.dims[..a]);
            let inner = product(&t.dims[a + 1..]);
            let mut dims = t.dims[..a].to_vec();
            dims.extend(&ids.dims);
            dims.extend(&t.dims[a + 1..]);
            if check_count(op, &dims)? == 0 {
                return sized(op, dims, pick(&t.data, &[]));
            }
            let mut map = Vec::with_capacity(product(&dims));
            for o in 0..outer {
                for &id in ids_v {
                    let r = if id < 0 { id + rows as i64 } else { id };
                    if r < 0 || r >= rows as i64 {
                        return Err(fail(op, format!("index {id} is out of range for {rows}")));
                    }
                    let base = (o * rows + r as usize) * inner;
                    map.extend(base..base + inner);
                }
            }
            sized(op, dims, pick(&t.data, &map))?
        }
        HostOp::Concat { axis } => {
            let parts: Vec<&HostTensor> = (0..args.len()).map(data).collect::<Result<_, _>>()?;
            let first = parts.first().ok_or_else(|| fail(op, "no inputs"))?;
            let a = normalize_axis(*axis, first.dims.len())?;
            let mut dims = first.dims.clone();
            dims[a] = parts
                .iter()
                .map(|p| p.dims.get(a).copied().unwrap_or(0))
                .sum();
            for p in &parts {
                let fits = p.dims.len() == dims.len()
                    && p.dims
                        .iter()
                        .zip(&dims)
                        .enumerate()
                        .all(|(i, (x, y))| i == a || x == y);
                if !fits {
                    return Err(fail(
                        op,
                        format!("{:?} and {:?} do not fit", first.dims, p.dims),
                    ));
                }
            }
            let all_int = parts.iter().all(|p| ints(p).is_some());
            let mut out_i = Vec::new();
            let mut out_f = Vec::new();
            if check_count(op, &dims)? > 0 {
                let outer = product(&dims[..a]);
                // Each part's numbers once, as the output holds them.
                let as_floats: Vec<Vec<f32>> = match all_int {
                    true => Vec::new(),
                    false => parts.iter().map(|p| floats(&p.data)).collect(),
                };
                for o in 0..outer {
                    for (k, p) in parts.iter().enumerate() {
                        let chunk = product(&p.dims[a..]);
                        let range = o * chunk..(o + 1) * chunk;
                        match (&p.data, all_int) {
                            (HostData::Int(v), true) => out_i.extend_from_slice(&v[range]),
                            _ => out_f.extend_from_slice(&as_floats[k][range]),
                        }
                    }
                }
            }
            let d = if all_int {
                HostData::Int(out_i)
            } else {
                HostData::Float(out_f)
            };
            sized(op, dims, d)?
        }
        HostOp::Cast(kind) => {
            let t = data(0)?;
            let d = match (kind, &t.data) {
                (NumberKind::Float, d) => HostData::Float(floats(d)),
                (NumberKind::Int, HostData::Int(v)) => HostData::Int(v.clone()),
                (NumberKind::Int, HostData::Float(v)) => {
                    HostData::Int(v.iter().map(|&x| x.trunc() as i64).collect())
                }
                (NumberKind::Bool, d) => {
                    HostData::Int(floats(d).iter().map(|&x| i64::from(x != 0.0)).collect())
                }
            };
            HostTensor {
                dims: t.dims.clone(),
                data: d,
            }
        }
        HostOp::Binary(b) => {
            let (x, y) = (data(0)?, data(1)?);
            let dims = broadcast(&x.dims, &y.dims)?;
            check_count(op, &dims)?;
            let (mx, my) = (broadcast_map(&dims, &x.dims), broadcast_map(&dims, &y.dims));
            let d = match (&x.data, &y.data) {
                (HostData::Int(u), HostData::Int(v)) => {
                    let mut out = Vec::with_capacity(mx.len());
                    for (&i, &j) in mx.iter().zip(&my) {
                        out.push(int_binary(*b, u[i], v[j]).ok_or_else(|| {
                            fail(op, format!("{b:?} of {} and {} is undefined", u[i], v[j]))
                        })?);
                    }
                    HostData::Int(out)
                }
                (u, v) => {
                    let (u, v) = (floats(u), floats(v));
                    let r: Vec<f32> = mx
                        .iter()
                        .zip(&my)
                        .map(|(&i, &j)| float_binary(*b, u[i], v[j]))
                        .collect();
                    if b.is_predicate() {
                        HostData::Int(r.iter().map(|&x| x as i64).collect())
                    } else {
                        HostData::Float(r)
                    }
                }
            };
            sized(op, dims, d)?
        }
        HostOp::Unary(u) => {
            let t = data(0)?;
            let d = match (&t.data, u) {
                (HostData::Int(v), UnaryOp::Identity) => HostData::Int(v.clone()),
                (HostData::Int(v), UnaryOp::Neg) => {
                    HostData::Int(v.iter().map(|x| x.wrapping_neg()).collect())
                }
                (HostData::Int(v), UnaryOp::Abs) => {
                    HostData::Int(v.iter().map(|x| x.wrapping_abs()).collect())
                }
                (HostData::Int(v), UnaryOp::Relu) => {
                    HostData::Int(v.iter().map(|&x| x.max(0)).collect())
                }
                (HostData::Int(v), UnaryOp::Not) => {
                    HostData::Int(v.iter().map(|&x| i64::from(x == 0)).collect())
                }
                (HostData::Int(v), UnaryOp::NonZero) => {
                    HostData::Int(v.iter().map(|&x| i64::from(x != 0)).collect())
                }
                (d, u) => HostData::Float(floats(d).iter().map(|&x| float_unary(*u, x)).collect()),
            };
            HostTensor {
                dims: t.dims.clone(),
                data: d,
            }
        }
        HostOp::Where => {
            let (c, x, y) = (data(0)?, data(1)?, data(2)?);
            let dims = broadcast(&broadcast(&c.dims, &x.dims)?, &y.dims)?;
            check_count(op, &dims)?;
            let cond = floats(&c.data);
            let (mc, mx, my) = (
                broadcast_map(&dims, &c.dims),
                broadcast_map(&dims, &x.dims),
                broadcast_map(&dims, &y.dims),
            );
            let choose = |k: usize| cond[mc[k]] != 0.0;
            let d = match (&x.data, &y.data) {
                (HostData::Int(u), HostData::Int(v)) => HostData::Int(
                    (0..mc.len())
                        .map(|k| if choose(k) { u[mx[k]] } else { v[my[k]] })
                        .collect(),
                ),
                (u, v) => {
                    let (u, v) = (floats(u), floats(v));
                    HostData::Float(
                        (0..mc.len())
                            .map(|k| if choose(k) { u[mx[k]] } else { v[my[k]] })
                            .collect(),
                    )
                }
            };
            sized(op, dims, d)?
        }
        HostOp::Range => {
            let (s, l, d) = (data(0)?, data(1)?, data(2)?);
            if [s, l, d].iter().any(|t| t.data.len() != 1) {
                return Err(fail(op, "start, limit and delta must be scalars"));
            }
            match (&s.data, &l.data, &d.data) {
                (HostData::Int(s), HostData::Int(l), HostData::Int(d)) => {
                    let (s, l, d) = (i128::from(s[0]), i128::from(l[0]), i128::from(d[0]));
                    if d == 0 {
                        return Err(fail(op, "delta is 0"));
                    }
                    let n = if d > 0 {
                        (l - s + d - 1).div_euclid(d)
                    } else {
                        (s - l - d - 1).div_euclid(-d)
                    }
                    .max(0);
                    let n = usize::try_from(n).unwrap_or(usize::MAX);
                    check_count(op, &[n])?;
                    let v = (0..n).map(|k| (s + d * k as i128) as i64).collect();
                    sized(op, vec![n], HostData::Int(v))?
                }
                (s, l, d) => {
                    let (s, l, d) = (floats(s)[0], floats(l)[0], floats(d)[0]);
                    let n = ((l - s) / d).ceil();
                    if d == 0.0 || !n.is_finite() {
                        return Err(fail(op, "delta is 0 or the range is not finite"));
                    }
                    let n = n.max(0.0) as usize;
                    check_count(op, &[n])?;
                    let v = (0..n).map(|k| s + d * k as f32).collect();
                    sized(op, vec![n], HostData::Float(v))?
                }
            }
        }
        HostOp::ConstantOfShape(value) => {
            let target = int_data(0)?;
            let dims = target
                .iter()
                .map(|&d| usize::try_from(d))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|_| fail(op, format!("a negative dimension in {target:?}")))?;
            let n = check_count(op, &dims)?;
            let d = match &value.data {
                HostData::Int(v) => HostData::Int(vec![v.first().copied().unwrap_or(0); n]),
                HostData::Float(v) => HostData::Float(vec![v.first().copied().unwrap_or(0.0); n]),
            };
            sized(op, dims, d)?
        }
        HostOp::Slice { axes, steps } => {
            let t = data(0)?;
            let mut next = 3;
            let mut optional = |present: bool| -> Result<Option<&[i64]>, ShapeError> {
                if !present {
                    return Ok(None);
                }
                next += 1;
                int_data(next - 1).map(Some)
            };
            let axes = optional(*axes)?;
            let steps = optional(*steps)?;
            let b = slice_box(&t.dims, int_data(1)?, int_data(2)?, axes, steps)?;
            let n = check_count(op, &b.dims)?;
            let mut map = Vec::with_capacity(n);
            let mut index = vec![0usize; b.dims.len()];
            for _ in 0..n {
                let at = b.offset
                    + index
                        .iter()
                        .zip(&b.strides)
                        .map(|(&i, &s)| i as i64 * s)
                        .sum::<i64>();
                map.push(at as usize);
                for d in (0..index.len()).rev() {
                    index[d] += 1;
                    if index[d] < b.dims[d] {
                        break;
                    }
                    index[d] = 0;
                }
            }
            sized(op, b.dims, pick(&t.data, &map))?
        }
        HostOp::Expand => {
            let t = data(0)?;
            let target: Vec<usize> = int_data(1)?.iter().map(|&d| d.max(0) as usize).collect();
            let dims = broadcast(&t.dims, &target)?;
            check_count(op, &dims)?;
            let map = broadcast_map(&dims, &t.dims);
            sized(op, dims, pick(&t.data, &map))?
        }
    })
}

/// Integer arithmetic as ONNX defines it (wrapping; division truncates); `None` when it is
/// undefined (division by zero, a negative power).
fn int_binary(op: BinaryOp, u: i64, v: i64) -> Option<i64> {
    Some(match op {
        BinaryOp::Add => u.wrapping_add(v),
        BinaryOp::Sub => u.wrapping_sub(v),
        BinaryOp::Mul => u.wrapping_mul(v),
        BinaryOp::Div => u.checked_div(v)?,
        BinaryOp::Pow => u.wrapping_pow(u32::try_from(v).ok()?),
        BinaryOp::Max => u.max(v),
        BinaryOp::Min => u.min(v),
        BinaryOp::Equal => i64::from(u == v),
        BinaryOp::Less => i64::from(u < v),
        BinaryOp::Greater => i64::from(u > v),
        BinaryOp::LessOrEqual => i64::from(u <= v),
        BinaryOp::GreaterOrEqual => i64::from(u >= v),
        BinaryOp::And => i64::from(u != 0 && v != 0),
        BinaryOp::Or => i64::from(u != 0 || v != 0),
        BinaryOp::Xor => i64::from((u != 0) != (v != 0)),
    })
}

/// What the GPU's binary kernel computes, on the host.
fn float_binary(op: BinaryOp, u: f32, v: f32) -> f32 {
    let b = |c: bool| if c { 1.0 } else { 0.0 };
    match op {
        BinaryOp::Add => u + v,
        BinaryOp::Sub => u - v,
        BinaryOp::Mul => u * v,
        BinaryOp::Div => u / v,
        BinaryOp::Pow => u.powf(v),
        BinaryOp::Max => u.max(v),
        BinaryOp::Min => u.min(v),
        BinaryOp::Equal => b(u == v),
        BinaryOp::Less => b(u < v),
        BinaryOp::Greater => b(u > v),
        BinaryOp::LessOrEqual => b(u <= v),
        BinaryOp::GreaterOrEqual => b(u >= v),
        BinaryOp::And => b(u != 0.0 && v != 0.0),
        BinaryOp::Or => b(u != 0.0 || v != 0.0),
        BinaryOp::Xor => b((u != 0.0) != (v != 0.0)),
    }
}

fn float_unary(op: UnaryOp, v: f32) -> f32 {
    match op {
        UnaryOp::Identity => v,
        UnaryOp::Relu => v.max(0.0),
        UnaryOp::Sigmoid => 1.0 / (1.0 + (-v).exp()),
        UnaryOp::Tanh => v.tanh(),
        UnaryOp::Neg => -v,
        UnaryOp::Exp => v.exp(),
        UnaryOp::Sqrt => v.sqrt(),
        UnaryOp::Not => f32::from(u8::from(v == 0.0)),
        UnaryOp::NonZero => f32::from(u8::from(v != 0.0)),
        UnaryOp::Trunc => v.trunc(),
        UnaryOp::Floor => v.floor(),
        UnaryOp::Ceil => v.ceil(),
        UnaryOp::Reciprocal => 1.0 / v,
        UnaryOp::Log => v.ln(),
        UnaryOp::Abs => v.abs(),
        // Not folded on the host (the importer keeps them on the GPU).
        UnaryOp::Erf | UnaryOp::Gelu | UnaryOp::GeluTanh => f32::NAN,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn int(dims: &[usize], v: &[i64]) -> HostTensor {
        HostTensor {
            dims: dims.to_vec(),
            data: HostData::Int(v.to_vec()),
        }
    }

    fn run(op: HostOp, args: &[&HostTensor]) -> Result<HostTensor, ShapeError> {
        let args: Vec<Arg<'_>> = args
            .iter()
            .map(|t| Arg {
                shape: &t.dims,
                host: Some(t),
            })
            .collect();
        eval(&op, &args)
    }

    #[test]
    fn an_exporters_reshape_target_folds() {
        // Shape(x) of a [2, 7, 128] value; Gather 0 and 1; Unsqueeze; Concat with [4, 32].
        let x = [2usize, 7, 128];
        let shape = eval(
            &HostOp::Shape {
                start: 0,
                end: None,
            },
            &[Arg {
                shape: &x,
                host: None,
            }],
        )
        .unwrap();
        assert_eq!(shape, int(&[3], &[2, 7, 128]));
        let dim = |i: i64| {
            let d = run(HostOp::Gather { axis: 0 }, &[&shape, &int(&[], &[i])]).unwrap();
            assert!(d.dims.is_empty(), "a scalar index gives a scalar");
            run(HostOp::View(View::Unsqueeze { axes: vec![0] }), &[&d]).unwrap()
        };
        let target = run(
            HostOp::Concat { axis: 0 },
            &[&dim(0), &dim(-2), &int(&[2], &[4, 32])],
        )
        .unwrap();
        assert_eq!(target, int(&[4], &[2, 7, 4, 32]));
    }

    #[test]
    fn ranges_slices_and_masks_fold() {
        let r = run(
            HostOp::Range,
            &[&int(&[], &[0]), &int(&[], &[5]), &int(&[], &[2])],
        )
        .unwrap();
        assert_eq!(r, int(&[3], &[0, 2, 4]));
        let down = run(
            HostOp::Range,
            &[&int(&[], &[3]), &int(&[], &[0]), &int(&[], &[-1])],
        );
        assert_eq!(down.unwrap(), int(&[3], &[3, 2, 1]));
        let t = int(&[2, 3], &[0, 1, 2, 3, 4, 5]);
        // Exporters slice to the end with i64::MAX.
        let s = run(
            HostOp::Slice {
                axes: true,
                steps: false,
            },
            &[
                &t,
                &int(&[1], &[1]),
                &int(&[1], &[i64::MAX]),
                &int(&[1], &[1]),
            ],
        )
        .unwrap();
        assert_eq!(s, int(&[2, 2], &[1, 2, 4, 5]));
        let rev = run(
            HostOp::Slice {
                axes: true,
                steps: true,
            },
            &[
                &t,
                &int(&[1], &[-1]),
                &int(&[1], &[i64::MIN]),
                &int(&[1], &[1]),
                &int(&[1], &[-2]),
            ],
        )
        .unwrap();
        assert_eq!(rev, int(&[2, 2], &[2, 0, 5, 3]));
        let ones = run(
            HostOp::ConstantOfShape(int(&[1], &[1])),
            &[&int(&[2], &[2, 3])],
        )
        .unwrap();
        assert_eq!(ones, int(&[2, 3], &[1; 6]));
        let eq = run(HostOp::Binary(BinaryOp::Equal), &[&t, &int(&[], &[4])]).unwrap();
        assert_eq!(eq, int(&[2, 3], &[0, 0, 0, 0, 1, 0]));
        let w = run(HostOp::Where, &[&eq, &int(&[], &[-1]), &t]).unwrap();
        assert_eq!(w, int(&[2, 3], &[0, 1, 2, 3, -1, 5]));
        let e = run(
            HostOp::Expand,
            &[&int(&[2, 1], &[7, 8]), &int(&[2], &[2, 3])],
        )
        .unwrap();
        assert_eq!(e, int(&[2, 3], &[7, 7, 7, 8, 8, 8]));
    }

    #[test]
    fn bad_shape_arithmetic_is_refused_with_the_op() {
        let div = run(
            HostOp::Binary(BinaryOp::Div),
            &[&int(&[], &[4]), &int(&[], &[0])],
        );
        assert!(div.unwrap_err().0.contains("undefined"));
        let g = run(
            HostOp::Gather { axis: 0 },
            &[&int(&[2], &[1, 2]), &int(&[], &[2])],
        );
        assert!(g.unwrap_err().0.contains("out of range"));
        let big = run(
            HostOp::ConstantOfShape(int(&[1], &[0])),
            &[&int(&[2], &[4096, 4096])],
        );
        assert!(
            big.unwrap_err().0.contains("past the host's"),
            "the bound holds"
        );
        let r = run(
            HostOp::Range,
            &[&int(&[], &[0]), &int(&[], &[1 << 40]), &int(&[], &[1])],
        );
        assert!(
            r.is_err(),
            "a range past the bound is refused, not allocated"
        );
        let bad = run(
            HostOp::Reshape { allow_zero: false },
            &[&int(&[3], &[1, 2, 3]), &int(&[1], &[2])],
        );
        assert!(bad.is_err());
    }
}
