//! Exponential backoff with full jitter between retries.
//!
//! The ceiling doubles with each retry (`base`, `2 × base`, `4 × base`...)
//! up to `max`, and the actual wait is drawn uniformly between zero and the
//! ceiling. The randomness matters more than the growth: when a destination
//! fails, every client sees the failure at once, and fixed delays would send
//! all their retries back at once too. Spreading each retry over the whole
//! interval ("full jitter", from the analysis in the AWS Architecture Blog's
//! *Exponential Backoff and Jitter*) does the least total work for clients
//! competing for the same recovering server.
//!
//! The defaults (25ms growing to at most 250ms, Envoy's) are short because
//! a client is waiting on every retry; the retry budget, not the backoff,
//! is what protects a failing destination from load.

use std::time::Duration;

use rand::Rng;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    base: Duration,
    max: Duration,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Self {
        Backoff {
            base,
            max: max.max(base),
        }
    }

    /// The longest wait before retry number `retry` (1 for the first):
    /// `base × 2^(retry-1)`, at most `max`.
    pub fn ceiling(&self, retry: u32) -> Duration {
        1u32.checked_shl(retry.saturating_sub(1))
            .and_then(|factor| self.base.checked_mul(factor))
            .map_or(self.max, |d| d.min(self.max))
    }

    /// A random wait before retry number `retry`, up to its ceiling.
    pub fn delay(&self, retry: u32) -> Duration {
        self.delay_with(retry, &mut rand::rng())
    }

    pub fn delay_with<R: Rng + ?Sized>(&self, retry: u32, rng: &mut R) -> Duration {
        let ceiling = self.ceiling(retry).as_nanos() as u64;
        Duration::from_nanos(rng.random_range(0..=ceiling))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn the_ceiling_doubles_up_to_the_cap() {
        let b = Backoff::new(25 * MS, 250 * MS);
        let ceilings: Vec<u128> = (1..=6).map(|n| b.ceiling(n).as_millis()).collect();
        assert_eq!(ceilings, [25, 50, 100, 200, 250, 250]);
        assert_eq!(b.ceiling(0), 25 * MS, "retry 0 is treated as the first");
        assert_eq!(b.ceiling(u32::MAX), 250 * MS, "no overflow");
        assert_eq!(
            Backoff::new(2 * MS, MS).ceiling(5),
            2 * MS,
            "max below base"
        );
    }

    #[test]
    fn delays_are_spread_over_the_whole_interval() {
        let b = Backoff::new(25 * MS, 250 * MS);
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for retry in 1..8 {
            let delays: Vec<Duration> = (0..500).map(|_| b.delay_with(retry, &mut rng)).collect();
            let ceiling = b.ceiling(retry);
            assert!(delays.iter().all(|d| *d <= ceiling));
            // Full jitter: both the bottom and the top quarter get used.
            assert!(delays.iter().any(|d| *d < ceiling / 4), "retry {retry}");
            assert!(delays.iter().any(|d| *d > ceiling * 3 / 4), "retry {retry}");
        }
        assert!(b.delay(3) <= 100 * MS);
    }
}
