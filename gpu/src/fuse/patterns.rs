//! The decomposed forms exporters write for LayerNorm and GELU, recognised and replaced by one
//! step each: `ReduceMean → Sub → Pow 2 → ReduceMean → Add ε → Sqrt → Div` (then `Mul γ`,
//! `Add β`) becomes [`Step::LayerNorm`], and `x · 0.5 · (1 + erf(x / √2))` becomes
//! [`UnaryOp::Gelu`] (which a product before it then takes as its activation). Pure, like the
//! rest of [`crate::fuse`]: only where every intermediate is read by the pattern alone.

use crate::graph::{BinaryOp, Graph, Origin, ReduceKind, Step, UnaryOp};

/// Who writes and how often each value is read, for one pass.
struct Uses {
    writer: Vec<Option<usize>>,
    reads: Vec<usize>,
}

impl Uses {
    fn of(g: &Graph) -> Self {
        let mut writer = vec![None; g.values.len()];
        let mut reads = vec![0usize; g.values.len()];
        for (i, s) in g.steps.iter().enumerate() {
            writer[s.out()] = Some(i);
            for v in s.refers_to() {
                reads[v] += 1;
            }
        }
        for &v in &g.output_values {
            reads[v] += 1;
        }
        Uses { writer, reads }
    }

    /// The step writing `v`, when `v` is read `reads` times in all.
    fn only<'a>(&self, g: &'a Graph, v: usize, reads: usize) -> Option<(usize, &'a Step)> {
        if self.reads[v] != reads {
            return None;
        }
        let i = self.writer[v]?;
        Some((i, &g.steps[i]))
    }
}

/// The one number of a scalar constant value (of rank 0 or 1: a higher rank could broadcast
/// the result up, which the fused step would not).
fn scalar(g: &Graph, v: usize) -> Option<f32> {
    match g.values[v].origin {
        Origin::Const(c) if g.consts[c].data.len() == 1 && g.consts[c].dims.len() <= 1 => {
            Some(g.consts[c].data[0])
        }
        _ => None,
    }
}

/// A constant of rank 1 (a per-channel γ or β along the last axis).
fn is_row_const(g: &Graph, v: usize) -> bool {
    matches!(g.values[v].origin, Origin::Const(c) if g.consts[c].dims.len() == 1)
}

/// The other operand of a commutative `op` step whose one operand is `v`.
fn other(step: &Step, op: BinaryOp, v: usize) -> Option<usize> {
    match step {
        Step::Binary { op: o, a, b, .. } if *o == op && *a == v => Some(*b),
        Step::Binary { op: o, a, b, .. } if *o == op && *b == v => Some(*a),
        _ => None,
    }
}

fn mean_of_last(step: &Step) -> Option<usize> {
    match step {
        Step::Reduce {
            x,
            axes: Some(axes),
            keep_dims: true,
            kind: ReduceKind::Mean,
            ..
        } if axes.as_slice() == [-1] => Some(*x),
        _ => None,
    }
}

/// A LayerNorm found: the steps it replaces, and the one step that stands for them.
fn layer_norm_at(g: &Graph, uses: &Uses, div: usize) -> Option<(Vec<usize>, Step)> {
    let Step::Binary {
        op: BinaryOp::Div,
        a: centred,
        b: sd,
        out: normalised,
    } = g.steps[div]
    else {
        return None;
    };
    let (
        i_sd,
        Step::Unary {
            op: UnaryOp::Sqrt,
            x: shifted,
            ..
        },
    ) = uses.only(g, sd, 1)?
    else {
        return None;
    };
    let (
        i_shift,
        Step::Binary {
            op: BinaryOp::Add,
            a,
            b,
            ..
        },
    ) = uses.only(g, *shifted, 1)?
    else {
        return None;
    };
    let (variance, epsilon) = match (scalar(g, *a), scalar(g, *b)) {
        (None, Some(e)) => (*a, e),
        (Some(e), None) => (*b, e),
        _ => return None,
    };
    let (i_var, var_step) = uses.only(g, variance, 1)?;
    let squared = mean_of_last(var_step)?;
    let (i_sq, sq_step) = uses.only(g, squared, 1)?;
    // The centred values are read by the square and the division (twice by a square that is a
    // product with itself).
    let (square_of, centred_reads) = match sq_step {
        Step::Binary {
            op: BinaryOp::Pow,
            a,
            b,
            ..
        } if scalar(g, *b) == Some(2.0) => (*a, 2),
        Step::Binary {
            op: BinaryOp::Mul,
            a,
            b,
            ..
        } if a == b => (*a, 3),
        _ => return None,
    };
    if square_of != centred {
        return None;
    }
    let (
        i_c,
        Step::Binary {
            op: BinaryOp::Sub,
            a: x,
            b: mean,
            ..
        },
    ) = uses.only(g, centred, centred_reads)?
    else {
        return None;
    };
    let (i_mean, mean_step) = uses.only(g, *mean, 1)?;
    if mean_of_last(mean_step)? != *x {
        return None;
    }
    let mut replaced = vec![i_mean, i_c, i_sq, i_var, i_shift, i_sd, div];
    // γ and β, when they follow.
    let mut out = normalised;
    let mut scale = None;
    let mut bias = None;
    if let Some(i) = uses.reads[out].eq(&1).then(|| reader(g, out)).flatten()
        && let Some(s) = other(&g.steps[i], BinaryOp::Mul, out).filter(|&s| is_row_const(g, s))
    {
        replaced.push(i);
        scale = Some(s);
        out = g.steps[i].out();
        if let Some(j) = uses.reads[out].eq(&1).then(|| reader(g, out)).flatten()
            && let Some(b) = other(&g.steps[j], BinaryOp::Add, out).filter(|&b| is_row_const(g, b))
        {
            replaced.push(j);
            bias = Some(b);
            out = g.steps[j].out();
        }
    }
    let scale = scale?;
    Some((
        replaced,
        Step::LayerNorm {
            x: *x,
            scale,
            bias,
            axis: -1,
            epsilon,
            out,
        },
    ))
}

/// The first step that reads `v`.
fn reader(g: &Graph, v: usize) -> Option<usize> {
    g.steps.iter().position(|s| s.refers_to().contains(&v))
}

/// A GELU found: `Div(x, √2)` (or `Mul(x, 1/√2)`) → `Erf` → `Add 1` → `Mul x` → `Mul 0.5`, the
/// two last in either order of operands.
fn gelu_at(g: &Graph, uses: &Uses, erf: usize) -> Option<(Vec<usize>, Step)> {
    let Step::Unary {
        op: UnaryOp::Erf,
        x: scaled,
        out: e,
    } = g.steps[erf]
    else {
        return None;
    };
    let (i_scaled, scaled_step) = uses.only(g, scaled, 1)?;
    let x = match scaled_step {
        Step::Binary {
            op: BinaryOp::Div,
            a,
            b,
            ..
        } if scalar(g, *b).is_some_and(|s| (s - std::f32::consts::SQRT_2).abs() < 1e-6) => *a,
        Step::Binary {
            op: BinaryOp::Mul,
            a,
            b,
            ..
        } => {
            let near = |v: usize| {
                scalar(g, v).is_some_and(|s| (s - std::f32::consts::FRAC_1_SQRT_2).abs() < 1e-6)
            };
            match (near(*a), near(*b)) {
                (false, true) => *a,
                (true, false) => *b,
                _ => return None,
            }
        }
        _ => return None,
    };
    if uses.reads[e] != 1 {
        return None;
    }
    let i_add = reader(g, e)?;
    let one = other(&g.steps[i_add], BinaryOp::Add, e)?;
    if scalar(g, one) != Some(1.0) {
        return None;
    }
    let shifted = g.steps[i_add].out();
    if uses.reads[shifted] != 1 {
        return None;
    }
    let i_mul = reader(g, shifted)?;
    if other(&g.steps[i_mul], BinaryOp::Mul, shifted)? != x {
        return None;
    }
    let product = g.steps[i_mul].out();
    if uses.reads[product] != 1 {
        return None;
    }
    let i_half = reader(g, product)?;
    let half = other(&g.steps[i_half], BinaryOp::Mul, product)?;
    if scalar(g, half) != Some(0.5) {
        return None;
    }
    Some((
        vec![i_scaled, erf, i_add, i_mul, i_half],
        Step::Unary {
            op: UnaryOp::Gelu,
            x,
            out: g.steps[i_half].out(),
        },
    ))
}

/// Replaces every decomposed LayerNorm and GELU, in place: the new step takes the place of the
/// last step it replaces (every input it reads is written before that), the others go.
pub(crate) fn fuse_patterns(g: &mut Graph) {
    let mut i = 0;
    while i < g.steps.len() {
        let uses = Uses::of(g);
        let found = match g.steps[i] {
            Step::Binary {
                op: BinaryOp::Div, ..
            } => layer_norm_at(g, &uses, i),
            Step::Unary {
                op: UnaryOp::Erf, ..
            } => gelu_at(g, &uses, i),
            _ => None,
        };
        let Some((mut replaced, step)) = found else {
            i += 1;
            continue;
        };
        replaced.sort_unstable();
        let last = *replaced.last().unwrap_or(&i);
        g.steps[last] = step;
        for &r in replaced.iter().rev().skip(1) {
            g.steps.remove(r);
        }
        i = replaced.first().copied().unwrap_or(i);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::DType;

    fn binary(g: &mut Graph, op: BinaryOp, a: usize, b: usize) -> usize {
        g.test_step(|out| Step::Binary { op, a, b, out })
    }

    fn mean(g: &mut Graph, x: usize) -> usize {
        g.test_step(|out| Step::Reduce {
            x,
            axes: Some(vec![-1]),
            keep_dims: true,
            kind: ReduceKind::Mean,
            out,
        })
    }

    #[test]
    fn a_decomposed_layer_norm_becomes_one_step() {
        let mut g = Graph::default();
        let x = g.test_input(DType::F32);
        let m = mean(&mut g, x);
        let c = binary(&mut g, BinaryOp::Sub, x, m);
        let two = g.test_const(&[], vec![2.0]);
        let sq = binary(&mut g, BinaryOp::Pow, c, two);
        let v = mean(&mut g, sq);
        let eps = g.test_const(&[], vec![1e-5]);
        let s = binary(&mut g, BinaryOp::Add, v, eps);
        let sd = g.test_step(|out| Step::Unary {
            op: UnaryOp::Sqrt,
            x: s,
            out,
        });
        let n = binary(&mut g, BinaryOp::Div, c, sd);
        let gamma = g.test_const(&[4], vec![1.0; 4]);
        let y = binary(&mut g, BinaryOp::Mul, n, gamma);
        let beta = g.test_const(&[4], vec![0.5; 4]);
        let z = binary(&mut g, BinaryOp::Add, beta, y);
        g.output_values.push(z);
        fuse_patterns(&mut g);
        assert_eq!(
            g.steps,
            vec![Step::LayerNorm {
                x,
                scale: gamma,
                bias: Some(beta),
                axis: -1,
                epsilon: 1e-5,
                out: z,
            }]
        );
    }

    fn gelu_graph() -> (Graph, usize, usize, usize) {
        let mut g = Graph::default();
        let x = g.test_input(DType::F32);
        let root2 = g.test_const(&[], vec![std::f32::consts::SQRT_2]);
        let d = binary(&mut g, BinaryOp::Div, x, root2);
        let e = g.test_step(|out| Step::Unary {
            op: UnaryOp::Erf,
            x: d,
            out,
        });
        let one = g.test_const(&[], vec![1.0]);
        let a = binary(&mut g, BinaryOp::Add, e, one);
        let p = binary(&mut g, BinaryOp::Mul, x, a);
        let half = g.test_const(&[], vec![0.5]);
        let q = binary(&mut g, BinaryOp::Mul, half, p);
        g.output_values.push(q);
        (g, x, d, q)
    }

    #[test]
    fn a_decomposed_gelu_becomes_one_step_unless_a_part_is_read_elsewhere() {
        let (mut g, x, _, q) = gelu_graph();
        fuse_patterns(&mut g);
        assert_eq!(
            g.steps,
            vec![Step::Unary {
                op: UnaryOp::Gelu,
                x,
                out: q
            }]
        );
        let (mut g, _, d, _) = gelu_graph();
        g.output_values.push(d);
        let before = g.steps.clone();
        fuse_patterns(&mut g);
        assert_eq!(g.steps, before, "x / √2 is also an output");
    }
}
