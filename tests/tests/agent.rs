//! Coordinator and agents in one process over real QUIC, MQTT (the embedded broker), sled and
//! tract: sync, local / cloud / cascade inference through the Open Inference Protocol API,
//! upgrades, refused releases, offline serving, restart from cache.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use cloud_coordinator::{Coordinator, CoordinatorHandle};
use edge_agent::{Agent, AgentHandle};
use firmware_config::{AgentConfig, CoordinatorConfig};
use model_zoo::{DEFAULT_SEED, DemoModel};
use outpost_runtime::quantize::quantize_int8;
use outpost_runtime::tract::TractModel;
use outpost_shared::Tensor;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

async fn http(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &str,
    body: &[u8],
) -> (u16, Value) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let _ = stream.write_all(body).await;
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response).await;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (
        status,
        serde_json::from_str(body).unwrap_or(Value::String(body.to_owned())),
    )
}

/// A request whose answer is kept as bytes: the status, the response head, the body.
async fn http_raw(
    addr: std::net::SocketAddr,
    path: &str,
    headers: &str,
    body: &[u8],
) -> (u16, String, Vec<u8>) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(body).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    let split = response.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&response[..split]).to_lowercase();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, head, response[split + 4..].to_vec())
}

async fn push(c: &CoordinatorHandle, name: &str, query: &str, body: &[u8]) -> Value {
    let auth = format!("Authorization: Bearer {}\r\n", c.admin_token);
    let (status, reply) = http(
        c.admin_addr,
        "POST",
        &format!("/v1/models/{name}?{query}"),
        &auth,
        body,
    )
    .await;
    assert_eq!(status, 201, "push {name}: {reply}");
    reply
}

fn coordinator_config(dir: &std::path::Path) -> CoordinatorConfig {
    let mut config = CoordinatorConfig::default();
    config.storage.data_dir = dir.join("coordinator");
    config.quic.listen = "127.0.0.1:0".parse().unwrap();
    config.admin.listen = "127.0.0.1:0".parse().unwrap();
    config.mqtt.listen = Some("127.0.0.1:0".parse().unwrap());
    config
}

fn agent_config(c: &CoordinatorHandle, dir: &std::path::Path) -> AgentConfig {
    let mut config = AgentConfig::load(c.dev_agent_config.as_ref().unwrap()).unwrap();
    config.api.listen = "127.0.0.1:0".parse().unwrap();
    config.storage.data_dir = Some(dir.join("agent"));
    config
}

async fn until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn ranker_request(batch: usize) -> (Value, Vec<Tensor>) {
    let features: Vec<f32> = (0..batch * 32)
        .map(|i| ((i * 7 % 13) as f32) / 13.0)
        .collect();
    let ids: Vec<i64> = (0..batch as i64).map(|i| (i * 97) % 10_000).collect();
    let tensors = vec![
        Tensor::from_values("user_features", vec![batch as u64, 32], &features).unwrap(),
        Tensor::from_values("item_ids", vec![batch as u64], &ids).unwrap(),
    ];
    let body = json!({ "id": "r1", "inputs": tensors.iter().map(|t| t.to_json().unwrap()).collect::<Vec<_>>() });
    (body, tensors)
}

async fn infer(agent: &AgentHandle, model: &str, body: &Value) -> (u16, Value) {
    http(
        agent.api_addr,
        "POST",
        &format!("/v2/models/{model}/infer"),
        "Content-Type: application/json\r\n",
        body.to_string().as_bytes(),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_sync_serve_upgrade_and_keep_serving_offline() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::start(coordinator_config(dir.path()))
        .await
        .unwrap();
    let ranker_v1 = DemoModel::VideoRanker.bytes(DEFAULT_SEED);
    push(&coordinator, "video-ranker", "placement=local", &ranker_v1).await;
    push(
        &coordinator,
        "music-two-tower",
        "placement=cloud",
        &DemoModel::MusicTwoTower.bytes(DEFAULT_SEED),
    )
    .await;
    push(
        &coordinator,
        "intent-classifier",
        "placement=cascade:intent_probs:0.6",
        &DemoModel::IntentClassifier.bytes(DEFAULT_SEED),
    )
    .await;

    let agent = Agent::start(agent_config(&coordinator, dir.path()))
        .await
        .unwrap();
    until("the agent to serve all three models", || {
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
    let int8 = quantize_int8(&ranker_v1).unwrap().bytes;
    let expected = TractModel::load(&int8).unwrap().run(&tensors).unwrap();
    let got: Vec<f32> =
        serde_json::from_value::<outpost_shared::JsonTensor>(reply["outputs"][0].clone())
            .map(|j| Tensor::from_json(&j).unwrap().to_values::<f32>().unwrap())
            .unwrap();
    assert_eq!(got, expected[0].to_values::<f32>().unwrap());

    // The binary tensor data extension, laid out as Triton's HTTP client sends it: a JSON
    // header, then the raw inputs; outputs come back raw after a JSON header too.
    let (_, v2) = http(agent.api_addr, "GET", "/v2", "", b"").await;
    assert_eq!(v2["extensions"], json!(["binary_tensor_data"]));
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
    let (status, head, reply) = http_raw(
        agent.api_addr,
        "/v2/models/video-ranker/infer",
        &format!("Inference-Header-Content-Length: {}\r\n", header.len()),
        &binary_body,
    )
    .await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&reply));
    let json_len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("inference-header-content-length:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let answer: Value = serde_json::from_slice(&reply[..json_len]).unwrap();
    assert_eq!(answer["outputs"][0]["parameters"]["binary_data_size"], 20);
    assert_eq!(
        &reply[json_len..],
        expected[0].data(),
        "the same scores, raw"
    );
    // A binary size that does not match the bytes sent is a 400 that says so.
    let (status, _, reply) = http_raw(
        agent.api_addr,
        "/v2/models/video-ranker/infer",
        &format!("Inference-Header-Content-Length: {}\r\n", header.len()),
        &binary_body[..binary_body.len() - 4],
    )
    .await;
    assert_eq!(status, 400);
    assert!(
        String::from_utf8_lossy(&reply).contains("binary_data_size"),
        "{}",
        String::from_utf8_lossy(&reply)
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
    let (status, reply) = http(
        agent.api_addr,
        "POST",
        "/v2/models/video-ranker/infer",
        "",
        b"{not json",
    )
    .await;
    assert_eq!(status, 400, "{reply}");
    let (status, _) = http(
        agent.api_addr,
        "POST",
        "/v2/models/video-ranker/versions/9/infer",
        "",
        body.to_string().as_bytes(),
    )
    .await;
    assert_eq!(status, 404);
    let big = vec![b' '; edge_agent::api::MAX_BODY + 1];
    let (status, _) = http(
        agent.api_addr,
        "POST",
        "/v2/models/video-ranker/infer",
        "",
        &big,
    )
    .await;
    assert_eq!(status, 413);

    // Metadata in the protocol's shape.
    let (status, meta) = http(agent.api_addr, "GET", "/v2/models/video-ranker", "", b"").await;
    assert_eq!(status, 200);
    assert_eq!(
        meta["inputs"][1],
        json!({ "name": "item_ids", "datatype": "INT64", "shape": [-1] })
    );

    // Push v2: the agent switches and keeps v1 as previous.
    push(
        &coordinator,
        "video-ranker",
        "placement=local",
        &DemoModel::VideoRanker.bytes(7),
    )
    .await;
    until("version 2", || {
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
    let (status_code, _) = http(
        agent.api_addr,
        "POST",
        "/v2/models/video-ranker/versions/1/infer",
        "",
        body.to_string().as_bytes(),
    )
    .await;
    assert_eq!(
        status_code, 200,
        "the previous version still answers by version"
    );

    // Rollback: a new version (3) with version 1's content; the agent follows and answers as v1.
    let auth = format!("Authorization: Bearer {}\r\n", coordinator.admin_token);
    let (code, reply) = http(
        coordinator.admin_addr,
        "POST",
        "/v1/models/video-ranker/rollback?to=1",
        &auth,
        b"",
    )
    .await;
    assert_eq!(code, 201, "{reply}");
    until("version 3", || {
        agent.active_version("video-ranker") == Some(3)
    })
    .await;
    let (_, reply) = infer(&agent, "video-ranker", &ranker_request(5).0).await;
    let got: Vec<f32> =
        serde_json::from_value::<outpost_shared::JsonTensor>(reply["outputs"][0].clone())
            .map(|j| Tensor::from_json(&j).unwrap().to_values::<f32>().unwrap())
            .unwrap();
    assert_eq!(got, expected[0].to_values::<f32>().unwrap());

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
    let config = agent_config_from(&agent, dir.path());
    agent.shutdown().await;
    let again = Agent::start(config).await.unwrap();
    assert_eq!(again.active_version("video-ranker"), Some(3));
    let (status, _) = infer(&again, "video-ranker", &body).await;
    assert_eq!(status, 200);
    again.shutdown().await;
}

fn agent_config_from(agent: &AgentHandle, dir: &std::path::Path) -> AgentConfig {
    let fleet = dir.join("coordinator/dev-fleet/devices/dev-0001/agent.toml");
    let mut config = AgentConfig::load(&fleet).unwrap();
    config.api.listen = "127.0.0.1:0".parse().unwrap();
    config.storage.data_dir = Some(agent.data_dir.clone());
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_download_fetches_only_the_missing_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::start(coordinator_config(dir.path()))
        .await
        .unwrap();
    // fp32, for more chunks to split between "already there" and "missing".
    let bytes = DemoModel::VideoRanker.bytes(DEFAULT_SEED);
    push(&coordinator, "video-ranker", "quantize=none", &bytes).await;
    let spans = outpost_shared::chunk::split(&bytes);
    assert!(spans.len() >= 4, "{} chunks", spans.len());

    // What an interrupted download left behind: the first half of the chunks.
    let config = agent_config(&coordinator, dir.path());
    let store = outpost_runtime::ChunkStore::open(&config.data_dir().join("chunks")).unwrap();
    let kept = spans.len() / 2;
    for span in &spans[..kept] {
        store.put(&span.id, span.bytes(&bytes)).unwrap();
    }
    let agent = Agent::start(config).await.unwrap();
    until("version 1", || {
        agent.active_version("video-ranker") == Some(1)
    })
    .await;
    let counters = agent.status().counters;
    assert_eq!(counters.chunks_fetched, (spans.len() - kept) as u64);
    let missing_bytes: usize = spans[kept..].iter().map(|s| s.len).sum();
    assert_eq!(counters.bytes_fetched, missing_bytes as u64);
    agent.shutdown().await;
    coordinator.shutdown().await;
}

/// A coordinator in a temp folder that serves `music-two-tower` from the cloud.
async fn coordinator_with_cloud_music() -> (tempfile::TempDir, CoordinatorHandle) {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::start(coordinator_config(dir.path()))
        .await
        .unwrap();
    push(
        &coordinator,
        "music-two-tower",
        "placement=cloud",
        &DemoModel::MusicTwoTower.bytes(DEFAULT_SEED),
    )
    .await;
    (dir, coordinator)
}

/// One row for `music-two-tower`, as an inference request body.
fn music_request() -> Value {
    let user = Tensor::from_values("user_features", vec![1, 24], &[0.5f32; 24]).unwrap();
    let tracks = Tensor::from_values("track_ids", vec![1], &[3i64]).unwrap();
    json!({ "inputs": [user.to_json().unwrap(), tracks.to_json().unwrap()] })
}

/// A coordinator that goes away and comes back on the same address is found again without
/// restarting the agent: cloud calls answer again and new releases are fetched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_reconnects_to_a_restarted_coordinator() {
    let (dir, coordinator) = coordinator_with_cloud_music().await;
    let agent = Agent::start(agent_config(&coordinator, dir.path()))
        .await
        .unwrap();
    until("the cloud model", || {
        agent.active_version("music-two-tower") == Some(1)
    })
    .await;
    let music = music_request();
    let (status, reply) = infer(&agent, "music-two-tower", &music).await;
    assert_eq!(status, 200, "{reply}");

    // Down: the cloud-only model answers 503 with the reason.
    let (quic, mqtt) = (coordinator.quic_addr, coordinator.mqtt.clone());
    coordinator.shutdown().await;
    let (status, reply) = infer(&agent, "music-two-tower", &music).await;
    assert_eq!(status, 503, "{reply}");

    // Back on the same QUIC address and data. The embedded broker of the first one cannot be
    // stopped in-process (rumqttd has no API for it), so the second uses it as an external one;
    // the agent's MQTT session is untouched and only QUIC has to come back.
    let mut config = coordinator_config(dir.path());
    config.quic.listen = quic;
    config.mqtt.listen = None;
    config.mqtt.external = Some(mqtt);
    let again = Coordinator::start(config).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (status, reply) = infer(&agent, "music-two-tower", &music).await;
        if status == 200 {
            break;
        }
        assert_eq!(status, 503, "{reply}");
        assert!(
            tokio::time::Instant::now() < deadline,
            "the agent did not reconnect: {reply}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    push(
        &again,
        "video-ranker",
        "placement=local",
        &DemoModel::VideoRanker.bytes(DEFAULT_SEED),
    )
    .await;
    until("a release of the restarted coordinator", || {
        agent.active_version("video-ranker") == Some(1)
    })
    .await;
    agent.shutdown().await;
    again.shutdown().await;
}

/// Coordinators are tried in the configured order: a dead first one does not stop the agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_first_coordinator_fails_over_to_the_next() {
    let (dir, coordinator) = coordinator_with_cloud_music().await;
    let dead = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut config = agent_config(&coordinator, dir.path());
    let live = config.coordinator.addresses[0].clone();
    config.coordinator.addresses = vec![
        firmware_config::HostPort {
            host: "127.0.0.1".into(),
            port: dead,
        },
        live,
    ];
    let agent = Agent::start(config).await.unwrap();
    until("the cloud model", || {
        agent.active_version("music-two-tower") == Some(1)
    })
    .await;
    let music = music_request();
    let (status, reply) = infer(&agent, "music-two-tower", &music).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["parameters"]["rows_cloud"], 1);
    agent.shutdown().await;
    coordinator.shutdown().await;
}

/// A release that would take the device over its storage budget is refused, and the status says
/// why; the version it had keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_storage_budget_refuses_what_does_not_fit() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::start(coordinator_config(dir.path()))
        .await
        .unwrap();
    let mut config = agent_config(&coordinator, dir.path());
    config.profile.storage_budget_mb = Some(1);
    let agent = Agent::start(config).await.unwrap();
    // fp32 video-ranker: 662 KB of the 1 MiB budget.
    let fp32 = |seed| DemoModel::VideoRanker.bytes(seed);
    push(&coordinator, "video-ranker", "quantize=none", &fp32(1)).await;
    until("version 1", || {
        agent.active_version("video-ranker") == Some(1)
    })
    .await;
    // A second fp32 version would keep both (active and previous): 1.3 MB.
    push(&coordinator, "video-ranker", "quantize=none", &fp32(2)).await;
    let refused = |agent: &AgentHandle| {
        agent
            .status()
            .models
            .iter()
            .find(|m| m.model == "video-ranker")
            .and_then(|m| m.last_error.clone())
    };
    until("the refusal in the status", || refused(&agent).is_some()).await;
    let why = refused(&agent).unwrap();
    assert!(
        why.contains("storage budget") && why.contains("profile.storage_budget_mb"),
        "{why}"
    );
    assert_eq!(agent.active_version("video-ranker"), Some(1));
    // The int8 version fits beside version 1.
    push(&coordinator, "video-ranker", "", &fp32(3)).await;
    until("version 3", || {
        agent.active_version("video-ranker") == Some(3)
    })
    .await;
    assert_eq!(refused(&agent), None);
    agent.shutdown().await;
    coordinator.shutdown().await;
}

/// Delta updates: after a fine-tune that retrained only the head of the 20 M-parameter ranker, an
/// agent downloads a small share of the new int8 variant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retrained_head_downloads_only_the_changed_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::start(coordinator_config(dir.path()))
        .await
        .unwrap();
    let mut proto = DemoModel::VideoRankerXl.build(DEFAULT_SEED);
    let v1 = prost::Message::encode_to_vec(&proto);
    let reply = push(&coordinator, "ranker-xl", "placement=local", &v1).await;
    assert_eq!(reply["variants"][0]["target"], "edge-int8");
    let agent = Agent::start(agent_config(&coordinator, dir.path()))
        .await
        .unwrap();
    until("version 1", || agent.active_version("ranker-xl") == Some(1)).await;
    let before = agent.status().counters;

    model_zoo::retrain_head(&mut proto, 42);
    let v2 = prost::Message::encode_to_vec(&proto);
    drop(proto);
    let reply = push(&coordinator, "ranker-xl", "placement=local", &v2).await;
    drop((v1, v2));
    until("version 2", || agent.active_version("ranker-xl") == Some(2)).await;
    let after = agent.status().counters;
    let fetched = after.bytes_fetched - before.bytes_fetched;
    let size = reply["variants"][0]["size"].as_u64().unwrap();
    // The coordinator's delta is what the agent actually downloaded.
    assert_eq!(reply["delta"][0]["new_bytes"], fetched, "{reply}");
    assert!(
        fetched * 10 <= size,
        "fetched {fetched} of {size} bytes ({:.1} %)",
        100.0 * fetched as f64 / size as f64
    );
    assert!(fetched > 0);
    agent.shutdown().await;
    coordinator.shutdown().await;
}

async fn mqtt_client(
    c: &CoordinatorHandle,
    id: &str,
) -> (rumqttc::AsyncClient, rumqttc::EventLoop) {
    let mut options = rumqttc::MqttOptions::new(id, c.mqtt.host.clone(), c.mqtt.port);
    options.set_max_packet_size(8 << 20, 8 << 20);
    rumqttc::AsyncClient::new(options, 16)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_and_stale_releases_are_refused_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::start(coordinator_config(dir.path()))
        .await
        .unwrap();
    push(
        &coordinator,
        "video-ranker",
        "",
        &DemoModel::VideoRanker.bytes(1),
    )
    .await;

    // Keep release 1 as the broker has it, to replay it later.
    let topic = "outpost/v1/models/video-ranker/manifest";
    let (client, mut events) = mqtt_client(&coordinator, "observer").await;
    client
        .subscribe(topic, rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();
    let release_1 = loop {
        if let Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) = events.poll().await {
            break p.payload.to_vec();
        }
    };
    tokio::spawn(async move { while events.poll().await.is_ok() {} });

    let agent = Agent::start(agent_config(&coordinator, dir.path()))
        .await
        .unwrap();
    until("version 1", || {
        agent.active_version("video-ranker") == Some(1)
    })
    .await;
    push(
        &coordinator,
        "video-ranker",
        "",
        &DemoModel::VideoRanker.bytes(2),
    )
    .await;
    until("version 2", || {
        agent.active_version("video-ranker") == Some(2)
    })
    .await;

    // A release signed by another fleet's key, for a "newer" version.
    let other = tempfile::tempdir().unwrap();
    let plan = firmware_config::FleetPlan::numbered(
        "evil",
        1,
        vec!["localhost:1".parse().unwrap()],
        "localhost:1".parse().unwrap(),
    )
    .unwrap();
    firmware_config::provision(&plan, other.path()).unwrap();
    let key = pem::parse(std::fs::read_to_string(other.path().join("fleet-signing.key")).unwrap())
        .unwrap();
    let evil = outpost_shared::ManifestSigner::from_pkcs8(key.contents()).unwrap();
    let mut forged = ManifestVerifierFor::trusting(&agent_config(&coordinator, dir.path()))
        .verify_cbor(&release_1, now())
        .unwrap();
    forged.release = 99;
    forged.stable.version = 99;
    let forged = evil.sign(&forged).unwrap().to_cbor().unwrap();

    let rejected = agent.status().counters.manifests_rejected;
    for payload in [forged, release_1, Vec::new()] {
        client
            .publish(topic, rumqttc::QoS::AtLeastOnce, false, payload)
            .await
            .unwrap();
    }
    until("three refusals", || {
        agent.status().counters.manifests_rejected >= rejected + 3
    })
    .await;
    assert_eq!(
        agent.active_version("video-ranker"),
        Some(2),
        "a refused release changed nothing"
    );
    let status = agent.status();
    let last = status.last_error.unwrap_or_default();
    assert!(!last.is_empty());
    agent.shutdown().await;
    coordinator.shutdown().await;
}

struct ManifestVerifierFor;

impl ManifestVerifierFor {
    fn trusting(config: &AgentConfig) -> outpost_shared::ManifestVerifier {
        outpost_shared::ManifestVerifier::new(config.fleet.manifest_keys.clone())
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_is_the_device_its_certificate_names() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::start(coordinator_config(dir.path()))
        .await
        .unwrap();
    let mut config = agent_config(&coordinator, dir.path());
    config.device.id = "dev-9999".parse().unwrap();
    let err = Agent::start(config).await.unwrap_err().to_string();
    assert!(err.contains("certificate names \"dev-0001\""), "{err}");
    coordinator.shutdown().await;
}

/// The engine choice: `engine = "gpu"` runs local models on any adapter (lavapipe in CI) with the
/// same answers as tract, and a model with an op the GPU lacks falls back to tract naming the op;
/// `auto` stays off CPU-emulated adapters; `cpu` never touches the GPU. Status and metadata say
/// which engine runs each model and why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engine_choice_puts_models_on_the_gpu_or_says_why_not() {
    use firmware_config::EngineChoice;
    use model_zoo::graph::{Dim, GraphBuilder};
    use prost::Message as _;
    use tract_onnx::pb::tensor_proto::DataType as Onnx;

    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::start(coordinator_config(dir.path()))
        .await
        .unwrap();
    let ranker = DemoModel::VideoRanker.bytes(DEFAULT_SEED);
    push(&coordinator, "video-ranker", "placement=local", &ranker).await;
    let mut g = GraphBuilder::new(3);
    let x = g.input("x", Onnx::Float, &[Dim::Symbol("batch"), Dim::Fixed(4)]);
    g.node("Cos", &[&x], Some("y"), vec![]);
    g.output("y", Onnx::Float, &[Dim::Symbol("batch"), Dim::Fixed(4)]);
    let cosine = g.finish("cosine", "no GPU kernel", &[]).encode_to_vec();
    push(
        &coordinator,
        "cosine",
        "placement=local&quantize=none",
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
    for agent in [&gpu, &auto, &cpu] {
        until("both models", || {
            agent.active_version("video-ranker") == Some(1)
                && agent.active_version("cosine") == Some(1)
        })
        .await;
    }
    let model = |agent: &AgentHandle, name: &str| {
        agent
            .status()
            .models
            .into_iter()
            .find(|m| m.model == name)
            .unwrap()
    };

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
    let (_, meta) = http(gpu.api_addr, "GET", "/v2/models/video-ranker", "", b"").await;
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

    for agent in [gpu, auto, cpu] {
        agent.shutdown().await;
    }
    coordinator.shutdown().await;
}
