//! `legate proxy`: the sidecar. Obtains the workload certificate from the
//! CA, keeps it renewed, and runs the data plane until SIGTERM, SIGINT or
//! the admin server's `POST /shutdown`, then drains and exits 0.
//!
//! SIGHUP, or a change to the configuration file (checked every second),
//! reloads the configuration from the same sources it was first read
//! from. A valid one replaces the policy in force (see
//! `legate_proxy::Shared::reload`) and the log level; an invalid one is
//! refused, every error logged, and the running configuration stays.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use clap::Args;
use legate_ca::{IdentityManager, ManagerOptions};
use legate_config::{Config, FlagValue, Sources};
use legate_proxy::{Hooks, Proxy, Shared};
use tracing::{error, info, warn};

use crate::identity::CaIdentity;
use crate::logging;

/// Flags of `legate proxy`; each sets the configuration key it names.
#[derive(Debug, Args)]
pub struct ProxyArgs {
    // clap prints this text as help, where the angle brackets are meant
    // as they stand, not as HTML.
    #[allow(rustdoc::invalid_html_tags)]
    /// Workload name outside Kubernetes: the identity becomes spiffe://<trust-domain>/<name> [config: identity.name]
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
    /// The CA's address, host:port [config: identity.ca_address]
    #[arg(long, value_name = "HOST:PORT")]
    ca: Option<String>,
    /// PEM roots that verify the CA before the first certificate [config: identity.ca_bundle]
    #[arg(long, value_name = "FILE")]
    ca_bundle: Option<PathBuf>,
    /// File holding the bootstrap or ServiceAccount token [config: identity.token_file]
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// permissive or strict: whether clients outside the mesh are accepted [config: proxy.mode]
    #[arg(long, value_name = "MODE")]
    mode: Option<String>,
}

impl ProxyArgs {
    pub fn config_overrides(&self) -> Vec<FlagValue> {
        let mut out = Vec::new();
        let mut push = |path: &str, flag: &str, value: Option<String>| {
            if let Some(value) = value {
                out.push(FlagValue {
                    path: path.into(),
                    flag: format!("--{flag} {value}"),
                    value,
                });
            }
        };
        push("identity.name", "name", self.name.clone());
        push("identity.ca_address", "ca", self.ca.clone());
        let path = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string());
        push("identity.ca_bundle", "ca-bundle", path(&self.ca_bundle));
        push("identity.token_file", "token-file", path(&self.token_file));
        push("proxy.mode", "mode", self.mode.clone());
        out
    }
}

/// Resolves when the process is asked to stop.
async fn stop_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers the proxy cannot drain; run until killed.
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: shutting down"),
        _ = int.recv() => info!("SIGINT: shutting down"),
    }
}

/// The file's modification time and length, to notice a change.
fn stamp(path: &std::path::Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// Reloads on SIGHUP and when the configuration file changes.
async fn reload_loop(shared: Arc<Shared>, sources: Sources, mut level: String) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = signal(SignalKind::hangup()).ok();
    let file = sources.file.clone();
    let mut seen = file.as_deref().and_then(stamp);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let why = tokio::select! {
            Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => None } } => "SIGHUP",
            // Without a file there is nothing to watch, and no reason
            // to wake an idle proxy every second.
            _ = tick.tick(), if file.is_some() => {
                let now = file.as_deref().and_then(stamp);
                if now == seen {
                    continue;
                }
                seen = now;
                "the configuration file changed"
            }
            // Neither a signal handler nor a file: nothing can ask for a
            // reload.
            else => return,
        };
        let loaded = tokio::task::spawn_blocking({
            let sources = sources.clone();
            move || legate_config::load(&sources)
        })
        .await;
        let config = match loaded {
            Ok(Ok(l)) => l.config,
            Ok(Err(e)) => {
                error!("{why}: configuration reload refused; the running configuration stays in force. {e}");
                shared.reload_failed();
                continue;
            }
            Err(e) => {
                error!("{why}: configuration reload failed: {e}");
                shared.reload_failed();
                continue;
            }
        };
        if let Err(e) = logging::validate_filter(&config.log.level) {
            error!("{why}: configuration reload refused; the running configuration stays in force. {e}");
            shared.reload_failed();
            continue;
        }
        let new_level = config.log.level.clone();
        let restart = shared.reload(config);
        if new_level != level {
            match logging::set_level(&new_level) {
                Ok(()) => level = new_level,
                Err(e) => warn!("{e}"),
            }
        }
        info!("{why}: configuration reloaded");
        if !restart.is_empty() {
            warn!(
                keys = %restart.join(", "),
                "these settings changed but only take effect after a restart"
            );
        }
    }
}

/// Starts exporting traces when `telemetry.otlp_endpoint` is set.
fn start_tracing(
    config: &Config,
    service: &str,
) -> Result<Option<legate_proxy::telemetry::Tracing>, ExitCode> {
    let Some(endpoint) = &config.telemetry.otlp_endpoint else {
        return Ok(None);
    };
    match legate_proxy::telemetry::Tracing::start(
        endpoint,
        config.telemetry.otlp_ca_file.as_deref(),
        config.telemetry.trace_sample,
        service,
        tokio::runtime::Handle::current(),
    ) {
        Ok(t) => {
            info!(%endpoint, "exporting traces over OTLP/HTTP");
            Ok(Some(t))
        }
        Err(e) => {
            error!("{e}");
            Err(ExitCode::FAILURE)
        }
    }
}

/// Below this many open files, the proxy warns that it will run short.
const FEW_FILES: u64 = 4096;

/// Raises the soft limit on open files to the hard one. Each connection
/// the proxy carries takes one or two descriptors, and the soft limit many
/// hosts start processes with (1024, kept low for programs that use
/// `select`) would cap it at a few hundred; the proxy uses epoll, so the
/// hard limit is its real bound, as Go's runtime and nginx's
/// `worker_rlimit_nofile` also have it. Only the proxy's own process is
/// changed: `legate run` starts the application with the limits it had.
fn raise_open_files() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok(limits) => limits,
        Err(e) => {
            warn!(error = %e, "cannot read the open-file limit");
            return;
        }
    };
    let mut limit = soft;
    if soft < hard {
        match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => limit = hard,
            Err(e) => warn!(soft, hard, error = %e, "cannot raise the open-file limit"),
        }
    }
    if limit < FEW_FILES {
        warn!(
            limit,
            "the open-file limit allows only about {} connections through the proxy; raise the hard limit (ulimit -Hn, systemd LimitNOFILE=, the container runtime's nofile)",
            limit / 2
        );
    }
}

/// Runs the proxy. `sources` are what the configuration was loaded from,
/// read again on reload.
pub fn run(config: Config, sources: Sources) -> ExitCode {
    raise_open_files();
    // The listeners' thread; further workers, when configured, start
    // their own runtimes (see the proxy's `worker` module).
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(async move {
        let config = Arc::new(config);
        let opts = match ManagerOptions::from_config(&config.identity) {
            Ok(o) => o,
            Err(e) => {
                error!("{e}");
                return ExitCode::FAILURE;
            }
        };
        let local = opts.id.clone();
        let manager = match IdentityManager::new(opts) {
            Ok(m) => m,
            Err(e) => {
                error!("{e}");
                return ExitCode::FAILURE;
            }
        };
        let stats = manager.stats();
        let (creds, renewals) = manager.spawn();
        let tracing = match start_tracing(&config, local.as_str()) {
            Ok(t) => t,
            Err(code) => return code,
        };
        let identity = Arc::new(
            CaIdentity::new(creds, local, config.identity.trust_domain.clone()).with_stats(stats),
        );
        let hooks = Hooks {
            set_log_level: Some(Box::new(|level: &str| {
                logging::set_level(level).map_err(|e| e.to_string())
            })),
            tracing,
            access_log: None,
        };
        let level = config.log.level.clone();
        let proxy = match Proxy::bind_with(config, identity, hooks) {
            Ok(p) => p,
            Err(e) => {
                error!("{e}");
                return ExitCode::FAILURE;
            }
        };
        let shared = proxy.shared().clone();
        let reloads = tokio::spawn(reload_loop(shared.clone(), sources, level));
        proxy.run(stop_signal()).await;
        reloads.abort();
        renewals.abort();
        if let Some(t) = shared.tracing_handle().cloned() {
            // Send what is queued, but never hold the exit for long.
            let _ = tokio::task::spawn_blocking(move || t.shutdown(Duration::from_secs(2))).await;
        }
        let access = shared.access_log().clone();
        let _ = tokio::task::spawn_blocking(move || access.flush(Duration::from_millis(500))).await;
        info!("drained; exiting");
        ExitCode::SUCCESS
    });
    runtime.shutdown_timeout(Duration::from_secs(1));
    code
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_open_file_limit_is_raised_to_the_hard_one() {
        use nix::sys::resource::{getrlimit, setrlimit, Resource};
        let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        let low = hard.min(256);
        setrlimit(Resource::RLIMIT_NOFILE, low, hard).unwrap();
        raise_open_files();
        assert_eq!(getrlimit(Resource::RLIMIT_NOFILE).unwrap(), (hard, hard));
    }
}
