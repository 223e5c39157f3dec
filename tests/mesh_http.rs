//! The mesh at L7, end to end: retries, budgets, timeouts, breakers and
//! limits applied by the client's proxy, HTTP semantics preserved across
//! the HTTP/2 hop between proxies, and the client identity header.

mod common;
mod obs_support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;

const PORT: u16 = 8080;

/// A mesh with a scripted server in pod `server` and a meshed client whose
/// proxy gets `client_set`.
fn setup(client_set: &[&str]) -> (Mesh, MeshedPod, MeshedPod, Scripted) {
    let mesh = Mesh::new(&[]);
    let server = mesh.meshed_pod("server", PodOptions::default());
    let client = mesh.meshed_pod(
        "client",
        PodOptions {
            proxy_set: client_set.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        },
    );
    let app = Scripted::start(&server.pod, PORT);
    (mesh, server, client, app)
}

fn url(server: &MeshedPod, path: &str) -> String {
    format!("http://{}:{PORT}{path}", server.pod.ip())
}

#[test]
fn failures_within_the_retry_policy_are_retried() {
    let (_mesh, server, client, app) = setup(&[
        "proxy.http.retry_on=5xx",
        "proxy.http.attempts=3",
        "proxy.http.breaker_failures=0",
    ]);
    let r = request(&client.pod, &[&url(&server, "/fail/2/a")]);
    assert_eq!((r.status, r.body.trim()), (200, "ok after 3"));
    assert_eq!(
        app.count(&server.pod, "a"),
        3,
        "the server saw every attempt"
    );

    // More failures than attempts: the application's own last answer comes back.
    let r = request(&client.pod, &[&url(&server, "/fail/5/b")]);
    assert_eq!(r.status, 500);
    assert_eq!(
        r.header("legate-error"),
        None,
        "the 500 is the application's"
    );
    assert_eq!(app.count(&server.pod, "b"), 3);
}

#[test]
fn the_budget_caps_retries_under_sustained_failure() {
    let (_mesh, server, client, app) = setup(&[
        "proxy.http.retry_on=5xx",
        "proxy.http.attempts=3",
        "proxy.http.budget_ratio=0.2",
        "proxy.http.budget_min_per_second=1",
        "proxy.http.budget_window=10s",
        "proxy.http.breaker_failures=0",
    ]);
    let requests = 50;
    for _ in 0..requests {
        let r = request(&client.pod, &[&url(&server, "/always500/c")]);
        assert_eq!(r.status, 500);
    }
    let seen = app.count(&server.pod, "c");
    // Without a budget: 150 attempts. With it: 50 requests, at most 20% of
    // them in retries, plus the minimum of 1/s over the 10 s window.
    assert!(seen > requests, "some retries happened: {seen}");
    assert!(
        seen <= requests + requests / 5 + 10,
        "the budget let {seen} attempts through"
    );
}

#[test]
fn a_per_try_timeout_cuts_a_slow_attempt_and_the_retry_succeeds() {
    let (_mesh, server, client, app) = setup(&[
        "proxy.http.retry_on=gateway-error",
        "proxy.http.attempts=2",
        "proxy.http.per_try_timeout=500ms",
    ]);
    let r = request(&client.pod, &[&url(&server, "/slowfirst/d/3")]);
    assert_eq!((r.status, r.body.trim()), (200, "attempt 2"));
    assert_eq!(app.count(&server.pod, "d"), 2);
}

#[test]
fn a_request_timeout_answers_504_from_the_proxy() {
    let (_mesh, server, client, _app) = setup(&["proxy.http.request_timeout=300ms"]);
    let r = request(&client.pod, &[&url(&server, "/sleep/2/e")]);
    assert_eq!(r.status, 504);
    // The reason names the timeout that passed, so the operator knows
    // which setting to look at.
    assert_eq!(
        r.header("legate-error").as_deref(),
        Some("request_timeout"),
        "{r:?}"
    );
}

#[test]
fn a_small_post_is_retried_with_its_body_intact_and_a_large_one_is_streamed_once() {
    let (_mesh, server, client, app) = setup(&["proxy.http.retry_on=5xx", "proxy.http.attempts=3"]);
    let files = shared_dir().unwrap();
    let small: Vec<u8> = (0..1024u32).map(|i| (i * 7 % 251) as u8).collect();
    let small_path = files.path().join("small");
    write_readable(&small_path, &small).unwrap();
    let r = request(
        &client.pod,
        &[
            "--data-binary",
            &format!("@{}", small_path.display()),
            &url(&server, "/echo/1/f"),
        ],
    );
    use sha2::Digest;
    let want = format!("1024 {:x}", sha2::Sha256::digest(&small));
    assert_eq!((r.status, r.body.as_str()), (200, want.as_str()));
    assert_eq!(app.count(&server.pod, "f"), 2, "retried once, body intact");

    let large: Vec<u8> = (0..10 << 20).map(|i: u32| (i % 253) as u8).collect();
    let large_path = files.path().join("large");
    write_readable(&large_path, &large).unwrap();
    let r = request(
        &client.pod,
        &[
            "--data-binary",
            &format!("@{}", large_path.display()),
            &url(&server, "/echo/1/g"),
        ],
    );
    assert_eq!(
        r.status, 503,
        "the first answer comes back: a 10 MiB body is not kept for a retry"
    );
    assert_eq!(app.count(&server.pod, "g"), 1);
}

#[test]
fn a_chunked_post_is_retried_when_it_fits_the_buffer_and_streamed_once_when_not() {
    // No Content-Length: the proxy cannot wait for the end before sending,
    // so it keeps a copy as the body passes.
    let (_mesh, server, client, app) = setup(&["proxy.http.retry_on=5xx", "proxy.http.attempts=3"]);
    let files = shared_dir().unwrap();
    let post = |name: &str, body: &[u8], path: &str| {
        let file = files.path().join(name);
        write_readable(&file, body).unwrap();
        request(
            &client.pod,
            &[
                "-H",
                "Transfer-Encoding: chunked",
                "--data-binary",
                &format!("@{}", file.display()),
                &url(&server, path),
            ],
        )
    };
    use sha2::Digest;
    let small: Vec<u8> = (0..1024u32).map(|i| (i * 13 % 251) as u8).collect();
    let r = post("small", &small, "/echo/2/h");
    let want = format!("1024 {:x}", sha2::Sha256::digest(&small));
    assert_eq!((r.status, r.body.as_str()), (200, want.as_str()));
    assert_eq!(app.count(&server.pod, "h"), 3, "retried twice, body intact");

    let large: Vec<u8> = (0..10 << 20).map(|i: u32| (i % 247) as u8).collect();
    let r = post("large", &large, "/echo/1/i");
    assert_eq!(r.status, 503, "a 10 MiB body outgrows the buffer");
    assert_eq!(app.count(&server.pod, "i"), 1);
}

#[test]
fn the_breaker_opens_answers_503_itself_and_recovers_half_open() {
    let (_mesh, server, client, app) = setup(&[
        "proxy.http.breaker_failures=3",
        "proxy.http.breaker_base_ejection=2s",
        "proxy.http.attempts=1",
    ]);
    for _ in 0..3 {
        assert_eq!(
            request(&client.pod, &[&url(&server, "/fail/3/h")]).status,
            500
        );
    }
    let r = request(&client.pod, &[&url(&server, "/fail/3/h")]);
    assert_eq!(r.status, 503);
    assert_eq!(r.header("legate-error").as_deref(), Some("breaker_open"));
    assert_eq!(
        app.count(&server.pod, "h"),
        3,
        "an open breaker does not touch the server"
    );

    std::thread::sleep(Duration::from_millis(2200));
    let r = request(&client.pod, &[&url(&server, "/fail/3/h")]);
    assert_eq!(
        r.status, 200,
        "the half-open probe reaches the healed server"
    );
    let r = request(&client.pod, &[&url(&server, "/fail/3/h")]);
    assert_eq!(r.status, 200, "and the breaker is closed again");
    assert_eq!(app.count(&server.pod, "h"), 5);
}

/// Sends `wire` from `pod` to `dst` as it is, then half-closes (a client
/// that gives up mid-upload) and returns the answer.
fn raw_exchange(pod: &legate_testbed::Pod, dst: SocketAddr, wire: &'static [u8]) -> String {
    pod.run_in(move || -> std::io::Result<String> {
        let mut s = TcpStream::connect(dst)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(wire)?;
        s.shutdown(std::net::Shutdown::Write)?;
        let mut reply = Vec::new();
        s.read_to_end(&mut reply)?;
        Ok(String::from_utf8_lossy(&reply).into_owned())
    })
    .unwrap()
    .expect("raw exchange")
}

/// A client whose request body breaks off (malformed chunked framing, or
/// gone part-way through an upload) is answered 400 by its own proxy, and
/// its failures are not the server's: the breaker stays closed for
/// everyone else.
#[test]
fn a_request_body_that_breaks_off_is_the_clients_fault_not_the_servers() {
    let (_mesh, server, client, app) = setup(&[
        "proxy.http.breaker_failures=2",
        "proxy.http.attempts=3",
        "proxy.http.retry_on=5xx,reset",
    ]);
    let dst = SocketAddr::new(server.pod.ip().into(), PORT);
    let broken: [&'static [u8]; 2] = [
        b"POST /sink/k HTTP/1.1\r\nHost: server\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\nzz\r\n",
        b"POST /sink/k HTTP/1.1\r\nHost: server\r\nContent-Length: 100000\r\n\r\nonly the start",
    ];
    for _ in 0..2 {
        for wire in broken {
            let reply = raw_exchange(&client.pod, dst, wire);
            assert!(reply.starts_with("HTTP/1.1 400"), "{reply:?}");
            assert!(
                reply.contains("legate-error: request body could not be read"),
                "{reply:?}"
            );
        }
    }
    let r = request(&client.pod, &[&url(&server, "/ok/k")]);
    assert_eq!(r.status, 200, "the breaker is still closed");
    assert!(
        app.count(&server.pod, "k") <= 5,
        "no broken upload was retried"
    );
}

/// Sends `wire` and keeps the connection open, as a client still uploading
/// does, until the head of an answer arrives.
fn unfinished_upload(pod: &legate_testbed::Pod, dst: SocketAddr, wire: &'static [u8]) -> String {
    pod.run_in(move || -> std::io::Result<String> {
        let mut s = TcpStream::connect(dst)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(wire)?;
        let mut reply = Vec::new();
        let mut buf = [0; 4096];
        while !reply.windows(4).any(|w| w == b"\r\n\r\n") {
            match s.read(&mut buf)? {
                0 => break,
                n => reply.extend_from_slice(&buf[..n]),
            }
        }
        Ok(String::from_utf8_lossy(&reply).into_owned())
    })
    .unwrap()
    .expect("unfinished upload")
}

/// A timeout that passes while the client is still uploading is answered
/// 504, and not counted against the destination: a slow uploader must not
/// open the breaker that every other client of a healthy server goes
/// through.
#[test]
fn a_timeout_during_a_slow_upload_does_not_count_against_the_server() {
    let (_mesh, server, client, app) = setup(&[
        "proxy.http.per_try_timeout=400ms",
        "proxy.http.breaker_failures=2",
        "proxy.http.attempts=3",
        "proxy.http.retry_on=5xx,reset",
    ]);
    let dst = SocketAddr::new(server.pod.ip().into(), PORT);
    let slow: [&'static [u8]; 2] = [
        // Longer than the retry buffer: streamed as it comes.
        b"POST /sink/t HTTP/1.1\r\nHost: server\r\nContent-Length: 100000\r\n\r\nthe start",
        // Of unknown length: copied as it streams, in case of a retry.
        b"POST /sink/t HTTP/1.1\r\nHost: server\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n",
    ];
    for _ in 0..2 {
        for wire in slow {
            let reply = unfinished_upload(&client.pod, dst, wire);
            assert!(reply.starts_with("HTTP/1.1 504"), "{reply:?}");
            assert!(reply.contains("legate-error: per_try_timeout"), "{reply:?}");
        }
    }
    let r = request(&client.pod, &[&url(&server, "/ok/t")]);
    assert_eq!(r.status, 200, "the breaker is still closed: {r:?}");
    assert!(
        app.count(&server.pod, "t") <= 5,
        "no cut-off upload was retried"
    );
}

#[test]
fn a_limit_on_requests_in_flight_rejects_the_excess_at_once() {
    let (_mesh, server, client, _app) = setup(&["proxy.http.max_in_flight=2"]);
    let slow = url(&server, "/sleep/3/i");
    let pods: Vec<_> = (0..2)
        .map(|_| {
            let pod = client.pod.command("curl").args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                &slow,
            ]);
            pod.uid(APP_UID).spawn().expect("slow curl")
        })
        .collect();
    std::thread::sleep(Duration::from_millis(700));
    let start = std::time::Instant::now();
    let r = request(&client.pod, &[&url(&server, "/ok/j")]);
    assert_eq!(r.status, 503);
    assert_eq!(r.header("legate-error").as_deref(), Some("max_in_flight"));
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "rejected without queueing"
    );
    for mut p in pods {
        p.wait_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(p.stdout(), "200");
    }
}

/// From `pod`: sends `first`, pauses 300 ms, sends `rest`, and reads the
/// answer until the server closes.
fn send_in_two(
    pod: &legate_testbed::Pod,
    dst: SocketAddr,
    first: &'static [u8],
    rest: &'static [u8],
) -> String {
    let reply = pod
        .run_in(move || -> std::io::Result<Vec<u8>> {
            let mut s = TcpStream::connect(dst)?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            s.write_all(first)?;
            std::thread::sleep(Duration::from_millis(300));
            s.write_all(rest)?;
            let mut reply = Vec::new();
            s.read_to_end(&mut reply)?;
            Ok(reply)
        })
        .unwrap()
        .expect("a request");
    String::from_utf8_lossy(&reply).into_owned()
}

#[test]
fn the_server_app_gets_the_verified_client_identity_and_never_a_forged_one() {
    let (mesh, server, client, _app) = setup(&[]);
    let forged = "legate-client-id: spiffe://legate.local/admin";
    let r = request(&client.pod, &["-H", forged, &url(&server, "/headers")]);
    assert_eq!(r.status, 200);
    let headers: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(headers["legate-client-id"], client.id(), "{headers}");
    assert!(!headers.to_string().contains("admin"));
    assert!(headers.get("legate-target").is_none() && headers.get("legate-proto").is_none());

    let outsider = mesh.plain_pod("outsider");
    let r = request(&outsider, &["-H", forged, &url(&server, "/headers")]);
    let headers: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert!(
        headers.get("legate-client-id").is_none(),
        "a client outside the mesh forged it: {headers}"
    );
    // CGI, WSGI and PHP read `legate_client_id` as the same header.
    let lookalike = "legate_client_id: spiffe://legate.local/admin";
    for pod in [&client.pod, &outsider] {
        let r = request(pod, &["-H", lookalike, &url(&server, "/headers")]);
        assert_eq!(r.status, 200);
        assert!(!r.body.contains("admin"), "{}", r.body);
    }

    // Nor is there a way around the HTTP path, where the forged copy is
    // removed, through the mesh or from outside it: a client that speaks
    // only after a pause (a pool that opens its connections ahead of use),
    // one whose request line stalls part-way, one with bare LF line ends.
    let dst = SocketAddr::new(server.pod.ip().into(), PORT);
    let request = b"GET /headers HTTP/1.1\r\nHost: server\r\nConnection: close\r\nlegate-client-id: spiffe://legate.local/admin\r\n\r\n";
    let bare_lf = b"GET /headers HTTP/1.1\nHost: server\nConnection: close\nlegate-client-id: spiffe://legate.local/admin\n\n";
    // Nor through a request line that detection might not have known for
    // one: after empty lines (which servers skip), or with a method beyond
    // the common ones.
    let after_empty_lines = b"\r\n\r\nGET /headers HTTP/1.1\r\nHost: server\r\nConnection: close\r\nlegate-client-id: spiffe://legate.local/admin\r\n\r\n";
    let propfind = b"PROPFIND /headers HTTP/1.1\r\nHost: server\r\nConnection: close\r\nlegate-client-id: spiffe://legate.local/admin\r\n\r\n";
    let shapes: [(&str, &'static [u8], &'static [u8]); 5] = [
        ("a late request", b"", request),
        ("a stalled request line", b"GE", &request[2..]),
        ("bare LF", b"", bare_lf),
        ("empty lines first", b"", after_empty_lines),
        ("another method", b"PROPFIND /hea", &propfind[13..]),
    ];
    for (shape, first, rest) in shapes {
        let send = |pod: &legate_testbed::Pod| -> serde_json::Value {
            let reply = send_in_two(pod, dst, first, rest);
            let (head, body) = reply.split_once("\r\n\r\n").expect("a whole answer");
            assert!(head.starts_with("HTTP/1.1 200"), "{shape}: {reply}");
            serde_json::from_str(body).unwrap()
        };
        let headers = send(&client.pod);
        assert_eq!(
            headers["legate-client-id"],
            client.id(),
            "{shape}: {headers}"
        );
        let headers = send(&outsider);
        assert!(
            headers.get("legate-client-id").is_none(),
            "{shape} from outside the mesh forged it: {headers}"
        );
    }
    // A request line that a lenient server might take (a trailing space)
    // is refused, not passed on.
    let trailing_space = b"GET /headers HTTP/1.1 \r\nHost: server\r\nlegate-client-id: spiffe://legate.local/admin\r\n\r\n";
    for pod in [&client.pod, &outsider] {
        let reply = tcp_exchange(pod, dst, trailing_space).expect("a request");
        let reply = String::from_utf8_lossy(&reply);
        assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
    }
}

#[test]
fn a_request_line_taken_for_opaque_bytes_never_reaches_the_app() {
    // The first piece cannot begin a common method, so detection takes
    // the connection for opaque bytes at once; the rest of the line and a
    // forged identity follow after a pause. The application (which takes
    // PROPFIND) must never see that request.
    let (mesh, server, client, _app) = setup(&[]);
    let outsider = mesh.plain_pod("outsider");
    let dst = SocketAddr::new(server.pod.ip().into(), PORT);
    let rest = b"IND /headers HTTP/1.1\r\nHost: server\r\nConnection: close\r\nlegate-client-id: spiffe://legate.local/admin\r\n\r\n";
    for pod in [&client.pod, &outsider] {
        let reply = pod
            .run_in(move || -> Vec<u8> {
                let Ok(mut s) = TcpStream::connect(dst) else {
                    return Vec::new();
                };
                let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
                let _ = s.write_all(b"PROPF");
                std::thread::sleep(Duration::from_millis(300));
                let _ = s.write_all(rest);
                let mut reply = Vec::new();
                // Closed or reset: either way, what came back is checked.
                let _ = s.read_to_end(&mut reply);
                reply
            })
            .expect("run in pod");
        let reply = String::from_utf8_lossy(&reply);
        assert!(
            !reply.contains("admin"),
            "a forged identity arrived: {reply}"
        );
        assert!(!reply.contains("HTTP/1.1 200"), "{reply}");
    }
    // Nor does one with tabs for spaces, or a space before it, which a
    // lenient server (this one) takes, though it comes whole.
    let tabs = b"GET\t/headers\tHTTP/1.1\r\nHost: server\r\nConnection: close\r\nlegate-client-id: spiffe://legate.local/admin\r\n\r\n";
    let space_first = b" GET /headers HTTP/1.1\r\nHost: server\r\nConnection: close\r\nlegate-client-id: spiffe://legate.local/admin\r\n\r\n";
    let mut padded = b"GET\t/headers\tHTTP/1.1".to_vec();
    padded.extend([b'\t'; 40]);
    padded.extend(b"\r\nHost: server\r\nConnection: close\r\nlegate-client-id: spiffe://legate.local/admin\r\n\r\n");
    for line in [&tabs[..], space_first, &padded] {
        for pod in [&client.pod, &outsider] {
            let reply = tcp_exchange(pod, dst, line).unwrap_or_default();
            let reply = String::from_utf8_lossy(&reply);
            assert!(
                !reply.contains("admin"),
                "a forged identity arrived: {reply}"
            );
        }
    }
    // Bytes of another protocol split the same way still pass: the
    // application gets the line and answers it (with an error page that
    // names it).
    for pod in [&client.pod, &outsider] {
        let reply = send_in_two(pod, dst, b"ru", b"ok\n");
        assert!(reply.contains("Bad request syntax ('ruok')"), "{reply}");
    }
    // Each closed connection is counted, through the mesh and from
    // outside it alike.
    let metrics = obs_support::scrape(&server.pod);
    let closed = obs_support::metric(&metrics, "legate_opaque_http_closed_total", &[]);
    assert_eq!(closed, 8.0, "{metrics}");
}

/// Sends `request`, a `CONNECT`, and once it is answered `payload`
/// through the tunnel; returns the answer's head and what came back
/// through the tunnel.
fn through_connect(
    pod: &legate_testbed::Pod,
    dst: SocketAddr,
    request: &'static [u8],
    payload: &'static [u8],
) -> (String, Vec<u8>) {
    pod.run_in(move || -> std::io::Result<(String, Vec<u8>)> {
        let mut s = TcpStream::connect(dst)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(request)?;
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            s.read_exact(&mut byte)?;
            head.push(byte[0]);
        }
        s.write_all(payload)?;
        let mut echoed = vec![0u8; payload.len()];
        s.read_exact(&mut echoed)?;
        Ok((String::from_utf8_lossy(&head).into_owned(), echoed))
    })
    .unwrap()
    .expect("a tunnel")
}

#[test]
fn a_connect_request_is_no_way_around_the_identity_header() {
    // The application is an HTTP proxy. A CONNECT it declines leaves the
    // connection open for the next request, as hyper's server does: taken
    // for opaque bytes, that request and the CONNECT would both reach it
    // with a forged identity.
    let (mesh, server, client, _app) = setup(&[]);
    let outsider = mesh.plain_pod("outsider");
    let dst = SocketAddr::new(server.pod.ip().into(), PORT);
    let forged = b"CONNECT elsewhere:443 HTTP/1.1\r\nHost: elsewhere:443\r\nlegate-client-id: spiffe://legate.local/admin\r\n\r\nGET /headers HTTP/1.1\r\nHost: server\r\nConnection: close\r\nlegate_client_id: spiffe://legate.local/admin\r\n\r\n";
    for (pod, id) in [(&client.pod, Some(client.id())), (&outsider, None)] {
        let reply = tcp_exchange(pod, dst, forged).expect("an exchange");
        let reply = String::from_utf8_lossy(&reply);
        assert!(reply.starts_with("HTTP/1.1 405"), "{reply}");
        assert!(
            reply.contains("HTTP/1.1 200"),
            "no answer to the next request: {reply}"
        );
        assert!(
            !reply.contains("admin"),
            "a forged identity arrived: {reply}"
        );
        match id {
            Some(id) => assert_eq!(reply.matches(id).count(), 2, "{reply}"),
            None => assert!(!reply.contains("legate-client-id"), "{reply}"),
        }
    }
    // A CONNECT the application accepts is still a tunnel, through the
    // mesh and from outside it; so is one in HTTP/1.0 without Host, as
    // Python's http.client before 3.12 asks for one.
    let http11 = b"CONNECT tunnel:443 HTTP/1.1\r\nHost: tunnel:443\r\n\r\n";
    let http10 = b"CONNECT tunnel:443 HTTP/1.0\r\n\r\n";
    for (pod, request) in [
        (&client.pod, &http11[..]),
        (&outsider, http11),
        (&client.pod, http10),
        (&outsider, http10),
    ] {
        let (head, echoed) = through_connect(pod, dst, request, b"through the tunnel");
        assert!(head.starts_with("HTTP/1."), "{head}");
        assert!(head[8..].starts_with(" 200"), "{head}");
        assert!(
            !head.to_ascii_lowercase().contains("content-length"),
            "{head}"
        );
        assert_eq!(echoed, b"through the tunnel");
    }
}

#[test]
fn a_port_the_clients_proxy_carries_as_opaque_still_gets_the_identity_guarded() {
    // The client's proxy tunnels every connection to the port as opaque
    // bytes; the server's proxy, which does not, finds HTTP inside the
    // tunnel and serves it with the identity it verified.
    let opaque = format!("proxy.opaque_ports={PORT}");
    let (_mesh, server, client, _app) = setup(&[&opaque]);
    let dst = SocketAddr::new(server.pod.ip().into(), PORT);
    let forged = b"GET /headers HTTP/1.1\r\nHost: server\r\nConnection: close\r\nlegate-client-id: spiffe://legate.local/admin\r\nlegate_client_id: spiffe://legate.local/admin\r\n\r\n";
    let reply = tcp_exchange(&client.pod, dst, forged).expect("a request");
    let reply = String::from_utf8_lossy(&reply);
    let (head, body) = reply.split_once("\r\n\r\n").expect("a whole answer");
    assert!(head.starts_with("HTTP/1.1 200"), "{reply}");
    let headers: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(headers["legate-client-id"], client.id(), "{headers}");
    assert!(!body.contains("admin"), "{body}");
    // A request line split across writes is still found.
    let reply = send_in_two(&client.pod, dst, &forged[..5], &forged[5..]);
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(
        reply.contains(client.id()) && !reply.contains("admin"),
        "{reply}"
    );
    // Keep-alive requests on the tunnel are all served.
    let r = request(
        &client.pod,
        &[
            "-H",
            "legate-client-id: spiffe://legate.local/admin",
            &url(&server, "/headers"),
            &url(&server, "/headers"),
        ],
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.body.matches(client.id()).count(), 2, "{}", r.body);
    assert!(!r.body.contains("admin"), "{}", r.body);
    // An upgrade the application declines leaves the connection to go on
    // as HTTP/1.1, and when it closes, its last answer arrives whole.
    let declined = b"GET /headers HTTP/1.1\r\nHost: server\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\nGET /headers HTTP/1.1\r\nHost: server\r\nConnection: close\r\n\r\n";
    for _ in 0..5 {
        let reply = tcp_exchange(&client.pod, dst, declined).expect("an exchange");
        let reply = String::from_utf8_lossy(&reply);
        assert_eq!(reply.matches("HTTP/1.1 200").count(), 2, "{reply}");
        assert!(
            reply.ends_with('}'),
            "the last answer was cut short: {reply}"
        );
    }
}

#[test]
fn a_peer_proxy_whose_client_hello_is_late_is_still_served() {
    // A peer proxy on a slow or loaded machine may send its ClientHello
    // well after the connection is up. In the server's pod, a relay takes
    // the client proxy's connections to the mesh port, holds their first
    // bytes for 300 ms and then passes everything on. No client outside
    // the mesh may speak on that port: only the late handshake is welcome
    // there, and it must be served, not refused.
    const RELAY: u16 = 15990;
    let (_mesh, server, client, _app) = setup(&[]);
    let listener = server
        .pod
        .run_in(|| std::net::TcpListener::bind(("0.0.0.0", RELAY)))
        .unwrap()
        .expect("bind the relay");
    let relayed = Arc::new(AtomicUsize::new(0));
    let upstream = server.pod.clone();
    let count = relayed.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            count.fetch_add(1, Ordering::SeqCst);
            let upstream = upstream.clone();
            std::thread::spawn(move || {
                let mut from_peer = conn;
                let Ok(Ok(mut to_proxy)) =
                    upstream.run_in(|| TcpStream::connect(("127.0.0.1", 15006)))
                else {
                    return;
                };
                let mut first = [0u8; 16 * 1024];
                let Ok(n) = from_peer.read(&mut first) else {
                    return;
                };
                std::thread::sleep(Duration::from_millis(300));
                if to_proxy.write_all(&first[..n]).is_err() {
                    return;
                }
                let (Ok(mut a), Ok(mut b)) = (from_peer.try_clone(), to_proxy.try_clone()) else {
                    return;
                };
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut a, &mut b);
                    let _ = b.shutdown(std::net::Shutdown::Write);
                });
                let _ = std::io::copy(&mut to_proxy, &mut from_peer);
                let _ = from_peer.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    let client_ip = client.pod.ip().to_string();
    let relay = RELAY.to_string();
    server
        .pod
        .exec([
            "iptables",
            "-t",
            "nat",
            "-I",
            "PREROUTING",
            "1",
            "-p",
            "tcp",
            "-s",
            &client_ip,
            "--dport",
            "15006",
            "-j",
            "REDIRECT",
            "--to-ports",
            &relay,
        ])
        .expect("the relay's rule");
    let r = request(
        &client.pod,
        &[
            "-H",
            "legate-client-id: spiffe://legate.local/admin",
            &url(&server, "/headers"),
        ],
    );
    assert_eq!(r.status, 200, "{}{}", r.headers, r.body);
    let headers: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(headers["legate-client-id"], client.id(), "{headers}");
    assert!(
        relayed.load(Ordering::SeqCst) > 0,
        "the relay was passed by"
    );
}

#[test]
fn http_semantics_survive_the_hop_between_proxies() {
    let (mesh, server, client, app) = setup(&[]);
    // The Host header arrives as the client sent it.
    let r = request(
        &client.pod,
        &["-H", "Host: shop.example:8080", &url(&server, "/headers")],
    );
    let headers: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(headers["host"], "shop.example:8080");
    // So does one that is no valid URI authority (it has a space and
    // braces): the application judges it, as it would without the proxy.
    let r = request(
        &client.pod,
        &["-H", "Host: legacy {name}", &url(&server, "/headers")],
    );
    let headers: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(headers["host"], "legacy {name}");
    // A head of tens of kilobytes (large cookies, tokens) arrives whole, as
    // it would without the mesh.
    let big = format!("X-Big: {}", "b".repeat(40 * 1024));
    let r = request(&client.pod, &["-H", &big, &url(&server, "/headers")]);
    assert_eq!(r.status, 200, "{}", r.headers);
    let headers: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(headers["x-big"].as_str().map(str::len), Some(40 * 1024));
    // An HTTP/1.0 request without Host reaches the application with the
    // destination it was sent to as its Host, which HTTP/1.1 requires.
    let dst = SocketAddr::new(server.pod.ip().into(), PORT);
    let reply =
        tcp_exchange(&client.pod, dst, b"GET /headers HTTP/1.0\r\n\r\n").expect("HTTP/1.0 request");
    let reply = String::from_utf8_lossy(&reply);
    let (head, body) = reply.split_once("\r\n\r\n").expect("a whole answer");
    assert!(head.contains(" 200 "), "{reply:?}");
    let headers: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(headers["host"], dst.to_string());

    // curl's --http2 on an http:// URL asks to upgrade the connection to
    // h2c: the request is answered as the HTTP/1.1 request it also is.
    let r = request(&client.pod, &["--http2", &url(&server, "/headers")]);
    assert_eq!(r.status, 200, "{}", r.headers);
    let headers: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert!(
        headers.get("upgrade").is_none() && headers.get("http2-settings").is_none(),
        "{headers}"
    );

    // A body in another transfer coding than chunked could not say so
    // once the hop-by-hop header is gone: refused as RFC 9112 says, and
    // the application never sees it.
    let coded: &'static [u8] = b"POST /sink/coded HTTP/1.1\r\nHost: server\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n";
    let outsider = mesh.plain_pod("outsider");
    for pod in [&client.pod, &outsider] {
        let reply = raw_exchange(pod, dst, coded);
        assert!(reply.starts_with("HTTP/1.1 501"), "{reply:?}");
        assert!(reply.contains("legate-error: transfer coding other than chunked"));
    }
    assert_eq!(app.count(&server.pod, "coded"), 0);

    // A chunked upload arrives whole.
    let r = request(
        &client.pod,
        &[
            "-H",
            "Transfer-Encoding: chunked",
            "--data-binary",
            "chunked body",
            &url(&server, "/sink/k"),
        ],
    );
    use sha2::Digest;
    assert_eq!(
        r.body,
        format!("12 {:x}", sha2::Sha256::digest(b"chunked body"))
    );

    // A chunked response with a trailer keeps the trailer.
    let (ok, out, err) = curl(
        &client.pod,
        &["--raw", "-H", "TE: trailers", &url(&server, "/trailers")],
    );
    assert!(ok, "{err}");
    assert!(
        out.contains("first piece,") && out.contains("second piece"),
        "{out}"
    );
    assert!(
        out.to_ascii_lowercase().contains("x-checksum: 12345"),
        "the trailer was lost: {out:?}"
    );

    // Expect: 100-continue is honoured.
    let r = request(
        &client.pod,
        &[
            "-H",
            "Expect: 100-continue",
            "--data-binary",
            "after continue",
            &url(&server, "/sink/l"),
        ],
    );
    assert_eq!(r.status, 200);
}

/// Requests pipelined in one write, with answers that have no body (to
/// HEAD, 204, 304), come back whole and in order, each framed right, from
/// inside the mesh and from outside it; and the proxy's own answer to
/// HEAD over HTTP/2 has no content.
#[test]
fn pipelined_requests_and_bodiless_answers_keep_their_framing() {
    let (mesh, server, client, app) = setup(&[]);
    let dst = SocketAddr::new(server.pod.ip().into(), PORT);
    let wire: &[u8] = b"HEAD /headers HTTP/1.1\r\nHost: server\r\n\r\n\
        GET /status/204/p HTTP/1.1\r\nHost: server\r\n\r\n\
        GET /status/304/p HTTP/1.1\r\nHost: server\r\n\r\n\
        GET /ok/p HTTP/1.1\r\nHost: server\r\nConnection: close\r\n\r\n";
    let outsider = mesh.plain_pod("outsider");
    for pod in [&client.pod, &outsider] {
        let reply = tcp_exchange(pod, dst, wire).expect("pipelined requests");
        let reply = String::from_utf8_lossy(&reply);
        let statuses: Vec<&str> = reply
            .match_indices("HTTP/1.1 ")
            .map(|(i, _)| &reply[i + 9..i + 12])
            .collect();
        assert_eq!(statuses, ["200", "204", "304", "200"], "{reply:?}");
        assert!(
            !reply.contains('{'),
            "the HEAD answer carried a body: {reply:?}"
        );
        assert!(reply.ends_with("\r\n\r\nok\n"), "{reply:?}");
        // HEAD from an HTTP/2 client to a port nothing serves: the
        // proxy's own 502, without the text it carries for other methods,
        // which over HTTP/2 went out as DATA and reached the client as a
        // protocol error in place of the status.
        let nothing = format!("http://{}:{}/", server.pod.ip(), PORT + 1);
        let r = request(pod, &["--http2-prior-knowledge", "-I", &nothing]);
        assert_eq!(r.status, 502, "{}", r.headers);
        assert!(r.headers.contains("legate-error: "), "{}", r.headers);
        assert_eq!(r.body, "");
    }
    assert_eq!(app.count(&server.pod, "p"), 6);
}

/// What a client's request says about its own connection stays on it, and
/// an absolute target names the host, whether the client is inside the
/// mesh or outside it; and an HTTP/1.0 client's kept connection is
/// announced as kept.
#[test]
fn hop_by_hop_fields_absolute_targets_and_http10_keep_alive_at_either_entry() {
    let (mesh, server, client, _app) = setup(&[]);
    let dst = SocketAddr::new(server.pod.ip().into(), PORT);
    let outsider = mesh.plain_pod("outsider");
    for pod in [&client.pod, &outsider] {
        let wire = b"GET http://shop.example:8080/headers HTTP/1.1\r\nHost: other\r\n\
            Connection: close, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\n\
            Proxy-Connection: keep-alive\r\nX-End: 2\r\n\r\n";
        let reply = tcp_exchange(pod, dst, wire).expect("request");
        let reply = String::from_utf8_lossy(&reply);
        let (head, body) = reply.split_once("\r\n\r\n").expect("a whole answer");
        assert!(head.starts_with("HTTP/1.1 200"), "{reply:?}");
        let seen: serde_json::Value = serde_json::from_str(body).expect(body);
        assert_eq!(seen["host"], "shop.example:8080", "{seen}");
        assert_eq!(seen["x-end"], "2", "{seen}");
        for hop in ["connection", "x-hop", "keep-alive", "proxy-connection"] {
            assert!(
                seen.get(hop).is_none(),
                "{hop} reached the application: {seen}"
            );
        }

        // Two requests of an HTTP/1.0 client on one connection: the first
        // asks to keep it and is told it is kept; the second does not.
        let wire = b"GET /ok/k HTTP/1.0\r\nConnection: keep-alive\r\n\r\n\
            GET /ok/k HTTP/1.0\r\n\r\n";
        let reply = tcp_exchange(pod, dst, wire).expect("HTTP/1.0 requests");
        let reply = String::from_utf8_lossy(&reply).to_ascii_lowercase();
        let answers: Vec<&str> = reply.split("http/1.0 200").skip(1).collect();
        assert_eq!(answers.len(), 2, "{reply:?}");
        assert!(answers[0].contains("connection: keep-alive"), "{reply:?}");
        assert!(!answers[1].contains("keep-alive"), "{reply:?}");
    }
}

/// Serves canned HTTP/1.1 answers in `pod` on `port`, one per request,
/// chosen by the request's path, closing after it when its flag says so, as a
/// server whose body ends at the close does. Anything else gets `next`.
fn serve_canned(pod: &legate_testbed::Pod, port: u16, answers: &'static [(&str, &[u8], bool)]) {
    use std::io::BufRead;
    let listener = pod
        .run_in(move || std::net::TcpListener::bind(("0.0.0.0", port)))
        .expect("run in pod")
        .expect("bind");
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let Ok(read) = conn.try_clone() else { return };
                let (mut conn, mut r) = (conn, std::io::BufReader::new(read));
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    loop {
                        let mut h = String::new();
                        if r.read_line(&mut h).unwrap_or(0) == 0 {
                            return;
                        }
                        if h.trim().is_empty() {
                            break;
                        }
                    }
                    let path = line.split(' ').nth(1).unwrap_or("/");
                    let (wire, close) = answers.iter().find(|(p, _, _)| *p == path).map_or(
                        (
                            &b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nnext"[..],
                            false,
                        ),
                        |a| (a.1, a.2),
                    );
                    if conn.write_all(wire).is_err() || close {
                        return;
                    }
                }
            });
        }
    });
}

/// Answers an application frames oddly or wrongly reach the client framed
/// right, or as the proxy's 502, and the client's connection carries its
/// next request either way, inside the mesh and from outside it.
#[test]
fn odd_or_broken_answers_from_the_application_leave_the_clients_connection_usable() {
    let (mesh, server, client, _app) = setup(&[]);
    let outsider = mesh.plain_pod("outsider");
    const CANNED: u16 = 9100;
    serve_canned(
        &server.pod,
        CANNED,
        &[
            ("/until-close", b"HTTP/1.1 200 OK\r\n\r\nbody until close", true),
            ("/http10", b"HTTP/1.0 200 OK\r\n\r\nold style", true),
            // Transfer-Encoding wins; the length beside it must not reach
            // the client, whose connection it broke without an answer.
            (
                "/length-and-chunked",
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
                false,
            ),
            ("/bad-field", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX Bad: 1\r\n\r\nok", false),
            ("/two-lengths", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok", false),
        ],
    );
    let cases = [
        ("/until-close", 200, "body until close"),
        ("/http10", 200, "old style"),
        ("/length-and-chunked", 200, "abc"),
        ("/bad-field", 502, "legate: application_error\n"),
        ("/two-lengths", 502, "legate: application_error\n"),
    ];
    for pod in [&client.pod, &outsider] {
        for (path, status, body) in cases {
            let first = format!("http://{}:{CANNED}{path}", server.pod.ip());
            let next = format!("http://{}:{CANNED}/next", server.pod.ip());
            let (ok, out, err) = curl(pod, &["-sS", "-i", "--max-time", "5", &first, &next]);
            assert!(ok, "{path}: {err}");
            let answers: Vec<&str> = out.split("HTTP/1.1 ").skip(1).collect();
            assert_eq!(answers.len(), 2, "{path}: {out:?}");
            assert!(
                answers[0].starts_with(&status.to_string()),
                "{path}: {out:?}"
            );
            assert!(
                answers[0].ends_with(&format!("\r\n\r\n{body}")),
                "{path}: {out:?}"
            );
            assert!(
                answers[1].starts_with("200") && answers[1].ends_with("next"),
                "{path}: {out:?}"
            );
        }
    }
}

/// A request whose Host is missing (HTTP/1.1) or doubled (HTTP/1.x or
/// HTTP/2) is refused with 400 before it reaches the application, at both
/// entries: two copies could name one host to the proxy's policy and
/// another to the application.
#[test]
fn requests_with_a_missing_or_doubled_host_are_refused_at_either_entry() {
    let (mesh, server, client, app) = setup(&[]);
    let dst = SocketAddr::new(server.pod.ip().into(), PORT);
    let outsider = mesh.plain_pod("outsider");
    let refused: [(&'static [u8], &str); 4] = [
        (
            b"GET /ok/host HTTP/1.1\r\nX-A: 1\r\n\r\n",
            "HTTP/1.1 request without a Host header",
        ),
        (
            b"GET /ok/host HTTP/1.1\r\nHost: shop\r\nHost: admin\r\n\r\n",
            "request with more than one Host header",
        ),
        (
            b"GET /ok/host HTTP/1.0\r\nHost: shop\r\nHost: shop\r\n\r\n",
            "request with more than one Host header",
        ),
        (
            b"GET /ws HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
              Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
            "HTTP/1.1 request without a Host header",
        ),
    ];
    for pod in [&client.pod, &outsider] {
        for (wire, why) in refused {
            let reply = raw_exchange(pod, dst, wire);
            assert!(reply.contains(" 400 "), "{reply:?}");
            assert!(reply.contains(&format!("legate-error: {why}")), "{reply:?}");
        }
        // HTTP/1.0 may leave Host out.
        let reply = raw_exchange(pod, dst, b"GET /ok/host10 HTTP/1.0\r\n\r\n");
        assert!(reply.contains(" 200 "), "{reply:?}");
        // Nor may an HTTP/2 request name two.
        let two_hosts = http::Request::get("/ok/host")
            .header("host", "shop")
            .header("host", "admin")
            .body(())
            .unwrap();
        let res = h2_exchange(pod, dst, Duration::ZERO, two_hosts);
        assert_eq!(res.status, 400, "{res:?}");
        assert_eq!(
            res.headers["legate-error"],
            "request with more than one Host header"
        );
    }
    assert_eq!(app.count(&server.pod, "host"), 0);
    assert_eq!(app.count(&server.pod, "host10"), 2);
}

/// A request whose own body breaks off (chunked framing that cannot be
/// read, fewer bytes than its length) is answered 400 as the client's
/// fault, not 502 as the application's, whichever entry it takes.
#[test]
fn a_broken_request_body_is_the_clients_fault_at_either_entry() {
    let (mesh, server, client, _app) = setup(&[]);
    let dst = SocketAddr::new(server.pod.ip().into(), PORT);
    let outsider = mesh.plain_pod("outsider");
    let broken: [&'static [u8]; 2] = [
        b"POST /sink/body HTTP/1.1\r\nHost: s\r\nTransfer-Encoding: chunked\r\n\r\n\
          fffffffffffffffffff\r\nabc\r\n0\r\n\r\n",
        b"POST /sink/body HTTP/1.1\r\nHost: s\r\nContent-Length: 10\r\n\r\nabc",
    ];
    for pod in [&client.pod, &outsider] {
        for wire in broken {
            let reply = raw_exchange(pod, dst, wire);
            assert!(reply.starts_with("HTTP/1.1 400"), "{reply:?}");
            assert!(
                reply.contains("legate-error: request body could not be read"),
                "{reply:?}"
            );
        }
    }
}

/// A streamed answer (server-sent events, a long poll, a progress feed)
/// reaches the client piece by piece: each small piece arrives while the
/// application still holds back the next, which it sends only once the
/// client has seen the one before. A proxy that waited for more would
/// leave the client with nothing and this test waiting.
#[test]
fn a_streamed_answer_arrives_piece_by_piece_at_either_entry() {
    use std::sync::mpsc;
    const EVENTS: usize = 3;
    let mesh = Mesh::new(&[]);
    let server = mesh.meshed_pod("server", PodOptions::default());
    let client = mesh.meshed_pod("client", PodOptions::default());
    let outsider = mesh.plain_pod("outsider");
    let (seen_tx, seen_rx) = mpsc::channel::<()>();
    let listener = server
        .pod
        .run_in(|| std::net::TcpListener::bind(("0.0.0.0", PORT)))
        .expect("run in pod")
        .expect("bind");
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let mut head = [0u8; 1024];
            let _ = conn.read(&mut head);
            let _ = conn.write_all(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\
                  Transfer-Encoding: chunked\r\n\r\n",
            );
            for i in 0..EVENTS {
                let event = format!("data: {i}\n\n");
                let _ = write!(conn, "{:x}\r\n{event}\r\n", event.len());
                // The next piece waits until the client has this one.
                if seen_rx.recv_timeout(Duration::from_secs(10)).is_err() {
                    return;
                }
            }
            let _ = conn.write_all(b"0\r\n\r\n");
        }
    });
    let dst = SocketAddr::new(server.pod.ip().into(), PORT);
    for pod in [&client.pod, &outsider] {
        let seen_tx = seen_tx.clone();
        let got = pod
            .run_in(move || -> std::io::Result<String> {
                let mut s = TcpStream::connect(dst)?;
                s.set_read_timeout(Some(Duration::from_secs(5)))?;
                s.write_all(b"GET /events HTTP/1.1\r\nHost: s\r\nConnection: close\r\n\r\n")?;
                let mut got = Vec::new();
                let mut buf = [0u8; 1024];
                for i in 0..EVENTS {
                    let want = format!("data: {i}\n\n");
                    while !String::from_utf8_lossy(&got).contains(&want) {
                        let n = s.read(&mut buf)?;
                        if n == 0 {
                            return Err(std::io::ErrorKind::UnexpectedEof.into());
                        }
                        got.extend_from_slice(&buf[..n]);
                    }
                    let _ = seen_tx.send(());
                }
                s.read_to_end(&mut got)?;
                Ok(String::from_utf8_lossy(&got).into_owned())
            })
            .expect("run in pod")
            .expect("every piece in turn");
        assert!(got.starts_with("HTTP/1.1 200"), "{got:?}");
        assert!(got.ends_with("0\r\n\r\n"), "{got:?}");
    }
}

/// The trailer fields of a chunked upload reach the application, whichever
/// entry the request takes; an identity among them never does (servers
/// may merge trailer fields into the header section).
#[test]
fn a_chunked_requests_trailers_reach_the_application() {
    let (mesh, server, client, _app) = setup(&[]);
    let dst = SocketAddr::new(server.pod.ip().into(), PORT);
    let outsider = mesh.plain_pod("outsider");
    let wire: &[u8] = b"POST /trailers-in HTTP/1.1\r\nHost: server\r\n\
        Transfer-Encoding: chunked\r\nTrailer: x-sum\r\nConnection: close\r\n\r\n\
        3\r\nabc\r\n0\r\nx-sum: 7\r\nlegate-client-id: spiffe://legate.local/admin\r\n\
        legate_client_id: spiffe://legate.local/admin\r\n\r\n";
    for pod in [&client.pod, &outsider] {
        let reply = tcp_exchange(pod, dst, wire).expect("chunked upload");
        let reply = String::from_utf8_lossy(&reply);
        let (head, body) = reply.split_once("\r\n\r\n").expect("a whole answer");
        assert!(head.starts_with("HTTP/1.1 200"), "{reply:?}");
        let trailers: serde_json::Value = serde_json::from_str(body).expect(body);
        assert_eq!(trailers["x-sum"], "7", "{reply:?}");
        assert!(!body.contains("admin"), "{reply:?}");
    }
}

/// A message framed by chunks that also claims a length is passed on by
/// its chunks, the stale length removed (RFC 9112 §6.3): a request,
/// whichever entry it takes, and an answer, to a client in the mesh and
/// to one outside it.
#[test]
fn a_chunked_message_that_also_claims_a_length_arrives_whole() {
    let (mesh, server, client, _app) = setup(&[]);
    let dst = SocketAddr::new(server.pod.ip().into(), PORT);
    let outsider = mesh.plain_pod("outsider");
    let wire: &[u8] = b"POST /echo/0/both HTTP/1.1\r\nHost: server\r\n\
        Content-Length: 3\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n\
        5\r\nhello\r\n0\r\n\r\n";
    let hello = "5 2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";
    for pod in [&client.pod, &outsider] {
        let reply = tcp_exchange(pod, dst, wire).expect("an upload");
        let reply = String::from_utf8_lossy(&reply);
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
        assert!(reply.ends_with(hello), "{reply}");
    }
    let fetch = b"GET /both HTTP/1.1\r\nHost: server\r\nConnection: close\r\n\r\n";
    for pod in [&client.pod, &outsider] {
        let reply = tcp_exchange(pod, dst, fetch).expect("a fetch");
        let reply = String::from_utf8_lossy(&reply);
        let (head, body) = reply.split_once("\r\n\r\n").expect("a whole answer");
        assert!(head.starts_with("HTTP/1.1 200"), "{reply}");
        assert!(
            !head.to_ascii_lowercase().contains("content-length: 3"),
            "{reply}"
        );
        let body = if head.to_ascii_lowercase().contains("chunked") {
            body.strip_prefix("5\r\n")
                .and_then(|b| b.strip_suffix("\r\n0\r\n\r\n"))
                .unwrap_or(body)
        } else {
            body
        };
        assert_eq!(body, "hello", "{reply}");
    }
}

/// Sends a slow request from `pod`, half-closes, and returns what came back.
fn request_then_half_close(pod: &legate_testbed::Pod, dst: SocketAddr) -> String {
    pod.run_in(move || -> std::io::Result<String> {
        let mut s = TcpStream::connect(dst)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        // The answer is slow, so the proxy sees the end of the request
        // stream while the request is still in flight.
        s.write_all(b"GET /sleep/0.3/half HTTP/1.1\r\nHost: server\r\n\r\n")?;
        s.shutdown(std::net::Shutdown::Write)?;
        let mut reply = String::new();
        s.read_to_string(&mut reply)?;
        Ok(reply)
    })
    .unwrap()
    .expect("request with a half-close")
}

/// A client that half-closes after its request (HTTP/1.0-era clients,
/// `nc -N`, scripts) still gets the answer, as it would from the server
/// directly: the end of the request stream is not the end of the exchange.
/// Both through the client's proxy and, from outside the mesh, through the
/// server's.
#[test]
fn a_client_that_half_closes_after_its_request_still_gets_the_answer() {
    let (mesh, server, client, _app) = setup(&[]);
    let dst = SocketAddr::new(server.pod.ip().into(), PORT);
    let reply = request_then_half_close(&client.pod, dst);
    assert!(
        reply.starts_with("HTTP/1.1 200"),
        "meshed client: {reply:?}"
    );
    let outsider = mesh.plain_pod("outsider");
    let reply = request_then_half_close(&outsider, dst);
    assert!(
        reply.starts_with("HTTP/1.1 200"),
        "client outside the mesh: {reply:?}"
    );
}

/// An upgrade the application declines (with a 2xx or any other answer
/// but 101) gets that answer, and the client's connection goes on as
/// HTTP/1.1; an upgrade request with a body reaches the application whole,
/// as the ordinary request it then is. Alike inside the mesh, where an
/// upgrade rides an extended CONNECT, and from outside it.
#[test]
fn declined_upgrades_and_upgrades_with_a_body_go_on_as_http_at_either_entry() {
    let (mesh, server, client, _app) = setup(&[]);
    let dst = SocketAddr::new(server.pod.ip().into(), PORT);
    let outsider = mesh.plain_pod("outsider");
    const NEXT: &str = "GET /headers HTTP/1.1\r\nHost: s\r\nConnection: close\r\n\r\n";
    const WS: &str = "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
        Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
    let cases = [
        // The scripted server answers these paths without switching.
        (
            format!("GET /ok/ws HTTP/1.1\r\nHost: s\r\n{WS}\r\n{NEXT}"),
            "200",
            "ok\n",
        ),
        (
            format!("GET /nothing HTTP/1.1\r\nHost: s\r\n{WS}\r\n{NEXT}"),
            "404",
            "unknown path\n",
        ),
        (
            format!("POST /sink/wsb HTTP/1.1\r\nHost: s\r\n{WS}Content-Length: 3\r\n\r\nabc{NEXT}"),
            "200",
            "3 ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
        ),
    ];
    for pod in [&client.pod, &outsider] {
        for (wire, status, body) in &cases {
            let reply = tcp_exchange(pod, dst, wire.as_bytes()).expect("exchange");
            let reply = String::from_utf8_lossy(&reply);
            let (first, next) = reply
                .split_once("\r\n\r\n")
                .and_then(|(head, rest)| Some((head, rest.strip_prefix(body)?)))
                .unwrap_or_else(|| panic!("no whole first answer: {reply:?}"));
            assert!(
                first.starts_with(&format!("HTTP/1.1 {status}")),
                "{reply:?}"
            );
            assert!(next.starts_with("HTTP/1.1 200"), "{reply:?}");
            let (_, seen) = next.split_once("\r\n\r\n").expect("a whole second answer");
            let seen: serde_json::Value = serde_json::from_str(seen).expect(seen);
            assert_eq!(seen["host"], "s", "{seen}");
            assert!(seen.get("upgrade").is_none(), "{seen}");
        }
    }
}

#[test]
fn a_websocket_echo_round_trips_through_the_mesh() {
    let (mesh, server, client, _app) = setup(&[]);
    let dst = SocketAddr::new(server.pod.ip().into(), PORT);
    // From inside the mesh, and from outside it to the server's proxy.
    let outsider = mesh.plain_pod("outsider");
    for pod in [&client.pod, &outsider] {
        let echoed = pod
            .run_in(move || -> std::io::Result<Vec<u8>> {
                let mut s = TcpStream::connect(dst)?;
                s.set_read_timeout(Some(Duration::from_secs(5)))?;
                write!(
                s,
                "GET /ws HTTP/1.1\r\nHost: {dst}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
            )?;
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    s.read_exact(&mut byte)?;
                    head.push(byte[0]);
                }
                let head = String::from_utf8_lossy(&head).to_string();
                assert!(head.starts_with("HTTP/1.1 101"), "{head}");
                assert!(head.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), "{head}");
                let payload = b"hello through the mesh";
                let mask = [1u8, 2, 3, 4];
                let mut frame = vec![0x81, 0x80 | payload.len() as u8];
                frame.extend_from_slice(&mask);
                frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
                s.write_all(&frame)?;
                let mut reply = [0u8; 2];
                s.read_exact(&mut reply)?;
                let mut body = vec![0u8; usize::from(reply[1] & 0x7f)];
                s.read_exact(&mut body)?;
                Ok(body)
            })
            .unwrap()
            .expect("websocket exchange");
        assert_eq!(echoed, b"hello through the mesh");
    }
}

/// Runs `tests/apps/grpc_echo.py` in `pod` with `args`, as an ordinary user.
fn grpc_echo(
    pod: &legate_testbed::Pod,
    dir: &std::path::Path,
    args: &[&str],
) -> legate_testbed::PodCommand {
    let script = dir.join("grpc_echo.py");
    if !script.exists() {
        write_readable(&script, include_bytes!("apps/grpc_echo.py")).unwrap();
    }
    pod.command("/usr/bin/python3")
        .arg(&script)
        .args(args)
        .uid(APP_UID)
}

/// Starts the gRPC echo server in `pod` on port 50051; returns it (it
/// stops when dropped) and the address to call.
fn grpc_server(
    pod: &legate_testbed::Pod,
    dir: &std::path::Path,
) -> (legate_testbed::Process, String) {
    let server = grpc_echo(pod, dir, &["serve", "50051"])
        .spawn()
        .expect("grpc server");
    let addr = SocketAddr::new(pod.ip().into(), 50051);
    pod.wait_for_port(addr, Duration::from_secs(10)).unwrap();
    (server, addr.to_string())
}

/// Runs the gRPC echo client in `pod`; returns what it printed on stdout
/// (trimmed) and on stderr.
fn grpc_call(pod: &legate_testbed::Pod, dir: &std::path::Path, args: &[&str]) -> (String, String) {
    let out = grpc_echo(pod, dir, args).output().expect("grpc client");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn grpc_unary_streaming_and_errors_work_through_the_mesh() {
    let mesh = Mesh::new(&[]);
    let server = mesh.meshed_pod("grpc-server", PodOptions::default());
    let client = mesh.meshed_pod("grpc-client", PodOptions::default());
    let dir = shared_dir().unwrap();
    let (_srv, target) = grpc_server(&server.pod, dir.path());
    let run = |args: &[&str]| grpc_call(&client.pod, dir.path(), args);
    assert_eq!(run(&["unary", &target, "hello grpc"]).0, "hello grpc");
    assert_eq!(
        run(&["chat", &target, "one", "two", "three"]).0,
        "re:one\nre:two\nre:three"
    );
    assert_eq!(
        run(&["fail", &target]).0,
        "NOT_FOUND",
        "the application's grpc-status arrives"
    );

    // Nothing listens on this port: the server's proxy answers in gRPC terms.
    let (code, details) = run(&["unary", &format!("{}:50052", server.pod.ip()), "x"]);
    assert_eq!(code, "UNAVAILABLE", "{details}");
    assert!(details.contains("connect"), "{details}");
}

#[test]
fn grpc_through_a_port_the_clients_proxy_carries_as_opaque_is_served_as_http() {
    // The server's proxy finds HTTP/2 inside the tunnel and serves it, with
    // streaming in both directions, as requests of its own.
    let mesh = Mesh::new(&[]);
    let server = mesh.meshed_pod("grpc-server", PodOptions::default());
    let client = mesh.meshed_pod(
        "grpc-client",
        PodOptions {
            proxy_set: vec!["proxy.opaque_ports=50051".into()],
            ..Default::default()
        },
    );
    let dir = shared_dir().unwrap();
    let (_srv, target) = grpc_server(&server.pod, dir.path());
    let run = |args: &[&str]| grpc_call(&client.pod, dir.path(), args);
    assert_eq!(run(&["unary", &target, "hello grpc"]).0, "hello grpc");
    assert_eq!(
        run(&["chat", &target, "one", "two", "three"]).0,
        "re:one\nre:two\nre:three"
    );
    let metrics = obs_support::scrape(&server.pod);
    let served = obs_support::metric(
        &metrics,
        "legate_http_request_duration_seconds_count",
        &[("direction", "inbound"), ("destination", "50051")],
    );
    assert_eq!(
        served, 2.0,
        "both calls were served as HTTP/2 requests:\n{metrics}"
    );
}

#[test]
fn a_grpc_call_answered_unavailable_is_retried_with_its_message() {
    let mesh = Mesh::new(&[]);
    let server = mesh.meshed_pod("grpc-server", PodOptions::default());
    let client = mesh.meshed_pod(
        "grpc-client",
        PodOptions {
            proxy_set: vec![
                "proxy.http.retry_on=grpc-unavailable".into(),
                "proxy.http.attempts=3".into(),
                "proxy.http.breaker_failures=0".into(),
            ],
            ..Default::default()
        },
    );
    let dir = shared_dir().unwrap();
    let (_srv, target) = grpc_server(&server.pod, dir.path());
    let flaky = |failures: &str, key: &str| {
        grpc_call(&client.pod, dir.path(), &["flaky", &target, failures, key]).0
    };
    // gRPC sends no content-length: the message is kept as it passes.
    assert_eq!(flaky("2", "a"), "ok after 3");
    assert_eq!(
        flaky("5", "b"),
        "UNAVAILABLE",
        "three tries, then the answer"
    );
}

/// Runs h2load in `client` against `path` on the server's port 8443, once
/// something listens there; returns what it printed.
fn h2load(client: &MeshedPod, server: &MeshedPod, path: &str, args: &[&str]) -> String {
    server
        .pod
        .wait_for_port(
            SocketAddr::new(server.pod.ip().into(), 8443),
            Duration::from_secs(10),
        )
        .unwrap();
    let out = client
        .pod
        .command("h2load")
        .args(args)
        .arg(format!("http://{}:8443{path}", server.pod.ip()))
        .uid(APP_UID)
        .output()
        .expect("h2load (apt-get install nghttp2-client)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// What a test HTTP/2 application does with a request.
enum H2Answer {
    Respond(http::Response<()>),
    /// Answers, then closes the connection gracefully (GOAWAY).
    RespondAndClose(http::Response<()>),
    /// Sends the head of the answer, and its end only a minute later.
    RespondAndHold(http::Response<()>),
    /// Resets the stream with `REFUSED_STREAM`: never seen.
    Refuse,
}

/// Serves HTTP/2 in `pod` on `port`, sending its SETTINGS as soon as a
/// client connects (as gRPC servers, nginx and the `h2` crate do);
/// `answer` is given each request and how many the connection has taken.
fn serve_h2<A>(pod: &legate_testbed::Pod, port: u16, answer: A)
where
    A: Fn(&http::Request<h2::RecvStream>, usize) -> H2Answer + Copy + Send + 'static,
{
    let listener = pod
        .run_in(move || std::net::TcpListener::bind(("0.0.0.0", port)))
        .expect("run in pod")
        .expect("bind");
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            while let Ok((sock, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let Ok(mut conn) = h2::server::handshake(sock).await else {
                        return;
                    };
                    let mut taken = 0;
                    while let Some(Ok((req, mut respond))) = conn.accept().await {
                        taken += 1;
                        match answer(&req, taken) {
                            H2Answer::Respond(res) => {
                                let _ = respond.send_response(res, true);
                            }
                            H2Answer::RespondAndClose(res) => {
                                let _ = respond.send_response(res, true);
                                conn.graceful_shutdown();
                            }
                            H2Answer::RespondAndHold(res) => {
                                if let Ok(mut body) = respond.send_response(res, false) {
                                    tokio::spawn(async move {
                                        tokio::time::sleep(Duration::from_secs(60)).await;
                                        let _ = body.send_data(Default::default(), true);
                                    });
                                }
                            }
                            H2Answer::Refuse => respond.send_reset(h2::Reason::REFUSED_STREAM),
                        }
                    }
                });
            }
        });
    });
}

/// Serves HTTP/2 in `pod` on `port`, answering 200, and takes only
/// `per_conn` requests on each connection, as a server with a limit on a
/// connection's requests or age does: it then closes the connection
/// gracefully (GOAWAY) and refuses the streams that were on their way
/// (`REFUSED_STREAM`: never seen, safe to send again).
fn serve_h2_closing_after(pod: &legate_testbed::Pod, port: u16, per_conn: usize) {
    serve_h2(pod, port, move |_, taken| match taken.cmp(&per_conn) {
        std::cmp::Ordering::Less => H2Answer::Respond(http::Response::new(())),
        std::cmp::Ordering::Equal => H2Answer::RespondAndClose(http::Response::new(())),
        std::cmp::Ordering::Greater => H2Answer::Refuse,
    });
}

/// Serves HTTP/2 in `pod` on `port`, answering each request with the
/// identity header it received echoed in `x-client-id` (empty when there
/// was none).
fn serve_h2_echoing_identity(pod: &legate_testbed::Pod, port: u16) {
    serve_h2(pod, port, |req, _| {
        let seen: Vec<_> = req
            .headers()
            .get_all("legate-client-id")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        let res = http::Response::builder()
            .header("x-client-id", seen.join(","))
            .body(())
            .unwrap_or_default();
        H2Answer::Respond(res)
    });
}

/// From `pod`: connects to `dst`, says nothing for `pause`, then sends
/// `req` over HTTP/2 (prior knowledge); the head of the answer.
fn h2_exchange(
    pod: &legate_testbed::Pod,
    dst: SocketAddr,
    pause: Duration,
    req: http::Request<()>,
) -> http::response::Parts {
    pod.run_in(move || {
        let tcp = TcpStream::connect(dst).expect("connect");
        tcp.set_nonblocking(true).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let tcp = tokio::net::TcpStream::from_std(tcp).unwrap();
            tokio::time::sleep(pause).await;
            let (mut send, conn) = h2::client::handshake(tcp).await.expect("h2 handshake");
            tokio::spawn(conn);
            let (res, _) = send.send_request(req, true).expect("send");
            let res = tokio::time::timeout(Duration::from_secs(10), res)
                .await
                .expect("an answer in time")
                .expect("an answer");
            res.into_parts().0
        })
    })
    .expect("run in pod")
}

/// From `pod`: connects to `dst`, says nothing for `pause`, then sends an
/// HTTP/2 request with a forged identity header; the `x-client-id` the
/// application answered.
fn h2_identity_after(pod: &legate_testbed::Pod, dst: SocketAddr, pause: Duration) -> String {
    let req = http::Request::builder()
        .uri(format!("http://{dst}/"))
        .header("legate-client-id", "spiffe://legate.local/admin")
        .body(())
        .unwrap();
    let res = h2_exchange(pod, dst, pause, req);
    assert_eq!(res.status, 200);
    res.headers
        .get("x-client-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

/// Many HTTP/2 servers send their SETTINGS the moment a client connects.
/// That is no server-first banner: a client that speaks after a pause
/// still takes the HTTP path, so its request carries the verified
/// identity and never a forged one, whether it is in the mesh, outside
/// it, or behind a proxy that carries the port as opaque.
#[test]
fn an_http2_server_that_opens_first_does_not_make_its_clients_opaque() {
    let mesh = Mesh::new(&[]);
    let server = mesh.meshed_pod("h2-server", PodOptions::default());
    let client = mesh.meshed_pod("h2-client", PodOptions::default());
    let opaque = mesh.meshed_pod(
        "h2-opaque",
        PodOptions {
            proxy_set: vec!["proxy.opaque_ports=8443".into()],
            ..Default::default()
        },
    );
    let outsider = mesh.plain_pod("outsider");
    serve_h2_echoing_identity(&server.pod, 8443);
    let dst = SocketAddr::new(server.pod.ip().into(), 8443);
    for pause in [Duration::ZERO, Duration::from_millis(300)] {
        assert_eq!(
            h2_identity_after(&client.pod, dst, pause),
            client.id(),
            "after {pause:?}"
        );
        assert_eq!(
            h2_identity_after(&opaque.pod, dst, pause),
            opaque.id(),
            "after {pause:?}"
        );
        assert_eq!(
            h2_identity_after(&outsider, dst, pause),
            "",
            "after {pause:?}"
        );
    }
}

/// An application that closes its HTTP/2 connections now and then
/// (nginx after 1000 requests, gRPC servers at their maximum connection
/// age) refuses the streams that were on their way: those requests are
/// sent again, not answered 502, and the breaker does not count them.
#[test]
fn streams_an_application_refuses_while_closing_a_connection_are_sent_again() {
    let mesh = Mesh::new(&[]);
    let server = mesh.meshed_pod("h2-server", PodOptions::default());
    // This server may refuse a stream before its GOAWAY has reached the
    // server's proxy, which then sends the retry on the same connection,
    // to be refused again: a third try makes the outcome certain.
    let client = mesh.meshed_pod(
        "h2-client",
        PodOptions {
            proxy_set: vec!["proxy.http.attempts=3".into()],
            ..Default::default()
        },
    );
    serve_h2_closing_after(&server.pod, 8443, 100);
    let text = h2load(
        &client,
        &server,
        "/",
        &["-n", "1000", "-c", "1", "-m", "10"],
    );
    assert!(
        text.contains("requests: 1000 total, 1000 started, 1000 done, 1000 succeeded"),
        "{text}"
    );
    assert!(text.contains("status codes: 1000 2xx"), "{text}");
}

#[test]
fn a_pod_that_drains_behind_a_service_address_hands_new_streams_to_another() {
    let mesh = Mesh::new(&[]);
    let mut a = mesh.meshed_pod("web-a", PodOptions::default());
    let b = mesh.meshed_pod("web-b", PodOptions::default());
    let answer_as = |pod: &'static str| {
        move |req: &http::Request<h2::RecvStream>, _| {
            let res = http::Response::builder()
                .header("x-pod", pod)
                .body(())
                .unwrap_or_default();
            if req.method() == http::Method::POST {
                H2Answer::RespondAndHold(res)
            } else {
                H2Answer::Respond(res)
            }
        }
    };
    serve_h2(&a.pod, 8443, answer_as("a"));
    serve_h2(&b.pod, 8443, answer_as("b"));
    // No retries: the call after the drain must not be sent to the
    // draining proxy at all, rather than be refused there and retried.
    let (client, _config) = service_client(&mesh, "client", &["proxy.http.attempts=1"]);
    let service: SocketAddr = "10.200.250.1:443".parse().unwrap();
    let at = |p: &MeshedPod| SocketAddr::new(p.pod.ip().into(), 8443);
    balance(&client.pod, service, &[at(&a)]);

    // One HTTP/2 connection of the application's, as a gRPC channel keeps.
    let tcp = client
        .pod
        .run_in(move || TcpStream::connect(service))
        .unwrap()
        .expect("connect to the service");
    tcp.set_nonblocking(true).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let tcp = tokio::net::TcpStream::from_std(tcp).unwrap();
        let (mut send, conn) = h2::client::handshake(tcp).await.expect("h2 handshake");
        tokio::spawn(conn);
        let request = |method: &str| {
            http::Request::builder()
                .method(method)
                .uri(format!("http://{service}/"))
                .body(())
                .unwrap()
        };
        let answered_by = |res: &http::Response<h2::RecvStream>| {
            res.headers()
                .get("x-pod")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned()
        };
        // The answer's head; its body stays open while the answer is kept.
        let mut call = |method| {
            let (res, _) = send.send_request(request(method), true).unwrap();
            async move {
                tokio::time::timeout(Duration::from_secs(10), res)
                    .await
                    .expect("an answer in time")
                    .expect("an answer")
            }
        };
        assert_eq!(answered_by(&call("GET").await), "a");
        // An answer that stays open (a watch, a stream of events), so that
        // pod a's proxy keeps the mesh connection while it drains.
        let held = call("POST").await;
        assert_eq!(answered_by(&held), "a");

        // Pod a leaves the service and its proxy drains (a rolling
        // update); the channel's next call is answered by pod b, not
        // refused by a proxy that takes no new streams.
        balance(&client.pod, service, &[at(&b)]);
        a.proxy.signal(legate_testbed::Signal::SIGTERM).unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let res = call("GET").await;
        assert_eq!(
            (res.status(), answered_by(&res)),
            (http::StatusCode::OK, "b".to_owned()),
            "{:?}\n{}",
            res.headers(),
            client.proxy.stderr()
        );
    });
}

#[test]
fn h2load_through_the_mesh_completes_without_errors() {
    let mesh = Mesh::new(&[]);
    let server = mesh.meshed_pod("h2-server", PodOptions::default());
    let client = mesh.meshed_pod("h2-client", PodOptions::default());
    let site = shared_dir().unwrap();
    write_readable(&site.path().join("index.html"), &[b'x'; 2048]).unwrap();
    let _nghttpd = server
        .pod
        .command("nghttpd")
        .args(["--no-tls", "-d"])
        .arg(site.path())
        .arg("8443")
        .uid(APP_UID)
        .spawn()
        .expect("nghttpd (apt-get install nghttp2-server)");
    let text = h2load(
        &client,
        &server,
        "/index.html",
        &["-n", "2000", "-c", "8", "-m", "10"],
    );
    let summary = text
        .lines()
        .find(|l| l.starts_with("requests:"))
        .unwrap_or_default();
    assert_eq!(
        summary, "requests: 2000 total, 2000 started, 2000 done, 2000 succeeded, 0 failed, 0 errored, 0 timeout",
        "{text}"
    );
    assert!(text.contains("status codes: 2000 2xx"), "{text}");

    // A request head of tens of kilobytes from an HTTP/2 client arrives
    // as it would without the mesh: through it, and from a client outside
    // it through the server's proxy alone.
    let big = format!("x-big: {}", "b".repeat(40 * 1024));
    let index = format!("http://{}:8443/index.html", server.pod.ip());
    let status_of_big_request = |pod: &legate_testbed::Pod| {
        let args = [
            "--http2-prior-knowledge",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ];
        let (ok, out, err) = curl(pod, &[&args[..], &["-H", &big, &index]].concat());
        assert!(ok, "{err}");
        out
    };
    assert_eq!(
        status_of_big_request(&client.pod),
        "200",
        "through the mesh"
    );
    let outsider = mesh.plain_pod("outsider");
    assert_eq!(
        status_of_big_request(&outsider),
        "200",
        "from outside the mesh"
    );
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

#[test]
fn a_gibibyte_upload_streams_with_bounded_proxy_memory() {
    let (_mesh, server, client, _app) = setup(&[]);
    let upload = client
        .pod
        .command("bash")
        .args([
            "-c",
            &format!(
                "head -c 1073741824 /dev/zero | curl -sS --max-time 300 -T - -X POST {}",
                url(&server, "/sink/big")
            ),
        ])
        .uid(APP_UID);
    let mut upload = upload.spawn().expect("upload");
    let (client_pid, server_pid) = (client.proxy.pid(), server.proxy.pid());
    let mut peak = (0, 0);
    while upload.try_wait().unwrap().is_none() {
        peak = (
            peak.0.max(rss_kib(client_pid)),
            peak.1.max(rss_kib(server_pid)),
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        upload.stdout(),
        "1073741824 49bc20df15e412a64472421e13fe86ff1c5165e18b2afccf160d4dc19fe68a14",
        "{}",
        upload.stderr()
    );
    println!(
        "peak proxy RSS during a 1 GiB upload: client {} KiB, server {} KiB",
        peak.0, peak.1
    );
    assert!(
        peak.0 < 64 * 1024 && peak.1 < 64 * 1024,
        "proxy memory grew with the body: {peak:?} KiB"
    );
}

/// Bytes that follow no protocol, or start one and break it, thrown at
/// every entry (the server's mesh port from outside, the application's
/// port from outside and through the client's proxy, the client's proxy's
/// outbound listener addressed directly) while a chunked upload crosses
/// the mesh, a piece at a time until the last throw: the upload arrives
/// whole, both proxies stay up, and a new request afterwards is answered.
#[test]
fn junk_at_every_entry_disturbs_no_other_connection() {
    use sha2::Digest;
    use std::sync::atomic::AtomicBool;
    let (mesh, mut server, mut client, _app) = setup(&[]);
    let outsider = mesh.plain_pod("outsider");
    let app_port = SocketAddr::new(server.pod.ip().into(), PORT);
    let mesh_port = SocketAddr::new(server.pod.ip().into(), 15006);
    let thrown = Arc::new(AtomicBool::new(false));
    let upload = {
        let mut s = client
            .pod
            .run_in(|| TcpStream::connect(app_port))
            .expect("run in pod")
            .expect("connect");
        let thrown = thrown.clone();
        std::thread::spawn(move || -> std::io::Result<(String, String)> {
            s.set_read_timeout(Some(Duration::from_secs(30)))?;
            s.write_all(
                b"POST /sink/junk HTTP/1.1\r\nHost: s\r\nTransfer-Encoding: chunked\r\n\
                  Connection: close\r\n\r\n",
            )?;
            let (mut sent, mut sha) = (0usize, sha2::Sha256::new());
            let piece: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
            // A piece at least, then one every 10 ms until the last throw.
            loop {
                write!(s, "{:x}\r\n", piece.len())?;
                s.write_all(&piece)?;
                s.write_all(b"\r\n")?;
                sha.update(&piece);
                sent += piece.len();
                if thrown.load(Ordering::SeqCst) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            s.write_all(b"0\r\n\r\n")?;
            let mut reply = String::new();
            s.read_to_string(&mut reply)?;
            Ok((reply, format!("{sent} {:x}", sha.finalize())))
        })
    };
    // Starts that a parser takes a step into before the junk.
    let starts: [&[u8]; 6] = [
        b"",
        b"GET / HTTP/1.1\r\nHost: s\r\n",
        b"POST /sink/j HTTP/1.1\r\nHost: s\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
        b"\x16\x03\x03\xff\xff",
    ];
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut throws = Vec::new();
    for i in 0..180 {
        let mut wire = starts[i % starts.len()].to_vec();
        let len = (next() % 2048) as usize;
        wire.extend((0..len).map(|_| next() as u8));
        throws.push(wire);
    }
    let throw = |pod: &legate_testbed::Pod, dst: SocketAddr, throws: &[Vec<u8>]| {
        pod.run_in(|| {
            for wire in throws {
                let Ok(mut s) = TcpStream::connect(dst) else {
                    continue;
                };
                let _ = s.set_read_timeout(Some(Duration::from_millis(30)));
                let _ = s.write_all(wire);
                let _ = s.shutdown(std::net::Shutdown::Write);
                let _ = s.read(&mut [0u8; 4096]);
            }
        })
        .expect("run in pod");
    };
    throw(&outsider, mesh_port, &throws);
    throw(&outsider, app_port, &throws);
    throw(&client.pod, app_port, &throws);
    // The client's proxy's own listener, addressed directly.
    throw(
        &client.pod,
        "127.0.0.1:15001".parse().expect("address"),
        &throws,
    );
    thrown.store(true, Ordering::SeqCst);
    let (reply, sent) = upload
        .join()
        .expect("upload thread")
        .expect("the upload crosses the mesh");
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply:?}");
    assert!(reply.ends_with(&sent), "sent {sent}, answered {reply:?}");
    for pod in [&mut server, &mut client] {
        assert!(
            pod.proxy.try_wait().expect("proxy status").is_none(),
            "a proxy exited: {}",
            pod.proxy.stderr()
        );
    }
    let r = request(&client.pod, &[&url(&server, "/ok/after")]);
    assert_eq!(r.status, 200, "{}", r.headers);
}
