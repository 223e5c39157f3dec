//! Limits on the work in progress for one destination, which fail fast.
//!
//! - `max_connections`: the application's opaque TCP connections open to
//!   the destination, each of which is one connection at the destination
//!   (a new one over the limit is reset);
//! - `max_pending`: requests waiting for a connection or stream to it;
//! - `max_in_flight`: requests sent to it and not yet answered in full.
//!
//! A request over a limit is answered 503 at once, with a `legate-error`
//! header naming the limit. It is never queued: a queue in front of a
//! destination that cannot keep up only converts its slowness into memory
//! held by the proxy and into latency for every caller, and the client
//! cannot tell either from a slow application. Failing fast lets clients
//! back off or go elsewhere, and keeps the proxy's memory bounded: each
//! request in flight may hold up to `retry_buffer` of body, so the
//! defaults (1024 each, as Envoy's) bound that at 64 MiB per destination.
//! `0` removes a limit for destinations that legitimately need more.
//!
//! A [`LimitGuard`] holds its place until dropped, so a limit is released
//! on every path, errors and cancellations included.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

/// Which limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitKind {
    Connections,
    Pending,
    InFlight,
}

impl LimitKind {
    /// The configuration key that sets it, also the `legate-error` reason.
    pub fn key(self) -> &'static str {
        match self {
            LimitKind::Connections => "max_connections",
            LimitKind::Pending => "max_pending",
            LimitKind::InFlight => "max_in_flight",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The configured limits; `0` for none.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LimitSettings {
    pub max_connections: u32,
    pub max_pending: u32,
    pub max_in_flight: u32,
}

/// The counters of one destination.
#[derive(Debug)]
pub struct Limits {
    max: [u32; 3],
    used: [AtomicU32; 3],
}

/// A place under a limit, given back when dropped.
#[derive(Debug)]
#[must_use = "the place is given back as soon as the guard is dropped"]
pub struct LimitGuard {
    limits: Arc<Limits>,
    kind: LimitKind,
}

/// A limit was reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{} ({max}) reached for this destination", .kind.key())]
pub struct LimitExceeded {
    pub kind: LimitKind,
    pub max: u32,
}

impl Limits {
    pub fn new(s: LimitSettings) -> Self {
        Limits {
            max: [s.max_connections, s.max_pending, s.max_in_flight],
            used: Default::default(),
        }
    }

    /// Takes a place under `kind`'s limit, or fails at once.
    pub fn acquire(self: &Arc<Self>, kind: LimitKind) -> Result<LimitGuard, LimitExceeded> {
        let max = self.max[kind.index()];
        let used = &self.used[kind.index()];
        if max == 0 {
            // Still counted, for metrics.
            used.fetch_add(1, Ordering::Relaxed);
        } else {
            used.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .map_err(|_| LimitExceeded { kind, max })?;
        }
        Ok(LimitGuard {
            limits: self.clone(),
            kind,
        })
    }

    /// Places taken now.
    pub fn in_use(&self, kind: LimitKind) -> u32 {
        self.used[kind.index()].load(Ordering::Relaxed)
    }

    /// The limit, or `None` when there is none.
    pub fn max(&self, kind: LimitKind) -> Option<u32> {
        Some(self.max[kind.index()]).filter(|&m| m > 0)
    }
}

impl LimitGuard {
    pub fn kind(&self) -> LimitKind {
        self.kind
    }
}

impl Drop for LimitGuard {
    fn drop(&mut self) {
        self.limits.used[self.kind.index()].fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(c: u32, p: u32, f: u32) -> Arc<Limits> {
        Arc::new(Limits::new(LimitSettings {
            max_connections: c,
            max_pending: p,
            max_in_flight: f,
        }))
    }

    #[test]
    fn acquiring_past_a_limit_fails_at_once_and_drop_releases() {
        let l = limits(1, 2, 3);
        let guards: Vec<LimitGuard> = (0..3)
            .map(|_| l.acquire(LimitKind::InFlight).unwrap())
            .collect();
        assert_eq!(
            l.acquire(LimitKind::InFlight).unwrap_err(),
            LimitExceeded {
                kind: LimitKind::InFlight,
                max: 3
            }
        );
        assert_eq!(l.in_use(LimitKind::InFlight), 3);
        // Each limit is separate.
        let _p = l.acquire(LimitKind::Pending).unwrap();
        let _c = l.acquire(LimitKind::Connections).unwrap();
        assert!(l.acquire(LimitKind::Connections).is_err());
        drop(guards);
        assert_eq!(l.in_use(LimitKind::InFlight), 0);
        assert!(l.acquire(LimitKind::InFlight).is_ok());
        let err = l.acquire(LimitKind::Connections).unwrap_err();
        assert_eq!(
            err.to_string(),
            "max_connections (1) reached for this destination"
        );
    }

    #[test]
    fn zero_is_unlimited_but_still_counted() {
        let l = limits(0, 0, 0);
        assert_eq!(l.max(LimitKind::Pending), None);
        let held: Vec<LimitGuard> = (0..5000)
            .map(|_| l.acquire(LimitKind::Pending).unwrap())
            .collect();
        assert_eq!(l.in_use(LimitKind::Pending), 5000);
        drop(held);
        assert_eq!(l.in_use(LimitKind::Pending), 0);
    }

    #[test]
    fn concurrent_acquires_never_exceed_the_limit() {
        let l = limits(0, 0, 10);
        let all_tried = std::sync::Barrier::new(4);
        let granted: usize = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| {
                    s.spawn(|| {
                        let held: Vec<LimitGuard> = (0..10)
                            .filter_map(|_| l.acquire(LimitKind::InFlight).ok())
                            .collect();
                        // Hold everything until every thread has tried.
                        all_tried.wait();
                        held.len()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(granted, 10);
        assert_eq!(l.in_use(LimitKind::InFlight), 0);
    }
}
