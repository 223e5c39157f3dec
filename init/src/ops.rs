//! The four operations on a namespace: apply, clean up, check and dry run.
//!
//! Each one enters the namespace, reads what legate has there through the
//! chosen backend, and compares it with what is wanted. Applying is one
//! `iptables-restore` transaction per address family; when the second
//! family fails, the first is put back as it was, so a failed run leaves
//! the namespace as it found it.

use std::fmt;

use legate_config::{Backend, InitConfig, Ipv6Mode};

use crate::backend::{choose, none_usable, probe_all, Probe};
use crate::error::InitError;
use crate::iptables::{has_net_admin, restore, save, Engine};
use crate::netns::within;
use crate::plan::{transition, Family, Plan, Ruleset, Scope};
use crate::state::{diff, parse_save, DiffLine};

/// Where and how the operations run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// A namespace name (`/run/netns/NAME`) or path; `None` is the current one.
    pub netns: Option<String>,
    pub backend: Backend,
    pub ipv6: Ipv6Mode,
}

impl Options {
    /// The options `init` configuration asks for, in the current namespace.
    pub fn from_config(init: &InitConfig) -> Self {
        Options {
            netns: None,
            backend: init.backend,
            ipv6: init.ipv6,
        }
    }
}

/// What happened to one family's rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// They were already as wanted; nothing was run.
    Unchanged,
    /// A transaction was applied.
    Applied,
    /// The family was not handled (IPv6 off and nothing of legate's there).
    Skipped,
}

/// The outcome of [`apply`] or [`cleanup`] for one backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub engine: Engine,
    /// Why this backend was used.
    pub reason: String,
    pub families: Vec<(Family, Change)>,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "backend {} ({})", self.engine, self.reason)?;
        for (family, change) in &self.families {
            let what = match change {
                Change::Unchanged => "already as planned",
                Change::Applied => "applied",
                Change::Skipped => "skipped",
            };
            write!(f, "; {family}: {what}")?;
        }
        Ok(())
    }
}

/// One family's step: what legate has there and what it should have.
struct Step {
    family: Family,
    have: Ruleset,
    want: Ruleset,
}

/// Whether the kernel offers IPv6 in the calling thread's namespace. A
/// socket is created in the namespace of the thread that asks for it.
pub fn kernel_has_ipv6() -> bool {
    use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};
    socket(
        AddressFamily::Inet6,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .is_ok()
}

/// Decides whether IPv6 rules are wanted. In `auto`, a namespace that has
/// IPv6 gets IPv6 rules, and failing to install them is an error rather
/// than a silent skip: IPv6 traffic would otherwise bypass the proxy.
fn ipv6_wanted(mode: Ipv6Mode, probe: &Probe) -> Result<bool, InitError> {
    match mode {
        Ipv6Mode::Off => Ok(false),
        Ipv6Mode::Auto => Ok(kernel_has_ipv6()),
        Ipv6Mode::On if !kernel_has_ipv6() => Err(InitError::Ipv6Unavailable {
            reason: "the kernel refuses IPv6 sockets".into(),
        }),
        Ipv6Mode::On => match &probe.v6 {
            Ok(_) => Ok(true),
            Err(e) => Err(InitError::Ipv6Unavailable {
                reason: e.to_string(),
            }),
        },
    }
}

/// The steps that bring a backend's tables to `plan` (or to nothing, for
/// families that are not wanted).
fn steps(probe: &Probe, plan: Option<&Plan>, ipv6: Ipv6Mode) -> Result<Vec<Step>, InitError> {
    let v6 = plan.is_some() && ipv6_wanted(ipv6, probe)?;
    let mut out = Vec::new();
    for family in Family::ALL {
        let wanted = plan.is_some() && (family == Family::V4 || v6);
        let have = match (probe.family(family), &probe.v6) {
            (Some(saved), _) => saved.legate.clone(),
            // IPv6 is wanted but its tables cannot be read: fail closed.
            (None, Err(e)) if wanted => {
                return Err(InitError::SaveFailed {
                    binary: probe.engine.program(family, false),
                    stderr: e.to_string(),
                })
            }
            (None, _) => continue,
        };
        let want = match plan {
            Some(plan) if wanted => plan.family(family).clone(),
            _ => Ruleset::default(),
        };
        if have.is_empty() && want.is_empty() {
            continue;
        }
        out.push(Step { family, have, want });
    }
    Ok(out)
}

fn require_net_admin(what: &str) -> Result<(), InitError> {
    if has_net_admin() {
        Ok(())
    } else {
        Err(InitError::NotPermitted { what: what.into() })
    }
}

/// Runs the steps' transactions, and on a failure puts back the families
/// already changed.
fn run_steps(engine: Engine, steps: &[Step]) -> Result<Vec<(Family, Change)>, InitError> {
    let mut done: Vec<&Step> = Vec::new();
    let mut report = Vec::new();
    for step in steps {
        let Some(input) = transition(&step.have, &step.want) else {
            report.push((step.family, Change::Unchanged));
            continue;
        };
        tracing::debug!(family = %step.family, %engine, "applying:\n{input}");
        if let Err(cause) = restore(engine, step.family, &input) {
            return Err(roll_back(engine, &done, step.family, cause));
        }
        done.push(step);
        report.push((step.family, Change::Applied));
    }
    Ok(report)
}

fn roll_back(engine: Engine, done: &[&Step], failed: Family, cause: InitError) -> InitError {
    for step in done.iter().rev() {
        let put_back = save(engine, step.family)
            .and_then(|text| parse_save(&text))
            .and_then(|now| match transition(&now.legate, &step.have) {
                Some(input) => restore(engine, step.family, &input),
                None => Ok(()),
            });
        if let Err(rollback) = put_back {
            return InitError::RollbackFailed {
                failed,
                other: step.family,
                cause: Box::new(cause),
                rollback: Box::new(rollback),
            };
        }
    }
    match cause {
        InitError::RestoreFailed {
            binary,
            stderr,
            rule,
            ..
        } if !done.is_empty() => InitError::RestoreFailed {
            binary,
            stderr,
            rule,
            rolled_back: true,
        },
        other => other,
    }
}

/// Installs `plan`, or brings installed rules up to date with it. Running it
/// again with the same plan changes nothing.
pub fn apply(plan: &Plan, opts: &Options) -> Result<Report, InitError> {
    within(opts.netns.as_deref(), || {
        require_net_admin("installing the interception rules")?;
        let chosen = choose(opts.backend)?;
        let steps = steps(&chosen.probe, Some(plan), opts.ipv6)?;
        let engine = chosen.probe.engine;
        let mut families = run_steps(engine, &steps)?;
        for family in Family::ALL {
            if !families.iter().any(|(f, _)| *f == family) {
                families.push((family, Change::Skipped));
            }
        }
        families.sort_by_key(|(f, _)| *f);
        Ok(Report {
            engine,
            reason: chosen.reason,
            families,
        })
    })
}

/// The backends that hold legate's rules: with `Backend::Auto` every
/// usable one, otherwise the one asked for.
fn holding_legate(backend: Backend) -> Result<Vec<Probe>, InitError> {
    let probes = match backend {
        Backend::Auto => {
            let (usable, unusable) = probe_all()?;
            if usable.is_empty() {
                return Err(none_usable(unusable));
            }
            usable
        }
        _ => vec![choose(backend)?.probe],
    };
    Ok(probes.into_iter().filter(Probe::holds_legate).collect())
}

/// Removes every chain and jump legate installed, and nothing else. With
/// `Backend::Auto` every backend holding legate's rules is cleaned, so a
/// stale copy left in the other backend goes too.
pub fn cleanup(opts: &Options) -> Result<Vec<Report>, InitError> {
    within(opts.netns.as_deref(), || {
        require_net_admin("removing the interception rules")?;
        let mut reports = Vec::new();
        for probe in holding_legate(opts.backend)? {
            let steps = steps(&probe, None, opts.ipv6)?;
            reports.push(Report {
                engine: probe.engine,
                reason: "it holds legate's chains".into(),
                families: run_steps(probe.engine, &steps)?,
            });
        }
        Ok(reports)
    })
}

/// legate's rules as one backend holds them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installed {
    pub engine: Engine,
    /// Each family that could be read and holds something of legate's.
    pub families: Vec<(Family, Ruleset)>,
}

impl Installed {
    /// Who installed these rules: [`Scope::Namespace`] for `legate init`,
    /// [`Scope::Group`] for `legate run`. Read from the first family with
    /// an outbound chain.
    pub fn scope(&self) -> Option<Scope> {
        self.families.iter().find_map(|(_, r)| Scope::of(r))
    }
}

/// What legate has installed in the namespace, one entry per backend that
/// holds any of its chains or jumps; empty when there is nothing. Changes
/// nothing.
pub fn installed(opts: &Options) -> Result<Vec<Installed>, InitError> {
    within(opts.netns.as_deref(), || {
        require_net_admin("reading the interception rules")?;
        Ok(holding_legate(opts.backend)?
            .iter()
            .map(|p| Installed {
                engine: p.engine,
                families: Family::ALL
                    .iter()
                    .filter_map(|f| p.family(*f).map(|saved| (*f, saved.legate.clone())))
                    .filter(|(_, r)| !r.is_empty())
                    .collect(),
            })
            .collect())
    })
}

/// One family's comparison of plan and namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FamilyCheck {
    pub family: Family,
    /// The plan against what is installed, line by line.
    pub diff: Vec<DiffLine>,
}

impl FamilyCheck {
    pub fn is_ok(&self) -> bool {
        self.diff.iter().all(|l| matches!(l, DiffLine::Same(_)))
    }
}

/// The result of [`check`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckReport {
    pub engine: Engine,
    pub reason: String,
    pub families: Vec<FamilyCheck>,
}

impl CheckReport {
    /// Whether every family matches the plan.
    pub fn is_ok(&self) -> bool {
        self.families.iter().all(FamilyCheck::is_ok)
    }
}

impl fmt::Display for CheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "backend {} ({})", self.engine, self.reason)?;
        for fc in &self.families {
            let program = self.engine.program(fc.family, false);
            if fc.is_ok() {
                writeln!(f, "{}: installed rules match the plan", fc.family)?;
                continue;
            }
            writeln!(
                f,
                "{}: installed rules differ from the plan (- planned but missing, + installed but not planned; from {program}):",
                fc.family
            )?;
            for line in &fc.diff {
                writeln!(f, "  {line}")?;
            }
        }
        Ok(())
    }
}

/// Compares what is installed with `plan`, changing nothing.
pub fn check(plan: &Plan, opts: &Options) -> Result<CheckReport, InitError> {
    within(opts.netns.as_deref(), || {
        require_net_admin("reading the interception rules")?;
        let chosen = choose(opts.backend)?;
        let steps = steps(&chosen.probe, Some(plan), opts.ipv6)?;
        let families = steps
            .iter()
            .map(|s| FamilyCheck {
                family: s.family,
                diff: diff(&s.want.listing(), &s.have.listing()),
            })
            .collect();
        Ok(CheckReport {
            engine: chosen.probe.engine,
            reason: chosen.reason,
            families,
        })
    })
}

/// What [`apply`] would run, per family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DryRun {
    pub engine: Engine,
    pub reason: String,
    /// Each family's restore input, or `None` when it is already as planned.
    pub inputs: Vec<(Family, Option<String>)>,
}

impl fmt::Display for DryRun {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Comment lines, so that each section can be piped to its program.
        writeln!(f, "# backend {} ({})", self.engine, self.reason)?;
        if self.inputs.is_empty() {
            writeln!(f, "# nothing to apply")?;
        }
        for (family, input) in &self.inputs {
            let program = self.engine.program(*family, true);
            match input {
                Some(text) => {
                    writeln!(f, "# {family}: {program} -w --noflush")?;
                    f.write_str(text)?;
                }
                None => writeln!(f, "# {family}: already as planned, nothing to apply")?,
            }
        }
        Ok(())
    }
}

/// The exact restore input [`apply`] would run now, without running it.
pub fn dry_run(plan: &Plan, opts: &Options) -> Result<DryRun, InitError> {
    within(opts.netns.as_deref(), || {
        require_net_admin("reading the interception rules")?;
        let chosen = choose(opts.backend)?;
        let steps = steps(&chosen.probe, Some(plan), opts.ipv6)?;
        Ok(DryRun {
            engine: chosen.probe.engine,
            reason: chosen.reason,
            inputs: steps
                .iter()
                .map(|s| (s.family, transition(&s.have, &s.want)))
                .collect(),
        })
    })
}
