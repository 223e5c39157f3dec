//! Socket plumbing: listeners, outbound connects, the options every proxied
//! socket gets, and reading the original destination of a captured
//! connection.
//!
//! The options are chosen deliberately:
//! - `TCP_NODELAY` on every socket. The proxy already writes whole buffers
//!   (and whole TLS records), so Nagle's algorithm could only add up to a
//!   round trip of delay to small interactive writes the application
//!   meant to send at once; the application's own Nagle choice still
//!   applies on its socket to us.
//! - TCP keepalive after `proxy.tcp_keepalive` of silence. A peer that
//!   vanished without a FIN (a deleted pod, a rebooted node) is otherwise
//!   only noticed by the idle timeout, an hour later by default; keepalive
//!   frees its connection slot and its buffers within minutes.
//! - On mesh connections only, `TCP_USER_TIMEOUT` (see
//!   [`give_up_unacknowledged`]): a request sent to a peer proxy that
//!   vanished without a FIN (a crashed node, a cut link) otherwise waited
//!   for the next keep-alive ping to go unanswered, up to 40 s, and
//!   through a pooled connection every request to that peer waited with
//!   it. The application's own connections keep the kernel's patience
//!   (minutes of retransmission), as they would without the proxy.
//! - A connect timeout (`proxy.connect_timeout`, 3 s by default): long
//!   enough for one lost SYN to be retransmitted (the first retry comes
//!   after 1 s), short enough that a client behind the proxy sees a dead
//!   endpoint fail well before its own timeouts fire.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use socket2::{Domain, Protocol, SockRef, Socket, TcpKeepalive, Type};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// Binds a listener. IPv6 listeners are IPv6-only so that the IPv4 and
/// IPv6 listeners on the same port can coexist.
pub fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    // A restarted proxy must be able to bind while old connections linger in TIME_WAIT.
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

/// Applies the options every proxied socket gets; see the module docs.
pub fn tune(stream: &TcpStream, keepalive: Duration) {
    // Failures here only cost latency or dead-peer detection, never correctness.
    let _ = stream.set_nodelay(true);
    let ka = TcpKeepalive::new()
        .with_time(keepalive)
        .with_interval(Duration::from_secs(10))
        .with_retries(3);
    let _ = SockRef::from(stream).set_tcp_keepalive(&ka);
}

/// Makes the kernel give up `stream` once data sent on it has gone
/// unacknowledged for `limit`, failing its reads and writes. Failing to
/// set it only costs dead-peer detection, never correctness.
pub fn give_up_unacknowledged(stream: &TcpStream, limit: Duration) {
    let _ = SockRef::from(stream).set_tcp_user_timeout(Some(limit));
}

/// Why an outbound connect failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connecting to {addr} timed out after {timeout:?}; the destination may be down or a firewall may drop the traffic")]
    Timeout { addr: SocketAddr, timeout: Duration },
    #[error("connecting to {addr} failed: {source}")]
    Io {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
}

impl ConnectError {
    pub fn is_refused(&self) -> bool {
        matches!(self, ConnectError::Io { source, .. } if source.kind() == io::ErrorKind::ConnectionRefused)
    }
}

/// Connects with a timeout and tunes the socket.
pub async fn connect(
    addr: SocketAddr,
    timeout: Duration,
    keepalive: Duration,
) -> Result<TcpStream, ConnectError> {
    let attempt = async {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }?;
        socket.set_nodelay(true)?;
        socket.connect(addr).await
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok(stream)) => {
            tune(&stream, keepalive);
            Ok(stream)
        }
        Ok(Err(source)) => Err(ConnectError::Io { addr, source }),
        Err(_) => Err(ConnectError::Timeout { addr, timeout }),
    }
}

/// Read buffer under each mesh TLS connection.
///
/// rustls asks its transport for at most 4 KiB at a time, so a full 16 KiB
/// record took at least four `read` system calls. With this buffer one
/// call takes in several records and rustls is served from memory. Only
/// mesh connections get it, and they are pooled and few.
pub const TLS_READ_BUFFER: usize = 64 * 1024;

/// `io` with [`TLS_READ_BUFFER`] in front of its reads; writes pass
/// straight through.
pub fn tls_transport<S: tokio::io::AsyncRead>(io: S) -> tokio::io::BufReader<S> {
    tokio::io::BufReader::with_capacity(TLS_READ_BUFFER, io)
}

/// Unsent TLS a mesh connection may hold before a write stops taking bytes.
///
/// Twice rustls's default of 64 KiB. A write rustls takes only in part
/// leaves its tail for later, in a TLS record, system call and TCP segment
/// of its own. With the extra room, a full DATA frame
/// ([`crate::pool::MAX_FRAME`]) with its 9-byte header is taken whole
/// even behind a whole burst of the write batcher
/// ([`crate::batch::MAX_HELD`], 64 KiB) not yet sent.
/// The few mesh connections may hold that much more each when their
/// socket is full.
pub const TLS_WRITE_LIMIT: usize = 128 * 1024;

/// Sets [`TLS_WRITE_LIMIT`] on a mesh connection's TLS session.
pub fn limit_tls_writes<C, D>(conn: &mut C)
where
    C: std::ops::DerefMut<Target = rustls::ConnectionCommon<D>>,
{
    conn.set_buffer_limit(Some(TLS_WRITE_LIMIT));
}

/// One or two addresses for the same service, tried in order: the second
/// only when the first refuses. Small and `Copy`, so that naming a target
/// on the request path never allocates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Targets {
    addrs: [SocketAddr; 2],
    len: u8,
}

impl Targets {
    pub fn one(addr: SocketAddr) -> Self {
        Targets {
            addrs: [addr; 2],
            len: 1,
        }
    }

    pub fn two(first: SocketAddr, then: SocketAddr) -> Self {
        Targets {
            addrs: [first, then],
            len: 2,
        }
    }

    pub fn as_slice(&self) -> &[SocketAddr] {
        &self.addrs[..usize::from(self.len)]
    }
}

/// How the proxy dials plain TCP: the connect timeout, and the keepalive
/// set on every connection. One value shared by the HTTP clients and the
/// connections they dial, so they cannot disagree.
#[derive(Debug, Clone, Copy)]
pub struct Dial {
    pub timeout: Duration,
    pub keepalive: Duration,
}

impl Dial {
    /// Connects to `addr`.
    pub async fn connect_one(&self, addr: SocketAddr) -> Result<TcpStream, ConnectError> {
        connect(addr, self.timeout, self.keepalive).await
    }

    /// Connects to the first of `targets` that accepts; a timeout or any
    /// error but a refusal ends the attempt at once, since the next address
    /// would only add its own timeout.
    pub async fn connect(&self, targets: &Targets) -> Result<TcpStream, ConnectError> {
        let (last, first) = match targets.as_slice().split_last() {
            Some(split) => split,
            None => unreachable!("Targets holds one or two addresses"),
        };
        for &addr in first {
            match self.connect_one(addr).await {
                Err(e) if e.is_refused() => {}
                other => return other,
            }
        }
        self.connect_one(*last).await
    }
}

/// The destination a captured connection was addressed to before the
/// `REDIRECT` rule rewrote it. The interception crate owns this call, since
/// it is the other half of the rules it installs.
pub fn original_dst(stream: &TcpStream) -> io::Result<SocketAddr> {
    legate_init::orig_dst::original_dst(stream)
}

/// Closes a connection with a RST instead of a FIN, so that the client sees
/// "connection reset" (its connect was not really answered) rather than a
/// clean, empty reply it might mistake for success.
pub fn reset(stream: TcpStream) {
    let _ = SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}

/// The addresses assigned to this network namespace's interfaces.
pub fn local_addresses() -> Vec<IpAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    let mut out: Vec<IpAddr> = addrs
        .filter_map(|ifa| ifa.address)
        .filter_map(|a| {
            if let Some(v4) = a.as_sockaddr_in() {
                Some(IpAddr::V4(v4.ip()))
            } else {
                a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
            }
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::Arc;

    /// A full DATA frame and its header, written as h2 writes them behind
    /// a burst of the write batcher still unsent, are taken in one write:
    /// nothing is left over to leave on its own.
    #[test]
    fn a_mesh_session_takes_a_full_frame_with_its_header_at_once() {
        let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
        let mut conn =
            rustls::ClientConnection::new(Arc::new(cfg), "10.200.0.3".try_into().unwrap()).unwrap();
        limit_tls_writes(&mut conn);
        let burst = vec![0u8; crate::batch::MAX_HELD];
        assert_eq!(conn.writer().write(&burst).unwrap(), burst.len());
        let header = [0u8; 9];
        let payload = vec![0u8; crate::pool::MAX_FRAME as usize];
        let taken = conn
            .writer()
            .write_vectored(&[io::IoSlice::new(&header), io::IoSlice::new(&payload)])
            .unwrap();
        assert_eq!(taken, header.len() + payload.len());
    }
}
