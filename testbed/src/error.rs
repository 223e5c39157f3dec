//! Errors of the test bed. Each one says what to install, run or fix,
//! because the person reading it is usually looking at a failed CI run.

use std::time::Duration;

/// Result of every fallible test-bed call.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong while building, using or tearing down a bed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A command-line tool the bed shells out to is not installed.
    #[error("`{tool}` is not installed (looked in PATH, /usr/sbin and /sbin): install it with `apt-get install {package}`")]
    MissingTool {
        /// The program that was looked for.
        tool: &'static str,
        /// The Debian package that provides it.
        package: &'static str,
    },

    /// Namespaces can only be made and entered with privileges.
    #[error("the test bed must run as root: creating and entering network namespaces needs CAP_NET_ADMIN and CAP_SYS_ADMIN (run the tests as root, e.g. `sudo -E cargo test`)")]
    NotRoot,

    /// A tool ran but reported failure.
    #[error("`{command}` failed ({status}): {stderr}")]
    CommandFailed {
        /// The command line, for copying into a shell.
        command: String,
        /// How it ended.
        status: String,
        /// What it printed on stderr (and stdout if stderr was empty).
        stderr: String,
    },

    /// A process ended before it did what was being waited for.
    #[error("`{program}` ended ({status}) before {what}; it printed:\n{output}")]
    Ended {
        /// The program.
        program: String,
        /// What was expected of it.
        what: String,
        /// How it ended.
        status: String,
        /// Its stdout and stderr.
        output: String,
    },

    /// An operating-system call failed.
    #[error("{context}: {source}")]
    Io {
        /// What the bed was doing.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// Something did not happen in time.
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long the bed waited.
        after: Duration,
    },

    /// Pod names become part of namespace names, so they are restricted.
    #[error("invalid pod name {name:?}: {reason}")]
    InvalidPodName {
        /// The rejected name.
        name: String,
        /// Why it was rejected.
        reason: &'static str,
    },

    /// Every address in a bed's /24 is taken.
    #[error("bed {bed} is full: it holds at most {max} pods")]
    BedFull {
        /// The bed's prefix.
        bed: String,
        /// The limit.
        max: usize,
    },

    /// The bed was already torn down (dropped, closed, or a signal arrived).
    #[error("bed {bed} has been torn down; create a new Bed")]
    TornDown {
        /// The bed's prefix.
        bed: String,
    },

    /// A capture file could not be read as pcap.
    #[error("malformed capture file: {0}")]
    Pcap(String),
}

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    pub(crate) fn errno(context: impl Into<String>, errno: nix::errno::Errno) -> Self {
        Error::io(context, std::io::Error::from(errno))
    }
}
