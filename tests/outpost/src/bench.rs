//! `outpost bench`: the agent measured against its baselines, side by side in one run.
//!
//! - Local inference: the agent's Open Inference Protocol API (JSON, and the binary tensor
//!   extension) against the same engine called in-process, and that engine against itself on its
//!   symbolic plan only, on `video-ranker` with 1 and 256 candidates; p50 and p99 over a fixed
//!   number of calls (one keep-alive connection for the API).
//! - Idle memory: the growth of this process's resident set when one agent starts with no model.
//! - Push to serving: from a push to every agent serving the new version, for 1, 10 and 100
//!   agents in this process (one coordinator, its embedded broker).
//!
//! Everything runs on loopback in a temporary folder; run it with `--release`.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::bail;
use cloud_coordinator::{AdminClient, Coordinator, CoordinatorHandle, PushOptions};
use edge_agent::AgentHandle;
use firmware_config::CoordinatorConfig;
use model_zoo::{DEFAULT_SEED, DemoModel};
use outpost_runtime::http::{Bytes, HttpClient, HttpConnection, Request, StatusCode};
use outpost_runtime::quantize::quantize_int8;
use outpost_runtime::tract::{TractModel, TractOptions};
use outpost_shared::{Placement, Tensor};

use crate::quickstart::DevFleet;

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Calls per latency figure.
    pub calls: usize,
    /// Agent counts for push-to-serving.
    pub agents: Vec<u32>,
    /// Only the GPU-against-tract figures.
    pub gpu_only: bool,
    /// Only the local API against the engine in-process (and idle memory).
    pub api_only: bool,
}

/// Runs every benchmark; `report` gets the result lines.
pub async fn run(options: &BenchOptions, mut report: impl FnMut(&str)) -> anyhow::Result<()> {
    let calls = options.calls;
    let gpu =
        || async move { tokio::task::spawn_blocking(move || gpu_against_tract(calls)).await? };
    if options.gpu_only {
        for line in gpu().await? {
            report(&line);
        }
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let coordinator = loopback_coordinator(dir.path()).await?;
    let fleet = DevFleet::of(&coordinator)?;

    // Idle memory first, before anything else grows the process.
    let before = crate::memory::status_kib("VmRSS:").ok();
    let first = fleet.start_agent(1, 0, dir.path()).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    match (before, crate::memory::status_kib("VmRSS:").ok()) {
        (Some(b), Some(a)) => report(&format!(
            "agent idle, no model: +{:.1} MiB resident (this process: {:.1} → {:.1} MiB)",
            a.saturating_sub(b) as f64 / 1024.0,
            b as f64 / 1024.0,
            a as f64 / 1024.0
        )),
        _ => report("agent idle, no model: resident memory is only read on Linux"),
    }

    let ranker = DemoModel::VideoRanker.bytes(DEFAULT_SEED);
    push(&coordinator, "video-ranker", &ranker).await?;
    wait_until_serving(std::slice::from_ref(&first), "video-ranker", 1).await?;
    latency(&first, &ranker, options.calls, &mut report).await?;
    if options.api_only {
        first.shutdown().await;
        coordinator.shutdown().await;
        return Ok(());
    }

    let mut agents = vec![first];
    for (round, &count) in options.agents.iter().enumerate() {
        while agents.len() < count as usize {
            let n = agents.len() as u32 + 1;
            agents.push(fleet.start_agent(n, 0, dir.path()).await?);
        }
        let serving = &agents[..count as usize];
        // New content each round, so every agent fetches and loads it.
        let model = DemoModel::VideoRanker.bytes(DEFAULT_SEED + 1 + round as u64);
        let version = round as u64 + 1;
        let started = Instant::now();
        push(&coordinator, "push-bench", &model).await?;
        let pushed = started.elapsed();
        wait_until_serving(serving, "push-bench", version).await?;
        report(&format!(
            "push to serving, {count:>3} agents: {:>7.1} ms (of which the push answered in {:.1} ms)",
            started.elapsed().as_secs_f64() * 1e3,
            pushed.as_secs_f64() * 1e3
        ));
    }
    for agent in agents {
        agent.shutdown().await;
    }
    coordinator.shutdown().await;
    // Last, so the GPU's driver threads and memory do not colour the figures above.
    for line in gpu().await? {
        report(&line);
    }
    Ok(())
}

async fn push(coordinator: &CoordinatorHandle, name: &str, model: &[u8]) -> anyhow::Result<()> {
    let options = PushOptions::default().placement(Placement::Local);
    AdminClient::of(coordinator)
        .push(name, model.to_vec(), &options)
        .await
        .map_err(|e| anyhow::anyhow!("pushing {name} failed: {e}"))?;
    Ok(())
}

pub(crate) async fn wait_until_serving(
    agents: &[AgentHandle],
    model: &str,
    version: u64,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(300);
    while !agents
        .iter()
        .all(|a| a.active_version(model) == Some(version))
    {
        if Instant::now() > deadline {
            bail!("agents did not serve {model} version {version} within 5 minutes");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

/// The API (JSON and binary) against the engine in-process, same bytes, same options.
async fn latency(
    agent: &AgentHandle,
    ranker: &[u8],
    calls: usize,
    report: &mut impl FnMut(&str),
) -> anyhow::Result<()> {
    let int8 = quantize_int8(ranker)?.bytes;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let engine = TractModel::load_with(
        &int8,
        TractOptions {
            threads: threads.min(4),
            ..TractOptions::default()
        },
    )
    .map_err(anyhow::Error::msg)?;
    // The baseline for shape plans: the same engine on its symbolic plan only.
    let symbolic = TractModel::load_with(
        &int8,
        TractOptions {
            threads: threads.min(4),
            shape_plans: 0,
        },
    )
    .map_err(anyhow::Error::msg)?;
    let mut client = KeepAlive::connect(agent.api_addr).await?;
    report(&format!(
        "local inference, video-ranker int8, {calls} calls each (p50 / p99):"
    ));
    for batch in [1u64, 256] {
        let inputs = ranker_inputs(batch)?;
        let json = json_body(&inputs)?;
        let (binary, header) = binary_body(&inputs);
        let binary = Bytes::from(binary);
        let path = "/v2/models/video-ranker/infer";
        let binary_header = header.len().to_string();
        // Warm up: both sides optimise a plan for this batch size in the background.
        for _ in 0..20 {
            engine.run(&inputs).map_err(|e| anyhow::anyhow!("{e}"))?;
            symbolic.run(&inputs).map_err(|e| anyhow::anyhow!("{e}"))?;
            client.post(path, None, json.clone()).await?;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;

        let mut in_process = Vec::with_capacity(calls);
        let mut in_process_symbolic = Vec::with_capacity(calls);
        let mut api_json = Vec::with_capacity(calls);
        let mut api_binary = Vec::with_capacity(calls);
        let mut http_floor = Vec::with_capacity(calls);
        // Interleaved, so drift (thermal, other load) hits all three alike.
        for _ in 0..calls {
            let t = Instant::now();
            client.get("/v2/health/live").await?;
            http_floor.push(t.elapsed());
            let t = Instant::now();
            engine.run(&inputs).map_err(|e| anyhow::anyhow!("{e}"))?;
            in_process.push(t.elapsed());
            let t = Instant::now();
            symbolic.run(&inputs).map_err(|e| anyhow::anyhow!("{e}"))?;
            in_process_symbolic.push(t.elapsed());
            let t = Instant::now();
            client.post(path, None, json.clone()).await?;
            api_json.push(t.elapsed());
            let t = Instant::now();
            client
                .post(path, Some(&binary_header), binary.clone())
                .await?;
            api_binary.push(t.elapsed());
        }
        for (what, samples) in [
            ("in-process engine", &mut in_process),
            ("in-process, symbolic", &mut in_process_symbolic),
            ("API, JSON", &mut api_json),
            ("API, binary tensors", &mut api_binary),
            ("HTTP floor (live)", &mut http_floor),
        ] {
            let (p50, p99) = percentiles(samples);
            report(&format!(
                "  {batch:>3} candidates  {what:<20} {:>8.3} ms / {:>8.3} ms",
                p50.as_secs_f64() * 1e3,
                p99.as_secs_f64() * 1e3
            ));
        }
    }
    Ok(())
}

/// The GPU engine against tract on video-ranker int8, 1, 64 and 1024 candidates, interleaved
/// call by call. Any adapter is used (a software one only shows the GPU path's overhead).
fn gpu_against_tract(calls: usize) -> anyhow::Result<Vec<String>> {
    use outpost_gpu::{GpuContext, GpuModel, GpuOptions};
    let mut lines = Vec::new();
    let bytes =
        outpost_runtime::quantize::quantize_int8(&DemoModel::VideoRanker.bytes(DEFAULT_SEED))?
            .bytes;
    let cpu = outpost_runtime::tract::TractModel::load(&bytes).map_err(anyhow::Error::msg)?;
    let mut engines: Vec<(String, Box<dyn outpost_runtime::Engine>)> = Vec::new();
    for (dot4, f16) in [(false, false), (true, false), (true, true)] {
        let options = GpuOptions {
            allow_software: true,
            dot4,
            weight_block_bytes: None,
            f16,
        };
        match GpuContext::new(options) {
            Ok(ctx) if dot4 && !ctx.adapter().dot4 || f16 && !ctx.adapter().f16 => {}
            Ok(ctx) => {
                let a = ctx.adapter().clone();
                let gpu = GpuModel::load(&bytes, ctx)?;
                if !dot4 {
                    lines.push(format!(
                        "GPU adapter: {} ({}, {}); weights on the GPU: {} bytes",
                        a.name,
                        a.backend,
                        a.device_type,
                        gpu.weight_bytes()
                    ));
                }
                let label = match (dot4, f16) {
                    (true, true) => "wgpu, dot4, f16 activations",
                    (true, false) => "wgpu, int8 x int8 (dot4)",
                    _ => "wgpu, int8 unpacked",
                };
                engines.push((label.to_owned(), Box::new(gpu)));
            }
            Err(e) => {
                lines.push(format!("GPU: none usable ({e})"));
                return Ok(lines);
            }
        }
    }
    engines.push(("tract (CPU, 1 thread)".to_owned(), Box::new(cpu)));
    lines.push(format!(
        "GPU vs tract, video-ranker int8, {calls} calls each (p50 / p99):"
    ));
    for batch in [1u64, 64, 1024] {
        let inputs = ranker_inputs(batch)?;
        // Warm up every engine (shapes prepared, tract's shape plan optimised).
        for (_, e) in &engines {
            for _ in 0..20 {
                e.run(&inputs).map_err(anyhow::Error::msg)?;
            }
        }
        std::thread::sleep(Duration::from_millis(500));
        let mut samples: Vec<Vec<Duration>> = vec![Vec::with_capacity(calls); engines.len()];
        for _ in 0..calls {
            for (i, (_, e)) in engines.iter().enumerate() {
                let t = Instant::now();
                e.run(&inputs).map_err(anyhow::Error::msg)?;
                samples[i].push(t.elapsed());
            }
        }
        for ((label, _), s) in engines.iter().zip(&mut samples) {
            let (p50, p99) = percentiles(s);
            lines.push(format!(
                "  {batch:>4} candidates  {label:<28} {:>8.3} ms / {:>8.3} ms",
                p50.as_secs_f64() * 1e3,
                p99.as_secs_f64() * 1e3
            ));
        }
    }
    Ok(lines)
}

pub(crate) fn ranker_inputs(batch: u64) -> anyhow::Result<Vec<Tensor>> {
    let features: Vec<f32> = (0..batch * 32)
        .map(|i| ((i * 7 % 13) as f32) / 13.0)
        .collect();
    let ids: Vec<i64> = (0..batch as i64)
        .map(|i| (i * 97) % model_zoo::CATALOG_ITEMS as i64)
        .collect();
    Ok(vec![
        Tensor::from_values("user_features", vec![batch, 32], &features)?,
        Tensor::from_values("item_ids", vec![batch], &ids)?,
    ])
}

/// The largest absolute difference between two runs' float outputs (by position; other kinds
/// must be equal, or the difference is infinite).
pub(crate) fn largest_difference(a: &[Tensor], b: &[Tensor]) -> anyhow::Result<f64> {
    anyhow::ensure!(
        a.len() == b.len(),
        "{} outputs against {}",
        a.len(),
        b.len()
    );
    let mut largest = 0f64;
    for (x, y) in a.iter().zip(b) {
        anyhow::ensure!(
            x.shape() == y.shape(),
            "output {:?}: shape {:?} against {:?}",
            x.name(),
            x.shape(),
            y.shape()
        );
        if x.datatype() == outpost_shared::DataType::Fp32 {
            let (xs, ys) = (x.to_values::<f32>()?, y.to_values::<f32>()?);
            for (u, v) in xs.iter().zip(&ys) {
                let d = f64::from((u - v).abs());
                if d.is_nan() {
                    return Ok(f64::NAN);
                }
                largest = largest.max(d);
            }
        } else if x.data() != y.data() {
            largest = f64::INFINITY;
        }
    }
    Ok(largest)
}

/// p50 and p99 (nearest rank).
pub(crate) fn percentiles(samples: &mut [Duration]) -> (Duration, Duration) {
    samples.sort_unstable();
    let at = |q: f64| {
        let i = ((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len().max(1)) - 1;
        samples.get(i).copied().unwrap_or_default()
    };
    (at(0.50), at(0.99))
}

/// One HTTP/1.1 keep-alive connection, as a client library would hold.
pub(crate) struct KeepAlive {
    connection: HttpConnection,
}

impl KeepAlive {
    pub(crate) async fn connect(addr: std::net::SocketAddr) -> anyhow::Result<Self> {
        Ok(Self {
            connection: HttpClient::new(addr).connect().await?,
        })
    }

    /// POSTs `body` as JSON, or as binary tensors after a JSON header of `binary_header` bytes;
    /// fails unless the answer is 200. Returns the body.
    pub(crate) async fn post(
        &mut self,
        path: &str,
        binary_header: Option<&str>,
        body: Bytes,
    ) -> anyhow::Result<Bytes> {
        let mut request = Request::post(path, body).header("Content-Type", "application/json");
        if let Some(length) = binary_header {
            request = request.header("Inference-Header-Content-Length", length);
        }
        let answer = self.connection.send(request).await?;
        if answer.status != StatusCode::OK {
            bail!("{}: {}", answer.status, answer.text());
        }
        Ok(answer.body)
    }

    /// GETs `path`; fails unless the answer is 200.
    pub(crate) async fn get(&mut self, path: &str) -> anyhow::Result<()> {
        let answer = self.connection.send(Request::get(path)).await?;
        if answer.status != StatusCode::OK {
            bail!("{}: {}", answer.status, answer.text());
        }
        Ok(())
    }
}

/// An inference body with `inputs` as JSON.
pub(crate) fn json_body(inputs: &[Tensor]) -> anyhow::Result<Bytes> {
    let inputs = inputs
        .iter()
        .map(|t| t.to_json())
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Bytes::from(
        serde_json::json!({ "inputs": inputs }).to_string(),
    ))
}

/// An inference body with the binary tensor extension: a JSON header (outputs asked as binary
/// too), then `inputs`' bytes; and the header's length, for `Inference-Header-Content-Length`.
pub(crate) fn binary_body(inputs: &[Tensor]) -> (Vec<u8>, String) {
    let header = serde_json::json!({
        "inputs": inputs.iter().map(|t| serde_json::json!({
            "name": t.name(), "shape": t.shape(), "datatype": t.datatype().as_str(),
            "parameters": { "binary_data_size": t.data().len() }
        })).collect::<Vec<_>>(),
        "parameters": { "binary_data_output": true }
    })
    .to_string();
    let mut body = header.clone().into_bytes();
    for t in inputs {
        body.extend_from_slice(t.data());
    }
    (body, header)
}

/// A dev-mode coordinator with every listener on a free loopback port and its data in
/// `dir/coordinator`.
pub(crate) async fn loopback_coordinator(dir: &Path) -> anyhow::Result<CoordinatorHandle> {
    Ok(Coordinator::start(loopback_config(dir)?).await?)
}

/// The config of [`loopback_coordinator`].
pub(crate) fn loopback_config(dir: &Path) -> anyhow::Result<CoordinatorConfig> {
    let mut config = CoordinatorConfig::default();
    config.storage.data_dir = dir.join("coordinator");
    config.quic.listen = "127.0.0.1:0".parse()?;
    config.admin.listen = "127.0.0.1:0".parse()?;
    config.mqtt.listen = Some("127.0.0.1:0".parse()?);
    Ok(config)
}
