//! The original destination of a redirected connection.
//!
//! When `REDIRECT` sends a connection to the proxy's port, the kernel
//! rewrites its destination and keeps the one the application asked for in
//! the connection-tracking entry. [`original_dst`] reads it back with
//! `getsockopt(SOL_IP, SO_ORIGINAL_DST)` for IPv4 and
//! `getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST)` for IPv6.
//!
//! The validator uses it here; the proxy needs exactly the same call on
//! every accepted connection.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsFd, AsRawFd};

use nix::sys::socket::{getsockname, getsockopt, sockopt, SockaddrStorage};

/// The destination a redirected TCP connection was originally sent to.
///
/// `sock` is the *accepted* socket. The family is taken from its local
/// address, and an IPv4 connection accepted on a dual-stack IPv6 listener
/// (local address `::ffff:a.b.c.d`) is asked with the IPv4 option, which is
/// the one its connection-tracking entry answers. The result is returned as
/// a plain IPv4 address in that case.
///
/// For a connection that was not NATed the kernel returns the connection's
/// own destination; without a connection-tracking entry at all (conntrack
/// not loaded) the call fails with `ENOENT`.
pub fn original_dst(sock: &impl AsFd) -> io::Result<SocketAddr> {
    let local: SockaddrStorage = getsockname(sock.as_fd().as_raw_fd())?;
    let v4 = match (local.as_sockaddr_in(), local.as_sockaddr_in6()) {
        (Some(_), _) => true,
        (None, Some(v6)) => v6.ip().to_ipv4_mapped().is_some(),
        (None, None) => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not an IP socket, so it has no original destination",
            ))
        }
    };
    if v4 {
        let sin = getsockopt(sock, sockopt::OriginalDst)?;
        Ok(SocketAddr::V4(SocketAddrV4::new(
            Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
            u16::from_be(sin.sin_port),
        )))
    } else {
        let sin6 = getsockopt(sock, sockopt::Ip6tOriginalDst)?;
        Ok(SocketAddr::V6(SocketAddrV6::new(
            Ipv6Addr::from(sin6.sin6_addr.s6_addr),
            u16::from_be(sin6.sin6_port),
            sin6.sin6_flowinfo,
            sin6.sin6_scope_id,
        )))
    }
}
