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
