//! ONNX Runtime as an engine: the same answers as tract on the text encoders and the demo models
//! (fp32 and int8 variants), and clear errors for bad models, inputs and libraries. Needs the
//! library of the `onnxruntime` wheel that `bash tests/support/python/install` (CI runs it) puts
//! in `.oip-servers/mlserver`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use model_zoo::{DEFAULT_SEED, DemoModel, TextModel};
use outpost_runtime::Engine;
use outpost_runtime::RunError;
use outpost_runtime::onnxruntime::{
    LoadError, OnnxRuntime, OnnxRuntimeModel, OnnxRuntimeOptions, library_in_venv,
};
use outpost_runtime::quantize::quantize_int8;
use outpost_runtime::tract::TractModel;
use outpost_shared::{DataType, Tensor, TensorSpec};

fn library() -> PathBuf {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.oip-servers/mlserver");
    library_in_venv(&venv).unwrap_or_else(|| {
        panic!(
            "no onnxruntime library in {}: run `bash tests/support/python/install` (CI does)",
            venv.display()
        )
    })
}

fn runtime() -> Arc<OnnxRuntime> {
    OnnxRuntime::load(&library()).unwrap()
}

/// Inputs for `specs` at `batch` × `sequence`: ids spread over a small vocabulary, a mask with
/// the last positions of odd rows padded, floats from a fixed pattern.
fn inputs(specs: &[TensorSpec], batch: u64, sequence: u64) -> Vec<Tensor> {
    specs
        .iter()
        .map(|s| {
            let shape = outpost_runtime::engine::concrete_shape(s, batch, sequence);
            let n = shape.iter().product::<u64>();
            match s.datatype {
                DataType::Int64 if s.name.contains("mask") => {
                    let width = *shape.last().unwrap();
                    let v: Vec<i64> = (0..n)
                        .map(|i| {
                            let (row, col) = (i / width, i % width);
                            i64::from(row % 2 == 0 || col + 3 < width)
                        })
                        .collect();
                    Tensor::from_values(&s.name, shape, &v).unwrap()
                }
                DataType::Int64 if s.name.contains("type") => {
                    Tensor::from_values(&s.name, shape, &vec![0i64; n as usize]).unwrap()
                }
                DataType::Int64 => {
                    let v: Vec<i64> = (0..n).map(|i| (i as i64 * 7919 + 5) % 200).collect();
                    Tensor::from_values(&s.name, shape, &v).unwrap()
                }
                DataType::Fp32 => {
                    let v: Vec<f32> = (0..n)
                        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
                        .collect();
                    Tensor::from_values(&s.name, shape, &v).unwrap()
                }
                other => panic!("{}: no test input of type {other}", s.name),
            }
        })
        .collect()
}

/// Two engines sum in other orders and ONNX Runtime fuses LayerNorm, GELU and softmax: their
/// answers agree to this, relative to the value where it is above 1.
const ENGINE_TOLERANCE: f32 = 1e-4;

fn assert_same_answers(what: &str, a: &[Tensor], b: &[Tensor]) {
    assert_eq!(a.len(), b.len(), "{what}");
    for (x, y) in a.iter().zip(b) {
        assert_eq!(x.name(), y.name(), "{what}");
        assert_eq!(x.shape(), y.shape(), "{what}: {}", x.name());
        assert_eq!(x.datatype(), y.datatype(), "{what}: {}", x.name());
        if x.datatype() == DataType::Fp32 {
            let (xs, ys) = (x.to_values::<f32>().unwrap(), y.to_values::<f32>().unwrap());
            let worst = xs
                .iter()
                .zip(&ys)
                .map(|(p, q)| (p - q).abs() / q.abs().max(1.0))
                .fold(0f32, f32::max);
            assert!(
                worst < ENGINE_TOLERANCE,
                "{what}: {} differs by {worst}",
                x.name()
            );
        } else {
            assert_eq!(x.data(), y.data(), "{what}: {}", x.name());
        }
    }
}

fn both(bytes: &[u8]) -> (OnnxRuntimeModel, TractModel) {
    let ort = OnnxRuntimeModel::load(&runtime(), bytes, OnnxRuntimeOptions { threads: 2 }).unwrap();
    let tract = TractModel::load(bytes).unwrap();
    (ort, tract)
}

#[test]
fn the_text_encoders_answer_as_on_tract_fp32_and_int8() {
    for model in TextModel::ALL {
        let fp32 = model.bytes(DEFAULT_SEED).unwrap();
        let int8 = quantize_int8(&fp32).unwrap().bytes;
        for (variant, bytes) in [("fp32", &fp32), ("int8", &int8)] {
            let (ort, tract) = both(bytes);
            assert_eq!(ort.name(), "onnxruntime");
            let names = |s: &[TensorSpec]| -> Vec<(String, DataType)> {
                s.iter().map(|t| (t.name.clone(), t.datatype)).collect()
            };
            assert_eq!(names(&ort.inputs), names(&tract.inputs));
            assert_eq!(names(&ort.outputs), names(&tract.outputs));
            ort.warm_up().unwrap();
            for (batch, sequence) in [(1, 8), (4, 32), (2, 128)] {
                let x = inputs(&ort.inputs, batch, sequence);
                assert_same_answers(
                    &format!("{} {variant} b{batch} s{sequence}", model.name()),
                    &ort.run(&x).unwrap(),
                    &tract.run(&x).unwrap(),
                );
            }
        }
    }
}

#[test]
fn the_demo_models_answer_as_on_tract() {
    for model in DemoModel::ALL {
        let bytes = model.bytes(DEFAULT_SEED);
        let (ort, tract) = both(&bytes);
        let x = inputs(&ort.inputs, 3, 1);
        assert_same_answers(model.name(), &ort.run(&x).unwrap(), &tract.run(&x).unwrap());
    }
}

#[test]
fn fp16_tensors_come_back_as_fp16() {
    let bytes = model_zoo::probe::fp16_doubler(3);
    let ort = OnnxRuntimeModel::load(&runtime(), &bytes, OnnxRuntimeOptions::default()).unwrap();
    let x: Vec<half::f16> = [1.5f32, -2.0, 0.25, 3.0, 4.0, 5.0]
        .iter()
        .map(|&v| half::f16::from_f32(v))
        .collect();
    let input = Tensor::from_values(&ort.inputs[0].name, vec![2, 3], &x).unwrap();
    let out = ort.run(std::slice::from_ref(&input)).unwrap();
    let tract = TractModel::load(&bytes).unwrap().run(&[input]).unwrap();
    assert_same_answers("fp16 doubler", &out, &tract);
    assert_eq!(out[0].datatype(), DataType::Fp16);
}

#[test]
fn bad_inputs_are_the_callers_fault_and_named() {
    let bytes = TextModel::ALL[0].bytes(DEFAULT_SEED).unwrap();
    let ort = OnnxRuntimeModel::load(&runtime(), &bytes, OnnxRuntimeOptions::default()).unwrap();
    let mut x = inputs(&ort.inputs, 1, 8);
    let name = x[0].name().to_owned();
    x[0] = Tensor::from_values(&name, vec![1, 8], &[0f32; 8]).unwrap();
    match ort.run(&x) {
        Err(RunError::Input(m)) => assert!(m.contains(&name) && m.contains("INT64"), "{m}"),
        other => panic!("{other:?}"),
    }
    match ort.run(&x[1..]) {
        Err(RunError::Input(m)) => assert!(m.contains("missing"), "{m}"),
        other => panic!("{other:?}"),
    }
    // An id past the vocabulary: ONNX Runtime's Gather refuses it, the caller's fault; the
    // model keeps serving.
    let mut x = inputs(&ort.inputs, 1, 8);
    let ids = ort
        .inputs
        .iter()
        .position(|s| s.name.contains("ids"))
        .unwrap();
    x[ids] = Tensor::from_values(&ort.inputs[ids].name, vec![1, 8], &[1i64 << 40; 8]).unwrap();
    match ort.run(&x) {
        Err(RunError::Input(m)) => assert!(m.contains("out of data bounds"), "{m}"),
        other => panic!("{other:?}"),
    }
    ort.run(&inputs(&ort.inputs, 1, 8)).unwrap();
}

#[test]
fn bad_models_and_libraries_are_named() {
    let rt = runtime();
    assert_eq!(
        OnnxRuntimeModel::load(&rt, b"", OnnxRuntimeOptions::default()).unwrap_err(),
        LoadError::Empty
    );
    let err = OnnxRuntimeModel::load(&rt, b"not a model", OnnxRuntimeOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("ONNX Runtime cannot run the model"),
        "{err}"
    );
    // One library per process; the same one again is the same runtime.
    assert!(Arc::ptr_eq(&rt, &runtime()));
    let other = std::env::temp_dir().join("libonnxruntime-other.so");
    std::fs::write(&other, b"").unwrap();
    let err = OnnxRuntime::load(&other).unwrap_err().to_string();
    assert!(err.contains("one library per process"), "{err}");
    let err = OnnxRuntime::load(Path::new("/nonexistent/libonnxruntime.so"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("/nonexistent/libonnxruntime.so") && err.contains("no such file"),
        "{err}"
    );
}
