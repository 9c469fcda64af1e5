//! Rollouts gated on device health (`push --canary P`). Every `[rollout] check_interval_s` the
//! coordinator compares, for each gated candidate, the devices that run it with the devices that
//! run the stable version, from the `health` of their signed statuses (each device's last
//! minute, of the version it serves). A candidate past a limit (its error rate, its p99 against
//! stable's, its offloaded share against stable's) is aborted at once: a new release without
//! it, so no device stays on it. One within the limits for `bake_s` widens to the next of
//! `steps` (the same salt, so the same devices first), then is promoted. Each step goes in the
//! model's rollout history with the figures it was taken on.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use outpost_shared::ModelHealth;
use tokio::sync::watch;

use crate::metrics::Metrics;
use crate::mqtt::{Announcer, FleetView};
use crate::registry::{GatedRollout, Registry, RolloutAction};

/// Calls a cohort must have served before its p99 is compared (and so before a rollout moves
/// on): a new version's first call of each shape is slow (its plan is made then), and below a
/// couple of hundred calls that one call would be the p99.
pub const P99_MIN_CALLS: u64 = 200;

/// One cohort's service, summed over its devices.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Cohort {
    /// Devices that reported the version's health.
    pub devices: usize,
    /// Calls in their windows.
    pub calls: u64,
    /// Failed calls.
    pub errors: u64,
    /// Rows asked for.
    pub rows: u64,
    /// Rows offloaded.
    pub rows_offloaded: u64,
    /// The devices' p99 latencies, weighted by their calls, in milliseconds.
    pub p99_ms: f64,
}

impl Cohort {
    /// Adds a device's figures.
    pub fn add(&mut self, health: &ModelHealth) {
        let calls = self.calls + health.calls;
        if calls > 0 {
            self.p99_ms = (self.p99_ms * self.calls as f64 + health.p99_ms * health.calls as f64)
                / calls as f64;
        }
        self.devices += 1;
        self.calls = calls;
        self.errors += health.errors;
        self.rows += health.rows;
        self.rows_offloaded += health.rows_offloaded;
    }

    /// Errors per call.
    pub fn error_rate(&self) -> f64 {
        outpost_shared::status::share(self.errors, self.calls)
    }

    /// Offloaded rows per row.
    pub fn offload_share(&self) -> f64 {
        outpost_shared::status::share(self.rows_offloaded, self.rows)
    }

    fn describe(&self) -> String {
        format!(
            "{} devices, {} calls, error rate {:.2} %, p99 {:.1} ms, offloaded {:.1} %",
            self.devices,
            self.calls,
            self.error_rate() * 100.0,
            self.p99_ms,
            self.offload_share() * 100.0
        )
    }
}

/// The stable and candidate cohorts of `rollout`, from the fleet view.
pub fn cohorts(fleet: &FleetView, rollout: &GatedRollout) -> (Cohort, Cohort) {
    let (mut stable, mut candidate) = (Cohort::default(), Cohort::default());
    let Ok(fleet) = fleet.lock() else {
        return (stable, candidate);
    };
    for device in fleet.values() {
        let Some(health) = device
            .status
            .models
            .iter()
            .find(|m| m.model == rollout.model)
            .and_then(|m| m.health.as_ref())
        else {
            continue;
        };
        if health.version == rollout.candidate {
            candidate.add(health);
        } else if health.version == rollout.stable {
            stable.add(health);
        }
    }
    (stable, candidate)
}

/// What the gate does with `rollout` at `now` (Unix seconds), given its cohorts; `None`: wait.
pub fn decide(
    rollout: &GatedRollout,
    now: u64,
    stable: &Cohort,
    candidate: &Cohort,
) -> Option<(RolloutAction, String)> {
    let gate = &rollout.gate;
    if candidate.calls < gate.min_calls {
        return None;
    }
    let figures = || {
        format!(
            "candidate: {}; stable: {}",
            candidate.describe(),
            stable.describe()
        )
    };
    if candidate.error_rate() > gate.max_error_rate {
        return Some((
            RolloutAction::Abort,
            format!(
                "health gate: error rate {:.2} % is over {:.2} % ({})",
                candidate.error_rate() * 100.0,
                gate.max_error_rate * 100.0,
                figures()
            ),
        ));
    }
    // Compared with stable only when stable has served enough to compare with; latency only
    // when both have served enough for a p99 to mean something.
    let comparable = stable.calls >= gate.min_calls;
    let latency_comparable = comparable
        && stable.calls >= P99_MIN_CALLS.max(gate.min_calls)
        && candidate.calls >= P99_MIN_CALLS.max(gate.min_calls);
    if latency_comparable
        && stable.p99_ms > 0.0
        && candidate.p99_ms > stable.p99_ms * (1.0 + gate.max_p99_regression)
    {
        return Some((
            RolloutAction::Abort,
            format!(
                "health gate: p99 {:.1} ms is {:.0} % over stable's {:.1} ms, past {:.0} % ({})",
                candidate.p99_ms,
                (candidate.p99_ms / stable.p99_ms - 1.0) * 100.0,
                stable.p99_ms,
                gate.max_p99_regression * 100.0,
                figures()
            ),
        ));
    }
    if comparable && candidate.offload_share() - stable.offload_share() > gate.max_offload_increase
    {
        return Some((
            RolloutAction::Abort,
            format!(
                "health gate: offloaded share {:.1} % is {:.1} points over stable's {:.1} %, past {:.1} ({})",
                candidate.offload_share() * 100.0,
                (candidate.offload_share() - stable.offload_share()) * 100.0,
                stable.offload_share() * 100.0,
                gate.max_offload_increase * 100.0,
                figures()
            ),
        ));
    }
    // Within the limits: the next step once the step has baked and every limit could be
    // judged (or no stable device is left to compare with).
    let baked = now.saturating_sub(rollout.step_started_at) >= gate.bake_s;
    let judged = if stable.devices == 0 {
        candidate.calls >= P99_MIN_CALLS
    } else {
        latency_comparable
    };
    if !baked || !judged {
        return None;
    }
    let within = format!(
        "health gate: within the limits for {} s ({})",
        gate.bake_s,
        figures()
    );
    Some(match gate.steps.iter().find(|p| **p > rollout.percent) {
        Some(next) => (RolloutAction::Percent(*next), within),
        None => (RolloutAction::Promote, within),
    })
}

/// Watches gated rollouts until shutdown, every `every`.
pub async fn run(
    registry: Arc<Registry>,
    announcer: Announcer,
    fleet: FleetView,
    metrics: Arc<Metrics>,
    every: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let listed = {
            let registry = registry.clone();
            tokio::task::spawn_blocking(move || registry.gated()).await
        };
        let gated = match listed {
            Ok(Ok(gated)) => gated,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "could not list gated rollouts");
                continue;
            }
            Err(e) => {
                tracing::error!(error = %e, "the rollout gate's task failed");
                continue;
            }
        };
        let now = crate::registry::unix_now();
        for rollout in gated {
            let (stable, candidate) = cohorts(&fleet, &rollout);
            let Some((action, reason)) = decide(&rollout, now, &stable, &candidate) else {
                continue;
            };
            let step = {
                let (registry, rollout, reason) =
                    (registry.clone(), rollout.clone(), reason.clone());
                tokio::task::spawn_blocking(move || {
                    registry.rollout(&rollout.model, action, &reason, Some(rollout.candidate))
                })
                .await
            };
            match step {
                Ok(Ok((published, Some(signed)))) => {
                    let counter = match action {
                        RolloutAction::Percent(_) => &metrics.rollouts_widened,
                        RolloutAction::Promote => &metrics.rollouts_promoted,
                        RolloutAction::Abort => &metrics.rollouts_aborted,
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                    if matches!(action, RolloutAction::Abort) {
                        tracing::warn!(
                            model = rollout.model,
                            candidate = rollout.candidate,
                            reason,
                            "rollout aborted"
                        );
                    } else {
                        tracing::info!(
                            model = rollout.model,
                            candidate = rollout.candidate,
                            ?action,
                            reason,
                            "rollout moved on"
                        );
                    }
                    if let Err(e) = announcer.announce(&published.model, signed).await {
                        tracing::warn!(model = published.model, error = %e, "could not announce now");
                    }
                }
                Ok(Ok((_, None))) => {}
                // The operator or a push moved it meanwhile: nothing to do.
                Ok(Err(e)) => {
                    tracing::debug!(model = rollout.model, error = %e, "rollout step not taken")
                }
                Err(e) => tracing::error!(error = %e, "the rollout gate's task failed"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rollout(percent: u8, started: u64) -> GatedRollout {
        GatedRollout {
            model: "m".into(),
            stable: 1,
            candidate: 2,
            percent,
            gate: firmware_config::RolloutSection {
                bake_s: 60,
                min_calls: 10,
                steps: vec![50],
                ..Default::default()
            },
            step_started_at: started,
        }
    }

    fn cohort(calls: u64, errors: u64, p99_ms: f64, offloaded: u64) -> Cohort {
        let mut c = Cohort::default();
        c.add(&ModelHealth {
            version: 0,
            window_s: 60,
            calls,
            errors,
            rows: calls,
            rows_offloaded: offloaded,
            p50_ms: p99_ms / 2.0,
            p99_ms,
        });
        c
    }

    #[test]
    fn the_gate_waits_widens_promotes_and_aborts_on_each_limit() {
        let healthy = cohort(300, 0, 10.0, 30);
        let stable = cohort(300, 0, 10.0, 30);
        // Too few calls, or not baked: wait.
        assert!(decide(&rollout(10, 0), 1000, &stable, &cohort(5, 5, 90.0, 5)).is_none());
        assert!(decide(&rollout(10, 990), 1000, &stable, &healthy).is_none());
        // Baked, but too few calls for a p99: wait (errors are still judged, see below).
        let few = cohort(100, 0, 10.0, 10);
        assert!(decide(&rollout(10, 0), 1000, &few, &few).is_none());
        assert!(decide(&rollout(10, 0), 1000, &few, &cohort(100, 0, 99.0, 10)).is_none());
        // Baked: widen to the next step, then promote.
        let (action, why) = decide(&rollout(10, 900), 1000, &stable, &healthy).unwrap();
        assert_eq!(action, RolloutAction::Percent(50));
        assert!(why.contains("within the limits"), "{why}");
        let (action, _) = decide(&rollout(50, 900), 1000, &stable, &healthy).unwrap();
        assert_eq!(action, RolloutAction::Promote);
        // Each limit aborts, at once (before the bake), naming itself.
        for (bad, says) in [
            (cohort(300, 15, 10.0, 30), "error rate 5.00 %"),
            (cohort(300, 0, 13.0, 30), "p99 13.0 ms"),
            (cohort(300, 0, 10.0, 90), "offloaded share 30.0 %"),
        ] {
            let (action, why) = decide(&rollout(10, 999), 1000, &stable, &bad).unwrap();
            assert_eq!(action, RolloutAction::Abort);
            assert!(why.contains(says), "{why}");
        }
        // No stable figures to compare yet: latency and offload wait, errors do not.
        let quiet = cohort(3, 0, 1.0, 0);
        assert!(decide(&rollout(10, 0), 1000, &quiet, &cohort(100, 0, 99.0, 90)).is_none());
        assert_eq!(
            decide(&rollout(10, 999), 1000, &quiet, &cohort(100, 9, 10.0, 0)).map(|d| d.0),
            Some(RolloutAction::Abort)
        );
    }

    #[test]
    fn cohorts_weigh_latency_by_calls() {
        let mut c = cohort(100, 0, 10.0, 0);
        c.add(&ModelHealth {
            version: 0,
            window_s: 60,
            calls: 300,
            errors: 3,
            rows: 300,
            rows_offloaded: 30,
            p50_ms: 1.0,
            p99_ms: 30.0,
        });
        assert_eq!((c.devices, c.calls, c.errors), (2, 400, 3));
        assert!((c.p99_ms - 25.0).abs() < 1e-9);
        assert!((c.offload_share() - 0.075).abs() < 1e-9);
    }
}
