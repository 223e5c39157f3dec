//! The bed's contact with the system: finding tools, running `ip`, and
//! entering a namespace from a thread.
//!
//! Every `ip` call goes through [`ip_in`] (which always passes `-n NS`) or
//! [`ip_netns`] (the `ip netns` subcommands), so no call can configure the
//! host's own network namespace by accident.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, MutexGuard};

use nix::sched::CloneFlags;

use crate::error::{Error, Result};

/// A program the bed needs, and the Debian package that ships it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Tool {
    pub(crate) name: &'static str,
    pub(crate) package: &'static str,
}

pub(crate) const IP: Tool = Tool {
    name: "ip",
    package: "iproute2",
};

pub(crate) const TCPDUMP: Tool = Tool {
    name: "tcpdump",
    package: "tcpdump",
};

impl Tool {
    /// Finds the program. The sbin directories are searched too because a
    /// root shell reached through `sudo` or CI often lacks them in PATH.
    pub(crate) fn path(&self) -> Result<PathBuf> {
        let path = std::env::var_os("PATH").unwrap_or_default();
        std::env::split_paths(&path)
            .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
            .map(|dir| dir.join(self.name))
            .find(|candidate| is_executable(candidate))
            .ok_or(Error::MissingTool {
                tool: self.name,
                package: self.package,
            })
    }
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Runs a tool to completion and returns its stdout, or an error that carries
/// the command line and its stderr.
pub(crate) fn run(tool: Tool, args: &[&str]) -> Result<String> {
    let command_line = format!("{} {}", tool.name, args.join(" "));
    let output = Command::new(tool.path()?)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Error::io(format!("running `{command_line}`"), e))?;
    if output.status.success() {
        return Ok(String::from_utf8_lossy(&output.stdout).into_owned());
    }
    let mut stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
    if stderr.is_empty() {
        stderr = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    }
    Err(Error::CommandFailed {
        command: command_line,
        status: output.status.to_string(),
        stderr,
    })
}

/// `ip -n NS ARGS...`: configures something inside a bed namespace.
pub(crate) fn ip_in(netns: &str, args: &[&str]) -> Result<String> {
    let mut all = vec!["-n", netns];
    all.extend_from_slice(args);
    run(IP, &all)
}

/// `ip netns ARGS...`: creates, lists or removes namespaces.
pub(crate) fn ip_netns(args: &[&str]) -> Result<String> {
    let mut all = vec!["netns"];
    all.extend_from_slice(args);
    run(IP, &all)
}

/// Creates a named namespace.
///
/// The first `ip netns add` on a machine turns /run/netns into a shared
/// mount point; two processes doing that at the same moment can stack two
/// mounts. An exclusive lock on a file in /run makes the step one at a time
/// across every process using the bed (and costs a few milliseconds).
pub(crate) fn add_netns(netns: &str) -> Result<()> {
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open("/run/legate-testbed.lock")
        .map_err(|e| Error::io("opening /run/legate-testbed.lock", e))?;
    let _lock = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, errno)| Error::errno("locking /run/legate-testbed.lock", errno))?;
    ip_netns(&["add", netns]).map(drop)
}

/// Opens a named namespace, for `setns`.
pub(crate) fn open_netns(netns: &str) -> Result<OwnedFd> {
    let path = format!("/run/netns/{netns}");
    File::open(&path)
        .map(OwnedFd::from)
        .map_err(|e| Error::io(format!("opening {path} (was the bed torn down?)"), e))
}

/// Runs `f` on a new thread that has joined the namespace. Only that thread
/// moves; the rest of the process stays where it was. A panic in `f` is
/// passed on to the caller as is.
pub(crate) fn in_netns<T, F>(netns: &str, f: F) -> Result<T>
where
    F: FnOnce() -> T + Send,
    T: Send,
{
    let fd = open_netns(netns)?;
    std::thread::scope(|scope| {
        let joined = std::thread::Builder::new()
            .name(format!("netns {netns}"))
            .spawn_scoped(scope, move || {
                nix::sched::setns(&fd, CloneFlags::CLONE_NEWNET)
                    .map_err(|e| Error::errno(format!("entering namespace {netns}"), e))?;
                drop(fd);
                Ok(f())
            })
            .map_err(|e| Error::io("starting a thread", e))?
            .join();
        match joined {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// Locks a mutex even if a panicking thread poisoned it: cleanup must keep
/// working while a test is failing.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Whether a process is alive. A zombie counts as dead: it will never clean
/// up after itself.
pub(crate) fn pid_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state is the first field after the parenthesised command name,
        // which may itself contain spaces and parentheses.
        Ok(stat) => match stat.rsplit_once(')') {
            Some((_, rest)) => !matches!(rest.trim_start().chars().next(), Some('Z' | 'X')),
            None => true,
        },
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_tool_names_the_package() {
        let tool = Tool {
            name: "legate-no-such-tool",
            package: "some-package",
        };
        let err = tool.path().expect_err("tool cannot exist");
        assert!(err.to_string().contains("apt-get install some-package"));
    }

    #[test]
    fn own_process_is_alive() {
        assert!(pid_alive(std::process::id()));
        assert!(!pid_alive(u32::MAX));
    }
}
