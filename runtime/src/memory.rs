//! A call's working memory, known before it runs, and the budget calls share.
//!
//! What a model builds from its inputs can be far larger than the inputs (a transformer's
//! attention grows with the square of the sequence), so bounding a request by its bytes or
//! elements does not bound the memory it takes. Each model's [`CallCost`] (from its graph:
//! [`crate::graph_memory`]) says what one call needs for its rows and sequence length; a server
//! splits a call over its per-call bound into sub-batches that fit ([`CallCost::rows_within`]),
//! refuses only what cannot fit as one row, and admits calls into the process-wide
//! [`MemoryBudget`] by their estimated bytes, so concurrent calls cannot add up past it.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// What one call of a model needs, bytes: `fixed + rows × per_row` at one sequence length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CallCost {
    /// Whatever the rows (a batch of 0 would take this).
    pub fixed: u64,
    /// Each row.
    pub per_row: u64,
}

/// A call that cannot fit its bound even as one row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "one row of this model needs {needs_mib} MiB of working memory here, more than the {bound_mib} MiB one call may take; send shorter inputs"
)]
pub struct TooLarge {
    /// What one row (with the fixed part) needs, MiB (rounded up).
    pub needs_mib: u64,
    /// The per-call bound, MiB.
    pub bound_mib: u64,
}

impl CallCost {
    /// The bytes of a call of `rows` rows (saturating).
    pub fn bytes(&self, rows: u64) -> u64 {
        self.fixed.saturating_add(rows.saturating_mul(self.per_row))
    }

    /// The most rows one call may carry within `bound` bytes (at least 1), or [`TooLarge`]
    /// when a single row does not fit.
    pub fn rows_within(&self, bound: u64) -> Result<u64, TooLarge> {
        let one = self.bytes(1);
        if one > bound {
            return Err(TooLarge {
                needs_mib: one.div_ceil(1 << 20),
                bound_mib: bound >> 20,
            });
        }
        Ok((bound - self.fixed)
            .checked_div(self.per_row)
            .unwrap_or(u64::MAX)
            .max(1))
    }
}

/// The ranges of rows `[start, end)` that cut `rows` rows into parts of at most `per_part`.
pub fn parts(rows: u64, per_part: u64) -> impl Iterator<Item = (u64, u64)> {
    let per_part = per_part.max(1);
    (0..rows.div_ceil(per_part)).map(move |i| (i * per_part, ((i + 1) * per_part).min(rows)))
}

/// The working memory every call of a process shares, in KiB permits: a call reserves its
/// estimate before it runs and gives it back when it ends.
#[derive(Debug, Clone)]
pub struct MemoryBudget {
    permits: Arc<Semaphore>,
    total: u64,
}

/// The budget is taken by other calls for longer than a call may wait (answer 503 with
/// `Retry-After`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "busy: calls running now hold the device's working memory ({total_mib} MiB); this call needs {needs_mib} MiB of it"
)]
pub struct MemoryBusy {
    /// The whole budget, MiB.
    pub total_mib: u64,
    /// What the call asked for, MiB (rounded up).
    pub needs_mib: u64,
}

/// Working memory held by a running call, given back when dropped.
#[derive(Debug)]
pub struct Reservation {
    _permits: Option<OwnedSemaphorePermit>,
    /// The bytes reserved.
    pub bytes: u64,
}

impl Reservation {
    /// A reservation of nothing (a body read with no budget).
    pub fn none() -> Self {
        Self {
            _permits: None,
            bytes: 0,
        }
    }
}

/// Bytes to KiB permits, rounded up; at least 1 for any call so even empty calls are counted.
fn kib(bytes: u64) -> u64 {
    bytes.div_ceil(1024).max(1)
}

impl MemoryBudget {
    /// A budget of `bytes`.
    pub fn new(bytes: u64) -> Self {
        let permits = usize::try_from(kib(bytes))
            .unwrap_or(Semaphore::MAX_PERMITS)
            .min(Semaphore::MAX_PERMITS);
        Self {
            permits: Arc::new(Semaphore::new(permits)),
            total: bytes,
        }
    }

    /// The whole budget, bytes.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// The bytes reserved by running calls now.
    pub fn in_use(&self) -> u64 {
        let total = kib(self.total);
        total.saturating_sub(self.permits.available_permits() as u64) * 1024
    }

    /// Reserves `bytes` (at most the whole budget: a caller splits larger calls first), waiting
    /// up to `wait` for running calls to give enough back.
    pub async fn reserve(&self, bytes: u64, wait: Duration) -> Result<Reservation, MemoryBusy> {
        let busy = MemoryBusy {
            total_mib: self.total >> 20,
            needs_mib: bytes.div_ceil(1 << 20),
        };
        let wanted = kib(bytes.min(self.total));
        let wanted = u32::try_from(wanted).map_err(|_| busy)?;
        let permits = Arc::clone(&self.permits);
        match tokio::time::timeout(wait, permits.acquire_many_owned(wanted)).await {
            Ok(Ok(permits)) => Ok(Reservation {
                _permits: Some(permits),
                bytes,
            }),
            _ => Err(busy),
        }
    }

    /// Adds `bytes` to `reservation` (made from this budget), waiting up to `wait`; on
    /// [`MemoryBusy`] the reservation keeps what it had.
    pub async fn grow(
        &self,
        reservation: &mut Reservation,
        bytes: u64,
        wait: Duration,
    ) -> Result<(), MemoryBusy> {
        let more = self.reserve(bytes, wait).await?;
        match (&mut reservation._permits, more._permits) {
            (Some(held), Some(more)) => held.merge(more),
            (held @ None, more) => *held = more,
            (Some(_), None) => {}
        }
        reservation.bytes = reservation.bytes.saturating_add(bytes);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_are_cut_into_parts_that_fit_and_one_row_too_many_is_refused() {
        let cost = CallCost {
            fixed: 1 << 20,
            per_row: 3 << 20,
        };
        assert_eq!(cost.bytes(2), 7 << 20);
        assert_eq!(cost.rows_within(10 << 20), Ok(3));
        assert_eq!(cost.rows_within(4 << 20), Ok(1));
        let err = cost.rows_within(3 << 20).unwrap_err();
        assert_eq!(
            err,
            TooLarge {
                needs_mib: 4,
                bound_mib: 3
            }
        );
        assert!(err.to_string().contains("4 MiB"), "{err}");
        let free = CallCost {
            fixed: 10,
            per_row: 0,
        };
        assert_eq!(free.rows_within(10), Ok(u64::MAX));
        assert_eq!(
            parts(7, 3).collect::<Vec<_>>(),
            vec![(0, 3), (3, 6), (6, 7)]
        );
        assert_eq!(parts(0, 3).count(), 0);
        assert_eq!(parts(2, 0).collect::<Vec<_>>(), vec![(0, 1), (1, 2)]);
    }

    #[tokio::test]
    async fn calls_wait_for_the_budget_and_give_up_busy() {
        let budget = MemoryBudget::new(10 << 20);
        let a = budget.reserve(6 << 20, Duration::ZERO).await.unwrap();
        assert_eq!(budget.in_use(), 6 << 20);
        let busy = budget
            .reserve(5 << 20, Duration::from_millis(20))
            .await
            .unwrap_err();
        assert_eq!(busy.needs_mib, 5);
        let waiting = {
            let budget = budget.clone();
            tokio::spawn(async move { budget.reserve(5 << 20, Duration::from_secs(5)).await })
        };
        drop(a);
        let b = waiting.await.unwrap().unwrap();
        assert_eq!(b.bytes, 5 << 20);
        drop(b);
        assert_eq!(budget.in_use(), 0);
    }
}
