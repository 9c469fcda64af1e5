//! Agent fixtures: a dev-mode coordinator's first device with its API on a free port and its
//! data in a test's folder, the demo models' requests, and inference calls through the agent's
//! Open Inference Protocol API.

use std::path::Path;

use cloud_coordinator::CoordinatorHandle;
use edge_agent::AgentHandle;
use firmware_config::AgentConfig;
use outpost_runtime::http::Request;
use outpost_shared::Tensor;
use serde_json::{Value, json};

/// The coordinator's dev device (`dev-0001`) with its API on port 0 of loopback and its data in
/// `dir/agent`.
pub fn agent_config(coordinator: &CoordinatorHandle, dir: &Path) -> AgentConfig {
    let mut config = AgentConfig::load(coordinator.dev_agent_config.as_ref().unwrap()).unwrap();
    config.api.listen = "127.0.0.1:0".parse().unwrap();
    config.storage.data_dir = Some(dir.join("agent"));
    config
}

/// `model`'s entry in `agent`'s status; fails the test when the agent does not know it.
pub fn model_status(agent: &AgentHandle, model: &str) -> outpost_shared::ModelStatus {
    agent
        .status()
        .models
        .into_iter()
        .find(|m| m.model == model)
        .unwrap_or_else(|| panic!("{model} is not in the agent's status"))
}

/// The chunk files of a chunk store's folder (`…/chunks`, a shard folder per id prefix).
pub fn chunk_files(dir: &Path) -> std::collections::BTreeSet<std::path::PathBuf> {
    let mut files = std::collections::BTreeSet::new();
    for shard in std::fs::read_dir(dir).unwrap() {
        let shard = shard.unwrap().path();
        if shard.is_dir() {
            for file in std::fs::read_dir(&shard).unwrap() {
                files.insert(file.unwrap().path());
            }
        }
    }
    files
}

/// The config to start `agent` again (same device, same data) after it stops: `dev-0001` of
/// the dev fleet whose coordinator kept its data in `dir/coordinator`.
pub fn restart_config(agent: &AgentHandle, dir: &Path) -> AgentConfig {
    let fleet = dir.join("coordinator/dev-fleet/devices/dev-0001/agent.toml");
    let mut config = AgentConfig::load(&fleet).unwrap();
    config.api.listen = "127.0.0.1:0".parse().unwrap();
    config.storage.data_dir = Some(agent.data_dir.clone());
    config
}

/// `POST /v2/models/{model}/infer` with a JSON body; the status and the answer as JSON.
pub async fn infer(agent: &AgentHandle, model: &str, body: &Value) -> (u16, Value) {
    crate::http::request_json(
        agent.api_addr,
        Request::post(format!("/v2/models/{model}/infer"), body.to_string())
            .header("Content-Type", "application/json"),
    )
    .await
}

/// A `video-ranker` request of `batch` rows (id `r1`): the JSON body and its input tensors.
pub fn ranker_request(batch: usize) -> (Value, Vec<Tensor>) {
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

/// One row for `music-two-tower`, as an inference request body.
pub fn music_request() -> Value {
    let user = Tensor::from_values("user_features", vec![1, 24], &[0.5f32; 24]).unwrap();
    let tracks = Tensor::from_values("track_ids", vec![1], &[3i64]).unwrap();
    json!({ "inputs": [user.to_json().unwrap(), tracks.to_json().unwrap()] })
}

/// The first output of an inference answer (JSON tensors), as FP32 values.
pub fn first_output(reply: &Value) -> Vec<f32> {
    serde_json::from_value::<outpost_shared::JsonTensor>(reply["outputs"][0].clone())
        .map(|j| Tensor::from_json(&j).unwrap().to_values::<f32>().unwrap())
        .unwrap()
}
