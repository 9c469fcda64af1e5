//! How each model has served lately, for the status (and the coordinator's rollouts): calls,
//! errors, rows and offloaded rows, and a latency histogram, over a sliding window of
//! [`SLOTS`] × [`SLOT`]. Memory is fixed per model (a few KiB); a model that changes version
//! starts a new window, so the figures are always of one version.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use outpost_shared::ModelHealth;

/// One slot of the window.
pub(crate) const SLOT: Duration = Duration::from_secs(10);
/// Slots in the window: a minute.
pub(crate) const SLOTS: usize = 6;
/// Latency bins: a quarter octave each, from 1 µs; the last holds everything past ~71 minutes.
const BINS: usize = 128;

/// One slot's figures.
#[derive(Debug, Clone)]
struct Slot {
    /// Which slot of time it holds (`SLOT`s since the window's origin).
    index: u64,
    calls: u64,
    errors: u64,
    rows: u64,
    rows_offloaded: u64,
    latency: [u32; BINS],
}

impl Slot {
    fn empty(index: u64) -> Self {
        Self {
            index,
            calls: 0,
            errors: 0,
            rows: 0,
            rows_offloaded: 0,
            latency: [0; BINS],
        }
    }
}

/// The bin of a latency: `4 × log2(µs)`, so each bin is 19 % wider than the one before.
fn bin(latency: Duration) -> usize {
    let micros = latency.as_secs_f64() * 1e6;
    if micros <= 1.0 {
        return 0;
    }
    ((micros.log2() * 4.0) as usize).min(BINS - 1)
}

/// A bin's upper bound, in milliseconds.
fn bin_ms(bin: usize) -> f64 {
    2f64.powf((bin as f64 + 1.0) / 4.0) / 1000.0
}

/// One model's window.
#[derive(Debug)]
struct Window {
    version: u64,
    /// When the version started being counted.
    since: Instant,
    slots: Vec<Slot>,
}

/// What one call did.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Call {
    /// The version that answered (or failed).
    pub(crate) version: u64,
    /// From the request's arrival to its answer.
    pub(crate) latency: Duration,
    /// Whether the model or device failed it.
    pub(crate) failed: bool,
    /// Rows asked for.
    pub(crate) rows: u64,
    /// Rows the coordinator answered.
    pub(crate) rows_offloaded: u64,
}

/// Every model's window, and whether anything happened since the status last showed them.
#[derive(Debug)]
pub(crate) struct HealthWindows {
    origin: Instant,
    windows: Mutex<HashMap<String, Window>>,
    /// Calls recorded since [`HealthWindows::take_changed`] was last called.
    changed: std::sync::atomic::AtomicBool,
}

impl Default for HealthWindows {
    fn default() -> Self {
        Self {
            origin: Instant::now(),
            windows: Mutex::default(),
            changed: std::sync::atomic::AtomicBool::new(false),
        }
    }
}

impl HealthWindows {
    fn slot_index(&self, at: Instant) -> u64 {
        (at.saturating_duration_since(self.origin).as_millis() / SLOT.as_millis()) as u64
    }

    /// Records `call` of `model`, made at `at`.
    pub(crate) fn record(&self, model: &str, call: Call, at: Instant) {
        let index = self.slot_index(at);
        let Ok(mut windows) = self.windows.lock() else {
            return;
        };
        let window = windows.entry(model.to_owned()).or_insert_with(|| Window {
            version: call.version,
            since: at,
            slots: Vec::with_capacity(SLOTS),
        });
        if window.version != call.version {
            *window = Window {
                version: call.version,
                since: at,
                slots: Vec::with_capacity(SLOTS),
            };
        }
        let position = (index % SLOTS as u64) as usize;
        if window.slots.len() <= position {
            window
                .slots
                .resize_with(position + 1, || Slot::empty(u64::MAX));
        }
        let slot = &mut window.slots[position];
        if slot.index != index {
            *slot = Slot::empty(index);
        }
        slot.calls += 1;
        slot.errors += u64::from(call.failed);
        slot.rows += call.rows;
        slot.rows_offloaded += call.rows_offloaded;
        let b = bin(call.latency);
        slot.latency[b] = slot.latency[b].saturating_add(1);
        self.changed
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether calls were recorded since the last time this was asked.
    pub(crate) fn take_changed(&self) -> bool {
        self.changed
            .swap(false, std::sync::atomic::Ordering::Relaxed)
    }

    /// `model`'s figures over the window ending at `at`, if it served a call in it.
    pub(crate) fn of(&self, model: &str, at: Instant) -> Option<ModelHealth> {
        let now = self.slot_index(at);
        let windows = self.windows.lock().ok()?;
        let window = windows.get(model)?;
        let live: Vec<&Slot> = window
            .slots
            .iter()
            .filter(|s| s.index != u64::MAX && s.index + SLOTS as u64 > now && s.index <= now)
            .collect();
        let calls: u64 = live.iter().map(|s| s.calls).sum();
        if calls == 0 {
            return None;
        }
        let mut latency = [0u64; BINS];
        for s in &live {
            for (total, n) in latency.iter_mut().zip(s.latency) {
                *total += u64::from(n);
            }
        }
        let percentile = |p: f64| {
            let wanted = ((calls as f64) * p).ceil().max(1.0) as u64;
            let mut seen = 0;
            for (b, n) in latency.iter().enumerate() {
                seen += n;
                if seen >= wanted {
                    return bin_ms(b);
                }
            }
            bin_ms(BINS - 1)
        };
        let full = SLOT * SLOTS as u32;
        let served = at
            .saturating_duration_since(window.since)
            .max(SLOT)
            .min(full);
        Some(ModelHealth {
            version: window.version,
            window_s: u32::try_from(served.as_secs()).unwrap_or(u32::MAX),
            calls,
            errors: live.iter().map(|s| s.errors).sum(),
            rows: live.iter().map(|s| s.rows).sum(),
            rows_offloaded: live.iter().map(|s| s.rows_offloaded).sum(),
            p50_ms: percentile(0.5),
            p99_ms: percentile(0.99),
        })
    }

    /// Forgets models no longer served.
    pub(crate) fn retain(&self, served: impl Fn(&str) -> bool) {
        if let Ok(mut windows) = self.windows.lock() {
            windows.retain(|model, _| served(model));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(version: u64, ms: u64, failed: bool) -> Call {
        Call {
            version,
            latency: Duration::from_millis(ms),
            failed,
            rows: 2,
            rows_offloaded: u64::from(failed),
        }
    }

    #[test]
    fn the_window_counts_slides_and_starts_again_for_a_new_version() {
        let h = HealthWindows::default();
        let t0 = h.origin;
        assert!(h.of("m", t0).is_none());
        // 98 fast calls and 2 slow failed ones.
        for i in 0..100 {
            h.record("m", call(1, if i < 98 { 2 } else { 400 }, i >= 98), t0);
        }
        assert!(h.take_changed() && !h.take_changed());
        let got = h.of("m", t0).unwrap();
        assert_eq!(
            (got.version, got.calls, got.errors, got.rows),
            (1, 100, 2, 200)
        );
        assert_eq!(got.rows_offloaded, 2);
        assert!((0.02..=0.021).contains(&got.error_rate()), "{got:?}");
        assert!((2.0..=2.5).contains(&got.p50_ms), "{got:?}");
        assert!((400.0..=480.0).contains(&got.p99_ms), "{got:?}");
        assert_eq!(got.window_s, 10);
        // Half a minute on, the calls still count; a minute on, they have slid out.
        let later = t0 + Duration::from_secs(35);
        h.record("m", call(1, 5, false), later);
        let got = h.of("m", later).unwrap();
        assert_eq!((got.calls, got.window_s), (101, 35));
        let gone = t0 + Duration::from_secs(65);
        let got = h.of("m", gone).unwrap();
        assert_eq!(got.calls, 1, "{got:?}");
        assert!(h.of("m", t0 + Duration::from_secs(100)).is_none());
        // A new version starts a window of its own.
        h.record("m", call(2, 5, false), later);
        let got = h.of("m", later).unwrap();
        assert_eq!((got.version, got.calls), (2, 1));
        h.retain(|m| m != "m");
        assert!(h.of("m", later).is_none());
    }

    #[test]
    fn bins_are_a_quarter_octave() {
        assert_eq!(bin(Duration::ZERO), 0);
        assert_eq!(bin(Duration::from_secs(1_000_000)), BINS - 1);
        for ms in [1u64, 10, 100, 1000] {
            let upper = bin_ms(bin(Duration::from_millis(ms)));
            assert!(
                upper >= ms as f64 && upper <= ms as f64 * 1.19 + 1e-9,
                "{ms}: {upper}"
            );
        }
    }
}
