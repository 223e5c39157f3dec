//! The rule plan: a pure function from configuration to the `nat` rules
//! legate wants, and the `iptables-restore` input that moves a namespace
//! from what it has to what is wanted.
//!
//! Nothing here runs a program or reads the system, so every decision about
//! *which* rules exist is covered by unit and golden tests; the modules that
//! touch the kernel only carry the text produced here.
//!
//! # The rules
//!
//! legate owns the chains whose names start with [`CHAIN_PREFIX`], and the
//! one jump into each of them from the built-in `OUTPUT` and `PREROUTING`
//! chains. It never adds, changes or removes anything else.
//!
//! ```text
//! OUTPUT      -p tcp -> LEGATE_OUTPUT
//!   -o lo                    RETURN   traffic that stays inside the pod
//!   uid-owner / gid-owner    RETURN   the proxy's own connections (loop safety)
//!   [not in capture group]   RETURN   only with Scope::Group (`legate run`)
//!   excluded ports, CIDRs    RETURN
//!   [included CIDRs]         -> LEGATE_REDIRECT_OUT   (or everything, when none are listed)
//! LEGATE_REDIRECT_OUT        REDIRECT --to-ports <outbound_port>
//!
//! PREROUTING  -p tcp -> LEGATE_PREROUTING             (absent when inbound is not captured)
//!   admin port, excluded     RETURN
//!   [included ports]         -> LEGATE_REDIRECT_IN    (or everything, when none are listed)
//! LEGATE_REDIRECT_IN         REDIRECT --to-ports <inbound_port>
//! ```
//!
//! # Whose traffic: the scope
//!
//! In a pod ([`Scope::Namespace`], `legate init`) every process but the
//! proxy is the workload, so the whole namespace is captured. On a plain
//! host ([`Scope::Group`], `legate run`) only one process tree is: it gets
//! one extra supplementary group (`init.capture_group`), and one more rule
//! returns every socket whose owner is not in that group, as primary or
//! supplementary group (`-m owner ! --gid-owner G --suppl-groups`). Inbound,
//! a host has ports of its own (ssh above all), so in this scope only the
//! ports in `init.include_inbound_ports` are captured, and with none listed
//! there are no PREROUTING rules at all. In either scope
//! `init.capture_inbound = false` leaves inbound alone.
//!
//! The group rule doubles as a marker: [`Scope::of`] tells from installed
//! rules whether `legate init` or `legate run` put them there.
//!
//! **Connections that stay inside the pod are not captured.** Every packet
//! routed out of the loopback device is exempt: `127.0.0.0/8`, `::1`, and
//! also the pod's own addresses, because the kernel routes a connection to a
//! local address through `lo` as well. So an application that calls its own
//! pod IP reaches itself directly, in plaintext, and inbound policy does not
//! apply to it. Such a connection never leaves the pod, so mTLS would protect
//! nothing on a wire, and capturing it would send it through the outbound
//! proxy and back in through the inbound one only to arrive where it started.
//! linkerd and Istio treat an application's own traffic over `lo` the same
//! way.
//!
//! Rules are written exactly as `iptables-save` prints them (`-p tcp -m tcp
//! --dport`, networks in canonical form), so that what is installed can be
//! compared line by line with the plan.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use legate_config::{InitConfig, PortSet, ProxyConfig};

use crate::error::InitError;

/// Every chain legate creates starts with this; no other chain is touched.
pub const CHAIN_PREFIX: &str = "LEGATE_";
/// Entered from `OUTPUT` for locally generated TCP.
pub const OUTPUT_CHAIN: &str = "LEGATE_OUTPUT";
/// Redirects to the outbound port.
pub const REDIRECT_OUT_CHAIN: &str = "LEGATE_REDIRECT_OUT";
/// Entered from `PREROUTING` for TCP arriving from outside.
pub const PREROUTING_CHAIN: &str = "LEGATE_PREROUTING";
/// Redirects to the inbound port.
pub const REDIRECT_IN_CHAIN: &str = "LEGATE_REDIRECT_IN";

/// The only table legate writes.
pub const TABLE: &str = "nat";

/// An IP address family, each with its own iptables program and rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    /// Both families, IPv4 first: the order in which they are applied.
    pub const ALL: [Family; 2] = [Family::V4, Family::V6];

    /// `iptables` or `ip6tables`: the start of every program name.
    pub fn program_stem(self) -> &'static str {
        match self {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        }
    }

    fn matches(self, net: &IpNet) -> bool {
        matches!(
            (self, net),
            (Family::V4, IpNet::V4(_)) | (Family::V6, IpNet::V6(_))
        )
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        })
    }
}

/// A rule in a built-in chain that jumps into one of legate's chains.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Jump {
    /// The built-in chain, `OUTPUT` or `PREROUTING`.
    pub from: String,
    /// The rule after `-A <from> `, as iptables-save prints it.
    pub spec: String,
}

/// legate's part of one family's `nat` table: its chains with their rules,
/// and the jumps into them. The same type describes the plan and what a
/// namespace holds, so the two compare with `==`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ruleset {
    /// Chain name to its rules, each as printed after `-A <chain> `.
    pub chains: BTreeMap<String, Vec<String>>,
    /// Jumps from built-in chains, sorted so that order of discovery does
    /// not matter when comparing.
    pub jumps: Vec<Jump>,
}

impl Ruleset {
    /// Whether legate has nothing in this table.
    pub fn is_empty(&self) -> bool {
        self.chains.is_empty() && self.jumps.is_empty()
    }

    /// One line per chain and rule, in a fixed order: what `--check` diffs.
    pub fn listing(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (name, rules) in &self.chains {
            out.push(format!(":{name}"));
            out.extend(rules.iter().map(|r| format!("-A {name} {r}")));
        }
        out.extend(
            self.jumps
                .iter()
                .map(|j| format!("-A {} {}", j.from, j.spec)),
        );
        out
    }

    fn push(&mut self, chain: &str, rule: impl Into<String>) {
        self.chains
            .entry(chain.to_owned())
            .or_default()
            .push(rule.into());
    }

    fn sort_jumps(&mut self) {
        self.jumps.sort();
    }
}

/// The rules for both families. Whether IPv6 is applied is decided when the
/// plan is applied, from `init.ipv6` and the namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub v4: Ruleset,
    pub v6: Ruleset,
}

impl Plan {
    /// The rules of one family.
    pub fn family(&self, family: Family) -> &Ruleset {
        match family {
            Family::V4 => &self.v4,
            Family::V6 => &self.v6,
        }
    }
}

/// Whose connections the outbound rules capture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Every process of the namespace except the proxy: a pod, `legate init`.
    Namespace,
    /// Only processes that have this gid as primary or supplementary group:
    /// one process tree on a plain host, `legate run`. Inbound is captured
    /// only on the ports `init.include_inbound_ports` lists.
    Group(u32),
}

impl Scope {
    /// The scope installed rules were planned with, read from the group
    /// rule in [`OUTPUT_CHAIN`]; `None` when legate has no chain there.
    pub fn of(installed: &Ruleset) -> Option<Scope> {
        let rules = installed.chains.get(OUTPUT_CHAIN)?;
        let group = rules.iter().find_map(|r| {
            r.strip_prefix("-m owner ! --gid-owner ")?
                .strip_suffix(" --suppl-groups -j RETURN")?
                .parse()
                .ok()
        });
        Some(group.map_or(Scope::Namespace, Scope::Group))
    }
}

/// Builds the plan for a pod ([`Scope::Namespace`]) from the
/// configuration. Every value is checked here, so a bad port or network is
/// reported before anything is changed.
pub fn plan(init: &InitConfig, proxy: &ProxyConfig) -> Result<Plan, InitError> {
    plan_scoped(init, proxy, Scope::Namespace)
}

/// Builds the plan for the given scope; see the module documentation.
pub fn plan_scoped(
    init: &InitConfig,
    proxy: &ProxyConfig,
    scope: Scope,
) -> Result<Plan, InitError> {
    check_inputs(init, proxy)?;
    if let Scope::Group(gid) = scope {
        check_group(gid, proxy)?;
    }
    Ok(Plan {
        v4: family_rules(Family::V4, init, proxy, scope),
        v6: family_rules(Family::V6, init, proxy, scope),
    })
}

fn check_group(gid: u32, proxy: &ProxyConfig) -> Result<(), InitError> {
    if gid == 0 {
        return Err(InitError::config(
            "init.capture_group",
            "0 is the root group, so every process of group root on the host would be captured; \
             pick a gid no one uses (default 1339)",
        ));
    }
    if gid == proxy.gid {
        return Err(InitError::config(
            "init.capture_group",
            format!(
                "{gid} is also proxy.gid, whose traffic is exempt from capture, so nothing \
                 would be captured; pick another gid (default 1339)"
            ),
        ));
    }
    Ok(())
}

fn check_inputs(init: &InitConfig, proxy: &ProxyConfig) -> Result<(), InitError> {
    for (field, port) in [
        ("proxy.outbound_port", proxy.outbound_port),
        ("proxy.inbound_port", proxy.inbound_port),
        ("proxy.admin_listen", proxy.admin_listen.port()),
    ] {
        if port == 0 {
            return Err(InitError::config(
                field,
                "port 0 cannot be redirected to or exempted; pick a port from 1 to 65535",
            ));
        }
    }
    if proxy.outbound_port == proxy.inbound_port {
        return Err(InitError::config(
            "proxy.inbound_port",
            format!(
                "{} is also proxy.outbound_port; the two capture ports must differ",
                proxy.inbound_port
            ),
        ));
    }
    if proxy.uid == 0 {
        return Err(InitError::config(
            "proxy.uid",
            "0 would exempt every root process from capture; run the proxy as its own uid (default 1337)",
        ));
    }
    if proxy.gid == 0 {
        return Err(InitError::config(
            "proxy.gid",
            "0 would exempt every process of group root from capture; run the proxy with its own gid (default 1337)",
        ));
    }
    for (field, set) in [
        ("init.exclude_outbound_ports", &init.exclude_outbound_ports),
        ("init.exclude_inbound_ports", &init.exclude_inbound_ports),
        ("init.include_inbound_ports", &init.include_inbound_ports),
    ] {
        check_ports(field, set)?;
    }
    for (field, nets) in [
        ("init.exclude_outbound_cidrs", &init.exclude_outbound_cidrs),
        ("init.include_outbound_cidrs", &init.include_outbound_cidrs),
    ] {
        for net in nets {
            let canonical = net.trunc();
            if canonical != *net {
                return Err(InitError::config(
                    field,
                    format!(
                        "{net} has bits set after the /{} prefix; write the network as {canonical}",
                        net.prefix_len()
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// `PortSet` parsing already refuses 0 and backwards ranges; a set built in
/// code could still hold them.
fn check_ports(field: &str, set: &PortSet) -> Result<(), InitError> {
    for &(lo, hi) in set.ranges() {
        if lo == 0 || lo > hi {
            return Err(InitError::config(
                field,
                format!("{lo}-{hi} is not a port range; use ports from 1 to 65535, low-high"),
            ));
        }
    }
    Ok(())
}

/// `--dport 80` or `--dport 8000:8100`, as iptables-save prints them.
fn dport(lo: u16, hi: u16) -> String {
    if lo == hi {
        format!("-p tcp -m tcp --dport {lo}")
    } else {
        format!("-p tcp -m tcp --dport {lo}:{hi}")
    }
}

/// `-d NET ` for a network, empty for `0.0.0.0/0` and `::/0`, which
/// iptables-save leaves out because they match everything.
fn dest(net: &IpNet) -> String {
    if net.prefix_len() == 0 {
        String::new()
    } else {
        let addr = match net.network() {
            IpAddr::V4(a) => a.to_string(),
            IpAddr::V6(a) => a.to_string(),
        };
        format!("-d {addr}/{} ", net.prefix_len())
    }
}

fn family_rules(family: Family, init: &InitConfig, proxy: &ProxyConfig, scope: Scope) -> Ruleset {
    let mut r = Ruleset::default();

    // Outbound.
    r.push(OUTPUT_CHAIN, "-o lo -j RETURN");
    r.push(
        OUTPUT_CHAIN,
        format!("-m owner --uid-owner {} -j RETURN", proxy.uid),
    );
    r.push(
        OUTPUT_CHAIN,
        format!("-m owner --gid-owner {} -j RETURN", proxy.gid),
    );
    if let Scope::Group(gid) = scope {
        // `--suppl-groups` makes `--gid-owner` match the supplementary
        // groups as well as the primary one; iptables-save prints the
        // negation before `--gid-owner`, as written here.
        r.push(
            OUTPUT_CHAIN,
            format!("-m owner ! --gid-owner {gid} --suppl-groups -j RETURN"),
        );
    }
    for &(lo, hi) in init.exclude_outbound_ports.ranges() {
        r.push(OUTPUT_CHAIN, format!("{} -j RETURN", dport(lo, hi)));
    }
    for net in init
        .exclude_outbound_cidrs
        .iter()
        .filter(|n| family.matches(n))
    {
        r.push(OUTPUT_CHAIN, format!("{}-j RETURN", dest(net)));
    }
    if init.include_outbound_cidrs.is_empty() {
        r.push(OUTPUT_CHAIN, format!("-j {REDIRECT_OUT_CHAIN}"));
    } else {
        // An include list that has no network of this family captures
        // nothing in it: "only these networks" is taken literally.
        for net in init
            .include_outbound_cidrs
            .iter()
            .filter(|n| family.matches(n))
        {
            r.push(
                OUTPUT_CHAIN,
                format!("{}-j {REDIRECT_OUT_CHAIN}", dest(net)),
            );
        }
    }
    r.push(
        REDIRECT_OUT_CHAIN,
        format!("-p tcp -j REDIRECT --to-ports {}", proxy.outbound_port),
    );

    // Only TCP enters legate's chains; UDP (DNS above all) is never touched.
    r.jumps.push(Jump {
        from: "OUTPUT".into(),
        spec: format!("-p tcp -j {OUTPUT_CHAIN}"),
    });

    // Inbound: on a plain host only the ports listed, and none by default.
    let inbound = init.capture_inbound
        && !(matches!(scope, Scope::Group(_)) && init.include_inbound_ports.is_empty());
    if inbound {
        inbound_rules(&mut r, init, proxy);
    }
    r.sort_jumps();
    r
}

fn inbound_rules(r: &mut Ruleset, init: &InitConfig, proxy: &ProxyConfig) {
    // The admin port comes first and always returns, so health checks and
    // metrics scrapes keep working whatever the lists say.
    let admin = proxy.admin_listen.port();
    r.push(
        PREROUTING_CHAIN,
        format!("{} -j RETURN", dport(admin, admin)),
    );
    for &(lo, hi) in init.exclude_inbound_ports.ranges() {
        r.push(PREROUTING_CHAIN, format!("{} -j RETURN", dport(lo, hi)));
    }
    if init.include_inbound_ports.is_empty() {
        r.push(PREROUTING_CHAIN, format!("-j {REDIRECT_IN_CHAIN}"));
    } else {
        for &(lo, hi) in init.include_inbound_ports.ranges() {
            r.push(
                PREROUTING_CHAIN,
                format!("{} -j {REDIRECT_IN_CHAIN}", dport(lo, hi)),
            );
        }
    }
    r.push(
        REDIRECT_IN_CHAIN,
        format!("-p tcp -j REDIRECT --to-ports {}", proxy.inbound_port),
    );
    r.jumps.push(Jump {
        from: "PREROUTING".into(),
        spec: format!("-p tcp -j {PREROUTING_CHAIN}"),
    });
}

/// The `iptables-restore --noflush` input that turns `have` into `want`
/// for one family, or `None` when they are already equal.
///
/// Only legate's chains and jumps are named, so rules of others survive.
/// Chains that are already right are left alone (their counters too), as
/// are the jumps when they are already right; a jump that has to be redone
/// is appended at the end of its built-in chain.
pub fn transition(have: &Ruleset, want: &Ruleset) -> Option<String> {
    if have == want {
        return None;
    }
    let mut s = String::new();
    s.push_str(&format!("*{TABLE}\n"));
    let changed: Vec<(&String, &Vec<String>)> = want
        .chains
        .iter()
        .filter(|(name, rules)| have.chains.get(*name) != Some(rules))
        .collect();
    let stale: Vec<&String> = have
        .chains
        .keys()
        .filter(|name| !want.chains.contains_key(*name))
        .collect();
    let redo_jumps = have.jumps != want.jumps;

    // Declaring a chain creates it, or empties it when it exists.
    for (name, _) in &changed {
        s.push_str(&format!(":{name} - [0:0]\n"));
    }
    // Stale chains are emptied before any is deleted, because they may
    // refer to each other.
    for name in &stale {
        s.push_str(&format!("-F {name}\n"));
    }
    if redo_jumps {
        for j in &have.jumps {
            s.push_str(&format!("-D {} {}\n", j.from, j.spec));
        }
    }
    for name in &stale {
        s.push_str(&format!("-X {name}\n"));
    }
    for (name, rules) in &changed {
        for rule in *rules {
            s.push_str(&format!("-A {name} {rule}\n"));
        }
    }
    if redo_jumps {
        for j in &want.jumps {
            s.push_str(&format!("-A {} {}\n", j.from, j.spec));
        }
    }
    s.push_str("COMMIT\n");
    Some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> (InitConfig, ProxyConfig) {
        (InitConfig::default(), ProxyConfig::default())
    }

    #[test]
    fn defaults_capture_all_tcp_except_proxy_and_loopback() {
        let (i, p) = cfg();
        let plan = plan(&i, &p).unwrap();
        let out = &plan.v4.chains[OUTPUT_CHAIN];
        assert_eq!(out[0], "-o lo -j RETURN");
        assert!(out.contains(&"-m owner --uid-owner 1337 -j RETURN".to_string()));
        assert!(out.contains(&"-m owner --gid-owner 1337 -j RETURN".to_string()));
        assert_eq!(out.last().unwrap(), "-j LEGATE_REDIRECT_OUT");
        assert_eq!(
            plan.v4.chains[PREROUTING_CHAIN][0],
            "-p tcp -m tcp --dport 15000 -j RETURN"
        );
        assert_eq!(plan.v4, plan.v6, "no family-specific input, same rules");
    }

    #[test]
    fn cidrs_go_to_their_own_family_only() {
        let (mut i, p) = cfg();
        i.exclude_outbound_cidrs = vec![
            "169.254.169.254/32".parse().unwrap(),
            "fd00::/8".parse().unwrap(),
        ];
        let plan = plan(&i, &p).unwrap();
        let v4 = plan.v4.listing().join("\n");
        let v6 = plan.v6.listing().join("\n");
        assert!(v4.contains("-d 169.254.169.254/32 -j RETURN") && !v4.contains("fd00"));
        assert!(v6.contains("-d fd00::/8 -j RETURN") && !v6.contains("169.254"));
    }

    #[test]
    fn include_list_without_a_family_captures_nothing_there() {
        let (mut i, p) = cfg();
        i.include_outbound_cidrs = vec!["10.0.0.0/8".parse().unwrap()];
        let plan = plan(&i, &p).unwrap();
        assert!(
            plan.v4.chains[OUTPUT_CHAIN].contains(&"-d 10.0.0.0/8 -j LEGATE_REDIRECT_OUT".into())
        );
        assert!(!plan.v6.chains[OUTPUT_CHAIN]
            .iter()
            .any(|r| r.ends_with(REDIRECT_OUT_CHAIN)));
    }

    #[test]
    fn match_all_networks_are_written_without_d() {
        let (mut i, p) = cfg();
        i.include_outbound_cidrs = vec!["0.0.0.0/0".parse().unwrap()];
        let plan = plan(&i, &p).unwrap();
        assert_eq!(
            plan.v4.chains[OUTPUT_CHAIN].last().unwrap(),
            "-j LEGATE_REDIRECT_OUT"
        );
    }

    #[test]
    fn bad_inputs_are_refused_with_the_fix() {
        let (mut i, p) = cfg();
        i.exclude_outbound_cidrs = vec!["10.1.2.3/8".parse().unwrap()];
        let e = plan(&i, &p).unwrap_err().to_string();
        assert!(
            e.contains("init.exclude_outbound_cidrs") && e.contains("10.0.0.0/8"),
            "{e}"
        );

        let (i, mut p) = cfg();
        p.inbound_port = p.outbound_port;
        assert!(plan(&i, &p)
            .unwrap_err()
            .to_string()
            .contains("must differ"));

        let (i, mut p) = cfg();
        p.gid = 0;
        assert!(plan(&i, &p).unwrap_err().to_string().contains("proxy.gid"));

        let (mut i, p) = cfg();
        i.exclude_inbound_ports = PortSet::new([(0, 10)]);
        assert!(plan(&i, &p)
            .unwrap_err()
            .to_string()
            .contains("init.exclude_inbound_ports"));
    }

    #[test]
    fn group_scope_captures_only_the_group_and_no_inbound_by_default() {
        let (i, p) = cfg();
        let plan = plan_scoped(&i, &p, Scope::Group(1339)).unwrap();
        let out = &plan.v4.chains[OUTPUT_CHAIN];
        let group = "-m owner ! --gid-owner 1339 --suppl-groups -j RETURN".to_string();
        let at = out.iter().position(|r| *r == group).expect("group rule");
        let proxy_gid = out
            .iter()
            .position(|r| r == "-m owner --gid-owner 1337 -j RETURN")
            .unwrap();
        assert!(proxy_gid < at, "the proxy is exempt before the group test");
        assert_eq!(out.last().unwrap(), "-j LEGATE_REDIRECT_OUT");
        assert!(!plan.v4.chains.contains_key(PREROUTING_CHAIN));
        assert!(!plan.v4.chains.contains_key(REDIRECT_IN_CHAIN));
        assert!(plan.v4.jumps.iter().all(|j| j.from == "OUTPUT"));
        assert_eq!(Scope::of(&plan.v4), Some(Scope::Group(1339)));
        assert_eq!(Scope::of(&plan.v6), Some(Scope::Group(1339)));

        let (mut i, p) = cfg();
        i.include_inbound_ports = PortSet::single(8080);
        let plan = plan_scoped(&i, &p, Scope::Group(1339)).unwrap();
        assert_eq!(
            plan.v4.chains[PREROUTING_CHAIN],
            [
                "-p tcp -m tcp --dport 15000 -j RETURN",
                "-p tcp -m tcp --dport 8080 -j LEGATE_REDIRECT_IN"
            ]
        );
    }

    #[test]
    fn scope_is_read_back_from_installed_rules() {
        let (i, p) = cfg();
        assert_eq!(Scope::of(&plan(&i, &p).unwrap().v4), Some(Scope::Namespace));
        assert_eq!(Scope::of(&Ruleset::default()), None);
    }

    #[test]
    fn inbound_can_be_left_alone_in_a_pod() {
        let (mut i, p) = cfg();
        i.capture_inbound = false;
        i.include_inbound_ports = PortSet::single(8080);
        let plan = plan(&i, &p).unwrap();
        assert!(!plan.v4.chains.contains_key(PREROUTING_CHAIN));
        assert_eq!(plan.v4.jumps.len(), 1);
        assert!(plan.v4.chains.contains_key(OUTPUT_CHAIN));
    }

    #[test]
    fn a_capture_group_that_would_capture_nothing_or_everything_is_refused() {
        let (i, p) = cfg();
        let e = plan_scoped(&i, &p, Scope::Group(1337))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("init.capture_group") && e.contains("proxy.gid"),
            "{e}"
        );
        let e = plan_scoped(&i, &p, Scope::Group(0))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("init.capture_group") && e.contains("root"),
            "{e}"
        );
    }

    #[test]
    fn transition_is_empty_when_equal_and_removes_everything_to_empty() {
        let (i, p) = cfg();
        let want = plan(&i, &p).unwrap().v4;
        assert_eq!(transition(&want, &want), None);
        assert_eq!(transition(&Ruleset::default(), &Ruleset::default()), None);
        let removal = transition(&want, &Ruleset::default()).unwrap();
        assert!(removal.contains("-D OUTPUT -p tcp -j LEGATE_OUTPUT\n"));
        assert!(removal.contains("-X LEGATE_REDIRECT_IN\n"));
        assert!(!removal.contains("-A "));
        // Every flush comes before the first delete.
        let last_flush = removal.rfind("-F ").unwrap();
        let first_delete = removal.find("-X ").unwrap();
        assert!(last_flush < first_delete);
    }

    #[test]
    fn transition_touches_only_what_changed() {
        let (i, p) = cfg();
        let have = plan(&i, &p).unwrap().v4;
        let (i, mut p) = cfg();
        p.outbound_port = 16001;
        let want = plan(&i, &p).unwrap().v4;
        let t = transition(&have, &want).unwrap();
        assert_eq!(
            t,
            "*nat\n:LEGATE_REDIRECT_OUT - [0:0]\n\
             -A LEGATE_REDIRECT_OUT -p tcp -j REDIRECT --to-ports 16001\nCOMMIT\n"
        );
    }
}
