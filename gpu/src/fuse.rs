//! Rewrites of the imported graph: the decomposed LayerNorm and GELU exporters write replaced by
//! one step each (`patterns`), then a bias `Add` and an activation folded into the matrix
//! product before them, where nothing else reads the intermediate values (one dispatch instead
//! of three). Pure: it changes steps and weights' biases, nothing on the GPU.

use crate::graph::{BinaryOp, Graph, Origin, Step, UnaryOp};

mod patterns;

/// Fuses what can be fused, in place.
pub(crate) fn fuse(g: &mut Graph) {
    patterns::fuse_patterns(g);
    let mut uses = vec![0usize; g.values.len()];
    for s in &g.steps {
        for v in s.refers_to() {
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
                op: BinaryOp::Add,
                a: x,
                b: y,
                out: sum,
            } if act == UnaryOp::Identity && g.weights[weight].bias.is_none() => {
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
            Step::Unary { op, x, out: y }
                if x == out && act == UnaryOp::Identity && op != UnaryOp::Erf =>
            {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::DType;

    /// x → MatMul → + bias → act: the graph every dense layer imports to.
    fn dense(bias_dims: &[usize], act: UnaryOp) -> Graph {
        let mut g = Graph::default();
        let x = g.test_input(DType::F32);
        let weight = g.test_weight(4, 3);
        let bias = g.test_const(bias_dims, vec![1.0, 2.0, 3.0]);
        let h = g.test_step(|out| Step::MatMul {
            a: x,
            weight,
            act: UnaryOp::Identity,
            out,
        });
        let s = g.test_step(|out| Step::Binary {
            op: BinaryOp::Add,
            a: bias,
            b: h,
            out,
        });
        let y = g.test_step(|out| Step::Unary { op: act, x: s, out });
        g.output_values.push(y);
        g
    }

    #[test]
    fn a_bias_and_an_activation_fold_into_the_product() {
        let mut g = dense(&[3], UnaryOp::Relu);
        fuse(&mut g);
        assert_eq!(
            g.steps,
            vec![Step::MatMul {
                a: 0,
                weight: 0,
                act: UnaryOp::Relu,
                out: 4
            }]
        );
        assert_eq!(g.weights[0].bias, Some(vec![1.0, 2.0, 3.0]));
    }

    #[test]
    fn a_bias_of_higher_rank_and_erf_stay_apart() {
        let mut g = dense(&[1, 3], UnaryOp::Relu);
        fuse(&mut g);
        assert_eq!(g.steps.len(), 3, "a [1, 3] bias could add a dimension");
        let mut g = dense(&[3], UnaryOp::Erf);
        fuse(&mut g);
        assert_eq!(g.steps.len(), 2, "the bias fuses, erf does not");
    }

    #[test]
    fn an_intermediate_read_elsewhere_is_kept() {
        let mut g = dense(&[3], UnaryOp::Relu);
        // The product's output is also a model output.
        g.output_values.push(2);
        fuse(&mut g);
        assert_eq!(g.steps.len(), 3);
    }
}
