//! The admin server (`proxy.admin_listen`, port 15000).
//!
//! | request | answer |
//! | --- | --- |
//! | `GET /live` | 200 while the process runs |
//! | `GET /ready` | 200 once a certificate is held (the listeners are bound before this server starts); 503 before, and again while draining |
//! | `GET /metrics` | Prometheus text format; see [`crate::metrics`] |
//! | `GET /config` | the configuration in force, as TOML, secrets redacted |
//! | `GET /identity` | JSON: the SPIFFE ID, the certificate's validity, renewal counts, the trust bundle's roots as PEM, and the expiry of each root and intermediate |
//! | `GET /access-log` | JSON: whether access logs are on, the sample and whether paths are logged |
//! | `PUT /access-log` | body `on`, `off`, or a sample from 0 to 1 (which also turns logging on) |
//! | `PUT /log-level` | body: a tracing filter such as `debug` or `info,legate_proxy=trace` |
//! | `POST /shutdown` | drains and exits, as SIGTERM does |
//!
//! The three requests that change something are answered only for clients
//! on loopback (the peer address of the connection is checked); anyone else
//! gets 403. `/config` and `/identity` show nothing secret: the
//! configuration is redacted and the private key never leaves the identity.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{header, Method, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

use crate::Shared;

type Answer = Response<Full<Bytes>>;

/// Largest request body read (a log filter, a switch).
const MAX_BODY: usize = 4096;

fn answer(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Answer {
    let mut res = Response::new(Full::new(body.into()));
    *res.status_mut() = status;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    res
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Answer {
    answer(status, "text/plain; charset=utf-8", body)
}

fn json(value: &serde_json::Value) -> Answer {
    let mut body = value.to_string();
    body.push('\n');
    answer(StatusCode::OK, "application/json", body)
}

fn unix(t: Option<SystemTime>) -> serde_json::Value {
    t.and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(serde_json::Value::Null, |d| d.as_secs().into())
}

fn identity(shared: &Shared) -> Answer {
    let s = shared.identity.status();
    let now = SystemTime::now();
    let expires_in = s
        .not_after
        .and_then(|t| t.duration_since(now).ok())
        .map_or(serde_json::Value::Null, |d| d.as_secs().into());
    let authorities: Vec<serde_json::Value> = s
        .authorities
        .iter()
        .map(|a| {
            serde_json::json!({
                "role": a.role,
                "subject": a.subject,
                "not_after": unix(Some(a.not_after)),
                "expires_in_seconds": a.not_after.duration_since(now).map_or(0, |d| d.as_secs()),
            })
        })
        .collect();
    json(&serde_json::json!({
        "id": s.id.as_ref().map(|i| i.as_str()),
        "ready": shared.identity.is_ready(),
        "not_before": unix(s.not_before),
        "not_after": unix(s.not_after),
        "expires_in_seconds": expires_in,
        "renewals": s.renewals,
        "renewal_failures": s.renewal_failures,
        "roots": s.roots,
        "authorities": authorities,
    }))
}

fn access_state(shared: &Shared) -> Answer {
    json(&serde_json::json!({
        "enabled": shared.access.is_enabled(),
        "sample": shared.access.sample(),
        "paths": shared.access.with_paths(),
    }))
}

/// Applies a `PUT /access-log` body.
fn set_access(shared: &Shared, body: &str) -> Answer {
    match body.trim() {
        "on" => shared.access.set_enabled(true),
        "off" => shared.access.set_enabled(false),
        other => match other.parse::<f64>() {
            Ok(f) if (0.0..=1.0).contains(&f) => {
                shared.access.set_sample(f);
                shared.access.set_enabled(true);
            }
            _ => {
                return text(
                    StatusCode::BAD_REQUEST,
                    "send on, off, or a sample from 0 to 1\n",
                )
            }
        },
    }
    info!(
        enabled = shared.access.is_enabled(),
        sample = shared.access.sample(),
        "access log switched through the admin server"
    );
    access_state(shared)
}

async fn body_text(req: http::Request<Incoming>) -> Result<String, Answer> {
    let bytes = Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|_| text(StatusCode::PAYLOAD_TOO_LARGE, "the body is too large\n"))?
        .to_bytes();
    String::from_utf8(bytes.to_vec())
        .map_err(|_| text(StatusCode::BAD_REQUEST, "the body is not UTF-8\n"))
}

/// Whether a request that changes something may come from `peer`.
fn is_local(peer: SocketAddr) -> bool {
    peer.ip().to_canonical().is_loopback()
}

async fn route(shared: Arc<Shared>, req: http::Request<Incoming>, peer: SocketAddr) -> Answer {
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    let mutating = matches!(
        (&method, path.as_str()),
        (&Method::POST, "/shutdown") | (&Method::PUT, "/log-level") | (&Method::PUT, "/access-log")
    );
    if mutating && !is_local(peer) {
        warn!(%peer, %path, "refused an admin request from outside localhost");
        return text(StatusCode::FORBIDDEN, "only from localhost\n");
    }
    match (method, path.as_str()) {
        (Method::GET, "/live") => text(StatusCode::OK, "live\n"),
        (Method::GET, "/ready") => {
            if shared.is_ready() {
                text(StatusCode::OK, "ready\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
            }
        }
        (Method::GET, "/metrics") => answer(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            shared.render_metrics(),
        ),
        (Method::GET, "/config") => answer(
            StatusCode::OK,
            "application/toml",
            shared.live().config.to_toml(),
        ),
        (Method::GET, "/identity") => identity(&shared),
        (Method::GET, "/access-log") => access_state(&shared),
        (Method::PUT, "/access-log") => match body_text(req).await {
            Ok(b) => set_access(&shared, &b),
            Err(a) => a,
        },
        (Method::PUT, "/log-level") => match body_text(req).await {
            Ok(b) => match shared.set_log_level(b.trim()) {
                Ok(()) => {
                    info!(filter = b.trim(), "log level changed through the admin server");
                    text(StatusCode::OK, format!("log level: {}\n", b.trim()))
                }
                Err(e) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
            },
            Err(a) => a,
        },
        (Method::POST, "/shutdown") => {
            info!(%peer, "shutdown requested");
            shared.request_shutdown();
            text(StatusCode::ACCEPTED, "draining\n")
        }
        (
            _,
            "/live" | "/ready" | "/metrics" | "/config" | "/identity" | "/access-log" | "/log-level"
            | "/shutdown",
        ) => text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n"),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; try /live, /ready, /metrics, /config, /identity, /access-log, PUT /log-level or POST /shutdown\n",
        ),
    }
}

pub(crate) async fn serve(shared: Arc<Shared>, listener: TcpListener) {
    loop {
        let (sock, peer) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                debug!(error = %e, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(|req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(route(shared, req, peer).await) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(sock), svc)
                .await
            {
                debug!(error = %e, "admin connection failed");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_is_local() {
        assert!(is_local("127.0.0.1:5".parse().unwrap()));
        assert!(is_local("[::1]:5".parse().unwrap()));
        assert!(is_local("[::ffff:127.0.0.1]:5".parse().unwrap()));
        assert!(!is_local("10.200.0.2:5".parse().unwrap()));
        assert!(!is_local("[fd20:200::2]:5".parse().unwrap()));
    }
}
