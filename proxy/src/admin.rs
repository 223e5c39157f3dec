//! The admin server: liveness and readiness for probes and for
//! `legate wait-ready`.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tracing::debug;

use crate::Shared;

fn text(status: http::StatusCode, body: &'static str) -> http::Response<Full<Bytes>> {
    let mut res = http::Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *res.status_mut() = status;
    res
}

fn route(
    shared: &Shared,
    req: &http::Request<hyper::body::Incoming>,
) -> http::Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&http::Method::GET, "/live") => text(http::StatusCode::OK, "live\n"),
        (&http::Method::GET, "/ready") => {
            if shared.is_ready() {
                text(http::StatusCode::OK, "ready\n")
            } else {
                text(http::StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
            }
        }
        _ => text(
            http::StatusCode::NOT_FOUND,
            "not found; try /live or /ready\n",
        ),
    }
}

pub(crate) async fn serve(shared: Arc<Shared>, listener: TcpListener) {
    loop {
        let Ok((sock, _)) = listener.accept().await else {
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(|req| {
                let res = route(&shared, &req);
                async move { Ok::<_, std::convert::Infallible>(res) }
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
