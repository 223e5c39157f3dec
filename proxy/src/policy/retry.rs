//! Whether a failed attempt is tried again.
//!
//! Three questions, in order, all of which must be yes:
//!
//! 1. **Is the outcome one the policy retries?** `retry_on` lists them.
//!    The default lists only `connect-failure` and `refused-stream`: failures
//!    that prove the server never saw the request, so a retry cannot repeat
//!    anything, whatever the method. `reset`, `5xx`, `gateway-error` and
//!    status codes may follow a request the server already acted on; an
//!    operator lists them for destinations where that is acceptable.
//! 2. **Can the request be sent again?** Its body must still be in hand
//!    (empty, or kept whole within `retry_buffer`, see `http::replay`; a
//!    longer body was streamed and is gone) and its method must allow it. RFC 9110 makes
//!    GET, HEAD, OPTIONS, TRACE, PUT and DELETE idempotent; POST and PATCH
//!    are not, but are retried like them once their body is buffered, since
//!    the operator chose the conditions (gRPC, all POST, needs this). CONNECT
//!    opens a tunnel and other methods have meanings this proxy cannot know
//!    (WebDAV's LOCK), so they are never retried.
//! 3. **Is there room?** Attempts left, time left before `request_timeout`
//!    after the backoff, and a retry in the destination's budget. The budget
//!    is asked last, so that it is only spent on retries that happen.
//!
//! Only an outcome seen before any part of the response reached the client
//! can be retried, which is why a gRPC status counts only from the response
//! headers (a trailers-only response), never from trailers after a body.

use std::time::Duration;

use http::{HeaderMap, Method, StatusCode};
use legate_config::RetryCondition;
use tokio::time::Instant;

use super::backoff::Backoff;
use super::budget::RetryBudget;

/// How an attempt failed without a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// No connection (refused, unreachable, connect or TLS handshake
    /// failed or timed out): nothing was sent.
    Connect,
    /// HTTP/2 `REFUSED_STREAM`, or `GOAWAY` naming a lower last stream: the
    /// server guarantees it did not process the request (RFC 9113 §8.7).
    RefusedStream,
    /// The connection or stream broke after the request was sent, before
    /// the response headers.
    Reset,
    /// `per_try_timeout` passed before the response headers.
    PerTryTimeout,
    /// `request_timeout` passed before the response headers: the attempt's
    /// own limit was longer, or there was none.
    RequestTimeout,
}

impl Failure {
    /// Whether the attempt ran out of time rather than failed.
    pub fn is_timeout(self) -> bool {
        matches!(self, Failure::PerTryTimeout | Failure::RequestTimeout)
    }
}

/// What one attempt came to, as far as retrying and breakers care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Response headers arrived. `grpc_status` is the `grpc-status` header,
    /// present on a trailers-only gRPC response.
    Response {
        status: StatusCode,
        grpc_status: Option<u32>,
    },
    Failed(Failure),
}

/// `grpc-status: 14`.
pub const GRPC_UNAVAILABLE: u32 = 14;

/// The `grpc-status` in response headers or trailers, if any.
pub fn grpc_status(headers: &HeaderMap) -> Option<u32> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.trim().parse().ok())
}

impl Outcome {
    /// The outcome of response headers, reading `grpc-status` from them.
    pub fn response(status: StatusCode, headers: &HeaderMap) -> Self {
        Outcome::Response {
            status,
            grpc_status: grpc_status(headers),
        }
    }

    /// What the attempt says about the endpoint's health, for its circuit
    /// breaker: `Some(false)` for connection failures, resets, timeouts,
    /// any 5xx and gRPC UNAVAILABLE; `None` (neither) for a refused stream,
    /// which only says the server is at its stream limit; and `Some(true)`
    /// for every other response.
    ///
    /// Every 5xx counts, as Envoy's consecutive-5xx outlier detection does:
    /// an endpoint answering nothing but server errors is failing, whether
    /// its own code or its gateway says so, and shedding load from it for
    /// a growing ejection time is what lets it recover. A 4xx is the
    /// client's mistake and says nothing about the endpoint.
    pub fn health(&self) -> Option<bool> {
        match *self {
            Outcome::Failed(Failure::RefusedStream) => None,
            Outcome::Failed(_) => Some(false),
            Outcome::Response {
                status,
                grpc_status,
            } => Some(!status.is_server_error() && grpc_status != Some(GRPC_UNAVAILABLE)),
        }
    }
}

/// The set of `retry_on` conditions, precomputed for cheap checks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetryOn {
    connect: bool,
    refused_stream: bool,
    reset: bool,
    gateway: bool,
    server: bool,
    grpc_unavailable: bool,
    /// Bit `n` for status code `400 + n`.
    statuses: [u64; 4],
}

impl RetryOn {
    pub fn new(conditions: &[RetryCondition]) -> Self {
        let mut on = RetryOn::default();
        for c in conditions {
            match *c {
                RetryCondition::ConnectFailure => on.connect = true,
                RetryCondition::RefusedStream => on.refused_stream = true,
                RetryCondition::Reset => on.reset = true,
                RetryCondition::GatewayError => on.gateway = true,
                RetryCondition::ServerError => on.server = true,
                RetryCondition::GrpcUnavailable => on.grpc_unavailable = true,
                RetryCondition::Status(code @ 400..=599) => {
                    let n = usize::from(code - 400);
                    on.statuses[n / 64] |= 1 << (n % 64);
                }
                // The config only admits 400-599.
                RetryCondition::Status(_) => {}
            }
        }
        on
    }

    fn status_listed(&self, code: u16) -> bool {
        (400..=599).contains(&code) && {
            let n = usize::from(code - 400);
            self.statuses[n / 64] & (1 << (n % 64)) != 0
        }
    }

    /// Whether the outcome is one of the conditions.
    pub fn matches(&self, outcome: &Outcome) -> bool {
        match *outcome {
            Outcome::Failed(Failure::Connect) => self.connect,
            Outcome::Failed(Failure::RefusedStream) => self.refused_stream,
            Outcome::Failed(Failure::Reset) => self.reset,
            // The proxy would answer a timed-out attempt with 504 itself.
            // (After `request_timeout` no time is left to retry in anyway.)
            Outcome::Failed(Failure::PerTryTimeout | Failure::RequestTimeout) => {
                self.gateway || self.server
            }
            Outcome::Response {
                status,
                grpc_status,
            } => {
                let code = status.as_u16();
                (self.server && status.is_server_error())
                    || (self.gateway && matches!(code, 502..=504))
                    || (self.grpc_unavailable && grpc_status == Some(GRPC_UNAVAILABLE))
                    || self.status_listed(code)
            }
        }
    }
}

/// What a method's semantics allow a retry to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MethodClass {
    /// RFC 9110 §9.2.2: repeating it has the effect of sending it once.
    Idempotent,
    /// POST and PATCH: retried only when the body was buffered, and only
    /// under the conditions the operator listed.
    NonIdempotent,
    /// CONNECT and methods unknown to the proxy.
    Never,
}

impl MethodClass {
    pub fn of(method: &Method) -> Self {
        match *method {
            Method::GET
            | Method::HEAD
            | Method::OPTIONS
            | Method::TRACE
            | Method::PUT
            | Method::DELETE => MethodClass::Idempotent,
            Method::POST | Method::PATCH => MethodClass::NonIdempotent,
            _ => MethodClass::Never,
        }
    }
}

/// Whether a request with this method can be sent again. `is_body_replayable`:
/// the body was empty, or ended within `retry_buffer` and is still held.
pub fn can_replay(method: &Method, is_body_replayable: bool) -> bool {
    is_body_replayable && MethodClass::of(method) != MethodClass::Never
}

/// A policy's retry settings.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    pub on: RetryOn,
    /// Tries per request, the first included; at least 1.
    pub attempts: u32,
    pub backoff: Backoff,
}

/// Why a request is not tried again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// The outcome is final: a success, or a failure `retry_on` does not list.
    Final,
    /// `attempts` tries were made.
    AttemptsExhausted,
    /// The method or the body does not allow sending it again.
    NotReplayable,
    /// The backoff would end after `request_timeout`.
    Deadline,
    /// The destination's retry budget is spent.
    BudgetExhausted,
}

impl Stop {
    /// A fixed label for metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Stop::Final => "final",
            Stop::AttemptsExhausted => "attempts_exhausted",
            Stop::NotReplayable => "not_replayable",
            Stop::Deadline => "deadline",
            Stop::BudgetExhausted => "budget_exhausted",
        }
    }
}

/// What to do after an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Wait this long, then try again.
    Retry(Duration),
    /// Give the client this attempt's outcome.
    Stop(Stop),
}

/// One request's retry state: its attempts, deadline and budget.
///
/// Made once per request with [`super::HttpPolicy::retries`], which counts
/// the request towards the destination's budget. After every attempt,
/// [`Retries::next`] says whether to try again and after how long.
#[derive(Debug)]
pub struct Retries<'a> {
    policy: &'a RetryPolicy,
    budget: &'a RetryBudget,
    method: MethodClass,
    attempts: u32,
    deadline: Option<Instant>,
    per_try: Option<Duration>,
}

impl<'a> Retries<'a> {
    pub(crate) fn new(
        policy: &'a RetryPolicy,
        budget: &'a RetryBudget,
        method: &Method,
        request_timeout: Option<Duration>,
        per_try: Option<Duration>,
        now: Instant,
    ) -> Self {
        budget.deposit_at(now);
        Retries {
            policy,
            budget,
            method: MethodClass::of(method),
            attempts: 1,
            deadline: request_timeout.map(|t| now + t),
            per_try,
        }
    }

    /// Attempts started so far, the current one included.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// When `request_timeout` ends the whole request, if it is set.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// How long the attempt starting at `now` may wait for response
    /// headers, and which timeout it is when it passes: `per_try_timeout`,
    /// or the request's deadline when that comes first. `None` waits
    /// without limit.
    pub fn attempt_timeout(&self, now: Instant) -> Option<(Duration, Failure)> {
        let left = self.deadline.map(|d| d.saturating_duration_since(now));
        match (self.per_try, left) {
            (Some(p), Some(l)) if p < l => Some((p, Failure::PerTryTimeout)),
            (_, Some(l)) => Some((l, Failure::RequestTimeout)),
            (Some(p), None) => Some((p, Failure::PerTryTimeout)),
            (None, None) => None,
        }
    }

    /// Decides what follows `outcome`. `is_body_replayable` as for
    /// [`can_replay`]; it is asked now because a body being buffered while
    /// it is sent is only known to fit once it has ended.
    pub fn next(&mut self, outcome: &Outcome, is_body_replayable: bool, now: Instant) -> Next {
        if !self.policy.on.matches(outcome) {
            return Next::Stop(Stop::Final);
        }
        if self.attempts >= self.policy.attempts {
            return Next::Stop(Stop::AttemptsExhausted);
        }
        if !is_body_replayable || self.method == MethodClass::Never {
            return Next::Stop(Stop::NotReplayable);
        }
        let delay = self.policy.backoff.delay(self.attempts);
        if self.deadline.is_some_and(|d| now + delay >= d) {
            return Next::Stop(Stop::Deadline);
        }
        if !self.budget.try_withdraw_at(now) {
            return Next::Stop(Stop::BudgetExhausted);
        }
        self.attempts += 1;
        Next::Retry(delay)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use RetryCondition as C;

    const MS: Duration = Duration::from_millis(1);

    fn status(code: u16) -> Outcome {
        Outcome::Response {
            status: StatusCode::from_u16(code).unwrap(),
            grpc_status: None,
        }
    }

    fn grpc(code: u32) -> Outcome {
        Outcome::Response {
            status: StatusCode::OK,
            grpc_status: Some(code),
        }
    }

    const FAILURES: [Failure; 5] = [
        Failure::Connect,
        Failure::RefusedStream,
        Failure::Reset,
        Failure::PerTryTimeout,
        Failure::RequestTimeout,
    ];

    #[test]
    fn each_condition_matches_its_outcomes_only() {
        let cases: &[(C, &[Outcome])] = &[
            (C::ConnectFailure, &[Outcome::Failed(Failure::Connect)]),
            (C::RefusedStream, &[Outcome::Failed(Failure::RefusedStream)]),
            (C::Reset, &[Outcome::Failed(Failure::Reset)]),
            (
                C::GatewayError,
                &[
                    status(502),
                    status(503),
                    status(504),
                    Outcome::Failed(Failure::PerTryTimeout),
                    Outcome::Failed(Failure::RequestTimeout),
                ],
            ),
            (
                C::ServerError,
                &[
                    status(500),
                    status(501),
                    status(502),
                    status(503),
                    status(504),
                    status(599),
                    Outcome::Failed(Failure::PerTryTimeout),
                    Outcome::Failed(Failure::RequestTimeout),
                ],
            ),
            (C::GrpcUnavailable, &[grpc(14)]),
            (C::Status(429), &[status(429)]),
            (C::Status(599), &[status(599)]),
        ];
        let all: Vec<Outcome> = FAILURES
            .iter()
            .map(|f| Outcome::Failed(*f))
            .chain([200, 204, 404, 409, 429, 500, 501, 502, 503, 504, 599].map(status))
            .chain([0, 4, 13, 14].map(grpc))
            .collect();
        for (cond, yes) in cases {
            let on = RetryOn::new(&[*cond]);
            for o in &all {
                assert_eq!(on.matches(o), yes.contains(o), "{cond} on {o:?}");
            }
        }
        let none = RetryOn::new(&[]);
        assert!(all.iter().all(|o| !none.matches(o)));
    }

    #[test]
    fn grpc_status_comes_from_the_headers() {
        let mut h = HeaderMap::new();
        assert_eq!(
            Outcome::response(StatusCode::OK, &h),
            Outcome::Response {
                status: StatusCode::OK,
                grpc_status: None
            }
        );
        h.insert("grpc-status", HeaderValue::from_static("14"));
        assert_eq!(Outcome::response(StatusCode::OK, &h), grpc(14));
        h.insert("grpc-status", HeaderValue::from_static("unavailable"));
        assert_eq!(grpc_status(&h), None, "garbage is no status");
    }

    #[test]
    fn health_counts_server_errors_not_client_errors() {
        for f in [
            Failure::Connect,
            Failure::Reset,
            Failure::PerTryTimeout,
            Failure::RequestTimeout,
        ] {
            assert_eq!(Outcome::Failed(f).health(), Some(false), "{f:?}");
        }
        assert_eq!(Outcome::Failed(Failure::RefusedStream).health(), None);
        for code in [500, 501, 502, 503, 504] {
            assert_eq!(status(code).health(), Some(false), "{code}");
        }
        assert_eq!(grpc(14).health(), Some(false));
        for code in [200, 301, 404, 429] {
            assert_eq!(status(code).health(), Some(true), "{code}");
        }
        assert_eq!(grpc(13).health(), Some(true));
    }

    #[test]
    fn methods_per_rfc_9110() {
        for m in ["GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"] {
            let m = Method::from_bytes(m.as_bytes()).unwrap();
            assert_eq!(MethodClass::of(&m), MethodClass::Idempotent, "{m}");
            assert!(can_replay(&m, true));
            assert!(!can_replay(&m, false), "{m} with a streamed body");
        }
        for m in [Method::POST, Method::PATCH] {
            assert_eq!(MethodClass::of(&m), MethodClass::NonIdempotent);
            assert!(can_replay(&m, true), "{m} with a buffered body");
            assert!(!can_replay(&m, false), "{m} with a streamed body");
        }
        for m in ["CONNECT", "LOCK", "PROPFIND"] {
            let m = Method::from_bytes(m.as_bytes()).unwrap();
            assert!(!can_replay(&m, true), "{m}");
        }
    }

    fn policy(on: &[C], attempts: u32) -> RetryPolicy {
        RetryPolicy {
            on: RetryOn::new(on),
            attempts,
            backoff: Backoff::new(25 * MS, 250 * MS),
        }
    }

    fn budget() -> RetryBudget {
        RetryBudget::new(0.2, 10, Duration::from_secs(10))
    }

    #[test]
    fn retries_until_attempts_run_out_with_growing_backoff() {
        let p = policy(&[C::GatewayError], 4);
        let b = budget();
        let now = Instant::now();
        let mut r = Retries::new(&p, &b, &Method::GET, None, None, now);
        for n in 1..4 {
            match r.next(&status(503), true, now) {
                Next::Retry(d) => assert!(d <= p.backoff.ceiling(n), "{d:?}"),
                other => panic!("retry {n}: {other:?}"),
            }
            assert_eq!(r.attempts(), n + 1);
        }
        assert_eq!(
            r.next(&status(503), true, now),
            Next::Stop(Stop::AttemptsExhausted)
        );
        let mut r = Retries::new(&p, &b, &Method::GET, None, None, now);
        assert_eq!(r.next(&status(200), true, now), Next::Stop(Stop::Final));
        assert_eq!(r.next(&status(500), true, now), Next::Stop(Stop::Final));
    }

    #[test]
    fn replay_rules_apply_per_request() {
        let p = policy(&[C::ConnectFailure, C::Reset], 3);
        let b = budget();
        let now = Instant::now();
        let connect = Outcome::Failed(Failure::Connect);
        let mut post = Retries::new(&p, &b, &Method::POST, None, None, now);
        assert_eq!(
            post.next(&connect, false, now),
            Next::Stop(Stop::NotReplayable),
            "a streamed body is gone"
        );
        assert!(matches!(post.next(&connect, true, now), Next::Retry(_)));
        let mut tunnel = Retries::new(&p, &b, &Method::CONNECT, None, None, now);
        assert_eq!(
            tunnel.next(&connect, true, now),
            Next::Stop(Stop::NotReplayable)
        );
    }

    #[test]
    fn the_deadline_bounds_attempts_and_backoff() {
        let p = policy(&[C::Reset], 5);
        let b = budget();
        let now = Instant::now();
        let r = Retries::new(&p, &b, &Method::GET, Some(100 * MS), Some(30 * MS), now);
        assert_eq!(r.deadline(), Some(now + 100 * MS));
        let (per_try, total) = (Failure::PerTryTimeout, Failure::RequestTimeout);
        assert_eq!(r.attempt_timeout(now), Some((30 * MS, per_try)));
        // The attempt that the deadline cuts short ends as the request's.
        assert_eq!(r.attempt_timeout(now + 80 * MS), Some((20 * MS, total)));
        assert_eq!(r.attempt_timeout(now + 70 * MS), Some((30 * MS, total)));
        assert_eq!(
            r.attempt_timeout(now + 200 * MS),
            Some((Duration::ZERO, total))
        );
        let unbounded = Retries::new(&p, &b, &Method::GET, None, None, now);
        assert_eq!(unbounded.attempt_timeout(now), None);
        let only_total = Retries::new(&p, &b, &Method::GET, Some(100 * MS), None, now);
        assert_eq!(
            only_total.attempt_timeout(now + 40 * MS),
            Some((60 * MS, total))
        );
        let only_per_try = Retries::new(&p, &b, &Method::GET, None, Some(30 * MS), now);
        assert_eq!(only_per_try.attempt_timeout(now), Some((30 * MS, per_try)));
        // With the deadline here, no backoff fits.
        let mut r = Retries::new(&p, &b, &Method::GET, Some(100 * MS), None, now);
        let reset = Outcome::Failed(Failure::Reset);
        assert_eq!(
            r.next(&reset, true, now + 100 * MS),
            Next::Stop(Stop::Deadline)
        );
    }

    #[test]
    fn an_empty_budget_stops_retries_and_is_asked_last() {
        let p = policy(&[C::Reset], 3);
        let b = RetryBudget::new(0.0, 0, Duration::from_secs(10));
        let now = Instant::now();
        let reset = Outcome::Failed(Failure::Reset);
        let mut r = Retries::new(&p, &b, &Method::GET, None, None, now);
        assert_eq!(r.next(&reset, true, now), Next::Stop(Stop::BudgetExhausted));
        let generous = RetryBudget::new(1.0, 0, Duration::from_secs(10));
        let mut r = Retries::new(&p, &generous, &Method::GET, None, None, now);
        assert_eq!(r.next(&status(200), true, now), Next::Stop(Stop::Final));
        assert_eq!(
            generous.remaining_at(now),
            1,
            "a request that needs no retry spends nothing"
        );
        assert!(matches!(r.next(&reset, true, now), Next::Retry(_)));
        assert_eq!(generous.remaining_at(now), 0);
    }
}
