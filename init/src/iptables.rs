//! Running the iptables programs: `*-save` to read a family's rules and
//! `*-restore --noflush` to change them in one transaction, and turning
//! their error output into an error that names the fix.
//!
//! The explicit per-backend programs (`iptables-nft-restore`,
//! `ip6tables-legacy-save`, ...) are called rather than the `iptables`
//! alternatives symlink, so the backend is legate's decision, not whatever
//! `update-alternatives` last pointed at.
//!
//! Every function here acts on the network namespace of the calling thread:
//! a child process starts in the namespace of the thread that spawns it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::error::InitError;
use crate::plan::Family;

/// An iptables backend that has been chosen: nf_tables or the legacy
/// x_tables interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Engine {
    Nft,
    Legacy,
}

impl Engine {
    /// Both engines, in the order of preference when nothing else decides.
    pub const ALL: [Engine; 2] = [Engine::Nft, Engine::Legacy];

    /// `nft` or `legacy`, as in the program names and `--backend`.
    pub fn name(self) -> &'static str {
        match self {
            Engine::Nft => "nft",
            Engine::Legacy => "legacy",
        }
    }

    /// `iptables-nft-save`, `ip6tables-legacy-restore`, ...
    pub fn program(self, family: Family, restore: bool) -> String {
        format!(
            "{}-{}-{}",
            family.program_stem(),
            self.name(),
            if restore { "restore" } else { "save" }
        )
    }
}

impl std::fmt::Display for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Finds a program. The sbin directories are searched as well, because a
/// root shell reached through `sudo` or a minimal container often lacks
/// them in PATH.
pub fn find_program(name: &str) -> Result<PathBuf, InitError> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
        .ok_or_else(|| InitError::MissingBinary {
            binary: name.to_owned(),
        })
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

fn denied(stderr: &str) -> bool {
    stderr.contains("Permission denied")
        || stderr.contains("you must be root")
        || stderr.contains("Operation not permitted")
}

/// Reads every table of one family, as `iptables-save` prints it (no
/// counters).
pub fn save(engine: Engine, family: Family) -> Result<String, InitError> {
    let name = engine.program(family, false);
    let out = Command::new(find_program(&name)?)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| InitError::io(format!("running {name}"), e))?;
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    if !out.status.success() {
        if denied(&stderr) {
            return Err(InitError::NotPermitted {
                what: format!("reading the {family} rules"),
            });
        }
        return Err(InitError::SaveFailed {
            binary: name,
            stderr,
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Applies restore input to one family in one transaction: either all of
/// it takes effect or none. `--noflush` keeps every rule the input does not
/// name, and `-w` waits for the xtables lock held by a concurrent iptables.
pub fn restore(engine: Engine, family: Family, input: &str) -> Result<(), InitError> {
    let name = engine.program(family, true);
    let mut child = Command::new(find_program(&name)?)
        .args(["-w", "--noflush"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| InitError::io(format!("running {name}"), e))?;
    let written = child
        .stdin
        .take()
        .map(|mut stdin| stdin.write_all(input.as_bytes()));
    let out = child
        .wait_with_output()
        .map_err(|e| InitError::io(format!("waiting for {name}"), e))?;
    if out.status.success() {
        if let Some(Err(e)) = written {
            return Err(InitError::io(format!("writing rules to {name}"), e));
        }
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    Err(classify(
        engine,
        family,
        input,
        &stderr,
        loaded_extensions(family).as_ref(),
    ))
}

/// The x_tables matches and targets the kernel has registered for a family,
/// from `/proc/thread-self/net/ip{,6}_tables_{matches,targets}`.
/// `thread-self` because only this thread may have entered the namespace.
#[derive(Debug, Clone, Default)]
pub struct Extensions {
    pub matches: Vec<String>,
    pub targets: Vec<String>,
}

fn loaded_extensions(family: Family) -> Option<Extensions> {
    let stem = match family {
        Family::V4 => "ip",
        Family::V6 => "ip6",
    };
    let read = |kind: &str| {
        std::fs::read_to_string(format!("/proc/thread-self/net/{stem}_tables_{kind}"))
            .ok()
            .map(|s| s.lines().map(str::to_owned).collect::<Vec<_>>())
    };
    Some(Extensions {
        matches: read("matches")?,
        targets: read("targets")?,
    })
}

/// The line number iptables-restore complained about: legacy writes
/// `line 5 failed`, nft `line 4: RULE_APPEND failed`, and parse errors end
/// with `Error occurred at line: 3`.
fn failed_line(stderr: &str) -> Option<usize> {
    let mut rest = stderr;
    while let Some(i) = rest.find("line") {
        let after = rest[i + 4..].trim_start_matches([':', ' ']);
        let digits: String = after.chars().take_while(char::is_ascii_digit).collect();
        if let Ok(n) = digits.parse() {
            return Some(n);
        }
        rest = &rest[i + 4..];
    }
    None
}

/// Which kernel module provides each match and target legate uses.
const MODULES: [(&str, bool, &str); 3] = [
    ("owner", false, "xt_owner"),
    ("tcp", false, "xt_tcpudp"),
    ("REDIRECT", true, "xt_REDIRECT"),
];

/// Turns a failed restore into the most specific error its output allows.
/// `loaded` is what the kernel has registered, read right after the
/// failure (when the kernel has already tried to load what it lacked).
pub fn classify(
    engine: Engine,
    family: Family,
    input: &str,
    stderr: &str,
    loaded: Option<&Extensions>,
) -> InitError {
    if denied(stderr) {
        return InitError::NotPermitted {
            what: format!("changing the {family} rules"),
        };
    }
    let line = failed_line(stderr).and_then(|n| input.lines().nth(n.checked_sub(1)?));
    let rule = line.filter(|l| *l != "COMMIT").map(str::to_owned);
    let missing = |modules: Vec<&str>| InitError::KernelMissing {
        family,
        backend: engine.name(),
        modules: modules.into_iter().map(str::to_owned).collect(),
        detail: stderr.replace('\n', " ").trim().to_owned(),
    };

    // The nat table itself.
    if stderr.contains("Table does not exist")
        || stderr.contains("unable to initialize table")
        || stderr.contains("CHAIN_ADD failed (No such file or directory)")
    {
        return missing(match (engine, family) {
            (Engine::Legacy, Family::V4) => vec!["iptable_nat"],
            (Engine::Legacy, Family::V6) => vec!["ip6table_nat"],
            (Engine::Nft, _) => vec!["nft_chain_nat"],
        });
    }

    // A match or target the kernel does not know. The rule that failed
    // narrows it down; the kernel's registry confirms it.
    let kernel_refused = stderr.contains("No chain/target/match by that name")
        || stderr.contains("(No such file or directory)")
        || (engine == Engine::Legacy && line == Some("COMMIT"));
    if kernel_refused {
        if let Some(loaded) = loaded {
            let scope = rule.as_deref().unwrap_or(input);
            let absent: Vec<&str> = MODULES
                .iter()
                .filter(|(ext, is_target, _)| {
                    let used = if *is_target {
                        scope.contains(&format!("-j {ext}"))
                    } else {
                        scope.contains(&format!("-m {ext}"))
                    };
                    let list = if *is_target {
                        &loaded.targets
                    } else {
                        &loaded.matches
                    };
                    used && !list.iter().any(|l| l == ext)
                })
                .map(|(_, _, module)| *module)
                .collect();
            if !absent.is_empty() {
                return missing(absent);
            }
        }
    }

    InitError::RestoreFailed {
        binary: engine.program(family, true),
        stderr: stderr.to_owned(),
        rule,
        rolled_back: false,
    }
}

/// Whether the calling thread holds CAP_NET_ADMIN (bit 12 of CapEff).
/// Checked up front so that the error is the clear one, not whatever each
/// program prints when it is refused.
pub fn has_net_admin() -> bool {
    const CAP_NET_ADMIN: u32 = 12;
    std::fs::read_to_string("/proc/thread-self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << CAP_NET_ADMIN) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const INPUT: &str = "*nat\n:LEGATE_OUTPUT - [0:0]\n\
        -A LEGATE_OUTPUT -m owner --uid-owner 1337 -j RETURN\n\
        -A LEGATE_REDIRECT_OUT -p tcp -j REDIRECT --to-ports 15001\nCOMMIT\n";

    fn all_loaded() -> Extensions {
        Extensions {
            matches: vec!["owner".into(), "tcp".into()],
            targets: vec!["REDIRECT".into()],
        }
    }

    #[test]
    fn finds_the_line_in_each_dialect() {
        assert_eq!(failed_line("iptables-restore: line 5 failed"), Some(5));
        assert_eq!(
            failed_line("iptables-nft-restore v1.8.9 (nf_tables): \nline 4: RULE_APPEND failed (Invalid argument): rule in chain POSTROUTING"),
            Some(4)
        );
        assert_eq!(failed_line("bad\nError occurred at line: 3\nTry"), Some(3));
        assert_eq!(failed_line("no number here"), None);
    }

    #[test]
    fn a_missing_match_names_its_module() {
        let mut loaded = all_loaded();
        loaded.matches.retain(|m| m != "owner");
        let e = classify(
            Engine::Nft,
            Family::V4,
            INPUT,
            "line 3: RULE_APPEND failed (No such file or directory): rule in chain LEGATE_OUTPUT",
            Some(&loaded),
        );
        let msg = e.to_string();
        assert!(matches!(e, InitError::KernelMissing { .. }), "{msg}");
        assert!(
            msg.contains("xt_owner") && msg.contains("modprobe xt_owner"),
            "{msg}"
        );
    }

    #[test]
    fn a_legacy_commit_failure_is_narrowed_by_the_registry() {
        let mut loaded = all_loaded();
        loaded.targets.clear();
        let e = classify(
            Engine::Legacy,
            Family::V6,
            INPUT,
            "ip6tables-restore: line 5 failed",
            Some(&loaded),
        );
        assert!(e.to_string().contains("xt_REDIRECT"), "{e}");
    }

    #[test]
    fn a_missing_nat_table_names_the_table_module() {
        let e = classify(
            Engine::Legacy,
            Family::V4,
            INPUT,
            "iptables-restore v1.8.9 (legacy): can't initialize iptables table `nat': Table does not exist (do you need to insmod?)",
            None,
        );
        assert!(e.to_string().contains("iptable_nat"), "{e}");
    }

    #[test]
    fn other_failures_quote_the_rule() {
        let e = classify(
            Engine::Nft,
            Family::V4,
            INPUT,
            "line 3: RULE_APPEND failed (Invalid argument): rule in chain LEGATE_OUTPUT",
            Some(&all_loaded()),
        );
        let msg = e.to_string();
        assert!(matches!(e, InitError::RestoreFailed { .. }));
        assert!(
            msg.contains("the rule was: -A LEGATE_OUTPUT -m owner"),
            "{msg}"
        );
    }

    #[test]
    fn permission_problems_say_so() {
        let e = classify(
            Engine::Nft,
            Family::V4,
            INPUT,
            "Could not fetch rule set generation id: Permission denied (you must be root)",
            None,
        );
        assert!(e.to_string().contains("CAP_NET_ADMIN"));
    }

    #[test]
    fn program_names() {
        assert_eq!(
            Engine::Nft.program(Family::V6, true),
            "ip6tables-nft-restore"
        );
        assert_eq!(
            Engine::Legacy.program(Family::V4, false),
            "iptables-legacy-save"
        );
    }
}
