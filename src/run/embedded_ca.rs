//! The throwaway CA `legate run` starts when no CA is given.
//!
//! It is the ordinary `legate-ca` code, used as a library: a fresh CA
//! directory (root, intermediate and token key) under the run's temporary
//! directory, its HTTPS API on 127.0.0.1 with a port the kernel picks, and
//! one bootstrap token for the workload's identity. It lives on a small
//! tokio runtime of its own while the run lasts, so the proxy can renew its
//! certificate for as long as the command runs, and its keys are deleted
//! with the temporary directory at the end.
//!
//! Nothing outside this host trusts it: a run with an embedded CA reaches
//! plain servers in plaintext and accepts plaintext clients (permissive),
//! but it cannot prove its identity to a mesh that has its own CA. Give
//! that mesh's CA with `--ca` for that.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use legate_ca::server::Server;
use legate_ca::{store, CaError};
use legate_config::{CaConfig, SpiffeId, TrustDomain};
use tokio::sync::oneshot;

use super::error::RunError;

/// A running CA, stopped by [`EmbeddedCa::stop`] or when dropped.
pub struct EmbeddedCa {
    runtime: Option<tokio::runtime::Runtime>,
    stop: Option<oneshot::Sender<()>>,
    address: SocketAddr,
    dir: PathBuf,
}

impl EmbeddedCa {
    /// Creates a CA for `td` in `dir` (which must not hold one) and serves
    /// it on 127.0.0.1 with an ephemeral port. `cfg` supplies lifetimes and
    /// limits; its `dir` and `listen` are ignored.
    pub fn start(dir: &Path, td: &TrustDomain, cfg: &CaConfig) -> Result<Self, RunError> {
        let cfg = CaConfig {
            dir: dir.to_owned(),
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            ..cfg.clone()
        };
        store::init(dir, td, &cfg, None, false)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("legate-run-ca")
            .enable_all()
            .build()
            .map_err(|e| RunError::io("starting the runtime of the embedded CA", e))?;
        let server = runtime.block_on(Server::bind(dir, &cfg))?;
        let address = server.local_addr()?;
        let (stop, stopped) = oneshot::channel::<()>();
        runtime.spawn(async move {
            let shutdown = async {
                let _ = stopped.await;
            };
            if let Err(e) = server.run(shutdown).await {
                tracing::error!("the embedded CA stopped: {e}");
            }
        });
        tracing::debug!(%address, %td, "embedded CA listening");
        Ok(EmbeddedCa {
            runtime: Some(runtime),
            stop: Some(stop),
            address,
            dir: dir.to_owned(),
        })
    }

    /// Where the CA's API listens, for `identity.ca_address`.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// A bootstrap token for `id`, valid for `ttl`.
    pub fn token(&self, id: &SpiffeId, ttl: Duration) -> Result<String, CaError> {
        store::mint_token(&self.dir, id, ttl)
    }

    /// The trust bundle (PEM), for `identity.ca_bundle`.
    pub fn bundle_path(&self) -> PathBuf {
        self.dir.join("bundle.pem")
    }

    /// Stops serving and waits briefly for connections in flight.
    pub fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_timeout(Duration::from_secs(1));
        }
    }
}

impl Drop for EmbeddedCa {
    fn drop(&mut self) {
        self.stop();
    }
}
