//! The README's main command: `legate demo` builds its mesh, every check
//! in it behaves as described, and it leaves nothing behind.

use std::process::Command;

#[test]
fn the_demo_runs_every_scene_and_cleans_up() {
    let out = Command::new(env!("CARGO_BIN_EXE_legate"))
        .arg("demo")
        .env_remove("LEGATE_LOG")
        .output()
        .expect("run legate demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("all 9 checks behaved as expected"),
        "{stdout}"
    );
    assert!(!stdout.contains("UNEXPECTED"), "{stdout}");
    let prefix = stdout
        .lines()
        .find_map(|l| l.strip_prefix("cleaned up: every namespace, process and rule of "))
        .and_then(|l| l.split_whitespace().next())
        .expect("the demo names its namespaces")
        .to_owned();
    assert!(
        legate_testbed::namespaces_of(&prefix).unwrap().is_empty(),
        "namespaces of {prefix} are left"
    );
}
