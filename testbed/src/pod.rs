//! A pod: one network namespace on the bed's bridge, and ways to run code
//! and processes inside it.

use std::ffi::OsStr;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::bed::Shared;
use crate::capture::Capture;
use crate::error::{Error, Result};
use crate::process::{PodCommand, Process};
use crate::sys::in_netns;

/// How long [`Pod::exec`] lets a command run before giving up on it.
pub const EXEC_TIMEOUT: Duration = Duration::from_secs(60);

/// A workload's namespace. Cheap to clone; every clone refers to the same
/// namespace, which lives as long as the [`Bed`](crate::Bed) that made it.
#[derive(Debug, Clone)]
pub struct Pod {
    name: String,
    netns: String,
    ip: Ipv4Addr,
    ip6: Ipv6Addr,
    pub(crate) shared: Arc<Shared>,
}

impl Pod {
    pub(crate) fn new(
        name: String,
        netns: String,
        ip: Ipv4Addr,
        ip6: Ipv6Addr,
        shared: Arc<Shared>,
    ) -> Pod {
        Pod {
            name,
            netns,
            ip,
            ip6,
            shared,
        }
    }

    /// The name given to [`Bed::pod`](crate::Bed::pod).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace's name, as `ip netns` shows it.
    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// The IPv4 address of `eth0`.
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// The IPv6 address of `eth0`.
    pub fn ip6(&self) -> Ipv6Addr {
        self.ip6
    }

    /// A command that will run inside this pod. See [`PodCommand`].
    pub fn command(&self, program: impl AsRef<OsStr>) -> PodCommand {
        PodCommand::new(self, program.as_ref())
    }

    /// Starts `argv` (program first) in this pod, as root, with stdout and
    /// stderr collected. The process is killed when the handle drops.
    pub fn spawn<I, S>(&self, argv: I) -> Result<Process>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.argv_command(argv)?.spawn()
    }

    /// Runs `argv` (program first) in this pod to completion and returns its
    /// stdout. Fails, with its stderr, if it exits unsuccessfully or runs
    /// longer than [`EXEC_TIMEOUT`].
    pub fn exec<I, S>(&self, argv: I) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut process = self.spawn(argv)?;
        let status = process.wait_timeout(EXEC_TIMEOUT)?;
        if status.success() {
            Ok(process.stdout())
        } else {
            Err(Error::CommandFailed {
                command: process.program().to_owned(),
                status: status.to_string(),
                stderr: process.stderr(),
            })
        }
    }

    fn argv_command<I, S>(&self, argv: I) -> Result<PodCommand>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut argv = argv.into_iter();
        let program = argv.next().ok_or_else(|| {
            Error::io(
                "running a command in a pod",
                std::io::Error::new(std::io::ErrorKind::InvalidInput, "empty argv"),
            )
        })?;
        Ok(self.command(program).args(argv))
    }

    /// Runs `f` on a fresh thread inside this pod's namespace and returns
    /// its value. Sockets made there belong to the pod for good, so a test
    /// can bind a `std::net::TcpListener` here, return it, and use it (or
    /// hand it to tokio) from any thread. A panic in `f` resumes in the
    /// caller.
    pub fn run_in<T, F>(&self, f: F) -> Result<T>
    where
        F: FnOnce() -> T + Send,
        T: Send,
    {
        in_netns(&self.netns, f)
    }

    /// Waits until a TCP connection from inside this pod to `addr`
    /// succeeds, e.g. until a server started in another pod is listening.
    pub fn wait_for_port(&self, addr: SocketAddr, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let last_error = self.run_in(|| loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let attempt = left.clamp(Duration::from_millis(10), Duration::from_millis(500));
            match TcpStream::connect_timeout(&addr, attempt) {
                Ok(_) => return None,
                Err(e) if Instant::now() >= deadline => return Some(e),
                // A refused connection returns at once; do not spin.
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        })?;
        match last_error {
            None => Ok(()),
            Some(e) => Err(Error::Timeout {
                what: format!("{addr} to accept connections from pod {} ({e})", self.name),
                after: timeout,
            }),
        }
    }

    /// Starts capturing this pod's `eth0` traffic, once tcpdump is ready.
    pub fn capture(&self) -> Result<Capture> {
        self.capture_on("eth0")
    }

    /// Starts capturing on any interface of this pod, such as `lo`, where
    /// a sidecar talks to its app in plaintext.
    pub fn capture_on(&self, interface: &str) -> Result<Capture> {
        Capture::start(self, interface)
    }
}

/// Waits until a TCP connection from inside `pod` to `addr` succeeds. Same
/// as [`Pod::wait_for_port`].
pub fn wait_for_port(pod: &Pod, addr: SocketAddr, timeout: Duration) -> Result<()> {
    pod.wait_for_port(addr, timeout)
}
