//! CA issuance throughput through the real HTTPS API, and the CA's memory.
//!
//! `cargo bench -p legate-ca --bench ca_issue`
//!
//! The CA runs in a child process (this same binary, re-executed with
//! `LEGATE_BENCH_CA_DIR` set) so that its resident memory is measured
//! alone. The parent drives it with `CONCURRENCY` clients, each request a
//! fresh TLS connection with a bootstrap token and a P-256 CSR, as a
//! bootstrapping workload sends. CSRs are made ahead of time so the
//! clients' key generation does not compete with the CA for the CPU; the
//! TLS handshakes on the client side still do, on the same machine.
//!
//! Knobs: `LEGATE_BENCH_SECS` (default 10), `LEGATE_BENCH_CONCURRENCY`
//! (default 16).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use legate_ca::client::CaClient;
use legate_ca::server::Server;
use legate_ca::{store, Bundle, CredentialsHandle};
use legate_config::{CaConfig, Secret, SpiffeId, TrustDomain};
use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};

const CHILD_ENV: &str = "LEGATE_BENCH_CA_DIR";

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    if let Ok(dir) = std::env::var(CHILD_ENV) {
        return child(dir.into());
    }
    // `cargo test --all-targets` runs bench binaries without `--bench`;
    // only `cargo bench` should pay for a benchmark.
    if !std::env::args().any(|a| a == "--bench") {
        println!("ca_issue: run with `cargo bench -p legate-ca --bench ca_issue`");
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(parent());
}

/// The CA process: serve on an ephemeral loopback port, print it, run
/// until stdin closes.
fn child(dir: std::path::PathBuf) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let cfg = CaConfig {
            listen: "127.0.0.1:0".parse().expect("address"),
            ..CaConfig::default()
        };
        let server = Server::bind(&dir, &cfg).await.expect("bind");
        println!("listening {}", server.local_addr().expect("address"));
        let stop = tokio::task::spawn_blocking(|| {
            let mut s = String::new();
            let _ = std::io::stdin().read_line(&mut s);
        });
        server
            .run(async {
                let _ = stop.await;
            })
            .await
            .expect("serve");
    });
}

fn rss_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

async fn parent() {
    let secs = env_or("LEGATE_BENCH_SECS", 10);
    let concurrency = env_or("LEGATE_BENCH_CONCURRENCY", 16) as usize;
    let td: TrustDomain = "bench.local".parse().expect("trust domain");
    let dir = tempfile::tempdir().expect("tempdir");
    store::init(dir.path(), &td, &CaConfig::default(), None, false).expect("init");

    let mut ca = Command::new(std::env::current_exe().expect("own path"))
        .env(CHILD_ENV, dir.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the CA process");
    let pid = ca.id();
    let mut line = String::new();
    BufReader::new(ca.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("CA address");
    let addr = line.trim().trim_start_matches("listening ").to_owned();
    let idle_rss = rss_kib(pid, "VmRSS:");

    let id: SpiffeId = "spiffe://bench.local/bench".parse().expect("id");
    let token =
        Secret::new(store::mint_token(dir.path(), &id, Duration::from_secs(3600)).expect("token"));
    let bundle = Arc::new(
        Bundle::from_pem(&std::fs::read(dir.path().join("bundle.pem")).expect("bundle"))
            .expect("bundle"),
    );
    let client = CaClient::new(
        &addr,
        &td,
        &CredentialsHandle::new(),
        Some(bundle),
        Duration::from_secs(10),
    );
    let csrs: Arc<Vec<String>> = Arc::new(
        (0..64)
            .map(|_| {
                let key = KeyPair::generate().expect("key");
                let mut p = CertificateParams::default();
                p.distinguished_name = DistinguishedName::new();
                p.subject_alt_names = vec![SanType::URI(id.as_str().try_into().expect("uri"))];
                p.serialize_request(&key).expect("csr").pem().expect("pem")
            })
            .collect(),
    );

    // Warm up, then measure.
    for i in 0..20 {
        client
            .issue(&csrs[i % csrs.len()], Some(&token))
            .await
            .expect("warm-up issue");
    }
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..concurrency {
        let (client, token, csrs, stop) =
            (client.clone(), token.clone(), csrs.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0u64;
            let mut i = w;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                match client.issue(&csrs[i % csrs.len()], Some(&token)).await {
                    Ok(_) => lat.push(t.elapsed()),
                    Err(_) => errors += 1,
                }
                i += concurrency;
            }
            (lat, errors)
        }));
    }
    let mut peak_rss = 0;
    while started.elapsed() < Duration::from_secs(secs) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        peak_rss = peak_rss.max(rss_kib(pid, "VmRSS:"));
    }
    stop.store(true, Ordering::Relaxed);
    let mut lat = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await.expect("worker");
        lat.extend(l);
        errors += e;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let hwm = rss_kib(pid, "VmHWM:");
    drop(ca.stdin.take());
    let _ = ca.wait();

    lat.sort();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .map(|d| d.as_secs_f64() * 1000.0)
            .unwrap_or(0.0)
    };
    println!("CA issuance through the HTTPS API ({concurrency} clients, {secs} s, new TLS connection per request)");
    println!("  issued:      {} ({errors} errors)", lat.len());
    println!("  throughput:  {:.0} certs/s", lat.len() as f64 / elapsed);
    println!(
        "  latency:     p50 {:.2} ms, p99 {:.2} ms",
        pct(0.50),
        pct(0.99)
    );
    println!(
        "  CA RSS:      idle {} KiB, under load {} KiB (peak VmHWM {} KiB)",
        idle_rss, peak_rss, hwm
    );
}
