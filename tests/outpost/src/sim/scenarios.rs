//! The scenarios of `outpost sim`. Each provisions its fleet, starts the agents, runs, and
//! stops everything, failing or not; every wait is bounded by `--timeout`.
//!
//! - `push`: the first install of `ranker` (video-ranker, local), then a new version: when
//!   each agent heard of it (the broker's fan-out, or a QUIC poll) and when it served it,
//!   bytes moved, the coordinator's and the agents' CPU time.
//! - `canary`: `intents` (intent-classifier, cascade at 0.6) on every agent, calls spread over
//!   the fleet; then the same model at 0.99 (it offloads nearly every row) as a canary with a
//!   bake time. The gate must abort it by itself; reported: push to abort, the share of the
//!   fleet that ever ran it, the devices left on it.
//! - `broker-restart` / `coordinator-restart`: the process killed (SIGKILL) and started again
//!   after `--down`, twice: agents with jittered reconnects, then the same agents restarted
//!   without jitter. Reported: time until every agent is back, peak connects per second; for
//!   the coordinator, the local calls answered while it was down.
//! - `churn`: a new version pushed while agents leave and join (a quarter more devices than
//!   agents, some never started before); every agent running at the end must serve it.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use cloud_coordinator::PushOptions;
use cloud_coordinator::admin::PlacementArg;
use edge_agent::AgentHandle;
use model_zoo::{DEFAULT_SEED, DemoModel};
use outpost_runtime::http::{HttpClient, Request, StatusCode};
use outpost_shared::{Placement, Tensor};

use super::fleet::{Broker, SimFleet, own_cpu_s};
use super::{Report, Scenario, Series, SimOptions};

/// How often the agents are looked at.
const POLL: Duration = Duration::from_millis(50);

/// The local model of `push`, `churn` and the restarts.
const RANKER: &str = "ranker";

/// The cascade of `canary`.
const INTENTS: &str = "intents";

/// Calls per second spread over the fleet during `canary`, and the connections making them.
const CANARY_CALLS_PER_S: u64 = 100;
const CANARY_CALLERS: u64 = 8;

/// Agents called while the coordinator is down (`coordinator-restart`).
const OUTAGE_CALLS: usize = 20;

mod canary;
use canary::canary;

/// Runs `options.scenario` in `dir`.
pub(super) async fn run(
    options: &SimOptions,
    dir: &Path,
    progress: &mut dyn FnMut(&str),
) -> anyhow::Result<Report> {
    let devices = match options.scenario {
        Scenario::Churn => options.agents + (options.agents / 4).max(2),
        _ => options.agents,
    };
    let broker = match options.scenario {
        Scenario::BrokerRestart => Broker::Standalone,
        _ => Broker::Embedded,
    };
    progress(&format!("provisioning {devices} devices"));
    let mut fleet = SimFleet::provision(dir, devices, broker, |rollout| {
        rollout.check_interval_s = 1;
    })
    .await?;
    let mut report = Report::new(
        options,
        format!(
            "outpost sim --scenario {} --agents {}",
            options.scenario.name(),
            options.agents
        ),
        "agents",
    );
    let result = async {
        start(&mut fleet, options, &mut report, progress).await?;
        match options.scenario {
            Scenario::Push => push(&mut fleet, options, &mut report, progress).await,
            Scenario::Canary => canary(&mut fleet, options, &mut report, progress).await,
            Scenario::BrokerRestart | Scenario::CoordinatorRestart => {
                restart(&mut fleet, options, &mut report, progress).await
            }
            Scenario::Churn => churn(&mut fleet, options, &mut report, progress).await,
        }
    }
    .await;
    if let Ok(peak) = crate::memory::status_kib("VmHWM:") {
        report.figure("this process, peak resident", peak as f64 / 1024.0, "MiB");
        report.figure(
            "peak resident per agent",
            peak as f64 / 1024.0 / fleet.running().count().max(1) as f64,
            "MiB",
        );
    }
    progress("stopping");
    fleet.shutdown().await;
    result.map(|()| report)
}

/// Starts the agents, waits until each is connected to its broker and reports their memory.
async fn start(
    fleet: &mut SimFleet,
    options: &SimOptions,
    report: &mut Report,
    progress: &mut dyn FnMut(&str),
) -> anyhow::Result<()> {
    let before = crate::memory::status_kib("VmRSS:").ok();
    fleet.start_agents(0..options.agents, progress).await?;
    converge(
        fleet,
        options,
        Instant::now(),
        &[("connected to the broker", &AgentHandle::broker_connected)],
        progress,
    )
    .await?;
    if let (Some(before), Ok(after)) = (before, crate::memory::status_kib("VmRSS:")) {
        report.figure(
            "memory per agent, idle",
            after.saturating_sub(before) as f64 / 1024.0 / options.agents as f64,
            "MiB",
        );
    }
    Ok(())
}

/// Pushes version 1 of `RANKER` (first install) and waits until every agent serves it;
/// reports the memory per agent serving it.
async fn first_install(
    fleet: &mut SimFleet,
    options: &SimOptions,
    report: &mut Report,
    progress: &mut dyn FnMut(&str),
) -> anyhow::Result<()> {
    let before = crate::memory::status_kib("VmRSS:").ok();
    let started = Instant::now();
    push_ranker(fleet, DEFAULT_SEED).await?;
    let serving = |a: &AgentHandle| a.active_version(RANKER) == Some(1);
    let watched = converge(
        fleet,
        options,
        started,
        &[("serving the first version", &serving)],
        progress,
    )
    .await?;
    report.figure("first install: all serving", secs(watched.all), "s");
    if let (Some(before), Ok(after)) = (before, crate::memory::status_kib("VmRSS:")) {
        report.figure(
            "memory per agent, serving (growth)",
            after.saturating_sub(before) as f64 / 1024.0 / options.agents as f64,
            "MiB",
        );
        report.figure("this process, resident", after as f64 / 1024.0, "MiB");
    }
    Ok(())
}

async fn push_ranker(fleet: &SimFleet, seed: u64) -> anyhow::Result<u64> {
    let published = fleet
        .admin
        .push(
            RANKER,
            DemoModel::VideoRanker.bytes(seed),
            &PushOptions::default().placement(Placement::Local),
        )
        .await
        .map_err(|e| anyhow::anyhow!("pushing {RANKER}: {e}"))?;
    Ok(published.version)
}

async fn push(
    fleet: &mut SimFleet,
    options: &SimOptions,
    report: &mut Report,
    progress: &mut dyn FnMut(&str),
) -> anyhow::Result<()> {
    first_install(fleet, options, report, progress).await?;
    let bytes_before = fetched(fleet);
    let cpu_before = (fleet.coordinator_cpu_s(), own_cpu_s());
    let started = Instant::now();
    let version = push_ranker(fleet, DEFAULT_SEED + 1).await?;
    let answered = started.elapsed();
    let heard = move |a: &AgentHandle| {
        a.pending_version(RANKER) == Some(version) || a.active_version(RANKER) == Some(version)
    };
    let serving = move |a: &AgentHandle| a.active_version(RANKER) == Some(version);
    let watched = converge(
        fleet,
        options,
        started,
        &[
            ("heard of the new version", &heard),
            ("serving the new version", &serving),
        ],
        progress,
    )
    .await?;
    let cpu_after = (fleet.coordinator_cpu_s(), own_cpu_s());
    report.figure("push answered", secs(answered), "s");
    report.spread("heard of it (fan-out)", &watched.first[0]);
    report.spread("serving it", &watched.first[1]);
    report.figure("all serving", secs(watched.all), "s");
    let moved = fetched(fleet).saturating_sub(bytes_before);
    report.figure("bytes moved", moved as f64 / 1e6, "MB");
    report.figure(
        "bytes moved per agent",
        moved as f64 / 1e3 / options.agents as f64,
        "kB",
    );
    if let ((Some(c0), Some(s0)), (Some(c1), Some(s1))) = (cpu_before, cpu_after) {
        report.figure("CPU, coordinator (push to all serving)", c1 - c0, "s");
        report.figure("CPU, agents (push to all serving)", s1 - s0, "s");
    }
    report.series = watched.series;
    Ok(())
}

/// An intent-classifier request: 16 rows of 8 tokens.
fn intents_body() -> anyhow::Result<outpost_runtime::http::Bytes> {
    let tokens: Vec<i64> = (0..16 * 8).map(|i| (i * 7919) % 8000).collect();
    let tensor = Tensor::from_values("token_ids", vec![16, 8], &tokens)?.to_json()?;
    let body = serde_json::json!({ "inputs": [tensor] });
    Ok(serde_json::to_vec(&body)?.into())
}

/// A video-ranker request of one row.
fn ranker_body() -> anyhow::Result<outpost_runtime::http::Bytes> {
    let features: Vec<f32> = (0..32).map(|i| (i % 7) as f32 / 7.0).collect();
    let body = serde_json::json!({ "inputs": [
        Tensor::from_values("user_features", vec![1, 32], &features)?.to_json()?,
        Tensor::from_values("item_ids", vec![1], &[42i64])?.to_json()?,
    ] });
    Ok(serde_json::to_vec(&body)?.into())
}

async fn restart(
    fleet: &mut SimFleet,
    options: &SimOptions,
    report: &mut Report,
    progress: &mut dyn FnMut(&str),
) -> anyhow::Result<()> {
    let coordinator = options.scenario == Scenario::CoordinatorRestart;
    first_install(fleet, options, report, progress).await?;
    report.plot_y = "agents back on the broker".into();
    let mut series = Vec::new();
    for jitter in [true, false] {
        let label = if jitter {
            "with jitter"
        } else {
            "without jitter"
        };
        if !jitter {
            progress("restarting the agents without reconnect jitter");
            fleet.stop_agents().await;
            fleet.jitter = false;
            fleet.start_agents(0..options.agents, progress).await?;
            converge(
                fleet,
                options,
                Instant::now(),
                &[("connected to the broker", &AgentHandle::broker_connected)],
                progress,
            )
            .await?;
        }
        let killed = Instant::now();
        progress(&format!(
            "{label}: killing the {}",
            if coordinator { "coordinator" } else { "broker" }
        ));
        if coordinator {
            fleet.kill_coordinator();
        } else {
            fleet.kill_broker();
        }
        let lost = |a: &AgentHandle| !a.broker_connected();
        converge(
            fleet,
            options,
            killed,
            &[("noticed the loss", &lost)],
            progress,
        )
        .await?;
        if coordinator {
            let (answered, asked) = call_during_outage(fleet).await?;
            report.figure(
                format!("{label}: local calls answered while it was down"),
                answered as f64,
                "",
            );
            report.figure(format!("{label}: local calls made"), asked as f64, "");
        }
        tokio::time::sleep(options.down.saturating_sub(killed.elapsed())).await;
        let connects_before = connects(fleet);
        if coordinator {
            fleet.start_coordinator().await?;
        } else {
            fleet.start_broker().await?;
        }
        let restarted = Instant::now();
        let watched = converge(
            fleet,
            options,
            restarted,
            &[("back on the broker", &AgentHandle::broker_connected)],
            progress,
        )
        .await?;
        report.figure(format!("{label}: all back"), secs(watched.all), "s");
        report.spread(&format!("{label}: back"), &watched.first[0]);
        report.figure(
            format!("{label}: peak connects"),
            peak_per_second(&watched.connects),
            "/s",
        );
        report.figure(
            format!("{label}: connects made"),
            connects(fleet).saturating_sub(connects_before) as f64,
            "",
        );
        series.extend(watched.series.into_iter().map(|s| Series {
            label: label.to_owned(),
            points: s.points,
        }));
    }
    report.series = series;
    Ok(())
}

/// Local `RANKER` calls to [`OUTAGE_CALLS`] agents spread over the fleet: (answered, made).
async fn call_during_outage(fleet: &SimFleet) -> anyhow::Result<(usize, usize)> {
    let body = ranker_body()?;
    let addrs: Vec<_> = fleet.running().map(|a| a.api_addr).collect();
    let step = (addrs.len() / OUTAGE_CALLS).max(1);
    let mut answered = 0;
    let mut made = 0;
    for addr in addrs.iter().step_by(step).take(OUTAGE_CALLS) {
        made += 1;
        let request = Request::post(format!("/v2/models/{RANKER}/infer"), body.clone())
            .header("Content-Type", "application/json");
        if let Ok(r) = HttpClient::new(*addr).send(request).await
            && r.status == StatusCode::OK
        {
            answered += 1;
        }
    }
    Ok((answered, made))
}

async fn churn(
    fleet: &mut SimFleet,
    options: &SimOptions,
    report: &mut Report,
    progress: &mut dyn FnMut(&str),
) -> anyhow::Result<()> {
    first_install(fleet, options, report, progress).await?;
    let started = Instant::now();
    let version = push_ranker(fleet, DEFAULT_SEED + 1).await?;
    let devices = fleet.agents.len();
    let mut stopping: Vec<Option<tokio::task::JoinHandle<()>>> =
        (0..devices).map(|_| None).collect();
    let mut started_before: Vec<bool> = (0..devices).map(|i| i < options.agents).collect();
    let (mut leaves, mut joins, mut new_joins) = (0u64, 0u64, 0u64);
    let mut running_curve = Vec::new();
    let mut serving_curve = Vec::new();
    // One leave and one join about every `period`: the whole fleet turns over about once.
    let period = (options.churn / u32::try_from(options.agents).unwrap_or(u32::MAX))
        .max(Duration::from_millis(20));
    let mut last_line = Instant::now();
    while started.elapsed() < options.churn {
        let running: Vec<usize> = (0..devices)
            .filter(|&i| fleet.agents[i].is_some())
            .collect();
        if let Some(&leaving) = running.get(pick(running.len())) {
            stopping[leaving] = fleet.stop_agent(leaving);
            leaves += 1;
        }
        let free: Vec<usize> = (0..devices)
            .filter(|&i| {
                fleet.agents[i].is_none() && stopping[i].as_ref().is_none_or(|t| t.is_finished())
            })
            .collect();
        if let Some(&joining) = free.get(pick(free.len())) {
            fleet.start_agent(joining).await?;
            joins += 1;
            if !started_before[joining] {
                new_joins += 1;
                started_before[joining] = true;
            }
        }
        let t = secs(started.elapsed());
        running_curve.push((t, fleet.running().count() as f64));
        serving_curve.push((
            t,
            fleet
                .running()
                .filter(|a| a.active_version(RANKER) == Some(version))
                .count() as f64,
        ));
        if last_line.elapsed() >= Duration::from_secs(1) {
            last_line = Instant::now();
            progress(&format!(
                "churn: {leaves} left, {joins} joined, {} of {} running serve the new version",
                serving_curve.last().map_or(0.0, |p| p.1),
                fleet.running().count()
            ));
        }
        tokio::time::sleep(period).await;
    }
    for task in stopping.into_iter().flatten() {
        let _ = task.await;
    }
    let churn_end = Instant::now();
    let serving = move |a: &AgentHandle| a.active_version(RANKER) == Some(version);
    let watched = converge(
        fleet,
        options,
        started,
        &[("serving the new version", &serving)],
        progress,
    )
    .await?;
    report.figure("churn", secs(options.churn), "s");
    report.figure("leaves", leaves as f64, "");
    report.figure("joins", joins as f64, "");
    report.figure(
        "joins of devices never started before",
        new_joins as f64,
        "",
    );
    report.figure(
        "agents running at the end",
        fleet.running().count() as f64,
        "agents",
    );
    report.figure("push to all running serving it", secs(watched.all), "s");
    report.figure(
        "churn end to all running serving it",
        secs(churn_end.elapsed().min(watched.all)),
        "s",
    );
    let offset = secs(churn_end.duration_since(started));
    serving_curve.extend(
        watched.series[0]
            .points
            .iter()
            .map(|&(t, n)| (t.max(offset), n)),
    );
    report.series = vec![
        Series {
            label: "running".into(),
            points: running_curve,
        },
        Series {
            label: "running and serving the new version".into(),
            points: serving_curve,
        },
    ];
    Ok(())
}

/// A pseudo-random index below `len` (0 when `len` is 0).
fn pick(len: usize) -> usize {
    (outpost_runtime::backoff::jitter() * len as f64) as usize % len.max(1)
}

/// What [`converge`] saw.
#[derive(Debug)]
struct Converged {
    /// Per check, the time each agent first passed it (from `since`).
    first: Vec<Vec<Duration>>,
    /// Until every agent passed the last check.
    all: Duration,
    /// Per check, agents passing it over time (a point where the count changed).
    series: Vec<Series>,
    /// The agents' MQTT connects, summed, over time (every poll).
    connects: Vec<(f64, f64)>,
}

type Check<'a> = (&'a str, &'a dyn Fn(&AgentHandle) -> bool);

/// Polls the running agents every [`POLL`] until every one passes the last of `checks`
/// (checks are not required to stay passed: the first pass counts), for at most
/// `options.timeout`; `progress` gets a line a second.
async fn converge(
    fleet: &SimFleet,
    options: &SimOptions,
    since: Instant,
    checks: &[Check<'_>],
    progress: &mut dyn FnMut(&str),
) -> anyhow::Result<Converged> {
    let devices = fleet.agents.len();
    let mut first: Vec<Vec<Option<Duration>>> = vec![vec![None; devices]; checks.len()];
    let mut series: Vec<Series> = checks
        .iter()
        .map(|(label, _)| Series {
            label: (*label).to_owned(),
            points: Vec::new(),
        })
        .collect();
    let mut connects = Vec::new();
    let mut last_line = Instant::now();
    let Some((last_label, _)) = checks.last() else {
        bail!("nothing to wait for");
    };
    loop {
        let t = since.elapsed();
        let mut total = 0usize;
        let mut sum_connects = 0u64;
        for (i, agent) in fleet.agents.iter().enumerate() {
            let Some(agent) = agent else { continue };
            total += 1;
            sum_connects += agent.counters().broker_connects;
            for (c, (_, check)) in checks.iter().enumerate() {
                if first[c][i].is_none() && check(agent) {
                    first[c][i] = Some(t);
                }
            }
        }
        connects.push((secs(t), sum_connects as f64));
        let passed: Vec<usize> = first
            .iter()
            .map(|f| {
                fleet
                    .agents
                    .iter()
                    .zip(f)
                    .filter(|(a, f)| a.is_some() && f.is_some())
                    .count()
            })
            .collect();
        for (s, &n) in series.iter_mut().zip(&passed) {
            if s.points.last().is_none_or(|&(_, m)| m != n as f64) {
                s.points.push((secs(t), n as f64));
            }
        }
        let done = passed.last().copied().unwrap_or(0);
        if done == total {
            let running = |f: &Vec<Option<Duration>>| -> Vec<Duration> {
                fleet
                    .agents
                    .iter()
                    .zip(f)
                    .filter_map(|(a, f)| a.as_ref().and(*f))
                    .collect()
            };
            return Ok(Converged {
                first: first.iter().map(running).collect(),
                all: t,
                series,
                connects,
            });
        }
        if t > options.timeout {
            let stuck: Vec<String> = fleet
                .agents
                .iter()
                .zip(&first[checks.len() - 1])
                .filter_map(|(a, f)| a.as_ref().filter(|_| f.is_none()))
                .take(3)
                .map(|a| {
                    let status = a.status();
                    format!(
                        "{}: {}",
                        a.device_id,
                        status
                            .broker_error
                            .or(status.last_error)
                            .unwrap_or_else(|| "no error reported".into())
                    )
                })
                .collect();
            bail!(
                "{done} of {total} agents {last_label} after --timeout {:?}; for example {}",
                options.timeout,
                stuck.join("; ")
            );
        }
        if last_line.elapsed() >= Duration::from_secs(1) {
            last_line = Instant::now();
            progress(&format!(
                "{done}/{total} agents {last_label} ({:.1} s)",
                t.as_secs_f64()
            ));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// The most connects in any one-second window of a cumulative `(seconds, count)` series.
fn peak_per_second(cumulative: &[(f64, f64)]) -> f64 {
    let mut peak = 0.0f64;
    let mut start = 0;
    for &(t, c) in cumulative {
        while cumulative[start].0 < t - 1.0 {
            start += 1;
        }
        // The window (t - 1 s, t]: the count before its first point is the one at `start - 1`.
        let base = if start == 0 {
            cumulative[0].1
        } else {
            cumulative[start - 1].1
        };
        peak = peak.max(c - base);
    }
    peak
}

fn connects(fleet: &SimFleet) -> u64 {
    fleet.running().map(|a| a.counters().broker_connects).sum()
}

fn fetched(fleet: &SimFleet) -> u64 {
    fleet.running().map(|a| a.counters().bytes_fetched).sum()
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_peak_is_the_busiest_second() {
        // 10 connects in the first half second, 30 between 2.0 and 2.9 s, 5 after.
        let series = [
            (0.0, 0.0),
            (0.5, 10.0),
            (1.0, 10.0),
            (2.0, 10.0),
            (2.5, 25.0),
            (2.9, 40.0),
            (4.0, 45.0),
        ];
        assert_eq!(peak_per_second(&series), 30.0);
        assert_eq!(peak_per_second(&[]), 0.0);
    }
}
