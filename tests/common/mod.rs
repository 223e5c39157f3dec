//! A small mesh for end-to-end tests: a test bed with a CA pod, and pods
//! that run `legate init` and `legate proxy` the way an operator would,
//! with real applications inside.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use legate_testbed::{Bed, Pod, Process};

pub const TRUST_DOMAIN: &str = "legate.local";
pub const PROXY_UID: u32 = 1337;
pub const APP_UID: u32 = 1000;

pub fn legate_bin() -> &'static str {
    env!("CARGO_BIN_EXE_legate")
}

/// A `legate` command in a pod, with none of the caller's LEGATE_* variables.
pub fn legate(pod: &Pod) -> legate_testbed::PodCommand {
    let mut cmd = pod.command(legate_bin());
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("LEGATE_")) {
        cmd = cmd.env_remove(k);
    }
    cmd
}

/// Runs a `legate` command to completion and returns its stdout.
pub fn legate_ok(pod: &Pod, args: &[&str]) -> String {
    let out = legate(pod).args(args).output().expect("run legate");
    assert!(
        out.status.success(),
        "legate {args:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A directory any uid can read, for files handed to processes that run as
/// the proxy or application user.
pub fn shared_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    dir
}

pub fn write_readable(path: &Path, contents: &[u8]) {
    std::fs::write(path, contents).expect("write");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
}

/// Options for a meshed pod.
#[derive(Clone, Default)]
pub struct PodOptions {
    /// Extra `--set key=value` for the proxy.
    pub proxy_set: Vec<String>,
    /// Extra `--set key=value` for `legate init`.
    pub init_set: Vec<String>,
    /// Use a token for this identity instead of the pod's own.
    pub identity: Option<String>,
}

pub struct Mesh {
    pub bed: Bed,
    pub ca_pod: Pod,
    pub ca_dir: tempfile::TempDir,
    pub ca: Process,
    files: tempfile::TempDir,
}

pub struct MeshedPod {
    pub pod: Pod,
    pub proxy: Process,
    pub name: String,
}

impl MeshedPod {
    pub fn id(&self) -> String {
        format!("spiffe://{TRUST_DOMAIN}/{}", self.name)
    }
}

impl Mesh {
    /// A bed with a running CA. `ca_set` adds `--set` options to the CA.
    pub fn new(ca_set: &[&str]) -> Mesh {
        let bed = Bed::new().expect("test bed");
        let ca_pod = bed.pod("ca").expect("ca pod");
        let ca_dir = tempfile::tempdir().expect("ca dir");
        let dir = ca_dir.path().to_str().expect("utf-8 path").to_owned();
        legate_ok(
            &ca_pod,
            &["ca", "init", "--dir", &dir, "--trust-domain", TRUST_DOMAIN],
        );
        let mut args = vec!["ca", "serve", "--dir", &dir];
        for s in ca_set {
            args.extend(["--set", s]);
        }
        let ca = legate(&ca_pod).args(&args).spawn().expect("ca serve");
        ca_pod
            .wait_for_port(
                SocketAddr::new(ca_pod.ip().into(), 15012),
                Duration::from_secs(20),
            )
            .expect("CA listening");
        Mesh {
            bed,
            ca_pod,
            ca_dir,
            ca,
            files: shared_dir(),
        }
    }

    pub fn ca_address(&self) -> String {
        format!("{}:15012", self.ca_pod.ip())
    }

    /// A bootstrap token for `identity`.
    pub fn token(&self, identity: &str) -> String {
        let dir = self.ca_dir.path().to_str().expect("utf-8 path");
        legate_ok(
            &self.ca_pod,
            &[
                "ca",
                "token",
                "--dir",
                dir,
                "--identity",
                identity,
                "--ttl",
                "10m",
            ],
        )
        .trim()
        .to_owned()
    }

    /// The trust bundle, as a file any uid can read.
    pub fn bundle_file(&self) -> PathBuf {
        let path = self.files.path().join("bundle.pem");
        if !path.exists() {
            let dir = self.ca_dir.path().to_str().expect("utf-8 path");
            let pem = legate_ok(&self.ca_pod, &["ca", "bundle", "--dir", dir]);
            write_readable(&path, pem.as_bytes());
        }
        path
    }

    /// A pod with no proxy.
    pub fn plain_pod(&self, name: &str) -> Pod {
        self.bed.pod(name).expect("pod")
    }

    /// A pod with interception rules and a ready proxy.
    pub fn meshed_pod(&self, name: &str, opts: PodOptions) -> MeshedPod {
        let pod = self.bed.pod(name).expect("pod");
        let mut init = vec!["init".to_owned()];
        for s in &opts.init_set {
            init.extend(["--set".to_owned(), s.clone()]);
        }
        let init: Vec<&str> = init.iter().map(String::as_str).collect();
        legate_ok(&pod, &init);
        let proxy = self.start_proxy(&pod, name, &opts);
        let meshed = MeshedPod {
            pod,
            proxy,
            name: name.to_owned(),
        };
        wait_ready(&meshed);
        meshed
    }

    /// Starts `legate proxy` in `pod` as the proxy user.
    pub fn start_proxy(&self, pod: &Pod, name: &str, opts: &PodOptions) -> Process {
        let identity = opts
            .identity
            .clone()
            .unwrap_or_else(|| format!("spiffe://{TRUST_DOMAIN}/{name}"));
        let token = self.files.path().join(format!("{name}.token"));
        write_readable(&token, self.token(&identity).as_bytes());
        let bundle = self.bundle_file();
        let mut args: Vec<String> = [
            "proxy",
            "--name",
            name,
            "--ca",
            &self.ca_address(),
            "--ca-bundle",
            bundle.to_str().expect("utf-8 path"),
            "--token-file",
            token.to_str().expect("utf-8 path"),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if let Some(id) = &opts.identity {
            args.extend(["--set".into(), format!("identity.id={id}")]);
        }
        for s in &opts.proxy_set {
            args.extend(["--set".into(), s.clone()]);
        }
        legate(pod)
            .args(&args)
            .env("LEGATE_LOG", "info,legate_proxy=debug")
            .uid(PROXY_UID)
            .gid(PROXY_UID)
            .spawn()
            .expect("legate proxy")
    }
}

/// Polls the proxy's `/ready` until it answers 200.
pub fn wait_ready(m: &MeshedPod) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ready = m
            .pod
            .run_in(|| {
                http_get("127.0.0.1:15000".parse().unwrap(), "/ready").map(|(s, _)| s == 200)
            })
            .unwrap_or(Ok(false))
            .unwrap_or(false);
        if ready {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "proxy in {} never became ready; its log:\n{}",
            m.name,
            m.proxy.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A minimal HTTP/1.1 GET: (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let status = resp
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// The TLS 1.3 `supported_versions` extension as a ServerHello carries it.
pub const TLS13_SERVER_HELLO_VERSION: &[u8] = &[0x00, 0x2b, 0x00, 0x02, 0x03, 0x04];
