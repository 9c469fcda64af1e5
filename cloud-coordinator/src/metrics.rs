//! Prometheus counters of the coordinator, rendered in the text exposition format.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

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
    /// Offloaded calls by model (models in the registry only) and how they ended.
    offloads: Mutex<BTreeMap<String, [u64; 4]>>,
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
        if let Ok(mut offloads) = self.offloads.lock() {
            let counts = match offloads.get_mut(model) {
                Some(c) => c,
                None => offloads.entry(model.to_owned()).or_default(),
            };
            counts[served as usize] += 1;
        }
    }

    /// Offloaded calls by model: answered, failed, busy, rate limited.
    pub fn offloads(&self) -> BTreeMap<String, [u64; 4]> {
        self.offloads.lock().map(|o| o.clone()).unwrap_or_default()
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
            for served in Served::ALL {
                let _ = writeln!(
                    out,
                    "outpost_offloaded_calls_total{{model=\"{model}\",result=\"{}\"}} {}",
                    served.label(),
                    counts[served as usize]
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
