//! `legate proxy`: the sidecar. Obtains the workload certificate from the
//! CA, keeps it renewed, and runs the data plane until SIGTERM or SIGINT,
//! then drains.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Args;
use legate_ca::{IdentityManager, ManagerOptions};
use legate_config::{Config, FlagValue};
use legate_proxy::Proxy;
use tracing::{error, info};

use crate::identity::CaIdentity;

/// Flags of `legate proxy`; each sets the configuration key it names.
#[derive(Debug, Args)]
pub struct ProxyArgs {
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

pub fn run(config: Config) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
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
        let (creds, renewals) = manager.spawn();
        let identity = Arc::new(CaIdentity::new(
            creds,
            local,
            config.identity.trust_domain.clone(),
        ));
        let proxy = match Proxy::bind(config, identity) {
            Ok(p) => p,
            Err(e) => {
                error!("{e}");
                return ExitCode::FAILURE;
            }
        };
        proxy.run(stop_signal()).await;
        renewals.abort();
        ExitCode::SUCCESS
    })
}
