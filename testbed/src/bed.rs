//! The bed itself: a bridge namespace and the pods joined to it.

use std::collections::HashSet;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

use crate::cleanup;
use crate::error::{Error, Result};
use crate::pod::Pod;
use crate::sys::{self, add_netns, in_netns, ip_in, lock};

/// Host numbers 2..=254 of the /24 go to pods; .1 is the bridge.
const FIRST_HOST: u8 = 2;
const LAST_HOST: u8 = 254;

/// Counts beds made by this process, for unique names.
static NEXT_BED: AtomicU32 = AtomicU32::new(0);

/// State shared by a [`Bed`], its [`Pod`]s and their processes, and reachable
/// from the signal handler.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) prefix: String,
    state: Mutex<State>,
    /// Pids of processes spawned through the bed and not yet reaped. A pid
    /// cannot be reused before it is reaped, so killing these is safe.
    pub(crate) children: Mutex<HashSet<i32>>,
}

#[derive(Debug, Default)]
struct State {
    /// Every namespace created (or being created), bridge first.
    namespaces: Vec<String>,
    pods: Vec<String>,
    torn_down: bool,
}

impl Shared {
    fn bridge_netns(&self) -> String {
        format!("{}-br", self.prefix)
    }

    /// Kills the bed's processes and removes its namespaces. Idempotent; the
    /// first error is reported but does not stop the rest of the teardown.
    pub(crate) fn teardown(&self) -> Result<()> {
        let mut state = lock(&self.state);
        if state.torn_down {
            return Ok(());
        }
        state.torn_down = true;
        for &pid in lock(&self.children).iter() {
            // Each child leads its own process group, so this also reaches
            // whatever it started.
            let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
        }
        let mut first_error = None;
        for netns in state.namespaces.iter().rev() {
            if let Err(e) = cleanup::remove_netns(netns) {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// An isolated network: a bridge in a namespace of its own, and pods joined to
/// it. Dropping the bed removes everything it made. See the crate docs.
#[derive(Debug)]
pub struct Bed {
    shared: Arc<Shared>,
}

impl Bed {
    /// Creates an empty bed: the bridge namespace with its bridge.
    ///
    /// Also removes namespaces left by test processes that died without
    /// cleaning up.
    pub fn new() -> Result<Bed> {
        sys::IP.path()?;
        if !nix::unistd::geteuid().is_root() {
            return Err(Error::NotRoot);
        }
        cleanup::prepare()?;
        let prefix = format!(
            "{}{}x{}",
            cleanup::NAME_START,
            std::process::id(),
            NEXT_BED.fetch_add(1, Ordering::Relaxed)
        );
        let shared = Arc::new(Shared {
            prefix,
            state: Mutex::default(),
            children: Mutex::default(),
        });
        // Registered before anything exists, so a signal arriving halfway
        // through still finds (and removes) what was made.
        cleanup::register(shared.clone());
        let bed = Bed { shared };
        bed.build_bridge()?;
        Ok(bed)
    }

    fn build_bridge(&self) -> Result<()> {
        let netns = self.shared.bridge_netns();
        let mut state = lock(&self.shared.state);
        state.namespaces.push(netns.clone());
        add_netns(&netns)?;
        ip_in(&netns, &["link", "set", "lo", "up"])?;
        ip_in(&netns, &["link", "add", "br0", "type", "bridge"])?;
        ip_in(&netns, &["addr", "add", "10.200.0.1/16", "dev", "br0"])?;
        ip_in(
            &netns,
            &["addr", "add", "fd20:200::1/64", "dev", "br0", "nodad"],
        )?;
        ip_in(&netns, &["link", "set", "br0", "up"])?;
        // A new namespace starts with forwarding off; say so explicitly, since
        // "nothing routes off the bridge" is a promise the tests rely on. With
        // no other link there is nowhere to forward to anyway.
        in_netns(&netns, || {
            std::fs::write("/proc/sys/net/ipv4/ip_forward", "0")?;
            std::fs::write("/proc/sys/net/ipv6/conf/all/forwarding", "0")
        })?
        .map_err(|e| Error::io(format!("turning forwarding off in {netns}"), e))?;
        Ok(())
    }

    /// The unique start of every namespace name of this bed: `lgt<pid>x<n>`.
    /// Names are `<prefix>-br` for the bridge and `<prefix>-<pod>` for pods.
    pub fn prefix(&self) -> &str {
        &self.shared.prefix
    }

    /// The name of the bridge namespace.
    pub fn bridge_netns(&self) -> String {
        self.shared.bridge_netns()
    }

    /// The bridge's IPv4 address, the pods' default gateway.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 200, 0, 1)
    }

    /// The bridge's IPv6 address, the pods' default gateway.
    pub fn gateway6(&self) -> Ipv6Addr {
        Ipv6Addr::new(0xfd20, 0x200, 0, 0, 0, 0, 0, 1)
    }

    /// Adds a pod: a namespace `<prefix>-<name>` joined to the bridge by a
    /// veth pair, with `eth0` at the next free address. Names are lowercase
    /// letters, digits and `-`, at most 32 long; `br` is taken by the bridge.
    pub fn pod(&self, name: &str) -> Result<Pod> {
        validate_pod_name(name)?;
        let mut state = lock(&self.shared.state);
        if state.torn_down {
            return Err(Error::TornDown {
                bed: self.shared.prefix.clone(),
            });
        }
        if state.pods.iter().any(|p| p == name) {
            return Err(Error::InvalidPodName {
                name: name.into(),
                reason: "this bed already has a pod of that name",
            });
        }
        let host = usize::from(FIRST_HOST) + state.pods.len();
        let host = u8::try_from(host)
            .ok()
            .filter(|&h| h <= LAST_HOST)
            .ok_or(Error::BedFull {
                bed: self.shared.prefix.clone(),
                max: usize::from(LAST_HOST - FIRST_HOST + 1),
            })?;
        let bridge = self.shared.bridge_netns();
        let netns = format!("{}-{name}", self.shared.prefix);
        let ip = Ipv4Addr::new(10, 200, 0, host);
        let ip6 = Ipv6Addr::new(0xfd20, 0x200, 0, 0, 0, 0, 0, host.into());
        state.pods.push(name.to_owned());
        state.namespaces.push(netns.clone());

        add_netns(&netns)?;
        // The pair is made inside the bridge namespace with its peer placed
        // straight into the pod, so the host never sees either end. The
        // bridge end is named after the host number (names only have to be
        // unique within one bridge namespace) and carries the pod's
        // namespace as its alias, for whoever is debugging.
        let veth = format!("v{host}");
        ip_in(
            &bridge,
            &[
                "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &netns,
            ],
        )?;
        ip_in(
            &bridge,
            &["link", "set", &veth, "master", "br0", "alias", &netns, "up"],
        )?;
        ip_in(&netns, &["link", "set", "lo", "up"])?;
        ip_in(&netns, &["addr", "add", &format!("{ip}/16"), "dev", "eth0"])?;
        // `nodad`: usable at once, instead of after duplicate detection.
        ip_in(
            &netns,
            &["addr", "add", &format!("{ip6}/64"), "dev", "eth0", "nodad"],
        )?;
        ip_in(&netns, &["link", "set", "eth0", "up"])?;
        // Destinations off the /16 go to the bridge namespace, which has no
        // route onwards: connections to them fail there, and nothing leaves.
        ip_in(&netns, &["route", "add", "default", "via", "10.200.0.1"])?;
        ip_in(
            &netns,
            &["-6", "route", "add", "default", "via", "fd20:200::1"],
        )?;
        Ok(Pod::new(
            name.to_owned(),
            netns,
            ip,
            ip6,
            self.shared.clone(),
        ))
    }

    /// Tears the bed down now and reports any failure, which `Drop` can only
    /// print.
    pub fn close(self) -> Result<()> {
        let result = self.shared.teardown();
        cleanup::unregister(&self.shared);
        result
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        if let Err(e) = self.shared.teardown() {
            eprintln!(
                "legate-testbed: tearing down bed {}: {e}",
                self.shared.prefix
            );
        }
        cleanup::unregister(&self.shared);
    }
}

fn validate_pod_name(name: &str) -> Result<()> {
    let reason = if name.is_empty() || name.len() > 32 {
        Some("must be 1 to 32 characters long")
    } else if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        Some("may only hold lowercase letters, digits and '-'")
    } else if name.starts_with('-') {
        Some("must not start with '-'")
    } else if name == "br" {
        Some("\"br\" names the bridge namespace")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(Error::InvalidPodName {
            name: name.into(),
            reason,
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::validate_pod_name;

    #[test]
    fn pod_names_are_checked() {
        for good in ["a", "web", "client-1", "0"] {
            assert!(validate_pod_name(good).is_ok(), "{good}");
        }
        for bad in ["", "br", "Web", "a b", "a/b", "-a", &"x".repeat(33)] {
            assert!(validate_pod_name(bad).is_err(), "{bad}");
        }
    }
}
