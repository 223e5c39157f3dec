//! Answers the proxy makes itself, instead of the application.
//!
//! Every such answer carries [`ERROR_HEADER`] (`legate-error: <reason>`),
//! so that a client, an operator with curl, or the peer proxy can tell "the
//! proxy refused or gave up" from "the application said so". The reason is
//! a short fixed word (`connect_failed`, `breaker_open`, `max_in_flight`:
//! for limits, the key that sets them), or for refusals a short sentence.
//!
//! The status says who is to blame, as RFC 9110 defines them:
//! 502 when the destination could not be reached or broke the exchange,
//! 503 when the proxy declined to try (an open breaker, a limit), and
//! 504 when time ran out.
//!
//! A gRPC client cannot use an HTTP error status: gRPC over HTTP/2 always
//! answers 200 and puts the outcome in `grpc-status`. For a request with a
//! `content-type` of `application/grpc` (or `+proto`, `-web`...), the answer
//! is therefore a *trailers-only* response as the gRPC HTTP/2 protocol
//! defines it: status 200, `grpc-status` and a percent-encoded
//! `grpc-message` in the headers, and no body. 502 and 503 become
//! UNAVAILABLE (14), which gRPC clients may retry; 504 becomes
//! DEADLINE_EXCEEDED (4); other statuses follow gRPC's HTTP mapping.

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE};
use http::{Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};

use super::breaker::BreakerOpen;
use super::limits::LimitExceeded;
use super::retry::Failure;
use crate::pool::Body;

/// Marks an answer the proxy made itself, with the reason.
pub const ERROR_HEADER: HeaderName = HeaderName::from_static("legate-error");

/// Fixed reasons for [`ERROR_HEADER`].
pub mod reason {
    /// No connection to the destination could be made.
    pub const CONNECT_FAILED: &str = "connect_failed";
    /// The connection or stream broke before a response.
    pub const RESET: &str = "upstream_reset";
    /// The destination refused the stream without processing it.
    pub const REFUSED_STREAM: &str = "refused_stream";
    /// The endpoint's circuit breaker is open.
    pub const BREAKER_OPEN: &str = "breaker_open";
    /// `request_timeout` passed before a response.
    pub const REQUEST_TIMEOUT: &str = "request_timeout";
    /// The last attempt's `per_try_timeout` passed before a response.
    pub const PER_TRY_TIMEOUT: &str = "per_try_timeout";
}

/// gRPC status codes used here.
const GRPC_UNKNOWN: u32 = 2;
const GRPC_DEADLINE_EXCEEDED: u32 = 4;
const GRPC_PERMISSION_DENIED: u32 = 7;
const GRPC_UNIMPLEMENTED: u32 = 12;
const GRPC_INTERNAL: u32 = 13;
const GRPC_UNAVAILABLE: u32 = 14;
const GRPC_UNAUTHENTICATED: u32 = 16;

/// Whether a request is gRPC, by its `content-type`.
pub fn is_grpc(headers: &HeaderMap) -> bool {
    let Some(ct) = headers.get(CONTENT_TYPE) else {
        return false;
    };
    let ct = ct.as_bytes();
    let prefix = b"application/grpc";
    ct.len() >= prefix.len()
        && ct[..prefix.len()].eq_ignore_ascii_case(prefix)
        && matches!(ct.get(prefix.len()), None | Some(b'+' | b';' | b'-'))
}

/// The gRPC status for an answer the proxy would give with `status`.
pub fn grpc_code(status: StatusCode) -> u32 {
    match status.as_u16() {
        // The proxy only answers 504 when a deadline passed; gRPC's own
        // mapping says UNAVAILABLE, which would invite a retry past it.
        504 => GRPC_DEADLINE_EXCEEDED,
        502 | 503 | 429 => GRPC_UNAVAILABLE,
        400 => GRPC_INTERNAL,
        401 => GRPC_UNAUTHENTICATED,
        403 => GRPC_PERMISSION_DENIED,
        404 => GRPC_UNIMPLEMENTED,
        _ => GRPC_UNKNOWN,
    }
}

/// A header value for `text`. Bytes outside printable ASCII become `?`:
/// HTTP would carry them as "obs-text", but clients decode that
/// differently, and the reason should read the same everywhere.
fn header_text(text: &str) -> HeaderValue {
    let printable = |b: u8| (0x20..0x7f).contains(&b);
    if text.bytes().all(printable) {
        if let Ok(v) = HeaderValue::from_str(text) {
            return v;
        }
    }
    let clean: Vec<u8> = text
        .bytes()
        .map(|b| if printable(b) { b } else { b'?' })
        .collect();
    HeaderValue::from_bytes(&clean).unwrap_or(HeaderValue::from_static("?"))
}

/// Percent-encodes a `grpc-message` as the gRPC HTTP/2 protocol requires:
/// printable ASCII except `%` stays, everything else becomes `%XX`.
fn grpc_message(text: &str) -> HeaderValue {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    header_text(&out)
}

/// The answer the proxy gives itself: `status` with a short text body, or
/// for a gRPC request a trailers-only gRPC error. `reason` goes into
/// [`ERROR_HEADER`].
pub fn proxy_answer(status: StatusCode, reason: &str, grpc: bool) -> Response<Body> {
    let mut res = if grpc {
        let mut res = Response::new(
            Empty::<Bytes>::new()
                .map_err(|never| match never {})
                .boxed(),
        );
        let h = res.headers_mut();
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        h.insert("grpc-status", HeaderValue::from(grpc_code(status)));
        h.insert("grpc-message", grpc_message(&format!("legate: {reason}")));
        res
    } else {
        let mut res = Response::new(
            Full::new(Bytes::from(format!("legate: {reason}\n")))
                .map_err(|never| match never {})
                .boxed(),
        );
        *res.status_mut() = status;
        res.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        res
    };
    res.headers_mut().insert(ERROR_HEADER, header_text(reason));
    res
}

impl Failure {
    /// The status the proxy answers with when the last attempt failed so.
    pub fn status(self) -> StatusCode {
        match self {
            Failure::Connect | Failure::Reset => StatusCode::BAD_GATEWAY,
            Failure::RefusedStream => StatusCode::SERVICE_UNAVAILABLE,
            Failure::PerTryTimeout | Failure::RequestTimeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    pub fn reason(self) -> &'static str {
        match self {
            Failure::Connect => reason::CONNECT_FAILED,
            Failure::Reset => reason::RESET,
            Failure::RefusedStream => reason::REFUSED_STREAM,
            Failure::PerTryTimeout => reason::PER_TRY_TIMEOUT,
            Failure::RequestTimeout => reason::REQUEST_TIMEOUT,
        }
    }

    pub fn answer(self, grpc: bool) -> Response<Body> {
        proxy_answer(self.status(), self.reason(), grpc)
    }
}

impl BreakerOpen {
    /// 503 `breaker_open`.
    pub fn answer(&self, grpc: bool) -> Response<Body> {
        proxy_answer(StatusCode::SERVICE_UNAVAILABLE, reason::BREAKER_OPEN, grpc)
    }
}

impl LimitExceeded {
    /// 503 naming the limit's key, `max_in_flight` for example.
    pub fn answer(&self, grpc: bool) -> Response<Body> {
        proxy_answer(StatusCode::SERVICE_UNAVAILABLE, self.kind.key(), grpc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use hyper::body::Body as _;

    async fn text(res: Response<Body>) -> String {
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    fn headers(ct: &'static str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(CONTENT_TYPE, HeaderValue::from_static(ct));
        h
    }

    #[test]
    fn grpc_is_recognised_by_content_type() {
        for yes in [
            "application/grpc",
            "application/grpc+proto",
            "Application/GRPC+json",
            "application/grpc-web",
            "application/grpc; charset=utf-8",
        ] {
            assert!(is_grpc(&headers(yes)), "{yes}");
        }
        for no in [
            "application/json",
            "application/grpcx",
            "application/grp",
            "text/plain",
        ] {
            assert!(!is_grpc(&headers(no)), "{no}");
        }
        assert!(!is_grpc(&HeaderMap::new()));
    }

    #[tokio::test]
    async fn plain_answers_carry_status_reason_and_header() {
        let res = proxy_answer(StatusCode::BAD_GATEWAY, reason::CONNECT_FAILED, false);
        assert_eq!(res.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(res.headers()[&ERROR_HEADER], "connect_failed");
        assert_eq!(res.headers()[CONTENT_TYPE], "text/plain; charset=utf-8");
        assert_eq!(text(res).await, "legate: connect_failed\n");
        let odd = proxy_answer(StatusCode::FORBIDDEN, "spiffe://td/é is not allowed", false);
        assert_eq!(
            odd.headers()[&ERROR_HEADER],
            "spiffe://td/?? is not allowed"
        );
    }

    #[tokio::test]
    async fn grpc_answers_are_trailers_only() {
        for (status, code) in [
            (StatusCode::BAD_GATEWAY, "14"),
            (StatusCode::SERVICE_UNAVAILABLE, "14"),
            (StatusCode::GATEWAY_TIMEOUT, "4"),
            (StatusCode::FORBIDDEN, "7"),
            (StatusCode::IM_A_TEAPOT, "2"),
        ] {
            let res = proxy_answer(status, "100% busy", true);
            assert_eq!(res.status(), StatusCode::OK, "gRPC errors are HTTP 200");
            let h = res.headers();
            assert_eq!(h["grpc-status"], code, "{status}");
            assert_eq!(h["grpc-message"], "legate: 100%25 busy");
            assert_eq!(h[CONTENT_TYPE], "application/grpc");
            assert_eq!(h[&ERROR_HEADER], "100% busy");
            assert!(res.body().is_end_stream(), "headers end the stream");
            assert_eq!(text(res).await, "");
        }
    }

    #[test]
    fn policy_refusals_and_failures_map_to_their_answers() {
        use crate::policy::limits::LimitKind;
        let open = BreakerOpen {
            endpoint: "10.0.0.1:80".parse().unwrap(),
            retry_after: std::time::Duration::ZERO,
        };
        let res = open.answer(false);
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(res.headers()[&ERROR_HEADER], "breaker_open");
        let full = LimitExceeded {
            kind: LimitKind::InFlight,
            max: 1,
        };
        let res = full.answer(true);
        assert_eq!(res.headers()["grpc-status"], "14");
        assert_eq!(res.headers()[&ERROR_HEADER], "max_in_flight");
        let cases = [
            (Failure::Connect, 502, "connect_failed"),
            (Failure::Reset, 502, "upstream_reset"),
            (Failure::RefusedStream, 503, "refused_stream"),
            (Failure::PerTryTimeout, 504, "per_try_timeout"),
            (Failure::RequestTimeout, 504, "request_timeout"),
        ];
        for (f, status, reason) in cases {
            let res = f.answer(false);
            assert_eq!(res.status().as_u16(), status, "{f:?}");
            assert_eq!(res.headers()[&ERROR_HEADER], reason);
        }
        let timeout = Failure::PerTryTimeout.answer(true);
        assert_eq!(timeout.headers()["grpc-status"], "4");
    }
}
