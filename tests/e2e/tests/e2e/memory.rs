//! Working memory, bounded before a call runs, on both sides: a call over the per-call bound
//! runs in row parts that fit and answers as one call would; a call whose single row cannot
//! fit is refused naming the figures; the coordinator splits offloaded calls the same way and
//! keeps a device to its share of the pool; the figures show in the model's metadata and
//! `/metrics`.

use cloud_coordinator::registry::Quantize;
use cloud_coordinator::{AdminClient, Coordinator};
use edge_agent::{Agent, AgentHandle};
use model_zoo::{DEFAULT_SEED, DemoModel, TextModel, vocab};
use outpost_runtime::http::Request;
use outpost_runtime::tract::TractModel;
use outpost_shared::Tensor;
use outpost_test_support::agent::{agent_config, first_output, infer, restart_config};
use outpost_test_support::coordinator::{coordinator_config, placed, push};
use outpost_test_support::eventually::eventually;
use outpost_test_support::http::{get_json, send};
use serde_json::{Value, json};

const MIB: u64 = 1 << 20;

fn texts(n: usize) -> Vec<String> {
    let words = [
        "refund",
        "my",
        "order",
        "the",
        "video",
        "keeps",
        "buffering",
        "please",
    ];
    (0..n)
        .map(|i| {
            format!(
                "{} {} {}",
                words[i % 8],
                words[(i / 8) % 8],
                words[(i / 64) % 8]
            )
        })
        .collect()
}

fn text_request(texts: &[String]) -> Value {
    json!({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [texts.len()], "data": texts}]})
}

/// One row of `tokens` token ids (with its mask and token types), as the encoder takes them.
fn token_request(tokens: u64) -> Value {
    let ids = |name: &str, v: i64| {
        Tensor::from_values(name, vec![1, tokens], &vec![v; tokens as usize])
            .unwrap()
            .to_json()
            .unwrap()
    };
    json!({"inputs": [ids("input_ids", 5), ids("attention_mask", 1), ids("token_type_ids", 0)]})
}

async fn agent_metric(agent: &AgentHandle, name: &str) -> u64 {
    let answer = send(agent.api_addr, Request::get("/metrics")).await;
    let text = String::from_utf8(answer.body.to_vec()).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} not in\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_over_the_devices_working_memory_runs_in_parts_and_answers_as_one() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::start(coordinator_config(dir.path()))
        .await
        .unwrap();
    let model = TextModel::IntentClassifierText.bytes(DEFAULT_SEED).unwrap();
    let options = placed("local")
        .quantize(Quantize::None)
        .tokenizer(vocab::tokenizer_json().into_bytes());
    push(&coordinator, "intents", &options, &model).await;
    let agent = Agent::start(agent_config(&coordinator, dir.path()))
        .await
        .unwrap();
    eventually("intents served", || {
        agent.active_version("intents") == Some(1)
    })
    .await;

    // The figures, from the metadata: a row at the model's longest text.
    let (status, meta) = get_json(agent.api_addr, "/v2/models/intents").await;
    assert_eq!(status, 200, "{meta}");
    let figures = &meta["parameters"]["working_memory"];
    let per_row = figures["per_row_bytes"].as_u64().unwrap();
    let fixed = figures["fixed_bytes"].as_u64().unwrap();
    assert!(per_row > 0 && figures["splits_rows"] == true, "{figures}");
    let by_tokens = &figures["per_row_bytes_by_tokens"];
    assert!(
        by_tokens["512"].as_u64().unwrap() > 16 * by_tokens["32"].as_u64().unwrap(),
        "attention grows faster than the tokens: {by_tokens}"
    );
    let n = 40;
    let one_by_one: Vec<Vec<f32>> = {
        let mut rows = Vec::new();
        for t in texts(n).iter().take(3) {
            let (status, reply) =
                infer(&agent, "intents", &text_request(std::slice::from_ref(t))).await;
            assert_eq!(status, 200, "{reply}");
            rows.push(first_output(&reply));
        }
        rows
    };

    // The same device with working memory for about four rows a call.
    let mut config = restart_config(&agent, dir.path());
    agent.shutdown().await;
    let budget_mb = (fixed + 4 * per_row).div_ceil(MIB);
    config.profile.working_memory_mb = Some(budget_mb);
    config.profile.inference_concurrency = Some(1);
    let agent = Agent::start(config).await.unwrap();
    eventually("intents served again", || {
        agent.active_version("intents") == Some(1)
    })
    .await;
    let per_part = (budget_mb * MIB - fixed) / per_row;
    assert!(per_part < n as u64 / 2, "{per_part} rows fit a part");
    let (status, reply) = infer(&agent, "intents", &text_request(&texts(n))).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["outputs"][0]["shape"], json!([n, 16]), "{reply}");
    let all = first_output(&reply);
    for (i, alone) in one_by_one.iter().enumerate() {
        for (a, b) in alone.iter().zip(&all[i * 16..(i + 1) * 16]) {
            assert!(
                (a - b).abs() < 1e-4,
                "row {i}: {alone:?} vs {:?}",
                &all[i * 16..]
            );
        }
    }
    assert_eq!(
        agent_metric(&agent, "outpost_agent_calls_split_total").await,
        1
    );
    assert_eq!(
        agent_metric(
            &agent,
            "outpost_agent_working_memory_bytes{state=\"budget\"}"
        )
        .await,
        budget_mb * MIB
    );
    assert_eq!(
        agent_metric(
            &agent,
            "outpost_agent_working_memory_bytes{state=\"in_use\"}"
        )
        .await,
        0,
        "every call gave its memory back"
    );

    // Token ids far past the model's text length: one row does not fit; refused, named.
    let long = 4096u64;
    let body = token_request(long);
    let (status, reply) = infer(&agent, "intents", &body).await;
    assert_eq!(status, 413, "{reply}");
    let why = reply["error"].as_str().unwrap();
    assert!(
        why.contains("MiB") && why.contains(&format!("{budget_mb} MiB")),
        "{why}"
    );
    assert_eq!(
        agent_metric(&agent, "outpost_agent_calls_too_large_total").await,
        1
    );
    // And the device still answers.
    let (status, reply) = infer(&agent, "intents", &text_request(&texts(2))).await;
    assert_eq!(status, 200, "{reply}");
    agent.shutdown().await;
    coordinator.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_coordinator_runs_an_offloaded_call_in_parts_within_its_working_memory() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = coordinator_config(dir.path());
    config.inference.workers = 1;
    config.inference.working_memory_mb = 1;
    let coordinator = Coordinator::start(config).await.unwrap();
    let ranker = DemoModel::VideoRanker.bytes(DEFAULT_SEED);
    push(&coordinator, "ranker", &placed("cloud"), &ranker).await;
    let tokens = TextModel::IntentClassifierText.bytes(DEFAULT_SEED).unwrap();
    push(&coordinator, "intents", &placed("cloud"), &tokens).await;
    let agent = Agent::start(agent_config(&coordinator, dir.path()))
        .await
        .unwrap();
    eventually("both served", || {
        agent.active_version("ranker") == Some(1) && agent.active_version("intents") == Some(1)
    })
    .await;

    // 5 000 rows: several parts of 1 MiB on the coordinator, one answer in order.
    let (body, tensors) = outpost_test_support::agent::ranker_request(5_000);
    let (status, reply) = infer(&agent, "ranker", &body).await;
    assert_eq!(status, 200, "{reply}");
    let expected = TractModel::load(&ranker).unwrap().run(&tensors).unwrap();
    let got = first_output(&reply);
    let want = expected[0].to_values::<f32>().unwrap();
    assert_eq!(got.len(), want.len());
    for (i, (a, b)) in got.iter().zip(&want).enumerate() {
        assert!((a - b).abs() < 1e-4, "row {i}: {a} vs {b}");
    }
    let metrics = AdminClient::of(&coordinator).metrics().await.unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("outpost_inference_split_total") && !l.ends_with(" 0")),
        "{metrics}"
    );

    // A row of 2 048 tokens needs far more than 1 MiB: refused as the caller's, named.
    let long = 2048u64;
    let body = token_request(long);
    let (status, reply) = infer(&agent, "intents", &body).await;
    assert_eq!(status, 400, "{reply}");
    let why = reply["error"].as_str().unwrap();
    assert!(
        why.contains("working memory") && why.contains("1 MiB"),
        "{why}"
    );
    // The coordinator still serves.
    let (body, _) = outpost_test_support::agent::ranker_request(3);
    let (status, reply) = infer(&agent, "ranker", &body).await;
    assert_eq!(status, 200, "{reply}");
    agent.shutdown().await;
    coordinator.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cascade_model_without_a_row_per_input_row_is_refused_at_push() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::start(coordinator_config(dir.path()))
        .await
        .unwrap();
    // One answer [1, 4] whatever the rows.
    let model = model_zoo::probe::pooled_rows();
    let admin = AdminClient::of(&coordinator);
    let refused = admin
        .push("fixed", model.clone(), &placed("cascade:probs:0.5"))
        .await
        .unwrap_err()
        .to_string();
    assert!(refused.contains("a row for each input row"), "{refused}");
    coordinator.shutdown().await;
}

/// Bodies held back by their senders take the device's body budget, not its memory: past the
/// budget a new body is answered 503 (busy) at once rather than buffered, a body that stops
/// arriving is cut (408) within seconds, and a real call answers throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_bodies_are_bounded_and_a_real_call_still_answers() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::start(coordinator_config(dir.path()))
        .await
        .unwrap();
    let ranker = DemoModel::VideoRanker.bytes(DEFAULT_SEED);
    push(&coordinator, "ranker", &placed("local"), &ranker).await;
    let mut config = agent_config(&coordinator, dir.path());
    config.profile.body_memory_mb = Some(8);
    let agent = Agent::start(config).await.unwrap();
    eventually("ranker served", || {
        agent.active_version("ranker") == Some(1)
    })
    .await;
    let head = |len: usize| {
        format!(
            "POST /v2/models/ranker/infer HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: {len}\r\n\r\n{{"
        )
    };
    // Three senders declare 3 MB each and hold back all but the first byte: two fit the 8 MiB.
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut s = tokio::net::TcpStream::connect(agent.api_addr)
            .await
            .unwrap();
        s.write_all(head(3_000_000).as_bytes()).await.unwrap();
        held.push(s);
    }
    let started = std::time::Instant::now();
    let mut answers = Vec::new();
    for s in &mut held {
        let mut got = vec![0u8; 4096];
        let n = tokio::time::timeout(std::time::Duration::from_secs(10), s.read(&mut got))
            .await
            .expect("an answer within 10 s")
            .unwrap();
        answers.push(String::from_utf8_lossy(&got[..n]).into_owned());
    }
    let statuses: Vec<&str> = answers.iter().map(|a| &a[9..12]).collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == "503").count(),
        1,
        "{answers:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == "408").count(),
        2,
        "{answers:?}"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(8));
    // Meanwhile and after, a real call answers.
    let (body, _) = outpost_test_support::agent::ranker_request(2);
    let (status, reply) = infer(&agent, "ranker", &body).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(
        agent_metric(&agent, "outpost_agent_request_body_bytes{state=\"in_use\"}").await,
        0
    );
    agent.shutdown().await;
    coordinator.shutdown().await;
}
