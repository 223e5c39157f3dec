//! The `legate` command line as an operator meets it: help, version and
//! configuration checking, run as a real process.

use std::io::Write;
use std::process::{Command, Output};

fn legate(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_legate"));
    cmd.args(args);
    // Start from a clean slate so the caller's LEGATE_* variables cannot leak in.
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("LEGATE_")) {
        cmd.env_remove(k);
    }
    cmd.envs(env.iter().copied());
    cmd.output().expect("run legate")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn config_file(body: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    f.write_all(body.as_bytes()).unwrap();
    f
}

#[test]
fn version_and_help_on_every_subcommand() {
    let out = legate(&["--version"], &[]);
    assert!(out.status.success());
    assert!(
        text(&out.stdout).starts_with("legate "),
        "{}",
        text(&out.stdout)
    );

    let help = text(&legate(&["--help"], &[]).stdout);
    let subcommands: Vec<&str> = help
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        // A subcommand line is indented by two; wrapped descriptions by more.
        .filter(|l| !l[2..].starts_with(' '))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .collect();
    assert!(subcommands.contains(&"config"), "{help}");
    for sub in subcommands {
        let out = legate(&[sub, "--help"], &[]);
        assert!(
            out.status.success(),
            "{sub} --help failed: {}",
            text(&out.stderr)
        );
        assert!(text(&out.stdout).contains("Usage: legate"), "{sub}");
    }
}

#[test]
fn config_check_reports_every_mistake_and_exits_1() {
    let f = config_file(
        "[proxy]\noutbound_port = \"fifteen\"\nmode = \"strikt\"\n\n[ca]\ncert_tll = \"1h\"\n",
    );
    let out = legate(&["config", "check", f.path().to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("3 configuration errors"), "{err}");
    for needle in [
        "proxy.outbound_port: invalid value \"fifteen\"",
        "proxy.mode: invalid value \"strikt\"",
        "did you mean `strict`",
        "ca.cert_tll: unknown key",
        "did you mean `cert_ttl`",
    ] {
        assert!(err.contains(needle), "missing {needle:?} in:\n{err}");
    }
    assert!(out.stdout.is_empty());
}

/// Files the configuration names are looked at where it is checked: what
/// is wrong with them is a warning (the configuration may be meant for
/// another machine), and the check still passes.
#[test]
fn config_check_warns_of_the_files_it_names_that_cannot_serve() {
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate\n").unwrap();
    let missing = dir.path().join("missing-token");
    let body = format!(
        "[identity]\nca_bundle = \"{}\"\ntoken_file = \"{}\"\ncert_dir = \"{}\"\n\n[telemetry]\notlp_endpoint = \"https://collector.test:4317\"\notlp_ca_file = \"{}\"\n",
        garbage.display(),
        missing.display(),
        garbage.display(),
        dir.path().display(),
    );
    let f = config_file(&body);
    let out = legate(&["config", "check", f.path().to_str().unwrap()], &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    for needle in [
        "warning: identity.ca_bundle",
        "no PEM CERTIFICATE block",
        "warning: identity.token_file",
        "No such file",
        "warning: identity.cert_dir",
        "is not a directory",
        "warning: telemetry.otlp_ca_file",
        "is not a regular file",
    ] {
        assert!(err.contains(needle), "missing {needle:?} in:\n{err}");
    }
}

/// An include entry the excludes cover wholly captures nothing: refused,
/// by `config check` and by the commands that would install it, before
/// anything changes. One they cover in part is a carve-out and passes.
#[test]
fn an_include_the_excludes_cover_wholly_is_refused_and_a_partial_one_is_not() {
    let f = config_file(
        "[init]\ninclude_inbound_ports = \"8080\"\nexclude_inbound_ports = \"8000-8999\"\n\
         include_outbound_cidrs = [\"10.1.0.0/16\"]\nexclude_outbound_cidrs = [\"10.0.0.0/8\"]\n",
    );
    let path = f.path().to_str().unwrap();
    let out = legate(&["config", "check", path], &[]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("2 configuration errors"), "{err}");
    for needle in [
        "init.include_inbound_ports: 8080 would never be captured: \
         init.exclude_inbound_ports leaves 8000-8999 alone",
        "set init.exclude_inbound_ports to 8000-8079,8081-8999",
        "init.include_outbound_cidrs: 10.1.0.0/16 would never be captured: \
         init.exclude_outbound_cidrs leaves 10.0.0.0/8 alone",
    ] {
        assert!(err.contains(needle), "missing {needle:?} in:\n{err}");
    }
    assert!(out.stdout.is_empty());

    // legate init and legate run stop at the same error, before touching
    // any namespace.
    let netns = "/nonexistent/netns";
    let out = legate(
        &["--config", path, "init", "--dry-run", "--netns", netns],
        &[],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("init.include_inbound_ports: 8080"), "{err}");
    assert!(!err.contains(netns), "{err}");
    let out = legate(&["--config", path, "run", "--", "true"], &[]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("init.include_outbound_cidrs: 10.1.0.0/16"),
        "{err}"
    );

    let f = config_file(
        "[init]\ninclude_inbound_ports = \"8000-8999\"\nexclude_inbound_ports = \"8500\"\n\
         include_outbound_cidrs = [\"10.0.0.0/8\"]\nexclude_outbound_cidrs = [\"10.1.0.0/16\", \"::/0\"]\n",
    );
    let out = legate(&["config", "check", f.path().to_str().unwrap()], &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(out.stderr.is_empty(), "{}", text(&out.stderr));
}

/// Inbound ports included while inbound capture is off do nothing, but
/// the switch may be off on purpose: a warning from every command that
/// reads the lists, and the check passes.
#[test]
fn inbound_ports_included_with_inbound_capture_off_are_warned_about() {
    let f = config_file("[init]\ncapture_inbound = false\ninclude_inbound_ports = \"8080\"\n");
    let path = f.path().to_str().unwrap();
    let warning = "warning: init.include_inbound_ports: 8080 is not captured, \
                   because init.capture_inbound is false";
    let out = legate(&["config", "check", path], &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(err.contains(warning), "{err}");
    assert!(err.contains("set init.capture_inbound = true"), "{err}");

    // legate init warns, then goes on to its own work (here, a namespace
    // that does not exist).
    let netns = "/nonexistent/netns";
    let out = legate(
        &["--config", path, "init", "--check", "--netns", netns],
        &[],
    );
    let err = text(&out.stderr);
    assert!(err.contains(warning), "{err}");
    assert!(err.contains(netns), "{err}");

    // So does legate run (here, to say that the command is missing); its
    // --inbound-ports flag is named as the origin.
    let out = legate(&["--config", path, "run", "--inbound-ports", "9090"], &[]);
    let err = text(&out.stderr);
    assert!(
        err.contains("warning: init.include_inbound_ports: 9090 is not captured")
            && err.contains("(from flag --inbound-ports 9090)"),
        "{err}"
    );
    assert_eq!(out.status.code(), Some(2), "{err}");
}

#[test]
fn config_check_prints_the_effective_config_with_secrets_redacted() {
    let f = config_file("[proxy]\nmode = \"strict\"\nidle_timeout = \"10m\"\n");
    let path = f.path().to_str().unwrap();

    let out = legate(
        &["config", "check", path],
        &[("LEGATE_IDENTITY_TOKEN", "hunter2")],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let cfg: toml::Table = text(&out.stdout).parse().unwrap();
    assert_eq!(cfg["proxy"]["mode"].as_str(), Some("strict"));
    assert_eq!(cfg["identity"]["token"].as_str(), Some("<redacted>"));
    assert!(!text(&out.stdout).contains("hunter2"));

    // The environment overrides the file ...
    let out = legate(
        &["config", "check", path],
        &[("LEGATE_PROXY_MODE", "permissive")],
    );
    let cfg: toml::Table = text(&out.stdout).parse().unwrap();
    assert_eq!(cfg["proxy"]["mode"].as_str(), Some("permissive"));
    assert_eq!(cfg["proxy"]["idle_timeout"].as_str(), Some("10m"));

    // ... and flags override the environment.
    let out = legate(
        &[
            "--set",
            "proxy.mode=strict",
            "--log-level",
            "debug",
            "config",
            "check",
            path,
        ],
        &[("LEGATE_PROXY_MODE", "permissive"), ("LEGATE_LOG", "warn")],
    );
    let cfg: toml::Table = text(&out.stdout).parse().unwrap();
    assert_eq!(cfg["proxy"]["mode"].as_str(), Some("strict"));
    assert_eq!(cfg["log"]["level"].as_str(), Some("debug"));

    // LEGATE_CONFIG names the file when no argument does.
    let out = legate(&["config", "check"], &[("LEGATE_CONFIG", path)]);
    let cfg: toml::Table = text(&out.stdout).parse().unwrap();
    assert_eq!(cfg["proxy"]["idle_timeout"].as_str(), Some("10m"));
}

#[test]
fn bad_flags_and_log_filters_are_explained() {
    let out = legate(&["--set", "proxy.mode", "config", "check"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("write --set KEY=VALUE"));

    let out = legate(&["--log-level", "info,=[", "config", "check"], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("log.level"),
        "{}",
        text(&out.stderr)
    );

    let out = legate(&["config", "check", "/nonexistent/legate.toml"], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("cannot read config file"));
}

#[test]
fn config_keys_lists_env_names() {
    let out = legate(&["config", "keys"], &[]);
    assert!(out.status.success());
    let s = text(&out.stdout);
    assert!(
        s.contains("proxy.outbound_port")
            && s.contains("LEGATE_PROXY_OUTBOUND_PORT")
            && s.contains("15001")
    );
}

#[test]
fn a_token_ttl_under_one_second_is_refused_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    let ca = ca.to_str().unwrap();
    let out = legate(&["ca", "init", "--dir", ca], &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let token = |ttl: &str| {
        legate(
            &[
                "ca",
                "token",
                "--dir",
                ca,
                "--identity",
                "web",
                "--ttl",
                ttl,
            ],
            &[],
        )
    };
    for ttl in ["0s", "500ms"] {
        let out = token(ttl);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{ttl}: {err}");
        assert!(out.stdout.is_empty(), "{ttl}: a token was printed");
        assert!(
            err.contains("ca.token_ttl")
                && err.contains("flag --ttl")
                && err.contains("1s or more"),
            "{ttl}: {err}"
        );
    }
    let out = token("1s");
    assert!(out.status.success(), "{}", text(&out.stderr));
}

#[test]
fn ca_bundle_refuses_a_damaged_bundle_file_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    let bundle = ca.join("bundle.pem");
    let ca = ca.to_str().unwrap();
    let out = legate(&["ca", "init", "--dir", ca], &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = legate(&["ca", "bundle", "--dir", ca], &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("BEGIN CERTIFICATE"));
    std::fs::write(&bundle, "-----BEGIN CERTIFICATE-----\nMIIB\n").unwrap();
    let out = legate(&["ca", "bundle", "--dir", ca], &[]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(out.stdout.is_empty(), "printed a damaged bundle");
    assert!(
        err.contains(&bundle.display().to_string()) && err.contains("cut off"),
        "{err}"
    );
}
