//! Model sync: what an agent downloads to serve a release, over real QUIC from an in-process
//! coordinator: only the chunks an interrupted download left missing, and after a fine-tune only
//! the chunks that changed.

use cloud_coordinator::PushOptions;
use cloud_coordinator::registry::Quantize;
use edge_agent::Agent;
use model_zoo::{DEFAULT_SEED, DemoModel};
use outpost_shared::Target;
use outpost_test_support::agent::{agent_config, chunk_files};
use outpost_test_support::coordinator::{placed, push, start_coordinator};
use outpost_test_support::eventually::eventually;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_download_fetches_only_the_missing_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = start_coordinator(dir.path()).await;
    // fp32, for more chunks to split between "already there" and "missing".
    let bytes = DemoModel::VideoRanker.bytes(DEFAULT_SEED);
    push(
        &coordinator,
        "video-ranker",
        &PushOptions::default().quantize(Quantize::None),
        &bytes,
    )
    .await;
    let spans = outpost_shared::chunk::split_model(&bytes);
    assert!(spans.len() >= 4, "{} chunks", spans.len());

    // What an interrupted download left behind: the first half of the chunks.
    let config = agent_config(&coordinator, dir.path());
    let store = outpost_runtime::ChunkStore::open(&config.data_dir().join("chunks")).unwrap();
    let kept = spans.len() / 2;
    for span in &spans[..kept] {
        store.put(&span.id, span.bytes(&bytes)).unwrap();
    }
    let agent = Agent::start(config).await.unwrap();
    eventually("version 1", || {
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

/// Delta updates: after a fine-tune that retrained only the head of the 20 M-parameter ranker, an
/// agent downloads a small share of the new int8 variant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retrained_head_downloads_only_the_changed_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = start_coordinator(dir.path()).await;
    let mut proto = DemoModel::VideoRankerXl.build(DEFAULT_SEED);
    let v1 = prost::Message::encode_to_vec(&proto);
    let reply = push(&coordinator, "ranker-xl", &placed("local"), &v1).await;
    assert_eq!(reply.variants[0].target, Target::EdgeInt8);
    let agent = Agent::start(agent_config(&coordinator, dir.path()))
        .await
        .unwrap();
    eventually("version 1", || agent.active_version("ranker-xl") == Some(1)).await;
    let before = agent.status().counters;

    model_zoo::retrain_head(&mut proto, 42);
    let v2 = prost::Message::encode_to_vec(&proto);
    drop(proto);
    let reply = push(&coordinator, "ranker-xl", &placed("local"), &v2).await;
    drop((v1, v2));
    eventually("version 2", || agent.active_version("ranker-xl") == Some(2)).await;
    let after = agent.status().counters;
    let fetched = after.bytes_fetched - before.bytes_fetched;
    let size = reply.variants[0].size;
    // The coordinator's delta is what the agent actually downloaded.
    assert_eq!(reply.delta[0].new_bytes, fetched, "{reply:?}");
    assert!(
        fetched * 10 <= size,
        "fetched {fetched} of {size} bytes ({:.1} %)",
        100.0 * fetched as f64 / size as f64
    );
    assert!(fetched > 0);
    agent.shutdown().await;
    coordinator.shutdown().await;
}

/// A damaged cache never leaves a device with nothing: when the active version's chunks are
/// damaged on disk at start, the previous version serves at once, the damaged chunks are
/// deleted and fetched again when the release is delivered again at connect, and the agent
/// converges on the active version without another push.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_cache_serves_the_previous_version_and_heals() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = start_coordinator(dir.path()).await;
    let fp32 = PushOptions::default().quantize(Quantize::None);
    push(
        &coordinator,
        "video-ranker",
        &fp32,
        &DemoModel::VideoRanker.bytes(1),
    )
    .await;
    let config = agent_config(&coordinator, dir.path());
    let chunks_dir = config.data_dir().join("chunks");
    let agent = Agent::start(config).await.unwrap();
    eventually("version 1", || {
        agent.active_version("video-ranker") == Some(1)
    })
    .await;
    let v1_files = chunk_files(&chunks_dir);
    push(
        &coordinator,
        "video-ranker",
        &fp32,
        &DemoModel::VideoRanker.bytes(2),
    )
    .await;
    eventually("version 2", || {
        agent.active_version("video-ranker") == Some(2)
    })
    .await;
    let restart = outpost_test_support::agent::restart_config(&agent, dir.path());
    agent.shutdown().await;

    // Damage every chunk only version 2 uses.
    let damaged: Vec<_> = chunk_files(&chunks_dir)
        .difference(&v1_files)
        .cloned()
        .collect();
    assert!(!damaged.is_empty());
    for file in &damaged {
        std::fs::write(file, b"not the chunk").unwrap();
    }
    let agent = Agent::start(restart).await.unwrap();
    // Never nothing: version 1 serves from the start (or version 2, once healed).
    let first = agent.active_version("video-ranker");
    assert!(matches!(first, Some(1 | 2)), "{first:?}");
    eventually("version 2 again, without a new push", || {
        agent.active_version("video-ranker") == Some(2)
    })
    .await;
    let counters = agent.status().counters;
    assert_eq!(
        counters.chunks_fetched,
        damaged.len() as u64,
        "{counters:?}"
    );
    assert_eq!(counters.manifests_rejected, 0, "{counters:?}");
    agent.shutdown().await;
    coordinator.shutdown().await;
}

/// A head fine-tuned at the coordinator reaches a device as its own chunks: the agent downloads
/// what the coordinator's delta says (under 2 % of the int8 variant) and then answers by the
/// rule the data taught, which the old head did not know.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finetuned_head_is_fetched_as_its_chunks_and_answers_by_the_new_rule() {
    use cloud_coordinator::finetune::FinetuneQuery;
    let dir = tempfile::tempdir().unwrap();
    let coordinator = start_coordinator(dir.path()).await;
    let cascade = placed("cascade:intent_probs:0.6");
    let bytes = DemoModel::IntentClassifier.bytes(DEFAULT_SEED);
    push(&coordinator, "intent-classifier", &cascade, &bytes).await;
    let agent = Agent::start(agent_config(&coordinator, dir.path()))
        .await
        .unwrap();
    eventually("version 1", || {
        agent.active_version("intent-classifier") == Some(1)
    })
    .await;
    let data =
        model_zoo::labelled::labelled_examples(DemoModel::IntentClassifier, DEFAULT_SEED, 7, 3000)
            .unwrap();
    let examples: Vec<serde_json::Value> = data
        .lines()
        .take(100)
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let agreement = |answers: &[usize]| {
        let right = examples
            .iter()
            .zip(answers)
            .filter(|(e, a)| e["label"] == model_zoo::INTENTS[**a])
            .count();
        right as f64 / examples.len() as f64
    };
    let before = agreement(&top_intents(&agent, &examples).await);
    let fetched_before = agent.status().counters.bytes_fetched;

    let report = cloud_coordinator::AdminClient::of(&coordinator)
        .finetune(
            "intent-classifier",
            data.into_bytes(),
            &FinetuneQuery {
                rollout: Some(100),
                ..FinetuneQuery::default()
            },
        )
        .await
        .unwrap();
    let published = report.published.unwrap();
    eventually("version 2", || {
        agent.active_version("intent-classifier") == Some(published.version)
    })
    .await;
    let fetched = agent.status().counters.bytes_fetched - fetched_before;
    let edge = published
        .delta
        .iter()
        .find(|d| d.target == Target::EdgeInt8)
        .unwrap();
    assert_eq!(fetched, edge.new_bytes, "{edge:?}");
    assert!(fetched > 0 && fetched * 50 <= edge.bytes, "{edge:?}");
    let after = agreement(&top_intents(&agent, &examples).await);
    eprintln!(
        "agreement with the new rule: {before:.2} -> {after:.2}; fetched {fetched} of {} bytes",
        edge.bytes
    );
    assert!(before < 0.2, "{before}");
    assert!(after >= 0.7, "{after}");
    agent.shutdown().await;
    coordinator.shutdown().await;
}

/// The agent's top intent for each example's inputs.
async fn top_intents(
    agent: &edge_agent::AgentHandle,
    examples: &[serde_json::Value],
) -> Vec<usize> {
    let mut out = Vec::new();
    for e in examples {
        let body = serde_json::json!({ "inputs": e["inputs"] });
        let (status, reply) =
            outpost_test_support::agent::infer(agent, "intent-classifier", &body).await;
        assert_eq!(status, 200, "{reply}");
        let probs: Vec<f64> = serde_json::from_value(reply["outputs"][0]["data"].clone()).unwrap();
        out.push(
            (0..probs.len())
                .max_by(|&a, &b| probs[a].total_cmp(&probs[b]))
                .unwrap(),
        );
    }
    out
}

/// A device that stops cleanly says so with a signed status: the coordinator lists it as
/// offline (it ignored the unsigned one, and the retained copy then hid the device).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_stops_cleanly_stays_in_the_fleet_as_offline() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = outpost_test_support::coordinator::start_coordinator(dir.path()).await;
    let admin = cloud_coordinator::AdminClient::of(&coordinator);
    let agent = edge_agent::Agent::start(outpost_test_support::agent::agent_config(
        &coordinator,
        dir.path(),
    ))
    .await
    .unwrap();
    let health = |fleet: &[outpost_shared::DeviceStatus]| {
        fleet
            .iter()
            .find(|d| d.device_id == "dev-0001")
            .map(|d| d.health)
    };
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    while health(&admin.fleet().await.unwrap()) != Some(outpost_shared::Health::Ready) {
        assert!(tokio::time::Instant::now() < deadline, "never listed");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    agent.shutdown().await;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    while health(&admin.fleet().await.unwrap()) != Some(outpost_shared::Health::Offline) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the clean stop never showed: {:?}",
            admin.fleet().await.unwrap()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    coordinator.shutdown().await;
}
