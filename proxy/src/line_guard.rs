//! The last ways around the identity header on the server's side: an
//! HTTP request line that detection takes for opaque bytes.
//!
//! Detection decides on a client's first bytes at once when they cannot
//! begin a common HTTP method (`PROPF`, `FO`): letter-only messages of
//! other protocols (`ruok`, `PING`) must not wait for a line that never
//! comes. A client that means to pass its header fields to the
//! application unseen can pause there, and the rest of its line and its
//! head, a forged `legate-client-id` among them, would follow as opaque
//! bytes to an application that takes any method (some frameworks route
//! a method they do not know by its path alone). Nor does detection take
//! a line whose words are apart by tabs or other blanks for HTTP, whole
//! as it may be, while lenient servers split a request line on any of
//! them (Python's does).
//!
//! So on the server's proxy the client's side of an opaque connection is
//! watched until its first line is known: bytes pass on as they come,
//! nothing waits, and once the first line ends the watch ends too, unless
//! that line is an HTTP request line (a method, a blank, and a last word
//! that is an HTTP version). Then the connection is closed before the
//! bytes that end the line reach the application: it has seen part of a
//! request line and never a header field. The watch costs a branch per
//! read once the line is over, and nothing on connections that were never
//! detected (`proxy.opaque_ports`, where the operator has said what the
//! port carries).
//!
//! What the proxy cannot read it cannot guard: HTTP inside the client's
//! own TLS, or after a PROXY protocol header (whose first line is not a
//! request line), passes as opaque bytes; the README tells applications
//! to trust the identity header on plain HTTP ports only. Watching past a
//! PROXY header would close connections that work today, for setups the
//! header cannot be trusted in anyway.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tracing::warn;

use crate::relay::{ReadSide, WriteSide};

/// What the bytes of a first line seen so far say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Line {
    /// The line has not ended, and it may still be an HTTP request line.
    Open,
    /// It is not an HTTP request line: the watch is over.
    NotHttp,
    /// It ended as an HTTP request line; the bytes fed last end it.
    Http,
}

/// Follows a client's first line across reads.
#[derive(Debug, Clone)]
pub struct LineWatch {
    state: State,
}

#[derive(Debug, Clone)]
enum State {
    /// Before the method: empty lines, which servers skip, are skipped,
    /// and blanks, which lenient ones skip.
    Start,
    /// In the method, this many bytes long.
    Method(usize),
    /// After the method and its blank.
    Target(Words),
    Over,
}

/// The words of a request line after its method, followed only as far as
/// the question whether its last one is an HTTP version needs.
#[derive(Debug, Clone, Default)]
struct Words {
    /// The first bytes of the word being read.
    head: [u8; 5],
    /// Its length so far; 0 between words.
    len: usize,
    /// Whether the word before it, the last whole one, was a version.
    last_was_version: bool,
}

impl Words {
    /// Reads `part`, which has no line end in it.
    fn read(&mut self, part: &[u8]) {
        for &b in part {
            if is_blank(b) {
                if self.len > 0 {
                    self.last_was_version = self.is_version();
                    self.len = 0;
                }
            } else {
                if let Some(slot) = self.head.get_mut(self.len) {
                    *slot = b;
                }
                self.len += 1;
            }
        }
    }

    /// Whether the word being read begins as an HTTP version does. The
    /// version is matched without regard to case: closing a line a
    /// strict server would refuse anyway costs nothing, passing one a
    /// lenient server takes would.
    fn is_version(&self) -> bool {
        self.len >= 5 && self.head.eq_ignore_ascii_case(b"HTTP/")
    }

    /// Whether the line, ended now, ends in an HTTP version, blanks after
    /// it allowed.
    fn end_in_version(&self) -> bool {
        if self.len > 0 {
            self.is_version()
        } else {
            self.last_was_version
        }
    }
}

impl Default for LineWatch {
    fn default() -> Self {
        LineWatch {
            state: State::Start,
        }
    }
}

impl LineWatch {
    /// Takes the next bytes the client sent and says what the line is.
    pub fn feed(&mut self, bytes: &[u8]) -> Line {
        let mut rest = bytes;
        loop {
            match &mut self.state {
                State::Over => return Line::NotHttp,
                State::Start => {
                    let Some(at) = rest
                        .iter()
                        .position(|&b| b != b'\r' && b != b'\n' && !is_blank(b))
                    else {
                        return Line::Open;
                    };
                    self.state = State::Method(0);
                    rest = &rest[at..];
                }
                State::Method(len) => {
                    let Some(&b) = rest.first() else {
                        return Line::Open;
                    };
                    if is_blank(b) && *len > 0 {
                        self.state = State::Target(Words::default());
                    } else if crate::detect::is_tchar(b) && *len < crate::detect::MAX_METHOD {
                        *len += 1;
                    } else {
                        self.state = State::Over;
                        return Line::NotHttp;
                    }
                    rest = &rest[1..];
                }
                State::Target(words) => {
                    let end = rest.iter().position(|&b| b == b'\r' || b == b'\n');
                    words.read(&rest[..end.unwrap_or(rest.len())]);
                    if end.is_none() {
                        return Line::Open;
                    }
                    let http = words.end_in_version();
                    self.state = State::Over;
                    return if http { Line::Http } else { Line::NotHttp };
                }
            }
        }
    }
}

/// Whether a server might take `b` for the blank between the words of a
/// request line. The standard has a single space (RFC 9112 §3), but
/// lenient servers split the line on any white space, Python's on
/// every byte its Latin-1 reading calls one: a request line with tabs
/// in place of spaces, which detection takes for opaque bytes at once,
/// is one such server's request all the same.
fn is_blank(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | 0x0b | 0x0c | 0x1c..=0x1f | 0x85 | 0xa0)
}

/// Why a guarded connection was closed.
#[derive(Debug, thiserror::Error)]
#[error("an HTTP request line came on a connection taken for opaque bytes")]
pub struct HttpInOpaque;

/// Whether a relay ended because its guard closed the connection.
pub fn closed_by_guard(e: &crate::relay::RelayError) -> bool {
    matches!(e, crate::relay::RelayError::Io(e) if e.get_ref().is_some_and(|e| e.is::<HttpInOpaque>()))
}

/// The client's side of an opaque connection on the server's proxy,
/// watched until its first line is over (see the module's text).
pub struct Guarded<S> {
    inner: S,
    watch: Option<LineWatch>,
    client: SocketAddr,
}

impl<S> Guarded<S> {
    /// Watches what `client` sends on `inner`; `watch` is false where
    /// nothing is to be watched (a port in `proxy.opaque_ports`).
    pub fn new(inner: S, watch: bool, client: SocketAddr) -> Self {
        Guarded {
            inner,
            watch: watch.then(LineWatch::default),
            client,
        }
    }

    /// Looks at bytes on their way to the application, read from `inner`
    /// or taken from it before it was guarded; an error, and a warning,
    /// when they end an HTTP request line.
    pub fn check(&mut self, bytes: &[u8]) -> io::Result<()> {
        let Some(watch) = &mut self.watch else {
            return Ok(());
        };
        match watch.feed(bytes) {
            Line::Open => Ok(()),
            Line::NotHttp => {
                self.watch = None;
                Ok(())
            }
            Line::Http => {
                self.watch = None;
                warn!(
                    client = %self.client,
                    "closed a connection taken for opaque bytes whose first line turned out \
                     to be an HTTP request line (sent in pieces, or with blanks other than \
                     spaces): its header fields, the identity header among them, would have \
                     reached the application unchecked"
                );
                Err(io::Error::new(io::ErrorKind::InvalidData, HttpInOpaque))
            }
        }
    }
}

impl<S: ReadSide> ReadSide for Guarded<S> {
    fn poll_read_chunk(
        &mut self,
        cx: &mut Context<'_>,
        room: &mut BytesMut,
    ) -> Poll<io::Result<Bytes>> {
        let chunk = ready!(self.inner.poll_read_chunk(cx, room))?;
        self.check(&chunk)?;
        Poll::Ready(Ok(chunk))
    }
}

impl<S: WriteSide> WriteSide for Guarded<S> {
    fn poll_write_chunk(
        &mut self,
        cx: &mut Context<'_>,
        chunk: &mut Bytes,
    ) -> Poll<io::Result<usize>> {
        self.inner.poll_write_chunk(cx, chunk)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Guarded<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        ready!(Pin::new(&mut self.inner).poll_read(cx, buf))?;
        let this = &mut *self;
        let read = &buf.filled()[before..];
        if this.watch.is_some() {
            if let Err(e) = this.check(read) {
                buf.set_filled(before);
                return Poll::Ready(Err(e));
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Guarded<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the watch makes of `pieces` fed one after another: the verdict
    /// after each.
    fn watch(pieces: &[&[u8]]) -> Vec<Line> {
        let mut w = LineWatch::default();
        pieces.iter().map(|p| w.feed(p)).collect()
    }

    #[test]
    fn a_request_line_in_pieces_is_found_where_it_ends() {
        use Line::*;
        assert_eq!(
            watch(&[b"PROPF", b"IND /admin HTTP/1.1\r\nlegate-client-id: x\r\n"]),
            [Open, Http]
        );
        // The version split too, blanks after it, empty lines before it,
        // a lone LF or CR for its end, a lower-case version.
        assert_eq!(
            watch(&[b"FO", b"O /a HT", b"TP/1.", b"1  \t", b"\n"]),
            [Open, Open, Open, Open, Http]
        );
        assert_eq!(watch(&[b"\r\n\r\nX", b" / HTTP/1.0\r"]), [Open, Http]);
        assert_eq!(watch(&[b"X / http/1.1\r\n"]), [Http]);
        // A target longer than the tail kept.
        let mut long = b"GET /".to_vec();
        long.extend(std::iter::repeat_n(b'a', 5000));
        assert_eq!(watch(&[&long, b" HTTP/1.1\r\n"]), [Open, Http]);
        // A method and its version with nothing between.
        assert_eq!(watch(&[b"FOO HTTP/1.1\n"]), [Http]);
        // Other blanks in place of spaces, which detection takes for
        // opaque bytes even when the line comes whole.
        assert_eq!(watch(&[b"GET\t/\tHTTP/1.1\r\n"]), [Http]);
        assert_eq!(watch(&[b"GET\xa0/\x0bHTTP/1.1\x0c\r\n"]), [Http]);
        assert_eq!(watch(&[b" \t", b"GET / HTTP/1.1\r\n"]), [Open, Http]);
        // Any number of blanks after the version.
        let mut padded = b"GET / HTTP/1.1".to_vec();
        padded.extend([b'\t'; 100]);
        assert_eq!(watch(&[&padded, b"\r\n"]), [Open, Http]);
    }

    #[test]
    fn other_first_lines_end_the_watch() {
        use Line::*;
        assert_eq!(watch(&[b"ruok"]), [Open]);
        assert_eq!(watch(&[b"ruok", b"\n"]), [Open, NotHttp]);
        assert_eq!(
            watch(&[b"PING\r\n", b"X / HTTP/1.1\r\n"]),
            [NotHttp, NotHttp]
        );
        assert_eq!(watch(&[b"\x16\x03\x01"]), [NotHttp]);
        assert_eq!(watch(&[b"/GET"]), [NotHttp]);
        assert_eq!(watch(&[b"OPTIONS rtsp://cam/a RTSP/1.0\r\n"]), [NotHttp]);
        assert_eq!(watch(&[b"STOMP\n"]), [NotHttp]);
        assert_eq!(watch(&[b"get key\r\n"]), [NotHttp]);
        // A word too long to be a method, and a last word too long to be a
        // version.
        assert_eq!(watch(&[&[b'A'; 40]]), [NotHttp]);
        let mut line = b"X ".to_vec();
        line.extend([b'H'; 64]);
        line.extend(b"\r\n");
        assert_eq!(watch(&[&line]), [NotHttp]);
        // A version that is not the last word.
        assert_eq!(watch(&[b"X / HTTP/1.1 more\r\n"]), [NotHttp]);
    }

    /// The verdict on a line does not depend on how its bytes are split
    /// across reads: random lines of request-line parts and other bytes,
    /// fed whole and in random pieces.
    #[test]
    fn the_verdict_does_not_depend_on_the_pieces() {
        use rand::{Rng, SeedableRng};
        const PARTS: &[&[u8]] = &[
            b"GET",
            b"PROPFIND",
            b"x",
            b" ",
            b"\t",
            b"\xa0",
            b"/",
            b"/a?b=c",
            b"HTTP/1.1",
            b"http/1.0",
            b"HTTP/",
            b"HTTP",
            b"RTSP/1.0",
            b"\r",
            b"\n",
            b"\x16",
            b"\x00",
            b"ruok",
        ];
        let verdict = |pieces: &[&[u8]]| -> Line {
            let mut w = LineWatch::default();
            let mut last = Line::Open;
            for p in pieces {
                last = w.feed(p);
                if last != Line::Open {
                    break;
                }
            }
            last
        };
        for seed in 0..2000u64 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let mut line = Vec::new();
            for _ in 0..rng.random_range(1..10) {
                line.extend_from_slice(PARTS[rng.random_range(0..PARTS.len())]);
            }
            let whole = verdict(&[&line]);
            let mut pieces = Vec::new();
            let mut rest = &line[..];
            while !rest.is_empty() {
                let n = rng.random_range(1..=rest.len());
                pieces.push(&rest[..n]);
                rest = &rest[n..];
            }
            assert_eq!(
                verdict(&pieces),
                whole,
                "seed {seed}: {line:?} in {pieces:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_guarded_relay_stops_before_the_line_ends() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut client, ours) = tokio::io::duplex(1024);
        let (theirs, mut app) = tokio::io::duplex(1024);
        let client_addr: SocketAddr = "10.200.0.9:4000".parse().expect("an address");
        let relay = tokio::spawn(crate::relay::relay(
            Guarded::new(ours, true, client_addr),
            theirs,
            std::time::Duration::from_secs(5),
        ));
        client.write_all(b"PROPF").await.expect("a write");
        let mut first = [0u8; 5];
        app.read_exact(&mut first).await.expect("the first piece");
        assert_eq!(&first, b"PROPF");
        client
            .write_all(b"IND / HTTP/1.1\r\nlegate-client-id: forged\r\n\r\n")
            .await
            .expect("a write");
        let ended = relay.await.expect("the relay task");
        assert!(ended.as_ref().is_err_and(closed_by_guard), "{ended:?}");
        let mut rest = Vec::new();
        app.read_to_end(&mut rest).await.expect("the end");
        assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));
    }
}
