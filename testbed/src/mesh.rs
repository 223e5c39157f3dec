//! A legate mesh on a bed: a CA pod, and pods that run `legate init` and
//! `legate proxy` the way an operator would, driven through the real
//! `legate` binary. Shared by the end-to-end tests, the benchmarks and
//! `legate demo`, so all three build the mesh one way.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::{Bed, Error, Pod, PodCommand, Process, Result};

/// The trust domain of every mesh built here.
pub const TRUST_DOMAIN: &str = "legate.local";
/// The uid and gid the proxies run as (legate's default).
pub const PROXY_UID: u32 = 1337;
/// A uid for applications: neither root nor the proxy.
pub const APP_UID: u32 = 1000;
/// How long a proxy may take to become ready.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// A directory any uid can read, for files handed to processes that run as
/// the proxy or application user.
pub fn shared_dir() -> Result<tempfile::TempDir> {
    let dir = tempfile::tempdir().map_err(|e| Error::io("creating a temporary directory", e))?;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
        .map_err(|e| Error::io("making the temporary directory readable", e))?;
    Ok(dir)
}

/// Writes a file any uid can read.
pub fn write_readable(path: &Path, contents: &[u8]) -> Result<()> {
    std::fs::write(path, contents)
        .map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644))
        .map_err(|e| Error::io(format!("making {} readable", path.display()), e))
}

fn utf8(path: &Path) -> Result<&str> {
    path.to_str().ok_or_else(|| {
        Error::io(
            format!("using path {}", path.display()),
            std::io::Error::new(std::io::ErrorKind::InvalidData, "not UTF-8"),
        )
    })
}

/// Runs the `legate` binary.
#[derive(Debug, Clone)]
pub struct Legate {
    bin: PathBuf,
}

impl Legate {
    /// Runs the binary at `bin`.
    pub fn new(bin: impl Into<PathBuf>) -> Self {
        Legate { bin: bin.into() }
    }

    /// A `legate` command in `pod`, with none of the caller's LEGATE_*
    /// variables, so the environment of whoever runs the tests cannot
    /// change what is tested.
    pub fn command(&self, pod: &Pod) -> PodCommand {
        let mut cmd = pod.command(&self.bin);
        for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("LEGATE_")) {
            cmd = cmd.env_remove(k);
        }
        cmd
    }

    /// Runs a `legate` command to completion and returns its stdout.
    pub fn run(&self, pod: &Pod, args: &[&str]) -> Result<String> {
        let out = self.command(pod).args(args).output()?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(Error::CommandFailed {
                command: format!("legate {}", args.join(" ")),
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            })
        }
    }
}

/// A running CA in its own pod.
pub struct Ca {
    /// The pod the CA runs in.
    pub pod: Pod,
    /// The CA's keys and state.
    pub dir: tempfile::TempDir,
    /// `legate ca serve`.
    pub process: Process,
    files: tempfile::TempDir,
    legate: Legate,
}

impl Ca {
    /// Creates a CA in a new pod of `bed` and serves it; `set` adds
    /// `--set KEY=VALUE` options to `legate ca serve`.
    pub fn start(legate: &Legate, bed: &Bed, name: &str, set: &[&str]) -> Result<Ca> {
        let pod = bed.pod(name)?;
        let dir = tempfile::tempdir().map_err(|e| Error::io("creating the CA directory", e))?;
        let d = utf8(dir.path())?.to_owned();
        legate.run(
            &pod,
            &["ca", "init", "--dir", &d, "--trust-domain", TRUST_DOMAIN],
        )?;
        let mut args = vec!["ca", "serve", "--dir", &d];
        for s in set {
            args.extend(["--set", s]);
        }
        let process = legate.command(&pod).args(&args).spawn()?;
        pod.wait_for_port(SocketAddr::new(pod.ip().into(), 15012), READY_TIMEOUT)?;
        Ok(Ca {
            pod,
            dir,
            process,
            files: shared_dir()?,
            legate: legate.clone(),
        })
    }

    /// The CA API's `host:port`.
    pub fn address(&self) -> String {
        format!("{}:15012", self.pod.ip())
    }

    /// A bootstrap token for `identity`.
    pub fn token(&self, identity: &str) -> Result<String> {
        let dir = utf8(self.dir.path())?;
        let args = [
            "ca",
            "token",
            "--dir",
            dir,
            "--identity",
            identity,
            "--ttl",
            "10m",
        ];
        Ok(self.legate.run(&self.pod, &args)?.trim().to_owned())
    }

    /// A token for `identity` in a file any uid can read.
    pub fn token_file(&self, identity: &str) -> Result<PathBuf> {
        let name: String = identity
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        let path = self.files.path().join(format!("{name}.token"));
        write_readable(&path, self.token(identity)?.as_bytes())?;
        Ok(path)
    }

    /// The trust bundle, as a file any uid can read.
    pub fn bundle_file(&self) -> Result<PathBuf> {
        let path = self.files.path().join("bundle.pem");
        if !path.exists() {
            let pem = self.legate.run(
                &self.pod,
                &["ca", "bundle", "--dir", utf8(self.dir.path())?],
            )?;
            write_readable(&path, pem.as_bytes())?;
        }
        Ok(path)
    }
}

/// Options for a meshed pod.
#[derive(Debug, Clone, Default)]
pub struct PodOptions {
    /// Extra `--set KEY=VALUE` for the proxy.
    pub proxy_set: Vec<String>,
    /// Extra `--set KEY=VALUE` for `legate init`.
    pub init_set: Vec<String>,
    /// Ask for this SPIFFE ID instead of `spiffe://<td>/<name>`.
    pub identity: Option<String>,
    /// The proxy's log filter; `info,legate_proxy=debug` when unset.
    pub log: Option<String>,
    /// A configuration file for the proxy (`--config`), which it watches
    /// and reloads; `--set` values still override it.
    pub config: Option<PathBuf>,
}

/// A pod with interception rules and a ready proxy.
pub struct MeshedPod {
    /// The pod.
    pub pod: Pod,
    /// Its `legate proxy`, whose log is its stderr.
    pub proxy: Process,
    /// The pod's name, also its workload name.
    pub name: String,
    identity: String,
    /// What the proxy was started with, for a restart.
    opts: PodOptions,
}

impl MeshedPod {
    /// The pod's SPIFFE ID.
    pub fn id(&self) -> &str {
        &self.identity
    }
}

/// A bed with a CA, ready for meshed and plain pods.
pub struct Mesh {
    /// The namespaces.
    pub bed: Bed,
    /// The mesh's CA.
    pub ca: Ca,
    /// The binary every pod runs.
    pub legate: Legate,
}

impl Mesh {
    /// A new bed with a running CA; `ca_set` adds `--set` options to the CA.
    pub fn new(legate: Legate, ca_set: &[&str]) -> Result<Mesh> {
        let bed = Bed::new()?;
        let ca = Ca::start(&legate, &bed, "ca", ca_set)?;
        Ok(Mesh { bed, ca, legate })
    }

    /// Tears the mesh down, reporting what could not be removed.
    pub fn close(self) -> Result<()> {
        let Mesh { bed, ca, .. } = self;
        drop(ca);
        bed.close()
    }

    /// A pod with no proxy.
    pub fn plain_pod(&self, name: &str) -> Result<Pod> {
        self.bed.pod(name)
    }

    /// A meshed pod whose certificate comes from the mesh's CA.
    pub fn meshed_pod(&self, name: &str, opts: PodOptions) -> Result<MeshedPod> {
        self.meshed_pod_of(&self.ca, name, opts)
    }

    /// A meshed pod whose certificate comes from `ca`.
    pub fn meshed_pod_of(&self, ca: &Ca, name: &str, opts: PodOptions) -> Result<MeshedPod> {
        let pod = self.bed.pod(name)?;
        let mut init = vec!["init"];
        for s in &opts.init_set {
            init.extend(["--set", s]);
        }
        self.legate.run(&pod, &init)?;
        let identity = opts
            .identity
            .clone()
            .unwrap_or_else(|| format!("spiffe://{TRUST_DOMAIN}/{name}"));
        let proxy = self.start_proxy(ca, &pod, name, &identity, &opts)?;
        let meshed = MeshedPod {
            pod,
            proxy,
            name: name.to_owned(),
            identity,
            opts,
        };
        wait_ready(&meshed)?;
        Ok(meshed)
    }

    /// Starts a pod's proxy again with the options it first had (killing
    /// it first if it still runs; its capture rules stay as they are) and
    /// waits until it is ready. The pod must have the mesh's own CA.
    pub fn restart_proxy(&self, m: &mut MeshedPod) -> Result<()> {
        if m.proxy.try_wait()?.is_none() {
            m.proxy.kill()?;
        }
        m.proxy = self.start_proxy(&self.ca, &m.pod, &m.name, &m.identity, &m.opts)?;
        wait_ready(m)
    }

    fn start_proxy(
        &self,
        ca: &Ca,
        pod: &Pod,
        name: &str,
        identity: &str,
        opts: &PodOptions,
    ) -> Result<Process> {
        let token = ca.token_file(identity)?;
        let bundle = ca.bundle_file()?;
        let address = ca.address();
        let mut args: Vec<&str> = vec![
            "proxy",
            "--name",
            name,
            "--ca",
            &address,
            "--ca-bundle",
            utf8(&bundle)?,
            "--token-file",
            utf8(&token)?,
        ];
        let id_set = format!("identity.id={identity}");
        if opts.identity.is_some() {
            args.extend(["--set", &id_set]);
        }
        for s in &opts.proxy_set {
            args.extend(["--set", s]);
        }
        if let Some(file) = &opts.config {
            args.extend(["--config", utf8(file)?]);
        }
        self.legate
            .command(pod)
            .args(&args)
            .env(
                "LEGATE_LOG",
                opts.log.as_deref().unwrap_or("info,legate_proxy=debug"),
            )
            .uid(PROXY_UID)
            .gid(PROXY_UID)
            .spawn()
    }
}

/// Polls the proxy's `/ready` until it answers 200.
pub fn wait_ready(m: &MeshedPod) -> Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    let admin = SocketAddr::from(([127, 0, 0, 1], 15000));
    loop {
        let ready = m
            .pod
            .run_in(move || matches!(http_get(admin, "/ready"), Ok((200, _))))?;
        if ready {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(Error::Timeout {
                what: format!(
                    "the proxy in pod {} to become ready; its log:\n{}",
                    m.name,
                    m.proxy.stderr()
                ),
                after: READY_TIMEOUT,
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A minimal HTTP/1.1 GET from the calling thread's namespace:
/// (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    http_request(addr, "GET", path, "")
}

/// One HTTP/1.1 request with a body (it may be empty) from the calling
/// thread's namespace, on a connection of its own: (status, body).
pub fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
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

/// The TLS 1.3 `supported_versions` extension as a ServerHello carries it:
/// finding it in a capture proves the handshake negotiated TLS 1.3.
pub const TLS13_SERVER_HELLO_VERSION: &[u8] = &[0x00, 0x2b, 0x00, 0x02, 0x03, 0x04];
