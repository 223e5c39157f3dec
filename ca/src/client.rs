//! The client of the CA API, used by the identity manager and `legate ca
//! issue`.
//!
//! One TLS connection per call: calls are rare (a renewal per half-life, a
//! bundle refresh every few minutes) and a fresh connection always presents
//! the current certificate. The CA is verified like any mesh peer, by chain
//! and SPIFFE ID (`spiffe://<td>/legate/ca`), against the current bundle,
//! or before the first certificate against the operator's bootstrap bundle
//! (`identity.ca_bundle`).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use legate_config::{Secret, TrustDomain};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::api::{self, ApiError, IssueRequest, IssueResponse};
use crate::credentials::{Bundle, CredentialsHandle};
use crate::tls::{self, PeerMatcher};

/// Largest response read from the CA.
const MAX_RESPONSE: usize = 1024 * 1024;

/// Why a call to the CA failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to the CA at {addr}: {source}; is `legate ca serve` running and reachable (identity.ca_address, firewalls, NetworkPolicy)?")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS with the CA at {addr} failed: {source}; check that identity.ca_bundle holds the CA's root (`legate ca bundle`) and that identity.trust_domain matches the CA's")]
    Tls {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the CA at {addr} did not answer within {timeout:?}")]
    Timeout { addr: String, timeout: Duration },
    #[error("HTTP with the CA failed: {0}")]
    Http(String),
    #[error("the CA refused ({status}, {}): {}", .body.error, .body.reason)]
    Refused { status: StatusCode, body: ApiError },
    #[error("the CA's answer is not understood: {0}")]
    Protocol(String),
}

impl ClientError {
    /// Whether the CA refused the credentials (so retrying the same ones is
    /// pointless until something changes).
    pub fn is_auth_refusal(&self) -> bool {
        matches!(self, ClientError::Refused { status, .. } if *status == StatusCode::UNAUTHORIZED || *status == StatusCode::FORBIDDEN)
    }
}

/// A client of one CA.
#[derive(Clone)]
pub struct CaClient {
    addr: String,
    connector: TlsConnector,
    server_name: ServerName<'static>,
    timeout: Duration,
}

impl CaClient {
    /// `addr` is `host:port`. `creds` supplies the client certificate for
    /// renewals and, once present, the bundle; `bootstrap` is used until
    /// then. The CA must present `spiffe://<td>/legate/ca`.
    pub fn new(
        addr: &str,
        td: &TrustDomain,
        creds: &CredentialsHandle,
        bootstrap: Option<Arc<Bundle>>,
        timeout: Duration,
    ) -> Self {
        let config = tls::ca_client_config(
            creds,
            bootstrap,
            PeerMatcher::Exact(crate::ca_server_id(td)),
        );
        // SNI carries the host name when it is one; verification does not
        // depend on it.
        let host = addr.rsplit_once(':').map(|(h, _)| h).unwrap_or(addr);
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let server_name =
            ServerName::try_from(host.to_owned()).unwrap_or_else(|_| tls::mesh_server_name());
        CaClient {
            addr: addr.to_owned(),
            connector: TlsConnector::from(config),
            server_name,
            timeout,
        }
    }

    pub fn address(&self) -> &str {
        &self.addr
    }

    /// Asks for a certificate. With `token`, authenticates with it; without,
    /// relies on the current certificate (renewal).
    pub async fn issue(
        &self,
        csr_pem: &str,
        token: Option<&Secret>,
    ) -> Result<IssueResponse, ClientError> {
        let body = serde_json::to_vec(&IssueRequest {
            csr: csr_pem.to_owned(),
        })
        .map_err(|e| ClientError::Protocol(e.to_string()))?;
        let mut req = Request::builder()
            .method(Method::POST)
            .uri(api::PATH_ISSUE)
            .header(HOST, &self.addr)
            .header(CONTENT_TYPE, "application/json");
        if let Some(t) = token {
            req = req.header(AUTHORIZATION, format!("Bearer {}", t.expose().trim()));
        }
        let req = req.body(Full::new(Bytes::from(body))).map_err(|e| {
            ClientError::Http(format!(
                "cannot build the request (is the token printable ASCII?): {e}"
            ))
        })?;
        let bytes = self.call(req).await?;
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Protocol(e.to_string()))
    }

    /// Fetches the trust bundle.
    pub async fn bundle(&self) -> Result<Bundle, ClientError> {
        let bytes = self.get(api::PATH_BUNDLE).await?;
        Bundle::from_pem(&bytes).map_err(|e| ClientError::Protocol(e.to_string()))
    }

    /// Checks that the CA answers.
    pub async fn health(&self) -> Result<(), ClientError> {
        self.get(api::PATH_HEALTH).await.map(|_| ())
    }

    /// GETs any API path; for diagnostics.
    pub async fn get(&self, path: &str) -> Result<Bytes, ClientError> {
        let req = Request::builder()
            .method(Method::GET)
            .uri(path)
            .header(HOST, &self.addr)
            .body(Full::new(Bytes::new()))
            .map_err(|e| ClientError::Http(e.to_string()))?;
        self.call(req).await
    }

    async fn call(&self, req: Request<Full<Bytes>>) -> Result<Bytes, ClientError> {
        let timeout = self.timeout;
        tokio::time::timeout(timeout, self.call_inner(req))
            .await
            .unwrap_or_else(|_| {
                Err(ClientError::Timeout {
                    addr: self.addr.clone(),
                    timeout,
                })
            })
    }

    async fn call_inner(&self, req: Request<Full<Bytes>>) -> Result<Bytes, ClientError> {
        let tcp = TcpStream::connect(&self.addr)
            .await
            .map_err(|source| ClientError::Connect {
                addr: self.addr.clone(),
                source,
            })?;
        let _ = tcp.set_nodelay(true);
        let tls = self
            .connector
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|source| ClientError::Tls {
                addr: self.addr.clone(),
                source,
            })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?;
        let driver = tokio::spawn(async move {
            let _ = conn.await;
        });
        let result = async {
            let resp = sender
                .send_request(req)
                .await
                .map_err(|e| ClientError::Http(e.to_string()))?;
            let status = resp.status();
            let body = Limited::new(resp.into_body(), MAX_RESPONSE)
                .collect()
                .await
                .map_err(|e| ClientError::Http(format!("reading the response: {e}")))?
                .to_bytes();
            if status.is_success() {
                Ok(body)
            } else {
                let body = serde_json::from_slice::<ApiError>(&body).unwrap_or_else(|_| ApiError {
                    error: "http_error".into(),
                    reason: String::from_utf8_lossy(&body[..body.len().min(512)]).into_owned(),
                });
                Err(ClientError::Refused { status, body })
            }
        }
        .await;
        driver.abort();
        result
    }
}
