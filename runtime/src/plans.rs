//! The per-shape plan cache both engines keep: a plan prepared for one exact input shape is
//! reused for every call of that shape, and the least recently used shape makes room when the
//! cache is full. A handful of entries: a linear scan beats hashing at batch 1. The coordinator's
//! worker pool keeps its loaded model versions in one too (keyed by model and version).

use std::borrow::Borrow;

/// Plans by input shape, at most `capacity` of them, least recently used out first.
#[derive(Debug, Clone)]
pub struct ShapePlans<K, P> {
    /// (shape, plan, last use).
    entries: Vec<(K, P, u64)>,
    capacity: usize,
    tick: u64,
}

impl<K, P: Clone> ShapePlans<K, P> {
    /// An empty cache that keeps at most `capacity` plans (0 keeps none).
    pub fn new(capacity: usize) -> Self {
        Self {
            entries: Vec::with_capacity(capacity),
            capacity,
            tick: 0,
        }
    }

    /// The plan for `key`, marked as just used.
    pub fn get<Q>(&mut self, key: &Q) -> Option<P>
    where
        K: Borrow<Q>,
        Q: PartialEq + ?Sized,
    {
        self.tick += 1;
        let tick = self.tick;
        let entry = self
            .entries
            .iter_mut()
            .find(|(k, _, _)| k.borrow() == key)?;
        entry.2 = tick;
        Some(entry.1.clone())
    }

    /// Whether `key` has a plan (without marking it used).
    pub fn contains<Q>(&self, key: &Q) -> bool
    where
        K: Borrow<Q>,
        Q: PartialEq + ?Sized,
    {
        self.entries.iter().any(|(k, _, _)| k.borrow() == key)
    }

    /// Keeps `plan` for `key` (replacing an older plan for the same key), evicting the least
    /// recently used plan when full; returns the evicted one.
    pub fn insert(&mut self, key: K, plan: P) -> Option<(K, P)>
    where
        K: PartialEq,
    {
        if self.capacity == 0 {
            return None;
        }
        self.tick += 1;
        let tick = self.tick;
        if let Some(entry) = self.entries.iter_mut().find(|(k, _, _)| *k == key) {
            entry.1 = plan;
            entry.2 = tick;
            return None;
        }
        let evicted = if self.entries.len() >= self.capacity {
            self.entries
                .iter()
                .enumerate()
                .min_by_key(|(_, e)| e.2)
                .map(|(i, _)| i)
                .map(|oldest| {
                    let (k, p, _) = self.entries.swap_remove(oldest);
                    (k, p)
                })
        } else {
            None
        };
        self.entries.push((key, plan, tick));
        evicted
    }

    /// Drops the plan for `key` (a failed call may have left it unusable); returns it.
    pub fn remove<Q>(&mut self, key: &Q) -> Option<P>
    where
        K: Borrow<Q>,
        Q: PartialEq + ?Sized,
    {
        let i = self
            .entries
            .iter()
            .position(|(k, _, _)| k.borrow() == key)?;
        Some(self.entries.swap_remove(i).1)
    }

    /// The shapes that have a plan, in no particular order.
    pub fn keys(&self) -> impl Iterator<Item = &K> {
        self.entries.iter().map(|(k, _, _)| k)
    }

    /// How many plans are kept.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no plan is kept.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The most plans kept.
    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_least_recently_used_shape_makes_room() {
        let mut plans = ShapePlans::new(2);
        assert!(plans.insert(vec![1], "one").is_none());
        assert!(plans.insert(vec![7], "seven").is_none());
        // Using 1 makes 7 the oldest.
        assert_eq!(plans.get(&[1][..]), Some("one"));
        assert_eq!(
            plans.insert(vec![64], "sixty-four"),
            Some((vec![7], "seven"))
        );
        assert!(plans.contains(&[1][..]) && plans.contains(&[64][..]));
        assert!(!plans.contains(&[7][..]));
        assert_eq!(plans.len(), 2);
    }

    #[test]
    fn a_shape_inserted_again_replaces_its_plan_without_evicting() {
        let mut plans = ShapePlans::new(2);
        plans.insert(vec![1], 1);
        plans.insert(vec![2], 2);
        assert_eq!(plans.insert(vec![1], 10), None);
        assert_eq!(plans.get(&[1][..]), Some(10));
        assert_eq!(plans.len(), 2);
    }

    #[test]
    fn a_removed_plan_is_gone_and_frees_its_place() {
        let mut plans = ShapePlans::new(2);
        plans.insert(vec![1], 1);
        plans.insert(vec![2], 2);
        assert_eq!(plans.remove(&[1][..]), Some(1));
        assert_eq!(plans.remove(&[1][..]), None);
        assert_eq!(
            plans.insert(vec![3], 3),
            None,
            "room was made, nothing evicted"
        );
        assert_eq!(plans.get(&[2][..]), Some(2));
    }

    #[test]
    fn capacity_zero_keeps_nothing() {
        let mut plans = ShapePlans::new(0);
        assert_eq!(plans.insert(vec![1], 1), None);
        assert!(plans.is_empty());
        assert_eq!(plans.get(&[1][..]), None);
    }
}
