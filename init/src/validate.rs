//! Proving, from inside the namespace, that capture works.
//!
//! Rules that are installed are not yet rules that work: a kernel without
//! conntrack, a CNI rule ahead of legate's jump, or a proxy uid that matches
//! the application's all leave the rules in place and the traffic
//! uncaptured. In the spirit of linkerd's network validator, [`validate`]
//! tries it for real before the proxy starts:
//!
//! 1. listen on `127.0.0.1:<outbound_port>` (and `[::1]`), where the proxy
//!    will listen later;
//! 2. connect, as the calling (non-proxy) user, to an address where nothing
//!    answers: by default `192.0.2.1:9` and `[2001:db8::1]:9`, from the
//!    documentation ranges, so a connection that escapes capture goes
//!    nowhere;
//! 3. accept that connection on the listener and check with
//!    [`original_dst`] that it remembers the address it was sent to.
//!
//! The namespace needs a route to the target, because the kernel picks a
//! route before the `OUTPUT` chain ever sees the connection. Pods have a
//! default route; a bare namespace may not, and then a routed address can
//! be given instead.

use std::io::ErrorKind;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use legate_config::{first_uncovered, InitConfig, ProxyConfig};

use crate::error::InitError;
use crate::netns::within;
use crate::orig_dst::original_dst;

/// The IPv4 target when nothing else is configured (TEST-NET-1).
pub const DEFAULT_TARGET_V4: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)), 9);
/// The IPv6 target when nothing else is configured (documentation prefix).
pub const DEFAULT_TARGET_V6: SocketAddr = SocketAddr::new(
    std::net::IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1)),
    9,
);

/// What to validate, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidateOptions {
    pub netns: Option<String>,
    pub outbound_port: u16,
    /// The proxy's uid and gid: the validator refuses to run as either,
    /// since their connections are exempt by design.
    pub proxy_uid: u32,
    pub proxy_gid: u32,
    /// Destinations to connect to; each must be captured by the rules.
    pub targets: Vec<SocketAddr>,
    /// How long to wait for the connection.
    pub timeout: Duration,
}

impl ValidateOptions {
    /// Options for a configuration, with the default targets for the
    /// families given (see [`default_targets`]).
    pub fn new(init: &InitConfig, proxy: &ProxyConfig, ipv6: bool) -> Self {
        ValidateOptions {
            netns: None,
            outbound_port: proxy.outbound_port,
            proxy_uid: proxy.uid,
            proxy_gid: proxy.gid,
            targets: default_targets(init, ipv6),
            timeout: Duration::from_secs(2),
        }
    }
}

/// A target that was captured as planned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validated {
    pub target: SocketAddr,
    /// The listener the connection landed on.
    pub landed_on: SocketAddr,
    /// What `SO_ORIGINAL_DST` said; equal to `target`.
    pub original_dst: SocketAddr,
}

/// Targets that the configured rules capture: the documentation address
/// of each family, or, when `init.include_outbound_cidrs` limits capture,
/// the first address of the first included network of that family that
/// the excluded networks leave to capture (a family with no included
/// network is captured nowhere and is skipped). An include list the
/// excludes cover in part is how exceptions are carved out, so its first
/// address may well be one of them.
pub fn default_targets(init: &InitConfig, ipv6: bool) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    let left_alone = init.outbound_left_alone();
    for default in [DEFAULT_TARGET_V4, DEFAULT_TARGET_V6] {
        if default.is_ipv6() && !ipv6 {
            continue;
        }
        let same_family = |n: &&IpNet| n.network().is_ipv6() == default.is_ipv6();
        if init.include_outbound_cidrs.is_empty() {
            out.push(default);
        } else if let Some(net) = init
            .include_outbound_cidrs
            .iter()
            .filter(same_family)
            .find_map(|n| first_uncovered(n, &left_alone))
        {
            // The first host, not the network address itself.
            let host = net.hosts().next().unwrap_or(net.network());
            out.push(SocketAddr::new(host, default.port()));
        }
    }
    out
}

/// Checks that a connection to each target lands on the outbound port with
/// its original destination intact. Run it after the rules are applied and
/// before the proxy starts (the proxy would hold the port).
pub fn validate(opts: &ValidateOptions) -> Result<Vec<Validated>, InitError> {
    within(opts.netns.as_deref(), || {
        let uid = nix::unistd::geteuid().as_raw();
        let gid = nix::unistd::getegid().as_raw();
        if uid == opts.proxy_uid || gid == opts.proxy_gid {
            let target = opts.targets.first().copied().unwrap_or(DEFAULT_TARGET_V4);
            return Err(InitError::Validation {
                target,
                problem: format!(
                    "the validator runs as uid {uid} gid {gid}, the proxy's own, whose connections are \
                     exempt by design; run it as any other user"
                ),
            });
        }
        opts.targets
            .iter()
            .map(|t| validate_one(*t, opts.outbound_port, opts.timeout))
            .collect()
    })
}

/// A listener with `SO_REUSEADDR`, so that the accepted connection of an
/// earlier validation, still in TIME_WAIT on the same port, does not make
/// the next run fail.
fn bind_reusable(addr: SocketAddr) -> std::io::Result<TcpListener> {
    use nix::sys::socket::{
        bind, listen, setsockopt, socket, sockopt, AddressFamily, Backlog, SockFlag, SockType,
        SockaddrStorage,
    };
    let family = if addr.is_ipv6() {
        AddressFamily::Inet6
    } else {
        AddressFamily::Inet
    };
    let fd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    bind(fd.as_raw_fd(), &SockaddrStorage::from(addr))?;
    listen(&fd, Backlog::new(16).unwrap_or(Backlog::MAXCONN))?;
    Ok(TcpListener::from(fd))
}

fn validate_one(target: SocketAddr, port: u16, timeout: Duration) -> Result<Validated, InitError> {
    let fail = |problem: String| InitError::Validation { target, problem };
    let listen: SocketAddr = if target.is_ipv6() {
        (Ipv6Addr::LOCALHOST, port).into()
    } else {
        (Ipv4Addr::LOCALHOST, port).into()
    };
    // The port can be held for a moment by a process that is exiting, or by
    // a child forked from this process that has not reached exec yet (the
    // tests fork often); only a port that stays busy is an error.
    let deadline = Instant::now() + timeout;
    let bound = loop {
        match bind_reusable(listen) {
            Err(e) if e.kind() == ErrorKind::AddrInUse && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            other => break other,
        }
    };
    let listener = bound.map_err(|e| {
        fail(match e.kind() {
            ErrorKind::AddrInUse => format!(
                "{listen} is already in use (is the proxy running?); validate before the proxy starts"
            ),
            ErrorKind::AddrNotAvailable => format!(
                "cannot listen on {listen}: the loopback device is down here (`ip link set lo up`)"
            ),
            _ => format!("cannot listen on {listen}: {e}"),
        })
    })?;
    listener
        .set_nonblocking(true)
        .map_err(|e| InitError::io("making the validation listener non-blocking", e))?;

    let client = TcpStream::connect_timeout(&target, timeout).map_err(|e| {
        fail(match e.kind() {
            ErrorKind::TimedOut | ErrorKind::WouldBlock => format!(
                "the connection was not redirected to port {port} (nothing answered within {timeout:?}); \
                 are the rules installed (`legate init --check`) and is legate's jump reached before \
                 other rules in the nat OUTPUT chain?"
            ),
            ErrorKind::NetworkUnreachable | ErrorKind::HostUnreachable => format!(
                "it is unreachable ({e}): either the connection was not redirected to port {port} \
                 and went out, or this namespace has no route to it (the kernel picks a route \
                 before any rule sees the connection: add a default route, or validate with a \
                 routed address, --validate-target)"
            ),
            ErrorKind::ConnectionRefused => format!(
                "the connection was refused: it was not redirected to port {port}, or it was and \
                 nothing listened there"
            ),
            _ => format!("connecting failed: {e}"),
        })
    })?;
    let me = client
        .local_addr()
        .map_err(|e| InitError::io("reading the client's address", e))?;

    let deadline = Instant::now() + timeout;
    loop {
        match listener.accept() {
            Ok((conn, peer)) if peer == me => {
                let original = original_dst(&conn).map_err(|e| {
                    fail(format!(
                        "the connection landed on {listen}, but its original destination cannot be \
                         read ({e}); is connection tracking (nf_conntrack) available?"
                    ))
                })?;
                if original != target {
                    return Err(fail(format!(
                        "the connection landed on {listen}, but SO_ORIGINAL_DST says {original}"
                    )));
                }
                return Ok(Validated {
                    target,
                    landed_on: listen,
                    original_dst: original,
                });
            }
            // Someone else's connection to the port: not ours, keep waiting.
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return Err(fail(format!(
                        "the connection succeeded but never reached {listen}: it was delivered \
                         somewhere else, so it was not captured"
                    )));
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(InitError::io(format!("accepting on {listen}"), e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_targets_follow_the_include_list() {
        let mut init = InitConfig::default();
        assert_eq!(
            default_targets(&init, true),
            vec![DEFAULT_TARGET_V4, DEFAULT_TARGET_V6]
        );
        assert_eq!(default_targets(&init, false), vec![DEFAULT_TARGET_V4]);
        init.include_outbound_cidrs = vec!["10.200.0.0/16".parse().unwrap()];
        assert_eq!(
            default_targets(&init, true),
            vec!["10.200.0.1:9".parse::<SocketAddr>().unwrap()]
        );
    }

    #[test]
    fn default_targets_skip_what_the_excludes_carve_out() {
        let net = |s: &str| s.parse::<IpNet>().unwrap();
        let mut init = InitConfig {
            include_outbound_cidrs: vec![net("10.0.0.0/8"), net("fd00::/8")],
            exclude_outbound_cidrs: vec![net("10.0.0.0/16"), net("fd00::/16")],
            ..Default::default()
        };
        assert_eq!(
            default_targets(&init, true),
            vec![
                "10.1.0.1:9".parse::<SocketAddr>().unwrap(),
                "[fd01::]:9".parse().unwrap()
            ]
        );
        // An included network wholly left alone (which loading refuses,
        // but a caller can build) is passed over for the next one.
        init.include_outbound_cidrs =
            vec![net("127.0.0.0/8"), net("10.0.0.0/16"), net("10.5.0.0/16")];
        assert_eq!(
            default_targets(&init, false),
            vec!["10.5.0.1:9".parse::<SocketAddr>().unwrap()]
        );
    }
}
