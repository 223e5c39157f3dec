//! `legate run [--name N] -- CMD ARGS...`: meshes one unmodified process on
//! a plain Linux host.
//!
//! A pod gets `legate init` and a sidecar; a host has no pod, and capturing
//! all of its traffic would capture ssh, the package manager and everything
//! else. So `legate run` captures one process tree only, and only for as
//! long as it runs:
//!
//! 1. It checks everything it can before changing anything: root, the
//!    command, the configuration, the rule plan, the command's user.
//! 2. It takes the namespace's run lock ([`host::RunLock`]) and refuses to
//!    start when legate's chains are present: an earlier run that was
//!    killed (`legate run --cleanup` removes them), or a pod's `legate
//!    init`.
//! 3. It obtains an identity: from the CA given with `--ca` (with
//!    `--token-file` and `--ca-bundle`, or the `identity.*` keys, exactly as
//!    `legate proxy` takes them), or from a throwaway CA it starts itself
//!    ([`embedded_ca`]). The proxy gets copies of the token and bundle in
//!    the run's working directory, readable by its uid.
//! 4. It starts `legate proxy` (this same binary) as `proxy.uid` and
//!    `proxy.gid`, and waits for its `/ready`, so the command's first
//!    connection is already meshed.
//! 5. It installs the interception rules scoped to `init.capture_group`
//!    ([`legate_init::plan::Scope::Group`]): outbound TCP of processes in
//!    that group, and inbound only on `--inbound-ports`.
//! 6. It runs the command as the caller (or `--uid`/`--gid`) with the
//!    capture group added to its supplementary groups; everything the
//!    command starts inherits the group, and nothing else on the host has
//!    it. Signals are forwarded ([`process`]).
//! 7. When the command ends, however it ends, it removes the rules, stops
//!    the proxy (SIGTERM, then SIGKILL after `proxy.drain_grace` and five
//!    seconds), stops the CA and deletes the working directory, then exits
//!    with the command's status.
//!
//! `legate run` itself stays root throughout, so that it can take the
//! rules back. If it is killed with SIGKILL it cannot: the kernel then
//! sends SIGTERM to the proxy and the command (parent-death signal), the
//! rules and the working directory stay, and the next `legate run` refuses
//! to start until `legate run --cleanup` has removed them.
//!
//! # Exit status
//!
//! The command's exit status, or 128 + N when signal N killed it. `legate
//! run`'s own failures exit with 125 (2 for a command line it cannot
//! understand), a command that cannot be executed with 126, and one that
//! is not found with 127.

mod embedded_ca;
mod error;
mod host;
mod process;

use std::ffi::{CString, OsStr, OsString};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitCode};
use std::time::{Duration, Instant};

use clap::Args;
use legate_config::{Config, FlagValue, SpiffeId};
use legate_init::plan::{plan_scoped, Scope};
use legate_init::{Options, Plan};
use nix::sys::signal::{kill, Signal};
use nix::unistd::{getgid, getgroups, getuid, Gid, Group, Pid, Uid, User};
use tracing::{debug, error, info};

use self::embedded_ca::EmbeddedCa;
pub use self::error::RunError;
use self::host::{Rules, RunLock, WorkDir};
use self::process::{describe, exit_code, spawn_proxy, Credentials, Ended, Signals};

/// Flags of `legate run`. Those that name a configuration key set it, as
/// everywhere else; the command comes last, after `--`.
#[derive(Debug, Args)]
#[command(after_help = "\
Only the command and the processes it starts are captured, and everything is
undone when it exits. What it changes on the host is listed in docs/run.md.

Examples:
  sudo legate run -- curl http://10.0.0.7:8080/
  sudo legate run --ca ca.mesh:15012 --token-file token --ca-bundle bundle.pem -- ./worker
  sudo legate run --inbound-ports 8080 -- python3 -m http.server 8080
  sudo legate run --cleanup")]
pub struct RunArgs {
    // clap prints this text as help, where the angle brackets are meant
    // as they stand, not as HTML.
    #[allow(rustdoc::invalid_html_tags)]
    /// Workload name: the identity becomes spiffe://<trust-domain>/<name>; defaults to the command's file name [config: identity.name]
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
    /// The mesh CA's address; without it a throwaway CA is started for this run [config: identity.ca_address]
    #[arg(long, value_name = "HOST:PORT")]
    ca: Option<String>,
    /// PEM roots that verify the CA before the first certificate [config: identity.ca_bundle]
    #[arg(long, value_name = "FILE")]
    ca_bundle: Option<PathBuf>,
    /// File holding the bootstrap token for this identity [config: identity.token_file]
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// permissive or strict: whether clients outside the mesh are accepted [config: proxy.mode]
    #[arg(long, value_name = "MODE")]
    mode: Option<String>,
    /// Inbound ports to capture, such as 8080,9000-9010; none by default, so the host's own services stay untouched [config: init.include_inbound_ports]
    #[arg(long, value_name = "PORTS")]
    inbound_ports: Option<String>,
    /// The supplementary group that marks the wrapped process tree; default 1339 [config: init.capture_group]
    #[arg(long, value_name = "GID")]
    capture_group: Option<String>,
    /// Run the command as this user (name or number); defaults to the caller's uid
    #[arg(long, value_name = "USER")]
    uid: Option<String>,
    /// Run the command with this primary group (name or number); defaults to the caller's, or --uid's own
    #[arg(long, value_name = "GROUP")]
    gid: Option<String>,
    /// Give up when the proxy is not ready within this long, such as 30s or 2m
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    ready_timeout: Duration,
    /// Remove the rules and files left behind by a `legate run` that was killed, then exit
    #[arg(long, conflicts_with = "command")]
    pub(crate) cleanup: bool,
    /// A command given without `--`, only to say where it belongs.
    #[arg(hide = true, allow_hyphen_values = true, conflicts_with = "cleanup")]
    misplaced: Vec<OsString>,
    /// The command to run and its arguments
    #[arg(last = true, value_name = "CMD")]
    command: Vec<OsString>,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    legate_config::parse_duration(s)
}

impl RunArgs {
    /// The configuration keys these flags set.
    pub fn config_overrides(&self) -> Vec<FlagValue> {
        let path = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string());
        [
            ("identity.name", "--name", self.name.clone()),
            ("identity.ca_address", "--ca", self.ca.clone()),
            ("identity.ca_bundle", "--ca-bundle", path(&self.ca_bundle)),
            (
                "identity.token_file",
                "--token-file",
                path(&self.token_file),
            ),
            ("proxy.mode", "--mode", self.mode.clone()),
            (
                "init.include_inbound_ports",
                "--inbound-ports",
                self.inbound_ports.clone(),
            ),
            (
                "init.capture_group",
                "--capture-group",
                self.capture_group.clone(),
            ),
        ]
        .into_iter()
        .filter_map(|(key, flag, value)| {
            value.map(|value| FlagValue {
                path: key.into(),
                flag: format!("{flag} {value}"),
                value,
            })
        })
        .collect()
    }
}

/// Runs `legate run` with a loaded configuration and returns its exit code.
pub fn run(args: RunArgs, config: Config) -> ExitCode {
    let result = if args.cleanup {
        clean(&config)
    } else {
        wrap(args, config)
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// `legate run --cleanup`.
fn clean(config: &Config) -> Result<u8, RunError> {
    if !nix::unistd::geteuid().is_root() {
        return Err(RunError::NotRoot {
            proxy_uid: config.proxy.uid,
        });
    }
    let done = host::clean_left_behind(&Options::from_config(&config.init))?;
    if done.is_empty() {
        println!("nothing of an earlier `legate run` is left here; nothing removed");
    }
    for line in done {
        println!("{line}");
    }
    Ok(0)
}

/// Everything the run set up, taken back in reverse order by
/// [`Session::teardown`], also when start-up fails half-way or panics.
struct Session {
    rules: Option<Rules>,
    proxy: Option<Child>,
    proxy_grace: Duration,
    ca: Option<EmbeddedCa>,
    work: Option<WorkDir>,
}

impl Session {
    /// Removes the rules, stops the proxy and the CA, deletes the working
    /// directory. Each step runs even when an earlier one failed; the
    /// failures are returned.
    fn teardown(&mut self) -> Vec<RunError> {
        let mut failed = Vec::new();
        if let Some(rules) = self.rules.take() {
            if let Err(e) = rules.remove() {
                failed.push(e);
            }
        }
        if let Some(mut proxy) = self.proxy.take() {
            if let Err(e) = stop(&mut proxy, self.proxy_grace) {
                failed.push(e);
            }
        }
        if let Some(mut ca) = self.ca.take() {
            ca.stop();
        }
        if let Some(mut work) = self.work.take() {
            if let Err(e) = work.remove() {
                failed.push(e);
            }
        }
        failed
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        for e in self.teardown() {
            eprintln!("error: while cleaning up: {e}; run `legate run --cleanup`");
        }
    }
}

/// Stops the proxy: SIGTERM lets it drain; after `grace`, SIGKILL.
fn stop(proxy: &mut Child, grace: Duration) -> Result<(), RunError> {
    let reap = |e| RunError::io("waiting for the proxy to stop", e);
    if proxy.try_wait().map_err(reap)?.is_some() {
        return Ok(());
    }
    // Not reaped yet, so the pid is still the proxy's.
    let pid = Pid::from_raw(i32::try_from(proxy.id()).unwrap_or(i32::MAX));
    let _ = kill(pid, Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Some(status) = proxy.try_wait().map_err(reap)? {
            debug!("the proxy stopped: {}", describe(status));
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    error!("the proxy did not stop within {grace:?} of SIGTERM; killing it");
    proxy.kill().map_err(reap)?;
    proxy.wait().map_err(reap)?;
    Ok(())
}

fn wrap(args: RunArgs, config: Config) -> Result<u8, RunError> {
    // 1. Everything that can be checked without changing anything.
    if !args.misplaced.is_empty() {
        return Err(RunError::MissingDashDash {
            command: args
                .misplaced
                .iter()
                .map(|a| a.to_string_lossy())
                .collect::<Vec<_>>()
                .join(" "),
        });
    }
    let argv = args.command;
    let program = argv.first().ok_or(RunError::NoCommand)?.clone();
    if !nix::unistd::geteuid().is_root() {
        return Err(RunError::NotRoot {
            proxy_uid: config.proxy.uid,
        });
    }
    let (mut config, id) = resolve_identity(config, &program)?;
    // On a host no inbound port is captured unless listed. The proxy reads
    // this too: it forwards a peer to localhost only on captured ports.
    if config.init.include_inbound_ports.is_empty() {
        config.init.capture_inbound = false;
    }
    let plan: Plan = plan_scoped(
        &config.init,
        &config.proxy,
        Scope::Group(config.init.capture_group),
    )?;
    let command_user = command_credentials(args.uid.as_deref(), args.gid.as_deref(), &config)?;
    let proxy_user = Credentials {
        uid: Uid::from_raw(config.proxy.uid),
        gid: Gid::from_raw(config.proxy.gid),
        groups: Vec::new(),
    };
    let admin = crate::wait_ready::local_admin(&config);
    let opts = Options::from_config(&config.init);
    let signals = Signals::start()?;

    // 2. The namespace is ours, and holds nothing of legate's.
    let _lock = RunLock::acquire()?;
    host::refuse_installed(&opts)?;

    // 3.-4. Identity and proxy; from here on the session takes back what
    // was set up.
    let mut session = Session {
        rules: None,
        proxy: None,
        proxy_grace: config.proxy.drain_grace + Duration::from_secs(5),
        ca: None,
        work: None,
    };
    let work = session
        .work
        .insert(WorkDir::create(config.proxy.uid, config.proxy.gid)?);
    let proxy_config = proxy_config(&config, &id, work, &mut session.ca)?;
    let config_file = work.write_public("proxy.toml", proxy_config.to_toml().as_bytes())?;
    let proxy = session.proxy.insert(spawn_proxy(&config_file, proxy_user)?);
    wait_ready(proxy, admin, &signals, args.ready_timeout)?;

    // 5. Capture, then 6. the command.
    session.rules = Some(Rules::install(&plan, &opts)?);
    info!(
        %id,
        capture_group = config.init.capture_group,
        inbound_ports = %inbound_ports(&config),
        "proxy ready and rules installed; starting {}",
        Path::new(&program).display()
    );
    let mut command = signals.spawn_command(&argv, command_user)?;
    let status = loop {
        match command.wait(&mut session.proxy)? {
            Ended::Command(status) => break status,
            Ended::Proxy(status) => {
                error!(
                    "the proxy exited under the command ({}); the command's connections can no \
                     longer be made, so it is asked to stop (SIGTERM)",
                    describe(status)
                );
                command.signal(Signal::SIGTERM);
            }
        }
    };
    debug!("the command ended: {}", describe(status));

    // 7. Take everything back.
    let mut failed = session.teardown();
    if failed.is_empty() {
        return Ok(exit_code(status));
    }
    for e in &failed[1..] {
        eprintln!("error: while cleaning up: {e}");
    }
    Err(RunError::Cleanup {
        ended: describe(status),
        source: Box::new(failed.swap_remove(0)),
    })
}

/// The inbound ports captured, for the log.
fn inbound_ports(config: &Config) -> String {
    let ports = &config.init.include_inbound_ports;
    if config.init.capture_inbound && !ports.is_empty() {
        ports.to_string()
    } else {
        "none".into()
    }
}

/// Fills in the workload name from the command when no identity is
/// configured, and checks the identity and CA settings.
fn resolve_identity(mut config: Config, program: &OsStr) -> Result<(Config, SpiffeId), RunError> {
    let ident = &mut config.identity;
    let derived = ident.id.is_none()
        && ident.name.is_none()
        && ident.namespace.is_none()
        && ident.service_account.is_none();
    if derived {
        let base = Path::new(program)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        ident.name = Some(base);
    }
    let id = ident.workload_id().map_err(|e| {
        if derived {
            RunError::config(
                "--name",
                format!("the command's file name cannot name the workload ({e}); give a name with --name"),
            )
        } else {
            RunError::config("identity", e)
        }
    })?;
    if ident.ca_address.is_none()
        && (ident.token.is_some() || ident.token_file.is_some() || ident.ca_bundle.is_some())
    {
        return Err(RunError::config(
            "--ca",
            "a token or CA bundle is given (--token-file, --ca-bundle or identity.*) but no CA \
             address; give the mesh's CA with --ca HOST:PORT, or leave them out to use a \
             throwaway CA for this run",
        ));
    }
    Ok((config, id))
}

/// The configuration the proxy runs with: this run's, with the identity
/// pointing at files in the working directory that the proxy can read.
fn proxy_config(
    config: &Config,
    id: &SpiffeId,
    work: &WorkDir,
    ca: &mut Option<EmbeddedCa>,
) -> Result<Config, RunError> {
    let mut out = config.clone();
    let ident = &mut out.identity;
    let read = |flag: &'static str, path: &Path| {
        std::fs::read(path).map_err(|source| RunError::Input {
            flag,
            path: path.to_owned(),
            source,
        })
    };
    match &config.identity.ca_address {
        None => {
            let embedded = ca.insert(EmbeddedCa::start(
                &work.path().join("ca"),
                &config.identity.trust_domain,
                &config.ca,
            )?);
            let token = embedded.token(id, config.ca.token_ttl)?;
            ident.ca_address = Some(embedded.address().to_string());
            ident.token_file = Some(work.write_secret("token", token.as_bytes())?);
            let bundle = read("the embedded CA's bundle", &embedded.bundle_path())?;
            ident.ca_bundle = Some(work.write_public("bundle.pem", &bundle)?);
        }
        Some(_) => {
            // Copies, so that files only root can read still work.
            if let Some(token) = &config.identity.token {
                ident.token_file = Some(work.write_secret("token", token.expose().as_bytes())?);
            } else if let Some(path) = &config.identity.token_file {
                let token = read("--token-file", path)?;
                ident.token_file = Some(work.write_secret("token", &token)?);
            }
            if let Some(path) = &config.identity.ca_bundle {
                let bundle = read("--ca-bundle", path)?;
                // Checked here: the proxy would read the copy, and its error
                // would name a file that is gone once the run ends.
                if let Err(e) = legate_ca::Bundle::from_pem(&bundle) {
                    return Err(RunError::Config {
                        field: "--ca-bundle".into(),
                        problem: format!(
                            "{} is not a usable trust bundle ({e}); give the CA's roots in PEM, as `legate ca bundle` prints them",
                            path.display()
                        ),
                    });
                }
                ident.ca_bundle = Some(work.write_public("bundle.pem", &bundle)?);
            }
        }
    }
    ident.token = None;
    Ok(out)
}

fn wait_ready(
    proxy: &mut Child,
    admin: SocketAddr,
    signals: &Signals,
    timeout: Duration,
) -> Result<(), RunError> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(signal) = signals.interrupted() {
            return Err(RunError::Interrupted { signal });
        }
        if let Some(status) = proxy
            .try_wait()
            .map_err(|e| RunError::io("checking on the proxy", e))?
        {
            return Err(RunError::ProxyExited {
                status: describe(status),
            });
        }
        if crate::wait_ready::ready(admin) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(RunError::ProxyNotReady { timeout, admin });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Who the command runs as: `--uid`/`--gid` or the caller, with the
/// caller's (or that user's) supplementary groups plus the capture group.
fn command_credentials(
    uid: Option<&str>,
    gid: Option<&str>,
    config: &Config,
) -> Result<Credentials, RunError> {
    let errno = |what: &str, e: nix::Error| RunError::io(what.to_owned(), e.into());
    let user = match uid {
        None => None,
        Some(u) => Some(lookup_user(u)?),
    };
    let gid = match (gid, &user) {
        (Some(g), _) => lookup_group(g)?,
        (None, Some((_, Some(entry)))) => entry.gid,
        (None, Some((uid, None))) => {
            return Err(RunError::config(
                "--gid",
                format!("uid {uid} has no entry in /etc/passwd, so its primary group is unknown; give --gid too"),
            ))
        }
        (None, None) => getgid(),
    };
    let mut groups = match &user {
        None => getgroups().map_err(|e| errno("reading the caller's groups", e))?,
        Some((_, Some(entry))) => {
            let name = CString::new(entry.name.as_bytes()).map_err(|_| {
                RunError::config(
                    "--uid",
                    format!("user name {:?} holds a NUL byte", entry.name),
                )
            })?;
            nix::unistd::getgrouplist(&name, gid)
                .map_err(|e| errno(&format!("reading the groups of {}", entry.name), e))?
        }
        Some((_, None)) => Vec::new(),
    };
    let uid = user.map_or_else(getuid, |(uid, _)| uid);
    let capture = Gid::from_raw(config.init.capture_group);
    if !groups.contains(&capture) {
        groups.push(capture);
    }
    if uid.as_raw() == config.proxy.uid {
        return Err(RunError::config(
            "--uid",
            format!(
                "the command would run as uid {uid}, the proxy's (proxy.uid), whose traffic is \
                 never captured; run it as another user"
            ),
        ));
    }
    if gid.as_raw() == config.proxy.gid {
        return Err(RunError::config(
            "--gid",
            format!(
                "the command would run with gid {gid}, the proxy's (proxy.gid), whose traffic \
                 is never captured; give it another group"
            ),
        ));
    }
    Ok(Credentials { uid, gid, groups })
}

/// A user by number or name, and its passwd entry when there is one.
fn lookup_user(s: &str) -> Result<(Uid, Option<User>), RunError> {
    let looked_up = |r: nix::Result<Option<User>>| {
        r.map_err(|e| RunError::io(format!("looking up user {s}"), e.into()))
    };
    if let Ok(n) = s.parse::<u32>() {
        let uid = Uid::from_raw(n);
        return Ok((uid, looked_up(User::from_uid(uid))?));
    }
    match looked_up(User::from_name(s))? {
        Some(u) => Ok((u.uid, Some(u))),
        None => Err(RunError::config(
            "--uid",
            format!("there is no user named {s:?}; give a user name from /etc/passwd or a number"),
        )),
    }
}

/// A group by number or name.
fn lookup_group(s: &str) -> Result<Gid, RunError> {
    if let Ok(n) = s.parse::<u32>() {
        return Ok(Gid::from_raw(n));
    }
    match Group::from_name(s) {
        Ok(Some(g)) => Ok(g.gid),
        Ok(None) => Err(RunError::config(
            "--gid",
            format!("there is no group named {s:?}; give a group name from /etc/group or a number"),
        )),
        Err(e) => Err(RunError::io(format!("looking up group {s}"), e.into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Wrapper {
        #[command(flatten)]
        args: RunArgs,
    }

    fn parse(argv: &[&str]) -> Result<RunArgs, clap::Error> {
        Wrapper::try_parse_from(std::iter::once("run").chain(argv.iter().copied())).map(|w| w.args)
    }

    fn loaded(args: &RunArgs) -> Config {
        legate_config::load(&legate_config::Sources {
            flags: args.config_overrides(),
            ..Default::default()
        })
        .unwrap()
        .config
    }

    #[test]
    fn the_command_comes_after_the_double_dash() {
        let a = parse(&["--name", "web", "--", "curl", "-s", "--name", "x"]).unwrap();
        assert_eq!(a.command, ["curl", "-s", "--name", "x"]);
        assert_eq!(a.name.as_deref(), Some("web"));
        // Without `--`, the command is kept aside to say where it belongs,
        // its own flags included.
        let a = parse(&["--name", "web", "curl", "-s", "http://x/"]).unwrap();
        assert_eq!(a.misplaced, ["curl", "-s", "http://x/"]);
        assert!(a.command.is_empty());
        assert!(parse(&["--cleanup", "--", "true"]).is_err());
        assert!(parse(&["--cleanup", "true"]).is_err());
        assert!(parse(&[]).unwrap().command.is_empty());
    }

    #[test]
    fn flags_become_config_keys() {
        let a = parse(&[
            "--ca",
            "10.0.0.1:15012",
            "--inbound-ports",
            "8080,9000-9001",
            "--capture-group",
            "2000",
            "--",
            "true",
        ])
        .unwrap();
        let c = loaded(&a);
        assert_eq!(c.identity.ca_address.as_deref(), Some("10.0.0.1:15012"));
        assert!(c.init.include_inbound_ports.contains(9001));
        assert_eq!(c.init.capture_group, 2000);
        for f in a.config_overrides() {
            assert!(legate_config::key_paths().contains(&f.path), "{}", f.path);
        }
    }

    #[test]
    fn the_name_defaults_to_the_command_and_must_be_valid() {
        let a = parse(&["--", "/usr/bin/python3", "-m", "http.server"]).unwrap();
        let (_, id) = resolve_identity(loaded(&a), OsStr::new("/usr/bin/python3")).unwrap();
        assert_eq!(id.as_str(), "spiffe://legate.local/python3");

        let a = parse(&["--name", "web", "--", "curl"]).unwrap();
        let (_, id) = resolve_identity(loaded(&a), OsStr::new("curl")).unwrap();
        assert_eq!(id.as_str(), "spiffe://legate.local/web");

        let a = parse(&["--", "/bin/a b"]).unwrap();
        let e = resolve_identity(loaded(&a), OsStr::new("/bin/a b"))
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(e.contains("--name"), "{e}");
    }

    #[test]
    fn a_token_without_a_ca_is_refused() {
        let a = parse(&["--token-file", "/tmp/t", "--", "curl"]).unwrap();
        let e = resolve_identity(loaded(&a), OsStr::new("curl"))
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(e.contains("--ca HOST:PORT"), "{e}");
    }

    #[test]
    fn the_command_gets_the_capture_group_and_never_the_proxy_ids() {
        let c = Config::default();
        let who = command_credentials(Some("4242"), Some("4243"), &c).unwrap();
        assert_eq!(who.uid.as_raw(), 4242);
        assert_eq!(who.gid.as_raw(), 4243);
        assert!(who.groups.contains(&Gid::from_raw(1339)));
        let e = command_credentials(Some("4242"), None, &c)
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(e.contains("--gid"), "{e}");
        let e = command_credentials(Some("1337"), Some("10"), &c)
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(e.contains("proxy.uid"), "{e}");
        let root = command_credentials(Some("root"), None, &c).unwrap();
        assert_eq!((root.uid.as_raw(), root.gid.as_raw()), (0, 0));
    }
}
