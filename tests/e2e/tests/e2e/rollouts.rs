//! Rollouts gated on device health, end to end: a coordinator, agents of its dev fleet chosen
//! by cohort, real cascade calls, signed statuses carrying each model's health, and the gate
//! deciding from them. A candidate that sends far more rows to the cloud (a less confident
//! cascade) is aborted by itself and its devices go back to stable; a healthy one widens (the
//! devices that had it keep it) and is promoted.

use std::time::Duration;

use cloud_coordinator::AdminClient;
use edge_agent::{Agent, AgentHandle};
use firmware_config::{AgentConfig, CoordinatorConfig, FleetAuthority};
use model_zoo::{DEFAULT_SEED, DemoModel};
use outpost_shared::Tensor;
use outpost_shared::rollout::in_cohort;
use outpost_test_support::agent::infer;
use outpost_test_support::coordinator::{coordinator_config, placed, push};
use outpost_test_support::eventually::eventually;
use serde_json::json;

const MODEL: &str = "intent-classifier";

/// A dev-fleet device for each wish (`wanted(id)`), enrolled when it is not the first, started
/// with its health published every second.
async fn agents_where(
    coordinator: &cloud_coordinator::CoordinatorHandle,
    dir: &std::path::Path,
    wishes: &[&dyn Fn(&str) -> bool],
) -> Vec<AgentHandle> {
    let fleet_config = coordinator.fleet_config.clone().unwrap();
    let fleet_dir = fleet_config.parent().unwrap().to_owned();
    let authority = FleetAuthority::load(&CoordinatorConfig::load(&fleet_config).unwrap()).unwrap();
    let mut taken = Vec::new();
    let mut agents = Vec::new();
    for wish in wishes {
        let id = (1..200)
            .map(|n| format!("dev-{n:04}"))
            .find(|id| wish(id) && !taken.contains(id))
            .expect("no device id in the first 200 fits");
        taken.push(id.clone());
        let config_path = fleet_dir.join("devices").join(&id).join("agent.toml");
        if !config_path.exists() {
            authority
                .enroll_next(
                    Some(id.parse().unwrap()),
                    &fleet_dir,
                    coordinator.quic_addr.port(),
                    &fleet_dir,
                )
                .unwrap();
        }
        let mut config = AgentConfig::load(&config_path).unwrap();
        config.api.listen = "127.0.0.1:0".parse().unwrap();
        config.storage.data_dir = Some(dir.join(&id));
        config.sync.health_interval_s = 1;
        agents.push(Agent::start(config).await.unwrap());
    }
    agents
}

fn intents() -> serde_json::Value {
    let tokens: Vec<i64> = (0..16 * 8).map(|i| (i * 7919) % 8000).collect();
    json!({ "inputs": [Tensor::from_values("token_ids", vec![16, 8], &tokens).unwrap().to_json().unwrap()] })
}

/// Calls `MODEL` on every agent, `rounds` times.
async fn load(agents: &[AgentHandle], rounds: usize) {
    let body = intents();
    for _ in 0..rounds {
        for agent in agents {
            let (status, reply) = infer(agent, MODEL, &body).await;
            assert_eq!(status, 200, "{reply}");
        }
    }
}

/// Calls `MODEL` on every agent, ten rounds at a time with `each` after them, until the
/// model's rollout history has a `step`; fails after 150 s with the history.
async fn load_until(
    admin: &AdminClient,
    agents: &[AgentHandle],
    step: &str,
    mut each: impl FnMut(),
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(150);
    while !history(admin).await.iter().any(|e| e.0 == step) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the gate took no {step}: {:?}",
            history(admin).await
        );
        load(agents, 10).await;
        each();
    }
}

/// Waits until every agent serves `version` of `MODEL`.
async fn all_serve(agents: &[AgentHandle], version: u64, what: &str) {
    for agent in agents {
        eventually(what, || agent.active_version(MODEL) == Some(version)).await;
    }
}

async fn history(admin: &AdminClient) -> Vec<(String, u64, u8, String)> {
    admin
        .models()
        .await
        .unwrap()
        .into_iter()
        .find(|m| m.name == MODEL)
        .map(|m| {
            m.rollout_history
                .into_iter()
                .map(|e| (e.step, e.version, e.percent, e.reason))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_less_confident_candidate_is_aborted_and_a_healthy_one_widens_and_is_promoted() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = coordinator_config(dir.path());
    config.rollout.check_interval_s = 1;
    config.rollout.min_calls = 10;
    config.rollout.steps = vec![60];
    let coordinator = cloud_coordinator::Coordinator::start(config).await.unwrap();
    let admin = AdminClient::of(&coordinator);
    let bytes = DemoModel::IntentClassifier.bytes(DEFAULT_SEED);
    push(
        &coordinator,
        MODEL,
        &placed("cascade:intent_probs:0.6"),
        &bytes,
    )
    .await;

    // Version 2 goes to 50 % (salt intent-classifier-2), version 3 to 30 % then 60 % (salt
    // intent-classifier-3): a device in each cohort and one out.
    let v2_in = |id: &str| in_cohort(id, "intent-classifier-2", 50);
    let early = |id: &str| !v2_in(id) && in_cohort(id, "intent-classifier-3", 30);
    let late = |id: &str| {
        v2_in(id)
            && !in_cohort(id, "intent-classifier-3", 30)
            && in_cohort(id, "intent-classifier-3", 60)
    };
    let agents = agents_where(&coordinator, dir.path(), &[&v2_in, &early, &late]).await;
    all_serve(&agents, 1, "every agent serves version 1").await;

    // Version 2: the same model, far less sure of itself (threshold 0.99), as a 50 % canary.
    let mut canary = placed("cascade:intent_probs:0.99");
    canary.query.canary = Some(50);
    canary.query.rollout_percent = 50;
    canary.query.bake_s = Some(3600);
    canary.query.max_offload_increase = Some(0.1);
    // Offloading is slower too; this test wants the offload limit to be the one that trips.
    canary.query.max_p99_regression = Some(100.0);
    push(&coordinator, MODEL, &canary, &bytes).await;
    eventually("the canary device runs version 2", || {
        agents[0].active_version(MODEL) == Some(2)
    })
    .await;
    load_until(&admin, &agents, "abort", || {}).await;
    let steps = history(&admin).await;
    let abort = steps.iter().find(|e| e.0 == "abort").unwrap();
    assert_eq!(abort.1, 2);
    assert!(abort.3.contains("offloaded share"), "{abort:?}");
    all_serve(&agents, 1, "every device is back on version 1").await;

    // Version 3: healthy (as version 1), 30 %, 2 s bakes: widened to 60 %, then promoted. The
    // early device, in at 30 %, stays on version 3 throughout.
    let mut canary = placed("cascade:intent_probs:0.6");
    canary.query.canary = Some(30);
    canary.query.rollout_percent = 30;
    canary.query.bake_s = Some(2);
    // Two cohorts doing the same work on two shared cores: latency noise is not a regression.
    canary.query.max_p99_regression = Some(1.0);
    push(&coordinator, MODEL, &canary, &bytes).await;
    eventually("the early device runs version 3", || {
        agents[1].active_version(MODEL) == Some(3)
    })
    .await;
    // Each step needs 200 calls in each cohort's window (gate::P99_MIN_CALLS).
    let mut early_left = false;
    load_until(&admin, &agents, "promote", || {
        early_left |= agents[1].active_version(MODEL) != Some(3);
    })
    .await;
    assert!(
        !early_left,
        "the early device left the candidate while it widened"
    );
    let steps: Vec<(String, u64, u8)> = history(&admin)
        .await
        .into_iter()
        .filter(|e| e.1 == 3)
        .map(|e| (e.0, e.1, e.2))
        .collect();
    assert_eq!(
        steps,
        [
            ("candidate".to_owned(), 3, 30),
            ("widen".to_owned(), 3, 60),
            ("promote".to_owned(), 3, 100)
        ]
    );
    all_serve(&agents, 3, "every agent serves version 3").await;
    let metrics = admin.metrics().await.unwrap();
    for line in [
        "outpost_rollout_steps_total{step=\"abort\"} 1",
        "outpost_rollout_steps_total{step=\"widen\"} 1",
        "outpost_rollout_steps_total{step=\"promote\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} not in {metrics}");
    }
    for agent in agents {
        agent.shutdown().await;
    }
    coordinator.shutdown().await;
}
