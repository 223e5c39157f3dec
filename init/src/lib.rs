//! `legate init`: the iptables rules that send a workload's TCP through
//! the legate proxy.
//!
//! The work is split by what it touches:
//!
//! - [`plan`](mod@plan) turns configuration into the wanted `nat` rules and into the
//!   `iptables-restore` input that installs them. It is pure, so every
//!   choice about which rules exist is covered by golden tests.
//! - [`state`] parses `iptables-save` into legate's part and everyone
//!   else's, and diffs it against the plan.
//! - [`backend`] picks nf_tables or legacy by a fixed rule, so the choice
//!   never flips between runs.
//! - [`iptables`] runs the per-backend programs and turns their error
//!   output into errors that name the fix (a missing package or kernel
//!   module, missing privileges).
//! - [`netns`] runs all of this inside another network namespace.
//! - [`ops`] puts them together: [`apply`], [`cleanup`], [`check`] and
//!   [`dry_run`], and [`installed`] reports what a namespace already holds.
//! - [`validate()`] proves that a real connection is captured, and
//!   [`orig_dst`] reads a redirected connection's original destination.
//! - [`cli`] is the `legate init` subcommand.
//!
//! The guarantees: changes are one `iptables-restore --noflush` transaction
//! per address family (and the first family is put back if the second
//! fails), so a failure never leaves rules half installed; only chains named
//! `LEGATE_*` and the jumps into them are ever written, so a CNI plugin's
//! rules are untouched; applying twice is the same as applying once; and
//! [`cleanup`] removes exactly what was installed.

#![forbid(unsafe_code)]

pub mod backend;
pub mod cli;
pub mod error;
pub mod iptables;
pub mod netns;
pub mod ops;
pub mod orig_dst;
pub mod plan;
pub mod state;
pub mod validate;

pub use error::InitError;
pub use iptables::Engine;
pub use ops::{
    apply, check, cleanup, dry_run, installed, CheckReport, DryRun, Installed, Options, Report,
};
pub use orig_dst::original_dst;
pub use plan::{plan, plan_scoped, Family, Plan, Ruleset, Scope};
pub use validate::{validate, ValidateOptions, Validated};
