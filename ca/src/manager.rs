//! The workload's identity manager: obtains a certificate from the CA, keeps
//! it renewed, and keeps the trust bundle fresh.
//!
//! Behaviour, and why:
//!
//! - A new P-256 key for every certificate, generated in memory. It touches
//!   disk only when `identity.cert_dir` is set (mode 0600), so that a
//!   restart can renew with the certificate instead of a new token.
//! - Renewal at half-life, measured from *receipt*: half of `notAfter -
//!   now` when the certificate arrives. notBefore is backdated for clock
//!   skew, so half of `notAfter - notBefore` would renew early, and by more
//!   the shorter the lifetime.
//! - Renewal authenticates with the current certificate over mTLS; the
//!   token (`identity.token`, or `identity.token_file`, re-read every time
//!   so a rotated token is picked up: in Kubernetes it is the projected
//!   ServiceAccount token, which the kubelet replaces well before it
//!   expires) is only used when there is no valid certificate, or when the
//!   CA refuses the certificate.
//! - On failure, retry with exponential backoff and full jitter (so that
//!   workloads do not stampede a CA that comes back), capped at a quarter
//!   of the time the current certificate has left, so several attempts fit
//!   before it expires. The current certificate stays in use until a new
//!   one is in hand: a CA outage costs nothing until certificates actually
//!   expire.
//! - The bundle is fetched from every issue response and every
//!   `bundle_refresh`, so new roots spread long before they sign anything
//!   a workload must verify.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use legate_config::{IdentityConfig, Secret, SpiffeId, TrustDomain};
use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::client::{CaClient, ClientError};
use crate::credentials::{Bundle, Credentials, CredentialsHandle};
use crate::files::{self, PUBLIC, SECRET};
use crate::tls::{self, PeerMatcher};
use crate::{pki, CaError};

/// Where the bootstrap token comes from.
#[derive(Debug, Clone)]
pub enum TokenSource {
    None,
    Inline(Secret),
    /// Re-read on every use.
    File(PathBuf),
}

/// The longest a token file may take to read. The read runs off the
/// runtime's threads, as a file on a stalled network mount blocks its
/// reader; past this the attempt fails and is retried like any other.
const TOKEN_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// The most a token file may hold. A token is a few hundred bytes (a
/// Kubernetes one a kilobyte or two): more is another file.
const MAX_TOKEN_FILE: u64 = 64 * 1024;

impl TokenSource {
    async fn read(&self) -> Result<Option<Secret>, CaError> {
        match self {
            TokenSource::None => Ok(None),
            TokenSource::Inline(s) => Ok(Some(s.clone())),
            TokenSource::File(p) => {
                let path = p.clone();
                let read = tokio::task::spawn_blocking(move || read_token_file(&path));
                match tokio::time::timeout(TOKEN_READ_TIMEOUT, read).await {
                    Ok(Ok(result)) => result,
                    Ok(Err(e)) => Err(CaError::Usage(format!(
                        "reading identity.token_file {} failed: {e}",
                        p.display()
                    ))),
                    Err(_) => Err(CaError::Usage(format!(
                        "reading identity.token_file {} took longer than {}s; is it on a mount that stopped answering?",
                        p.display(),
                        TOKEN_READ_TIMEOUT.as_secs()
                    ))),
                }
            }
        }
    }
}

/// The token in `path`, or `None` when the file is empty. Only a regular
/// file is opened: opening a FIFO waits for a writer, and a device may
/// never end.
fn read_token_file(path: &Path) -> Result<Option<Secret>, CaError> {
    let meta = std::fs::metadata(path).map_err(|e| CaError::io("read", path, e))?;
    if !meta.is_file() {
        return Err(CaError::Usage(format!(
            "identity.token_file {} is not a regular file; point it at the file that holds the token",
            path.display()
        )));
    }
    if meta.len() > MAX_TOKEN_FILE {
        return Err(CaError::Usage(format!(
            "identity.token_file {} holds {} bytes, far more than a token; point it at the file that holds the token alone",
            path.display(),
            meta.len()
        )));
    }
    let text = files::read_string(path)?;
    let token = text.trim();
    if token.lines().nth(1).is_some() {
        return Err(CaError::Usage(format!(
            "identity.token_file {} holds more than one line; a token is one line: write the token alone into it",
            path.display()
        )));
    }
    Ok((!token.is_empty()).then(|| Secret::new(token)))
}

/// How the manager finds and talks to the CA.
#[derive(Debug, Clone)]
pub struct ManagerOptions {
    pub id: SpiffeId,
    pub trust_domain: TrustDomain,
    /// `host:port` of the CA API.
    pub ca_address: String,
    /// PEM roots that verify the CA before the first certificate.
    pub ca_bundle: Option<PathBuf>,
    pub token: TokenSource,
    /// Where to keep `cert.pem`, `key.pem` (0600) and `bundle.pem`.
    pub cert_dir: Option<PathBuf>,
    /// Deadline of one call to the CA.
    pub request_timeout: Duration,
    /// First retry delay after a failure; doubles up to `backoff_max`.
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// How often the bundle is fetched between renewals.
    pub bundle_refresh: Duration,
}

impl ManagerOptions {
    /// Options from the `identity` section; errors name the missing key.
    pub fn from_config(cfg: &IdentityConfig) -> Result<Self, CaError> {
        let id = cfg.workload_id().map_err(CaError::Usage)?;
        let ca_address = cfg.ca_address.clone().ok_or_else(|| {
            CaError::Usage(
                "identity.ca_address is not set; point it at the CA API, for example legate-ca:15012 (LEGATE_IDENTITY_CA_ADDRESS)".into(),
            )
        })?;
        let token = match (&cfg.token, &cfg.token_file) {
            (Some(t), _) => TokenSource::Inline(t.clone()),
            (None, Some(p)) => TokenSource::File(p.clone()),
            (None, None) => TokenSource::None,
        };
        Ok(ManagerOptions {
            id,
            trust_domain: cfg.trust_domain.clone(),
            ca_address,
            ca_bundle: cfg.ca_bundle.clone(),
            token,
            cert_dir: cfg.cert_dir.clone(),
            request_timeout: Duration::from_secs(10),
            backoff_initial: Duration::from_millis(500),
            backoff_max: Duration::from_secs(60),
            bundle_refresh: Duration::from_secs(300),
        })
    }
}

const CERT_FILE: &str = "cert.pem";
const KEY_FILE: &str = "key.pem";
const BUNDLE_FILE: &str = "bundle.pem";

/// What the renewal loop has done so far, for metrics: certificates
/// obtained (the first included) and attempts that failed.
#[derive(Debug, Default)]
pub struct RenewalStats {
    renewals: AtomicU64,
    failures: AtomicU64,
}

impl RenewalStats {
    /// Certificates obtained by [`IdentityManager::run`].
    pub fn renewals(&self) -> u64 {
        self.renewals.load(Ordering::Relaxed)
    }

    /// Attempts by [`IdentityManager::run`] that got no certificate.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }
}

/// Obtains and renews the workload's certificate.
pub struct IdentityManager {
    opts: ManagerOptions,
    handle: CredentialsHandle,
    client: CaClient,
    stats: Arc<RenewalStats>,
}

impl IdentityManager {
    /// Prepares the manager. Loads a still-valid certificate from
    /// `cert_dir` if there is one, so a restart renews rather than
    /// bootstraps.
    pub fn new(opts: ManagerOptions) -> Result<Self, CaError> {
        let bootstrap = match &opts.ca_bundle {
            Some(p) => Some(Arc::new(
                Bundle::from_pem(&files::read(p)?)
                    .map_err(|e| CaError::material(p, e.to_string()))?,
            )),
            None => None,
        };
        let handle = CredentialsHandle::new();
        if let Some(dir) = &opts.cert_dir {
            match load_dir(dir) {
                Ok(Some(c)) if c.id() == &opts.id && c.is_valid_at(SystemTime::now()) => {
                    match kept_verifies(&c, bootstrap.as_deref()) {
                        Ok(()) => {
                            info!(id = %c.id(), dir = %dir.display(), "using the certificate kept from the last run");
                            handle.store(c);
                        }
                        Err(why) => warn!(
                            dir = %dir.display(),
                            "not using the certificate kept from the last run: {why}; asking the CA for a new one"
                        ),
                    }
                }
                Ok(_) => {}
                Err(e) => debug!("no usable certificate in {}: {e}", dir.display()),
            }
        }
        if bootstrap.is_none() && handle.load().is_none() {
            return Err(CaError::Usage(
                "identity.ca_bundle is not set, so the CA cannot be verified; point it at the CA's bundle (`legate ca bundle --dir <ca dir>` prints it)".into(),
            ));
        }
        let client = CaClient::new(
            &opts.ca_address,
            &opts.trust_domain,
            &handle,
            bootstrap,
            opts.request_timeout,
        );
        Ok(IdentityManager {
            opts,
            handle,
            client,
            stats: Arc::default(),
        })
    }

    /// The live credentials; give this to the TLS configs.
    pub fn handle(&self) -> CredentialsHandle {
        self.handle.clone()
    }

    pub fn client(&self) -> &CaClient {
        &self.client
    }

    /// Counts of renewals and failed attempts, shared with the running loop.
    pub fn stats(&self) -> Arc<RenewalStats> {
        self.stats.clone()
    }

    /// Starts [`run`](Self::run) on the current runtime.
    pub fn spawn(self) -> (CredentialsHandle, JoinHandle<()>) {
        let h = self.handle();
        (h, tokio::spawn(self.run()))
    }

    /// Fetches one certificate now and installs it. Uses the current
    /// certificate to authenticate when it is valid, the token otherwise.
    pub async fn fetch(&self) -> Result<Arc<Credentials>, CaError> {
        let current = self.handle.load_valid();
        let token = self.opts.token.read().await?;
        let first = if current.is_some() {
            None
        } else {
            token.as_ref()
        };
        if current.is_none() && token.is_none() {
            return Err(CaError::Usage(match &self.opts.token {
                TokenSource::File(p) => format!(
                    "no valid certificate, and identity.token_file {} is empty: write a token into it (mint one with `legate ca token`)",
                    p.display()
                ),
                _ => "no valid certificate and no bootstrap token: set identity.token or identity.token_file (mint one with `legate ca token`)".into(),
            }));
        }
        match self.fetch_with(first).await {
            Err(CaError::Client(e))
                if e.is_auth_refusal() && first.is_none() && token.is_some() =>
            {
                warn!("the CA refused renewal with the current certificate ({e}); trying the bootstrap token");
                self.fetch_with(token.as_ref()).await
            }
            other => other,
        }
    }

    async fn fetch_with(&self, token: Option<&Secret>) -> Result<Arc<Credentials>, CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| CaError::Signing(format!("cannot generate a key: {e}")))?;
        let csr = csr_pem(&self.opts.id, &key)?;
        let resp = self.client.issue(&csr, token).await?;
        let bad = |r: String| CaError::Client(ClientError::Protocol(r));
        let chain = pki::parse_certs(resp.certificate_chain.as_bytes()).map_err(bad)?;
        let bundle =
            Arc::new(Bundle::from_pem(resp.bundle.as_bytes()).map_err(|e| bad(e.to_string()))?);
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let creds = Credentials::new(chain, key_der, bundle).map_err(|e| bad(e.to_string()))?;
        if creds.id() != &self.opts.id {
            return Err(bad(format!(
                "asked for {} but got {}",
                self.opts.id,
                creds.id()
            )));
        }
        // Check the certificate as peers will before relying on it.
        let provider = tls::provider();
        tls::verify_chain(
            creds.bundle(),
            &creds.chain()[0],
            &creds.chain()[1..],
            UnixTime::now(),
            webpki::KeyUsage::client_auth(),
            &PeerMatcher::Exact(self.opts.id.clone()),
            &provider.signature_verification_algorithms,
        )
        .map_err(|e| {
            bad(format!(
                "the issued certificate does not verify against the bundle: {e}"
            ))
        })?;
        if let Some(dir) = &self.opts.cert_dir {
            keep(dir, &creds);
        }
        self.handle.store(creds);
        self.handle
            .load()
            .ok_or_else(|| bad("credentials vanished".into()))
    }

    /// Fetches the bundle and installs it if it changed.
    pub async fn refresh_bundle(&self) -> Result<bool, CaError> {
        let bundle = self.client.bundle().await?;
        let Some(current) = self.handle.load() else {
            return Ok(false);
        };
        if **current.bundle() == bundle {
            return Ok(false);
        }
        info!(roots = bundle.certs().len(), "the trust bundle changed");
        let updated = current.with_bundle(Arc::new(bundle));
        if let Some(dir) = &self.opts.cert_dir {
            // The kept copy serves the next start only: failing to write
            // it must not keep the new roots from this one.
            if let Err(e) = files::write_atomic(
                &dir.join(BUNDLE_FILE),
                updated.bundle().to_pem().as_bytes(),
                PUBLIC,
            ) {
                warn!(dir = %dir.display(), "cannot keep the new trust bundle for the next start ({e}); make identity.cert_dir a writable directory");
            }
        }
        self.handle.store(updated);
        Ok(true)
    }

    /// Keeps the certificate renewed, forever.
    pub async fn run(self) {
        let mut backoff = Backoff::new(self.opts.backoff_initial, self.opts.backoff_max);
        let mut renew_at = match self.handle.load_valid() {
            Some(c) => renewal_time(&c),
            None => Instant::now(),
        };
        let mut next_bundle = Instant::now() + self.opts.bundle_refresh;
        loop {
            // Wait for the renewal time, refreshing the bundle meanwhile.
            loop {
                let now = Instant::now();
                if now >= renew_at {
                    break;
                }
                if now >= next_bundle {
                    if let Err(e) = self.refresh_bundle().await {
                        debug!("bundle refresh failed (will retry): {e}");
                    }
                    next_bundle = Instant::now() + self.opts.bundle_refresh;
                    continue;
                }
                tokio::time::sleep_until(renew_at.min(next_bundle).into()).await;
            }
            match self.fetch().await {
                Ok(c) => {
                    self.stats.renewals.fetch_add(1, Ordering::Relaxed);
                    backoff.reset();
                    renew_at = renewal_time(&c);
                    next_bundle = Instant::now() + self.opts.bundle_refresh;
                    info!(
                        id = %c.id(),
                        expires_in = %pki::human(c.remaining(SystemTime::now())),
                        "certificate renewed"
                    );
                }
                Err(e) => {
                    self.stats.failures.fetch_add(1, Ordering::Relaxed);
                    let left = self
                        .handle
                        .load()
                        .map(|c| c.remaining(SystemTime::now()))
                        .unwrap_or_default();
                    let delay = retry_delay(&mut backoff, left);
                    if left.is_zero() {
                        warn!("cannot obtain a certificate, retrying in {delay:?}: {e}");
                    } else {
                        warn!(
                            "cannot renew the certificate, retrying in {delay:?}; the current one stays in use for another {}: {e}",
                            pki::human(left)
                        );
                    }
                    renew_at = Instant::now() + delay;
                }
            }
        }
    }
}

/// Half of the time left, measured now (at receipt).
fn renewal_time(c: &Credentials) -> Instant {
    Instant::now() + c.remaining(SystemTime::now()) / 2
}

fn csr_pem(id: &SpiffeId, key: &KeyPair) -> Result<String, CaError> {
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    let uri = id
        .as_str()
        .try_into()
        .map_err(|e| CaError::Usage(format!("{id} cannot be put in a CSR: {e}")))?;
    p.subject_alt_names = vec![SanType::URI(uri)];
    p.serialize_request(key)
        .and_then(|csr| csr.pem())
        .map_err(|e| CaError::Signing(format!("cannot build the CSR: {e}")))
}

pub(crate) fn save_dir(dir: &std::path::Path, c: &Credentials) -> Result<(), CaError> {
    files::ensure_dir(dir)?;
    // Key first: a reader that sees the new certificate finds its key.
    files::write_atomic(&dir.join(KEY_FILE), c.key_pem().as_bytes(), SECRET)?;
    files::write_atomic(&dir.join(CERT_FILE), c.chain_pem().as_bytes(), PUBLIC)?;
    files::write_atomic(
        &dir.join(BUNDLE_FILE),
        c.bundle().to_pem().as_bytes(),
        PUBLIC,
    )
}

/// Keeps the credentials in `dir` for the next start. They are in use
/// whether or not that works: the copy only spares the next start a
/// token, so a directory that cannot be written is worth a warning, not a
/// proxy that never becomes ready while the CA signs certificate after
/// certificate for it.
fn keep(dir: &Path, creds: &Credentials) {
    if let Err(e) = save_dir(dir, creds) {
        let hint = if dir.exists() && !dir.is_dir() {
            " (it is not a directory)"
        } else {
            ""
        };
        warn!(
            dir = %dir.display(),
            "cannot keep the certificate for the next start{hint}: {e}; it is in use all the same, but the next start needs a token: make identity.cert_dir a writable directory"
        );
    }
}

/// Whether kept credentials verify as peers would verify them: against
/// their own bundle, and against the configured `identity.ca_bundle` when
/// there is one. A certificate from a CA that was replaced since (`legate
/// ca init --force`, a move to another CA), or kept beside another CA's
/// bundle, would otherwise be served until its half-life while every peer
/// refused it, and its bundle would be trusted to verify the CA.
fn kept_verifies(c: &Credentials, configured: Option<&Bundle>) -> Result<(), String> {
    let provider = tls::provider();
    let check = |bundle: &Bundle| {
        tls::verify_chain(
            bundle,
            &c.chain()[0],
            &c.chain()[1..],
            UnixTime::now(),
            webpki::KeyUsage::client_auth(),
            &PeerMatcher::Exact(c.id().clone()),
            &provider.signature_verification_algorithms,
        )
    };
    check(c.bundle())
        .map_err(|e| format!("it does not verify against the bundle kept with it ({e})"))?;
    if let Some(bundle) = configured {
        check(bundle).map_err(|e| {
            format!(
                "it does not verify against identity.ca_bundle ({e}); the CA was probably replaced"
            )
        })?;
    }
    Ok(())
}

fn load_dir(dir: &std::path::Path) -> Result<Option<Credentials>, CaError> {
    if !dir.join(CERT_FILE).exists() {
        return Ok(None);
    }
    let c = Credentials::from_pem(
        &files::read(&dir.join(CERT_FILE))?,
        &files::read(&dir.join(KEY_FILE))?,
        &files::read(&dir.join(BUNDLE_FILE))?,
    )?;
    Ok(Some(c))
}

/// The longest wait between tries while there is no valid certificate.
/// Until one comes the proxy carries no mesh traffic, so it keeps asking
/// often, yet still backs off and spreads its tries: proxies that start
/// while their CA is away should not ask it twice a second each, in step.
const NO_CERT_RETRY_MAX: Duration = Duration::from_secs(5);

/// The wait after a failed fetch, with `left` of the current certificate's
/// life: at most a quarter of it, so that several tries fit before it
/// expires, and with none left at most [`NO_CERT_RETRY_MAX`].
fn retry_delay(backoff: &mut Backoff, left: Duration) -> Duration {
    let cap = if left.is_zero() {
        NO_CERT_RETRY_MAX
    } else {
        (left / 4).max(backoff.initial)
    };
    backoff.next_within(cap)
}

/// Exponential backoff with full jitter.
struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    fn new(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial,
            max: max.max(initial),
            attempt: 0,
        }
    }

    fn reset(&mut self) {
        self.attempt = 0;
    }

    /// A delay between half and all of `initial * 2^attempt`, capped by
    /// `max` and by `cap`.
    fn next_within(&mut self, cap: Duration) -> Duration {
        let ceiling = self
            .initial
            .saturating_mul(1u32 << self.attempt.min(20))
            .min(self.max)
            .min(cap);
        self.attempt = self.attempt.saturating_add(1);
        let f: f64 = rand::random_range(0.5..=1.0);
        ceiling.mul_f64(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_and_caps() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let d: Vec<Duration> = (0..8).map(|_| b.next_within(Duration::MAX)).collect();
        assert!(d[0] >= Duration::from_millis(50) && d[0] <= Duration::from_millis(100));
        assert!(d[3] >= Duration::from_millis(400) && d[3] <= Duration::from_millis(800));
        assert!(d.iter().all(|x| *x <= Duration::from_secs(1)));
        b.reset();
        assert!(b.next_within(Duration::MAX) <= Duration::from_millis(100));
    }

    #[test]
    fn without_a_certificate_retries_back_off_to_a_few_seconds_with_jitter() {
        let initial = Duration::from_millis(500);
        let mut b = Backoff::new(initial, Duration::from_secs(60));
        let d: Vec<Duration> = (0..40)
            .map(|_| retry_delay(&mut b, Duration::ZERO))
            .collect();
        assert!(d[0] <= initial);
        assert!(d[4] >= Duration::from_millis(2500), "it backs off: {d:?}");
        assert!(d.iter().all(|x| *x <= NO_CERT_RETRY_MAX), "{d:?}");
        let late = &d[10..];
        assert!(
            late.iter().any(|x| *x != late[0]),
            "jittered, not in step: {d:?}"
        );
    }

    #[test]
    fn with_a_certificate_retries_fit_in_its_remaining_life() {
        let initial = Duration::from_millis(500);
        let mut b = Backoff::new(initial, Duration::from_secs(60));
        let left = Duration::from_secs(8);
        let d: Vec<Duration> = (0..20).map(|_| retry_delay(&mut b, left)).collect();
        assert!(d.iter().all(|x| *x <= left / 4), "{d:?}");
        // Nearly expired: never faster than the first delay.
        let d = retry_delay(&mut b, Duration::from_millis(40));
        assert!(d >= initial / 2 && d <= initial, "{d:?}");
        // Far from expiry: the configured ceiling.
        b.reset();
        let d: Vec<Duration> = (0..20)
            .map(|_| retry_delay(&mut b, Duration::from_secs(86_400)))
            .collect();
        assert!(d[19] >= Duration::from_secs(30), "{d:?}");
    }
}
