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
