//! Who may ask the CA for which identity.
//!
//! Each method is an [`Authenticator`]. The server runs them in order; the
//! first that recognises the request decides, and the identity it returns
//! is the only one the CSR may ask for. Methods today:
//!
//! - [`BootstrapTokens`]: `Authorization: Bearer legate1...` minted by
//!   `legate ca token` (see [`crate::token`]);
//! - [`Renewal`]: the client's current certificate, already verified by
//!   the TLS layer against the bundle; it may renew only its own identity.
//!
//! Kubernetes ServiceAccount tokens (TokenReview) slot in as a third
//! implementation: it would recognise a JWT bearer token (three base64url
//! parts, not starting with `legate1.`), send it to the API server's
//! TokenReview endpoint, and map `system:serviceaccount:<ns>:<sa>` to
//! `spiffe://<td>/ns/<ns>/sa/<sa>`. The trait is async for that call.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwap;
use legate_config::SpiffeId;

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
    /// The method, for logs: `token`, `renewal`.
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
