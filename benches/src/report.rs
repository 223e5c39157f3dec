//! The tables: what ran where, the numbers of every peer from the same run,
//! and whether legate met its targets.

use std::fmt::Write;
use std::path::Path;

use crate::parse::HttpLoad;
use crate::run::{host_output, Cost, Counted};

/// Where and with what the numbers were made.
#[derive(Debug, Clone)]
pub struct Context {
    pub date: String,
    pub command: String,
    pub cpus: String,
    pub cpu_model: String,
    pub kernel: String,
    pub memory: String,
    pub versions: Vec<(&'static str, String)>,
}

impl Context {
    pub fn collect(legate: &Path, date: String, command: String) -> Context {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map_or("unknown".into(), |(_, m)| m.trim().to_owned());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let memory = meminfo
            .lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .map_or("unknown".into(), |kb| {
                format!("{:.1} GiB", kb as f64 / 1024.0 / 1024.0)
            });
        let first = |program: &str, args: &[&str]| {
            host_output(program, args)
                .and_then(|o| o.lines().next().map(str::to_owned))
                .unwrap_or_else(|| "unknown".into())
        };
        let legate_version = std::process::Command::new(legate)
            .arg("--version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default();
        let commit = commit_in(Path::new("."));
        Context {
            date,
            command,
            cpus: std::thread::available_parallelism().map_or("unknown".into(), |n| n.to_string()),
            cpu_model,
            kernel: first("uname", &["-r"]),
            memory,
            versions: vec![
                ("legate", format!("{legate_version}, commit {commit}")),
                ("nginx", first("nginx", &["-v"])),
                ("HAProxy", first("haproxy", &["-v"])),
                ("iperf3", first("iperf3", &["--version"])),
                ("wrk", first("wrk", &["-v"])),
                ("h2load", first("h2load", &["--version"])),
            ],
        }
    }
}

/// The commit checked out in `dir`, as `git describe` names it. Run
/// outside a checkout, git's complaint is no commit: the report says the
/// commit is unknown instead.
fn commit_in(dir: &Path) -> String {
    std::process::Command::new("git")
        .args(["describe", "--always", "--dirty", "--abbrev=12"])
        .current_dir(dir)
        .stdin(std::process::Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .filter(|c| !c.is_empty())
        .unwrap_or_else(|| "unknown (the bench ran outside a git checkout)".into())
}

#[derive(Debug, Clone, Default)]
pub struct L4Row {
    pub peer: &'static str,
    /// (connections, Gbit/s, cost)
    pub throughput: Vec<(usize, f64, Cost)>,
    pub cps: f64,
    pub cps_errors: u64,
    pub cps_cost: Cost,
    pub pp_p50_us: f64,
    pub pp_p99_us: f64,
    pub pp_p999_us: f64,
    pub pp_count: u64,
    pub pp_cost: Cost,
    /// (client side, server side) RSS just before and while holding the
    /// connections.
    pub rss_before_hold: Option<(u64, u64)>,
    pub rss_hold: Option<(u64, u64)>,
}

impl L4Row {
    /// The median round with `conns` connections, by throughput; the lower
    /// of the middle two when the count is even.
    fn throughput_median(&self, conns: usize) -> Option<&(usize, f64, Cost)> {
        let mut rounds: Vec<&(usize, f64, Cost)> =
            self.throughput.iter().filter(|t| t.0 == conns).collect();
        rounds.sort_by(|a, b| a.1.total_cmp(&b.1));
        rounds.get(rounds.len().saturating_sub(1) / 2).copied()
    }

    fn gbps(&self, conns: usize) -> Option<f64> {
        self.throughput_median(conns).map(|t| t.1)
    }

    /// Every round's throughput with `conns` connections, in order.
    fn gbps_rounds(&self, conns: usize) -> Vec<f64> {
        self.throughput
            .iter()
            .filter(|t| t.0 == conns)
            .map(|t| t.1)
            .collect()
    }
}

#[derive(Debug, Clone)]
pub struct HttpRow {
    pub peer: &'static str,
    pub proto: &'static str,
    /// Which round of `--rounds` this is, from 0.
    pub round: usize,
    pub load: HttpLoad,
    pub cost: Cost,
}

/// Latency through a peer, alone or beside a bulk stream.
#[derive(Debug, Clone)]
pub struct BesideRow {
    pub peer: &'static str,
    /// The bulk stream's throughput over its whole run; `None` alone.
    pub bulk_gbps: Option<f64>,
    /// Ping-pong p50 and p99 in µs, where the peer carries TCP.
    pub pingpong: Option<(f64, f64)>,
    /// Sequential HTTP/1.1 requests, where the peer carries HTTP.
    pub http: Option<HttpLoad>,
}

pub struct Report {
    pub ctx: Context,
    pub idle_fresh: Vec<(String, u64)>,
    /// The file-backed part (program text, libraries) of `idle_fresh`.
    pub idle_file: Vec<(String, u64)>,
    pub idle_after: Vec<(String, u64)>,
    pub l4: Vec<L4Row>,
    /// Every HTTP measurement, all rounds.
    pub http: Vec<HttpRow>,
    /// Latency alone and beside a bulk stream, in the order measured.
    pub beside: Vec<BesideRow>,
    /// Rounds of HTTP measurements.
    pub rounds: usize,
    pub notes: Vec<String>,
    /// Connections held for the memory measurement.
    pub hold: usize,
    /// The most CPU other processes used during any kept run, in cores.
    pub max_foreign: f64,
    /// Length of each measured run.
    pub seconds: u64,
}

const MIB: f64 = 1024.0 * 1024.0;

fn mib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / MIB)
}

fn ms(us: f64) -> String {
    format!("{:.2}", us / 1000.0)
}

fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "**missed**"
    }
}

impl Report {
    pub fn new(ctx: Context) -> Report {
        Report {
            ctx,
            idle_fresh: Vec::new(),
            idle_file: Vec::new(),
            idle_after: Vec::new(),
            l4: Vec::new(),
            http: Vec::new(),
            beside: Vec::new(),
            rounds: 1,
            notes: Vec::new(),
            hold: 1000,
            max_foreign: 0.0,
            seconds: 10,
        }
    }

    pub fn l4_mut(&mut self, peer: &'static str) -> &mut L4Row {
        if let Some(i) = self.l4.iter().position(|r| r.peer == peer) {
            return &mut self.l4[i];
        }
        self.l4.push(L4Row {
            peer,
            ..L4Row::default()
        });
        self.l4.last_mut().expect("just pushed")
    }

    fn l4_row(&self, peer: &str) -> Option<&L4Row> {
        self.l4.iter().find(|r| r.peer == peer)
    }

    /// The median round of `peer` with `proto` by requests per second;
    /// the lower of the middle two when the count is even.
    fn http_row(&self, peer: &str, proto: &str) -> Option<&HttpRow> {
        let mut rows = self.http_rounds(peer, proto);
        rows.sort_by(|a, b| a.load.rps.total_cmp(&b.load.rps));
        rows.get(rows.len().saturating_sub(1) / 2).copied()
    }

    fn http_rounds(&self, peer: &str, proto: &str) -> Vec<&HttpRow> {
        self.http
            .iter()
            .filter(|r| r.peer == peer && r.proto == proto)
            .collect()
    }

    /// Each peer's median round per protocol, in the order first measured.
    fn http_medians(&self) -> Vec<&HttpRow> {
        let mut out: Vec<&HttpRow> = Vec::new();
        for r in &self.http {
            if out.iter().any(|m| m.peer == r.peer && m.proto == r.proto) {
                continue;
            }
            if let Some(m) = self.http_row(r.peer, r.proto) {
                out.push(m);
            }
        }
        out
    }

    /// In how many rounds legate's `better` held against both comparison
    /// pairs measured in the same round.
    fn rounds_won(&self, proto: &str, better: impl Fn(&HttpRow, &HttpRow) -> bool) -> usize {
        self.http_rounds("legate", proto)
            .into_iter()
            .filter(|l| {
                ["nginx-http", "haproxy"].iter().all(|other| {
                    self.http_rounds(other, proto)
                        .into_iter()
                        .filter(|o| o.round == l.round)
                        .all(|o| better(l, o))
                })
            })
            .count()
    }

    fn idle(list: &[(String, u64)], label: &str) -> Option<u64> {
        list.iter().find(|(l, _)| l == label).map(|(_, b)| *b)
    }

    pub fn render(&self) -> String {
        let mut o = String::new();
        let c = &self.ctx;
        let _ = writeln!(o, "### Run of {}\n", c.date);
        let _ = writeln!(o, "- command: `{}`", c.command);
        let _ = writeln!(
            o,
            "- machine: {} CPUs ({}), kernel {}, {} memory",
            c.cpus, c.cpu_model, c.kernel, c.memory
        );
        for (name, v) in &c.versions {
            let _ = writeln!(o, "- {name}: {v}");
        }
        let _ = writeln!(
            o,
            "- nothing pinned: load generator, applications and both proxies of a pair share all CPUs"
        );
        let _ = writeln!(
            o,
            "- other processes on the machine used at most {:.2} cores during any measured run",
            self.max_foreign
        );
        if !self.l4.is_empty() {
            self.render_l4(&mut o);
        }
        self.render_memory(&mut o);
        if !self.http.is_empty() {
            self.render_http(&mut o);
        }
        if !self.beside.is_empty() {
            self.render_beside(&mut o);
        }
        self.render_counts(&mut o);
        self.render_targets(&mut o);
        if !self.notes.is_empty() {
            let _ = writeln!(o, "\nNotes from the run:\n");
            for n in &self.notes {
                let _ = writeln!(o, "- {n}");
            }
        }
        o
    }

    fn render_beside(&self, o: &mut String) {
        let _ = writeln!(
            o,
            "\n#### Latency alone and beside a bulk stream: 64-byte ping-pong and sequential HTTP/1.1 (wrk -t1 -c1), in µs; beside, one iperf3 stream runs through the same proxies\n"
        );
        let _ = writeln!(
            o,
            "| peer | bulk stream | ping-pong p50 | p99 | HTTP/1.1 p50 | p99 | HTTP/1.1 req/s |"
        );
        let _ = writeln!(o, "| --- | --- | ---: | ---: | ---: | ---: | ---: |");
        for r in &self.beside {
            let bulk = r
                .bulk_gbps
                .map_or("none".into(), |g| format!("{g:.2} Gbit/s"));
            let (h50, h99, rps) = r.http.map_or(("-".into(), "-".into(), "-".into()), |h| {
                (
                    format!("{:.0}", h.p50_us),
                    format!("{:.0}", h.p99_us),
                    format!("{:.0}", h.rps),
                )
            });
            let (p50, p99) = r.pingpong.map_or(("-".into(), "-".into()), |(a, b)| {
                (format!("{a:.0}"), format!("{b:.0}"))
            });
            let _ = writeln!(
                o,
                "| {} | {bulk} | {p50} | {p99} | {h50} | {h99} | {rps} |",
                r.peer
            );
        }
    }

    fn render_l4(&self, o: &mut String) {
        let _ = writeln!(
            o,
            "\n#### L4: bulk throughput (iperf3), new connections, 64-byte ping-pong\n"
        );
        let _ = writeln!(
            o,
            "| peer | 1 conn Gbit/s | 8 conns Gbit/s | new conns/s | ping-pong p50 µs | p99 µs | p99.9 µs |"
        );
        let _ = writeln!(o, "| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
        for r in &self.l4 {
            let g = |n| r.gbps(n).map_or("-".into(), |g| format!("{g:.2}"));
            let errors = if r.cps_errors > 0 {
                format!(" ({} failed)", r.cps_errors)
            } else {
                String::new()
            };
            let _ = writeln!(
                o,
                "| {} | {} | {} | {:.0}{errors} | {:.1} | {:.1} | {:.1} |",
                r.peer,
                g(1),
                g(8),
                r.cps,
                r.pp_p50_us,
                r.pp_p99_us,
                r.pp_p999_us
            );
        }
        if self.l4.iter().any(|r| r.gbps_rounds(1).len() > 1) {
            let _ = writeln!(
                o,
                "\nThroughput is each peer's median round; every round, in Gbit/s (peers took turns in an order rotated by one each round):\n"
            );
            let _ = writeln!(o, "| peer | 1 conn | 8 conns |");
            let _ = writeln!(o, "| --- | --- | --- |");
            for r in &self.l4 {
                let list = |n| {
                    r.gbps_rounds(n)
                        .iter()
                        .map(|g| format!("{g:.2}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                let _ = writeln!(o, "| {} | {} | {} |", r.peer, list(1), list(8));
            }
        }
        let _ = writeln!(
            o,
            "\nCPU during each L4 run, in cores (1.00 = one core busy): client-side proxy / server-side proxy; the whole machine's busy share; cores other users of the machine took meanwhile.\n"
        );
        let _ = writeln!(o, "| peer | 1 conn | 8 conns | new conns | ping-pong |");
        let _ = writeln!(o, "| --- | --- | --- | --- | --- |");
        let cell = |c: &Cost, proxied: bool| {
            let machine = format!(
                "machine {:.0}%, others {:.2}",
                c.machine_busy * 100.0,
                c.foreign_cores
            );
            if proxied {
                format!("{:.2} / {:.2} ({machine})", c.client_cores, c.server_cores)
            } else {
                machine
            }
        };
        for r in &self.l4 {
            let proxied = r.peer != "direct";
            let t = |n| {
                r.throughput_median(n)
                    .map_or("-".into(), |t| cell(&t.2, proxied))
            };
            let _ = writeln!(
                o,
                "| {} | {} | {} | {} | {} |",
                r.peer,
                t(1),
                t(8),
                cell(&r.cps_cost, proxied),
                cell(&r.pp_cost, proxied)
            );
        }
        let _ = writeln!(
            o,
            "\nProxy CPU per unit of work, both sides together: what a proxy costs, and less sensitive than rates to other load on the machine.\n"
        );
        let _ = writeln!(
            o,
            "| peer | core-ms per GB, 1 conn | core-ms per GB, 8 conns | µs per new connection | µs per ping-pong round trip |"
        );
        let _ = writeln!(o, "| --- | ---: | ---: | ---: | ---: |");
        for r in self.l4.iter().filter(|r| r.peer != "direct") {
            let per_gb = |n| {
                r.throughput_median(n).map_or("-".into(), |t| {
                    let cores = t.2.client_cores + t.2.server_cores;
                    format!("{:.0}", cores / (t.1 / 8.0) * 1e3)
                })
            };
            let per = |cores: f64, per_sec: f64| {
                if per_sec > 0.0 {
                    format!("{:.0}", cores / per_sec * 1e6)
                } else {
                    "-".into()
                }
            };
            let rt_per_sec = r.pp_count as f64 / self.seconds as f64;
            let _ = writeln!(
                o,
                "| {} | {} | {} | {} | {} |",
                r.peer,
                per_gb(1),
                per_gb(8),
                per(r.cps_cost.client_cores + r.cps_cost.server_cores, r.cps),
                per(r.pp_cost.client_cores + r.pp_cost.server_cores, rt_per_sec),
            );
        }
    }

    fn render_memory(&self, o: &mut String) {
        let _ = writeln!(
            o,
            "\n#### Proxy memory: VmRSS in MiB, per proxy process (nginx: master plus workers)\n"
        );
        let _ = writeln!(
            o,
            "| proxy | idle at start | of which file-backed | before holding | holding {} conns | idle at end |",
            self.hold
        );
        let _ = writeln!(o, "| --- | ---: | ---: | ---: | ---: | ---: |");
        for (label, fresh) in &self.idle_fresh {
            let (peer, side) = label.rsplit_once(' ').unwrap_or((label, ""));
            let held = self.l4_row(peer).and_then(|r| {
                let pick = |p: (u64, u64)| if side == "client" { p.0 } else { p.1 };
                Some((pick(r.rss_before_hold?), pick(r.rss_hold?)))
            });
            let (before, held) = held.map_or(("-".into(), "-".into()), |(b, h)| (mib(b), mib(h)));
            let after = Self::idle(&self.idle_after, label).map_or("-".into(), mib);
            let file = Self::idle(&self.idle_file, label).map_or("-".into(), mib);
            let _ = writeln!(
                o,
                "| {label} | {} | {file} | {before} | {held} | {after} |",
                mib(*fresh)
            );
        }
    }

    fn render_http(&self, o: &mut String) {
        let _ = writeln!(
            o,
            "\n#### HTTP: wrk -t2 -c50 (HTTP/1.1 keep-alive), h2load -c10 -m10 -t1 (HTTP/2), 256-byte page from nginx\n"
        );
        let rounds = if self.rounds > 1 {
            format!(
                "Each peer's median of {} rounds by requests/s (every round is listed below). ",
                self.rounds
            )
        } else {
            String::new()
        };
        let _ = writeln!(
            o,
            "{rounds}CPU in cores over the run, peak VmRSS in MiB; client-side / server-side proxy.\n"
        );
        let _ = writeln!(
            o,
            "| peer | protocol | req/s | p50 ms | p99 ms | errors | proxy CPU | µs CPU per req | proxy RSS | machine busy | others |"
        );
        let _ = writeln!(
            o,
            "| --- | --- | ---: | ---: | ---: | ---: | --- | ---: | --- | ---: | ---: |"
        );
        for r in self.http_medians() {
            let (cpu, per_req, rss) = if r.peer == "direct" {
                ("-".to_owned(), "-".to_owned(), "-".to_owned())
            } else {
                let cores = r.cost.client_cores + r.cost.server_cores;
                (
                    format!("{:.2} / {:.2}", r.cost.client_cores, r.cost.server_cores),
                    format!("{:.0}", cores / r.load.rps * 1e6),
                    format!("{} / {}", mib(r.cost.client_rss), mib(r.cost.server_rss)),
                )
            };
            let _ = writeln!(
                o,
                "| {} | {} | {:.0} | {} | {} | {} | {cpu} | {per_req} | {rss} | {:.0}% | {:.2} |",
                r.peer,
                r.proto,
                r.load.rps,
                ms(r.load.p50_us),
                ms(r.load.p99_us),
                r.load.errors,
                r.cost.machine_busy * 100.0,
                r.cost.foreign_cores
            );
        }
        if self.rounds > 1 {
            self.render_http_rounds(o);
        }
    }

    /// Every HTTP round: requests/s, and the proxies' CPU per request.
    fn render_http_rounds(&self, o: &mut String) {
        let _ = writeln!(
            o,
            "\nEvery round: req/s (µs of proxy CPU per request); peers took turns in an order rotated by one each round.\n"
        );
        let mut head = "| peer | protocol |".to_owned();
        let mut rule = "| --- | --- |".to_owned();
        for n in 1..=self.rounds {
            let _ = write!(head, " round {n} |");
            rule.push_str(" ---: |");
        }
        let _ = writeln!(o, "{head}\n{rule}");
        for m in self.http_medians() {
            let mut line = format!("| {} | {} |", m.peer, m.proto);
            for round in 0..self.rounds {
                let cell = self
                    .http_rounds(m.peer, m.proto)
                    .into_iter()
                    .find(|r| r.round == round)
                    .map_or("-".to_owned(), |r| {
                        let cores = r.cost.client_cores + r.cost.server_cores;
                        if r.peer == "direct" || r.load.rps <= 0.0 {
                            format!("{:.0}", r.load.rps)
                        } else {
                            format!("{:.0} ({:.0})", r.load.rps, cores / r.load.rps * 1e6)
                        }
                    });
                let _ = write!(line, " {cell} |");
            }
            let _ = writeln!(o, "{line}");
        }
    }

    /// System calls and context switches per unit of work, when the run
    /// counted them (`--count`).
    fn render_counts(&self, o: &mut String) {
        let per = |c: &Option<[Counted; 2]>, units: f64| -> Option<String> {
            let [a, b] = (*c)?;
            if units <= 0.0 {
                return None;
            }
            Some(format!(
                "{:.1} / {:.1} | {:.1} / {:.1}",
                a.syscalls as f64 / units,
                b.syscalls as f64 / units,
                a.context_switches as f64 / units,
                b.context_switches as f64 / units
            ))
        };
        let secs = self.seconds as f64;
        let mut rows = Vec::new();
        for r in &self.l4 {
            if let Some(x) = per(&r.cps_cost.counts, r.cps * secs) {
                rows.push(format!("| {} | new connection | {x} |", r.peer));
            }
            if let Some(x) = per(&r.pp_cost.counts, r.pp_count as f64) {
                rows.push(format!("| {} | ping-pong round trip | {x} |", r.peer));
            }
        }
        for r in self.http_medians() {
            if let Some(x) = per(&r.cost.counts, r.load.rps * secs) {
                rows.push(format!("| {} | {} request | {x} |", r.peer, r.proto));
            }
        }
        if rows.is_empty() {
            return;
        }
        let _ = writeln!(
            o,
            "\n#### Kernel crossings per unit of work (perf stat; client-side / server-side proxy)\n"
        );
        let _ = writeln!(o, "| peer | per | system calls | context switches |");
        let _ = writeln!(o, "| --- | --- | ---: | ---: |");
        for row in rows {
            let _ = writeln!(o, "{row}");
        }
    }

    fn render_targets(&self, o: &mut String) {
        let mut rows: Vec<(String, String, String, bool)> = Vec::new();
        if let (Some(l), Some(n)) = (self.l4_row("legate"), self.l4_row("nginx-stream")) {
            for conns in [1, 8] {
                if let (Some(lg), Some(ng)) = (l.gbps(conns), n.gbps(conns)) {
                    let (lr, nr) = (l.gbps_rounds(conns), n.gbps_rounds(conns));
                    let won = if lr.len() > 1 {
                        let ahead = lr.iter().zip(&nr).filter(|(a, b)| a >= b).count();
                        format!("; legate ahead in {ahead} of {} rounds", lr.len())
                    } else {
                        String::new()
                    };
                    rows.push((
                        format!("L4 throughput, {conns} conn(s) ≥ nginx stream pair"),
                        format!("{lg:.2} Gbit/s"),
                        format!("{ng:.2} Gbit/s{won}"),
                        lg >= ng,
                    ));
                }
            }
            rows.push((
                "new connections/s ≥ 5 × nginx stream pair".into(),
                format!("{:.0}/s", l.cps),
                format!("5 × {:.0} = {:.0}/s", n.cps, 5.0 * n.cps),
                l.cps >= 5.0 * n.cps,
            ));
        }
        for side in ["client", "server"] {
            let label = format!("legate {side}");
            if let Some(b) = Self::idle(&self.idle_fresh, &label) {
                rows.push((
                    format!("RSS idle ≤ 10 MB, {side}-side proxy"),
                    format!("{} MiB", mib(b)),
                    "10 MB".into(),
                    b as f64 <= 10e6,
                ));
            }
            if let Some(h) = self.l4_row("legate").and_then(|r| r.rss_hold) {
                let b = if side == "client" { h.0 } else { h.1 };
                rows.push((
                    format!(
                        "RSS with {} connections ≤ 30 MB, {side}-side proxy",
                        self.hold
                    ),
                    format!("{} MiB", mib(b)),
                    "30 MB".into(),
                    b as f64 <= 30e6,
                ));
            }
        }
        for proto in ["HTTP/1.1", "HTTP/2"] {
            let Some(l) = self.http_row("legate", proto) else {
                continue;
            };
            let (Some(n), Some(h)) = (
                self.http_row("nginx-http", proto),
                self.http_row("haproxy", proto),
            ) else {
                continue;
            };
            let best = n.load.rps.max(h.load.rps);
            let (won_rps, won_p99) = if self.rounds > 1 {
                let of = self.http_rounds("legate", proto).len();
                (
                    format!(
                        "; legate ahead in {} of {of} rounds",
                        self.rounds_won(proto, |l, o| l.load.rps >= o.load.rps)
                    ),
                    format!(
                        "; legate's lower in {} of {of} rounds",
                        self.rounds_won(proto, |l, o| l.load.p99_us <= o.load.p99_us)
                    ),
                )
            } else {
                (String::new(), String::new())
            };
            rows.push((
                format!("{proto} req/s ≥ the faster of nginx and HAProxy"),
                format!("{:.0}", l.load.rps),
                format!(
                    "nginx {:.0}, HAProxy {:.0}{won_rps}",
                    n.load.rps, h.load.rps
                ),
                l.load.rps >= best,
            ));
            let low = n.load.p99_us.min(h.load.p99_us);
            rows.push((
                format!("{proto} p99 ≤ nginx's and HAProxy's"),
                format!("{} ms", ms(l.load.p99_us)),
                format!(
                    "nginx {} ms, HAProxy {} ms{won_p99}",
                    ms(n.load.p99_us),
                    ms(h.load.p99_us)
                ),
                l.load.p99_us <= low,
            ));
            // Memory is judged on the largest round, not the median one.
            let (client_rss, server_rss) = self
                .http_rounds("legate", proto)
                .into_iter()
                .fold((0, 0), |(c, s), r| {
                    (c.max(r.cost.client_rss), s.max(r.cost.server_rss))
                });
            let peak = client_rss.max(server_rss);
            rows.push((
                format!("{proto} RSS under load ≤ 20 MB, each proxy"),
                format!("{} / {} MiB", mib(client_rss), mib(server_rss)),
                "20 MB".into(),
                peak as f64 <= 20e6,
            ));
        }
        if rows.is_empty() {
            return;
        }
        let _ = writeln!(o, "\n#### Targets (MB = 10^6 bytes, MiB = 2^20 bytes)\n");
        let _ = writeln!(o, "| target | legate | reference | verdict |");
        let _ = writeln!(o, "| --- | --- | --- | --- |");
        for (t, l, r, met) in rows {
            let _ = writeln!(o, "| {t} | {l} | {r} | {} |", verdict(met));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outside_a_checkout_the_commit_is_unknown_not_gits_error() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let commit = commit_in(dir.path());
        assert!(commit.starts_with("unknown"), "{commit}");
    }

    fn ctx() -> Context {
        Context {
            date: "today".into(),
            command: "legate-bench".into(),
            cpus: "2".into(),
            cpu_model: "test".into(),
            kernel: "test".into(),
            memory: "1 GiB".into(),
            versions: Vec::new(),
        }
    }

    fn row(peer: &'static str, round: usize, rps: f64, p99_us: f64, rss: u64) -> HttpRow {
        HttpRow {
            peer,
            proto: "HTTP/1.1",
            round,
            load: HttpLoad {
                rps,
                p50_us: 1000.0,
                p99_us,
                errors: 0,
            },
            cost: Cost {
                client_cores: 0.5,
                server_cores: 0.5,
                client_rss: rss,
                server_rss: rss,
                ..Cost::default()
            },
        }
    }

    #[test]
    fn latency_rows_show_what_each_peer_carries_and_the_stream_beside_it() {
        let mut r = Report::new(ctx());
        let load = HttpLoad {
            rps: 2500.0,
            p50_us: 400.0,
            p99_us: 1900.0,
            errors: 0,
        };
        r.beside = vec![
            BesideRow {
                peer: "legate",
                bulk_gbps: Some(2.345),
                pingpong: Some((179.4, 587.0)),
                http: Some(load),
            },
            BesideRow {
                peer: "nginx-stream",
                bulk_gbps: None,
                pingpong: Some((264.0, 594.0)),
                http: None,
            },
            BesideRow {
                peer: "haproxy",
                bulk_gbps: None,
                pingpong: None,
                http: Some(load),
            },
        ];
        let text = r.render();
        assert!(text.contains("| legate | 2.35 Gbit/s | 179 | 587 | 400 | 1900 | 2500 |"));
        assert!(text.contains("| nginx-stream | none | 264 | 594 | - | - | - |"));
        assert!(text.contains("| haproxy | none | - | - | 400 | 1900 | 2500 |"));
    }

    #[test]
    fn targets_use_each_peers_median_round_and_count_rounds_won() {
        let mut r = Report::new(ctx());
        r.rounds = 3;
        r.http = vec![
            row("legate", 0, 100.0, 5000.0, 12 << 20),
            row("haproxy", 0, 150.0, 4000.0, 20 << 20),
            row("nginx-http", 0, 90.0, 6000.0, 40 << 20),
            row("legate", 1, 300.0, 3000.0, 15 << 20),
            row("haproxy", 1, 120.0, 4000.0, 20 << 20),
            row("nginx-http", 1, 80.0, 6000.0, 40 << 20),
            row("legate", 2, 200.0, 3500.0, 13 << 20),
            row("haproxy", 2, 130.0, 4000.0, 20 << 20),
            row("nginx-http", 2, 70.0, 7000.0, 40 << 20),
        ];
        assert_eq!(r.http_row("legate", "HTTP/1.1").map(|m| m.round), Some(2));
        assert_eq!(r.http_row("haproxy", "HTTP/1.1").map(|m| m.round), Some(2));
        assert_eq!(r.rounds_won("HTTP/1.1", |l, o| l.load.rps >= o.load.rps), 2);
        let text = r.render();
        assert!(
            text.contains("| HTTP/1.1 req/s ≥ the faster of nginx and HAProxy | 200 | nginx 80, HAProxy 130; legate ahead in 2 of 3 rounds | met |"),
            "{text}"
        );
        // Memory is judged on the largest round, not the median one.
        assert!(text.contains("| 15.0 / 15.0 MiB | 20 MB | met |"), "{text}");
        assert!(
            text.contains("| legate | HTTP/1.1 | 100 (10000) | 300 (3333) | 200 (5000) |"),
            "{text}"
        );
    }

    #[test]
    fn l4_throughput_is_judged_on_each_peers_median_round() {
        let mut r = Report::new(ctx());
        let cost = Cost::default();
        for (peer, one, eight) in [
            ("legate", [3.0, 5.0, 4.0], [3.0, 3.5, 3.9]),
            ("nginx-stream", [2.0, 2.5, 4.5], [3.6, 3.2, 3.4]),
        ] {
            let row = r.l4_mut(peer);
            for (a, b) in one.iter().zip(eight) {
                row.throughput.push((1, *a, cost));
                row.throughput.push((8, b, cost));
            }
        }
        let text = r.render();
        assert!(
            text.contains("| L4 throughput, 1 conn(s) ≥ nginx stream pair | 4.00 Gbit/s | 2.50 Gbit/s; legate ahead in 2 of 3 rounds | met |"),
            "{text}"
        );
        assert!(
            text.contains("| L4 throughput, 8 conn(s) ≥ nginx stream pair | 3.50 Gbit/s | 3.40 Gbit/s; legate ahead in 2 of 3 rounds | met |"),
            "{text}"
        );
        assert!(
            text.contains("| legate | 3.00, 5.00, 4.00 | 3.00, 3.50, 3.90 |"),
            "{text}"
        );
    }

    #[test]
    fn an_even_number_of_rounds_keeps_the_lower_middle_one() {
        let mut r = Report::new(ctx());
        r.rounds = 2;
        r.http = vec![
            row("legate", 0, 300.0, 1.0, 1),
            row("legate", 1, 100.0, 1.0, 1),
        ];
        assert_eq!(r.http_row("legate", "HTTP/1.1").map(|m| m.round), Some(1));
    }
}
