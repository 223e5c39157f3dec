//! Helpers for the end-to-end tests: the mesh harness from the test bed,
//! bound to the `legate` binary under test, plus small applications.

#![allow(dead_code, unused_imports)]

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::ops::Deref;
use std::time::Duration;

use legate_testbed::mesh::Legate;
pub use legate_testbed::mesh::{
    http_get, shared_dir, write_readable, MeshedPod, PodOptions, APP_UID, PROXY_UID,
    TLS13_SERVER_HELLO_VERSION, TRUST_DOMAIN,
};
use legate_testbed::{Pcap, Pod, Process};

pub fn legate() -> Legate {
    Legate::new(env!("CARGO_BIN_EXE_legate"))
}

/// The test-bed mesh, failing the test with the reason when it cannot be built.
pub struct Mesh(legate_testbed::mesh::Mesh);

impl Deref for Mesh {
    type Target = legate_testbed::mesh::Mesh;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

pub struct Ca(legate_testbed::mesh::Ca);

impl Deref for Ca {
    type Target = legate_testbed::mesh::Ca;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl Ca {
    pub fn start(bed: &legate_testbed::Bed, name: &str, set: &[&str]) -> Ca {
        Ca(legate_testbed::mesh::Ca::start(&legate(), bed, name, set).expect("start a CA"))
    }
}

impl Mesh {
    pub fn new(ca_set: &[&str]) -> Mesh {
        Mesh(legate_testbed::mesh::Mesh::new(legate(), ca_set).expect("build the mesh"))
    }
    pub fn plain_pod(&self, name: &str) -> Pod {
        self.0.plain_pod(name).expect("plain pod")
    }
    pub fn meshed_pod(&self, name: &str, opts: PodOptions) -> MeshedPod {
        self.0.meshed_pod(name, opts).expect("meshed pod")
    }
    pub fn meshed_pod_of(&self, ca: &Ca, name: &str, opts: PodOptions) -> MeshedPod {
        self.0.meshed_pod_of(&ca.0, name, opts).expect("meshed pod")
    }
}

/// Serves `body` as /index.html with python's http.server on `port`, as an
/// ordinary user, and waits until it listens.
pub fn http_server(pod: &Pod, port: u16, body: &str) -> (Process, tempfile::TempDir) {
    http_server_on(pod, IpAddr::V6(Ipv6Addr::UNSPECIFIED), port, body)
}

/// Like [`http_server`], bound to `bind` only (`::` is every address).
pub fn http_server_on(
    pod: &Pod,
    bind: IpAddr,
    port: u16,
    body: &str,
) -> (Process, tempfile::TempDir) {
    let site = shared_dir().expect("site dir");
    write_readable(&site.path().join("index.html"), body.as_bytes()).expect("index.html");
    let process = pod
        .command("python3")
        .args(["-m", "http.server", &port.to_string(), "--bind"])
        .arg(bind.to_string())
        .current_dir(site.path())
        .uid(APP_UID)
        .spawn()
        .expect("http.server");
    let reach = if bind.is_unspecified() {
        pod.ip().into()
    } else {
        bind
    };
    pod.wait_for_port(SocketAddr::new(reach, port), Duration::from_secs(10))
        .expect("http.server listening");
    (process, site)
}

/// Runs curl in `pod` as an ordinary user: (exit success, stdout, stderr).
pub fn curl(pod: &Pod, args: &[&str]) -> (bool, String, String) {
    let out = pod
        .command("curl")
        .args(["-sS", "--max-time", "10"])
        .args(args)
        .uid(APP_UID)
        .output()
        .expect("curl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// From `pod`: connects to `dst`, sends `send`, and reads until the other
/// side closes or 5 s pass; what came back, or the error that ended it.
pub fn tcp_exchange(pod: &Pod, dst: SocketAddr, send: &[u8]) -> std::io::Result<Vec<u8>> {
    use std::io::{Read, Write};
    pod.run_in(move || {
        let mut s = std::net::TcpStream::connect(dst)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(send)?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).map(|_| buf)
    })
    .expect("run in pod")
}

/// Asserts that a capture shows the mesh at work: a ClientHello offering
/// the mesh protocol, a TLS 1.3 ServerHello, and none of `plaintext`.
pub fn assert_mesh_tls_only(pcap: &Pcap, plaintext: &[&[u8]]) {
    assert!(
        pcap.contains(b"legate/h2"),
        "no mesh ClientHello on the wire"
    );
    assert!(
        pcap.contains(TLS13_SERVER_HELLO_VERSION),
        "no TLS 1.3 ServerHello on the wire"
    );
    for p in plaintext {
        assert!(
            !pcap.contains(p),
            "plaintext crossed the wire: {}",
            String::from_utf8_lossy(p)
        );
    }
}

/// A unique payload that can be searched for on the wire.
pub fn secret(tag: &str) -> String {
    format!("legate-secret-{tag}-{}", std::process::id())
}

/// The scriptable HTTP server (see `tests/apps/scripted_server.py`),
/// running as an ordinary user in `pod` on `port`.
pub struct Scripted {
    pub process: Process,
    _dir: tempfile::TempDir,
    port: u16,
}

impl Scripted {
    pub fn start(pod: &Pod, port: u16) -> Scripted {
        let dir = shared_dir().expect("script dir");
        let script = dir.path().join("scripted_server.py");
        write_readable(&script, include_bytes!("../apps/scripted_server.py")).expect("script");
        let process = pod
            .command("python3")
            .arg(&script)
            .arg(port.to_string())
            .uid(APP_UID)
            .spawn()
            .expect("scripted server");
        pod.wait_for_port(
            SocketAddr::new(pod.ip().into(), port),
            Duration::from_secs(10),
        )
        .expect("scripted server listening");
        Scripted {
            process,
            _dir: dir,
            port,
        }
    }

    /// How many requests for `key` reached the application, asked over
    /// loopback inside the server's pod so no proxy is involved.
    pub fn count(&self, pod: &Pod, key: &str) -> u32 {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let path = format!("/count/{key}");
        let (status, body) = pod
            .run_in(move || http_get(addr, &path))
            .unwrap()
            .expect("count");
        assert_eq!(status, 200);
        body.trim().parse().expect("a count")
    }
}

/// An HTTP exchange as curl saw it.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: String,
    pub body: String,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_owned())
        })
    }
}

/// curl with the response head: the last status line, headers and body.
pub fn request(pod: &Pod, args: &[&str]) -> Reply {
    let (ok, out, err) = curl(pod, &[&["-i"], args].concat());
    assert!(ok, "curl {args:?}: {err}");
    // Skip interim responses such as "100 Continue".
    let mut rest = out.as_str();
    loop {
        let (head, body) = rest.split_once("\r\n\r\n").unwrap_or((rest, ""));
        let status: u16 = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        if (100..200).contains(&status) && status != 101 {
            rest = body;
            continue;
        }
        return Reply {
            status,
            headers: head.to_owned(),
            body: body.to_owned(),
        };
    }
}

/// In `pod`, after its proxy's own rules, what kube-proxy does on a node:
/// connections to `service` are rewritten to one of `backends`, chosen at
/// random for each connection. Called again for the same service, it
/// replaces the backends (as when a pod leaves the service).
pub fn balance(pod: &Pod, service: SocketAddr, backends: &[SocketAddr]) {
    let chain = format!("SVC-{}", service.port());
    let (ip, port) = (service.ip().to_string(), service.port().to_string());
    let jump = |op: &str| {
        pod.exec([
            "iptables", "-t", "nat", op, "OUTPUT", "-p", "tcp", "-d", &ip, "--dport", &port, "-j",
            &chain,
        ])
    };
    if jump("-C").is_err() {
        pod.exec(["iptables", "-t", "nat", "-N", &chain]).unwrap();
        jump("-A").unwrap();
    }
    pod.exec(["iptables", "-t", "nat", "-F", &chain]).unwrap();
    let n = backends.len();
    for (i, backend) in backends.iter().enumerate() {
        let probability = format!("{:.4}", 1.0 / (n - i) as f64);
        let to = backend.to_string();
        let mut rule = vec!["iptables", "-t", "nat", "-A", &chain];
        if i + 1 < n {
            rule.extend([
                "-m",
                "statistic",
                "--mode",
                "random",
                "--probability",
                &probability,
            ]);
        }
        rule.extend(["-p", "tcp", "-j", "DNAT", "--to-destination", &to]);
        pod.exec(rule).unwrap();
    }
}

/// Where the tests' Service addresses are; the README has the service CIDR
/// marked `strict`.
pub const SERVICE_CIDR: &str = "10.200.250.0/24";

/// A meshed pod `name` whose proxy marks [`SERVICE_CIDR`] `strict` and
/// takes the settings `set`, and the directory of its configuration file.
pub fn service_client(mesh: &Mesh, name: &str, set: &[&str]) -> (MeshedPod, tempfile::TempDir) {
    let dir = shared_dir().expect("config dir");
    let config = dir.path().join("legate.toml");
    let text = format!("[[proxy.destinations]]\ncidrs = [\"{SERVICE_CIDR}\"]\nmode = \"strict\"\n");
    write_readable(&config, text.as_bytes()).expect("config file");
    let pod = mesh.meshed_pod(
        name,
        PodOptions {
            config: Some(config),
            proxy_set: set.iter().map(|&s| s.to_owned()).collect(),
            ..Default::default()
        },
    );
    (pod, dir)
}
