//! Per-address state shared by every request to that address: retry
//! budgets and limits per destination, circuit breakers per endpoint.
//!
//! A lookup happens on every request, so the map is split into shards,
//! each behind its own small mutex, and hands out `Arc`s: requests to
//! different addresses rarely touch the same lock, and nothing is allocated
//! after an address's first request. The map is bounded: when a shard is
//! full, entries nobody holds and that carry no state worth keeping (an idle
//! destination, a closed breaker) are dropped, so a workload that talks to
//! many addresses cannot grow it without limit.
//!
//! The maps hash with foldhash, seeded per map, not SipHash: the keys are
//! addresses the local application chose to talk to, nothing a remote
//! party picks, and two SipHash rounds per lookup cost more than the
//! lookup itself. The proxy's other per-request maps (router, pools) hash
//! the same way for the same reason.

use std::hash::BuildHasher;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use foldhash::fast::RandomState;

const SHARDS: usize = 16;
/// Addresses tracked per policy before idle ones are dropped.
const CAPACITY: usize = 4096;

/// State that can be forgotten without changing behaviour.
pub(crate) trait Forgettable {
    /// Whether dropping this entry loses nothing; only asked while no one
    /// else holds the entry.
    fn forgettable(&self) -> bool;
}

type Map<V> = foldhash::HashMap<SocketAddr, Arc<V>>;
type Shard<V> = Mutex<Map<V>>;

pub(crate) struct Registry<V> {
    shards: Box<[Shard<V>]>,
    hasher: RandomState,
}

impl<V: Forgettable> Registry<V> {
    pub(crate) fn new() -> Self {
        Registry {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            hasher: RandomState::default(),
        }
    }

    fn shard(&self, key: SocketAddr) -> std::sync::MutexGuard<'_, Map<V>> {
        let i = (self.hasher.hash_one(key) % SHARDS as u64) as usize;
        // A panic while holding the lock cannot leave a map half-updated in
        // a way that matters here, so a poisoned lock is used as it is.
        self.shards[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The entry for `key`, created with `make` on first use.
    pub(crate) fn get_or_insert_with(&self, key: SocketAddr, make: impl FnOnce() -> V) -> Arc<V> {
        let mut shard = self.shard(key);
        if let Some(v) = shard.get(&key) {
            return v.clone();
        }
        if shard.len() >= CAPACITY / SHARDS {
            // Under the shard lock nobody can take a new reference, so a
            // count of one means only the map holds the entry.
            shard.retain(|_, v| Arc::strong_count(v) > 1 || !v.forgettable());
        }
        let v = Arc::new(make());
        shard.insert(key, v.clone());
        v
    }

    pub(crate) fn get(&self, key: SocketAddr) -> Option<Arc<V>> {
        self.shard(key).get(&key).cloned()
    }

    /// Visits every entry; for metrics, not for the request path.
    pub(crate) fn for_each(&self, mut f: impl FnMut(SocketAddr, &V)) {
        for shard in self.shards.iter() {
            let shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            for (k, v) in shard.iter() {
                f(*k, v);
            }
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).len())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    struct Entry(AtomicBool);
    impl Forgettable for Entry {
        fn forgettable(&self) -> bool {
            self.0.load(Ordering::Relaxed)
        }
    }

    fn addr(i: usize) -> SocketAddr {
        SocketAddr::from(([10, (i >> 16) as u8, (i >> 8) as u8, i as u8], 80))
    }

    #[test]
    fn entries_are_shared_and_only_idle_unheld_ones_are_dropped() {
        let r = Registry::<Entry>::new();
        let a = r.get_or_insert_with(addr(0), || Entry(AtomicBool::new(true)));
        let again = r.get_or_insert_with(addr(0), || unreachable!("created twice"));
        assert!(Arc::ptr_eq(&a, &again));
        drop(again);
        let busy = r.get_or_insert_with(addr(1), || Entry(AtomicBool::new(false)));
        for i in 2..3 * CAPACITY {
            r.get_or_insert_with(addr(i), || Entry(AtomicBool::new(true)));
        }
        assert!(r.len() <= CAPACITY + SHARDS, "bounded: {}", r.len());
        assert!(
            Arc::ptr_eq(&r.get(addr(0)).unwrap(), &a),
            "held entries stay"
        );
        assert!(r.get(addr(1)).is_some(), "entries with state stay");
        drop(busy);
        let mut seen = 0;
        r.for_each(|_, _| seen += 1);
        assert_eq!(seen, r.len());
    }
}
