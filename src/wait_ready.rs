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
    #[arg(long, value_name = "HOST:PORT")]
    admin: Option<SocketAddr>,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    legate_config::parse_duration(s)
}

/// One `GET` to the admin server: the status and the body. The body is
/// read to the end of the connection (`Connection: close`), at most 1 MiB.
pub(crate) fn get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Error, ErrorKind};
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )?;
    let mut answer = Vec::new();
    s.take(1 << 20).read_to_end(&mut answer)?;
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
        if ready(addr) {
            return ExitCode::SUCCESS;
        }
        if Instant::now() >= deadline {
            eprintln!(
                "error: the proxy at {addr} was not ready within {:?}; check its log (is the CA reachable? did `legate init` run?)",
                args.timeout
            );
            return ExitCode::FAILURE;
        }
        std::thread::sleep(Duration::from_millis(100));
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
}
