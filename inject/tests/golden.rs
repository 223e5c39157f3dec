//! Golden tests: `golden/<name>.in.yaml` is injected and compared with
//! `golden/<name>.out.yaml`, byte for byte. After a deliberate change,
//! regenerate the expected files with
//!
//! ```text
//! UPDATE_GOLDEN=1 cargo test -p legate-inject --test golden
//! ```
//!
//! and review the diff. The outputs are also checked against the
//! Kubernetes schemas (`tests/manifests.rs`).

use std::path::{Path, PathBuf};

use legate_inject::{inject, Action, InjectError, Options};
use saphyr::{LoadableYamlNode, Mapping, Yaml};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Fixed options, so the goldens do not change with each release.
fn opts() -> Options {
    Options::new("0.1.0")
}

fn classic() -> Options {
    Options {
        classic_sidecar: true,
        ..opts()
    }
}

fn golden(name: &str, o: &Options) -> String {
    let input = read(&dir().join(format!("{name}.in.yaml")));
    let out = inject(&input, o)
        .unwrap_or_else(|e| panic!("{name}: {e}"))
        .text;
    let expected_path = dir().join(format!("{name}.out.yaml"));
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&expected_path, &out).unwrap();
    }
    let expected = read(&expected_path);
    if out != expected {
        let line = out
            .lines()
            .zip(expected.lines())
            .position(|(a, b)| a != b)
            .unwrap_or(out.lines().count().min(expected.lines().count()));
        panic!(
            "{name}: output differs from {} at line {}:\n  got:      {:?}\n  expected: {:?}\n\
             (after a deliberate change: UPDATE_GOLDEN=1 cargo test -p legate-inject --test golden)",
            expected_path.display(),
            line + 1,
            out.lines().nth(line),
            expected.lines().nth(line)
        );
    }
    assert_preserved(name, &input, &out);
    assert_eq!(
        inject(&out, o).unwrap().text,
        out,
        "{name}: injecting the output again changed it"
    );
    out
}

fn error(name: &str) -> InjectError {
    let input = read(&dir().join(format!("{name}.in.yaml")));
    match inject(&input, &opts()) {
        Ok(_) => panic!("{name}: injected, but should have been refused"),
        Err(e) => e,
    }
}

// ---- everything not added is preserved ---------------------------------

const ADDED_ITEMS: [&str; 4] = [
    "legate-init",
    "legate-proxy",
    "legate-token",
    "legate-bundle",
];
const ADDED_KEYS: [&str; 2] = [
    "legate.dev/injected",
    "kubectl.kubernetes.io/default-container",
];
const MAYBE_CREATED: [&str; 4] = ["metadata", "annotations", "initContainers", "volumes"];

fn is_empty(y: &Yaml<'_>) -> bool {
    matches!(y, Yaml::Mapping(m) if m.is_empty()) || matches!(y, Yaml::Sequence(s) if s.is_empty())
}

/// Removes what injection adds (and the empty collections that held it).
fn strip(y: &mut Yaml<'_>) {
    match y {
        Yaml::Mapping(m) => {
            let mut out = Mapping::new();
            for (k, mut v) in std::mem::take(m) {
                let key = k.as_str().unwrap_or_default().to_owned();
                if ADDED_KEYS.contains(&key.as_str()) {
                    continue;
                }
                strip(&mut v);
                if MAYBE_CREATED.contains(&key.as_str()) && is_empty(&v) {
                    continue;
                }
                out.insert(k, v);
            }
            *m = out;
        }
        Yaml::Sequence(s) => {
            s.retain(|item| {
                let name = item
                    .as_mapping_get("name")
                    .and_then(|n| n.as_str())
                    .unwrap_or_default();
                !ADDED_ITEMS.contains(&name)
            });
            s.iter_mut().for_each(strip);
        }
        _ => {}
    }
}

/// Loading both with scalars resolved, the output minus what injection
/// adds equals the input: same documents, keys in the same order, same
/// values.
fn assert_preserved(name: &str, input: &str, output: &str) {
    let mut a = Yaml::load_from_str(input).unwrap();
    let mut b = Yaml::load_from_str(output).unwrap();
    a.iter_mut().for_each(strip);
    b.iter_mut().for_each(strip);
    assert_eq!(a, b, "{name}: injection changed something it did not add");
}

fn proxy_env(out: &str, doc: usize) -> Vec<(String, String)> {
    let docs = Yaml::load_from_str(out).unwrap();
    let pod = &docs[doc]["spec"]["template"]["spec"];
    let proxy = pod["initContainers"]
        .as_vec()
        .unwrap()
        .iter()
        .chain(pod["containers"].as_vec().unwrap())
        .find(|c| c["name"].as_str() == Some("legate-proxy"))
        .expect("a legate-proxy container")
        .clone();
    let init = pod["initContainers"][0].clone();
    [init, proxy]
        .iter()
        .flat_map(|c| c["env"].as_vec().cloned().unwrap_or_default())
        .filter_map(|e| {
            let value = e.as_mapping_get("value")?.as_str()?;
            Some((e["name"].as_str()?.to_owned(), value.to_owned()))
        })
        .collect()
}

// ---- the cases -------------------------------------------------------------

#[test]
fn deployment_with_two_containers() {
    let out = golden("deployment-two-containers", &opts());
    // Scalars are written as they were read: 0644 stays octal for
    // Kubernetes, "yes" stays a quoted string.
    assert!(out.contains("defaultMode: 0644\n"));
    assert!(out.contains("value: \"yes\"\n"));
    // The comment above the document is kept.
    assert!(out.starts_with("# A web server"));
}

#[test]
fn statefulset_keeps_its_init_containers_after_the_proxy() {
    let out = golden("statefulset", &opts());
    let docs = Yaml::load_from_str(&out).unwrap();
    let names: Vec<&str> = docs[0]["spec"]["template"]["spec"]["initContainers"]
        .as_vec()
        .unwrap()
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(names, ["legate-init", "legate-proxy", "config"]);
}

#[test]
fn cronjob_injects_the_job_template() {
    let out = golden("cronjob", &opts());
    let docs = Yaml::load_from_str(&out).unwrap();
    let pod = &docs[0]["spec"]["jobTemplate"]["spec"]["template"];
    assert_eq!(
        pod["metadata"]["annotations"]["legate.dev/injected"].as_str(),
        Some("0.1.0")
    );
    assert_eq!(
        pod["spec"]["initContainers"][1]["restartPolicy"].as_str(),
        Some("Always"),
        "a native sidecar does not hold the Job open"
    );
}

#[test]
fn multi_document_passes_other_kinds_through_byte_for_byte() {
    let input = read(&dir().join("multi-document.in.yaml"));
    let out = golden("multi-document", &opts());
    let untouched = [
        "# Everything the orders service needs.\n",
        "---\napiVersion: v1\nkind: ConfigMap\n",
        "  config.yaml: |\n    listen: 0.0.0.0:8080\n    retries:   3\n  enabled: 'on'\n",
        "metadata: {name: orders, namespace: shop}\n",
        "kind: ServiceAccount\n",
    ];
    for piece in untouched {
        assert!(
            input.contains(piece) && out.contains(piece),
            "{piece:?} was not kept"
        );
    }
    let reports = inject(&input, &opts()).unwrap().reports;
    let actions: Vec<(usize, Action)> = reports.iter().map(|r| (r.at.document, r.action)).collect();
    assert_eq!(
        actions,
        [
            (1, Action::NoPodTemplate),
            (2, Action::NoPodTemplate),
            (3, Action::Injected),
            (4, Action::NoPodTemplate),
        ]
    );
    // The marker line with its comment stays above the injected document.
    assert!(out.contains("--- # the workload\napiVersion: apps/v1\n"));
}

#[test]
fn pod_already_injected_is_unchanged() {
    let input = read(&dir().join("pod-already-injected.in.yaml"));
    let result = inject(&input, &opts()).unwrap();
    assert_eq!(result.text, input);
    assert_eq!(result.reports[0].action, Action::AlreadyInjected);
}

#[test]
fn injecting_twice_equals_injecting_once() {
    for entry in std::fs::read_dir(dir()).unwrap() {
        let path = entry.unwrap().path();
        if !path.to_string_lossy().ends_with(".in.yaml") {
            continue;
        }
        for o in [opts(), classic()] {
            let Ok(once) = inject(&read(&path), &o) else {
                continue;
            };
            let twice = inject(&once.text, &o).unwrap();
            assert_eq!(twice.text, once.text, "{}", path.display());
        }
    }
}

#[test]
fn host_network_is_refused() {
    let e = error("host-network");
    assert!(matches!(e, InjectError::HostNetwork { .. }), "{e:?}");
    let msg = e.to_string();
    for part in [
        "document 2",
        "DaemonSet monitoring/node-exporter",
        "line 8",
        "hostNetwork",
        "node's own traffic",
        "legate.dev/inject: \"false\"",
    ] {
        assert!(msg.contains(part), "{part:?} missing from: {msg}");
    }
}

#[test]
fn invalid_yaml_error_names_the_document_and_line() {
    let e = error("invalid-yaml");
    let InjectError::Syntax { document, line, .. } = &e else {
        panic!("{e:?}");
    };
    assert_eq!((*document, *line), (2, 15), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("document 2") && msg.contains("line 15"),
        "{msg}"
    );
}

#[test]
fn annotations_are_honoured() {
    let out = golden("annotations", &opts());
    let env = proxy_env(&out, 0);
    let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    // The pod template's annotation wins over the workload's.
    assert_eq!(get("LEGATE_PROXY_MODE"), Some("strict"));
    assert_eq!(get("LEGATE_PROXY_OPAQUE_PORTS"), Some("5432,6379"));
    assert_eq!(get("LEGATE_INIT_EXCLUDE_INBOUND_PORTS"), Some("9090"));
    assert_eq!(
        get("LEGATE_INIT_INCLUDE_INBOUND_PORTS"),
        Some("8443,9000-9100")
    );
    assert_eq!(get("LEGATE_INIT_EXCLUDE_OUTBOUND_PORTS"), Some("5432"));
    assert_eq!(
        get("LEGATE_INIT_EXCLUDE_OUTBOUND_CIDRS"),
        Some("169.254.169.254/32,10.96.0.1/32")
    );
    assert_eq!(get("LEGATE_PROXY_UID"), Some("1337"));

    let docs = Yaml::load_from_str(&out).unwrap();
    let proxy = &docs[0]["spec"]["template"]["spec"]["initContainers"][1];
    // The proxy reads the inbound capture lists too: it forwards a peer to
    // localhost only on ports the rules capture.
    let proxy_vars: Vec<&str> = proxy["env"]
        .as_vec()
        .unwrap()
        .iter()
        .filter_map(|e| e["name"].as_str())
        .collect();
    for var in [
        "LEGATE_INIT_EXCLUDE_INBOUND_PORTS",
        "LEGATE_INIT_INCLUDE_INBOUND_PORTS",
    ] {
        assert!(proxy_vars.contains(&var), "{var} not given to the proxy");
    }
    assert_eq!(proxy["resources"]["requests"]["cpu"].as_str(), Some("100m"));
    assert_eq!(
        proxy["resources"]["requests"]["memory"].as_str(),
        Some("64Mi")
    );
    // Only set on the workload: used as a fallback.
    assert_eq!(
        proxy["resources"]["limits"]["memory"].as_str(),
        Some("256Mi")
    );

    // legate.dev/inject: "false" leaves the second document untouched.
    let input = read(&dir().join("annotations.in.yaml"));
    let second = &input[input.find("---\n").unwrap()..];
    assert!(out.ends_with(second));
}

fn refused(doc: &str) -> String {
    inject(doc, &opts()).unwrap_err().to_string()
}

#[test]
fn bad_annotations_are_refused_with_the_fix() {
    let pod = |annotation: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n  annotations:\n    {annotation}\nspec:\n  containers:\n  - name: a\n    image: busybox\n"
        )
    };
    let e = refused(&pod("legate.dev/mode: strikt"));
    assert!(e.contains("legate.dev/mode") && e.contains("strict"), "{e}");
    let e = refused(&pod("legate.dev/skip-outbound-cidrs: 10.0.0.0/33"));
    assert!(e.contains("legate.dev/skip-outbound-cidrs"), "{e}");
    let e = refused(&pod("legate.dev/skip-inbound-ports: http"));
    assert!(e.contains("legate.dev/skip-inbound-ports"), "{e}");
    let e = refused(&pod("legate.dev/proxy-memory-limit: 128MB"));
    assert!(e.contains("quantity"), "{e}");
    let e = refused(&pod("legate.dev/skip-outbound-port: \"22\""));
    assert!(
        e.contains("did you mean legate.dev/skip-outbound-ports"),
        "{e}"
    );
    let e = refused(&pod("legate.dev/inject: \"no\""));
    assert!(e.contains("\"false\""), "{e}");
    assert!(e.contains("document 1 (Pod p, line 1)"), "{e}");
}

#[test]
fn reserved_names_are_refused() {
    let doc = "kind: Pod\nmetadata: {name: p}\nspec:\n  containers:\n  - {name: a, image: x}\n  volumes:\n  - {name: legate-token, emptyDir: {}}\n";
    let e = refused(doc);
    assert!(e.contains("volume named \"legate-token\""), "{e}");
}

#[test]
fn classic_sidecar_runs_the_proxy_first_with_a_poststart_hook() {
    let out = golden("classic-sidecar", &classic());
    let docs = Yaml::load_from_str(&out).unwrap();
    let pod = &docs[0]["spec"];
    assert_eq!(pod["containers"][0]["name"].as_str(), Some("legate-proxy"));
    assert!(pod["containers"][0]
        .as_mapping_get("restartPolicy")
        .is_none());
    let hook = &pod["containers"][0]["lifecycle"]["postStart"]["exec"]["command"];
    assert_eq!(hook[1].as_str(), Some("wait-ready"));
    assert_eq!(
        docs[0]["metadata"]["annotations"]["kubectl.kubernetes.io/default-container"].as_str(),
        Some("toolbox")
    );
    assert_eq!(pod["initContainers"].as_vec().map(Vec::len), Some(1));
}

#[test]
fn daemonset_replicaset_and_job() {
    let out = golden("other-kinds", &opts());
    assert_eq!(out.matches("legate.dev/injected").count(), 3);
}

#[test]
fn list_items_are_injected() {
    let out = golden("list", &opts());
    let input = read(&dir().join("list.in.yaml"));
    let reports = inject(&input, &opts()).unwrap().reports;
    let whats: Vec<&str> = reports.iter().map(|r| r.at.what.as_str()).collect();
    assert_eq!(
        whats,
        [
            "List item 1 (Deployment ops/worker)",
            "List item 2 (Service ops/worker)"
        ]
    );
    assert_eq!(out.matches("legate.dev/injected").count(), 1);
}

#[test]
fn partial_objects_are_left_alone() {
    // A patch of a Deployment has no complete pod template.
    for doc in [
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\nspec:\n  replicas: 4\n",
        "kind: Deployment\nmetadata: {name: web}\nspec:\n  template:\n    metadata:\n      labels: {a: b}\n",
        "kind: Pod\nmetadata: {name: p}\nspec:\n  containers: []\n",
    ] {
        let result = inject(doc, &opts()).unwrap();
        assert_eq!(result.text, doc);
        assert_eq!(result.reports[0].action, Action::Incomplete);
    }
}

#[test]
fn empty_and_comment_only_input_passes_through() {
    for input in ["", "# nothing\n", "---\n", "--- # a\n...\n"] {
        assert_eq!(inject(input, &opts()).unwrap().text, input);
    }
}
