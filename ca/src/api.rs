//! The CA API on the wire: paths and JSON bodies, shared by the server and
//! the client.
//!
//! - `POST /v1/certificate` with [`IssueRequest`]; authenticate with
//!   `Authorization: Bearer <bootstrap or Kubernetes ServiceAccount token>`
//!   (see [`crate::kubernetes`]), or over mTLS with the
//!   current certificate (renewal). Answers [`IssueResponse`].
//! - `GET /v1/bundle`: the trust bundle as PEM; no authentication.
//! - `GET /healthz`: `{"status": "ok"}`.
//!
//! Every error is JSON [`ApiError`]: a stable code in `error` and, in
//! `reason`, what happened and what to do about it.

use serde::{Deserialize, Serialize};

pub const PATH_ISSUE: &str = "/v1/certificate";
pub const PATH_BUNDLE: &str = "/v1/bundle";
pub const PATH_HEALTH: &str = "/healthz";

/// The body of `POST /v1/certificate`.
#[derive(Debug, Serialize, Deserialize)]
pub struct IssueRequest {
    /// A PEM `CERTIFICATE REQUEST` whose only URI SAN is the SPIFFE ID asked for.
    pub csr: String,
}

/// A signed certificate.
#[derive(Debug, Serialize, Deserialize)]
pub struct IssueResponse {
    pub spiffe_id: String,
    /// PEM: the leaf, then the intermediates up to (not including) the root.
    pub certificate_chain: String,
    /// PEM: every root currently trusted in the mesh.
    pub bundle: String,
    /// Unix seconds.
    pub not_before: u64,
    /// Unix seconds.
    pub not_after: u64,
    /// Hex, colon-separated.
    pub serial: String,
}

/// The body of every error response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    /// A stable machine-readable code, such as `token_expired`.
    pub error: String,
    /// What went wrong and what to do about it.
    pub reason: String,
}
