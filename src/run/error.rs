//! Errors of `legate run`, and the exit status each one becomes.
//!
//! Every message says what to do next. A command line that cannot be
//! understood exits with 2, as everywhere in `legate`; other failures of
//! `legate run` itself exit with 125, a command that cannot be executed with 126 and one that
//! is not found with 127, as `env`, `timeout` and container runtimes do, so
//! that a script can tell them from the wrapped command's own statuses.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use legate_ca::CaError;
use legate_init::InitError;

/// Exit status of a command line that cannot be understood, as for every
/// other `legate` subcommand.
pub const EXIT_USAGE: u8 = 2;
/// Exit status when `legate run` fails before or around the command.
pub const EXIT_RUN_FAILED: u8 = 125;
/// Exit status when the command exists but cannot be executed.
pub const EXIT_NOT_EXECUTABLE: u8 = 126;
/// Exit status when the command is not found.
pub const EXIT_NOT_FOUND: u8 = 127;

/// Everything that can stop `legate run`.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Nothing after `--`.
    #[error(
        "no command to run: put it after `--`, for example `legate run -- curl http://10.0.0.7/`"
    )]
    NoCommand,

    /// The command was given without `--` before it.
    #[error(
        "put the command after `--`, so that its flags are not taken for legate run's: \
         `legate run [OPTIONS] -- {command}`"
    )]
    MissingDashDash {
        /// The command as given.
        command: String,
    },

    /// Not running as root.
    #[error(
        "legate run needs root: it installs iptables rules (CAP_NET_ADMIN) and starts the proxy \
         as uid {proxy_uid} (CAP_SETUID, CAP_SETGID); run it with sudo, and pick the command's \
         user with --uid and --gid, for example `sudo legate run --uid $(id -u) --gid $(id -g) -- CMD`"
    )]
    NotRoot {
        /// `proxy.uid`.
        proxy_uid: u32,
    },

    /// A setting that cannot work; `field` is the configuration key or flag.
    #[error("{field}: {problem}")]
    Config {
        /// The key or flag to change.
        field: String,
        /// What is wrong and what to write instead.
        problem: String,
    },

    /// Another `legate run` holds this network namespace.
    #[error(
        "another `legate run` is active in this network namespace{}; it owns the proxy ports and \
         legate's iptables chains, so only one process tree per host can be wrapped at a time. \
         Wait for it to end, or wrap several programs in one run (`legate run -- sh -c '...'`)",
        match holder { Some(pid) => format!(" (pid {pid})"), None => String::new() }
    )]
    Busy {
        /// The pid of the `legate run` holding the lock, when it could be read.
        holder: Option<i32>,
    },

    /// Rules of an earlier `legate run` that could not remove them.
    #[error(
        "legate's iptables chains from an earlier `legate run` are still installed ({engine} \
         backend): that run was killed before it could remove them (SIGKILL, or a crash of legate \
         itself), so its traffic capture outlived it. Remove them with `legate run --cleanup` (or \
         `legate init --cleanup`), then start again"
    )]
    StaleRules {
        /// The iptables backend that holds them.
        engine: String,
    },

    /// A pod's `legate init` rules are installed here.
    #[error(
        "this network namespace already has `legate init` interception rules ({engine} backend), \
         which capture every process here, as in a pod with a sidecar; `legate run` would share \
         their chains. Inside a meshed pod, run the command as it is; if the rules are stale, \
         remove them with `legate init --cleanup` first"
    )]
    PodRules {
        /// The iptables backend that holds them.
        engine: String,
    },

    /// Installing, reading or removing the rules failed.
    #[error(transparent)]
    Init(#[from] InitError),

    /// The embedded CA could not be created or started.
    #[error("the throwaway CA for this run failed: {0}")]
    Ca(#[from] CaError),

    /// The proxy could not be started.
    #[error("cannot start the proxy ({program} proxy): {source}")]
    ProxySpawn {
        /// The program run, `/proc/self/exe`.
        program: String,
        #[source]
        source: io::Error,
    },

    /// The proxy exited during start-up.
    #[error(
        "the proxy exited before it was ready ({status}); its log is above. A port in use \
         (proxy.outbound_port, proxy.inbound_port, proxy.admin_listen) is the usual cause"
    )]
    ProxyExited {
        /// How it ended.
        status: String,
    },

    /// The proxy did not report ready in time.
    #[error(
        "the proxy was not ready within {timeout:?} (asked {admin}/ready); its log is above. \
         Is the CA reachable, and is the token valid and meant for this identity? A slow CA \
         may need a longer --ready-timeout"
    )]
    ProxyNotReady {
        /// `--ready-timeout`.
        timeout: Duration,
        /// The admin address asked.
        admin: SocketAddr,
    },

    /// The command could not be started.
    #[error("cannot run `{program}`: {source}{}", hint(source))]
    CommandSpawn {
        /// The command's program.
        program: String,
        #[source]
        source: io::Error,
    },

    /// A signal arrived before the command started.
    #[error("interrupted by signal {signal} before the command started; nothing is left behind")]
    Interrupted {
        /// The signal number.
        signal: i32,
    },

    /// The command ran, but what the run set up could not all be removed.
    #[error(
        "the command ended ({ended}), but removing what legate run set up failed: {source}; \
         run `legate run --cleanup`"
    )]
    Cleanup {
        /// How the command ended.
        ended: String,
        /// The first step that failed.
        source: Box<RunError>,
    },

    /// An operating-system call failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        #[source]
        source: io::Error,
    },

    /// A file handed to the proxy could not be read.
    #[error("cannot read {flag} {}: {source}", path.display())]
    Input {
        /// The flag or key that named it.
        flag: &'static str,
        /// The file.
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn hint(e: &io::Error) -> &'static str {
    match e.kind() {
        io::ErrorKind::NotFound => "; check the name and PATH",
        io::ErrorKind::PermissionDenied => {
            "; check that the command's user (--uid) may execute it and read its directory"
        }
        _ => "",
    }
}

impl RunError {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        RunError::Io {
            context: context.into(),
            source,
        }
    }

    pub(crate) fn config(field: &str, problem: impl Into<String>) -> Self {
        RunError::Config {
            field: field.to_owned(),
            problem: problem.into(),
        }
    }

    /// The exit status `legate run` ends with for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            RunError::CommandSpawn { source, .. } => match source.kind() {
                io::ErrorKind::NotFound => EXIT_NOT_FOUND,
                _ => EXIT_NOT_EXECUTABLE,
            },
            RunError::Interrupted { signal } => signal_status(*signal),
            RunError::NoCommand | RunError::MissingDashDash { .. } => EXIT_USAGE,
            _ => EXIT_RUN_FAILED,
        }
    }
}

/// 128 + the signal number, as shells report a process killed by it.
pub fn signal_status(signal: i32) -> u8 {
    u8::try_from(128 + signal.clamp(0, 127)).unwrap_or(u8::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_follow_the_shell_conventions() {
        let spawn = |kind| RunError::CommandSpawn {
            program: "x".into(),
            source: io::Error::from(kind),
        };
        assert_eq!(spawn(io::ErrorKind::NotFound).exit_code(), 127);
        assert_eq!(spawn(io::ErrorKind::PermissionDenied).exit_code(), 126);
        assert_eq!(RunError::Interrupted { signal: 2 }.exit_code(), 130);
        assert_eq!(RunError::NoCommand.exit_code(), 2);
        assert_eq!(
            RunError::NotRoot { proxy_uid: 1337 }.exit_code(),
            EXIT_RUN_FAILED
        );
        assert_eq!(signal_status(9), 137);
    }

    #[test]
    fn messages_name_the_fix() {
        assert!(RunError::NoCommand.to_string().contains("after `--`"));
        let stale = RunError::StaleRules {
            engine: "nft".into(),
        }
        .to_string();
        assert!(stale.contains("legate run --cleanup"), "{stale}");
        assert!(RunError::NotRoot { proxy_uid: 1337 }
            .to_string()
            .contains("sudo"));
    }
}
