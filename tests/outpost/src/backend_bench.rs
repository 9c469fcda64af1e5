//! `outpost bench --backend URL`: offloaded calls through the coordinator to an Open Inference
//! Protocol server (Triton, KServe, MLServer) against that server called directly, side by side
//! in one run; and throughput through the coordinator with one replica and with two.
//!
//! The servers must serve the demo `video-ranker` (`model-zoo write --model video-ranker`) under
//! that name; the bench starts a coordinator and an agent on loopback in a temporary folder.
//! Every latency figure is over the same calls, interleaved (direct, then through the agent), on
//! keep-alive connections.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use cloud_coordinator::{AdminClient, PushOptions};
use firmware_config::{BackendEncoding, BackendSection};
use model_zoo::{DEFAULT_SEED, DemoModel};
use outpost_shared::Placement;

use crate::bench::{KeepAlive, json_body, percentiles, ranker_inputs};
use crate::quickstart::DevFleet;

/// The model the servers serve.
const MODEL: &str = "video-ranker";

/// Concurrent callers of the throughput figures.
const CALLERS: usize = 8;

fn backend(name: &str, replicas: &[String]) -> BackendSection {
    BackendSection {
        name: name.into(),
        replicas: replicas.to_vec(),
        models: Vec::new(),
        max_concurrency: 64,
        timeout_ms: 30_000,
        connect_timeout_ms: 1_000,
        health_interval_ms: 1_000,
        circuit_failures: 5,
        circuit_open_ms: 5_000,
        encoding: BackendEncoding::Auto,
        max_response_mb: 64,
    }
}

/// Runs the figures against `urls` (`http://IP:PORT`); `report` gets the lines.
pub async fn run(
    urls: &[String],
    calls: usize,
    report: &mut impl FnMut(&str),
) -> anyhow::Result<()> {
    let addrs: Vec<SocketAddr> = urls
        .iter()
        .map(|u| {
            u.strip_prefix("http://")
                .and_then(|a| a.trim_end_matches('/').parse().ok())
                .with_context(|| format!("--backend {u:?}: give http://IP:PORT"))
        })
        .collect::<anyhow::Result<_>>()?;
    let Some(&first) = addrs.first() else {
        bail!("give at least one --backend");
    };
    let dir = tempfile::tempdir()?;
    let mut config = crate::bench::loopback_config(dir.path())?;
    config.backends.push(backend("one", &urls[..1]));
    config.backends.push(backend("all", urls));
    let coordinator = cloud_coordinator::Coordinator::start(config).await?;
    let fleet = DevFleet::of(&coordinator)?;
    let agent = fleet.start_agent(1, 0, dir.path()).await?;
    let ranker = DemoModel::VideoRanker.bytes(DEFAULT_SEED);
    let admin = AdminClient::of(&coordinator);
    let mut version = 0;
    let mut push_to = async |name: &str| -> anyhow::Result<()> {
        let options = PushOptions::default()
            .placement(Placement::Cloud)
            .backend(name);
        admin
            .push(MODEL, ranker.clone(), &options)
            .await
            .map_err(|e| anyhow::anyhow!("pushing {MODEL} to backend {name}: {e}"))?;
        version += 1;
        crate::bench::wait_until_serving(std::slice::from_ref(&agent), MODEL, version).await
    };
    push_to("one").await?;

    let path = format!("/v2/models/{MODEL}/infer");
    let mut direct = KeepAlive::connect(first).await?;
    let mut through = KeepAlive::connect(agent.api_addr).await?;
    report(&format!(
        "offloaded calls, {MODEL} on {}, {calls} calls each (p50 / p99):",
        urls[0]
    ));
    for batch in [1u64, 256] {
        let json = json_body(&ranker_inputs(batch)?)?;
        for _ in 0..20 {
            direct.post(&path, None, json.clone()).await?;
            through.post(&path, None, json.clone()).await?;
        }
        let (mut d, mut t) = (Vec::with_capacity(calls), Vec::with_capacity(calls));
        for _ in 0..calls {
            let started = Instant::now();
            direct.post(&path, None, json.clone()).await?;
            d.push(started.elapsed());
            let started = Instant::now();
            through.post(&path, None, json.clone()).await?;
            t.push(started.elapsed());
        }
        let (d50, d99) = percentiles(&mut d);
        let (t50, t99) = percentiles(&mut t);
        let ms = |x: Duration| x.as_secs_f64() * 1e3;
        report(&format!(
            "  {batch:>3} rows  backend directly        {:>8.3} ms / {:>8.3} ms",
            ms(d50),
            ms(d99)
        ));
        report(&format!(
            "  {batch:>3} rows  agent → QUIC → backend  {:>8.3} ms / {:>8.3} ms  (overhead {:+.3} / {:+.3} ms)",
            ms(t50),
            ms(t99),
            ms(t50) - ms(d50),
            ms(t99) - ms(d99)
        ));
    }

    let json = json_body(&ranker_inputs(16)?)?;
    let names: &[&str] = if urls.len() > 1 {
        &["one", "all"]
    } else {
        &["one"]
    };
    for (i, name) in names.iter().enumerate() {
        if i > 0 {
            push_to(name).await?;
        }
        let replicas = if *name == "one" { 1 } else { urls.len() };
        let started = Instant::now();
        let mut callers = tokio::task::JoinSet::new();
        for _ in 0..CALLERS {
            let (json, path, addr) = (json.clone(), path.clone(), agent.api_addr);
            callers.spawn(async move {
                let mut client = KeepAlive::connect(addr).await?;
                for _ in 0..calls {
                    client.post(&path, None, json.clone()).await?;
                }
                anyhow::Ok(())
            });
        }
        while let Some(done) = callers.join_next().await {
            done??;
        }
        let rate = (CALLERS * calls) as f64 / started.elapsed().as_secs_f64();
        report(&format!(
            "throughput, {CALLERS} callers, 16 rows a call, {replicas} replica(s): {rate:>8.0} calls/s"
        ));
    }
    agent.shutdown().await;
    coordinator.shutdown().await;
    Ok(())
}
