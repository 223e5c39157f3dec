//! `legate wait-ready`: blocks until the local proxy reports ready, for
//! startup ordering (a Kubernetes postStart hook, a wrapper script, an
//! image health check).

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Args;
use legate_config::Config;

#[derive(Debug, Args)]
pub struct WaitReadyArgs {
    /// Give up after this long, for example 30s or 2m
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    timeout: Duration,
    /// The admin address to ask; defaults to proxy.admin_listen on localhost
    #[arg(long, value_name = "IP:PORT")]
    admin: Option<SocketAddr>,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    legate_config::parse_duration(s)
}

/// One `GET` to the admin server: the status and the body. The body is
/// read to the end of the connection (`Connection: close`), at most 1 MiB.
pub(crate) fn get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    get_within(addr, path, Duration::from_secs(2))
}

/// [`get`] that takes at most about `limit`: connecting, then answering.
fn get_within(addr: SocketAddr, path: &str, limit: Duration) -> std::io::Result<(u16, String)> {
    use std::io::{Error, ErrorKind};
    // A zero timeout is refused by the socket calls.
    let limit = limit.max(Duration::from_millis(10));
    let mut s = TcpStream::connect_timeout(&addr, limit.min(Duration::from_secs(1)))?;
    s.set_read_timeout(Some(limit))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )?;
    let mut answer = Vec::new();
    // A read that times out reports EAGAIN ("Resource temporarily
    // unavailable"), which says nothing to an operator.
    s.take(1 << 20)
        .read_to_end(&mut answer)
        .map_err(|e| match e.kind() {
            ErrorKind::WouldBlock | ErrorKind::TimedOut => Error::new(
                ErrorKind::TimedOut,
                format!("it accepted the connection but sent no answer within {limit:?}"),
            ),
            _ => e,
        })?;
    let answer = String::from_utf8_lossy(&answer);
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let status = head
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| Error::new(ErrorKind::InvalidData, "not an HTTP/1.1 answer"))?;
    Ok((status, body.to_owned()))
}

/// One `GET /ready`; true on a 200 answer.
pub(crate) fn ready(addr: SocketAddr) -> bool {
    matches!(get(addr, "/ready"), Ok((200, _)))
}

/// The admin server's address as seen from this namespace:
/// `proxy.admin_listen`, on loopback when it listens on every address.
pub(crate) fn local_admin(config: &Config) -> SocketAddr {
    match config.proxy.admin_listen {
        SocketAddr::V4(a) if a.ip().is_unspecified() => (Ipv4Addr::LOCALHOST, a.port()).into(),
        SocketAddr::V6(a) if a.ip().is_unspecified() => (Ipv6Addr::LOCALHOST, a.port()).into(),
        other => other,
    }
}

pub fn run(args: &WaitReadyArgs, config: &Config) -> ExitCode {
    let addr = args.admin.unwrap_or_else(|| local_admin(config));
    let deadline = Instant::now() + args.timeout;
    loop {
        // Each try fits in what is left, so that the wait ends on time.
        let left = deadline.saturating_duration_since(Instant::now());
        let last = match get_within(addr, "/ready", left.min(Duration::from_secs(2))) {
            Ok((200, _)) => return ExitCode::SUCCESS,
            Ok((status, body)) => format!("it answered {status}: {}", body.trim()),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                "nothing listens there: is the proxy running, and is proxy.admin_listen (or --admin) its admin address?".to_owned()
            }
            Err(e) => e.to_string(),
        };
        if Instant::now() >= deadline {
            eprintln!(
                "error: the proxy at {addr} was not ready within {:?}; at the last try {last}. Check its log (is the CA reachable? did `legate init` run?)",
                args.timeout
            );
            return ExitCode::FAILURE;
        }
        std::thread::sleep(
            Duration::from_millis(100).min(deadline.saturating_duration_since(Instant::now())),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_admin_port_is_asked_on_loopback() {
        let asked = |listen: &str| {
            let mut c = Config::default();
            c.proxy.admin_listen = listen.parse().expect("address");
            local_admin(&c)
        };
        assert_eq!(asked("0.0.0.0:15000"), "127.0.0.1:15000".parse().unwrap());
        assert_eq!(asked("[::]:15000"), "[::1]:15000".parse().unwrap());
        assert_eq!(asked("10.1.2.3:9"), "10.1.2.3:9".parse().unwrap());
    }

    /// An admin port that accepts and never answers: the wait still ends
    /// at its timeout (each try used to take its full 2 s), and the error
    /// says what happened instead of "Resource temporarily unavailable".
    #[test]
    fn a_silent_admin_port_ends_the_wait_on_time_with_a_plain_reason() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("address");
        let err = get_within(addr, "/ready", Duration::from_millis(200)).expect_err("no answer");
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
        assert!(err.to_string().contains("sent no answer"), "{err}");

        let args = WaitReadyArgs {
            timeout: Duration::from_secs(1),
            admin: Some(addr),
        };
        let started = Instant::now();
        assert_eq!(run(&args, &Config::default()), ExitCode::FAILURE);
        let took = started.elapsed();
        assert!(
            took < Duration::from_millis(1800),
            "a 1 s wait took {took:?}"
        );
        drop(listener);
    }
}
