//! Traces: one span per HTTP request in each proxy, exported over OTLP/HTTP
//! (protobuf) to `telemetry.otlp_endpoint`.
//!
//! **Propagation.** A request's W3C `traceparent` (and `tracestate`) is
//! continued when present; when absent a new trace starts. The proxy's own
//! span then replaces the `traceparent` the request carries onwards, so on
//! a mesh hop the server's proxy makes its span a child of the client's
//! proxy's span, and the application behind it sees a `traceparent` in the
//! same trace whose parent is the server proxy's span. Outbound spans are
//! of kind client, inbound spans of kind server. With tracing off (no
//! endpoint) the proxy neither reads nor writes these headers: they pass
//! through untouched, as any other header.
//!
//! **Sampling.** A request with a `traceparent` follows its caller's
//! sampled flag; a new trace is recorded with probability
//! `telemetry.trace_sample`.
//!
//! **A collector that is down never slows traffic.** Finished spans go into
//! a bounded queue ([`MAX_QUEUE`] spans) read by the SDK's batch processor
//! on a thread of its own; when the queue is full new spans are dropped,
//! never waited for. Each export is one attempt with a deadline
//! ([`EXPORT_TIMEOUT`]), no retries, sent by a small HTTP/1.1 client on
//! the proxy's runtime; only an export that a kept connection lost before
//! any answer, closed by the collector as it arrived, goes again once on a
//! new connection.
//!
//! **Collectors behind TLS.** An `https://` endpoint is verified against
//! `telemetry.otlp_ca_file` when it is set, else against the system's CA
//! bundle (`SSL_CERT_FILE`, or the distributions' usual paths); the file
//! is read at start and again for each new connection, so a collector
//! whose CA rotates is followed. The connection is kept from one export to the
//! next, as the plain-HTTP client keeps its own: a handshake per batch
//! would cost every proxy a little and a collector serving a whole mesh a
//! lot. When the collector has closed it in the meantime (its idle
//! timeout), or closes it as the export arrives, before answering, the
//! export goes out on a new one.
//!
//! Span attributes: `http.request.method`, `server.address` (the
//! authority), `url.path` (only with `log.access_paths`),
//! `http.response.status_code`, `legate.direction`, `legate.peer_id` (the
//! peer proxy's SPIFFE ID when known), `legate.retries` (outbound),
//! `legate.error` (the proxy's own reason when it answered itself). The
//! resource's `service.name` is the workload's SPIFFE ID.

pub mod conn;
pub mod request;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;
use http_body_util::BodyExt;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{SpanKind, Status, TraceContextExt, Tracer as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_http::{HeaderExtractor, HeaderInjector, HttpClient, HttpError};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracer, SdkTracerProvider,
};
use opentelemetry_sdk::Resource;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

use crate::metrics::Direction;
use crate::socket::{Dial, Targets};

/// Spans queued for export before new ones are dropped.
pub const MAX_QUEUE: usize = 4096;
/// Deadline of one export request, response included.
pub const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why tracing could not start.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("telemetry.otlp_endpoint {endpoint:?} is not a usable URL: {reason}")]
    Endpoint { endpoint: String, reason: String },
    #[error("cannot build the OTLP exporter: {0}")]
    Exporter(String),
    #[error("telemetry.otlp_ca_file is set but the OTLP endpoint {endpoint:?} is not https://; use an https:// endpoint or drop the file")]
    RootsWithoutTls { endpoint: String },
    #[error("the roots for the https OTLP collector: {0}")]
    Roots(String),
}

/// Where distributions keep the system's CA bundle, in the order tried
/// after `SSL_CERT_FILE`.
const SYSTEM_BUNDLES: [&str; 4] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

/// Where the collector's roots are read from: `telemetry.otlp_ca_file`,
/// or the system's CA bundle (`SSL_CERT_FILE`, or the distributions'
/// usual paths). Found once; the file is read again as it changes.
struct RootsFile {
    path: PathBuf,
    /// Every certificate must be usable (the operator's own file), not
    /// only some (a system bundle may hold a few that rustls refuses).
    strict: bool,
}

impl RootsFile {
    fn find(file: Option<&Path>) -> Result<Self, TelemetryError> {
        if let Some(f) = file {
            return Ok(RootsFile {
                path: f.to_path_buf(),
                strict: true,
            });
        }
        let env = std::env::var_os("SSL_CERT_FILE").map(PathBuf::from);
        let found = env
            .into_iter()
            .chain(SYSTEM_BUNDLES.iter().map(PathBuf::from))
            .find(|p| p.is_file());
        match found {
            Some(path) => Ok(RootsFile {
                path,
                strict: false,
            }),
            None => Err(TelemetryError::Roots(
                "no system CA bundle found; set telemetry.otlp_ca_file to a PEM file of the collector's roots"
                    .to_owned(),
            )),
        }
    }

    fn read(&self) -> Result<Vec<u8>, TelemetryError> {
        std::fs::read(&self.path)
            .map_err(|e| TelemetryError::Roots(format!("cannot read {}: {e}", self.path.display())))
    }

    /// The roots in `pem`, the file's content.
    fn parse(&self, pem: &[u8]) -> Result<rustls::RootCertStore, TelemetryError> {
        let shown = self.path.display();
        let bad = |what: String| TelemetryError::Roots(what);
        let certs = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(format!("{shown} is not PEM: {e}")))?;
        let mut store = rustls::RootCertStore::empty();
        if self.strict {
            for c in certs {
                store
                    .add(c)
                    .map_err(|e| bad(format!("{shown} holds an unusable certificate: {e}")))?;
            }
        } else {
            store.add_parsable_certificates(certs);
        }
        if store.is_empty() {
            return Err(bad(format!("{shown} holds no usable PEM certificate")));
        }
        Ok(store)
    }
}

/// A TLS client for the collector that trusts `roots`.
fn collector_connector(
    roots: rustls::RootCertStore,
) -> Result<tokio_rustls::TlsConnector, TelemetryError> {
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| TelemetryError::Exporter(e.to_string()))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// The URL spans are posted to: the endpoint, with `/v1/traces` when it
/// names no path of its own.
pub fn traces_url(endpoint: &str) -> Result<String, TelemetryError> {
    let bad = |reason: &str| TelemetryError::Endpoint {
        endpoint: endpoint.to_owned(),
        reason: reason.to_owned(),
    };
    let uri: http::Uri = endpoint.parse().map_err(|_| bad("it does not parse"))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) {
        return Err(bad("it must start with http:// or https://"));
    }
    if uri.authority().is_none() {
        return Err(bad("it names no host"));
    }
    match uri.path() {
        "" | "/" => Ok(format!("{}/v1/traces", endpoint.trim_end_matches('/'))),
        _ => Ok(endpoint.to_owned()),
    }
}

/// Posts export batches on the proxy's runtime. The SDK's batch processor
/// calls it from its own thread; the request runs as a task on `runtime`
/// and the processor waits for its result. The collector's name is
/// resolved for every batch (a couple of lookups a second at most), so a
/// collector that moves is followed.
struct OtlpClient {
    runtime: tokio::runtime::Handle,
    transport: Arc<Transport>,
}

impl std::fmt::Debug for OtlpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OtlpClient").finish_non_exhaustive()
    }
}

/// How exports reach the collector.
enum Transport {
    /// `http://`: the proxy's own HTTP/1.1 client, connections kept.
    Plain(Arc<crate::http::h1::Pool>),
    /// `https://`: a verified TLS connection, kept from one export to
    /// the next. Boxed: it is far larger than the other, and there is one
    /// per proxy.
    Tls(Box<TlsExport>),
}

struct TlsExport {
    roots: RootsFile,
    /// The roots file's content as last read, and a client trusting it.
    /// The file is read again for each new connection (exports keep
    /// theirs, so that is rarely), and a changed one replaces the client:
    /// a collector whose CA rotates is followed without a restart.
    trust: std::sync::Mutex<(Vec<u8>, tokio_rustls::TlsConnector)>,
    /// The name the collector's certificate must carry: the endpoint's host.
    name: ServerName<'static>,
    dial: Dial,
    /// The connection the last export used and where it leads. Exports
    /// come a second or two apart, and a TLS handshake for each would cost
    /// the proxy and the collector more than the export itself.
    kept: std::sync::Mutex<Option<(Targets, ExportSender)>>,
}

impl TlsExport {
    fn new(url: &str, roots: Option<&Path>, dial: Dial) -> Result<Self, TelemetryError> {
        let uri: http::Uri = url.parse().map_err(|_| TelemetryError::Endpoint {
            endpoint: url.to_owned(),
            reason: "it does not parse".to_owned(),
        })?;
        let host = uri.host().unwrap_or_default();
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let name = ServerName::try_from(host.to_owned()).map_err(|e| TelemetryError::Endpoint {
            endpoint: url.to_owned(),
            reason: format!("its host cannot be checked against a certificate: {e}"),
        })?;
        let roots = RootsFile::find(roots)?;
        let pem = roots.read()?;
        let connector = collector_connector(roots.parse(&pem)?)?;
        Ok(TlsExport {
            roots,
            trust: std::sync::Mutex::new((pem, connector)),
            name,
            dial,
            kept: std::sync::Mutex::new(None),
        })
    }

    async fn send(
        &self,
        targets: Targets,
        request: http::Request<Bytes>,
    ) -> Result<http::Response<crate::pool::Body>, String> {
        let (mut head, body) = request.into_parts();
        // Origin form on the wire, the authority in Host, as any server
        // expects from a client.
        if let Some(authority) = head.uri.authority() {
            let host = http::HeaderValue::from_str(authority.as_str())
                .map_err(|e| format!("the OTLP endpoint's authority: {e}"))?;
            head.headers.entry(http::header::HOST).or_insert(host);
        }
        head.uri = head
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .parse()
            .map_err(|e| format!("the OTLP endpoint's path: {e}"))?;
        let request = || {
            let mut req = http::Request::new(http_body_util::Full::new(body.clone()));
            *req.method_mut() = head.method.clone();
            *req.uri_mut() = head.uri.clone();
            *req.headers_mut() = head.headers.clone();
            req
        };
        if let Some(mut send) = self.take_kept(targets) {
            match send.send_request(request()).await {
                Ok(res) => return Ok(self.keep(targets, send, res)),
                // The kept connection failed before any answer came: the
                // collector closed it (its idle timeout) just as the export
                // went out, with or without TLS's close_notify, or reset
                // it. The export goes again on a new connection (at worst
                // the collector gets the batch twice). An answer that is
                // not HTTP is the collector's word, and is not resent.
                Err(e) if !e.is_parse() && !e.is_user() => {
                    tracing::debug!(error = %e, "kept OTLP connection failed; reconnecting");
                }
                Err(e) => return Err(format!("the OTLP export failed: {e}")),
            }
        }
        let mut send = self.open(targets).await?;
        let res = send
            .send_request(request())
            .await
            .map_err(|e| format!("the OTLP export failed: {e}"))?;
        Ok(self.keep(targets, send, res))
    }

    /// The kept connection, if it leads to `targets` and can take a
    /// request now; a closed or busy one is dropped.
    fn take_kept(&self, targets: Targets) -> Option<ExportSender> {
        let kept = self.kept.lock().unwrap_or_else(|p| p.into_inner()).take()?;
        (kept.0 == targets && kept.1.is_ready()).then_some(kept.1)
    }

    /// Keeps `send` for the next export and passes its answer on. The
    /// answer is read before the next export starts (the batch processor
    /// waits for each), so by then the connection is ready again.
    fn keep(
        &self,
        targets: Targets,
        send: ExportSender,
        res: http::Response<hyper::body::Incoming>,
    ) -> http::Response<crate::pool::Body> {
        *self.kept.lock().unwrap_or_else(|p| p.into_inner()) = Some((targets, send));
        res.map(crate::http::boxed)
    }

    /// A client trusting the roots file as it is now. A file that cannot
    /// be read or holds no usable roots leaves the last good roots in
    /// place, with a warning: a rotation caught half-written is read again
    /// at the next connection.
    fn connector(&self) -> tokio_rustls::TlsConnector {
        let mut trust = self.trust.lock().unwrap_or_else(|p| p.into_inner());
        let fresh = self.roots.read().and_then(|pem| {
            if pem == trust.0 {
                return Ok(None);
            }
            let connector = collector_connector(self.roots.parse(&pem)?)?;
            Ok(Some((pem, connector)))
        });
        match fresh {
            Ok(Some(new)) => {
                tracing::info!(file = %self.roots.path.display(), "the OTLP collector's roots changed; using them");
                *trust = new;
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "keeping the OTLP collector's previous roots"),
        }
        trust.1.clone()
    }

    /// A new verified TLS connection to the collector, HTTP/1.1 over it.
    async fn open(&self, targets: Targets) -> Result<ExportSender, String> {
        let tcp = self
            .dial
            .connect(&targets)
            .await
            .map_err(|e| format!("the OTLP collector: {e}"))?;
        let tls = self
            .connector()
            .connect(self.name.clone(), tcp)
            .await
            .map_err(|e| format!("TLS with the OTLP collector failed: {e}"))?;
        let (send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .map_err(|e| format!("HTTP with the OTLP collector failed: {e}"))?;
        // Ends when the collector closes the connection, or once `send`
        // is gone and no answer is left to read.
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "OTLP connection ended");
            }
        });
        Ok(send)
    }
}

/// The request half of an HTTP/1.1 connection to an https collector.
type ExportSender = hyper::client::conn::http1::SendRequest<http_body_util::Full<Bytes>>;

/// The collector's answer, up to 1 MiB.
async fn read_answer(mut body: crate::pool::Body) -> Result<Bytes, String> {
    let mut out = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| e.to_string())?;
        if let Ok(data) = frame.into_data() {
            if out.len() + data.len() > 1 << 20 {
                return Err("the OTLP collector's answer exceeds 1 MiB".to_owned());
            }
            out.extend_from_slice(&data);
        }
    }
    Ok(out.freeze())
}

/// Where an export goes: the first two addresses the collector's name
/// resolves to.
async fn collector(uri: &http::Uri) -> Result<Targets, String> {
    let host = uri.host().ok_or("the OTLP endpoint has no host")?;
    let default_port = if uri.scheme_str() == Some("https") {
        443
    } else {
        80
    };
    let port = uri.port_u16().unwrap_or(default_port);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let mut addrs = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| format!("resolving the OTLP collector {host}: {e}"))?;
    let first = addrs
        .next()
        .ok_or_else(|| format!("the OTLP collector {host} resolves to no address"))?;
    Ok(match addrs.next() {
        Some(then) => Targets::two(first, then),
        None => Targets::one(first),
    })
}

// The trait is declared with `async_trait`; this is what that expands to.
impl HttpClient for OtlpClient {
    fn send_bytes<'life0, 'async_trait>(
        &'life0 self,
        request: http::Request<Bytes>,
    ) -> Pin<Box<dyn Future<Output = Result<http::Response<Bytes>, HttpError>> + Send + 'async_trait>>
    where
        'life0: 'async_trait,
        Self: 'async_trait,
    {
        let transport = self.transport.clone();
        let send = async move {
            let targets = collector(request.uri())
                .await
                .map_err(|e| -> HttpError { e.into() })?;
            let res = match &*transport {
                Transport::Plain(client) => client
                    .send_own(targets, request)
                    .await
                    .map_err(|e| -> HttpError { Box::new(e) })?,
                Transport::Tls(tls) => tls
                    .send(targets, request)
                    .await
                    .map_err(|e| -> HttpError { e.into() })?,
            };
            let (parts, body) = res.into_parts();
            let body = read_answer(body)
                .await
                .map_err(|e| -> HttpError { e.into() })?;
            Ok::<_, HttpError>(http::Response::from_parts(parts, body))
        };
        let task = self
            .runtime
            .spawn(async move { tokio::time::timeout(EXPORT_TIMEOUT, send).await });
        Box::pin(async move {
            match task.await {
                Ok(Ok(res)) => res,
                Ok(Err(_)) => Err("the OTLP export timed out".into()),
                Err(e) => Err(format!("the OTLP export task failed: {e}").into()),
            }
        })
    }
}

/// The tracer and its exporter; clones share them.
#[derive(Clone)]
pub struct Tracing {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    propagator: TraceContextPropagator,
}

impl std::fmt::Debug for Tracing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracing").finish_non_exhaustive()
    }
}

impl Tracing {
    /// Starts exporting to `endpoint`. `service` names this proxy in the
    /// trace (its SPIFFE ID); exports run on `runtime`. `roots`, for an
    /// `https://` endpoint, is a PEM file of the collector's trust anchors
    /// (the system bundle when `None`).
    pub fn start(
        endpoint: &str,
        roots: Option<&Path>,
        sample: f64,
        service: &str,
        runtime: tokio::runtime::Handle,
    ) -> Result<Self, TelemetryError> {
        let url = traces_url(endpoint)?;
        let dial = Dial {
            timeout: Duration::from_secs(2),
            keepalive: Duration::from_secs(60),
        };
        let transport = if url.starts_with("https://") {
            Transport::Tls(Box::new(TlsExport::new(&url, roots, dial)?))
        } else if roots.is_some() {
            return Err(TelemetryError::RootsWithoutTls {
                endpoint: endpoint.to_owned(),
            });
        } else {
            Transport::Plain(Arc::new(crate::http::h1::Pool::new(dial)))
        };
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(OtlpClient {
                runtime,
                transport: Arc::new(transport),
            })
            .with_retry_policy(opentelemetry_otlp::RetryPolicy::disabled())
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(url)
            .with_timeout(EXPORT_TIMEOUT)
            .build()
            .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
        let batch = BatchConfigBuilder::default()
            .with_max_queue_size(MAX_QUEUE)
            .with_max_export_batch_size(512)
            .with_scheduled_delay(Duration::from_millis(500))
            .build();
        let processor = BatchSpanProcessor::builder(exporter)
            .with_batch_config(batch)
            .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                sample.clamp(0.0, 1.0),
            ))))
            .with_resource(
                Resource::builder_empty()
                    .with_service_name(service.to_owned())
                    .build(),
            )
            .build();
        let tracer = opentelemetry::trace::TracerProvider::tracer(&provider, "legate-proxy");
        Ok(Tracing {
            provider,
            tracer,
            propagator: TraceContextPropagator::new(),
        })
    }

    /// Starts the span of one request, continuing the trace in `headers`
    /// (or starting one), and writes the span's context back into them for
    /// the next hop.
    pub fn request_span(
        &self,
        dir: Direction,
        method: &'static str,
        headers: &mut HeaderMap,
        attributes: Vec<KeyValue>,
    ) -> RequestSpan {
        let parent = self.propagator.extract(&HeaderExtractor(headers));
        let kind = match dir {
            Direction::Outbound => SpanKind::Client,
            Direction::Inbound => SpanKind::Server,
        };
        let span = self
            .tracer
            .span_builder(method)
            .with_kind(kind)
            .with_attributes(attributes)
            .start_with_context(&self.tracer, &parent);
        let cx = parent.with_span(span);
        self.propagator
            .inject_context(&cx, &mut HeaderInjector(headers));
        RequestSpan { cx }
    }

    /// Exports what is queued, waiting at most `timeout`, and stops.
    pub fn shutdown(&self, timeout: Duration) {
        if let Err(e) = self.provider.shutdown_with_timeout(timeout) {
            tracing::debug!(error = %e, "trace exporter shutdown");
        }
    }
}

/// The span of one request in flight.
pub struct RequestSpan {
    cx: Context,
}

impl RequestSpan {
    /// Ends the span with the response status and any further attributes.
    pub fn finish(self, status: http::StatusCode, attributes: Vec<KeyValue>) {
        let span = self.cx.span();
        span.set_attribute(KeyValue::new(
            "http.response.status_code",
            i64::from(status.as_u16()),
        ));
        for kv in attributes {
            span.set_attribute(kv);
        }
        if status.is_server_error() {
            span.set_status(Status::error(""));
        }
        span.end();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_traces_path_is_added_only_when_missing() {
        assert_eq!(
            traces_url("http://collector:4318").unwrap(),
            "http://collector:4318/v1/traces"
        );
        assert_eq!(
            traces_url("http://collector:4318/").unwrap(),
            "http://collector:4318/v1/traces"
        );
        assert_eq!(
            traces_url("http://collector:4318/custom").unwrap(),
            "http://collector:4318/custom"
        );
        assert_eq!(
            traces_url("https://collector").unwrap(),
            "https://collector/v1/traces"
        );
        assert!(traces_url("ftp://collector").is_err());
        assert!(traces_url("collector:4318").is_err());
    }

    fn start(endpoint: &str, roots: Option<&Path>) -> Result<Tracing, TelemetryError> {
        Tracing::start(
            endpoint,
            roots,
            1.0,
            "spiffe://legate.local/test",
            tokio::runtime::Handle::current(),
        )
    }

    /// A CA, and a certificate it issued for 127.0.0.1 with its key.
    fn ca_and_server() -> (String, CertificateDer<'static>, Vec<u8>) {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        let ca_key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = p.self_signed(&ca_key).unwrap();
        let issuer = Issuer::from_ca_cert_der(ca.der(), ca_key).unwrap();
        let key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec!["127.0.0.1".to_owned()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        (ca.pem(), leaf.der().clone(), key.serialize_der())
    }

    /// An OTLP collector behind TLS on 127.0.0.1 that counts the export
    /// requests it is sent (a POST of protobuf with a body).
    async fn tls_collector(
        cert: CertificateDer<'static>,
        key: Vec<u8>,
    ) -> (std::net::SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert],
            rustls::pki_types::PrivatePkcs8KeyDer::from(key).into(),
        )
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let exports = Arc::new(AtomicUsize::new(0));
        let count = exports.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    continue;
                };
                let count = count.clone();
                let svc = hyper::service::service_fn(move |req: http::Request<_>| {
                    let count = count.clone();
                    async move {
                        let good = req.method() == http::Method::POST
                            && req.uri() == "/v1/traces"
                            && req.headers()[http::header::HOST] == addr.to_string().as_str()
                            && req.headers()[http::header::CONTENT_TYPE]
                                == "application/x-protobuf";
                        let body = http_body_util::BodyExt::collect(req.into_body())
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        if good && !body.is_empty() {
                            count.fetch_add(1, Ordering::SeqCst);
                        }
                        Ok::<_, std::convert::Infallible>(http::Response::new(
                            http_body_util::Full::new(Bytes::new()),
                        ))
                    }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), svc),
                );
            }
        });
        (addr, exports)
    }

    /// Records one span and waits for the exporter to flush.
    async fn export_one(t: Tracing) {
        let mut h = HeaderMap::new();
        t.request_span(Direction::Outbound, "GET", &mut h, vec![])
            .finish(http::StatusCode::OK, vec![]);
        tokio::task::spawn_blocking(move || t.shutdown(Duration::from_secs(5)))
            .await
            .unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn spans_reach_an_https_collector_its_roots_verify_and_no_other() {
        use std::sync::atomic::Ordering;
        let (ca_pem, cert, key) = ca_and_server();
        let mut roots = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(&mut roots, ca_pem.as_bytes()).unwrap();
        let (addr, exports) = tls_collector(cert, key).await;
        let endpoint = format!("https://{addr}");

        export_one(start(&endpoint, Some(roots.path())).unwrap()).await;
        assert_eq!(exports.load(Ordering::SeqCst), 1, "one verified export");

        // Roots that did not issue the collector's certificate: the
        // handshake fails and nothing is exported.
        let (other_pem, _, _) = ca_and_server();
        let mut other = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(&mut other, other_pem.as_bytes()).unwrap();
        export_one(start(&endpoint, Some(other.path())).unwrap()).await;
        assert_eq!(
            exports.load(Ordering::SeqCst),
            1,
            "no export to an unverified collector"
        );
    }

    #[tokio::test]
    async fn a_collector_whose_ca_rotates_is_followed_without_a_restart() {
        use std::sync::atomic::Ordering;
        let (ca_old, cert_old, key_old) = ca_and_server();
        let (ca_new, cert_new, key_new) = ca_and_server();
        let roots = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(roots.path(), &ca_old).unwrap();
        // The collector before and after its CA rotated (at another port,
        // so that the kept connection cannot serve the second).
        let (before, exports_before) = tls_collector(cert_old, key_old).await;
        let (after, exports_after) = tls_collector(cert_new, key_new).await;
        let dial = Dial {
            timeout: Duration::from_secs(2),
            keepalive: Duration::from_secs(60),
        };
        let url = format!("https://{before}/v1/traces");
        let tls = TlsExport::new(&url, Some(roots.path()), dial).unwrap();
        let export = |to: std::net::SocketAddr| {
            http::Request::post(format!("https://{to}/v1/traces"))
                .header(http::header::CONTENT_TYPE, "application/x-protobuf")
                .body(Bytes::from_static(b"spans"))
                .unwrap()
        };
        tls.send(Targets::one(before), export(before))
            .await
            .expect("verified by the first CA");
        let err = tls
            .send(Targets::one(after), export(after))
            .await
            .expect_err("the new CA is not trusted yet");
        assert!(err.contains("TLS"), "{err}");
        // Roots caught half-written are not taken: the last good ones stay.
        std::fs::write(roots.path(), "-----BEGIN CERT").unwrap();
        tls.send(Targets::one(before), export(before))
            .await
            .expect("still verified by the first CA");
        std::fs::write(roots.path(), format!("{ca_old}{ca_new}")).unwrap();
        tls.send(Targets::one(after), export(after))
            .await
            .expect("the file's new roots are read for the new connection");
        assert_eq!(exports_before.load(Ordering::SeqCst), 2);
        assert_eq!(exports_after.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn unusable_collector_roots_are_named_at_start() {
        let err = |endpoint: &str, roots: Option<&Path>| match start(endpoint, roots) {
            Ok(_) => panic!("{endpoint} with {roots:?} started"),
            Err(e) => e.to_string(),
        };
        let missing = Path::new("/nonexistent/otlp-roots.pem");
        let e = err("https://collector:4318", Some(missing));
        assert!(e.contains("/nonexistent/otlp-roots.pem"), "{e}");

        let empty = tempfile::NamedTempFile::new().unwrap();
        let e = err("https://collector:4318", Some(empty.path()));
        assert!(e.contains("no usable PEM certificate"), "{e}");

        let (ca_pem, _, _) = ca_and_server();
        let mut roots = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(&mut roots, ca_pem.as_bytes()).unwrap();
        let e = err("http://collector:4318", Some(roots.path()));
        assert!(
            e.contains("telemetry.otlp_ca_file") && e.contains("https://"),
            "{e}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_span_continues_the_incoming_trace_and_replaces_the_traceparent() {
        // Nothing listens here: exports fail, quietly, off the request path.
        let t = start("http://127.0.0.1:9", None).unwrap();
        let incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let mut h = HeaderMap::new();
        h.insert("traceparent", incoming.parse().unwrap());
        let started = std::time::Instant::now();
        let span = t.request_span(Direction::Outbound, "GET", &mut h, vec![]);
        let out = h["traceparent"].to_str().unwrap().to_owned();
        assert!(
            out.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
            "{out}"
        );
        assert!(!out.contains("00f067aa0ba902b7"), "a new parent: {out}");
        assert!(out.ends_with("-01"));
        span.finish(http::StatusCode::OK, vec![]);

        // Without a traceparent a new trace starts.
        let mut h = HeaderMap::new();
        t.request_span(Direction::Inbound, "GET", &mut h, vec![])
            .finish(http::StatusCode::OK, vec![]);
        assert!(h.contains_key("traceparent"));
        assert!(started.elapsed() < Duration::from_millis(100));
        let t2 = std::time::Instant::now();
        tokio::task::spawn_blocking(move || t.shutdown(Duration::from_secs(1)))
            .await
            .unwrap();
        assert!(t2.elapsed() < Duration::from_secs(3));
    }
}
