//! The ops transformer encoders bring, each on its own with odd sizes, and the model-zoo text
//! encoder (the patterns of a standard BERT export) at sequence 8, 32 and 128, batch 1 and 4,
//! with padded rows: GPU against tract.

use super::*;

/// Hidden states, embeddings and scores of the int8 encoder with int8 weights unpacked to f32:
/// the same arithmetic as tract up to the order of the sums (1.4e-6 measured on lavapipe).
const ENCODER: f32 = 1e-4;

/// The same with f16 activations: hidden states of magnitude ~3 rounded to 11 significant bits
/// at every stored value through two layers (6.5e-3 measured on lavapipe; with int8 activations
/// into the products 1.5e-2, within [`DOT4`] as without f16).
const ENCODER_HALF: f32 = 2e-2;

/// A one-input graph at `opset`.
fn single_at(
    opset: i64,
    dims: &[usize],
    body: impl FnOnce(&mut GraphBuilder, &str) -> String,
) -> Vec<u8> {
    let mut g = GraphBuilder::new(11).with_opset(opset);
    let mut shape = vec![batch()];
    shape.extend(dims.iter().map(|&d| Dim::Fixed(d)));
    let x = g.input("x", Onnx::Float, &shape);
    let out = body(&mut g, &x);
    g.node("Identity", &[&out], Some("y"), vec![]);
    g.output_any("y", Onnx::Float);
    g.finish("single", "one op", &[]).encode_to_vec()
}

/// One dimension of `t`'s shape as a 1-element tensor, as exporters write it.
fn dim_of(g: &mut GraphBuilder, t: &str, index: i64) -> String {
    let shape = g.node("Shape", &[t], None, vec![]);
    let name = g.fresh("index");
    let i = g.int_scalar(&name, index);
    let d = g.node("Gather", &[&shape, &i], None, vec![int_attr("axis", 0)]);
    let name = g.fresh("axes");
    let axes = g.ints(&name, &[0]);
    g.node("Unsqueeze", &[&d, &axes], None, vec![])
}

pub(super) fn transformer_op_cases() -> Vec<Case> {
    let mut cases = vec![
        case(
            "Reshape to Shape-computed [b,3,2,5]",
            single(&[3, 10], |g, x| {
                let b = dim_of(g, x, 0);
                let s = dim_of(g, x, 1);
                let rest = g.ints("rest", &[2, 5]);
                let target = g.node("Concat", &[&b, &s, &rest], None, vec![int_attr("axis", 0)]);
                let r = g.node("Reshape", &[x, &target], None, vec![]);
                g.node(
                    "Transpose",
                    &[&r],
                    None,
                    vec![ints_attr("perm", &[0, 2, 1, 3])],
                )
            }),
            UNPACKED,
        ),
        case(
            "MatMul of two computed [b,5,7]x[b,7,5]",
            single(&[5, 7], |g, x| {
                let t = g.node("Transpose", &[x], None, vec![ints_attr("perm", &[0, 2, 1])]);
                g.node("MatMul", &[x, &t], None, vec![])
            }),
            UNPACKED,
        ),
        case(
            "MatMul broadcast [b,3,5,7]x[3,7,9]",
            single(&[3, 5, 7], |g, x| {
                let w = g.random("w", &[3, 7, 9], 1.0);
                g.node("MatMul", &[x, &w], None, vec![])
            }),
            UNPACKED,
        ),
        case(
            "MatMul [b,11]x[11] (1-D)",
            single(&[11], |g, x| {
                let w = g.random("w", &[11], 1.0);
                g.node("MatMul", &[x, &w], None, vec![])
            }),
            UNPACKED,
        ),
        case(
            "LayerNormalization [b,5,67] opset 17",
            single_at(17, &[5, 67], |g, x| {
                let scale = g.random("scale", &[67], 1.0);
                let bias = g.random("bias", &[67], 1.0);
                g.node(
                    "LayerNormalization",
                    &[x, &scale, &bias],
                    None,
                    vec![int_attr("axis", -1), float_attr("epsilon", 1e-5)],
                )
            }),
            UNPACKED,
        ),
        case(
            "Softmax rows of 1000",
            single(&[3, 1000], |g, x| {
                let four = g.float_scalar("four", 4.0);
                let v = g.node("Mul", &[x, &four], None, vec![]);
                g.node("Softmax", &[&v], None, vec![])
            }),
            UNPACKED,
        ),
        case(
            "ReduceMax/Min/L2/SumSquare",
            single(&[7, 9], |g, x| {
                let keep = |a: &[i64]| vec![ints_attr("axes", a), int_attr("keepdims", 1)];
                let mx = g.node("ReduceMax", &[x], None, keep(&[2]));
                let mn = g.node("ReduceMin", &[x], None, keep(&[1]));
                let l2 = g.node("ReduceL2", &[x], None, keep(&[1, 2]));
                let sq = g.node("ReduceSumSquare", &[x], None, keep(&[2]));
                let a = g.node("Add", &[&mx, &mn], None, vec![]);
                let b = g.node("Add", &[&a, &l2], None, vec![]);
                g.node("Add", &[&b, &sq], None, vec![])
            }),
            UNPACKED,
        ),
        case(
            // Two runs of axes; a sum of squares of 400 values up to 300 would pass f16's 65504
            // long before the norm (~3500) does.
            "ReduceL2 axes [1,3] of values to 300",
            single(&[20, 3, 20], |g, x| {
                let scale = g.float_scalar("scale", 300.0);
                let big = g.node("Mul", &[x, &scale], None, vec![]);
                g.node(
                    "ReduceL2",
                    &[&big],
                    None,
                    vec![ints_attr("axes", &[1, 3]), int_attr("keepdims", 1)],
                )
            }),
            // Norms of ~3500: f32's rounding of them (4.9e-4 measured).
            1e-2,
        ),
        case(
            // Mean pooling of an all-padding row: 0 / max(0, 1e-9) is 0, not NaN (the epsilon
            // must not round to 0).
            "0 / Clip(0, min 1e-9)",
            single(&[5], |g, x| {
                let zero = g.float_scalar("zero", 0.0);
                let none = g.node("Mul", &[x, &zero], None, vec![]);
                let tiny = g.float_scalar("tiny", 1e-9);
                let count = g.node("Clip", &[&none, &tiny], None, vec![]);
                let mean = g.node("Div", &[&none, &count], None, vec![]);
                g.node("Add", &[x, &mean], None, vec![])
            }),
            UNPACKED,
        ),
        case(
            "ReduceSum rows of 300",
            single(&[2, 300], |g, x| {
                let axes = g.ints("axes", &[-1]);
                g.node(
                    "ReduceSum",
                    &[x, &axes],
                    None,
                    vec![int_attr("keepdims", 0)],
                )
            }),
            UNPACKED,
        ),
        case(
            "Where/Greater/Less/Equal/Not/And",
            single(&[13], |g, x| {
                let zero = g.float_scalar("zero", 0.0);
                let half = g.float_scalar("half", 0.5);
                let pos = g.node("Greater", &[x, &zero], None, vec![]);
                let small = g.node("Less", &[x, &half], None, vec![]);
                let both = g.node("And", &[&pos, &small], None, vec![]);
                let none = g.node("Not", &[&both], None, vec![]);
                let neg = g.node("Neg", &[x], None, vec![]);
                let w = g.node("Where", &[&none, x, &neg], None, vec![]);
                let eq = g.node("Equal", &[&w, x], None, vec![]);
                let f = g.node("Cast", &[&eq], None, vec![int_attr("to", 1)]);
                g.node("Add", &[&w, &f], None, vec![])
            }),
            UNPACKED,
        ),
        case(
            "Cast to int64 and bool and back",
            single(&[13], |g, x| {
                let four = g.float_scalar("four", 4.0);
                let v = g.node("Mul", &[x, &four], None, vec![]);
                let i = g.node("Cast", &[&v], None, vec![int_attr("to", 7)]);
                let f = g.node("Cast", &[&i], None, vec![int_attr("to", 1)]);
                let b = g.node("Cast", &[&v], None, vec![int_attr("to", 9)]);
                let fb = g.node("Cast", &[&b], None, vec![int_attr("to", 1)]);
                g.node("Add", &[&f, &fb], None, vec![])
            }),
            UNPACKED,
        ),
        case(
            "Pow 2, 3 and 0.5, Max, Min, Clip",
            single(&[13], |g, x| {
                let two = g.float_scalar("two", 2.0);
                let three = g.float_scalar("three", 3.0);
                let root = g.float_scalar("root", 0.5);
                let sq = g.node("Pow", &[x, &two], None, vec![]);
                let cube = g.node("Pow", &[x, &three], None, vec![]);
                let abs = g.node("Abs", &[x], None, vec![]);
                let r = g.node("Pow", &[&abs, &root], None, vec![]);
                let m = g.node("Max", &[&sq, &cube], None, vec![]);
                let n = g.node("Min", &[&m, &r], None, vec![]);
                let lo = g.float_scalar("lo", -0.1);
                let hi = g.float_scalar("hi", 0.3);
                g.node("Clip", &[&n, &lo, &hi], None, vec![])
            }),
            UNPACKED,
        ),
        case(
            "Expand [b,1,5] to a Shape-computed [b,3,5]",
            single(&[1, 5], |g, x| {
                let b = dim_of(g, x, 0);
                let rest = g.ints("rest", &[3, 5]);
                let target = g.node("Concat", &[&b, &rest], None, vec![int_attr("axis", 0)]);
                g.node("Expand", &[x, &target], None, vec![])
            }),
            UNPACKED,
        ),
        case(
            "Slice with steps, reversed, to i64::MAX",
            single(&[9, 10], |g, x| {
                let starts = g.ints("starts", &[1, -1]);
                let ends = g.ints("ends", &[i64::MAX, -11]);
                let axes = g.ints("axes", &[1, 2]);
                let steps = g.ints("steps", &[2, -3]);
                g.node("Slice", &[x, &starts, &ends, &axes, &steps], None, vec![])
            }),
            UNPACKED,
        ),
        case(
            "Split 3 unequal parts",
            single(&[10], |g, x| {
                let sizes = g.ints("sizes", &[2, 5, 3]);
                g.node_with_outputs(
                    "Split",
                    &[x, &sizes],
                    &["p0", "p1", "p2"],
                    vec![int_attr("axis", 1)],
                );
                let axes = g.ints("axes", &[1]);
                let a = g.node("ReduceSum", &["p0", &axes], None, vec![]);
                let b = g.node("Mul", &["p2", &a], None, vec![]);
                g.node("Concat", &["p1", &b], None, vec![int_attr("axis", 1)])
            }),
            UNPACKED,
        ),
        case(
            "Gather on a computed tensor (CLS pooling)",
            single(&[6, 5], |g, x| {
                let r = g.node("Relu", &[x], None, vec![]);
                let zero = g.int_scalar("zero", 0);
                g.node("Gather", &[&r, &zero], None, vec![int_attr("axis", 1)])
            }),
            UNPACKED,
        ),
        case(
            "Range and ConstantOfShape from Shape",
            single(&[7], |g, x| {
                let n = g.node("Shape", &[x], None, vec![]);
                let one = g.int_scalar("one", 1);
                let len = g.node("Gather", &[&n, &one], None, vec![int_attr("axis", 0)]);
                let zero = g.int_scalar("zero", 0);
                let step = g.int_scalar("step", 1);
                let range = g.node("Range", &[&zero, &len, &step], None, vec![]);
                let f = g.node("Cast", &[&range], None, vec![int_attr("to", 1)]);
                let ones = g.node("ConstantOfShape", &[&n], None, vec![]);
                let fo = g.node("Cast", &[&ones], None, vec![int_attr("to", 1)]);
                let a = g.node("Add", &[x, &f], None, vec![]);
                g.node("Add", &[&a, &fo], None, vec![])
            }),
            UNPACKED,
        ),
    ];
    // Ids cast to f32 on the GPU (the attention mask's path).
    let mut g = GraphBuilder::new(5);
    let ids = g.input("ids", Onnx::Int64, &[batch(), Dim::Fixed(3)]);
    let axes = g.ints("axes", &[-1]);
    let u = g.node("Unsqueeze", &[&ids, &axes], None, vec![]);
    let shape = g.ints("shape", &[1, 3, 4]);
    let e = g.node("Expand", &[&u, &shape], None, vec![]);
    let f = g.node("Cast", &[&e], None, vec![int_attr("to", 1)]);
    let half = g.float_scalar("half", 0.5);
    g.node("Mul", &[&f, &half], Some("y"), vec![]);
    g.output_any("y", Onnx::Float);
    cases.push(Case {
        ids: 1000,
        ..case(
            "Cast ids to f32 after Expand",
            g.finish("cast", "", &[]).encode_to_vec(),
            UNPACKED,
        )
    });
    cases
}

/// Encoder inputs: `batch` rows of `sequence` tokens, row `r` padded after `sequence - 3r`
/// tokens (at least one), token types 0 then 1.
fn encoder_inputs(batch: usize, sequence: usize, seed: u64) -> Vec<Tensor> {
    let mut rng = Rng::new(seed);
    let vocabulary = model_zoo::vocab::vocabulary().len() as u64;
    let (mut ids, mut mask, mut types) = (Vec::new(), Vec::new(), Vec::new());
    for r in 0..batch {
        let len = sequence.saturating_sub(3 * r).max(1);
        for t in 0..sequence {
            let real = t < len;
            ids.push(if real {
                (rng.next_u64() % vocabulary) as i64
            } else {
                0
            });
            mask.push(i64::from(real));
            types.push(i64::from(real && t >= len / 2));
        }
    }
    let shape = vec![batch as u64, sequence as u64];
    vec![
        Tensor::from_values("input_ids", shape.clone(), &ids).unwrap(),
        Tensor::from_values("attention_mask", shape.clone(), &mask).unwrap(),
        Tensor::from_values("token_type_ids", shape, &types).unwrap(),
    ]
}

#[test]
fn every_transformer_op_matches_tract() {
    check(&transformer_op_cases(), &context(false, None), |c| {
        c.tolerance
    });
}

#[test]
fn the_text_encoder_runs_on_the_gpu_and_matches_tract() {
    let mut failures = Vec::new();
    for (ctx, tolerance) in [
        (context(false, None), ENCODER),
        // int8 activations: each product's input rounded to 8 bits a row, through two layers
        // and five LayerNorms (1.4e-2 measured on hidden states of magnitude ~3).
        (context(true, None), DOT4),
        // f16 activations, alone and with int8 activations into the products.
        (half_context(false), ENCODER_HALF),
        (half_context(true), DOT4),
    ] {
        for model in model_zoo::TextModel::ALL {
            let bytes = int8(&model.bytes(model_zoo::DEFAULT_SEED).unwrap());
            let gpu = GpuModel::load(&bytes, Arc::clone(&ctx))
                .unwrap_or_else(|e| panic!("{}: not on the GPU: {e}", model.name()));
            let cpu = TractModel::load(&bytes).unwrap();
            for sequence in [8, 32, 128] {
                for batch in [1, 4] {
                    let x = encoder_inputs(batch, sequence, sequence as u64 + batch as u64);
                    let diff = max_difference(&gpu, &cpu, &x);
                    println!(
                        "{:<24} dot4 {:<5} f16 {:<5} batch {batch} sequence {sequence:>3}: max |gpu - tract| = {diff:.2e} (tolerance {tolerance:.0e})",
                        model.name(),
                        ctx.adapter().dot4,
                        ctx.adapter().f16,
                    );
                    if diff > tolerance {
                        failures.push(format!("{} {batch}x{sequence}: {diff:e}", model.name()));
                    }
                }
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
    // Past the 512 positions: the input's fault, named.
    let bytes = int8(
        &model_zoo::TextModel::TextEncoder
            .bytes(model_zoo::DEFAULT_SEED)
            .unwrap(),
    );
    let gpu = GpuModel::load(&bytes, context(false, None)).unwrap();
    match gpu.run(&encoder_inputs(1, 513, 1)) {
        Err(RunError::Input(m)) => assert!(m.contains("out of range for 512"), "{m}"),
        other => panic!("{other:?}"),
    }
}
