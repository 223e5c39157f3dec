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
//! ([`EXPORT_TIMEOUT`]), no retries, sent by a small hyper client on the
//! proxy's runtime.
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

use crate::metrics::Direction;
use crate::socket::Targets;

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
}

/// The URL spans are posted to: the endpoint, with `/v1/traces` when it
/// names no path of its own.
pub fn traces_url(endpoint: &str) -> Result<String, TelemetryError> {
    let bad = |reason: &str| TelemetryError::Endpoint {
        endpoint: endpoint.to_owned(),
        reason: reason.to_owned(),
    };
    let uri: http::Uri = endpoint.parse().map_err(|_| bad("it does not parse"))?;
    if uri.scheme_str() != Some("http") {
        return Err(bad("only http:// is supported"));
    }
    if uri.authority().is_none() {
        return Err(bad("it names no host"));
    }
    match uri.path() {
        "" | "/" => Ok(format!("{}/v1/traces", endpoint.trim_end_matches('/'))),
        _ => Ok(endpoint.to_owned()),
    }
}

/// Posts export batches on the proxy's runtime with the proxy's own
/// HTTP/1.1 client. The SDK's batch processor calls it from its own
/// thread; the request runs as a task on `runtime` and the processor waits
/// for its result. The collector's name is resolved for every batch (a
/// couple of lookups a second at most), so a collector that moves is
/// followed.
struct OtlpClient {
    runtime: tokio::runtime::Handle,
    client: Arc<crate::http::h1::Pool>,
}

impl std::fmt::Debug for OtlpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OtlpClient").finish_non_exhaustive()
    }
}

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
    let port = uri.port_u16().unwrap_or(80);
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
        let client = self.client.clone();
        let send = async move {
            let targets = collector(request.uri())
                .await
                .map_err(|e| -> HttpError { e.into() })?;
            let request = request.map(crate::http::full);
            let res = client
                .send(targets, request)
                .await
                .map_err(|e| -> HttpError { Box::new(e) })?;
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
    /// trace (its SPIFFE ID); exports run on `runtime`.
    pub fn start(
        endpoint: &str,
        sample: f64,
        service: &str,
        runtime: tokio::runtime::Handle,
    ) -> Result<Self, TelemetryError> {
        let url = traces_url(endpoint)?;
        let client = Arc::new(crate::http::h1::Pool::new(crate::socket::Dial {
            timeout: Duration::from_secs(2),
            keepalive: Duration::from_secs(60),
        }));
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(OtlpClient { runtime, client })
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
        assert!(traces_url("https://collector").is_err());
        assert!(traces_url("collector:4318").is_err());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_span_continues_the_incoming_trace_and_replaces_the_traceparent() {
        // Nothing listens here: exports fail, quietly, off the request path.
        let t = Tracing::start(
            "http://127.0.0.1:9",
            1.0,
            "spiffe://legate.local/test",
            tokio::runtime::Handle::current(),
        )
        .unwrap();
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
