//! The error type of CA operations and the `legate ca` commands. Each
//! message says what went wrong and what the operator can do about it.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;

/// What can go wrong while creating, loading, serving or using the CA.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} already exists; pass --force to replace it (certificates signed by the old key stop verifying once no bundle carries its root)", .0.display())]
    Exists(PathBuf),
    #[error("{} holds no CA; run `legate ca init --dir {}` first", .0.display(), .0.display())]
    NotInitialised(PathBuf),
    /// Key or certificate material that cannot be used, with the reason.
    #[error("{}: {reason}", path.display())]
    Material { path: PathBuf, reason: String },
    /// A command-line or configuration combination that cannot work.
    #[error("{0}")]
    Usage(String),
    /// The CA's own identity, which no workload may hold.
    #[error("{0} is the CA's own identity: clients accept whoever presents it as the CA, so no token or certificate is issued for it; choose another identity (any path other than /legate/ca)")]
    ReservedIdentity(legate_config::SpiffeId),
    /// A generation's `issued-until` record exists but is unusable, so how
    /// long its certificates stay valid is unknown.
    #[error("{}: {reason}, so it is unknown how long certificates from generation {generation} stay valid. If you know their latest expiry, write it there as Unix seconds (e.g. `date -d '2030-01-01' +%s`); otherwise wait until every certificate it issued has expired (at most ca.cert_ttl after it stopped signing) and then delete the file", path.display())]
    IssuedUntil {
        path: PathBuf,
        generation: u32,
        reason: String,
    },
    /// A generation `state.json` still counts on whose directory is gone,
    /// so its root, intermediate and key cannot be read.
    #[error("generation {generation}'s files are missing: {} names it as {role}, but {} does not exist. Restore that directory from a backup of the CA directory; without one, {fix}", state.display(), dir.display())]
    GenerationMissing {
        generation: u32,
        /// "the signing generation" or "a live generation".
        role: &'static str,
        /// The missing `gen-<n>` directory.
        dir: PathBuf,
        state: PathBuf,
        /// What to do without a backup, which depends on the role.
        fix: String,
    },
    #[error("cannot retire: {0}")]
    Retire(String),
    #[error("signing failed: {0}")]
    Signing(String),
    #[error("cannot listen on {addr}: {source}; is another process using the port? Choose another with --listen or ca.listen")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Token(#[from] crate::token::TokenError),
    #[error(transparent)]
    Client(#[from] crate::client::ClientError),
    #[error(transparent)]
    Credentials(#[from] crate::credentials::CredentialsError),
}

impl CaError {
    pub(crate) fn io(action: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        CaError::Io {
            action,
            path: path.into(),
            source,
        }
    }

    pub(crate) fn material(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        CaError::Material {
            path: path.into(),
            reason: reason.into(),
        }
    }
}
