//! `legate check` on a meshed pod, on one checked against the wrong proxy
//! uid, and on a pod with neither rules nor proxy.

mod common;

use common::*;
use legate_testbed::Pod;

/// Runs `legate check` in `pod` as root with `--set` options: whether it
/// passed, and what it printed.
fn check(mesh: &Mesh, pod: &Pod, set: &[String]) -> (bool, String) {
    check_as(mesh, pod, set, 0)
}

fn check_as(mesh: &Mesh, pod: &Pod, set: &[String], uid: u32) -> (bool, String) {
    let mut args = vec!["check".to_string()];
    for s in set {
        args.extend(["--set".to_string(), s.clone()]);
    }
    let out = mesh
        .legate
        .command(pod)
        .uid(uid)
        .gid(uid)
        .args(&args)
        .output()
        .expect("legate check runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let err = String::from_utf8_lossy(&out.stderr);
    (out.status.success(), format!("{text}{err}"))
}

/// The line of one check.
fn line<'a>(out: &'a str, name: &str) -> &'a str {
    out.lines()
        .find(|l| l.split_whitespace().nth(1) == Some(name))
        .unwrap_or_else(|| panic!("no {name} line in:\n{out}"))
}

#[test]
fn check_passes_a_meshed_pod_and_names_what_is_wrong_elsewhere() {
    let mesh = Mesh::new(&[]);
    let web = mesh.meshed_pod("web", PodOptions::default());
    let ca = format!("identity.ca_address={}", mesh.ca.address());

    let (ok, out) = check(&mesh, &web.pod, std::slice::from_ref(&ca));
    assert!(ok, "{out}");
    for name in [
        "capture",
        "listeners",
        "proxy",
        "identity",
        "trust",
        "traffic",
        "CA",
    ] {
        assert!(line(&out, name).starts_with("ok "), "{out}");
    }
    assert!(line(&out, "identity").contains(web.id()), "{out}");
    assert!(line(&out, "listeners").contains("uid 1337"), "{out}");
    // The test CA's intermediate (a year) expires before its root (ten).
    assert!(line(&out, "trust").contains("the intermediate"), "{out}");
    assert!(out.contains("7 ok, 0 warnings, 0 failed"), "{out}");

    // With the bundle, the CA is verified as the proxy verifies it; under
    // the wrong trust domain it is not the CA the proxy would accept.
    let bundle = mesh.ca.bundle_file().expect("bundle");
    let mut verified = vec![
        ca.clone(),
        format!("identity.ca_bundle={}", bundle.display()),
        format!(
            "identity.trust_domain={}",
            legate_testbed::mesh::TRUST_DOMAIN
        ),
    ];
    let (_, out) = check(&mesh, &web.pod, &verified);
    let line_ca = line(&out, "CA");
    assert!(
        line_ca.starts_with("ok ") && line_ca.contains("answers as the CA"),
        "{out}"
    );
    verified[2] = "identity.trust_domain=elsewhere.test".into();
    let (ok, out) = check(&mesh, &web.pod, &verified);
    assert!(!ok, "{out}");
    assert!(
        line(&out, "CA").contains("does not answer as the CA"),
        "{out}"
    );

    // From the sidecar, which may not read netfilter rules: a warning that
    // says where to look instead, not a failure.
    let (ok, out) = check_as(&mesh, &web.pod, std::slice::from_ref(&ca), PROXY_UID);
    assert!(ok, "{out}");
    let capture = line(&out, "capture");
    assert!(
        capture.starts_with("WARN") && capture.contains("CAP_NET_ADMIN"),
        "{out}"
    );
    assert!(out.contains("6 ok, 1 warning, 0 failed"), "{out}");

    // A pod whose certificate another CA issued calls: the handshakes it
    // fails show on the server's side.
    let rogue_ca = Ca::start(&mesh.bed, "rogue-ca", &[]);
    let rogue = mesh.meshed_pod_of(&rogue_ca, "rogue", PodOptions::default());
    let (_, answer, _) = curl(
        &rogue.pod,
        &["-i", &format!("http://{}:8080/", web.pod.ip())],
    );
    assert!(answer.starts_with("HTTP/1.1 502"), "{answer}");
    let (ok, out) = check(&mesh, &web.pod, std::slice::from_ref(&ca));
    assert!(ok, "a warning fails nothing:\n{out}");
    assert!(line(&out, "traffic").starts_with("WARN"), "{out}");
    assert!(
        out.contains("inbound mTLS handshakes failed (handshake_failed)"),
        "{out}"
    );

    // Checked against a configuration whose proxy uid is not the one the
    // proxy runs as: the rules do not exempt that uid, and the listeners
    // belong to another.
    let (ok, out) = check(&mesh, &web.pod, &[ca.clone(), "proxy.uid=1400".into()]);
    assert!(!ok, "{out}");
    let capture = line(&out, "capture");
    assert!(
        capture.starts_with("FAIL") && capture.contains("differ from the plan"),
        "{out}"
    );
    assert!(
        out.contains("1400"),
        "the differing rule lines are shown:\n{out}"
    );
    let listeners = line(&out, "listeners");
    assert!(listeners.starts_with("FAIL"), "{out}");
    assert!(
        listeners.contains("served by uid 1337") && listeners.contains("proxy.uid is 1400"),
        "{out}"
    );
    assert!(
        out.contains("fix: run the proxy as uid 1400, or set proxy.uid=1337"),
        "{out}"
    );
    assert!(line(&out, "proxy").starts_with("ok "), "{out}");

    // A pod with no rules and no proxy, and a CA port nothing listens on.
    let bare = mesh.plain_pod("bare");
    let closed = format!("identity.ca_address={}:1", mesh.ca.pod.ip());
    let (ok, out) = check(&mesh, &bare, &[closed]);
    assert!(!ok, "{out}");
    assert!(line(&out, "capture").contains("not installed"), "{out}");
    assert!(out.contains("fix: run `legate init` here"), "{out}");
    assert!(
        line(&out, "listeners").contains("nothing listens on 15001"),
        "{out}"
    );
    assert!(
        line(&out, "proxy").contains("no admin server answers"),
        "{out}"
    );
    assert!(line(&out, "CA").contains("cannot be reached"), "{out}");
    assert!(out.contains("0 ok, 0 warnings, 4 failed"), "{out}");
}

#[test]
fn check_compares_the_rules_of_legate_run_with_the_plan_of_legate_run() {
    let mesh = Mesh::new(&[]);
    let host = mesh.plain_pod("host");
    let flags = shared_dir().expect("shared dir");
    let started = flags.path().join("started");
    let script = format!("touch {} && exec sleep 30", started.display());
    // `legate run` starts its command once its proxy is ready.
    let mut wrapped = mesh
        .legate
        .command(&host)
        .args(["run", "--", "sh", "-c", &script])
        .spawn()
        .expect("legate run");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !started.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the wrapped command did not start:\n{}",
            wrapped.stderr()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }

    let (ok, out) = check(&mesh, &host, &[]);
    assert!(ok, "{out}");
    let capture = line(&out, "capture");
    assert!(
        capture.starts_with("ok ") && capture.contains("`legate run`'s rules (group 1339)"),
        "{out}"
    );
    assert!(line(&out, "listeners").starts_with("ok "), "{out}");
    assert!(line(&out, "identity").starts_with("ok "), "{out}");
    // Its throwaway CA lives inside `legate run`; none is configured here.
    assert!(line(&out, "CA").starts_with("- "), "{out}");

    wrapped
        .signal(legate_testbed::Signal::SIGTERM)
        .expect("signal");
    wrapped
        .wait_timeout(std::time::Duration::from_secs(30))
        .expect("legate run ends");
}
