//! Nothing a bed makes outlives it: not on drop, not on panic, not on
//! Ctrl-C or SIGTERM, and (after the next bed's sweep) not even on SIGKILL.
//!
//! The signal and crash cases run this test binary again as a child process,
//! with `LEGATE_TESTBED_CRASH` telling [`crash_child_helper`] what to do.

use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use legate_testbed::{namespaces_of, Bed, Signal};

mod common;

const CRASH_ENV: &str = "LEGATE_TESTBED_CRASH";

/// Everything a bed made and the processes it ran.
struct Made {
    prefix: String,
    pids: Vec<u32>,
}

fn assert_all_gone(made: &Made, host_links_before: &[String]) {
    let left = namespaces_of(&made.prefix).expect("list namespaces");
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
    let host = common::ip(&["-o", "-d", "link", "show"]);
    assert!(
        !host.contains(&made.prefix),
        "the host namespace shows a link of the bed: {host}"
    );
    assert_eq!(
        common::host_links(),
        host_links_before,
        "the host's links changed"
    );
    for &pid in &made.pids {
        common::wait_dead(pid);
    }
}

/// A bed with two pods, a tracked process and one started outside the
/// bed's tracking, as a test might through `into_std`.
fn populate(bed: &Bed) -> (Made, legate_testbed::Process, Child) {
    let a = bed.pod("a").expect("pod a");
    let b = bed.pod("b").expect("pod b");
    let tracked = a.spawn(["sleep", "1000"]).expect("spawn tracked");
    let untracked = b
        .command("sleep")
        .arg("1000")
        .into_std()
        .expect("std command")
        .spawn()
        .expect("spawn untracked");
    assert_eq!(namespaces_of(bed.prefix()).expect("list").len(), 3);
    let made = Made {
        prefix: bed.prefix().to_owned(),
        pids: vec![tracked.pid(), untracked.id()],
    };
    (made, tracked, untracked)
}

#[test]
fn a_dropped_bed_leaves_nothing() {
    let before = common::host_links();
    let bed = Bed::new().expect("test bed");
    let (made, tracked, mut untracked) = populate(&bed);
    let links = common::ip(&["-n", &bed.bridge_netns(), "-o", "link", "show"]);
    assert!(
        links.contains(&made.prefix),
        "aliases name the pods: {links}"
    );
    // The tracked handle outlives the bed on purpose: the bed kills it anyway.
    drop(bed);

    let status = wait_child(&mut untracked, Duration::from_secs(10));
    assert_eq!(status.signal(), Some(Signal::SIGKILL as i32));
    drop(tracked);
    assert_all_gone(&made, &before);
}

#[test]
fn a_panic_with_a_live_bed_leaves_nothing() {
    let before = common::host_links();
    let (tx, rx) = mpsc::channel();
    let result = std::thread::spawn(move || {
        let bed = Bed::new().expect("test bed");
        let (made, _tracked, _untracked) = populate(&bed);
        tx.send(made).expect("send");
        panic!("deliberate panic with a live bed");
    })
    .join();
    assert!(result.is_err(), "the thread panicked");
    let made = rx.recv().expect("bed was made");
    assert_all_gone(&made, &before);
}

#[test]
fn a_child_that_panics_leaves_nothing() {
    let before = common::host_links();
    let (mut child, made) = start_child("panic");
    let status = wait_child(&mut child, Duration::from_secs(30));
    assert_eq!(status.code(), Some(101), "libtest's code for a failed test");
    assert_all_gone(&made, &before);
}

#[test]
fn ctrl_c_tears_down_and_exits_130() {
    signalled_child_leaves_nothing(Signal::SIGINT, 130);
}

#[test]
fn sigterm_tears_down_and_exits_143() {
    signalled_child_leaves_nothing(Signal::SIGTERM, 143);
}

fn signalled_child_leaves_nothing(signal: Signal, code: i32) {
    let before = common::host_links();
    let (mut child, made) = start_child("wait");
    signal_child(&child, signal);
    let status = wait_child(&mut child, Duration::from_secs(30));
    assert_eq!(status.code(), Some(code), "{status}");
    assert_all_gone(&made, &before);
}

#[test]
fn sigkill_leftovers_are_swept_by_the_next_bed() {
    let before = common::host_links();
    let (mut child, made) = start_child("wait");
    signal_child(&child, Signal::SIGKILL);
    let status = wait_child(&mut child, Duration::from_secs(30));
    assert_eq!(status.signal(), Some(Signal::SIGKILL as i32));
    // Nothing ran its cleanup; the processes it started are orphans now,
    // still inside the bed's namespaces (unless another test process's
    // sweep already got them, which is just as good).
    let next = Bed::new().expect("test bed");
    drop(next);
    assert_all_gone(&made, &before);
}

/// Not a test of its own: the body of the child process for the tests
/// above. Without the variable it does nothing.
#[test]
fn crash_child_helper() {
    let Ok(mode) = std::env::var(CRASH_ENV) else {
        return;
    };
    let bed = Bed::new().expect("test bed");
    let (made, _tracked, _untracked) = populate(&bed);
    let pids: Vec<String> = made.pids.iter().map(u32::to_string).collect();
    println!("READY {} {}", made.prefix, pids.join(" "));
    match mode.as_str() {
        "panic" => panic!("deliberate panic with a live bed"),
        // Killed by the parent before this ends.
        _ => std::thread::sleep(Duration::from_secs(60)),
    }
}

/// Runs [`crash_child_helper`] in a child process and waits until its bed
/// is up.
fn start_child(mode: &str) -> (Child, Made) {
    let exe = std::env::current_exe().expect("test binary");
    let mut child = Command::new(exe)
        .args([
            "--exact",
            "crash_child_helper",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CRASH_ENV, mode)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        // The deliberate panic's message would read like a failure in the
        // log; keep the child's stderr unless it is needed.
        .stderr(Stdio::piped())
        .spawn()
        .expect("start child");
    let stdout = child.stdout.take().expect("stdout");
    let mut stderr = child.stderr.take().expect("stderr");
    let stderr = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut text);
        text
    });
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            // libtest prints "test NAME ... " on the same line first.
            if let Some((_, ready)) = line.split_once("READY ") {
                let _ = tx.send(ready.to_owned());
            }
        }
    });
    let ready = match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(ready) => ready,
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = stderr.join().unwrap_or_default();
            panic!("the child never reported its bed; its stderr:\n{stderr}");
        }
    };
    let mut words = ready.split_whitespace();
    let prefix = words.next().expect("prefix").to_owned();
    let pids = words.map(|p| p.parse().expect("pid")).collect();
    (child, Made { prefix, pids })
}

fn signal_child(child: &Child, signal: Signal) {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid"));
    nix::sys::signal::kill(pid, signal).expect("signal child");
}

fn wait_child(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("child {} did not exit in {timeout:?}", child.id());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
