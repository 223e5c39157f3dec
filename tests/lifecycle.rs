//! The proxy's lifecycle: draining on SIGTERM and on the admin server's
//! shutdown, configuration reloads that change policy without dropping
//! established connections, and what a client's proxy does when a peer
//! proxy restarts or vanishes.

mod common;
mod obs_support;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;
use legate_testbed::Signal;
use obs_support::*;

const PORT: u16 = 8080;
const ECHO_PORT: u16 = 9100;

/// Echoes every line back.
const ECHO: &str = r#"
import socket, sys, threading
s = socket.socket(socket.AF_INET6)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("::", int(sys.argv[1])))
s.listen(16)
def serve(c):
    f = c.makefile("rb")
    for line in f:
        c.sendall(line)
    c.close()
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

/// Starts the echo server in `pod` on [`ECHO_PORT`]; returns it (it stops
/// when dropped) and its address.
fn start_echo(pod: &legate_testbed::Pod) -> (legate_testbed::Process, SocketAddr) {
    let dir = shared_dir().unwrap();
    let echo = dir.path().join("echo.py");
    write_readable(&echo, ECHO.as_bytes()).unwrap();
    let process = pod
        .command("python3")
        .arg(&echo)
        .arg(ECHO_PORT.to_string())
        .uid(APP_UID)
        .spawn()
        .expect("echo server");
    let addr = SocketAddr::new(pod.ip().into(), ECHO_PORT);
    pod.wait_for_port(addr, Duration::from_secs(10)).unwrap();
    (process, addr)
}

/// Waits until the proxy has counted `n` reloads with this result.
fn wait_reloads(client: &MeshedPod, result: &str, n: f64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = scrape(&client.pod);
        if metric(&text, "legate_config_reloads_total", &[("result", result)]) >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no {result} reload:\n{}",
            client.proxy.stderr()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn sigterm_finishes_the_request_in_flight_refuses_new_connections_and_exits_zero() {
    let mesh = Mesh::new(&[]);
    let server = mesh.meshed_pod("server", PodOptions::default());
    let mut client = mesh.meshed_pod(
        "client",
        PodOptions {
            proxy_set: vec!["proxy.drain_grace=8s".into()],
            ..Default::default()
        },
    );
    let _app = Scripted::start(&server.pod, PORT);
    let base = format!("http://{}:{PORT}", server.pod.ip());

    // A request that takes 3 s, and an idle keep-alive connection.
    let mut long = client
        .pod
        .command("curl")
        .args([
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &format!("{base}/sleep/3/long"),
        ])
        .uid(APP_UID)
        .spawn()
        .expect("curl");
    let dst = SocketAddr::new(server.pod.ip().into(), PORT);
    let mut idle = client
        .pod
        .run_in(move || -> std::io::Result<TcpStream> {
            let mut s = TcpStream::connect(dst)?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            write!(s, "GET /ok/idle HTTP/1.1\r\nHost: {dst}\r\n\r\n")?;
            Ok(s)
        })
        .unwrap()
        .expect("keep-alive connection");
    let mut first = [0u8; 12];
    std::io::Read::read_exact(&mut idle, &mut first).unwrap();
    assert_eq!(&first, b"HTTP/1.1 200");
    std::thread::sleep(Duration::from_millis(700));

    let term = Instant::now();
    client.proxy.signal(Signal::SIGTERM).unwrap();
    // Readiness drops at once, and nothing accepts any more.
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let (status, _) = admin(&client.pod, "GET", "/ready", "");
        if status == 503 {
            break;
        }
        assert!(Instant::now() < deadline, "still ready while draining");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (ok, _, err) = curl(
        &client.pod,
        &["--max-time", "3", &format!("{base}/ok/late")],
    );
    assert!(!ok, "a new connection was served while draining");
    assert!(
        err.contains("(7)") || err.contains("refused") || err.contains("reset"),
        "curl could not connect: {err}"
    );

    // The idle keep-alive connection is closed by the proxy, not left to
    // hold the drain open.
    let mut rest = Vec::new();
    let closed = std::io::Read::read_to_end(&mut idle, &mut rest);
    assert!(
        closed.is_ok(),
        "the idle connection was closed cleanly: {closed:?}"
    );

    // The request in flight completes.
    let status = long.wait_timeout(Duration::from_secs(10)).unwrap();
    assert!(status.success());
    assert_eq!(long.stdout(), "200");

    let exit = client.proxy.wait_timeout(Duration::from_secs(8)).unwrap();
    assert!(
        exit.success(),
        "the proxy exits 0: {exit:?}\n{}",
        client.proxy.stderr()
    );
    assert!(
        term.elapsed() < Duration::from_secs(8),
        "within the grace period"
    );
    assert!(
        term.elapsed() < Duration::from_secs(6),
        "it does not wait for idle connections: {:?}",
        term.elapsed()
    );
    assert!(client.proxy.stderr().contains("draining"));
}

#[test]
fn a_reload_changes_retries_for_new_requests_keeps_connections_and_refuses_bad_files() {
    let mesh = Mesh::new(&[]);
    let server = mesh.meshed_pod("server", PodOptions::default());
    let files = shared_dir().unwrap();
    let config = files.path().join("legate.toml");
    let write_config = |text: &str| {
        // Replace atomically, as an editor or a ConfigMap update does.
        let tmp = files.path().join("legate.toml.new");
        write_readable(&tmp, text.as_bytes()).unwrap();
        std::fs::rename(&tmp, &config).unwrap();
    };
    write_config("[proxy.http]\nretry_on = [\"5xx\"]\nattempts = 1\nbreaker_failures = 0\n");
    let mut client = mesh.meshed_pod(
        "client",
        PodOptions {
            config: Some(config.clone()),
            ..Default::default()
        },
    );
    let app = Scripted::start(&server.pod, PORT);
    let (_echo, echo_addr) = start_echo(&server.pod);
    let url = |path: &str| format!("http://{}:{PORT}{path}", server.pod.ip());

    // No retries yet.
    assert_eq!(request(&client.pod, &[&url("/fail/1/a")]).status, 500);
    assert_eq!(app.count(&server.pod, "a"), 1);

    // A long-lived connection, open across the reloads.
    let conn = client
        .pod
        .run_in(move || -> std::io::Result<TcpStream> {
            let s = TcpStream::connect(echo_addr)?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            Ok(s)
        })
        .unwrap()
        .expect("connect to the echo server");
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut writer = conn;
    let mut echo_line = |text: &str| {
        writer.write_all(format!("{text}\n").as_bytes()).unwrap();
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        assert_eq!(
            line,
            format!("{text}\n"),
            "the long-lived connection still flows"
        );
    };
    echo_line("before");

    // The file changes: three attempts from now on.
    write_config("[proxy.http]\nretry_on = [\"5xx\"]\nattempts = 3\nbreaker_failures = 0\n");
    wait_reloads(&client, "ok", 1.0);
    let r = request(&client.pod, &[&url("/fail/1/b")]);
    assert_eq!((r.status, r.body.trim()), (200, "ok after 2"));
    assert_eq!(app.count(&server.pod, "b"), 2);
    echo_line("after the reload");

    // A broken file is refused, logged, and changes nothing.
    write_config("[proxy.http]\nretry_on = [\"5xx\"]\nattempts = 0\n");
    wait_reloads(&client, "error", 1.0);
    let log = client.proxy.stderr();
    assert!(log.contains("reload refused"), "{log}");
    assert!(
        log.contains("proxy.http.attempts"),
        "the error names the key:\n{log}"
    );
    let r = request(&client.pod, &[&url("/fail/1/c")]);
    assert_eq!(r.status, 200, "the old policy stays in force");
    assert_eq!(app.count(&server.pod, "c"), 2);
    echo_line("after the refused reload");

    // SIGHUP reloads too (the file is fixed first, back to no retries).
    write_config("[proxy.http]\nretry_on = [\"5xx\"]\nattempts = 1\nbreaker_failures = 0\n");
    wait_reloads(&client, "ok", 2.0);
    client.proxy.signal(Signal::SIGHUP).unwrap();
    wait_reloads(&client, "ok", 3.0);
    assert_eq!(request(&client.pod, &[&url("/fail/1/d")]).status, 500);
    assert_eq!(app.count(&server.pod, "d"), 1);
    echo_line("after SIGHUP");
    let (_, config) = admin(&client.pod, "GET", "/config", "");
    assert!(config.contains("attempts = 1"), "{config}");

    drop(reader);
    drop(writer);

    // POST /shutdown from localhost drains and exits 0, like SIGTERM.
    let (status, body) = admin(&client.pod, "POST", "/shutdown", "");
    assert_eq!(status, 202, "{body}");
    let exit = client.proxy.wait_timeout(Duration::from_secs(30)).unwrap();
    assert!(exit.success(), "{exit:?}\n{}", client.proxy.stderr());
    assert!(client.proxy.stderr().contains("shutdown requested"));
}

/// From `pod`: one line to the echo server at `dst` and its echo, on a
/// new connection.
fn echo_once(pod: &legate_testbed::Pod, dst: SocketAddr, text: &str) -> std::io::Result<String> {
    let text = format!("{text}\n");
    pod.run_in(move || {
        let s = TcpStream::connect_timeout(&dst, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        (&s).write_all(text.as_bytes())?;
        let mut line = String::new();
        BufReader::new(&s).read_line(&mut line)?;
        Ok(line)
    })
    .expect("run in pod")
}

#[test]
fn a_peer_proxy_that_restarts_is_reached_over_mtls_again_never_in_plaintext() {
    let mesh = Mesh::new(&[]);
    let mut server = mesh.meshed_pod("server", PodOptions::default());
    let client = mesh.meshed_pod("client", PodOptions::default());
    let _app = Scripted::start(&server.pod, PORT);
    let (_echo, echo_addr) = start_echo(&server.pod);
    let headers = format!("http://{}:{PORT}/headers", server.pod.ip());
    // The identity the server's application was given, if the request
    // was answered.
    let identity_seen = || -> Option<Option<String>> {
        let (ok, body, _) = curl(&client.pod, &["--max-time", "3", "-f", &headers]);
        ok.then(|| {
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            v["legate-client-id"].as_str().map(str::to_owned)
        })
    };
    assert_eq!(identity_seen(), Some(Some(client.id().to_owned())));
    assert_eq!(
        echo_once(&client.pod, echo_addr, "before").unwrap(),
        "before\n"
    );

    // A crash. While the server's proxy is away its capture rules stay, so
    // nothing answers, over the mesh or in plaintext; the client's proxy
    // meanwhile finds the peer's mesh port refusing, several times over.
    server.proxy.kill().unwrap();
    for _ in 0..6 {
        assert_eq!(
            identity_seen(),
            None,
            "answered with the server's proxy down"
        );
        assert!(echo_once(&client.pod, echo_addr, "down").is_err());
        std::thread::sleep(Duration::from_millis(150));
    }

    // Back again: every request and connection is carried over mTLS as
    // before (after the pool's backoff), never in plaintext, which the
    // server's permissive proxy would pass on without an identity.
    mesh.restart_proxy(&mut server).unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut answered = 0;
    while answered < 5 {
        assert!(
            Instant::now() < deadline,
            "the server was not reached again"
        );
        match identity_seen() {
            Some(id) => {
                assert_eq!(id.as_deref(), Some(client.id()), "carried in plaintext");
                answered += 1;
            }
            None => std::thread::sleep(Duration::from_millis(200)),
        }
    }
    let mut echoed = 0;
    while echoed < 3 {
        assert!(
            Instant::now() < deadline,
            "the echo server was not reached again"
        );
        match echo_once(&client.pod, echo_addr, "after") {
            Ok(line) => {
                assert_eq!(line, "after\n");
                echoed += 1;
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
    let text = scrape(&server.pod);
    let opened = |peer: &str| {
        metric(
            &text,
            "legate_tcp_connections_opened_total",
            &[("direction", "inbound"), ("peer", peer)],
        )
    };
    assert_eq!(opened("none"), 0.0, "plaintext reached the server:\n{text}");
    assert!(opened(client.id()) >= 1.0, "{text}");
}

#[test]
fn a_peer_that_vanishes_without_a_word_fails_its_requests_and_tunnels_within_seconds() {
    let mesh = Mesh::new(&[]);
    let server = mesh.meshed_pod("server", PodOptions::default());
    // One worker, so that every request and tunnel rides the one pooled
    // connection the first request opens; a peer timeout shorter than the
    // default 10 s, to see that the setting is the one obeyed.
    let client = mesh.meshed_pod(
        "client",
        PodOptions {
            proxy_set: vec!["proxy.workers=1".into(), "proxy.peer_timeout=3s".into()],
            ..Default::default()
        },
    );
    let _app = Scripted::start(&server.pod, PORT);
    let (_echo, echo_addr) = start_echo(&server.pod);
    let url = format!("http://{}:{PORT}/headers", server.pod.ip());
    assert_eq!(request(&client.pod, &[&url]).status, 200);
    let tunnel = client
        .pod
        .run_in(|| TcpStream::connect_timeout(&echo_addr, Duration::from_secs(2)))
        .unwrap()
        .unwrap();
    (&tunnel).write_all(b"before\n").unwrap();
    let mut line = String::new();
    BufReader::new(&tunnel).read_line(&mut line).unwrap();
    assert_eq!(line, "before\n");

    // The server's node is gone as a crash or a cut link leaves it: no
    // FIN, no reset, nothing answers.
    let rules = |op: &str| {
        for chain in ["INPUT", "OUTPUT"] {
            server
                .pod
                .exec(["iptables", op, chain, "-p", "tcp", "-j", "DROP"])
                .unwrap();
        }
    };
    rules("-I");
    // What is sent to it now goes unacknowledged, and the mesh connection
    // carrying it is given up after `proxy.peer_timeout` (TCP_USER_TIMEOUT),
    // not at the next unanswered keep-alive ping, up to 33 s away: the
    // request is answered 502 by the proxy, the tunnel is closed.
    let cut = Instant::now();
    let sent = std::thread::spawn(move || {
        tunnel
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        (&tunnel).write_all(b"during\n").unwrap();
        let mut rest = Vec::new();
        std::io::Read::read_to_end(&mut &tunnel, &mut rest).map(|_| rest)
    });
    let r = request(&client.pod, &["--max-time", "30", &url]);
    let waited = cut.elapsed();
    assert_eq!(r.status, 502, "{r:?}\n{}", client.proxy.stderr());
    assert!(r.header("legate-error").is_some(), "{r:?}");
    // Three seconds and the retransmission that notices them; the default
    // would have taken ten.
    assert!(
        waited < Duration::from_secs(8),
        "answered after {waited:?}, not after the 3 s peer timeout"
    );
    match sent.join().unwrap() {
        Ok(rest) => assert!(rest.is_empty(), "{rest:?}"),
        Err(e) => assert!(
            !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "the tunnel was still open after 30 s"
        ),
    }

    // Back on the network, the server is reached over the mesh again.
    rules("-D");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (ok, body, err) = curl(&client.pod, &["--max-time", "3", "-f", &url]);
        if ok {
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(v["legate-client-id"].as_str(), Some(client.id()));
            break;
        }
        assert!(Instant::now() < deadline, "not reached again: {err}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Voluntary context switches of each thread of `pid`: its id, its name
/// and the count.
fn wakeups(pid: u32) -> Vec<(String, String, u64)> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("the proxy's threads");
    tasks
        .flatten()
        .filter_map(|t| {
            let name = std::fs::read_to_string(t.path().join("comm")).ok()?;
            let status = std::fs::read_to_string(t.path().join("status")).ok()?;
            let n = status
                .lines()
                .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))?
                .trim()
                .parse()
                .ok()?;
            let tid = t.file_name().to_string_lossy().into_owned();
            Some((tid, name.trim().to_string(), n))
        })
        .collect()
}

#[test]
fn an_idle_proxy_leaves_the_cpu_alone() {
    // A sidecar sits beside every workload, most of them idle most of the
    // time: with no traffic and no configuration file to watch, nothing
    // in it should be polling. (The access log's writer woke twenty times
    // a second, and the reload loop every second, to find nothing to do.)
    let mesh = Mesh::new(&[]);
    let pod = mesh.meshed_pod("idle", PodOptions::default());
    // Past the start: the certificate is in and the listeners are up.
    std::thread::sleep(Duration::from_secs(1));
    let before = wakeups(pod.proxy.pid());
    std::thread::sleep(Duration::from_secs(3));
    let after = wakeups(pod.proxy.pid());
    let woke: Vec<(String, u64)> = after
        .iter()
        .map(|(tid, name, n)| {
            let was = before
                .iter()
                .find(|(t, ..)| t == tid)
                .map_or(0, |(.., b)| *b);
            (name.clone(), n - was)
        })
        .collect();
    let total: u64 = woke.iter().map(|(_, n)| n).sum();
    // The pools' idle sweep may fire meanwhile (every 10 s by default).
    assert!(total <= 2, "wakeups in 3 s of idling, by thread: {woke:?}");
}
