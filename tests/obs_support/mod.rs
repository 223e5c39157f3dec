//! Helpers for the observability tests: the admin server, metrics text,
//! promtool, and a small OTLP/HTTP receiver that records spans.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use legate_testbed::Pod;

/// The admin server as seen from inside its pod.
pub const ADMIN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 15000);

pub use legate_testbed::mesh::http_request as http;

/// A request to the proxy's admin server from inside `pod`, over loopback.
pub fn admin(pod: &Pod, method: &str, path: &str, body: &str) -> (u16, String) {
    let (m, p, b) = (method.to_owned(), path.to_owned(), body.to_owned());
    pod.run_in(move || http(ADMIN, &m, &p, &b))
        .expect("enter the pod")
        .expect("admin request")
}

/// `/metrics` of the proxy in `pod`.
pub fn scrape(pod: &Pod) -> String {
    let (status, body) = admin(pod, "GET", "/metrics", "");
    assert_eq!(status, 200, "{body}");
    body
}

/// The value of the sample `name{labels}` (every label given must match;
/// others may be present), or 0 when there is none.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, rest) = series.split_once('{').unwrap_or((series, "}"));
            if n != name {
                return None;
            }
            let set = rest.trim_end_matches('}');
            labels
                .iter()
                .all(|(k, v)| set.split(',').any(|kv| kv == format!("{k}=\"{v}\"")))
                .then(|| value.parse::<f64>().ok())
                .flatten()
        })
        .sum()
}

/// Runs `promtool check metrics` on the text; panics with its report.
pub fn promtool_check(text: &str) {
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; scripts/deps.sh test installs it)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("feed promtool");
    let out = child.wait_with_output().expect("promtool");
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A span as the receiver got it.
#[derive(Debug, Clone)]
pub struct Span {
    pub trace_id: String,
    pub span_id: String,
    pub parent_span_id: String,
    pub name: String,
    /// 2 server, 3 client (OTLP's SpanKind).
    pub kind: i32,
    pub service: String,
    pub attributes: Vec<(String, String)>,
}

impl Span {
    pub fn attr(&self, key: &str) -> Option<&str> {
        self.attributes
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn value_text(v: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        _ => String::new(),
    }
}

/// A real OTLP/HTTP receiver (protobuf), listening in a pod, recording
/// every span it is sent.
pub struct Receiver {
    pub addr: SocketAddr,
    spans: Arc<Mutex<Vec<Span>>>,
    requests: Arc<Mutex<u32>>,
    /// Connections accepted, by listening port.
    connections: Arc<Mutex<std::collections::HashMap<u16, u32>>>,
    /// Requests read and left unanswered as their connection closed.
    dropped: Arc<Mutex<u32>>,
}

/// How a receiver's listener treats its connections.
#[derive(Clone, Copy)]
enum Keep {
    /// Answers every request, for as long as the client keeps it.
    Always,
    /// Answers this many requests; reads the next one whole and closes
    /// the connection instead of answering, as a collector whose idle
    /// timeout fires just as a request arrives. Over TLS it closes without
    /// `close_notify`, as a process that exits or a balancer that drops
    /// the connection does.
    Answering(u32),
}

impl Receiver {
    pub fn start(pod: &Pod, port: u16) -> Receiver {
        Self::start_keeping(pod, port, Keep::Always)
    }

    /// As [`Self::start`], but each connection answers `answered` requests
    /// and then closes on reading the next one, unanswered (see
    /// [`Self::dropped`]).
    pub fn start_closing(pod: &Pod, port: u16, answered: u32) -> Receiver {
        Self::start_keeping(pod, port, Keep::Answering(answered))
    }

    fn start_keeping(pod: &Pod, port: u16, keep: Keep) -> Receiver {
        let r = Receiver {
            addr: SocketAddr::new(pod.ip().into(), port),
            spans: Arc::new(Mutex::new(Vec::new())),
            requests: Arc::new(Mutex::new(0)),
            connections: Arc::default(),
            dropped: Arc::default(),
        };
        r.listen(pod, port, None, keep);
        r
    }

    /// Also receives on `port` behind TLS, presenting `cert` (DER) with
    /// `key` (PKCS#8 DER); the spans join those received in plain.
    pub fn also_tls(&self, pod: &Pod, port: u16, cert: Vec<u8>, key: Vec<u8>) -> SocketAddr {
        self.listen(pod, port, Some(tls_config(cert, key)), Keep::Always)
    }

    /// As [`Self::also_tls`], but each connection answers `answered`
    /// requests and then closes on reading the next one, unanswered (see
    /// [`Self::dropped`]).
    pub fn also_tls_closing(
        &self,
        pod: &Pod,
        port: u16,
        cert: Vec<u8>,
        key: Vec<u8>,
        answered: u32,
    ) -> SocketAddr {
        let keep = Keep::Answering(answered);
        self.listen(pod, port, Some(tls_config(cert, key)), keep)
    }

    fn listen(
        &self,
        pod: &Pod,
        port: u16,
        tls: Option<Arc<rustls::ServerConfig>>,
        keep: Keep,
    ) -> SocketAddr {
        let addr = SocketAddr::new(pod.ip().into(), port);
        let listener = pod
            .run_in(move || TcpListener::bind(addr))
            .expect("enter the pod")
            .expect("bind the receiver");
        let (s, r) = (self.spans.clone(), self.requests.clone());
        let accepted = self.connections.clone();
        let dropped = self.dropped.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                *accepted.lock().unwrap().entry(port).or_default() += 1;
                let (s, r, d, tls) = (s.clone(), r.clone(), dropped.clone(), tls.clone());
                let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
                std::thread::spawn(move || match tls {
                    None => serve(conn, &s, &r, keep, &d),
                    Some(cfg) => {
                        if let Ok(session) = rustls::ServerConnection::new(cfg) {
                            let stream = rustls::StreamOwned::new(session, conn);
                            serve(stream, &s, &r, keep, &d);
                        }
                    }
                });
            }
        });
        addr
    }

    /// Connections accepted on `port` so far.
    pub fn connections(&self, port: u16) -> u32 {
        let accepted = self.connections.lock().unwrap();
        accepted.get(&port).copied().unwrap_or(0)
    }

    /// Requests read and left unanswered by a closing connection.
    pub fn dropped(&self) -> u32 {
        *self.dropped.lock().unwrap()
    }

    pub fn spans(&self) -> Vec<Span> {
        self.spans.lock().unwrap().clone()
    }

    /// Waits until `pred` holds for the spans received.
    pub fn wait_for(&self, what: &str, pred: impl Fn(&[Span]) -> bool) -> Vec<Span> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let spans = self.spans();
            if pred(&spans) {
                return spans;
            }
            assert!(
                Instant::now() < deadline,
                "no {what} within 15 s; got {spans:#?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn tls_config(cert: Vec<u8>, key: Vec<u8>) -> Arc<rustls::ServerConfig> {
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![cert.into()],
        rustls::pki_types::PrivatePkcs8KeyDer::from(key).into(),
    )
    .expect("the receiver's certificate");
    Arc::new(config)
}

fn serve(
    conn: impl Read + Write,
    spans: &Mutex<Vec<Span>>,
    requests: &Mutex<u32>,
    keep: Keep,
    dropped: &Mutex<u32>,
) {
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use prost::Message;
    let mut r = BufReader::new(conn);
    let mut answered = 0;
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut length = 0usize;
        loop {
            let mut h = String::new();
            if r.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    length = v.trim().parse().unwrap_or(0);
                }
            }
        }
        let mut body = vec![0u8; length];
        if r.read_exact(&mut body).is_err() {
            return;
        }
        if matches!(keep, Keep::Answering(n) if answered == n) {
            *dropped.lock().unwrap() += 1;
            return;
        }
        answered += 1;
        *requests.lock().unwrap() += 1;
        if let Ok(req) = ExportTraceServiceRequest::decode(body.as_slice()) {
            let mut got = spans.lock().unwrap();
            for rs in req.resource_spans {
                let service = rs
                    .resource
                    .as_ref()
                    .and_then(|r| r.attributes.iter().find(|a| a.key == "service.name"))
                    .map(|a| value_text(&a.value))
                    .unwrap_or_default();
                for ss in rs.scope_spans {
                    for sp in ss.spans {
                        got.push(Span {
                            trace_id: hex(&sp.trace_id),
                            span_id: hex(&sp.span_id),
                            parent_span_id: hex(&sp.parent_span_id),
                            name: sp.name.clone(),
                            kind: sp.kind,
                            service: service.clone(),
                            attributes: sp
                                .attributes
                                .iter()
                                .map(|a| (a.key.clone(), value_text(&a.value)))
                                .collect(),
                        });
                    }
                }
            }
        }
        let head =
            "HTTP/1.1 200 OK\r\nContent-Type: application/x-protobuf\r\nContent-Length: 0\r\n\r\n";
        let w = r.get_mut();
        if w.write_all(head.as_bytes())
            .and_then(|()| w.flush())
            .is_err()
        {
            return;
        }
    }
}
