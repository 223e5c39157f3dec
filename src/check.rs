//! `legate check`: diagnoses the meshing of the workload whose network
//! namespace it runs in, the questions an operator asks first when traffic
//! does not flow: are the capture rules in place, is the proxy listening as
//! the uid those rules exempt, is it ready, does it hold a certificate that
//! is being renewed, how long do the CAs behind it have, what trouble has
//! it counted, and does the CA answer as the CA.
//!
//! Each check reads what is there (the rules through the `init` crate, the
//! listening sockets from `/proc/net/tcp`, the proxy through its admin
//! server: `/live`, `/ready`, `/identity`, `/metrics`) and compares it
//! with the configuration given, so it is run with the same file,
//! `LEGATE_*` variables and flags as the proxy. A failed check says what
//! to change; the exit code is 1 when one failed.

use std::fmt;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use legate_config::Config;
use legate_init::state::DiffLine;
use legate_init::{InitError, Scope};

use crate::wait_ready::{get, local_admin};

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The admin address to ask; defaults to proxy.admin_listen on localhost
    #[arg(long, value_name = "IP:PORT")]
    admin: Option<SocketAddr>,
}

/// How long the CA may take to answer once connected.
const CA_ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a connection to the CA may take before it counts as unreachable.
const CA_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Most differing rule lines shown; `legate init --check` shows them all.
const MAX_DIFF_LINES: usize = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Ok,
    /// Worth a look, but traffic can flow.
    Warn,
    Fail,
    /// Nothing to check with this configuration.
    Skip,
}

/// The outcome of one check.
#[derive(Debug)]
struct Finding {
    name: &'static str,
    verdict: Verdict,
    seen: String,
    /// What to change, for a warning or a failure.
    fix: Option<String>,
    /// Further lines shown under the finding.
    detail: Vec<String>,
}

impl Finding {
    fn new(name: &'static str, verdict: Verdict, seen: impl Into<String>) -> Self {
        Finding {
            name,
            verdict,
            seen: seen.into(),
            fix: None,
            detail: Vec::new(),
        }
    }

    fn fix(mut self, fix: impl Into<String>) -> Self {
        self.fix = Some(fix.into());
        self
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mark = match self.verdict {
            Verdict::Ok => "ok",
            Verdict::Warn => "WARN",
            Verdict::Fail => "FAIL",
            Verdict::Skip => "-",
        };
        writeln!(f, "{mark:<5} {:<10} {}", self.name, self.seen)?;
        for line in &self.detail {
            writeln!(f, "{:16} {line}", "")?;
        }
        if let Some(fix) = &self.fix {
            writeln!(f, "{:16} fix: {fix}", "")?;
        }
        Ok(())
    }
}

pub fn run(args: &CheckArgs, config: &Config) -> ExitCode {
    let admin = args.admin.unwrap_or_else(|| local_admin(config));
    let sockets = Listening::read();
    let mut findings = vec![capture(config), listeners(config, &sockets)];
    findings.extend(proxy_and_identity(admin));
    findings.push(ca(config));
    let mut out = String::new();
    for f in &findings {
        out.push_str(&f.to_string());
    }
    let count = |v| findings.iter().filter(|f| f.verdict == v).count();
    let failed = count(Verdict::Fail);
    let warned = count(Verdict::Warn);
    out.push_str(&format!(
        "\n{} ok, {warned} warning{}, {failed} failed\n",
        count(Verdict::Ok),
        if warned == 1 { "" } else { "s" }
    ));
    print!("{out}");
    if failed > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// The interception rules against the plan this configuration makes.
fn capture(config: &Config) -> Finding {
    const NAME: &str = "capture";
    let opts = legate_init::Options::from_config(&config.init);
    // Rules `legate run` installed capture one process tree, by group; the
    // plan to compare them with is that one.
    let scope = legate_init::installed(&opts).map(|found| {
        found
            .iter()
            .find_map(|i| i.scope().filter(|s| matches!(s, Scope::Group(_))))
            .unwrap_or(Scope::Namespace)
    });
    let report = scope.and_then(|scope| {
        let plan = legate_init::plan_scoped(&config.init, &config.proxy, scope)?;
        Ok((scope, legate_init::check(&plan, &opts)?))
    });
    let (scope, report) = match report {
        Ok(r) => r,
        Err(InitError::NotPermitted { .. }) => {
            return Finding::new(
                NAME,
                Verdict::Warn,
                "cannot read the rules here: that needs root or CAP_NET_ADMIN",
            )
            .fix(
                "run `legate check` as root, or `legate init --check` where it has NET_ADMIN \
                 (in Kubernetes, the init container)",
            )
        }
        Err(e) => return Finding::new(NAME, Verdict::Fail, e.to_string()),
    };
    let families: Vec<String> = report
        .families
        .iter()
        .map(|f| f.family.to_string())
        .collect();
    let families = families.join(", ");
    let whose = match scope {
        Scope::Group(gid) => format!("`legate run`'s rules (group {gid})"),
        Scope::Namespace => "the rules".to_owned(),
    };
    if report.is_ok() && !report.families.is_empty() {
        return Finding::new(
            NAME,
            Verdict::Ok,
            format!("{whose} match the plan ({}: {families})", report.engine),
        );
    }
    let lines: Vec<String> = report
        .families
        .iter()
        .flat_map(|f| f.diff.iter().map(move |l| (f.family, l)))
        .filter(|(_, l)| !matches!(l, DiffLine::Same(_)))
        .map(|(family, l)| format!("{family}: {}", l.to_string().trim()))
        .collect();
    let installed = report
        .families
        .iter()
        .flat_map(|f| &f.diff)
        .any(|l| !matches!(l, DiffLine::Missing(_)));
    if !installed {
        return Finding::new(
            NAME,
            Verdict::Fail,
            "legate's rules are not installed in this network namespace: nothing reaches the proxy",
        )
        .fix(
            "run `legate init` here (as root, or with NET_ADMIN), with the proxy's configuration",
        );
    }
    let mut f = Finding::new(
        NAME,
        Verdict::Fail,
        format!(
            "{whose} differ from the plan ({}: {families}; - planned but missing, + installed but not planned):",
            report.engine
        ),
    )
    .fix(
        "run `legate init` again with the configuration the proxy runs with (it replaces \
         legate's rules in one transaction); if the rules are right, run this check with that \
         configuration",
    );
    f.detail = lines.iter().take(MAX_DIFF_LINES).cloned().collect();
    if lines.len() > MAX_DIFF_LINES {
        f.detail.push(format!(
            "... and {} more (`legate init --check` shows all)",
            lines.len() - MAX_DIFF_LINES
        ));
    }
    f
}

/// A listening TCP socket of this network namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Listener {
    port: u16,
    uid: u32,
}

/// The namespace's listening TCP sockets, from `/proc/net/tcp` and `tcp6`.
struct Listening(Vec<Listener>);

impl Listening {
    fn read() -> Self {
        let mut all = Vec::new();
        for file in ["/proc/net/tcp", "/proc/net/tcp6"] {
            if let Ok(text) = std::fs::read_to_string(file) {
                all.extend(parse_listeners(&text));
            }
        }
        Listening(all)
    }

    /// The uids with a socket listening on `port`.
    fn owners(&self, port: u16) -> Vec<u32> {
        let mut uids: Vec<u32> = self
            .0
            .iter()
            .filter(|l| l.port == port)
            .map(|l| l.uid)
            .collect();
        uids.sort_unstable();
        uids.dedup();
        uids
    }
}

/// The listening sockets in one `/proc/net/tcp{,6}` table. Lines that do
/// not parse are skipped: the file's layout is the kernel's.
fn parse_listeners(text: &str) -> Vec<Listener> {
    const LISTEN: &str = "0A";
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (local, state, uid) = (fields.get(1)?, fields.get(3)?, fields.get(7)?);
            if *state != LISTEN {
                return None;
            }
            let port = u16::from_str_radix(local.rsplit_once(':')?.1, 16).ok()?;
            Some(Listener {
                port,
                uid: uid.parse().ok()?,
            })
        })
        .collect()
}

/// Whether the capture ports are served, and by the uid the rules exempt.
fn listeners(config: &Config, sockets: &Listening) -> Finding {
    const NAME: &str = "listeners";
    let p = &config.proxy;
    let ports = [("outbound", p.outbound_port), ("inbound", p.inbound_port)];
    let mut missing = Vec::new();
    let mut owners = Vec::new();
    for (what, port) in ports {
        let of_port = sockets.owners(port);
        if of_port.is_empty() {
            missing.push(format!("{port} ({what})"));
        }
        owners.extend(of_port);
    }
    if !missing.is_empty() {
        return Finding::new(
            NAME,
            Verdict::Fail,
            format!(
                "nothing listens on {}: captured connections are refused",
                missing.join(" or ")
            ),
        )
        .fix(
            "start `legate proxy` in this network namespace with the ports `legate init` \
             redirects to (proxy.outbound_port, proxy.inbound_port)",
        );
    }
    owners.sort_unstable();
    owners.dedup();
    if owners != [p.uid] {
        let list: Vec<String> = owners.iter().map(u32::to_string).collect();
        let mut f = Finding::new(
            NAME,
            Verdict::Fail,
            format!(
                "{} and {} are served by uid {}, but proxy.uid is {}: the capture rules exempt \
                 proxy.uid, so the proxy's own connections would be captured again and refused \
                 as loops",
                p.outbound_port,
                p.inbound_port,
                list.join(" and "),
                p.uid
            ),
        );
        f = match owners.iter().find(|&&u| u != p.uid) {
            Some(other) if owners.len() == 1 => f.fix(format!(
                "run the proxy as uid {}, or set proxy.uid={other} and run `legate init` again",
                p.uid
            )),
            _ => f.fix(format!(
                "only the proxy, as uid {}, should listen on those ports",
                p.uid
            )),
        };
        return f;
    }
    Finding::new(
        NAME,
        Verdict::Ok,
        format!(
            "{} (outbound) and {} (inbound) are served by uid {}, the uid the rules exempt",
            p.outbound_port, p.inbound_port, p.uid
        ),
    )
}

/// The proxy's readiness and its certificate, from its admin server.
fn proxy_and_identity(admin: SocketAddr) -> Vec<Finding> {
    let live = match get(admin, "/live") {
        Ok((200, _)) => true,
        Ok((status, _)) => {
            return vec![Finding::new(
                "proxy",
                Verdict::Fail,
                format!("{admin} answered /live with {status}: is that legate's admin server?"),
            )
            .fix("point --admin or proxy.admin_listen at the proxy's admin server")]
        }
        Err(e) => {
            return vec![Finding::new(
                "proxy",
                Verdict::Fail,
                format!("no admin server answers at {admin}: {e}"),
            )
            .fix(
                "start `legate proxy` in this network namespace, or point --admin or \
                 proxy.admin_listen at its admin server",
            )]
        }
    };
    let ready = matches!(get(admin, "/ready"), Ok((200, _)));
    let traffic = match get(admin, "/metrics") {
        Ok((200, body)) => traffic(&body),
        Ok((status, _)) => Finding::new(
            "traffic",
            Verdict::Fail,
            format!("/metrics answered {status}"),
        ),
        Err(e) => Finding::new("traffic", Verdict::Fail, format!("/metrics failed: {e}")),
    };
    let proxy = match (live, ready) {
        (true, true) => Finding::new("proxy", Verdict::Ok, format!("live and ready at {admin}")),
        _ => Finding::new(
            "proxy",
            Verdict::Fail,
            format!(
                "live but not ready at {admin}: it holds no certificate yet, or it is draining"
            ),
        )
        .fix("see the identity line below and the proxy's log"),
    };
    let (identity, trust) = match get(admin, "/identity") {
        Ok((200, body)) => (identity(&body), trust(&body)),
        Ok((status, _)) => (
            Finding::new(
                "identity",
                Verdict::Fail,
                format!("/identity answered {status}"),
            ),
            None,
        ),
        Err(e) => (
            Finding::new("identity", Verdict::Fail, format!("/identity failed: {e}")),
            None,
        ),
    };
    let mut out = vec![proxy, identity];
    out.extend(trust);
    out.push(traffic);
    out
}

/// Below this much time left, a root or intermediate is a warning: rotating
/// takes a release of the CA and a renewal of every workload, and the mesh
/// stops when it runs out (Linkerd's check warns at the same point).
const AUTHORITY_WARNING: Duration = Duration::from_secs(60 * 86_400);

/// Judges the CAs behind the certificate, from the `authorities` of the
/// proxy's `/identity`: the one that expires first decides. `None` before
/// the proxy holds a certificate (the identity line says so).
fn trust(body: &str) -> Option<Finding> {
    const NAME: &str = "trust";
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    let all = v["authorities"].as_array()?;
    let first = all
        .iter()
        .filter_map(|a| {
            Some((
                a["expires_in_seconds"].as_u64()?,
                a["role"].as_str()?,
                a["subject"].as_str().unwrap_or(""),
            ))
        })
        .min_by_key(|(left, _, _)| *left)?;
    let (left, role, subject) = first;
    let what = format!("{role} {subject:?}");
    let fix = "rotate with `legate ca rotate` and, once every certificate the old root \
               issued has expired, `legate ca rotate --retire` (ca/README.md)";
    Some(if left == 0 {
        Finding::new(NAME, Verdict::Fail, format!("the {what} has expired")).fix(fix)
    } else if left < AUTHORITY_WARNING.as_secs() {
        Finding::new(
            NAME,
            Verdict::Warn,
            format!("the {what} expires in {}", human(left)),
        )
        .fix(fix)
    } else {
        let roots = all.iter().filter(|a| a["role"] == "root").count();
        let plural = |n: usize, what: &str| format!("{n} {what}{}", if n == 1 { "" } else { "s" });
        Finding::new(
            NAME,
            Verdict::Ok,
            format!(
                "{} and {}; the first to expire, the {what}, has {} left",
                plural(roots, "root"),
                plural(all.len() - roots, "intermediate"),
                human(left)
            ),
        )
    })
}

/// One sample of the Prometheus text format: name, labels, value.
fn samples(text: &str) -> impl Iterator<Item = (&str, Vec<(&str, &str)>, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let value: f64 = value.parse().ok()?;
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, rest.strip_suffix('}')?),
                None => (series, ""),
            };
            let labels = labels
                .split(',')
                .filter_map(|kv| {
                    let (k, v) = kv.split_once('=')?;
                    Some((k, v.trim_matches('"')))
                })
                .collect();
            Some((name, labels, value))
        })
}

/// What the proxy's counters say has gone wrong since it started: failed
/// mTLS handshakes, endpoints ejected by breakers, requests refused at a
/// limit or denied a retry by the budget, refused reloads, dropped access
/// log lines. Counters only grow, so a warning may be about the past; the
/// proxy's log says when.
fn traffic(metrics: &str) -> Finding {
    const NAME: &str = "traffic";
    let label = |labels: &[(&str, &str)], key: &str| {
        labels
            .iter()
            .find(|(k, _)| *k == key)
            .map_or(String::new(), |(_, v)| (*v).to_owned())
    };
    let mut seen = Vec::new();
    for (name, labels, value) in samples(metrics) {
        if value <= 0.0 {
            continue;
        }
        let n = value as u64;
        let line = match name {
            "legate_tls_handshake_failures_total" => format!(
                "{n} {} mTLS handshakes failed ({})",
                label(&labels, "direction"),
                label(&labels, "reason")
            ),
            "legate_http_breakers" if label(&labels, "state") == "open" => format!(
                "{n} endpoints of route {} ejected by an open breaker",
                label(&labels, "route")
            ),
            "legate_http_limit_rejections_total" => format!(
                "{n} requests of route {} refused at {}",
                label(&labels, "route"),
                label(&labels, "limit")
            ),
            "legate_http_retries_budget_exhausted_total" => format!(
                "{n} retries of route {} denied by the retry budget",
                label(&labels, "route")
            ),
            "legate_config_reloads_total" if label(&labels, "result") == "error" => {
                format!("{n} configuration reloads refused")
            }
            "legate_access_log_dropped_total" => {
                format!("{n} access log lines dropped (stdout too slow)")
            }
            _ => continue,
        };
        seen.push(line);
    }
    if seen.is_empty() {
        return Finding::new(
            NAME,
            Verdict::Ok,
            "since the proxy started: no failed mTLS handshake, open breaker, limit \
             rejection, exhausted retry budget, refused reload or dropped log line",
        );
    }
    let mut f = Finding::new(
        NAME,
        Verdict::Warn,
        format!("since the proxy started, {} kinds of trouble:", seen.len()),
    )
    .fix(
        "the proxy's log names each occurrence; failed handshakes (handshake_failed) are \
         usually a peer whose certificate another CA or trust domain issued",
    );
    f.detail = seen;
    f
}

/// Judges the proxy's `/identity` answer: a certificate in hand, and
/// renewed before less than a quarter of its life is left (renewal starts
/// at half-life, so by then it has been failing for a while).
fn identity(body: &str) -> Finding {
    const NAME: &str = "identity";
    let Ok(v) = serde_json::from_str::<serde_json::Value>(body) else {
        return Finding::new(NAME, Verdict::Fail, "/identity did not answer JSON");
    };
    let id = v["id"].as_str();
    let failures = v["renewal_failures"].as_u64().unwrap_or(0);
    let (Some(id), Some(from), Some(until)) =
        (id, v["not_before"].as_u64(), v["not_after"].as_u64())
    else {
        return Finding::new(NAME, Verdict::Fail, "the proxy holds no certificate yet").fix(
            "check identity.ca_address and the token (identity.token or identity.token_file); \
             the proxy's log names what the CA answered",
        );
    };
    let left = v["expires_in_seconds"].as_u64().unwrap_or(0);
    if left == 0 {
        return Finding::new(
            NAME,
            Verdict::Fail,
            format!("{id}: the certificate has expired"),
        )
        .fix("see why renewal failed in the proxy's log; is the CA reachable?");
    }
    let life = until.saturating_sub(from).max(1);
    let seen = format!(
        "{id}: certificate valid {} more, {} renewal{} failed",
        human(left),
        failures,
        if failures == 1 { "" } else { "s" }
    );
    if left * 4 < life {
        Finding::new(
            NAME,
            Verdict::Warn,
            format!("{seen}; renewal is overdue (it starts at half-life)"),
        )
        .fix("see why renewal fails in the proxy's log; is the CA reachable?")
    } else {
        Finding::new(NAME, Verdict::Ok, seen)
    }
}

/// `3660` seconds as `1h 1m`, `90061` as `1d 1h`.
fn human(secs: u64) -> String {
    let (d, h, m) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60);
    match (d, h) {
        (0, 0) => format!("{m}m"),
        (0, _) => format!("{h}h {m}m"),
        _ => format!("{d}d {h}h"),
    }
}

/// Whether the CA, when one is configured, can be reached and is the CA.
fn ca(config: &Config) -> Finding {
    const NAME: &str = "CA";
    let Some(address) = &config.identity.ca_address else {
        return Finding::new(
            NAME,
            Verdict::Skip,
            "identity.ca_address is not set here; give the proxy's configuration to check it",
        );
    };
    let addrs: Vec<SocketAddr> = match address.to_socket_addrs() {
        Ok(a) => a.collect(),
        Err(e) => {
            return Finding::new(
                NAME,
                Verdict::Fail,
                format!("{address} does not resolve: {e}"),
            )
            .fix("check identity.ca_address (host:port) and this namespace's DNS")
        }
    };
    let mut last = None;
    for addr in &addrs {
        match TcpStream::connect_timeout(addr, CA_CONNECT_TIMEOUT) {
            Ok(_) => return ca_answers(config, address),
            Err(e) if addrs.len() == 1 => last = Some(e.to_string()),
            Err(e) => last = Some(format!("{addr}: {e}")),
        }
    }
    Finding::new(
        NAME,
        Verdict::Fail,
        format!(
            "{address} cannot be reached ({}): certificates cannot be renewed",
            last.unwrap_or_else(|| "no address".into())
        ),
    )
    .fix("check that `legate ca serve` runs there, and any firewall or NetworkPolicy between")
}

/// A CA that accepts connections: whether it is the CA, as the proxy
/// would verify it (TLS with the CA's SPIFFE ID, under
/// `identity.ca_bundle`), and answers. A port that accepts and then fails
/// the handshake or stays silent renews nothing.
fn ca_answers(config: &Config, address: &str) -> Finding {
    const NAME: &str = "CA";
    let Some(path) = &config.identity.ca_bundle else {
        return Finding::new(
            NAME,
            Verdict::Ok,
            format!("{address} accepts connections (identity.ca_bundle is not set here, so it was not verified)"),
        );
    };
    let bundle = match std::fs::read(path)
        .map_err(|e| e.to_string())
        .and_then(|pem| legate_ca::Bundle::from_pem(&pem).map_err(|e| e.to_string()))
    {
        Ok(b) => std::sync::Arc::new(b),
        Err(e) => {
            return Finding::new(
                NAME,
                Verdict::Fail,
                format!("identity.ca_bundle {} cannot be used: {e}", path.display()),
            )
            .fix("point identity.ca_bundle at the CA's bundle (`legate ca bundle --dir <ca dir>` prints it)")
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return Finding::new(NAME, Verdict::Fail, format!("cannot start the check: {e}")),
    };
    let client = legate_ca::client::CaClient::new(
        address,
        &config.identity.trust_domain,
        &legate_ca::CredentialsHandle::new(),
        Some(bundle),
        CA_ANSWER_TIMEOUT,
    );
    match runtime.block_on(client.health()) {
        Ok(()) => Finding::new(
            NAME,
            Verdict::Ok,
            format!("{address} answers as the CA, verified under identity.ca_bundle"),
        ),
        Err(e) => Finding::new(
            NAME,
            Verdict::Fail,
            format!("{address} accepts connections but does not answer as the CA: {e}"),
        )
        .fix("check that `legate ca serve` listens there and that identity.ca_bundle and identity.trust_domain are the CA's"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listeners_are_read_with_their_port_and_uid() {
        let tcp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:3A99 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1337        0 1 1 0000000000000000 100 0 0 10 0
   1: 00000000:3A9E 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1337        0 2 1 0000000000000000 100 0 0 10 0
   2: 0100007F:3A99 0100007F:C350 01 00000000:00000000 00:00000000 00000000  1000        0 3 1 0000000000000000 20 4 30 10 -1
   3: garbage
";
        let tcp6 = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:3A99 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4 1 0000000000000000 100 0 0 10 0
";
        let mut all = parse_listeners(tcp);
        all.extend(parse_listeners(tcp6));
        assert_eq!(
            all,
            [
                Listener {
                    port: 15001,
                    uid: 1337
                },
                Listener {
                    port: 15006,
                    uid: 1337
                },
                Listener {
                    port: 15001,
                    uid: 0
                },
            ]
        );
        let l = Listening(all);
        assert_eq!(l.owners(15001), [0, 1337]);
        assert_eq!(l.owners(15006), [1337]);
        assert!(l.owners(80).is_empty());
    }

    #[test]
    fn troubles_are_read_from_the_metrics() {
        let quiet = "# HELP legate_tls_handshakes_total x
legate_tls_handshakes_total{direction=\"outbound\"} 12
legate_tls_handshake_failures_total{direction=\"outbound\",reason=\"handshake_failed\"} 0
legate_http_breakers{route=\"default\",state=\"open\"} 0
legate_http_breakers{route=\"default\",state=\"closed\"} 3
legate_config_reloads_total{result=\"ok\"} 2
legate_config_reloads_total{result=\"error\"} 0
";
        assert_eq!(traffic(quiet).verdict, Verdict::Ok);
        let troubled = quiet
            .replace(
                "reason=\"handshake_failed\"} 0",
                "reason=\"handshake_failed\"} 4",
            )
            .replace("state=\"open\"} 0", "state=\"open\"} 1")
            .replace("result=\"error\"} 0", "result=\"error\"} 1");
        let f = traffic(&troubled);
        assert_eq!(f.verdict, Verdict::Warn, "{f}");
        assert_eq!(
            f.detail,
            [
                "4 outbound mTLS handshakes failed (handshake_failed)",
                "1 endpoints of route default ejected by an open breaker",
                "1 configuration reloads refused",
            ]
        );
    }

    #[test]
    fn the_first_authority_to_expire_decides() {
        let body = |root: u64, intermediate: u64| {
            format!(
                r#"{{"authorities":[{{"role":"intermediate","subject":"CN=i","expires_in_seconds":{intermediate}}},{{"role":"root","subject":"CN=r","expires_in_seconds":{root}}}]}}"#
            )
        };
        let year = 365 * 86_400;
        let ok = trust(&body(10 * year, year)).expect("judged");
        assert_eq!(ok.verdict, Verdict::Ok, "{ok}");
        assert!(ok.seen.contains("intermediate \"CN=i\", has 365d"), "{ok}");
        let soon = trust(&body(10 * year, 30 * 86_400)).expect("judged");
        assert_eq!(soon.verdict, Verdict::Warn, "{soon}");
        assert!(soon.seen.contains("expires in 30d"), "{soon}");
        let gone = trust(&body(0, year)).expect("judged");
        assert_eq!(gone.verdict, Verdict::Fail, "{gone}");
        assert!(gone.seen.contains("root \"CN=r\" has expired"), "{gone}");
        assert!(trust(r#"{"authorities":[]}"#).is_none());
    }

    #[test]
    fn a_certificate_past_three_quarters_of_its_life_is_a_warning() {
        let at = |left: u64| {
            identity(&format!(
                r#"{{"id":"spiffe://legate.local/web","not_before":1000,"not_after":{},"expires_in_seconds":{left},"renewal_failures":3}}"#,
                1000 + 86_400
            ))
        };
        let fresh = at(80_000);
        assert_eq!(fresh.verdict, Verdict::Ok, "{fresh}");
        assert!(fresh.seen.contains("22h 13m"), "{fresh}");
        let late = at(20_000);
        assert_eq!(late.verdict, Verdict::Warn, "{late}");
        assert!(late.seen.contains("overdue"), "{late}");
        assert_eq!(at(0).verdict, Verdict::Fail);
        let none = identity(r#"{"id":null,"not_before":null,"not_after":null}"#);
        assert_eq!(none.verdict, Verdict::Fail, "{none}");
        assert!(none.fix.is_some());
    }
}
