//! Kubernetes ServiceAccount tokens, checked with the TokenReview API.
//!
//! A meshed pod mounts a projected ServiceAccount token whose audience is
//! `ca.token_audience` (`legate`) and sends it as its bearer token, exactly
//! where a bootstrap token would go. The two are told apart by shape: a
//! bootstrap token starts with `legate1.`, a ServiceAccount token is a JWT
//! (three base64url parts, the first a JSON header).
//!
//! The CA does not verify the JWT itself: it asks the API server, which
//! knows the signing keys, whether the pod still exists and whether the
//! token was revoked. It POSTs a `TokenReview` (`authentication.k8s.io/v1`)
//! with `spec.audiences: [<audience>]`, authenticated with its own
//! ServiceAccount token (re-read for every review, because the kubelet
//! rotates it), and requires:
//!
//! - `status.authenticated == true`;
//! - `status.audiences` to contain the audience, when the API returns
//!   audiences (audience-aware authenticators, which ServiceAccount tokens
//!   use, always do), so a token minted for another service is refused;
//! - `status.user.username == "system:serviceaccount:<ns>:<sa>"`.
//!
//! The identity is then `spiffe://<td>/ns/<ns>/sa/<sa>`, and as with every
//! method the CSR must ask for exactly that identity: a token for one
//! ServiceAccount never yields another's certificate.
//!
//! The API server is verified like any HTTPS server, by its DNS name or IP
//! address against `ca.kubernetes_ca_file` (the cluster's CA, not the mesh
//! bundle). Reviews run only at bootstrap (renewals use the current
//! certificate), so each one opens a fresh connection and re-reads both
//! files; a rotated cluster CA or token needs no restart.
//!
//! Failures are typed so the workload hears what happened: the API
//! unreachable or refusing the CA's own credentials is a retryable 503
//! (nothing is wrong with the workload's token); a token the API rejects,
//! or one for another audience, is a 401.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use bytes::Bytes;
use http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HOST};
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use legate_config::{CaConfig, SpiffeId, TrustDomain};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, RootCertStore};
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tracing::{info, warn};

use crate::auth::{AuthError, AuthFuture, AuthRequest, Authenticated, Authenticator};
use crate::{files, pki, tls, CaError};

/// The TokenReview endpoint, below the API's base URL.
pub const REVIEW_PATH: &str = "/apis/authentication.k8s.io/v1/tokenreviews";
/// What the API server calls a ServiceAccount.
pub const USERNAME_PREFIX: &str = "system:serviceaccount:";
/// The API server's certificate authority inside a pod.
pub const IN_CLUSTER_CA_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt";
/// The pod's own ServiceAccount token.
pub const IN_CLUSTER_TOKEN_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";
/// Longer bearer tokens are not sent anywhere.
const MAX_TOKEN: usize = 16 * 1024;
/// Largest TokenReview response read; real ones are under 2KiB.
const MAX_RESPONSE: usize = 64 * 1024;

/// Why a ServiceAccount token did not yield an identity.
#[derive(Debug, thiserror::Error)]
pub enum KubernetesError {
    #[error("the bearer token looks like a Kubernetes ServiceAccount token, but this CA does not check them: it runs outside a cluster and ca.kubernetes_api is not set. Set it, or send a bootstrap token from `legate ca token`")]
    Disabled,
    #[error("cannot reach the Kubernetes API at {api} to review the ServiceAccount token: {detail}; this is the CA's problem, not the token's; retry later (operator: check ca.kubernetes_api and that the CA can reach the API server)")]
    Unavailable { api: String, detail: String },
    #[error("the Kubernetes API at {api} refused the CA's own credentials ({status}) when reviewing the token: {detail}; retry later (operator: check ca.kubernetes_token_file and that the CA's ServiceAccount may create tokenreviews, see deploy/ca/rbac.yaml)")]
    CaNotAllowed {
        api: String,
        status: StatusCode,
        detail: String,
    },
    #[error("the CA cannot review ServiceAccount tokens: {0}; retry later (operator: check the CA's Kubernetes settings)")]
    Setup(String),
    #[error("the Kubernetes API at {api} answered the TokenReview with something the CA does not understand: {detail}")]
    BadResponse { api: String, detail: String },
    #[error("the ServiceAccount token was rejected by the Kubernetes API: {0}")]
    Rejected(String),
    #[error("the ServiceAccount token is for the audiences {got:?}, not {want:?}; project a token with `audience: {want}` (legate inject does)")]
    WrongAudience { want: String, got: Vec<String> },
    #[error("the token belongs to {0:?}, which is not a ServiceAccount; send the pod's projected ServiceAccount token")]
    NotServiceAccount(String),
    #[error("the ServiceAccount {username:?} cannot be a SPIFFE ID: {detail}")]
    BadIdentity { username: String, detail: String },
}

impl KubernetesError {
    /// A stable code for the API's JSON error.
    pub fn code(&self) -> &'static str {
        match self {
            KubernetesError::Disabled => "kubernetes_disabled",
            KubernetesError::Unavailable { .. } | KubernetesError::Setup(_) => {
                "kubernetes_unavailable"
            }
            KubernetesError::CaNotAllowed { .. } => "kubernetes_refused_ca",
            KubernetesError::BadResponse { .. } => "kubernetes_bad_response",
            KubernetesError::Rejected(_) => "token_rejected",
            KubernetesError::WrongAudience { .. } => "token_wrong_audience",
            KubernetesError::NotServiceAccount(_) | KubernetesError::BadIdentity { .. } => {
                "not_a_service_account"
            }
        }
    }

    /// The HTTP status of the refusal: 503 when the API server, not the
    /// token, is the problem, so that clients retry.
    pub fn status(&self) -> StatusCode {
        match self {
            KubernetesError::Unavailable { .. }
            | KubernetesError::CaNotAllowed { .. }
            | KubernetesError::Setup(_) => StatusCode::SERVICE_UNAVAILABLE,
            KubernetesError::BadResponse { .. } => StatusCode::BAD_GATEWAY,
            KubernetesError::Disabled
            | KubernetesError::Rejected(_)
            | KubernetesError::WrongAudience { .. } => StatusCode::UNAUTHORIZED,
            KubernetesError::NotServiceAccount(_) | KubernetesError::BadIdentity { .. } => {
                StatusCode::FORBIDDEN
            }
        }
    }
}

/// Whether a bearer token is a JWT rather than a legate bootstrap token:
/// three non-empty base64url parts, the first of which is a JSON object.
pub fn looks_like_jwt(token: &str) -> bool {
    let token = token.trim();
    if token.len() > MAX_TOKEN || token.starts_with("legate1.") {
        return false;
    }
    let parts: Vec<&str> = token.split('.').collect();
    if parts.len() != 3
        || parts.iter().any(|p| {
            p.is_empty()
                || !p
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
    {
        return false;
    }
    URL_SAFE_NO_PAD
        .decode(parts[0])
        .ok()
        .and_then(|h| serde_json::from_slice::<serde_json::Value>(&h).ok())
        .is_some_and(|v| v.is_object())
}

/// Where and how the CA reviews tokens.
#[derive(Debug, Clone)]
pub struct KubernetesOptions {
    /// The API server's base URL, `https://host[:port][/prefix]`.
    pub api: String,
    pub ca_file: PathBuf,
    pub token_file: PathBuf,
    pub audience: String,
    /// Deadline of one review, connection included.
    pub timeout: Duration,
}

impl KubernetesOptions {
    /// The method's settings, or `None` when it is off: `ca.kubernetes_api`
    /// when set, else the cluster the process runs in (from
    /// `KUBERNETES_SERVICE_HOST` and `KUBERNETES_SERVICE_PORT`).
    pub fn from_config(cfg: &CaConfig) -> Result<Option<Self>, CaError> {
        let host = std::env::var("KUBERNETES_SERVICE_HOST").ok();
        let port = std::env::var("KUBERNETES_SERVICE_PORT").ok();
        Self::resolve(cfg, host.as_deref(), port.as_deref())
    }

    /// [`from_config`](Self::from_config) with the environment passed in.
    ///
    /// An explicit `ca.kubernetes_api` whose CA file cannot be read is an
    /// error at startup. Found by the environment alone, the method is
    /// switched off with a warning instead, so that a CA that merely runs
    /// in a pod without a mounted ServiceAccount keeps serving its other
    /// methods.
    pub fn resolve(
        cfg: &CaConfig,
        host: Option<&str>,
        port: Option<&str>,
    ) -> Result<Option<Self>, CaError> {
        let explicit = cfg.kubernetes_api.is_some();
        let api = match (&cfg.kubernetes_api, host.map(str::trim)) {
            (Some(api), _) => api.trim_end_matches('/').to_owned(),
            (None, Some(h)) if !h.is_empty() => {
                let port = port
                    .map(str::trim)
                    .filter(|p| !p.is_empty())
                    .unwrap_or("443");
                if h.contains(':') {
                    format!("https://[{h}]:{port}")
                } else {
                    format!("https://{h}:{port}")
                }
            }
            _ => return Ok(None),
        };
        let opts = KubernetesOptions {
            api,
            ca_file: cfg.kubernetes_ca_file.clone(),
            token_file: cfg.kubernetes_token_file.clone(),
            audience: cfg.token_audience.clone(),
            timeout: (cfg.request_timeout / 2).max(Duration::from_millis(100)),
        };
        if let Err(e) = Target::parse(&opts.api).and_then(|_| roots(&opts.ca_file).map(|_| ())) {
            if explicit {
                return Err(CaError::Usage(format!("ca.kubernetes_api is set but {e}")));
            }
            warn!("running in Kubernetes but ServiceAccount tokens cannot be reviewed, so that method is off: {e}");
            return Ok(None);
        }
        Ok(Some(opts))
    }
}

/// The API server's address, parsed once.
#[derive(Debug, Clone)]
struct Target {
    /// `host:port` to connect to.
    connect: String,
    /// The `Host` header.
    authority: String,
    server_name: ServerName<'static>,
    /// The TokenReview path, below any prefix in the URL.
    path: String,
}

impl Target {
    fn parse(api: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("{api:?} is not a usable https:// URL: {why}");
        let uri: Uri = api.parse().map_err(|e| bad(&format!("{e}")))?;
        if uri.scheme_str() != Some("https") {
            return Err(bad("the scheme must be https"));
        }
        let host = uri.host().ok_or_else(|| bad("no host"))?;
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let port = uri.port_u16().unwrap_or(443);
        let server_name = ServerName::try_from(bare.to_owned()).map_err(|e| {
            bad(&format!(
                "{bare:?} is neither a DNS name nor an IP address: {e}"
            ))
        })?;
        let authority = uri
            .authority()
            .map(|a| a.as_str().to_owned())
            .ok_or_else(|| bad("no host"))?;
        let connect = if bare.contains(':') {
            format!("[{bare}]:{port}")
        } else {
            format!("{bare}:{port}")
        };
        let prefix = uri.path().trim_end_matches('/');
        Ok(Target {
            connect,
            authority,
            server_name,
            path: format!("{prefix}{REVIEW_PATH}"),
        })
    }
}

/// Reads the PEM roots that verify the API server.
fn roots(path: &Path) -> Result<RootCertStore, String> {
    let pem = files::read(path).map_err(|e| e.to_string())?;
    let certs = pki::parse_certs(&pem).map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{} holds no PEM certificate (ca.kubernetes_ca_file)",
            path.display()
        ));
    }
    let mut store = RootCertStore::empty();
    for c in certs {
        store
            .add(c)
            .map_err(|e| format!("{}: unusable certificate: {e}", path.display()))?;
    }
    Ok(store)
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ReviewRequest<'a> {
    api_version: &'static str,
    kind: &'static str,
    spec: ReviewSpec<'a>,
}

#[derive(Serialize)]
struct ReviewSpec<'a> {
    token: &'a str,
    audiences: [&'a str; 1],
}

#[derive(Deserialize)]
struct Review {
    kind: Option<String>,
    status: Option<ReviewStatus>,
}

#[derive(Deserialize)]
struct ReviewStatus {
    #[serde(default)]
    authenticated: bool,
    user: Option<ReviewUser>,
    audiences: Option<Vec<String>>,
    error: Option<String>,
}

#[derive(Deserialize)]
struct ReviewUser {
    #[serde(default)]
    username: String,
}

/// The TokenReview authenticator.
pub struct TokenReviews {
    opts: KubernetesOptions,
    target: Target,
    td: TrustDomain,
}

impl TokenReviews {
    /// Reviews tokens with the API in `opts`; identities are in `td`.
    pub fn new(opts: KubernetesOptions, td: TrustDomain) -> Result<Self, CaError> {
        let target = Target::parse(&opts.api)
            .map_err(|e| CaError::Usage(format!("ca.kubernetes_api: {e}")))?;
        info!(api = %opts.api, audience = %opts.audience, "ServiceAccount tokens are checked with TokenReview");
        Ok(TokenReviews { opts, target, td })
    }

    /// Asks the API server about `token` and returns the identity it
    /// proves.
    pub async fn review(&self, token: &str) -> Result<SpiffeId, KubernetesError> {
        let timeout = self.opts.timeout;
        let review = tokio::time::timeout(timeout, self.call(token))
            .await
            .unwrap_or_else(|_| {
                Err(KubernetesError::Unavailable {
                    api: self.opts.api.clone(),
                    detail: format!("no answer within {}", pki::human(timeout)),
                })
            })?;
        self.judge(review)
    }

    fn judge(&self, review: Review) -> Result<SpiffeId, KubernetesError> {
        let bad = |detail: &str| KubernetesError::BadResponse {
            api: self.opts.api.clone(),
            detail: detail.to_owned(),
        };
        if review.kind.as_deref().is_some_and(|k| k != "TokenReview") {
            return Err(bad("the object is not a TokenReview"));
        }
        let status = review.status.ok_or_else(|| bad("no status"))?;
        if !status.authenticated {
            let why = status
                .error
                .filter(|e| !e.trim().is_empty())
                .unwrap_or_else(|| "no reason given".into());
            return Err(KubernetesError::Rejected(why));
        }
        if let Some(got) = status.audiences.filter(|a| !a.is_empty()) {
            if !got.iter().any(|a| a == &self.opts.audience) {
                return Err(KubernetesError::WrongAudience {
                    want: self.opts.audience.clone(),
                    got,
                });
            }
        }
        let username = status
            .user
            .map(|u| u.username)
            .ok_or_else(|| bad("authenticated, but no status.user"))?;
        let (ns, sa) = username
            .strip_prefix(USERNAME_PREFIX)
            .and_then(|rest| rest.split_once(':'))
            .filter(|(ns, sa)| !ns.is_empty() && !sa.is_empty() && !sa.contains(':'))
            .ok_or_else(|| KubernetesError::NotServiceAccount(username.clone()))?;
        SpiffeId::new(&self.td, ["ns", ns, "sa", sa]).map_err(|detail| {
            KubernetesError::BadIdentity {
                username: username.clone(),
                detail,
            }
        })
    }

    async fn call(&self, token: &str) -> Result<Review, KubernetesError> {
        let api = &self.opts.api;
        let unavailable = |detail: String| KubernetesError::Unavailable {
            api: api.clone(),
            detail,
        };
        let roots = roots(&self.opts.ca_file).map_err(KubernetesError::Setup)?;
        let own = files::read_string(&self.opts.token_file)
            .map_err(|e| KubernetesError::Setup(format!("{e} (ca.kubernetes_token_file)")))?;
        let own = own.trim();
        if own.is_empty() {
            return Err(KubernetesError::Setup(format!(
                "{} is empty (ca.kubernetes_token_file)",
                self.opts.token_file.display()
            )));
        }
        let mut config = ClientConfig::builder_with_provider(tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| KubernetesError::Setup(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];

        let body = serde_json::to_vec(&ReviewRequest {
            api_version: "authentication.k8s.io/v1",
            kind: "TokenReview",
            spec: ReviewSpec {
                token: token.trim(),
                audiences: [&self.opts.audience],
            },
        })
        .map_err(|e| KubernetesError::Setup(e.to_string()))?;
        let req = Request::builder()
            .method(Method::POST)
            .uri(&self.target.path)
            .header(HOST, &self.target.authority)
            .header(AUTHORIZATION, format!("Bearer {own}"))
            .header(CONTENT_TYPE, "application/json")
            .header(ACCEPT, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| {
                KubernetesError::Setup(format!(
                    "cannot build the request (is ca.kubernetes_token_file printable ASCII?): {e}"
                ))
            })?;

        let tcp = TcpStream::connect(&self.target.connect)
            .await
            .map_err(|e| unavailable(format!("connecting to {}: {e}", self.target.connect)))?;
        let _ = tcp.set_nodelay(true);
        let stream = TlsConnector::from(Arc::new(config))
            .connect(self.target.server_name.clone(), tcp)
            .await
            .map_err(|e| {
                unavailable(format!(
                    "TLS failed: {e} (is ca.kubernetes_ca_file the cluster's CA?)"
                ))
            })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| unavailable(format!("HTTP failed: {e}")))?;
        let driver = tokio::spawn(async move {
            let _ = conn.await;
        });
        let result = async {
            let resp = sender
                .send_request(req)
                .await
                .map_err(|e| unavailable(format!("HTTP failed: {e}")))?;
            let status = resp.status();
            let body = Limited::new(resp.into_body(), MAX_RESPONSE)
                .collect()
                .await
                .map_err(|e| {
                    unavailable(format!(
                        "reading the answer (at most {MAX_RESPONSE} bytes): {e}"
                    ))
                })?
                .to_bytes();
            let excerpt = || String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned();
            if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
                return Err(KubernetesError::CaNotAllowed {
                    api: api.clone(),
                    status,
                    detail: excerpt(),
                });
            }
            if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
                return Err(unavailable(format!("it answered {status}: {}", excerpt())));
            }
            if !status.is_success() {
                return Err(KubernetesError::BadResponse {
                    api: api.clone(),
                    detail: format!("{status}: {}", excerpt()),
                });
            }
            serde_json::from_slice::<Review>(&body).map_err(|e| KubernetesError::BadResponse {
                api: api.clone(),
                detail: format!("not a TokenReview: {e}"),
            })
        }
        .await;
        driver.abort();
        result
    }
}

impl Authenticator for TokenReviews {
    fn authenticate<'a>(&'a self, req: AuthRequest<'a>) -> AuthFuture<'a> {
        Box::pin(async move {
            let Some(token) = req.bearer.filter(|t| looks_like_jwt(t)) else {
                return Ok(None);
            };
            let id = self.review(token).await.map_err(AuthError::from)?;
            Ok(Some(Authenticated {
                id,
                method: "kubernetes",
            }))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(claims: &str) -> String {
        format!(
            "{}.{}.c2ln",
            URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256","kid":"k"}"#),
            URL_SAFE_NO_PAD.encode(claims)
        )
    }

    #[test]
    fn jwts_and_bootstrap_tokens_are_told_apart() {
        assert!(looks_like_jwt(&jwt(r#"{"sub":"x"}"#)));
        assert!(looks_like_jwt(&format!(" {} \n", jwt("{}"))));
        for not in [
            "",
            "hello",
            "a.b",
            "a.b.c.d",
            "eyJhbGciOi..x",
            "legate1.eyJzdWIiOiJ4In0.tag",
            "bm90IGpzb24.YQ.YQ", // header is not JSON
            "e30.a+b.c",         // not base64url
        ] {
            assert!(!looks_like_jwt(not), "{not:?}");
        }
        assert!(!looks_like_jwt(&jwt(&"x".repeat(MAX_TOKEN))));
    }

    #[test]
    fn in_cluster_and_explicit_endpoints() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.crt");
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["kubernetes".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        std::fs::write(&ca, cert.pem()).unwrap();
        let cfg = CaConfig {
            kubernetes_ca_file: ca,
            ..CaConfig::default()
        };
        assert!(KubernetesOptions::resolve(&cfg, None, None)
            .unwrap()
            .is_none());
        let o = KubernetesOptions::resolve(&cfg, Some("10.96.0.1"), Some("443"))
            .unwrap()
            .unwrap();
        assert_eq!(o.api, "https://10.96.0.1:443");
        assert_eq!(o.audience, "legate");
        let o = KubernetesOptions::resolve(&cfg, Some("fd00::1"), None)
            .unwrap()
            .unwrap();
        assert_eq!(o.api, "https://[fd00::1]:443");
        let t = Target::parse(&o.api).unwrap();
        assert_eq!(t.connect, "[fd00::1]:443");
        let t = Target::parse("https://k8s.example.com/prefix/").unwrap();
        assert_eq!(t.connect, "k8s.example.com:443");
        assert_eq!(t.path, format!("/prefix{REVIEW_PATH}"));

        // In a cluster without the CA file: off, not fatal. Configured
        // explicitly: fatal, naming the key.
        let missing = CaConfig {
            kubernetes_ca_file: dir.path().join("nope"),
            ..CaConfig::default()
        };
        assert!(
            KubernetesOptions::resolve(&missing, Some("10.96.0.1"), None)
                .unwrap()
                .is_none()
        );
        let explicit = CaConfig {
            kubernetes_api: Some("https://10.96.0.1".into()),
            ..missing
        };
        let e = KubernetesOptions::resolve(&explicit, None, None).unwrap_err();
        assert!(e.to_string().contains("ca.kubernetes_api"), "{e}");
    }
}
