//! What the data plane needs from the mesh identity: TLS configurations for
//! both ends of a proxy-to-proxy connection, the identity of a verified
//! peer, and whether a certificate is in hand yet.
//!
//! The implementation lives with the CA client (`legate-ca`), which keeps
//! the certificate and trust bundle current; the configurations it hands
//! out resolve the current material at each handshake, so rotation needs no
//! rebuild here.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::SystemTime;

use legate_config::{SpiffeId, TrustDomain};

/// ALPN protocol of the mesh tunnel: HTTP/2 between proxies. Distinct from
/// plain `h2` so that an application's own TLS to a server is never
/// mistaken for a peer proxy.
pub const MESH_ALPN: &[u8] = b"legate/h2";

/// The mesh identity as the proxy uses it.
pub trait MeshIdentity: Send + Sync + 'static {
    /// This workload's SPIFFE ID.
    fn local_id(&self) -> SpiffeId;
    /// The trust domain peers must belong to.
    fn trust_domain(&self) -> TrustDomain;
    /// Inbound: TLS 1.3, client certificates required and verified
    /// against the trust bundle, ALPN [`MESH_ALPN`].
    fn server_config(&self) -> Arc<rustls::ServerConfig>;
    /// Outbound: TLS 1.3 with our certificate, accepting a server whose
    /// SPIFFE ID is `peer`, or any ID in the trust domain when `None`.
    fn client_config(&self, peer: Option<&SpiffeId>) -> Arc<rustls::ClientConfig>;
    /// The SPIFFE ID of the verified peer of a finished handshake.
    fn peer_id(&self, conn: &rustls::CommonState) -> Option<SpiffeId>;
    /// Resolves once a certificate is held (at once if it already is).
    fn ready(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>>;
    /// Whether a certificate is held now.
    fn is_ready(&self) -> bool;
    /// The certificate in use and the trust bundle, for the admin server's
    /// `/identity` and the certificate metrics.
    fn status(&self) -> IdentityStatus {
        IdentityStatus {
            id: Some(self.local_id()),
            ..IdentityStatus::default()
        }
    }
}

/// The identity as operators inspect it.
#[derive(Debug, Clone, Default)]
pub struct IdentityStatus {
    /// This workload's SPIFFE ID.
    pub id: Option<SpiffeId>,
    /// Validity of the certificate in use; `None` before the first.
    pub not_before: Option<SystemTime>,
    pub not_after: Option<SystemTime>,
    /// The trust bundle's roots, as PEM.
    pub roots: Vec<String>,
    /// The CAs behind the certificate: the intermediates of its chain and
    /// the bundle's roots, with their expiry (one of them expiring stops
    /// the mesh as surely as the workload certificate).
    pub authorities: Vec<Authority>,
    /// Certificates obtained so far, the first included.
    pub renewals: u64,
    /// Attempts to obtain one that failed.
    pub renewal_failures: u64,
}

/// A CA certificate the workload's trust depends on.
#[derive(Debug, Clone)]
pub struct Authority {
    /// `root` or `intermediate`.
    pub role: &'static str,
    pub subject: String,
    pub not_after: SystemTime,
}

/// Shared handle to the identity.
pub type Identity = Arc<dyn MeshIdentity>;
