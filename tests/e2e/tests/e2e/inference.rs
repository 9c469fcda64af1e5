//! Inference through the agent's Open Inference Protocol API, with a coordinator and an agent
//! in one process over real QUIC, MQTT (the embedded broker), sled and tract: local, cloud and
//! cascade answers, the binary tensor extension, refused requests, metadata; and around them the
//! model's life on the device (upgrade, rollback, offline serving, restart from cache).

use cloud_coordinator::AdminClient;
use edge_agent::Agent;
use model_zoo::{DEFAULT_SEED, DemoModel};
use outpost_runtime::http::Request;
use outpost_runtime::quantize::quantize_int8;
use outpost_runtime::tract::TractModel;
use outpost_shared::Tensor;
use outpost_test_support::agent::{
    agent_config, first_output, infer, ranker_request, restart_config,
};
use outpost_test_support::coordinator::{placed, push, start_coordinator};
use outpost_test_support::eventually::eventually;
use outpost_test_support::floats::{assert_plans_agree, f32_values};
use outpost_test_support::http::{get_json, raw_exchange, request_json, send};
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_sync_serve_upgrade_and_keep_serving_offline() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = start_coordinator(dir.path()).await;
    let ranker_v1 = DemoModel::VideoRanker.bytes(DEFAULT_SEED);
    push(&coordinator, "video-ranker", &placed("local"), &ranker_v1).await;
    push(
        &coordinator,
        "music-two-tower",
        &placed("cloud"),
        &DemoModel::MusicTwoTower.bytes(DEFAULT_SEED),
    )
    .await;
    push(
        &coordinator,
        "intent-classifier",
        &placed("cascade:intent_probs:0.6"),
        &DemoModel::IntentClassifier.bytes(DEFAULT_SEED),
    )
    .await;

    let agent = Agent::start(agent_config(&coordinator, dir.path()))
        .await
        .unwrap();
    eventually("the agent to serve all three models", || {
        ["video-ranker", "music-two-tower", "intent-classifier"]
            .iter()
            .all(|m| agent.active_version(m) == Some(1))
    })
    .await;

    // Local inference equals tract in-process on the bytes the device holds: the int8 variant
    // (quantisation is deterministic, so the test can make the same file).
    let (body, tensors) = ranker_request(5);
    let (status, reply) = infer(&agent, "video-ranker", &body).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["id"], "r1");
    assert_eq!(reply["model_version"], "1");
    // The agent's plan and this one may round differently (see `floats`): within tolerance.
    let int8 = quantize_int8(&ranker_v1).unwrap().bytes;
    let expected = TractModel::load(&int8).unwrap().run(&tensors).unwrap()[0]
        .to_values::<f32>()
        .unwrap();
    assert_plans_agree("the agent's scores", &first_output(&reply), &expected);

    // The binary tensor data extension, laid out as Triton's HTTP client sends it: a JSON
    // header, then the raw inputs; outputs come back raw after a JSON header too.
    let (_, v2) = get_json(agent.api_addr, "/v2").await;
    assert_eq!(
        v2["extensions"],
        json!(["binary_tensor_data", "classification"])
    );
    let header = json!({
        "inputs": tensors.iter().map(|t| json!({
            "name": t.name(), "shape": t.shape(), "datatype": t.datatype().as_str(),
            "parameters": { "binary_data_size": t.data().len() }
        })).collect::<Vec<_>>(),
        "parameters": { "binary_data_output": true }
    })
    .to_string();
    let mut binary_body = header.clone().into_bytes();
    for t in &tensors {
        binary_body.extend_from_slice(t.data());
    }
    let binary = |body: &[u8]| {
        Request::post("/v2/models/video-ranker/infer", body.to_vec())
            .header("Inference-Header-Content-Length", header.len().to_string())
    };
    let answer = send(agent.api_addr, binary(&binary_body)).await;
    let reply = &answer.body;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let json_len: usize = answer
        .header("inference-header-content-length")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let parsed: Value = serde_json::from_slice(&reply[..json_len]).unwrap();
    assert_eq!(parsed["outputs"][0]["parameters"]["binary_data_size"], 20);
    assert_plans_agree(
        "the same scores, raw",
        &f32_values(&reply[json_len..]),
        &expected,
    );
    // A binary size that does not match the bytes sent is a 400 that says so.
    let answer = send(
        agent.api_addr,
        binary(&binary_body[..binary_body.len() - 4]),
    )
    .await;
    assert_eq!(answer.status, 400);
    assert!(
        answer.text().contains("binary_data_size"),
        "{}",
        answer.text()
    );

    // A cloud-placement model is answered over QUIC.
    let user = Tensor::from_values("user_features", vec![2, 24], &[0.5f32; 48]).unwrap();
    let tracks = Tensor::from_values("track_ids", vec![2], &[1i64, 2]).unwrap();
    let music = json!({ "inputs": [user.to_json().unwrap(), tracks.to_json().unwrap()] });
    let (status, reply) = infer(&agent, "music-two-tower", &music).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["parameters"]["rows_cloud"], 2);

    // The cascade sends the unsure rows to the cloud and says how many.
    let tokens: Vec<i64> = (0..64 * 8).map(|i| (i * 7919) % 8000).collect();
    let intents = json!({ "inputs": [Tensor::from_values("token_ids", vec![64, 8], &tokens).unwrap().to_json().unwrap()] });
    let (status, reply) = infer(&agent, "intent-classifier", &intents).await;
    assert_eq!(status, 200, "{reply}");
    let (local, cloud) = (
        reply["parameters"]["rows_local"].as_u64().unwrap(),
        reply["parameters"]["rows_cloud"].as_u64().unwrap(),
    );
    assert_eq!(local + cloud, 64);
    assert!(
        cloud > 0 && local > 0,
        "local {local}, cloud {cloud}: the demo should have both"
    );

    // Bad requests get the right 4xx with reasons.
    let (mut wrong_shape, _) = ranker_request(2);
    wrong_shape["inputs"][0]["shape"] = json!([4, 16]);
    let (status, reply) = infer(&agent, "video-ranker", &wrong_shape).await;
    assert_eq!(status, 400, "{reply}");
    assert!(
        reply["error"].as_str().unwrap().contains("user_features"),
        "{reply}"
    );
    let (mut wrong_type, _) = ranker_request(2);
    wrong_type["inputs"][1]["datatype"] = json!("FP32");
    let (status, reply) = infer(&agent, "video-ranker", &wrong_type).await;
    assert_eq!(status, 400, "{reply}");
    assert!(
        reply["error"].as_str().unwrap().contains("item_ids"),
        "{reply}"
    );
    let (status, _) = infer(&agent, "no-such-model", &body).await;
    assert_eq!(status, 404);
    let (status, reply) = request_json(
        agent.api_addr,
        Request::post("/v2/models/video-ranker/infer", "{not json"),
    )
    .await;
    assert_eq!(status, 400, "{reply}");
    let (status, _) = request_json(
        agent.api_addr,
        Request::post("/v2/models/video-ranker/versions/9/infer", body.to_string()),
    )
    .await;
    assert_eq!(status, 404);
    // Oversized, written raw: the agent answers before reading it all and closes.
    let big = edge_agent::MAX_BODY + 1;
    let mut oversized = format!(
        "POST /v2/models/video-ranker/infer HTTP/1.1\r\nHost: {}\r\nContent-Length: {big}\r\nConnection: close\r\n\r\n",
        agent.api_addr
    )
    .into_bytes();
    oversized.resize(oversized.len() + big, b' ');
    let (status, _, _) = raw_exchange(agent.api_addr, &oversized).await;
    assert_eq!(status, 413);

    // Metadata in the protocol's shape.
    let (status, meta) = get_json(agent.api_addr, "/v2/models/video-ranker").await;
    assert_eq!(status, 200);
    assert_eq!(
        meta["inputs"][1],
        json!({ "name": "item_ids", "datatype": "INT64", "shape": [-1] })
    );

    // Push v2: the agent switches and keeps v1 as previous.
    push(
        &coordinator,
        "video-ranker",
        &placed("local"),
        &DemoModel::VideoRanker.bytes(7),
    )
    .await;
    eventually("version 2", || {
        agent.active_version("video-ranker") == Some(2)
    })
    .await;
    let status = agent.status();
    let ranker = status
        .models
        .iter()
        .find(|m| m.model == "video-ranker")
        .unwrap();
    assert_eq!((ranker.active, ranker.previous), (Some(2), Some(1)));
    let (status_code, _) = request_json(
        agent.api_addr,
        Request::post("/v2/models/video-ranker/versions/1/infer", body.to_string()),
    )
    .await;
    assert_eq!(
        status_code, 200,
        "the previous version still answers by version"
    );

    // Rollback: a new version (3) with version 1's content; the agent follows and answers as v1.
    let reply = AdminClient::of(&coordinator)
        .rollback("video-ranker", 1)
        .await
        .unwrap();
    assert!(!reply.dry_run, "published: {reply:?}");
    eventually("version 3", || {
        agent.active_version("video-ranker") == Some(3)
    })
    .await;
    let (_, reply) = infer(&agent, "video-ranker", &ranker_request(5).0).await;
    assert_plans_agree("version 3's scores", &first_output(&reply), &expected);

    // Coordinator gone: local models keep serving, the cloud-only one gets 503 with the reason.
    coordinator.shutdown().await;
    let (status, _) = infer(&agent, "video-ranker", &body).await;
    assert_eq!(status, 200);
    let (status, reply) = infer(&agent, "music-two-tower", &music).await;
    assert_eq!(status, 503, "{reply}");
    assert!(
        reply["error"]
            .as_str()
            .unwrap()
            .contains("no coordinator is reachable"),
        "{reply}"
    );

    // A restarted agent serves from its cache before any network.
    let config = restart_config(&agent, dir.path());
    agent.shutdown().await;
    let again = Agent::start(config).await.unwrap();
    assert_eq!(again.active_version("video-ranker"), Some(3));
    let (status, _) = infer(&again, "video-ranker", &body).await;
    assert_eq!(status, 200);
    again.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_past_max_batch_or_the_memory_budget_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = start_coordinator(dir.path()).await;
    push(
        &coordinator,
        "video-ranker",
        &placed("local").max_batch(4),
        &DemoModel::VideoRanker.bytes(DEFAULT_SEED),
    )
    .await;
    let mut config = agent_config(&coordinator, dir.path());
    // 1 MiB over 2 × 2 running calls, 4 bytes an element: 65 536 elements per request.
    config.profile.memory_budget_mb = Some(1);
    config.profile.inference_concurrency = Some(2);
    assert_eq!(config.profile().max_request_elements(), 65_536);
    let agent = Agent::start(config).await.unwrap();
    eventually("the agent to serve video-ranker", || {
        agent.active_version("video-ranker") == Some(1)
    })
    .await;
    let (body, _) = ranker_request(5);
    let (status, reply) = infer(&agent, "video-ranker", &body).await;
    assert_eq!(status, 400, "{reply}");
    let why = reply["error"].as_str().unwrap();
    assert!(
        why.contains("5 rows") && why.contains("max_batch of 4"),
        "{why}"
    );
    let (body, _) = ranker_request(4);
    let (status, reply) = infer(&agent, "video-ranker", &body).await;
    assert_eq!(status, 200, "{reply}");
    // Two rows, but 80 000 elements claimed: refused on the header, before the (absent)
    // elements are read or anything is allocated for them.
    let huge = json!({ "inputs": [
        { "name": "user_features", "shape": [2, 40000], "datatype": "FP32", "data": [] },
        { "name": "item_ids", "shape": [2], "datatype": "INT64", "data": [1, 2] }
    ]});
    let (status, reply) = infer(&agent, "video-ranker", &huge).await;
    assert_eq!(status, 413, "{reply}");
    let why = reply["error"].as_str().unwrap();
    assert!(
        why.contains("80000 elements") && why.contains("65536"),
        "{why}"
    );
    agent.shutdown().await;
    coordinator.shutdown().await;
}

/// Each model's recent service is in the status (`health`: calls, errors, rows, offloaded rows,
/// p50/p99) and reaches the coordinator's fleet view, coalesced: fifty calls in a second or two
/// make a handful of statuses at `[sync] health_interval_s` = 1, not fifty. A cloud model with no
/// coordinator counts its failures; a caller's bad request is not the model's error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_carries_each_models_recent_service_coalesced() {
    use outpost_test_support::mqtt::{ClientIdentity, MqttObserver};
    let dir = tempfile::tempdir().unwrap();
    let coordinator = start_coordinator(dir.path()).await;
    push(
        &coordinator,
        "intent-classifier",
        &placed("cascade:intent_probs:0.6"),
        &DemoModel::IntentClassifier.bytes(DEFAULT_SEED),
    )
    .await;
    push(
        &coordinator,
        "music-two-tower",
        &placed("cloud"),
        &DemoModel::MusicTwoTower.bytes(DEFAULT_SEED),
    )
    .await;
    let mut config = agent_config(&coordinator, dir.path());
    config.sync.health_interval_s = 1;
    let agent = Agent::start(config).await.unwrap();
    eventually("both models served", || {
        ["intent-classifier", "music-two-tower"]
            .iter()
            .all(|m| agent.active_version(m) == Some(1))
    })
    .await;
    let status_topic = outpost_shared::Topic::device_status("dev-0001")
        .unwrap()
        .name();
    let mut watcher = MqttObserver::new(
        &coordinator.mqtt,
        "health-watcher",
        &ClientIdentity::coordinator_of(&coordinator),
    );
    watcher.subscribe(&status_topic).await;
    // The retained status, and any published as the models came up.
    while watcher
        .message_within(&status_topic, std::time::Duration::from_millis(1500))
        .await
        .is_some()
    {}

    let started = std::time::Instant::now();
    let tokens: Vec<i64> = (0..64 * 8).map(|i| (i * 7919) % 8000).collect();
    let intents = json!({ "inputs": [Tensor::from_values("token_ids", vec![64, 8], &tokens).unwrap().to_json().unwrap()] });
    let mut offloaded = 0;
    for _ in 0..40 {
        let (status, reply) = infer(&agent, "intent-classifier", &intents).await;
        assert_eq!(status, 200, "{reply}");
        offloaded += reply["parameters"]["rows_cloud"].as_u64().unwrap();
    }
    let user = Tensor::from_values("user_features", vec![2, 24], &[0.5f32; 48]).unwrap();
    let tracks = Tensor::from_values("track_ids", vec![2], &[1i64, 2]).unwrap();
    let music = json!({ "inputs": [user.to_json().unwrap(), tracks.to_json().unwrap()] });
    for _ in 0..10 {
        let (status, reply) = infer(&agent, "music-two-tower", &music).await;
        assert_eq!(status, 200, "{reply}");
    }
    // A caller's mistake: not the model's error, not a call of its service.
    let (status, _) = infer(&agent, "music-two-tower", &json!({ "inputs": [] })).await;
    assert_eq!(status, 400);
    let calls_took = started.elapsed();

    let admin = AdminClient::of(&coordinator);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(15);
    let (intent, music_health) = loop {
        let fleet = admin.fleet().await.unwrap();
        let health = |model: &str| {
            fleet
                .iter()
                .find(|d| d.device_id == "dev-0001")
                .and_then(|d| d.models.iter().find(|m| m.model == model))
                .and_then(|m| m.health.clone())
        };
        if let (Some(i), Some(m)) = (health("intent-classifier"), health("music-two-tower"))
            && i.calls == 40
            && m.calls == 10
        {
            break (i, m);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the fleet view never showed the calls: {fleet:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert_eq!(
        (intent.version, intent.errors, intent.rows),
        (1, 0, 40 * 64)
    );
    assert_eq!(intent.rows_offloaded, offloaded);
    assert!(offloaded > 0 && offloaded < 40 * 64, "{intent:?}");
    assert!(
        intent.p50_ms > 0.0 && intent.p99_ms >= intent.p50_ms,
        "{intent:?}"
    );
    assert_eq!((music_health.rows, music_health.rows_offloaded), (20, 20));
    assert_eq!(music_health.offload_share(), 1.0);

    // Coalesced: statuses at most about one a second while the calls went on (and the one that
    // carried the last of them), where one per call would be 50.
    let mut statuses = 0;
    while watcher
        .message_within(&status_topic, std::time::Duration::from_millis(1500))
        .await
        .is_some()
    {
        statuses += 1;
    }
    let bound = calls_took.as_secs() + 4;
    assert!(
        statuses >= 1 && statuses as u64 <= bound,
        "{statuses} statuses for 50 calls in {calls_took:?}"
    );

    // With no coordinator, the cloud model fails: counted as its errors.
    coordinator.shutdown().await;
    let (status, _) = infer(&agent, "music-two-tower", &music).await;
    assert_eq!(status, 503);
    let music = outpost_test_support::agent::model_status(&agent, "music-two-tower")
        .health
        .unwrap();
    assert_eq!((music.calls, music.errors), (11, 1));
    assert!((music.error_rate() - 1.0 / 11.0).abs() < 1e-9);
    agent.shutdown().await;
}
