//! Functional tests: real rules in pods of a test bed, real connections
//! through them, with both iptables backends and both address families.
//!
//! Needs root and the `iptables` and `iproute2` packages. Nothing here runs
//! in the host's network namespace.

mod common;

use std::net::{IpAddr, SocketAddr};

use common::*;
use legate_config::{Backend, Ipv6Mode};
use legate_init::ops::Change;
use legate_init::state::DiffLine;
use legate_init::{
    apply, check, cleanup, dry_run, installed, original_dst, plan, plan_scoped, validate, Engine,
    Family, InitError, Scope, ValidateOptions,
};
use legate_testbed::{Bed, Pod, Process};

/// An address in the bed's range where nothing lives.
const NOWHERE_V4: &str = "10.200.0.9";
const NOWHERE_V6: &str = "fd20:200::9";

fn sock(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

/// A connection as uid 1000 to an address where nothing lives lands on the
/// outbound port with the address intact; the proxy's uid and gid, excluded
/// ports and networks, loopback and the pod's own address are left alone;
/// a connection from another pod lands on the inbound port.
fn capture(engine: Engine) {
    let bed = Bed::new().expect("test bed");
    let app = bed.pod("app").expect("pod");
    let other = bed.pod("other").expect("pod");
    let skip = bed.pod("skip").expect("pod");
    add_foreign_rules(&app, engine);

    let cfg = config(&[
        "init.exclude_outbound_ports=8081".into(),
        format!(
            "init.exclude_outbound_cidrs={}/32,{}/128",
            skip.ip(),
            skip.ip6()
        ),
        "init.exclude_inbound_ports=8082".into(),
    ]);
    let plan = plan(&cfg.init, &cfg.proxy).expect("plan");
    let report = apply(&plan, &opts(&app, backend(engine))).expect("apply");
    assert_eq!(report.engine, engine);

    // The proxy's listeners, and the app's own ports, in the app pod.
    let outbound = [listen(&app, "127.0.0.1:15001"), listen(&app, "[::1]:15001")];
    let inbound = listen(&app, "[::]:15006");
    let admin = listen(&app, "[::]:15000");
    let app_excluded = listen(&app, "[::]:8082");
    let app_own = listen(&app, "[::]:9999");
    // Plain servers elsewhere.
    let other80 = listen(&other, "[::]:80");
    let other8081 = listen(&other, "[::]:8081");
    let skip80 = listen(&skip, "[::]:80");

    for (i, v6) in [false, true].into_iter().enumerate() {
        let fam = if v6 { "IPv6" } else { "IPv4" };
        let (nowhere, other_ip, skip_ip, app_ip): (IpAddr, IpAddr, IpAddr, IpAddr) = if v6 {
            (
                NOWHERE_V6.parse().unwrap(),
                other.ip6().into(),
                skip.ip6().into(),
                app.ip6().into(),
            )
        } else {
            (
                NOWHERE_V4.parse().unwrap(),
                other.ip().into(),
                skip.ip().into(),
                app.ip().into(),
            )
        };
        let loopback: IpAddr = if v6 {
            "::1".parse().unwrap()
        } else {
            "127.0.0.1".parse().unwrap()
        };
        let out = &outbound[i];

        // uid 1000 to nowhere:80 is captured with its destination intact.
        let _c = connect_as(&app, 1000, None, sock(nowhere, 80));
        let conn = lands(out, &format!("{fam} uid 1000 to {nowhere}:80"));
        assert_eq!(
            original_dst(&conn).expect("SO_ORIGINAL_DST"),
            sock(nowhere, 80)
        );

        // The proxy's uid, and its gid, are not captured.
        let _c = connect_as(&app, 1337, None, sock(other_ip, 80));
        lands(&other80, &format!("{fam} uid 1337"));
        let _c = connect_as(&app, 1000, Some(1337), sock(other_ip, 80));
        lands(&other80, &format!("{fam} gid 1337"));

        // An excluded port and an excluded network are not captured.
        let _c = connect_as(&app, 1000, None, sock(other_ip, 8081));
        lands(&other8081, &format!("{fam} excluded port"));
        let _c = connect_as(&app, 1000, None, sock(skip_ip, 80));
        lands(&skip80, &format!("{fam} excluded network"));

        // Traffic that stays in the pod: loopback and the pod's own address.
        let _c = connect_as(&app, 1000, None, sock(loopback, 9999));
        lands(&app_own, &format!("{fam} loopback"));
        let _c = connect_as(&app, 1000, None, sock(app_ip, 9999));
        lands(&app_own, &format!("{fam} own pod address"));
        nothing_on(out, &format!("{fam} outbound port"));

        // Inbound from another pod: captured with the original port, except
        // the admin port and excluded ports.
        let _c = connect_as(&other, 1000, None, sock(app_ip, 8080));
        let conn = lands(&inbound, &format!("{fam} inbound 8080"));
        assert_eq!(
            original_dst(&conn).expect("SO_ORIGINAL_DST"),
            sock(app_ip, 8080)
        );
        let _c = connect_as(&other, 1000, None, sock(app_ip, 15000));
        lands(&admin, &format!("{fam} admin port"));
        let _c = connect_as(&other, 1000, None, sock(app_ip, 8082));
        lands(&app_excluded, &format!("{fam} excluded inbound port"));
        nothing_on(&inbound, &format!("{fam} inbound port"));
    }

    // The runtime validator agrees, once the test's own listeners are gone.
    drop(outbound);
    let mut v = ValidateOptions::new(&cfg.init, &cfg.proxy, true);
    v.netns = Some(app.netns().to_owned());
    let validated = validate(&v).unwrap_or_else(|e| {
        panic!(
            "validation: {e}\n{}",
            app.exec(["ss", "-tanp"]).unwrap_or_default()
        )
    });
    assert_eq!(validated.len(), 2);
    assert!(validated.iter().all(|x| x.original_dst == x.target));

    // Without the rules it fails and says why.
    cleanup(&opts(&app, backend(engine))).expect("cleanup");
    v.timeout = std::time::Duration::from_millis(300);
    let err = validate(&v).unwrap_err();
    assert!(matches!(err, InitError::Validation { .. }), "{err}");
}

#[test]
fn capture_nft() {
    capture(Engine::Nft);
}

#[test]
fn capture_legacy() {
    capture(Engine::Legacy);
}

/// `legate run`'s scope: only sockets of processes in the capture group,
/// as primary or supplementary group, are captured, and nothing inbound
/// unless ports are listed. The installed rules read back exactly as
/// planned (so `--check` and a second apply see no difference), tell their
/// scope, and clean up to what was there before.
fn group_scope(engine: Engine) {
    let bed = Bed::new().expect("test bed");
    let host = bed.pod("host").expect("pod");
    let other = bed.pod("other").expect("pod");
    add_foreign_rules(&host, engine);
    let before = saved(&host, engine);
    let o = opts(&host, backend(engine));
    let cfg = config(&[]);
    let plan = plan_scoped(&cfg.init, &cfg.proxy, Scope::Group(1339)).expect("plan");
    apply(&plan, &o).expect("apply");
    let again = apply(&plan, &o).expect("second apply");
    assert!(
        again.families.iter().all(|(_, c)| *c == Change::Unchanged),
        "iptables-save prints the group rule as planned: {again}"
    );
    assert!(check(&plan, &o).expect("check").is_ok());
    let found = installed(&o).expect("installed");
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].scope(), Some(Scope::Group(1339)));

    let outbound = [
        listen(&host, "127.0.0.1:15001"),
        listen(&host, "[::1]:15001"),
    ];
    let inbound = listen(&host, "[::]:15006");
    let host8080 = listen(&host, "[::]:8080");
    let other80 = listen(&other, "[::]:80");
    for (i, v6) in [false, true].into_iter().enumerate() {
        let fam = if v6 { "IPv6" } else { "IPv4" };
        let (other_ip, host_ip): (IpAddr, IpAddr) = if v6 {
            (other.ip6().into(), host.ip6().into())
        } else {
            (other.ip().into(), host.ip().into())
        };
        let dst = sock(other_ip, 80);
        let out = &outbound[i];

        // In the group as a supplementary group, or as the primary one.
        let _c = connect_with_groups(&host, 1000, 1000, "1339", dst);
        let conn = lands(out, &format!("{fam} supplementary capture group"));
        assert_eq!(original_dst(&conn).expect("SO_ORIGINAL_DST"), dst);
        let _c = connect_as(&host, 1000, Some(1339), dst);
        lands(out, &format!("{fam} primary capture group"));

        // Everyone else on the host goes direct, root included.
        let _c = connect_with_groups(&host, 1000, 1000, "20,30", dst);
        lands(&other80, &format!("{fam} other groups"));
        let _c = connect_as(&host, 0, None, dst);
        lands(&other80, &format!("{fam} root"));
        nothing_on(out, &format!("{fam} outbound port"));

        // Nothing inbound is captured without listed ports.
        let _c = connect_as(&other, 1000, None, sock(host_ip, 8080));
        lands(&host8080, &format!("{fam} inbound 8080"));
        nothing_on(&inbound, &format!("{fam} inbound port"));
    }

    assert_eq!(cleanup(&o).expect("cleanup").len(), 1);
    assert_eq!(saved(&host, engine), before);
}

/// Connects like [`connect_as`], with exactly these supplementary groups.
fn connect_with_groups(pod: &Pod, uid: u32, gid: u32, groups: &str, addr: SocketAddr) -> Process {
    let script = format!(
        "exec 3<>/dev/tcp/{}/{} && printf x >&3 && sleep 30",
        addr.ip(),
        addr.port()
    );
    pod.command("setpriv")
        .args([
            &format!("--reuid={uid}"),
            &format!("--regid={gid}"),
            &format!("--groups={groups}"),
            "bash",
            "-c",
            &script,
        ])
        .current_dir("/")
        .spawn()
        .expect("spawn client")
}

#[test]
fn group_scope_nft() {
    group_scope(Engine::Nft);
}

#[test]
fn group_scope_legacy() {
    group_scope(Engine::Legacy);
}

/// Apply twice, check, repair, clean up: the tables always end where they
/// should, and others' rules are never touched.
fn lifecycle(engine: Engine) {
    let bed = Bed::new().expect("test bed");
    let pod = bed.pod("life").expect("pod");
    add_foreign_rules(&pod, engine);
    let before = saved(&pod, engine);
    let o = opts(&pod, backend(engine));
    let cfg = config(&[]);
    let plan = plan(&cfg.init, &cfg.proxy).expect("plan");

    let first = apply(&plan, &o).expect("first apply");
    assert!(
        first.families.iter().all(|(_, c)| *c == Change::Applied),
        "{first}"
    );
    let once = saved(&pod, engine);
    assert_ne!(once, before);
    assert!(once.contains("CNI-TEST"), "foreign chain kept:\n{once}");

    // Idempotent: the second run changes nothing at all.
    let second = apply(&plan, &o).expect("second apply");
    assert!(
        second.families.iter().all(|(_, c)| *c == Change::Unchanged),
        "{second}"
    );
    assert_eq!(saved(&pod, engine), once);
    let dry = dry_run(&plan, &o).expect("dry run").to_string();
    assert!(
        dry.contains("already as planned") && !dry.contains("*nat"),
        "{dry}"
    );

    // Check passes, then catches a rule deleted by hand, in each family.
    assert!(check(&plan, &o).expect("check").is_ok());
    for family in Family::ALL {
        ipt(
            &pod,
            engine,
            family,
            &["-t", "nat", "-D", "LEGATE_OUTPUT", "2"],
        );
        let report = check(&plan, &o).expect("check");
        assert!(!report.is_ok());
        let fc = report.families.iter().find(|f| f.family == family).unwrap();
        assert!(
            fc.diff.contains(&DiffLine::Missing(
                "-A LEGATE_OUTPUT -m owner --uid-owner 1337 -j RETURN".into()
            )),
            "{report}"
        );
        // Dry run shows the repair, and applying performs it.
        let dry = dry_run(&plan, &o).expect("dry run").to_string();
        assert!(dry.contains(":LEGATE_OUTPUT - [0:0]"), "{dry}");
        apply(&plan, &o).expect("repair");
        assert!(check(&plan, &o).expect("check").is_ok());
        assert_eq!(saved(&pod, engine), once);
    }

    // A changed plan replaces only what changed.
    let cfg2 = config(&["proxy.outbound_port=16001".into()]);
    let plan2 = legate_init::plan(&cfg2.init, &cfg2.proxy).expect("plan");
    apply(&plan2, &o).expect("apply changed plan");
    assert!(check(&plan2, &o).expect("check").is_ok());

    // Cleanup restores exactly what was there, and a second one is a no-op.
    let removed = cleanup(&o).expect("cleanup");
    assert_eq!(removed.len(), 1);
    assert_eq!(saved(&pod, engine), before);
    assert!(cleanup(&o).expect("second cleanup").is_empty());
    assert_eq!(saved(&pod, engine), before);
}

#[test]
fn lifecycle_nft() {
    lifecycle(Engine::Nft);
}

#[test]
fn lifecycle_legacy() {
    lifecycle(Engine::Legacy);
}

/// A failure in the second family puts the first back: nothing is left
/// half installed.
#[test]
fn failed_apply_changes_nothing() {
    let bed = Bed::new().expect("test bed");
    let pod = bed.pod("fail").expect("pod");
    let engine = Engine::Nft;
    add_foreign_rules(&pod, engine);
    let o = opts(&pod, backend(engine));
    let cfg = config(&[]);
    let good = plan(&cfg.init, &cfg.proxy).expect("plan");
    apply(&good, &o).expect("apply");
    let before = saved(&pod, engine);

    // IPv4 changes fine; IPv6 carries a rule the kernel refuses (owner
    // match outside OUTPUT/POSTROUTING).
    let cfg2 = config(&["proxy.outbound_port=16001".into()]);
    let mut bad = legate_init::plan(&cfg2.init, &cfg2.proxy).expect("plan");
    bad.v6
        .chains
        .get_mut("LEGATE_PREROUTING")
        .unwrap()
        .push("-m owner --uid-owner 7 -j RETURN".into());
    let err = apply(&bad, &o).unwrap_err();
    match &err {
        InitError::RestoreFailed {
            rolled_back, rule, ..
        } => {
            assert!(*rolled_back, "{err}");
            assert!(
                rule.as_deref().is_some_and(|r| r.contains("--uid-owner 7")),
                "{err}"
            );
        }
        other => panic!("unexpected error: {other}"),
    }
    assert_eq!(saved(&pod, engine), before);
    assert!(check(&good, &o).expect("check").is_ok());
}

/// The backend follows legate's chains, then others' rules, then nft, and
/// a later run never switches.
#[test]
fn backend_choice_is_stable() {
    let bed = Bed::new().expect("test bed");
    let pod = bed.pod("pick").expect("pod");
    let auto = opts(&pod, Backend::Auto);
    let cfg = config(&[]);
    let plan = plan(&cfg.init, &cfg.proxy).expect("plan");

    // Only legacy holds rules: legacy is chosen.
    add_foreign_rules(&pod, Engine::Legacy);
    let nft_before = saved(&pod, Engine::Nft);
    let first = apply(&plan, &auto).expect("apply");
    assert_eq!(first.engine, Engine::Legacy, "{first}");

    // Now nft gets rules of its own; legate stays where its chains are.
    add_foreign_rules(&pod, Engine::Nft);
    let nft_with_foreign = saved(&pod, Engine::Nft);
    for _ in 0..2 {
        let again = apply(&plan, &auto).expect("apply");
        assert_eq!(again.engine, Engine::Legacy, "{again}");
        assert!(again.families.iter().all(|(_, c)| *c == Change::Unchanged));
    }
    assert_eq!(saved(&pod, Engine::Nft), nft_with_foreign, "nft untouched");

    // A copy forced into nft makes auto refuse instead of guessing...
    apply(&plan, &opts(&pod, Backend::Nft)).expect("forced nft");
    let err = apply(&plan, &auto).unwrap_err();
    assert!(matches!(err, InitError::BothBackends), "{err}");
    // ...and an automatic cleanup removes both copies.
    let removed = cleanup(&auto).expect("cleanup");
    assert_eq!(removed.len(), 2);
    assert_eq!(saved(&pod, Engine::Nft), nft_with_foreign);
    assert_ne!(nft_before, nft_with_foreign);
}

/// With no rules anywhere, nft is chosen; with IPv6 off no IPv6 rule is
/// written, and switching it off removes IPv6 rules written before.
#[test]
fn defaults_to_nft_and_honours_ipv6_off() {
    let bed = Bed::new().expect("test bed");
    let pod = bed.pod("dflt").expect("pod");
    let cfg = config(&[]);
    let plan = plan(&cfg.init, &cfg.proxy).expect("plan");
    let mut o = opts(&pod, Backend::Auto);
    o.ipv6 = Ipv6Mode::Auto;
    let r = apply(&plan, &o).expect("apply");
    assert_eq!(r.engine, Engine::Nft);
    assert!(r.families.contains(&(Family::V6, Change::Applied)), "{r}");

    o.ipv6 = Ipv6Mode::Off;
    let r = apply(&plan, &o).expect("apply");
    assert!(r.families.contains(&(Family::V6, Change::Applied)), "{r}");
    let v6 = ipt(&pod, Engine::Nft, Family::V6, &["-t", "nat", "-S"]);
    assert!(!v6.contains("LEGATE"), "{v6}");
    let v4 = ipt(&pod, Engine::Nft, Family::V4, &["-t", "nat", "-S"]);
    assert!(v4.contains("LEGATE_OUTPUT"), "{v4}");
    assert!(check(&plan, &o).expect("check").is_ok());
    cleanup(&o).expect("cleanup");
}

/// An include list the excludes carve exceptions out of is validated on
/// an address it captures, not on its first one, which an exception holds.
#[test]
fn validation_targets_what_an_include_list_less_its_exceptions_captures() {
    let bed = Bed::new().expect("test bed");
    let pod = bed.pod("carve").expect("pod");
    let cfg = config(&[
        "init.include_outbound_cidrs=10.0.0.0/8,fd20::/16".into(),
        "init.exclude_outbound_cidrs=10.0.0.0/16,fd20::/32".into(),
    ]);
    let plan = plan(&cfg.init, &cfg.proxy).expect("plan");
    apply(&plan, &opts(&pod, Backend::Nft)).expect("apply");
    let mut v = ValidateOptions::new(&cfg.init, &cfg.proxy, true);
    v.netns = Some(pod.netns().to_owned());
    assert_eq!(
        v.targets,
        [sock([10, 1, 0, 1], 9), "[fd20:1::]:9".parse().unwrap()]
    );
    let validated = validate(&v).unwrap_or_else(|e| panic!("validation: {e}"));
    assert!(validated.iter().all(|x| x.original_dst == x.target));
    cleanup(&opts(&pod, Backend::Nft)).expect("cleanup");
}

/// The CLI entry point: flags become configuration, `--check` exits 1 on
/// a difference.
#[test]
fn cli_check_exit_codes() {
    use clap::Parser;
    use legate_init::cli::{run, InitArgs};

    #[derive(Parser)]
    struct Cmd {
        #[command(flatten)]
        args: InitArgs,
    }
    let bed = Bed::new().expect("test bed");
    let pod = bed.pod("cli").expect("pod");
    let args = |extra: &[&str]| {
        let mut argv = vec![
            "init",
            "--netns",
            pod.netns(),
            "--exclude-outbound-ports",
            "22",
        ];
        argv.extend_from_slice(extra);
        let a = Cmd::parse_from(argv).args;
        let cfg = {
            let flags = a.config_overrides();
            legate_config::load(&legate_config::Sources {
                flags,
                ..Default::default()
            })
            .expect("config")
            .config
        };
        (a, cfg)
    };
    let ok = std::process::ExitCode::SUCCESS;
    let fail = std::process::ExitCode::FAILURE;
    let (a, c) = args(&["--check"]);
    assert_eq!(run(&a, &c).expect("check"), fail);
    let (a, c) = args(&["--validate"]);
    assert_eq!(run(&a, &c).expect("apply and validate"), ok);
    let (a, c) = args(&["--check"]);
    assert_eq!(run(&a, &c).expect("check"), ok);
    let v4 = ipt(
        &pod,
        Engine::Nft,
        Family::V4,
        &["-t", "nat", "-S", "LEGATE_OUTPUT"],
    );
    assert!(v4.contains("--dport 22 -j RETURN"), "{v4}");
    let (a, c) = args(&["--cleanup"]);
    assert_eq!(run(&a, &c).expect("cleanup"), ok);
    let (a, c) = args(&["--check"]);
    assert_eq!(run(&a, &c).expect("check"), fail);
}
