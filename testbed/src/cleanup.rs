//! Making sure a bed never outlives its test.
//!
//! Three layers, from the common case to the worst:
//!
//! 1. `Drop` on [`Bed`](crate::Bed) tears it down: on a normal end and while
//!    a panic unwinds.
//! 2. SIGINT, SIGTERM and SIGHUP skip every destructor, so on the first bed a
//!    process creates a handler thread is started (via `signal-hook`, which
//!    chains with any other handlers) that tears down every live bed of the
//!    process and then exits with 128 + the signal number (130 for Ctrl-C,
//!    143 for SIGTERM).
//! 3. SIGKILL and crashes leave namespaces behind. Their names embed the pid
//!    of the process that made them, so every new bed first sweeps away the
//!    namespaces whose process is gone. A live process's beds are never
//!    touched. This relies on every user of the bed sharing one pid
//!    namespace, which holds on a test machine or CI runner.

use std::sync::{Arc, Mutex};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::bed::Shared;
use crate::error::{Error, Result};
use crate::sys::{ip_netns, lock, pid_alive};

/// Every live bed of this process, for the signal handler.
static LIVE: Mutex<Vec<Arc<Shared>>> = Mutex::new(Vec::new());

/// Whether the signal handler is installed and this process's first sweep
/// has run. Held while sweeping, so sweeps in one process never overlap.
static PREPARED: Mutex<bool> = Mutex::new(false);

/// The start of every namespace name the bed makes.
pub(crate) const NAME_START: &str = "lgt";

/// Runs before each new bed is named: installs the signal handler once, and
/// sweeps namespaces left by dead processes.
///
/// The first sweep of a process also removes beds named with this process's
/// own pid: they can only come from an earlier process that had the same
/// pid, because no bed of ours can exist before this call returns.
pub(crate) fn prepare() -> Result<()> {
    let mut prepared = lock(&PREPARED);
    if !*prepared {
        install_signal_handler()?;
        sweep(true)?;
        *prepared = true;
    } else {
        sweep(false)?;
    }
    Ok(())
}

pub(crate) fn register(shared: Arc<Shared>) {
    lock(&LIVE).push(shared);
}

pub(crate) fn unregister(shared: &Arc<Shared>) {
    lock(&LIVE).retain(|live| !Arc::ptr_eq(live, shared));
}

fn install_signal_handler() -> Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])
        .map_err(|e| Error::io("installing the test bed's signal handler", e))?;
    std::thread::Builder::new()
        .name("legate-testbed-signals".into())
        .spawn(move || {
            if let Some(signal) = signals.forever().next() {
                teardown_all();
                std::process::exit(128 + signal);
            }
        })
        .map_err(|e| Error::io("starting the test bed's signal thread", e))?;
    Ok(())
}

fn teardown_all() {
    // Not removed from LIVE: the process is about to exit, and a `Drop`
    // running concurrently only finds the bed already torn down.
    let live = lock(&LIVE).clone();
    for shared in live {
        if let Err(e) = shared.teardown() {
            eprintln!("legate-testbed: tearing down bed {}: {e}", shared.prefix);
        }
    }
}

/// The bed prefix (`lgt<pid>x<n>`) and pid of a namespace name, if the bed
/// made it.
pub(crate) fn parse_name(netns: &str) -> Option<(&str, u32)> {
    let (prefix, _) = netns.split_once('-')?;
    let (pid, counter) = prefix.strip_prefix(NAME_START)?.split_once('x')?;
    let all_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !all_digits(pid) || !all_digits(counter) {
        return None;
    }
    Some((prefix, pid.parse().ok()?))
}

/// Names of all namespaces on the machine.
pub(crate) fn list_netns() -> Result<Vec<String>> {
    // Lines look like "name (id: 3)" or just "name".
    Ok(ip_netns(&["list"])?
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_owned)
        .collect())
}

fn sweep(include_own_pid: bool) -> Result<()> {
    let own = std::process::id();
    for netns in list_netns()? {
        let Some((_, pid)) = parse_name(&netns) else {
            continue;
        };
        let stale = if pid == own {
            include_own_pid
        } else {
            !pid_alive(pid)
        };
        if stale {
            // Another process may be sweeping the same leftovers; losing
            // that race is fine, so errors are ignored.
            let _ = remove_netns(&netns);
        }
    }
    Ok(())
}

/// Kills every process inside a namespace, then removes its name.
///
/// Processes are killed first because a namespace stays alive, with its
/// links, for as long as a process runs in it. Removing the last name of the
/// bridge namespace destroys the bridge and the bridge ends of the veth
/// pairs, and with them the pod ends.
pub(crate) fn remove_netns(netns: &str) -> Result<()> {
    kill_netns_processes(netns);
    match ip_netns(&["del", netns]) {
        Err(Error::CommandFailed { stderr, .. }) if stderr.contains("No such file") => Ok(()),
        other => other.map(drop),
    }
}

fn kill_netns_processes(netns: &str) {
    let Ok(pids) = ip_netns(&["pids", netns]) else {
        return;
    };
    let own = std::process::id();
    for pid in pids
        .split_whitespace()
        .filter_map(|p| p.parse::<u32>().ok())
    {
        // Our own threads enter pods via `run_in`, but never the main thread,
        // so this process is not normally listed; guard anyway.
        if pid != own {
            if let Ok(raw) = i32::try_from(pid) {
                let _ = kill(Pid::from_raw(raw), Signal::SIGKILL);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_name;

    #[test]
    fn names_parse_to_bed_and_pid() {
        assert_eq!(parse_name("lgt123x4-br"), Some(("lgt123x4", 123)));
        assert_eq!(parse_name("lgt123x4-web-1"), Some(("lgt123x4", 123)));
        assert_eq!(parse_name("lgt123x-br"), None);
        assert_eq!(parse_name("lgtx4-br"), None);
        assert_eq!(parse_name("lgt123x4"), None);
        assert_eq!(parse_name("other123x4-br"), None);
        assert_eq!(parse_name("cni-1234"), None);
    }
}
