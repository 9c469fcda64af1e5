//! Prometheus counters of the coordinator, rendered in the text exposition format.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::registry::OffloadCounts;

/// How an offloaded call ended, for the per-model counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Served {
    /// Answered.
    Ok,
    /// Failed (the model, its backend, or the inputs).
    Failed,
    /// Refused `Busy`: the pool's queue or every backend replica was full.
    Busy,
    /// Refused `Busy` by a `[gateway]` rate limit.
    RateLimited,
}

impl Served {
    const ALL: [Served; 4] = [
        Served::Ok,
        Served::Failed,
        Served::Busy,
        Served::RateLimited,
    ];

    fn label(self) -> &'static str {
        match self {
            Served::Ok => "ok",
            Served::Failed => "error",
            Served::Busy => "busy",
            Served::RateLimited => "rate_limited",
        }
    }
}

/// Upper bounds (seconds) of the inference latency histogram's buckets.
const BUCKETS: [f64; 10] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0];

/// The coordinator's counters; cheap to update from any thread.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Successful pushes (and rollbacks).
    pub pushes: AtomicU64,
    /// Chunks sent to agents.
    pub chunks_served: AtomicU64,
    /// Bytes of chunks sent to agents.
    pub chunk_bytes_served: AtomicU64,
    /// Inference requests answered `Busy`.
    pub inference_busy: AtomicU64,
    /// Offloaded calls over the per-call working memory, run in row parts.
    pub inference_split: AtomicU64,
    /// Offloaded calls refused because one row needs more than a call may take.
    pub inference_too_large: AtomicU64,
    /// Offloaded calls refused because their device had `[inference] device_calls` in the pool.
    pub inference_device_busy: AtomicU64,
    /// Inference jobs waiting for a worker.
    pub queue_depth: AtomicI64,
    /// Open QUIC connections from devices.
    pub connected_devices: AtomicI64,
    /// MQTT connections the embedded broker refused or closed: no valid certificate, no
    /// CONNECT in time, a packet against the client's rules, or the connection limit.
    pub mqtt_refused: AtomicU64,
    /// Device statuses ignored: unsigned, a certificate not of the fleet, a signature that does
    /// not verify, another device's name, or older than the status already held.
    pub status_rejected: AtomicU64,
    /// Releases announced again because the broker's retained copy was cleared or replaced.
    pub releases_reasserted: AtomicU64,
    /// Gated rollouts widened to their next step.
    pub rollouts_widened: AtomicU64,
    /// Gated rollouts promoted to stable.
    pub rollouts_promoted: AtomicU64,
    /// Gated rollouts aborted on the candidate's health.
    pub rollouts_aborted: AtomicU64,
    /// Offloaded calls by model (models in the registry only): how they ended, and when.
    offloads: Mutex<BTreeMap<String, ModelOffloads>>,
    inference_ok: AtomicU64,
    inference_failed: AtomicU64,
    latency_buckets: [AtomicU64; BUCKETS.len()],
    latency_sum_us: AtomicU64,
}

impl Metrics {
    /// Records one finished inference.
    pub fn observe_inference(&self, took: Duration, ok: bool) {
        let counter = if ok {
            &self.inference_ok
        } else {
            &self.inference_failed
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let secs = took.as_secs_f64();
        for (bound, bucket) in BUCKETS.iter().zip(&self.latency_buckets) {
            if secs <= *bound {
                bucket.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.latency_sum_us.fetch_add(
            u64::try_from(took.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// Counts one offloaded call of `model` (a model of the registry: that bounds the map).
    pub fn observe_offload(&self, model: &str, served: Served) {
        let now = seconds_now();
        if let Ok(mut offloads) = self.offloads.lock() {
            let counts = match offloads.get_mut(model) {
                Some(c) => c,
                None => offloads.entry(model.to_owned()).or_default(),
            };
            counts.totals[served as usize] += 1;
            counts.last_minute.add(now);
        }
    }

    /// Offloaded calls by model: how they ended since the start, and how many came in the
    /// last minute (the model's offload rate).
    pub fn offloads(&self) -> BTreeMap<String, OffloadCounts> {
        let now = seconds_now();
        let Ok(offloads) = self.offloads.lock() else {
            return BTreeMap::new();
        };
        offloads
            .iter()
            .map(|(model, counts)| {
                let [ok, error, busy, rate_limited] = counts.totals;
                let counts = OffloadCounts {
                    ok,
                    error,
                    busy,
                    rate_limited,
                    last_minute: counts.last_minute.total(now),
                };
                (model.clone(), counts)
            })
            .collect()
    }

    /// The metrics in Prometheus text format.
    pub fn render(&self) -> String {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut out = String::new();
        let mut counter = |name: &str, help: &str, value: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
            );
        };
        counter(
            "outpost_pushes_total",
            "Model versions published (pushes and rollbacks).",
            get(&self.pushes),
        );
        counter(
            "outpost_chunks_served_total",
            "Chunks sent to agents.",
            get(&self.chunks_served),
        );
        counter(
            "outpost_chunk_bytes_served_total",
            "Bytes of chunks sent to agents.",
            get(&self.chunk_bytes_served),
        );
        counter(
            "outpost_mqtt_refused_total",
            "MQTT connections the embedded broker refused or closed (certificate, timeout, topic rules, limit).",
            get(&self.mqtt_refused),
        );
        counter(
            "outpost_status_rejected_total",
            "Device statuses ignored (unsigned, not of the fleet, bad signature, another device's name, replayed).",
            get(&self.status_rejected),
        );
        counter(
            "outpost_releases_reasserted_total",
            "Releases announced again because the broker's retained copy was cleared or replaced.",
            get(&self.releases_reasserted),
        );
        counter(
            "outpost_inference_busy_total",
            "Inference requests refused with Busy.",
            get(&self.inference_busy),
        );
        counter(
            "outpost_inference_split_total",
            "Offloaded calls over the per-call working memory, run in row parts.",
            get(&self.inference_split),
        );
        counter(
            "outpost_inference_too_large_total",
            "Offloaded calls refused because one row needs more working memory than a call may take.",
            get(&self.inference_too_large),
        );
        counter(
            "outpost_inference_device_busy_total",
            "Offloaded calls refused because their device had its share of the pool.",
            get(&self.inference_device_busy),
        );
        let _ = writeln!(
            out,
            "# HELP outpost_rollout_steps_total Steps the health gate took on rollouts.\n# TYPE outpost_rollout_steps_total counter\noutpost_rollout_steps_total{{step=\"widen\"}} {}\noutpost_rollout_steps_total{{step=\"promote\"}} {}\noutpost_rollout_steps_total{{step=\"abort\"}} {}",
            get(&self.rollouts_widened),
            get(&self.rollouts_promoted),
            get(&self.rollouts_aborted)
        );
        let _ = writeln!(
            out,
            "# HELP outpost_inference_queue_depth Inference jobs waiting for a worker.\n# TYPE outpost_inference_queue_depth gauge\noutpost_inference_queue_depth {}",
            self.queue_depth.load(Ordering::Relaxed).max(0)
        );
        let _ = writeln!(
            out,
            "# HELP outpost_connected_devices Devices connected over QUIC.\n# TYPE outpost_connected_devices gauge\noutpost_connected_devices {}",
            self.connected_devices.load(Ordering::Relaxed).max(0)
        );
        let _ = writeln!(
            out,
            "# HELP outpost_offloaded_calls_total Offloaded calls by model and how they ended (busy: pool or backend full; rate_limited: [gateway]).\n# TYPE outpost_offloaded_calls_total counter"
        );
        for (model, counts) in self.offloads() {
            let totals = [counts.ok, counts.error, counts.busy, counts.rate_limited];
            for served in Served::ALL {
                let _ = writeln!(
                    out,
                    "outpost_offloaded_calls_total{{model=\"{model}\",result=\"{}\"}} {}",
                    served.label(),
                    totals[served as usize]
                );
            }
        }
        let ok = get(&self.inference_ok);
        let failed = get(&self.inference_failed);
        let _ = writeln!(
            out,
            "# HELP outpost_inferences_total Offloaded inferences run.\n# TYPE outpost_inferences_total counter\noutpost_inferences_total{{result=\"ok\"}} {ok}\noutpost_inferences_total{{result=\"error\"}} {failed}"
        );
        let _ = writeln!(
            out,
            "# HELP outpost_inference_seconds Time to run an offloaded inference.\n# TYPE outpost_inference_seconds histogram"
        );
        for (bound, bucket) in BUCKETS.iter().zip(&self.latency_buckets) {
            let _ = writeln!(
                out,
                "outpost_inference_seconds_bucket{{le=\"{bound}\"}} {}",
                get(bucket)
            );
        }
        let _ = writeln!(
            out,
            "outpost_inference_seconds_bucket{{le=\"+Inf\"}} {}",
            ok + failed
        );
        let _ = writeln!(
            out,
            "outpost_inference_seconds_sum {}",
            get(&self.latency_sum_us) as f64 / 1e6
        );
        let _ = writeln!(out, "outpost_inference_seconds_count {}", ok + failed);
        out
    }
}

/// One model's offloaded calls: by how they ended (in [`Served`] order), and a window.
#[derive(Debug, Default)]
struct ModelOffloads {
    totals: [u64; 4],
    last_minute: MinuteWindow,
}

/// Seconds since the first call: the clock of the [`MinuteWindow`]s (monotonic).
fn seconds_now() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_secs()
}

/// Events in each of the last 60 seconds: a ring indexed by the second, cleared as time moves
/// on, so a model's rate costs 60 counters however many calls it gets.
#[derive(Debug, Clone)]
struct MinuteWindow {
    seconds: [u32; 60],
    /// The newest second counted.
    last: u64,
}

impl Default for MinuteWindow {
    fn default() -> Self {
        MinuteWindow {
            seconds: [0; 60],
            last: 0,
        }
    }
}

impl MinuteWindow {
    /// Clears the slots of the seconds between the newest counted and `now`.
    fn advance(&mut self, now: u64) {
        if now <= self.last {
            return;
        }
        if now - self.last >= 60 {
            self.seconds = [0; 60];
        } else {
            for second in self.last + 1..=now {
                self.seconds[(second % 60) as usize] = 0;
            }
        }
        self.last = now;
    }

    /// Counts one event at `now` (a clock that never goes back: [`seconds_now`]).
    fn add(&mut self, now: u64) {
        self.advance(now);
        let slot = &mut self.seconds[(self.last % 60) as usize];
        *slot = slot.saturating_add(1);
    }

    /// Events in the 60 seconds up to `now`.
    fn total(&self, now: u64) -> u64 {
        let mut window = self.clone();
        window.advance(now);
        window.seconds.iter().map(|&n| u64::from(n)).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_minute_window_counts_the_last_sixty_seconds_only() {
        let mut w = MinuteWindow::default();
        for second in [0, 0, 1, 30, 59] {
            w.add(second);
        }
        assert_eq!(w.total(59), 5);
        // Second 60 drops second 0's two events; second 61 drops second 1's.
        assert_eq!(w.total(60), 3);
        assert_eq!(w.total(61), 2);
        w.add(61);
        assert_eq!(w.total(61), 3);
        assert_eq!(
            w.total(90),
            2,
            "second 30 is out of the window by 90; 59 and 61 are in"
        );
        assert_eq!(w.total(119), 1);
        assert_eq!(w.total(121), 0);
        // A gap of more than a minute clears everything at once.
        w.add(500);
        assert_eq!(w.total(500), 1);
        assert_eq!(w.total(10_000), 0);
        // The reading does not move the window itself.
        assert_eq!(w.total(500), 1);
    }

    #[test]
    fn offloads_report_totals_and_the_last_minute() {
        let metrics = Metrics::default();
        metrics.observe_offload("ranker", Served::Ok);
        metrics.observe_offload("ranker", Served::Ok);
        metrics.observe_offload("ranker", Served::RateLimited);
        let counts = metrics.offloads()["ranker"];
        assert_eq!(
            (counts.ok, counts.error, counts.busy, counts.rate_limited),
            (2, 0, 0, 1)
        );
        assert_eq!(counts.last_minute, 3);
        assert!(
            metrics.render().contains(
                "outpost_offloaded_calls_total{model=\"ranker\",result=\"rate_limited\"} 1"
            )
        );
    }
}
