//! The engine choice (`engine = "auto" | "gpu" | "cpu"`, `gpu_activations = "f32" | "f16"`):
//! which engine runs each local model, the answers it gives against tract, and the status and
//! metadata that say which and why.

use cloud_coordinator::registry::Quantize;
use edge_agent::Agent;
use model_zoo::{DEFAULT_SEED, DemoModel};
use outpost_runtime::quantize::quantize_int8;
use outpost_runtime::tract::TractModel;
use outpost_test_support::agent::{agent_config, infer, model_status as model, ranker_request};
use outpost_test_support::coordinator::{placed, push, start_coordinator};
use outpost_test_support::eventually::eventually;
use outpost_test_support::http::get_json;
use serde_json::json;

/// The engine choice: `engine = "gpu"` runs local models on any adapter (lavapipe in CI) with the
/// same answers as tract, and a model with an op the GPU lacks falls back to tract naming the op;
/// `auto` stays off CPU-emulated adapters; `cpu` never touches the GPU; `gpu_activations = "f16"`
/// holds activations as f16 where the adapter has `shader-f16` (lavapipe has) and answers within
/// the same tolerance. Status and metadata say which engine runs each model and why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engine_choice_puts_models_on_the_gpu_or_says_why_not() {
    use firmware_config::{EngineChoice, GpuActivations};
    use model_zoo::graph::{Dim, GraphBuilder};
    use prost::Message as _;
    use tract_onnx::pb::tensor_proto::DataType as Onnx;

    let dir = tempfile::tempdir().unwrap();
    let coordinator = start_coordinator(dir.path()).await;
    let ranker = DemoModel::VideoRanker.bytes(DEFAULT_SEED);
    push(&coordinator, "video-ranker", &placed("local"), &ranker).await;
    let mut g = GraphBuilder::new(3);
    let x = g.input("x", Onnx::Float, &[Dim::Symbol("batch"), Dim::Fixed(4)]);
    g.node("Cos", &[&x], Some("y"), vec![]);
    g.output("y", Onnx::Float, &[Dim::Symbol("batch"), Dim::Fixed(4)]);
    let cosine = g.finish("cosine", "no GPU kernel", &[]).encode_to_vec();
    push(
        &coordinator,
        "cosine",
        &placed("local").quantize(Quantize::None),
        &cosine,
    )
    .await;

    let start = |choice: EngineChoice, name: &str| {
        let mut config = agent_config(&coordinator, &dir.path().join(name));
        config.engine = choice;
        Agent::start(config)
    };
    let gpu = start(EngineChoice::Gpu, "gpu").await.unwrap();
    let auto = start(EngineChoice::Auto, "auto").await.unwrap();
    let cpu = start(EngineChoice::Cpu, "cpu").await.unwrap();
    let mut config = agent_config(&coordinator, &dir.path().join("half"));
    config.engine = EngineChoice::Gpu;
    config.gpu_activations = GpuActivations::F16;
    let half = Agent::start(config).await.unwrap();
    for agent in [&gpu, &auto, &cpu, &half] {
        eventually("both models", || {
            agent.active_version("video-ranker") == Some(1)
                && agent.active_version("cosine") == Some(1)
        })
        .await;
    }

    // engine = "gpu": the ranker on the GPU, answering as tract does.
    let on_gpu = model(&gpu, "video-ranker");
    assert_eq!(on_gpu.engine.as_deref(), Some("wgpu"), "{on_gpu:?}");
    assert!(
        on_gpu.adapter.is_some() && on_gpu.gpu_fallback.is_none(),
        "{on_gpu:?}"
    );
    let (body, tensors) = ranker_request(5);
    let (status, reply) = infer(&gpu, "video-ranker", &body).await;
    assert_eq!(status, 200, "{reply}");
    let expected = TractModel::load(&quantize_int8(&ranker).unwrap().bytes)
        .unwrap()
        .run(&tensors)
        .unwrap()[0]
        .to_values::<f32>()
        .unwrap();
    let scores: Vec<f32> = reply["outputs"][0]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    assert_eq!(scores.len(), 5);
    for (s, e) in scores.iter().zip(&expected) {
        assert!((s - e).abs() < 5e-2, "gpu {scores:?} vs tract {expected:?}");
    }
    // f16 activations: the status's adapter says so, and the answers stay within tolerance.
    let on_half = model(&half, "video-ranker");
    assert_eq!(on_half.engine.as_deref(), Some("wgpu"), "{on_half:?}");
    assert!(
        on_half
            .adapter
            .as_deref()
            .unwrap()
            .contains("f16 activations"),
        "{on_half:?}"
    );
    assert!(
        !on_gpu.adapter.as_deref().unwrap().contains("f16"),
        "{on_gpu:?}"
    );
    let (status, reply) = infer(&half, "video-ranker", &body).await;
    assert_eq!(status, 200, "{reply}");
    let half_scores = reply["outputs"][0]["data"].as_array().unwrap();
    assert_eq!(half_scores.len(), 5);
    for (s, e) in half_scores.iter().zip(&expected) {
        let s = s.as_f64().unwrap() as f32;
        assert!(
            (s - e).abs() < 5e-2,
            "f16 {half_scores:?} vs tract {expected:?}"
        );
    }
    let (_, meta) = get_json(gpu.api_addr, "/v2/models/video-ranker").await;
    assert_eq!(meta["parameters"]["engine"], "wgpu", "{meta}");
    assert!(meta["parameters"]["adapter"].is_string(), "{meta}");
    // An id outside the table is the caller's error, named.
    let mut bad = body.clone();
    bad["inputs"][1]["data"][0] = json!(10_000);
    let (status, reply) = infer(&gpu, "video-ranker", &bad).await;
    assert_eq!(status, 400, "{reply}");
    assert!(
        reply["error"].as_str().unwrap().contains("id 10000"),
        "{reply}"
    );
    // No kernel for Cos: tract runs it, and the status names the op.
    let fallback = model(&gpu, "cosine");
    assert_eq!(fallback.engine.as_deref(), Some("tract"));
    assert!(
        fallback.gpu_fallback.as_deref().unwrap().contains("op Cos"),
        "{fallback:?}"
    );

    // engine = "auto": a CPU-emulated adapter is not used (a hardware GPU would be).
    let auto_model = model(&auto, "video-ranker");
    match auto_model.engine.as_deref() {
        Some("tract") => {
            let why = auto_model.gpu_fallback.unwrap();
            assert!(
                why.contains("emulated on the CPU") || why.contains("no "),
                "{why}"
            );
        }
        Some("wgpu") => assert!(auto_model.adapter.is_some()),
        other => panic!("{other:?}"),
    }
    // engine = "cpu": tract, and says so.
    let cpu_model = model(&cpu, "video-ranker");
    assert_eq!(cpu_model.engine.as_deref(), Some("tract"));
    assert!(cpu_model.gpu_fallback.unwrap().contains("engine = \"cpu\""));

    for agent in [gpu, auto, cpu, half] {
        agent.shutdown().await;
    }
    coordinator.shutdown().await;
}

/// A model with FP16 inputs and outputs (what `--fp16` exports give) and a shape output, pushed
/// unquantised: the agent serves it on tract and answers FP16 and INT64 through the local API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_fp16_model_with_a_shape_output_answers_through_the_local_api() {
    use firmware_config::EngineChoice;

    let dir = tempfile::tempdir().unwrap();
    let coordinator = start_coordinator(dir.path()).await;
    let model = model_zoo::probe::fp16_doubler(2);
    push(
        &coordinator,
        "half",
        &placed("local").quantize(Quantize::None),
        &model,
    )
    .await;
    let mut config = agent_config(&coordinator, &dir.path().join("agent"));
    config.engine = EngineChoice::Cpu;
    let agent = Agent::start(config).await.unwrap();
    eventually("the model", || agent.active_version("half") == Some(1)).await;

    let body = json!({"inputs": [
        {"name": "x", "datatype": "FP16", "shape": [3, 2], "data": [0.5, -1.0, 2.25, 3.0, 0.0, -0.125]}
    ]});
    let (status, reply) = infer(&agent, "half", &body).await;
    assert_eq!(status, 200, "{reply}");
    let outputs = reply["outputs"].as_array().unwrap();
    let y = outputs.iter().find(|o| o["name"] == "y").unwrap();
    assert_eq!(y["datatype"], "FP16", "{reply}");
    assert_eq!(
        y["data"],
        json!([1.0, -2.0, 4.5, 6.0, 0.0, -0.25]),
        "{reply}"
    );
    let shape = outputs.iter().find(|o| o["name"] == "shape").unwrap();
    assert_eq!(shape["datatype"], "INT64", "{reply}");
    assert_eq!(shape["data"], json!([3, 2]), "{reply}");
    agent.shutdown().await;
    coordinator.shutdown().await;
}

/// `onnxruntime_library`: the models the CPU runs go to ONNX Runtime (here the `onnxruntime`
/// wheel's library), text in through the tokenizer as on tract, with tract's answers; a model
/// ONNX Runtime refuses, or a library that cannot load, leaves the model on tract, and the status
/// says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn onnx_runtime_runs_the_cpu_models_with_the_answers_of_tract() {
    use firmware_config::EngineChoice;
    use model_zoo::graph::{Dim, GraphBuilder};
    use model_zoo::{TextModel, vocab};
    use outpost_test_support::oip_servers::onnxruntime_library;
    use prost::Message as _;
    use tract_onnx::pb::tensor_proto::DataType as Onnx;

    let dir = tempfile::tempdir().unwrap();
    let coordinator = start_coordinator(dir.path()).await;
    let ranker = DemoModel::VideoRanker.bytes(DEFAULT_SEED);
    push(&coordinator, "video-ranker", &placed("local"), &ranker).await;
    let intents = TextModel::IntentClassifierText.bytes(DEFAULT_SEED).unwrap();
    let with_tokenizer = placed("local").tokenizer(vocab::tokenizer_json().into_bytes());
    push(
        &coordinator,
        "intent-classifier-text",
        &with_tokenizer,
        &intents,
    )
    .await;
    // Declares an opset from the future: tract runs the Relu, ONNX Runtime 1.32 refuses the file.
    let mut g = GraphBuilder::new(5).with_opset(40);
    let x = g.input("x", Onnx::Float, &[Dim::Symbol("batch"), Dim::Fixed(4)]);
    g.node("Relu", &[&x], Some("y"), vec![]);
    g.output("y", Onnx::Float, &[Dim::Symbol("batch"), Dim::Fixed(4)]);
    let future = g.finish("future", "opset 40", &[]).encode_to_vec();
    push(
        &coordinator,
        "future",
        &placed("local").quantize(Quantize::None),
        &future,
    )
    .await;

    let start = |name: &str, library: Option<std::path::PathBuf>| {
        let mut config = agent_config(&coordinator, &dir.path().join(name));
        config.engine = EngineChoice::Cpu;
        config.onnxruntime_library = library;
        Agent::start(config)
    };
    let ort = start("ort", Some(onnxruntime_library())).await.unwrap();
    let tract = start("tract", None).await.unwrap();
    let missing = dir.path().join("nowhere/libonnxruntime.so");
    let broken = start("broken", Some(missing.clone())).await.unwrap();
    for agent in [&ort, &tract, &broken] {
        eventually("the three models", || {
            agent.active_version("video-ranker") == Some(1)
                && agent.active_version("intent-classifier-text") == Some(1)
                && agent.active_version("future") == Some(1)
        })
        .await;
    }
    let refused = model(&ort, "future");
    assert_eq!(refused.engine.as_deref(), Some("tract"), "{refused:?}");
    let why = refused.cpu_fallback.unwrap();
    assert!(why.contains("ONNX Runtime cannot run the model"), "{why}");
    let (_, meta) = get_json(ort.api_addr, "/v2/models/future").await;
    assert_eq!(meta["parameters"]["engine"], "tract", "{meta}");
    assert!(meta["parameters"]["cpu_fallback"].is_string(), "{meta}");
    let relu = json!({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [-1.0, 2.0, -3.0, 4.0]}]});
    let (status, reply) = infer(&ort, "future", &relu).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["outputs"][0]["data"], json!([0.0, 2.0, 0.0, 4.0]));
    for name in ["video-ranker", "intent-classifier-text"] {
        let on_ort = model(&ort, name);
        assert_eq!(on_ort.engine.as_deref(), Some("onnxruntime"), "{on_ort:?}");
        assert!(on_ort.cpu_fallback.is_none(), "{on_ort:?}");
        let on_tract = model(&tract, name);
        assert_eq!(on_tract.engine.as_deref(), Some("tract"), "{on_tract:?}");
        assert!(on_tract.cpu_fallback.is_none(), "{on_tract:?}");
        // The library is not there: tract serves, and the status names the file and why.
        let fallback = model(&broken, name);
        assert_eq!(fallback.engine.as_deref(), Some("tract"), "{fallback:?}");
        let why = fallback.cpu_fallback.unwrap();
        assert!(
            why.contains(&missing.display().to_string()) && why.contains("no such file"),
            "{why}"
        );
    }
    let (_, meta) = get_json(ort.api_addr, "/v2/models/intent-classifier-text").await;
    assert_eq!(meta["parameters"]["engine"], "onnxruntime", "{meta}");

    // Text in (tokenized by the agent, padded to a bucket), the same answers as tract's.
    let texts = json!({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [3],
        "data": ["refund my order", "i cannot log in to my account", "play calm piano"]}]});
    let (body, _) = ranker_request(4);
    for (name, request) in [("intent-classifier-text", &texts), ("video-ranker", &body)] {
        let (status, on_ort) = infer(&ort, name, request).await;
        assert_eq!(status, 200, "{on_ort}");
        let (status, on_tract) = infer(&tract, name, request).await;
        assert_eq!(status, 200, "{on_tract}");
        let values = |reply: &serde_json::Value| -> Vec<f64> {
            serde_json::from_value(reply["outputs"][0]["data"].clone()).unwrap()
        };
        let (a, b) = (values(&on_ort), values(&on_tract));
        assert_eq!(a.len(), b.len(), "{name}");
        assert!(!a.is_empty(), "{name}");
        for (x, y) in a.iter().zip(&b) {
            assert!(
                (x - y).abs() < 1e-4,
                "{name}: onnxruntime {a:?} vs tract {b:?}"
            );
        }
    }
    // An id past the vocabulary is the caller's error on ONNX Runtime too.
    let bad = json!({"inputs": [
        {"name": "input_ids", "datatype": "INT64", "shape": [1, 2], "data": [101, 1_000_000]},
        {"name": "attention_mask", "datatype": "INT64", "shape": [1, 2], "data": [1, 1]},
        {"name": "token_type_ids", "datatype": "INT64", "shape": [1, 2], "data": [0, 0]},
    ]});
    let (status, reply) = infer(&ort, "intent-classifier-text", &bad).await;
    assert_eq!(status, 400, "{reply}");

    for agent in [ort, tract, broken] {
        agent.shutdown().await;
    }
    coordinator.shutdown().await;
}
