//! Real processes inside a pod: a command builder that enters the pod's
//! namespace between `fork` and `exec`, and a handle that collects output and
//! kills the process when dropped.

use std::ffi::OsStr;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use nix::sched::CloneFlags;
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::{setgid, setgroups, setuid, Gid, Pid, Uid};

use crate::bed::Shared;
use crate::error::{Error, Result};
use crate::pod::Pod;
use crate::sys::{lock, open_netns};

/// How long to wait for the output pipes to close once a process exited.
/// Something it started in the background may hold them open for ever.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// A command that will run inside a pod, optionally as another user.
///
/// Like [`std::process::Command`], but by value: each method takes and
/// returns the builder. Change users with [`uid`](Self::uid) and
/// [`gid`](Self::gid) here, never with `CommandExt::uid` on the std command:
/// std drops privileges before the namespace is entered, which then fails.
#[derive(Debug)]
pub struct PodCommand {
    command: Command,
    program: String,
    netns: String,
    shared: Arc<Shared>,
    uid: Option<u32>,
    gid: Option<u32>,
    stdout_set: bool,
    stderr_set: bool,
}

impl PodCommand {
    pub(crate) fn new(pod: &Pod, program: &OsStr) -> PodCommand {
        let mut command = Command::new(program);
        command.stdin(Stdio::null());
        PodCommand {
            command,
            program: program.to_string_lossy().into_owned(),
            netns: pod.netns().to_owned(),
            shared: pod.shared.clone(),
            uid: None,
            gid: None,
            stdout_set: false,
            stderr_set: false,
        }
    }

    /// Adds an argument.
    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.command.arg(arg);
        self
    }

    /// Adds arguments.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.command.args(args);
        self
    }

    /// Sets an environment variable.
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.command.env(key, value);
        self
    }

    /// Sets environment variables.
    pub fn envs<I, K, V>(mut self, vars: I) -> Self
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<OsStr>,
        V: AsRef<OsStr>,
    {
        self.command.envs(vars);
        self
    }

    /// Removes an environment variable.
    pub fn env_remove(mut self, key: impl AsRef<OsStr>) -> Self {
        self.command.env_remove(key);
        self
    }

    /// Sets the working directory. Worth setting with [`uid`](Self::uid):
    /// the test's own directory may not be readable by that user.
    pub fn current_dir(mut self, dir: impl AsRef<Path>) -> Self {
        self.command.current_dir(dir);
        self
    }

    /// Sets stdin (default: null).
    pub fn stdin(mut self, cfg: impl Into<Stdio>) -> Self {
        self.command.stdin(cfg);
        self
    }

    /// Sets stdout (default: collected by [`Process`]).
    pub fn stdout(mut self, cfg: impl Into<Stdio>) -> Self {
        self.command.stdout(cfg);
        self.stdout_set = true;
        self
    }

    /// Sets stderr (default: collected by [`Process`]).
    pub fn stderr(mut self, cfg: impl Into<Stdio>) -> Self {
        self.command.stderr(cfg);
        self.stderr_set = true;
        self
    }

    /// Runs the process as this user id. Supplementary groups are dropped;
    /// the group stays root unless [`gid`](Self::gid) is set too.
    pub fn uid(mut self, uid: u32) -> Self {
        self.uid = Some(uid);
        self
    }

    /// Runs the process with this group id (and no supplementary groups).
    pub fn gid(mut self, gid: u32) -> Self {
        self.gid = Some(gid);
        self
    }

    /// Turns this into a plain std command that enters the pod when spawned,
    /// e.g. for `tokio::process::Command::from`. Processes started this way
    /// are not tracked by a handle, but the bed still kills them at teardown
    /// because they run in its namespace.
    #[allow(unsafe_code)]
    pub fn into_std(self) -> Result<Command> {
        let PodCommand {
            mut command,
            netns,
            uid,
            gid,
            ..
        } = self;
        let netns_fd = open_netns(&netns)?;
        let uid = uid.map(Uid::from_raw);
        let gid = gid.map(Gid::from_raw);
        // Its own process group, so that killing the group on drop also
        // reaches whatever it starts, and Ctrl-C in the terminal reaches only
        // the test process, whose handler then cleans up in order.
        command.process_group(0);
        // SAFETY: the closure runs in the child between fork and exec, where
        // only async-signal-safe calls are allowed. It makes only direct
        // system calls through nix's thin wrappers (setns, setgroups with an
        // empty list, setgid, setuid): no allocation, no locks. Errors are
        // built from errno without allocating. The namespace fd is owned by
        // the closure, so it stays open until the command is dropped; it is
        // close-on-exec, so the program never sees it.
        unsafe {
            command.pre_exec(move || {
                // The namespace first: entering it needs the privileges that
                // the next steps give up.
                nix::sched::setns(&netns_fd, CloneFlags::CLONE_NEWNET)?;
                if uid.is_some() || gid.is_some() {
                    setgroups(&[])?;
                }
                if let Some(gid) = gid {
                    setgid(gid)?;
                }
                if let Some(uid) = uid {
                    setuid(uid)?;
                }
                Ok(())
            });
        }
        Ok(command)
    }

    /// Starts the process. Its stdout and stderr are collected unless set
    /// otherwise; it is killed, with its process group, when the handle is
    /// dropped or the bed is torn down.
    pub fn spawn(self) -> Result<Process> {
        let program = self.program.clone();
        let shared = self.shared.clone();
        let (stdout_set, stderr_set) = (self.stdout_set, self.stderr_set);
        let mut command = self.into_std()?;
        if !stdout_set {
            command.stdout(Stdio::piped());
        }
        if !stderr_set {
            command.stderr(Stdio::piped());
        }
        // Spawning and tracking happen under the lock that teardown takes to
        // kill tracked processes, so none can slip between the two.
        let mut children = lock(&shared.children);
        let mut child = command
            .spawn()
            .map_err(|e| Error::io(format!("starting `{program}` in a pod"), e))?;
        let pid = i32::try_from(child.id()).map_err(|_| {
            Error::io(
                "reading a child's pid",
                std::io::Error::from(std::io::ErrorKind::InvalidData),
            )
        })?;
        children.insert(pid);
        drop(children);
        let output = Arc::new(Output::default());
        if let Some(stdout) = child.stdout.take() {
            output.collect(stdout, false);
        } else {
            output.close(false);
        }
        if let Some(stderr) = child.stderr.take() {
            output.collect(stderr, true);
        } else {
            output.close(true);
        }
        Ok(Process {
            child,
            pid,
            program,
            output,
            shared,
            status: None,
        })
    }

    /// Runs the process to completion, without a time limit, and returns its
    /// status and output. Failure of the program is not an error here.
    pub fn output(self) -> Result<std::process::Output> {
        let mut process = self.spawn()?;
        let status = process.wait()?;
        Ok(std::process::Output {
            status,
            stdout: process.stdout_bytes(),
            stderr: process.stderr_bytes(),
        })
    }
}

/// Output collected from a process's pipes by two reader threads.
#[derive(Debug, Default)]
struct Output {
    state: Mutex<OutputState>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct OutputState {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    stdout_closed: bool,
    stderr_closed: bool,
}

impl Output {
    fn collect(self: &Arc<Self>, mut pipe: impl Read + Send + 'static, is_stderr: bool) {
        let output = Arc::clone(self);
        let spawned = std::thread::Builder::new()
            .name("pod output".into())
            .spawn(move || {
                let mut buf = [0u8; 8192];
                while let Ok(n @ 1..) = pipe.read(&mut buf) {
                    let mut state = lock(&output.state);
                    if is_stderr {
                        state.stderr.extend_from_slice(&buf[..n]);
                    } else {
                        state.stdout.extend_from_slice(&buf[..n]);
                    }
                    output.changed.notify_all();
                }
                output.close(is_stderr);
            });
        if spawned.is_err() {
            self.close(is_stderr);
        }
    }

    fn close(&self, is_stderr: bool) {
        let mut state = lock(&self.state);
        if is_stderr {
            state.stderr_closed = true;
        } else {
            state.stdout_closed = true;
        }
        self.changed.notify_all();
    }

    /// Waits until `done` holds, or the time is up. Returns whether it held.
    fn wait_until(&self, deadline: Instant, done: impl Fn(&OutputState) -> bool) -> bool {
        let mut state = lock(&self.state);
        loop {
            if done(&state) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            state = self
                .changed
                .wait_timeout(state, left)
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .0;
        }
    }
}

/// A process running in a pod. Dropping it kills the process and its process
/// group (SIGKILL) and reaps it.
#[derive(Debug)]
pub struct Process {
    child: Child,
    pid: i32,
    program: String,
    output: Arc<Output>,
    shared: Arc<Shared>,
    status: Option<ExitStatus>,
}

impl Process {
    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The program that was started.
    pub fn program(&self) -> &str {
        &self.program
    }

    /// The stdin pipe, if stdin was set to `Stdio::piped()`.
    pub fn take_stdin(&mut self) -> Option<ChildStdin> {
        self.child.stdin.take()
    }

    /// Everything printed on stdout so far.
    pub fn stdout_bytes(&self) -> Vec<u8> {
        lock(&self.output.state).stdout.clone()
    }

    /// Everything printed on stderr so far.
    pub fn stderr_bytes(&self) -> Vec<u8> {
        lock(&self.output.state).stderr.clone()
    }

    /// Stdout so far, as text.
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout_bytes()).into_owned()
    }

    /// Stderr so far, as text.
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr_bytes()).into_owned()
    }

    /// Waits until `needle` appears on stdout or stderr: "listening on",
    /// "ready", a banner. Fails early if the process closes both without
    /// printing it.
    pub fn wait_for_output(&mut self, needle: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let needle = needle.as_bytes();
        let found = |s: &OutputState| contains(&s.stdout, needle) || contains(&s.stderr, needle);
        self.output.wait_until(deadline, |s| {
            found(s) || (s.stdout_closed && s.stderr_closed)
        });
        if found(&lock(&self.output.state)) {
            return Ok(());
        }
        let what = format!("printing {:?}", String::from_utf8_lossy(needle));
        let ended = self.wait_timeout(Duration::from_millis(200)).ok();
        match ended {
            Some(status) => Err(Error::Ended {
                program: self.program.clone(),
                what,
                status: status.to_string(),
                output: self.combined_output(),
            }),
            None => Err(Error::Timeout {
                what: format!(
                    "`{}` {what}; it printed:\n{}",
                    self.program,
                    self.combined_output()
                ),
                after: timeout,
            }),
        }
    }

    fn combined_output(&self) -> String {
        let state = lock(&self.output.state);
        format!(
            "{}{}",
            String::from_utf8_lossy(&state.stdout),
            String::from_utf8_lossy(&state.stderr)
        )
    }

    /// Returns the exit status if the process has ended, without blocking.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        if let Some(status) = self.status {
            return Ok(Some(status));
        }
        // Reaped under the tracking lock: once reaped, the pid may be reused
        // by an unrelated process, so it must leave the set at the same time.
        let mut children = lock(&self.shared.children);
        let status = self
            .child
            .try_wait()
            .map_err(|e| Error::io(format!("waiting for `{}`", self.program), e))?;
        if status.is_some() {
            children.remove(&self.pid);
            self.status = status;
        }
        Ok(status)
    }

    /// Waits for the process to end, and for its output to be read in full.
    pub fn wait(&mut self) -> Result<ExitStatus> {
        self.wait_deadline(None)
    }

    /// Like [`wait`](Self::wait), but gives up after `timeout`, leaving the
    /// process running.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<ExitStatus> {
        self.wait_deadline(Some((Instant::now() + timeout, timeout)))
    }

    fn wait_deadline(&mut self, deadline: Option<(Instant, Duration)>) -> Result<ExitStatus> {
        // Polling rather than a blocking wait: reaping must happen under the
        // tracking lock (see try_wait), which must not be held for long.
        let status = loop {
            if let Some(status) = self.try_wait()? {
                break status;
            }
            if let Some((deadline, timeout)) = deadline {
                if Instant::now() >= deadline {
                    return Err(Error::Timeout {
                        what: format!("`{}` to exit", self.program),
                        after: timeout,
                    });
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        self.output.wait_until(Instant::now() + DRAIN_TIMEOUT, |s| {
            s.stdout_closed && s.stderr_closed
        });
        Ok(status)
    }

    /// Sends a signal to the process (not its group), e.g. SIGINT to let it
    /// shut down cleanly. Does nothing once it has been reaped.
    pub fn signal(&mut self, signal: Signal) -> Result<()> {
        if self.try_wait()?.is_some() {
            return Ok(());
        }
        kill(Pid::from_raw(self.pid), signal)
            .map_err(|e| Error::errno(format!("signalling `{}`", self.program), e))
    }

    /// Kills the process and its group with SIGKILL and reaps it.
    pub fn kill(&mut self) -> Result<ExitStatus> {
        if self.try_wait()?.is_none() {
            let _ = killpg(Pid::from_raw(self.pid), Signal::SIGKILL);
            let _ = kill(Pid::from_raw(self.pid), Signal::SIGKILL);
        }
        self.wait()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.status.is_some() {
            return;
        }
        let mut children = lock(&self.shared.children);
        let _ = killpg(Pid::from_raw(self.pid), Signal::SIGKILL);
        let _ = kill(Pid::from_raw(self.pid), Signal::SIGKILL);
        // Quick after SIGKILL, so holding the lock for it is fine.
        let _ = self.child.wait();
        children.remove(&self.pid);
    }
}

pub(crate) fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}
