//! The CA API end to end over loopback: what it issues (checked with the
//! real openssl), what it refuses and how it says so, slow clients, and
//! restarts.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use common::*;
use legate_ca::client::{CaClient, ClientError};
use legate_ca::token::TokenKey;
use legate_ca::{inspect, tls, Bundle, CredentialsHandle, PeerMatcher};
use legate_config::Secret;
use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn csr(sans: Vec<SanType>) -> String {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.subject_alt_names = sans;
    p.serialize_request(&key).unwrap().pem().unwrap()
}

fn uri(s: &str) -> SanType {
    SanType::URI(s.try_into().unwrap())
}

fn mode(p: &std::path::Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

/// A client that verifies the CA but has no certificate of its own.
fn bootstrap_client(ca: std::net::SocketAddr, dir: &std::path::Path) -> CaClient {
    let bundle = Bundle::from_pem(&std::fs::read(dir.join("bundle.pem")).unwrap()).unwrap();
    CaClient::new(
        &ca.to_string(),
        &td(),
        &CredentialsHandle::new(),
        Some(Arc::new(bundle)),
        Duration::from_secs(3),
    )
}

fn refused(r: Result<impl std::fmt::Debug, ClientError>) -> (u16, String, String) {
    match r {
        Err(ClientError::Refused { status, body }) => {
            assert!(!body.reason.is_empty());
            (status.as_u16(), body.error, body.reason)
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issued_certificate_verifies_with_openssl_and_carries_only_the_spiffe_id() {
    let cfg = config(Duration::from_secs(3600));
    let dir = ca_dir(&cfg);
    for key in ["gen-1/root.key", "gen-1/intermediate.key", "token.key"] {
        assert_eq!(mode(&dir.path().join(key)), 0o600, "{key}");
    }
    let ca = start(dir.path(), &cfg).await;
    let out = tempfile::tempdir().unwrap();
    let web = id("web");
    let mut opts = options(ca.addr, dir.path(), &web);
    opts.cert_dir = Some(out.path().to_owned());
    let m = legate_ca::IdentityManager::new(opts).unwrap();
    let creds = m.fetch().await.unwrap();
    assert_eq!(creds.id(), &web);
    assert_eq!(creds.chain().len(), 2, "leaf and intermediate");
    assert_eq!(mode(&out.path().join("key.pem")), 0o600);

    let leaf = write(out.path(), "leaf.pem", &legate_ca_pem(&creds.chain()[..1]));
    let inter = write(out.path(), "inter.pem", &legate_ca_pem(&creds.chain()[1..]));
    let bundle = dir.path().join("bundle.pem");
    let (ok, text) = run(
        "openssl",
        &[
            "verify",
            "-CAfile",
            path_str(&bundle),
            "-untrusted",
            path_str(&inter),
            path_str(&leaf),
        ],
    );
    assert!(ok, "openssl verify: {text}");
    let (ok, text) = run(
        "openssl",
        &["x509", "-noout", "-text", "-in", path_str(&leaf)],
    );
    assert!(ok, "{text}");
    assert!(text.contains("URI:spiffe://test.local/web"), "{text}");
    let san_line = text
        .lines()
        .skip_while(|l| !l.contains("Subject Alternative Name"))
        .nth(1)
        .unwrap()
        .trim();
    assert_eq!(
        san_line, "URI:spiffe://test.local/web",
        "only the SPIFFE ID: {text}"
    );
    assert!(text.contains("CA:FALSE"), "{text}");
    assert!(text.contains("Digital Signature"), "{text}");
    assert!(!text.contains("Certificate Sign"), "{text}");
    assert!(
        text.contains("TLS Web Server Authentication, TLS Web Client Authentication"),
        "{text}"
    );
    assert!(
        text.contains("prime256v1") || text.contains("P-256"),
        "{text}"
    );

    // The chain file written for the workload verifies too, and inspect
    // reads it.
    let report = inspect::inspect_file(&out.path().join("cert.pem")).unwrap();
    assert!(
        report.contains("identity:    spiffe://test.local/web"),
        "{report}"
    );
    assert!(report.contains("left"), "{report}");
    assert!(report.contains("[0] is signed by [1]"), "{report}");

    // Lifetime: notAfter - now is the configured TTL (give or take a second).
    let left = creds.remaining(SystemTime::now());
    assert!(
        left > Duration::from_secs(3590) && left <= Duration::from_secs(3601),
        "{left:?}"
    );
    ca.stop().await;
}

fn legate_ca_pem(certs: &[rustls::pki_types::CertificateDer<'_>]) -> String {
    use base64::Engine;
    certs
        .iter()
        .map(|c| {
            let b64 = base64::engine::general_purpose::STANDARD.encode(c);
            let lines: Vec<&str> = b64
                .as_bytes()
                .chunks(64)
                .map(|l| std::str::from_utf8(l).unwrap())
                .collect();
            format!(
                "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
                lines.join("\n")
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rejection_is_clear_and_the_ca_keeps_serving() {
    let cfg = config(Duration::from_secs(3600));
    let dir = ca_dir(&cfg);
    let ca = start(dir.path(), &cfg).await;
    let client = bootstrap_client(ca.addr, dir.path());
    let a = id("a");
    let good_csr = csr(vec![uri(a.as_str())]);
    let key = TokenKey::from_bytes(&std::fs::read(dir.path().join("token.key")).unwrap()).unwrap();

    // Expired token.
    let expired = Secret::new(key.mint(
        &a,
        Duration::from_secs(60),
        SystemTime::now() - Duration::from_secs(3600),
    ));
    let (status, code, reason) = refused(client.issue(&good_csr, Some(&expired)).await);
    assert_eq!((status, code.as_str()), (401, "token_expired"), "{reason}");
    assert!(reason.contains("legate ca token"), "{reason}");

    // Forged token: right shape, wrong key.
    let forger = TokenKey::from_bytes(&TokenKey::generate_bytes()).unwrap();
    let forged = Secret::new(forger.mint(&a, Duration::from_secs(60), SystemTime::now()));
    let (status, code, _) = refused(client.issue(&good_csr, Some(&forged)).await);
    assert_eq!((status, code.as_str()), (401, "token_invalid"));

    // Garbage in the Authorization header.
    let (status, code, _) = refused(client.issue(&good_csr, Some(&Secret::new("hello"))).await);
    assert_eq!((status, code.as_str()), (401, "token_malformed"));

    // No credentials at all.
    let (status, code, _) = refused(client.issue(&good_csr, None).await);
    assert_eq!((status, code.as_str()), (401, "unauthenticated"));

    // A token for the CA's own identity, minted with the key directly
    // (`legate ca token` refuses it): the API refuses to issue it.
    let ca_id = legate_ca::ca_server_id(&td());
    let for_ca = Secret::new(key.mint(&ca_id, Duration::from_secs(60), SystemTime::now()));
    let (status, code, reason) = refused(
        client
            .issue(&csr(vec![uri(ca_id.as_str())]), Some(&for_ca))
            .await,
    );
    assert_eq!(
        (status, code.as_str()),
        (403, "reserved_identity"),
        "{reason}"
    );
    assert!(reason.contains("CA's own identity"), "{reason}");

    // A token for A with a CSR for B.
    let token_a = token(dir.path(), &a);
    let (status, code, reason) = refused(
        client
            .issue(&csr(vec![uri(id("b").as_str())]), Some(&token_a))
            .await,
    );
    assert_eq!(
        (status, code.as_str()),
        (403, "identity_mismatch"),
        "{reason}"
    );
    assert!(
        reason.contains("spiffe://test.local/b") && reason.contains("spiffe://test.local/a"),
        "{reason}"
    );

    // Anything beyond the SPIFFE ID.
    let dns = SanType::DnsName("a.example".try_into().unwrap());
    let (status, code, _) = refused(
        client
            .issue(&csr(vec![uri(a.as_str()), dns]), Some(&token_a))
            .await,
    );
    assert_eq!((status, code.as_str()), (403, "extra_name"));
    let (_, code, _) = refused(
        client
            .issue(
                &csr(vec![uri(a.as_str()), uri(id("b").as_str())]),
                Some(&token_a),
            )
            .await,
    );
    assert_eq!(code, "extra_name");
    let ca_csr = {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.subject_alt_names = vec![uri(a.as_str())];
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.serialize_request(&key).unwrap().pem().unwrap()
    };
    let (_, code, _) = refused(client.issue(&ca_csr, Some(&token_a)).await);
    assert_eq!(code, "ca_requested");

    // Malformed CSRs.
    let (status, code, _) = refused(client.issue("not a csr", Some(&token_a)).await);
    assert_eq!((status, code.as_str()), (400, "malformed_csr"));
    let garbage = "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n";
    let (_, code, _) = refused(client.issue(garbage, Some(&token_a)).await);
    assert_eq!(code, "malformed_csr");

    // A weak (RSA) key, from openssl; and an openssl P-256 CSR that is fine.
    let tmp = tempfile::tempdir().unwrap();
    let rsa = tmp.path().join("rsa.csr");
    let (ok, text) = run(
        "openssl",
        &[
            "req",
            "-new",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            path_str(&tmp.path().join("rsa.key")),
            "-subj",
            "/CN=a",
            "-addext",
            "subjectAltName=URI:spiffe://test.local/a",
            "-out",
            path_str(&rsa),
        ],
    );
    assert!(ok, "{text}");
    let (status, code, reason) = refused(
        client
            .issue(&std::fs::read_to_string(&rsa).unwrap(), Some(&token_a))
            .await,
    );
    assert_eq!((status, code.as_str()), (400, "weak_key"), "{reason}");
    let ec = tmp.path().join("ec.csr");
    let (ok, text) = run(
        "openssl",
        &[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            path_str(&tmp.path().join("ec.key")),
            "-subj",
            "/CN=whatever",
            "-addext",
            "subjectAltName=URI:spiffe://test.local/a",
            "-out",
            path_str(&ec),
        ],
    );
    assert!(ok, "{text}");
    let issued = client
        .issue(&std::fs::read_to_string(&ec).unwrap(), Some(&token_a))
        .await
        .unwrap();
    assert_eq!(issued.spiffe_id, "spiffe://test.local/a");

    // An oversized body.
    let huge = "x".repeat(cfg.max_body.as_usize() + 1);
    let (status, code, reason) = refused(client.issue(&huge, Some(&token_a)).await);
    assert_eq!((status, code.as_str()), (413, "body_too_large"), "{reason}");

    // Renewal of another identity: a client holding A's certificate asks for B.
    let holder = manager(ca.addr, dir.path(), &a);
    holder.fetch().await.unwrap();
    let (status, code, _) = refused(
        holder
            .client()
            .issue(&csr(vec![uri(id("b").as_str())]), None)
            .await,
    );
    assert_eq!((status, code.as_str()), (403, "identity_mismatch"));
    // ...while renewing its own identity works without a token.
    holder
        .client()
        .issue(&csr(vec![uri(a.as_str())]), None)
        .await
        .unwrap();

    // Unknown paths and methods are JSON errors too.
    let (status, code, _) = refused(client.get("/nope").await);
    assert_eq!((status, code.as_str()), (404, "not_found"));

    // After all that, the CA still serves everyone.
    client.health().await.unwrap();
    let ok = client.issue(&good_csr, Some(&token_a)).await.unwrap();
    assert_eq!(ok.spiffe_id, a.as_str());
    ca.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_sending_one_byte_per_second_is_cut_off_while_others_are_served() {
    let cfg = config(Duration::from_secs(3600));
    let dir = ca_dir(&cfg);
    let ca = start(dir.path(), &cfg).await;

    // A workload certificate, to open TLS connections the CA accepts.
    let m = manager(ca.addr, dir.path(), &id("slow"));
    let creds = m.handle();
    m.fetch().await.unwrap();
    let client_config = tls::client_config(
        &creds,
        PeerMatcher::Exact(legate_ca::ca_server_id(&td())),
        vec![],
    );

    // Slow client 1: finishes TLS, then sends its request one byte a second.
    let connector = tokio_rustls::TlsConnector::from(client_config);
    let tcp = TcpStream::connect(ca.addr).await.unwrap();
    let mut slow_tls = connector
        .connect(tls::mesh_server_name(), tcp)
        .await
        .unwrap();
    let slow1 = tokio::spawn(async move {
        let started = Instant::now();
        for b in b"POST /v1/certificate HTTP/1.1\r\nHost: ca\r\n".iter() {
            if slow_tls.write_all(&[*b]).await.is_err() || slow_tls.flush().await.is_err() {
                break;
            }
            // Stop once the server has hung up.
            let mut buf = [0u8; 256];
            match tokio::time::timeout(Duration::from_secs(1), slow_tls.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(_)) => {}
                Err(_) => {}
            }
            if started.elapsed() > Duration::from_secs(20) {
                break;
            }
        }
        started.elapsed()
    });

    // Slow client 2: never finishes the TLS handshake.
    let slow2 = tokio::spawn(async move {
        let started = Instant::now();
        let mut tcp = TcpStream::connect(ca.addr).await.unwrap();
        for b in [
            0x16u8, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
        ]
        .iter()
        .cycle()
        .take(20)
        {
            if tcp.write_all(&[*b]).await.is_err() {
                break;
            }
            let mut buf = [0u8; 64];
            match tokio::time::timeout(Duration::from_secs(1), tcp.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                _ => {}
            }
        }
        started.elapsed()
    });

    // Slow client 3: one complete request, then an idle keep-alive
    // connection that never sends the next one.
    let idle_connector = connector.clone();
    let idle = tokio::spawn(async move {
        let tcp = TcpStream::connect(ca.addr).await.unwrap();
        let mut s = idle_connector
            .connect(tls::mesh_server_name(), tcp)
            .await
            .unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: ca\r\n\r\n")
            .await
            .unwrap();
        let mut buf = vec![0u8; 4096];
        let n = s.read(&mut buf).await.unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
        let started = Instant::now();
        loop {
            match tokio::time::timeout(Duration::from_secs(20), s.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
                Ok(Ok(_)) => {}
            }
        }
        started.elapsed()
    });

    // Meanwhile, normal clients are served promptly.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let normal = bootstrap_client(ca.addr, dir.path());
    let t = Instant::now();
    normal.health().await.unwrap();
    let token = token(dir.path(), &id("normal"));
    normal
        .issue(&csr(vec![uri(id("normal").as_str())]), Some(&token))
        .await
        .unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "normal request took {:?}",
        t.elapsed()
    );

    // Both slow clients are cut off at the 2 s deadline, not after 20 s.
    let (e1, e2) = (slow1.await.unwrap(), slow2.await.unwrap());
    assert!(e1 < Duration::from_secs(5), "slow request lasted {e1:?}");
    assert!(e2 < Duration::from_secs(5), "slow handshake lasted {e2:?}");
    let e3 = idle.await.unwrap();
    assert!(e3 < Duration::from_secs(5), "idle keep-alive lasted {e3:?}");
    normal.health().await.unwrap();
    ca.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restart_the_same_root_signs_and_old_certificates_verify() {
    let cfg = config(Duration::from_secs(3600));
    let dir = ca_dir(&cfg);
    let ca = start(dir.path(), &cfg).await;
    let addr = ca.addr;
    let m = manager(addr, dir.path(), &id("web"));
    let before = m.fetch().await.unwrap();
    let bundle_before = m.client().bundle().await.unwrap();
    ca.stop().await;

    let mut cfg2 = cfg.clone();
    cfg2.listen = addr;
    let ca = start(dir.path(), &cfg2).await;
    let bundle_after = m.client().bundle().await.unwrap();
    assert_eq!(bundle_before, bundle_after, "same root after restart");
    let id_before = tls::verify_svid(
        &bundle_after,
        before.chain(),
        &PeerMatcher::Exact(id("web")),
        SystemTime::now(),
    )
    .unwrap();
    assert_eq!(id_before, id("web"));
    // Renewal over mTLS with the pre-restart certificate works.
    let mut opts = options(addr, dir.path(), &id("web"));
    opts.token = legate_ca::manager::TokenSource::None;
    let renewer = legate_ca::IdentityManager::new(opts).unwrap();
    renewer
        .handle()
        .store(before.with_bundle(Arc::new(bundle_after)));
    let after = renewer.fetch().await.unwrap();
    assert_ne!(after.chain()[0], before.chain()[0]);
    assert_eq!(after.chain()[1], before.chain()[1], "same intermediate");
    ca.stop().await;
}
