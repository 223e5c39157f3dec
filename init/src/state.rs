//! Reading what a namespace holds: `iptables-save` output parsed into
//! legate's part (a [`Ruleset`]) and a count of everyone else's, plus the
//! line diff `--check` prints.
//!
//! Ownership is decided by name alone: legate's chains are those starting
//! with [`CHAIN_PREFIX`], and legate's jumps are the rules in a built-in
//! `nat` chain whose target is one of them. Anything else belongs to
//! someone else (a CNI plugin, Docker, kube-proxy) and is only counted.

use crate::error::InitError;
use crate::plan::{Jump, Ruleset, CHAIN_PREFIX, TABLE};

/// Built-in chains of the `nat` table.
const NAT_BUILTINS: [&str; 4] = ["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"];

/// What one `iptables-save` output holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Saved {
    /// legate's chains and jumps in the `nat` table.
    pub legate: Ruleset,
    /// Rules and user chains of others, in every table.
    pub foreign: usize,
}

/// Splits a rule into words, keeping a quoted string (a `--comment "a b"`)
/// as one word so a target named inside a comment is not mistaken for one.
fn words(rule: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = rule.trim_start();
    while !rest.is_empty() {
        let end = if let Some(quoted) = rest.strip_prefix('"') {
            quoted.find('"').map_or(rest.len(), |i| i + 2)
        } else {
            rest.find(char::is_whitespace).unwrap_or(rest.len())
        };
        out.push(&rest[..end]);
        rest = rest[end..].trim_start();
    }
    out
}

/// The chain a rule jumps or goes to, if any.
fn target(rule: &str) -> Option<&str> {
    let w = words(rule);
    w.windows(2)
        .find(|p| p[0] == "-j" || p[0] == "-g")
        .map(|p| p[1])
}

/// Parses `iptables-save` output (without `-c`).
pub fn parse_save(text: &str) -> Result<Saved, InitError> {
    let mut saved = Saved::default();
    let mut table = "";
    for line in text.lines() {
        let line = line.trim_end();
        if line.is_empty() || line.starts_with('#') || line == "COMMIT" {
            continue;
        }
        if let Some(t) = line.strip_prefix('*') {
            table = t;
            continue;
        }
        if let Some(decl) = line.strip_prefix(':') {
            let name = decl.split_whitespace().next().unwrap_or_default();
            let builtin = !decl.contains(" - ");
            if table == TABLE && name.starts_with(CHAIN_PREFIX) {
                saved.legate.chains.entry(name.to_owned()).or_default();
            } else if !builtin {
                saved.foreign += 1;
            }
            continue;
        }
        let Some(rest) = line.strip_prefix("-A ") else {
            // iptables-save prints nothing else; skip rather than fail on a
            // future addition.
            continue;
        };
        let (chain, spec) = rest.split_once(' ').unwrap_or((rest, ""));
        if table != TABLE {
            saved.foreign += 1;
            continue;
        }
        if chain.starts_with(CHAIN_PREFIX) {
            saved
                .legate
                .chains
                .entry(chain.to_owned())
                .or_default()
                .push(spec.to_owned());
            continue;
        }
        match target(spec) {
            Some(t) if t.starts_with(CHAIN_PREFIX) => {
                if NAT_BUILTINS.contains(&chain) {
                    saved.legate.jumps.push(Jump {
                        from: chain.to_owned(),
                        spec: spec.to_owned(),
                    });
                } else {
                    return Err(InitError::ForeignReference {
                        chain: t.to_owned(),
                        rule: line.to_owned(),
                    });
                }
            }
            _ => saved.foreign += 1,
        }
    }
    saved.legate.jumps.sort();
    Ok(saved)
}

/// `iptables-save` output reduced to what a comparison should see: no
/// comment lines (they carry a timestamp) and all counters zero.
pub fn normalize_save(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let line = match (line.starts_with(':'), line.rfind(" [")) {
            (true, Some(i)) if line.ends_with(']') => format!("{} [0:0]", &line[..i]),
            _ => line.to_owned(),
        };
        out.push_str(&line);
        out.push('\n');
    }
    out
}

/// One line of a diff between the plan and what is installed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiffLine {
    /// In both.
    Same(String),
    /// Planned but not installed.
    Missing(String),
    /// Installed but not planned.
    Unexpected(String),
}

impl std::fmt::Display for DiffLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DiffLine::Same(l) => write!(f, "  {l}"),
            DiffLine::Missing(l) => write!(f, "- {l}"),
            DiffLine::Unexpected(l) => write!(f, "+ {l}"),
        }
    }
}

/// A line diff by longest common subsequence; the listings are a few dozen
/// lines, so the quadratic table costs nothing.
pub fn diff(want: &[String], have: &[String]) -> Vec<DiffLine> {
    let (n, m) = (want.len(), have.len());
    let mut lcs = vec![vec![0usize; m + 1]; n + 1];
    for i in (0..n).rev() {
        for j in (0..m).rev() {
            lcs[i][j] = if want[i] == have[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let (mut i, mut j) = (0, 0);
    let mut out = Vec::new();
    while i < n || j < m {
        if i < n && j < m && want[i] == have[j] {
            out.push(DiffLine::Same(want[i].clone()));
            i += 1;
            j += 1;
        } else if j < m && (i == n || lcs[i][j + 1] >= lcs[i + 1][j]) {
            out.push(DiffLine::Unexpected(have[j].clone()));
            j += 1;
        } else {
            out.push(DiffLine::Missing(want[i].clone()));
            i += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAVE: &str = "\
# Generated by iptables-nft-save v1.8.9 (nf_tables) on Tue Nov 25 13:40:00 2025
*filter
:INPUT ACCEPT [10:600]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
-A FORWARD -i cni0 -j ACCEPT
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [3:180]
:POSTROUTING ACCEPT [0:0]
:CNI-FOO - [0:0]
:LEGATE_OUTPUT - [0:0]
:LEGATE_REDIRECT_OUT - [0:0]
-A OUTPUT -p tcp -j LEGATE_OUTPUT
-A POSTROUTING -s 10.1.0.0/16 -m comment --comment \"-j LEGATE_OUTPUT\" -j CNI-FOO
-A CNI-FOO -j MASQUERADE
-A LEGATE_OUTPUT -o lo -j RETURN
-A LEGATE_OUTPUT -j LEGATE_REDIRECT_OUT
-A LEGATE_REDIRECT_OUT -p tcp -j REDIRECT --to-ports 15001
COMMIT
";

    #[test]
    fn separates_legate_from_others() {
        let s = parse_save(SAVE).unwrap();
        assert_eq!(s.foreign, 4, "FORWARD rule, CNI-FOO chain, its two rules");
        assert_eq!(
            s.legate.jumps,
            vec![Jump {
                from: "OUTPUT".into(),
                spec: "-p tcp -j LEGATE_OUTPUT".into()
            }]
        );
        assert_eq!(
            s.legate.chains["LEGATE_OUTPUT"],
            vec!["-o lo -j RETURN", "-j LEGATE_REDIRECT_OUT"]
        );
        assert_eq!(s.legate.chains.len(), 2);
    }

    #[test]
    fn empty_chains_are_seen() {
        let s = parse_save("*nat\n:LEGATE_X - [0:0]\nCOMMIT\n").unwrap();
        assert_eq!(s.legate.chains["LEGATE_X"], Vec::<String>::new());
    }

    #[test]
    fn a_foreign_jump_into_our_chain_is_refused() {
        let e = parse_save(
            "*nat\n:CNI-X - [0:0]\n:LEGATE_OUTPUT - [0:0]\n-A CNI-X -j LEGATE_OUTPUT\nCOMMIT\n",
        )
        .unwrap_err();
        assert!(matches!(e, InitError::ForeignReference { .. }), "{e}");
    }

    #[test]
    fn normalizing_drops_comments_and_counters() {
        let n = normalize_save(SAVE);
        assert!(!n.contains("Generated"));
        assert!(n.contains(":INPUT ACCEPT [0:0]\n") && n.contains(":OUTPUT ACCEPT [0:0]\n"));
    }

    #[test]
    fn diff_marks_missing_and_unexpected() {
        let l = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let d = diff(&l(&["a", "b", "c"]), &l(&["a", "c", "d"]));
        assert_eq!(
            d,
            vec![
                DiffLine::Same("a".into()),
                DiffLine::Missing("b".into()),
                DiffLine::Same("c".into()),
                DiffLine::Unexpected("d".into()),
            ]
        );
    }
}
