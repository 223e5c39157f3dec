//! What `legate run` changes on the host, and how each change is taken
//! back: the namespace lock, the iptables rules and the working directory.
//!
//! - **The lock** is an abstract unix socket, `@legate-run`. Abstract
//!   sockets belong to a network namespace and vanish with the process that
//!   bound them, even one killed with SIGKILL, so there is never a stale
//!   lock file, and two runs in different namespaces never see each other.
//!   Taking it before reading the rules means that rules found afterwards
//!   cannot belong to a live run: they were left by one that died.
//! - **The rules** are installed with the init crate's [`apply`] and
//!   removed with its [`cleanup`], through the backend they were installed
//!   with. A run refuses to start when any of legate's rules are present,
//!   so what `cleanup` removes at the end is exactly what the run added.
//! - **The working directory** `legate-run-<pid>-XXXXXX` in the temporary
//!   directory holds what the proxy reads (configuration, token, bundle)
//!   and the embedded CA's keys, and is deleted at the end. The pid in its
//!   name lets `legate run --cleanup` tell a dead run's directory from a
//!   live one's.

use std::fs;
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::{SocketAddr as UnixAddr, UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use legate_config::{Backend, Ipv6Mode};
use legate_init::plan::Scope;
use legate_init::{apply, cleanup, installed, Engine, Options, Plan};
use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};

use super::error::RunError;

/// The abstract socket name that marks a namespace as taken by a run.
pub const LOCK_NAME: &[u8] = b"legate-run";
/// Working directories are named `<prefix><pid>-XXXXXX`.
pub const WORKDIR_PREFIX: &str = "legate-run-";

/// Held for as long as the run lasts.
pub struct RunLock {
    _listener: UnixListener,
}

impl RunLock {
    /// Takes this network namespace's run lock, or says who holds it.
    pub fn acquire() -> Result<RunLock, RunError> {
        let addr = UnixAddr::from_abstract_name(LOCK_NAME)
            .map_err(|e| RunError::io("naming the run lock", e))?;
        match UnixListener::bind_addr(&addr) {
            Ok(listener) => Ok(RunLock {
                _listener: listener,
            }),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => Err(RunError::Busy {
                holder: holder(&addr),
            }),
            Err(e) => Err(RunError::io("taking the run lock (@legate-run)", e)),
        }
    }
}

/// The pid of the process holding the lock, from its socket's credentials.
fn holder(addr: &UnixAddr) -> Option<i32> {
    let stream = UnixStream::connect_addr(addr).ok()?;
    getsockopt(&stream.as_fd(), PeerCredentials)
        .ok()
        .map(|c| c.pid())
}

fn backend_of(engine: Engine) -> Backend {
    match engine {
        Engine::Nft => Backend::Nft,
        Engine::Legacy => Backend::Legacy,
    }
}

/// Refuses to go on when legate's chains are in the namespace already,
/// naming who left them.
pub fn refuse_installed(opts: &Options) -> Result<(), RunError> {
    match installed(opts)?.first() {
        None => Ok(()),
        Some(found) => {
            let engine = found.engine.to_string();
            Err(match found.scope() {
                Some(Scope::Group(_)) => RunError::StaleRules { engine },
                _ => RunError::PodRules { engine },
            })
        }
    }
}

/// Rules this run installed.
#[derive(Debug)]
pub struct Rules {
    engine: Engine,
    ipv6: Ipv6Mode,
}

impl Rules {
    /// Installs `plan` in the current namespace.
    pub fn install(plan: &Plan, opts: &Options) -> Result<Rules, RunError> {
        let report = apply(plan, opts)?;
        tracing::debug!("installed the interception rules: {report}");
        Ok(Rules {
            engine: report.engine,
            ipv6: opts.ipv6,
        })
    }

    /// Removes every chain and jump of legate's, from the backend they were
    /// installed with.
    pub fn remove(self) -> Result<(), RunError> {
        let opts = Options {
            netns: None,
            backend: backend_of(self.engine),
            ipv6: self.ipv6,
        };
        for report in cleanup(&opts)? {
            tracing::debug!("removed the interception rules: {report}");
        }
        Ok(())
    }
}

/// `legate run --cleanup`: removes what a killed run left behind, and
/// says what it did.
pub fn clean_left_behind(opts: &Options) -> Result<Vec<String>, RunError> {
    let _lock = RunLock::acquire()?;
    let mut done = Vec::new();
    let found = installed(opts)?;
    if let Some(pod) = found
        .iter()
        .find(|f| !matches!(f.scope(), Some(Scope::Group(_))))
    {
        return Err(RunError::config(
            "--cleanup",
            format!(
                "the rules here ({} backend) were installed by `legate init`, not by `legate run`; \
                 if they are stale, remove them with `legate init --cleanup`",
                pod.engine
            ),
        ));
    }
    for f in &found {
        let opts = Options {
            backend: backend_of(f.engine),
            ..opts.clone()
        };
        cleanup(&opts)?;
        done.push(format!(
            "removed the iptables rules of an earlier `legate run` ({} backend)",
            f.engine
        ));
    }
    for dir in stale_workdirs(&std::env::temp_dir()) {
        match fs::remove_dir_all(&dir) {
            Ok(()) => done.push(format!("removed {}", dir.display())),
            Err(e) => {
                return Err(RunError::io(format!("removing {}", dir.display()), e));
            }
        }
    }
    Ok(done)
}

/// Working directories of runs whose process is gone: root-owned
/// directories named `legate-run-<pid>-*` whose pid is not running.
fn stale_workdirs(tmp: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(tmp) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| {
            let name = e.file_name();
            let Some(pid) = name
                .to_str()
                .and_then(|n| n.strip_prefix(WORKDIR_PREFIX))
                .and_then(|rest| rest.split('-').next())
                .and_then(|pid| pid.parse::<i32>().ok())
            else {
                return false;
            };
            let ours = e
                .path()
                .symlink_metadata()
                .is_ok_and(|m| m.is_dir() && m.uid() == 0);
            ours && !Path::new(&format!("/proc/{pid}")).exists()
        })
        .map(|e| e.path())
        .collect()
}

/// The run's working directory, deleted with everything in it at the end.
pub struct WorkDir {
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
    proxy_uid: u32,
    proxy_gid: u32,
}

impl WorkDir {
    /// Creates it: root-owned, mode 0711, so the proxy can open the files
    /// it is given by name but cannot list or change anything.
    pub fn create(proxy_uid: u32, proxy_gid: u32) -> Result<WorkDir, RunError> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("{WORKDIR_PREFIX}{}-", std::process::id()))
            .tempdir()
            .map_err(|e| RunError::io("creating the working directory", e))?;
        let path = dir.path().to_owned();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o711))
            .map_err(|e| RunError::io(format!("setting the mode of {}", path.display()), e))?;
        check_searchable(&path)?;
        Ok(WorkDir {
            dir: Some(dir),
            path,
            proxy_uid,
            proxy_gid,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes a file only the proxy's uid can read (mode 0400).
    pub fn write_secret(&self, name: &str, contents: &[u8]) -> Result<PathBuf, RunError> {
        self.write(name, contents, 0o400, true)
    }

    /// Writes a file anyone can read (mode 0444).
    pub fn write_public(&self, name: &str, contents: &[u8]) -> Result<PathBuf, RunError> {
        self.write(name, contents, 0o444, false)
    }

    fn write(
        &self,
        name: &str,
        contents: &[u8],
        mode: u32,
        to_proxy: bool,
    ) -> Result<PathBuf, RunError> {
        let path = self.path.join(name);
        let context = || format!("writing {}", path.display());
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&path)
            .map_err(|e| RunError::io(context(), e))?;
        if to_proxy {
            std::os::unix::fs::fchown(&file, Some(self.proxy_uid), Some(self.proxy_gid))
                .map_err(|e| RunError::io(context(), e))?;
        }
        file.write_all(contents)
            .map_err(|e| RunError::io(context(), e))?;
        Ok(path)
    }

    /// Deletes the directory and everything in it.
    pub fn remove(&mut self) -> Result<(), RunError> {
        match self.dir.take() {
            Some(dir) => dir
                .close()
                .map_err(|e| RunError::io(format!("removing {}", self.path.display()), e)),
            None => Ok(()),
        }
    }
}

/// The proxy runs as another user and must reach the directory: every
/// directory above it needs the search bit for others.
fn check_searchable(path: &Path) -> Result<(), RunError> {
    for dir in path.ancestors().skip(1) {
        let Ok(meta) = dir.metadata() else { continue };
        if meta.mode() & 0o001 == 0 {
            return Err(RunError::config(
                "TMPDIR",
                format!(
                    "{} is not searchable by other users, so the proxy (running as proxy.uid) \
                     could not read its files there; point TMPDIR at a directory such as /tmp",
                    dir.display()
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_dead_runs_directories_are_stale() {
        let tmp = tempfile::tempdir().unwrap();
        let live = tmp
            .path()
            .join(format!("{WORKDIR_PREFIX}{}-abc", std::process::id()));
        // Pids are below 2^22 on Linux, so this one runs nowhere.
        let dead = tmp.path().join(format!("{WORKDIR_PREFIX}99999999-abc"));
        let other = tmp.path().join("legate-runner-1-abc");
        for d in [&live, &dead, &other] {
            fs::create_dir(d).unwrap();
        }
        let stale = stale_workdirs(tmp.path());
        if nix::unistd::geteuid().is_root() {
            assert_eq!(stale, vec![dead]);
        } else {
            assert!(stale.is_empty(), "only root-owned directories are removed");
        }
    }
}
