//! The tract engine's shape plans and threads give the symbolic plan's answers.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use model_zoo::{DEFAULT_SEED, DemoModel};
use outpost_runtime::Engine;
use outpost_runtime::tract::{TractModel, TractOptions};
use outpost_shared::Tensor;

fn tokens(batch: u64, width: u64) -> Vec<Tensor> {
    let ids: Vec<i64> = (0..batch * width)
        .map(|i| (i as i64 * 7919) % 8000)
        .collect();
    vec![Tensor::from_values("token_ids", vec![batch, width], &ids).unwrap()]
}

fn probs(model: &TractModel, inputs: &[Tensor]) -> Vec<f32> {
    model.run(inputs).unwrap()[0].to_values::<f32>().unwrap()
}

fn wait_for_plan(model: &TractModel, shape: &[i64]) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !model.shape_plans().iter().any(|s| s == shape) {
        assert!(Instant::now() < deadline, "no plan for {shape:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Two plans of one model (symbolic and shape-optimised, one thread or two) may pick other
/// kernels and sum in another order: their answers agree to this, not bit for bit.
const PLAN_TOLERANCE: f32 = 1e-5;

fn assert_close(a: &[f32], b: &[f32]) {
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        assert!((x - y).abs() < PLAN_TOLERANCE, "{x} vs {y}");
    }
}

#[test]
fn a_shape_gets_its_own_plan_and_the_same_answers() {
    let bytes = DemoModel::IntentClassifier.bytes(DEFAULT_SEED);
    let model = TractModel::load_with(
        &bytes,
        TractOptions {
            threads: 2,
            shape_plans: 1,
        },
    )
    .unwrap();
    assert_eq!(model.name(), "tract");
    model.warm_up().unwrap();
    // The warm-up's own plan first: one optimisation runs at a time, so a shape met while it
    // runs would stay on the symbolic plan (a race with the machine's speed otherwise).
    wait_for_plan(&model, &[1, 1]);
    let reference = TractModel::load_with(
        &bytes,
        TractOptions {
            threads: 1,
            shape_plans: 0,
        },
    )
    .unwrap();

    // The first call of a shape runs on the symbolic plan and starts its own.
    let a = tokens(3, 5);
    let first = probs(&model, &a);
    assert_close(&first, &probs(&reference, &a));
    wait_for_plan(&model, &[3, 5]);
    assert_close(&probs(&model, &a), &first);

    // One plan kept: a new shape replaces it.
    let b = tokens(2, 9);
    let expected = probs(&reference, &b);
    assert_close(&probs(&model, &b), &expected);
    wait_for_plan(&model, &[2, 9]);
    assert_eq!(model.shape_plans(), vec![vec![2, 9]]);
    assert_close(&probs(&model, &b), &expected);
    assert!(reference.shape_plans().is_empty());
}

#[test]
fn warm_up_prepares_the_batch_of_one_plan() {
    let bytes = DemoModel::VideoRanker.bytes(DEFAULT_SEED);
    let model = TractModel::load(&bytes).unwrap();
    model.warm_up().unwrap();
    // video-ranker's batch is its one symbol: batch 1 gets a plan.
    wait_for_plan(&model, &[1]);
}

/// The signature a file declares is the one tract finds, for every demo model's inputs (the
/// declared form is what a backend-only push records); outputs agree in name, type and rank.
#[test]
fn declared_signatures_match_tracts() {
    for m in DemoModel::ALL {
        let bytes = m.bytes(DEFAULT_SEED);
        let (inputs, outputs) = outpost_runtime::signature::declared_signature(&bytes).unwrap();
        let model = TractModel::load(&bytes).unwrap();
        assert_eq!(inputs, model.inputs, "{}", m.name());
        assert_eq!(outputs.len(), model.outputs.len(), "{}", m.name());
        for (d, t) in outputs.iter().zip(&model.outputs) {
            assert_eq!(
                (&d.name, d.datatype, d.shape.len()),
                (&t.name, t.datatype, t.shape.len())
            );
        }
    }
    let e = outpost_runtime::signature::declared_signature(b"not onnx").unwrap_err();
    assert!(e.contains("not an ONNX model"), "{e}");
}

/// Exports carry FP16 tensors (`--fp16` exports) and shapes computed by the model (`Shape` as an
/// INT64 output): both come back, typed as declared.
#[test]
fn fp16_tensors_and_shape_outputs_come_back() {
    use outpost_shared::DataType;

    let bytes = model_zoo::probe::fp16_doubler(3);
    let model = TractModel::load(&bytes).unwrap();
    assert_eq!(model.inputs[0].datatype, DataType::Fp16);
    assert_eq!(model.outputs[0].datatype, DataType::Fp16);
    assert_eq!(model.outputs[1].datatype, DataType::Int64);
    let values: Vec<half::f16> = [0.5f32, -1.0, 2.25, 3.0, 0.0, -0.125]
        .into_iter()
        .map(half::f16::from_f32)
        .collect();
    let x = Tensor::from_values("x", vec![2, 3], &values).unwrap();
    let out = model.run(std::slice::from_ref(&x)).unwrap();
    let y: Vec<f32> = out[0]
        .to_values::<half::f16>()
        .unwrap()
        .into_iter()
        .map(half::f16::to_f32)
        .collect();
    assert_eq!(y, vec![1.0, -2.0, 4.5, 6.0, 0.0, -0.25]);
    assert_eq!(out[1].to_values::<i64>().unwrap(), vec![2, 3]);
    assert_eq!(out[1].shape(), &[2]);
    // The same from the plan optimised for batch 2 (the first call ran the symbolic one).
    wait_for_plan(&model, &[2]);
    assert_eq!(model.run(&[x]).unwrap(), out);
}
