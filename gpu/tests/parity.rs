//! GPU against tract: one table of cases (model, batch sizes, tolerance), each run by both
//! engines on the same inputs. Runs on whatever adapter is present; CI installs Mesa's lavapipe
//! (`mesa-vulkan-drivers`), and these tests fail — not skip — when there is no adapter.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stdout
)]

use std::sync::{Arc, OnceLock};

use model_zoo::DemoModel;
use model_zoo::graph::{Dim, GraphBuilder, Rng, float_attr, int_attr, ints_attr, string_attr};
use outpost_gpu::{GpuContext, GpuModel, GpuOptions, ImportError};
use outpost_runtime::Engine;
use outpost_runtime::RunError;
use outpost_runtime::quantize::quantize_int8;
use outpost_runtime::tract::TractModel;
use outpost_shared::{DataType, Tensor, TensorSpec};
use prost::Message as _;
use tract_onnx::pb::tensor_proto::DataType as Onnx;

#[path = "parity/transformer.rs"]
mod transformer;

/// int8 weights unpacked to f32: the same arithmetic as tract's folded weights, up to the order
/// of the sums.
const UNPACKED: f32 = 1e-4;
/// Erf against tract: the shader's error (at most [`outpost_gpu::ERF_MAX_ERROR`]) plus tract's
/// own approximation's.
const ERF: f32 = 2.5e-6;

/// f16 activations, on the scaled difference `|gpu - tract| / max(1, |tract|)`: each stored
/// value is rounded to 11 significant bits (a relative 4.9e-4) and every op's inputs carry their
/// producers' rounding (3.4e-3 measured on lavapipe, a sum of 300 rounded inputs; most cases
/// 4e-4 to 1e-3).
const HALF: f32 = 1e-2;

/// A context on the adapter present, a software one included; the tests fail without one.
fn open(options: GpuOptions) -> Arc<GpuContext> {
    GpuContext::new(GpuOptions {
        allow_software: true,
        ..options
    })
    .unwrap_or_else(|e| {
        panic!("no GPU adapter ({e}); CI installs mesa-vulkan-drivers for lavapipe")
    })
}

fn context(dot4: bool, weight_block_bytes: Option<u64>) -> Arc<GpuContext> {
    static PLAIN: OnceLock<Arc<GpuContext>> = OnceLock::new();
    static DOT4: OnceLock<Arc<GpuContext>> = OnceLock::new();
    let make = || {
        open(GpuOptions {
            dot4,
            weight_block_bytes,
            ..GpuOptions::default()
        })
    };
    match (dot4, weight_block_bytes) {
        (false, None) => Arc::clone(PLAIN.get_or_init(make)),
        (true, None) => Arc::clone(DOT4.get_or_init(make)),
        _ => make(),
    }
}

/// A context with f16 activations where the adapter has `shader-f16` (lavapipe has).
fn half_context(dot4: bool) -> Arc<GpuContext> {
    static UNPACKED: OnceLock<Arc<GpuContext>> = OnceLock::new();
    static PACKED: OnceLock<Arc<GpuContext>> = OnceLock::new();
    let make = || {
        open(GpuOptions {
            dot4,
            f16: true,
            ..GpuOptions::default()
        })
    };
    Arc::clone(if dot4 { &PACKED } else { &UNPACKED }.get_or_init(make))
}

/// Inputs for `specs`: batch `batch` for the first dynamic dimension, 8 for the others; floats
/// in [-1, 1), ids in [0, ids).
fn inputs(specs: &[TensorSpec], batch: u64, ids: u64, seed: u64) -> Vec<Tensor> {
    let mut rng = Rng::new(seed);
    specs
        .iter()
        .map(|s| {
            let shape = outpost_runtime::engine::concrete_shape(s, batch, 8);
            let n = shape.iter().product::<u64>() as usize;
            match s.datatype {
                DataType::Fp32 => {
                    let v: Vec<f32> = (0..n).map(|_| rng.uniform(1.0)).collect();
                    Tensor::from_values(s.name.clone(), shape, &v).unwrap()
                }
                DataType::Int64 => {
                    let v: Vec<i64> = (0..n).map(|_| (rng.next_u64() % ids) as i64).collect();
                    Tensor::from_values(s.name.clone(), shape, &v).unwrap()
                }
                other => panic!("no generator for {other}"),
            }
        })
        .collect()
}

/// How two outputs' elements are compared.
#[derive(Clone, Copy)]
enum Metric {
    /// `|gpu - tract|`.
    Absolute,
    /// `|gpu - tract| / max(1, |tract|)`: absolute below 1, relative above.
    Scaled,
}

/// The largest absolute difference between the two engines' outputs.
fn max_difference(gpu: &dyn Engine, cpu: &dyn Engine, inputs: &[Tensor]) -> f32 {
    difference(gpu, cpu, inputs, Metric::Absolute)
}

/// The largest difference between the two engines' outputs by `metric` (non-float outputs must
/// be equal).
fn difference(gpu: &dyn Engine, cpu: &dyn Engine, inputs: &[Tensor], metric: Metric) -> f32 {
    let a = gpu.run(inputs).unwrap();
    let b = cpu.run(inputs).unwrap();
    assert_eq!(a.len(), b.len());
    let mut worst = 0f32;
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.name(), y.name());
        assert_eq!(x.shape(), y.shape(), "output {}", x.name());
        assert_eq!(x.datatype(), y.datatype(), "output {}", x.name());
        if x.datatype() != DataType::Fp32 {
            // Ids and shapes passed through: exactly tract's.
            assert_eq!(x.data(), y.data(), "output {}", x.name());
            continue;
        }
        for (p, q) in x
            .to_values::<f32>()
            .unwrap()
            .iter()
            .zip(y.to_values::<f32>().unwrap())
        {
            assert!(p.is_finite(), "output {} has {p}", x.name());
            let d = match metric {
                Metric::Absolute => (p - q).abs(),
                Metric::Scaled => (p - q).abs() / q.abs().max(1.0),
            };
            worst = worst.max(d);
        }
    }
    worst
}

struct Case {
    name: &'static str,
    model: Vec<u8>,
    /// Reference model for tract (the same file unless the GPU quantises at load).
    reference: Option<Vec<u8>>,
    batches: &'static [u64],
    ids: u64,
    tolerance: f32,
}

fn case(name: &'static str, model: Vec<u8>, tolerance: f32) -> Case {
    Case {
        name,
        model,
        reference: None,
        batches: &[1, 7],
        ids: 1,
        tolerance,
    }
}

fn int8(bytes: &[u8]) -> Vec<u8> {
    quantize_int8(bytes).unwrap().bytes
}

fn check(cases: &[Case], ctx: &Arc<GpuContext>, tolerance_for: impl Fn(&Case) -> f32) {
    check_by(cases, ctx, Metric::Absolute, tolerance_for);
}

fn check_by(
    cases: &[Case],
    ctx: &Arc<GpuContext>,
    metric: Metric,
    tolerance_for: impl Fn(&Case) -> f32,
) {
    let what = match metric {
        Metric::Absolute => "max |gpu - tract|",
        Metric::Scaled => "max |gpu - tract| / max(1, |tract|)",
    };
    let mut failures = Vec::new();
    for c in cases {
        let gpu = GpuModel::load(&c.model, Arc::clone(ctx))
            .unwrap_or_else(|e| panic!("{}: not on the GPU: {e}", c.name));
        let cpu = TractModel::load(c.reference.as_deref().unwrap_or(&c.model)).unwrap();
        assert_eq!(gpu.inputs(), cpu.inputs.as_slice(), "{}", c.name);
        for (i, &batch) in c.batches.iter().enumerate() {
            let x = inputs(gpu.inputs(), batch, c.ids, 7 + i as u64);
            let diff = difference(&gpu, &cpu, &x, metric);
            let tolerance = tolerance_for(c);
            println!(
                "{:<28} batch {batch:>4}: {what} = {diff:.2e} (tolerance {tolerance:.0e})",
                c.name
            );
            if diff > tolerance {
                failures.push(format!(
                    "{} batch {batch}: {diff:e} > {tolerance:e}",
                    c.name
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

fn batch() -> Dim {
    Dim::Symbol("batch")
}

/// A one-input graph: `x: f32 [batch, dims…]` through `body`, output `y`.
fn single(dims: &[usize], body: impl FnOnce(&mut GraphBuilder, &str) -> String) -> Vec<u8> {
    let mut g = GraphBuilder::new(11);
    let mut shape = vec![batch()];
    shape.extend(dims.iter().map(|&d| Dim::Fixed(d)));
    let x = g.input("x", Onnx::Float, &shape);
    let out = body(&mut g, &x);
    g.node("Identity", &[&out], Some("y"), vec![]);
    g.output_any("y", Onnx::Float);
    g.finish("single", "one op", &[]).encode_to_vec()
}

fn zoo_cases() -> Vec<Case> {
    DemoModel::ALL
        .into_iter()
        .map(|m| Case {
            name: m.name(),
            model: int8(&m.bytes(model_zoo::DEFAULT_SEED)),
            reference: None,
            batches: if m == DemoModel::VideoRankerXl {
                &[1, 3]
            } else {
                &[1, 7, 64]
            },
            ids: match m {
                DemoModel::VideoRanker | DemoModel::VideoRankerXl => {
                    model_zoo::CATALOG_ITEMS as u64
                }
                DemoModel::IntentClassifier => model_zoo::VOCABULARY as u64,
                DemoModel::MusicTwoTower => model_zoo::MUSIC_TRACKS as u64,
            },
            tolerance: UNPACKED,
        })
        .collect()
}

fn op_cases() -> Vec<Case> {
    let mut cases = vec![
        case(
            "MatMul f32 [b,3,5]x[5,3]",
            single(&[3, 5], |g, x| {
                let w = g.random("w", &[5, 3], 1.0);
                g.node("MatMul", &[x, &w], None, vec![])
            }),
            UNPACKED,
        ),
        case(
            "MatMul int8 K37 N67 +bias Relu",
            int8(&single(&[37], |g, x| {
                g.dense(x, "d", 37, 67, Some("Relu"), 1.0)
            })),
            UNPACKED,
        ),
        case(
            // A bias of rank 3 broadcasts the product up a dimension: not fused, same shape.
            "MatMul + rank-3 bias",
            single(&[5], |g, x| {
                let w = g.random("w", &[5, 3], 1.0);
                let xw = g.node("MatMul", &[x, &w], None, vec![]);
                let b = g.random("b", &[1, 1, 3], 1.0);
                g.node("Add", &[&xw, &b], None, vec![])
            }),
            UNPACKED,
        ),
        case(
            "Gemm int8 transB alpha beta",
            int8(&single(&[33], |g, x| {
                let b = g.random("b", &[40, 33], 0.3);
                let c = g.random("c", &[40], 1.0);
                g.node(
                    "Gemm",
                    &[x, &b, &c],
                    None,
                    vec![
                        int_attr("transB", 1),
                        float_attr("alpha", 0.5),
                        float_attr("beta", 2.0),
                    ],
                )
            })),
            UNPACKED,
        ),
        case(
            "Einsum bk,kn->bn f32",
            single(&[9], |g, x| {
                let w = g.random("w", &[9, 13], 1.0);
                g.node(
                    "Einsum",
                    &[x, &w],
                    None,
                    vec![string_attr("equation", "bk,kn->bn")],
                )
            }),
            UNPACKED,
        ),
        case(
            "Add/Sub/Mul/Div broadcast",
            single(&[1, 5], |g, x| {
                let c = g.random("c", &[4, 1], 1.0);
                let sum = g.node("Add", &[x, &c], None, vec![]);
                let d = g.random("d", &[5], 1.0);
                let diff = g.node("Sub", &[&sum, &d], None, vec![]);
                let prod = g.node("Mul", &[&diff, x], None, vec![]);
                let den = g.floats(
                    "den",
                    &[4, 5],
                    &(0..20).map(|i| 0.5 + i as f32 / 20.0).collect::<Vec<_>>(),
                );
                g.node("Div", &[&prod, &den], None, vec![])
            }),
            UNPACKED,
        ),
        case(
            "Softmax axis 1 [b,7,5]",
            single(&[7, 5], |g, x| {
                g.node("Softmax", &[x], None, vec![int_attr("axis", 1)])
            }),
            UNPACKED,
        ),
        case(
            "Softmax last axis [b,13]",
            single(&[13], |g, x| g.node("Softmax", &[x], None, vec![])),
            UNPACKED,
        ),
        case(
            "ReduceMean axes[1] keepdims 0",
            single(&[6, 5], |g, x| {
                g.node(
                    "ReduceMean",
                    &[x],
                    None,
                    vec![ints_attr("axes", &[1]), int_attr("keepdims", 0)],
                )
            }),
            UNPACKED,
        ),
        case(
            "ReduceSum axes [0,2] input",
            single(&[6, 5], |g, x| {
                let axes = g.ints("axes", &[0, 2]);
                g.node(
                    "ReduceSum",
                    &[x, &axes],
                    None,
                    vec![int_attr("keepdims", 1)],
                )
            }),
            UNPACKED,
        ),
        case(
            "Concat axis 1 of three",
            single(&[3], |g, x| {
                let r = g.node("Relu", &[x], None, vec![]);
                let s = g.node("Sigmoid", &[x], None, vec![]);
                g.node("Concat", &[x, &r, &s], None, vec![int_attr("axis", 1)])
            }),
            UNPACKED,
        ),
        case(
            "Transpose [2,0,1]",
            single(&[3, 5], |g, x| {
                g.node("Transpose", &[x], None, vec![ints_attr("perm", &[2, 0, 1])])
            }),
            UNPACKED,
        ),
        case(
            "Reshape/Unsqueeze/Squeeze/Flatten/Dropout/Cast",
            single(&[12], |g, x| {
                let shape = g.ints("shape", &[0, 3, 4]);
                let r = g.node("Reshape", &[x, &shape], None, vec![]);
                let one = g.ints("one", &[1]);
                let u = g.node("Unsqueeze", &[&r, &one], None, vec![]);
                let s = g.node("Squeeze", &[&u, &one], None, vec![]);
                let f = g.node("Flatten", &[&s], None, vec![int_attr("axis", 1)]);
                let d = g.node("Dropout", &[&f], None, vec![]);
                let c = g.node("Cast", &[&d], None, vec![int_attr("to", 1)]);
                g.node("Relu", &[&c], None, vec![])
            }),
            UNPACKED,
        ),
    ];
    // Element-wise functions over [-4, 4).
    // (case, [(op, Gelu's approximate)], tolerance)
    type Chain = &'static [(&'static str, Option<&'static str>)];
    let functions: [(&'static str, Chain, f32); 9] = [
        ("Relu", &[("Relu", None)], UNPACKED),
        ("Sigmoid", &[("Sigmoid", None)], UNPACKED),
        ("Tanh", &[("Tanh", None)], UNPACKED),
        ("Erf", &[("Erf", None)], ERF),
        ("Gelu", &[("Gelu", None)], ERF),
        ("Gelu approximate=tanh", &[("Gelu", Some("tanh"))], UNPACKED),
        ("Neg", &[("Neg", None)], UNPACKED),
        ("Exp", &[("Exp", None)], UNPACKED),
        ("Abs then Sqrt", &[("Abs", None), ("Sqrt", None)], UNPACKED),
    ];
    for (name, ops, tolerance) in functions {
        cases.push(case(
            name,
            single(&[13], |g, x| {
                let four = g.floats("four", &[], &[4.0]);
                let mut v = g.node("Mul", &[x, &four], None, vec![]);
                for (op, approximate) in ops {
                    let attrs = approximate
                        .map(|a| vec![string_attr("approximate", a)])
                        .unwrap_or_default();
                    v = g.node(op, &[&v], None, attrs);
                }
                v
            }),
            tolerance,
        ));
    }
    // Embedding lookups: an f32 table (under the int8 size threshold) and an int8 one.
    for (name, rows, width, quantise) in [
        ("Gather f32 [13,5]", 13, 5, false),
        ("Gather int8 [300,7]", 300, 7, true),
    ] {
        let mut g = GraphBuilder::new(5);
        let ids = g.input("ids", Onnx::Int64, &[batch(), Dim::Fixed(3)]);
        let table = g.random("table", &[rows, width], 1.0);
        g.node(
            "Gather",
            &[&table, &ids],
            Some("y"),
            vec![int_attr("axis", 0)],
        );
        g.output_any("y", Onnx::Float);
        let bytes = g.finish("gather", "", &[]).encode_to_vec();
        let bytes = if quantise { int8(&bytes) } else { bytes };
        cases.push(Case {
            ids: rows as u64,
            ..case(name, bytes, UNPACKED)
        });
    }
    // Integer outputs, as exported encoders have them: the ids passed through (a view of the
    // input, read back after the call).
    let mut g = GraphBuilder::new(5);
    let ids = g.input("ids", Onnx::Int64, &[batch(), Dim::Symbol("tokens")]);
    let table = g.random("table", &[50, 6], 1.0);
    g.node(
        "Gather",
        &[&table, &ids],
        Some("embedded"),
        vec![int_attr("axis", 0)],
    );
    g.node(
        "ReduceMean",
        &["embedded"],
        Some("y"),
        vec![ints_attr("axes", &[1]), int_attr("keepdims", 0)],
    );
    g.node("Identity", &[&ids], Some("ids_out"), vec![]);
    g.output_any("y", Onnx::Float);
    g.output_any("ids_out", Onnx::Int64);
    cases.push(Case {
        ids: 50,
        ..case(
            "int64 output (ids passed through)",
            g.finish("ids-out", "", &[]).encode_to_vec(),
            UNPACKED,
        )
    });
    cases
}

#[test]
fn every_demo_model_matches_tract_with_unpacked_int8() {
    check(&zoo_cases(), &context(false, None), |c| c.tolerance);
}

#[test]
fn every_single_op_graph_matches_tract() {
    check(&op_cases(), &context(false, None), |c| c.tolerance);
}

/// int8 activations (quantised per row) × int8 weights: the activations' rounding adds error.
#[test]
fn packed_dot_products_stay_within_the_stated_tolerance() {
    let ctx = context(true, None);
    assert!(
        ctx.adapter().dot4,
        "the adapter lacks dot4I8Packed: {:?}",
        ctx.adapter()
    );
    check(&zoo_cases(), &ctx, |_| DOT4);
    // Odd K (37, 33: a partial last word) and single rows through the packed path.
    check(&op_cases(), &ctx, |c| {
        if c.name.starts_with("MatMul int8") || c.name.starts_with("Gemm int8") {
            DOT4_RAW
        } else {
            c.tolerance
        }
    });
}

/// The same on raw matrix products (outputs of magnitude up to ~5).
const DOT4_RAW: f32 = 2e-2;

/// Every case of the table with activations held as f16 (where the adapter has `shader-f16`;
/// without it the option falls back to f32, which must then be exact as ever).
#[test]
fn f16_activations_stay_within_half_precision() {
    let ctx = half_context(false);
    let mut cases = op_cases();
    cases.extend(transformer::transformer_op_cases());
    cases.extend(zoo_cases());
    if !ctx.adapter().f16 {
        println!(
            "{} has no shader-f16: activations stay f32",
            ctx.adapter().name
        );
        check(&cases, &ctx, |c| c.tolerance);
        return;
    }
    let gpu = GpuModel::load(&cases[0].model, Arc::clone(&ctx)).unwrap();
    assert!(gpu.detail().contains("f16 activations"), "{}", gpu.detail());
    check_by(&cases, &ctx, Metric::Scaled, |_| HALF);
}

/// The int8-activation path's tolerance on the demo models (probabilities and scores in [0, 1]).
const DOT4: f32 = 5e-2;

#[test]
fn float_models_are_quantised_at_load_like_the_coordinator_does() {
    let ctx = context(false, None);
    let cases: Vec<Case> = [DemoModel::VideoRanker, DemoModel::IntentClassifier]
        .into_iter()
        .map(|m| {
            let fp32 = m.bytes(model_zoo::DEFAULT_SEED);
            Case {
                name: m.name(),
                reference: Some(int8(&fp32)),
                model: fp32,
                batches: &[5],
                ids: 1000,
                tolerance: UNPACKED,
            }
        })
        .collect();
    check(&cases, &ctx, |c| c.tolerance);
    let gpu = GpuModel::load(&DemoModel::VideoRanker.bytes(model_zoo::DEFAULT_SEED), ctx).unwrap();
    assert!(
        gpu.detail().contains("quantised to int8 at load"),
        "{}",
        gpu.detail()
    );
}

#[test]
fn weights_larger_than_a_binding_are_split() {
    // 1 KiB blocks: the 10 000-row table becomes 157 blocks, each matrix 2 to 4.
    let ctx = context(false, Some(1024));
    let mut cases = zoo_cases();
    cases.truncate(1);
    check(&cases, &ctx, |c| c.tolerance);
}

/// erf in f64: the Maclaurin series (|x| ≤ 4: cancellation costs at most e^16 ≈ 9e6 ulps of
/// 1e-16), ±1 beyond (|1 - erf(4)| < 2e-8).
fn erf_f64(x: f64) -> f64 {
    if x.abs() > 4.0 {
        return x.signum();
    }
    let mut term = x;
    let mut sum = x;
    for n in 1..200 {
        term *= -x * x / n as f64;
        sum += term / (2 * n + 1) as f64;
    }
    sum * 2.0 / std::f64::consts::PI.sqrt()
}

#[test]
fn the_erf_approximation_keeps_its_stated_error() {
    let bytes = single(&[], |g, x| g.node("Erf", &[x], None, vec![]));
    let gpu = GpuModel::load(&bytes, context(false, None)).unwrap();
    let xs: Vec<f32> = (-6000..=6000).map(|i| i as f32 / 1000.0).collect();
    let input = Tensor::from_values("x", vec![xs.len() as u64], &xs).unwrap();
    let ys = gpu.run(&[input]).unwrap()[0].to_values::<f32>().unwrap();
    let worst = xs
        .iter()
        .zip(&ys)
        .map(|(&x, &y)| (f64::from(y) - erf_f64(f64::from(x))).abs())
        .fold(0f64, f64::max);
    println!("erf on the GPU over [-6, 6]: max error {worst:.2e}");
    assert!(worst <= f64::from(outpost_gpu::ERF_MAX_ERROR), "{worst:e}");
}

#[test]
fn an_op_without_a_kernel_is_named() {
    let bytes = single(&[4], |g, x| g.node("Cos", &[x], None, vec![]));
    match GpuModel::load(&bytes, context(false, None)) {
        Err(ImportError::Unsupported { op, reason, .. }) => {
            assert_eq!(op, "Cos");
            assert!(reason.contains("no GPU kernel"), "{reason}");
        }
        other => panic!("expected Unsupported, got {other:?}"),
    }
    let garbage = GpuModel::load(b"not a model", context(false, None)).unwrap_err();
    assert!(matches!(garbage, ImportError::Invalid(_)), "{garbage:?}");
    let empty = single(&[4], |g, _| {
        g.node("Concat", &[], None, vec![int_attr("axis", 0)])
    });
    match GpuModel::load(&empty, context(false, None)) {
        Err(ImportError::Unsupported { op, reason, .. }) => {
            assert_eq!(op, "Concat");
            assert!(reason.contains("no inputs"), "{reason}");
        }
        other => panic!("expected Unsupported, got {other:?}"),
    }
    // A table too large for one binding splits along axis 0 only: gathered on axis 1, it stays
    // on tract.
    let mut g = GraphBuilder::new(5);
    let ids = g.input("ids", Onnx::Int64, &[batch()]);
    let table = g.random("table", &[256, 4], 1.0);
    g.node(
        "Gather",
        &[&table, &ids],
        Some("y"),
        vec![int_attr("axis", 1)],
    );
    g.output_any("y", Onnx::Float);
    let bytes = g.finish("gather1", "", &[]).encode_to_vec();
    assert!(GpuModel::load(&bytes, context(false, None)).is_ok());
    match GpuModel::load(&bytes, context(false, Some(1024))) {
        Err(ImportError::Unsupported { reason, .. }) => {
            assert!(reason.contains("cannot be split"), "{reason}")
        }
        other => panic!("expected Unsupported, got {other:?}"),
    }
}

/// Ids the GPU computes with as numbers (`Cast` to float: a mask, a comparison with a token id)
/// must be integers the activations hold exactly: f16 holds them to 2048, so a model doing that
/// with ids into a larger table stays on tract, named, and a call past 2048 is refused.
#[test]
fn f16_activations_refuse_ids_they_cannot_hold_exactly() {
    let model = |rows: usize| {
        let mut g = GraphBuilder::new(5);
        let ids = g.input("ids", Onnx::Int64, &[batch()]);
        let table = g.random("table", &[rows, 4], 1.0);
        let rows_of = g.node("Gather", &[&table, &ids], None, vec![int_attr("axis", 0)]);
        let number = g.node("Cast", &[&ids], None, vec![int_attr("to", 1)]);
        let axes = g.ints("axes", &[1]);
        let column = g.node("Unsqueeze", &[&number, &axes], None, vec![]);
        g.node("Add", &[&rows_of, &column], Some("y"), vec![]);
        g.output_any("y", Onnx::Float);
        g.finish("cast-ids", "", &[]).encode_to_vec()
    };
    let large = model(3000);
    let ctx = half_context(false);
    if !ctx.adapter().f16 {
        println!(
            "{} has no shader-f16: nothing to refuse",
            ctx.adapter().name
        );
        return;
    }
    match GpuModel::load(&large, Arc::clone(&ctx)) {
        Err(ImportError::Unsupported { op, node, reason }) => {
            assert_eq!((op.as_str(), node.as_str()), ("Cast", "ids"));
            assert!(
                reason.contains("up to 2999") && reason.contains("exactly only to 2048"),
                "{reason}"
            );
        }
        other => panic!("expected Unsupported, got {other:?}"),
    }
    // f32 activations hold them: on the GPU, as tract answers (on the int8 table the GPU makes
    // of the float one at load, as the coordinator would).
    let f32_gpu = GpuModel::load(&large, context(false, None)).unwrap();
    let cpu = TractModel::load(&int8(&large)).unwrap();
    let x = vec![Tensor::from_values("ids", vec![3], &[0i64, 2047, 2999]).unwrap()];
    assert!(max_difference(&f32_gpu, &cpu, &x) <= UNPACKED);
    // A table within 2048 rows: f16 takes the model; every id it takes is exact.
    let small = GpuModel::load(&model(2000), ctx).unwrap();
    let x = vec![Tensor::from_values("ids", vec![2], &[1999i64, -3]).unwrap()];
    let y = small.run(&x).unwrap()[0].to_values::<f32>().unwrap();
    assert_eq!(y.len(), 8);
    assert!(y.iter().all(|v| v.is_finite()), "{y:?}");
}

#[test]
fn bad_inputs_are_refused_with_the_reason() {
    let bytes = int8(&DemoModel::VideoRanker.bytes(model_zoo::DEFAULT_SEED));
    let gpu = GpuModel::load(&bytes, context(false, None)).unwrap();
    let mut x = inputs(gpu.inputs(), 2, 10, 1);
    x[1] = Tensor::from_values("item_ids", vec![2], &[3i64, 10_000]).unwrap();
    match gpu.run(&x) {
        Err(RunError::Input(m)) => {
            assert!(m.contains("id 10000") && m.contains("10000 rows"), "{m}")
        }
        other => panic!("{other:?}"),
    }
    x[1] = Tensor::from_values("item_ids", vec![3], &[1i64, 2, 3]).unwrap();
    // Batch 2 of features, 3 ids: the concat cannot line them up.
    assert!(matches!(gpu.run(&x), Err(RunError::Input(_))));
    let wrong = Tensor::from_values("user_features", vec![2, 31], &[0f32; 62]).unwrap();
    x[0] = wrong;
    match gpu.run(&x) {
        Err(RunError::Input(m)) => assert!(m.contains("user_features"), "{m}"),
        other => panic!("{other:?}"),
    }
    // The model still answers afterwards.
    let ok = inputs(gpu.inputs(), 3, 10, 2);
    assert_eq!(gpu.run(&ok).unwrap()[0].shape(), &[3, 1]);
}
