//! The two children of `legate run`, the proxy and the command: who they
//! run as, what happens to them when `legate run` dies, and how signals
//! reach the command.
//!
//! Both are started from the main thread, which lives as long as the run:
//! the kernel's parent-death signal is tied to the thread that forked the
//! child, not to the process.
//!
//! **Credentials.** Between `fork` and `exec` each child sets its own
//! supplementary groups, gid and uid, in that order (after `setuid` it could
//! no longer change groups). `std`'s `CommandExt::uid` is not used because it
//! clears the supplementary groups, and the command's capture group is one.
//!
//! **Parent death.** Each child asks for SIGTERM when `legate run` dies
//! (`PR_SET_PDEATHSIG`), so that a `legate run` killed with SIGKILL takes
//! the proxy and the command with it instead of leaving the command running
//! with its connections redirected to a port where nothing listens. It is
//! set after the uid changes, since changing credentials clears it, and the
//! parent is checked afterwards in case it died in between.
//!
//! **Signals.** SIGINT, SIGTERM and SIGHUP sent to `legate run` are passed
//! on to the command, which decides what they mean; `legate run` itself
//! only ends when the command does. A signal the kernel generated for the
//! terminal (Ctrl-C, hang-up) is not passed on: the terminal already sent
//! it to the whole foreground process group, the command included, and
//! sending it again would deliver it twice. The command stays in
//! `legate run`'s process group so it can use the terminal; the proxy gets
//! a group of its own so that Ctrl-C does not stop it under the command.
//!
//! **Reaping.** The main thread waits with `waitid(WNOWAIT)`, marks the
//! command as gone while holding the lock the signal thread takes, and only
//! then reaps it, so a forwarded signal can never reach a recycled pid.

use std::ffi::OsString;
use std::io;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitid, Id, WaitPidFlag};
use nix::unistd::{getpid, getppid, setgid, setgroups, setuid, Gid, Pid, Uid};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::exfiltrator::WithOrigin;
use signal_hook::iterator::SignalsInfo;
use signal_hook::low_level::siginfo::Cause;

use super::error::{signal_status, RunError};

/// The signals passed on to the command.
pub const FORWARDED: [i32; 3] = [SIGINT, SIGTERM, SIGHUP];

/// Who a child runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub uid: Uid,
    pub gid: Gid,
    /// Supplementary groups, set exactly.
    pub groups: Vec<Gid>,
}

/// Makes `cmd` switch to `who` and ask for SIGTERM on its parent's death,
/// between `fork` and `exec`.
#[allow(unsafe_code)]
fn become_child_of_run(cmd: &mut Command, who: Credentials) {
    let parent = getpid();
    // SAFETY: the closure runs in the forked child before exec, where only
    // async-signal-safe operations are allowed. It performs direct system
    // calls through nix's thin wrappers (setgroups with a slice allocated
    // before the fork, setgid, setuid, prctl, getppid) and builds errors
    // from errno values; it allocates nothing and takes no lock.
    unsafe {
        cmd.pre_exec(move || {
            setgroups(&who.groups)?;
            setgid(who.gid)?;
            setuid(who.uid)?;
            nix::sys::prctl::set_pdeathsig(Signal::SIGTERM)?;
            if getppid() != parent {
                // `legate run` died before the request took effect.
                return Err(io::Error::from_raw_os_error(nix::libc::ESRCH));
            }
            Ok(())
        });
    }
}

/// Starts `legate proxy` from this very binary, as `who`, with the given
/// configuration file and none of the caller's `LEGATE_*` variables (the
/// file already holds what they said). Its stdout goes to stderr so the
/// command's stdout stays its own.
pub fn spawn_proxy(config_file: &Path, who: Credentials) -> Result<Child, RunError> {
    let program = "/proc/self/exe";
    let mut cmd = Command::new(program);
    // Shown by ps as `legate proxy ...` rather than the /proc path.
    cmd.arg0("legate")
        .arg("proxy")
        .arg("--config")
        .arg(config_file)
        .current_dir("/")
        .stdin(Stdio::null())
        .process_group(0);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with(legate_config::ENV_PREFIX) {
            cmd.env_remove(k);
        }
    }
    cmd.stdout(stderr_or_null());
    become_child_of_run(&mut cmd, who);
    cmd.spawn().map_err(|source| RunError::ProxySpawn {
        program: program.into(),
        source,
    })
}

/// A duplicate of stderr, or nothing when it cannot be duplicated.
fn stderr_or_null() -> Stdio {
    use std::os::fd::AsFd;
    io::stderr()
        .as_fd()
        .try_clone_to_owned()
        .map_or_else(|_| Stdio::null(), Stdio::from)
}

/// What the signal thread knows about the command.
#[derive(Debug)]
enum State {
    /// Not started yet; the first forwarded signal that arrived, if any.
    Starting(Option<i32>),
    Running(Pid),
    /// Exited, or never to start: signals are ignored from now on.
    Done,
}

/// Receives SIGINT, SIGTERM and SIGHUP from the moment it is created, and
/// passes them on to the command once it runs.
pub struct Signals {
    state: Arc<Mutex<State>>,
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

impl Signals {
    /// Installs the handlers and starts the thread that forwards.
    pub fn start() -> Result<Signals, RunError> {
        let mut signals = SignalsInfo::<WithOrigin>::new(FORWARDED)
            .map_err(|e| RunError::io("installing signal handlers", e))?;
        let state = Arc::new(Mutex::new(State::Starting(None)));
        let shared = state.clone();
        std::thread::Builder::new()
            .name("legate-run-signals".into())
            .spawn(move || {
                for origin in signals.forever() {
                    let mut state = lock(&shared);
                    match &mut *state {
                        State::Starting(first) => {
                            first.get_or_insert(origin.signal);
                        }
                        State::Running(pid) => {
                            if origin.cause == Cause::Kernel {
                                // From the terminal, which signalled the
                                // whole foreground group already.
                                continue;
                            }
                            if let Ok(sig) = Signal::try_from(origin.signal) {
                                let _ = kill(*pid, sig);
                            }
                        }
                        State::Done => {}
                    }
                }
            })
            .map_err(|e| RunError::io("starting the signal thread", e))?;
        Ok(Signals { state })
    }

    /// The signal that arrived before the command started, if any.
    pub fn interrupted(&self) -> Option<i32> {
        match &*lock(&self.state) {
            State::Starting(sig) => *sig,
            _ => None,
        }
    }

    /// Starts the command as `who`, unless a signal already asked the run
    /// to stop. From here on, signals are forwarded to it.
    pub fn spawn_command(&self, argv: &[OsString], who: Credentials) -> Result<Running, RunError> {
        let (program, args) = argv.split_first().ok_or(RunError::NoCommand)?;
        let mut cmd = Command::new(program);
        cmd.args(args);
        become_child_of_run(&mut cmd, who);
        let mut state = lock(&self.state);
        if let State::Starting(Some(signal)) = *state {
            *state = State::Done;
            return Err(RunError::Interrupted { signal });
        }
        let child = cmd.spawn().map_err(|source| {
            *state = State::Done;
            RunError::CommandSpawn {
                program: program.to_string_lossy().into_owned(),
                source,
            }
        })?;
        let pid = Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX));
        *state = State::Running(pid);
        Ok(Running {
            child,
            pid,
            state: self.state.clone(),
        })
    }
}

/// The running command.
pub struct Running {
    child: Child,
    pid: Pid,
    state: Arc<Mutex<State>>,
}

/// Which child ended first.
pub enum Ended {
    Command(ExitStatus),
    /// The proxy died under the command; it is reaped already.
    Proxy(ExitStatus),
}

impl Running {
    /// Waits until the command or the proxy ends. The command is reaped
    /// only after the signal thread has been told, see the module docs.
    pub fn wait(&mut self, proxy: &mut Option<Child>) -> Result<Ended, RunError> {
        loop {
            let who = match waitid(Id::All, WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT) {
                Ok(status) => status.pid(),
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(RunError::io("waiting for the command", e.into())),
            };
            if who == Some(self.pid) {
                *lock(&self.state) = State::Done;
                let status = self
                    .child
                    .wait()
                    .map_err(|e| RunError::io("reaping the command", e))?;
                return Ok(Ended::Command(status));
            }
            if let Some(p) = proxy.as_mut() {
                if who.map(|w| w.as_raw() as u32) == Some(p.id()) {
                    let status = p.wait().map_err(|e| RunError::io("reaping the proxy", e))?;
                    *proxy = None;
                    return Ok(Ended::Proxy(status));
                }
            }
            // A child we did not start (inherited across exec): reap it.
            if let Some(pid) = who {
                let _ = nix::sys::wait::waitpid(pid, None);
            }
        }
    }

    /// Sends `signal` to the command while it runs.
    pub fn signal(&self, signal: Signal) {
        if let State::Running(pid) = *lock(&self.state) {
            let _ = kill(pid, signal);
        }
    }
}

impl Drop for Running {
    /// Only reached with the command still running when waiting for it
    /// failed: it must not outlive the proxy and rules about to be removed.
    fn drop(&mut self) {
        let mut state = lock(&self.state);
        if let State::Running(pid) = *state {
            let _ = kill(pid, Signal::SIGKILL);
            let _ = self.child.wait();
            *state = State::Done;
        }
    }
}

/// The status `legate run` exits with for a child's: its exit code, or 128
/// plus the signal that killed it.
pub fn exit_code(status: ExitStatus) -> u8 {
    match (status.code(), status.signal()) {
        (Some(code), _) => u8::try_from(code).unwrap_or(u8::MAX),
        (None, Some(sig)) => signal_status(sig),
        (None, None) => super::error::EXIT_RUN_FAILED,
    }
}

/// Describes how a child ended, for messages.
pub fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(sig)) => match Signal::try_from(sig) {
            Ok(s) => format!("killed by {s}"),
            Err(_) => format!("killed by signal {sig}"),
        },
        _ => status.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_like_a_shell() {
        assert_eq!(exit_code(ExitStatus::from_raw(7 << 8)), 7);
        assert_eq!(exit_code(ExitStatus::from_raw(0)), 0);
        // Killed by SIGSEGV (11), with or without a core dump.
        assert_eq!(exit_code(ExitStatus::from_raw(11)), 139);
        assert_eq!(exit_code(ExitStatus::from_raw(11 | 0x80)), 139);
        assert_eq!(exit_code(ExitStatus::from_raw(9)), 137);
        assert_eq!(describe(ExitStatus::from_raw(9)), "killed by SIGKILL");
    }
}
