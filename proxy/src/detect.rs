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
//! unused.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long a silent client may delay the decision.
pub const DETECT_TIMEOUT: Duration = Duration::from_millis(50);

/// The HTTP/2 connection preface (RFC 9113 §3.4).
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Request methods recognised as the start of an HTTP/1.x request line.
/// `CONNECT` is absent on purpose: a client using us as its HTTP proxy
/// tunnels opaque bytes after it.
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

/// The longest request line inspected; a longer one is still HTTP to
/// hyper, but detection gives up and treats the bytes as opaque.
const MAX_PEEK: usize = 8 * 1024;

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

fn classify(buf: &[u8]) -> Verdict {
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
    let could_be_method = METHODS.iter().any(|m| {
        let k = buf.len().min(m.len());
        buf[..k] == m[..k]
    });
    if !could_be_method {
        return Verdict::Is(Protocol::Opaque);
    }
    let Some(eol) = buf.windows(2).position(|w| w == b"\r\n") else {
        return if buf.len() >= MAX_PEEK {
            Verdict::Is(Protocol::Opaque)
        } else {
            Verdict::NeedMore
        };
    };
    let line = &buf[..eol];
    let is_http1 = line.ends_with(b" HTTP/1.1") || line.ends_with(b" HTTP/1.0");
    Verdict::Is(if is_http1 {
        Protocol::Http1
    } else {
        Protocol::Opaque
    })
}

/// Peeks at a connection until its protocol is known, the client stops
/// sending for [`DETECT_TIMEOUT`], or it closes. `None` when the client
/// sent nothing at all within that time; one that sent part of something
/// and stopped is opaque.
pub async fn detect_or_silent(sock: &TcpStream) -> Option<Protocol> {
    let deadline = tokio::time::Instant::now() + DETECT_TIMEOUT;
    let mut buf = vec![0u8; 512];
    let mut seen = 0;
    loop {
        let peeked = tokio::time::timeout_at(deadline, sock.peek(&mut buf)).await;
        let n = match peeked {
            Err(_) if seen == 0 => return None,
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return Some(Protocol::Opaque),
            Ok(Ok(n)) => n,
        };
        match classify(&buf[..n]) {
            Verdict::Is(p) => return Some(p),
            Verdict::NeedMore => {
                if n == buf.len() && buf.len() < MAX_PEEK {
                    buf.resize((buf.len() * 2).min(MAX_PEEK), 0);
                } else if n == seen {
                    // Nothing new since the last look: peek returns at once
                    // while data is buffered, so wait a little for more.
                    if tokio::time::Instant::now() >= deadline {
                        return Some(Protocol::Opaque);
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                seen = n;
            }
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
) -> Option<Settled> {
    let mut banner = Vec::new();
    let idle = tokio::time::sleep(idle);
    tokio::pin!(idle);
    loop {
        let moved = tokio::select! {
            // Readiness alone consumes nothing, and the server's read gives
            // back nothing when it is dropped unfinished.
            ready = client.readable() => ready.map(|()| FirstMove::Client),
            read = server.read_buf(&mut banner) => read.map(|_| FirstMove::Server),
            () = &mut idle => Ok(FirstMove::Neither),
        };
        match moved {
            Ok(FirstMove::Client) => match detect_or_silent(client).await {
                Some(p) => return Some(Settled::Client(p)),
                // Readiness can be reported without anything to read.
                None => continue,
            },
            Ok(FirstMove::Server) => {
                client.write_all(&banner).await.ok()?;
                return Some(Settled::Server(banner.len()));
            }
            Ok(FirstMove::Neither) | Err(_) => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_first_bytes() {
        assert_eq!(
            classify(b"GET / HTTP/1.1\r\nHost: x\r\n"),
            Verdict::Is(Protocol::Http1)
        );
        assert_eq!(
            classify(b"POST /upload HTTP/1.0\r\n"),
            Verdict::Is(Protocol::Http1)
        );
        assert_eq!(classify(H2_PREFACE), Verdict::Is(Protocol::Http2));
        assert_eq!(classify(b"PRI * HTTP/2.0\r\n"), Verdict::NeedMore);
        assert_eq!(classify(b"GE"), Verdict::NeedMore);
        assert_eq!(classify(b"GET /still-typing"), Verdict::NeedMore);
        // TLS from the application itself, redis, and an SMTP client's reply.
        assert_eq!(
            classify(&[0x16, 0x03, 0x01, 0x02, 0x00]),
            Verdict::Is(Protocol::Opaque)
        );
        assert_eq!(
            classify(b"*1\r\n$4\r\nPING\r\n"),
            Verdict::Is(Protocol::Opaque)
        );
        assert_eq!(classify(b"EHLO client\r\n"), Verdict::Is(Protocol::Opaque));
        assert_eq!(
            classify(b"GET something else\r\n"),
            Verdict::Is(Protocol::Opaque)
        );
        assert_eq!(
            classify(b"CONNECT host:443 HTTP/1.1\r\n"),
            Verdict::Is(Protocol::Opaque)
        );
    }

    #[tokio::test]
    async fn a_silent_client_is_told_within_the_timeout() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let start = std::time::Instant::now();
        assert_eq!(detect_or_silent(&server).await, None);
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
        assert_eq!(detect_or_silent(&client).await, None);
        upstream.write_all(b"220 ready\r\n").await.unwrap();
        let settled = settle(&mut client, &mut server, Duration::from_secs(5)).await;
        assert_eq!(settled, Some(Settled::Server(11)));
        let mut banner = [0u8; 11];
        app.read_exact(&mut banner).await.unwrap();
        assert_eq!(&banner, b"220 ready\r\n");

        // The client first, in HTTP: detected as if it had come in time,
        // and nothing of it read.
        let (mut client, mut app) = pair().await;
        let (mut server, _upstream) = pair().await;
        app.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let settled = settle(&mut client, &mut server, Duration::from_secs(5)).await;
        assert_eq!(settled, Some(Settled::Client(Protocol::Http1)));
        let mut b = [0u8; 3];
        client.peek(&mut b).await.unwrap();
        assert_eq!(&b, b"GET");

        // Neither, within the idle time.
        let (mut client, _app) = pair().await;
        let (mut server, _upstream) = pair().await;
        let settled = settle(&mut client, &mut server, Duration::from_millis(20)).await;
        assert_eq!(settled, None);
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
        assert_eq!(detect_or_silent(&server).await, Some(Protocol::Http1));
        let mut b = [0u8; 6];
        let n = server.peek(&mut b).await.unwrap();
        assert_eq!(&b[..n], b"GET /a", "detection consumed nothing");
        drop(writer.await);
    }
}
