//! The legate certificate authority, and the client side that workloads use
//! to obtain and renew their certificates.
//!
//! The mesh's identities are SPIFFE IDs carried as the only URI SAN of short
//! lived X.509 certificates (X509-SVIDs). This crate holds every piece that
//! makes, moves and checks those certificates:
//!
//! - [`store`]: the CA directory: roots and intermediates (created here or
//!   brought by the operator), root rotation and retirement.
//! - [`issuer`]: what a certificate signing request may ask for, and the
//!   certificates the CA signs.
//! - [`token`], [`kubernetes`] and [`auth`]: who may ask for which
//!   identity: bootstrap tokens, renewal with the current certificate, and
//!   Kubernetes ServiceAccount tokens checked with TokenReview.
//! - [`server`]: the HTTPS API (`legate ca serve`).
//! - [`client`] and [`manager`]: the workload side: fetch a certificate,
//!   renew it at half-life, keep the trust bundle fresh.
//! - [`credentials`] and [`tls`]: the live certificate, key and bundle, and
//!   rustls configurations that follow them without a restart. The proxy
//!   builds its mTLS from these.
//! - [`inspect`] and [`cli`]: the `legate ca ...` commands.

#![forbid(unsafe_code)]

pub mod api;
pub mod auth;
pub mod cli;
pub mod client;
pub mod credentials;
mod error;
mod files;
pub mod inspect;
pub mod issuer;
pub mod kubernetes;
pub mod manager;
mod pki;
pub mod server;
pub mod store;
pub mod tls;
pub mod token;

pub use credentials::{Bundle, Credentials, CredentialsHandle};
pub use error::CaError;
pub use manager::{IdentityManager, ManagerOptions, RenewalStats};
pub use tls::{ClientAuth, PeerMatcher};

use legate_config::{SpiffeId, TrustDomain};

/// The SPIFFE ID the CA's API presents: `spiffe://<td>/legate/ca`.
/// Clients check it, so a workload certificate cannot pose as the CA.
pub fn ca_server_id(td: &TrustDomain) -> SpiffeId {
    SpiffeId::new(td, ["legate", "ca"])
        .expect("a validated trust domain with literal segments is a valid SPIFFE ID")
}
