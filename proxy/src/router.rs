//! Deciding how an outbound connection is carried: untouched, or over mTLS
//! to the destination's proxy.
//!
//! How the proxy learns that a destination is meshed, in order:
//! 1. **Configuration.** The first `proxy.destinations` rule whose CIDRs and
//!    ports match decides: `plaintext` passes the bytes through, `strict`
//!    always uses mTLS and never falls back, `auto` continues below. A rule
//!    may also pin the peer's exact identity.
//! 2. **Mesh networks.** A destination outside `proxy.mesh_networks`
//!    (private ranges by default) is passed through in plaintext.
//! 3. **Probe.** Otherwise the proxy dials the destination's inbound mesh
//!    port (15006). A peer proxy answers and the pooled mTLS connection it
//!    opens is used at once; a refused or unanswered connect means no proxy
//!    there, and the destination is reached in plaintext. Either answer is
//!    cached per address for `proxy.probe_ttl`, so the probe costs one
//!    connect per address and TTL; connections that come while it is
//!    under way wait for it and take its answer. A TLS failure after a
//!    successful connect is *not* a reason to fall back: something answers
//!    on the mesh port, so the connection fails instead of leaking
//!    plaintext.
//!
//! A destination known to be meshed stays so while its proxy keeps
//! answering: a connection that reaches it renews the answer once a quarter
//! of the TTL has passed. When its proxy stops answering (a crash, a
//! restart, an upgrade) the destination's connections fail, as they would
//! in plaintext too, since its capture rules outlive the proxy; they are
//! not sent in plaintext, which the proxy, once back, would take as from a
//! client outside the mesh. Only when a whole TTL has passed since the
//! proxy last answered does a probe decide again, so that a destination
//! whose proxy was removed for good is reached in plaintext after that.
//!
//! A destination found to have no proxy is probed again in the background
//! when its TTL has passed, its connections going on in plaintext
//! meanwhile: a probe that nothing answers (a firewall that drops the
//! connect) would otherwise hold a connection for the whole connect
//! timeout once every TTL. That holds for a TTL after the answer expired;
//! an address unused for longer is probed before its next connection, as
//! if new.
//!
//! `strict` destinations are dialled in-band: the connection goes to the
//! original destination itself and the peer's capture rules bring it to its
//! proxy. That is what makes Kubernetes Service virtual IPs work, where
//! kube-proxy rewrites the service address and port to a pod's on the node:
//! mark the service CIDR `strict` (a fully meshed cluster) and the rewritten
//! connection lands on the chosen pod's proxy, which reads the pod port from
//! its own `SO_ORIGINAL_DST`. Since kube-proxy chooses a pod for each new
//! connection, each application connection to an in-band destination gets
//! a mesh connection of its own ([`crate::pool::Own`]) instead of a stream
//! on a pooled one, which would take them all to the pod the pooled
//! connection reached: the service is balanced over its pods as without
//! the mesh, at the cost of a handshake per application connection.
//! Probing cannot see through a virtual IP (its mesh port is not a service
//! port), so an unmarked service address is carried in plaintext, which a
//! permissive server still accepts.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ipnet::IpNet;
use legate_config::{DestinationMode, DestinationRule, SpiffeId};
use tokio::time::Instant;

use crate::pool::PeerKey;
use crate::Shared;
use tracing::debug;

/// How one outbound connection is carried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// The destination has no proxy, or is configured plaintext.
    Passthrough,
    /// In plaintext, as a probe a while ago found no proxy; the caller
    /// probes again in the background (`router::recheck`).
    Recheck(PeerKey),
    /// Through the peer proxy, dialled at `key.dial`: the destination
    /// itself for an in-band route ([`PeerKey::in_band`]), its mesh port
    /// otherwise. `probe` is set when the peer is not yet known to be
    /// meshed, so a refused connect means plaintext instead of failure;
    /// `renew` when it is known but not lately confirmed, so a connection
    /// that reaches it should say so with [`Router::learn`].
    Mesh {
        key: PeerKey,
        probe: bool,
        renew: bool,
    },
}

/// The routing table and the probe cache.
pub struct Router {
    rules: Vec<DestinationRule>,
    mesh_networks: Vec<IpNet>,
    inbound_port: u16,
    ttl: Duration,
    probes: Mutex<foldhash::HashMap<IpAddr, (bool, Instant)>>,
}

impl Router {
    pub fn new(
        rules: Vec<DestinationRule>,
        mesh_networks: Vec<IpNet>,
        inbound_port: u16,
        ttl: Duration,
    ) -> Self {
        Router {
            rules,
            mesh_networks,
            inbound_port,
            ttl,
            probes: Mutex::new(foldhash::HashMap::default()),
        }
    }

    fn rule(&self, dst: SocketAddr) -> Option<&DestinationRule> {
        self.rules.iter().find(|r| {
            (r.cidrs.is_empty() || r.cidrs.iter().any(|n| n.contains(&dst.ip())))
                && (r.ports.is_empty() || r.ports.contains(dst.port()))
        })
    }

    /// Decides the route for a destination.
    pub fn route(&self, dst: SocketAddr) -> Route {
        let (mode, identity) = match self.rule(dst) {
            Some(r) => (r.mode, r.identity.clone()),
            None => (DestinationMode::Auto, None),
        };
        match mode {
            DestinationMode::Plaintext => Route::Passthrough,
            DestinationMode::Strict => Route::Mesh {
                key: PeerKey {
                    dial: dst,
                    identity,
                },
                probe: false,
                renew: false,
            },
            DestinationMode::Auto => {
                if !self.mesh_networks.iter().any(|n| n.contains(&dst.ip())) {
                    return Route::Passthrough;
                }
                let key = PeerKey {
                    dial: SocketAddr::new(dst.ip(), self.inbound_port),
                    identity,
                };
                let mut probes = self.probes.lock().unwrap_or_else(|p| p.into_inner());
                let now = Instant::now();
                let known = probes
                    .get_mut(&dst.ip())
                    .map(|(meshed, at)| (*meshed, now.saturating_duration_since(*at), at));
                match known {
                    Some((true, age, _)) if age < self.ttl => Route::Mesh {
                        key,
                        probe: false,
                        renew: age >= self.ttl / 4,
                    },
                    Some((false, age, _)) if age < self.ttl => Route::Passthrough,
                    Some((false, age, at)) if age < self.ttl * 2 => {
                        // This connection's recheck answers for the next
                        // TTL's connections too.
                        *at = now;
                        Route::Recheck(key)
                    }
                    _ => Route::Mesh {
                        key,
                        probe: true,
                        renew: false,
                    },
                }
            }
        }
    }

    /// Records what a connection learned about an address.
    pub fn learn(&self, ip: IpAddr, meshed: bool) {
        let mut probes = self.probes.lock().unwrap_or_else(|p| p.into_inner());
        // Bound the cache: expired entries go first, and a flood of distinct
        // addresses only costs re-probing, never unbounded memory.
        if probes.len() >= 4096 {
            let ttl = self.ttl;
            probes.retain(|_, (_, at)| at.elapsed() < ttl);
            if probes.len() >= 4096 {
                probes.clear();
            }
        }
        probes.insert(ip, (meshed, Instant::now()));
    }

    /// Forgets an address, so that its next connection probes it itself.
    fn forget(&self, ip: IpAddr) {
        let mut probes = self.probes.lock().unwrap_or_else(|p| p.into_inner());
        probes.remove(&ip);
    }

    /// The exact identity required for a destination, if configured.
    pub fn identity_for(&self, dst: SocketAddr) -> Option<SpiffeId> {
        self.rule(dst).and_then(|r| r.identity.clone())
    }
}

/// Probes a destination of [`Route::Recheck`] on the calling worker's
/// pool, without holding up the connection that asked, and records what
/// it finds: a proxy (whose connection stays pooled for the next ones), no
/// answer, or neither (a TLS failure), in which case the next connection
/// probes for itself and fails as any probe that meets a TLS failure.
pub(crate) fn recheck(ctx: Arc<Shared>, router: Arc<Router>, key: PeerKey) {
    if !ctx.identity.is_ready() {
        return;
    }
    tokio::spawn(async move {
        let ip = key.dial.ip();
        match ctx.pool().sender(&key).await {
            Ok(_) => router.learn(ip, true),
            Err(e) if e.unanswered() => router.learn(ip, false),
            Err(e) => {
                debug!(peer = %key.dial, error = %e, "probing again for a proxy failed");
                router.forget(ip);
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(cidr: &str, ports: &str, mode: DestinationMode) -> DestinationRule {
        DestinationRule {
            cidrs: vec![cidr.parse().unwrap()],
            ports: ports.parse().unwrap(),
            mode,
            identity: None,
        }
    }

    fn router(rules: Vec<DestinationRule>) -> Router {
        Router::new(
            rules,
            vec!["10.200.0.0/16".parse().unwrap()],
            15006,
            Duration::from_secs(30),
        )
    }

    #[test]
    fn outside_the_mesh_networks_is_plaintext() {
        let r = router(vec![]);
        assert_eq!(r.route("192.0.2.1:80".parse().unwrap()), Route::Passthrough);
    }

    #[test]
    fn unknown_mesh_addresses_are_probed_on_the_inbound_port_then_cached() {
        let r = router(vec![]);
        let dst: SocketAddr = "10.200.0.3:8080".parse().unwrap();
        let Route::Mesh { key, probe, .. } = r.route(dst) else {
            panic!("expected a mesh route")
        };
        assert!(probe);
        assert_eq!(key.dial, "10.200.0.3:15006".parse().unwrap());
        r.learn(dst.ip(), false);
        assert_eq!(r.route(dst), Route::Passthrough);
        r.learn(dst.ip(), true);
        assert!(matches!(r.route(dst), Route::Mesh { probe: false, .. }));
    }

    #[test]
    fn rules_decide_first_and_strict_is_in_band() {
        let r = router(vec![
            rule("10.200.0.0/24", "5432", DestinationMode::Plaintext),
            rule("10.96.0.0/12", "", DestinationMode::Strict),
        ]);
        assert_eq!(
            r.route("10.200.0.3:5432".parse().unwrap()),
            Route::Passthrough
        );
        let vip: SocketAddr = "10.96.0.10:80".parse().unwrap();
        assert_eq!(
            r.route(vip),
            Route::Mesh {
                key: PeerKey {
                    dial: vip,
                    identity: None
                },
                probe: false,
                renew: false
            }
        );
        // A strict destination stays strict whatever a probe learned.
        r.learn(vip.ip(), false);
        assert!(matches!(r.route(vip), Route::Mesh { probe: false, .. }));
    }

    #[tokio::test(start_paused = true)]
    async fn a_meshed_address_is_renewed_while_it_answers_and_probed_a_ttl_after() {
        let r = router(vec![]);
        let dst: SocketAddr = "10.200.0.3:8080".parse().unwrap();
        r.learn(dst.ip(), true);
        let mesh = |probe, renew| matches!(r.route(dst), Route::Mesh { probe: p, renew: n, .. } if p == probe && n == renew);
        assert!(mesh(false, false));
        // A quarter of the TTL on, a connection that reaches the peer is
        // asked to renew the answer.
        tokio::time::advance(Duration::from_secs(8)).await;
        assert!(mesh(false, true));
        r.learn(dst.ip(), true);
        assert!(mesh(false, false));
        // Unconfirmed for a whole TTL, the address is probed again, and
        // only then may a refused connect mean plaintext.
        tokio::time::advance(Duration::from_secs(29)).await;
        assert!(mesh(false, true));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(mesh(true, false));
    }

    #[tokio::test(start_paused = true)]
    async fn an_address_without_a_proxy_is_rechecked_in_the_background_for_a_ttl() {
        let r = router(vec![]);
        let dst: SocketAddr = "10.200.0.3:8080".parse().unwrap();
        r.learn(dst.ip(), false);
        assert_eq!(r.route(dst), Route::Passthrough);
        // Expired: one connection asks for a recheck and goes on in
        // plaintext; the next ones take the answer as renewed.
        tokio::time::advance(Duration::from_secs(31)).await;
        assert!(matches!(r.route(dst), Route::Recheck(k) if k.dial.port() == 15006));
        assert_eq!(r.route(dst), Route::Passthrough);
        // A recheck that finds a proxy meshes the next connection.
        r.learn(dst.ip(), true);
        assert!(matches!(r.route(dst), Route::Mesh { probe: false, .. }));
        // Unused for more than two TTLs, the address is probed as new.
        r.learn(dst.ip(), false);
        tokio::time::advance(Duration::from_secs(61)).await;
        assert!(matches!(r.route(dst), Route::Mesh { probe: true, .. }));
    }
}
