//! Choosing the iptables backend, nf_tables or legacy, so that it never
//! flips between runs.
//!
//! Both backends can be present in one kernel at once, and rules in one are
//! invisible to the other's tools. A sidecar that installed its rules with
//! `iptables-legacy` yesterday and looks for them with `iptables-nft` today
//! would find nothing, install a second copy, and leave the first one
//! running. So the choice is made by a fixed rule, from what the namespace
//! holds, in this order:
//!
//! 1. `--backend nft|legacy` (`init.backend`) when given: the operator decides.
//! 2. The backend that already holds legate's chains. legate writes to one
//!    backend only, so after the first run this rule alone decides, and the
//!    choice is stable for as long as legate's rules are installed. If both
//!    hold them (someone forced the other backend), `legate init` refuses
//!    and says how to remove the stale copy.
//! 3. The backend that holds other rules (a CNI plugin's, Docker's,
//!    kube-proxy's), when only one does: legate's rules then sit next to
//!    the rules that already decide this namespace's traffic.
//! 4. nft: it is what current distributions default to, and when both hold
//!    other rules it is preferred for the same reason.
//!
//! A backend whose programs are missing, or that cannot read its tables
//! here (a kernel without nf_tables, say), is not a candidate.

use legate_config::Backend;

use crate::error::InitError;
use crate::iptables::{save, Engine};
use crate::plan::Family;
use crate::state::{parse_save, Saved};

/// What one backend holds in this namespace.
#[derive(Debug)]
pub struct Probe {
    pub engine: Engine,
    pub v4: Saved,
    /// The IPv6 tables, or why `ip6tables-*-save` could not read them
    /// (usually: the namespace has no IPv6).
    pub v6: Result<Saved, InitError>,
}

impl Probe {
    /// Reads both families' tables through one backend.
    pub fn read(engine: Engine) -> Result<Probe, InitError> {
        let v4 = parse_save(&save(engine, Family::V4)?)?;
        let v6 = match save(engine, Family::V6) {
            Ok(text) => Ok(parse_save(&text)?),
            Err(e @ InitError::NotPermitted { .. }) => return Err(e),
            Err(e) => Err(e),
        };
        Ok(Probe { engine, v4, v6 })
    }

    /// The parsed tables of a family, when they could be read.
    pub fn family(&self, family: Family) -> Option<&Saved> {
        match family {
            Family::V4 => Some(&self.v4),
            Family::V6 => self.v6.as_ref().ok(),
        }
    }

    /// Whether legate's chains or jumps are in either family.
    pub fn holds_legate(&self) -> bool {
        Family::ALL
            .iter()
            .filter_map(|f| self.family(*f))
            .any(|s| !s.legate.is_empty())
    }

    /// Whether anyone else has rules or chains in either family.
    pub fn holds_foreign(&self) -> bool {
        Family::ALL
            .iter()
            .filter_map(|f| self.family(*f))
            .any(|s| s.foreign > 0)
    }
}

/// The chosen backend, what it holds, and why it was chosen.
#[derive(Debug)]
pub struct Chosen {
    pub probe: Probe,
    pub reason: String,
}

/// Backends that could not be read, and why.
pub type Unusable = Vec<(Engine, InitError)>;

/// Reads every backend that works here. Only a permission problem stops
/// the search; other failures are returned beside the usable probes.
pub fn probe_all() -> Result<(Vec<Probe>, Unusable), InitError> {
    let mut usable = Vec::new();
    let mut unusable = Vec::new();
    for engine in Engine::ALL {
        match Probe::read(engine) {
            Ok(p) => usable.push(p),
            Err(e @ InitError::NotPermitted { .. }) => return Err(e),
            Err(e) => unusable.push((engine, e)),
        }
    }
    Ok((usable, unusable))
}

/// The error for "no backend works", naming the package when it is simply
/// not installed.
pub fn none_usable(mut unusable: Unusable) -> InitError {
    if unusable
        .iter()
        .all(|(_, e)| matches!(e, InitError::MissingBinary { .. }))
    {
        if let Some((_, e)) = unusable.drain(..).next() {
            return e;
        }
    }
    InitError::NoBackend {
        details: unusable
            .iter()
            .map(|(engine, e)| format!("{engine}: {e}"))
            .collect::<Vec<_>>()
            .join("; "),
    }
}

/// Applies the rule in the module documentation.
pub fn choose(requested: Backend) -> Result<Chosen, InitError> {
    let forced = match requested {
        Backend::Nft => Some(Engine::Nft),
        Backend::Legacy => Some(Engine::Legacy),
        Backend::Auto => None,
    };
    if let Some(engine) = forced {
        return Ok(Chosen {
            probe: Probe::read(engine)?,
            reason: "set by init.backend".into(),
        });
    }
    let (usable, unusable) = probe_all()?;
    decide(usable, unusable)
}

/// The decision itself, separate from reading the tables so that it can be
/// tested with made-up probes.
pub fn decide(mut usable: Vec<Probe>, unusable: Unusable) -> Result<Chosen, InitError> {
    if usable.is_empty() {
        return Err(none_usable(unusable));
    }
    let legate: Vec<usize> = (0..usable.len())
        .filter(|&i| usable[i].holds_legate())
        .collect();
    let foreign: Vec<usize> = (0..usable.len())
        .filter(|&i| usable[i].holds_foreign())
        .collect();
    let (index, reason) = match (legate.as_slice(), foreign.as_slice()) {
        ([_, _, ..], _) => return Err(InitError::BothBackends),
        ([i], _) => (*i, "it already holds legate's chains".to_owned()),
        ([], [i]) => (*i, "it holds this namespace's other rules".to_owned()),
        ([], [_, _, ..]) => (
            0,
            "both backends hold other rules, and nft is preferred".into(),
        ),
        ([], []) => (
            0,
            if usable[0].engine == Engine::Nft {
                "no backend holds any rule yet, and nft is the default".into()
            } else {
                format!(
                    "the nft backend does not work here ({})",
                    unusable
                        .iter()
                        .map(|(_, e)| e.to_string())
                        .collect::<Vec<_>>()
                        .join("; ")
                )
            },
        ),
    };
    // `usable` is in Engine::ALL order, so index 0 is nft when it works.
    let probe = usable.swap_remove(index);
    Ok(Chosen { probe, reason })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{Jump, Ruleset};

    fn probe(engine: Engine, legate: bool, foreign: usize) -> Probe {
        let mut saved = Saved {
            foreign,
            ..Saved::default()
        };
        if legate {
            saved.legate = Ruleset {
                jumps: vec![Jump {
                    from: "OUTPUT".into(),
                    spec: "-p tcp -j LEGATE_OUTPUT".into(),
                }],
                ..Ruleset::default()
            };
        }
        Probe {
            engine,
            v4: Saved::default(),
            v6: Ok(saved),
        }
    }

    fn chosen(usable: Vec<Probe>) -> Engine {
        decide(usable, Vec::new()).unwrap().probe.engine
    }

    #[test]
    fn legate_chains_win_over_other_rules() {
        assert_eq!(
            chosen(vec![
                probe(Engine::Nft, false, 30),
                probe(Engine::Legacy, true, 0)
            ]),
            Engine::Legacy
        );
    }

    #[test]
    fn other_rules_win_over_the_default() {
        assert_eq!(
            chosen(vec![
                probe(Engine::Nft, false, 0),
                probe(Engine::Legacy, false, 2)
            ]),
            Engine::Legacy
        );
        assert_eq!(
            chosen(vec![
                probe(Engine::Nft, false, 1),
                probe(Engine::Legacy, false, 9)
            ]),
            Engine::Nft
        );
    }

    #[test]
    fn nft_is_the_default() {
        assert_eq!(
            chosen(vec![
                probe(Engine::Nft, false, 0),
                probe(Engine::Legacy, false, 0)
            ]),
            Engine::Nft
        );
        assert_eq!(
            chosen(vec![probe(Engine::Legacy, false, 0)]),
            Engine::Legacy
        );
    }

    #[test]
    fn both_holding_legate_is_refused() {
        let e = decide(
            vec![probe(Engine::Nft, true, 0), probe(Engine::Legacy, true, 0)],
            Vec::new(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("--cleanup --backend"), "{e}");
    }

    #[test]
    fn missing_programs_name_the_package() {
        let missing = |engine: Engine| {
            (
                engine,
                InitError::MissingBinary {
                    binary: engine.program(Family::V4, false),
                },
            )
        };
        let e = decide(
            Vec::new(),
            vec![missing(Engine::Nft), missing(Engine::Legacy)],
        )
        .unwrap_err();
        assert!(e.to_string().contains("apt-get install iptables"), "{e}");
    }
}
