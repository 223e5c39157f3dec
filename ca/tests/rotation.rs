//! Root rotation and operator-supplied roots.

mod common;

use std::time::{Duration, SystemTime};

use common::*;
use legate_ca::{store, tls, CaError, ClientAuth, CredentialsHandle, PeerMatcher};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// An mTLS handshake from `client` to `server` on loopback, with the tls
/// module's configs; returns the identities each side verified.
async fn handshake(client: &CredentialsHandle, server: &CredentialsHandle) -> (String, String) {
    let alpn = vec![b"legate/test".to_vec()];
    let server_id = server.load().unwrap().id().clone();
    let acceptor = TlsAcceptor::from(tls::server_config(
        server,
        ClientAuth::Required(PeerMatcher::TrustDomain(td())),
        alpn.clone(),
    ));
    let connector = TlsConnector::from(tls::client_config(
        client,
        PeerMatcher::Exact(server_id),
        alpn,
    ));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let srv = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut s = acceptor.accept(tcp).await.unwrap();
        let peer = tls::peer_id(s.get_ref().1).unwrap();
        assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"legate/test"[..]));
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).await.unwrap();
        s.write_all(b"pong").await.unwrap();
        s.shutdown().await.unwrap();
        peer.to_string()
    });
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut c = connector
        .connect(tls::mesh_server_name(), tcp)
        .await
        .unwrap();
    let peer = tls::peer_id(c.get_ref().1).unwrap().to_string();
    c.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    c.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"pong");
    (peer, srv.await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn during_rotation_old_and_new_chain_workloads_accept_each_other() {
    let cfg = config(Duration::from_secs(4));
    let dir = ca_dir(&cfg);
    let ca = start(dir.path(), &cfg).await;

    let old = manager(ca.addr, dir.path(), &id("old"));
    let old_creds = old.fetch().await.unwrap();
    assert_eq!(old_creds.bundle().certs().len(), 1);

    let report = store::rotate(dir.path(), &cfg, None).unwrap();
    assert!(report.contains("generation 2 now signs"), "{report}");

    // The CA notices the change on the next request: new issuance uses the
    // new chain and the bundle carries both roots.
    let new = manager(ca.addr, dir.path(), &id("new"));
    let new_creds = new.fetch().await.unwrap();
    assert_eq!(new_creds.bundle().certs().len(), 2);
    assert_ne!(
        old_creds.chain()[1],
        new_creds.chain()[1],
        "a new intermediate signs"
    );
    // The old workload learns the new root from the bundle endpoint.
    assert!(old.refresh_bundle().await.unwrap());
    assert_eq!(old.handle().load().unwrap().bundle().certs().len(), 2);

    // mTLS both ways across the two chains.
    let (a, b) = handshake(&old.handle(), &new.handle()).await;
    assert_eq!(
        (a.as_str(), b.as_str()),
        ("spiffe://test.local/new", "spiffe://test.local/old")
    );
    let (a, b) = handshake(&new.handle(), &old.handle()).await;
    assert_eq!(
        (a.as_str(), b.as_str()),
        ("spiffe://test.local/old", "spiffe://test.local/new")
    );

    // Without the new root, the old workload would refuse the new chain.
    assert!(tls::verify_svid(
        old_creds.bundle(),
        new_creds.chain(),
        &PeerMatcher::TrustDomain(td()),
        SystemTime::now()
    )
    .is_err());

    // The old root cannot be retired while its certificates may be valid...
    match store::retire(dir.path(), SystemTime::now()) {
        Err(CaError::Retire(reason)) => assert!(reason.contains("generation 1"), "{reason}"),
        other => panic!("retire should refuse, got {other:?}"),
    }
    // ...and can once they have all expired (lifetime plus the record's slack).
    let until = old_creds.not_after() + Duration::from_secs(1);
    tokio::time::sleep(
        until.duration_since(SystemTime::now()).unwrap_or_default() + Duration::from_millis(200),
    )
    .await;
    let report = store::retire(dir.path(), SystemTime::now()).unwrap();
    assert!(report.contains("1 root"), "{report}");

    // The CA switches its own certificate to the surviving chain; a workload
    // with the new bundle keeps talking to it.
    let after = new.fetch().await.unwrap();
    assert_eq!(after.bundle().certs().len(), 1);
    assert_eq!(after.chain()[1], new_creds.chain()[1]);
    new.client().health().await.unwrap();
    ca.stop().await;
}

/// Runs openssl, panicking with its output on failure.
fn openssl(args: &[&str]) {
    let (ok, text) = run("openssl", args);
    assert!(ok, "openssl {args:?}: {text}");
}

/// An external root and intermediate, as an operator's openssl would make
/// them. The root key is SEC1 (`EC PRIVATE KEY`), the intermediate's PKCS#8.
fn external_pki(d: &std::path::Path) {
    let p = |n: &str| d.join(n).to_str().unwrap().to_owned();
    write(d, "root.ext", "basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\nsubjectKeyIdentifier=hash\n");
    write(
        d,
        "inter.ext",
        "basicConstraints=critical,CA:TRUE,pathlen:0\nkeyUsage=critical,keyCertSign,cRLSign\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n",
    );
    openssl(&[
        "ecparam",
        "-name",
        "prime256v1",
        "-genkey",
        "-noout",
        "-out",
        &p("root.key"),
    ]);
    openssl(&[
        "req",
        "-x509",
        "-new",
        "-key",
        &p("root.key"),
        "-subj",
        "/O=Example/CN=Example Root",
        "-days",
        "30",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
        "-out",
        &p("root.crt"),
    ]);
    openssl(&[
        "genpkey",
        "-algorithm",
        "EC",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-out",
        &p("inter.key"),
    ]);
    openssl(&[
        "req",
        "-new",
        "-key",
        &p("inter.key"),
        "-subj",
        "/O=Example/CN=Example Intermediate",
        "-out",
        &p("inter.csr"),
    ]);
    openssl(&[
        "x509",
        "-req",
        "-in",
        &p("inter.csr"),
        "-CA",
        &p("root.crt"),
        "-CAkey",
        &p("root.key"),
        "-CAcreateserial",
        "-days",
        "20",
        "-extfile",
        &p("inter.ext"),
        "-out",
        &p("inter.crt"),
    ]);
    // A second, unrelated root, and a leaf-like (non-CA) certificate.
    openssl(&[
        "ecparam",
        "-name",
        "prime256v1",
        "-genkey",
        "-noout",
        "-out",
        &p("other.key"),
    ]);
    openssl(&[
        "req",
        "-x509",
        "-new",
        "-key",
        &p("other.key"),
        "-subj",
        "/CN=Other Root",
        "-days",
        "30",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-out",
        &p("other.crt"),
    ]);
    openssl(&[
        "req",
        "-x509",
        "-new",
        "-key",
        &p("other.key"),
        "-subj",
        "/CN=Not a CA",
        "-days",
        "30",
        "-addext",
        "basicConstraints=critical,CA:FALSE",
        "-out",
        &p("leaf.crt"),
    ]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_can_bring_their_own_root_and_intermediate() {
    let ext = tempfile::tempdir().unwrap();
    external_pki(ext.path());
    let f = |n: &str| ext.path().join(n);
    let cfg = config(Duration::from_secs(600));
    let import = |root: &str, root_key: Option<&str>, inter: Option<(&str, &str)>| store::Import {
        root_cert: f(root),
        root_key: root_key.map(f),
        intermediate_cert: inter.map(|i| f(i.0)),
        intermediate_key: inter.map(|i| f(i.1)),
    };
    let refuse = |imp: store::Import, expect: &str| {
        let d = tempfile::tempdir().unwrap();
        match store::init(d.path(), &td(), &cfg, Some(&imp), false) {
            Err(e) => assert!(
                e.to_string().contains(expect),
                "expected {expect:?} in: {e}"
            ),
            Ok(r) => panic!("accepted {imp:?}: {r}"),
        }
    };
    // Mismatched key, non-CA root, wrong root for the intermediate, an
    // intermediate passed as the root, a lone root without its key.
    refuse(
        import("root.crt", Some("other.key"), None),
        "does not belong",
    );
    refuse(
        import("leaf.crt", Some("other.key"), None),
        "not a CA certificate",
    );
    refuse(
        import("other.crt", None, Some(("inter.crt", "inter.key"))),
        "issued by",
    );
    refuse(
        import("inter.crt", Some("inter.key"), None),
        "not self-signed",
    );
    refuse(import("root.crt", None, None), "--root-key");
    refuse(
        import("root.crt", None, Some(("inter.crt", "root.key"))),
        "does not belong",
    );

    // Root and intermediate brought, the root key kept offline.
    let dir = tempfile::tempdir().unwrap();
    let report = store::init(
        dir.path(),
        &td(),
        &cfg,
        Some(&import("root.crt", None, Some(("inter.crt", "inter.key")))),
        false,
    )
    .unwrap();
    assert!(report.contains("stays with you"), "{report}");
    assert!(!dir.path().join("gen-1/root.key").exists());
    let ca = start(dir.path(), &cfg).await;
    let m = manager(ca.addr, dir.path(), &id("web"));
    let creds = m.fetch().await.unwrap();
    let out = tempfile::tempdir().unwrap();
    let leaf = write(out.path(), "leaf.pem", &pem(&creds.chain()[..1]));
    let (ok, text) = run(
        "openssl",
        &[
            "verify",
            "-CAfile",
            path_str(&f("root.crt")),
            "-untrusted",
            path_str(&f("inter.crt")),
            path_str(&leaf),
        ],
    );
    assert!(ok, "{text}");
    ca.stop().await;

    // Root and its (SEC1) key brought: legate makes the intermediate.
    let dir2 = tempfile::tempdir().unwrap();
    store::init(
        dir2.path(),
        &td(),
        &cfg,
        Some(&import("root.crt", Some("root.key"), None)),
        false,
    )
    .unwrap();
    // Existing keys are never replaced without --force.
    match store::init(dir2.path(), &td(), &cfg, None, false) {
        Err(CaError::Exists(p)) => assert!(p.ends_with("state.json")),
        other => panic!("expected Exists, got {other:?}"),
    }
    let before = std::fs::read(dir2.path().join("gen-1/intermediate.key")).unwrap();
    store::init(dir2.path(), &td(), &cfg, None, true).unwrap();
    assert_ne!(
        before,
        std::fs::read(dir2.path().join("gen-1/intermediate.key")).unwrap()
    );
}

fn pem(certs: &[rustls::pki_types::CertificateDer<'_>]) -> String {
    use base64::Engine;
    certs
        .iter()
        .map(|c| {
            let b64 = base64::engine::general_purpose::STANDARD.encode(c);
            let body: Vec<&str> = b64
                .as_bytes()
                .chunks(64)
                .map(|l| std::str::from_utf8(l).unwrap())
                .collect();
            format!(
                "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
                body.join("\n")
            )
        })
        .collect()
}
