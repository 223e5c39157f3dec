//! A workload's live credentials: its certificate chain, private key and the
//! mesh trust bundle, behind a handle that readers load without locking.
//!
//! TLS handshakes read the current [`Credentials`] on every connection; the
//! identity manager swaps in a new value when it renews. Because each
//! handshake takes one consistent snapshot (an `Arc`), a renewal never
//! tears a handshake in half, and no listener or TLS config is rebuilt.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use legate_config::SpiffeId;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, TrustAnchor};
use rustls::sign::CertifiedKey;
use tokio::sync::watch;

use crate::pki;

/// Why a set of credentials cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("the certificate chain is empty")]
    EmptyChain,
    #[error("the leaf certificate: {0}")]
    Leaf(String),
    #[error("the private key: {0}")]
    Key(String),
    #[error("the private key does not belong to the leaf certificate")]
    KeyMismatch,
    #[error("trust bundle certificate {index}: {reason}")]
    Bundle { index: usize, reason: String },
    #[error("the trust bundle is empty; it must hold at least one root")]
    EmptyBundle,
}

/// The trust anchors of the mesh: every root that may sign a peer's chain.
/// During a root rotation it holds the old and the new root.
pub struct Bundle {
    certs: Vec<CertificateDer<'static>>,
    anchors: Vec<TrustAnchor<'static>>,
}

impl Bundle {
    pub fn new(certs: Vec<CertificateDer<'static>>) -> Result<Self, CredentialsError> {
        if certs.is_empty() {
            return Err(CredentialsError::EmptyBundle);
        }
        let anchors = certs
            .iter()
            .enumerate()
            .map(|(index, c)| {
                // A workload's own certificate pasted into a bundle would
                // make every certificate it signs trusted, were it able to
                // sign; refused, so that the mistake shows where it is made.
                // A certificate without basicConstraints (X.509 v1 roots)
                // is left to the chain check.
                if let Ok(parsed) = pki::parse_cert(c) {
                    if let Ok(Some(bc)) = parsed.basic_constraints() {
                        if !bc.value.ca {
                            return Err(CredentialsError::Bundle {
                                index,
                                reason: "is not a CA certificate (basicConstraints CA:FALSE); a bundle holds roots, not a workload's certificate".into(),
                            });
                        }
                    }
                }
                webpki::anchor_from_trusted_cert(c)
                    .map(|a| a.to_owned())
                    .map_err(|e| CredentialsError::Bundle {
                        index,
                        reason: match e {
                            webpki::Error::BadDer | webpki::Error::TrailingData(_) => format!(
                                "its PEM block does not hold a well-formed X.509 certificate ({e:?})"
                            ),
                            _ => format!("cannot be a root: {e:?}"),
                        },
                    })
            })
            .collect::<Result<_, _>>()?;
        Ok(Bundle { certs, anchors })
    }

    pub fn from_pem(pem: &[u8]) -> Result<Self, CredentialsError> {
        let certs = pki::parse_certs(pem)
            .map_err(|reason| CredentialsError::Bundle { index: 0, reason })?;
        Self::new(certs)
    }

    pub fn certs(&self) -> &[CertificateDer<'static>] {
        &self.certs
    }

    pub fn anchors(&self) -> &[TrustAnchor<'static>] {
        &self.anchors
    }

    pub fn to_pem(&self) -> String {
        pki::certs_pem(&self.certs)
    }
}

impl PartialEq for Bundle {
    fn eq(&self, other: &Self) -> bool {
        self.certs == other.certs
    }
}

impl fmt::Debug for Bundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Bundle({} roots)", self.certs.len())
    }
}

/// One consistent set of credentials: an X509-SVID chain, its key, and the
/// bundle used to verify peers.
pub struct Credentials {
    id: SpiffeId,
    certified: Arc<CertifiedKey>,
    key_der: PrivateKeyDer<'static>,
    bundle: Arc<Bundle>,
    not_before: SystemTime,
    not_after: SystemTime,
}

impl Credentials {
    /// Checks that `chain[0]` carries exactly one SPIFFE ID and that `key`
    /// belongs to it.
    pub fn new(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        bundle: Arc<Bundle>,
    ) -> Result<Self, CredentialsError> {
        let leaf = chain.first().ok_or(CredentialsError::EmptyChain)?;
        let parsed = pki::parse_cert(leaf).map_err(CredentialsError::Leaf)?;
        let id = pki::spiffe_id(&parsed).map_err(CredentialsError::Leaf)?;
        let not_before = pki::system_time(parsed.validity().not_before);
        let not_after = pki::system_time(parsed.validity().not_after);
        let signer = rustls::crypto::ring::sign::any_supported_type(&key)
            .map_err(|e| CredentialsError::Key(e.to_string()))?;
        let certified = CertifiedKey::new(chain, signer);
        match certified.keys_match() {
            Ok(()) => {}
            // Some key types cannot report their public key; the handshake
            // will fail loudly instead.
            Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
            Err(_) => return Err(CredentialsError::KeyMismatch),
        }
        Ok(Credentials {
            id,
            certified: Arc::new(certified),
            key_der: key,
            bundle,
            not_before,
            not_after,
        })
    }

    /// Reads PEM: the chain (leaf first), the private key and the bundle.
    pub fn from_pem(chain: &[u8], key: &[u8], bundle: &[u8]) -> Result<Self, CredentialsError> {
        use rustls::pki_types::pem::PemObject;
        let chain = pki::parse_certs(chain).map_err(CredentialsError::Leaf)?;
        let key = PrivateKeyDer::from_pem_slice(key)
            .map_err(|e| CredentialsError::Key(format!("not a PEM private key: {e}")))?;
        Self::new(chain, key, Arc::new(Bundle::from_pem(bundle)?))
    }

    /// The same certificate and key with another bundle.
    pub fn with_bundle(&self, bundle: Arc<Bundle>) -> Self {
        Credentials {
            id: self.id.clone(),
            certified: self.certified.clone(),
            key_der: self.key_der.clone_key(),
            bundle,
            not_before: self.not_before,
            not_after: self.not_after,
        }
    }

    pub fn id(&self) -> &SpiffeId {
        &self.id
    }
    /// The chain, leaf first, as presented in handshakes.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.certified.cert
    }
    pub fn certified_key(&self) -> &Arc<CertifiedKey> {
        &self.certified
    }
    pub fn bundle(&self) -> &Arc<Bundle> {
        &self.bundle
    }
    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }
    /// Time left before the certificate expires; zero once it has.
    pub fn remaining(&self, now: SystemTime) -> Duration {
        self.not_after.duration_since(now).unwrap_or(Duration::ZERO)
    }
    pub fn is_valid_at(&self, now: SystemTime) -> bool {
        self.not_before <= now && now < self.not_after
    }
    pub fn chain_pem(&self) -> String {
        pki::certs_pem(self.chain())
    }
    /// The private key as PKCS#8 PEM (`PRIVATE KEY`). Handle with care.
    pub fn key_pem(&self) -> String {
        let label = match &self.key_der {
            PrivateKeyDer::Pkcs1(_) => "RSA PRIVATE KEY",
            PrivateKeyDer::Sec1(_) => "EC PRIVATE KEY",
            _ => "PRIVATE KEY",
        };
        pki::pem_encode(label, self.key_der.secret_der())
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("id", &self.id.as_str())
            .field("not_after", &self.not_after)
            .field("bundle", &self.bundle)
            .finish_non_exhaustive()
    }
}

/// A shared, swappable slot holding the current [`Credentials`].
///
/// Cheap to clone; every clone sees the same slot. Readers call
/// [`load`](Self::load) (lock-free); the writer calls
/// [`store`](Self::store); anyone may [`changed`](Self::changed) to hear of
/// a swap, for example to update metrics or readiness.
#[derive(Clone)]
pub struct CredentialsHandle {
    shared: Arc<Shared>,
}

struct Shared {
    current: ArcSwapOption<Credentials>,
    version: watch::Sender<u64>,
}

impl CredentialsHandle {
    /// An empty handle: no certificate yet.
    pub fn new() -> Self {
        CredentialsHandle {
            shared: Arc::new(Shared {
                current: ArcSwapOption::empty(),
                version: watch::Sender::new(0),
            }),
        }
    }

    /// A handle that starts with `creds`.
    pub fn with(creds: Credentials) -> Self {
        let h = Self::new();
        h.store(creds);
        h
    }

    /// The current credentials, if any. Lock-free.
    pub fn load(&self) -> Option<Arc<Credentials>> {
        self.shared.current.load_full()
    }

    /// The current credentials if their certificate is valid now.
    pub fn load_valid(&self) -> Option<Arc<Credentials>> {
        self.load().filter(|c| c.is_valid_at(SystemTime::now()))
    }

    /// Replaces the credentials; new handshakes use them at once.
    pub fn store(&self, creds: Credentials) {
        self.shared.current.store(Some(Arc::new(creds)));
        self.shared.version.send_modify(|v| *v += 1);
    }

    /// A receiver that is notified on every [`store`](Self::store).
    pub fn changed(&self) -> watch::Receiver<u64> {
        self.shared.version.subscribe()
    }

    /// Waits until credentials are present (the proxy is ready only then).
    pub async fn ready(&self) -> Arc<Credentials> {
        let mut rx = self.changed();
        loop {
            if let Some(c) = self.load() {
                return c;
            }
            // The sender lives in `self`, so this only fails if it is gone,
            // which cannot happen while we hold a clone.
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
}

impl Default for CredentialsHandle {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for CredentialsHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("CredentialsHandle")
            .field(&self.load())
            .finish()
    }
}
