//! What the proxy records about one HTTP request: its metrics (counted at
//! the response headers), its span, and, when sampled, its access log line
//! (written when the response body ends, so that it has the bytes and the
//! whole duration).
//!
//! Nothing here allocates unless the request is traced or logged.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::SystemTime;

use bytes::Bytes;
use http::{HeaderMap, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::{Frame, SizeHint};
use legate_config::SpiffeId;
use opentelemetry::KeyValue;
use tokio::time::Instant;

use super::RequestSpan;
use crate::access::Line;
use crate::metrics::{Direction, MethodClass, RouteStats};
use crate::policy::ERROR_HEADER;
use crate::pool::{Body, BoxError};
use crate::Shared;

/// What the request path learnt while it served the request.
#[derive(Default)]
pub struct Seen {
    /// The latency series: the policy's (outbound) or the port's (inbound).
    pub route: Option<Arc<RouteStats>>,
    /// Retries made.
    pub retries: u32,
    /// The peer proxy's identity, when the request crossed the mesh.
    pub peer: Option<SpiffeId>,
    /// Set once the request was sent: `Some(None)` directly (plaintext),
    /// `Some(Some(id))` over the mesh to `id`.
    pub carried: Option<Option<SpiffeId>>,
    /// When the answer arrived, if the clock was read then anyway.
    pub answered: Option<Instant>,
}

struct LogFields {
    time: SystemTime,
    client: SocketAddr,
    dst: SocketAddr,
    method: http::Method,
    authority: Option<String>,
    path: Option<String>,
    version: http::Version,
    request_bytes: Option<u64>,
}

/// One request being observed.
pub struct Observation {
    dir: Direction,
    started: Instant,
    method: MethodClass,
    span: Option<RequestSpan>,
    log: Option<Box<LogFields>>,
}

fn authority_of(parts: &http::request::Parts) -> Option<String> {
    parts
        .uri
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            parts
                .headers
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        })
}

impl Observation {
    /// Starts observing a request from `client` to original destination
    /// `dst`. With tracing on, the request's `traceparent` is replaced by
    /// the proxy's span.
    pub fn start(
        ctx: &Shared,
        dir: Direction,
        parts: &mut http::request::Parts,
        client: SocketAddr,
        dst: SocketAddr,
    ) -> Self {
        let method = MethodClass::of(&parts.method);
        let with_paths = ctx.access.with_paths();
        let span = ctx.tracing.as_ref().map(|t| {
            let mut attrs = vec![
                KeyValue::new("http.request.method", parts.method.to_string()),
                KeyValue::new("legate.direction", dir.as_str()),
            ];
            if let Some(a) = authority_of(parts) {
                attrs.push(KeyValue::new("server.address", a));
            }
            if with_paths {
                attrs.push(KeyValue::new("url.path", parts.uri.path().to_owned()));
            }
            t.request_span(dir, method.as_str(), &mut parts.headers, attrs)
        });
        let log = ctx.access.sampled().then(|| {
            Box::new(LogFields {
                time: SystemTime::now(),
                client,
                dst,
                method: parts.method.clone(),
                authority: authority_of(parts),
                path: with_paths.then(|| {
                    parts
                        .uri
                        .path_and_query()
                        .map_or("/", |p| p.as_str())
                        .to_owned()
                }),
                version: parts.version,
                request_bytes: content_length(&parts.headers),
            })
        });
        Observation {
            dir,
            started: Instant::now(),
            method,
            span,
            log,
        }
    }

    /// Records the response and returns it, its body wrapped to finish the
    /// access log line when it ends.
    pub fn finish(self, ctx: &Shared, res: Response<Body>, seen: Seen) -> Response<Body> {
        let status = res.status();
        let elapsed = match seen.answered {
            Some(t) => t.saturating_duration_since(self.started),
            None => self.started.elapsed(),
        };
        if let Some(route) = &seen.route {
            ctx.metrics
                .request(self.dir, self.method, status, elapsed, route);
        }
        let error = res
            .headers()
            .get(&ERROR_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        if let Some(span) = self.span {
            let mut attrs = Vec::new();
            if let Some(peer) = &seen.peer {
                attrs.push(KeyValue::new("legate.peer_id", peer.as_str().to_owned()));
            }
            if self.dir == Direction::Outbound {
                attrs.push(KeyValue::new("legate.retries", i64::from(seen.retries)));
            }
            if let Some(e) = &error {
                attrs.push(KeyValue::new("legate.error", e.clone()));
            }
            span.finish(status, attrs);
        }
        let Some(fields) = self.log else {
            return res;
        };
        let (parts, body) = res.into_parts();
        let logged = Logged {
            inner: body,
            bytes: 0,
            pending: Some(Pending {
                ctx_access: ctx.access.clone(),
                fields,
                dir: self.dir,
                started: self.started,
                status,
                retries: seen.retries,
                peer: seen.peer,
                error,
            }),
        };
        Response::from_parts(parts, logged.boxed())
    }
}

fn content_length(h: &HeaderMap) -> Option<u64> {
    h.get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// The parts of a request line known once the response headers are.
struct Pending {
    ctx_access: Arc<crate::access::AccessLog>,
    fields: Box<LogFields>,
    dir: Direction,
    started: Instant,
    status: StatusCode,
    retries: u32,
    peer: Option<SpiffeId>,
    error: Option<String>,
}

impl Pending {
    fn emit(self, response_bytes: u64) {
        let f = &self.fields;
        let local = self.ctx_access.local_id();
        let remote = self.peer.as_ref().map(SpiffeId::as_str);
        let (source_id, destination_id) = match self.dir {
            Direction::Outbound => (local, remote),
            Direction::Inbound => (remote, local),
        };
        let protocol = match f.version {
            http::Version::HTTP_2 => "h2",
            http::Version::HTTP_10 => "http/1.0",
            _ => "http/1.1",
        };
        let mut line = Line::new(f.time, "http");
        line.str("direction", self.dir.as_str())
            .display("source", f.client)
            .display("destination", f.dst)
            .opt_str("source_id", source_id)
            .opt_str("destination_id", destination_id)
            .str("protocol", protocol)
            .str("method", f.method.as_str())
            .opt_str("authority", f.authority.as_deref());
        if let Some(p) = &f.path {
            line.str("path", p);
        }
        line.num("status", u64::from(self.status.as_u16()));
        match f.request_bytes {
            Some(n) => line.num("request_bytes", n),
            None => line.opt_str("request_bytes", None),
        };
        line.num("response_bytes", response_bytes)
            .millis("duration_ms", self.started.elapsed())
            .num("retries", u64::from(self.retries))
            .opt_str("error", self.error.as_deref());
        self.ctx_access.emit(line.finish());
    }
}

/// A response body that writes the request's access log line when it is
/// done: at its end, or when it is dropped unfinished.
struct Logged {
    inner: Body,
    bytes: u64,
    pending: Option<Pending>,
}

impl hyper::body::Body for Logged {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let res = Pin::new(&mut self.inner).poll_frame(cx);
        match &res {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    self.bytes += d.len() as u64;
                }
            }
            Poll::Ready(None) => {
                if let Some(p) = self.pending.take() {
                    p.emit(self.bytes);
                }
            }
            _ => {}
        }
        res
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        if let Some(p) = self.pending.take() {
            p.emit(self.bytes);
        }
    }
}
