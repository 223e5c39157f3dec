//! HTTP/1.1 from a proxy to a server that is not a peer proxy (the
//! application behind the server's proxy, or a destination outside the
//! mesh), driven from the task of the request it carries.
//!
//! hyper's pooled client runs every connection as a task of its own and
//! hands each request, its response and every piece of the response body
//! across channels between that task and the request's. For the small
//! requests a mesh mostly carries, those hand-offs were a large share of
//! each proxy's own work. Here the request's task writes the
//! request and parses the answer itself; the response body owns the
//! connection while it streams and puts it back on the idle list once the
//! message ended cleanly on both sides.
//!
//! Framing follows RFC 9112. A request body goes with its `Content-Length`
//! when one is known, else chunked (trailers included). An answer's body
//! is read by the rules of §6.3: none for `HEAD`, 1xx, 204 and 304,
//! chunked when that is its transfer coding, else `Content-Length`, else
//! until the application closes. Any other transfer coding is refused
//! (see [`super::only_chunked`]). Interim 1xx answers (a `100
//! Continue`, say) are read and dropped. A head or trailer section may
//! have as many fields as the sender of the request allows
//! (`proxy.http.max_header_fields`, 100 by default). The request body is
//! sent while the answer is read, so an application that answers early,
//! or streams its answer while it reads, neither stalls nor loses what it
//! sent.

use std::collections::VecDeque;
use std::future::Future;
use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use hyper::body::{Body as _, Frame, SizeHint};
use smallvec::SmallVec;
use tokio::io::AsyncWrite;
use tokio::net::TcpStream;

use crate::policy::retry::MethodClass;
use crate::pool::{Body, BoxError};
use crate::socket::{ConnectError, Dial, Targets};

/// Idle connections kept per application address set; one more is closed.
const MAX_IDLE_PER_TARGET: usize = 64;
/// An idle connection older than this is closed rather than reused (the
/// HTTP/2 connections to the application idle out after the same).
pub(crate) const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// More distinct address sets than this and the idle lists are dropped.
const MAX_TARGETS: usize = 1024;
/// The largest response head (status line and fields) or trailer section,
/// as Envoy's default. A head this large with up to [`STACK_FIELDS`]
/// fields still fits the header list the mesh's HTTP/2 carries
/// ([`crate::pool::MAX_HEADER_LIST`], where each field counts 32 bytes in
/// place of its 4 of punctuation), so an answer the server's proxy takes
/// from its application is never refused on the way to the client's. With
/// more fields it may not, so such a head is measured as HTTP/2 will count
/// it (see [`fits_mesh`]).
const MAX_HEAD: usize = 60 * 1024;
/// Room for this many fields is kept on the stack when a head or trailer
/// section is parsed: the default of `proxy.http.max_header_fields`, and
/// what hyper keeps. Only a head with more fields than this, which a
/// raised limit lets through, parses again into room on the heap, so the
/// limit costs nothing for the answers that stay within the default.
const STACK_FIELDS: usize = legate_config::DEFAULT_MAX_HEADER_FIELDS as usize;
/// The key that raises the limit on fields, named where it refuses.
const FIELDS_KEY: &str = "proxy.http.max_header_fields";
/// The longest chunk-size line, extensions included.
const MAX_CHUNK_LINE: usize = 4096;
/// Room made in the read buffer before each read.
const READ_ROOM: usize = 16 * 1024;

/// Why a request to the application got no (whole) answer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("writing the request to the application failed: {0}")]
    Write(#[source] io::Error),
    #[error("reading the application's answer failed: {0}")]
    Read(#[source] io::Error),
    #[error("the application closed the connection before it answered")]
    ClosedBeforeAnswer,
    #[error("the application closed the connection in the middle of the response body")]
    ClosedMidBody,
    #[error("the application's response is not valid HTTP/1.1: {0}")]
    Malformed(&'static str),
    #[error("the application's response head or trailer section is larger than {MAX_HEAD} bytes")]
    HeadTooLarge,
    #[error(
        "the application's response head or trailer section has more than {limit} header fields; \
         {FIELDS_KEY} raises the limit"
    )]
    TooManyFields { limit: usize },
    #[error(
        "the application's response head or trailer section would take {size} bytes of HTTP/2 \
         header list (32 for each of its {fields} fields besides their names and values), more \
         than the {} the mesh carries; the application must send fewer or shorter fields",
        crate::pool::MAX_HEADER_LIST
    )]
    TooLargeForMesh { size: usize, fields: usize },
    #[error(
        "the application answered 101 Switching Protocols to a request that asked for no upgrade"
    )]
    UnexpectedUpgrade,
    #[error("the request body failed: {0}")]
    Body(#[source] BoxError),
    #[error("the request body does not match its Content-Length of {0} bytes")]
    BodyLength(u64),
}

impl Error {
    pub fn is_connect(&self) -> bool {
        matches!(self, Error::Connect(_))
    }
}

/// How many header fields an answer (its head, and its trailer section
/// apart) may have, and whether it goes on across the mesh.
#[derive(Debug, Clone, Copy)]
pub struct AnswerFields {
    /// `proxy.http.max_header_fields`.
    pub max: usize,
    /// The answer crosses the mesh as HTTP/2 headers, whose list the peer
    /// proxy bounds (see [`fits_mesh`]). An answer that goes straight to
    /// the application over HTTP/1.1, or into a tunnel's bytes, has no such
    /// bound, and a server outside the mesh may send it as it would
    /// without the proxy.
    pub onto_mesh: bool,
}

impl AnswerFields {
    /// Up to `max` fields, for an answer that goes back over the mesh.
    pub const fn crossing_mesh(max: usize) -> Self {
        AnswerFields {
            max,
            onto_mesh: true,
        }
    }

    /// Up to `max` fields, for an answer that goes on over HTTP/1.1 or as
    /// a tunnel's bytes.
    pub const fn direct(max: usize) -> Self {
        AnswerFields {
            max,
            onto_mesh: false,
        }
    }
}

/// Idle HTTP/1.1 connections to the application, per address set. One per
/// worker thread, like the other clients, so it is rarely contended.
pub struct Pool {
    idle: Mutex<foldhash::HashMap<Targets, Vec<Idle>>>,
    dial: Dial,
}

struct Idle {
    io: TcpStream,
    /// The connection's read buffer, empty: kept so that the next answer
    /// reads into the same memory once the last one's body has been
    /// passed on, rather than into a new allocation per request.
    buf: BytesMut,
    since: Instant,
}

impl Pool {
    pub fn new(dial: Dial) -> Self {
        Pool {
            idle: Mutex::new(foldhash::HashMap::default()),
            dial,
        }
    }

    /// Sends `req` to the first of `targets` that accepts and returns the
    /// answer once its head has arrived; the body streams from the socket.
    ///
    /// The head is encoded before the returned future exists, so that the
    /// future owns only what the exchange needs and not the request it came
    /// from: it is part of every request's state, and on the inbound path
    /// that state is one allocation per request, small enough for the
    /// allocator's per-thread cache.
    ///
    /// An answer or a trailer section with more fields than `fields`
    /// allows is an error.
    pub fn send(
        self: &Arc<Self>,
        targets: Targets,
        req: Request<Body>,
        fields: AnswerFields,
    ) -> impl Future<Output = Result<Response<Body>, Error>> + Send + 'static {
        let (parts, body) = req.into_parts();
        let (head, framing) = encode_head(&parts, &body);
        let reading = Reading {
            head_only: parts.method == Method::HEAD,
            fields,
        };
        // Sent again on a new connection if a reused one turns out dead:
        // only a request with nothing to replay and whose repetition is
        // harmless (RFC 9110 §9.2.2; RFC 9112 §9.3.1 forbids proxies to
        // repeat others automatically).
        let may_resend =
            body.is_end_stream() && MethodClass::of(&parts.method) == MethodClass::Idempotent;
        let resend = may_resend.then(|| (head.clone(), None));
        self.exchange(targets, head, framing, body, reading, resend)
    }

    /// Sends a request the proxy makes itself (a telemetry export, say),
    /// its body held whole, as [`Self::send`] does. Not being a client's,
    /// it is the proxy's own to repeat: whatever its method, it goes again
    /// on a new connection when a reused one turns out dead before any
    /// answer (at worst the server gets it twice). Its answer may have as
    /// many fields as hyper's client would take: the operator's limit is
    /// for applications, not for the proxy's own peers.
    pub fn send_own(
        self: &Arc<Self>,
        targets: Targets,
        req: Request<Bytes>,
    ) -> impl Future<Output = Result<Response<Body>, Error>> + Send + 'static {
        let (parts, bytes) = req.into_parts();
        let body = super::full(bytes.clone());
        let (head, framing) = encode_head(&parts, &body);
        let reading = Reading {
            head_only: parts.method == Method::HEAD,
            fields: AnswerFields::direct(STACK_FIELDS),
        };
        let resend = Some((head.clone(), Some(bytes)));
        self.exchange(targets, head, framing, body, reading, resend)
    }

    /// One exchange on a pooled or new connection; `resend` is the head,
    /// and the body when there is one, to send again on a new connection
    /// if a reused one turns out dead.
    fn exchange(
        self: &Arc<Self>,
        targets: Targets,
        head: Bytes,
        framing: Framing,
        body: Body,
        reading: Reading,
        resend: Option<(Bytes, Option<Bytes>)>,
    ) -> impl Future<Output = Result<Response<Body>, Error>> + Send + 'static {
        let first = Upload::new(head, framing, body);
        let pool = self.clone();
        async move {
            let mut upload = Some(first);
            loop {
                let (io, buf, reused) = match pool.checkout(&targets) {
                    Some((io, buf)) => (io, buf, true),
                    // Boxed: most requests find an idle connection and
                    // should not carry the space of a connect.
                    None => (
                        Box::pin(pool.dial.connect(&targets)).await?,
                        BytesMut::new(),
                        false,
                    ),
                };
                let Some(up) = upload.take() else {
                    unreachable!(
                        "the request is sent once, or again only when it had no body to lose"
                    )
                };
                let mut ex = Exchange {
                    io,
                    buf,
                    upload: Some(up),
                    write_error: None,
                    got_bytes: false,
                };
                match std::future::poll_fn(|cx| ex.poll_head(cx, reading)).await {
                    Ok(answer) => return Ok(pool.respond(ex, answer, targets, reading.fields)),
                    // An application may close an idle connection just as it
                    // is reused, and then never saw the request.
                    Err(e) if reused && !ex.got_bytes && e.stale_connection() => {
                        let Some((head, body)) = &resend else {
                            return Err(e);
                        };
                        let body = body.clone().map_or_else(super::empty, super::full);
                        upload = Some(Upload::new(head.clone(), framing, body));
                    }
                    Err(e) => return Err(e),
                }
            }
        }
    }

    fn respond(
        self: &Arc<Self>,
        ex: Exchange,
        answer: Answer,
        targets: Targets,
        fields: AnswerFields,
    ) -> Response<Body> {
        let Answer {
            parts,
            read,
            keep_alive,
        } = answer;
        let mut body = H1Body {
            io: Some(ex.io),
            buf: ex.buf,
            upload: ex.upload,
            read,
            keep_alive,
            pool: self.clone(),
            targets,
            fields,
        };
        if matches!(body.read, Read::Done) {
            body.finish();
        }
        Response::from_parts(parts, http_body_util::BodyExt::boxed(body))
    }

    /// The most recently used idle connection that is still open.
    fn checkout(&self, targets: &Targets) -> Option<(TcpStream, BytesMut)> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.get_mut(targets)?;
        while let Some(c) = list.pop() {
            if c.since.elapsed() < IDLE_TIMEOUT && still_open(&c.io) {
                return Some((c.io, c.buf));
            }
        }
        None
    }

    fn put(&self, targets: Targets, io: TcpStream, buf: BytesMut) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() >= MAX_TARGETS && !idle.contains_key(&targets) {
            idle.clear();
        }
        let list = idle.entry(targets).or_default();
        // The list is in the order connections came back, so the stalest
        // sit at the front; dropping them there keeps the check O(1).
        while list
            .first()
            .is_some_and(|c| c.since.elapsed() >= IDLE_TIMEOUT)
        {
            list.remove(0);
        }
        if list.len() < MAX_IDLE_PER_TARGET {
            list.push(Idle {
                io,
                buf,
                since: Instant::now(),
            });
        }
    }
}

impl Error {
    /// Whether the failure looks like a connection the application had
    /// already closed while it sat idle.
    fn stale_connection(&self) -> bool {
        match self {
            Error::ClosedBeforeAnswer => true,
            Error::Write(e) | Error::Read(e) => matches!(
                e.kind(),
                io::ErrorKind::BrokenPipe
                    | io::ErrorKind::ConnectionReset
                    | io::ErrorKind::ConnectionAborted
            ),
            _ => false,
        }
    }
}

/// Whether an idle connection has neither been closed by the application
/// nor sent anything unasked (either makes it unusable).
fn still_open(io: &TcpStream) -> bool {
    let mut probe = [0u8; 1];
    let mut cx = Context::from_waker(std::task::Waker::noop());
    let mut buf = tokio::io::ReadBuf::new(&mut probe);
    matches!(io.poll_peek(&mut cx, &mut buf), Poll::Pending)
}

/// How the request body is framed on the wire.
#[derive(Debug, Clone, Copy)]
enum Framing {
    None,
    Length(u64),
    Chunked,
}

/// Methods whose requests usually carry no body, so that an empty one needs
/// no `Content-Length: 0` (RFC 9110 §8.6).
fn bodyless_method(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::DELETE | Method::OPTIONS | Method::TRACE
    )
}

/// The request line and fields, and how the body will be framed.
fn encode_head(parts: &http::request::Parts, body: &Body) -> (Bytes, Framing) {
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let (framing, add) = match declared {
        Some(n) => (Framing::Length(n), None),
        None if body.is_end_stream() => {
            if bodyless_method(&parts.method) {
                (Framing::None, None)
            } else {
                (Framing::Length(0), Some(("content-length", 0)))
            }
        }
        None => match body.size_hint().exact() {
            Some(n) => (Framing::Length(n), Some(("content-length", n))),
            None => (Framing::Chunked, None),
        },
    };
    let target = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .filter(|p| !p.is_empty())
        .unwrap_or("/");
    let mut size = parts.method.as_str().len() + target.len() + 16;
    for (name, value) in &parts.headers {
        size += name.as_str().len() + value.len() + 4;
    }
    let mut out = BytesMut::with_capacity(size + 32);
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.extend_from_slice(b" ");
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in &parts.headers {
        // Framing is ours to state: a stale Content-Length beside a chunked
        // body would make the application read it wrongly.
        if matches!(framing, Framing::Chunked) && name == header::CONTENT_LENGTH {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    // HTTP/1.1 requires Host (RFC 9112 §3.2); a request that came as
    // HTTP/1.0 or HTTP/2 may lack it, and its URI then names the authority.
    if !parts.headers.contains_key(header::HOST) {
        if let Some(authority) = parts.uri.authority() {
            out.extend_from_slice(b"host: ");
            out.extend_from_slice(authority.as_str().as_bytes());
            out.extend_from_slice(b"\r\n");
        }
    }
    if let Some((name, n)) = add {
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(n.to_string().as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if matches!(framing, Framing::Chunked) {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    out.extend_from_slice(b"\r\n");
    (out.freeze(), framing)
}

/// The request going out: its head, then its body as the application's
/// client sends it.
struct Upload {
    /// The head's bytes not yet written. Kept apart from `out` so that a
    /// request without a body (most of them) needs no queue, which would
    /// be an allocation per request.
    head: Bytes,
    out: VecDeque<Bytes>,
    body: Option<Body>,
    framing: Framing,
    /// Body bytes still due under `Content-Length`.
    due: u64,
}

impl Upload {
    fn new(head: Bytes, framing: Framing, body: Body) -> Self {
        let (body, due) = match framing {
            Framing::None => (None, 0),
            Framing::Length(n) => (Some(body), n),
            Framing::Chunked => (Some(body), 0),
        };
        Upload {
            head,
            out: VecDeque::new(),
            body,
            framing,
            due,
        }
    }

    fn finished(&self) -> bool {
        self.body.is_none() && self.head.is_empty() && self.out.is_empty()
    }

    /// Moves the request forward as far as it can without waiting.
    /// `Ready(Ok)` once all of it is written.
    fn poll(&mut self, io: &mut TcpStream, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        loop {
            // Gather what the body has ready first, so that a head and a
            // small body leave in one write.
            while self.out.len() < 16 {
                let Some(body) = self.body.as_mut() else {
                    break;
                };
                match Pin::new(body).poll_frame(cx) {
                    Poll::Ready(Some(Ok(frame))) => self.queue(frame)?,
                    Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(Error::Body(e))),
                    Poll::Ready(None) => self.end()?,
                    Poll::Pending => break,
                }
            }
            if self.head.is_empty() && self.out.is_empty() {
                return if self.body.is_none() {
                    Poll::Ready(Ok(()))
                } else {
                    Poll::Pending
                };
            }
            let mut slices = [IoSlice::new(&[]); 17];
            let head = (!self.head.is_empty()).then_some(&self.head);
            let mut n = 0;
            for (slice, chunk) in slices.iter_mut().zip(head.into_iter().chain(&self.out)) {
                *slice = IoSlice::new(chunk);
                n += 1;
            }
            let written = ready!(Pin::new(&mut *io).poll_write_vectored(cx, &slices[..n]))
                .map_err(Error::Write)?;
            if written == 0 {
                return Poll::Ready(Err(Error::Write(io::ErrorKind::WriteZero.into())));
            }
            let mut left = written;
            let from_head = left.min(self.head.len());
            self.head.advance(from_head);
            left -= from_head;
            while left > 0 {
                let Some(front) = self.out.front_mut() else {
                    break;
                };
                if front.len() <= left {
                    left -= front.len();
                    self.out.pop_front();
                } else {
                    front.advance(left);
                    left = 0;
                }
            }
        }
    }

    fn queue(&mut self, frame: Frame<Bytes>) -> Result<(), Error> {
        match frame.into_data() {
            Ok(data) if data.is_empty() => {}
            Ok(data) => match self.framing {
                Framing::Length(n) => {
                    let len = data.len() as u64;
                    if len > self.due {
                        return Err(Error::BodyLength(n));
                    }
                    self.due -= len;
                    self.out.push_back(data);
                }
                Framing::Chunked => {
                    self.out
                        .push_back(Bytes::from(format!("{:x}\r\n", data.len())));
                    self.out.push_back(data);
                    self.out.push_back(Bytes::from_static(b"\r\n"));
                }
                Framing::None => {}
            },
            Err(frame) => {
                if let (Ok(mut trailers), Framing::Chunked) = (frame.into_trailers(), self.framing)
                {
                    // A server may merge trailer fields into the header
                    // section: an identity there is as forged as one in
                    // the head.
                    super::remove_client_id(&mut trailers);
                    let mut last = BytesMut::from(&b"0\r\n"[..]);
                    for (name, value) in &trailers {
                        last.extend_from_slice(name.as_str().as_bytes());
                        last.extend_from_slice(b": ");
                        last.extend_from_slice(value.as_bytes());
                        last.extend_from_slice(b"\r\n");
                    }
                    last.extend_from_slice(b"\r\n");
                    self.out.push_back(last.freeze());
                    self.body = None;
                }
                // With a Content-Length there is nowhere to put trailers;
                // HTTP/1.1 drops them (RFC 9110 §6.5.1 lets a recipient).
            }
        }
        Ok(())
    }

    fn end(&mut self) -> Result<(), Error> {
        if self.body.take().is_none() {
            return Ok(());
        }
        match self.framing {
            Framing::Length(n) if self.due != 0 => Err(Error::BodyLength(n)),
            Framing::Chunked => {
                self.out.push_back(Bytes::from_static(b"0\r\n\r\n"));
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

/// One request on one connection, until the answer's head is in.
struct Exchange {
    io: TcpStream,
    buf: BytesMut,
    /// `None` once the request is written, or abandoned after a failed
    /// write (the application may still have answered).
    upload: Option<Upload>,
    /// Why the request could not be written in full, if it could not.
    write_error: Option<io::Error>,
    got_bytes: bool,
}

/// What, besides its bytes, decides how an answer is read.
#[derive(Debug, Clone, Copy)]
struct Reading {
    /// The request was HEAD: the answer has no body, whatever it says.
    head_only: bool,
    /// The most fields its head and its trailer section may have.
    fields: AnswerFields,
}

/// A response head, with how its body is to be read.
struct Answer {
    parts: http::response::Parts,
    read: Read,
    keep_alive: bool,
}

impl Exchange {
    fn poll_head(&mut self, cx: &mut Context<'_>, reading: Reading) -> Poll<Result<Answer, Error>> {
        loop {
            if let Some(up) = self.upload.as_mut() {
                match up.poll(&mut self.io, cx) {
                    Poll::Ready(Ok(())) => self.upload = None,
                    Poll::Ready(Err(Error::Write(e))) => {
                        // Keep reading: an application that refuses a body
                        // often answers, then closes, before reading it.
                        self.upload = None;
                        self.write_error = Some(e);
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {}
                }
            }
            let unsent = self.upload.is_some() || self.write_error.is_some();
            if let Some(answer) = parse_head(&mut self.buf, reading, unsent)? {
                return Poll::Ready(Ok(answer));
            }
            let read = ready!(poll_fill(&mut self.io, &mut self.buf, cx));
            let failed = match (read, self.write_error.take()) {
                (Ok(n), _) if n > 0 => {
                    self.got_bytes = true;
                    continue;
                }
                (_, Some(e)) => Error::Write(e),
                (Ok(_), None) => Error::ClosedBeforeAnswer,
                (Err(e), None) => Error::Read(e),
            };
            return Poll::Ready(Err(failed));
        }
    }
}

/// Reads what the socket has into `buf`; `Ok(0)` at end of stream.
///
/// Through `AsyncRead` rather than `try_read_buf`: a read that leaves room
/// in the buffer tells tokio the socket is drained, so the readiness check
/// before the connection's next use ([`still_open`]) costs no system call.
/// With `try_read_buf` the readiness stayed set and every reuse of an idle
/// connection paid for a `recv` that found nothing.
fn poll_fill(
    io: &mut TcpStream,
    buf: &mut BytesMut,
    cx: &mut Context<'_>,
) -> Poll<io::Result<usize>> {
    if buf.capacity() - buf.len() < READ_ROOM / 4 {
        buf.reserve(READ_ROOM);
    }
    tokio_util::io::poll_read_buf(Pin::new(io), cx, buf)
}

/// Where each field of a head lies in the buffer: name start and end,
/// value start and end. Values can then share the buffer instead of being
/// copied.
type Spans = SmallVec<[(usize, usize, usize, usize); STACK_FIELDS]>;

/// The start of a complete response head: its length, status code, and
/// whether it is HTTP/1.0. Its fields are in the [`Spans`] beside it.
struct RawHead {
    len: usize,
    code: u16,
    http10: bool,
}

/// Parses a response head at the front of `buf` into `fields`, and where
/// its fields lie into `spans`; `None` when more bytes are needed.
fn parse_into<'b>(
    buf: &'b [u8],
    fields: &mut [MaybeUninit<httparse::Header<'b>>],
    spans: &mut Spans,
) -> Result<Option<RawHead>, httparse::Error> {
    let mut res = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default()
        .parse_response_with_uninit_headers(&mut res, buf, fields)?
    {
        httparse::Status::Complete(len) => len,
        httparse::Status::Partial => return Ok(None),
    };
    let base = buf.as_ptr() as usize;
    spans.clear();
    spans.extend(res.headers.iter().map(|f| {
        let n = f.name.as_ptr() as usize - base;
        let v = f.value.as_ptr() as usize - base;
        (n, n + f.name.len(), v, v + f.value.len())
    }));
    Ok(Some(RawHead {
        len,
        code: res.code.unwrap_or(0),
        http10: res.version == Some(0),
    }))
}

/// Parses the response head at the front of `buf`, allowing the fields
/// `fields` does; `None` when more bytes are needed.
fn parse_raw(
    buf: &[u8],
    fields: AnswerFields,
    spans: &mut Spans,
) -> Result<Option<RawHead>, Error> {
    let max_fields = fields.max;
    // Uninitialized room for the fields: filling a hundred empty ones
    // first was 3 KiB of stores for every answer.
    let mut room = [const { MaybeUninit::uninit() }; STACK_FIELDS];
    let parsed = match parse_into(buf, &mut room[..max_fields.min(STACK_FIELDS)], spans) {
        // Only a head with more fields than the stack holds, under a limit
        // raised above that, pays for room on the heap.
        Err(httparse::Error::TooManyHeaders) if max_fields > STACK_FIELDS => {
            let mut room: Box<[MaybeUninit<httparse::Header<'_>>]> =
                Box::new_uninit_slice(max_fields);
            parse_into(buf, &mut room, spans)
        }
        other => other,
    };
    let head = match parsed {
        Ok(Some(head)) if head.len > MAX_HEAD => return Err(Error::HeadTooLarge),
        Ok(Some(head)) => head,
        Ok(None) if buf.len() > MAX_HEAD => return Err(Error::HeadTooLarge),
        Ok(None) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Error::TooManyFields { limit: max_fields })
        }
        Err(_) => return Err(Error::Malformed("the status line or a header field")),
    };
    if fields.onto_mesh && spans.len() > STACK_FIELDS {
        // `:status` with its three digits goes first.
        let fields = spans.iter().map(|&(ns, ne, vs, ve)| ne - ns + ve - vs);
        fits_mesh(":status".len() + 3 + 32, fields)?;
    }
    Ok(Some(head))
}

/// Refuses a head or trailer section, given what its pseudo-header takes
/// and the lengths of its fields' names and values together, whose header
/// list as HTTP/2 counts it (RFC 9113 §6.5.2: 32 bytes for each field
/// besides) is more than the peer proxy takes. Passed on, it would reach
/// the client's proxy as a stream reset for a protocol error: a 502 that
/// says nothing of why, counted against the breaker, and under `retry_on
/// = reset` a request the application had acted on would be sent again.
fn fits_mesh(pseudo: usize, fields: impl Iterator<Item = usize>) -> Result<(), Error> {
    let (size, fields) = fields.fold((pseudo, 0), |(size, n), field| (size + field + 32, n + 1));
    if size > crate::pool::MAX_HEADER_LIST as usize {
        return Err(Error::TooLargeForMesh { size, fields });
    }
    Ok(())
}

/// Parses a final response head off the front of `buf`, dropping interim
/// 1xx answers; `None` when more bytes are needed.
fn parse_head(buf: &mut BytesMut, reading: Reading, unsent: bool) -> Result<Option<Answer>, Error> {
    let mut spans = Spans::new();
    loop {
        let Some(RawHead { len, code, http10 }) = parse_raw(buf, reading.fields, &mut spans)?
        else {
            return Ok(None);
        };
        let status = StatusCode::from_u16(code).map_err(|_| Error::Malformed("status code"))?;
        let version = if http10 {
            Version::HTTP_10
        } else {
            Version::HTTP_11
        };
        if status == StatusCode::SWITCHING_PROTOCOLS {
            return Err(Error::UnexpectedUpgrade);
        }
        if status.is_informational() {
            buf.advance(len);
            continue;
        }
        let head = buf.split_to(len).freeze();
        let mut headers = HeaderMap::with_capacity(spans.len());
        for &(ns, ne, vs, ve) in &spans {
            let name = HeaderName::from_bytes(&head[ns..ne])
                .map_err(|_| Error::Malformed("a header field name"))?;
            let value = HeaderValue::from_maybe_shared(head.slice(vs..ve))
                .map_err(|_| Error::Malformed("a header field value"))?;
            headers.append(name, value);
        }
        let (read, mut keep_alive) = framing(status, version, &headers, reading.head_only)?;
        if matches!(read, Read::Chunked(_)) {
            // A length beside chunked is void, and passed on it would frame
            // the body wrongly downstream: the client's connection closed
            // with no answer. An intermediary removes it (RFC 9112 §6.3).
            headers.remove(header::CONTENT_LENGTH);
        }
        if unsent {
            // The answer came before the whole request was sent; whatever
            // follows, the connection is not reused.
            keep_alive = false;
        }
        let mut builder = Response::new(());
        *builder.status_mut() = status;
        *builder.version_mut() = version;
        *builder.headers_mut() = headers;
        let (parts, ()) = builder.into_parts();
        return Ok(Some(Answer {
            parts,
            read,
            keep_alive,
        }));
    }
}

/// How the body of an answer is delimited (RFC 9112 §6.3), and whether the
/// connection may carry another request after it.
fn framing(
    status: StatusCode,
    version: Version,
    headers: &HeaderMap,
    head_only: bool,
) -> Result<(Read, bool), Error> {
    let mut keep_alive = version == Version::HTTP_11;
    for v in headers.get_all(header::CONNECTION) {
        for token in v.to_str().unwrap_or("").split(',') {
            let token = token.trim();
            if token.eq_ignore_ascii_case("close") {
                keep_alive = false;
            } else if token.eq_ignore_ascii_case("keep-alive") && version == Version::HTTP_10 {
                keep_alive = true;
            }
        }
    }
    if head_only || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        return Ok((Read::Done, keep_alive));
    }
    match super::only_chunked(headers) {
        Some(true) => {
            // With both, Transfer-Encoding wins, and the message may have
            // been meant to smuggle: do not reuse the connection.
            let both = headers.contains_key(header::CONTENT_LENGTH);
            return Ok((Read::Chunked(Chunk::Size), keep_alive && !both));
        }
        Some(false) => return Err(Error::Malformed("a transfer coding other than chunked")),
        None => {}
    }
    let mut length = None;
    for v in headers.get_all(header::CONTENT_LENGTH) {
        for part in v.to_str().unwrap_or("x").split(',') {
            let n = part
                .trim()
                .parse::<u64>()
                .map_err(|_| Error::Malformed("Content-Length"))?;
            if length.is_some_and(|l| l != n) {
                return Err(Error::Malformed("conflicting Content-Length values"));
            }
            length = Some(n);
        }
    }
    Ok(match length {
        Some(0) => (Read::Done, keep_alive),
        Some(n) => (Read::Length(n), keep_alive),
        None => (Read::Close, false),
    })
}

/// Where reading an answer's body stands.
#[derive(Debug)]
enum Read {
    Length(u64),
    Chunked(Chunk),
    Close,
    Done,
}

#[derive(Debug)]
enum Chunk {
    /// Expecting a chunk-size line.
    Size,
    /// Inside a chunk, with this many bytes of it still to come.
    Data(u64),
    /// After a chunk's data, expecting its CRLF.
    DataEnd,
    /// After the last chunk, expecting trailer fields or the final CRLF.
    Trailers,
}

/// A response body read straight from the application's connection.
struct H1Body {
    /// `None` once the connection went back to the pool or was closed.
    io: Option<TcpStream>,
    buf: BytesMut,
    upload: Option<Upload>,
    read: Read,
    keep_alive: bool,
    pool: Arc<Pool>,
    targets: Targets,
    /// The most fields the trailer section may have.
    fields: AnswerFields,
}

impl H1Body {
    /// The answer ended: the connection goes back to the pool if the
    /// request was all sent and nothing unasked followed the answer.
    fn finish(&mut self) {
        self.read = Read::Done;
        let reusable = self.keep_alive
            && self.buf.is_empty()
            && self.upload.as_ref().is_none_or(Upload::finished);
        self.upload = None;
        if let (true, Some(io)) = (reusable, self.io.take()) {
            self.pool
                .put(self.targets, io, std::mem::take(&mut self.buf));
        }
        self.io = None;
        self.buf = BytesMut::new();
    }

    fn fill(&mut self, cx: &mut Context<'_>) -> Poll<Result<usize, Error>> {
        let Some(io) = self.io.as_mut() else {
            return Poll::Ready(Ok(0));
        };
        poll_fill(io, &mut self.buf, cx).map_err(Error::Read)
    }

    /// Reads more of a body that is not complete yet: the connection ending
    /// here cuts the body short.
    fn fill_more(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        match ready!(self.fill(cx))? {
            0 => Poll::Ready(Err(Error::ClosedMidBody)),
            _ => Poll::Ready(Ok(())),
        }
    }

    fn step(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        loop {
            match &mut self.read {
                Read::Done => return Poll::Ready(None),
                Read::Length(due) => {
                    if self.buf.is_empty() {
                        ready!(self.fill_more(cx))?;
                        continue;
                    }
                    let take = (*due).min(self.buf.len() as u64) as usize;
                    let data = self.buf.split_to(take).freeze();
                    *due -= take as u64;
                    if *due == 0 {
                        self.finish();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Read::Close => {
                    if !self.buf.is_empty() {
                        let data = self.buf.split().freeze();
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    if ready!(self.fill(cx))? == 0 {
                        self.keep_alive = false;
                        self.finish();
                        return Poll::Ready(None);
                    }
                }
                Read::Chunked(chunk) => match chunk {
                    Chunk::Size => {
                        let Some(end) = self.buf.iter().position(|&b| b == b'\n') else {
                            if self.buf.len() > MAX_CHUNK_LINE {
                                return Poll::Ready(Some(Err(Error::Malformed(
                                    "a chunk-size line is too long",
                                ))));
                            }
                            ready!(self.fill_more(cx))?;
                            continue;
                        };
                        let size = chunk_size(&self.buf[..end])?;
                        self.buf.advance(end + 1);
                        *chunk = if size == 0 {
                            Chunk::Trailers
                        } else {
                            Chunk::Data(size)
                        };
                    }
                    Chunk::Data(due) => {
                        if self.buf.is_empty() {
                            ready!(self.fill_more(cx))?;
                            continue;
                        }
                        let take = (*due).min(self.buf.len() as u64) as usize;
                        *due -= take as u64;
                        if *due == 0 {
                            *chunk = Chunk::DataEnd;
                        }
                        let data = self.buf.split_to(take).freeze();
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    Chunk::DataEnd => {
                        if self.buf.len() < 2 {
                            ready!(self.fill_more(cx))?;
                            continue;
                        }
                        if &self.buf[..2] != b"\r\n" {
                            return Poll::Ready(Some(Err(Error::Malformed(
                                "chunk data is not followed by CRLF",
                            ))));
                        }
                        self.buf.advance(2);
                        *chunk = Chunk::Size;
                    }
                    Chunk::Trailers => {
                        if self.buf.starts_with(b"\r\n") {
                            self.buf.advance(2);
                            self.finish();
                            return Poll::Ready(None);
                        }
                        match parse_trailers(&self.buf, self.fields)? {
                            Some((len, trailers)) => {
                                self.buf.advance(len);
                                self.finish();
                                return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                            }
                            None if self.buf.len() > MAX_HEAD => {
                                return Poll::Ready(Some(Err(Error::HeadTooLarge)));
                            }
                            None => ready!(self.fill_more(cx))?,
                        }
                    }
                },
            }
        }
    }
}

/// Parses a trailer section at the front of `buf`, allowing the fields
/// `fields` does: its length and its fields, or `None` when more bytes are
/// needed.
fn parse_trailers(buf: &[u8], fields: AnswerFields) -> Result<Option<(usize, HeaderMap)>, Error> {
    let mut room = [httparse::EMPTY_HEADER; STACK_FIELDS];
    match httparse::parse_headers(buf, &mut room[..fields.max.min(STACK_FIELDS)]) {
        // As for a head: only a section with more fields than the stack
        // holds parses again, into room on the heap.
        Err(httparse::Error::TooManyHeaders) if fields.max > STACK_FIELDS => {
            let mut room = vec![httparse::EMPTY_HEADER; fields.max];
            trailer_map(httparse::parse_headers(buf, &mut room), fields)
        }
        parsed => trailer_map(parsed, fields),
    }
}

/// The trailer section httparse read, as a header map.
fn trailer_map(
    parsed: httparse::Result<(usize, &[httparse::Header<'_>])>,
    limit: AnswerFields,
) -> Result<Option<(usize, HeaderMap)>, Error> {
    let (len, fields) = match parsed {
        Ok(httparse::Status::Complete(done)) => done,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Error::TooManyFields { limit: limit.max })
        }
        Err(_) => return Err(Error::Malformed("the trailer section")),
    };
    if len > MAX_HEAD {
        return Err(Error::HeadTooLarge);
    }
    if limit.onto_mesh && fields.len() > STACK_FIELDS {
        fits_mesh(0, fields.iter().map(|f| f.name.len() + f.value.len()))?;
    }
    let mut trailers = HeaderMap::with_capacity(fields.len());
    for f in fields {
        let name = HeaderName::from_bytes(f.name.as_bytes());
        let value = HeaderValue::from_bytes(f.value);
        let (Ok(name), Ok(value)) = (name, value) else {
            return Err(Error::Malformed("a trailer field"));
        };
        trailers.append(name, value);
    }
    Ok(Some((len, trailers)))
}

/// The size of a chunk from its size line, extensions ignored.
fn chunk_size(line: &[u8]) -> Result<u64, Error> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let digits = line
        .iter()
        .position(|&b| !b.is_ascii_hexdigit())
        .unwrap_or(line.len());
    let rest = &line[digits..];
    let ext_or_end = rest
        .iter()
        .find(|&&b| b != b' ' && b != b'\t')
        .is_none_or(|&b| b == b';');
    if digits == 0 || digits > 16 || !ext_or_end {
        return Err(Error::Malformed("a chunk-size line"));
    }
    let hex = std::str::from_utf8(&line[..digits]).map_err(|_| Error::Malformed("a chunk size"))?;
    u64::from_str_radix(hex, 16).map_err(|_| Error::Malformed("a chunk size"))
}

impl hyper::body::Body for H1Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let (Some(up), Some(io)) = (this.upload.as_mut(), this.io.as_mut()) {
            match up.poll(io, cx) {
                Poll::Ready(Ok(())) => this.upload = None,
                // The answer is already coming; a request the application
                // stopped reading no longer matters, but the connection
                // cannot be reused.
                Poll::Ready(Err(_)) => {
                    this.upload = None;
                    this.keep_alive = false;
                }
                Poll::Pending => {}
            }
        }
        match ready!(this.step(cx)) {
            Some(Err(e)) => {
                this.keep_alive = false;
                this.io = None;
                this.read = Read::Done;
                Poll::Ready(Some(Err(e.into())))
            }
            other => Poll::Ready(other.map(|r| r.map_err(Into::into))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.read, Read::Done)
    }

    fn size_hint(&self) -> SizeHint {
        match self.read {
            Read::Done => SizeHint::with_exact(0),
            Read::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::{BodyExt, Full};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    /// A scripted application: for each accepted connection, `answer` gets
    /// the socket and the connection's number.
    async fn app<F, Fut>(answer: F) -> (SocketAddr, Arc<AtomicUsize>)
    where
        F: Fn(TcpStream, usize) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                let n = count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(answer(sock, n));
            }
        });
        (addr, accepted)
    }

    /// Reads one request head (and nothing after it).
    async fn read_head(sock: &mut TcpStream) -> Option<String> {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if sock.read(&mut byte).await.ok()? == 0 {
                return None;
            }
            head.push(byte[0]);
        }
        String::from_utf8(head).ok()
    }

    /// An application that reads one request, writes `wire` and closes.
    async fn answers_once(wire: &'static [u8]) -> (SocketAddr, Arc<AtomicUsize>) {
        app(move |mut sock, _| async move {
            if read_head(&mut sock).await.is_some() {
                let _ = sock.write_all(wire).await;
            }
        })
        .await
    }

    fn pool() -> Arc<Pool> {
        Arc::new(Pool::new(Dial {
            timeout: Duration::from_secs(2),
            keepalive: Duration::from_secs(60),
        }))
    }

    fn get(path: &str) -> Request<Body> {
        Request::get(format!("http://app{path}"))
            .header("host", "app")
            .body(crate::http::empty())
            .expect("request")
    }

    async fn body_of(res: Response<Body>) -> (Bytes, Option<HeaderMap>) {
        let collected = res.into_body().collect().await.expect("body");
        let trailers = collected.trailers().cloned();
        (collected.to_bytes(), trailers)
    }

    /// How an answer to a GET from the server's proxy is read under the
    /// default limit on fields.
    const DEFAULT: Reading = Reading {
        head_only: false,
        fields: MESH_FIELDS,
    };

    /// The default limit, for an answer that crosses the mesh.
    const MESH_FIELDS: AnswerFields = AnswerFields::crossing_mesh(STACK_FIELDS);

    /// How an answer to a GET from the server's proxy is read allowing
    /// `max_fields` fields.
    fn allowing(max_fields: usize) -> Reading {
        Reading {
            fields: AnswerFields::crossing_mesh(max_fields),
            ..DEFAULT
        }
    }

    /// A response head of `len` bytes with `fields` header fields.
    fn head_of(len: usize, fields: usize) -> BytesMut {
        let mut head = b"HTTP/1.1 200 OK\r\n".to_vec();
        for i in 0..fields - 1 {
            head.extend_from_slice(format!("x-{i:03}: v\r\n").as_bytes());
        }
        let room = len - head.len() - "x-big: \r\n\r\n".len();
        head.extend_from_slice(format!("x-big: {}\r\n\r\n", "b".repeat(room)).as_bytes());
        assert_eq!(head.len(), len);
        BytesMut::from(&head[..])
    }

    #[test]
    fn only_the_chunked_transfer_coding_is_taken() {
        let framed = |codings: &[&'static str]| {
            let mut h = HeaderMap::new();
            for c in codings {
                h.append(header::TRANSFER_ENCODING, HeaderValue::from_static(c));
            }
            framing(StatusCode::OK, Version::HTTP_11, &h, false)
        };
        for ok in [&["chunked"][..], &["Chunked"], &[" chunked "]] {
            assert!(matches!(framed(ok), Ok((Read::Chunked(_), true))), "{ok:?}");
        }
        // A coding the client would never hear of once the header is gone.
        for refused in [
            &["gzip"][..],
            &["gzip, chunked"],
            &["gzip", "chunked"],
            &["chunked, chunked"],
            &["identity"],
            &[""],
        ] {
            assert!(
                matches!(framed(refused), Err(Error::Malformed(_))),
                "{refused:?}"
            );
        }
    }

    #[test]
    fn a_head_over_the_limit_is_refused_even_when_read_at_once() {
        assert!(matches!(
            parse_head(&mut head_of(MAX_HEAD + 1, 1), DEFAULT, false),
            Err(Error::HeadTooLarge)
        ));
        // The largest head taken, with the most fields, fits the mesh's
        // HTTP/2 header list: names, values and 32 bytes each, `:status`
        // included.
        let answer = parse_head(&mut head_of(MAX_HEAD, STACK_FIELDS), DEFAULT, false)
            .expect("parsed")
            .expect("whole");
        let fields = &answer.parts.headers;
        assert_eq!(fields.len(), STACK_FIELDS);
        let list: usize = ":status".len()
            + 3
            + 32
            + fields
                .iter()
                .map(|(k, v)| k.as_str().len() + v.len() + 32)
                .sum::<usize>();
        assert!(list <= crate::pool::MAX_HEADER_LIST as usize, "{list}");
    }

    #[test]
    fn more_fields_than_the_default_are_taken_once_the_limit_is_raised() {
        assert_eq!(STACK_FIELDS, 100, "the default, as in hyper and Envoy");
        let wire = || {
            let mut head = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n".to_vec();
            for i in 1..150 {
                head.extend_from_slice(format!("x-field-{i:03}: value {i}\r\n").as_bytes());
            }
            head.extend_from_slice(b"\r\n");
            BytesMut::from(&head[..])
        };
        let Err(err) = parse_head(&mut wire(), DEFAULT, false) else {
            panic!("150 fields were taken under the default limit");
        };
        assert!(matches!(err, Error::TooManyFields { limit: 100 }), "{err}");
        assert!(
            err.to_string().contains("proxy.http.max_header_fields"),
            "the refusal names the key that raises the limit: {err}"
        );
        for max_fields in [150, 151, 1000] {
            let answer = parse_head(&mut wire(), allowing(max_fields), false)
                .expect("parsed")
                .expect("whole");
            let fields = &answer.parts.headers;
            assert_eq!(fields.len(), 150, "{max_fields}");
            assert_eq!(fields["x-field-001"], "value 1");
            assert_eq!(fields["x-field-149"], "value 149");
        }
        assert!(matches!(
            parse_head(&mut wire(), allowing(149), false),
            Err(Error::TooManyFields { limit: 149 })
        ));
        // A limit below the default holds too.
        assert!(matches!(
            parse_head(&mut head_of(200, 11), allowing(10), false),
            Err(Error::TooManyFields { limit: 10 })
        ));
        assert!(parse_head(&mut head_of(200, 10), allowing(10), false).is_ok());
    }

    #[test]
    fn a_head_taken_with_many_fields_always_fits_the_mesh() {
        // Each field costs the HTTP/2 header list 32 bytes besides its name
        // and value: past the default count, a head within the size limit
        // may not fit, and is refused here rather than reset by the
        // client's proxy.
        let list = |fields: &HeaderMap| {
            ":status".len()
                + 3
                + 32
                + fields
                    .iter()
                    .map(|(k, v)| k.as_str().len() + v.len() + 32)
                    .sum::<usize>()
        };
        let mut refused = 0;
        for fields in [101, 150, 400, 1000] {
            for len in [fields * 12, MAX_HEAD / 2, MAX_HEAD - fields * 28, MAX_HEAD] {
                match parse_head(&mut head_of(len, fields), allowing(1000), false) {
                    Ok(Some(answer)) => {
                        let size = list(&answer.parts.headers);
                        assert!(
                            size <= crate::pool::MAX_HEADER_LIST as usize,
                            "{fields} fields, {len} bytes: {size}"
                        );
                    }
                    Err(Error::TooLargeForMesh { size, fields: n }) => {
                        assert!(size > crate::pool::MAX_HEADER_LIST as usize);
                        assert_eq!(n, fields);
                        refused += 1;
                    }
                    other => panic!("{fields} fields, {len} bytes: {:?}", other.err()),
                }
            }
        }
        assert!(refused > 0, "no head was too large for the mesh");
    }

    #[test]
    fn a_head_that_does_not_cross_the_mesh_is_not_held_to_its_header_list() {
        // A server outside the mesh answering the client's proxy directly:
        // the answer goes on over HTTP/1.1, as it would without the proxy.
        let direct = Reading {
            fields: AnswerFields::direct(1000),
            ..DEFAULT
        };
        let answer = parse_head(&mut head_of(MAX_HEAD, 1000), direct, false)
            .expect("taken")
            .expect("whole");
        assert_eq!(answer.parts.headers.len(), 1000);
        assert!(matches!(
            parse_head(&mut head_of(MAX_HEAD, 1000), allowing(1000), false),
            Err(Error::TooLargeForMesh { .. })
        ));
        let mut trailers = Vec::new();
        for i in 0..1000 {
            trailers.extend_from_slice(format!("x-sum-{i:03}: {}\r\n", "v".repeat(40)).as_bytes());
        }
        trailers.extend_from_slice(b"\r\n");
        let (_, map) = parse_trailers(&trailers, direct.fields)
            .expect("taken")
            .expect("whole");
        assert_eq!(map.len(), 1000);
        assert!(matches!(
            parse_trailers(&trailers, AnswerFields::crossing_mesh(1000)),
            Err(Error::TooLargeForMesh { .. })
        ));
    }

    #[tokio::test]
    async fn a_trailer_section_is_held_to_the_same_limit_on_fields() {
        let (addr, _) = app(|mut sock, _| async move {
            while read_head(&mut sock).await.is_some() {
                let mut wire =
                    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n"
                        .to_vec();
                for i in 0..150 {
                    wire.extend_from_slice(format!("x-sum-{i:03}: {i}\r\n").as_bytes());
                }
                wire.extend_from_slice(b"\r\n");
                if sock.write_all(&wire).await.is_err() {
                    return;
                }
            }
        })
        .await;
        let pool = pool();
        let res = pool
            .send(Targets::one(addr), get("/"), MESH_FIELDS)
            .await
            .expect("head");
        let err = res.into_body().collect().await.expect_err("too many");
        assert!(
            matches!(
                err.downcast_ref::<Error>(),
                Some(Error::TooManyFields { limit: 100 })
            ),
            "{err}"
        );
        let res = pool
            .send(
                Targets::one(addr),
                get("/"),
                AnswerFields::crossing_mesh(150),
            )
            .await
            .expect("head");
        let (body, trailers) = body_of(res).await;
        assert_eq!(body, "ok");
        let trailers = trailers.expect("trailers");
        assert_eq!(trailers.len(), 150);
        assert_eq!(trailers["x-sum-149"], "149");
    }

    #[tokio::test]
    async fn keep_alive_answers_reuse_one_connection() {
        let (addr, accepted) = app(|mut sock, _| async move {
            while let Some(head) = read_head(&mut sock).await {
                let body = if head.starts_with("HEAD") {
                    ""
                } else {
                    "hello"
                };
                let _ = sock
                    .write_all(
                        format!("HTTP/1.1 200 OK\r\ncontent-length: 5\r\nx-n: 1\r\n\r\n{body}")
                            .as_bytes(),
                    )
                    .await;
            }
        })
        .await;
        let pool = pool();
        let targets = Targets::one(addr);
        for _ in 0..3 {
            let res = pool
                .send(targets, get("/"), MESH_FIELDS)
                .await
                .expect("answer");
            assert_eq!(res.status(), StatusCode::OK);
            assert_eq!(res.headers()["x-n"], "1");
            assert_eq!(body_of(res).await.0, "hello");
        }
        let head = Request::head("http://app/")
            .body(crate::http::empty())
            .expect("request");
        let res = pool.send(targets, head, MESH_FIELDS).await.expect("answer");
        assert_eq!(res.headers()["content-length"], "5");
        assert!(body_of(res).await.0.is_empty());
        let res = pool
            .send(targets, get("/"), MESH_FIELDS)
            .await
            .expect("answer");
        assert_eq!(body_of(res).await.0, "hello");
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_request_without_host_gets_one_from_its_uri() {
        let (addr, _) = app(|mut sock, _| async move {
            let head = read_head(&mut sock).await.unwrap_or_default();
            let answer = if head.starts_with("GET /path?q=1 HTTP/1.1\r\n")
                && head.contains("\r\nhost: app.example:8080\r\n")
            {
                "yes"
            } else {
                "no!"
            };
            let _ = sock
                .write_all(
                    format!("HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\n{answer}").as_bytes(),
                )
                .await;
        })
        .await;
        let req = Request::get("http://app.example:8080/path?q=1")
            .body(crate::http::empty())
            .expect("request");
        let res = pool()
            .send(Targets::one(addr), req, MESH_FIELDS)
            .await
            .expect("answer");
        assert_eq!(body_of(res).await.0, "yes");
    }

    #[tokio::test]
    async fn a_chunked_answer_split_anywhere_keeps_its_data_and_trailers() {
        let (addr, accepted) = app(|mut sock, _| async move {
            while read_head(&mut sock).await.is_some() {
                let wire: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n\
                    transfer-encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n\
                    7\r\n, world\r\n0\r\ngrpc-status: 0\r\nx-sum: 12\r\n\r\n";
                // One byte at a time: every state must cope with a short read.
                for b in wire {
                    if sock.write_all(&[*b]).await.is_err() {
                        return;
                    }
                    sock.flush().await.ok();
                    tokio::task::yield_now().await;
                }
            }
        })
        .await;
        let pool = pool();
        for _ in 0..2 {
            let res = pool
                .send(Targets::one(addr), get("/chunks"), MESH_FIELDS)
                .await
                .expect("answer");
            assert_eq!(res.status(), StatusCode::OK);
            let (body, trailers) = body_of(res).await;
            assert_eq!(body, "hello, world");
            let trailers = trailers.expect("trailers");
            assert_eq!(trailers["grpc-status"], "0");
            assert_eq!(trailers["x-sum"], "12");
        }
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            1,
            "the connection is reused"
        );
    }

    #[tokio::test]
    async fn a_trailer_section_over_the_limit_is_refused_even_when_read_at_once() {
        let (addr, _) = app(|mut sock, _| async move {
            if read_head(&mut sock).await.is_some() {
                let start: &[u8] =
                    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n";
                let _ = sock.write_all(start).await;
                tokio::time::sleep(Duration::from_millis(50)).await;
                // The whole section in one write: it completes in the read
                // that crosses the limit, so no partial state is over it.
                let room = MAX_HEAD + 100 - "x-big: \r\n\r\n".len();
                let section = format!("x-big: {}\r\n\r\n", "b".repeat(room));
                let _ = sock.write_all(section.as_bytes()).await;
            }
        })
        .await;
        let res = pool()
            .send(Targets::one(addr), get("/"), MESH_FIELDS)
            .await
            .expect("answer");
        let Err(err) = res.into_body().collect().await else {
            panic!("a trailer section over the limit was taken");
        };
        assert!(
            matches!(err.downcast_ref::<Error>(), Some(Error::HeadTooLarge)),
            "{err}"
        );
    }

    #[tokio::test]
    async fn an_answer_delimited_by_close_is_read_to_the_end_and_not_reused() {
        let (addr, accepted) = app(|mut sock, _| async move {
            if read_head(&mut sock).await.is_some() {
                let _ = sock.write_all(b"HTTP/1.0 200 OK\r\n\r\nall of ").await;
                let _ = sock.write_all(b"it").await;
            }
        })
        .await;
        let pool = pool();
        for _ in 0..2 {
            let res = pool
                .send(Targets::one(addr), get("/"), MESH_FIELDS)
                .await
                .expect("answer");
            assert_eq!(body_of(res).await.0, "all of it");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_body_cut_short_is_an_error_not_a_short_answer() {
        let (addr, _) =
            answers_once(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly this").await;
        let res = pool()
            .send(Targets::one(addr), get("/"), MESH_FIELDS)
            .await
            .expect("head");
        let err = res.into_body().collect().await.expect_err("cut short");
        assert!(
            err.to_string().contains("middle of the response body"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_garbled_answer_names_the_problem() {
        let (addr, _) = answers_once(b"HTTP/1.1 200 OK\r\ncontent-length: 1, 2\r\n\r\nx").await;
        let err = pool()
            .send(Targets::one(addr), get("/"), MESH_FIELDS)
            .await
            .expect_err("garbled");
        assert!(
            err.to_string().contains("conflicting Content-Length"),
            "{err}"
        );
        assert!(!err.is_connect());
    }

    #[tokio::test]
    async fn an_idle_connection_the_application_closed_is_replaced_unseen() {
        // Closes after each answer although the answer promised keep-alive.
        let (addr, accepted) =
            answers_once(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
        let pool = pool();
        for _ in 0..3 {
            let res = pool
                .send(Targets::one(addr), get("/"), MESH_FIELDS)
                .await
                .expect("answer");
            assert_eq!(body_of(res).await.0, "ok");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
    }

    /// Answers once per connection, then takes the next request and
    /// closes without answering it, as an application that crashed would.
    async fn answers_once_then_drops() -> (SocketAddr, Arc<AtomicUsize>) {
        app(|mut sock, _| async move {
            if read_head(&mut sock).await.is_some() {
                let _ = sock
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await;
            }
            let _ = read_head(&mut sock).await;
        })
        .await
    }

    #[tokio::test]
    async fn a_get_lost_on_a_reused_connection_is_sent_again_but_a_post_is_not() {
        let (addr, accepted) = answers_once_then_drops().await;
        let pool = pool();
        for _ in 0..2 {
            let res = pool
                .send(Targets::one(addr), get("/"), MESH_FIELDS)
                .await
                .expect("answer");
            assert_eq!(body_of(res).await.0, "ok");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 2, "the GET went again");

        let (addr, accepted) = answers_once_then_drops().await;
        let pool = self::pool();
        let res = pool
            .send(Targets::one(addr), get("/"), MESH_FIELDS)
            .await
            .expect("answer");
        assert_eq!(body_of(res).await.0, "ok");
        let post = Request::post("http://app/order")
            .body(crate::http::empty())
            .expect("request");
        let err = pool
            .send(Targets::one(addr), post, MESH_FIELDS)
            .await
            .expect_err("not repeated");
        assert!(err.to_string().contains("before it answered"), "{err}");
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "the POST went once");
    }

    #[tokio::test]
    async fn a_length_beside_chunked_is_dropped_from_the_answer() {
        let (addr, _) = answers_once(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        )
        .await;
        let res = pool()
            .send(Targets::one(addr), get("/"), MESH_FIELDS)
            .await
            .expect("answer");
        assert!(!res.headers().contains_key(header::CONTENT_LENGTH));
        assert_eq!(body_of(res).await.0, "abc");
    }

    #[tokio::test]
    async fn a_post_of_the_proxys_own_lost_on_a_reused_connection_is_sent_again() {
        let (addr, accepted) = answers_once_then_drops().await;
        let pool = pool();
        let export = || {
            Request::post("http://collector/v1/traces")
                .body(Bytes::from_static(b"spans"))
                .expect("request")
        };
        for _ in 0..2 {
            let res = pool
                .send_own(Targets::one(addr), export())
                .await
                .expect("answer");
            assert_eq!(body_of(res).await.0, "ok");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 2, "the POST went again");
    }

    #[tokio::test]
    async fn a_body_of_unknown_length_goes_chunked_with_its_trailers() {
        let (addr, _) = app(|mut sock, _| async move {
            let Some(head) = read_head(&mut sock).await else {
                return;
            };
            assert!(head.contains("transfer-encoding: chunked\r\n"), "{head}");
            assert!(!head.contains("content-length"), "{head}");
            let mut rest = Vec::new();
            let mut buf = [0u8; 1024];
            while !rest.ends_with(b"\r\n\r\n") {
                match sock.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => rest.extend_from_slice(&buf[..n]),
                }
            }
            let echoed = String::from_utf8_lossy(&rest).into_owned();
            let _ = sock
                .write_all(
                    format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{echoed}",
                        echoed.len()
                    )
                    .as_bytes(),
                )
                .await;
        })
        .await;
        let mut trailers = HeaderMap::new();
        trailers.insert("x-check", HeaderValue::from_static("7"));
        let body = Frames(VecDeque::from([
            Frame::data(Bytes::from_static(b"abc")),
            Frame::data(Bytes::new()),
            Frame::data(Bytes::from_static(b"defghijklmnop")),
            Frame::trailers(trailers),
        ]))
        .map_err(|never| match never {})
        .boxed();
        let req = Request::post("http://app/up").body(body).expect("request");
        let res = pool()
            .send(Targets::one(addr), req, MESH_FIELDS)
            .await
            .expect("answer");
        assert_eq!(
            body_of(res).await.0,
            "3\r\nabc\r\nd\r\ndefghijklmnop\r\n0\r\nx-check: 7\r\n\r\n"
        );
    }

    /// A request body that hands out its frames one poll at a time.
    struct Frames(VecDeque<Frame<Bytes>>);

    impl hyper::body::Body for Frames {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            Poll::Ready(self.0.pop_front().map(Ok))
        }
    }

    #[tokio::test]
    async fn an_early_answer_to_a_large_upload_reaches_the_client() {
        let (addr, _) = answers_once(
            b"HTTP/1.1 413 Content Too Large\r\nconnection: close\r\ncontent-length: 3\r\n\r\nbig",
        )
        .await;
        let req = Request::post("http://app/up")
            .body(
                Full::new(Bytes::from(vec![b'x'; 8 << 20]))
                    .map_err(|never| match never {})
                    .boxed(),
            )
            .expect("request");
        let res = pool()
            .send(Targets::one(addr), req, MESH_FIELDS)
            .await
            .expect("answer");
        assert_eq!(res.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(body_of(res).await.0, "big");
    }

    #[test]
    fn chunk_size_lines() {
        assert_eq!(chunk_size(b"1a\r").ok(), Some(26));
        assert_eq!(chunk_size(b"0").ok(), Some(0));
        assert_eq!(chunk_size(b"ff ; name=value\r").ok(), Some(255));
        assert!(chunk_size(b"\r").is_err());
        assert!(chunk_size(b"1g\r").is_err());
        assert!(chunk_size(b"11111111111111111\r").is_err());
    }

    /// A response as an application might frame it, and what the client
    /// must receive of it.
    struct Generated {
        wire: Vec<u8>,
        status: u16,
        body: Vec<u8>,
        trailers: Vec<(String, String)>,
    }

    /// A random well-formed answer: interim 1xx answers first, then a body
    /// framed by `Content-Length`, by chunks (sizes in either case, with
    /// zeros in front, extensions, trailers) or by closing the connection.
    fn generate(rng: &mut rand::rngs::StdRng) -> Generated {
        use rand::Rng;
        let mut wire = Vec::new();
        for _ in 0..rng.random_range(0..3) {
            wire.extend_from_slice(if rng.random_bool(0.5) {
                &b"HTTP/1.1 100 Continue\r\n\r\n"[..]
            } else {
                &b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"[..]
            });
        }
        let status = [200u16, 201, 404, 500, 503][rng.random_range(0..5)];
        let len = match rng.random_range(0..4) {
            0 => 0,
            1 => rng.random_range(1..16),
            _ => rng.random_range(16..5000),
        };
        let body: Vec<u8> = (0..len).map(|_| rng.random()).collect();
        wire.extend_from_slice(format!("HTTP/1.1 {status} Whatever\r\n").as_bytes());
        for i in 0..rng.random_range(0..4) {
            let name = if rng.random_bool(0.5) {
                "X-Field"
            } else {
                "x-field"
            };
            let pad = if rng.random_bool(0.5) { " " } else { "" };
            wire.extend_from_slice(format!("{name}-{i}:{pad}value {i}{pad}\r\n").as_bytes());
        }
        let mut trailers = Vec::new();
        match rng.random_range(0..3) {
            0 => {
                wire.extend_from_slice(format!("Content-Length: {len}\r\n\r\n").as_bytes());
                wire.extend_from_slice(&body);
            }
            1 => {
                wire.extend_from_slice(b"Transfer-Encoding: chunked\r\n\r\n");
                let mut rest = &body[..];
                while !rest.is_empty() {
                    let n = rng.random_range(1..=rest.len().min(1500));
                    let size = if rng.random_bool(0.5) {
                        format!("{n:x}")
                    } else {
                        format!("00{n:X}")
                    };
                    let ext = if rng.random_bool(0.3) {
                        ";name=value"
                    } else {
                        ""
                    };
                    wire.extend_from_slice(format!("{size}{ext}\r\n").as_bytes());
                    wire.extend_from_slice(&rest[..n]);
                    wire.extend_from_slice(b"\r\n");
                    rest = &rest[n..];
                }
                wire.extend_from_slice(b"0\r\n");
                for i in 0..rng.random_range(0..3) {
                    let t = (format!("x-trailer-{i}"), format!("t{i}"));
                    wire.extend_from_slice(format!("{}: {}\r\n", t.0, t.1).as_bytes());
                    trailers.push(t);
                }
                wire.extend_from_slice(b"\r\n");
            }
            _ => {
                wire.extend_from_slice(b"Connection: close\r\n\r\n");
                wire.extend_from_slice(&body);
            }
        }
        Generated {
            wire,
            status,
            body,
            trailers,
        }
    }

    /// An application that reads one request, writes `wire` in pieces of
    /// random sizes and closes.
    async fn answers_in_pieces(wire: Vec<u8>, seed: u64) -> SocketAddr {
        let wire = Arc::new(wire);
        let (addr, _) = app(move |mut sock, _| {
            let wire = wire.clone();
            async move {
                use rand::{Rng, SeedableRng};
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
                if read_head(&mut sock).await.is_none() {
                    return;
                }
                let mut rest = &wire[..];
                while !rest.is_empty() {
                    let n = rng.random_range(1..=rest.len().min(700));
                    if sock.write_all(&rest[..n]).await.is_err() {
                        return;
                    }
                    rest = &rest[n..];
                    if rng.random_bool(0.3) {
                        tokio::task::yield_now().await;
                    }
                }
            }
        })
        .await;
        addr
    }

    #[tokio::test]
    async fn random_answers_split_anywhere_arrive_whole() {
        use rand::SeedableRng;
        for seed in 0..150u64 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let g = generate(&mut rng);
            let addr = answers_in_pieces(g.wire, seed).await;
            let res = pool()
                .send(Targets::one(addr), get("/"), MESH_FIELDS)
                .await
                .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
            assert_eq!(res.status().as_u16(), g.status, "seed {seed}");
            let (body, trailers) = body_of(res).await;
            assert_eq!(body, g.body, "seed {seed}");
            let got: Vec<(String, String)> = trailers
                .iter()
                .flat_map(|t| t.iter())
                .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("?").to_owned()))
                .collect();
            assert_eq!(got, g.trailers, "seed {seed}");
        }
    }

    #[tokio::test]
    async fn corrupted_answers_end_in_an_answer_or_an_error_never_a_hang() {
        use rand::{Rng, SeedableRng};
        for seed in 0..300u64 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let mut wire = generate(&mut rng).wire;
            for _ in 0..rng.random_range(1..4) {
                let at = rng.random_range(0..wire.len());
                match rng.random_range(0..4) {
                    0 => wire[at] = rng.random(),
                    1 => wire.truncate(at),
                    2 => {
                        let junk: Vec<u8> =
                            (0..rng.random_range(1..8)).map(|_| rng.random()).collect();
                        wire.splice(at..at, junk);
                    }
                    _ => wire[at] = b"\r\n:;0 \t"[rng.random_range(0..7)],
                }
                if wire.is_empty() {
                    break;
                }
            }
            let addr = answers_in_pieces(wire, seed).await;
            // The application closes once it has written: whatever the
            // bytes said, the exchange ends, with an answer whose body
            // ends (cleanly or not) or with an error.
            let ended = tokio::time::timeout(Duration::from_secs(10), async {
                if let Ok(res) = pool().send(Targets::one(addr), get("/"), MESH_FIELDS).await {
                    let _ = res.into_body().collect().await;
                }
            })
            .await;
            assert!(ended.is_ok(), "seed {seed}: the exchange did not end");
        }
    }
}
