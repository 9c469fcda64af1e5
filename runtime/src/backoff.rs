//! The one back-off between retries: exponential, capped and jittered, so a fleet that lost its
//! coordinator or broker at the same moment does not come back in lockstep. Used by the QUIC
//! client and by the agent's and the coordinator's MQTT loops.

use std::time::{Duration, Instant};

/// How long a connection must stay up before its back-off forgets earlier failures: a peer that
/// accepts and then drops every connection would otherwise be retried at the shortest delay,
/// forever.
pub const STABLE_AFTER: Duration = Duration::from_secs(10);

/// Delays between failed attempts: `start` after the first failure, doubling up to `max`, each
/// scaled by a jitter in `[0.5, 1.5)`.
#[derive(Debug, Clone)]
pub struct Backoff {
    start: Duration,
    max: Duration,
    failures: u32,
    up_since: Option<Instant>,
    jittered: bool,
}

impl Backoff {
    /// A back-off from `start` to `max`, no failure yet.
    pub const fn new(start: Duration, max: Duration) -> Self {
        Self {
            start,
            max,
            failures: 0,
            up_since: None,
            jittered: true,
        }
    }

    /// The same back-off without its jitter: every delay is the base one. Only for measuring
    /// what the jitter does (`outpost sim`); a fleet without it comes back in lockstep.
    pub const fn without_jitter(mut self) -> Self {
        self.jittered = false;
        self
    }

    /// Records a failure and returns how long to wait before the next attempt.
    pub fn fail(&mut self) -> Duration {
        self.fail_at(Instant::now())
    }

    /// [`Backoff::fail`] at `now`: a connection that was up for [`STABLE_AFTER`] or longer
    /// first forgets the failures before it.
    pub fn fail_at(&mut self, now: Instant) -> Duration {
        if let Some(since) = self.up_since.take()
            && now.saturating_duration_since(since) >= STABLE_AFTER
        {
            self.failures = 0;
        }
        self.failures = self.failures.saturating_add(1);
        self.delay(self.failures, if self.jittered { jitter() } else { 0.5 })
    }

    /// Forgets the failures: the next one waits `start` again (for attempts that end, such as
    /// an `accept`).
    pub fn succeed(&mut self) {
        self.failures = 0;
        self.up_since = None;
    }

    /// A connection came up at `now`: its failures are forgotten only once it has stayed up
    /// for [`STABLE_AFTER`] (see [`Backoff::fail_at`]).
    pub fn connected_at(&mut self, now: Instant) {
        self.up_since = Some(now);
    }

    /// [`Backoff::connected_at`] now.
    pub fn connected(&mut self) {
        self.connected_at(Instant::now());
    }

    /// Failures in a row so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// The delay after `failures` failures in a row, scaled by `jitter` in `[0, 1)` (to
    /// `[0.5, 1.5)` of the base): `start · 2^(failures-1)`, capped at `max`.
    pub fn delay(&self, failures: u32, jitter: f64) -> Duration {
        let exponent = failures.saturating_sub(1).min(20);
        let base = self.start.saturating_mul(1 << exponent).min(self.max);
        base.mul_f64(0.5 + jitter.clamp(0.0, 1.0))
    }
}

/// A jitter in `[0, 1)` from the clock's nanoseconds mixed with a per-process counter: spread,
/// not secrecy, is what it is for.
pub fn jitter() -> f64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static CALLS: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::from(d.subsec_nanos()));
    // splitmix64 of the clock and the call count, so two calls in one tick still differ.
    let mut z = nanos
        ^ CALLS
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    const START: Duration = Duration::from_millis(250);
    const MAX: Duration = Duration::from_secs(30);

    #[test]
    fn delays_double_to_a_cap_with_jitter_around_them() {
        let b = Backoff::new(START, MAX);
        assert_eq!(b.delay(1, 0.5), Duration::from_millis(250));
        assert_eq!(b.delay(2, 0.5), Duration::from_millis(500));
        assert_eq!(b.delay(5, 0.5), Duration::from_secs(4));
        assert_eq!(b.delay(9, 0.5), MAX);
        assert_eq!(b.delay(u32::MAX, 0.5), MAX);
        assert_eq!(b.delay(3, 0.0), Duration::from_millis(500));
        assert_eq!(b.delay(3, 1.0), Duration::from_millis(1500));
    }

    #[test]
    fn without_jitter_every_delay_is_the_base_one() {
        let mut b = Backoff::new(START, MAX).without_jitter();
        assert_eq!(b.fail(), START);
        assert_eq!(b.fail(), START * 2);
        assert_eq!(b.fail(), START * 4);
    }

    #[test]
    fn failures_grow_the_delay_and_success_resets_it() {
        let mut b = Backoff::new(START, MAX);
        let first = b.fail();
        assert!(first >= START / 2 && first < START * 3 / 2, "{first:?}");
        for _ in 0..10 {
            b.fail();
        }
        let late = b.fail();
        assert!(late >= MAX / 2 && late <= MAX * 3 / 2, "{late:?}");
        b.succeed();
        assert_eq!(b.failures(), 0);
        assert!(b.fail() < START * 3 / 2);
    }

    #[test]
    fn a_connection_dropped_at_once_keeps_the_delay_growing() {
        let mut b = Backoff::new(START, MAX);
        let t0 = Instant::now();
        for _ in 0..6 {
            b.fail_at(t0);
        }
        // Up for a moment, then dropped: not a success.
        b.connected_at(t0);
        b.fail_at(t0 + Duration::from_secs(1));
        assert_eq!(b.failures(), 7);
        // Up for longer than STABLE_AFTER: the earlier failures are forgotten.
        b.connected_at(t0);
        b.fail_at(t0 + STABLE_AFTER);
        assert_eq!(b.failures(), 1);
    }

    #[test]
    fn jitter_is_spread_over_the_unit_interval() {
        let samples: Vec<f64> = (0..1000).map(|_| jitter()).collect();
        assert!(samples.iter().all(|j| (0.0..1.0).contains(j)));
        let low = samples.iter().filter(|&&j| j < 0.5).count();
        assert!((300..700).contains(&low), "{low} of 1000 below 0.5");
    }
}
