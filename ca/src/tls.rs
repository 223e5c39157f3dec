//! rustls configurations for the mesh, driven by live credentials.
//!
//! SPIFFE certificates name their holder with a URI SAN, not a DNS name, so
//! rustls's usual hostname check cannot be used. Instead, both sides:
//!
//! 1. verify the peer's chain with `rustls-webpki` against the trust bundle
//!    in the *current* [`Credentials`](crate::credentials::Credentials)
//!    snapshot (so a bundle change, such as a new root during rotation,
//!    applies to the next handshake), then
//! 2. read the peer's single URI SAN as a SPIFFE ID and check it against a
//!    [`PeerMatcher`].
//!
//! Our own certificate is chosen per handshake from the same snapshot, so a
//! renewal needs no rebuild either. TLS 1.3 only, with the `ring` provider.
//!
//! After the handshake, [`peer_id`] returns the verified peer identity.

use std::fmt;
use std::sync::Arc;

use legate_config::{SpiffeId, TrustDomain};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::ResolvesClientCert;
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, CommonState, DigitallySignedStruct, DistinguishedName,
    OtherError, ServerConfig, SignatureScheme,
};

use crate::credentials::{Bundle, CredentialsHandle};
use crate::pki;

/// Which peer identities a verifier accepts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerMatcher {
    /// Any SPIFFE ID in this trust domain.
    TrustDomain(TrustDomain),
    /// Exactly this SPIFFE ID.
    Exact(SpiffeId),
}

impl PeerMatcher {
    pub fn matches(&self, id: &SpiffeId) -> bool {
        match self {
            PeerMatcher::TrustDomain(td) => id.trust_domain() == td.as_str(),
            PeerMatcher::Exact(want) => want == id,
        }
    }
}

impl fmt::Display for PeerMatcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerMatcher::TrustDomain(td) => write!(f, "any identity in trust domain {td}"),
            PeerMatcher::Exact(id) => write!(f, "{id}"),
        }
    }
}

/// Whether a server asks clients for a certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientAuth {
    /// A client must present a certificate matching the matcher (mesh
    /// inbound).
    Required(PeerMatcher),
    /// A client may present one; if it does, it must verify and match. Used
    /// by the CA API, whose bootstrap clients have no certificate yet.
    Optional(PeerMatcher),
}

/// The crypto provider of every mesh TLS config: `ring`, whose build is
/// light, with its default TLS 1.3 suites and key exchanges.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A server config that presents the current certificate and verifies
/// clients according to `client_auth`. `alpn` lists the protocols offered,
/// in preference order (empty: no ALPN).
pub fn server_config(
    creds: &CredentialsHandle,
    client_auth: ClientAuth,
    alpn: Vec<Vec<u8>>,
) -> Arc<ServerConfig> {
    let provider = provider();
    let (matcher, mandatory) = match client_auth {
        ClientAuth::Required(m) => (m, true),
        ClientAuth::Optional(m) => (m, false),
    };
    let verifier = Arc::new(SpiffeClientVerifier {
        check: PeerCheck {
            trust: Trust::Live(creds.clone()),
            matcher,
            algs: provider.signature_verification_algorithms,
        },
        mandatory,
    });
    let builder = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        // The ring provider supports TLS 1.3, so this cannot fail; the
        // fallback keeps the function total.
        .unwrap_or_else(|_| {
            ServerConfig::builder_with_provider(crate::tls::provider())
                .with_safe_default_protocol_versions()
                .unwrap_or_else(|_| unreachable!("ring supports the default versions"))
        });
    let mut config = builder
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(LiveCert(creds.clone())));
    config.alpn_protocols = alpn;
    // No resumption: see `build_client_config`.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Arc::new(config)
}

/// A client config that presents the current certificate (when there is
/// one) and accepts a server whose identity `server` matches.
pub fn client_config(
    creds: &CredentialsHandle,
    server: PeerMatcher,
    alpn: Vec<Vec<u8>>,
) -> Arc<ClientConfig> {
    build_client_config(creds, Trust::Live(creds.clone()), server, alpn)
}

/// The client config of the CA client: before the first certificate there
/// is no live bundle, so the operator's bootstrap bundle is used.
pub(crate) fn ca_client_config(
    creds: &CredentialsHandle,
    bootstrap: Option<Arc<Bundle>>,
    server: PeerMatcher,
) -> Arc<ClientConfig> {
    let trust = match bootstrap {
        Some(b) => Trust::LiveOr(creds.clone(), b),
        None => Trust::Live(creds.clone()),
    };
    build_client_config(creds, trust, server, vec![b"http/1.1".to_vec()])
}

fn build_client_config(
    creds: &CredentialsHandle,
    trust: Trust,
    matcher: PeerMatcher,
    alpn: Vec<Vec<u8>>,
) -> Arc<ClientConfig> {
    let provider = provider();
    let verifier = Arc::new(SpiffeServerVerifier(PeerCheck {
        trust,
        matcher,
        algs: provider.signature_verification_algorithms,
    }));
    let builder = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap_or_else(|_| {
            ClientConfig::builder_with_provider(crate::tls::provider())
                .with_safe_default_protocol_versions()
                .unwrap_or_else(|_| unreachable!("ring supports the default versions"))
        });
    let mut config = builder
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(Arc::new(LiveCert(creds.clone())));
    config.alpn_protocols = alpn;
    // No session resumption. A resumed session skips certificate
    // verification and carries the identities of the first handshake: an
    // expired certificate, one under a since-retired root, or (for the CA
    // client) the absence of a certificate before bootstrap would ride the
    // ticket. Mesh connections are pooled, so full handshakes are rare;
    // only a `strict` destination (a Service address) costs one per
    // application connection.
    config.resumption = rustls::client::Resumption::disabled();
    Arc::new(config)
}

/// The server name a mesh client passes to rustls. Our verifier ignores it
/// (identity comes from the URI SAN), but rustls needs one, and it is sent
/// as SNI.
pub fn mesh_server_name() -> ServerName<'static> {
    ServerName::try_from("legate.mesh")
        .unwrap_or_else(|_| unreachable!("literal DNS name"))
        .to_owned()
}

/// The verified SPIFFE ID of the peer of a finished handshake, or `None`
/// when the peer sent no certificate (a CA bootstrap client, say).
///
/// Works on `ServerConnection` and `ClientConnection` alike (both deref to
/// `CommonState`); with tokio-rustls use `stream.get_ref().1`.
pub fn peer_id(conn: &CommonState) -> Option<SpiffeId> {
    let leaf = conn.peer_certificates()?.first()?;
    let parsed = pki::parse_cert(leaf).ok()?;
    pki::spiffe_id(&parsed).ok()
}

/// Verifies an X509-SVID chain (leaf first) against `bundle` as a mesh
/// peer would, for both client and server use, and returns its SPIFFE ID.
/// For tools and tests; the TLS configs do this per handshake.
pub fn verify_svid(
    bundle: &Bundle,
    chain: &[CertificateDer<'_>],
    matcher: &PeerMatcher,
    now: std::time::SystemTime,
) -> Result<SpiffeId, rustls::Error> {
    let (leaf, intermediates) = chain
        .split_first()
        .ok_or(rustls::Error::NoCertificatesPresented)?;
    let now = UnixTime::since_unix_epoch(
        now.duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default(),
    );
    let algs = provider().signature_verification_algorithms;
    verify_chain(
        bundle,
        leaf,
        intermediates,
        now,
        webpki::KeyUsage::server_auth(),
        matcher,
        &algs,
    )?;
    verify_chain(
        bundle,
        leaf,
        intermediates,
        now,
        webpki::KeyUsage::client_auth(),
        matcher,
        &algs,
    )
}

/// Where the trust anchors come from.
#[derive(Clone)]
enum Trust {
    /// The bundle of the current credentials.
    Live(CredentialsHandle),
    /// The current bundle once there is one, else a fixed bootstrap bundle.
    LiveOr(CredentialsHandle, Arc<Bundle>),
}

impl Trust {
    fn bundle(&self) -> Option<Arc<Bundle>> {
        match self {
            Trust::Live(h) => h.load().map(|c| c.bundle().clone()),
            Trust::LiveOr(h, fixed) => Some(
                h.load()
                    .map(|c| c.bundle().clone())
                    .unwrap_or_else(|| fixed.clone()),
            ),
        }
    }
}

/// Verifies `chain` up to a root of the bundle for `usage`, then returns the
/// leaf's SPIFFE ID if `matcher` accepts it.
pub(crate) fn verify_chain(
    bundle: &Bundle,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
    usage: webpki::KeyUsage,
    matcher: &PeerMatcher,
    algs: &WebPkiSupportedAlgorithms,
) -> Result<SpiffeId, rustls::Error> {
    let cert = webpki::EndEntityCert::try_from(end_entity).map_err(pki_error)?;
    cert.verify_for_usage(
        algs.all,
        bundle.anchors(),
        intermediates,
        now,
        usage,
        None,
        None,
    )
    .map_err(pki_error)?;
    let parsed = pki::parse_cert(end_entity)
        .map_err(|e| rustls::Error::InvalidCertificate(CertificateError::Other(other(e))))?;
    let id = pki::spiffe_id(&parsed)
        .map_err(|e| rustls::Error::InvalidCertificate(CertificateError::Other(other(e))))?;
    if !matcher.matches(&id) {
        return Err(rustls::Error::InvalidCertificate(CertificateError::Other(
            other(format!("peer identity {id} is not {matcher}")),
        )));
    }
    Ok(id)
}

fn other(msg: String) -> OtherError {
    OtherError(Arc::new(Msg(msg)))
}

#[derive(Debug)]
struct Msg(String);
impl fmt::Display for Msg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for Msg {}

/// Maps webpki's verdicts onto rustls's, as rustls's own verifier does, so
/// that alerts and logs say "expired" or "unknown issuer" precisely.
fn pki_error(e: webpki::Error) -> rustls::Error {
    use webpki::Error::*;
    let ce = match e {
        BadDer | BadDerTime => CertificateError::BadEncoding,
        CertNotValidYet { .. } => CertificateError::NotValidYet,
        CertExpired { .. } | InvalidCertValidity => CertificateError::Expired,
        UnknownIssuer => CertificateError::UnknownIssuer,
        CertNotValidForName(_) => CertificateError::NotValidForName,
        CertRevoked => CertificateError::Revoked,
        InvalidSignatureForPublicKey | UnsupportedSignatureAlgorithmForPublicKeyContext(_) => {
            CertificateError::BadSignature
        }
        RequiredEkuNotFoundContext(_) => CertificateError::InvalidPurpose,
        other_error => CertificateError::Other(other(format!("{other_error}"))),
    };
    rustls::Error::InvalidCertificate(ce)
}

fn no_bundle() -> rustls::Error {
    rustls::Error::General(
        "no trust bundle yet: this workload has no certificate from the CA".into(),
    )
}

/// What both verifiers check: the chain against the current bundle and
/// the leaf's SPIFFE ID against a matcher, for one side's key usage.
struct PeerCheck {
    trust: Trust,
    matcher: PeerMatcher,
    algs: WebPkiSupportedAlgorithms,
}

impl PeerCheck {
    fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: webpki::KeyUsage,
    ) -> Result<(), rustls::Error> {
        let bundle = self.trust.bundle().ok_or_else(no_bundle)?;
        verify_chain(
            &bundle,
            end_entity,
            intermediates,
            now,
            usage,
            &self.matcher,
            &self.algs,
        )
        .map(drop)
    }

    fn tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }
}

/// The configs are TLS 1.3 only; a TLS 1.2 signature is never valid.
fn tls12_refused() -> Result<HandshakeSignatureValid, rustls::Error> {
    Err(rustls::Error::PeerIncompatible(
        rustls::PeerIncompatible::Tls12NotOffered,
    ))
}

struct SpiffeServerVerifier(PeerCheck);

impl fmt::Debug for SpiffeServerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeServerVerifier({})", self.0.matcher)
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.0.verify(
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
        )?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls12_refused()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.algs.supported_schemes()
    }
}

struct SpiffeClientVerifier {
    check: PeerCheck,
    mandatory: bool,
}

impl fmt::Debug for SpiffeClientVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "SpiffeClientVerifier({}, mandatory: {})",
            self.check.matcher, self.mandatory
        )
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // TLS 1.3 lets the server omit the CA list; the bundle changes at
        // run time and our clients have one certificate anyway.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check.verify(
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::client_auth(),
        )?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls12_refused()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.check.tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.check.algs.supported_schemes()
    }
}

/// Resolves our own certificate from the current snapshot, per handshake.
struct LiveCert(CredentialsHandle);

impl fmt::Debug for LiveCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("LiveCert")
    }
}

impl ResolvesServerCert for LiveCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.load().map(|c| c.certified_key().clone())
    }
}

impl ResolvesClientCert for LiveCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        // An expired certificate would only make the server abort the
        // handshake; without one, a server with optional client auth (the
        // CA) can still authenticate the request another way (a token).
        let creds = self.0.load_valid()?;
        let key = creds.certified_key();
        // Send nothing rather than a certificate the server cannot check.
        key.key
            .choose_scheme(sigschemes)
            .is_some()
            .then(|| key.clone())
    }

    fn has_certs(&self) -> bool {
        self.0.load_valid().is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::credentials::Credentials;
    use rcgen::{
        BasicConstraints, CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, IsCa,
        Issuer, KeyPair, KeyUsagePurpose, SanType,
    };
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
    use std::time::{Duration, SystemTime};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    struct Ca {
        cert: CertificateDer<'static>,
        issuer: Issuer<'static, KeyPair>,
    }

    fn ca(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.distinguished_name.push(rcgen::DnType::CommonName, name);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let cert = p.self_signed(&key).unwrap().der().clone();
        Ca {
            issuer: Issuer::from_ca_cert_der(&cert, key).unwrap(),
            cert,
        }
    }

    fn creds(ca: &Ca, id: &str, bundle: &[&Ca]) -> Credentials {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.subject_alt_names = vec![SanType::URI(id.try_into().unwrap())];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let now = SystemTime::now();
        p.not_before = crate::pki::offset_time(now - Duration::from_secs(60));
        p.not_after = crate::pki::offset_time(now + Duration::from_secs(600));
        let cert = p.signed_by(&key, &ca.issuer).unwrap().der().clone();
        let bundle = Bundle::new(bundle.iter().map(|c| c.cert.clone()).collect()).unwrap();
        Credentials::new(
            vec![cert],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            Arc::new(bundle),
        )
        .unwrap()
    }

    /// One handshake with fixed configs; the server's verified client ID
    /// and the client's verified server ID, or the error.
    async fn handshake(
        server: &Arc<ServerConfig>,
        client: &Arc<ClientConfig>,
    ) -> Result<(Option<SpiffeId>, Option<SpiffeId>), String> {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let acceptor = tokio_rustls::TlsAcceptor::from(server.clone());
        let connector = tokio_rustls::TlsConnector::from(client.clone());
        let srv = tokio::spawn(async move {
            let mut s = acceptor.accept(a).await.map_err(|e| e.to_string())?;
            let mut buf = [0u8; 1];
            s.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
            s.write_all(b"y").await.map_err(|e| e.to_string())?;
            Ok::<_, String>(peer_id(s.get_ref().1))
        });
        let cli = async {
            let mut c = connector
                .connect(mesh_server_name(), b)
                .await
                .map_err(|e| e.to_string())?;
            c.write_all(b"x").await.map_err(|e| e.to_string())?;
            let mut buf = [0u8; 1];
            c.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
            Ok::<_, String>(peer_id(c.get_ref().1))
        };
        let c = cli.await;
        let s = srv.await.map_err(|e| e.to_string())?;
        match (s, c) {
            (Ok(s), Ok(c)) => Ok((s, c)),
            (s, c) => Err(format!("client: {c:?}; server: {s:?}")),
        }
    }

    #[tokio::test]
    async fn swapped_credentials_apply_to_the_next_handshake_without_rebuilding() {
        let (ca1, ca2) = (ca("one"), ca("two"));
        let server = CredentialsHandle::with(creds(&ca1, "spiffe://td/server", &[&ca1]));
        let client = CredentialsHandle::with(creds(&ca1, "spiffe://td/client", &[&ca1]));
        let td: TrustDomain = "td".parse().unwrap();
        let scfg = server_config(
            &server,
            ClientAuth::Required(PeerMatcher::TrustDomain(td.clone())),
            vec![b"x".to_vec()],
        );
        let ccfg = client_config(
            &client,
            PeerMatcher::TrustDomain(td.clone()),
            vec![b"x".to_vec()],
        );
        let (s, c) = handshake(&scfg, &ccfg).await.unwrap();
        assert_eq!(s.unwrap().as_str(), "spiffe://td/client");
        assert_eq!(c.unwrap().as_str(), "spiffe://td/server");

        // The server renews under a new root; the client does not know it yet.
        server.store(creds(&ca2, "spiffe://td/server2", &[&ca1, &ca2]));
        let err = handshake(&scfg, &ccfg).await.unwrap_err();
        assert!(err.contains("UnknownIssuer"), "{err}");
        // The client's bundle gains the new root: the same configs now work.
        let updated = client.load().unwrap().with_bundle(Arc::new(
            Bundle::new(vec![ca1.cert.clone(), ca2.cert.clone()]).unwrap(),
        ));
        client.store(updated);
        let (_, c) = handshake(&scfg, &ccfg).await.unwrap();
        assert_eq!(c.unwrap().as_str(), "spiffe://td/server2");
    }

    #[tokio::test]
    async fn identities_are_matched_and_client_auth_can_be_required() {
        let ca = ca("one");
        let td: TrustDomain = "td".parse().unwrap();
        let server = CredentialsHandle::with(creds(&ca, "spiffe://td/server", &[&ca]));
        let client = CredentialsHandle::with(creds(&ca, "spiffe://td/client", &[&ca]));
        let required = server_config(
            &server,
            ClientAuth::Required(PeerMatcher::TrustDomain(td.clone())),
            vec![],
        );
        let optional = server_config(
            &server,
            ClientAuth::Optional(PeerMatcher::TrustDomain(td.clone())),
            vec![],
        );

        // Wrong exact identity, and a foreign trust domain, are refused.
        let wrong = client_config(
            &client,
            PeerMatcher::Exact("spiffe://td/other".parse().unwrap()),
            vec![],
        );
        assert!(handshake(&required, &wrong).await.is_err());
        let foreign = CredentialsHandle::with(creds(&ca, "spiffe://elsewhere/client", &[&ca]));
        let foreign_cfg = client_config(&foreign, PeerMatcher::TrustDomain(td.clone()), vec![]);
        assert!(handshake(&required, &foreign_cfg).await.is_err());

        // A client without a certificate: refused when required, anonymous
        // when optional.
        let anonymous = CredentialsHandle::new();
        let anon_cfg = build_client_config(
            &anonymous,
            Trust::LiveOr(
                anonymous.clone(),
                Arc::new(Bundle::new(vec![ca.cert.clone()]).unwrap()),
            ),
            PeerMatcher::Exact("spiffe://td/server".parse().unwrap()),
            vec![],
        );
        assert!(handshake(&required, &anon_cfg).await.is_err());
        let (s, c) = handshake(&optional, &anon_cfg).await.unwrap();
        assert_eq!((s, c.unwrap().as_str()), (None, "spiffe://td/server"));
    }
}
