//! What the CA directory refuses: identities no workload may hold, and
//! material that would make issued certificates useless.

mod common;

use std::time::{Duration, SystemTime};

use common::*;
use legate_ca::{store, CaError};

#[test]
fn no_token_is_minted_for_the_cas_own_identity() {
    let cfg = config(Duration::from_secs(60));
    let dir = ca_dir(&cfg);
    let err = store::mint_token(dir.path(), &id("legate/ca"), Duration::from_secs(60))
        .expect_err("a token for the CA's identity was minted");
    assert!(matches!(err, CaError::ReservedIdentity(_)), "{err}");
    assert!(err.to_string().contains("CA's own identity"), "{err}");
    // Other identities under legate/ are ordinary.
    store::mint_token(dir.path(), &id("legate/cab"), Duration::from_secs(60)).unwrap();
}

#[test]
fn the_authority_does_not_sign_the_cas_own_identity() {
    let cfg = config(Duration::from_secs(60));
    let dir = ca_dir(&cfg);
    let authority = store::Authority::load(dir.path()).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let err = authority
        .issue(&key, &id("legate/ca"), &cfg, SystemTime::now())
        .expect_err("signed the CA's identity");
    assert!(matches!(err, CaError::ReservedIdentity(_)), "{err}");
}

/// A CA with two generations, the first one retirable but for its record.
fn rotated_ca() -> tempfile::TempDir {
    let cfg = config(Duration::from_secs(60));
    let dir = ca_dir(&cfg);
    store::rotate(dir.path(), &cfg, None).unwrap();
    dir
}

#[test]
fn retire_refuses_an_unusable_issued_until_record() {
    let later = SystemTime::now() + Duration::from_secs(3600);
    let garbage = rotated_ca();
    std::fs::write(garbage.path().join("gen-1/issued-until"), "soon\n").unwrap();
    let directory = rotated_ca();
    std::fs::create_dir(directory.path().join("gen-1/issued-until")).unwrap();
    let dangling = rotated_ca();
    std::os::unix::fs::symlink(
        dangling.path().join("nowhere"),
        dangling.path().join("gen-1/issued-until"),
    )
    .unwrap();
    for dir in [&garbage, &directory, &dangling] {
        let err = store::retire(dir.path(), later).expect_err("retired without a record");
        let text = err.to_string();
        assert!(matches!(err, CaError::IssuedUntil { .. }), "{text}");
        assert!(text.contains("gen-1/issued-until"), "{text}");
        assert!(text.contains("Unix seconds"), "{text}");
        // Nothing changed: both roots stay in the bundle.
        let bundle = std::fs::read_to_string(dir.path().join("bundle.pem")).unwrap();
        assert_eq!(bundle.matches("BEGIN CERTIFICATE").count(), 2);
    }
    // A missing record means nothing was issued.
    let missing = rotated_ca();
    store::retire(missing.path(), later).unwrap();
}

/// Runs a shell script of openssl commands in `d`, panicking on failure.
fn sh(d: &std::path::Path, script: &str) {
    let (ok, text) = run(
        "sh",
        &["-c", &format!("set -e; cd '{}'; {script}", path_str(d))],
    );
    assert!(ok, "{script}: {text}");
}

/// `NAME.key` made by `openssl genpkey` with `alg` (such as
/// `-algorithm EC -pkeyopt ec_paramgen_curve:P-256`).
fn key(d: &std::path::Path, name: &str, alg: &str) {
    sh(d, &format!("openssl genpkey {alg} -out {name}.key"));
}

/// A self-signed root `NAME.crt` over `NAME.key`, with extra basicConstraints.
fn root(d: &std::path::Path, name: &str, bc: &str) {
    sh(
        d,
        &format!(
            "openssl req -x509 -new -key {name}.key -subj /CN={name} -days 30 \
             -addext basicConstraints=critical,CA:TRUE{bc} \
             -addext keyUsage=critical,keyCertSign,cRLSign -out {name}.crt"
        ),
    );
}

/// An intermediate `NAME.crt` over `NAME.key`, signed by `parent`.
fn intermediate(d: &std::path::Path, name: &str, parent: &str, bc: &str) {
    sh(
        d,
        &format!(
            "printf 'basicConstraints=critical,CA:TRUE{bc}\\nkeyUsage=critical,keyCertSign,cRLSign\\n' > {name}.ext; \
             openssl req -new -key {name}.key -subj /CN={name} -out {name}.csr; \
             openssl x509 -req -in {name}.csr -CA {parent}.crt -CAkey {parent}.key \
             -CAcreateserial -days 20 -extfile {name}.ext -out {name}.crt"
        ),
    );
}

const P256: &str = "-algorithm EC -pkeyopt ec_paramgen_curve:P-256";

fn init_with(
    d: &std::path::Path,
    root: &str,
    root_key: bool,
    inter: Option<&str>,
) -> Result<String, CaError> {
    let imp = store::Import {
        root_cert: d.join(format!("{root}.crt")),
        root_key: root_key.then(|| d.join(format!("{root}.key"))),
        intermediate_cert: inter.map(|i| d.join(format!("{i}.crt"))),
        intermediate_key: inter.map(|i| d.join(format!("{i}.key"))),
    };
    store::init(
        &d.join("ca"),
        &td(),
        &config(Duration::from_secs(60)),
        Some(&imp),
        false,
    )
}

#[test]
fn init_refuses_a_root_whose_pathlen_leaves_no_room_for_the_intermediate() {
    let d = tempfile::tempdir().unwrap();
    let d = d.path();
    key(d, "root0", P256);
    root(d, "root0", ",pathlen:0");
    key(d, "inter", P256);
    intermediate(d, "inter", "root0", ",pathlen:0");
    for result in [
        init_with(d, "root0", false, Some("inter")),
        init_with(d, "root0", true, None),
    ] {
        let text = result.expect_err("pathlen:0 root imported").to_string();
        assert!(text.contains("root0.crt"), "{text}");
        assert!(text.contains("pathlen:0"), "{text}");
    }
    // pathlen:1 over an intermediate with pathlen:0 is fine.
    key(d, "root1", P256);
    root(d, "root1", ",pathlen:1");
    key(d, "inter1", P256);
    intermediate(d, "inter1", "root1", ",pathlen:0");
    init_with(d, "root1", false, Some("inter1")).unwrap();
}

#[test]
fn init_names_an_unsupported_root_or_intermediate_key() {
    let d = tempfile::tempdir().unwrap();
    let d = d.path();
    for (name, alg, what) in [
        (
            "p521",
            "-algorithm EC -pkeyopt ec_paramgen_curve:P-521",
            "P-521",
        ),
        (
            "k256",
            "-algorithm EC -pkeyopt ec_paramgen_curve:secp256k1",
            "secp256k1",
        ),
        (
            "rsa1024",
            "-algorithm RSA -pkeyopt rsa_keygen_bits:1024",
            "1024-bit RSA",
        ),
    ] {
        key(d, name, alg);
        root(d, name, "");
        let text = init_with(d, name, true, None).unwrap_err().to_string();
        assert!(text.contains(what), "{text}");
        assert!(text.contains("P-256"), "{text}");
        assert!(!text.contains("not self-signed"), "{text}");
    }
    key(d, "root", P256);
    root(d, "root", "");
    for (name, alg, what) in [
        (
            "ip521",
            "-algorithm EC -pkeyopt ec_paramgen_curve:P-521",
            "P-521",
        ),
        (
            "irsa",
            "-algorithm RSA -pkeyopt rsa_keygen_bits:1024",
            "1024-bit RSA",
        ),
    ] {
        key(d, name, alg);
        intermediate(d, name, "root", "");
        let text = init_with(d, "root", false, Some(name))
            .unwrap_err()
            .to_string();
        assert!(text.contains(what), "{text}");
        assert!(!text.contains("Could not parse"), "{text}");
    }
}

#[test]
fn init_refuses_the_root_given_as_its_own_intermediate() {
    let d = tempfile::tempdir().unwrap();
    let d = d.path();
    key(d, "root", P256);
    root(d, "root", "");
    let text = init_with(d, "root", false, Some("root"))
        .expect_err("root imported as its own intermediate")
        .to_string();
    assert!(
        text.contains("the intermediate is the root itself"),
        "{text}"
    );
    assert!(!d.join("ca/state.json").exists());
}

/// A CA cert over `key` for `cn`, valid `from`..`to` (Unix seconds),
/// signed by `issuer` or by itself.
fn ca_cert(
    cn: &str,
    key: &rcgen::KeyPair,
    from: i64,
    to: i64,
    ca: bool,
    issuer: Option<&rcgen::Issuer<'_, rcgen::KeyPair>>,
) -> String {
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name.push(rcgen::DnType::CommonName, cn);
    p.is_ca = if ca {
        rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained)
    } else {
        rcgen::IsCa::ExplicitNoCa
    };
    p.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    p.not_before = time::OffsetDateTime::from_unix_timestamp(from).unwrap();
    p.not_after = time::OffsetDateTime::from_unix_timestamp(to).unwrap();
    match issuer {
        Some(i) => p.signed_by(key, i).unwrap().pem(),
        None => p.self_signed(key).unwrap().pem(),
    }
}

#[test]
fn serve_refuses_a_ca_directory_whose_chain_no_longer_works() {
    let now = SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let (past, later) = (now - 86400, now + 86400);
    // (file replaced, its new content from (root pem, root key), file named, reason)
    type Make = fn(&str, &rcgen::KeyPair, i64, i64) -> String;
    let cases: [(&str, Make, &str); 5] = [
        (
            "root.crt",
            |_, rk, past, later| {
                let other = rcgen::KeyPair::generate().unwrap();
                let top = ca_cert("other", &other, past, later, true, None);
                let issuer = rcgen::Issuer::from_ca_cert_pem(&top, other).unwrap();
                ca_cert("not a root", rk, past, later, true, Some(&issuer))
            },
            "restore this generation's root",
        ),
        (
            "intermediate.crt",
            |root, rk, past, _| {
                let issuer = rcgen::Issuer::from_ca_cert_pem(root, rk.clone_key()).unwrap();
                let k = rcgen::KeyPair::generate().unwrap();
                ca_cert("old", &k, past - 10, past, true, Some(&issuer))
            },
            "expired",
        ),
        (
            "intermediate.crt",
            |root, rk, past, later| {
                let issuer = rcgen::Issuer::from_ca_cert_pem(root, rk.clone_key()).unwrap();
                let k = rcgen::KeyPair::generate().unwrap();
                ca_cert("leaf", &k, past, later, false, Some(&issuer))
            },
            "not a CA",
        ),
        (
            "intermediate.crt",
            |_, _, past, later| {
                let other = rcgen::KeyPair::generate().unwrap();
                let root = ca_cert("other", &other, past, later, true, None);
                let issuer = rcgen::Issuer::from_ca_cert_pem(&root, other).unwrap();
                let k = rcgen::KeyPair::generate().unwrap();
                ca_cert("stray", &k, past, later, true, Some(&issuer))
            },
            "issued by",
        ),
        (
            "root.crt",
            |_, rk, past, _| ca_cert("old root", rk, past - 10, past, true, None),
            "expired",
        ),
    ];
    for (file, make, why) in cases {
        let dir = ca_dir(&config(Duration::from_secs(60)));
        let g = dir.path().join("gen-1");
        let root = std::fs::read_to_string(g.join("root.crt")).unwrap();
        let rk = rcgen::KeyPair::from_pem(&std::fs::read_to_string(g.join("root.key")).unwrap())
            .unwrap();
        std::fs::write(g.join(file), make(&root, &rk, past, later)).unwrap();
        let err = match store::Authority::load(dir.path()) {
            Ok(_) => panic!("loaded with a replaced {file} ({why})"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains(file), "{err}");
        assert!(err.contains(why), "{err}");
    }
}

/// An old generation that ran out while a newer one signs: its root still
/// signs the API's certificate, so the CA cannot serve, and the error says
/// to retire it; once retired, the CA loads.
#[test]
fn an_expired_oldest_generation_is_named_with_retire_as_the_fix() {
    let cfg = config(Duration::from_secs(60));
    let dir = ca_dir(&cfg);
    let g = dir.path().join("gen-1");
    let root = std::fs::read_to_string(g.join("root.crt")).unwrap();
    let rk =
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(g.join("root.key")).unwrap()).unwrap();
    store::rotate(dir.path(), &cfg, None).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let issuer = rcgen::Issuer::from_ca_cert_pem(&root, rk).unwrap();
    let k = rcgen::KeyPair::generate().unwrap();
    let old = ca_cert("old", &k, now - 86400, now - 3600, true, Some(&issuer));
    std::fs::write(g.join("intermediate.crt"), old).unwrap();
    let err = match store::Authority::load(dir.path()) {
        Ok(_) => panic!("loaded with an expired oldest generation"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("generation 1") && err.contains("expired") && err.contains("--retire"),
        "{err}"
    );
    store::retire(dir.path(), std::time::SystemTime::now()).unwrap();
    store::Authority::load(dir.path()).unwrap();
}

trait CloneKey {
    fn clone_key(&self) -> rcgen::KeyPair;
}

impl CloneKey for rcgen::KeyPair {
    fn clone_key(&self) -> rcgen::KeyPair {
        rcgen::KeyPair::from_pem(&self.serialize_pem()).unwrap()
    }
}

#[test]
fn a_short_token_key_gets_advice_that_keeps_the_roots() {
    let dir = ca_dir(&config(Duration::from_secs(60)));
    let key = dir.path().join("token.key");
    std::fs::write(&key, b"too short\n").unwrap();
    let err = store::mint_token(dir.path(), &id("web"), Duration::from_secs(60))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&format!("head -c 32 /dev/urandom > {}", key.display())),
        "{err}"
    );
    assert!(!err.contains("--force"), "{err}");
}

#[tokio::test]
async fn serve_refuses_dns_names_that_are_not_dns_names() {
    let mut cfg = config(Duration::from_secs(60));
    let dir = ca_dir(&cfg);
    for bad in ["a b", "10.0.0.1"] {
        cfg.dns_names = vec![bad.into()];
        let err = match legate_ca::server::Server::bind(dir.path(), &cfg).await {
            Ok(_) => panic!("served with DNS name {bad:?}"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains("ca.dns_names") && err.contains(bad), "{err}");
    }
    cfg.dns_names = vec!["legate-ca.mesh.svc".into()];
    legate_ca::server::Server::bind(dir.path(), &cfg)
        .await
        .unwrap();
}

/// A key file holding two keys, the right one first: reading only the
/// first would work today and sign with the other once the file is
/// reordered, so both import and load refuse it, naming the file.
#[test]
fn a_key_file_with_two_keys_is_refused_by_name() {
    let d = tempfile::tempdir().unwrap();
    let d = d.path();
    key(d, "root", P256);
    root(d, "root", "");
    key(d, "stray", P256);
    sh(d, "cat stray.key >> root.key");
    let text = init_with(d, "root", true, None)
        .expect_err("a root key file with two keys imported")
        .to_string();
    assert!(text.contains("root.key"), "{text}");
    assert!(text.contains("2 private keys"), "{text}");
    assert!(!d.join("ca/state.json").exists());

    let dir = ca_dir(&config(Duration::from_secs(60)));
    let inter_key = dir.path().join("gen-1/intermediate.key");
    let mut keys = std::fs::read_to_string(&inter_key).unwrap();
    keys.push_str(&rcgen::KeyPair::generate().unwrap().serialize_pem());
    std::fs::write(&inter_key, keys).unwrap();
    let err = match store::Authority::load(dir.path()) {
        Ok(_) => panic!("loaded an intermediate.key with two keys"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("gen-1/intermediate.key"), "{err}");
    assert!(err.contains("2 private keys"), "{err}");
}

fn load_err(dir: &std::path::Path) -> CaError {
    match store::Authority::load(dir) {
        Ok(_) => panic!("loaded a CA with a generation missing"),
        Err(e) => e,
    }
}

/// A generation `state.json` counts on whose directory is gone is named as
/// missing, with the directory and the way out, never as "retired".
#[test]
fn a_generation_missing_from_the_directory_is_named_with_the_fix() {
    // The signing generation, as a hand-edited or newer state.json names it.
    let dir = ca_dir(&config(Duration::from_secs(60)));
    let state = dir.path().join("state.json");
    let text = std::fs::read_to_string(&state).unwrap();
    std::fs::write(&state, text.replace("\"active\": 1", "\"active\": 3")).unwrap();
    let err = load_err(dir.path());
    let text = err.to_string();
    assert!(matches!(err, CaError::GenerationMissing { .. }), "{text}");
    assert!(text.contains("generation 3's files are missing"), "{text}");
    assert!(text.contains("gen-3 does not exist"), "{text}");
    assert!(text.contains("Restore that directory"), "{text}");
    assert!(!text.contains("retired"), "{text}");

    // The signing generation of a rotated CA: rotate and retire refuse
    // before writing anything.
    let dir = rotated_ca();
    std::fs::remove_dir_all(dir.path().join("gen-2")).unwrap();
    let text = load_err(dir.path()).to_string();
    assert!(text.contains("generation 2's files are missing"), "{text}");
    assert!(text.contains("gen-2 does not exist"), "{text}");
    assert!(
        text.contains("legate ca init --force") && text.contains("--trust-domain test.local"),
        "{text}"
    );
    let before = std::fs::read_to_string(dir.path().join("state.json")).unwrap();
    let cfg = config(Duration::from_secs(60));
    for err in [
        store::rotate(dir.path(), &cfg, None).unwrap_err(),
        store::retire(dir.path(), SystemTime::now()).unwrap_err(),
    ] {
        assert!(matches!(err, CaError::GenerationMissing { .. }), "{err}");
    }
    let after = std::fs::read_to_string(dir.path().join("state.json")).unwrap();
    assert_eq!(before, after);

    // An older live generation: retiring it is the way out, and works.
    let dir = rotated_ca();
    std::fs::remove_dir_all(dir.path().join("gen-1")).unwrap();
    let text = load_err(dir.path()).to_string();
    assert!(text.contains("generation 1's files are missing"), "{text}");
    assert!(text.contains("legate ca rotate --retire"), "{text}");
    store::retire(dir.path(), SystemTime::now()).unwrap();
    store::Authority::load(dir.path()).unwrap();
}

/// `legate ca bundle` prints bundle.pem only once it passes the checks any
/// bundle gets, and names the file with the way to rebuild it otherwise.
#[test]
fn an_unusable_bundle_file_is_refused_by_name() {
    let now = SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let k = rcgen::KeyPair::generate().unwrap();
    let expired = ca_cert("old root", &k, now - 86400, now - 3600, true, None);
    let leaf = ca_cert("leaf", &k, now - 60, now + 3600, false, None);
    let dir = ca_dir(&config(Duration::from_secs(60)));
    let path = dir.path().join("bundle.pem");
    let good = store::bundle(dir.path(), SystemTime::now()).unwrap();
    assert_eq!(good, std::fs::read_to_string(&path).unwrap());
    let rebuild = format!(
        "cat {} > {}",
        dir.path().join("gen-1/root.crt").display(),
        path.display()
    );
    for (content, why) in [
        ("", "no PEM CERTIFICATE block"),
        (
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
            "well-formed X.509",
        ),
        (leaf.as_str(), "not a CA certificate"),
        (expired.as_str(), "every root in it has expired"),
    ] {
        std::fs::write(&path, content).unwrap();
        let err = store::bundle(dir.path(), SystemTime::now())
            .expect_err(why)
            .to_string();
        assert!(err.contains(&path.display().to_string()), "{err}");
        assert!(err.contains(why), "{err}");
        assert!(err.contains(&rebuild), "{err}");
    }
    // One root still valid is enough: during a rotation the old one may
    // run out first.
    std::fs::write(&path, format!("{expired}{good}")).unwrap();
    store::bundle(dir.path(), SystemTime::now()).unwrap();
}
