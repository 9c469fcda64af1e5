//! Load while a model switches: `clients` concurrent keep-alive clients call `video-ranker` on
//! one agent, first with the model steady, then while the operator pushes `switches` new
//! versions one after another (each with new content, so the agent fetches, loads and swaps
//! it). Every call is counted: a non-200 answer or a failed connection is an error. The same
//! code backs `outpost bench` (which prints the figures) and the end-to-end test (which
//! requires zero errors).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::bail;
use cloud_coordinator::{AdminClient, CoordinatorHandle, PushOptions};
use edge_agent::AgentHandle;
use model_zoo::{DEFAULT_SEED, DemoModel};
use outpost_runtime::http::{Bytes, HttpClient, Request, StatusCode};
use outpost_shared::Placement;

/// The calls of one phase.
#[derive(Debug, Clone, Default)]
pub struct Phase {
    /// Answered 200.
    pub ok: usize,
    /// Anything else: another status, or no answer; with the first reason seen.
    pub errors: usize,
    /// The first error, in words.
    pub first_error: Option<String>,
    /// Latency of the successful calls.
    pub latencies: Vec<Duration>,
    /// How long the phase ran.
    pub elapsed: Duration,
}

impl Phase {
    /// p50 and p99 of the successful calls (nearest rank).
    pub fn percentiles(&mut self) -> (Duration, Duration) {
        crate::bench::percentiles(&mut self.latencies)
    }

    /// One line of figures.
    pub fn line(&mut self, label: &str) -> String {
        let (p50, p99) = self.percentiles();
        format!(
            "  {label:<22} {:>6} calls in {:>5.1} s, {} errors, p50 {:>7.2} ms, p99 {:>7.2} ms",
            self.ok + self.errors,
            self.elapsed.as_secs_f64(),
            self.errors,
            p50.as_secs_f64() * 1e3,
            p99.as_secs_f64() * 1e3
        )
    }
}

/// The two phases: steady, and during the switches.
#[derive(Debug, Clone)]
pub struct Report {
    /// The model steady for `steady_for`.
    pub steady: Phase,
    /// While the versions switched.
    pub switching: Phase,
    /// The versions served at the end.
    pub final_version: u64,
}

/// A 4-row video-ranker request.
fn body() -> Bytes {
    let features: Vec<f32> = (0..4 * 32).map(|i| (i % 10) as f32 / 10.0).collect();
    Bytes::from(
        serde_json::json!({ "inputs": [
            { "name": "user_features", "shape": [4, 32], "datatype": "FP32", "data": features },
            { "name": "item_ids", "shape": [4], "datatype": "INT64", "data": [1, 2, 3, 4] }
        ]})
        .to_string(),
    )
}

/// Pushes `video-ranker` with the content of `seed`, and waits (at most 2 minutes) until
/// `agent` serves `version`.
async fn switch_to(
    coordinator: &CoordinatorHandle,
    agent: &AgentHandle,
    seed: u64,
    version: u64,
) -> anyhow::Result<()> {
    AdminClient::of(coordinator)
        .push(
            "video-ranker",
            DemoModel::VideoRanker.bytes(seed),
            &PushOptions::default().placement(Placement::Local),
        )
        .await
        .map_err(|e| anyhow::anyhow!("pushing video-ranker: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(120);
    while agent.active_version("video-ranker") != Some(version) {
        if Instant::now() > deadline {
            bail!("the agent did not serve video-ranker version {version} within 2 minutes");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

/// Runs the load: `clients` clients for `steady_for` with the model steady, then during
/// `switches` version switches. The agent must be configured to queue `clients` calls (its
/// profile's `inference_queue`), or the admission limit answers 503 by design.
pub async fn run(
    coordinator: &CoordinatorHandle,
    agent: &AgentHandle,
    clients: usize,
    steady_for: Duration,
    switches: u64,
) -> anyhow::Result<Report> {
    switch_to(coordinator, agent, DEFAULT_SEED, 1).await?;
    let steady = load(agent, clients, async {
        tokio::time::sleep(steady_for).await;
        Ok(())
    })
    .await?;
    let switching = load(agent, clients, async {
        for n in 1..=switches {
            switch_to(coordinator, agent, DEFAULT_SEED + n, n + 1).await?;
        }
        Ok(())
    })
    .await?;
    Ok(Report {
        steady,
        switching,
        final_version: agent.active_version("video-ranker").unwrap_or(0),
    })
}

/// `clients` clients calling until `until` finishes.
async fn load(
    agent: &AgentHandle,
    clients: usize,
    until: impl std::future::Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<Phase> {
    let stop = Arc::new(AtomicBool::new(false));
    let body = body();
    let addr = agent.api_addr;
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (stop, body) = (Arc::clone(&stop), body.clone());
            tokio::spawn(async move {
                let mut phase = Phase::default();
                let mut connection = None;
                while !stop.load(Ordering::SeqCst) {
                    if connection.is_none() {
                        connection = HttpClient::new(addr).connect().await.ok();
                    }
                    let Some(c) = connection.as_mut() else {
                        phase.errors += 1;
                        phase.first_error.get_or_insert("could not connect".into());
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    };
                    let request = Request::post("/v2/models/video-ranker/infer", body.clone())
                        .header("Content-Type", "application/json");
                    let t = Instant::now();
                    match c.send(request).await {
                        Ok(answer) if answer.status == StatusCode::OK => {
                            phase.ok += 1;
                            phase.latencies.push(t.elapsed());
                        }
                        Ok(answer) => {
                            phase.errors += 1;
                            phase.first_error.get_or_insert(format!(
                                "{}: {}",
                                answer.status,
                                answer.text()
                            ));
                        }
                        Err(e) => {
                            phase.errors += 1;
                            phase.first_error.get_or_insert(e.to_string());
                            connection = None;
                        }
                    }
                }
                phase
            })
        })
        .collect();
    let result = until.await;
    stop.store(true, Ordering::SeqCst);
    let mut total = Phase::default();
    for task in tasks {
        let phase = task.await?;
        total.ok += phase.ok;
        total.errors += phase.errors;
        if total.first_error.is_none() {
            total.first_error = phase.first_error;
        }
        total.latencies.extend(phase.latencies);
    }
    total.elapsed = started.elapsed();
    result?;
    Ok(total)
}

/// `outpost bench --switch-only`: a coordinator and one agent in this process, the load of
/// [`run`] with `clients` clients, 5 s steady and `switches` switches; `report` gets the lines.
pub async fn bench(
    clients: usize,
    switches: u64,
    mut report: impl FnMut(&str),
) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let coordinator = crate::bench::loopback_coordinator(dir.path()).await?;
    let fleet = crate::quickstart::DevFleet::of(&coordinator)?;
    let queue = u32::try_from(clients).unwrap_or(u32::MAX);
    let agent = fleet
        .start_agent_with(1, 0, dir.path(), |c| {
            c.profile.inference_queue = Some(queue);
        })
        .await?;
    let mut result = run(
        &coordinator,
        &agent,
        clients,
        Duration::from_secs(5),
        switches,
    )
    .await?;
    report(&format!(
        "load while video-ranker switches versions ({clients} clients, 4-row JSON calls):"
    ));
    report(&result.steady.line("steady"));
    report(
        &result
            .switching
            .line(&format!("during {switches} switches")),
    );
    for (label, phase) in [("steady", &result.steady), ("switching", &result.switching)] {
        if let Some(e) = &phase.first_error {
            report(&format!("  first error ({label}): {e}"));
        }
    }
    agent.shutdown().await;
    coordinator.shutdown().await;
    Ok(())
}
