//! The HTTP path: connections whose first bytes are an HTTP/1.x request
//! line or the HTTP/2 preface.
//!
//! Between proxies every request rides the pooled HTTP/2 mTLS connection as
//! an ordinary HTTP/2 request. Two headers, set by the client's proxy and
//! removed by the server's, carry what the far side needs:
//! [`TARGET_HEADER`] (the original destination, used when the connection
//! was dialled to the mesh port rather than captured from the application's
//! port) and [`PROTO_HEADER`] (the HTTP version the application spoke, so
//! HTTP/1.1 leaves the server's proxy as HTTP/1.1 again). An HTTP/1.1
//! `Upgrade` (WebSocket) crosses as an extended `CONNECT` (RFC 8441) and
//! becomes a byte tunnel once the server answers `101`; any other answer
//! crosses back marked with [`DECLINED_HEADER`] and is passed on as the
//! answer it is, the client's connection going on as HTTP/1.1.
//!
//! The server's proxy adds [`CLIENT_ID_HEADER`] with the client's verified
//! SPIFFE ID and removes any copy a client sent, on every inbound path, so
//! the application can trust it.

pub mod client;
pub(crate) mod h1;
mod h2c;
pub mod inbound;
pub mod outbound;
mod replay;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http_body_util::{BodyExt, Empty, Full};

use crate::pool::Body;

const CLIENT_ID: &str = "legate-client-id";
/// The verified SPIFFE ID of the client, for the server application.
pub const CLIENT_ID_HEADER: HeaderName = HeaderName::from_static(CLIENT_ID);
/// `ip:port` the client application connected to; proxy to proxy only.
pub const TARGET_HEADER: HeaderName = HeaderName::from_static("legate-target");
/// The HTTP version the client application spoke; proxy to proxy only.
pub const PROTO_HEADER: HeaderName = HeaderName::from_static("legate-proto");
/// Marks the application's answer to an upgrade it declined (any answer
/// but `101`), carried back over the mesh as the answer to the extended
/// CONNECT: a `2xx` to a CONNECT would otherwise mean the tunnel is open.
/// Proxy to proxy only.
pub const DECLINED_HEADER: HeaderName = HeaderName::from_static("legate-upgrade-declined");

/// The key that sets how many header fields an HTTP/1.1 head may have,
/// named in the log lines of the refusals it decides.
pub(crate) const MAX_FIELDS_KEY: &str = "proxy.http.max_header_fields";

/// The configured `proxy.http.max_header_fields`, as a count.
pub(crate) fn max_fields(config: &legate_config::Config) -> usize {
    config.proxy.http.max_header_fields as usize
}

/// hyper's HTTP/1.1 server, taking requests of up to `max_fields` header
/// fields and answering 431 to one with more.
pub(crate) fn http1_server(max_fields: usize) -> hyper::server::conn::http1::Builder {
    let mut builder = hyper::server::conn::http1::Builder::new();
    // Left unset at hyper's own default, the same 100, which it parses
    // into room on the stack; once set, even to 100, it sizes that room
    // for each request, and above 100 on the heap.
    if max_fields != legate_config::DEFAULT_MAX_HEADER_FIELDS as usize {
        builder.max_headers(max_fields);
    }
    builder
}

/// hyper's HTTP/1.1 client, taking answers of up to `max_fields` header
/// fields (as [`http1_server`] takes requests).
pub(crate) fn http1_client(max_fields: usize) -> hyper::client::conn::http1::Builder {
    let mut builder = hyper::client::conn::http1::Builder::new();
    if max_fields != legate_config::DEFAULT_MAX_HEADER_FIELDS as usize {
        builder.max_headers(max_fields);
    }
    builder
}

/// Removes every copy of [`CLIENT_ID_HEADER`] a client may have sent,
/// spellings with `_` for `-` included: CGI, WSGI and PHP hand a header to
/// the application as `HTTP_LEGATE_CLIENT_ID` whichever of the two it
/// used, so such a copy would pass for the proxy's own.
pub fn remove_client_id(headers: &mut HeaderMap) {
    headers.remove(CLIENT_ID_HEADER);
    // One pass over the names; a second only when a lookalike is there.
    if headers.keys().any(is_client_id_lookalike) {
        let names: Vec<HeaderName> = headers
            .keys()
            .filter(|n| is_client_id_lookalike(n))
            .cloned()
            .collect();
        for name in names {
            headers.remove(name);
        }
    }
}

fn is_client_id_lookalike(name: &HeaderName) -> bool {
    let (name, id) = (name.as_str().as_bytes(), CLIENT_ID.as_bytes());
    name.len() == id.len()
        && name
            .iter()
            .zip(id)
            .all(|(&c, &i)| c == i || (c == b'_' && i == b'-'))
}

/// Removes hop-by-hop headers (RFC 9110 §7.6.1): those named by
/// `Connection`, and the fixed set that only ever describe one connection.
/// HTTP/2 forbids them outright, so this is also what makes an HTTP/1.1
/// request safe to send over the mesh.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Runs four times per proxied request. One pass over the names finds
    // which of these are present, so that only those are looked up again:
    // most messages carry none, and a server's `Connection: keep-alive` is
    // often the only one.
    let present = headers.keys().fold(0u8, |bits, name| {
        bits | HOP_BY_HOP
            .iter()
            .position(|h| h == name)
            .map_or(0, |i| 1 << i)
    });
    if present == 0 {
        return;
    }
    if present & (1 << HOP_CONNECTION) != 0 {
        let mut named: Vec<HeaderName> = Vec::new();
        for token in headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
        {
            let token = token.trim();
            // The usual tokens name no header of their own (or one removed
            // below anyway): no need to collect them.
            if ["keep-alive", "close", "upgrade"]
                .iter()
                .any(|t| token.eq_ignore_ascii_case(t))
            {
                continue;
            }
            if let Ok(name) = HeaderName::from_bytes(token.as_bytes()) {
                named.push(name);
            }
        }
        for name in named {
            headers.remove(name);
        }
    }
    for (i, name) in HOP_BY_HOP[..HOP_TE].iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(name);
        }
    }
    if present & (1 << HOP_TE) == 0 {
        return;
    }
    // `TE: trailers` is the one TE value HTTP/2 allows, and gRPC needs it.
    let te = headers.get_all(header::TE);
    let mut lines = te.iter();
    if lines.next().is_some_and(|v| v == "trailers") && lines.next().is_none() {
        // The usual case, already in the one form allowed.
        return;
    }
    let te_trailers = te.iter().any(|v| {
        v.to_str().is_ok_and(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
        })
    });
    headers.remove(header::TE);
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// The headers [`strip_hop_by_hop`] handles: `Connection` first, the
/// fixed set that is hop-by-hop wherever it appears, and `TE` last, whose
/// `trailers` may stay.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
];
/// `Connection`'s and `TE`'s places in [`HOP_BY_HOP`].
const HOP_CONNECTION: usize = 0;
const HOP_TE: usize = 7;

/// Whether a message's `Transfer-Encoding` is a single `chunked`; `None`
/// without one. Any other coding (`gzip`, alone or before `chunked`) is
/// refused, in requests and in answers: the header is hop-by-hop and
/// HTTP/2 has no place for it, so the body would arrive still coded and
/// nothing would say so.
pub fn only_chunked(headers: &HeaderMap) -> Option<bool> {
    let mut codings = headers.get_all(header::TRANSFER_ENCODING).iter().peekable();
    codings.peek()?;
    let mut tokens = codings.flat_map(|v| v.to_str().unwrap_or("?").split(','));
    let first = tokens.next();
    Some(first.is_some_and(|t| t.trim().eq_ignore_ascii_case("chunked")) && tokens.next().is_none())
}

/// Why a request in a transfer coding other than chunked is refused.
pub const FOREIGN_CODING: &str = "transfer coding other than chunked";

/// Why a request is answered 400 when its own body broke off (bad chunked
/// framing, a length it did not keep, a client gone mid-upload).
pub const BODY_UNREADABLE: &str = "request body could not be read";

/// Why a request's Host header makes it one to refuse, if it does. RFC
/// 9112 §3.2 has a server answer 400 to an HTTP/1.1 request without Host,
/// and to any request with more than one: two copies can name two hosts
/// to two readers of the same request (the proxy's policy and the
/// application, or a cache behind it). An HTTP/2 request that names its
/// authority in Host fields has the same ambiguity with two; HTTP/1.0 may
/// leave Host out, and HTTP/2 may name its authority in `:authority`.
pub fn host_fault<B>(req: &http::Request<B>) -> Option<&'static str> {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (None, _) if req.version() == http::Version::HTTP_11 => {
            Some("HTTP/1.1 request without a Host header")
        }
        (Some(_), Some(_)) => Some("request with more than one Host header"),
        _ => None,
    }
}

/// The protocol token of an HTTP/1.1 upgrade request (`websocket`), if it is one.
///
/// An upgrade to `h2c` alone is not one: it asks to switch the hop to
/// HTTP/2, which is the proxy's business, not the server's; RFC 9113
/// deprecates it, and a server may ignore any `Upgrade`. Such a request
/// (curl's `--http2` sends one to an `http://` URL) is forwarded as the
/// plain HTTP/1.1 request it also is, without its hop-by-hop `Upgrade`.
/// So is one with a body or a method other than GET: the mesh carries an
/// upgrade as an extended CONNECT (RFC 8441), which has neither, and
/// WebSocket, the upgrade in use, is a GET without one (RFC 6455 4.1).
/// It is declined alike at both entries and for every destination, as
/// RFC 9110 7.8 lets any hop decline an upgrade.
pub fn upgrade_token<B: hyper::body::Body>(req: &http::Request<B>) -> Option<HeaderValue> {
    if req.version() != http::Version::HTTP_11
        || req.method() != http::Method::GET
        || !req.body().is_end_stream()
    {
        return None;
    }
    let connection_upgrade = req
        .headers()
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    if !connection_upgrade {
        return None;
    }
    let token = req.headers().get(header::UPGRADE)?;
    let only_h2c = token
        .to_str()
        .is_ok_and(|t| t.split(',').all(|p| p.trim().eq_ignore_ascii_case("h2c")));
    (!only_h2c).then(|| token.clone())
}

/// The authority of a request: the URI's (HTTP/2, absolute form), else the
/// Host header.
pub fn authority(req: &http::request::Parts) -> Option<http::uri::Authority> {
    if let Some(a) = req.uri.authority() {
        return Some(a.clone());
    }
    req.headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.parse().ok())
}

/// Rewrites a request's URI to absolute form with `authority`, which the
/// HTTP clients need; the path and query are kept as sent.
pub fn absolute_uri(
    parts: &mut http::request::Parts,
    authority: &http::uri::Authority,
) -> Result<(), http::Error> {
    let path = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
    parts.uri = http::Uri::builder()
        .scheme(http::uri::Scheme::HTTP)
        .authority(authority.clone())
        .path_and_query(path)
        .build()?;
    Ok(())
}

/// A body that holds something (a limit guard) until the body ends or is
/// dropped, so that a request counts as in flight while its response
/// streams.
pub struct Held<B, T> {
    inner: B,
    _held: T,
}

impl<B, T> Held<B, T> {
    pub fn new(inner: B, held: T) -> Self {
        Held { inner, _held: held }
    }
}

impl<B: hyper::body::Body + Unpin, T: Unpin> hyper::body::Body for Held<B, T> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// What of a request shapes the answer the client gets, whoever made it
/// (the application, a peer proxy or the proxy itself).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Asked {
    head: bool,
    http1: bool,
}

impl Asked {
    pub fn of(parts: &http::request::Parts) -> Self {
        Asked {
            head: parts.method == http::Method::HEAD,
            http1: parts.version < http::Version::HTTP_2,
        }
    }

    /// The answer as the client is to get it:
    /// - to HEAD, without content (RFC 9110 §9.3.2), its fields,
    ///   `Content-Length` included, as they are. An application's answer
    ///   has none already; the proxy's own answers (502, 503, 504) carry a
    ///   short text, which hyper's HTTP/1.1 server leaves out by itself
    ///   but which over HTTP/2 would go out as DATA, taken by the client
    ///   for a protocol error in place of the status;
    /// - to HTTP/1.x, marked HTTP/1.1, the proxy's own version (RFC 9110
    ///   §6.2). hyper's server tells an HTTP/1.0 client whether its
    ///   connection stays open from that mark, and said nothing for an
    ///   answer marked HTTP/2, as one from the mesh is, while it kept the
    ///   connection open.
    pub fn shape(self, mut res: http::Response<Body>) -> http::Response<Body> {
        if self.http1 {
            *res.version_mut() = http::Version::HTTP_11;
        }
        if self.head {
            *res.body_mut() = empty();
        }
        res
    }
}

pub fn empty() -> Body {
    Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed()
}

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// Boxes a hyper body.
pub fn boxed(body: hyper::body::Incoming) -> Body {
    body.map_err(Into::into).boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_spelling_of_the_identity_header_a_client_sent_is_removed() {
        let mut h = HeaderMap::new();
        for name in [
            "legate-client-id",
            "legate_client_id",
            "legate_client-id",
            "Legate_Client_Id",
        ] {
            h.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_static("spiffe://legate.local/admin"),
            );
        }
        h.insert("legate-client-idx", HeaderValue::from_static("kept"));
        h.insert("x-legate-client-id", HeaderValue::from_static("kept"));
        remove_client_id(&mut h);
        let mut left: Vec<_> = h.keys().map(|n| n.as_str()).collect();
        left.sort_unstable();
        assert_eq!(left, ["legate-client-idx", "x-legate-client-id"]);
    }

    #[test]
    fn hop_by_hop_headers_go_and_te_trailers_stays() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-custom"),
        );
        h.insert("x-custom", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::TE, HeaderValue::from_static("gzip, trailers"));
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 2, "{h:?}");
        assert_eq!(h[header::TE], "trailers");
        assert_eq!(h[header::CONTENT_TYPE], "text/plain");
    }

    #[test]
    fn headers_named_by_connection_go_even_without_a_fixed_one() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("Close, X-Hop"));
        h.insert("x-hop", HeaderValue::from_static("1"));
        h.insert("x-end", HeaderValue::from_static("2"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h["x-end"], "2");

        let mut clean = HeaderMap::new();
        clean.insert(header::HOST, HeaderValue::from_static("a"));
        strip_hop_by_hop(&mut clean);
        assert_eq!(clean.len(), 1);
    }

    #[test]
    fn only_the_hop_by_hop_headers_present_go() {
        // A server's usual answer: `Connection: keep-alive` and nothing else
        // of the kind.
        let mut h = HeaderMap::new();
        h.insert(header::SERVER, HeaderValue::from_static("nginx"));
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive"));
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("5"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 2, "{h:?}");
        assert!(!h.contains_key(header::CONNECTION));

        // Every fixed one at once, in capitals as a client may send them.
        let mut h = HeaderMap::new();
        for name in [
            "Connection",
            "Keep-Alive",
            "Proxy-Connection",
            "Transfer-Encoding",
            "Upgrade",
            "Proxy-Authenticate",
            "Proxy-Authorization",
        ] {
            h.insert(
                HeaderName::from_bytes(name.as_bytes()).expect("name"),
                HeaderValue::from_static("x"),
            );
        }
        h.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h[header::ACCEPT], "*/*");
    }

    #[test]
    fn an_upgrade_to_h2c_is_a_plain_request() {
        let upgrade = |version, connection: &str, upgrade: &str| {
            let req = http::Request::get("/")
                .version(version)
                .header(header::CONNECTION, connection)
                .header(header::UPGRADE, upgrade)
                .body(Empty::<Bytes>::new())
                .expect("request");
            upgrade_token(&req)
        };
        let v11 = http::Version::HTTP_11;
        assert_eq!(
            upgrade(v11, "Upgrade", "websocket")
                .as_ref()
                .map(|v| v.as_bytes()),
            Some(&b"websocket"[..])
        );
        assert_eq!(upgrade(v11, "keep-alive", "websocket"), None);
        assert_eq!(
            upgrade(http::Version::HTTP_10, "Upgrade", "websocket"),
            None
        );
        assert_eq!(upgrade(v11, "Upgrade, HTTP2-Settings", "h2c"), None);
        assert_eq!(upgrade(v11, "Upgrade", "H2C"), None);
        assert!(upgrade(v11, "Upgrade", "websocket, h2c").is_some());
        // Only a GET without a body rides the mesh's extended CONNECT.
        let with = |method: http::Method, body: &'static str| {
            let req = http::Request::builder()
                .method(method)
                .uri("/")
                .header(header::CONNECTION, "Upgrade")
                .header(header::UPGRADE, "websocket")
                .body(Full::new(Bytes::from_static(body.as_bytes())))
                .expect("request");
            upgrade_token(&req)
        };
        assert!(with(http::Method::GET, "").is_some());
        assert_eq!(with(http::Method::GET, "abc"), None);
        assert_eq!(with(http::Method::POST, ""), None);
    }

    #[test]
    fn te_keeps_trailers_from_any_of_its_lines() {
        let mut h = HeaderMap::new();
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h[header::TE], "trailers");

        let mut h = HeaderMap::new();
        h.append(header::TE, HeaderValue::from_static("gzip"));
        h.append(header::TE, HeaderValue::from_static("Trailers"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.get_all(header::TE).iter().count(), 1);
        assert_eq!(h[header::TE], "trailers");

        let mut h = HeaderMap::new();
        h.insert(header::TE, HeaderValue::from_static("gzip, deflate"));
        strip_hop_by_hop(&mut h);
        assert!(h.is_empty(), "{h:?}");
    }
}
