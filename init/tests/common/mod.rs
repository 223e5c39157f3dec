//! Helpers shared by the functional tests: configurations, reading a pod's
//! tables, and connections made as a given user.
//!
//! Every test builds its own bed of namespaces and never touches the
//! host's network namespace; iptables commands always run inside a pod
//! (`ip netns exec`) and always wait for the xtables lock (`-w`).

#![allow(dead_code)]

use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use legate_config::{load, Backend, Config, FlagValue, Ipv6Mode, Sources};
use legate_init::state::normalize_save;
use legate_init::{Engine, Family, Options};
use legate_testbed::{Pod, Process};

/// A configuration from `key=value` settings, through the real loader.
pub fn config(settings: &[String]) -> Config {
    let flags = settings
        .iter()
        .map(|kv| {
            let (path, value) = kv.split_once('=').expect("key=value");
            FlagValue {
                path: path.into(),
                value: value.into(),
                flag: format!("--set {kv}"),
            }
        })
        .collect();
    load(&Sources {
        flags,
        ..Sources::default()
    })
    .expect("test configuration loads")
    .config
}

pub fn backend(engine: Engine) -> Backend {
    match engine {
        Engine::Nft => Backend::Nft,
        Engine::Legacy => Backend::Legacy,
    }
}

/// Options acting in `pod` with a fixed backend and IPv6 on.
pub fn opts(pod: &Pod, backend: Backend) -> Options {
    Options {
        netns: Some(pod.netns().to_owned()),
        backend,
        ipv6: Ipv6Mode::On,
    }
}

/// Runs an iptables program of one backend inside the pod.
pub fn ipt(pod: &Pod, engine: Engine, family: Family, args: &[&str]) -> String {
    let program = format!("{}-{}", family.program_stem(), engine.name());
    let mut argv = vec![program.as_str()];
    if !program.ends_with("-save") {
        argv.push("-w");
    }
    argv.extend_from_slice(args);
    pod.exec(argv)
        .unwrap_or_else(|e| panic!("{program} {args:?}: {e}"))
}

/// Both families' tables of one backend, normalized for comparison.
pub fn saved(pod: &Pod, engine: Engine) -> String {
    let mut out = String::new();
    for family in Family::ALL {
        let program = engine.program(family, false);
        out.push_str(&format!("## {program}\n"));
        out.push_str(&normalize_save(
            &pod.exec([program.as_str()])
                .unwrap_or_else(|e| panic!("{program}: {e}")),
        ));
    }
    out
}

/// Rules of someone else (a CNI plugin, say) in both families, in the nat
/// table legate writes to and in filter, so tests can prove they survive.
pub fn add_foreign_rules(pod: &Pod, engine: Engine) {
    for family in Family::ALL {
        let ipt = |args: &[&str]| ipt(pod, engine, family, args);
        ipt(&["-t", "nat", "-N", "CNI-TEST"]);
        ipt(&["-t", "nat", "-A", "CNI-TEST", "-j", "RETURN"]);
        ipt(&["-t", "nat", "-A", "POSTROUTING", "-j", "CNI-TEST"]);
        ipt(&[
            "-t",
            "nat",
            "-A",
            "PREROUTING",
            "-p",
            "udp",
            "--dport",
            "5353",
            "-j",
            "CNI-TEST",
        ]);
        ipt(&["-t", "nat", "-A", "OUTPUT", "-p", "udp", "-j", "CNI-TEST"]);
        ipt(&[
            "-t", "filter", "-A", "INPUT", "-p", "udp", "--dport", "9", "-j", "ACCEPT",
        ]);
    }
}

/// A listener made inside the pod.
pub fn listen(pod: &Pod, addr: &str) -> TcpListener {
    let addr: SocketAddr = addr.parse().expect("address");
    let l = pod
        .run_in(move || bind_reusable(addr))
        .expect("enter pod")
        .unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    l.set_nonblocking(true).expect("nonblocking");
    l
}

/// A listener with `SO_REUSEADDR`, like the proxy's and the validator's, so
/// that connections left in TIME_WAIT by one check do not block the next.
fn bind_reusable(addr: SocketAddr) -> std::io::Result<TcpListener> {
    use nix::sys::socket::{
        bind, listen, setsockopt, socket, sockopt, AddressFamily, Backlog, SockFlag, SockType,
        SockaddrStorage,
    };
    use std::os::fd::AsRawFd;
    let family = if addr.is_ipv6() {
        AddressFamily::Inet6
    } else {
        AddressFamily::Inet
    };
    let fd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    bind(fd.as_raw_fd(), &SockaddrStorage::from(addr))?;
    listen(&fd, Backlog::MAXCONN)?;
    Ok(TcpListener::from(fd))
}

/// Waits up to `wait` for a connection on `l`, and reads the one byte
/// every test client sends.
pub fn accept(l: &TcpListener, wait: Duration) -> Option<TcpStream> {
    let deadline = Instant::now() + wait;
    loop {
        match l.accept() {
            Ok((mut s, _)) => {
                s.set_nonblocking(false).expect("blocking");
                s.set_read_timeout(Some(Duration::from_secs(5)))
                    .expect("timeout");
                let mut b = [0u8; 1];
                s.read_exact(&mut b).expect("the client's byte");
                return Some(s);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return None;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}

/// Connects from inside `pod` as `uid` (and `gid`, default root) to
/// `addr`, sends one byte and stays connected until killed. Uses bash's
/// /dev/tcp so no helper binary has to be readable by that user.
pub fn connect_as(pod: &Pod, uid: u32, gid: Option<u32>, addr: SocketAddr) -> Process {
    let script = format!(
        "exec 3<>/dev/tcp/{}/{} && printf x >&3 && sleep 30",
        addr.ip(),
        addr.port()
    );
    let mut cmd = pod
        .command("bash")
        .args(["-c", &script])
        .uid(uid)
        .current_dir("/");
    if let Some(gid) = gid {
        cmd = cmd.gid(gid);
    }
    cmd.spawn().expect("spawn client")
}

/// Asserts that a connection is pending on `l`, and returns it.
pub fn lands(l: &TcpListener, what: &str) -> TcpStream {
    accept(l, Duration::from_secs(5)).unwrap_or_else(|| panic!("{what}: no connection arrived"))
}

/// Asserts that nothing is pending on `l` right now.
pub fn nothing_on(l: &TcpListener, what: &str) {
    assert!(
        accept(l, Duration::from_millis(50)).is_none(),
        "{what}: an unexpected connection arrived"
    );
}
