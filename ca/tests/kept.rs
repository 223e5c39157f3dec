//! What the identity manager does with what it finds on disk: the
//! certificate kept from the last run, a `cert_dir` it cannot write and a
//! token file that is not a plain file.

mod common;

use std::time::Duration;

use common::*;
use legate_ca::manager::TokenSource;
use legate_ca::IdentityManager;

/// A certificate kept from a CA that has since been replaced is not used:
/// every peer trusting the new CA would refuse it until its half-life.
/// Neither is one kept beside a bundle that does not verify it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_certificate_is_used_only_when_it_verifies_against_the_configured_roots() {
    let cfg = config(Duration::from_secs(3600));
    let old = ca_dir(&cfg);
    let new = ca_dir(&cfg);
    let ca = start(old.path(), &cfg).await;
    let kept = tempfile::tempdir().unwrap();
    let who = id("web");
    let mut opts = options(ca.addr, old.path(), &who);
    opts.cert_dir = Some(kept.path().to_owned());
    IdentityManager::new(opts.clone())
        .unwrap()
        .fetch()
        .await
        .expect("a certificate from the old CA");
    ca.stop().await;

    // A restart against the same CA uses what it kept.
    let same = IdentityManager::new(opts.clone()).unwrap();
    assert!(
        same.handle().load().is_some(),
        "the kept certificate is used"
    );

    // A restart whose configured bundle is the new CA's does not.
    let mut moved = opts.clone();
    moved.ca_bundle = Some(new.path().join("bundle.pem"));
    let m = IdentityManager::new(moved).unwrap();
    assert!(
        m.handle().load().is_none(),
        "a certificate the configured roots do not verify was kept in use"
    );

    // Nor a kept bundle that does not verify the kept certificate.
    std::fs::copy(
        new.path().join("bundle.pem"),
        kept.path().join("bundle.pem"),
    )
    .unwrap();
    let m = IdentityManager::new(opts).unwrap();
    assert!(
        m.handle().load().is_none(),
        "a certificate its own kept bundle does not verify was kept in use"
    );
}

/// A `cert_dir` that cannot be written costs the next start its shortcut,
/// not this start its certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cert_dir_that_cannot_be_written_does_not_keep_the_certificate_from_use() {
    let cfg = config(Duration::from_secs(3600));
    let dir = ca_dir(&cfg);
    let ca = start(dir.path(), &cfg).await;
    let scratch = tempfile::tempdir().unwrap();
    let file = write(scratch.path(), "not-a-dir", "x");
    let mut opts = options(ca.addr, dir.path(), &id("web"));
    opts.cert_dir = Some(file);
    let m = IdentityManager::new(opts).unwrap();
    let creds = m.fetch().await.expect("the certificate is in use");
    assert_eq!(creds.id(), &id("web"));
    assert!(m.handle().load().is_some());
    ca.stop().await;
}

/// A token file that is a FIFO (or any file whose read never ends) gives a
/// clear error instead of blocking the thread that reads it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_file_that_is_not_a_regular_file_is_refused_without_blocking() {
    let cfg = config(Duration::from_secs(3600));
    let dir = ca_dir(&cfg);
    let ca = start(dir.path(), &cfg).await;
    let scratch = tempfile::tempdir().unwrap();
    let fifo = scratch.path().join("token");
    let (made, out) = run("mkfifo", &[path_str(&fifo)]);
    assert!(made, "mkfifo: {out}");
    let mut opts = options(ca.addr, dir.path(), &id("web"));
    opts.token = TokenSource::File(fifo.clone());
    let m = IdentityManager::new(opts.clone()).unwrap();
    let err = tokio::time::timeout(Duration::from_secs(10), m.fetch())
        .await
        .expect("reading the token file blocked")
        .expect_err("a FIFO is no token file")
        .to_string();
    assert!(err.contains("not a regular file"), "{err}");
    assert!(err.contains(&fifo.display().to_string()), "{err}");

    // An empty token file is named as such.
    let empty = write(scratch.path(), "empty", "\n");
    opts.token = TokenSource::File(empty.clone());
    let err = IdentityManager::new(opts.clone())
        .unwrap()
        .fetch()
        .await
        .expect_err("no token")
        .to_string();
    assert!(err.contains("is empty"), "{err}");
    assert!(err.contains(&empty.display().to_string()), "{err}");

    // So is one holding something else than a token.
    let two = write(scratch.path(), "two", "one\ntwo\n");
    opts.token = TokenSource::File(two);
    let err = IdentityManager::new(opts)
        .unwrap()
        .fetch()
        .await
        .expect_err("two lines")
        .to_string();
    assert!(err.contains("more than one line"), "{err}");
    ca.stop().await;
}
