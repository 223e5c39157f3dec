//! Helpers shared by the test files.
#![allow(dead_code)]

use std::process::Command;
use std::time::{Duration, Instant};

/// Runs `ip ARGS` and returns stdout; panics with stderr on failure.
/// Tests only read the host's state with it, never change it.
pub fn ip(args: &[&str]) -> String {
    let output = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        output.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Runs a command in a namespace through `ip netns exec`, independently of
/// the bed's own way in.
pub fn netns_exec(netns: &str, argv: &[&str]) -> String {
    let mut args = vec!["netns", "exec", netns];
    args.extend_from_slice(argv);
    ip(&args)
}

/// Whether a process is alive (zombies are not).
pub fn pid_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !matches!(
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.trim_start().chars().next()),
            Some('Z' | 'X')
        ),
        Err(_) => false,
    }
}

/// Waits up to 10 s for a process to die; panics if it does not.
pub fn wait_dead(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while pid_alive(pid) {
        assert!(Instant::now() < deadline, "process {pid} is still alive");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Names of the host's own links.
pub fn host_links() -> Vec<String> {
    let mut links: Vec<String> = ip(&["-o", "link", "show"])
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_owned())
        .collect();
    links.sort();
    links
}
