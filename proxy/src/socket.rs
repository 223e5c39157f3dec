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
//! - A connect timeout (`proxy.connect_timeout`, 3 s by default): long
//!   enough for one lost SYN to be retransmitted (the first retry comes
//!   after 1 s), short enough that a client behind the proxy sees a dead
//!   endpoint fail well before its own timeouts fire.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::time::Duration;

use nix::sys::socket::{getsockopt, sockopt};
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

/// The destination a captured connection was addressed to before the
/// `REDIRECT` rule rewrote it, from conntrack via `SO_ORIGINAL_DST`
/// (`IP6T_SO_ORIGINAL_DST` for IPv6). nix wraps the `getsockopt` call, so
/// no `unsafe` is needed here.
pub fn original_dst(stream: &TcpStream) -> io::Result<SocketAddr> {
    let local = stream.local_addr()?;
    let to_io = |e: nix::Error| io::Error::from_raw_os_error(e as i32);
    if local.is_ipv4() {
        let sa = getsockopt(stream, sockopt::OriginalDst).map_err(to_io)?;
        let ip = Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr));
        Ok(SocketAddr::V4(SocketAddrV4::new(
            ip,
            u16::from_be(sa.sin_port),
        )))
    } else {
        let sa = getsockopt(stream, sockopt::Ip6tOriginalDst).map_err(to_io)?;
        let ip = Ipv6Addr::from(sa.sin6_addr.s6_addr);
        // An IPv4 client on a dual-stack socket shows up mapped; report it as IPv4.
        Ok(match ip.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), u16::from_be(sa.sin6_port)),
            None => SocketAddr::V6(SocketAddrV6::new(ip, u16::from_be(sa.sin6_port), 0, 0)),
        })
    }
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
