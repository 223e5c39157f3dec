//! Who may ask the CA for which identity.
//!
//! Each method is an [`Authenticator`]. The server runs them in order; the
//! first that recognises the request decides, and the identity it returns
//! is the only one the CSR may ask for. Methods today:
//!
//! - [`BootstrapTokens`]: `Authorization: Bearer legate1...` minted by
//!   `legate ca token` (see [`crate::token`]);
//! - [`Renewal`]: the client's current certificate, already verified by
//!   the TLS layer against the bundle; it may renew only its own identity;
//! - [`TokenReviews`](crate::kubernetes::TokenReviews): a Kubernetes
//!   ServiceAccount token (a JWT in the same `Authorization` header),
//!   checked by the API server's TokenReview; `system:serviceaccount:<ns>:<sa>`
//!   becomes `spiffe://<td>/ns/<ns>/sa/<sa>`. The trait is async for that
//!   call.
//!
//! Order matters only for bearer tokens: when the Kubernetes method is on
//! it comes first and claims JWTs; [`BootstrapTokens`] takes everything
//! else, and answers a JWT (the Kubernetes method being off) with an error
//! that says so.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwap;
use legate_config::SpiffeId;

use crate::kubernetes::{self, KubernetesError};
use crate::token::{TokenError, TokenKey};

/// What an authenticator sees of a request.
#[derive(Debug, Clone, Copy)]
pub struct AuthRequest<'a> {
    /// The bearer token from `Authorization: Bearer ...`, if any.
    pub bearer: Option<&'a str>,
    /// The SPIFFE ID of the client certificate verified during the TLS
    /// handshake, if the client presented one.
    pub peer: Option<&'a SpiffeId>,
}

/// An identity proven by one method.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authenticated {
    pub id: SpiffeId,
    /// The method, for logs: `token`, `renewal`, `kubernetes`.
    pub method: &'static str,
}

/// Why a request is not authenticated. Each variant maps to an API error
/// code and a reason the operator can act on.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("no credentials: send a bootstrap token (`Authorization: Bearer ...`, from `legate ca token`) or renew over mTLS with a current certificate")]
    Missing,
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error("{0}")]
    Rejected(String),
    #[error(transparent)]
    Kubernetes(#[from] KubernetesError),
}

impl AuthError {
    pub fn code(&self) -> &'static str {
        match self {
            AuthError::Missing => "unauthenticated",
            AuthError::Token(TokenError::Expired(_)) => "token_expired",
            AuthError::Token(TokenError::NotYetValid(_)) => "token_not_yet_valid",
            AuthError::Token(TokenError::BadSignature) => "token_invalid",
            AuthError::Token(_) => "token_malformed",
            AuthError::Rejected(_) => "unauthenticated",
            AuthError::Kubernetes(e) => e.code(),
        }
    }

    /// The HTTP status of the refusal: 401, except where the Kubernetes
    /// method says otherwise (503 when the API server is the problem).
    pub fn status(&self) -> http::StatusCode {
        match self {
            AuthError::Kubernetes(e) => e.status(),
            _ => http::StatusCode::UNAUTHORIZED,
        }
    }
}

pub type AuthFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Option<Authenticated>, AuthError>> + Send + 'a>>;

/// One way to prove an identity.
pub trait Authenticator: Send + Sync {
    /// `Ok(None)` when the request does not use this method (so the next
    /// one is tried); `Err` when it does and fails.
    fn authenticate<'a>(&'a self, req: AuthRequest<'a>) -> AuthFuture<'a>;
}

/// Bootstrap tokens signed with the CA's token key.
pub struct BootstrapTokens {
    /// Swappable so that a reloaded CA directory takes effect without
    /// rebuilding the authenticator chain.
    key: Arc<ArcSwap<TokenKey>>,
}

impl BootstrapTokens {
    pub fn new(key: Arc<ArcSwap<TokenKey>>) -> Self {
        BootstrapTokens { key }
    }
}

impl Authenticator for BootstrapTokens {
    fn authenticate<'a>(&'a self, req: AuthRequest<'a>) -> AuthFuture<'a> {
        Box::pin(async move {
            let Some(token) = req.bearer else {
                return Ok(None);
            };
            if kubernetes::looks_like_jwt(token) {
                return Err(KubernetesError::Disabled.into());
            }
            let id = self.key.load().verify(token, SystemTime::now())?;
            Ok(Some(Authenticated {
                id,
                method: "token",
            }))
        })
    }
}

/// Renewal: the TLS layer verified the client certificate against the
/// bundle (chain, validity, clientAuth usage, trust domain); its SPIFFE ID
/// is the identity.
pub struct Renewal;

impl Authenticator for Renewal {
    fn authenticate<'a>(&'a self, req: AuthRequest<'a>) -> AuthFuture<'a> {
        Box::pin(async move {
            Ok(req.peer.map(|id| Authenticated {
                id: id.clone(),
                method: "renewal",
            }))
        })
    }
}

/// Runs authenticators in order; the first that applies decides.
pub async fn authenticate(
    chain: &[Box<dyn Authenticator>],
    req: AuthRequest<'_>,
) -> Result<Authenticated, AuthError> {
    for a in chain {
        if let Some(ok) = a.authenticate(req).await? {
            return Ok(ok);
        }
    }
    Err(AuthError::Missing)
}
