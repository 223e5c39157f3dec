//! Shared helpers for the CA end-to-end tests: a CA directory in a temp
//! dir, the API served in-process on 127.0.0.1 (port 0 unless a test asks
//! for a fixed one), and workload managers pointed at it.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use legate_ca::manager::{ManagerOptions, TokenSource};
use legate_ca::server::Server;
use legate_ca::{store, CaError, IdentityManager};
use legate_config::{CaConfig, Secret, SpiffeId, TrustDomain};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const TD: &str = "test.local";

pub fn td() -> TrustDomain {
    TD.parse().unwrap()
}

pub fn id(path: &str) -> SpiffeId {
    format!("spiffe://{TD}/{path}").parse().unwrap()
}

/// A CA configuration for tests: loopback, short deadlines.
pub fn config(cert_ttl: Duration) -> CaConfig {
    CaConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        cert_ttl,
        backdate: Duration::from_secs(5),
        request_timeout: Duration::from_secs(2),
        ..CaConfig::default()
    }
}

/// A fresh, initialised CA directory.
pub fn ca_dir(cfg: &CaConfig) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    store::init(dir.path(), &td(), cfg, None, false).unwrap();
    dir
}

pub struct RunningCa {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), CaError>>,
}

impl RunningCa {
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let _ = (&mut self.task).await;
    }
}

pub async fn start(dir: &Path, cfg: &CaConfig) -> RunningCa {
    let server = Server::bind(dir, cfg).await.unwrap();
    let addr = server.local_addr().unwrap();
    let (tx, rx) = oneshot::channel();
    let task = tokio::spawn(server.run(async {
        let _ = rx.await;
    }));
    RunningCa {
        addr,
        stop: Some(tx),
        task,
    }
}

pub fn token(dir: &Path, who: &SpiffeId) -> Secret {
    Secret::new(store::mint_token(dir, who, Duration::from_secs(600)).unwrap())
}

pub fn options(ca: SocketAddr, dir: &Path, who: &SpiffeId) -> ManagerOptions {
    ManagerOptions {
        id: who.clone(),
        trust_domain: td(),
        ca_address: ca.to_string(),
        ca_bundle: Some(dir.join("bundle.pem")),
        token: TokenSource::Inline(token(dir, who)),
        cert_dir: None,
        request_timeout: Duration::from_secs(2),
        backoff_initial: Duration::from_millis(200),
        backoff_max: Duration::from_secs(1),
        bundle_refresh: Duration::from_secs(60),
    }
}

pub fn manager(ca: SocketAddr, dir: &Path, who: &SpiffeId) -> IdentityManager {
    IdentityManager::new(options(ca, dir, who)).unwrap()
}

/// Runs a program and returns (success, stdout + stderr).
pub fn run(program: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}
