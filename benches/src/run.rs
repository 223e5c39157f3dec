//! The runner: builds the bed, starts the mesh, the applications and the
//! comparison pairs, measures every peer, and prints the tables.

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use legate_testbed::{Bed, Pod, PodCommand, Process};

use crate::measure::{self, Costs, ProcGroup};
use crate::parse;
use crate::peers::{self, port};
use crate::report::{self, Report};
use crate::Result;

const TRUST_DOMAIN: &str = "legate.local";
const PROXY_UID: u32 = 1337;
/// How long any setup step may take.
const SETUP_TIMEOUT: Duration = Duration::from_secs(30);
/// A proxy that uses more CPU than this while another peer is measured is
/// reported: capture must not leak into the other paths.
const LEAK_CORES: f64 = 0.02;
/// Other users of the machine (builds, tests) compete for the same cores.
/// Before each measured run the bench waits, for at most `--quiet-wait`,
/// until they use less than `QUIET_CORES`; a run during which they used
/// more than `BUSY_CORES` is repeated, up to `--attempts` times in all,
/// and the least disturbed run is kept and reported.
const QUIET_CORES: f64 = 0.10;
/// The page the HTTP benchmarks fetch (256 bytes, served by nginx).
const HTTP_PATH: &str = "/index.html";
const BUSY_CORES: f64 = 0.25;
/// How long a bulk stream runs before latency is measured beside it: past
/// slow start, with every buffer on its way full.
const BULK_LEAD: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Suite {
    /// The L4 data plane: throughput, connection rate, latency, memory.
    L4,
    /// The HTTP data plane: HTTP/1.1 with wrk, HTTP/2 with h2load.
    Http,
    /// Latency of small exchanges alone and beside a bulk stream through
    /// the same proxies.
    Beside,
    /// All of them.
    All,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The legate binary; defaults to `legate` next to this program.
    #[arg(long, value_name = "PATH")]
    legate: Option<PathBuf>,
    /// Which benchmarks to run.
    #[arg(long, value_enum, default_value_t = Suite::All)]
    suite: Suite,
    /// Length of each measured run, in seconds.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Concurrent loops of the new-connections client.
    #[arg(long, default_value_t = 32)]
    crr_concurrency: usize,
    /// Connections held open for the memory measurement.
    #[arg(long, default_value_t = 1000)]
    hold: usize,
    /// Also write the tables to this file.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// Scheduling priority of the bench and everything it starts (peers,
    /// proxies, load generators alike). Below zero, builds and tests that
    /// share the machine disturb the numbers less; 0 leaves it alone.
    #[arg(long, default_value_t = -10, allow_negative_numbers = true)]
    nice: i32,
    /// Longest wait, in seconds, for other processes to quiet down before
    /// each measured run.
    #[arg(long, default_value_t = 30)]
    quiet_wait: u64,
    /// Runs of each measurement at most, when other processes disturb it;
    /// the least disturbed one is kept.
    #[arg(long, default_value_t = 2)]
    attempts: usize,
    /// Rounds of the HTTP and L4 throughput measurements. Each round
    /// measures every peer once, in an order rotated by one from the round
    /// before, so that no peer always follows the same one or meets the
    /// machine at the same point of its drift; the report keeps each
    /// peer's median round and lists all of them.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    rounds: u32,
    /// Measure only these peers (comma-separated: direct, legate,
    /// nginx-stream, nginx-http, haproxy); all by default.
    #[arg(long, value_delimiter = ',', value_name = "PEERS")]
    peers: Vec<String>,
    /// Extra environment for both legate proxies, for experiments such as
    /// MALLOC_ARENA_MAX=2 (repeatable).
    #[arg(long = "legate-env", value_name = "KEY=VALUE")]
    legate_env: Vec<String>,
    /// Extra `--set KEY=VALUE` for both legate proxies (repeatable).
    #[arg(long = "legate-set", value_name = "KEY=VALUE")]
    legate_set: Vec<String>,
    /// Record a CPU profile of both proxies with `perf` during each
    /// measurement of legate and of HAProxy (one process a side, so their
    /// profiles compare directly), and write `perf report` summaries to
    /// this directory. Sampling costs a little CPU: keep numbers for the
    /// record from runs without it.
    #[arg(long, value_name = "DIR")]
    profile: Option<PathBuf>,
    /// With --profile: record call graphs too (DWARF unwinding; large
    /// files, more overhead), to see who calls the hot functions.
    #[arg(long, requires = "profile")]
    profile_call_graph: bool,
    /// Count each proxy's system calls and context switches with
    /// `perf stat` during every measured run, and report them per unit of
    /// work (needs linux-perf).
    #[arg(long)]
    count: bool,
    /// Pace the beside suite's bulk stream to this rate (iperf3's `-b`,
    /// such as `1.5G`); unpaced by default. A build that moves the stream
    /// faster also leaves less CPU to the small exchanges beside it, so
    /// two builds' latencies compare only at one rate.
    #[arg(long, value_name = "BITS_PER_SEC")]
    bulk_rate: Option<String>,
}

/// One way from the client app to the server app, and the processes that
/// make it up.
#[derive(Debug, Clone)]
pub struct Peer {
    pub name: &'static str,
    /// Client-side and server-side proxy; none for direct.
    pub proxies: Option<(ProcGroup, ProcGroup)>,
    pub iperf: SocketAddr,
    pub echo: SocketAddr,
    pub h1: SocketAddr,
    pub h2: SocketAddr,
}

impl Peer {
    fn groups(&self) -> Vec<ProcGroup> {
        match &self.proxies {
            Some((c, s)) => vec![c.clone(), s.clone()],
            None => Vec::new(),
        }
    }
}

/// What one measured run cost each proxy side, and the machine.
#[derive(Debug, Clone, Copy, Default)]
pub struct Cost {
    pub client_cores: f64,
    pub server_cores: f64,
    pub client_rss: u64,
    pub server_rss: u64,
    pub machine_busy: f64,
    /// Cores other users of the machine took meanwhile.
    pub foreign_cores: f64,
    /// With `--count`: system calls and context switches of each side.
    pub counts: Option<[Counted; 2]>,
}

/// Kernel crossings of one proxy side during a run, from `perf stat`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Counted {
    pub syscalls: u64,
    pub context_switches: u64,
}

pub struct Bench {
    exe: PathBuf,
    legate: PathBuf,
    files: tempfile::TempDir,
    _bed: Bed,
    client: Pod,
    server: Pod,
    /// Kept alive for the whole run; killed when dropped.
    processes: Vec<Process>,
    legate_proxies: Vec<(&'static str, usize)>,
    all_groups: Vec<ProcGroup>,
    args: RunArgs,
}

pub fn run(args: RunArgs) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        return Err("needs root for network namespaces and iptables; use scripts/bench.sh".into());
    }
    for tool in ["iperf3", "wrk", "h2load", "nginx", "haproxy", "iptables"] {
        if which(tool).is_none() {
            return Err(format!("`{tool}` is missing; scripts/deps.sh bench installs it").into());
        }
    }
    raise_nofile();
    // First, while this is the only thread: niceness is per thread and
    // inherited by the threads and processes started later.
    if args.nice != 0 {
        let pid = std::process::id().to_string();
        host_output("renice", ["-n", &args.nice.to_string(), "-p", &pid])
            .ok_or("renice failed; pass --nice 0 to skip it")?;
    }
    let started = now_utc();
    let mut bench = Bench::start(args)?;
    let mut report = Report::new(report::Context::collect(
        &bench.legate,
        started,
        bench.command(),
    ));
    report.hold = bench.args.hold;
    report.seconds = bench.args.seconds;
    report.idle_fresh = bench.idle_rss();
    report.idle_file = bench
        .all_groups
        .iter()
        .map(|g| (g.label.clone(), measure::rss_file(g)))
        .collect();
    let suite = bench.args.suite;
    if matches!(suite, Suite::L4 | Suite::All) {
        bench.l4(&mut report)?;
    }
    if matches!(suite, Suite::Http | Suite::All) {
        bench.http(&mut report)?;
    }
    if matches!(suite, Suite::Beside | Suite::All) {
        bench.beside(&mut report)?;
    }
    // Memory the proxies keep once the load is gone.
    std::thread::sleep(Duration::from_secs(2));
    report.idle_after = bench.idle_rss();
    report.notes.extend(bench.legate_log_notes());
    let text = report.render();
    println!("{text}");
    if let Some(out) = &bench.args.out {
        std::fs::write(out, &text)?;
    }
    Ok(())
}

impl Bench {
    fn start(args: RunArgs) -> Result<Bench> {
        let exe = std::env::current_exe()?;
        let legate = match &args.legate {
            Some(p) => p.clone(),
            None => exe.with_file_name("legate"),
        };
        if !legate.exists() {
            return Err(format!(
                "no legate binary at {}; build it with `cargo build --release` or pass --legate",
                legate.display()
            )
            .into());
        }
        let files = tempfile::Builder::new().prefix("legate-bench").tempdir()?;
        std::fs::set_permissions(files.path(), std::fs::Permissions::from_mode(0o755))?;

        eprintln!("legate-bench: building the bed");
        let bed = Bed::new()?;
        let ca = bed.pod("ca")?;
        let client = bed.pod("client")?;
        let server = bed.pod("server")?;
        for pod in [&client, &server] {
            // Tens of thousands of short connections a second leave their
            // ports in TIME_WAIT; let new connections reuse them, and use
            // the whole port range. Both settings belong to the pod's own
            // namespace.
            pod.exec([
                "sysctl",
                "-q",
                "-w",
                "net.ipv4.tcp_tw_reuse=1",
                "net.ipv4.ip_local_port_range=1024 65000",
            ])?;
        }

        let mut bench = Bench {
            exe,
            legate,
            files,
            _bed: bed,
            client,
            server,
            processes: Vec::new(),
            legate_proxies: Vec::new(),
            all_groups: Vec::new(),
            args,
        };
        bench.start_mesh(&ca)?;
        bench.start_apps()?;
        bench.start_comparisons()?;
        if let Err(e) = bench.wait_for_everything() {
            return Err(format!("{e}{}", bench.exited()).into());
        }
        Ok(bench)
    }

    /// What processes that have already ended printed, to explain why a
    /// port never opened.
    fn exited(&mut self) -> String {
        let mut out = String::new();
        for p in &mut self.processes {
            if let Ok(Some(status)) = p.try_wait() {
                out += &format!(
                    "\n`{}` exited ({status}):\n{}{}",
                    p.program(),
                    p.stdout(),
                    p.stderr()
                );
            }
        }
        out
    }

    fn command(&self) -> String {
        let args: Vec<String> = std::env::args().skip(1).collect();
        format!("legate-bench {}", args.join(" ")).trim().to_owned()
    }

    fn file(&self, name: &str) -> PathBuf {
        self.files.path().join(name)
    }

    fn write(&self, name: &str, body: &str) -> Result<PathBuf> {
        let path = self.file(name);
        std::fs::write(&path, body)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))?;
        Ok(path)
    }

    fn legate_cmd(&self, pod: &Pod) -> PodCommand {
        let mut cmd = pod.command(&self.legate);
        for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("LEGATE_")) {
            cmd = cmd.env_remove(k);
        }
        cmd
    }

    fn legate_ok(&self, pod: &Pod, args: &[&str]) -> Result<String> {
        exec_bounded(
            self.legate_cmd(pod).args(args),
            &format!("legate {}", args.join(" ")),
            SETUP_TIMEOUT,
        )
    }

    fn spawn(&mut self, label: &str, cmd: PodCommand) -> Result<usize> {
        let p = cmd.spawn().map_err(|e| format!("starting {label}: {e}"))?;
        self.processes.push(p);
        Ok(self.processes.len() - 1)
    }

    fn pid(&self, index: usize) -> u32 {
        self.processes[index].pid()
    }

    /// A CA pod, then `legate init` and `legate proxy` in the client and
    /// server pods, as an operator would run them.
    fn start_mesh(&mut self, ca: &Pod) -> Result<()> {
        eprintln!("legate-bench: starting the CA and the legate sidecars");
        let ca_dir = self.file("ca");
        std::fs::create_dir(&ca_dir)?;
        let ca_dir = ca_dir.to_str().ok_or("non-UTF-8 temp path")?.to_owned();
        self.legate_ok(
            ca,
            &[
                "ca",
                "init",
                "--dir",
                &ca_dir,
                "--trust-domain",
                TRUST_DOMAIN,
            ],
        )?;
        let serve = self.legate_cmd(ca).args(["ca", "serve", "--dir", &ca_dir]);
        self.spawn("legate ca serve", serve)?;
        ca.wait_for_port(SocketAddr::new(ca.ip().into(), 15012), SETUP_TIMEOUT)?;
        let bundle = self.legate_ok(ca, &["ca", "bundle", "--dir", &ca_dir])?;
        let bundle = self.write("bundle.pem", &bundle)?;

        let excluded = port::NOT_CAPTURED
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let sides = [
            (self.client.clone(), "client", "--exclude-outbound-ports"),
            (self.server.clone(), "server", "--exclude-inbound-ports"),
        ];
        for (pod, name, exclude) in sides {
            self.legate_ok(&pod, &["init", exclude, &excluded])?;
            let identity = format!("spiffe://{TRUST_DOMAIN}/{name}");
            let token = self.legate_ok(
                ca,
                &[
                    "ca",
                    "token",
                    "--dir",
                    &ca_dir,
                    "--identity",
                    &identity,
                    "--ttl",
                    "10m",
                ],
            )?;
            let token = self.write(&format!("{name}.token"), token.trim())?;
            let proxy = self
                .legate_cmd(&pod)
                .args(["proxy", "--name", name, "--ca"])
                .arg(format!("{}:15012", ca.ip()))
                .arg("--ca-bundle")
                .arg(&bundle)
                .arg("--token-file")
                .arg(&token)
                .current_dir("/")
                .uid(PROXY_UID)
                .gid(PROXY_UID);
            let mut proxy = proxy;
            for set in &self.args.legate_set {
                proxy = proxy.arg("--set").arg(set);
            }
            for env in &self.args.legate_env {
                let (k, v) = env
                    .split_once('=')
                    .ok_or_else(|| format!("--legate-env {env}: expected KEY=VALUE"))?;
                proxy = proxy.env(k, v);
            }
            let i = self.spawn(&format!("legate proxy in {name}"), proxy)?;
            self.legate_proxies.push((name, i));
            let label = format!("legate {name}");
            self.all_groups.push(ProcGroup::new(label, self.pid(i)));
        }
        for (name, i) in self.legate_proxies.clone() {
            let pod = if name == "client" {
                &self.client
            } else {
                &self.server
            };
            wait_ready(pod, &mut self.processes[i])?;
        }
        Ok(())
    }

    /// iperf3 servers, the echo tool and the nginx application, all in the
    /// server pod, each on a captured port and a direct one.
    fn start_apps(&mut self) -> Result<()> {
        eprintln!("legate-bench: starting the applications");
        for p in [port::IPERF, port::IPERF_DIRECT] {
            let cmd =
                self.server
                    .command("iperf3")
                    .args(["-s", "--forceflush", "-p", &p.to_string()]);
            let i = self.spawn("iperf3 -s", cmd)?;
            self.processes[i].wait_for_output("Server listening", SETUP_TIMEOUT)?;
        }
        let echo = self.server.command(&self.exe).args([
            "tool",
            "echo",
            "--listen",
            &format!("0.0.0.0:{}", port::ECHO),
            "--listen",
            &format!("0.0.0.0:{}", port::ECHO_DIRECT),
        ]);
        self.spawn("echo server", echo)?;

        let site = self.file("site");
        std::fs::create_dir(&site)?;
        std::fs::set_permissions(&site, std::fs::Permissions::from_mode(0o755))?;
        std::fs::write(site.join("index.html"), peers::page())?;
        let prefix = self.prefix("app")?;
        let conf = peers::nginx_app(&prefix, &site);
        self.start_nginx("nginx app", &self.server.clone(), &prefix, &conf)?;
        Ok(())
    }

    /// A directory for one nginx instance's config, pid file and logs.
    fn prefix(&self, name: &str) -> Result<PathBuf> {
        let dir = self.file(&format!("nginx-{name}"));
        std::fs::create_dir(&dir)?;
        Ok(dir)
    }

    fn start_nginx(&mut self, label: &str, pod: &Pod, prefix: &Path, conf: &str) -> Result<u32> {
        let path = prefix.join("nginx.conf");
        std::fs::write(&path, conf)?;
        // Check the file first, so a mistake reads as nginx's own message.
        // -p and -e: nothing outside the prefix, not even the log nginx
        // opens before it has read its configuration.
        let nginx = || {
            pod.command("nginx")
                .arg("-p")
                .arg(prefix)
                .arg("-e")
                .arg(prefix.join("error.log"))
                .arg("-c")
                .arg(&path)
        };
        exec_bounded(
            nginx().arg("-t").arg("-q"),
            &format!("nginx -t for {label}"),
            SETUP_TIMEOUT,
        )?;
        let cmd = nginx();
        let i = self.spawn(label, cmd)?;
        Ok(self.pid(i))
    }

    fn start_comparisons(&mut self) -> Result<()> {
        eprintln!("legate-bench: starting the nginx and HAProxy pairs");
        let dir = self.file("certs");
        std::fs::create_dir(&dir)?;
        let certs = crate::certs::generate(&dir)?;
        let server_ip = self.server.ip().to_string();
        let (client, server) = (self.client.clone(), self.server.clone());

        let p = self.prefix("stream-client")?;
        let conf = peers::nginx_stream_client(&p, &certs, &server_ip);
        let pid = self.start_nginx("nginx stream client", &client, &p, &conf)?;
        self.all_groups
            .push(ProcGroup::new("nginx-stream client", pid));
        let p = self.prefix("stream-server")?;
        let conf = peers::nginx_stream_server(&p, &certs);
        let pid = self.start_nginx("nginx stream server", &server, &p, &conf)?;
        self.all_groups
            .push(ProcGroup::new("nginx-stream server", pid));

        let p = self.prefix("http-client")?;
        let conf = peers::nginx_http_client(&p, &certs, &server_ip);
        let pid = self.start_nginx("nginx http client", &client, &p, &conf)?;
        self.all_groups
            .push(ProcGroup::new("nginx-http client", pid));
        let p = self.prefix("http-server")?;
        let conf = peers::nginx_http_server(&p, &certs);
        let pid = self.start_nginx("nginx http server", &server, &p, &conf)?;
        self.all_groups
            .push(ProcGroup::new("nginx-http server", pid));

        for (side, pod, conf) in [
            ("client", &client, peers::haproxy_client(&certs, &server_ip)),
            ("server", &server, peers::haproxy_server(&certs)),
        ] {
            let path = self.write(&format!("haproxy-{side}.cfg"), &conf)?;
            exec_bounded(
                pod.command("haproxy").arg("-c").arg("-f").arg(&path),
                &format!("haproxy -c for the {side} side"),
                SETUP_TIMEOUT,
            )?;
            // -db: stay in the foreground, one process with its threads.
            let cmd = pod.command("haproxy").arg("-db").arg("-f").arg(&path);
            let i = self.spawn(&format!("haproxy {side}"), cmd)?;
            self.all_groups
                .push(ProcGroup::new(format!("haproxy {side}"), self.pid(i)));
        }
        Ok(())
    }

    fn wait_for_everything(&self) -> Result<()> {
        let s = self.server.ip();
        let local = Ipv4Addr::LOCALHOST;
        let from_client: Vec<SocketAddr> = [
            (s, port::ECHO_DIRECT),
            (s, port::HTTP1_DIRECT),
            (s, port::H2C_DIRECT),
            (s, port::NGINX_HTTP_TLS),
            (s, port::HAPROXY_TLS),
            (s, port::NGINX_STREAM_TLS_ECHO),
            (local, port::NGINX_STREAM_LOCAL_ECHO),
            (local, port::NGINX_HTTP_LOCAL_H1),
            (local, port::NGINX_HTTP_LOCAL_H2),
            (local, port::HAPROXY_LOCAL_H1),
            (local, port::HAPROXY_LOCAL_H2),
        ]
        .into_iter()
        .map(|(ip, p)| SocketAddr::new(ip.into(), p))
        .collect();
        for addr in from_client {
            self.client.wait_for_port(addr, SETUP_TIMEOUT)?;
        }
        for p in [port::ECHO, port::HTTP1, port::H2C] {
            self.server
                .wait_for_port(SocketAddr::new(local.into(), p), SETUP_TIMEOUT)?;
        }
        Ok(())
    }

    fn group(&self, label: &str) -> ProcGroup {
        self.all_groups
            .iter()
            .find(|g| g.label == label)
            .cloned()
            .expect("every group is registered at start")
    }

    fn pair(&self, name: &str) -> Option<(ProcGroup, ProcGroup)> {
        Some((
            self.group(&format!("{name} client")),
            self.group(&format!("{name} server")),
        ))
    }

    /// Whether `--peers` asks for the peer `name` (all are, without it).
    fn wants(&self, name: &str) -> bool {
        self.args.peers.is_empty() || self.args.peers.iter().any(|w| w == name)
    }

    fn wanted(&self, peers: Vec<Peer>) -> Vec<Peer> {
        peers.into_iter().filter(|p| self.wants(p.name)).collect()
    }

    fn peers_l4(&self) -> Vec<Peer> {
        let s = self.server.ip();
        let local = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let at = |ip: IpAddr, p: u16| SocketAddr::new(ip, p);
        let none = at(local, 9);
        vec![
            Peer {
                name: "direct",
                proxies: None,
                iperf: at(s.into(), port::IPERF_DIRECT),
                echo: at(s.into(), port::ECHO_DIRECT),
                h1: none,
                h2: none,
            },
            Peer {
                name: "legate",
                proxies: self.pair("legate"),
                iperf: at(s.into(), port::IPERF),
                echo: at(s.into(), port::ECHO),
                h1: none,
                h2: none,
            },
            Peer {
                name: "nginx-stream",
                proxies: self.pair("nginx-stream"),
                iperf: at(local, port::NGINX_STREAM_LOCAL_IPERF),
                echo: at(local, port::NGINX_STREAM_LOCAL_ECHO),
                h1: none,
                h2: none,
            },
        ]
    }

    fn peers_http(&self) -> Vec<Peer> {
        let s = self.server.ip();
        let local = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let at = |ip: IpAddr, p: u16| SocketAddr::new(ip, p);
        let none = at(local, 9);
        let peer = |name, proxies, h1, h2| Peer {
            name,
            proxies,
            iperf: none,
            echo: none,
            h1,
            h2,
        };
        vec![
            peer(
                "direct",
                None,
                at(s.into(), port::HTTP1_DIRECT),
                at(s.into(), port::H2C_DIRECT),
            ),
            peer(
                "legate",
                self.pair("legate"),
                at(s.into(), port::HTTP1),
                at(s.into(), port::H2C),
            ),
            peer(
                "nginx-http",
                self.pair("nginx-http"),
                at(local, port::NGINX_HTTP_LOCAL_H1),
                at(local, port::NGINX_HTTP_LOCAL_H2),
            ),
            peer(
                "haproxy",
                self.pair("haproxy"),
                at(local, port::HAPROXY_LOCAL_H1),
                at(local, port::HAPROXY_LOCAL_H2),
            ),
        ]
    }

    /// RSS of every proxy now, by group label.
    fn idle_rss(&self) -> Vec<(String, u64)> {
        self.all_groups
            .iter()
            .map(|g| (g.label.clone(), g.rss()))
            .collect()
    }

    /// Runs `f`, measuring every proxy, on a machine as quiet as it gets
    /// (see [`QUIET_CORES`]); returns the peer's own cost, and notes a leak
    /// if any other proxy was busy meanwhile.
    fn measured<T>(
        &self,
        peer: &Peer,
        what: &str,
        report: &mut Report,
        mut f: impl FnMut() -> Result<T>,
    ) -> Result<(T, Cost)> {
        let mut best: Option<(T, Costs, Option<[Counted; 2]>)> = None;
        let attempts = self.args.attempts.max(1);
        for attempt in 1..=attempts {
            let waited =
                measure::wait_quiet(Duration::from_secs(self.args.quiet_wait), QUIET_CORES);
            if waited >= QUIET_CORES {
                eprintln!(
                    "legate-bench: other processes still use {waited:.2} cores; measuring anyway"
                );
            }
            let cg = self.args.profile_call_graph;
            let perf = match (&self.args.profile, &peer.proxies) {
                (Some(dir), Some((c, s))) if matches!(peer.name, "legate" | "haproxy") => {
                    let name = format!("{}-{what}-attempt{attempt}", peer.name)
                        .replace([' ', '/'], "_")
                        .replace(['(', ')'], "");
                    vec![
                        Perf::start(dir, &format!("{name}-client"), c.root, cg)?,
                        Perf::start(dir, &format!("{name}-server"), s.root, cg)?,
                    ]
                }
                _ => Vec::new(),
            };
            let stats = match (&peer.proxies, self.args.count) {
                (Some((c, s)), true) => Some([PerfStat::start(c)?, PerfStat::start(s)?]),
                _ => None,
            };
            let (out, costs) = measure::during(&self.all_groups, &mut f);
            for p in perf {
                p.finish()?;
            }
            let counts = match stats {
                Some([c, s]) => Some([c.finish()?, s.finish()?]),
                None => None,
            };
            let out = out?;
            let foreign = costs.foreign_cores;
            if best
                .as_ref()
                .is_none_or(|(_, b, _)| foreign < b.foreign_cores)
            {
                best = Some((out, costs, counts));
            }
            if foreign <= BUSY_CORES {
                break;
            }
            eprintln!(
                "legate-bench: other processes used {foreign:.2} cores during {what} of {} (attempt {attempt} of {attempts})",
                peer.name
            );
        }
        let (out, costs, counts) = best.expect("at least one attempt");
        if costs.foreign_cores > BUSY_CORES {
            report.notes.push(format!(
                "{what} of {}: other processes on the machine used {:.2} cores during the best of {attempts} attempts; treat it with care",
                peer.name, costs.foreign_cores
            ));
        }
        report.max_foreign = report.max_foreign.max(costs.foreign_cores);
        let mine: Vec<String> = peer.groups().iter().map(|g| g.label.clone()).collect();
        for u in &costs.groups {
            if !mine.contains(&u.label) && u.cpu_cores > LEAK_CORES {
                report.notes.push(format!(
                    "{what} of {}: {} used {:.2} cores although it was not in the path",
                    peer.name, u.label, u.cpu_cores
                ));
            }
        }
        let mut cost = cost_of(peer, &costs);
        cost.counts = counts;
        Ok((out, cost))
    }

    fn client_tool(&self, args: &[String]) -> PodCommand {
        self.client.command(&self.exe).arg("tool").args(args)
    }

    /// 64-byte round trips to the echo server at `target` from the client
    /// pod for `--seconds`.
    fn pingpong(&self, target: SocketAddr) -> Result<parse::PingPong> {
        let secs = self.args.seconds;
        let args = [
            "pingpong".to_owned(),
            "--target".into(),
            target.to_string(),
            "--seconds".into(),
            secs.to_string(),
        ];
        let out = exec_bounded(
            self.client_tool(&args),
            "pingpong",
            Duration::from_secs(secs + 60),
        )?;
        parse::pingpong(&out)
    }

    fn l4(&mut self, report: &mut Report) -> Result<()> {
        let peers = self.wanted(self.peers_l4());
        let rounds = self.args.rounds as usize;
        // Test by test across peers rather than peer by peer, and bulk
        // throughput in rounds as HTTP is, so that a slow drift of the
        // machine spreads over all peers alike.
        for parallel in [1usize, 8] {
            for round in 0..rounds {
                let order = in_turn(&peers, round);
                self.l4_throughput(&order, parallel, round, rounds, report)?;
            }
        }
        self.l4_rest(&peers, report)
    }

    /// One round of bulk throughput with `parallel` connections through
    /// each of `peers`, in that order.
    fn l4_throughput(
        &self,
        peers: &[Peer],
        parallel: usize,
        round: usize,
        rounds: usize,
        report: &mut Report,
    ) -> Result<()> {
        let secs = self.args.seconds;
        for peer in peers {
            eprintln!(
                "legate-bench: L4 throughput, {parallel} connection(s), {} (round {} of {rounds})",
                peer.name,
                round + 1
            );
            let iperf3 = || {
                self.client.command("iperf3").args([
                    "-c".to_owned(),
                    peer.iperf.ip().to_string(),
                    "-p".into(),
                    peer.iperf.port().to_string(),
                    "-t".into(),
                    secs.to_string(),
                    // Leave out the first second: slow start, pools opening.
                    "-O".into(),
                    "1".into(),
                    "-P".into(),
                    parallel.to_string(),
                    "-J".into(),
                ])
            };
            let what = format!("iperf3 -P {parallel} (round {})", round + 1);
            let (out, cost) = self.measured(peer, &what, report, || {
                exec_bounded(iperf3(), &what, Duration::from_secs(secs + 60))
            })?;
            let gbps = parse::iperf3_bps(&out)? / 1e9;
            report
                .l4_mut(peer.name)
                .throughput
                .push((parallel, gbps, cost));
        }
        Ok(())
    }

    /// New connections, ping-pong latency and memory with held
    /// connections, once per peer.
    fn l4_rest(&mut self, peers: &[Peer], report: &mut Report) -> Result<()> {
        let secs = self.args.seconds;
        let conc = self.args.crr_concurrency.to_string();
        for peer in peers {
            eprintln!("legate-bench: L4 new connections, {}", peer.name);
            let target = peer.echo.to_string();
            let args = |s: u64| -> Vec<String> {
                [
                    "crr",
                    "--target",
                    &target,
                    "--concurrency",
                    &conc,
                    "--seconds",
                    &s.to_string(),
                ]
                .map(str::to_owned)
                .to_vec()
            };
            // Warm up: pooled connections, TLS session caches.
            exec_bounded(
                self.client_tool(&args(1)),
                "crr warm-up",
                Duration::from_secs(60),
            )?;
            let (out, cost) = self.measured(peer, "new connections", report, || {
                exec_bounded(
                    self.client_tool(&args(secs)),
                    "crr",
                    Duration::from_secs(secs + 60),
                )
            })?;
            let v: serde_json::Value = serde_json::from_str(&out)?;
            let row = report.l4_mut(peer.name);
            row.cps = v["per_sec"].as_f64().unwrap_or(0.0);
            row.cps_errors = v["errors"].as_u64().unwrap_or(0);
            if let Some(e) = v["first_error"].as_str() {
                report.notes.push(format!(
                    "new connections through {}: {} failed, first: {e}",
                    peer.name, v["errors"]
                ));
            }
            report.l4_mut(peer.name).cps_cost = cost;
        }
        for peer in peers {
            eprintln!("legate-bench: L4 latency, {}", peer.name);
            let (pp, cost) =
                self.measured(peer, "ping-pong", report, || self.pingpong(peer.echo))?;
            let row = report.l4_mut(peer.name);
            row.pp_p50_us = pp.p50_us;
            row.pp_p99_us = pp.p99_us;
            row.pp_p999_us = pp.p999_us;
            row.pp_count = pp.count;
            row.pp_cost = cost;
        }
        for peer in peers {
            let Some((c, s)) = &peer.proxies else {
                continue;
            };
            eprintln!(
                "legate-bench: L4 memory with {} connections, {}",
                self.args.hold, peer.name
            );
            let before = (c.rss(), s.rss());
            let args: Vec<String> = [
                "hold",
                "--target",
                &peer.echo.to_string(),
                "--count",
                &self.args.hold.to_string(),
                "--seconds",
                "300",
            ]
            .map(str::to_owned)
            .to_vec();
            let mut hold = self.client_tool(&args).spawn()?;
            hold.wait_for_output("holding", Duration::from_secs(120))?;
            // Let the proxies finish whatever the last connections started.
            std::thread::sleep(Duration::from_secs(2));
            let held = (c.rss(), s.rss());
            hold.kill()?;
            let row = report.l4_mut(peer.name);
            row.rss_before_hold = Some(before);
            row.rss_hold = Some(held);
            // Give the proxies time to close all of them before the next peer.
            std::thread::sleep(Duration::from_secs(3));
        }
        Ok(())
    }

    fn http(&mut self, report: &mut Report) -> Result<()> {
        let peers = self.wanted(self.peers_http());
        let rounds = self.args.rounds as usize;
        report.rounds = rounds;
        for round in 0..rounds {
            let order = in_turn(&peers, round);
            for proto in ["HTTP/1.1", "HTTP/2"] {
                for peer in &order {
                    let tool = if proto == "HTTP/2" { "h2load" } else { "wrk" };
                    eprintln!(
                        "legate-bench: {proto} with {tool}, {} (round {} of {rounds})",
                        peer.name,
                        round + 1
                    );
                    let (load, cost) = if proto == "HTTP/2" {
                        self.h2load(peer, round, report)?
                    } else {
                        self.wrk(peer, round, report)?
                    };
                    report.http.push(report::HttpRow {
                        peer: peer.name,
                        proto,
                        round,
                        load,
                        cost,
                    });
                }
            }
        }
        Ok(())
    }

    /// Ping-pong and sequential HTTP/1.1 latency through each peer, first
    /// alone, then (through the peers that carry TCP) while one iperf3
    /// stream runs through the same proxies. What the second adds is what
    /// a small exchange waits behind another connection's bulk data, and
    /// the CPU the stream takes.
    fn beside(&mut self, report: &mut Report) -> Result<()> {
        let l4 = self.peers_l4();
        let http = self.peers_http();
        let mut names: Vec<&'static str> = l4.iter().map(|p| p.name).collect();
        for p in &http {
            if !names.contains(&p.name) {
                names.push(p.name);
            }
        }
        for name in names {
            if !self.wants(name) {
                continue;
            }
            let tcp = l4.iter().find(|p| p.name == name);
            let h1 = http.iter().find(|p| p.name == name).map(|p| p.h1);
            let mut runs = vec![None];
            runs.extend(tcp.map(|p| Some(p.iperf)));
            for bulk in runs {
                report
                    .beside
                    .push(self.latency(name, tcp.map(|p| p.echo), h1, bulk)?);
            }
        }
        Ok(())
    }

    /// One row of [`Self::beside`] through the peer `name`: ping-pong to
    /// `echo` and sequential HTTP/1.1 to `h1`, where the peer carries
    /// them, with a bulk stream to `bulk` meanwhile when there is one.
    fn latency(
        &self,
        name: &'static str,
        echo: Option<SocketAddr>,
        h1: Option<SocketAddr>,
        bulk: Option<SocketAddr>,
    ) -> Result<report::BesideRow> {
        let secs = self.args.seconds;
        eprintln!(
            "legate-bench: latency {} a bulk stream, {name}",
            if bulk.is_some() { "beside" } else { "without" },
        );
        measure::wait_quiet(Duration::from_secs(self.args.quiet_wait), QUIET_CORES);
        // Long enough to outlast both measurements after its lead.
        let length = BULK_LEAD.as_secs() + 2 * secs + 2;
        let mut stream = match bulk {
            Some(addr) => {
                let mut args = vec![
                    "-c".to_owned(),
                    addr.ip().to_string(),
                    "-p".into(),
                    addr.port().to_string(),
                    "-t".into(),
                    length.to_string(),
                    "-J".into(),
                ];
                if let Some(rate) = &self.args.bulk_rate {
                    args.extend(["-b".to_owned(), rate.clone()]);
                }
                let cmd = self.client.command("iperf3").args(args);
                let p = cmd.spawn()?;
                std::thread::sleep(BULK_LEAD);
                Some(p)
            }
            None => None,
        };
        let pp = match echo {
            Some(addr) => {
                let pp = self.pingpong(addr)?;
                Some((pp.p50_us, pp.p99_us))
            }
            None => None,
        };
        let http = match h1 {
            Some(addr) => {
                let cmd = self.client.command("wrk").args([
                    "-t1".to_owned(),
                    "-c1".into(),
                    format!("-d{secs}s"),
                    "--latency".into(),
                    format!("http://{addr}{HTTP_PATH}"),
                ]);
                let out = exec_bounded(cmd, "wrk", Duration::from_secs(secs + 60))?;
                Some(parse::wrk(&out)?)
            }
            None => None,
        };
        let bulk_gbps = match stream.as_mut() {
            Some(p) => {
                p.wait_timeout(Duration::from_secs(length + 30))?;
                Some(parse::iperf3_bps(&p.stdout())? / 1e9)
            }
            None => None,
        };
        Ok(report::BesideRow {
            peer: name,
            bulk_gbps,
            pingpong: pp,
            http,
        })
    }

    /// One measured wrk run (HTTP/1.1 keep-alive) through `peer`, after a
    /// short warm-up that fills the proxies' connection pools.
    fn wrk(
        &self,
        peer: &Peer,
        round: usize,
        report: &mut Report,
    ) -> Result<(parse::HttpLoad, Cost)> {
        let secs = self.args.seconds;
        let url = format!("http://{}{HTTP_PATH}", peer.h1);
        let wrk = |s: u64| {
            self.client.command("wrk").args([
                "-t2".to_owned(),
                "-c50".into(),
                format!("-d{s}s"),
                "--latency".into(),
                url.clone(),
            ])
        };
        exec_bounded(wrk(2), "wrk warm-up", Duration::from_secs(60))?;
        let what = format!("wrk (round {})", round + 1);
        self.measured(peer, &what, report, || {
            parse::wrk(&exec_bounded(
                wrk(secs),
                "wrk",
                Duration::from_secs(secs + 60),
            )?)
        })
    }

    /// One measured h2load run (HTTP/2, prior knowledge) through `peer`,
    /// after a short warm-up.
    fn h2load(
        &self,
        peer: &Peer,
        round: usize,
        report: &mut Report,
    ) -> Result<(parse::HttpLoad, Cost)> {
        let secs = self.args.seconds;
        let url = format!("http://{}{HTTP_PATH}", peer.h2);
        let log = self.file(&format!("h2load-{}.log", peer.name));
        let h2load = |s: u64, log: Option<&Path>| {
            let mut cmd = self.client.command("h2load").args([
                "-c10".to_owned(),
                "-m10".into(),
                "-t1".into(),
                "-D".into(),
                s.to_string(),
            ]);
            if let Some(log) = log {
                cmd = cmd.arg("--log-file").arg(log);
            }
            cmd.arg(&url)
        };
        exec_bounded(h2load(2, None), "h2load warm-up", Duration::from_secs(60))?;
        let what = format!("h2load (round {})", round + 1);
        self.measured(peer, &what, report, || {
            let cmd = h2load(secs, Some(&log));
            let out = exec_bounded(cmd, "h2load", Duration::from_secs(secs + 60))?;
            let log_text = std::fs::read_to_string(&log)?;
            let _ = std::fs::remove_file(&log);
            parse::h2load(&out, &log_text)
        })
    }

    /// Warnings and errors the legate proxies logged during the run.
    fn legate_log_notes(&self) -> Vec<String> {
        let mut notes = Vec::new();
        for (name, i) in &self.legate_proxies {
            let log = self.processes[*i].stderr();
            let bad: Vec<&str> = log
                .lines()
                .filter(|l| l.contains("WARN") || l.contains("ERROR"))
                .collect();
            if !bad.is_empty() {
                notes.push(format!(
                    "the legate {name} proxy logged {} warnings or errors; the first: {}",
                    bad.len(),
                    bad[0].trim()
                ));
            }
        }
        notes
    }
}

/// `perf stat` counting system calls and context switches of a proxy (all
/// its processes and threads) while a measurement runs.
struct PerfStat {
    child: std::process::Child,
    out: tempfile::NamedTempFile,
}

impl PerfStat {
    fn start(group: &ProcGroup) -> Result<PerfStat> {
        let out = tempfile::NamedTempFile::new()?;
        let pids: Vec<String> = group.pids().iter().map(u32::to_string).collect();
        let child =
            std::process::Command::new(which("perf").ok_or("perf is missing (linux-perf)")?)
                .args([
                    "stat",
                    "-x",
                    ",",
                    "-e",
                    "raw_syscalls:sys_enter,context-switches",
                ])
                .args(["-p", &pids.join(","), "-o"])
                .arg(out.path())
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()?;
        // perf attaches asynchronously; give it a moment before the load.
        std::thread::sleep(Duration::from_millis(200));
        Ok(PerfStat { child, out })
    }

    fn finish(mut self) -> Result<Counted> {
        stop_child(&mut self.child, "perf stat")?;
        let text = std::fs::read_to_string(self.out.path())?;
        let count = |event: &str| -> u64 {
            text.lines()
                .find(|l| l.contains(event))
                .and_then(|l| l.split(',').next()?.trim().parse().ok())
                .unwrap_or(0)
        };
        Ok(Counted {
            syscalls: count("raw_syscalls:sys_enter"),
            context_switches: count("context-switches"),
        })
    }
}

/// Stops a `perf` child with SIGINT, as Ctrl-C would, so it writes out
/// what it has; kills it if it does not stop within 30 s.
fn stop_child(child: &mut std::process::Child, what: &str) -> Result<()> {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGINT);
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait()?.is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("{what} did not stop").into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// `perf record` of one process while a measurement runs, summarised with
/// `perf report` into `<dir>/<name>.txt` when it ends.
struct Perf {
    child: std::process::Child,
    data: PathBuf,
    text: PathBuf,
}

/// The peers in the order they take their turns in `round`: rotated by
/// one each round, so that no peer always follows the same one or meets
/// the machine at the same point of its drift.
fn in_turn(peers: &[Peer], round: usize) -> Vec<Peer> {
    let mut order = peers.to_vec();
    order.rotate_left(round % peers.len().max(1));
    order
}

impl Perf {
    fn start(dir: &Path, name: &str, pid: u32, call_graph: bool) -> Result<Perf> {
        std::fs::create_dir_all(dir)?;
        let data = dir.join(format!("{name}.data"));
        let text = dir.join(format!("{name}.txt"));
        let mut perf =
            std::process::Command::new(which("perf").ok_or("perf is missing (linux-perf)")?);
        perf.args(["record", "-q", "-F", "999", "-p", &pid.to_string()]);
        if call_graph {
            perf.args(["--call-graph", "dwarf,16384"]);
        }
        let child = perf
            .arg("-o")
            .arg(&data)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()?;
        Ok(Perf { child, data, text })
    }

    fn finish(mut self) -> Result<()> {
        stop_child(&mut self.child, "perf record")?;
        let report = std::process::Command::new(which("perf").ok_or("perf is missing")?)
            .args(["report", "--stdio", "--no-children", "--sort", "dso,symbol"])
            .args(["--percent-limit", "0.5", "-i"])
            .arg(&self.data)
            .stdin(std::process::Stdio::null())
            .output()?;
        std::fs::write(&self.text, &report.stdout)?;
        Ok(())
    }
}

fn cost_of(peer: &Peer, costs: &Costs) -> Cost {
    let mut c = Cost {
        machine_busy: costs.machine_busy,
        foreign_cores: costs.foreign_cores,
        ..Cost::default()
    };
    if let Some((cg, sg)) = &peer.proxies {
        if let Some(u) = costs.get(&cg.label) {
            c.client_cores = u.cpu_cores;
            c.client_rss = u.peak_rss;
        }
        if let Some(u) = costs.get(&sg.label) {
            c.server_cores = u.cpu_cores;
            c.server_rss = u.peak_rss;
        }
    }
    c
}

/// Runs a command in a pod to completion within `timeout`, and returns its
/// stdout; an error carries its output.
fn exec_bounded(cmd: PodCommand, what: &str, timeout: Duration) -> Result<String> {
    let mut p = cmd.spawn().map_err(|e| format!("{what}: {e}"))?;
    let status = p
        .wait_timeout(timeout)
        .map_err(|e| format!("{what}: {e}"))?;
    if !status.success() {
        return Err(format!("{what} failed ({status}):\n{}{}", p.stdout(), p.stderr()).into());
    }
    Ok(p.stdout())
}

/// Polls the proxy's `/ready` until it answers 200.
fn wait_ready(pod: &Pod, proxy: &mut Process) -> Result<()> {
    let deadline = Instant::now() + SETUP_TIMEOUT;
    let admin: SocketAddr = (Ipv4Addr::LOCALHOST, 15000).into();
    while Instant::now() < deadline {
        if pod.run_in(|| http_status(admin, "/ready"))?.ok() == Some(200) {
            return Ok(());
        }
        if let Some(status) = proxy.try_wait()? {
            return Err(format!("legate proxy exited ({status}):\n{}", proxy.stderr()).into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(format!(
        "legate proxy in {} never became ready; it printed:\n{}",
        pod.name(),
        proxy.stderr()
    )
    .into())
}

fn http_status(addr: SocketAddr, path: &str) -> std::io::Result<u16> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head)?;
    Ok(std::str::from_utf8(&head[9..12])
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(0))
}

/// Lets this process and everything it starts hold as many descriptors as
/// the hard limit allows: a thousand held connections need two each in a
/// proxy, more than the usual soft limit of 1024.
fn raise_nofile() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// The current time, as `date -u` prints it.
fn now_utc() -> String {
    host_output("date", ["-u", "+%Y-%m-%d %H:%M UTC"]).unwrap_or_else(|| "unknown".into())
}

/// Runs a program on the host (only ever to ask for a version or the
/// date) and returns its stdout, or its stderr when stdout is empty.
pub fn host_output<I, S>(program: &str, args: I) -> Option<String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let out = std::process::Command::new(which(program)?)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .ok()?;
    let text = if out.stdout.is_empty() {
        out.stderr
    } else {
        out.stdout
    };
    Some(String::from_utf8_lossy(&text).trim().to_owned())
}
