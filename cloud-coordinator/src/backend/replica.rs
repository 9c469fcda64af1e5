//! One backend replica's state (ready or out, missing models, its circuit) and the slot a call
//! holds on it while in flight.

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use firmware_config::BackendSection;

/// One replica: its address, calls in flight, and what the health checks and calls found.
#[derive(Debug)]
pub(super) struct Replica {
    pub(super) base: String,
    pub(super) in_flight: AtomicU32,
    pub(super) state: Mutex<ReplicaState>,
}

#[derive(Debug, Default)]
pub(super) struct ReplicaState {
    /// Why it is out (not ready, unreachable); `None` when ready.
    pub(super) out: Option<String>,
    /// Models it answered not ready for (or 404).
    pub(super) missing: BTreeSet<String>,
    /// It lists the binary tensor extension.
    pub(super) binary: bool,
    /// Failed calls in a row.
    pub(super) failures: u32,
    /// Its circuit is open until then.
    pub(super) open_until: Option<Instant>,
    /// A trial call is running on its half-open circuit.
    pub(super) trial: bool,
    /// Bumped whenever a call takes it out or marks a model missing, so a health check that
    /// began before does not undo that with an older answer.
    pub(super) epoch: u64,
}

/// One call in flight on a replica: its slot, reserved under `max_concurrency`, given back
/// when dropped (also when the call's future is dropped).
pub(super) struct InFlight<'a>(&'a AtomicU32);

impl<'a> InFlight<'a> {
    /// A slot, if fewer than `max` are taken.
    pub(super) fn reserve(counter: &'a AtomicU32, max: u32) -> Option<Self> {
        counter
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| Self(counter))
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Replica {
    /// Its state. A poisoned lock (a panic elsewhere while holding it) still holds a usable
    /// state: keep using it rather than take the replica out for good.
    pub(super) fn state(&self) -> std::sync::MutexGuard<'_, ReplicaState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether it may take a call of `model` now: ready, the model not missing, its circuit
    /// closed, or half-open with no trial running.
    pub(super) fn ready_for(&self, model: &str, now: Instant) -> bool {
        let s = self.state();
        s.out.is_none()
            && !s.missing.contains(model)
            && match s.open_until {
                None => true,
                Some(until) => until <= now && !s.trial,
            }
    }

    /// Takes the call: as [`Replica::ready_for`], and on a half-open circuit the one trial.
    pub(super) fn claim(&self, model: &str, now: Instant) -> bool {
        let mut s = self.state();
        let ready = s.out.is_none()
            && !s.missing.contains(model)
            && match s.open_until {
                None => true,
                Some(until) => until <= now && !s.trial,
            };
        if ready && s.open_until.is_some() {
            s.trial = true;
        }
        ready
    }

    pub(super) fn succeeded(&self) {
        let mut s = self.state();
        s.failures = 0;
        s.open_until = None;
        s.trial = false;
    }

    /// A try that sent nothing: a trial it held is free again.
    pub(super) fn end_trial(&self) {
        self.state().trial = false;
    }

    pub(super) fn failed(&self, section: &BackendSection) {
        let mut s = self.state();
        s.failures = s.failures.saturating_add(1);
        s.trial = false;
        if s.failures >= section.circuit_failures {
            let now = Instant::now();
            if s.open_until.is_none_or(|u| u <= now) {
                tracing::warn!(replica = %self.base, failures = s.failures, "backend replica's circuit opened");
            }
            let open = Duration::from_millis(section.circuit_open_ms);
            s.open_until = Some(
                now.checked_add(open)
                    .unwrap_or(now + Duration::from_secs(86_400)),
            );
        }
    }

    pub(super) fn take_out(&self, why: String) {
        let mut s = self.state();
        s.out = Some(why);
        s.epoch += 1;
    }

    pub(super) fn missing(&self, model: &str) {
        let mut s = self.state();
        s.missing.insert(model.to_owned());
        s.epoch += 1;
    }
}

/// Whether a body is a server's own JSON error (`{"error": ...}`, as Triton, KServe and
/// MLServer write), not a proxy's page.
pub(super) fn is_server_error(body: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .is_some_and(|v| v.get("error").is_some_and(serde_json::Value::is_string))
}
