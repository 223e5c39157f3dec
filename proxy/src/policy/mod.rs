//! HTTP policy: which requests are retried, when an endpoint is cut off,
//! how much work a destination may have, and what the proxy answers when
//! it gives up.
//!
//! A policy comes from `[proxy.http]` (the default) or the first of
//! `[[proxy.http.routes]]` that matches the request's original destination
//! and authority ([`PolicySet::policy_for`]). The pieces, and the order the
//! HTTP path uses them in for one request:
//!
//! ```text
//! policy_for(dst, authority)          which policy            (this module)
//! policy.destination(dst)             budget + limits state   (this module)
//!   limits.acquire(InFlight)?         fail fast: 503          (limits)
//!   policy.retries(&dest, method)     counts the request      (retry, budget)
//!   loop {
//!     breakers.admit(endpoint)?       fail fast: 503          (breaker)
//!     limits.acquire(Pending)?        while waiting for a connection
//!     send, within attempt_timeout()
//!     permit.record_outcome(&outcome, now)                    (breaker)
//!     retries.next(&outcome, ..)      condition → replayable → deadline
//!                                     → budget → backoff      (retry)
//!   }
//! proxy_answer / Failure::answer      502, 503, 504, gRPC     (answer)
//! ```
//!
//! The defaults lean towards changing nothing the application can see, the
//! way a transparent proxy should: no timeouts; one retry, and only of a
//! request the server provably never saw (a failed connect, a refused
//! stream); breakers that trip on runs of server errors and failed
//! connections, never on client errors; limits high enough that only a
//! runaway client meets them. Each
//! module explains its own defaults.

pub mod answer;
pub mod backoff;
pub mod breaker;
pub mod budget;
pub mod limits;
mod registry;
pub mod retry;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::Method;
use ipnet::IpNet;
use legate_config::{Config, HostPattern, HttpSettings, PortSet};
use tokio::time::Instant;

pub use answer::{is_grpc, proxy_answer, ERROR_HEADER};
pub use backoff::Backoff;
pub use breaker::{BreakerOpen, BreakerSettings, BreakerState, Breakers, Permit};
pub use budget::RetryBudget;
pub use limits::{LimitExceeded, LimitGuard, LimitKind, LimitSettings, Limits};
pub use retry::{Failure, MethodClass, Next, Outcome, Retries, RetryOn, RetryPolicy, Stop};

use registry::{Forgettable, Registry};

/// One policy, with the state it keeps per destination and endpoint.
pub struct HttpPolicy {
    name: String,
    /// What the policy was made from, to tell on a reload whether it changed.
    settings: HttpSettings,
    /// Time to the response headers over all attempts; `None` for no limit.
    pub request_timeout: Option<Duration>,
    /// Time one attempt may wait for response headers; `None` for no limit.
    pub per_try_timeout: Option<Duration>,
    pub retry: RetryPolicy,
    /// Largest request body kept for replay, in bytes.
    pub retry_buffer: usize,
    /// Circuit breakers, by endpoint.
    pub breakers: Breakers,
    budget: (f64, u32, Duration),
    limits: LimitSettings,
    destinations: Registry<Destination>,
}

/// What a policy keeps for one destination (original destination address).
pub struct Destination {
    pub budget: RetryBudget,
    pub limits: Arc<Limits>,
}

impl Forgettable for Destination {
    fn forgettable(&self) -> bool {
        // No guard holds the limits, and no retry is paid for in the window.
        Arc::strong_count(&self.limits) == 1 && self.budget.is_idle(Instant::now())
    }
}

fn nonzero(d: Duration) -> Option<Duration> {
    (!d.is_zero()).then_some(d)
}

impl HttpPolicy {
    /// A policy from resolved settings; `name` labels it in logs and metrics.
    pub fn new(name: impl Into<String>, s: &HttpSettings) -> Self {
        HttpPolicy {
            name: name.into(),
            settings: s.clone(),
            request_timeout: nonzero(s.request_timeout),
            per_try_timeout: nonzero(s.per_try_timeout),
            retry: RetryPolicy {
                on: RetryOn::new(&s.retry_on),
                attempts: s.attempts.max(1),
                backoff: Backoff::new(s.backoff_base, s.backoff_max),
            },
            retry_buffer: s.retry_buffer.as_usize(),
            breakers: Breakers::new(BreakerSettings {
                failures: s.breaker_failures,
                base_ejection: s.breaker_base_ejection,
                max_ejection: s.breaker_max_ejection.max(s.breaker_base_ejection),
            }),
            budget: (s.budget_ratio, s.budget_min_per_second, s.budget_window),
            limits: LimitSettings {
                max_connections: s.max_connections,
                max_pending: s.max_pending,
                max_in_flight: s.max_in_flight,
            },
            destinations: Registry::new(),
        }
    }

    /// `default`, the route's `name`, or `routes[<index>]`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The budget and limits of one destination under this policy.
    pub fn destination(&self, dst: SocketAddr) -> Arc<Destination> {
        self.destinations.get_or_insert_with(dst, || {
            let (ratio, min, window) = self.budget;
            Destination {
                budget: RetryBudget::new(ratio, min, window),
                limits: Arc::new(Limits::new(self.limits)),
            }
        })
    }

    /// Starts one request's retry state and counts the request in the
    /// destination's budget. Call it once per request from the application,
    /// retryable or not.
    pub fn retries<'a>(&'a self, dest: &'a Destination, method: &Method) -> Retries<'a> {
        self.retries_at(dest, method, Instant::now())
    }

    pub fn retries_at<'a>(
        &'a self,
        dest: &'a Destination,
        method: &Method,
        now: Instant,
    ) -> Retries<'a> {
        Retries::new(
            &self.retry,
            &dest.budget,
            method,
            self.request_timeout,
            self.per_try_timeout,
            now,
        )
    }

    /// Visits every destination's state, for metrics.
    pub fn for_each_destination(&self, f: impl FnMut(SocketAddr, &Destination)) {
        self.destinations.for_each(f);
    }
}

impl std::fmt::Debug for HttpPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpPolicy")
            .field("name", &self.name)
            .field("request_timeout", &self.request_timeout)
            .field("per_try_timeout", &self.per_try_timeout)
            .field("retry", &self.retry)
            .finish_non_exhaustive()
    }
}

/// A route's match: every part given must match.
struct Match {
    hosts: Vec<HostPattern>,
    cidrs: Vec<IpNet>,
    ports: PortSet,
}

impl Match {
    fn matches(&self, dst: SocketAddr, host: Option<&str>) -> bool {
        (self.ports.is_empty() || self.ports.contains(dst.port()))
            && (self.cidrs.is_empty() || {
                let ip = dst.ip().to_canonical();
                self.cidrs.iter().any(|n| n.contains(&ip))
            })
            && (self.hosts.is_empty()
                || host.is_some_and(|h| self.hosts.iter().any(|p| p.matches(h))))
    }
}

/// The host of an authority: without userinfo and port, brackets kept on
/// an IPv6 literal. `api.shop:8080` is `api.shop`, `[::1]:80` is `[::1]`.
pub fn host_of(authority: &str) -> &str {
    let a = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    if a.starts_with('[') {
        return a.find(']').map_or(a, |end| &a[..=end]);
    }
    a.split_once(':').map_or(a, |(host, _)| host)
}

/// Every policy in the configuration, ready to match requests to.
pub struct PolicySet {
    routes: Vec<(Match, Arc<HttpPolicy>)>,
    default: Arc<HttpPolicy>,
}

impl PolicySet {
    pub fn new(config: &Config) -> Self {
        Self::reusing(config, None)
    }

    /// The policies of a reloaded `config`. A policy whose name and
    /// settings did not change is carried over from `self` with its state
    /// (retry budgets, breakers, limits held by requests in flight), so a
    /// reload that touches one route leaves the others undisturbed.
    pub fn reload(&self, config: &Config) -> Self {
        Self::reusing(config, Some(self))
    }

    fn reusing(config: &Config, old: Option<&PolicySet>) -> Self {
        let reuse = |name: &str, settings: &HttpSettings| {
            old.and_then(|o| {
                o.policies()
                    .find(|p| p.name == name && p.settings == *settings)
                    .cloned()
            })
        };
        let make = |name: String, settings: HttpSettings| {
            reuse(&name, &settings).unwrap_or_else(|| Arc::new(HttpPolicy::new(name, &settings)))
        };
        let http = &config.proxy.http;
        let base = http.settings();
        let routes = http
            .routes
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let name = r.name.clone().unwrap_or_else(|| format!("routes[{i}]"));
                let m = Match {
                    hosts: r.hosts.clone(),
                    cidrs: r.cidrs.clone(),
                    ports: r.ports.clone(),
                };
                (m, make(name, r.settings_over(&base)))
            })
            .collect();
        PolicySet {
            routes,
            default: make("default".into(), base),
        }
    }

    /// The policy for a request to original destination `dst` with this
    /// authority (`Host` or `:authority`, port allowed): the first route
    /// that matches, else the default. Allocates nothing; the reference
    /// lets the caller decide whether it needs its own `Arc`.
    pub fn policy_for(&self, dst: SocketAddr, authority: Option<&str>) -> &Arc<HttpPolicy> {
        let host = authority.map(host_of);
        self.routes
            .iter()
            .find(|(m, _)| m.matches(dst, host))
            .map_or(&self.default, |(_, p)| p)
    }

    /// Every policy, routes first, for metrics.
    pub fn policies(&self) -> impl Iterator<Item = &Arc<HttpPolicy>> {
        self.routes
            .iter()
            .map(|(_, p)| p)
            .chain(std::iter::once(&self.default))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use legate_config::HttpRoute;

    fn route(name: &str, hosts: &[&str], cidrs: &[&str], ports: &str) -> HttpRoute {
        HttpRoute {
            name: Some(name.into()),
            hosts: hosts.iter().map(|h| h.parse().unwrap()).collect(),
            cidrs: cidrs.iter().map(|c| c.parse().unwrap()).collect(),
            ports: ports.parse().unwrap(),
            ..Default::default()
        }
    }

    fn set(routes: Vec<HttpRoute>) -> PolicySet {
        let mut c = Config::default();
        c.proxy.http.routes = routes;
        PolicySet::new(&c)
    }

    fn name<'a>(s: &'a PolicySet, dst: &str, authority: Option<&str>) -> &'a str {
        s.policy_for(dst.parse().unwrap(), authority).name()
    }

    #[test]
    fn the_first_matching_route_wins_and_all_its_parts_must_match() {
        let s = set(vec![
            route("pay-http", &["*.payments.svc"], &[], "80"),
            route("pay", &["*.payments.svc", "billing"], &[], ""),
            route("svc-net", &[], &["10.96.0.0/12"], ""),
            route("mesh-8080", &[], &["10.200.0.0/16"], "8080"),
        ]);
        assert_eq!(
            name(&s, "10.200.0.3:80", Some("api.payments.svc")),
            "pay-http"
        );
        assert_eq!(
            name(&s, "10.200.0.3:81", Some("api.payments.svc:81")),
            "pay"
        );
        assert_eq!(name(&s, "10.200.0.3:81", Some("BILLING:81")), "pay");
        // Hosts and addresses: a host route does not take the service network.
        assert_eq!(
            name(&s, "10.96.0.10:80", Some("api.payments.svc")),
            "pay-http"
        );
        assert_eq!(name(&s, "10.96.0.10:80", Some("web.shop.svc")), "svc-net");
        assert_eq!(name(&s, "10.96.0.10:80", None), "svc-net");
        assert_eq!(name(&s, "10.200.0.3:8080", None), "mesh-8080");
        assert_eq!(name(&s, "10.200.0.3:8081", None), "default");
        assert_eq!(name(&s, "192.0.2.1:80", Some("payments.svc")), "default");
        let v4_in_v6 = "[::ffff:10.96.0.10]:80";
        assert_eq!(name(&s, v4_in_v6, None), "svc-net", "IPv4-mapped addresses");
        assert_eq!(s.policies().count(), 5);
    }

    #[test]
    fn routes_override_only_what_they_set() {
        let mut c = Config::default();
        c.proxy.http.attempts = 3;
        c.proxy.http.per_try_timeout = Duration::from_secs(1);
        let mut r = route("", &["api"], &[], "");
        r.name = None;
        r.attempts = Some(1);
        r.max_in_flight = Some(7);
        c.proxy.http.routes = vec![r];
        let s = PolicySet::new(&c);
        let p = s.policy_for("10.0.0.1:80".parse().unwrap(), Some("api"));
        assert_eq!(p.name(), "routes[0]");
        assert_eq!(p.retry.attempts, 1);
        assert_eq!(p.per_try_timeout, Some(Duration::from_secs(1)), "inherited");
        assert_eq!(p.request_timeout, None, "0 is no timeout");
        let d = p.destination("10.0.0.1:80".parse().unwrap());
        assert_eq!(d.limits.max(LimitKind::InFlight), Some(7));
        let default = s.policy_for("10.0.0.1:80".parse().unwrap(), Some("web"));
        assert_eq!(default.retry.attempts, 3);
        assert_eq!(default.retry_buffer, 64 * 1024);
    }

    #[test]
    fn a_reload_keeps_the_state_of_unchanged_policies() {
        let mut c = Config::default();
        c.proxy.http.routes = vec![
            route("api", &["api"], &[], ""),
            route("web", &["web"], &[], ""),
        ];
        let old = PolicySet::new(&c);
        c.proxy.http.routes[1].attempts = Some(3);
        let new = old.reload(&c);
        let dst: SocketAddr = "10.0.0.1:80".parse().unwrap();
        let (a0, a1) = (
            old.policy_for(dst, Some("api")),
            new.policy_for(dst, Some("api")),
        );
        assert!(Arc::ptr_eq(a0, a1), "unchanged: same budgets and breakers");
        let (w0, w1) = (
            old.policy_for(dst, Some("web")),
            new.policy_for(dst, Some("web")),
        );
        assert!(!Arc::ptr_eq(w0, w1), "changed: new state");
        assert_eq!(w1.retry.attempts, 3);
        assert!(Arc::ptr_eq(
            old.policy_for(dst, None),
            new.policy_for(dst, None)
        ));
    }

    #[test]
    fn authorities_lose_their_port_and_userinfo() {
        assert_eq!(host_of("api.shop:8080"), "api.shop");
        assert_eq!(host_of("api.shop"), "api.shop");
        assert_eq!(host_of("user:pw@api.shop:80"), "api.shop");
        assert_eq!(host_of("[fd00::1]:443"), "[fd00::1]");
        assert_eq!(
            host_of("[fd00::1"),
            "[fd00::1",
            "malformed input is kept, not a panic"
        );
        assert_eq!(host_of(""), "");
    }

    #[test]
    fn destinations_share_state_per_address() {
        let s = set(vec![]);
        let p = s.policy_for("10.0.0.1:80".parse().unwrap(), None);
        let a = p.destination("10.0.0.1:80".parse().unwrap());
        let _held = a.limits.acquire(LimitKind::InFlight).unwrap();
        let again = p.destination("10.0.0.1:80".parse().unwrap());
        assert_eq!(again.limits.in_use(LimitKind::InFlight), 1);
        let other = p.destination("10.0.0.1:81".parse().unwrap());
        assert_eq!(other.limits.in_use(LimitKind::InFlight), 0);
        let mut n = 0;
        p.for_each_destination(|_, _| n += 1);
        assert_eq!(n, 2);
    }

    /// The whole sequence the HTTP path runs, against a destination that
    /// refuses connections: retried once (the default), then answered 502.
    #[test]
    fn a_request_through_the_default_policy() {
        let s = set(vec![]);
        let dst: SocketAddr = "10.0.0.9:80".parse().unwrap();
        let policy = s.policy_for(dst, Some("api"));
        let dest = policy.destination(dst);
        let _in_flight = dest.limits.acquire(LimitKind::InFlight).unwrap();
        let now = Instant::now();
        let mut retries = policy.retries_at(&dest, &Method::POST, now);
        let outcome = Outcome::Failed(Failure::Connect);
        let mut tries = 0;
        let last = loop {
            let permit = policy.breakers.admit_at(dst, now).unwrap();
            tries += 1;
            permit.record_outcome(&outcome, now);
            match retries.next(&outcome, true, now) {
                Next::Retry(delay) => assert!(delay <= Duration::from_millis(25)),
                Next::Stop(stop) => break stop,
            }
        };
        assert_eq!((tries, last), (2, Stop::AttemptsExhausted));
        let answer = Failure::Connect.answer(false);
        assert_eq!(answer.status(), http::StatusCode::BAD_GATEWAY);
        // A 500 is retried by no default condition.
        let mut retries = policy.retries_at(&dest, &Method::GET, now);
        let app_error = Outcome::Response {
            status: http::StatusCode::INTERNAL_SERVER_ERROR,
            grpc_status: None,
        };
        assert_eq!(retries.next(&app_error, true, now), Next::Stop(Stop::Final));
    }
}
