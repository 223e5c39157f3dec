//! `legate run` end to end: unmodified programs wrapped on a "host" that is
//! a test-bed pod, their traffic on the wire, what other processes on the
//! same host see, and the host's state after every kind of ending.
//!
//! Each test starts from a host that already has rules of its own (as real
//! hosts do) and checks that `iptables-save` of both backends is exactly as
//! before once `legate run` is gone, and that no process of it remains.

mod common;

use std::net::{SocketAddr, TcpListener};
use std::ops::{Deref, DerefMut};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use legate_init::state::normalize_save;
use legate_testbed::{Bed, Pod, PodCommand, Process};
use nix::sys::signal::Signal;

/// `legate run ARGS...` in `pod`, with the run's proxy logging connections.
fn run(pod: &Pod, args: &[&str]) -> PodCommand {
    legate()
        .command(pod)
        .arg("run")
        .args(args)
        .env("LEGATE_LOG", "info,legate_proxy=debug")
}

/// Rules of the host's own in both families, in nat and filter, as a
/// host with Docker or a firewall has: they must survive untouched.
fn host_rules(pod: &Pod) {
    for ipt in ["iptables", "ip6tables"] {
        for rule in [
            "-t nat -A POSTROUTING -s 10.99.0.0/16 -j MASQUERADE",
            "-t nat -A OUTPUT -p udp --dport 53 -j RETURN",
            "-t filter -A INPUT -p tcp --dport 22 -j ACCEPT",
        ] {
            let rule = if ipt == "ip6tables" {
                rule.replace("10.99.0.0/16", "fd99::/64")
            } else {
                rule.to_owned()
            };
            let mut argv = vec![ipt, "-w"];
            argv.extend(rule.split(' '));
            pod.exec(argv).expect("host rule");
        }
    }
}

/// Everything both iptables backends hold, in both families.
fn tables(pod: &Pod) -> String {
    let mut out = String::new();
    for program in [
        "iptables-nft-save",
        "ip6tables-nft-save",
        "iptables-legacy-save",
        "ip6tables-legacy-save",
    ] {
        out.push_str(&format!("## {program}\n"));
        out.push_str(&normalize_save(&pod.exec([program]).expect(program)));
    }
    out
}

/// The command lines of the processes whose network namespace is `pod`'s.
fn processes_in(pod: &Pod) -> Vec<String> {
    pids_in(pod)
        .into_iter()
        .map(|(_, cmdline)| cmdline)
        .collect()
}

/// The pids and command lines of the processes in `pod`'s namespace.
fn pids_in(pod: &Pod) -> Vec<(i32, String)> {
    let ns = std::fs::metadata(format!("/run/netns/{}", pod.netns()))
        .expect("netns file")
        .ino();
    let want = format!("net:[{ns}]");
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(link) = std::fs::read_link(entry.path().join("ns/net")) else {
            continue;
        };
        if link.to_string_lossy() != want {
            continue;
        }
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        let pid = entry.file_name().to_string_lossy().parse().unwrap_or(0);
        if pid > 0 && !cmdline.trim().is_empty() {
            out.push((pid, cmdline));
        }
    }
    out
}

/// Waits for a condition for up to `secs` seconds.
fn eventually(secs: u64, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The run with pid `pid` left nothing behind: the tables are as `before`,
/// no process lives in the pod, and its working directory is gone.
fn assert_clean(pod: &Pod, before: &str, pid: u32) {
    assert_eq!(tables(pod), before, "the host's tables changed");
    assert!(
        eventually(5, || processes_in(pod).is_empty()),
        "processes left behind: {:?}",
        processes_in(pod)
    );
    let prefix = format!("legate-run-{pid}-");
    let left: Vec<_> = std::fs::read_dir(std::env::temp_dir())
        .expect("temp dir")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "working directories left behind: {left:?}");
}

/// A `legate run` in the background. Dropped while it still runs (a test
/// failed), it gets SIGTERM and time to clean up, so that a failing test
/// leaves nothing behind as a SIGKILL would.
struct Background(Process);

impl Deref for Background {
    type Target = Process;
    fn deref(&self) -> &Process {
        &self.0
    }
}

impl DerefMut for Background {
    fn deref_mut(&mut self) -> &mut Process {
        &mut self.0
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.signal(Signal::SIGTERM);
            let _ = self.0.wait_timeout(Duration::from_secs(10));
        }
    }
}

trait SpawnRun {
    fn spawn_run(self) -> Background;
}

impl SpawnRun for PodCommand {
    fn spawn_run(self) -> Background {
        Background(self.spawn().expect("start legate run"))
    }
}

fn status_of(p: &mut Process) -> std::process::ExitStatus {
    p.wait_timeout(Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("legate run did not end: {e}\n{}", p.stderr()))
}

/// Runs to completion: (exit code, stdout, stderr).
fn finish(cmd: PodCommand) -> (Option<i32>, String, String) {
    let out = cmd.output().expect("legate run");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A file the wrapped command creates, polled for.
fn wait_for_file(path: &Path, run: &mut Process) {
    let appeared = eventually(20, || {
        path.exists() || run.try_wait().ok().flatten().is_some()
    });
    assert!(
        appeared && path.exists(),
        "the wrapped command never got to create {}:\n{}",
        path.display(),
        run.stderr()
    );
}

/// A wrapped curl talks mTLS to a meshed server with the identity it was
/// given; at the same time, a process on the same host that is not under
/// `legate run`, root like the wrapped one, reaches the same server
/// directly, in plaintext.
#[test]
fn wrapped_process_is_mutual_tls_and_the_rest_of_the_host_is_not_captured() {
    let mesh = Mesh::new(&[]);
    let server = mesh.meshed_pod("web", PodOptions::default());
    let wrapped_body = secret("wrapped");
    let plain_body = secret("bystander");
    let (_http, site) = http_server(&server.pod, 8080, &wrapped_body);
    write_readable(&site.path().join("plain.html"), plain_body.as_bytes()).unwrap();
    let host = mesh.plain_pod("host");
    host_rules(&host);
    let before = tables(&host);

    let id = format!("spiffe://{TRUST_DOMAIN}/wrapped");
    let token = mesh.ca.token_file(&id).unwrap();
    let bundle = mesh.ca.bundle_file().unwrap();
    let flags = shared_dir().unwrap();
    let started = flags.path().join("started");
    let stop = flags.path().join("stop");
    let base = format!("http://{}:8080", server.pod.ip());
    let script = format!(
        "curl -sS --max-time 10 {base}/index.html; touch {s}; \
         while [ ! -e {t} ]; do sleep 0.05; done",
        s = started.display(),
        t = stop.display()
    );

    let capture = server.pod.capture().expect("capture");
    let mut wrapped = run(
        &host,
        &[
            "--name",
            "wrapped",
            "--ca",
            &mesh.ca.address(),
            "--token-file",
            token.to_str().unwrap(),
            "--ca-bundle",
            bundle.to_str().unwrap(),
            "--",
            "sh",
            "-c",
            &script,
        ],
    )
    .spawn_run();
    wait_for_file(&started, &mut wrapped);

    // While the run is active: a bystander on the same host, as root too.
    let out = host
        .command("curl")
        .args(["-sS", "--max-time", "10", &format!("{base}/plain.html")])
        .output()
        .expect("curl");
    assert_eq!(String::from_utf8_lossy(&out.stdout), plain_body);

    // A meshed peer can tunnel to any port of the host's proxy, but never
    // to a service the host keeps on localhost: no inbound port is
    // captured, so the proxy dials only the host's own address.
    let private = host
        .run_in(|| TcpListener::bind("127.0.0.1:6000"))
        .unwrap()
        .expect("bind 127.0.0.1:6000");
    private.set_nonblocking(true).unwrap();
    let dst = SocketAddr::new(host.ip().into(), 6000);
    let got = tcp_exchange(&server.pod, dst, b"");
    assert!(got.map(|b| b.is_empty()).unwrap_or(true));
    assert!(
        private.accept().is_err(),
        "a peer reached the host's localhost-only service through the mesh"
    );
    assert!(
        server
            .proxy
            .stderr()
            .contains(&format!("{}:15006", host.ip())),
        "the peer's proxy never tunnelled to the host's proxy:\n{}",
        server.proxy.stderr()
    );

    std::fs::write(&stop, b"").unwrap();
    let status = status_of(&mut wrapped);
    assert_eq!(status.code(), Some(0), "{}", wrapped.stderr());
    assert_eq!(wrapped.stdout(), wrapped_body);

    let pcap = capture.stop().expect("stop capture");
    assert_mesh_tls_only(&pcap, &[wrapped_body.as_bytes(), b"GET /index.html"]);
    assert!(
        pcap.contains(plain_body.as_bytes()) && pcap.contains(b"GET /plain.html"),
        "the bystander's request was captured too; it should have gone direct"
    );
    let log = server.proxy.stderr();
    assert!(
        log.contains(&id),
        "the server's proxy log lacks the run's identity {id}:\n{log}"
    );
    assert_clean(&host, &before, wrapped.pid());
}

/// Without a CA, a throwaway one gives the run an identity: the wrapped
/// process reaches a plain server (the proxy first looks for a peer proxy
/// on its port 15006, then goes plaintext), and a server wrapped with
/// `--inbound-ports` is reached through the proxy by a plain client, while
/// other ports of the host are not captured. SIGTERM to `legate run`
/// reaches the server, and its status comes back.
#[test]
fn embedded_ca_outbound_to_plain_servers_and_inbound_on_listed_ports() {
    let bed = Bed::new().expect("test bed");
    let host = bed.pod("host").expect("pod");
    let db = bed.pod("db").expect("pod");
    let client = bed.pod("client").expect("pod");
    host_rules(&host);
    let before = tables(&host);

    // Outbound to a plain server.
    let body = secret("plain");
    let (_http, _site) = http_server(&db, 8080, &body);
    let capture = db.capture().expect("capture");
    let url = format!("http://{}:8080/index.html", db.ip());
    let mut wrapped = run(&host, &["--", "curl", "-sS", "--max-time", "10", &url]).spawn_run();
    let status = status_of(&mut wrapped);
    assert_eq!(status.code(), Some(0), "{}", wrapped.stderr());
    assert_eq!(wrapped.stdout(), body);
    assert!(
        wrapped.stderr().contains("spiffe://legate.local/curl"),
        "the identity defaults to the command's name:\n{}",
        wrapped.stderr()
    );
    let pcap = capture.stop().expect("stop capture");
    let flows = pcap.tcp_flows().expect("flows");
    assert!(
        flows
            .iter()
            .any(|f| f.dst == SocketAddr::new(db.ip().into(), 15006)),
        "the proxy never looked for a peer proxy, so the connection was not captured"
    );
    assert!(
        pcap.contains(body.as_bytes()),
        "plaintext to a plain server"
    );
    assert_clean(&host, &before, wrapped.pid());

    // Inbound, on the listed port only.
    let site = shared_dir().unwrap();
    write_readable(&site.path().join("index.html"), body.as_bytes()).unwrap();
    let other_port = host
        .run_in(|| TcpListener::bind("0.0.0.0:2222"))
        .unwrap()
        .expect("bind 2222");
    other_port.set_nonblocking(true).unwrap();
    let mut server = run(
        &host,
        &[
            "--inbound-ports",
            "8080",
            "--uid",
            "1000",
            "--gid",
            "1000",
            "--",
            "python3",
            "-m",
            "http.server",
            "8080",
            "--bind",
            "::",
        ],
    )
    .current_dir(site.path())
    .spawn_run();
    let url = format!("http://{}:8080/index.html", host.ip());
    let mut last = (false, String::new(), String::new());
    let served = eventually(20, || {
        last = curl(&client, &[&url]);
        last.0 && last.1 == body
    });
    assert!(served, "inbound: {last:?}\n{}", server.stderr());
    // The app saw the proxy, over loopback, as its client.
    let logged = eventually(5, || server.stderr().contains("127.0.0.1 - -"));
    let log = server.stderr();
    assert!(
        logged && !log.contains(&format!("{} - -", client.ip())),
        "the inbound request did not come through the proxy:\n{log}"
    );
    // A port that was not listed is reached directly.
    let host_ip = host.ip();
    let reached = client
        .run_in(move || std::net::TcpStream::connect((host_ip, 2222)).is_ok())
        .unwrap();
    assert!(reached);
    assert!(
        eventually(5, || other_port.accept().is_ok()),
        "a connection to an unlisted port was captured"
    );

    server.signal(Signal::SIGTERM).unwrap();
    let status = status_of(&mut server);
    assert_eq!(status.code(), Some(143), "{}", server.stderr());
    assert_clean(&host, &before, server.pid());
}

/// However the command ends, its status comes back and the host is clean:
/// an exit code, a crash, a SIGKILL from outside, a command that does not
/// exist.
#[test]
fn every_ending_of_the_command_is_reported_and_cleaned_up() {
    let bed = Bed::new().expect("test bed");
    let host = bed.pod("host").expect("pod");
    host_rules(&host);
    let before = tables(&host);

    for (script, code) in [
        ("exit 7", 7),
        ("kill -SEGV $$", 139),
        ("kill -ABRT $$", 134),
    ] {
        let mut p = run(&host, &["--", "sh", "-c", script]).spawn_run();
        assert_eq!(
            status_of(&mut p).code(),
            Some(code),
            "{script}: {}",
            p.stderr()
        );
        assert_clean(&host, &before, p.pid());
    }

    // SIGKILL of the command from outside.
    let flags = shared_dir().unwrap();
    let started = flags.path().join("started");
    let script = format!("touch {} && exec sleep 30", started.display());
    let mut p = run(&host, &["--", "sh", "-c", &script]).spawn_run();
    wait_for_file(&started, &mut p);
    // The flag is written just before the shell execs into `sleep`, so
    // the first look may still find the shell.
    let mut sleeper = None;
    eventually(5, || {
        sleeper = pids_in(&host)
            .into_iter()
            .find(|(_, c)| c.starts_with("sleep 30"))
            .map(|(pid, _)| pid);
        sleeper.is_some()
    });
    let Some(sleeper) = sleeper else {
        panic!("no command in {:?}", processes_in(&host))
    };
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(sleeper), Signal::SIGKILL).unwrap();
    assert_eq!(status_of(&mut p).code(), Some(137), "{}", p.stderr());
    assert_clean(&host, &before, p.pid());

    // A command that does not exist: 127, after the rules came and went.
    let (code, _, stderr) = finish(run(&host, &["--", "/nonexistent/program"]));
    assert_eq!(code, Some(127), "{stderr}");
    assert!(
        stderr.contains("cannot run `/nonexistent/program`"),
        "{stderr}"
    );
    assert_eq!(tables(&host), before);
}

/// A `legate run` killed with SIGKILL takes its proxy and command with it
/// (parent-death signal) but cannot remove its rules; the next run refuses
/// and says how to clean up, and `legate run --cleanup` restores the host.
#[test]
fn a_killed_run_is_refused_until_cleanup() {
    let bed = Bed::new().expect("test bed");
    let host = bed.pod("host").expect("pod");
    host_rules(&host);
    let before = tables(&host);

    let flags = shared_dir().unwrap();
    let started = flags.path().join("started");
    let script = format!("touch {} && exec sleep 30", started.display());
    let mut p = run(&host, &["--", "sh", "-c", &script]).spawn_run();
    wait_for_file(&started, &mut p);
    p.signal(Signal::SIGKILL).unwrap();
    status_of(&mut p);
    assert!(
        eventually(10, || processes_in(&host).is_empty()),
        "the proxy and the command outlived legate run: {:?}",
        processes_in(&host)
    );
    assert_ne!(tables(&host), before, "the rules stay after SIGKILL");

    let (code, _, stderr) = finish(run(&host, &["--", "true"]));
    assert_eq!(code, Some(125), "{stderr}");
    assert!(
        stderr.contains("earlier `legate run`") && stderr.contains("legate run --cleanup"),
        "{stderr}"
    );

    // Rules that outlived their run leave the host without its network, so
    // a configuration that no longer loads must not keep them in: it is
    // reported, and the defaults find the rules.
    let (code, stdout, stderr) =
        finish(run(&host, &["--cleanup"]).env("LEGATE_PROXY_WORKERS", "999"));
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stderr.contains("does not load") && stderr.contains("proxy.workers"),
        "{stderr}"
    );
    assert!(stdout.contains("removed the iptables rules"), "{stdout}");
    assert!(
        stdout.contains(&format!("legate-run-{}-", p.pid())),
        "{stdout}"
    );
    assert_clean(&host, &before, p.pid());

    let (code, stdout, _) = finish(run(&host, &["--cleanup"]));
    assert_eq!(code, Some(0));
    assert!(stdout.contains("nothing"), "{stdout}");
    let (code, _, stderr) = finish(run(&host, &["--", "true"]));
    assert_eq!(code, Some(0), "runs again after cleanup: {stderr}");
    assert_eq!(tables(&host), before);
}

/// Mistakes are refused before anything changes, each with its fix.
#[test]
fn mistakes_are_refused_with_the_fix() {
    let bed = Bed::new().expect("test bed");
    let pod = bed.pod("host").expect("pod");

    let (code, _, stderr) = finish(run(&pod, &[]));
    assert_eq!(code, Some(2));
    assert!(
        stderr.contains("no command to run") && stderr.contains("after `--`"),
        "{stderr}"
    );
    let (code, _, stderr) = finish(run(&pod, &["--"]));
    assert_eq!(code, Some(2), "{stderr}");
    let (code, _, stderr) = finish(run(&pod, &["curl", "-s", "http://10.0.0.1/"]));
    assert_eq!(code, Some(2));
    assert!(stderr.contains("-- curl -s http://10.0.0.1/"), "{stderr}");

    let (code, _, stderr) = finish(run(&pod, &["--", "true"]).uid(APP_UID).current_dir("/"));
    assert_eq!(code, Some(125));
    assert!(
        stderr.contains("needs root") && stderr.contains("sudo"),
        "{stderr}"
    );

    let (code, _, stderr) = finish(run(&pod, &["--capture-group", "1337", "--", "true"]));
    assert_eq!(code, Some(125));
    assert!(stderr.contains("init.capture_group"), "{stderr}");

    let (code, _, stderr) = finish(run(&pod, &["--token-file", "/dev/null", "--", "true"]));
    assert_eq!(code, Some(125));
    assert!(stderr.contains("--ca HOST:PORT"), "{stderr}");

    // A trust bundle that is not one is named as given, before anything
    // starts, not through the copy the proxy would have read.
    let files = shared_dir().unwrap();
    let garbage = files.path().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate\n").unwrap();
    let garbage = garbage.to_str().unwrap();
    let (code, _, stderr) = finish(run(
        &pod,
        &[
            "--ca",
            "10.200.0.9:15012",
            "--token-file",
            garbage,
            "--ca-bundle",
            garbage,
            "--",
            "true",
        ],
    ));
    assert_eq!(code, Some(125), "{stderr}");
    assert!(
        stderr.contains("--ca-bundle")
            && stderr.contains(garbage)
            && stderr.contains("not a usable trust bundle")
            && !stderr.contains("usual cause"),
        "{stderr}"
    );

    // A pod's rules are not a run's: refused, and --cleanup leaves them.
    legate().run(&pod, &["init"]).expect("legate init");
    let with_init = tables(&pod);
    let (code, _, stderr) = finish(run(&pod, &["--", "true"]));
    assert_eq!(code, Some(125));
    assert!(
        stderr.contains("`legate init` interception rules"),
        "{stderr}"
    );
    let (code, _, stderr) = finish(run(&pod, &["--cleanup"]));
    assert_ne!(code, Some(0));
    assert!(stderr.contains("legate init --cleanup"), "{stderr}");
    assert_eq!(tables(&pod), with_init);
    // As for a run: a configuration that no longer loads is reported, and
    // the rules go all the same.
    let out = legate()
        .command(&pod)
        .args(["init", "--cleanup"])
        .env("LEGATE_PROXY_WORKERS", "999")
        .output()
        .expect("legate init --cleanup");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("does not load") && stderr.contains("proxy.workers"),
        "{stderr}"
    );
    // `legate init` created the nat table, which stays, empty, after it.
    let after_init = tables(&pod);
    assert!(!after_init.contains("LEGATE"), "{after_init}");

    // Two runs in one namespace: the second is refused while the first lives.
    let flags = shared_dir().unwrap();
    let started = flags.path().join("started");
    let script = format!("touch {} && exec sleep 30", started.display());
    let mut first = run(&pod, &["--", "sh", "-c", &script]).spawn_run();
    wait_for_file(&started, &mut first);
    let (code, _, stderr) = finish(run(&pod, &["--", "true"]));
    assert_eq!(code, Some(125));
    assert!(
        stderr.contains("another `legate run` is active")
            && stderr.contains(&format!("pid {}", first.pid())),
        "{stderr}"
    );
    first.signal(Signal::SIGINT).unwrap();
    assert_eq!(
        status_of(&mut first).code(),
        Some(130),
        "{}",
        first.stderr()
    );
    assert_clean(&pod, &after_init, first.pid());
}
