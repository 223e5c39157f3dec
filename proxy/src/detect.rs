//! Protocol detection: a peek at the first bytes a client sends, without
//! consuming them, decides whether a connection takes the HTTP path.
//!
//! A client that says nothing for [`DETECT_TIMEOUT`] may be waiting for the
//! server to speak first (SMTP, MySQL, many databases): its server is then
//! connected at once, so the banner arrives within that bound instead of
//! stalling for seconds as in proxies that wait for a client byte. Most
//! HTTP clients send their request as soon as they connect, far inside the
//! bound; but not all do: a pool that opens its connections ahead of use,
//! or a client opening hundreds at once on a busy machine, may speak only
//! later. So a silent client is not written off as opaque: with its server
//! connected, [`settle`] waits for whichever side speaks first. The
//! server's bytes make the connection opaque; the client's are detected as
//! if they had come in time, and HTTP then leaves the server connection
//! unused. An HTTP/2 server's opening SETTINGS frame, which many servers
//! send the moment a client connects, does not count as speaking first
//! ([`opens_http2`]): a slow gRPC client would otherwise lose the HTTP
//! path, and with it the guard on the identity header.
//!
//! Bytes that begin with a common HTTP method are HTTP unless their first
//! line names another protocol of the same shape (RTSP, SIP): a malformed
//! line, one that stalls part-way, or one too long to inspect is hyper's to
//! judge. Any other method is HTTP when its whole line ends in an HTTP
//! version (`CONNECT` only for the server's proxy: see [`Side`]), and
//! empty lines before the request line, which servers skip, are skipped
//! here too. Passed on as opaque, such a request would reach a lenient
//! server with whatever headers the client wrote, the identity header
//! that the HTTP path guards among them; on the server's side,
//! [`crate::line_guard`] closes the gap a line sent in pieces would
//! leave. (A Redis inline command
//! `GET key` typed by hand is therefore answered 400; `redis-cli` speaks
//! RESP, which is opaque, and `proxy.opaque_ports`, listing the port on
//! the client's proxy and the server's, covers the rest.)

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long a silent client may delay the decision.
pub const DETECT_TIMEOUT: Duration = Duration::from_millis(50);

/// How long a client that began like HTTP may take to finish its request
/// line. Past it the connection is taken for HTTP: the HTTP path is where
/// the identity header is guarded, and a stalled start must not be a way
/// around it.
pub const LINE_PATIENCE: Duration = Duration::from_secs(10);

/// The HTTP/2 connection preface (RFC 9113 §3.4).
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Request methods recognised as the start of an HTTP/1.x request line
/// from their first bytes. Other methods are recognised by the whole line
/// (see [`classify`]); so is `CONNECT`, on the server's side only (see
/// [`Side`]).
const METHODS: &[&[u8]] = &[
    b"GET ",
    b"HEAD ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"OPTIONS ",
    b"PATCH ",
    b"TRACE ",
];

/// The longest method taken for one when it is not among [`METHODS`]
/// (the longest registered, `UPDATEREDIRECTREF`, has 17 bytes): a longer
/// run of token bytes is some other protocol.
pub(crate) const MAX_METHOD: usize = 24;

/// Whether `b` may appear in a method (RFC 9110 §5.6.2, `tchar`).
pub(crate) fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// The longest request line inspected (the longest URI hyper accepts is
/// just under it). A longer line that began like HTTP is taken for HTTP,
/// for hyper to judge, never passed on as opaque.
const MAX_PEEK: usize = 64 * 1024;

/// Which proxy is looking: the two take a `CONNECT` request differently.
///
/// The client's proxy passes one on as opaque bytes: a client asking an
/// HTTP proxy for a tunnel speaks its own protocol inside it, and the
/// client's proxy carries the whole connection in a mesh tunnel, as any
/// opaque one. The server's proxy, in front of the HTTP proxy the tunnel
/// is asked of, finds it there and serves it as HTTP: its head carries
/// header fields to the application like any request's, the identity
/// header among them, and an application that declines it may keep the
/// connection open and read the client's next request on it (hyper's
/// server does).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The client's proxy, detecting what its application sends.
    Client,
    /// The server's proxy, detecting what reaches its application.
    Server,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
    Opaque,
}

/// What the bytes seen so far say.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Is(Protocol),
    NeedMore,
}

fn classify(buf: &[u8], side: Side) -> Verdict {
    if buf.is_empty() {
        return Verdict::NeedMore;
    }
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return if buf.len() >= H2_PREFACE.len() {
            Verdict::Is(Protocol::Http2)
        } else {
            Verdict::NeedMore
        };
    }
    // Servers skip empty lines before a request line (RFC 9112 §2.2), and
    // so does hyper: they must not hide one from detection.
    let Some(start) = buf.iter().position(|&b| b != b'\r' && b != b'\n') else {
        return if buf.len() >= MAX_PEEK {
            Verdict::Is(Protocol::Http1)
        } else {
            Verdict::NeedMore
        };
    };
    let rest = &buf[start..];
    let common = METHODS.iter().any(|m| {
        let k = rest.len().min(m.len());
        rest[..k] == m[..k]
    });
    if !common {
        // Any other method (WebDAV's PROPFIND, an application's own) is a
        // token and a space, and its line must end in an HTTP version.
        // Bytes that end inside the token are opaque at once: short
        // messages of letters ("ping") are common in other protocols, and
        // an HTTP client writes its request line whole.
        let token = rest.iter().take_while(|&&b| is_tchar(b)).count();
        if token == 0
            || token > MAX_METHOD
            || (&rest[..token] == b"CONNECT" && side == Side::Client)
            || rest.get(token) != Some(&b' ')
        {
            return Verdict::Is(Protocol::Opaque);
        }
    }
    let Some(eol) = rest.iter().position(|&b| b == b'\n') else {
        return if buf.len() >= MAX_PEEK {
            Verdict::Is(Protocol::Http1)
        } else {
            Verdict::NeedMore
        };
    };
    // A line that begins with a common method is HTTP unless it names
    // another protocol of the same shape (RTSP, SIP). Anything else,
    // malformed or not, is hyper's to judge: passed on as opaque, a line
    // that a lenient server takes for HTTP would carry whatever headers the
    // client wrote to it, a forged identity header among them.
    let line = rest[..eol].trim_ascii_end();
    let version = line.rsplit(|&b| b == b' ').next().unwrap_or_default();
    if !common {
        return Verdict::Is(if version.starts_with(b"HTTP/") {
            Protocol::Http1
        } else {
            Protocol::Opaque
        });
    }
    let other_protocol = match version.iter().position(|&b| b == b'/') {
        Some(slash) => {
            let (name, number) = (&version[..slash], &version[slash + 1..]);
            name != b"HTTP"
                && !name.is_empty()
                && name.iter().all(u8::is_ascii_uppercase)
                && !number.is_empty()
                && number.iter().all(|&b| b.is_ascii_digit() || b == b'.')
        }
        None => false,
    };
    Verdict::Is(if other_protocol {
        Protocol::Opaque
    } else {
        Protocol::Http1
    })
}

/// What bytes that began like HTTP and stopped short of a decision are
/// taken for: HTTP/2 once they can only be its preface, else HTTP/1.1.
fn unfinished(buf: &[u8]) -> Protocol {
    if buf.len() >= 3 && H2_PREFACE.starts_with(buf) {
        Protocol::Http2
    } else {
        Protocol::Http1
    }
}

/// Peeks at a connection until its protocol is known or the client
/// closes. `None` when the client sent nothing at all within
/// [`DETECT_TIMEOUT`]. A client whose first bytes could begin an HTTP
/// request gets [`LINE_PATIENCE`] to finish its request line, and is then
/// taken for HTTP.
pub async fn detect_or_silent(sock: &TcpStream, side: Side) -> Option<Protocol> {
    let mut deadline = tokio::time::Instant::now() + DETECT_TIMEOUT;
    let mut buf = vec![0u8; 512];
    let mut seen = 0;
    let mut pause = Duration::from_millis(1);
    loop {
        let peeked = tokio::time::timeout_at(deadline, sock.peek(&mut buf)).await;
        let n = match peeked {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(Protocol::Opaque),
            Ok(Ok(n)) => n,
        };
        match classify(&buf[..n], side) {
            Verdict::Is(p) => return Some(p),
            Verdict::NeedMore => {
                if seen == 0 {
                    deadline = tokio::time::Instant::now() + LINE_PATIENCE;
                }
                if n == buf.len() && buf.len() < MAX_PEEK {
                    buf.resize((buf.len() * 2).min(MAX_PEEK), 0);
                } else if n == seen {
                    // Nothing new since the last look: peek returns at once
                    // while data is buffered, so wait for more, less often
                    // the longer it takes.
                    if tokio::time::Instant::now() >= deadline {
                        return Some(unfinished(&buf[..n]));
                    }
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(DETECT_TIMEOUT);
                } else {
                    pause = Duration::from_millis(1);
                }
                seen = n;
            }
        }
    }
}

/// For a client that was silent within [`DETECT_TIMEOUT`], when nothing is
/// to be connected for it first: waits up to `patience` for its bytes and
/// detects them. `None` if it stays silent.
pub async fn late_bytes(sock: &TcpStream, patience: Duration, side: Side) -> Option<Protocol> {
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        match tokio::time::timeout_at(deadline, sock.readable()).await {
            Ok(Ok(())) => {
                // Readiness can be reported without anything to read.
                if let Some(p) = detect_or_silent(sock, side).await {
                    return Some(p);
                }
            }
            Ok(Err(_)) | Err(_) => return None,
        }
    }
}

/// Reads on from a stream that cannot be peeked (a tunnel's) until the
/// bytes gathered in `buf` name their protocol, with the patience
/// [`detect_or_silent`] gives a request line. Every byte read stays in
/// `buf`, to be put back in front of the stream. A stream that ends or
/// fails part-way leaves what it sent to be judged as it is: HTTP's to
/// refuse when it began like HTTP.
pub async fn read_until_known<R: AsyncRead + Unpin>(
    stream: &mut R,
    buf: &mut Vec<u8>,
    side: Side,
) -> Protocol {
    let deadline = tokio::time::Instant::now() + LINE_PATIENCE;
    loop {
        if let Verdict::Is(p) = classify(buf, side) {
            return p;
        }
        let room = MAX_PEEK.saturating_sub(buf.len());
        buf.reserve(room.min(4096));
        let mut more = (&mut *stream).take(room as u64);
        let read = tokio::time::timeout_at(deadline, more.read_buf(buf)).await;
        match read {
            Ok(Ok(n)) if n > 0 => {}
            _ if buf.is_empty() => return Protocol::Opaque,
            _ => return unfinished(buf),
        }
    }
}

/// Who spoke first on a connection whose client was silent at first.
#[derive(Debug, PartialEq, Eq)]
enum FirstMove {
    /// The server: its first bytes (none if it closed) were read into the
    /// banner buffer.
    Server,
    /// The client: its bytes are there to detect, unread.
    Client,
    /// Neither, within the idle timeout.
    Neither,
}

/// Which side of a connection spoke first, as [`settle`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Settled {
    /// The client, in this protocol; nothing of it was read.
    Client(Protocol),
    /// The server, whose first bytes (this many; none if it closed) were
    /// passed on to the client: the connection is opaque.
    Server(usize),
}

/// For a client that was silent within [`DETECT_TIMEOUT`], with its
/// server connected: waits for whichever side speaks first. The server's
/// first bytes make the connection opaque; the client's are detected as if
/// they had come in time. `None` when neither spoke within `idle`, or the
/// client left.
pub async fn settle<S: AsyncRead + Unpin>(
    client: &mut TcpStream,
    server: &mut S,
    idle: Duration,
    side: Side,
) -> Option<Settled> {
    let mut banner = Vec::with_capacity(4096);
    // An HTTP/2 server: its first bytes say nothing of the client's
    // protocol, so the client still decides.
    let mut h2_server = false;
    let idle = tokio::time::sleep(idle);
    tokio::pin!(idle);
    loop {
        let moved = tokio::select! {
            // Readiness alone consumes nothing, and the server's read gives
            // back nothing when it is dropped unfinished.
            ready = client.readable() => ready.map(|()| FirstMove::Client),
            read = server.read_buf(&mut banner), if !h2_server => read.map(|_| FirstMove::Server),
            () = &mut idle => Ok(FirstMove::Neither),
        };
        match moved {
            Ok(FirstMove::Client) => match detect_or_silent(client, side).await {
                Some(p @ (Protocol::Http1 | Protocol::Http2)) => return Some(Settled::Client(p)),
                Some(Protocol::Opaque) if h2_server => {
                    client.write_all(&banner).await.ok()?;
                    return Some(Settled::Server(banner.len()));
                }
                Some(p) => return Some(Settled::Client(p)),
                // Readiness can be reported without anything to read.
                None => continue,
            },
            Ok(FirstMove::Server) if opens_http2(&banner) => h2_server = true,
            Ok(FirstMove::Server) => {
                client.write_all(&banner).await.ok()?;
                return Some(Settled::Server(banner.len()));
            }
            Ok(FirstMove::Neither) | Err(_) => return None,
        }
    }
}

/// Whether a server's first bytes are the SETTINGS frame an HTTP/2 server
/// opens its side of a connection with (RFC 9113 §3.4), which many send
/// without waiting for the client's preface (gRPC servers, nginx, the
/// `h2` crate). Such a server is not speaking first in the sense of a
/// banner: the client's HTTP/2 request is still to come, and must take the
/// HTTP path. No server-first protocol begins like it: SMTP, FTP, POP3 and
/// SSH banners are text, and a MySQL greeting has sequence number 0 where
/// this frame has its type, 4.
pub fn opens_http2(first: &[u8]) -> bool {
    const SETTINGS: u8 = 0x4;
    let [l0, l1, l2, kind, flags, s0, s1, s2, s3, ..] = *first else {
        return false;
    };
    let len = u32::from_be_bytes([0, l0, l1, l2]);
    kind == SETTINGS
        && flags == 0
        && len % 6 == 0
        && len <= 16_384
        && u32::from_be_bytes([s0, s1, s2, s3]) & 0x7fff_ffff == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// [`settle`] as the client's proxy runs it.
    async fn settled_within(
        client: &mut TcpStream,
        server: &mut TcpStream,
        idle: Duration,
    ) -> Option<Settled> {
        settle(client, server, idle, Side::Client).await
    }

    /// What both sides make of `buf`, which they must agree on.
    fn verdict(buf: &[u8]) -> Verdict {
        let client = classify(buf, Side::Client);
        assert_eq!(client, classify(buf, Side::Server), "{buf:?}");
        client
    }

    #[test]
    fn classifies_first_bytes() {
        assert_eq!(
            verdict(b"GET / HTTP/1.1\r\nHost: x\r\n"),
            Verdict::Is(Protocol::Http1)
        );
        assert_eq!(
            verdict(b"POST /upload HTTP/1.0\r\n"),
            Verdict::Is(Protocol::Http1)
        );
        assert_eq!(verdict(H2_PREFACE), Verdict::Is(Protocol::Http2));
        assert_eq!(verdict(b"PRI * HTTP/2.0\r\n"), Verdict::NeedMore);
        assert_eq!(verdict(b"GE"), Verdict::NeedMore);
        assert_eq!(verdict(b"GET /still-typing"), Verdict::NeedMore);
        // TLS from the application itself, redis, and an SMTP client's reply.
        assert_eq!(
            verdict(&[0x16, 0x03, 0x01, 0x02, 0x00]),
            Verdict::Is(Protocol::Opaque)
        );
        assert_eq!(
            verdict(b"*1\r\n$4\r\nPING\r\n"),
            Verdict::Is(Protocol::Opaque)
        );
        assert_eq!(verdict(b"EHLO client\r\n"), Verdict::Is(Protocol::Opaque));
        // Protocols shaped like HTTP that are not HTTP.
        assert_eq!(
            verdict(b"OPTIONS rtsp://cam/stream RTSP/1.0\r\n"),
            Verdict::Is(Protocol::Opaque)
        );
        assert_eq!(
            verdict(b"OPTIONS sip:bob@example.com SIP/2.0\r\n"),
            Verdict::Is(Protocol::Opaque)
        );
        // A line that begins like HTTP and is malformed is still HTTP's
        // to refuse: a trailing space, a bare LF, no version, a line
        // longer than is inspected.
        for line in [
            &b"GET /a HTTP/1.1 \r\n"[..],
            b"GET /a HTTP/1.1\n",
            b"GET something else\r\n",
            b"GET /\r\n",
        ] {
            assert_eq!(verdict(line), Verdict::Is(Protocol::Http1), "{line:?}");
        }
        let mut long = b"GET /".to_vec();
        long.resize(MAX_PEEK, b'a');
        assert_eq!(verdict(&long), Verdict::Is(Protocol::Http1));
        assert_eq!(verdict(&long[..MAX_PEEK - 1]), Verdict::NeedMore);
        // A tunnel asked of an HTTP proxy: passed on by the client's
        // proxy, served as HTTP by the server's.
        let connect = b"CONNECT host:443 HTTP/1.1\r\n";
        assert_eq!(
            classify(connect, Side::Client),
            Verdict::Is(Protocol::Opaque)
        );
        assert_eq!(
            classify(connect, Side::Server),
            Verdict::Is(Protocol::Http1)
        );
        assert_eq!(
            classify(b"CONNECT host:443", Side::Server),
            Verdict::NeedMore
        );
        assert_eq!(
            classify(b"CONNECT host:443 STOMP\r\n", Side::Server),
            Verdict::Is(Protocol::Opaque)
        );
        // Empty lines before the request line, which servers skip.
        assert_eq!(
            verdict(b"\r\n\r\nGET / HTTP/1.1\r\n"),
            Verdict::Is(Protocol::Http1)
        );
        assert_eq!(verdict(b"\r\n"), Verdict::NeedMore);
        // Any other method, by its whole line.
        assert_eq!(
            verdict(b"PROPFIND /dav HTTP/1.1\r\n"),
            Verdict::Is(Protocol::Http1)
        );
        assert_eq!(verdict(b"PROPFIND /dav"), Verdict::NeedMore);
        // Lines of other text protocols, and a run of letters too long to
        // be a method.
        for first in [
            &b"get user:1\r\n"[..],
            b"NICK guest\r\n",
            b"PING\r\n",
            b"ping",
            b"PROPF",
            b"CONNECT\naccept-version:1.2\n",
            b"AMQP\x00\x00\x09\x01",
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZ",
        ] {
            assert_eq!(verdict(first), Verdict::Is(Protocol::Opaque), "{first:?}");
        }
    }

    #[tokio::test]
    async fn a_silent_client_is_told_within_the_timeout() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let start = std::time::Instant::now();
        assert_eq!(detect_or_silent(&server, Side::Server).await, None);
        assert!(start.elapsed() < Duration::from_millis(500));
    }

    /// A connected pair: the proxy's end and the peer's.
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let peer = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (ours, _) = listener.accept().await.unwrap();
        (ours, peer)
    }

    #[tokio::test]
    async fn whoever_speaks_first_after_a_silence_decides() {
        // The server first: its banner is passed on, and it is opaque.
        let (mut client, mut app) = pair().await;
        let (mut server, mut upstream) = pair().await;
        assert_eq!(detect_or_silent(&client, Side::Client).await, None);
        upstream.write_all(b"220 ready\r\n").await.unwrap();
        let settled = settled_within(&mut client, &mut server, Duration::from_secs(5)).await;
        assert_eq!(settled, Some(Settled::Server(11)));
        let mut banner = [0u8; 11];
        app.read_exact(&mut banner).await.unwrap();
        assert_eq!(&banner, b"220 ready\r\n");

        // The client first, in HTTP: detected as if it had come in time,
        // and nothing of it read.
        let (mut client, mut app) = pair().await;
        let (mut server, _upstream) = pair().await;
        app.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let settled = settled_within(&mut client, &mut server, Duration::from_secs(5)).await;
        assert_eq!(settled, Some(Settled::Client(Protocol::Http1)));
        let mut b = [0u8; 3];
        client.peek(&mut b).await.unwrap();
        assert_eq!(&b, b"GET");

        // Neither, within the idle time.
        let (mut client, _app) = pair().await;
        let (mut server, _upstream) = pair().await;
        let settled = settled_within(&mut client, &mut server, Duration::from_millis(20)).await;
        assert_eq!(settled, None);
    }

    #[test]
    fn an_http2_servers_opening_is_told_from_banners() {
        // An empty SETTINGS frame, and one with two settings.
        assert!(opens_http2(&[0, 0, 0, 4, 0, 0, 0, 0, 0]));
        assert!(opens_http2(&[
            0, 0, 12, 4, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 100
        ]));
        for banner in [
            &b"220 mail.example ESMTP\r\n"[..],
            b"SSH-2.0-OpenSSH_9.2\r\n",
            b"+OK POP3 ready\r\n",
            // A MySQL greeting: length, sequence 0, protocol version 10.
            &[0x4a, 0, 0, 0, 0x0a, b'8', b'.', b'0', b'.', b'3'],
            // A SETTINGS acknowledgement, a frame on a stream, too short.
            &[0, 0, 0, 4, 1, 0, 0, 0, 0],
            &[0, 0, 6, 4, 0, 0, 0, 0, 1],
            &[0, 0, 0, 4, 0],
        ] {
            assert!(!opens_http2(banner), "{banner:?}");
        }
    }

    #[tokio::test]
    async fn an_http2_server_opening_first_leaves_the_decision_to_the_client() {
        let settings = [0u8, 0, 0, 4, 0, 0, 0, 0, 0];
        // The client speaks HTTP/2 after the server's SETTINGS.
        let (mut client, mut app) = pair().await;
        let (mut server, mut upstream) = pair().await;
        upstream.write_all(&settings).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        app.write_all(H2_PREFACE).await.unwrap();
        let settled = settled_within(&mut client, &mut server, Duration::from_secs(5)).await;
        assert_eq!(settled, Some(Settled::Client(Protocol::Http2)));

        // The client speaks something else: the SETTINGS it was not sent
        // yet reach it first, and the connection is opaque.
        let (mut client, mut app) = pair().await;
        let (mut server, mut upstream) = pair().await;
        upstream.write_all(&settings).await.unwrap();
        let speak = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            app.write_all(b"EHLO me\r\n").await.unwrap();
            app
        });
        let settled = settled_within(&mut client, &mut server, Duration::from_secs(5)).await;
        assert_eq!(settled, Some(Settled::Server(9)));
        let mut app = speak.await.unwrap();
        let mut got = [0u8; 9];
        app.read_exact(&mut got).await.unwrap();
        assert_eq!(got, settings);
    }

    #[tokio::test(start_paused = true)]
    async fn a_start_like_http_that_stalls_is_taken_for_http() {
        for (start, want) in [
            (&b"GE"[..], Protocol::Http1),
            (b"POST /upload?name=", Protocol::Http1),
            (b"PRI * HT", Protocol::Http2),
        ] {
            let (ours, mut peer) = pair().await;
            peer.write_all(start).await.unwrap();
            let begun = tokio::time::Instant::now();
            assert_eq!(
                detect_or_silent(&ours, Side::Client).await,
                Some(want),
                "{start:?}"
            );
            assert!(begun.elapsed() >= LINE_PATIENCE);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_tunnel_is_read_until_its_protocol_is_known() {
        // A request line in pieces; everything read is kept.
        let (mut ours, mut theirs) = tokio::io::duplex(1024);
        let mut buf = b"GE".to_vec();
        let writer = tokio::spawn(async move {
            theirs.write_all(b"T /a").await.unwrap();
            tokio::time::sleep(Duration::from_millis(10)).await;
            theirs.write_all(b" HTTP/1.1\r\nHost: x\r\n").await.unwrap();
            theirs
        });
        assert_eq!(
            read_until_known(&mut ours, &mut buf, Side::Server).await,
            Protocol::Http1
        );
        assert!(buf.starts_with(b"GET /a HTTP/1.1\r\n"), "{buf:?}");
        drop(writer.await);

        // Not HTTP: decided on the bytes there are.
        let (mut ours, _theirs) = tokio::io::duplex(1024);
        let mut buf = b"EHLO me\r\n".to_vec();
        assert_eq!(
            read_until_known(&mut ours, &mut buf, Side::Server).await,
            Protocol::Opaque
        );
        assert_eq!(buf, b"EHLO me\r\n");

        // A start like HTTP that stalls, or ends, is HTTP's to judge.
        for end in [false, true] {
            let (mut ours, theirs) = tokio::io::duplex(1024);
            let mut buf = b"POST /up".to_vec();
            let begun = tokio::time::Instant::now();
            let _keep = if end {
                drop(theirs);
                None
            } else {
                Some(theirs)
            };
            assert_eq!(
                read_until_known(&mut ours, &mut buf, Side::Server).await,
                Protocol::Http1
            );
            assert_eq!(begun.elapsed() >= LINE_PATIENCE, !end);
        }
    }

    #[tokio::test]
    async fn a_request_line_split_across_writes_is_still_http() {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        client.write_all(b"GET /a").await.unwrap();
        let writer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(10)).await;
            client
                .write_all(b" HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .unwrap();
            client
        });
        assert_eq!(
            detect_or_silent(&server, Side::Server).await,
            Some(Protocol::Http1)
        );
        let mut b = [0u8; 6];
        let n = server.peek(&mut b).await.unwrap();
        assert_eq!(&b[..n], b"GET /a", "detection consumed nothing");
        drop(writer.await);
    }
}
