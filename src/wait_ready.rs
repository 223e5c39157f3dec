//! `legate wait-ready`: blocks until the local proxy reports ready, for
//! startup ordering (a Kubernetes postStart hook, a wrapper script, an
//! image health check).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
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

/// One `GET /ready`; true on a 200 answer.
pub(crate) fn ready(addr: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /ready HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut head = [0u8; 12];
    s.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.1 200")
}

pub fn run(args: &WaitReadyArgs, config: &Config) -> ExitCode {
    let addr = args.admin.unwrap_or_else(|| {
        let listen = config.proxy.admin_listen;
        if listen.ip().is_unspecified() {
            SocketAddr::from(([127, 0, 0, 1], listen.port()))
        } else {
            listen
        }
    });
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
