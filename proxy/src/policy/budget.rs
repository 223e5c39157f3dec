//! The retry budget: retries may add only a fraction to the load a
//! destination already gets.
//!
//! Retries are what turn a brownout into an outage. A destination failing
//! half its requests gets, with three attempts per request, almost twice the
//! load, and every proxy in a call chain multiplies that again. Capping
//! attempts per request does not help, because the problem is the sum over
//! all requests. A budget caps the sum: every request deposits `ratio` of a
//! retry, every retry withdraws one, and a retry the budget cannot pay for is
//! not made (the failure goes back to the caller). With the default `0.2`, a
//! failing destination sees at most 1.2 times its normal load.
//!
//! A small reserve, `min_per_second` times the window, is always available,
//! so a destination that gets a request a minute can still retry it. This
//! is the budget of Finagle and Linkerd, with their defaults: 20%, 10 per
//! second, over 10 seconds. Like theirs, it bounds every window, not every
//! second: retries banked by healthy traffic, and the reserve, may be spent
//! in one burst when failures start.
//!
//! Deposits and withdrawals are counted in ten buckets that together span
//! the window, so old traffic expires a tenth of the window at a time. Each
//! bucket is one atomic word holding its bucket number and its count, so a
//! request costs one compare-and-swap and never takes a lock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

const BUCKETS: usize = 10;

/// A retry budget for one destination.
#[derive(Debug)]
pub struct RetryBudget {
    start: Instant,
    bucket_nanos: u64,
    ratio: f64,
    /// Retries always allowed per window.
    reserve: u64,
    deposits: [AtomicU64; BUCKETS],
    withdrawals: [AtomicU64; BUCKETS],
}

/// One bucket's number (low 32 bits of it) and count, in one word.
fn pack(bucket: u32, count: u32) -> u64 {
    (u64::from(bucket) << 32) | u64::from(count)
}

fn unpack(word: u64) -> (u32, u32) {
    ((word >> 32) as u32, word as u32)
}

impl RetryBudget {
    /// `ratio` retries per request, plus `min_per_second`, over `window`.
    pub fn new(ratio: f64, min_per_second: u32, window: Duration) -> Self {
        let window = window.max(Duration::from_millis(BUCKETS as u64));
        RetryBudget {
            start: Instant::now(),
            bucket_nanos: (window.as_nanos() / BUCKETS as u128).max(1) as u64,
            ratio: if ratio.is_finite() {
                ratio.max(0.0)
            } else {
                0.0
            },
            reserve: (f64::from(min_per_second) * window.as_secs_f64()).ceil() as u64,
            deposits: Default::default(),
            withdrawals: Default::default(),
        }
    }

    /// The bucket number for `now`. Only its low 32 bits are kept: with
    /// buckets of at least 100ms they repeat after 13 years.
    fn bucket(&self, now: Instant) -> u32 {
        let nanos = now.saturating_duration_since(self.start).as_nanos();
        (nanos / u128::from(self.bucket_nanos)) as u32
    }

    fn add(slots: &[AtomicU64; BUCKETS], bucket: u32) {
        let slot = &slots[bucket as usize % BUCKETS];
        let _ = slot.fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
            let (b, n) = unpack(w);
            // A bucket left from an earlier window starts over.
            Some(if b == bucket {
                pack(b, n.saturating_add(1))
            } else {
                pack(bucket, 1)
            })
        });
    }

    /// Takes back one count from `bucket`, if it is still that bucket.
    fn undo(slots: &[AtomicU64; BUCKETS], bucket: u32) {
        let slot = &slots[bucket as usize % BUCKETS];
        let _ = slot.fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
            let (b, n) = unpack(w);
            (b == bucket && n > 0).then(|| pack(b, n - 1))
        });
    }

    /// The total over the buckets inside the window ending at `bucket`.
    fn sum(slots: &[AtomicU64; BUCKETS], bucket: u32) -> u64 {
        slots
            .iter()
            .map(|s| unpack(s.load(Ordering::Acquire)))
            .filter(|&(b, _)| bucket.wrapping_sub(b) < BUCKETS as u32)
            .map(|(_, n)| u64::from(n))
            .sum()
    }

    /// Counts one original request (not a retry). Call it for every
    /// request, retryable or not: they all earn the budget.
    pub fn deposit(&self) {
        self.deposit_at(Instant::now());
    }

    pub fn deposit_at(&self, now: Instant) {
        Self::add(&self.deposits, self.bucket(now));
    }

    /// Takes one retry from the budget; `false` means do not retry.
    pub fn try_withdraw(&self) -> bool {
        self.try_withdraw_at(Instant::now())
    }

    pub fn try_withdraw_at(&self, now: Instant) -> bool {
        let bucket = self.bucket(now);
        // Withdraw first and check after, so that concurrent retries can
        // never overdraw together; a race only refuses a retry spuriously.
        Self::add(&self.withdrawals, bucket);
        if Self::sum(&self.withdrawals, bucket) <= self.allowed(bucket) {
            true
        } else {
            Self::undo(&self.withdrawals, bucket);
            false
        }
    }

    fn allowed(&self, bucket: u32) -> u64 {
        let earned = (Self::sum(&self.deposits, bucket) as f64 * self.ratio) as u64;
        earned.saturating_add(self.reserve)
    }

    /// Retries the budget would pay for now; for metrics.
    pub fn remaining_at(&self, now: Instant) -> u64 {
        let bucket = self.bucket(now);
        self.allowed(bucket)
            .saturating_sub(Self::sum(&self.withdrawals, bucket))
    }

    /// Whether nothing is counted in the current window.
    pub(crate) fn is_idle(&self, now: Instant) -> bool {
        let bucket = self.bucket(now);
        Self::sum(&self.deposits, bucket) == 0 && Self::sum(&self.withdrawals, bucket) == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// A destination failing every request at `rps` for `secs` seconds,
    /// where each failure asks for one retry; returns retries granted in
    /// each second.
    fn sustained_failure(budget: &RetryBudget, rps: u32, secs: u32) -> Vec<u32> {
        let t0 = budget.start;
        let step = Duration::from_secs(1) / rps;
        let mut per_second = vec![0; secs as usize];
        for i in 0..rps * secs {
            let now = t0 + step * i;
            budget.deposit_at(now);
            if budget.try_withdraw_at(now) {
                per_second[(i / rps) as usize] += 1;
            }
        }
        per_second
    }

    #[test]
    fn sustained_failure_gets_ratio_plus_minimum_retries() {
        let budget = RetryBudget::new(0.2, 10, Duration::from_secs(10));
        let per_second = sustained_failure(&budget, 100, 60);
        // The first second may spend the reserve built for the whole window
        // (100) plus what its own requests earn (20).
        assert!(per_second[0] <= 120, "{per_second:?}");
        // Every window holds 1000 requests: they earn 200 retries, and the
        // reserve adds 100. The budget is checked against exactly such a
        // window, so no ten consecutive seconds get more.
        for (i, w) in per_second.windows(10).enumerate() {
            let n: u32 = w.iter().sum();
            assert!(
                n <= 300,
                "{n} retries in seconds {i}..{}: {per_second:?}",
                i + 10
            );
        }
        // And the budget is used, not just refused: 30/s on average.
        let total: u32 = per_second.iter().sum();
        assert!(total >= 29 * 60, "{total} over 60s: {per_second:?}");
    }

    #[test]
    fn healthy_traffic_banks_retries_for_a_burst() {
        let budget = RetryBudget::new(0.2, 0, Duration::from_secs(10));
        let t0 = budget.start;
        for i in 0..1000 {
            budget.deposit_at(t0 + MS * i);
        }
        let now = t0 + Duration::from_secs(1);
        assert_eq!(budget.remaining_at(now), 200);
        let granted = (0..500).filter(|_| budget.try_withdraw_at(now)).count();
        assert_eq!(granted, 200);
        // Deposits older than the window no longer count.
        assert_eq!(budget.remaining_at(t0 + Duration::from_secs(11)), 0);
        assert!(budget.is_idle(t0 + Duration::from_secs(12)));
    }

    #[test]
    fn the_reserve_lets_a_quiet_destination_retry() {
        let budget = RetryBudget::new(0.2, 10, Duration::from_secs(10));
        let t0 = budget.start;
        assert_eq!(budget.remaining_at(t0), 100);
        let granted = (0..200).filter(|_| budget.try_withdraw_at(t0)).count();
        assert_eq!(granted, 100);
        assert!(!budget.try_withdraw_at(t0 + Duration::from_secs(9)));
        // Withdrawals expire with their window, like deposits.
        assert!(budget.try_withdraw_at(t0 + Duration::from_secs(10)));
    }

    #[test]
    fn zero_ratio_and_minimum_never_retries() {
        let budget = RetryBudget::new(0.0, 0, Duration::from_secs(10));
        budget.deposit();
        assert!(!budget.try_withdraw());
    }

    #[test]
    fn concurrent_withdrawals_never_overdraw() {
        let budget = RetryBudget::new(0.5, 0, Duration::from_secs(10));
        let now = budget.start + MS;
        for _ in 0..100 {
            budget.deposit_at(now);
        }
        let granted: usize = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| s.spawn(|| (0..100).filter(|_| budget.try_withdraw_at(now)).count()))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert!(granted <= 50, "{granted}");
        // Whatever a race refused is still there for the next retry.
        let after = (0..100).filter(|_| budget.try_withdraw_at(now)).count();
        assert_eq!(granted + after, 50);
    }
}
