//! What observability costs: HTTP requests per second through two proxies
//! with access logs and metric scrapes off, then on, alternating.
//!
//! `cargo bench -p legate --bench observability` (as root: it builds
//! network namespaces; knobs `LEGATE_BENCH_SECS`, default 8, and
//! `LEGATE_BENCH_ROUNDS`, default 3)
//!
//! A client pod runs wrk (HTTP/1.1, keep-alive) against an application in
//! a server pod; both pods are meshed, so every request crosses the
//! client's proxy, mTLS, and the server's proxy. The application is a
//! minimal keep-alive responder in this process, listening in the server
//! pod, so that it is never the bottleneck. Metrics are always counted (a
//! few relaxed atomic adds per request; they cannot be switched off);
//! "on" adds an access log line for every request and connection on both
//! proxies, and a `/metrics` scrape of both every second. Access logs are
//! switched through the admin server between rounds, so both modes run on
//! the same proxies and connections pools; rounds alternate so that drift
//! in the machine's load spreads over both.
//!
//! Requests per second on a shared two-core machine move with whatever
//! else runs on it, so the bench also reports what the two proxies spent:
//! their CPU time (user and system, from `/proc`) divided by the requests
//! served, which load elsewhere hardly changes.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use legate_testbed::mesh::{
    shared_dir, write_readable, Legate, Mesh, MeshedPod, PodOptions, APP_UID,
};
use legate_testbed::Pod;

const PORT: u16 = 8080;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Answers every request on a connection with a small 200.
fn respond(conn: TcpStream) {
    let mut w = match conn.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    let mut r = BufReader::new(conn);
    let mut line = String::new();
    loop {
        line.clear();
        match r.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if line == "\r\n" || line == "\n" {
            let reply =
                b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Type: text/plain\r\n\r\nok\n";
            if w.write_all(reply).is_err() {
                return;
            }
        }
    }
}

fn app(pod: &Pod) -> TcpListener {
    let addr = SocketAddr::new(pod.ip().into(), PORT);
    let listener = pod
        .run_in(move || TcpListener::bind(addr))
        .expect("enter the server pod")
        .expect("bind the application");
    let l = listener.try_clone().expect("listener");
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            std::thread::spawn(move || respond(c));
        }
    });
    listener
}

fn admin(pod: &Pod, method: &str, path: &str, body: &str) -> String {
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    pod.run_in(move || -> std::io::Result<String> {
        let mut s = TcpStream::connect(("127.0.0.1", 15000))?;
        s.write_all(req.as_bytes())?;
        let mut out = String::new();
        std::io::Read::read_to_string(&mut s, &mut out)?;
        Ok(out)
    })
    .expect("enter the pod")
    .expect("admin request")
}

/// User and system CPU time of a process so far, in clock ticks.
fn cpu_ticks(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The fields after the command name, which is in parentheses; utime
    // and stime are fields 14 and 15 of the line, 12 and 13 of these.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    ticks(11) + ticks(12)
}

/// Clock ticks per second (`getconf CLK_TCK`; 100 on Linux).
fn ticks_per_second() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// Runs wrk: (requests per second, requests served).
fn wrk(client: &MeshedPod, url: &str, secs: u64) -> (f64, f64) {
    let out = client
        .pod
        .command("wrk")
        .args(["-t2", "-c32", &format!("-d{secs}s"), url])
        .uid(APP_UID)
        .output()
        .expect("wrk (Debian package wrk)");
    let text = String::from_utf8_lossy(&out.stdout);
    let rate = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no rate in wrk's output:\n{text}"));
    let served = text
        .lines()
        .find_map(|l| l.trim().split_once(" requests in "))
        .and_then(|(n, _)| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no request count in wrk's output:\n{text}"));
    (rate, served)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// The cost of one request's access log line on its own, away from the
/// noise of the machine: formatted as the proxy formats it and handed to
/// the writer (which discards it). Nanoseconds per line.
fn line_cost() -> f64 {
    use legate_proxy::access::{AccessLog, Line};
    let cfg = legate_config::LogConfig {
        access: legate_config::AccessLogMode::On,
        ..Default::default()
    };
    let metrics = std::sync::Arc::new(legate_proxy::metrics::Metrics::new());
    let log = AccessLog::to_writer(&cfg, metrics, || Box::new(std::io::sink()));
    log.set_local_id("spiffe://legate.local/client");
    let (src, dst): (SocketAddr, SocketAddr) = (
        "10.200.0.2:40112".parse().expect("address"),
        "10.200.0.3:8080".parse().expect("address"),
    );
    let n = 200_000u32;
    let start = std::time::Instant::now();
    for i in 0..n {
        let started = std::time::Instant::now();
        if !log.sampled() {
            continue;
        }
        let mut line = Line::new(std::time::SystemTime::now(), "http");
        line.str("direction", "outbound")
            .display("source", src)
            .display("destination", dst)
            .opt_str("source_id", log.local_id())
            .opt_str("destination_id", Some("spiffe://legate.local/server"))
            .str("protocol", "http/1.1")
            .str("method", "GET")
            .opt_str("authority", Some("10.200.0.3:8080"))
            .num("status", 200)
            .num("request_bytes", 0)
            .num("response_bytes", u64::from(i % 4096))
            .millis("duration_ms", started.elapsed())
            .num("retries", 0)
            .opt_str("error", None);
        log.emit(line.finish());
    }
    start.elapsed().as_nanos() as f64 / f64::from(n)
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else is expected.
    let secs = env_or("LEGATE_BENCH_SECS", 8);
    let rounds = env_or("LEGATE_BENCH_ROUNDS", 3) as usize;
    let per_line = line_cost();
    let legate = Legate::new(env!("CARGO_BIN_EXE_legate"));
    let mesh = Mesh::new(legate, &[]).expect("build the mesh");
    let files = shared_dir().expect("files");
    let config = files.path().join("legate.toml");
    // Access logs start off and are switched per round; warn-level logs so
    // that the diagnostic log is not what is measured.
    write_readable(&config, b"[log]\nlevel = \"warn\"\naccess = \"off\"\n").expect("config");
    let opts = || PodOptions {
        config: Some(config.clone()),
        log: Some("warn".into()),
        ..Default::default()
    };
    let server = mesh.meshed_pod("server", opts()).expect("server pod");
    let client = mesh.meshed_pod("client", opts()).expect("client pod");
    let _app = app(&server.pod);
    let url = format!("http://{}:{PORT}/", server.pod.ip());
    // Warm up the pool and the caches.
    wrk(&client, &url, 2);

    let (mut off, mut on) = (Vec::new(), Vec::new());
    let (mut off_cpu, mut on_cpu) = (Vec::new(), Vec::new());
    let pids = [client.proxy.pid(), server.proxy.pid()];
    let hz = ticks_per_second();
    let proxies_cpu = || pids.iter().map(|&p| cpu_ticks(p)).sum::<f64>() / hz;
    for round in 0..rounds {
        for logging in [false, true] {
            let switch = if logging { "on" } else { "off" };
            for pod in [&client.pod, &server.pod] {
                let answer = admin(pod, "PUT", "/access-log", switch);
                assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
            }
            let scraping = AtomicBool::new(logging);
            let cpu_before = proxies_cpu();
            let (rate, served) = std::thread::scope(|scope| {
                scope.spawn(|| {
                    while scraping.load(Ordering::Relaxed) {
                        for p in [&client.pod, &server.pod] {
                            let m = admin(p, "GET", "/metrics", "");
                            assert!(m.contains("legate_http_requests_total"));
                        }
                        std::thread::sleep(Duration::from_secs(1));
                    }
                });
                let r = wrk(&client, &url, secs);
                scraping.store(false, Ordering::Relaxed);
                r
            });
            let cpu_us = (proxies_cpu() - cpu_before) / served * 1e6;
            eprintln!(
                "round {round}: access log {switch}: {rate:.0} requests/s, {cpu_us:.1} µs of proxy CPU per request"
            );
            if logging {
                on.push(rate);
                on_cpu.push(cpu_us);
            } else {
                off.push(rate);
                off_cpu.push(cpu_us);
            }
        }
    }
    let lines = client.proxy.stdout().lines().count() + server.proxy.stdout().lines().count();
    let (off_m, on_m) = (median(off.clone()), median(on.clone()));
    let (off_c, on_c) = (median(off_cpu.clone()), median(on_cpu.clone()));
    println!("| mode | requests/s (median of {rounds} × {secs} s) | proxy CPU per request (both proxies, median) | rounds (requests/s) |");
    println!("| --- | --- | --- | --- |");
    println!("| access logs off, no scrapes | {off_m:.0} | {off_c:.1} µs | {off:.0?} |");
    println!("| access logs on (every request and connection, both proxies), /metrics scraped every second | {on_m:.0} | {on_c:.1} µs | {on:.0?} |");
    println!();
    println!(
        "cost: {:.1}% of requests/s, {:.1}% of proxy CPU per request ({lines} access log lines written)",
        (off_m - on_m) / off_m * 100.0,
        (on_c - off_c) / off_c * 100.0
    );
    println!("one request's access log line alone: {per_line:.0} ns");
    drop(client);
    drop(server);
    if let Err(e) = mesh.close() {
        eprintln!("cleanup: {e}");
    }
}
