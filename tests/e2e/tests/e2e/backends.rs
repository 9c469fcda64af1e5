//! The coordinator as a gateway to real Open Inference Protocol servers (MLServer and KServe's
//! Python model server, started here on loopback, serving the demo ranker through onnxruntime):
//! agent → QUIC → coordinator → backend answers equal the backend's own, errors keep their kind,
//! a replica killed under load fails only the calls it was running, and the `[gateway]` rate
//! limits answer `Busy`.

use cloud_coordinator::{AdminClient, Coordinator, CoordinatorHandle};
use edge_agent::{Agent, AgentHandle};
use firmware_config::{BackendEncoding, BackendSection, GatewaySection};
use model_zoo::{DEFAULT_SEED, DemoModel};
use outpost_test_support::agent::{agent_config, first_output, infer, ranker_request};
use outpost_test_support::coordinator::{coordinator_config, placed, push};
use outpost_test_support::eventually::eventually;
use outpost_test_support::oip_servers::{OipServer, OipServerKind};
use serde_json::{Value, json};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn backend(name: &str, replicas: &[&OipServer]) -> BackendSection {
    BackendSection {
        name: name.into(),
        replicas: replicas.iter().map(|s| s.url()).collect(),
        models: Vec::new(),
        max_concurrency: 8,
        timeout_ms: 10_000,
        connect_timeout_ms: 500,
        health_interval_ms: 300,
        circuit_failures: 3,
        circuit_open_ms: 2_000,
        encoding: BackendEncoding::Auto,
        max_response_mb: 8,
    }
}

async fn agent_serving(
    coordinator: &CoordinatorHandle,
    dir: &std::path::Path,
    models: &[&str],
) -> AgentHandle {
    let agent = Agent::start(agent_config(coordinator, dir)).await.unwrap();
    eventually("the agent to know the models", || {
        models.iter().all(|m| agent.active_version(m) == Some(1))
    })
    .await;
    agent
}

/// A model with the ranker's signature whose one op tract does not know (as a model only a
/// serving engine runs may have): a push with `--backend` takes its declared signature.
fn ranker_only_a_backend_runs() -> Vec<u8> {
    use model_zoo::graph::{Dim, GraphBuilder};
    use prost::Message as _;
    use tract_onnx::pb::tensor_proto::DataType as Onnx;
    let mut g = GraphBuilder::new(3);
    let features = g.input(
        "user_features",
        Onnx::Float,
        &[Dim::Symbol("batch"), Dim::Fixed(32)],
    );
    let ids = g.input("item_ids", Onnx::Int64, &[Dim::Symbol("batch")]);
    g.node(
        "OutpostMysteryOp",
        &[&features, &ids],
        Some("score"),
        vec![],
    );
    g.output("score", Onnx::Float, &[Dim::Symbol("batch"), Dim::Fixed(1)]);
    g.finish("mystery", "an op tract lacks", &[])
        .encode_to_vec()
}

/// A ranker request with an item id past the embedding table: valid for the signature, refused
/// by the model when it runs.
fn out_of_table_request() -> Value {
    let (mut body, _) = ranker_request(1);
    body["inputs"][1]["data"] = json!([10_000_000]);
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offloaded_calls_run_on_mlserver_and_kserve_with_their_errors_kept() {
    let dir = tempfile::tempdir().unwrap();
    let ranker = DemoModel::VideoRanker.bytes(DEFAULT_SEED);
    let onnx = dir.path().join("video-ranker.onnx");
    std::fs::write(&onnx, &ranker).unwrap();
    let mls = OipServer::start(
        OipServerKind::MlServer,
        "ranker-mls",
        &onnx,
        &dir.path().join("mls"),
    );
    let mut ks = OipServer::start(
        OipServerKind::KServe,
        "ranker-ks",
        &onnx,
        &dir.path().join("ks"),
    );

    let mut config = coordinator_config(dir.path());
    // MLServer lists no extension: JSON. KServe takes binary tensors without listing them.
    config.backends.push(backend("mlserver", &[&mls]));
    let mut kserve = backend("kserve", &[&ks]);
    kserve.models = vec!["ranker-k*".into()];
    kserve.encoding = BackendEncoding::Binary;
    config.backends.push(kserve);
    let coordinator = Coordinator::start(config).await.unwrap();

    // A push names a configured backend, which must serve the model.
    let admin = AdminClient::of(&coordinator);
    let e = admin
        .push(
            "ranker-mls",
            ranker.clone(),
            &placed("cloud").backend("triton"),
        )
        .await
        .unwrap_err();
    assert!(e.to_string().contains("no backend named \"triton\""), "{e}");
    assert!(e.to_string().contains("mlserver"), "{e}");
    let e = admin
        .push(
            "not-there",
            ranker.clone(),
            &placed("cloud").backend("mlserver"),
        )
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("does not serve model \"not-there\""),
        "{e}"
    );
    let e = admin
        .push(
            "ranker-mls",
            ranker.clone(),
            &placed("local").backend("mlserver"),
        )
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("placement=local offloads none"),
        "{e}"
    );

    // The coordinator never runs a backend's model: a file tract cannot load is taken with
    // --backend (its declared signature registered), and refused without.
    let mystery = ranker_only_a_backend_runs();
    let e = admin
        .push("ranker-mls", mystery.clone(), &placed("cloud"))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("OutpostMysteryOp"), "{e}");
    push(
        &coordinator,
        "ranker-mls",
        &placed("cloud").backend("mlserver"),
        &mystery,
    )
    .await;
    // Routed by the backend's `models` pattern, no --backend.
    push(&coordinator, "ranker-ks", &placed("cloud"), &ranker).await;
    let agent = agent_serving(&coordinator, dir.path(), &["ranker-mls", "ranker-ks"]).await;

    for (server, model) in [(&mls, "ranker-mls"), (&ks, "ranker-ks")] {
        for batch in [1, 7] {
            let (body, _) = ranker_request(batch);
            let (status, through) = infer(&agent, model, &body).await;
            assert_eq!(status, 200, "{model}: {through}");
            let (status, direct) = server.infer(&body).await;
            assert_eq!(status, 200, "{model} direct: {direct}");
            assert_eq!(
                first_output(&through),
                first_output(&direct),
                "{model} batch {batch}"
            );
            assert_eq!(first_output(&through).len(), batch);
            assert_eq!(through["model_version"], "1");
        }
        // The backend's 400 is the agent's 400, with the backend's reason.
        let (status, reply) = infer(&agent, model, &out_of_table_request()).await;
        assert_eq!(status, 400, "{model}: {reply}");
        assert!(
            reply["error"]
                .as_str()
                .unwrap()
                .contains("refused the inputs"),
            "{reply}"
        );
    }

    // The counters say where calls went.
    let metrics = admin.metrics().await.unwrap();
    assert!(
        metrics.contains("outpost_offloaded_calls_total{model=\"ranker-mls\",result=\"ok\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("outpost_offloaded_calls_total{model=\"ranker-ks\",result=\"error\"} 1"),
        "{metrics}"
    );

    let models = admin.models().await.unwrap();
    let mls_summary = models.iter().find(|m| m.name == "ranker-mls").unwrap();
    assert_eq!(mls_summary.backend.as_deref(), Some("mlserver"));
    assert_eq!(
        (mls_summary.offloaded.ok, mls_summary.offloaded.error),
        (2, 1)
    );
    assert_eq!(
        mls_summary.offloaded.last_minute, 3,
        "the offload rate counts every call of the last minute"
    );
    let ks_summary = models.iter().find(|m| m.name == "ranker-ks").unwrap();
    assert_eq!(
        ks_summary.backend, None,
        "routed by the config's pattern, not the push"
    );

    // The backend belongs to the version: a push without --backend moves the next version to
    // the worker pool, a rollback brings the backend back with the version.
    push(&coordinator, "ranker-mls", &placed("cloud"), &ranker).await;
    let backend_of = |models: &[cloud_coordinator::admin::ModelSummary]| {
        models
            .iter()
            .find(|m| m.name == "ranker-mls")
            .and_then(|m| m.backend.clone())
    };
    assert_eq!(backend_of(&admin.models().await.unwrap()), None);
    admin.rollback("ranker-mls", 1).await.unwrap();
    assert_eq!(
        backend_of(&admin.models().await.unwrap()).as_deref(),
        Some("mlserver")
    );

    // A backend down is a 503 that says so, at once, not a hang.
    ks.kill();
    let started = Instant::now();
    let (status, reply) = infer(&agent, "ranker-ks", &ranker_request(1).0).await;
    assert_eq!(status, 503, "{reply}");
    let error = reply["error"].as_str().unwrap();
    assert!(error.contains("backend \"kserve\""), "{reply}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    // The other backend still serves.
    let (status, reply) = infer(&agent, "ranker-mls", &ranker_request(1).0).await;
    assert_eq!(status, 200, "{reply}");

    agent.shutdown().await;
    coordinator.shutdown().await;
}

/// Two MLServer replicas under load from 4 concurrent callers; one is killed mid-way. Every
/// call ends (none hangs), only calls that replica was running fail, and the rest of the load
/// is served by the other replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_under_load_fails_only_the_calls_it_was_running() {
    let dir = tempfile::tempdir().unwrap();
    let ranker = DemoModel::VideoRanker.bytes(DEFAULT_SEED);
    let onnx = dir.path().join("video-ranker.onnx");
    std::fs::write(&onnx, &ranker).unwrap();
    let a = OipServer::start(
        OipServerKind::MlServer,
        "ranker",
        &onnx,
        &dir.path().join("a"),
    );
    let b = OipServer::start(
        OipServerKind::MlServer,
        "ranker",
        &onnx,
        &dir.path().join("b"),
    );
    let mut config = coordinator_config(dir.path());
    let mut section = backend("mlserver", &[&a, &b]);
    section.models = vec!["ranker".into()];
    config.backends.push(section);
    let coordinator = Coordinator::start(config).await.unwrap();
    push(&coordinator, "ranker", &placed("cloud"), &ranker).await;
    let agent = Arc::new(agent_serving(&coordinator, dir.path(), &["ranker"]).await);

    const CALLERS: usize = 4;
    const CALLS: usize = 60;
    let a = Arc::new(Mutex::new(Some(a)));
    let killed_at: Arc<Mutex<Option<Instant>>> = Arc::default();
    let mut callers = tokio::task::JoinSet::new();
    for caller in 0..CALLERS {
        let (agent, a, killed_at) = (agent.clone(), a.clone(), killed_at.clone());
        callers.spawn(async move {
            let mut failed = Vec::new();
            for call in 0..CALLS {
                if caller == 0 && call == CALLS / 3 {
                    // Kill replica a (SIGKILL) while the others are mid-call.
                    if let Some(mut server) = a.lock().unwrap().take() {
                        server.kill();
                        *killed_at.lock().unwrap() = Some(Instant::now());
                    }
                }
                let (body, _) = ranker_request(1 + call % 4);
                let started = Instant::now();
                let bounded =
                    tokio::time::timeout(Duration::from_secs(20), infer(&agent, "ranker", &body))
                        .await;
                let (status, reply) = bounded.expect("a call hung");
                if status != 200 {
                    failed.push((started, status, reply));
                }
            }
            failed
        });
    }
    let mut failed = Vec::new();
    while let Some(done) = callers.join_next().await {
        failed.extend(done.unwrap());
    }
    // At most the calls running on the killed replica: one per caller.
    assert!(failed.len() <= CALLERS, "{failed:#?}");
    let killed_at = killed_at.lock().unwrap().unwrap();
    for (started, status, reply) in &failed {
        assert_eq!(*status, 503, "{reply}");
        assert!(
            reply["error"]
                .as_str()
                .unwrap()
                .contains("backend \"mlserver\""),
            "{reply}"
        );
        // Only calls that were running when it died (or sent within a moment of it, on a
        // connection the client had not yet seen close): from then on it is out.
        assert!(
            *started < killed_at + Duration::from_millis(500),
            "a call {:?} after the kill failed: {reply}",
            started.saturating_duration_since(killed_at)
        );
    }
    let metrics = AdminClient::of(&coordinator).metrics().await.unwrap();
    let ok = format!(
        "outpost_offloaded_calls_total{{model=\"ranker\",result=\"ok\"}} {}",
        CALLERS * CALLS - failed.len()
    );
    assert!(metrics.contains(&ok), "{ok} not in {metrics}");

    Arc::into_inner(agent).unwrap().shutdown().await;
    coordinator.shutdown().await;
}

/// `[gateway]` rate limits: a device past its bucket is answered `Busy` (the agent's 503 says
/// so, with the wait), counted per model; the worker pool serves the model here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_answer_busy_past_the_bucket() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = coordinator_config(dir.path());
    config.gateway = GatewaySection {
        device_calls_per_s: Some(0.5),
        device_burst: Some(3),
        ..GatewaySection::default()
    };
    let coordinator = Coordinator::start(config).await.unwrap();
    let ranker = DemoModel::VideoRanker.bytes(DEFAULT_SEED);
    push(&coordinator, "video-ranker", &placed("cloud"), &ranker).await;
    let agent = agent_serving(&coordinator, dir.path(), &["video-ranker"]).await;
    let (body, _) = ranker_request(2);
    for call in 0..3 {
        let (status, reply) = infer(&agent, "video-ranker", &body).await;
        assert_eq!(status, 200, "call {call} is within the burst: {reply}");
    }
    let (status, reply) = infer(&agent, "video-ranker", &body).await;
    assert_eq!(status, 503, "{reply}");
    assert!(reply["error"].as_str().unwrap().contains("busy"), "{reply}");
    let metrics = AdminClient::of(&coordinator).metrics().await.unwrap();
    assert!(
        metrics.contains(
            "outpost_offloaded_calls_total{model=\"video-ranker\",result=\"rate_limited\"} 1"
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains("outpost_offloaded_calls_total{model=\"video-ranker\",result=\"ok\"} 3"),
        "{metrics}"
    );
    agent.shutdown().await;
    coordinator.shutdown().await;
}
