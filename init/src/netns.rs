//! Running work inside another network namespace.
//!
//! `--netns NAME` moves one new thread into the namespace with `setns(2)`
//! and runs the work there; the programs it starts inherit the namespace
//! from that thread. The rest of the process, and so the caller, stays
//! where it was, which is what lets tests and `legate run` use this as a
//! library. nix wraps `setns` safely, so the crate needs no `unsafe`.

use std::fs::File;
use std::os::fd::AsFd;
use std::path::PathBuf;

use nix::sched::CloneFlags;

use crate::error::InitError;

/// The file of a namespace: `/run/netns/NAME` for a name as `ip netns add`
/// makes it, or the path itself when it contains a `/` (such as
/// `/proc/PID/ns/net`, which is what a CNI plugin or a container runtime
/// hands over).
pub fn netns_path(name: &str) -> PathBuf {
    if name.contains('/') {
        PathBuf::from(name)
    } else {
        PathBuf::from("/run/netns").join(name)
    }
}

/// Runs `f` in the namespace `netns`, or on the calling thread when it is
/// `None`. A panic in `f` reaches the caller unchanged.
pub fn within<T, F>(netns: Option<&str>, f: F) -> Result<T, InitError>
where
    F: FnOnce() -> Result<T, InitError> + Send,
    T: Send,
{
    let Some(name) = netns else {
        return f();
    };
    if name.is_empty() {
        return Err(InitError::Netns {
            name: name.to_owned(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "the name is empty"),
        });
    }
    let fail = |source| InitError::Netns {
        name: name.to_owned(),
        source,
    };
    let file = File::open(netns_path(name)).map_err(fail)?;
    std::thread::scope(|scope| {
        let joined = std::thread::Builder::new()
            .name(format!("netns {name}"))
            .spawn_scoped(scope, || {
                nix::sched::setns(file.as_fd(), CloneFlags::CLONE_NEWNET)
                    .map_err(|e| fail(std::io::Error::from(e)))?;
                f()
            })
            .map_err(|e| InitError::io("starting a thread", e))?
            .join();
        match joined {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_paths() {
        assert_eq!(netns_path("pod-a"), PathBuf::from("/run/netns/pod-a"));
        assert_eq!(
            netns_path("/proc/1/ns/net"),
            PathBuf::from("/proc/1/ns/net")
        );
    }

    #[test]
    fn a_missing_namespace_names_the_fix() {
        let e = within(Some("legate-no-such-namespace"), || Ok(())).unwrap_err();
        assert!(e.to_string().contains("ip netns add"), "{e}");
    }
}
