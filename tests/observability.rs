//! What operators see: metrics that count exactly the traffic sent and
//! that promtool accepts, access logs, the admin endpoints, and traces that
//! cross both proxies and reach a real OTLP receiver.

mod common;
mod obs_support;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;
use obs_support::*;

const PORT: u16 = 8080;
const SINK_PORT: u16 = 9000;

/// Reads everything a client sends, then answers `got <n>`.
const SINK: &str = r#"
import socket, sys, threading
s = socket.socket(socket.AF_INET6)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("::", int(sys.argv[1])))
s.listen(16)
def serve(c):
    n = 0
    while True:
        b = c.recv(65536)
        if not b:
            break
        n += len(b)
    c.sendall(("got %d\n" % n).encode())
    c.close()
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

fn json_lines(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Waits until the proxy's metrics satisfy `pred`.
fn wait_metrics(pod: &legate_testbed::Pod, what: &str, pred: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = scrape(pod);
        if pred(&text) {
            return text;
        }
        assert!(Instant::now() < deadline, "{what}; metrics:\n{text}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn counters_match_the_traffic_sent_and_promtool_accepts_them() {
    let mesh = Mesh::new(&[]);
    let server = mesh.meshed_pod(
        "server",
        PodOptions {
            proxy_set: vec!["log.access=on".into()],
            ..Default::default()
        },
    );
    let client = mesh.meshed_pod(
        "client",
        PodOptions {
            proxy_set: vec![
                "proxy.http.retry_on=5xx".into(),
                "proxy.http.attempts=3".into(),
                "proxy.http.breaker_failures=0".into(),
                "log.access=on".into(),
                "log.access_paths=true".into(),
            ],
            ..Default::default()
        },
    );
    let app = Scripted::start(&server.pod, PORT);
    let dir = shared_dir().unwrap();
    let sink_script = dir.path().join("sink.py");
    write_readable(&sink_script, SINK.as_bytes()).unwrap();
    let _sink = server
        .pod
        .command("python3")
        .arg(&sink_script)
        .arg(SINK_PORT.to_string())
        .uid(APP_UID)
        .spawn()
        .expect("sink");
    server
        .pod
        .wait_for_port(
            SocketAddr::new(server.pod.ip().into(), SINK_PORT),
            Duration::from_secs(10),
        )
        .unwrap();
    let base = format!("http://{}:{PORT}", server.pod.ip());

    // 100 requests on one keep-alive connection, then three that fail once
    // and succeed on their retry, on another.
    let oks: Vec<String> = (0..100).map(|_| format!("{base}/ok/m")).collect();
    let mut args = vec!["-o", "/dev/null", "-w", "%{http_code}\n"];
    args.extend(oks.iter().map(String::as_str));
    let (ok, out, err) = curl(&client.pod, &args);
    assert!(ok, "{err}");
    assert_eq!(out.lines().filter(|l| *l == "200").count(), 100, "{out}");
    let fails: Vec<String> = (1..=3).map(|i| format!("{base}/fail/1/r{i}")).collect();
    let mut args = vec!["-o", "/dev/null", "-w", "%{http_code}\n"];
    args.extend(fails.iter().map(String::as_str));
    let (ok, out, err) = curl(&client.pod, &args);
    assert!(ok, "{err}");
    assert_eq!(out.lines().filter(|l| *l == "200").count(), 3, "{out}");
    assert_eq!(app.count(&server.pod, "m"), 100);

    // 1 MiB of opaque TCP, counted as it moves.
    let server_id = server.id().to_owned();
    let before = scrape(&client.pod);
    let peer = [("direction", "outbound"), ("peer", server_id.as_str())];
    let read_before = metric(&before, "legate_tcp_read_bytes_total", &peer);
    let written_before = metric(&before, "legate_tcp_write_bytes_total", &peer);
    let closed_before = metric(&before, "legate_tcp_connections_closed_total", &peer);
    let mib: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
    let dst = SocketAddr::new(server.pod.ip().into(), SINK_PORT);
    let reply = client
        .pod
        .run_in(move || -> std::io::Result<String> {
            let mut s = TcpStream::connect(dst)?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            s.write_all(&mib)?;
            s.shutdown(Shutdown::Write)?;
            let mut reply = String::new();
            s.read_to_string(&mut reply)?;
            Ok(reply)
        })
        .unwrap()
        .expect("1 MiB through the mesh");
    assert_eq!(reply, "got 1048576\n");
    let after = wait_metrics(
        &client.pod,
        "the opaque connection is counted closed",
        |t| metric(t, "legate_tcp_connections_closed_total", &peer) == closed_before + 1.0,
    );
    assert_eq!(
        metric(&after, "legate_tcp_read_bytes_total", &peer) - read_before,
        1048576.0
    );
    assert_eq!(
        metric(&after, "legate_tcp_write_bytes_total", &peer) - written_before,
        reply.len() as f64
    );

    // The client's proxy.
    let m = &after;
    let out = |extra: &[(&'static str, &'static str)]| {
        let mut l = vec![("direction", "outbound")];
        l.extend_from_slice(extra);
        l
    };
    assert_eq!(
        metric(
            m,
            "legate_http_requests_total",
            &out(&[("method", "GET"), ("status_class", "2xx")])
        ),
        103.0
    );
    assert_eq!(
        metric(
            m,
            "legate_http_requests_total",
            &out(&[("status_class", "5xx")])
        ),
        0.0
    );
    assert_eq!(
        metric(
            m,
            "legate_http_request_duration_seconds_count",
            &out(&[("destination", "default")])
        ),
        103.0
    );
    let route = [("route", "default")];
    assert_eq!(metric(m, "legate_http_retries_total", &route), 3.0);
    assert_eq!(metric(m, "legate_http_retry_successes_total", &route), 3.0);
    assert_eq!(
        metric(m, "legate_http_retries_budget_exhausted_total", &route),
        0.0
    );
    assert_eq!(
        metric(
            m,
            "legate_protocol_detections_total",
            &out(&[("protocol", "http1")])
        ),
        2.0
    );
    assert_eq!(
        metric(
            m,
            "legate_protocol_detections_total",
            &out(&[("protocol", "opaque")])
        ),
        1.0
    );
    assert_eq!(metric(m, "legate_tcp_connections_opened_total", &peer), 3.0);
    assert_eq!(metric(m, "legate_tcp_connections_closed_total", &peer), 3.0);
    assert_eq!(metric(m, "legate_tcp_connections_active", &peer), 0.0);
    assert_eq!(
        metric(m, "legate_tcp_connection_duration_seconds_count", &peer),
        3.0
    );
    assert!(metric(m, "legate_pool_connections", &[]) >= 1.0);
    assert_eq!(metric(m, "legate_http_breakers", &[("state", "open")]), 0.0);
    let expiry = metric(m, "legate_identity_cert_expiry_timestamp_seconds", &[]);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as f64;
    assert!(
        expiry > now && expiry < now + 25.0 * 3600.0,
        "expiry {expiry}"
    );
    assert_eq!(metric(m, "legate_identity_cert_renewals_total", &[]), 1.0);
    promtool_check(m);

    // The server's proxy saw every attempt, the failed ones included.
    let s = scrape(&server.pod);
    let inb = |extra: &[(&'static str, &'static str)]| {
        let mut l = vec![("direction", "inbound")];
        l.extend_from_slice(extra);
        l
    };
    assert_eq!(
        metric(
            &s,
            "legate_http_requests_total",
            &inb(&[("status_class", "2xx")])
        ),
        103.0
    );
    assert_eq!(
        metric(
            &s,
            "legate_http_requests_total",
            &inb(&[("status_class", "5xx")])
        ),
        3.0
    );
    assert_eq!(
        metric(
            &s,
            "legate_http_request_duration_seconds_count",
            &inb(&[("destination", "8080")])
        ),
        106.0
    );
    assert!(metric(&s, "legate_tls_handshakes_total", &inb(&[])) >= 1.0);
    assert_eq!(
        metric(&s, "legate_tls_handshake_failures_total", &inb(&[])),
        0.0
    );
    promtool_check(&s);

    // Access logs: JSON lines on stdout, paths only where opted in.
    let client_log = json_lines(&client.proxy.stdout());
    let tcp = client_log
        .iter()
        .find(|l| l["kind"] == "tcp" && l["destination"] == dst.to_string())
        .unwrap_or_else(|| panic!("no connection line: {client_log:#?}"));
    assert_eq!(tcp["bytes_read"], 1048576);
    assert_eq!(tcp["direction"], "outbound");
    assert_eq!(tcp["source_id"], client.id());
    assert_eq!(tcp["destination_id"], server.id());
    assert_eq!(tcp["protocol"], "tcp");
    let retried: Vec<_> = client_log
        .iter()
        .filter(|l| {
            l["kind"] == "http" && l["path"].as_str().is_some_and(|p| p.starts_with("/fail/"))
        })
        .collect();
    assert_eq!(retried.len(), 3, "{client_log:#?}");
    assert!(retried
        .iter()
        .all(|l| l["retries"] == 1 && l["status"] == 200 && l["method"] == "GET"));
    let server_log = json_lines(&server.proxy.stdout());
    let inbound: Vec<_> = server_log.iter().filter(|l| l["kind"] == "http").collect();
    assert_eq!(
        inbound.len(),
        106,
        "one line per request the server's proxy served"
    );
    assert!(
        inbound.iter().all(|l| l.get("path").is_none()),
        "paths are opt-in"
    );
    assert!(inbound
        .iter()
        .all(|l| l["source_id"] == client.id() && l["destination_id"] == server.id()));
    assert!(
        inbound
            .iter()
            .any(|l| l["status"] == 500 && l["response_bytes"].as_u64().is_some()),
        "{inbound:#?}"
    );

    // Switching access logs at runtime, from localhost only.
    let outsider = mesh.plain_pod("outsider");
    let client_admin = SocketAddr::new(client.pod.ip().into(), 15000);
    let (status, _) = outsider
        .run_in(move || http(client_admin, "PUT", "/access-log", "off"))
        .unwrap()
        .expect("admin from another pod");
    assert_eq!(status, 403, "a remote client cannot change the access log");
    let (status, _) = outsider
        .run_in(move || http(client_admin, "POST", "/shutdown", ""))
        .unwrap()
        .expect("admin from another pod");
    assert_eq!(status, 403);
    // Nor can a meshed peer by going through the mesh, where it would
    // reach the admin server from the proxy's own localhost.
    let through_mesh = server
        .pod
        .run_in(move || http(client_admin, "POST", "/shutdown", ""))
        .unwrap();
    assert!(
        !matches!(through_mesh, Ok((202, _))),
        "a peer shut the proxy down through the mesh: {through_mesh:?}"
    );
    let (status, body) = admin(&client.pod, "PUT", "/access-log", "off");
    assert_eq!(status, 200, "{body}");
    let lines = json_lines(&client.proxy.stdout()).len();
    let (ok, _, err) = curl(&client.pod, &[&format!("{base}/ok/quiet")]);
    assert!(ok, "{err}");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        json_lines(&client.proxy.stdout()).len(),
        lines,
        "logging is off"
    );
    assert!(client.proxy.stderr().contains("access log switched"));

    // The other admin endpoints.
    let (status, config) = admin(&client.pod, "GET", "/config", "");
    assert_eq!(status, 200);
    assert!(config.contains("attempts = 3"), "{config}");
    assert!(
        config.contains("<redacted>") || !config.contains("token ="),
        "{config}"
    );
    let (status, id) = admin(&client.pod, "GET", "/identity", "");
    assert_eq!(status, 200);
    let id: serde_json::Value = serde_json::from_str(&id).unwrap();
    assert_eq!(id["id"], client.id());
    assert_eq!(id["ready"], true);
    assert!(id["not_after"].as_u64().unwrap() > now as u64);
    assert!(id["roots"][0]
        .as_str()
        .unwrap()
        .starts_with("-----BEGIN CERTIFICATE-----"));
    let (status, _) = admin(&client.pod, "PUT", "/log-level", "info,legate_proxy=trace");
    assert_eq!(status, 200);
    let (status, _) = admin(&client.pod, "PUT", "/log-level", "no=such=filter");
    assert_eq!(status, 400);
}

#[test]
fn traces_cross_both_proxies_and_the_app_sees_the_trace_continued() {
    let mesh = Mesh::new(&[]);
    let collector = mesh.plain_pod("collector");
    let receiver = Receiver::start(&collector, 4318);
    // The server's proxy exports over TLS, verified against roots of its
    // own; the client's in plain HTTP.
    let (roots, cert, key) = collector_certificate(collector.ip().into());
    let tls = receiver.also_tls(&collector, 4319, cert, key);
    let plain = PodOptions {
        proxy_set: vec![format!("telemetry.otlp_endpoint=http://{}", receiver.addr)],
        ..Default::default()
    };
    let verified = PodOptions {
        proxy_set: vec![
            format!("telemetry.otlp_endpoint=https://{tls}"),
            format!("telemetry.otlp_ca_file={}", roots.path().display()),
        ],
        ..Default::default()
    };
    let server = mesh.meshed_pod("server", verified);
    let client = mesh.meshed_pod("client", plain);
    let _app = Scripted::start(&server.pod, PORT);

    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller = "00f067aa0ba902b7";
    let r = request(
        &client.pod,
        &[
            "-H",
            &format!("traceparent: 00-{trace}-{caller}-01"),
            &format!("http://{}:{PORT}/headers", server.pod.ip()),
        ],
    );
    assert_eq!(r.status, 200);
    let headers: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    let seen = headers["traceparent"]
        .as_str()
        .expect("the app got a traceparent");
    let parts: Vec<&str> = seen.split('-').collect();
    assert_eq!(parts.len(), 4, "{seen}");
    assert_eq!(
        parts[1], trace,
        "the app's traceparent continues the client's trace"
    );
    assert_ne!(
        parts[2], caller,
        "and names the server proxy's span as its parent"
    );

    let spans = receiver.wait_for("both proxies' spans", |s| {
        s.iter().filter(|s| s.trace_id == trace).count() >= 2
    });
    let ours: Vec<_> = spans.iter().filter(|s| s.trace_id == trace).collect();
    let out = ours
        .iter()
        .find(|s| s.kind == 3)
        .expect("a client span from the client's proxy");
    let inb = ours
        .iter()
        .find(|s| s.kind == 2)
        .expect("a server span from the server's proxy");
    assert_eq!(
        out.parent_span_id, caller,
        "the client proxy continues the caller's span"
    );
    assert_eq!(
        inb.parent_span_id, out.span_id,
        "the server proxy's span is the client proxy's child"
    );
    assert_eq!(
        parts[2], inb.span_id,
        "the app's parent is the server proxy's span"
    );
    assert_eq!(out.service, client.id());
    assert_eq!(inb.service, server.id());
    assert_eq!(out.name, "GET");
    assert_eq!(out.attr("http.response.status_code"), Some("200"));
    assert_eq!(out.attr("legate.peer_id"), Some(server.id()));
    assert_eq!(inb.attr("legate.peer_id"), Some(client.id()));
    assert_eq!(out.attr("url.path"), None, "paths are opt-in");

    // Without a traceparent the client's proxy starts a trace.
    let r = request(
        &client.pod,
        &[&format!("http://{}:{PORT}/headers", server.pod.ip())],
    );
    let headers: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    let started = headers["traceparent"]
        .as_str()
        .expect("a new trace")
        .to_owned();
    let new_trace = started.split('-').nth(1).unwrap().to_owned();
    receiver.wait_for("the new trace's spans", |s| {
        s.iter().filter(|s| s.trace_id == new_trace).count() >= 2
    });
    // The server's proxy exported the two traces in separate batches
    // (the second began after the first had arrived), both over the one
    // TLS connection it keeps to the collector.
    assert_eq!(
        receiver.connections(tls.port()),
        1,
        "one TLS connection to the collector for all exports"
    );
}

/// An export that the collector reads and then drops as it closes the
/// kept connection (its idle timeout firing just as the export arrives)
/// is sent again on a new connection, not lost: over TLS, where the
/// collector closes without `close_notify`, and in plain HTTP, where the
/// export is a POST the proxy would not repeat for a client.
#[test]
fn an_export_the_collector_drops_while_closing_is_sent_again() {
    let mesh = Mesh::new(&[]);
    let collector = mesh.plain_pod("collector");
    // Each connection answers one export and drops the next unanswered.
    let receiver = Receiver::start_closing(&collector, 4318, 1);
    let (roots, cert, key) = collector_certificate(collector.ip().into());
    let tls = receiver.also_tls_closing(&collector, 4319, cert, key, 1);
    let exporting = |name: &str, set: Vec<String>| {
        let pod = mesh.meshed_pod(
            name,
            PodOptions {
                proxy_set: set,
                ..Default::default()
            },
        );
        let app = Scripted::start(&pod.pod, PORT);
        (pod, app)
    };
    let over_tls = exporting(
        "over-tls",
        vec![
            format!("telemetry.otlp_endpoint=https://{tls}"),
            format!("telemetry.otlp_ca_file={}", roots.path().display()),
        ],
    );
    let plain = format!("telemetry.otlp_endpoint=http://{}", receiver.addr);
    let in_plain = exporting("in-plain", vec![plain]);
    let outsider = mesh.plain_pod("outsider");
    let mut trace_no = 0x4bf9_2f35_0000u128;
    for (server, _app) in [&over_tls, &in_plain] {
        let url = format!("http://{}:{PORT}/headers", server.pod.ip());
        for n in 0..3 {
            trace_no += 1;
            let trace = format!("{trace_no:032x}");
            let traceparent = format!("traceparent: 00-{trace}-00f067aa0ba902b7-01");
            let r = request(&outsider, &["-H", &traceparent, &url]);
            assert_eq!(r.status, 200);
            // One export at a time: the next request starts once this
            // one's span has arrived.
            receiver.wait_for(
                &format!("the span of request {n} to {}", server.id()),
                |s| s.iter().any(|s| s.trace_id == trace),
            );
        }
    }
    assert_eq!(
        receiver.dropped(),
        4,
        "each proxy's second and third exports met a closing connection"
    );
}

/// A CA's certificate in a PEM file, and a certificate it issued for `ip`
/// (DER) with its key (PKCS#8 DER).
fn collector_certificate(ip: std::net::IpAddr) -> (tempfile::NamedTempFile, Vec<u8>, Vec<u8>) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    use std::io::Write;
    let ca_key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = p.self_signed(&ca_key).unwrap();
    let issuer = Issuer::from_ca_cert_der(ca.der(), ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec![ip.to_string()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let mut roots = tempfile::NamedTempFile::new().unwrap();
    roots.write_all(ca.pem().as_bytes()).unwrap();
    // The proxy runs as a uid of its own; a CA certificate is no secret.
    std::fs::set_permissions(
        roots.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .unwrap();
    (roots, leaf.der().to_vec(), key.serialize_der())
}
