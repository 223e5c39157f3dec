//! Connects the data plane to the CA client's live credentials: the proxy
//! asks for TLS configurations and readiness through its `MeshIdentity`
//! trait, and this module answers from a `CredentialsHandle` that the
//! identity manager keeps current.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use legate_ca::{ClientAuth, CredentialsHandle, PeerMatcher, RenewalStats};
use legate_config::{SpiffeId, TrustDomain};
use legate_proxy::{Authority, IdentityStatus, MeshIdentity, MESH_ALPN};
use rustls::{ClientConfig, ServerConfig};

/// The workload identity as the proxy sees it.
pub struct CaIdentity {
    creds: CredentialsHandle,
    local: SpiffeId,
    trust_domain: TrustDomain,
    server: Arc<ServerConfig>,
    /// One client config per accepted-peer rule; there are as many as
    /// destination rules with an identity, plus one.
    clients: Mutex<HashMap<Option<SpiffeId>, Arc<ClientConfig>>>,
    /// The renewal loop's counts, for metrics.
    stats: Option<Arc<RenewalStats>>,
}

impl CaIdentity {
    pub fn new(creds: CredentialsHandle, local: SpiffeId, trust_domain: TrustDomain) -> Self {
        let server = legate_ca::tls::server_config(
            &creds,
            ClientAuth::Required(PeerMatcher::TrustDomain(trust_domain.clone())),
            vec![MESH_ALPN.to_vec()],
        );
        CaIdentity {
            creds,
            local,
            trust_domain,
            server,
            clients: Mutex::new(HashMap::new()),
            stats: None,
        }
    }

    /// Reports the renewal loop's counts in [`MeshIdentity::status`].
    pub fn with_stats(mut self, stats: Arc<RenewalStats>) -> Self {
        self.stats = Some(stats);
        self
    }
}

/// The PEM blocks of a bundle, one per root.
fn pem_blocks(pem: &str) -> Vec<String> {
    const END: &str = "-----END CERTIFICATE-----";
    pem.split_inclusive(END)
        .map(str::trim)
        .filter(|b| b.ends_with(END))
        .map(|b| format!("{b}\n"))
        .collect()
}

impl MeshIdentity for CaIdentity {
    fn local_id(&self) -> SpiffeId {
        self.local.clone()
    }

    fn trust_domain(&self) -> TrustDomain {
        self.trust_domain.clone()
    }

    fn server_config(&self) -> Arc<ServerConfig> {
        self.server.clone()
    }

    fn client_config(&self, peer: Option<&SpiffeId>) -> Arc<ClientConfig> {
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        clients
            .entry(peer.cloned())
            .or_insert_with(|| {
                let matcher = match peer {
                    Some(id) => PeerMatcher::Exact(id.clone()),
                    None => PeerMatcher::TrustDomain(self.trust_domain.clone()),
                };
                legate_ca::tls::client_config(&self.creds, matcher, vec![MESH_ALPN.to_vec()])
            })
            .clone()
    }

    fn peer_id(&self, conn: &rustls::CommonState) -> Option<SpiffeId> {
        legate_ca::tls::peer_id(conn)
    }

    fn ready(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(async move {
            let mut changed = self.creds.changed();
            while self.creds.load_valid().is_none() {
                if changed.changed().await.is_err() {
                    // The manager is gone: no certificate will ever come.
                    std::future::pending::<()>().await;
                }
            }
        })
    }

    fn is_ready(&self) -> bool {
        self.creds.load_valid().is_some()
    }

    fn status(&self) -> IdentityStatus {
        let creds = self.creds.load();
        IdentityStatus {
            id: Some(self.local.clone()),
            not_before: creds.as_ref().map(|c| c.not_before()),
            not_after: creds.as_ref().map(|c| c.not_after()),
            roots: creds
                .as_ref()
                .map(|c| pem_blocks(&c.bundle().to_pem()))
                .unwrap_or_default(),
            authorities: creds.as_ref().map(|c| authorities(c)).unwrap_or_default(),
            renewals: self.stats.as_ref().map_or(0, |s| s.renewals()),
            renewal_failures: self.stats.as_ref().map_or(0, |s| s.failures()),
        }
    }
}

/// The intermediates of the chain and the bundle's roots, each with its
/// expiry; a certificate that does not parse is left out (the handshake
/// that uses it reports it).
fn authorities(creds: &legate_ca::Credentials) -> Vec<Authority> {
    let intermediates = creds.chain().iter().skip(1).map(|c| ("intermediate", c));
    let roots = creds.bundle().certs().iter().map(|c| ("root", c));
    intermediates
        .chain(roots)
        .filter_map(|(role, der)| {
            let (subject, not_after) = legate_ca::inspect::subject_and_expiry(der).ok()?;
            Some(Authority {
                role,
                subject,
                not_after,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bundle_splits_into_its_roots() {
        let pem = "-----BEGIN CERTIFICATE-----\nAAA\n-----END CERTIFICATE-----\n-----BEGIN CERTIFICATE-----\nBBB\n-----END CERTIFICATE-----\n";
        let roots = pem_blocks(pem);
        assert_eq!(roots.len(), 2);
        assert!(roots[1].starts_with("-----BEGIN") && roots[1].contains("BBB"));
        assert!(pem_blocks("").is_empty());
    }
}
