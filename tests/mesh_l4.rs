//! The mesh at L4, end to end: unchanged applications in two pods talk
//! through `legate init` rules and `legate proxy` sidecars, and the wire
//! carries only mutual TLS.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use common::*;

/// A TCP server in `pod` that runs `serve` for each connection, on a thread.
fn serve_tcp(pod: &legate_testbed::Pod, port: u16, serve: fn(TcpStream)) {
    let listener = pod
        .run_in(move || TcpListener::bind(("0.0.0.0", port)))
        .expect("run in pod")
        .expect("bind");
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            std::thread::spawn(move || serve(conn));
        }
    });
}

fn echo(mut conn: TcpStream) {
    let mut buf = [0u8; 16 * 1024];
    while let Ok(n) = conn.read(&mut buf) {
        if n == 0 || conn.write_all(&buf[..n]).is_err() {
            break;
        }
    }
}

/// An echo server that answers an HTTP GET as HTTP.
fn echo_or_http(mut conn: TcpStream) {
    let mut start = [0u8; 4];
    if matches!(conn.peek(&mut start), Ok(4)) && &start == b"GET " {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") && matches!(conn.read(&mut byte), Ok(1)) {
            head.push(byte[0]);
        }
        let _ = conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nhi\n");
        return;
    }
    echo(conn);
}

#[test]
fn http_between_meshed_pods_is_mutual_tls_on_the_wire() {
    let mesh = Mesh::new(&[]);
    let server = mesh.meshed_pod("web", PodOptions::default());
    let client = mesh.meshed_pod("shop", PodOptions::default());

    let body = secret("http");
    let (_http, _site) = http_server(&server.pod, 8080, &body);

    let capture = server.pod.capture().expect("capture");
    let url = format!("http://{}:8080/index.html", server.pod.ip());
    let out = client
        .pod
        .command("curl")
        .args(["-sS", "--max-time", "10", &url])
        .uid(APP_UID)
        .output()
        .expect("curl");
    assert!(
        out.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), body);

    let pcap = capture.stop().expect("stop capture");
    assert_mesh_tls_only(&pcap, &[body.as_bytes(), b"GET /index.html"]);

    let log = server.proxy.stderr();
    assert!(
        log.contains(client.id()),
        "server proxy log lacks the client identity:\n{log}"
    );
}

#[test]
fn redis_between_meshed_pods_is_mutual_tls_on_the_wire() {
    let mesh = Mesh::new(&[]);
    let server = mesh.meshed_pod("cache", PodOptions::default());
    let client = mesh.meshed_pod("api", PodOptions::default());
    let _redis = server
        .pod
        .command("redis-server")
        .args([
            "--port",
            "6379",
            "--bind",
            "0.0.0.0",
            "--protected-mode",
            "no",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .uid(APP_UID)
        .spawn()
        .expect("redis-server");
    server
        .pod
        .wait_for_port(
            SocketAddr::new(server.pod.ip().into(), 6379),
            Duration::from_secs(10),
        )
        .unwrap();

    let value = secret("redis");
    let capture = server.pod.capture().expect("capture");
    let host = server.pod.ip().to_string();
    let cli = |args: &[&str]| {
        let out = client
            .pod
            .command("redis-cli")
            .args(["-h", &host, "-p", "6379"])
            .args(args)
            .uid(APP_UID)
            .output()
            .expect("redis-cli");
        assert!(
            out.status.success(),
            "redis-cli: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    assert_eq!(cli(&["SET", "k", &value]), "OK");
    assert_eq!(cli(&["GET", "k"]), value);
    let pcap = capture.stop().expect("stop capture");
    assert_mesh_tls_only(&pcap, &[value.as_bytes()]);
    assert!(server.proxy.stderr().contains(client.id()));
}

#[test]
fn half_close_reaches_the_server_and_it_can_still_answer() {
    let mesh = Mesh::new(&[]);
    // This server's proxy runs on one thread (the default is one per CPU),
    // so the single-threaded proxy carries traffic in the suite too.
    let server = mesh.meshed_pod(
        "srv",
        PodOptions {
            proxy_set: vec!["proxy.workers=1".into()],
            ..Default::default()
        },
    );
    let client = mesh.meshed_pod("cli", PodOptions::default());
    serve_tcp(&server.pod, 7000, |mut conn| {
        let mut got = Vec::new();
        conn.read_to_end(&mut got).expect("read to EOF");
        let reply = format!("got {} bytes after EOF", got.len());
        conn.write_all(reply.as_bytes()).expect("reply");
    });
    let dst = SocketAddr::new(server.pod.ip().into(), 7000);
    let reply = client
        .pod
        .run_in(move || {
            let mut s = TcpStream::connect(dst).expect("connect");
            s.write_all(&[7u8; 100_000]).expect("write");
            s.shutdown(Shutdown::Write).expect("half-close");
            let mut reply = String::new();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s.read_to_string(&mut reply).expect("read reply");
            reply
        })
        .unwrap();
    assert_eq!(reply, "got 100000 bytes after EOF");
}

#[test]
fn a_server_first_protocol_gets_its_banner_through_at_once() {
    let mesh = Mesh::new(&[]);
    let server = mesh.meshed_pod("mail", PodOptions::default());
    let client = mesh.meshed_pod("sender", PodOptions::default());
    serve_tcp(&server.pod, 2525, |mut conn| {
        let _ = conn.write_all(b"220 mail.legate.test ESMTP ready\r\n");
        let mut buf = [0u8; 64];
        let _ = conn.read(&mut buf);
    });
    let dst = SocketAddr::new(server.pod.ip().into(), 2525);
    let outsider = mesh.plain_pod("outsider");
    let banner_wait = |pod: &legate_testbed::Pod| {
        let (banner, waited) = pod
            .run_in(move || {
                let mut s = TcpStream::connect(dst).expect("connect");
                let start = Instant::now();
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                let mut buf = [0u8; 64];
                let n = s.read(&mut buf).expect("banner");
                (
                    String::from_utf8_lossy(&buf[..n]).into_owned(),
                    start.elapsed(),
                )
            })
            .unwrap();
        assert!(banner.starts_with("220 "), "{banner:?}");
        waited
    };
    // The first connection also opens the pooled mTLS connection.
    banner_wait(&client.pod);
    // Through the mesh, and from outside it through the server's proxy
    // alone. The best of a few tries, so that a busy machine (other tests
    // run beside this one) does not pass for a stall.
    for (from, pod) in [("the mesh", &client.pod), ("outside", &outsider)] {
        let best = (0..5).map(|_| banner_wait(pod)).min().unwrap();
        assert!(
            best < Duration::from_millis(100),
            "from {from}, the banner took {best:?} at best"
        );
    }
}

/// A client that speaks only after the detection window, in a protocol
/// other than HTTP, is relayed byte for byte once its server stays silent:
/// through the mesh, and from outside it through the server's proxy.
#[test]
fn a_client_that_speaks_late_and_not_in_http_is_relayed() {
    let mesh = Mesh::new(&[]);
    let server = mesh.meshed_pod("echo", PodOptions::default());
    let client = mesh.meshed_pod("late", PodOptions::default());
    let outsider = mesh.plain_pod("outsider");
    serve_tcp(&server.pod, 9000, echo);
    let dst = SocketAddr::new(server.pod.ip().into(), 9000);
    for pod in [&client.pod, &outsider] {
        let echoed = pod
            .run_in(move || -> std::io::Result<Vec<u8>> {
                let mut s = TcpStream::connect(dst)?;
                s.set_read_timeout(Some(Duration::from_secs(10)))?;
                std::thread::sleep(Duration::from_millis(300));
                s.write_all(b"*1\r\n$4\r\nPING\r\n")?;
                let mut back = [0u8; 14];
                s.read_exact(&mut back)?;
                Ok(back.to_vec())
            })
            .unwrap()
            .expect("the bytes come back");
        assert_eq!(echoed, b"*1\r\n$4\r\nPING\r\n");
    }
}

#[test]
fn opaque_ports_on_both_proxies_carry_a_line_that_looks_like_http_untouched() {
    // A Redis inline command begins like an HTTP request.
    let mesh = Mesh::new(&[]);
    let opaque = || PodOptions {
        proxy_set: vec!["proxy.opaque_ports=9000".into()],
        ..Default::default()
    };
    let server = mesh.meshed_pod("echo", opaque());
    let client = mesh.meshed_pod("redis-cli", opaque());
    serve_tcp(&server.pod, 9000, echo);
    let dst = SocketAddr::new(server.pod.ip().into(), 9000);
    let line = b"GET key\r\n";
    let exchange = |pod: &legate_testbed::Pod| {
        pod.run_in(move || -> std::io::Result<Vec<u8>> {
            let mut s = TcpStream::connect(dst)?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            s.write_all(line)?;
            let mut back = [0u8; 9];
            s.read_exact(&mut back)?;
            Ok(back.to_vec())
        })
        .unwrap()
        .expect("an answer")
    };
    assert_eq!(exchange(&client.pod), line);
    // The server's proxy decides for its own ports: with the port listed
    // on the client's side alone, the line is taken for the HTTP it looks
    // like, and refused.
    let server2 = mesh.meshed_pod("echo2", PodOptions::default());
    serve_tcp(&server2.pod, 9000, echo);
    let dst2 = SocketAddr::new(server2.pod.ip().into(), 9000);
    let reply = tcp_exchange(&client.pod, dst2, line).expect("an answer");
    let reply = String::from_utf8_lossy(&reply);
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
}

#[test]
fn a_thousand_concurrent_connections_all_complete() {
    let mesh = Mesh::new(&[]);
    let server = mesh.meshed_pod("echo", PodOptions::default());
    let client = mesh.meshed_pod("load", PodOptions::default());
    serve_tcp(&server.pod, 9000, echo);
    let dst = SocketAddr::new(server.pod.ip().into(), 9000);
    let done = client
        .pod
        .run_in(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut conns = Vec::new();
                for _ in 0..1000 {
                    conns.push(tokio::net::TcpStream::connect(dst).await.expect("connect"));
                }
                let tasks: Vec<_> = conns
                    .into_iter()
                    .enumerate()
                    .map(|(i, mut c)| {
                        tokio::spawn(async move {
                            let msg = format!("connection {i}\n");
                            c.write_all(msg.as_bytes()).await?;
                            let mut back = vec![0u8; msg.len()];
                            c.read_exact(&mut back).await?;
                            Ok::<bool, std::io::Error>(back == msg.as_bytes())
                        })
                    })
                    .collect();
                let mut ok = 0;
                for t in tasks {
                    if matches!(t.await, Ok(Ok(true))) {
                        ok += 1;
                    }
                }
                ok
            })
        })
        .unwrap();
    assert_eq!(done, 1000);
}

/// A deterministic byte stream, so both ends can hash the same gigabyte
/// without storing it.
#[test]
fn connections_over_max_connections_are_reset_and_room_frees_when_one_closes() {
    let mesh = Mesh::new(&[]);
    let server = mesh.meshed_pod("echo", PodOptions::default());
    let client = mesh.meshed_pod(
        "load",
        PodOptions {
            proxy_set: vec!["proxy.http.max_connections=2".into()],
            ..Default::default()
        },
    );
    serve_tcp(&server.pod, 9000, echo_or_http);
    let dst = SocketAddr::new(server.pod.ip().into(), 9000);
    let connect = || {
        let conn = client
            .pod
            .run_in(move || TcpStream::connect_timeout(&dst, Duration::from_secs(5)))
            .expect("run in pod")
            .expect("the proxy accepts");
        conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        conn
    };
    let round_trip = |conn: &mut TcpStream, msg: &[u8]| -> std::io::Result<bool> {
        conn.write_all(msg)?;
        let mut back = vec![0u8; msg.len()];
        conn.read_exact(&mut back)?;
        Ok(back == msg)
    };
    let mut first = connect();
    let mut second = connect();
    assert!(round_trip(&mut first, b"one\n").unwrap());
    assert!(round_trip(&mut second, b"two\n").unwrap());
    let mut third = connect();
    assert!(
        !matches!(round_trip(&mut third, b"three\n"), Ok(true)),
        "a third connection is refused while two are open"
    );
    assert!(
        round_trip(&mut first, b"still\n").unwrap(),
        "the others carry on"
    );
    // HTTP shares pooled connections and is not held to the limit, even
    // from a client that speaks only after the detection window.
    let mut late = connect();
    std::thread::sleep(Duration::from_millis(300));
    late.write_all(b"GET / HTTP/1.1\r\nHost: echo\r\n\r\n")
        .unwrap();
    let mut answer = [0u8; 15];
    late.read_exact(&mut answer)
        .expect("an answer, not a reset");
    assert_eq!(&answer, b"HTTP/1.1 200 OK");

    drop(second);
    // The place is given back once the proxy has seen the close.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut again = connect();
        if matches!(round_trip(&mut again, b"again\n"), Ok(true)) {
            break;
        }
        assert!(Instant::now() < deadline, "room never freed");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// CPU time, in nanoseconds, of the threads of process `pid` named `name`.
fn thread_cpu(pid: u32, name: &str) -> u64 {
    let mut total = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("tasks")
        .flatten()
    {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim() != name {
            continue;
        }
        let stat = std::fs::read_to_string(task.path().join("schedstat")).unwrap_or_default();
        total += stat
            .split_whitespace()
            .next()
            .and_then(|ns| ns.parse::<u64>().ok())
            .unwrap_or(0);
    }
    total
}

#[test]
fn connections_are_shared_out_to_the_proxys_worker_threads() {
    let mesh = Mesh::new(&[]);
    let server = mesh.meshed_pod("echo", PodOptions::default());
    let client = mesh.meshed_pod(
        "load",
        PodOptions {
            proxy_set: vec!["proxy.workers=2".into()],
            ..Default::default()
        },
    );
    serve_tcp(&server.pod, 9000, echo);
    let dst = SocketAddr::new(server.pod.ip().into(), 9000);
    let pid = client.proxy.pid();
    let before = thread_cpu(pid, "legate-worker-1");
    let echoed = client
        .pod
        .run_in(move || {
            let mut echoed = 0;
            for _ in 0..8 {
                let mut conn = TcpStream::connect(dst).expect("connect");
                conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let mut back = [0u8; 64];
                for _ in 0..200 {
                    conn.write_all(&[9u8; 64]).expect("write");
                    conn.read_exact(&mut back).expect("echo");
                    echoed += 1;
                }
            }
            echoed
        })
        .unwrap();
    assert_eq!(echoed, 1600);
    let spent = thread_cpu(pid, "legate-worker-1") - before;
    assert!(
        spent > 1_000_000,
        "the second worker took {spent} ns of CPU: it carried no connections"
    );
}

fn fill(buf: &mut [u8], state: &mut u64) {
    for chunk in buf.chunks_mut(8) {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        let bytes = state.to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
}

#[test]
fn one_gibibyte_arrives_with_an_identical_sha256() {
    use sha2::{Digest, Sha256};
    const TOTAL: usize = 1 << 30;
    let mesh = Mesh::new(&[]);
    let server = mesh.meshed_pod("sink", PodOptions::default());
    let client = mesh.meshed_pod("source", PodOptions::default());
    serve_tcp(&server.pod, 9100, |mut conn| {
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 256 * 1024];
        let mut total = 0usize;
        loop {
            match conn.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    hasher.update(&buf[..n]);
                    total += n;
                }
                Err(_) => return,
            }
        }
        let digest = hasher.finalize();
        let _ = conn.write_all(format!("{total} {digest:x}").as_bytes());
    });
    let dst = SocketAddr::new(server.pod.ip().into(), 9100);
    let (sent, reply) = client
        .pod
        .run_in(move || {
            let mut s = TcpStream::connect(dst).expect("connect");
            let mut hasher = Sha256::new();
            let mut buf = vec![0u8; 256 * 1024];
            let mut state = 0x9e37_79b9_7f4a_7c15u64;
            let mut sent = 0;
            while sent < TOTAL {
                fill(&mut buf, &mut state);
                hasher.update(&buf);
                s.write_all(&buf).expect("write");
                sent += buf.len();
            }
            s.shutdown(Shutdown::Write).expect("half-close");
            let mut reply = String::new();
            s.read_to_string(&mut reply).expect("digest");
            (format!("{sent} {:x}", hasher.finalize()), reply)
        })
        .unwrap();
    assert_eq!(reply, sent);
}

#[test]
fn ipv6_between_meshed_pods_is_mutual_tls() {
    let mesh = Mesh::new(&[]);
    let server = mesh.meshed_pod("web6", PodOptions::default());
    let client = mesh.meshed_pod("shop6", PodOptions::default());
    let body = secret("ipv6");
    let (_srv, _site) = http_server(&server.pod, 8080, &body);
    let capture = server.pod.capture().expect("capture");
    let (ok, out, err) = curl(
        &client.pod,
        &["-g", &format!("http://[{}]:8080/", server.pod.ip6())],
    );
    assert!(ok, "curl: {err}");
    assert_eq!(out, body);
    let pcap = capture.stop().unwrap();
    assert_mesh_tls_only(&pcap, &[body.as_bytes()]);
}

#[test]
fn transfers_survive_certificate_renewals() {
    // Ten-second certificates renew at half-life, so a 25-second transfer
    // crosses several renewals on both sides.
    let mesh = Mesh::new(&["ca.cert_ttl=10s"]);
    let server = mesh.meshed_pod("long", PodOptions::default());
    let client = mesh.meshed_pod("stream", PodOptions::default());
    serve_tcp(&server.pod, 9200, echo);
    let dst = SocketAddr::new(server.pod.ip().into(), 9200);
    let (echoed, fresh) = client
        .pod
        .run_in(move || {
            let mut long = TcpStream::connect(dst).expect("connect");
            long.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let start = Instant::now();
            let (mut echoed, mut fresh) = (0, 0);
            while start.elapsed() < Duration::from_secs(25) {
                let msg = [0x5a; 1000];
                long.write_all(&msg).expect("the long transfer broke");
                let mut back = [0u8; 1000];
                long.read_exact(&mut back).expect("the long transfer broke");
                assert_eq!(back, msg);
                echoed += 1;
                // A new connection every so often must use the new certificate.
                if echoed % 20 == 0 {
                    let mut s = TcpStream::connect(dst).expect("new connection");
                    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                    s.write_all(b"ping").expect("new connection write");
                    let mut b = [0u8; 4];
                    s.read_exact(&mut b).expect("new connection read");
                    fresh += 1;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            (echoed, fresh)
        })
        .unwrap();
    assert!(
        echoed > 100 && fresh > 5,
        "{echoed} round trips, {fresh} new connections"
    );
    let log = client.proxy.stderr();
    assert!(
        log.matches("renewed").count() >= 2 || log.matches("certificate").count() >= 3,
        "expected renewals in the log:\n{log}"
    );
}

#[test]
fn idle_pooled_connections_are_closed() {
    let mesh = Mesh::new(&[]);
    let server = mesh.meshed_pod("idle-srv", PodOptions::default());
    let client = mesh.meshed_pod(
        "idle-cli",
        PodOptions {
            proxy_set: vec!["proxy.pool_idle_timeout=1s".into()],
            ..Default::default()
        },
    );
    serve_tcp(&server.pod, 9300, echo);
    let dst = SocketAddr::new(server.pod.ip().into(), 9300);
    let mesh_conns = || {
        client
            .pod
            .exec(["ss", "-Htn", "state", "established", "dport", "= :15006"])
            .unwrap()
            .lines()
            .count()
    };
    client
        .pod
        .run_in(move || {
            let mut s = TcpStream::connect(dst).unwrap();
            s.write_all(b"x").unwrap();
            let mut b = [0u8; 1];
            s.read_exact(&mut b).unwrap();
        })
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        mesh_conns(),
        1,
        "the mesh connection stays pooled after the stream"
    );
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(mesh_conns(), 0, "an idle pooled connection is closed");
}

/// A meshed port nothing listens on behaves as a refused connection would
/// without the mesh, as near as a proxy that already accepted can make it:
/// the client's connection is reset, whether it speaks first or waits,
/// from inside the mesh and from outside it.
#[test]
fn a_port_nothing_listens_on_resets_the_clients_connection() {
    let mesh = Mesh::new(&[]);
    let server = mesh.meshed_pod("server", PodOptions::default());
    let client = mesh.meshed_pod("client", PodOptions::default());
    let outsider = mesh.plain_pod("outsider");
    let dst = std::net::SocketAddr::new(server.pod.ip().into(), 9999);
    for pod in [&client.pod, &outsider] {
        for speaks in [false, true] {
            let read = pod
                .run_in(move || -> std::io::Result<std::io::Result<usize>> {
                    let mut s = TcpStream::connect(dst)?;
                    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
                    if speaks {
                        if let Err(e) = s.write_all(b"\x00\x01binary") {
                            return Ok(Err(e));
                        }
                    }
                    Ok(s.read(&mut [0u8; 16]))
                })
                .expect("run in pod")
                .expect("connect");
            assert_eq!(
                read.map_err(|e| e.kind()),
                Err(std::io::ErrorKind::ConnectionReset),
                "speaking first: {speaks}"
            );
        }
    }
}
