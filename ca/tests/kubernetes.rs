//! Kubernetes ServiceAccount tokens end to end: a CA on loopback checks
//! them with a fake Kubernetes API (HTTPS on 127.0.0.1, with its own
//! cluster CA) that answers TokenReviews the way the real one does, keyed
//! by the token it is asked about.

mod common;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use bytes::Bytes;
use common::*;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use legate_ca::client::{CaClient, ClientError};
use legate_ca::kubernetes::REVIEW_PATH;
use legate_ca::manager::ManagerOptions;
use legate_ca::{Bundle, CredentialsHandle, IdentityManager};
use legate_config::{CaConfig, IdentityConfig, Secret};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

/// A JWT-shaped token; the fake API knows it by its claims.
fn jwt(claims: &str) -> String {
    format!(
        "{}.{}.c2lnbmF0dXJl",
        URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256","kid":"test"}"#),
        URL_SAFE_NO_PAD.encode(claims)
    )
}

fn web_token() -> String {
    jwt(r#"{"sub":"system:serviceaccount:shop:web","n":1}"#)
}

fn web_token_rotated() -> String {
    jwt(r#"{"sub":"system:serviceaccount:shop:web","n":2}"#)
}

fn revoked_token() -> String {
    jwt(r#"{"sub":"system:serviceaccount:shop:web","n":3}"#)
}

fn other_audience_token() -> String {
    jwt(r#"{"sub":"system:serviceaccount:shop:web","aud":"other"}"#)
}

const REJECTION: &str = "[invalid bearer token, service account token has been invalidated]";
/// The CA's own ServiceAccount token, as the fake API expects it.
const CA_TOKEN: &str = "ca-sa-token-1";

/// A TokenReview answer shaped like the API reference's examples.
fn authenticated(token: &str, audiences: &[&str]) -> Value {
    json!({
        "kind": "TokenReview",
        "apiVersion": "authentication.k8s.io/v1",
        "metadata": {"creationTimestamp": null},
        "spec": {"token": token, "audiences": ["legate"]},
        "status": {
            "authenticated": true,
            "user": {
                "username": "system:serviceaccount:shop:web",
                "uid": "4e4a4a2f-1b0c-4c55-9f55-1c2a8f4e5d6a",
                "groups": ["system:serviceaccounts", "system:serviceaccounts:shop", "system:authenticated"],
                "extra": {
                    "authentication.kubernetes.io/pod-name": ["web-7d4b9c5f6-x2x9q"],
                    "authentication.kubernetes.io/pod-uid": ["a0b1c2d3-e4f5-4a6b-8c7d-9e0f1a2b3c4d"]
                }
            },
            "audiences": audiences
        }
    })
}

fn unauthenticated(token: &str) -> Value {
    // The API leaves `authenticated: false` out, as Go omits empty values.
    json!({
        "kind": "TokenReview",
        "apiVersion": "authentication.k8s.io/v1",
        "metadata": {"creationTimestamp": null},
        "spec": {"token": token, "audiences": ["legate"]},
        "status": {"user": {}, "error": REJECTION}
    })
}

/// One request the fake API received.
#[derive(Debug, Clone)]
struct Seen {
    path: String,
    authorization: String,
    body: Value,
}

struct FakeApi {
    addr: SocketAddr,
    /// The fake cluster CA, for `ca.kubernetes_ca_file`.
    ca_file: PathBuf,
    seen: Arc<Mutex<Vec<Seen>>>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl FakeApi {
    async fn start() -> FakeApi {
        let dir = tempfile::tempdir().unwrap();
        // A cluster CA and an API server certificate for 127.0.0.1, as
        // kubeadm makes them (IP SAN for the Service address).
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["kubernetes.default.svc".into()]).unwrap();
        params
            .subject_alt_names
            .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        let cert = params.signed_by(&key, &issuer).unwrap();
        let ca_file = dir.path().join("ca.crt");
        std::fs::write(&ca_file, ca_cert.pem()).unwrap();

        let server = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
        let acceptor = TlsAcceptor::from(Arc::new(server));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (stop, mut stopped) = oneshot::channel::<()>();
        let record = seen.clone();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    _ = &mut stopped => break,
                    Ok((tcp, _)) = listener.accept() => {
                        let acceptor = acceptor.clone();
                        let record = record.clone();
                        conns.spawn(async move {
                            let Ok(tls) = acceptor.accept(tcp).await else { return };
                            let svc = service_fn(move |req| answer(req, record.clone()));
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(TokioIo::new(tls), svc)
                                .await;
                        });
                    }
                }
            }
            // Dropping the listener and every connection: the API is down.
            conns.shutdown().await;
        });
        FakeApi {
            addr,
            ca_file,
            seen,
            stop: Some(stop),
            task,
            _dir: dir,
        }
    }

    fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Stops serving; the cluster CA file stays.
    async fn stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let _ = (&mut self.task).await;
    }
}

async fn answer(
    req: Request<Incoming>,
    seen: Arc<Mutex<Vec<Seen>>>,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    let path = req.uri().path().to_owned();
    let authorization = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    seen.lock().unwrap().push(Seen {
        path: path.clone(),
        authorization: authorization.clone(),
        body: body.clone(),
    });
    let reply = |status: StatusCode, v: Value| {
        let mut r = Response::new(Full::new(Bytes::from(v.to_string())));
        *r.status_mut() = status;
        r.headers_mut()
            .insert("content-type", "application/json".parse().unwrap());
        Ok(r)
    };
    if authorization != format!("Bearer {CA_TOKEN}") {
        return reply(
            StatusCode::UNAUTHORIZED,
            json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                   "message": "Unauthorized", "reason": "Unauthorized", "code": 401}),
        );
    }
    let token = body["spec"]["token"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let known: HashMap<String, Value> = [
        (web_token(), authenticated(&token, &["legate"])),
        (web_token_rotated(), authenticated(&token, &["legate"])),
        (other_audience_token(), authenticated(&token, &["other"])),
    ]
    .into_iter()
    .collect();
    let review = known
        .get(&token)
        .cloned()
        .unwrap_or_else(|| unauthenticated(&token));
    reply(StatusCode::CREATED, review)
}

/// A CA that reviews tokens with `api`, using `ca_token` as its own token.
fn k8s_config(api: &str, ca_file: &Path, ca_token: &Path, cert_ttl: Duration) -> CaConfig {
    CaConfig {
        kubernetes_api: Some(api.to_owned()),
        kubernetes_ca_file: ca_file.to_owned(),
        kubernetes_token_file: ca_token.to_owned(),
        ..config(cert_ttl)
    }
}

fn bootstrap_client(ca: SocketAddr, dir: &Path) -> CaClient {
    let bundle = Bundle::from_pem(&std::fs::read(dir.join("bundle.pem")).unwrap()).unwrap();
    CaClient::new(
        &ca.to_string(),
        &td(),
        &CredentialsHandle::new(),
        Some(Arc::new(bundle)),
        Duration::from_secs(3),
    )
}

fn csr_for(id: &str) -> String {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.subject_alt_names = vec![SanType::URI(id.try_into().unwrap())];
    p.serialize_request(&key).unwrap().pem().unwrap()
}

fn refused(r: Result<impl std::fmt::Debug, ClientError>) -> (u16, String, String) {
    match r {
        Err(ClientError::Refused { status, body }) => (status.as_u16(), body.error, body.reason),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// The only URI SAN of the first certificate in a PEM chain.
fn leaf_uri(chain_pem: &str) -> String {
    let der = rustls_pki_types::pem::PemObject::pem_slice_iter(chain_pem.as_bytes())
        .next()
        .map(|c: Result<rustls::pki_types::CertificateDer<'static>, _>| c.unwrap())
        .unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    let san = cert.subject_alternative_name().unwrap().unwrap();
    let uris: Vec<String> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(u) => Some(u.to_string()),
            _ => None,
        })
        .collect();
    assert_eq!(uris.len(), 1, "{uris:?}");
    uris[0].clone()
}

struct Setup {
    api: FakeApi,
    dir: tempfile::TempDir,
    ca_token: PathBuf,
    ca: RunningCa,
    _files: tempfile::TempDir,
}

async fn setup(cert_ttl: Duration) -> Setup {
    let api = FakeApi::start().await;
    let files = tempfile::tempdir().unwrap();
    let ca_token = files.path().join("ca-token");
    std::fs::write(&ca_token, format!("{CA_TOKEN}\n")).unwrap();
    let cfg = k8s_config(&api.url(), &api.ca_file, &ca_token, cert_ttl);
    let dir = ca_dir(&cfg);
    let ca = start(dir.path(), &cfg).await;
    Setup {
        api,
        dir,
        ca_token,
        ca,
        _files: files,
    }
}

const WEB: &str = "spiffe://test.local/ns/shop/sa/web";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_account_token_yields_its_spiffe_id() {
    let s = setup(Duration::from_secs(3600)).await;
    let client = bootstrap_client(s.ca.addr, s.dir.path());
    let resp = client
        .issue(&csr_for(WEB), Some(&Secret::new(web_token())))
        .await
        .unwrap();
    assert_eq!(resp.spiffe_id, WEB);
    assert_eq!(leaf_uri(&resp.certificate_chain), WEB);

    // The CA sent a proper TokenReview, with the audience, authenticated
    // with its own token.
    let seen = s.api.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].path, REVIEW_PATH);
    assert_eq!(seen[0].authorization, format!("Bearer {CA_TOKEN}"));
    assert_eq!(
        seen[0].body,
        json!({
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": web_token(), "audiences": ["legate"]}
        })
    );

    // Bootstrap tokens still work beside it and never reach the API.
    let boot = token(s.dir.path(), &WEB.parse().unwrap());
    let resp = client.issue(&csr_for(WEB), Some(&boot)).await.unwrap();
    assert_eq!(resp.spiffe_id, WEB);
    assert_eq!(s.api.seen().len(), 1, "a bootstrap token went to the API");

    s.ca.stop().await;
    let mut api = s.api;
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_and_wrong_audience_tokens_are_refused_clearly() {
    let s = setup(Duration::from_secs(3600)).await;
    let client = bootstrap_client(s.ca.addr, s.dir.path());

    let (status, code, reason) = refused(
        client
            .issue(&csr_for(WEB), Some(&Secret::new(revoked_token())))
            .await,
    );
    assert_eq!((status, code.as_str()), (401, "token_rejected"), "{reason}");
    assert_eq!(
        reason,
        format!("the ServiceAccount token was rejected by the Kubernetes API: {REJECTION}")
    );

    let (status, code, reason) = refused(
        client
            .issue(&csr_for(WEB), Some(&Secret::new(other_audience_token())))
            .await,
    );
    assert_eq!(
        (status, code.as_str()),
        (401, "token_wrong_audience"),
        "{reason}"
    );
    assert!(
        reason.contains("\"other\"") && reason.contains("audience: legate"),
        "{reason}"
    );
    assert_eq!(s.api.seen().len(), 2);

    s.ca.stop().await;
    let mut api = s.api;
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_for_one_service_account_cannot_get_another_identity() {
    let s = setup(Duration::from_secs(3600)).await;
    let client = bootstrap_client(s.ca.addr, s.dir.path());
    for other in [
        "spiffe://test.local/ns/shop/sa/admin",
        "spiffe://test.local/ns/kube-system/sa/web",
        "spiffe://test.local/web",
    ] {
        let (status, code, reason) = refused(
            client
                .issue(&csr_for(other), Some(&Secret::new(web_token())))
                .await,
        );
        assert_eq!(
            (status, code.as_str()),
            (403, "identity_mismatch"),
            "{other}: {reason}"
        );
        assert!(reason.contains(WEB), "{reason}");
    }
    s.ca.stop().await;
    let mut api = s.api;
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_trouble_is_a_retryable_503_that_names_the_api() {
    let s = setup(Duration::from_secs(3600)).await;
    let client = bootstrap_client(s.ca.addr, s.dir.path());
    let token = Secret::new(web_token());

    // The CA's own token is re-read for every review: a revoked one is
    // refused by the API, and the CA says it is its own problem.
    std::fs::write(&s.ca_token, "revoked").unwrap();
    let (status, code, reason) = refused(client.issue(&csr_for(WEB), Some(&token)).await);
    assert_eq!(
        (status, code.as_str()),
        (503, "kubernetes_refused_ca"),
        "{reason}"
    );
    assert!(reason.contains("tokenreviews"), "{reason}");
    std::fs::write(&s.ca_token, CA_TOKEN).unwrap();
    client.issue(&csr_for(WEB), Some(&token)).await.unwrap();
    let auth: Vec<String> = s.api.seen().into_iter().map(|x| x.authorization).collect();
    assert_eq!(
        auth,
        ["Bearer revoked".to_owned(), format!("Bearer {CA_TOKEN}")]
    );

    // The API goes away: connection refused.
    let url = s.api.url();
    let mut api = s.api;
    api.stop().await;
    let (status, code, reason) = refused(client.issue(&csr_for(WEB), Some(&token)).await);
    assert_eq!(
        (status, code.as_str()),
        (503, "kubernetes_unavailable"),
        "{reason}"
    );
    assert!(reason.contains(&url), "{reason}");
    assert!(reason.contains("retry later"), "{reason}");

    // The CA itself keeps serving.
    client.health().await.unwrap();
    s.ca.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jwt_without_a_configured_api_is_refused_with_the_reason() {
    let cfg = config(Duration::from_secs(3600));
    let dir = ca_dir(&cfg);
    // Explicitly not in a cluster, whatever the test's environment.
    let ca = start(dir.path(), &cfg).await;
    let client = bootstrap_client(ca.addr, dir.path());
    let r = client
        .issue(&csr_for(WEB), Some(&Secret::new(web_token())))
        .await;
    if std::env::var_os("KUBERNETES_SERVICE_HOST").is_none() {
        let (status, code, reason) = refused(r);
        assert_eq!((status, code.as_str()), (401, "kubernetes_disabled"));
        assert!(reason.contains("ca.kubernetes_api"), "{reason}");
    }
    ca.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_identity_manager_gets_its_service_account_identity_and_rereads_the_token() {
    // Short certificates, so the second fetch finds the first expired and
    // has to use the token again.
    let s = setup(Duration::from_secs(2)).await;
    let pod = tempfile::tempdir().unwrap();
    let token_file = pod.path().join("token");
    std::fs::write(&token_file, web_token()).unwrap();
    let identity = IdentityConfig {
        trust_domain: td(),
        namespace: Some("shop".into()),
        service_account: Some("web".into()),
        token_file: Some(token_file.clone()),
        ca_address: Some(s.ca.addr.to_string()),
        ca_bundle: Some(s.dir.path().join("bundle.pem")),
        ..IdentityConfig::default()
    };
    let opts = ManagerOptions {
        request_timeout: Duration::from_secs(3),
        ..ManagerOptions::from_config(&identity).unwrap()
    };
    let m = IdentityManager::new(opts).unwrap();
    let creds = m.fetch().await.unwrap();
    assert_eq!(creds.id().as_str(), WEB);
    let tokens = |api: &FakeApi| -> Vec<String> {
        api.seen()
            .into_iter()
            .map(|x| {
                x.body["spec"]["token"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned()
            })
            .collect()
    };
    assert_eq!(tokens(&s.api), [web_token()]);

    // The kubelet rotates the projected token.
    std::fs::write(&token_file, web_token_rotated()).unwrap();
    // While the certificate is valid, renewal is over mTLS: no review.
    let renewed = m.fetch().await.unwrap();
    assert_eq!(renewed.id().as_str(), WEB);
    assert_eq!(tokens(&s.api), [web_token()]);

    // Once it has expired, the manager falls back to the token, read anew.
    tokio::time::sleep(
        creds
            .remaining(std::time::SystemTime::now())
            .max(renewed.remaining(std::time::SystemTime::now()))
            + Duration::from_millis(100),
    )
    .await;
    let again = m.fetch().await.unwrap();
    assert_eq!(again.id().as_str(), WEB);
    assert_eq!(tokens(&s.api), [web_token(), web_token_rotated()]);

    s.ca.stop().await;
    let mut api = s.api;
    api.stop().await;
}
