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
//!    connect per address and TTL. A TLS failure after a successful connect
//!    is *not* a reason to fall back: something answers on the mesh port,
//!    so the connection fails instead of leaking plaintext.
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
//! `strict` destinations are dialled in-band: the connection goes to the
//! original destination itself and the peer's capture rules bring it to its
//! proxy. That is what makes Kubernetes Service virtual IPs work, where
//! kube-proxy rewrites the service address and port to a pod's on the node:
//! mark the service CIDR `strict` (a fully meshed cluster) and the rewritten
//! connection lands on the chosen pod's proxy, which reads the pod port from
//! its own `SO_ORIGINAL_DST`. Probing cannot see through a virtual IP (its
//! mesh port is not a service port), so an unmarked service address is
//! carried in plaintext, which a permissive server still accepts.

use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::Duration;

use ipnet::IpNet;
use legate_config::{DestinationMode, DestinationRule, SpiffeId};
use tokio::time::Instant;

use crate::pool::PeerKey;

/// How one outbound connection is carried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// The destination has no proxy, or is configured plaintext.
    Passthrough,
    /// Through the peer proxy. `probe` is set when the peer is not yet known
    /// to be meshed, so a refused connect means plaintext instead of failure;
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
                match self.cached(dst.ip()) {
                    Some((true, age)) => Route::Mesh {
                        key,
                        probe: false,
                        renew: age >= self.ttl / 4,
                    },
                    Some((false, _)) => Route::Passthrough,
                    None => Route::Mesh {
                        key,
                        probe: true,
                        renew: false,
                    },
                }
            }
        }
    }

    /// What is known of an address, and how long ago it was learned.
    fn cached(&self, ip: IpAddr) -> Option<(bool, Duration)> {
        let probes = self.probes.lock().unwrap_or_else(|p| p.into_inner());
        let (meshed, at) = probes.get(&ip)?;
        let age = at.elapsed();
        (age < self.ttl).then_some((*meshed, age))
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

    /// The exact identity required for a destination, if configured.
    pub fn identity_for(&self, dst: SocketAddr) -> Option<SpiffeId> {
        self.rule(dst).and_then(|r| r.identity.clone())
    }
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
}
