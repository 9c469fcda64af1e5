//! Memory planning, pure: which activation buffer holds each value during a call.
//!
//! Every value a step writes (and every scratch buffer a step's dispatches need) is a request
//! for bytes, live from the step that writes it to the last step that reads it. Requests are
//! packed into as few buffers as liveness allows: a buffer freed by its last reader is reused by
//! a later request it fits, the smallest fitting buffer first. Views share their input's buffer,
//! constants stay in their uploaded buffers, and the model's outputs are never reused (they are
//! read back after the last step). Time 0 is the writing of the inputs (and of the host values
//! the GPU reads, [`Step::Upload`]); step `j` runs at time `j + 1`.

use crate::graph::{DType, Graph, Origin, Step};
use crate::kernels::Precision;
use crate::shape::product;

/// Bytes of one element of a `dtype` value on the GPU: activations as `precision` holds them,
/// ids as i32.
pub(crate) fn element_bytes(dtype: DType, precision: Precision) -> usize {
    match dtype {
        DType::F32 => precision.bytes(),
        DType::I32 | DType::Host => 4,
    }
}

/// Where a value's elements are during a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Place {
    /// Activation buffer `n` of the plan.
    Buffer(usize),
    /// Constant `n` of the graph, uploaded at load.
    Const(usize),
}

/// One request for a buffer: its bytes and when it is live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Lifetime {
    pub bytes: usize,
    /// The time it is written.
    pub first: usize,
    /// The time of its last read ([`KEPT`] when it is read after the call).
    pub last: usize,
}

/// The last use of a value read back after the call.
pub(crate) const KEPT: usize = usize::MAX;

/// Requests packed into buffers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Packing {
    /// Each buffer's size (at least 4 bytes: a binding cannot be empty).
    pub buffer_bytes: Vec<usize>,
    /// Per request, its buffer.
    pub buffer_of: Vec<usize>,
}

/// Packs `requests` into buffers. At each time the requests written then are served first, in
/// order, each by the smallest free buffer it fits (or a new one); then the buffers last read
/// at that time are freed. So a step's output and scratch never share a buffer with its inputs,
/// nor with each other.
pub(crate) fn pack(requests: &[Lifetime]) -> Packing {
    let end = requests.iter().map(|r| r.first).max().unwrap_or(0);
    let mut written: Vec<Vec<usize>> = vec![Vec::new(); end + 1];
    let mut freed: Vec<Vec<usize>> = vec![Vec::new(); end + 1];
    for (i, r) in requests.iter().enumerate() {
        written[r.first].push(i);
        // Freed after `end`: nothing is written later, so it need not be.
        if r.last <= end {
            freed[r.last.max(r.first)].push(i);
        }
    }
    let mut buffer_bytes: Vec<usize> = Vec::new();
    let mut buffer_of = vec![0; requests.len()];
    let mut free: Vec<usize> = Vec::new();
    for t in 0..=end {
        for &i in &written[t] {
            let need = requests[i].bytes.max(4);
            let pick = free
                .iter()
                .enumerate()
                .filter(|&(_, &b)| buffer_bytes[b] >= need)
                .min_by_key(|&(_, &b)| buffer_bytes[b])
                .map(|(at, _)| at);
            buffer_of[i] = match pick {
                Some(at) => free.swap_remove(at),
                None => {
                    buffer_bytes.push(need);
                    buffer_bytes.len() - 1
                }
            };
        }
        for &i in &freed[t] {
            free.push(buffer_of[i]);
        }
    }
    Packing {
        buffer_bytes,
        buffer_of,
    }
}

/// Every value's place, and the buffers a call of one input shape needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MemoryPlan {
    /// The activation buffers' sizes.
    pub buffer_bytes: Vec<usize>,
    /// Per value: its place (`None` for a value nothing computes, which no step reads).
    pub places: Vec<Option<Place>>,
    /// Per step: the buffers of its scratch requests, in their order.
    pub scratch: Vec<Vec<usize>>,
    /// The largest single request, in bytes (each must fit one binding).
    pub largest_request: usize,
}

/// Plans the memory of `g` for `shapes` (every value's, from [`crate::shape::infer_shapes`])
/// and `scratch_bytes` (per step, the scratch buffers its dispatches need), with activations
/// held as `precision`.
pub(crate) fn plan_memory(
    g: &Graph,
    shapes: &[Vec<usize>],
    scratch_bytes: &[Vec<usize>],
    precision: Precision,
) -> MemoryPlan {
    let bytes_of = |v: usize| product(&shapes[v]) * element_bytes(g.values[v].dtype, precision);
    // A value's request, or its place when it needs none.
    #[derive(Clone, Copy)]
    enum Home {
        Request(usize),
        Const(usize),
    }
    let mut home: Vec<Option<Home>> = vec![None; g.values.len()];
    let mut requests: Vec<Lifetime> = Vec::new();
    let mut request = |bytes: usize, t: usize| {
        requests.push(Lifetime {
            bytes,
            first: t,
            last: t,
        });
        requests.len() - 1
    };
    for (v, value) in g.values.iter().enumerate() {
        if let Origin::Const(c) = value.origin {
            home[v] = Some(Home::Const(c));
        }
    }
    for &v in &g.input_values {
        home[v] = Some(Home::Request(request(bytes_of(v), 0)));
    }
    let mut scratch_requests: Vec<Vec<usize>> = Vec::with_capacity(g.steps.len());
    let mut reads: Vec<(usize, usize)> = Vec::new();
    for (j, step) in g.steps.iter().enumerate() {
        let t = j + 1;
        let out = step.out();
        home[out] = match step {
            Step::View { x, .. } => home[*x],
            // Host values have no buffer; an upload is written with the inputs.
            Step::Host { .. } => None,
            Step::Upload { .. } => Some(Home::Request(request(bytes_of(out), 0))),
            _ => Some(Home::Request(request(bytes_of(out), t))),
        };
        let mine = scratch_bytes
            .get(j)
            .map(|s| s.iter().map(|&bytes| request(bytes, t)).collect())
            .unwrap_or_default();
        scratch_requests.push(mine);
        for v in step.inputs() {
            reads.push((v, t));
        }
    }
    for (v, t) in reads {
        if let Some(Home::Request(r)) = home[v] {
            requests[r].last = requests[r].last.max(t);
        }
    }
    for &v in &g.output_values {
        if let Some(Home::Request(r)) = home[v] {
            requests[r].last = KEPT;
        }
    }
    let packing = pack(&requests);
    let places = home
        .iter()
        .map(|h| {
            h.map(|h| match h {
                Home::Request(r) => Place::Buffer(packing.buffer_of[r]),
                Home::Const(c) => Place::Const(c),
            })
        })
        .collect();
    let scratch = scratch_requests
        .iter()
        .map(|rs| rs.iter().map(|&r| packing.buffer_of[r]).collect())
        .collect();
    MemoryPlan {
        buffer_bytes: packing.buffer_bytes,
        places,
        scratch,
        largest_request: requests.iter().map(|r| r.bytes).max().unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::{BinaryOp, DType, UnaryOp, View};
    use crate::shape::infer_shapes;

    fn unary(g: &mut Graph, x: usize) -> usize {
        g.test_step(|out| Step::Unary {
            op: UnaryOp::Relu,
            x,
            out,
        })
    }

    fn plan(g: &Graph, inputs: &[Vec<usize>]) -> MemoryPlan {
        let shapes = infer_shapes(g, inputs).unwrap();
        plan_memory(g, &shapes, &vec![Vec::new(); g.steps.len()], Precision::F32)
    }

    fn buffer(p: &MemoryPlan, v: usize) -> usize {
        match p.places[v] {
            Some(Place::Buffer(b)) => b,
            other => panic!("value {v} is at {other:?}"),
        }
    }

    #[test]
    fn a_freed_buffer_is_reused() {
        // x → a → b → c: two buffers take turns.
        let mut g = Graph::default();
        let x = g.test_input(DType::F32);
        let a = unary(&mut g, x);
        let b = unary(&mut g, a);
        let c = unary(&mut g, b);
        g.output_values.push(c);
        let p = plan(&g, &[vec![8, 16]]);
        assert_eq!(p.buffer_bytes, vec![512, 512]);
        assert_eq!(
            buffer(&p, b),
            buffer(&p, x),
            "b takes x's buffer once a has read x"
        );
        assert_eq!(buffer(&p, c), buffer(&p, a));
        // f16 activations: half the bytes; ids stay four bytes an element.
        let shapes = infer_shapes(&g, &[vec![8, 16]]).unwrap();
        let half = plan_memory(&g, &shapes, &vec![Vec::new(); 3], Precision::F16);
        assert_eq!(half.buffer_bytes, vec![256, 256]);
        assert_eq!(element_bytes(DType::I32, Precision::F16), 4);
    }

    #[test]
    fn an_output_never_aliases_its_inputs() {
        let mut g = Graph::default();
        let x = g.test_input(DType::F32);
        let y = g.test_input(DType::F32);
        let s = g.test_step(|out| Step::Binary {
            op: BinaryOp::Add,
            a: x,
            b: y,
            out,
        });
        let r = unary(&mut g, s);
        let d = g.test_step(|out| Step::Binary {
            op: BinaryOp::Mul,
            a: r,
            b: r,
            out,
        });
        let e = unary(&mut g, d);
        g.output_values.push(e);
        let p = plan(&g, &[vec![4], vec![4]]);
        for step in &g.steps {
            let out = buffer(&p, step.out());
            for v in step.inputs() {
                assert_ne!(out, buffer(&p, v), "{step:?}");
            }
        }
        // Yet buffers are reused: five values, three buffers.
        assert_eq!(p.buffer_bytes.len(), 3);
    }

    #[test]
    fn the_smallest_fitting_buffer_is_taken_first() {
        let at = |bytes, first, last| Lifetime { bytes, first, last };
        let p = pack(&[
            // Freed at time 0: buffers of 64, 16 and 32 bytes.
            at(64, 0, 0),
            at(16, 0, 0),
            at(32, 0, 0),
            // 20 fits 32 and 64: it takes 32; 8 then takes 16; 100 fits none.
            at(20, 1, 1),
            at(8, 1, 1),
            at(100, 1, 1),
        ]);
        assert_eq!(p.buffer_of, vec![0, 1, 2, 2, 1, 3]);
        assert_eq!(p.buffer_bytes, vec![64, 16, 32, 100]);
        // Nothing is empty: an empty request still gets 4 bytes.
        assert_eq!(pack(&[at(0, 0, 0)]).buffer_bytes, vec![4]);
    }

    #[test]
    fn outputs_are_kept_views_share_and_constants_stay() {
        let mut g = Graph::default();
        let x = g.test_input(DType::F32);
        let bias = g.test_const(&[4], vec![0.0; 4]);
        let first = unary(&mut g, x);
        let flat = g.test_step(|out| Step::View {
            x: first,
            view: View::Identity,
            out,
        });
        let sum = g.test_step(|out| Step::Binary {
            op: BinaryOp::Add,
            a: flat,
            b: bias,
            out,
        });
        let last = unary(&mut g, sum);
        let after = unary(&mut g, last);
        g.output_values.extend([first, after]);
        let p = plan(&g, &[vec![4]]);
        assert_eq!(p.places[bias], Some(Place::Const(0)));
        assert_eq!(buffer(&p, flat), buffer(&p, first));
        // `first` is an output: nothing after it may take its buffer.
        for v in [sum, last, after] {
            assert_ne!(buffer(&p, v), buffer(&p, first), "value {v}");
        }
        assert_eq!(buffer(&p, sum), buffer(&p, x), "x is free again by then");
    }

    #[test]
    fn scratch_is_live_during_its_step_only() {
        let mut g = Graph::default();
        let x = g.test_input(DType::F32);
        let a = unary(&mut g, x);
        let b = unary(&mut g, a);
        g.output_values.push(b);
        let shapes = infer_shapes(&g, &[vec![4]]).unwrap();
        let p = plan_memory(&g, &shapes, &[vec![16, 1000], vec![16]], Precision::F32);
        let step0 = &p.scratch[0];
        assert_ne!(step0[0], step0[1]);
        assert!(![buffer(&p, x), buffer(&p, a)].contains(&step0[0]));
        // Step 1 reuses a scratch buffer of step 0 (the smallest that fits).
        assert_eq!(p.scratch[1], vec![step0[0]]);
        assert_eq!(p.largest_request, 1000);
    }
}
