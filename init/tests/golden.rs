//! Golden tests of the rule plan: for each configuration, the exact
//! `iptables-restore` input that installs legate's rules in a namespace
//! that has none yet.
//!
//! The expected files live in `tests/golden/`. After an intended change to
//! the rules, regenerate them with `UPDATE_GOLDEN=1 cargo test -p
//! legate-init --test golden` and review the diff like code.

use std::path::PathBuf;

use legate_config::{load, FlagValue, Sources};
use legate_init::plan::{plan_scoped, transition, Ruleset, Scope};

/// How a golden file's plan is scoped: a pod's (`legate init`) or one
/// process tree's on a plain host (`legate run`, with `init.capture_group`).
#[derive(Clone, Copy)]
enum For {
    Pod,
    Run,
}

/// The restore input for both families, from configuration keys given as
/// `key=value`, through the same loader the CLI uses.
fn render(settings: &[&str], scope: For) -> String {
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
    let loaded = load(&Sources {
        flags,
        ..Sources::default()
    })
    .expect("test configuration loads");
    let init = &loaded.config.init;
    let scope = match scope {
        For::Pod => Scope::Namespace,
        For::Run => Scope::Group(init.capture_group),
    };
    let plan = plan_scoped(init, &loaded.config.proxy, scope).expect("plan");
    let mut out = String::new();
    for (name, rules) in [("IPv4", &plan.v4), ("IPv6", &plan.v6)] {
        out.push_str(&format!("# {name}\n"));
        out.push_str(&transition(&Ruleset::default(), rules).unwrap_or_default());
    }
    out
}

fn golden(name: &str, settings: &[&str]) {
    golden_for(name, settings, For::Pod);
}

fn golden_for(name: &str, settings: &[&str], scope: For) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(format!("{name}.rules"));
    let actual = render(settings, scope);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, &actual).expect("write golden file");
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; create it with UPDATE_GOLDEN=1 cargo test -p legate-init --test golden",
            path.display()
        )
    });
    assert_eq!(
        actual, expected,
        "plan for {name} changed; if intended, regenerate with UPDATE_GOLDEN=1"
    );
}

#[test]
fn defaults() {
    golden("defaults", &[]);
}

#[test]
fn exclusions() {
    golden(
        "exclusions",
        &[
            "init.exclude_outbound_ports=22,8000-8100,9090",
            "init.exclude_outbound_cidrs=169.254.169.254/32,10.96.0.0/12,fd00:10:96::/112",
            "init.exclude_inbound_ports=9100-9102,22",
        ],
    );
}

#[test]
fn include_lists() {
    golden(
        "include_lists",
        &[
            "init.include_outbound_cidrs=10.0.0.0/8,192.168.0.0/16,fd20:200::/64",
            "init.include_inbound_ports=8080,9000-9010",
            "init.exclude_inbound_ports=9005",
        ],
    );
}

#[test]
fn include_list_of_one_family() {
    // Only IPv4 networks are listed, so nothing is captured outbound in IPv6.
    golden(
        "include_one_family",
        &["init.include_outbound_cidrs=10.200.0.0/16"],
    );
}

#[test]
fn ipv6_networks() {
    golden(
        "ipv6",
        &[
            "init.exclude_outbound_cidrs=2001:db8::/32,::ffff:0:0/96,fe80::/10",
            "init.include_outbound_cidrs=::/0,0.0.0.0/0",
        ],
    );
}

#[test]
fn custom_uid_and_ports() {
    golden(
        "custom_uid_and_ports",
        &[
            "proxy.uid=2102",
            "proxy.gid=2103",
            "proxy.outbound_port=16001",
            "proxy.inbound_port=16006",
            "proxy.admin_listen=127.0.0.1:16000",
        ],
    );
}

#[test]
fn pod_without_inbound_capture() {
    // A client-only workload: no PREROUTING rules at all.
    golden("no_inbound", &["init.capture_inbound=false"]);
}

#[test]
fn run_outbound_only() {
    // `legate run` without --inbound-ports: only the capture group's
    // outbound TCP, and nothing inbound, so the host's own ports (ssh)
    // are never touched.
    golden_for("run_outbound_only", &[], For::Run);
}

#[test]
fn run_with_inbound_ports() {
    golden_for(
        "run_with_inbound_ports",
        &[
            "init.capture_group=2500",
            "init.include_inbound_ports=8080,9000-9001",
            "init.exclude_outbound_cidrs=169.254.169.254/32",
        ],
        For::Run,
    );
}

#[test]
fn run_with_inbound_capture_off() {
    // capture_inbound = false wins over a port list.
    golden_for(
        "run_outbound_only",
        &[
            "init.include_inbound_ports=8080",
            "init.capture_inbound=false",
        ],
        For::Run,
    );
}

#[test]
fn bad_values_are_refused_before_anything_runs() {
    // The loader refuses a network with host bits; the planner checks again
    // for configurations built in code (see the plan module's tests).
    let err = load(&Sources {
        flags: vec![FlagValue {
            path: "init.include_outbound_cidrs".into(),
            value: "10.200.0.9/16".into(),
            flag: "--include-outbound-cidrs 10.200.0.9/16".into(),
        }],
        ..Sources::default()
    })
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("--include-outbound-cidrs") && err.contains("10.200.0.0/16"),
        "{err}"
    );
}
