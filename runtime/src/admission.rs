//! Admission control: at most `running` calls of one model at once, at most `waiting` more
//! queued behind them; past that a call is turned away at once (the server answers 503 with
//! `Retry-After`), so load never grows memory or latency without bound.

use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::{Semaphore, SemaphorePermit};

/// How many calls may run and wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdmissionLimits {
    /// Calls running at once.
    pub running: usize,
    /// Calls waiting for a running slot.
    pub waiting: usize,
}

/// The gate in front of one model.
#[derive(Debug)]
pub struct Admission {
    running: Semaphore,
    waiting: AtomicUsize,
    limits: AdmissionLimits,
}

/// A call turned away: every running slot and every waiting place is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("busy: {running} calls are running and {waiting} are waiting, the most this model takes")]
pub struct Busy {
    /// The running limit.
    pub running: usize,
    /// The waiting limit.
    pub waiting: usize,
}

impl Admission {
    /// A gate with these limits (a running limit of 0 is taken as 1).
    pub fn new(limits: AdmissionLimits) -> Self {
        let limits = AdmissionLimits {
            running: limits.running.max(1),
            ..limits
        };
        Self {
            running: Semaphore::new(limits.running),
            waiting: AtomicUsize::new(0),
            limits,
        }
    }

    /// A running slot, after waiting for one if a waiting place is free; [`Busy`] at once
    /// otherwise. The slot is given back when the permit drops.
    pub async fn enter(&self) -> Result<SemaphorePermit<'_>, Busy> {
        if let Ok(permit) = self.running.try_acquire() {
            return Ok(permit);
        }
        let busy = Busy {
            running: self.limits.running,
            waiting: self.limits.waiting,
        };
        let queued = self.waiting.fetch_add(1, Ordering::AcqRel);
        if queued >= self.limits.waiting {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(busy);
        }
        // Leaves the queue however the wait ends (answered, or the caller went away).
        let _place = Waiting(&self.waiting);
        self.running.acquire().await.map_err(|_| busy)
    }

    /// The limits in force.
    pub fn limits(&self) -> AdmissionLimits {
        self.limits
    }
}

struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn calls_past_running_and_waiting_are_turned_away() {
        let gate = std::sync::Arc::new(Admission::new(AdmissionLimits {
            running: 2,
            waiting: 1,
        }));
        let a = gate.enter().await.unwrap();
        let _b = gate.enter().await.unwrap();
        // The third waits; a fourth finds the queue full.
        let waiter = {
            let gate = std::sync::Arc::clone(&gate);
            tokio::spawn(async move { gate.enter().await.map(|_| ()) })
        };
        while gate.waiting.load(Ordering::Acquire) == 0 {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            gate.enter().await.err(),
            Some(Busy {
                running: 2,
                waiting: 1
            })
        );
        drop(a);
        assert_eq!(waiter.await.unwrap(), Ok(()));
        assert_eq!(gate.waiting.load(Ordering::Acquire), 0);
    }

    #[tokio::test]
    async fn a_caller_that_gives_up_leaves_the_queue() {
        let gate = Admission::new(AdmissionLimits {
            running: 1,
            waiting: 1,
        });
        let _running = gate.enter().await.unwrap();
        let gave_up =
            tokio::time::timeout(std::time::Duration::from_millis(10), gate.enter()).await;
        assert!(gave_up.is_err());
        assert_eq!(gate.waiting.load(Ordering::Acquire), 0);
    }
}
