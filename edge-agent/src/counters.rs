//! The agent's counters: what it answered, where, what failed, and what it fetched. Atomics,
//! because every API call and the installer add to them and nothing reads two at once for a
//! decision; status and `/metrics` read them through [`Counters::snapshot`].

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters for status and metrics.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    /// Inferences answered on the device.
    pub(crate) local: AtomicU64,
    /// Inferences (or rows) answered by the coordinator.
    pub(crate) offloaded: AtomicU64,
    /// Failed inferences.
    pub(crate) errors: AtomicU64,
    /// Refused manifests.
    pub(crate) rejected: AtomicU64,
    /// Chunks fetched.
    pub(crate) chunks: AtomicU64,
    /// Bytes fetched.
    pub(crate) bytes: AtomicU64,
    /// Connections made to the MQTT broker.
    pub(crate) broker_connects: AtomicU64,
    /// Calls over the per-call working-memory bound, run in row parts.
    pub(crate) split: AtomicU64,
    /// Calls refused because one row does not fit the per-call bound.
    pub(crate) too_large: AtomicU64,
    /// Requests whose handling panicked (answered 500).
    pub(crate) panics: AtomicU64,
}

impl Counters {
    /// Adds one to `counter`.
    pub(crate) fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// A chunk of `bytes` bytes was fetched and stored.
    pub(crate) fn fetched(&self, bytes: usize) {
        self.chunks.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// The counters as the status reports them.
    pub(crate) fn snapshot(&self) -> outpost_shared::Counters {
        outpost_shared::Counters {
            inferences_local: self.local.load(Ordering::Relaxed),
            inferences_offloaded: self.offloaded.load(Ordering::Relaxed),
            inference_errors: self.errors.load(Ordering::Relaxed),
            manifests_rejected: self.rejected.load(Ordering::Relaxed),
            chunks_fetched: self.chunks.load(Ordering::Relaxed),
            bytes_fetched: self.bytes.load(Ordering::Relaxed),
            broker_connects: self.broker_connects.load(Ordering::Relaxed),
        }
    }
}
