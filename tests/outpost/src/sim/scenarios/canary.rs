//! The canary scenario: a less confident candidate pushed to a share of the fleet under the
//! health gate, with calls spread over the fleet, until the gate aborts it.

use super::*;

pub(super) async fn canary(
    fleet: &mut SimFleet,
    options: &SimOptions,
    report: &mut Report,
    progress: &mut dyn FnMut(&str),
) -> anyhow::Result<()> {
    let bytes = DemoModel::IntentClassifier.bytes(DEFAULT_SEED);
    let stable = placement("cascade:intent_probs:0.6")?;
    fleet
        .admin
        .push(
            INTENTS,
            bytes.clone(),
            &PushOptions::default().placement(stable),
        )
        .await
        .map_err(|e| anyhow::anyhow!("pushing {INTENTS}: {e}"))?;
    let started = Instant::now();
    let on_stable = |a: &AgentHandle| a.active_version(INTENTS) == Some(1);
    converge(
        fleet,
        options,
        started,
        &[("serving the stable version", &on_stable)],
        progress,
    )
    .await?;

    // Calls spread over the fleet, as apps would make them, for the health the gate reads.
    let addrs: Arc<Vec<std::net::SocketAddr>> =
        Arc::new(fleet.running().map(|a| a.api_addr).collect());
    let calls = Arc::new(CallCounts::default());
    let (stop_calls, calling) = tokio::sync::watch::channel(false);
    let mut callers = Vec::new();
    for k in 0..CANARY_CALLERS {
        callers.push(tokio::spawn(call_spread(
            addrs.clone(),
            calls.clone(),
            k,
            calling.clone(),
        )));
    }

    let percent = options.canary_percent;
    let mut candidate = PushOptions::default().placement(placement("cascade:intent_probs:0.99")?);
    candidate.query.canary = Some(percent);
    candidate.query.rollout_percent = percent;
    candidate.query.bake_s = Some(options.bake.as_secs());
    candidate.query.max_offload_increase = Some(0.1);
    // Two cohorts on two shared cores: latency is noise here, the offload share is the signal.
    candidate.query.max_p99_regression = Some(1.0);
    let pushed = Instant::now();
    let version = fleet
        .admin
        .push(INTENTS, bytes, &candidate)
        .await
        .map_err(|e| anyhow::anyhow!("pushing the candidate: {e}"))?
        .version;

    let mut ever = vec![false; fleet.agents.len()];
    let mut curve = Vec::new();
    let mut aborted: Option<(Duration, String)> = None;
    let mut cleared: Option<Duration> = None;
    let mut last_check = Instant::now() - Duration::from_secs(1);
    let mut last_line = Instant::now();
    let outcome = loop {
        let mut on = 0usize;
        for (i, agent) in fleet.agents.iter().enumerate() {
            if let Some(agent) = agent
                && agent.active_version(INTENTS) == Some(version)
            {
                on += 1;
                ever[i] = true;
            }
        }
        let t = pushed.elapsed();
        if curve.last().is_none_or(|&(_, n)| n != on as f64) {
            curve.push((secs(t), on as f64));
        }
        if aborted.is_none() && last_check.elapsed() >= Duration::from_millis(500) {
            last_check = Instant::now();
            if let Some(reason) = abort_reason(fleet, version).await? {
                aborted = Some((t, reason));
            }
        }
        if aborted.is_some() && on == 0 && cleared.is_none() {
            cleared = Some(t);
        }
        if let Some(cleared) = cleared
            && t >= cleared + Duration::from_secs(2)
        {
            break Ok(on);
        }
        if t > options.bake + options.timeout {
            break Err(anyhow::anyhow!(
                "the candidate was not {} within the bake time and --timeout ({:?} + {:?}); {on} devices run it",
                if aborted.is_some() {
                    "left by every device"
                } else {
                    "aborted"
                },
                options.bake,
                options.timeout
            ));
        }
        if last_line.elapsed() >= Duration::from_secs(1) {
            last_line = Instant::now();
            progress(&format!(
                "canary: {on} agents on the candidate, {} calls, {}, {:.0} s",
                calls.ok.load(Ordering::Relaxed),
                if aborted.is_some() {
                    "aborted"
                } else {
                    "baking"
                },
                t.as_secs_f64()
            ));
        }
        tokio::time::sleep(POLL).await;
    };
    let _ = stop_calls.send(true);
    for caller in callers {
        let _ = caller.await;
    }
    let left = outcome?;
    let (abort_at, reason) = aborted.context("no abort recorded")?;
    let ever = ever.iter().filter(|&&e| e).count();
    report.figure("canary asked", f64::from(percent), "%");
    report.figure("bake time", secs(options.bake), "s");
    report.figure("push to abort", secs(abort_at), "s");
    if abort_at < options.bake {
        report.notes.push(
            "the gate aborts as soon as a limit is past (with enough calls), before the bake ends; the bake only holds back widening".into(),
        );
    }
    report.figure("devices that ever ran the candidate", ever as f64, "agents");
    report.figure(
        "share of the fleet that ever ran it",
        ever as f64 * 100.0 / options.agents as f64,
        "%",
    );
    report.figure(
        "push to none on the candidate",
        secs(cleared.unwrap_or_default()),
        "s",
    );
    report.figure("devices left on the candidate", left as f64, "agents");
    report.figure(
        "calls answered",
        calls.ok.load(Ordering::Relaxed) as f64,
        "",
    );
    report.figure(
        "calls failed",
        calls.failed.load(Ordering::Relaxed) as f64,
        "",
    );
    report.notes.push(format!("the gate's reason: {reason}"));
    report.series = vec![Series {
        label: "agents on the candidate".into(),
        points: curve,
    }];
    Ok(())
}

fn placement(text: &str) -> anyhow::Result<Placement> {
    text.parse::<PlacementArg>()
        .map(|p| p.0)
        .map_err(anyhow::Error::msg)
}

/// The reason of the gate's abort of `version`, once it has aborted it.
async fn abort_reason(fleet: &SimFleet, version: u64) -> anyhow::Result<Option<String>> {
    let models = fleet
        .admin
        .models()
        .await
        .map_err(|e| anyhow::anyhow!("reading the models: {e}"))?;
    Ok(models
        .into_iter()
        .find(|m| m.name == INTENTS)
        .and_then(|m| {
            m.rollout_history
                .into_iter()
                .find(|e| e.version == version && e.step == "abort")
        })
        .map(|e| e.reason))
}

#[derive(Debug, Default)]
struct CallCounts {
    ok: AtomicU64,
    failed: AtomicU64,
}

/// One caller of `canary`: an `INTENTS` call to agent `k`, `k + CALLERS`, … in turn, at its
/// share of [`CANARY_CALLS_PER_S`], until `stop`.
async fn call_spread(
    addrs: Arc<Vec<std::net::SocketAddr>>,
    counts: Arc<CallCounts>,
    k: u64,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let body = match intents_body() {
        Ok(body) => body,
        Err(_) => return,
    };
    let every = Duration::from_secs(CANARY_CALLERS) / CANARY_CALLS_PER_S as u32;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut next = k as usize;
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tick.tick() => {}
        }
        let Some(&addr) = addrs.get(next % addrs.len().max(1)) else {
            return;
        };
        next = next.wrapping_add(CANARY_CALLERS as usize);
        let request = Request::post(format!("/v2/models/{INTENTS}/infer"), body.clone())
            .header("Content-Type", "application/json");
        match HttpClient::new(addr).send(request).await {
            Ok(r) if r.status == StatusCode::OK => counts.ok.fetch_add(1, Ordering::Relaxed),
            _ => counts.failed.fetch_add(1, Ordering::Relaxed),
        };
    }
}
