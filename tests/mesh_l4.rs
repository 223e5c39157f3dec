//! The mesh at L4, end to end: unchanged applications in two pods talk
//! through `legate init` rules and `legate proxy` sidecars, and the wire
//! carries only mutual TLS.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use common::*;

fn secret(tag: &str) -> String {
    format!("legate-secret-{tag}-{}", std::process::id())
}

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

#[test]
fn http_between_meshed_pods_is_mutual_tls_on_the_wire() {
    let mesh = Mesh::new(&[]);
    let server = mesh.meshed_pod("web", PodOptions::default());
    let client = mesh.meshed_pod("shop", PodOptions::default());

    let site = shared_dir();
    let body = secret("http");
    write_readable(&site.path().join("index.html"), body.as_bytes());
    let _http = server
        .pod
        .command("python3")
        .args(["-m", "http.server", "8080", "--bind", "0.0.0.0"])
        .current_dir(site.path())
        .uid(APP_UID)
        .spawn()
        .expect("http.server");
    server
        .pod
        .wait_for_port(
            SocketAddr::new(server.pod.ip().into(), 8080),
            Duration::from_secs(10),
        )
        .unwrap();

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
    assert!(
        pcap.contains(b"legate/h2"),
        "no mesh ClientHello on the wire"
    );
    assert!(
        pcap.contains(TLS13_SERVER_HELLO_VERSION),
        "no TLS 1.3 ServerHello on the wire"
    );
    assert!(
        !pcap.contains(body.as_bytes()),
        "the plaintext payload crossed the wire"
    );
    assert!(
        !pcap.contains(b"GET /index.html"),
        "the plaintext request crossed the wire"
    );

    let log = server.proxy.stderr();
    assert!(
        log.contains(&client.id()),
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
    assert!(
        pcap.contains(TLS13_SERVER_HELLO_VERSION),
        "no TLS 1.3 on the wire"
    );
    assert!(
        !pcap.contains(value.as_bytes()),
        "the plaintext value crossed the wire"
    );
    assert!(server.proxy.stderr().contains(&client.id()));
}

#[test]
fn half_close_reaches_the_server_and_it_can_still_answer() {
    let mesh = Mesh::new(&[]);
    let server = mesh.meshed_pod("srv", PodOptions::default());
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
    // The first connection also opens the pooled mTLS connection; the
    // second shows the steady state.
    for attempt in 0..2 {
        let (banner, waited) = client
            .pod
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
        if attempt == 1 {
            assert!(
                waited < Duration::from_millis(100),
                "banner took {waited:?}"
            );
        }
    }
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
