//! The identity manager over time: renewal of short-lived certificates with
//! no gap, and a CA outage that costs nothing until the certificate would
//! actually expire.

mod common;

use std::time::{Duration, Instant, SystemTime};

use common::*;
use tokio::net::TcpListener;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_second_certificates_renew_again_and_again_without_a_gap() {
    let cfg = config(Duration::from_secs(10));
    let dir = ca_dir(&cfg);
    let ca = start(dir.path(), &cfg).await;
    let m = manager(ca.addr, dir.path(), &id("web"));
    let handle = m.handle();
    let task = tokio::spawn(m.run());
    let first = tokio::time::timeout(Duration::from_secs(5), handle.ready())
        .await
        .unwrap();

    let mut serials = vec![first.chain()[0].clone()];
    let started = Instant::now();
    // Three lifetimes' worth of half-lives: renewals at about 5 s, 10 s, 15 s, 20 s.
    while started.elapsed() < Duration::from_secs(21) {
        let now = SystemTime::now();
        let c = handle.load().expect("credentials present");
        assert!(
            c.is_valid_at(now),
            "no valid certificate at {:?}",
            started.elapsed()
        );
        // Never closer than a quarter lifetime to expiry: renewal is early.
        assert!(
            c.remaining(now) > Duration::from_millis(2500),
            "renewal is late: {:?} left",
            c.remaining(now)
        );
        if serials.last() != Some(&c.chain()[0]) {
            serials.push(c.chain()[0].clone());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        serials.len() >= 4,
        "only {} certificates in 21 s",
        serials.len()
    );
    task.abort();
    ca.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_ca_down_the_client_keeps_its_certificate_retries_and_recovers() {
    let cfg = config(Duration::from_secs(10));
    let dir = ca_dir(&cfg);
    let ca = start(dir.path(), &cfg).await;
    let addr = ca.addr;
    let m = manager(addr, dir.path(), &id("web"));
    let handle = m.handle();
    let stats = m.stats();
    let task = tokio::spawn(m.run());
    let first = tokio::time::timeout(Duration::from_secs(5), handle.ready())
        .await
        .unwrap();
    let got_at = Instant::now();
    ca.stop().await;

    // While the CA is away, something else answers on its port and counts
    // the manager's attempts (closing each connection at once).
    let stand_in = TcpListener::bind(addr).await.unwrap();
    let counter = tokio::spawn(async move {
        let mut seen = Vec::new();
        let until = got_at + Duration::from_millis(7500);
        while let Ok(Ok((s, _))) = tokio::time::timeout_at(until.into(), stand_in.accept()).await {
            seen.push(Instant::now());
            drop(s);
        }
        seen
    });
    // Until the stand-in leaves, the manager holds on to its certificate.
    while got_at.elapsed() < Duration::from_millis(7400) {
        let c = handle.load().unwrap();
        assert_eq!(
            c.chain()[0],
            first.chain()[0],
            "no new certificate can have come"
        );
        assert!(c.is_valid_at(SystemTime::now()));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let attempts = counter.await.unwrap();
    assert!(attempts.len() >= 3, "retries: {}", attempts.len());
    let gaps: Vec<Duration> = attempts.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(
        gaps.iter().all(|g| *g >= Duration::from_millis(80)),
        "retries are spaced, not a busy loop: {gaps:?}"
    );

    // The CA comes back on the same port, before the old certificate expires.
    let mut cfg2 = cfg.clone();
    cfg2.listen = addr;
    let ca = start(dir.path(), &cfg2).await;
    let deadline = first.not_after();
    loop {
        let c = handle.load().unwrap();
        if c.chain()[0] != first.chain()[0] {
            assert!(c.is_valid_at(SystemTime::now()));
            assert!(c.remaining(SystemTime::now()) > Duration::from_secs(8));
            break;
        }
        assert!(
            SystemTime::now() < deadline,
            "did not recover before the old certificate expired"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The counters behind the renewal metrics saw it all (the count follows
    // the new certificate by a moment).
    let counted = Instant::now();
    while stats.renewals() < 2 && counted.elapsed() < Duration::from_secs(2) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(stats.renewals(), 2, "the first certificate and the renewal");
    assert!(stats.failures() >= 3, "failures: {}", stats.failures());
    task.abort();
    ca.stop().await;
}
