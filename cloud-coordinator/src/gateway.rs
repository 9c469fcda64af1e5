//! Offloaded calls, from a device's `Infer` request to an answer: the rate limits
//! (`[gateway]`), then the model's backend (`[[backend]]`) or the worker pool.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use firmware_config::GatewaySection;
use outpost_shared::{ErrorKind, Response, Tensor};
use tokio::sync::oneshot;

use crate::backend::{BackendError, Backends};
use crate::error::RegistryError;
use crate::infer::{InferencePool, Job};
use crate::metrics::{Metrics, Served};
use crate::registry::Registry;

/// The retry hint of a `Busy` answer from a full pool or backend.
const BUSY_RETRY_MS: u32 = 100;

/// Devices (or models) whose buckets are kept at once; past it, buckets that have refilled are
/// dropped (a full bucket is the same as none).
const MAX_BUCKETS: usize = 100_000;

/// Routes offloaded calls.
#[derive(Debug, Clone)]
pub struct Gateway {
    /// The registry: which models exist, their stable versions and backends.
    pub registry: Arc<Registry>,
    /// The worker pool.
    pub pool: InferencePool,
    /// The configured backends.
    pub backends: Arc<Backends>,
    /// The rate limits.
    pub limits: Arc<RateLimits>,
    /// Counters.
    pub metrics: Arc<Metrics>,
}

impl Gateway {
    /// Answers one offloaded call from `device`.
    pub async fn infer(
        &self,
        device: &str,
        model: String,
        version: Option<u64>,
        inputs: Vec<Tensor>,
    ) -> Response {
        let registry = self.registry.clone();
        let name = model.clone();
        let routing = tokio::task::spawn_blocking(move || registry.routing(&name, version)).await;
        let (version, pushed_to) = match routing {
            Ok(Ok(r)) => r,
            Ok(Err(RegistryError::NotFound(message))) => {
                return Response::Error {
                    kind: ErrorKind::UnknownModel,
                    message,
                };
            }
            Ok(Err(e)) => {
                return Response::Error {
                    kind: ErrorKind::Internal,
                    message: e.to_string(),
                };
            }
            Err(e) => {
                return Response::Error {
                    kind: ErrorKind::Internal,
                    message: format!("the registry lookup failed: {e}"),
                };
            }
        };
        // The model exists: counting under its name keeps the counters bounded by the registry.
        if let Err(retry_after_ms) = self.limits.admit(device, &model) {
            self.metrics.observe_offload(&model, Served::RateLimited);
            return Response::Busy { retry_after_ms };
        }
        match self.backends.serving(&model, pushed_to.as_deref()) {
            Some(backend) => {
                let started = Instant::now();
                let answer = backend.infer(&model, &inputs).await;
                if !matches!(answer, Err(BackendError::Busy)) {
                    self.metrics
                        .observe_inference(started.elapsed(), answer.is_ok());
                }
                match answer {
                    Ok(outputs) => {
                        self.metrics.observe_offload(&model, Served::Ok);
                        Response::Inferred {
                            model,
                            version,
                            outputs,
                        }
                    }
                    Err(BackendError::Busy) => {
                        self.metrics
                            .inference_busy
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        self.metrics.observe_offload(&model, Served::Busy);
                        Response::Busy {
                            retry_after_ms: BUSY_RETRY_MS,
                        }
                    }
                    Err(BackendError::Failed(kind, message)) => {
                        self.metrics.observe_offload(&model, Served::Failed);
                        Response::Error { kind, message }
                    }
                }
            }
            None if pushed_to.is_some() => {
                // Pushed to a backend this coordinator's config no longer has.
                self.metrics.observe_offload(&model, Served::Failed);
                Response::Error {
                    kind: ErrorKind::Unavailable,
                    message: format!(
                        "model {model:?} was pushed to backend {:?}, which this coordinator's config does not define (configured: {:?})",
                        pushed_to.unwrap_or_default(),
                        self.backends.names()
                    ),
                }
            }
            None => self.on_pool(device, model, Some(version), inputs).await,
        }
    }

    async fn on_pool(
        &self,
        device: &str,
        model: String,
        version: Option<u64>,
        inputs: Vec<Tensor>,
    ) -> Response {
        let (reply, answer) = oneshot::channel();
        let job = Job {
            model: model.clone(),
            version,
            inputs,
            reply,
        };
        if let Err(refused) = self.pool.submit(device, job) {
            self.metrics
                .inference_busy
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if matches!(refused, crate::infer::Refused::DeviceShare(_)) {
                self.metrics
                    .inference_device_busy
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            self.metrics.observe_offload(&model, Served::Busy);
            return Response::Busy {
                retry_after_ms: BUSY_RETRY_MS,
            };
        }
        match answer.await {
            Ok(Ok((version, outputs))) => {
                self.metrics.observe_offload(&model, Served::Ok);
                Response::Inferred {
                    model,
                    version,
                    outputs,
                }
            }
            Ok(Err((kind, message))) => {
                self.metrics.observe_offload(&model, Served::Failed);
                Response::Error { kind, message }
            }
            Err(_) => {
                self.metrics.observe_offload(&model, Served::Failed);
                Response::Error {
                    kind: ErrorKind::Internal,
                    message: "the inference worker stopped".into(),
                }
            }
        }
    }
}

/// The `[gateway]` token buckets: one per device, one per model.
#[derive(Debug)]
pub struct RateLimits {
    device: Option<Buckets>,
    model: Option<Buckets>,
}

impl RateLimits {
    /// The limits `section` sets (none when it sets no rate).
    pub fn new(section: &GatewaySection) -> Self {
        let buckets = |rate: Option<f64>, burst: Option<u32>| {
            rate.map(|rate| Buckets {
                rate,
                burst: burst.map(f64::from).unwrap_or(rate.ceil()).max(1.0),
                buckets: Mutex::new(HashMap::new()),
            })
        };
        Self {
            device: buckets(section.device_calls_per_s, section.device_burst),
            model: buckets(section.model_calls_per_s, section.model_burst),
        }
    }

    /// Takes a token from the device's and the model's buckets; `Err` with the milliseconds
    /// until one is there when either is empty (then neither is charged).
    pub fn admit(&self, device: &str, model: &str) -> Result<(), u32> {
        let now = Instant::now();
        if let Some(d) = &self.device {
            d.take(device, now)?;
        }
        if let Some(m) = &self.model
            && let Err(wait) = m.take(model, now)
        {
            if let Some(d) = &self.device {
                d.refund(device);
            }
            return Err(wait);
        }
        Ok(())
    }
}

#[derive(Debug)]
struct Buckets {
    /// Tokens a second.
    rate: f64,
    /// The most tokens a bucket holds.
    burst: f64,
    /// Tokens left and when they were counted.
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

impl Buckets {
    fn level(&self, (tokens, at): (f64, Instant), now: Instant) -> f64 {
        (tokens + now.saturating_duration_since(at).as_secs_f64() * self.rate).min(self.burst)
    }

    /// Takes a token from `key`'s bucket, or `Err(ms)` until one is there (one lock: no two
    /// calls take the same token).
    fn take(&self, key: &str, now: Instant) -> Result<(), u32> {
        // A poisoned lock still holds usable buckets: limits stay on.
        let mut buckets = self
            .buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let tokens = buckets
            .get(key)
            .map(|b| self.level(*b, now))
            .unwrap_or(self.burst);
        if tokens < 1.0 {
            let wait =
                Duration::try_from_secs_f64((1.0 - tokens) / self.rate).unwrap_or(Duration::MAX);
            return Err(u32::try_from(wait.as_millis()).unwrap_or(u32::MAX).max(1));
        }
        if buckets.len() >= MAX_BUCKETS && !buckets.contains_key(key) {
            // Full buckets are the same as none; if every bucket is in use, the oldest go.
            let burst = self.burst;
            buckets.retain(|_, b| self.level(*b, now) < burst);
            if buckets.len() >= MAX_BUCKETS {
                let mut ages: Vec<Instant> = buckets.values().map(|(_, at)| *at).collect();
                ages.sort_unstable();
                let cut = ages[ages.len() / 10];
                buckets.retain(|_, (_, at)| *at > cut);
            }
        }
        buckets.insert(key.to_owned(), (tokens - 1.0, now));
        Ok(())
    }

    /// Gives back the token a call took (another limit refused the call).
    fn refund(&self, key: &str) {
        let mut buckets = self
            .buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((tokens, _)) = buckets.get_mut(key) {
            *tokens = (*tokens + 1.0).min(self.burst);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(device: Option<f64>, burst: Option<u32>, model: Option<f64>) -> RateLimits {
        RateLimits::new(&GatewaySection {
            device_calls_per_s: device,
            device_burst: burst,
            model_calls_per_s: model,
            model_burst: None,
        })
    }

    /// A device gets its burst at once, then is told how long to wait; another device is not
    /// held back by it; with no rate nothing is limited.
    #[test]
    fn buckets_hold_each_device_to_its_rate() {
        let l = limits(Some(10.0), Some(3), None);
        for _ in 0..3 {
            assert_eq!(l.admit("a", "m"), Ok(()));
        }
        let wait = l.admit("a", "m");
        assert!(
            matches!(wait, Err(ms) if (1..=100).contains(&ms)),
            "{wait:?}"
        );
        assert_eq!(l.admit("b", "m"), Ok(()));
        std::thread::sleep(Duration::from_millis(120));
        assert_eq!(l.admit("a", "m"), Ok(()));
        let open = limits(None, None, None);
        assert!((0..10_000).all(|_| open.admit("a", "m").is_ok()));
    }

    /// The model's bucket is shared by every device; a refused call charges neither bucket.
    #[test]
    fn a_model_limit_is_shared_and_refusals_are_free() {
        let l = limits(Some(2.0), Some(2), Some(1.0));
        assert_eq!(l.admit("a", "m"), Ok(()));
        assert!(l.admit("b", "m").is_err(), "the model's one token is spent");
        // b was refused by the model's bucket, so b's own bucket still holds 2.
        assert_eq!(l.admit("b", "other"), Ok(()));
        assert_eq!(l.admit("b", "other2"), Ok(()));
        assert!(l.admit("b", "other3").is_err());
    }

    /// Past MAX_BUCKETS devices the oldest buckets are dropped, so the map stays bounded
    /// however many device names come.
    #[test]
    fn buckets_are_bounded() {
        let l = limits(Some(1.0), Some(1), None);
        for i in 0..=MAX_BUCKETS {
            assert_eq!(l.admit(&format!("d{i}"), "m"), Ok(()));
        }
        let held = l.device.as_ref().map(|d| d.buckets.lock().map(|b| b.len()));
        assert!(matches!(held, Some(Ok(n)) if n <= MAX_BUCKETS), "{held:?}");
        // The newest device is still held to its rate.
        assert!(l.admit(&format!("d{MAX_BUCKETS}"), "m").is_err());
    }
}
