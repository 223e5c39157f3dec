//! Errors of `legate init`.
//!
//! Each message is written for the operator reading a failed init container
//! or CI log: it says what went wrong and what to change, install or run.

use std::net::SocketAddr;

use crate::plan::Family;

/// Everything that can stop `legate init`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InitError {
    /// The process may not change netfilter rules.
    #[error(
        "{what} needs root or CAP_NET_ADMIN: run `legate init` as root, or in Kubernetes give \
         the init container `securityContext.capabilities.add: [\"NET_ADMIN\", \"NET_RAW\"]`"
    )]
    NotPermitted {
        /// What was being attempted.
        what: String,
    },

    /// An iptables program is not installed.
    #[error(
        "`{binary}` is not installed (looked in PATH, /usr/sbin and /sbin): install the Debian \
         package `iptables` (`apt-get install iptables`), which ships both the nft and the \
         legacy variants"
    )]
    MissingBinary {
        /// The program looked for.
        binary: String,
    },

    /// Neither backend can be used in this namespace.
    #[error("no iptables backend works here: {details}")]
    NoBackend {
        /// Why each backend was ruled out.
        details: String,
    },

    /// legate's chains exist in both backends, so the choice is ambiguous and
    /// traffic may already be intercepted twice.
    #[error(
        "legate's chains exist in both the nft and the legacy backend; remove the stale copy with \
         `legate init --cleanup --backend legacy` (or `--backend nft`), then run `legate init` again"
    )]
    BothBackends,

    /// A configuration value the rules cannot be built from. Checked before
    /// any change is made.
    #[error("{field}: {problem}")]
    InvalidConfig {
        /// The configuration key, such as `init.exclude_outbound_cidrs`.
        field: String,
        /// What is wrong and how to write it instead.
        problem: String,
    },

    /// `--ipv6 on` was asked for where IPv6 is not available.
    #[error(
        "IPv6 rules were requested (init.ipv6 = \"on\") but this network namespace has no IPv6 \
         ({reason}); use --ipv6 auto or --ipv6 off"
    )]
    Ipv6Unavailable {
        /// What the probe found.
        reason: String,
    },

    /// The kernel refused the rules because a netfilter module is missing.
    #[error(
        "the kernel refused the {family} rules ({backend}): it lacks {}; load {} on the node \
         (`modprobe {}`) or use a kernel that has {}. iptables said: {detail}",
        modules.join(", "),
        if modules.len() == 1 { "it" } else { "them" },
        modules.join(" "),
        if modules.len() == 1 { "it" } else { "them" },
    )]
    KernelMissing {
        /// The address family whose rules failed.
        family: Family,
        /// The backend in use, `nft` or `legacy`.
        backend: &'static str,
        /// Kernel modules that are needed and appear to be missing.
        modules: Vec<String>,
        /// The relevant part of iptables' error output.
        detail: String,
    },

    /// `iptables-restore` rejected the rules for another reason. Nothing was
    /// changed: the restore is one transaction.
    #[error(
        "`{binary}` failed, so nothing was changed{}: {stderr}{}",
        if *.rolled_back { " (the rules of the other address family were put back as they were)" } else { "" },
        match rule { Some(r) => format!("\n  the rule was: {r}"), None => String::new() },
    )]
    RestoreFailed {
        /// The program that failed.
        binary: String,
        /// What it printed.
        stderr: String,
        /// The input line it complained about, when it named one.
        rule: Option<String>,
        /// Whether an already applied family was rolled back.
        rolled_back: bool,
    },

    /// Installing one family failed after the other had been applied, and
    /// putting the other back failed too. The namespace needs attention.
    #[error(
        "applying the {failed} rules failed ({cause}), and restoring the {other} rules as they \
         were failed as well ({rollback}); run `legate init --cleanup` and then `legate init` again"
    )]
    RollbackFailed {
        /// The family whose apply failed.
        failed: Family,
        /// The family that could not be put back.
        other: Family,
        /// Why the apply failed.
        cause: Box<InitError>,
        /// Why the rollback failed.
        rollback: Box<InitError>,
    },

    /// Reading the current rules failed.
    #[error("`{binary}` failed: {stderr}")]
    SaveFailed {
        /// The program that failed.
        binary: String,
        /// What it printed.
        stderr: String,
    },

    /// A rule legate did not install refers to one of legate's chains, so the
    /// chain cannot be replaced or removed without touching someone else's rule.
    #[error(
        "a rule that legate did not install jumps to legate's chain {chain}: `{rule}`; remove \
         that rule (it belongs to whoever added it), then run legate init again"
    )]
    ForeignReference {
        /// legate's chain.
        chain: String,
        /// The foreign rule, as iptables-save prints it.
        rule: String,
    },

    /// The named network namespace could not be entered.
    #[error(
        "cannot enter network namespace {name}: {source} (a name refers to /run/netns/NAME as made \
         by `ip netns add NAME`; a path such as /proc/PID/ns/net works too)"
    )]
    Netns {
        /// The name or path given.
        name: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// The runtime validation found that capture does not work.
    #[error("validation failed for {target}: {problem}")]
    Validation {
        /// The destination the validator connected to.
        target: SocketAddr,
        /// What went wrong, and what to check.
        problem: String,
    },

    /// An operating-system call failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

impl InitError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        InitError::Io {
            context: context.into(),
            source,
        }
    }

    pub(crate) fn config(field: &str, problem: impl Into<String>) -> Self {
        InitError::InvalidConfig {
            field: field.to_owned(),
            problem: problem.into(),
        }
    }
}
