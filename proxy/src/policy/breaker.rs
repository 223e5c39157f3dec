//! Circuit breakers, one per endpoint (the address the proxy connects to).
//!
//! ```text
//!            N consecutive failures                 ejection over
//!   Closed ─────────────────────────▶ Open ───────────────────────▶ HalfOpen
//!     ▲                                ▲                               │
//!     │            probe failed:       └───────────────────────────────┤
//!     │            longer ejection                                     │
//!     └────────────────────────────────────────────────────────────────┘
//!                              probe succeeded
//! ```
//!
//! - **Closed**: everything is admitted; `breaker_failures` failures in a
//!   row (any success resets the count) open the breaker.
//! - **Open**: everything is refused at once with a 503, for the ejection
//!   time: `breaker_base_ejection × 2^(n-1)`, capped at
//!   `breaker_max_ejection`, where `n` counts ejections since the endpoint
//!   was last stable. A dead endpoint is then probed ever less often; a
//!   recovered one soon.
//! - **HalfOpen**: exactly one request, the probe, is admitted; everyone
//!   else is refused until it finishes. Its success closes the breaker,
//!   its failure opens it again for longer.
//!
//! **When the ejection count resets.** Not on the probe's success: an
//! endpoint that answers one probe and fails again under load would be
//! probed at the base rate forever. The count resets once the breaker has
//! stayed closed for `breaker_max_ejection`, the longest ejection, which is
//! proof enough of recovery.
//!
//! **What counts.** An attempt's outcome, as `Outcome::health` judges it.
//! An attempt that failed through the client's doing (its request body
//! broke off, or a timeout passed while its upload was still arriving)
//! drops its permit unjudged: it says nothing about the endpoint.
//!
//! **Defaults.** Five failures, as Envoy's outlier detection. The ejection is
//! shorter than Envoy's 30s on purpose: Envoy ejects one host of many and
//! sends the traffic to the others, while a transparent proxy has only the
//! address the application dialled, so an ejection refuses *all* traffic to
//! it. 5s, doubling to at most a minute, sheds load from a dead endpoint
//! without keeping a recovered one out for long.
//!
//! **Cost.** While closed, admitting a request and recording a success are a
//! couple of atomic loads (a store only to reset a failure count): requests
//! to a healthy endpoint share no written cache line. The mutex is taken
//! only by failures and by the open and half-open states.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

use super::registry::{Forgettable, Registry};
use super::retry::Outcome;

/// A breaker's settings; `failures == 0` disables breaking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerSettings {
    pub failures: u32,
    pub base_ejection: Duration,
    pub max_ejection: Duration,
}

impl BreakerSettings {
    /// The ejection after the `n`th opening since the endpoint was stable.
    pub fn ejection(&self, n: u32) -> Duration {
        1u32.checked_shl(n.saturating_sub(1))
            .and_then(|factor| self.base_ejection.checked_mul(factor))
            .map_or(self.max_ejection, |d| d.min(self.max_ejection))
    }
}

/// A breaker's state, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    /// Refusing requests. Stays reported as open until the next request
    /// after the ejection, which becomes the probe.
    Open,
    HalfOpen,
}

impl BreakerState {
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }
}

const CLOSED: u8 = 0;
const OPEN: u8 = 1;
const HALF_OPEN: u8 = 2;

/// The circuit breaker of one endpoint.
#[derive(Debug)]
pub struct Breaker {
    settings: BreakerSettings,
    /// Mirrors `Inner`'s state for the lock-free closed path; only written
    /// with the lock held.
    mode: AtomicU8,
    /// Bumped on every transition; only written with the lock held. A
    /// permit from an earlier generation is not counted, so a request
    /// admitted before the breaker opened cannot close it again.
    generation: AtomicU64,
    failures: AtomicU32,
    transitions: AtomicU64,
    ejections: AtomicU64,
    /// Transitions of every breaker of the policy, by the state entered;
    /// outlives this breaker when it is forgotten, for metrics.
    totals: Arc<[AtomicU64; 3]>,
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    open_until: Instant,
    probe_out: bool,
    /// Ejections since the endpoint was last stable.
    streak: u32,
    /// When the breaker last closed after an ejection.
    closed_at: Option<Instant>,
}

impl Breaker {
    fn new(settings: BreakerSettings, totals: Arc<[AtomicU64; 3]>) -> Self {
        Breaker {
            totals,
            settings,
            mode: AtomicU8::new(CLOSED),
            generation: AtomicU64::new(0),
            failures: AtomicU32::new(0),
            transitions: AtomicU64::new(0),
            ejections: AtomicU64::new(0),
            inner: Mutex::new(Inner {
                open_until: Instant::now(),
                probe_out: false,
                streak: 0,
                closed_at: None,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // The state stays consistent across a panic: every write to it is a
        // single assignment.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn state(&self) -> BreakerState {
        match self.mode.load(Ordering::Acquire) {
            CLOSED => BreakerState::Closed,
            OPEN => BreakerState::Open,
            _ => BreakerState::HalfOpen,
        }
    }

    /// State changes so far.
    pub fn transitions(&self) -> u64 {
        self.transitions.load(Ordering::Relaxed)
    }

    /// Times the breaker opened so far.
    pub fn ejections(&self) -> u64 {
        self.ejections.load(Ordering::Relaxed)
    }

    /// Failures in a row counted towards opening.
    pub fn consecutive_failures(&self) -> u32 {
        self.failures.load(Ordering::Relaxed)
    }

    /// Changes the mode; the caller holds the lock.
    fn set_mode(&self, mode: u8) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.mode.store(mode, Ordering::Release);
        self.transitions.fetch_add(1, Ordering::Relaxed);
        self.totals[usize::from(mode.min(HALF_OPEN))].fetch_add(1, Ordering::Relaxed);
    }

    fn admit_at(self: &Arc<Self>, now: Instant) -> Result<Permit, Duration> {
        let generation = self.generation.load(Ordering::Acquire);
        if self.mode.load(Ordering::Acquire) == CLOSED {
            return Ok(Permit::new(self.clone(), generation, false));
        }
        let mut inner = self.lock();
        let generation = self.generation.load(Ordering::Acquire);
        match self.mode.load(Ordering::Acquire) {
            CLOSED => Ok(Permit::new(self.clone(), generation, false)),
            OPEN if now < inner.open_until => Err(inner.open_until - now),
            OPEN => {
                self.set_mode(HALF_OPEN);
                inner.probe_out = true;
                let generation = self.generation.load(Ordering::Acquire);
                Ok(Permit::new(self.clone(), generation, true))
            }
            _ if inner.probe_out => Err(Duration::ZERO),
            _ => {
                inner.probe_out = true;
                Ok(Permit::new(self.clone(), generation, true))
            }
        }
    }

    fn record(&self, generation: u64, probe: bool, success: bool, now: Instant) {
        if probe {
            let mut inner = self.lock();
            if self.generation.load(Ordering::Acquire) != generation
                || self.mode.load(Ordering::Acquire) != HALF_OPEN
            {
                return;
            }
            if success {
                self.close(&mut inner, now);
            } else {
                self.open(&mut inner, now);
            }
            return;
        }
        if self.generation.load(Ordering::Acquire) != generation {
            return;
        }
        if success {
            // Read first: writing only when needed keeps the line shared.
            if self.failures.load(Ordering::Relaxed) != 0 {
                self.failures.store(0, Ordering::Relaxed);
            }
            return;
        }
        let n = self.failures.fetch_add(1, Ordering::AcqRel) + 1;
        if n >= self.settings.failures {
            let mut inner = self.lock();
            if self.generation.load(Ordering::Acquire) == generation
                && self.mode.load(Ordering::Acquire) == CLOSED
            {
                self.open(&mut inner, now);
            }
        }
    }

    /// A probe ended with neither success nor failure: the next request
    /// becomes the probe.
    fn release_probe(&self, generation: u64) {
        let mut inner = self.lock();
        if self.generation.load(Ordering::Acquire) == generation
            && self.mode.load(Ordering::Acquire) == HALF_OPEN
        {
            inner.probe_out = false;
        }
    }

    fn open(&self, inner: &mut Inner, now: Instant) {
        let stable = inner
            .closed_at
            .is_some_and(|at| now.saturating_duration_since(at) >= self.settings.max_ejection);
        if stable {
            inner.streak = 0;
        }
        inner.streak = inner.streak.saturating_add(1);
        inner.closed_at = None;
        inner.open_until = now + self.settings.ejection(inner.streak);
        inner.probe_out = false;
        self.failures.store(0, Ordering::Relaxed);
        self.ejections.fetch_add(1, Ordering::Relaxed);
        self.set_mode(OPEN);
    }

    fn close(&self, inner: &mut Inner, now: Instant) {
        inner.closed_at = Some(now);
        inner.probe_out = false;
        self.failures.store(0, Ordering::Relaxed);
        self.set_mode(CLOSED);
    }
}

impl Forgettable for Breaker {
    fn forgettable(&self) -> bool {
        self.mode.load(Ordering::Acquire) == CLOSED && self.failures.load(Ordering::Relaxed) == 0
    }
}

/// Leave to send one attempt to an endpoint. Report how it went with
/// [`Permit::record`] or [`Permit::record_outcome`].
///
/// A permit dropped without a record counts as neither success nor
/// failure: that is a request the client cancelled or that never got as
/// far as the endpoint, which says nothing about the endpoint's health.
/// Counting it as a failure would let impatient clients eject a healthy
/// endpoint. A dropped probe frees the probe slot for the next request.
/// (A hung endpoint is still caught: its attempts time out, and a timeout
/// is recorded as a failure.)
#[derive(Debug)]
#[must_use = "a permit records the attempt's outcome; dropped, it counts as neither"]
pub struct Permit {
    slot: Option<Slot>,
}

#[derive(Debug)]
struct Slot {
    breaker: Arc<Breaker>,
    generation: u64,
    probe: bool,
}

impl Permit {
    fn new(breaker: Arc<Breaker>, generation: u64, probe: bool) -> Self {
        Permit {
            slot: Some(Slot {
                breaker,
                generation,
                probe,
            }),
        }
    }

    /// A permit with no breaker behind it, when breaking is disabled.
    fn unchecked() -> Self {
        Permit { slot: None }
    }

    /// Whether this attempt is the half-open probe.
    pub fn is_probe(&self) -> bool {
        self.slot.as_ref().is_some_and(|s| s.probe)
    }

    pub fn record(self, success: bool) {
        self.record_at(success, Instant::now());
    }

    pub fn record_at(mut self, success: bool, now: Instant) {
        if let Some(s) = self.slot.take() {
            s.breaker.record(s.generation, s.probe, success, now);
        }
    }

    /// Records what [`Outcome::health`] makes of an outcome, at `now`.
    pub fn record_outcome(self, outcome: &Outcome, now: Instant) {
        if let Some(success) = outcome.health() {
            self.record_at(success, now);
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(s) = self.slot.take() {
            if s.probe {
                s.breaker.release_probe(s.generation);
            }
        }
    }
}

/// An endpoint's breaker refused the attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the circuit breaker for {endpoint} is open after repeated failures; next try in {retry_after:?}")]
pub struct BreakerOpen {
    pub endpoint: SocketAddr,
    /// Until the breaker admits a probe; zero while another probe is out.
    pub retry_after: Duration,
}

/// The breakers of one policy, by endpoint.
pub struct Breakers {
    settings: BreakerSettings,
    map: Registry<Breaker>,
    totals: Arc<[AtomicU64; 3]>,
}

impl Breakers {
    pub fn new(settings: BreakerSettings) -> Self {
        Breakers {
            settings,
            map: Registry::new(),
            totals: Arc::default(),
        }
    }

    /// Transitions of all these breakers so far, by the state entered:
    /// closed, open, half-open. Unlike a sum over [`Breaker::transitions`],
    /// it never goes back when an idle breaker is forgotten.
    pub fn transitions_into(&self) -> [u64; 3] {
        [0, 1, 2].map(|i| self.totals[i].load(Ordering::Relaxed))
    }

    pub fn settings(&self) -> &BreakerSettings {
        &self.settings
    }

    /// Asks to send one attempt to `endpoint`.
    pub fn admit(&self, endpoint: SocketAddr) -> Result<Permit, BreakerOpen> {
        self.admit_at(endpoint, Instant::now())
    }

    pub fn admit_at(&self, endpoint: SocketAddr, now: Instant) -> Result<Permit, BreakerOpen> {
        if self.settings.failures == 0 {
            return Ok(Permit::unchecked());
        }
        let breaker = self.map.get_or_insert_with(endpoint, || {
            Breaker::new(self.settings, self.totals.clone())
        });
        breaker.admit_at(now).map_err(|retry_after| BreakerOpen {
            endpoint,
            retry_after,
        })
    }

    /// The breaker of an endpoint, if it has one yet.
    pub fn get(&self, endpoint: SocketAddr) -> Option<Arc<Breaker>> {
        self.map.get(endpoint)
    }

    /// Visits every endpoint's breaker, for metrics.
    pub fn for_each(&self, f: impl FnMut(SocketAddr, &Breaker)) {
        self.map.for_each(f);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);
    const EP: SocketAddr = SocketAddr::new(
        std::net::IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1)),
        80,
    );

    fn breakers() -> Breakers {
        Breakers::new(BreakerSettings {
            failures: 3,
            base_ejection: 5 * S,
            max_ejection: 60 * S,
        })
    }

    /// Fails `n` attempts in a row at `now`.
    fn fail(b: &Breakers, n: u32, now: Instant) {
        for _ in 0..n {
            b.admit_at(EP, now).unwrap().record_at(false, now);
        }
    }

    fn state(b: &Breakers) -> BreakerState {
        b.get(EP).unwrap().state()
    }

    #[test]
    fn consecutive_failures_open_and_successes_reset_the_count() {
        let b = breakers();
        let now = Instant::now();
        fail(&b, 2, now);
        b.admit_at(EP, now).unwrap().record_at(true, now);
        fail(&b, 2, now);
        assert_eq!(state(&b), BreakerState::Closed);
        assert_eq!(b.get(EP).unwrap().consecutive_failures(), 2);
        fail(&b, 1, now);
        assert_eq!(state(&b), BreakerState::Open);
        assert_eq!(b.transitions_into(), [0, 1, 0], "counted for metrics");
        let err = b.admit_at(EP, now + S).unwrap_err();
        assert_eq!(
            err,
            BreakerOpen {
                endpoint: EP,
                retry_after: 4 * S
            }
        );
        let other: SocketAddr = "10.0.0.2:80".parse().unwrap();
        assert!(b.admit_at(other, now).is_ok(), "breakers are per endpoint");
    }

    #[test]
    fn half_open_admits_exactly_one_probe() {
        let b = breakers();
        let t0 = Instant::now();
        fail(&b, 3, t0);
        let after = t0 + 5 * S;
        let probe = b.admit_at(EP, after).unwrap();
        assert!(probe.is_probe());
        assert_eq!(state(&b), BreakerState::HalfOpen);
        for _ in 0..10 {
            let refused = b.admit_at(EP, after).unwrap_err();
            assert_eq!(refused.retry_after, Duration::ZERO);
        }
        probe.record_at(true, after);
        assert_eq!(state(&b), BreakerState::Closed);
        let p = b.admit_at(EP, after).unwrap();
        assert!(!p.is_probe());
        // open, half-open, closed
        assert_eq!(b.get(EP).unwrap().transitions(), 3);
    }

    #[test]
    fn failed_probes_double_the_ejection_up_to_the_cap() {
        let b = breakers();
        let mut now = Instant::now();
        fail(&b, 3, now);
        let mut ejections = Vec::new();
        for _ in 0..6 {
            let open_for = b.admit_at(EP, now).unwrap_err().retry_after;
            ejections.push(open_for.as_secs());
            now += open_for;
            let probe = b.admit_at(EP, now).unwrap();
            assert!(probe.is_probe());
            probe.record_at(false, now);
        }
        assert_eq!(ejections, [5, 10, 20, 40, 60, 60]);
        assert_eq!(b.get(EP).unwrap().ejections(), 7);
    }

    #[test]
    fn the_ejection_count_resets_only_after_a_stable_period() {
        let b = breakers();
        let mut now = Instant::now();
        let open_and_recover = |now: &mut Instant| {
            fail(&b, 3, *now);
            let open_for = b.admit_at(EP, *now).unwrap_err().retry_after;
            *now += open_for;
            b.admit_at(EP, *now).unwrap().record_at(true, *now);
            open_for.as_secs()
        };
        // Flapping: failing again soon after each recovery.
        let flapping: Vec<u64> = (0..3).map(|_| open_and_recover(&mut now)).collect();
        assert_eq!(flapping, [5, 10, 20]);
        // Stable for the longest ejection: back to the base.
        now += 60 * S;
        assert_eq!(open_and_recover(&mut now), 5);
    }

    #[test]
    fn a_dropped_probe_frees_the_slot_and_stale_permits_do_not_count() {
        let b = breakers();
        let t0 = Instant::now();
        let old = b.admit_at(EP, t0).unwrap();
        fail(&b, 3, t0);
        let later = t0 + 5 * S;
        drop(b.admit_at(EP, later).unwrap());
        assert_eq!(state(&b), BreakerState::HalfOpen);
        // A request admitted before the breaker opened cannot close it.
        old.record_at(true, later);
        assert_eq!(state(&b), BreakerState::HalfOpen);
        let probe = b
            .admit_at(EP, later)
            .expect("the dropped probe's slot is free");
        assert!(probe.is_probe());
        probe.record_at(false, later);
        assert_eq!(state(&b), BreakerState::Open);
    }

    #[test]
    fn outcomes_are_recorded_by_their_health() {
        use super::super::retry::Failure;
        let b = breakers();
        let now = Instant::now();
        for _ in 0..10 {
            b.admit_at(EP, now)
                .unwrap()
                .record_outcome(&Outcome::Failed(Failure::RefusedStream), now);
        }
        assert_eq!(state(&b), BreakerState::Closed, "neutral outcomes");
        for _ in 0..3 {
            b.admit_at(EP, now)
                .unwrap()
                .record_outcome(&Outcome::Failed(Failure::Connect), now);
        }
        assert_eq!(state(&b), BreakerState::Open);
    }

    #[test]
    fn zero_failures_disables_breaking() {
        let b = Breakers::new(BreakerSettings {
            failures: 0,
            base_ejection: S,
            max_ejection: S,
        });
        for _ in 0..100 {
            b.admit(EP).unwrap().record(false);
        }
        assert!(b.get(EP).is_none(), "no state is kept at all");
    }

    #[tokio::test(start_paused = true)]
    async fn ejections_follow_the_clock() {
        let b = breakers();
        for _ in 0..3 {
            b.admit(EP).unwrap().record(false);
        }
        assert!(b.admit(EP).is_err());
        tokio::time::advance(5 * S - Duration::from_millis(1)).await;
        assert!(b.admit(EP).is_err());
        tokio::time::advance(Duration::from_millis(1)).await;
        let probe = b.admit(EP).unwrap();
        assert!(probe.is_probe());
        probe.record(true);
        assert_eq!(state(&b), BreakerState::Closed);
        let mut seen = Vec::new();
        b.for_each(|ep, br| seen.push((ep, br.state())));
        assert_eq!(seen, [(EP, BreakerState::Closed)]);
    }

    #[test]
    fn concurrent_callers_get_one_probe() {
        let b = breakers();
        let t0 = Instant::now();
        fail(&b, 3, t0);
        let later = t0 + 5 * S;
        let probes: Vec<Permit> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| s.spawn(|| b.admit_at(EP, later).ok()))
                .collect();
            handles
                .into_iter()
                .filter_map(|h| h.join().unwrap())
                .collect()
        });
        assert_eq!(probes.len(), 1);
    }
}
