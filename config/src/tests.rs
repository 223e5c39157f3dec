use std::io::Write;

use super::*;

fn file(text: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    f.write_all(text.as_bytes()).unwrap();
    f
}

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn flag(path: &str, value: &str) -> FlagValue {
    FlagValue {
        path: path.into(),
        value: value.into(),
        flag: format!("--set {path}={value}"),
    }
}

fn errors(sources: &Sources) -> Vec<ConfigError> {
    match load(sources) {
        Ok(_) => panic!("expected errors"),
        Err(e) => e.errors().to_vec(),
    }
}

#[test]
fn defaults_are_valid_and_match_the_design() {
    let c = load(&Sources::default()).unwrap().config;
    assert_eq!(c.proxy.outbound_port, 15001);
    assert_eq!(c.proxy.inbound_port, 15006);
    assert_eq!(c.proxy.admin_listen.port(), 15000);
    assert_eq!(c.ca.listen.port(), 15012);
    assert_eq!((c.proxy.uid, c.proxy.gid), (1337, 1337));
    assert_eq!(c.ca.cert_ttl, std::time::Duration::from_secs(86400));
}

#[test]
fn a_file_with_three_mistakes_reports_all_three() {
    let f = file(
        r#"
[proxy]
outbound_port = 70000
mode = "strikt"

[ca]
cert_tll = "1h"
"#,
    );
    let errs = errors(&Sources {
        file: Some(f.path().into()),
        ..Default::default()
    });
    let paths: Vec<&str> = errs.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(
        paths,
        ["ca.cert_tll", "proxy.mode", "proxy.outbound_port"],
        "{errs:?}"
    );
    let text: Vec<String> = errs.iter().map(ToString::to_string).collect();
    assert!(text[0].contains("did you mean `cert_ttl`"), "{}", text[0]);
    assert!(text[1].contains("did you mean `strict`"), "{}", text[1]);
    assert!(
        text[2].contains("70000") && text[2].contains("1 to 65535"),
        "{}",
        text[2]
    );
}

#[test]
fn errors_name_the_value_source_and_expected_form() {
    let errs = errors(&Sources {
        env: env(&[("LEGATE_PROXY_CONNECT_TIMEOUT", "soon")]),
        ..Default::default()
    });
    let msg = errs[0].to_string();
    assert!(
        msg.starts_with("proxy.connect_timeout: invalid value \"soon\""),
        "{msg}"
    );
    assert!(msg.contains("LEGATE_PROXY_CONNECT_TIMEOUT"), "{msg}");
    assert!(msg.contains("a duration like"), "{msg}");
}

#[test]
fn precedence_is_flags_over_env_over_file_over_defaults() {
    let f = file("[proxy]\nmode = \"strict\"\nidle_timeout = \"10m\"\nconnect_timeout = \"2s\"\n");
    let base = Sources {
        file: Some(f.path().into()),
        ..Default::default()
    };
    let c = load(&base).unwrap().config;
    assert_eq!(c.proxy.mode, InboundMode::Strict);
    assert_eq!(c.proxy.idle_timeout, std::time::Duration::from_secs(600));
    assert_eq!(
        c.proxy.tcp_keepalive,
        std::time::Duration::from_secs(60),
        "default kept"
    );

    let with_env = Sources {
        env: env(&[
            ("LEGATE_PROXY_MODE", "permissive"),
            ("LEGATE_PROXY_IDLE_TIMEOUT", "5m"),
        ]),
        ..base.clone()
    };
    let l = load(&with_env).unwrap();
    assert_eq!(l.config.proxy.mode, InboundMode::Permissive);
    assert_eq!(
        l.config.proxy.idle_timeout,
        std::time::Duration::from_secs(300)
    );
    assert_eq!(
        l.config.proxy.connect_timeout,
        std::time::Duration::from_secs(2),
        "file value kept"
    );
    assert_eq!(
        l.origin("proxy.mode"),
        Origin::Env("LEGATE_PROXY_MODE".into())
    );

    let with_flag = Sources {
        flags: vec![flag("proxy.mode", "strict")],
        ..with_env
    };
    let l = load(&with_flag).unwrap();
    assert_eq!(l.config.proxy.mode, InboundMode::Strict);
    assert_eq!(
        l.config.proxy.idle_timeout,
        std::time::Duration::from_secs(300),
        "env value kept"
    );
    assert_eq!(
        l.origin("proxy.connect_timeout"),
        Origin::File(f.path().into())
    );
}

#[test]
fn log_alias_and_full_name() {
    let c = load(&Sources {
        env: env(&[("LEGATE_LOG", "debug")]),
        ..Default::default()
    })
    .unwrap()
    .config;
    assert_eq!(c.log.level, "debug");
    let c = load(&Sources {
        env: env(&[("LEGATE_LOG_LEVEL", "warn"), ("LEGATE_LOG", "debug")]),
        ..Default::default()
    })
    .unwrap()
    .config;
    assert_eq!(c.log.level, "warn", "the full name wins over the alias");
}

#[test]
fn unknown_env_vars_and_flags_get_suggestions() {
    let errs = errors(&Sources {
        env: env(&[("LEGATE_PROXY_OUTBOUND_PROT", "1")]),
        flags: vec![flag("proxy.inbound_prot", "2")],
        ..Default::default()
    });
    assert_eq!(errs.len(), 2);
    assert!(
        errs[0].to_string().contains("LEGATE_PROXY_OUTBOUND_PORT"),
        "{}",
        errs[0]
    );
    assert!(
        errs[1].to_string().contains("proxy.inbound_port"),
        "{}",
        errs[1]
    );
}

#[test]
fn typed_values_parse() {
    let f = file(
        r#"
[proxy]
mesh_networks = ["10.200.0.0/16", "fd20:200::/64", "10.9.9.9"]
opaque_ports = "25,3306,8000-8100"

[[proxy.destinations]]
cidrs = ["10.200.0.0/24"]
ports = [80, "443"]
mode = "strict"
identity = "spiffe://legate.local/web"

[[proxy.authz]]
ports = "8080"
allow = ["spiffe://legate.local/ns/shop/*", "authenticated"]

[ca]
max_body = "32KiB"
"#,
    );
    let c = load(&Sources {
        file: Some(f.path().into()),
        ..Default::default()
    })
    .unwrap()
    .config;
    assert_eq!(c.proxy.mesh_networks.len(), 3);
    assert_eq!(c.proxy.mesh_networks[2].to_string(), "10.9.9.9/32");
    assert!(c.proxy.opaque_ports.contains(8050));
    let d = &c.proxy.destinations[0];
    assert_eq!(d.mode, DestinationMode::Strict);
    assert!(d.ports.contains(443) && d.ports.contains(80));
    assert_eq!(d.identity.as_ref().unwrap().path(), "/web");
    assert_eq!(c.proxy.authz[0].allow.len(), 2);
    assert_eq!(c.ca.max_body, ByteSize::kib(32));
}

#[test]
fn list_items_report_their_index() {
    let f = file(
        r#"
[[proxy.destinations]]
cidrs = ["10.0.0.1/8"]
mode = "auto"

[[proxy.destinations]]
mod = "strict"
"#,
    );
    let errs = errors(&Sources {
        file: Some(f.path().into()),
        ..Default::default()
    });
    assert_eq!(errs[0].path, "proxy.destinations[0].cidrs[0]");
    assert!(
        errs[0].to_string().contains("did you mean 10.0.0.0/8"),
        "{}",
        errs[0]
    );
    assert_eq!(errs[1].path, "proxy.destinations[1].mod");
}

#[test]
fn lists_of_tables_from_the_environment() {
    let c = load(&Sources {
        env: env(&[(
            "LEGATE_PROXY_DESTINATIONS",
            r#"[{ cidrs = ["10.1.0.0/16"], mode = "plaintext" }]"#,
        )]),
        ..Default::default()
    })
    .unwrap()
    .config;
    assert_eq!(c.proxy.destinations[0].mode, DestinationMode::Plaintext);
}

#[test]
fn rules_across_fields() {
    let errs = errors(&Sources {
        flags: vec![
            flag("proxy.inbound_port", "15001"),
            flag("proxy.uid", "0"),
            flag("identity.id", "spiffe://elsewhere/x"),
        ],
        ..Default::default()
    });
    let paths: Vec<&str> = errs.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(
        paths,
        ["proxy.inbound_port", "proxy.uid", "identity.id"],
        "{errs:?}"
    );
    assert!(
        errs[0]
            .to_string()
            .contains("--set proxy.inbound_port=15001"),
        "{}",
        errs[0]
    );
}

#[test]
fn overlapping_authz_ports_are_refused() {
    let errs = errors(&Sources {
        env: env(&[(
            "LEGATE_PROXY_AUTHZ",
            r#"[{ ports = "80-90", allow = ["authenticated"] }, { ports = "85", allow = ["unauthenticated"] }]"#,
        )]),
        ..Default::default()
    });
    assert!(
        errs[0].to_string().contains("port 85 is already covered"),
        "{}",
        errs[0]
    );
}

#[test]
fn printed_config_redacts_secrets_and_loads_back() {
    let l = load(&Sources {
        env: env(&[
            ("LEGATE_IDENTITY_TOKEN", "s3cret-token"),
            ("LEGATE_IDENTITY_NAME", "web"),
        ]),
        ..Default::default()
    })
    .unwrap();
    let text = l.config.to_toml();
    assert!(!text.contains("s3cret-token"));
    assert!(text.contains("token = \"<redacted>\""), "{text}");
    let f = file(&text);
    let again = load(&Sources {
        file: Some(f.path().into()),
        ..Default::default()
    })
    .unwrap()
    .config;
    let mut expected = l.config.clone();
    expected.identity.token = Some(Secret::new("<redacted>"));
    assert_eq!(again, expected);
}

#[test]
fn syntax_errors_name_the_file_and_line() {
    let f = file("[proxy\nmode = 1\n");
    let err = load(&Sources {
        file: Some(f.path().into()),
        ..Default::default()
    })
    .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("not valid TOML") && msg.contains("line 1"),
        "{msg}"
    );
}

#[test]
fn kubernetes_token_review_keys() {
    let c = load(&Sources::default()).unwrap().config;
    assert_eq!(
        c.ca.kubernetes_api, None,
        "in-cluster default, decided at serve time"
    );
    assert_eq!(
        c.ca.kubernetes_ca_file,
        PathBuf::from("/var/run/secrets/kubernetes.io/serviceaccount/ca.crt")
    );
    assert_eq!(
        c.ca.kubernetes_token_file,
        PathBuf::from("/var/run/secrets/kubernetes.io/serviceaccount/token")
    );
    assert_eq!(c.ca.token_audience, "legate");

    let c = load(&Sources {
        env: env(&[
            ("LEGATE_CA_KUBERNETES_API", "https://10.96.0.1:443"),
            ("LEGATE_CA_TOKEN_AUDIENCE", "mesh"),
        ]),
        ..Default::default()
    })
    .unwrap()
    .config;
    assert_eq!(
        c.ca.kubernetes_api.as_deref(),
        Some("https://10.96.0.1:443")
    );
    assert_eq!(c.ca.token_audience, "mesh");

    let errs = errors(&Sources {
        flags: vec![
            flag("ca.kubernetes_api", "http://10.96.0.1"),
            flag("ca.token_audience", "two words"),
        ],
        ..Default::default()
    });
    let paths: Vec<&str> = errs.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(
        paths,
        ["ca.kubernetes_api", "ca.token_audience"],
        "{errs:?}"
    );
    assert!(errs[0].to_string().contains("https://"), "{}", errs[0]);
    for bad in ["https://", "https:///x", "https://user@host", "https://a b"] {
        let errs = errors(&Sources {
            flags: vec![flag("ca.kubernetes_api", bad)],
            ..Default::default()
        });
        assert_eq!(errs[0].path, "ca.kubernetes_api", "{bad}: {errs:?}");
    }
}

#[test]
fn workload_identity_forms() {
    let mut id = IdentityConfig::default();
    assert!(id.workload_id().unwrap_err().contains("identity.name"));
    id.name = Some("web".into());
    assert_eq!(
        id.workload_id().unwrap().as_str(),
        "spiffe://legate.local/web"
    );
    id.namespace = Some("shop".into());
    id.service_account = Some("api".into());
    assert_eq!(
        id.workload_id().unwrap().as_str(),
        "spiffe://legate.local/ns/shop/sa/api"
    );
    id.name = Some("bad name".into());
    id.namespace = None;
    id.service_account = None;
    assert!(id.workload_id().is_err());
}

#[test]
fn every_key_has_an_env_name_and_the_list_is_stable() {
    let keys = key_paths();
    assert!(keys.contains(&"proxy.destinations".to_string()));
    assert!(keys.contains(&"ca.cert_ttl".to_string()));
    assert_eq!(
        env_name("proxy.outbound_port"),
        "LEGATE_PROXY_OUTBOUND_PORT"
    );
    let mut names: Vec<String> = keys.iter().map(|k| env_name(k)).collect();
    names.sort();
    names.dedup();
    assert_eq!(
        names.len(),
        keys.len(),
        "two keys share an environment variable"
    );
}

#[test]
fn http_policy_defaults_are_valid_and_conservative() {
    let c = load(&Sources::default()).unwrap().config;
    let h = c.proxy.http.settings();
    assert_eq!(h, HttpSettings::default());
    assert_eq!(h.attempts, 2);
    assert_eq!(
        h.retry_on,
        [
            RetryCondition::ConnectFailure,
            RetryCondition::RefusedStream
        ],
        "by default only failures the server never saw are retried"
    );
    assert!(h.request_timeout.is_zero() && h.per_try_timeout.is_zero());
    assert_eq!(h.retry_buffer, ByteSize::kib(64));
    assert_eq!((h.budget_ratio, h.budget_min_per_second), (0.2, 10));
    assert!(key_paths().contains(&"proxy.http.budget_ratio".to_string()));
    assert!(key_paths().contains(&"proxy.http.routes".to_string()));
    // The route section offers every policy key as an override.
    for key in HttpSettings::KEYS {
        assert!(HttpRoute::KEYS.contains(key), "{key} cannot be overridden");
        assert!(HttpConfig::KEYS.contains(key), "{key} has no default");
    }
}

#[test]
fn http_routes_inherit_what_they_leave_out() {
    let f = file(
        r#"
[proxy.http]
attempts = 3
retry_on = ["connect-failure", "gateway-error"]
per_try_timeout = "2s"

[[proxy.http.routes]]
name = "payments"
hosts = ["payments.shop.svc", "*.payments.svc"]
retry_on = ["connect-failure"]
attempts = 1

[[proxy.http.routes]]
cidrs = ["10.96.0.0/12"]
ports = "80,8080"
retry_on = ["5xx", 429, "grpc-unavailable"]
max_in_flight = 0
"#,
    );
    let c = load(&Sources {
        file: Some(f.path().into()),
        env: env(&[("LEGATE_PROXY_HTTP_BACKOFF_MAX", "1s")]),
        ..Default::default()
    })
    .unwrap()
    .config;
    let http = &c.proxy.http;
    let base = http.settings();
    assert_eq!(base.attempts, 3);
    assert_eq!(base.backoff_max, std::time::Duration::from_secs(1));
    let pay = http.routes[0].settings_over(&base);
    assert_eq!(pay.attempts, 1);
    assert_eq!(pay.retry_on, [RetryCondition::ConnectFailure]);
    assert_eq!(
        pay.per_try_timeout,
        std::time::Duration::from_secs(2),
        "inherited"
    );
    assert_eq!(
        pay.backoff_max,
        std::time::Duration::from_secs(1),
        "inherited from env"
    );
    assert_eq!(http.routes[0].hosts[1].to_string(), "*.payments.svc");
    let svc = http.routes[1].settings_over(&base);
    assert_eq!(
        svc.retry_on,
        [
            RetryCondition::ServerError,
            RetryCondition::Status(429),
            RetryCondition::GrpcUnavailable
        ]
    );
    assert_eq!((svc.max_in_flight, svc.attempts), (0, 3));
    assert_eq!(http.routes[1].overrides(), ["retry_on", "max_in_flight"]);
}

#[test]
fn http_policy_mistakes_are_reported_with_their_paths() {
    let f = file(
        r#"
[proxy.http]
retry_on = ["conect-failure", 200]
attempts = 0
budget_ratio = 11

[[proxy.http.routes]]
hosts = ["api.shop.svc:8080"]

[[proxy.http.routes]]
ports = "80"
backoff_base = "2s"

[[proxy.http.routes]]
"#,
    );
    let errs = errors(&Sources {
        file: Some(f.path().into()),
        ..Default::default()
    });
    let text: Vec<String> = errs.iter().map(ToString::to_string).collect();
    let find = |path: &str| {
        text.iter()
            .find(|t| t.starts_with(&format!("{path}:")))
            .unwrap_or_else(|| panic!("no error for {path} in {text:#?}"))
    };
    assert!(find("proxy.http.retry_on[0]").contains("did you mean `connect-failure`"));
    assert!(find("proxy.http.retry_on[1]").contains("not an error"));
    assert!(find("proxy.http.routes[0].hosts[0]").contains("match the port with `ports`"));
    // Once values parse, the rules across them are checked.
    let f2 = file(
        r#"
[proxy.http]
attempts = 0
budget_ratio = 11

[[proxy.http.routes]]
ports = "80"
backoff_base = "2s"

[[proxy.http.routes]]
name = "everything"
"#,
    );
    let errs = errors(&Sources {
        file: Some(f2.path().into()),
        ..Default::default()
    });
    let text: Vec<String> = errs.iter().map(ToString::to_string).collect();
    let paths: Vec<&str> = errs.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "proxy.http.attempts",
            "proxy.http.budget_ratio",
            "proxy.http.routes[0].backoff_base",
            "proxy.http.routes[1]",
        ],
        "{text:#?}"
    );
    assert!(text[0].contains("at least 1"), "{}", text[0]);
    assert!(
        text[2].contains("backoff_base (2s) is longer than backoff_max (250ms, from proxy.http)"),
        "{}",
        text[2]
    );
    assert!(
        text[2].contains(&f2.path().display().to_string()),
        "a route's error names the file that set it: {}",
        text[2]
    );
    assert!(text[3].contains("matches every request"), "{}", text[3]);
}

#[test]
fn a_route_is_blamed_for_the_side_of_a_rule_it_set() {
    let errs = errors(&Sources {
        env: env(&[(
            "LEGATE_PROXY_HTTP_ROUTES",
            r#"[{ ports = "80", backoff_max = "10ms", per_try_timeout = "5s", request_timeout = "1s" }]"#,
        )]),
        ..Default::default()
    });
    let text: Vec<String> = errs.iter().map(ToString::to_string).collect();
    assert_eq!(text.len(), 2, "{text:#?}");
    assert!(
        text[0].starts_with("proxy.http.routes[0].backoff_max: backoff_base (25ms, from proxy.http) is longer than backoff_max (10ms)"),
        "{}",
        text[0]
    );
    assert!(text[0].contains("LEGATE_PROXY_HTTP_ROUTES"), "{}", text[0]);
    assert!(
        text[1].starts_with("proxy.http.routes[0].per_try_timeout:"),
        "{}",
        text[1]
    );
}

#[test]
fn observability_keys_have_safe_defaults_and_checked_ranges() {
    let c = Config::default();
    assert_eq!(c.log.access, AccessLogMode::Off, "access logs are opt-in");
    assert!(!c.log.access_paths, "paths are opt-in");
    assert_eq!(c.telemetry.otlp_endpoint, None, "traces are opt-in");
    let bad = Sources {
        flags: vec![
            flag("log.access_sample", "1.5"),
            flag("telemetry.otlp_endpoint", "grpc://collector:4317"),
            flag("telemetry.trace_sample", "-1"),
        ],
        ..Default::default()
    };
    let text = load(&bad).unwrap_err().to_string();
    for key in [
        "log.access_sample",
        "telemetry.otlp_endpoint",
        "telemetry.trace_sample",
    ] {
        assert!(text.contains(key), "{key} not reported:\n{text}");
    }
    // Roots for a collector that is not behind TLS are a mistake.
    let roots_for_plain = Sources {
        flags: vec![
            flag("telemetry.otlp_endpoint", "http://collector:4318"),
            flag("telemetry.otlp_ca_file", "/etc/otel/roots.pem"),
        ],
        ..Default::default()
    };
    let text = load(&roots_for_plain).unwrap_err().to_string();
    assert!(text.contains("telemetry.otlp_ca_file"), "{text}");
    let tls = Sources {
        flags: vec![
            flag("telemetry.otlp_endpoint", "https://collector:4318"),
            flag("telemetry.otlp_ca_file", "/etc/otel/roots.pem"),
        ],
        ..Default::default()
    };
    let c = load(&tls).unwrap().config;
    assert_eq!(
        c.telemetry.otlp_ca_file.as_deref(),
        Some(std::path::Path::new("/etc/otel/roots.pem"))
    );
    let good = Sources {
        flags: vec![
            flag("log.access", "on"),
            flag("log.access_sample", "0.25"),
            flag("telemetry.otlp_endpoint", "http://collector:4318"),
        ],
        ..Default::default()
    };
    let c = load(&good).unwrap().config;
    assert_eq!(c.log.access, AccessLogMode::On);
    assert_eq!(c.log.access_sample, 0.25);
}

#[test]
fn inbound_capture_follows_the_lists_and_spares_the_admin_port() {
    let mut init = InitConfig::default();
    assert!(init.captures_inbound(8080, 15020));
    assert!(!init.captures_inbound(15020, 15020));
    init.exclude_inbound_ports = PortSet::single(9000);
    assert!(!init.captures_inbound(9000, 15020));
    init.include_inbound_ports = PortSet::new([(8000, 8999)]);
    assert!(init.captures_inbound(8080, 15020));
    assert!(!init.captures_inbound(7000, 15020));
    init.capture_inbound = false;
    assert!(!init.captures_inbound(8080, 15020));
}

#[test]
fn workers_must_be_a_sensible_thread_count() {
    let bad = Sources {
        flags: vec![flag("proxy.workers", "257")],
        ..Default::default()
    };
    let text = load(&bad).unwrap_err().to_string();
    assert!(text.contains("proxy.workers"), "{text}");
    assert!(text.contains("1 to 256"), "{text}");
    assert_eq!(
        load(&Sources::default()).unwrap().config.proxy.workers,
        0,
        "one per CPU"
    );
    let good = Sources {
        flags: vec![flag("proxy.workers", "2")],
        ..Default::default()
    };
    assert_eq!(load(&good).unwrap().config.proxy.workers, 2);
}

#[test]
fn peer_timeout_defaults_to_ten_seconds_and_refuses_less_than_one() {
    assert_eq!(
        load(&Sources::default()).unwrap().config.proxy.peer_timeout,
        std::time::Duration::from_secs(10)
    );
    let short = Sources {
        flags: vec![flag("proxy.peer_timeout", "500ms")],
        ..Default::default()
    };
    let text = load(&short).unwrap_err().to_string();
    assert!(text.contains("proxy.peer_timeout"), "{text}");
    assert!(text.contains("1s or more"), "{text}");
    let longer = Sources {
        flags: vec![flag("proxy.peer_timeout", "1m")],
        ..Default::default()
    };
    assert_eq!(
        load(&longer).unwrap().config.proxy.peer_timeout,
        std::time::Duration::from_secs(60)
    );
}

#[test]
fn a_duration_too_long_for_the_clock_is_an_error_not_a_crash() {
    let huge = Sources {
        flags: vec![flag("proxy.http.request_timeout", "100000000000d")],
        ..Default::default()
    };
    let text = load(&huge).unwrap_err().to_string();
    assert!(text.contains("proxy.http.request_timeout"), "{text}");
    assert!(text.contains("100 years"), "{text}");
}

#[test]
fn listeners_others_must_find_refuse_port_zero() {
    for key in ["proxy.admin_listen", "ca.listen"] {
        let zero = Sources {
            flags: vec![flag(key, "127.0.0.1:0")],
            ..Default::default()
        };
        let text = load(&zero).unwrap_err().to_string();
        assert!(text.contains(key), "{text}");
        assert!(text.contains("fixed one"), "{text}");
    }
}

#[test]
fn max_header_fields_defaults_to_100_and_refuses_what_the_mesh_cannot_carry() {
    let c = load(&Sources::default()).unwrap().config;
    assert_eq!(c.proxy.http.max_header_fields, 100);
    assert!(key_paths().contains(&"proxy.http.max_header_fields".to_string()));
    for bad in ["0", "1001"] {
        let key = "proxy.http.max_header_fields";
        let text = only_error(&[(key, bad)], key);
        assert!(text.contains("1 to 1000 (default 100)"), "{bad}: {text}");
    }
    for good in ["1", "150", "1000"] {
        let c = load(&Sources {
            flags: vec![flag("proxy.http.max_header_fields", good)],
            ..Default::default()
        })
        .unwrap()
        .config;
        assert_eq!(c.proxy.http.max_header_fields.to_string(), good);
    }
    // Requests are read before their route is known: no route may set it.
    let f = file(
        r#"
[[proxy.http.routes]]
ports = "8080"
max_header_fields = 200
"#,
    );
    let errs = errors(&Sources {
        file: Some(f.path().into()),
        ..Default::default()
    });
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert_eq!(errs[0].path, "proxy.http.routes[0].max_header_fields");
}

/// The only error from loading these flags, which must be about `key`.
fn only_error(flags: &[(&str, &str)], key: &str) -> String {
    let errs = errors(&Sources {
        flags: flags.iter().map(|(k, v)| flag(k, v)).collect(),
        ..Default::default()
    });
    assert_eq!(errs.len(), 1, "{flags:?}: {errs:?}");
    assert_eq!(errs[0].path, key, "{flags:?}: {errs:?}");
    errs[0].to_string()
}

#[test]
fn identity_names_that_cannot_be_in_a_spiffe_id_are_refused_by_key() {
    for bad in ["a b", "../x", "a//b", "/a", "a/", ".", "web:1"] {
        let text = only_error(&[("identity.name", bad)], "identity.name");
        assert!(
            text.contains("letters, digits") || text.contains("segment"),
            "{bad}: {text}"
        );
        assert!(text.contains("like web"), "{bad}: {text}");
    }
    for bad in ["a/b", "..", "a b", "x/"] {
        for key in ["identity.namespace", "identity.service_account"] {
            let text = only_error(&[(key, bad)], key);
            assert!(
                text.contains("/ns/<namespace>/sa/<service_account>"),
                "{bad}: {text}"
            );
        }
    }
    // What the commands accept still loads, and builds the same ID.
    for good in ["web", "billing-api.v2", "team/web", "a_b"] {
        let c = load(&Sources {
            flags: vec![flag("identity.name", good)],
            ..Default::default()
        })
        .unwrap_or_else(|e| panic!("{good}: {e}"))
        .config;
        assert!(c.identity.workload_id().is_ok(), "{good}");
    }
    let c = load(&Sources {
        flags: vec![
            flag("identity.namespace", "shop"),
            flag("identity.service_account", "web.v1"),
        ],
        ..Default::default()
    })
    .unwrap()
    .config;
    assert_eq!(
        c.identity.workload_id().unwrap().as_str(),
        "spiffe://legate.local/ns/shop/sa/web.v1"
    );
}

#[test]
fn the_ca_address_must_be_host_and_port() {
    for bad in [
        "https://x:1",
        "x",
        "a b:1",
        "x:0",
        "x:65536",
        "x:",
        ":15012",
        "fd00::1:15012",
        "[fd00::1]",
        "[nope]:15012",
        "a..b:1",
        "-a:1",
        "legate-ca/v1:15012",
    ] {
        let text = only_error(&[("identity.ca_address", bad)], "identity.ca_address");
        assert!(
            text.contains("HOST:PORT") && text.contains("legate-ca.legate-system.svc:15012"),
            "{bad}: {text}"
        );
    }
    for good in [
        "legate-ca.legate-system.svc:15012",
        "legate-ca.legate-system.svc.cluster.local.:15012",
        "legate-ca:15012",
        "localhost:1",
        "10.0.0.5:15012",
        "[fd00::5]:15012",
        "[::1]:65535",
        "my_ca.internal:443",
    ] {
        let loaded = load(&Sources {
            flags: vec![flag("identity.ca_address", good)],
            ..Default::default()
        });
        assert!(loaded.is_ok(), "{good}: {:?}", loaded.err());
    }
}

#[test]
fn the_no_change_id_is_refused_as_a_uid_or_gid() {
    for key in ["proxy.uid", "proxy.gid", "init.capture_group"] {
        let text = only_error(&[(key, "4294967295")], key);
        assert!(
            text.contains("no change") && text.contains("below 4294967295"),
            "{text}"
        );
        let loaded = load(&Sources {
            flags: vec![flag(key, "4294967294")],
            ..Default::default()
        });
        assert!(loaded.is_ok(), "{key}: {:?}", loaded.err());
    }
}

#[test]
fn a_token_ttl_under_one_second_is_refused() {
    for bad in ["0s", "0", "500ms"] {
        let text = only_error(&[("ca.token_ttl", bad)], "ca.token_ttl");
        assert!(
            text.contains("under one second") && text.contains("1s or more"),
            "{bad}: {text}"
        );
    }
    // As `legate ca token --ttl` passes it: the error names the flag.
    let errs = errors(&Sources {
        flags: vec![FlagValue {
            path: "ca.token_ttl".into(),
            value: "0s".into(),
            flag: "--ttl".into(),
        }],
        ..Default::default()
    });
    let text = errs[0].to_string();
    assert!(text.contains("flag --ttl"), "{text}");
    let c = load(&Sources {
        flags: vec![flag("ca.token_ttl", "1s")],
        ..Default::default()
    })
    .unwrap()
    .config;
    assert_eq!(c.ca.token_ttl, std::time::Duration::from_secs(1));
}

/// Loads these flags, which must be valid.
fn loads(flags: &[(&str, &str)]) -> Loaded {
    load(&Sources {
        flags: flags.iter().map(|(k, v)| flag(k, v)).collect(),
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("{flags:?}: {e}"))
}

#[test]
fn an_include_entry_the_excludes_wholly_cover_is_refused() {
    let text = only_error(
        &[
            ("init.include_inbound_ports", "8080"),
            ("init.exclude_inbound_ports", "8000-8999"),
        ],
        "init.include_inbound_ports",
    );
    for needle in [
        "8080 would never be captured",
        "init.exclude_inbound_ports leaves 8000-8999 alone",
        "remove 8080 from init.include_inbound_ports",
        "set init.exclude_inbound_ports to 8000-8079,8081-8999",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in {text}");
    }

    // Only the covered entry is blamed; entries that excludes cover
    // together count as covered.
    let text = only_error(
        &[
            ("init.include_inbound_ports", "8000-8999,9100"),
            ("init.exclude_inbound_ports", "8000-8499,8500-8999"),
        ],
        "init.include_inbound_ports",
    );
    assert!(text.contains("8000-8999 would never"), "{text}");
    assert!(text.contains("drop init.exclude_inbound_ports"), "{text}");
    assert!(!text.contains("9100 would"), "{text}");

    let text = only_error(
        &[
            ("init.include_outbound_cidrs", "10.1.0.0/16"),
            ("init.exclude_outbound_cidrs", "10.0.0.0/8,192.168.0.0/16"),
        ],
        "init.include_outbound_cidrs",
    );
    for needle in [
        "10.1.0.0/16 would never be captured",
        "init.exclude_outbound_cidrs leaves 10.0.0.0/8 alone",
        "remove 10.1.0.0/16 from init.include_outbound_cidrs",
        "narrow init.exclude_outbound_cidrs so that it leaves 10.1.0.0/16 out",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in {text}");
    }
    assert!(text.contains("leaves 10.0.0.0/8 alone (from"), "{text}");
    let text = only_error(
        &[
            ("init.include_outbound_cidrs", "10.0.0.0/8"),
            ("init.exclude_outbound_cidrs", "10.0.0.0/9,10.128.0.0/9"),
        ],
        "init.include_outbound_cidrs",
    );
    assert!(text.contains("10.0.0.0/9,10.128.0.0/9"), "{text}");
    let text = only_error(
        &[
            ("init.include_outbound_cidrs", "fd00:1::/32"),
            ("init.exclude_outbound_cidrs", "fd00::/8"),
        ],
        "init.include_outbound_cidrs",
    );
    assert!(text.contains("fd00::/8"), "{text}");
}

#[test]
fn an_uncapturable_include_names_where_the_exclude_came_from() {
    let errs = errors(&Sources {
        env: env(&[("LEGATE_INIT_EXCLUDE_INBOUND_PORTS", "8000-8999")]),
        flags: vec![flag("init.include_inbound_ports", "8080")],
        ..Default::default()
    });
    let text = errs[0].to_string();
    assert!(
        text.contains(
            "leaves 8000-8999 alone (from environment variable LEGATE_INIT_EXCLUDE_INBOUND_PORTS)"
        ),
        "{text}"
    );
    assert!(
        text.ends_with("(from flag --set init.include_inbound_ports=8080)"),
        "{text}"
    );

    // From one file, the file is named once.
    let f = file(
        "[init]\ninclude_outbound_cidrs = [\"10.1.0.0/16\"]\nexclude_outbound_cidrs = [\"10.0.0.0/8\"]\n",
    );
    let errs = errors(&Sources {
        file: Some(f.path().into()),
        ..Default::default()
    });
    assert_eq!(errs.len(), 1, "{errs:?}");
    let text = errs[0].to_string();
    assert_eq!(text.matches("from file").count(), 1, "{text}");
}

#[test]
fn includes_the_excludes_cover_in_part_stay_accepted() {
    // Capture 8000-8999 except 8500, 10.0.0.0/8 except 10.1.0.0/16.
    let l = loads(&[
        ("init.include_inbound_ports", "8000-8999"),
        ("init.exclude_inbound_ports", "8500"),
        ("init.include_outbound_cidrs", "10.0.0.0/8,fd00::/8"),
        ("init.exclude_outbound_cidrs", "10.1.0.0/16,fd00:1::/32"),
    ]);
    let init = &l.config.init;
    assert!(init.captures_inbound(8080, 15000));
    assert!(!init.captures_inbound(8500, 15000));
    for flags in [
        // Neighbours, not overlaps.
        [
            ("init.include_inbound_ports", "9000"),
            ("init.exclude_inbound_ports", "8000-8999"),
        ],
        // A range around the admin port captures the rest of it.
        [
            ("init.include_inbound_ports", "14000-16000"),
            ("init.exclude_inbound_ports", "14000-14999"),
        ],
        // Nothing of one family overlaps the other.
        [
            ("init.include_outbound_cidrs", "10.0.0.0/8"),
            ("init.exclude_outbound_cidrs", "::/0"),
        ],
        [
            ("init.include_outbound_cidrs", "fd00::/8"),
            ("init.exclude_outbound_cidrs", "0.0.0.0/0"),
        ],
        // Everything but loopback and a piece left alone.
        [
            ("init.include_outbound_cidrs", "0.0.0.0/0"),
            ("init.exclude_outbound_cidrs", "10.0.0.0/9"),
        ],
        [
            ("init.include_outbound_cidrs", "10.0.0.0/8"),
            ("init.exclude_outbound_cidrs", "10.0.0.0/9,10.128.0.0/10"),
        ],
    ] {
        loads(&flags);
    }
}

#[test]
fn an_include_of_what_is_never_captured_is_refused() {
    // The admin port is always left alone.
    let text = only_error(
        &[("init.include_inbound_ports", "15000")],
        "init.include_inbound_ports",
    );
    for needle in [
        "15000 would never be captured",
        "15000 is the port of proxy.admin_listen (from the built-in default)",
        "remove 15000 from init.include_inbound_ports or move proxy.admin_listen",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in {text}");
    }
    loads(&[
        ("init.include_inbound_ports", "15000"),
        ("proxy.admin_listen", "0.0.0.0:9901"),
    ]);
    let text = only_error(
        &[
            ("init.include_inbound_ports", "9901"),
            ("proxy.admin_listen", "0.0.0.0:9901"),
        ],
        "init.include_inbound_ports",
    );
    assert!(
        text.contains("9901 is the port of proxy.admin_listen"),
        "{text}"
    );
    assert!(
        text.contains("(from flag --set proxy.admin_listen=0.0.0.0:9901)"),
        "{text}"
    );
    // Together with an exclude, both are named.
    let text = only_error(
        &[
            ("init.include_inbound_ports", "14999-15000"),
            ("init.exclude_inbound_ports", "14999"),
        ],
        "init.include_inbound_ports",
    );
    assert!(
        text.contains("init.exclude_inbound_ports leaves 14999 alone")
            && text.contains("15000 is the port of proxy.admin_listen")
            && text.contains(", drop init.exclude_inbound_ports or move proxy.admin_listen"),
        "{text}"
    );

    // Loopback never leaves through a captured route.
    for lo in ["127.0.0.1", "127.0.0.0/8", "::1"] {
        let text = only_error(
            &[("init.include_outbound_cidrs", lo)],
            "init.include_outbound_cidrs",
        );
        assert!(text.contains("loopback"), "{lo}: {text}");
        assert!(
            !text.contains("init.exclude_outbound_cidrs"),
            "{lo}: {text}"
        );
    }
    loads(&[("init.include_outbound_cidrs", "126.0.0.0/7")]);
}

#[test]
fn inbound_ports_included_while_inbound_capture_is_off_are_a_warning() {
    let f = file("[init]\ninclude_inbound_ports = \"8080,9000-9010\"\n");
    let l = load(&Sources {
        file: Some(f.path().into()),
        env: env(&[("LEGATE_INIT_CAPTURE_INBOUND", "false")]),
        ..Default::default()
    })
    .expect("a warning, not an error");
    let warnings = l.warnings();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert_eq!(warnings[0].path, "init.include_inbound_ports");
    let text = warnings[0].to_string();
    for needle in [
        "8080,9000-9010 is not captured",
        "init.capture_inbound is false (from environment variable LEGATE_INIT_CAPTURE_INBOUND)",
        "set init.capture_inbound = true",
        "remove init.include_inbound_ports",
        "(from file ",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in {text}");
    }

    // Either alone is fine, and so is leaving inbound alone with excludes.
    for flags in [
        &[("init.capture_inbound", "false")][..],
        &[("init.include_inbound_ports", "8080")],
        &[
            ("init.capture_inbound", "false"),
            ("init.exclude_inbound_ports", "22"),
        ],
    ] {
        assert_eq!(loads(flags).warnings(), [], "{flags:?}");
    }
    assert_eq!(load(&Sources::default()).unwrap().warnings(), []);
}

#[test]
fn a_log_level_tracing_would_read_as_a_target_is_refused() {
    for (bad, needle) in [
        ("degub", "did you mean `debug`"),
        ("info,legate_proxy", "legate_proxy=debug"),
        ("info,", "empty directive"),
        ("legate_proxy=loud", "`loud` is not a level"),
        ("info,legate[{id}]=debug", "span and field filters"),
    ] {
        let text = only_error(&[("log.level", bad)], "log.level");
        assert!(text.contains(needle), "{bad}: {text}");
    }
    for good in ["info", "OFF", "warn,h2=off,legate_proxy::http=trace"] {
        let c = loads(&[("log.level", good)]).config;
        assert_eq!(c.log.level, good);
    }
}
